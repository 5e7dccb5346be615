//! Token-importance signals, computed from a layer's queries and keys without the full attention matrix.
//!
//! - [`query_attention`]: the attention rows of a few query positions (the last prompt token for FastV
//!   and PDrop, the text raters of SparseVLM, the summary token for VisionZip and PruMerge), q·Kᵀ for
//!   those rows only, softmax over the keys each query may see, averaged or summed over heads and queries.
//! - [`attention_received`]: how much attention each key receives from a set of queries, in chunks of
//!   query rows, so the (t × t) matrix never exists at once.
//! - [`key_metric`]: keys averaged over heads (ToMe's similarity metric); [`key_l1`]: L1 norms of the
//!   keys with heads concatenated (DART's pivot choice).
//!
//! Queries and keys are (b, h, t, hd) tensors of one layer; `visible(i, j)` says whether query row i may
//! see key row j (the model's mask: valid, not after the query, or both in the image).

use candle_core::{D, Device, IndexOp, Result, Tensor};

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

    fn logit_bias(&self, query: usize, key: usize) -> f32 {
        if self.visible(query, key) {
            self.key_bias.map_or(0.0, |b| b[key])
        } else {
            f32::NEG_INFINITY
        }
    }
}

/// Attention probabilities (over all t keys) of `queries` rows of sample `s`, reduced over heads by
/// `heads` and averaged over the queries. `q`, `k`: (b, h, t, hd).
pub fn query_attention(
    q: &Tensor,
    k: &Tensor,
    s: usize,
    layout: &RowLayout,
    queries: &[usize],
    heads: HeadReduce,
) -> Result<Vec<f32>> {
    let (_, _, t, hd) = q.dims4()?;
    if queries.is_empty() {
        return Ok(vec![0.0; t]);
    }
    let ids = Tensor::from_vec(
        queries.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        queries.len(),
        q.device(),
    )?;
    // (h, r, hd) · (h, hd, t) → (h, r, t): only the rows asked for.
    let q_rows = q.i(s)?.index_select(&ids, 1)?;
    let logits = (q_rows.matmul(&k.i(s)?.t()?)? / (hd as f64).sqrt())?;
    let probs = masked_softmax(&logits, layout, queries, q.device())?;
    let per_query = match heads {
        HeadReduce::Mean => probs.mean(0)?,
        HeadReduce::Sum => probs.sum(0)?,
    };
    per_query.mean(0)?.to_vec1()
}

/// Softmax over keys of (h, r, t) logits with the visibility mask of each query row.
fn masked_softmax(
    logits: &Tensor,
    layout: &RowLayout,
    queries: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let t = logits.dim(D::Minus1)?;
    let bias: Vec<f32> = queries
        .iter()
        .flat_map(|&i| (0..t).map(move |j| (i, j)))
        .map(|(i, j)| layout.logit_bias(i, j))
        .collect();
    let bias = Tensor::from_vec(bias, (1, queries.len(), t), device)?;
    let scores = logits.broadcast_add(&bias)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let exp = scores.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Attention each key of sample `s` receives, summed over `queries` and averaged over heads, computed in
/// chunks of `chunk` query rows.
pub fn attention_received(
    q: &Tensor,
    k: &Tensor,
    s: usize,
    layout: &RowLayout,
    queries: &[usize],
    chunk: usize,
) -> Result<Vec<f32>> {
    let t = k.dim(2)?;
    let mut total = vec![0f32; t];
    for rows in queries.chunks(chunk.max(1)) {
        let mean = query_attention(q, k, s, layout, rows, HeadReduce::Mean)?;
        for (acc, v) in total.iter_mut().zip(mean) {
            *acc += v * rows.len() as f32;
        }
    }
    Ok(total)
}

/// Keys of sample `s` at `rows`, averaged over heads: (rows, hd).
pub fn key_metric(k: &Tensor, s: usize, rows: &[usize]) -> Result<Matrix> {
    let ids = Tensor::from_vec(
        rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        rows.len(),
        k.device(),
    )?;
    Matrix::from_tensor(&k.i(s)?.index_select(&ids, 1)?.mean(0)?)
}

/// L1 norms of the keys of sample `s` at `rows`, heads concatenated.
pub fn key_l1(k: &Tensor, s: usize, rows: &[usize]) -> Result<Vec<f32>> {
    let ids = Tensor::from_vec(
        rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        rows.len(),
        k.device(),
    )?;
    // (h, r, hd) → Σ over h and hd.
    k.i(s)?
        .index_select(&ids, 1)?
        .abs()?
        .sum(2)?
        .sum(0)?
        .to_vec1()
}
