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
//! The queries and keys of a layer are copied out of the tensors once per reduction stage and the signals
//! computed in plain loops: each is a few rows, where a tensor op per sample would cost more in dispatch and
//! thread synchronisation than in arithmetic.

use candle_core::{Result, Tensor};

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

/// Queries and keys (b, h, t, hd) of one layer, on the host.
#[derive(Debug, Clone)]
pub struct QueriesKeys {
    q: Vec<f32>,
    k: Vec<f32>,
    heads: usize,
    len: usize,
    head_dim: usize,
}

impl QueriesKeys {
    pub fn from_tensors(q: &Tensor, k: &Tensor) -> Result<QueriesKeys> {
        let (_, heads, len, head_dim) = q.dims4()?;
        Ok(QueriesKeys {
            q: q.flatten_all()?.to_vec1()?,
            k: k.flatten_all()?.to_vec1()?,
            heads,
            len,
            head_dim,
        })
    }

    fn at<'a>(&self, data: &'a [f32], s: usize, h: usize, i: usize) -> &'a [f32] {
        let start = ((s * self.heads + h) * self.len + i) * self.head_dim;
        &data[start..start + self.head_dim]
    }

    /// Attention probabilities (over all t keys) of `queries` rows of sample `s`, reduced over heads by
    /// `heads` and averaged over the queries.
    pub fn query_attention(
        &self,
        s: usize,
        layout: &RowLayout,
        queries: &[usize],
        heads: HeadReduce,
    ) -> Vec<f32> {
        let t = self.len;
        let mut out = vec![0f32; t];
        if queries.is_empty() {
            return out;
        }
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let head_weight = match heads {
            HeadReduce::Mean => 1.0 / self.heads as f32,
            HeadReduce::Sum => 1.0,
        } / queries.len() as f32;
        let mut logits = vec![0f32; t];
        for &i in queries {
            for h in 0..self.heads {
                let q = self.at(&self.q, s, h, i);
                let mut max = f32::NEG_INFINITY;
                for (j, logit) in logits.iter_mut().enumerate() {
                    *logit = if layout.visible(i, j) {
                        let k = self.at(&self.k, s, h, j);
                        let dot: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                        dot * scale + layout.key_bias.map_or(0.0, |b| b[j])
                    } else {
                        f32::NEG_INFINITY
                    };
                    max = max.max(*logit);
                }
                if max == f32::NEG_INFINITY {
                    continue;
                }
                let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
                for (o, l) in out.iter_mut().zip(&logits) {
                    *o += head_weight * (l - max).exp() / total;
                }
            }
        }
        out
    }

    /// Attention each key of sample `s` receives, summed over `queries` and averaged over heads.
    pub fn attention_received(&self, s: usize, layout: &RowLayout, queries: &[usize]) -> Vec<f32> {
        let mut total = vec![0f32; self.len];
        for &i in queries {
            let row = self.query_attention(s, layout, &[i], HeadReduce::Mean);
            for (acc, v) in total.iter_mut().zip(row) {
                *acc += v;
            }
        }
        total
    }

    /// Keys of sample `s` at `rows`, averaged over heads: (rows, hd).
    pub fn key_metric(&self, s: usize, rows: &[usize]) -> Matrix {
        let mut data = Vec::with_capacity(rows.len() * self.head_dim);
        for &j in rows {
            let mut mean = vec![0f32; self.head_dim];
            for h in 0..self.heads {
                for (m, v) in mean.iter_mut().zip(self.at(&self.k, s, h, j)) {
                    *m += v / self.heads as f32;
                }
            }
            data.extend(mean);
        }
        Matrix::new(rows.len(), self.head_dim, data)
    }

    /// L1 norms of the keys of sample `s` at `rows`, heads concatenated.
    pub fn key_l1(&self, s: usize, rows: &[usize]) -> Vec<f32> {
        rows.iter()
            .map(|&j| {
                (0..self.heads)
                    .map(|h| {
                        self.at(&self.k, s, h, j)
                            .iter()
                            .map(|v| v.abs())
                            .sum::<f32>()
                    })
                    .sum()
            })
            .collect()
    }
}
