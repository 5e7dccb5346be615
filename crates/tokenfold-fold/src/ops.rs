//! Reduction operators: pure functions of one sample's visual tokens, their signals and parameters.
//!
//! Every operator returns an [`Assignment`]: output token *j* is the size-weighted average of input tokens
//! with weights `w[j][i]`,
//!
//! ```text
//! x'_j = Σ_i w_ji · s_i · x_i / Σ_i w_ji · s_i        s'_j = Σ_i w_ji · s_i
//! ```
//!
//! and takes the position of its `representative` input token. Pruning is one-hot rows, merging is rows
//! with several members, pooling is rows grouping grid cells, soft redistribution is fractional weights. One
//! function, [`apply`], turns an assignment into tokens, so every invariant (sizes conserved by merges, the
//! size-weighted sum of tokens conserved, keep-all is the identity) is a property of the weights that the
//! tests check directly.
//!
//! Signals (scores, similarity metrics) come in as plain row-major `f32` matrices: operators do not know where
//! they came from, so they can be tested on small hand-made inputs without a model.

use candle_core::{Device, Result, Tensor};
use rand::Rng;
use rand::seq::index::sample;

/// Σ a_i·b_i over the shorter of the two, in eight interleaved partial sums: a plain iterator sum must
/// add in order, which keeps the compiler from using SIMD, and the signals' dot products were most of a
/// reduction stage's host time.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `out[j] = dot(a, row j)` for j < `out.len()`, with [`dot`]'s bits, where row j is the a.len() values
/// of `rows` from j·`stride` on. On CPUs with AVX2, eight rows at a time: each row's eight partial sums in
/// one register, the eight registers transposed, then summed lane after lane as [`dot`] sums them, so
/// that eight results come out together where one [`dot`] waits on its own eight additions in a row.
///
/// # Panics
/// When `rows` does not hold the last row.
pub fn dots(a: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    let d = a.len();
    if let Some(last) = out.len().checked_sub(1) {
        // Checked arithmetic: a wrapped end would let the AVX2 path read past `rows`.
        let end = last.checked_mul(stride).and_then(|e| e.checked_add(d));
        assert!(
            end.is_some_and(|end| rows.len() >= end),
            "dots: {} values do not hold {} rows of {d}, {stride} apart",
            rows.len(),
            out.len()
        );
    }
    let row = |j: usize| &rows[j * stride..j * stride + d];
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && std::arch::is_x86_feature_detected!("avx2") {
        let blocks = out.len() / 8 * 8;
        // SAFETY: the CPU has AVX2; `rows` holds every row (asserted above).
        unsafe { dots_avx2(a, rows, stride, &mut out[..blocks]) };
        for (j, o) in out.iter_mut().enumerate().skip(blocks) {
            *o = dot(a, row(j));
        }
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot(a, row(j));
    }
}

/// [`dots`] in AVX2.
///
/// # Safety
/// The CPU has AVX2; d = a.len() and `out.len()` are multiples of 8; `rows` holds `out.len()` rows of d
/// values, `stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_avx2(a: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let chunks = a.len() / 8;
    // `dot` sums its lanes from the start of Rust's float sum (0.0 or -0.0, by version) and adds an empty
    // tail, which is that start again. Neither can change a bit: the lanes begin at +0.0, so no lane is
    // ever -0.0, and x + (±0.0) = x for every other x. So the lanes are summed without it.
    for j in (0..out.len()).step_by(8) {
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in 0..chunks {
            // SAFETY: a holds 8·chunks values and each row as many from (j + r)·stride.
            let x = unsafe { _mm256_loadu_ps(a.as_ptr().add(c * 8)) };
            for (r, acc) in acc.iter_mut().enumerate() {
                let y = unsafe { _mm256_loadu_ps(rows.as_ptr().add((j + r) * stride + c * 8)) };
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, y));
            }
        }
        // Transpose, so that lanes[l] holds partial sum l of rows j … j + 7, row r in lane r.
        let t0 = _mm256_unpacklo_ps(acc[0], acc[1]);
        let t1 = _mm256_unpackhi_ps(acc[0], acc[1]);
        let t2 = _mm256_unpacklo_ps(acc[2], acc[3]);
        let t3 = _mm256_unpackhi_ps(acc[2], acc[3]);
        let t4 = _mm256_unpacklo_ps(acc[4], acc[5]);
        let t5 = _mm256_unpackhi_ps(acc[4], acc[5]);
        let t6 = _mm256_unpacklo_ps(acc[6], acc[7]);
        let t7 = _mm256_unpackhi_ps(acc[6], acc[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let lanes = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        let mut sum = lanes[0];
        for &lane in &lanes[1..] {
            sum = _mm256_add_ps(sum, lane);
        }
        // SAFETY: out holds j + 8 values (its length is a multiple of 8).
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(j), sum) };
    }
}

/// Σ |a_i|, in eight interleaved partial sums as [`dot`] (DART's key norms, over every row of a stage).
pub fn l1_norm(a: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = a.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|x| x.abs()).sum();
    for x in chunks {
        for l in 0..8 {
            lanes[l] += x[l].abs();
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A row-major matrix of `rows × cols` values: per-token feature vectors used as similarity metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Matrix {
        assert_eq!(data.len(), rows * cols, "matrix data has the wrong length");
        Matrix { rows, cols, data }
    }

    pub fn from_tensor(t: &Tensor) -> Result<Matrix> {
        let (rows, cols) = t.dims2()?;
        Ok(Matrix::new(rows, cols, t.flatten_all()?.to_vec1()?))
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The same rows scaled to unit L2 norm (zero rows stay zero).
    pub fn normalized(&self) -> Matrix {
        self.clone().into_normalized()
    }

    /// [`Matrix::normalized`] in place, for a matrix that is not needed as it was.
    pub fn into_normalized(mut self) -> Matrix {
        for row in self.data.chunks_mut(self.cols.max(1)) {
            let norm = dot(row, row).sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|v| *v /= norm);
            }
        }
        self
    }

    /// Cosine similarity of rows `i` and `j` of an already normalised matrix.
    pub fn dot(&self, i: usize, j: usize) -> f32 {
        dot(self.row(i), self.row(j))
    }
}

/// Per output token, (input index, weight) pairs.
pub type SparseRows = Vec<Vec<(usize, f32)>>;

/// Non-empty groups of token indices laid end to end, group g being `members[starts[g]..starts[g + 1]]`:
/// what [`bipartite_groups`] builds, two vectors for all the groups where a vector each cost ToMe's
/// rounds ([`crate::hook::tome_to`]) most of their time in the allocator. A group's first member is its
/// representative.
#[derive(Debug, Clone, PartialEq)]
pub struct Groups {
    members: Vec<usize>,
    /// Where each group starts in `members`, then `members.len()`: never empty, and 0 first.
    starts: Vec<usize>,
}

impl Groups {
    /// No groups, with room for `groups` groups of `members` members in all.
    pub fn with_capacity(groups: usize, members: usize) -> Groups {
        let mut starts = Vec::with_capacity(groups + 1);
        starts.push(0);
        Groups {
            members: Vec::with_capacity(members),
            starts,
        }
    }

    /// Tokens 0 … n − 1, each a group of its own.
    pub fn singletons(n: usize) -> Groups {
        Groups {
            members: (0..n).collect(),
            starts: (0..=n).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Group `g`'s members.
    pub fn group(&self, g: usize) -> &[usize] {
        &self.members[self.starts[g]..self.starts[g + 1]]
    }

    /// The groups' members, group by group.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[usize]> + Clone {
        self.starts.windows(2).map(|w| &self.members[w[0]..w[1]])
    }

    /// Appends a group of `members`, which must not be empty: its first member is its representative.
    pub fn push(&mut self, members: impl IntoIterator<Item = usize>) {
        let start = self.members.len();
        self.members.extend(members);
        assert!(self.members.len() > start, "a group needs a member");
        self.starts.push(self.members.len());
    }
}

/// Output tokens as weighted groups of input tokens (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Number of input tokens.
    pub n_in: usize,
    /// Per output token: (input index, weight) pairs, weights > 0.
    pub rows: SparseRows,
    /// Per output token: the input token whose position (and grid cell) it keeps.
    pub representative: Vec<usize>,
    /// Normalisation strength η ∈ [0, 1] of the transferred mass (the unified operator's size-weighted
    /// normalisation): 1 is a size-weighted mean, 0 adds the transferred tokens without renormalising.
    pub eta: f32,
    /// Per output token, an additive attention-logit bias it carries from now on (the unified operator's
    /// anchor re-weighting); empty for none.
    pub boost: Vec<f32>,
}

impl Assignment {
    /// Keeps `indices` (in the given order) unchanged.
    pub fn keep(n_in: usize, indices: &[usize]) -> Assignment {
        Assignment {
            n_in,
            rows: indices.iter().map(|&i| vec![(i, 1.0)]).collect(),
            representative: indices.to_vec(),
            eta: 1.0,
            boost: Vec::new(),
        }
    }

    /// Output token per group: the members averaged with equal weights (size-weighted in [`apply`]); the
    /// first member is the representative.
    pub fn groups(n_in: usize, groups: &[Vec<usize>]) -> Assignment {
        Self::of_groups(n_in, groups.iter().map(Vec::as_slice))
    }

    /// [`Assignment::groups`] of groups laid end to end.
    pub fn from_groups(n_in: usize, groups: &Groups) -> Assignment {
        Self::of_groups(n_in, groups.iter())
    }

    fn of_groups<'a>(n_in: usize, groups: impl Iterator<Item = &'a [usize]> + Clone) -> Assignment {
        Assignment {
            n_in,
            rows: groups
                .clone()
                .map(|g| g.iter().map(|&i| (i, 1.0)).collect())
                .collect(),
            representative: groups.map(|g| g[0]).collect(),
            eta: 1.0,
            boost: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Sorts output tokens by the original position of their representative (`positions` per input
    /// token), so that kept tokens stay in image order.
    pub fn sorted_by(mut self, positions: &[u32]) -> Assignment {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&j| positions[self.representative[j]]);
        let mut rows = std::mem::take(&mut self.rows);
        self.rows = order
            .iter()
            .map(|&j| std::mem::take(&mut rows[j]))
            .collect();
        self.representative = order.iter().map(|&j| self.representative[j]).collect();
        if !self.boost.is_empty() {
            self.boost = order.iter().map(|&j| self.boost[j]).collect();
        }
        self
    }

    /// The rows as mixing weights over input tokens of sizes `sizes`: output token j is
    /// Σ_i m_ji · x_i with m_ji = w_ji · s_i / n_j, where n_j = w_jr·s_r + η·Σ_{i≠r} w_ji·s_i (r the
    /// representative; with η = 1, n_j = s'_j); returns the weights (sparse rows) and the new sizes
    /// s'_j = Σ_i w_ji · s_i.
    pub fn mixing(&self, sizes: &[f32]) -> Result<(SparseRows, Vec<f32>)> {
        if sizes.len() != self.n_in {
            candle_core::bail!(
                "assignment over {} tokens applied to {} sizes",
                self.n_in,
                sizes.len()
            );
        }
        let mut rows = Vec::with_capacity(self.len());
        let mut new_sizes = Vec::with_capacity(self.len());
        for (j, row) in self.rows.iter().enumerate() {
            let total: f32 = row.iter().map(|&(i, w)| w * sizes[i]).sum();
            let representative = self.representative[j];
            let norm: f32 = if self.eta == 1.0 {
                total
            } else {
                row.iter()
                    .map(|&(i, w)| {
                        let mass = w * sizes[i];
                        if i == representative {
                            mass
                        } else {
                            self.eta * mass
                        }
                    })
                    .sum()
            };
            if total <= 0.0 || norm <= 0.0 {
                candle_core::bail!("output token {j} has no weight");
            }
            rows.push(row.iter().map(|&(i, w)| (i, w * sizes[i] / norm)).collect());
            new_sizes.push(total);
        }
        Ok((rows, new_sizes))
    }
}

/// Applies an assignment to tokens `x` (n, d) of sizes `sizes`: returns the output tokens (k, d) and sizes.
pub fn apply(x: &Tensor, sizes: &[f32], assignment: &Assignment) -> Result<(Tensor, Vec<f32>)> {
    let (n, _) = x.dims2()?;
    if n != assignment.n_in {
        candle_core::bail!(
            "assignment over {} tokens applied to {n} tokens",
            assignment.n_in
        );
    }
    let (rows, new_sizes) = assignment.mixing(sizes)?;
    let mut dense = vec![0f32; rows.len() * n];
    for (j, row) in rows.iter().enumerate() {
        for &(i, m) in row {
            dense[j * n + i] += m;
        }
    }
    let weights = Tensor::from_vec(dense, (rows.len(), n), x.device())?.to_dtype(x.dtype())?;
    Ok((weights.matmul(x)?, new_sizes))
}

/// Indices of the `k` largest scores, in increasing index order. Ties go to the lower index; NaN scores
/// rank last.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (scores[a], scores[b]);
        match (sa.is_nan(), sb.is_nan()) {
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => sb.partial_cmp(&sa).unwrap_or(std::cmp::Ordering::Equal),
        }
        .then(a.cmp(&b))
    });
    let mut kept = order[..k.min(scores.len())].to_vec();
    kept.sort_unstable();
    kept
}

/// Pruning: keeps the `k` highest-scoring tokens; the rest are dropped.
pub fn prune(scores: &[f32], k: usize) -> Assignment {
    Assignment::keep(scores.len(), &top_k(scores, k))
}

/// The sanity baseline: `k` tokens drawn uniformly without replacement.
pub fn random(n: usize, k: usize, rng: &mut impl Rng) -> Assignment {
    let mut kept = sample(rng, n, k.min(n)).into_vec();
    kept.sort_unstable();
    Assignment::keep(n, &kept)
}

/// ToMe's bipartite soft matching: tokens alternate into sets A (even) and B (odd); each A token's best B
/// match by cosine similarity of `metric`; the `r` A tokens with the most similar matches merge into their
/// match (several may land on one B token). `r` is capped at |A|. Returns unmerged A tokens, then every B
/// token (with whatever merged into it), as ToMe orders them; use [`Assignment::sorted_by`] to restore
/// image order.
pub fn bipartite_merge(metric: &Matrix, r: usize) -> Assignment {
    Assignment::from_groups(metric.rows, &bipartite_groups(metric, r))
}

/// [`bipartite_merge`]'s groups, each B token's group being the B token, then the A tokens merged into
/// it in order of similarity.
pub fn bipartite_groups(metric: &Matrix, r: usize) -> Groups {
    let n = metric.rows;
    let m = metric.normalized();
    let a: Vec<usize> = (0..n).step_by(2).collect();
    let b: Vec<usize> = (1..n).step_by(2).collect();
    if b.is_empty() || r == 0 {
        return Groups::singletons(n);
    }
    // Best partner in B of each A token, and its similarity.
    let mut similar = vec![0f32; b.len()];
    let best: Vec<(usize, f32)> = a
        .iter()
        .map(|&i| {
            // B's rows are every other row from row 1.
            dots(m.row(i), &m.data[m.cols..], 2 * m.cols, &mut similar);
            b.iter()
                .zip(&similar)
                .fold((b[0], f32::NEG_INFINITY), |acc, (&j, &s)| {
                    if s > acc.1 { (j, s) } else { acc }
                })
        })
        .collect();
    let mut order: Vec<usize> = (0..a.len()).collect();
    order.sort_by(|&x, &y| {
        best[y]
            .1
            .partial_cmp(&best[x].1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(x.cmp(&y))
    });
    let r = r.min(a.len());
    let mut unmerged: Vec<usize> = order[r..].iter().map(|&x| a[x]).collect();
    unmerged.sort_unstable();
    // Each B token's group: the B token, then the A tokens merged into it, in order of similarity (a
    // stable sort by destination keeps that order).
    let mut merged: Vec<(usize, usize)> = order[..r]
        .iter()
        .map(|&x| ((best[x].0 - 1) / 2, a[x]))
        .collect();
    merged.sort_by_key(|&(k, _)| k);
    let mut groups = Groups::with_capacity(unmerged.len() + b.len(), n);
    unmerged.iter().for_each(|&i| groups.push([i]));
    let mut rest = merged.as_slice();
    for (k, &j) in b.iter().enumerate() {
        let count = rest.iter().take_while(|&&(d, _)| d == k).count();
        groups.push(std::iter::once(j).chain(rest[..count].iter().map(|&(_, i)| i)));
        rest = &rest[count..];
    }
    groups
}

/// Nearest-anchor merge: every token of `members` joins the anchor whose `metric` row is most
/// cosine-similar; each anchor becomes the size-weighted average of itself and its members.
pub fn anchor_merge(metric: &Matrix, anchors: &[usize], members: &[usize]) -> Assignment {
    let m = metric.normalized();
    let mut groups: Vec<Vec<usize>> = anchors.iter().map(|&a| vec![a]).collect();
    if anchors.is_empty() {
        return Assignment::groups(metric.rows, &groups);
    }
    for &i in members {
        let (best, _) =
            anchors
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |acc, (g, &a)| {
                    let s = m.dot(i, a);
                    if s > acc.1 { (g, s) } else { acc }
                });
        groups[best].push(i);
    }
    Assignment::groups(metric.rows, &groups)
}

/// k×k pooling on the image grid: tokens whose grid cells `(row, col)` fall in the same `window × window`
/// block are averaged (size-weighted). On a full grid this is a plain k×k average; after an earlier
/// reduction it pools whatever tokens remain in each block. The representative is the block's first token
/// in raster order.
pub fn pool(cells: &[(u32, u32)], window: u32) -> Assignment {
    let window = window.max(1);
    let mut blocks: std::collections::BTreeMap<(u32, u32), Vec<usize>> = Default::default();
    for (i, &(row, col)) in cells.iter().enumerate() {
        blocks
            .entry((row / window, col / window))
            .or_default()
            .push(i);
    }
    let mut groups: Vec<Vec<usize>> = blocks.into_values().collect();
    for g in &mut groups {
        g.sort_by_key(|&i| cells[i]);
    }
    Assignment::groups(cells.len(), &groups)
}

/// Soft redistribution: kept tokens `kept` absorb the others with strength `gamma` ∈ [0, 1], each dropped
/// token spread over the kept ones by softmax(cos(metric)/tau). `gamma` = 0 is pruning; `gamma` = 1 with
/// `tau` → 0 is a nearest-anchor merge.
pub fn redistribute(metric: &Matrix, kept: &[usize], gamma: f32, tau: f32) -> Assignment {
    let n = metric.rows;
    let m = metric.normalized();
    let mut rows: Vec<Vec<(usize, f32)>> = kept.iter().map(|&a| vec![(a, 1.0)]).collect();
    let is_kept: std::collections::HashSet<usize> = kept.iter().copied().collect();
    if gamma > 0.0 && !kept.is_empty() {
        for i in (0..n).filter(|i| !is_kept.contains(i)) {
            let logits: Vec<f32> = kept.iter().map(|&a| m.dot(i, a) / tau.max(1e-6)).collect();
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f32 = exp.iter().sum();
            for (g, e) in exp.iter().enumerate() {
                let w = gamma * e / total;
                if w > 0.0 {
                    rows[g].push((i, w));
                }
            }
        }
    }
    Assignment {
        n_in: n,
        rows,
        representative: kept.to_vec(),
        eta: 1.0,
        boost: Vec::new(),
    }
}

/// Re-weighting by scale: the additive attention bias `strength · ln(weight)` per token, so that a token's
/// attention logits grow by the log of its weight (weights normalised to mean 1; `strength` 0 leaves
/// attention unchanged).
pub fn reweight_bias(weights: &[f32], strength: f32) -> Vec<f32> {
    let mean = weights.iter().sum::<f32>() / weights.len().max(1) as f32;
    weights
        .iter()
        .map(|&w| strength * (w.max(1e-12) / mean.max(1e-12)).ln())
        .collect()
}

/// Density-peaks clustering with k nearest neighbours (DPC-kNN, as SparseVLM recycles pruned tokens):
/// density ρ_i = exp(−mean of squared distances to the k nearest), δ_i = distance to the nearest denser
/// token (the largest distance for the densest), centres = the `n_clusters` largest ρ·δ; every other token
/// joins its nearest centre. Distances are Euclidean on `metric` rows of `members`. Returns groups of
/// member indices, centre first.
pub fn dpc_knn(metric: &Matrix, members: &[usize], n_clusters: usize, k: usize) -> Vec<Vec<usize>> {
    let n = members.len();
    if n == 0 || n_clusters == 0 {
        return Vec::new();
    }
    let d = distances(metric, members);
    let k = k.clamp(1, n.saturating_sub(1).max(1));
    let density: Vec<f32> = (0..n)
        .map(|a| {
            let mut row: Vec<f32> = (0..n).filter(|&b| b != a).map(|b| d[a][b]).collect();
            row.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
            let near = &row[..k.min(row.len())];
            if near.is_empty() {
                1.0
            } else {
                (-(near.iter().map(|v| v * v).sum::<f32>() / near.len() as f32)).exp()
            }
        })
        .collect();
    let max_dist = d.iter().flatten().cloned().fold(0f32, f32::max);
    // Denser: higher density, ties broken by index so that exactly one token is the densest.
    let denser =
        |b: usize, a: usize| density[b] > density[a] || (density[b] == density[a] && b < a);
    let delta: Vec<f32> = (0..n)
        .map(|a| {
            (0..n)
                .filter(|&b| denser(b, a))
                .map(|b| d[a][b])
                .fold(f32::INFINITY, f32::min)
        })
        .map(|v| if v.is_finite() { v } else { max_dist })
        .collect();
    let score: Vec<f32> = (0..n).map(|a| density[a] * delta[a]).collect();
    let centres = top_k(&score, n_clusters.min(n));
    let mut groups: Vec<Vec<usize>> = centres.iter().map(|&c| vec![members[c]]).collect();
    for a in (0..n).filter(|a| !centres.contains(a)) {
        let (g, _) = centres
            .iter()
            .enumerate()
            .fold((0usize, f32::INFINITY), |acc, (g, &c)| {
                if d[a][c] < acc.1 { (g, d[a][c]) } else { acc }
            });
        groups[g].push(members[a]);
    }
    groups
}

/// Euclidean distances between the `metric` rows of `members`, d[a][b], each the square root of the
/// squared differences summed over the columns in order. Eight of member a's distances are summed at
/// once, in eight lanes over a copy of the rows stored column by column: one distance at a time waits on
/// its own additions in a row.
pub(crate) fn distances(metric: &Matrix, members: &[usize]) -> Vec<Vec<f32>> {
    let n = members.len();
    let padded = n.div_ceil(8) * 8;
    // Column i of member b at i·padded + b; the padding lanes are computed and dropped.
    let mut columns = vec![0f32; metric.cols * padded];
    for (b, &m) in members.iter().enumerate() {
        for (i, &v) in metric.row(m).iter().enumerate() {
            columns[i * padded + b] = v;
        }
    }
    // What a float sum starts from (0.0 or -0.0, by Rust's version), so that the sums are those of
    // `Iterator::sum`.
    let start: f32 = std::iter::empty::<f32>().sum();
    members
        .iter()
        .map(|&m| {
            let row = metric.row(m);
            let mut out = Vec::with_capacity(padded);
            for block in (0..padded).step_by(8) {
                let mut acc = [start; 8];
                for (i, &x) in row.iter().enumerate() {
                    let ys = &columns[i * padded + block..i * padded + block + 8];
                    for (acc, &y) in acc.iter_mut().zip(ys) {
                        *acc += (x - y) * (x - y);
                    }
                }
                out.extend(acc.iter().map(|v| v.sqrt()));
            }
            out.truncate(n);
            out
        })
        .collect()
}

/// Interquartile-range outliers (PruMerge, TRIM): indices with score > Q3 + 1.5·IQR, quartiles by linear
/// interpolation as numpy computes them.
pub fn iqr_outliers(scores: &[f32]) -> Vec<usize> {
    let mut sorted: Vec<f32> = scores.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return Vec::new();
    }
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let quantile = |q: f32| {
        let pos = q * (sorted.len() - 1) as f32;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f32)
    };
    let (q1, q3) = (quantile(0.25), quantile(0.75));
    let limit = q3 + 1.5 * (q3 - q1);
    (0..scores.len()).filter(|&i| scores[i] > limit).collect()
}

/// A tensor of `rows` on `device` (test and signal helper).
pub fn tensor(rows: &[Vec<f32>], device: &Device) -> Result<Tensor> {
    let d = rows.first().map_or(0, Vec::len);
    Tensor::from_vec(rows.concat(), (rows.len(), d), device)
}
