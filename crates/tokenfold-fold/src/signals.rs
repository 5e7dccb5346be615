//! Token-importance signals, computed from a layer's queries and keys without the full attention matrix.
//!
//! - [`QueriesKeys::query_attention`]: the attention rows of a few query positions (the last prompt token
//!   for FastV and PDrop, the text raters of SparseVLM, the summary token for VisionZip and PruMerge),
//!   q·Kᵀ for those rows only, softmax over the keys each query may see, averaged or summed over heads and
//!   averaged over queries.
//! - [`QueriesKeys::attention_received`]: how much attention each key receives from a set of queries, one
//!   query row at a time, so the (t × t) matrix never exists.
//! - [`QueriesKeys::key_metric`]: keys averaged over heads (ToMe's similarity metric);
//!   [`QueriesKeys::key_l1`]: L1 norms of the keys with heads concatenated (DART's pivot choice).
//!
//! A stage at the input of a layer computes that layer's keys at every row but its queries only at the
//! rows it reads ([`QueriesKeys::from_keys_and_rows`]); a stage that reads the previous layer has them all.
//! A stage reads the queries and keys of its layer on the host, in place ([`HostValues`]: they are not
//! copied, which took 30–90 µs per stage at batch 16), and computes the signals in plain loops: each is
//! a few rows, where a tensor op per sample would cost more in dispatch and thread synchronisation than in
//! arithmetic.

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use parking_lot::RwLockReadGuard;

use crate::ops::Matrix;

/// How per-head attention rows are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadReduce {
    Mean,
    Sum,
}

/// One sample's view of the running sequence: which rows exist and who sees whom.
#[derive(Debug, Clone)]
pub struct RowLayout<'a> {
    pub positions: &'a [u32],
    pub is_image: &'a [bool],
    pub valid: &'a [bool],
    /// Additive per-key bias (log sizes), if any.
    pub key_bias: Option<&'a [f32]>,
}

impl RowLayout<'_> {
    pub fn visible(&self, query: usize, key: usize) -> bool {
        self.valid[key]
            && (self.positions[key] <= self.positions[query]
                || (self.is_image[query] && self.is_image[key]))
    }
}

/// The values of a tensor on the host, row-major: read in place from a contiguous f32 tensor on the CPU
/// (its storage's read lock held while this lives), copied from any other. A reduction stage reads the
/// keys of every row of its layer, 1.3 MB at batch 16 for nmm-s; copying them out took 30–90 µs.
///
/// While one lives, nothing may write into its tensor's storage (candle's in-place setters, a `Var`'s
/// `set`): the writer would wait on the read lock. The reduction only reads the tensors it holds. Values
/// of another dtype are converted to f32 (keys in f64 are read as f32).
pub struct HostValues<'t> {
    dims: Vec<usize>,
    held: Held<'t>,
}

enum Held<'t> {
    /// The storage's read lock and the tensor's range in it.
    InPlace(RwLockReadGuard<'t, Storage>, std::ops::Range<usize>),
    Copied(Vec<f32>),
}

impl<'t> HostValues<'t> {
    pub fn of(tensor: &'t Tensor) -> Result<HostValues<'t>> {
        let dims = tensor.dims().to_vec();
        let (storage, layout) = tensor.storage_and_layout();
        let range = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(_)), Some((start, end))) => Some(start..end),
            _ => None,
        };
        let held = match range {
            Some(range) => Held::InPlace(storage, range),
            None => {
                drop(storage);
                Held::Copied(tensor.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
            }
        };
        Ok(HostValues { dims, held })
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Whether the values are read in place (not copied).
    pub fn in_place(&self) -> bool {
        matches!(self.held, Held::InPlace(..))
    }

    pub fn as_slice(&self) -> &[f32] {
        match &self.held {
            Held::InPlace(storage, range) => match &**storage {
                Storage::Cpu(CpuStorage::F32(values)) => &values[range.clone()],
                // `of` holds a storage in place only when it is f32 on the CPU.
                _ => unreachable!("a tensor read in place is f32 on the CPU"),
            },
            Held::Copied(values) => values,
        }
    }
}

/// Keys (b, h, t, hd) of one layer and its queries at every row or at a few, on the host (owned, or
/// borrowed from [`HostValues`]).
#[derive(Debug, Clone)]
pub struct QueriesKeys<'a> {
    /// Queries (b, h, t, hd), or (h, n, hd) for the n rows of `query_slot`.
    q: Cow<'a, [f32]>,
    /// For queries at a few rows: each flat row's (s·t + j) place among them, `usize::MAX` if absent.
    query_slot: Option<Vec<usize>>,
    k: Cow<'a, [f32]>,
    heads: usize,
    len: usize,
    head_dim: usize,
}

impl QueriesKeys<'static> {
    /// From queries and keys (b, h, t, hd) at every row.
    pub fn from_tensors(q: &Tensor, k: &Tensor) -> Result<QueriesKeys<'static>> {
        let (q, k) = (HostValues::of(q)?, HostValues::of(k)?);
        Ok(QueriesKeys::at_every_row(&q, &k)?.into_owned())
    }

    /// From keys (b, h, t, hd) and the queries (1, h, n, hd) at the flat rows `query_rows` (s·t + j), as
    /// [`tokenfold_model::NativeModel::layer_keys_and_queries_at`] gives them.
    pub fn from_keys_and_rows(
        k: &Tensor,
        q: Option<&Tensor>,
        query_rows: &[usize],
    ) -> Result<QueriesKeys<'static>> {
        let k = HostValues::of(k)?;
        let q = q.map(HostValues::of).transpose()?;
        Ok(QueriesKeys::at_rows(&k, q.as_ref(), query_rows)?.into_owned())
    }
}

impl<'a> QueriesKeys<'a> {
    /// [`QueriesKeys::from_tensors`] reading the values in place.
    pub fn at_every_row(q: &'a HostValues, k: &'a HostValues) -> Result<QueriesKeys<'a>> {
        let [_, heads, len, head_dim] = four_dims(q, "queries")?;
        if k.dims() != q.dims() {
            candle_core::bail!("keys of shape {:?}, queries {:?}", k.dims(), q.dims());
        }
        Ok(QueriesKeys {
            q: Cow::Borrowed(q.as_slice()),
            query_slot: None,
            k: Cow::Borrowed(k.as_slice()),
            heads,
            len,
            head_dim,
        })
    }

    /// The same queries and keys, copied out of what they borrow.
    fn into_owned(self) -> QueriesKeys<'static> {
        QueriesKeys {
            q: Cow::Owned(self.q.into_owned()),
            k: Cow::Owned(self.k.into_owned()),
            query_slot: self.query_slot,
            heads: self.heads,
            len: self.len,
            head_dim: self.head_dim,
        }
    }

    /// [`QueriesKeys::from_keys_and_rows`] reading the values in place.
    pub fn at_rows(
        k: &'a HostValues,
        q: Option<&'a HostValues>,
        query_rows: &[usize],
    ) -> Result<QueriesKeys<'a>> {
        let [batch, heads, len, head_dim] = four_dims(k, "keys")?;
        let mut slot = vec![usize::MAX; batch * len];
        for (i, &row) in query_rows.iter().enumerate() {
            match slot.get_mut(row) {
                Some(place) => *place = i,
                None => candle_core::bail!("query row {row} is outside the {batch} × {len} rows"),
            }
        }
        let q: &[f32] = match q {
            Some(q) => {
                let expected = [1, heads, query_rows.len(), head_dim];
                if q.dims() != expected {
                    candle_core::bail!("queries of shape {:?}, expected {expected:?}", q.dims());
                }
                q.as_slice()
            }
            None if query_rows.is_empty() => &[],
            None => candle_core::bail!("{} query rows but no queries", query_rows.len()),
        };
        Ok(QueriesKeys {
            q: Cow::Borrowed(q),
            query_slot: Some(slot),
            k: Cow::Borrowed(k.as_slice()),
            heads,
            len,
            head_dim,
        })
    }

    /// The keys of head h of sample s, (t, hd) row-major.
    fn head_keys(&self, s: usize, h: usize) -> &[f32] {
        let block = self.len * self.head_dim;
        let start = (s * self.heads + h) * block;
        &self.k[start..start + block]
    }

    fn key(&self, s: usize, h: usize, j: usize) -> &[f32] {
        &self.head_keys(s, h)[j * self.head_dim..(j + 1) * self.head_dim]
    }

    fn query(&self, s: usize, h: usize, i: usize) -> Result<&[f32]> {
        let start = match &self.query_slot {
            None => ((s * self.heads + h) * self.len + i) * self.head_dim,
            Some(slots) => {
                let slot = slots[s * self.len + i];
                if slot == usize::MAX {
                    candle_core::bail!("the query of row {i} of sample {s} was not computed");
                }
                let n = self.q.len() / (self.heads * self.head_dim);
                (h * n + slot) * self.head_dim
            }
        };
        Ok(&self.q[start..start + self.head_dim])
    }

    /// Attention probabilities (over all t keys) of `queries` rows of sample `s`, reduced over heads by
    /// `heads` and averaged over the queries. An error if a query row's query was not computed.
    pub fn query_attention(
        &self,
        s: usize,
        layout: &RowLayout,
        queries: &[usize],
        heads: HeadReduce,
    ) -> Result<Vec<f32>> {
        let t = self.len;
        let mut out = vec![0f32; t];
        if queries.is_empty() {
            return Ok(out);
        }
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let head_weight = match heads {
            HeadReduce::Mean => 1.0 / self.heads as f32,
            HeadReduce::Sum => 1.0,
        } / queries.len() as f32;
        let mut logits = vec![0f32; t];
        let mut visible = vec![false; t];
        for &i in queries {
            for (j, v) in visible.iter_mut().enumerate() {
                *v = layout.visible(i, j);
            }
            for h in 0..self.heads {
                let q = self.query(s, h, i)?;
                // Every key's product, the hidden ones too: eight at a time is faster than skipping.
                crate::ops::dots(q, self.head_keys(s, h), self.head_dim, &mut logits);
                let mut max = f32::NEG_INFINITY;
                for (j, logit) in logits.iter_mut().enumerate() {
                    *logit = if visible[j] {
                        *logit * scale + layout.key_bias.map_or(0.0, |b| b[j])
                    } else {
                        f32::NEG_INFINITY
                    };
                    max = max.max(*logit);
                }
                if max == f32::NEG_INFINITY {
                    continue;
                }
                // Each exponential once, kept in place of its logit for the normalisation.
                logits.iter_mut().for_each(|l| *l = (*l - max).exp());
                let total: f32 = logits.iter().sum();
                for (o, e) in out.iter_mut().zip(&logits) {
                    *o += head_weight * e / total;
                }
            }
        }
        Ok(out)
    }

    /// Attention each key of sample `s` receives, summed over `queries` and averaged over heads.
    pub fn attention_received(
        &self,
        s: usize,
        layout: &RowLayout,
        queries: &[usize],
    ) -> Result<Vec<f32>> {
        let mut total = vec![0f32; self.len];
        for &i in queries {
            let row = self.query_attention(s, layout, &[i], HeadReduce::Mean)?;
            for (acc, v) in total.iter_mut().zip(row) {
                *acc += v;
            }
        }
        Ok(total)
    }

    /// Keys of sample `s` at `rows`, averaged over heads: (rows, hd).
    pub fn key_metric(&self, s: usize, rows: &[usize]) -> Matrix {
        let mut data = vec![0f32; rows.len() * self.head_dim];
        for (mean, &j) in data.chunks_exact_mut(self.head_dim.max(1)).zip(rows) {
            for h in 0..self.heads {
                for (m, v) in mean.iter_mut().zip(self.key(s, h, j)) {
                    *m += v / self.heads as f32;
                }
            }
        }
        Matrix::new(rows.len(), self.head_dim, data)
    }

    /// L1 norms of the keys of sample `s` at `rows`, heads concatenated.
    pub fn key_l1(&self, s: usize, rows: &[usize]) -> Vec<f32> {
        rows.iter()
            .map(|&j| {
                (0..self.heads)
                    .map(|h| crate::ops::l1_norm(self.key(s, h, j)))
                    .sum()
            })
            .collect()
    }
}

/// The four dimensions (b, h, t, hd) of `values`, or an error naming `what`.
fn four_dims(values: &HostValues, what: &str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(values.dims()).map_err(|_| {
        candle_core::Error::Msg(format!(
            "{what} of shape {:?}, expected (b, h, t, hd)",
            values.dims()
        ))
    })
}
