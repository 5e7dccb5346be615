//! Operators against direct computations and their invariants; signals against the materialised attention
//! matrix; plan validation; budget fitting; plans inside a tiny random model (measured budget equals the
//! plan's, batch > 1 equals batch 1, KV-cache decoding equals recomputation).

use candle_core::{D, DType, Device, IndexOp, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenfold_model::config::{ModelConfig, Shape};
use tokenfold_model::{Inputs, KvCache, LayerHook, NativeModel, NoHook, SeqState};

use crate::budget::{Geometry, STANDARD_BUDGETS, fit};
use crate::hook::{
    FoldHook, dart, prumerge_plus, sparsevlm_raters, sparsevlm_recycle, tome_to, visionzip,
};
use crate::ops::{self, Assignment, Matrix};
use crate::plan::{Method, Plan, Stage};
use crate::signals::{HeadReduce, HostValues, QueriesKeys, RowLayout};

fn random_matrix(rows: usize, cols: usize, seed: u64) -> Matrix {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Matrix::new(
        rows,
        cols,
        (0..rows * cols)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect(),
    )
}

fn tokens(m: &Matrix) -> Tensor {
    Tensor::from_vec(m.data.clone(), (m.rows, m.cols), &Device::Cpu).unwrap()
}

fn rows_of(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

fn assert_close(a: f32, b: f32, tol: f32, what: &str) {
    assert!(
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs())),
        "{what}: {a} vs {b}"
    );
}

/// Σ s_i and Σ s_i·x_i of tokens.
fn size_moments(x: &Tensor, sizes: &[f32]) -> (f32, Vec<f32>) {
    let rows = rows_of(x);
    let mut weighted = vec![0f32; rows[0].len()];
    for (row, &s) in rows.iter().zip(sizes) {
        for (w, v) in weighted.iter_mut().zip(row) {
            *w += s * v;
        }
    }
    (sizes.iter().sum(), weighted)
}

// ---------------------------------------------------------------- operators

#[test]
fn keeping_every_token_is_the_identity() {
    let m = random_matrix(12, 5, 1);
    let x = tokens(&m);
    let sizes = vec![1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0];
    let all: Vec<usize> = (0..12).collect();
    let (y, s) = ops::apply(&x, &sizes, &Assignment::keep(12, &all)).unwrap();
    assert_eq!(rows_of(&y), rows_of(&x));
    assert_eq!(s, sizes);
    // Every operator asked to keep all tokens keeps them unchanged.
    let scores: Vec<f32> = (0..12).map(|i| (i * 7 % 5) as f32).collect();
    for a in [
        ops::prune(&scores, 12),
        ops::bipartite_merge(&m, 0),
        tome_to(&m, 12),
        ops::redistribute(&m, &all, 1.0, 0.1),
    ] {
        let positions: Vec<u32> = (0..12).collect();
        let (y, s) = ops::apply(&x, &sizes, &a.sorted_by(&positions)).unwrap();
        assert_eq!(rows_of(&y), rows_of(&x));
        assert_eq!(s, sizes);
    }
}

#[test]
fn prune_keeps_the_top_scores_in_image_order() {
    let scores = [0.1, 0.9, 0.3, f32::NAN, 0.9, 0.5];
    assert_eq!(ops::top_k(&scores, 3), vec![1, 4, 5]);
    // Ties go to the lower index, NaN ranks last.
    assert_eq!(ops::top_k(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
    assert_eq!(ops::top_k(&scores, 6), vec![0, 1, 2, 3, 4, 5]);
    let m = random_matrix(6, 4, 2);
    let (y, s) = ops::apply(&tokens(&m), &[1.0; 6], &ops::prune(&scores, 2)).unwrap();
    assert_eq!(rows_of(&y), vec![m.row(1).to_vec(), m.row(4).to_vec()]);
    assert_eq!(s, vec![1.0, 1.0]);
}

#[test]
fn bipartite_rounds_group_tokens_in_tomes_order() {
    // A = 0, 2, 4 and B = 1, 3, 5. Token 2 is closest to 3, then 4 to 1, then 0 to 3: the order of
    // similarity is neither the order of the indices nor its reverse.
    let rows = [
        [1.0, -1.0],
        [0.0, 1.0],
        [1.0, 0.01],
        [1.0, 0.0],
        [0.6, 0.8],
        [-1.0, 0.0],
    ];
    let m = Matrix::new(6, 2, rows.concat());
    let groups = |g: &ops::Groups| g.iter().map(<[usize]>::to_vec).collect::<Vec<_>>();
    // Unmerged A tokens in order of index, then each B token followed by what merged into it, closest
    // first.
    let one = ops::bipartite_groups(&m, 1);
    assert_eq!(
        groups(&one),
        [vec![0], vec![4], vec![1], vec![3, 2], vec![5]]
    );
    let three = ops::bipartite_groups(&m, 3);
    assert_eq!(groups(&three), [vec![1, 4], vec![3, 2, 0], vec![5]]);
    assert_eq!((three.len(), three.group(1)), (3, &[3, 2, 0][..]));
    let kept = ops::bipartite_groups(&m, 0);
    assert_eq!(groups(&kept), (0..6).map(|i| vec![i]).collect::<Vec<_>>());
    let assignment = ops::bipartite_merge(&m, 3);
    assert_eq!(assignment.representative, [1, 3, 5]);
    assert_eq!(assignment.rows[1], [(3, 1.0), (2, 1.0), (0, 1.0)]);
    // ToMe's rounds: to 3 in one round (r = 3 = |A|), then to 2, where the group of 1 and 4, averaged,
    // is closer to the group of 3 than the group of 5 is.
    let three = tome_to(&m, 3);
    assert_eq!(three.representative, [1, 3, 5]);
    assert_eq!(three.rows[0], [(1, 1.0), (4, 1.0)]);
    let two = tome_to(&m, 2);
    assert_eq!(two.representative, [5, 3]);
    let members: Vec<usize> = two.rows[1].iter().map(|&(i, _)| i).collect();
    assert_eq!(members, [3, 2, 0, 1, 4]);
    // Groups built one by one.
    let mut built = ops::Groups::with_capacity(2, 3);
    assert!(built.is_empty());
    built.push([7]);
    built.push([2, 9]);
    assert_eq!(groups(&built), [vec![7], vec![2, 9]]);
    assert_eq!(
        groups(&ops::Groups::singletons(3)),
        [vec![0], vec![1], vec![2]]
    );
}

#[test]
fn merges_conserve_total_size_and_the_size_weighted_sum() {
    let n = 16;
    let m = random_matrix(n, 6, 3);
    let x = tokens(&m);
    let sizes: Vec<f32> = (0..n).map(|i| 1.0 + (i % 3) as f32).collect();
    let (total, weighted) = size_moments(&x, &sizes);
    let scores: Vec<f32> = (0..n).map(|i| ((i * 5) % 7) as f32).collect();
    let cells: Vec<(u32, u32)> = (0..n as u32).map(|i| (i / 4, i % 4)).collect();
    let cases: Vec<(&str, Assignment)> = vec![
        ("bipartite", ops::bipartite_merge(&m, 5)),
        ("tome rounds", tome_to(&m, 3)),
        (
            "anchor",
            ops::anchor_merge(
                &m,
                &[0, 5, 9],
                &[1, 2, 3, 4, 6, 7, 8, 10, 11, 12, 13, 14, 15],
            ),
        ),
        ("pool", ops::pool(&cells, 2)),
        (
            "redistribute γ=1",
            ops::redistribute(&m, &[2, 7, 11], 1.0, 0.3),
        ),
        ("visionzip", visionzip(&scores, &m, 6, 0.34)),
        ("prumerge+", prumerge_plus(&scores, &m, 5)),
    ];
    for (name, a) in cases {
        let (y, s) = ops::apply(&x, &sizes, &a).unwrap();
        let (t2, w2) = size_moments(&y, &s);
        assert_close(t2, total, 1e-5, &format!("{name}: total size"));
        for (a, b) in w2.iter().zip(&weighted) {
            assert_close(*a, *b, 1e-5, &format!("{name}: size-weighted sum"));
        }
    }
}

#[test]
fn pooling_a_full_grid_is_a_plain_block_average() {
    let grid = 4u32;
    let m = random_matrix(16, 3, 4);
    let cells: Vec<(u32, u32)> = (0..16).map(|i| (i / grid, i % grid)).collect();
    let a = ops::pool(&cells, 2);
    assert_eq!(a.len(), 4);
    let (y, s) = ops::apply(&tokens(&m), &[1.0; 16], &a).unwrap();
    assert_eq!(s, vec![4.0; 4]);
    let y = rows_of(&y);
    for (block, (br, bc)) in [(0, 0), (0, 1), (1, 0), (1, 1)].iter().enumerate() {
        for (c, &pooled) in y[block].iter().enumerate() {
            let mut mean = 0.0;
            for r in 0..2 {
                for col in 0..2 {
                    mean += m.row(((br * 2 + r) * grid + bc * 2 + col) as usize)[c] / 4.0;
                }
            }
            assert_close(pooled, mean, 1e-6, "block average");
        }
        // The representative is the block's top-left cell.
        assert_eq!(a.representative[block], ((br * 2) * grid + bc * 2) as usize);
    }
    // A 3×3 window on a 4×4 grid: ⌈4/3⌉² = 4 blocks of 9, 3, 3 and 1 tokens.
    let sizes: Vec<usize> = ops::pool(&cells, 3).rows.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![9, 3, 3, 1]);
}

#[test]
fn bipartite_matching_merges_the_most_similar_pairs() {
    // Tokens 0..8 alternate A (even) and B (odd); A tokens 0 and 4 copy B tokens 3 and 7, the others
    // are orthogonal to everything.
    let mut data = vec![0f32; 8 * 8];
    for i in 0..8 {
        data[i * 8 + i] = 1.0;
    }
    let copy = |data: &mut Vec<f32>, from: usize, to: usize| {
        let row: Vec<f32> = data[from * 8..from * 8 + 8].to_vec();
        data[to * 8..to * 8 + 8].copy_from_slice(&row);
    };
    copy(&mut data, 3, 0);
    copy(&mut data, 7, 4);
    let m = Matrix::new(8, 8, data);
    let a = ops::bipartite_merge(&m, 2);
    assert_eq!(a.len(), 6);
    let groups: Vec<Vec<usize>> = a
        .rows
        .iter()
        .map(|r| r.iter().map(|&(i, _)| i).collect())
        .collect();
    assert!(groups.contains(&vec![3, 0]), "{groups:?}");
    assert!(groups.contains(&vec![7, 4]), "{groups:?}");
    // Unmerged A tokens first, then every B token, as ToMe orders them.
    assert_eq!(groups[0], vec![2]);
    assert_eq!(groups[1], vec![6]);
}

#[test]
fn random_keeps_distinct_sorted_tokens_and_is_seeded() {
    let a = ops::random(50, 10, &mut ChaCha8Rng::seed_from_u64(9));
    let b = ops::random(50, 10, &mut ChaCha8Rng::seed_from_u64(9));
    assert_eq!(a, b);
    assert_eq!(a.len(), 10);
    let kept = a.representative.clone();
    assert!(kept.windows(2).all(|w| w[0] < w[1]) && kept[9] < 50);
}

#[test]
fn redistribution_spans_pruning_and_merging() {
    let m = random_matrix(10, 4, 5);
    let x = tokens(&m);
    let kept = [1, 4, 8];
    let (pruned, _) = ops::apply(&x, &[1.0; 10], &Assignment::keep(10, &kept)).unwrap();
    let (at_zero, sizes) =
        ops::apply(&x, &[1.0; 10], &ops::redistribute(&m, &kept, 0.0, 1.0)).unwrap();
    assert_eq!(rows_of(&at_zero), rows_of(&pruned));
    assert_eq!(sizes, vec![1.0; 3]);
    // γ = 1, τ → 0: each dropped token goes wholly to its most similar kept token.
    let members: Vec<usize> = (0..10).filter(|i| !kept.contains(i)).collect();
    let hard = ops::anchor_merge(&m, &kept, &members);
    let (merged, s1) = ops::apply(&x, &[1.0; 10], &hard).unwrap();
    let (soft, s2) = ops::apply(&x, &[1.0; 10], &ops::redistribute(&m, &kept, 1.0, 1e-4)).unwrap();
    for (a, b) in rows_of(&merged)
        .iter()
        .flatten()
        .zip(rows_of(&soft).iter().flatten())
    {
        assert_close(*a, *b, 1e-4, "τ → 0 equals the hard merge");
    }
    for (a, b) in s1.iter().zip(&s2) {
        assert_close(*a, *b, 1e-4, "sizes");
    }
}

#[test]
fn reweight_bias_is_the_log_of_normalised_weights() {
    let bias = ops::reweight_bias(&[1.0, 2.0, 3.0], 1.0);
    assert_close(bias[0], (0.5f32).ln(), 1e-6, "w/mean");
    assert_close(bias[2], (1.5f32).ln(), 1e-6, "w/mean");
    assert_eq!(ops::reweight_bias(&[1.0, 5.0], 0.0), vec![0.0, 0.0]);
}

#[test]
fn iqr_outliers_match_numpy_quartiles() {
    // numpy: q1 = 2.0, q3 = 4.0 for [1, 2, 3, 4, 5] → limit 7: none; add 20 → q1 2.25, q3 4.75, limit 8.5.
    assert!(ops::iqr_outliers(&[1.0, 2.0, 3.0, 4.0, 5.0]).is_empty());
    assert_eq!(ops::iqr_outliers(&[1.0, 2.0, 3.0, 4.0, 5.0, 20.0]), vec![5]);
}

#[test]
fn dpc_knn_distances_are_the_plain_ones_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for cols in [0usize, 1, 7, 32, 37] {
        let data: Vec<f32> = (0..20 * cols)
            .map(|i| match i % 13 {
                0 => -0.0,
                1 => 0.0,
                _ => rng.random_range(-2.0f32..2.0),
            })
            .collect();
        let metric = Matrix::new(20, cols, data);
        for n in [0usize, 1, 7, 8, 9, 17] {
            // Members in any order, one of them twice.
            let mut members: Vec<usize> = (0..n).map(|i| (i * 7 + 3) % 20).collect();
            if n > 2 {
                members[n - 1] = members[0];
            }
            let d = ops::distances(&metric, &members);
            assert_eq!(d.len(), n);
            for (a, row) in d.iter().enumerate() {
                assert_eq!(row.len(), n);
                for (b, v) in row.iter().enumerate() {
                    let plain = metric
                        .row(members[a])
                        .iter()
                        .zip(metric.row(members[b]))
                        .map(|(x, y)| (x - y) * (x - y))
                        .sum::<f32>()
                        .sqrt();
                    assert_eq!(
                        v.to_bits(),
                        plain.to_bits(),
                        "cols {cols}, n {n}, ({a}, {b})"
                    );
                }
            }
        }
    }
}

#[test]
fn dpc_knn_separates_two_clusters() {
    let mut data = Vec::new();
    for i in 0..5 {
        data.extend([i as f32 * 0.01, 0.0]);
    }
    for i in 0..5 {
        data.extend([10.0 + i as f32 * 0.01, 10.0]);
    }
    let m = Matrix::new(10, 2, data);
    let members: Vec<usize> = (0..10).collect();
    let mut groups = ops::dpc_knn(&m, &members, 2, 3);
    for g in &mut groups {
        g.sort_unstable();
    }
    groups.sort();
    assert_eq!(groups, vec![vec![0, 1, 2, 3, 4], vec![5, 6, 7, 8, 9]]);
}

#[test]
fn visionzip_with_no_contextual_share_keeps_only_dominant_tokens() {
    let m = random_matrix(20, 4, 8);
    let scores: Vec<f32> = (0..20).map(|i| i as f32).collect();
    let a = visionzip(&scores, &m, 10, 0.0);
    assert_eq!(a.representative, (10..20).collect::<Vec<_>>());
    assert!(a.rows.iter().all(|r| r.len() == 1));
    assert_eq!(
        visionzip(&scores, &m, 10, 0.3)
            .rows
            .iter()
            .filter(|r| r.len() > 1)
            .count(),
        3
    );
}

#[test]
fn dart_keeps_image_pivots_and_the_least_duplicated_tokens() {
    // 6 visual tokens then 2 text tokens; token 0 has the largest key norm (the image pivot), text token
    // 7 the largest text norm. Token 3 is the opposite of pivot 0, token 5 orthogonal.
    let data = vec![
        1.0, 0.0, //
        0.9, 0.1, //
        0.8, 0.2, //
        -1.0, 0.0, //
        0.7, 0.3, //
        0.0, 1.0, //
        0.5, 0.5, //
        0.6, 0.4,
    ];
    let m = Matrix::new(8, 2, data);
    let l1 = [9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0];
    let a = dart(m.clone(), &l1, 6, 1, 3);
    assert_eq!(a.representative, vec![0, 3, 5]);
    // A NaN hidden state (and so a NaN key norm) still gives the kept count, never a panic: its
    // similarities count as the largest, so it is not kept for being unlike a pivot.
    let mut with_nan = m.data.clone();
    with_nan[2..4].fill(f32::NAN);
    let l1_nan = [9.0, f32::NAN, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0];
    let a = dart(Matrix::new(8, 2, with_nan), &l1_nan, 6, 1, 3);
    assert_eq!(a.representative.len(), 3);
    assert!(!a.representative.contains(&1), "{:?}", a.representative);
}

#[test]
fn sparsevlm_recycling_stays_within_the_kept_count() {
    let m = random_matrix(40, 4, 6);
    let scores: Vec<f32> = (0..40).map(|i| i as f32).collect();
    let a = sparsevlm_recycle(&scores, 10, &m);
    assert_eq!(a.len(), 10);
    // The top scorers are kept as they are; the cluster tokens come from the best pruned ones.
    let singles: Vec<usize> = a
        .rows
        .iter()
        .filter(|r| r.len() == 1)
        .map(|r| r[0].0)
        .collect();
    assert!(singles.contains(&39) && singles.contains(&32));
    let recycled: Vec<usize> = a
        .rows
        .iter()
        .filter(|r| r.len() > 1)
        .flatten()
        .map(|&(i, _)| i)
        .collect();
    assert!(
        recycled.iter().all(|&i| (22..32).contains(&i)),
        "{recycled:?}"
    );
}

/// SparseVLM's raters computed directly in f64: m_j = mean over visual rows of softmax_j(v · t_j).
fn raters_in_f64(visual: &Matrix, text: &Matrix) -> Vec<usize> {
    let mut m = vec![0f64; text.rows];
    for v in 0..visual.rows {
        let logits: Vec<f64> = (0..text.rows)
            .map(|j| {
                (0..visual.cols)
                    .map(|c| visual.row(v)[c] as f64 * text.row(j)[c] as f64)
                    .sum()
            })
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        for (acc, l) in m.iter_mut().zip(&logits) {
            *acc += (l - max).exp() / total / visual.rows as f64;
        }
    }
    let mean = m.iter().sum::<f64>() / m.len() as f64;
    let raters: Vec<usize> = (0..m.len()).filter(|&j| m[j] > mean).collect();
    if raters.is_empty() {
        (0..m.len()).collect()
    } else {
        raters
    }
}

#[test]
fn sparsevlm_raters_are_the_text_tokens_the_image_attends_to_above_the_mean() {
    // Every image row points along the first axis: the text rows along it are attended to most.
    let visual = Matrix::new(3, 3, vec![2.0, 0.1, 0.0, 1.5, -0.2, 0.3, 2.5, 0.0, -0.1]);
    let text = Matrix::new(
        4,
        3,
        vec![1.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.9, 0.1, 0.0],
    );
    let chosen = sparsevlm_raters(|i| visual.row(i), 3, |j| text.row(j), 4);
    assert_eq!(chosen, vec![0, 3]);
    assert_eq!(chosen, raters_in_f64(&visual, &text));
    // Identical text rows: none is above the mean, so all of them rate.
    let same = Matrix::new(3, 3, [0.5f32, -0.5, 1.0].repeat(3));
    assert_eq!(
        sparsevlm_raters(|i| visual.row(i), 3, |j| same.row(j), 3),
        vec![0, 1, 2]
    );
    // No image rows: every text row rates; no text rows: none.
    assert_eq!(
        sparsevlm_raters(|i| visual.row(i), 0, |j| text.row(j), 4),
        vec![0, 1, 2, 3]
    );
    assert!(sparsevlm_raters(|i| visual.row(i), 3, |j| text.row(j), 0).is_empty());
    // Random rows of an odd width (the dot product's tail) and of widths that take eight products at a
    // time, against the f64 computation.
    for width in [37, 32, 256] {
        for seed in 0..20 {
            let (visual, text) = (
                random_matrix(64, width, seed),
                random_matrix(9, width, seed + 100),
            );
            assert_eq!(
                sparsevlm_raters(|i| visual.row(i), 64, |j| text.row(j), 9),
                raters_in_f64(&visual, &text),
                "width {width}, seed {seed}"
            );
        }
    }
    // Text rows longer than the visual ones count their first values, as one product at a time does.
    let (visual, text) = (random_matrix(16, 8, 1), random_matrix(5, 12, 2));
    let cut = Matrix::new(
        5,
        8,
        (0..5).flat_map(|j| text.row(j)[..8].to_vec()).collect(),
    );
    assert_eq!(
        sparsevlm_raters(|i| visual.row(i), 16, |j| text.row(j), 5),
        sparsevlm_raters(|i| visual.row(i), 16, |j| cut.row(j), 5)
    );
}

// ---------------------------------------------------------------- signals

/// The (h, t, t) attention probabilities, materialised, for sample 0.
fn full_attention(q: &Tensor, k: &Tensor, layout: &RowLayout) -> Vec<Vec<Vec<f32>>> {
    let hd = q.dim(3).unwrap() as f32;
    let scores: Vec<Vec<Vec<f32>>> = q
        .i(0)
        .unwrap()
        .matmul(&k.i(0).unwrap().t().unwrap())
        .unwrap()
        .to_vec3()
        .unwrap();
    scores
        .into_iter()
        .map(|head| {
            head.into_iter()
                .enumerate()
                .map(|(i, row)| {
                    let logits: Vec<f32> = row
                        .iter()
                        .enumerate()
                        .map(|(j, v)| {
                            if layout.visible(i, j) {
                                v / hd.sqrt()
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                        .collect();
                    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
                    let total: f32 = exp.iter().sum();
                    exp.iter().map(|e| e / total).collect()
                })
                .collect()
        })
        .collect()
}

#[test]
fn query_rows_and_received_attention_match_the_full_matrix() {
    let (h, t, hd) = (3, 9, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut draw =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let q = Tensor::from_vec(draw(h * t * hd), (1, h, t, hd), &Device::Cpu).unwrap();
    let k = Tensor::from_vec(draw(h * t * hd), (1, h, t, hd), &Device::Cpu).unwrap();
    let positions: Vec<u32> = (0..t as u32).collect();
    let is_image = [false, true, true, true, true, false, false, false, false];
    let valid = [true, true, true, true, true, true, true, true, false];
    let layout = RowLayout {
        positions: &positions,
        is_image: &is_image,
        valid: &valid,
        key_bias: None,
    };
    let full = full_attention(&q, &k, &layout);
    let qk = QueriesKeys::from_tensors(&q, &k).unwrap();
    let row = qk
        .query_attention(0, &layout, &[7], HeadReduce::Mean)
        .unwrap();
    for j in 0..t {
        let expected: f32 = (0..h).map(|hh| full[hh][7][j]).sum::<f32>() / h as f32;
        assert_close(row[j], expected, 1e-5, "one query row");
    }
    assert_eq!(row[8], 0.0, "an invalid key gets nothing");
    // Heads of 32 values: eight keys' products at once (ops::dots) and one alone, for the second sample
    // of a batch, whose keys start past the first one's.
    let wide = 32;
    let q2 = Tensor::from_vec(draw(2 * h * t * wide), (2, h, t, wide), &Device::Cpu).unwrap();
    let k2 = Tensor::from_vec(draw(2 * h * t * wide), (2, h, t, wide), &Device::Cpu).unwrap();
    let full2 = full_attention(&q2.i(1..2).unwrap(), &k2.i(1..2).unwrap(), &layout);
    let qk2 = QueriesKeys::from_tensors(&q2, &k2).unwrap();
    for query in [2, 7] {
        let row = qk2
            .query_attention(1, &layout, &[query], HeadReduce::Mean)
            .unwrap();
        for j in 0..t {
            let expected: f32 = (0..h).map(|hh| full2[hh][query][j]).sum::<f32>() / h as f32;
            assert_close(
                row[j],
                expected,
                1e-5,
                "a query of the second sample, wide heads",
            );
        }
    }
    let summed = qk
        .query_attention(0, &layout, &[5, 6], HeadReduce::Sum)
        .unwrap();
    for j in 0..t {
        let expected: f32 = (0..h)
            .map(|hh| (full[hh][5][j] + full[hh][6][j]) / 2.0)
            .sum();
        assert_close(summed[j], expected, 1e-5, "two query rows, head sum");
    }
    let queries = [1, 2, 3, 4];
    let received = qk.attention_received(0, &layout, &queries).unwrap();
    for j in 0..t {
        let expected: f32 = queries
            .iter()
            .map(|&i| (0..h).map(|hh| full[hh][i][j]).sum::<f32>() / h as f32)
            .sum();
        assert_close(received[j], expected, 1e-5, "column sums, row by row");
    }
    let metric = qk.key_metric(0, &[1, 3]);
    let direct = k
        .i((0, .., 3))
        .unwrap()
        .mean(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (a, b) in metric.row(1).iter().zip(&direct) {
        assert_close(*a, *b, 1e-6, "key metric");
    }
    let l1 = qk.key_l1(0, &[2]);
    let direct: f32 = k
        .i((0, .., 2))
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_close(l1[0], direct, 1e-6, "key L1");

    // Queries at a few rows only, in any order: the same rows, and an error for a row not computed.
    let rows = [7usize, 5, 6];
    let picked: Vec<Tensor> = rows.iter().map(|&r| q.i((0, .., r)).unwrap()).collect();
    let picked = Tensor::stack(&picked, 1).unwrap().unsqueeze(0).unwrap();
    let partial = QueriesKeys::from_keys_and_rows(&k, Some(&picked), &rows).unwrap();
    assert_eq!(
        partial
            .query_attention(0, &layout, &[7], HeadReduce::Mean)
            .unwrap(),
        row
    );
    assert_eq!(
        partial
            .query_attention(0, &layout, &[5, 6], HeadReduce::Sum)
            .unwrap(),
        summed
    );
    assert_eq!(partial.key_l1(0, &[2]), l1);
    let err = partial
        .query_attention(0, &layout, &[4], HeadReduce::Mean)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 4 of sample 0 was not computed"), "{err}");
    let keys_only = QueriesKeys::from_keys_and_rows(&k, None, &[]).unwrap();
    assert_eq!(keys_only.key_l1(0, &[2]), l1);
    assert!(QueriesKeys::from_keys_and_rows(&k, None, &[3]).is_err());
    assert!(QueriesKeys::from_keys_and_rows(&k, Some(&picked), &[7, 5, 6, 99]).is_err());
}

#[test]
fn host_values_read_a_tensor_in_place_or_copy_it() {
    let values: Vec<f32> = (0..2 * 3 * 4 * 2).map(|i| i as f32 * 0.5 - 3.0).collect();
    let k = Tensor::from_vec(values.clone(), (2, 3, 4, 2), &Device::Cpu).unwrap();
    let whole = HostValues::of(&k).unwrap();
    assert!(whole.in_place());
    assert_eq!(whole.as_slice(), values.as_slice());
    assert_eq!(whole.dims(), [2, 3, 4, 2]);
    // A contiguous part that starts inside the storage: read in place, from its offset.
    let second = k.narrow(0, 1, 1).unwrap();
    let part = HostValues::of(&second).unwrap();
    assert!(part.in_place());
    assert_eq!(part.as_slice(), &values[24..]);
    // Not contiguous, or not f32: copied, in row-major order, as f32.
    let transposed = k.transpose(2, 3).unwrap();
    let copied = HostValues::of(&transposed).unwrap();
    assert!(!copied.in_place());
    let expected: Vec<f32> = transposed.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(copied.as_slice(), expected.as_slice());
    let wide = k.to_dtype(DType::F64).unwrap();
    let converted = HostValues::of(&wide).unwrap();
    assert!(!converted.in_place());
    assert_eq!(converted.as_slice(), values.as_slice());

    // Queries and keys read in place give what the copying constructors give.
    let owned = QueriesKeys::from_tensors(&k, &k).unwrap();
    let borrowed = QueriesKeys::at_every_row(&whole, &whole).unwrap();
    let layout_rows: Vec<u32> = (0..4).collect();
    let layout = RowLayout {
        positions: &layout_rows,
        is_image: &[false, true, true, false],
        valid: &[true; 4],
        key_bias: None,
    };
    for s in 0..2 {
        assert_eq!(
            borrowed
                .query_attention(s, &layout, &[3], HeadReduce::Mean)
                .unwrap(),
            owned
                .query_attention(s, &layout, &[3], HeadReduce::Mean)
                .unwrap()
        );
        assert_eq!(
            borrowed.key_metric(s, &[1, 2]),
            owned.key_metric(s, &[1, 2])
        );
    }
    let flat = k.flatten_all().unwrap();
    let flat = HostValues::of(&flat).unwrap();
    let err = QueriesKeys::at_rows(&flat, None, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("keys of shape [48]"), "{err}");
    let err = QueriesKeys::at_every_row(&whole, &part)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("keys of shape [1, 3, 4, 2], queries [2, 3, 4, 2]"),
        "{err}"
    );
}

#[test]
fn the_interleaved_dot_product_and_l1_norm_are_the_plain_ones() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for n in [0usize, 1, 7, 8, 9, 31, 256] {
        let a: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert_close(ops::dot(&a, &b), naive as f32, 1e-5, "dot product");
        let naive: f64 = a.iter().map(|x| x.abs() as f64).sum();
        assert_close(ops::l1_norm(&a), naive as f32, 1e-5, "L1 norm");
    }
    // Unequal lengths: the shorter one counts.
    assert_eq!(ops::dot(&[1.0, 2.0, 3.0], &[4.0, 5.0]), 14.0);
}

#[test]
fn many_dot_products_at_once_give_the_single_ones_bits() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for d in [0usize, 1, 7, 8, 9, 32, 37, 256] {
        let a: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        for stride in [d, d + 3] {
            // 21 rows, signed zeros among their values, the last one without the stride's padding.
            let len = 20 * stride + d;
            let rows: Vec<f32> = (0..len)
                .map(|i| match i % 11 {
                    0 => -0.0,
                    1 => 0.0,
                    _ => rng.random_range(-1.0f32..1.0),
                })
                .collect();
            for n in [0usize, 1, 7, 8, 9, 16, 21] {
                let mut out = vec![f32::NAN; n];
                ops::dots(&a, &rows, stride, &mut out);
                for (j, o) in out.iter().enumerate() {
                    let single = ops::dot(&a, &rows[j * stride..j * stride + d]);
                    assert_eq!(
                        o.to_bits(),
                        single.to_bits(),
                        "d {d}, stride {stride}, row {j} of {n}"
                    );
                }
            }
        }
    }
    // All-zero products keep the single product's signed zero.
    let a = [-0.0f32; 16];
    let zeros = [0.0f32; 16 * 8];
    let mut out = [f32::NAN; 8];
    ops::dots(&a, &zeros, 16, &mut out);
    assert!(
        out.iter()
            .all(|o| o.to_bits() == ops::dot(&a, &zeros[..16]).to_bits())
    );
    // Rows that do not fit are refused.
    let refused = std::panic::catch_unwind(|| ops::dots(&[1.0; 8], &[0.0; 15], 8, &mut [0.0; 2]));
    assert!(refused.is_err());
}

// ---------------------------------------------------------------- plans and budgets

#[test]
fn invalid_plans_are_clear_errors() {
    let check = |json: &str, expected: &str| {
        let result: Result<Plan, _> = serde_json::from_str(json);
        let message = match result {
            Err(e) => e.to_string(),
            Ok(plan) => plan.validate(4).unwrap_err().to_string(),
        };
        assert!(message.contains(expected), "{json}: {message}");
    };
    check(
        r#"{"stages":[{"layer":4,"method":"fastv","keep":0.5}]}"#,
        "layer 4 is out of range",
    );
    check(
        r#"{"stages":[{"layer":1,"method":"fastv","keep":1.5}]}"#,
        "keep 1.5 is outside (0, 1]",
    );
    check(
        r#"{"stages":[{"layer":1,"method":"fastv","keep":0}]}"#,
        "keep 0 is outside (0, 1]",
    );
    check(
        r#"{"stages":[{"layer":1,"method":"shrink","keep":0.5}]}"#,
        "unknown variant `shrink`",
    );
    check(
        r#"{"stages":[{"layer":1,"method":"pool"}]}"#,
        "pool needs \"window\"",
    );
    check(
        r#"{"stages":[{"layer":1,"method":"fastv","keep":0.5,"window":2}]}"#,
        "\"window\" does not apply to fastv",
    );
    check(
        r#"{"stages":[{"layer":1,"method":"pdrop","keep":0.25},{"layer":2,"method":"pdrop","keep":0.5}]}"#,
        "a stage cannot add tokens",
    );
    check(
        r#"{"stages":[{"layer":2,"method":"pdrop","keep":0.5},{"layer":1,"method":"pdrop","keep":0.25}]}"#,
        "must come after",
    );
    check(
        r#"{"stages":[{"layer":1,"method":"fastv","keep":0.5,"ratio":3}]}"#,
        "unknown field `ratio`",
    );
}

#[test]
fn every_method_is_fitted_within_every_standard_budget() {
    for g in [
        Geometry {
            n_layers: 6,
            grid: 8,
        },
        Geometry {
            n_layers: 4,
            grid: 16,
        },
    ] {
        for &budget in &STANDARD_BUDGETS {
            for method in Method::ALL {
                let plan = fit(method, budget, g)
                    .unwrap_or_else(|e| panic!("{method:?} at {budget}: {e}"));
                plan.validate(g.n_layers).unwrap();
                let share = plan.equivalent_share(g.n_layers, g.n0(), g.grid);
                assert!(share <= budget + 1e-12, "{method:?}: {share} > {budget}");
                assert!(share > 0.0);
            }
        }
    }
    // The literature's layers scaled to depth: FastV's K = 2 of 32 on 16 layers is layer 1, and
    // (64 + 15k) / 16 ≤ 0.333 · 64 gives k = 18.
    let plan = fit(
        Method::Fastv,
        0.333,
        Geometry {
            n_layers: 16,
            grid: 8,
        },
    )
    .unwrap();
    assert_eq!(plan.stages[0].layer, 1);
    assert_eq!(plan.stages[0].keep, Some(18.0 / 64.0));
    assert!(
        fit(
            Method::Fastv,
            0.0,
            Geometry {
                n_layers: 6,
                grid: 8
            }
        )
        .is_err()
    );
}

// ---------------------------------------------------------------- plans inside a model

const SPECIAL: [u32; 7] = [0, 1, 2, 3, 4, 5, 6]; // pad, bos, eos, image_start, image_end, patch, summary

fn tiny_model(summary: bool) -> NativeModel {
    let shape = Shape {
        d_model: 32,
        n_layers: 4,
        n_heads: 4,
        d_ff: 48,
    };
    let mut config = ModelConfig::from_shape(shape, 40, 12, 4, 128);
    config.summary_token = summary;
    NativeModel::new(config, 3, &Device::Cpu).unwrap()
}

/// Prompts `bos img_start patch×16 img_end [summary] question…` with `question_lens` question tokens.
fn prompts(model: &NativeModel, question_lens: &[usize], seed: u64) -> Inputs {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = model.config.image_grid.pow(2);
    let summary = model.config.summary_token;
    let lens: Vec<usize> = question_lens
        .iter()
        .map(|q| 3 + n + usize::from(summary) + q)
        .collect();
    let t = *lens.iter().max().unwrap();
    let b = question_lens.len();
    let mut tokens = vec![SPECIAL[0]; b * t];
    for (s, &q) in question_lens.iter().enumerate() {
        let mut row = vec![SPECIAL[1], SPECIAL[3]];
        row.extend(std::iter::repeat_n(SPECIAL[5], n));
        row.push(SPECIAL[4]);
        if summary {
            row.push(SPECIAL[6]);
        }
        row.extend((0..q).map(|_| rng.random_range(7..40u32)));
        tokens[s * t..s * t + row.len()].copy_from_slice(&row);
    }
    let patches: Vec<f32> = (0..b * n * model.config.patch_dim)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    Inputs {
        tokens: Tensor::from_vec(tokens, (b, t), &Device::Cpu).unwrap(),
        patches: Tensor::from_vec(patches, (b, n, model.config.patch_dim), &Device::Cpu).unwrap(),
        image_starts: vec![Some(2); b],
        lengths: lens,
    }
}

fn one_sample(inputs: &Inputs, s: usize) -> Inputs {
    let len = inputs.lengths[s];
    Inputs {
        tokens: inputs.tokens.i((s..s + 1, ..len)).unwrap(),
        patches: inputs.patches.i(s..s + 1).unwrap(),
        image_starts: vec![inputs.image_starts[s]],
        lengths: vec![len],
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn plans_for(g: Geometry) -> Vec<Plan> {
    let mut plans: Vec<Plan> = Method::ALL
        .iter()
        .map(|&m| fit(m, 0.3, g).unwrap())
        .collect();
    plans.push(fit(Method::Pool, 0.1, g).unwrap());
    plans
}

#[test]
fn a_plan_keeping_everything_leaves_the_logits_unchanged() {
    let model = tiny_model(false);
    let inputs = prompts(&model, &[3, 5], 1);
    let full = model
        .prefill(&inputs, &mut NoHook, &mut KvCache::default())
        .unwrap();
    for method in [Method::Fastv, Method::Pdrop, Method::Tome, Method::Random] {
        let plan = Plan {
            name: "keep-all".into(),
            proportional_attention: true,
            stages: vec![Stage::new(1, method, 1.0)],
        };
        let mut hook = FoldHook::new(&model, &plan);
        let logits = model
            .prefill(&inputs, &mut hook, &mut KvCache::default())
            .unwrap();
        assert!(max_diff(&full, &logits) < 1e-5, "{method:?}");
    }
}

#[test]
fn the_measured_budget_equals_the_tokens_that_pass_and_the_plan() {
    for summary in [false, true] {
        let model = tiny_model(summary);
        let g = Geometry::of(&model.config);
        let inputs = prompts(&model, &[3, 6, 4], 2);
        for plan in plans_for(g) {
            let mut hook = FoldHook::new(&model, &plan);
            let mut cache = KvCache::default();
            model.prefill(&inputs, &mut hook, &mut cache).unwrap();
            let planned = plan.planned_tokens(g.n_layers, g.n0(), g.grid);
            let measured = hook.trace.mean_entering();
            for (layer, (&p, &m)) in planned.iter().zip(&measured).enumerate() {
                assert_eq!(p as f64, m, "{}: layer {layer}", plan.name);
            }
            assert_eq!(hook.trace.samples, 3);
            let share = hook.trace.equivalent_share();
            assert!((share - plan.equivalent_share(g.n_layers, g.n0(), g.grid)).abs() < 1e-12);
            // The KV cache of each layer holds exactly the tokens that entered it (plus text, padding).
            for (layer, entry) in cache.layers.iter().enumerate() {
                let entry = entry.as_ref().unwrap();
                let text_keys = inputs.lengths.iter().sum::<usize>() - 3 * g.n0();
                let visual_keys = entry.valid.iter().filter(|&&v| v).count() - text_keys;
                assert_eq!(
                    visual_keys,
                    3 * planned[layer],
                    "{}: cache of layer {layer}",
                    plan.name
                );
            }
        }
    }
}

/// [`tiny_model`] as a loaded model is: frozen and prepared for inference, so that its passes over padded
/// batches pack their rows.
fn inference_model(summary: bool) -> NativeModel {
    let mut model = tiny_model(summary).frozen().unwrap();
    model.prepare_inference().unwrap();
    assert!(model.packs_rows());
    model
}

#[test]
fn each_sample_of_a_batch_is_reduced_as_if_alone() {
    // A model in training runs padded batches; an inference model packs their rows.
    for (model, layout) in [
        (tiny_model(true), "padded"),
        (inference_model(true), "packed"),
    ] {
        each_sample_reduced_as_if_alone(&model, layout);
    }
}

fn each_sample_reduced_as_if_alone(model: &NativeModel, layout: &str) {
    let g = Geometry::of(&model.config);
    let inputs = prompts(model, &[2, 7, 4], 3);
    for plan in plans_for(g) {
        let mut hook = FoldHook::new(model, &plan);
        let batched = model
            .prefill(&inputs, &mut hook, &mut KvCache::default())
            .unwrap();
        for s in 0..3 {
            let single = one_sample(&inputs, s);
            let mut hook = FoldHook::new(model, &plan);
            let alone = model
                .prefill(&single, &mut hook, &mut KvCache::default())
                .unwrap();
            let diff = max_diff(&batched.i(s..s + 1).unwrap(), &alone);
            assert!(
                diff < 1e-4,
                "{} ({layout}): sample {s} differs by {diff}",
                plan.name
            );
        }
    }
}

#[test]
fn decoding_with_the_cache_after_a_reduced_prefill_equals_recomputation() {
    for model in [tiny_model(true), inference_model(true)] {
        decoding_after_reduced_prefill_equals_recomputation(&model);
    }
}

fn decoding_after_reduced_prefill_equals_recomputation(model: &NativeModel) {
    let g = Geometry::of(&model.config);
    let inputs = prompts(model, &[3, 5], 4);
    for plan in plans_for(g) {
        let mut hook = FoldHook::new(model, &plan);
        let mut cache = KvCache::default();
        let mut logits = model.prefill(&inputs, &mut hook, &mut cache).unwrap();
        let mut sequences: Vec<Vec<u32>> = (0..2)
            .map(|s| {
                let row: Vec<u32> = inputs.tokens.i(s).unwrap().to_vec1().unwrap();
                row[..inputs.lengths[s]].to_vec()
            })
            .collect();
        let prompt_ends: Vec<u32> = inputs.lengths.iter().map(|&l| l as u32 - 1).collect();
        for _ in 0..3 {
            let next: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
            for (s, seq) in sequences.iter_mut().enumerate() {
                seq.push(next[s]);
            }
            logits = model.decode_step(&next, &mut cache).unwrap();
            // Recompute from scratch on the prompt plus the generated tokens, with the same plan.
            for s in 0..2 {
                let seq = &sequences[s];
                let single = Inputs {
                    tokens: Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap(),
                    patches: inputs.patches.i(s..s + 1).unwrap(),
                    image_starts: vec![Some(2)],
                    lengths: vec![seq.len()],
                };
                let mut hook = FoldHook::new(model, &plan);
                hook.prompt_ends = Some(vec![prompt_ends[s]]);
                let state = model
                    .forward(model.embed(&single).unwrap(), &mut hook, None)
                    .unwrap();
                let t = state.len();
                let last = (0..t)
                    .filter(|&j| state.valid[j])
                    .max_by_key(|&j| state.positions[j])
                    .unwrap();
                let recomputed = model
                    .logits(&state.hidden.i((0, last..last + 1)).unwrap())
                    .unwrap();
                let diff = max_diff(&logits.i(s..s + 1).unwrap(), &recomputed);
                assert!(diff < 1e-4, "{}: sample {s} differs by {diff}", plan.name);
            }
        }
    }
}

// ---------------------------------------------------------------- the unified operator's presets

fn apply_both(a: &Assignment, b: &Assignment, n: usize, seed: u64) -> f32 {
    let x = tokens(&random_matrix(n, 6, seed));
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    let sizes: Vec<f32> = (0..n).map(|_| rng.random_range(0.5f32..3.0)).collect();
    let (ya, sa) = ops::apply(&x, &sizes, a).unwrap();
    let (yb, sb) = ops::apply(&x, &sizes, b).unwrap();
    assert_eq!(a.representative, b.representative);
    for (u, v) in sa.iter().zip(&sb) {
        assert_close(*u, *v, 1e-5, "sizes");
    }
    max_diff(&ya, &yb)
}

#[test]
fn unified_presets_reproduce_each_operator_on_random_inputs() {
    use crate::unified::{self, Candidates, Operator, Signal, Source, Tau};
    let cells: Vec<(u32, u32)> = (0..64u32).map(|i| (i / 8, i % 8)).collect();
    for seed in 0..5u64 {
        let n = 64;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let scores: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let metric = random_matrix(n, 8, seed + 10);
        // Pruning: γ = 0 with the method's signal.
        for k in [1, 7, 32, 63] {
            let op = Operator::prune(Signal::Last, Source::Previous);
            let unified = unified::operate(&op, &scores, None, &cells, k).unwrap();
            assert_eq!(unified, ops::prune(&scores, k));
        }
        // ToMe, one bipartite round: γ = 1, τ = 0, bipartite candidates, the redundancy signal.
        for r in [1, 10, 32] {
            let op = Operator {
                gamma: 1.0,
                tau: Tau(0.0),
                candidates: Candidates::Bipartite,
                ..Operator::prune(Signal::Redundancy, Source::Previous)
            };
            let score = unified::redundancy_signal(&metric);
            let unified = unified::operate(&op, &score, Some(&metric), &cells, n - r).unwrap();
            let positions: Vec<u32> = (0..n as u32).collect();
            let tome = ops::bipartite_merge(&metric, r).sorted_by(&positions);
            assert!(apply_both(&unified, &tome, n, seed) < 1e-6, "tome r={r}");
        }
        // Pooling: γ = 1, τ = ∞, grid anchors inside windows.
        for window in [2, 3, 4] {
            let op = Operator {
                gamma: 1.0,
                window: Some(window),
                ..Operator::prune(Signal::Grid, Source::Current)
            };
            let blocks = 8usize.div_ceil(window as usize).pow(2);
            let grid = unified::grid_signal(&cells, window);
            let unified = unified::operate(&op, &grid, None, &cells, blocks).unwrap();
            let pooled = ops::pool(&cells, window);
            assert!(
                apply_both(&unified, &pooled, n, seed) < 1e-6,
                "pool {window}"
            );
        }
        // Soft redistribution in between: any γ, τ is ops::redistribute on the top-k anchors.
        for (gamma, tau) in [(0.08, 0.22), (0.5, 1.0), (1.0, 0.05)] {
            let op = Operator {
                gamma,
                tau: Tau(tau),
                ..Operator::prune(Signal::Last, Source::Previous)
            };
            let unified = unified::operate(&op, &scores, Some(&metric), &cells, 16).unwrap();
            let kept = ops::top_k(&scores, 16);
            let soft = ops::redistribute(&metric, &kept, gamma as f32, tau as f32);
            assert!(
                apply_both(&unified, &soft, n, seed) < 1e-6,
                "γ={gamma} τ={tau}"
            );
        }
    }
}

#[test]
fn the_unified_operator_normalises_and_reweights_as_defined() {
    use crate::unified::{self, Operator, Signal, Source, Tau};
    // Two tokens: 0 kept, 1 removed into it; sizes 1 and 3, γ = 0.5.
    let x = ops::tensor(&[vec![1.0, 0.0], vec![0.0, 1.0]], &Device::Cpu).unwrap();
    let metric = Matrix::new(2, 2, vec![1.0, 0.0, 0.0, 1.0]);
    for eta in [0.0f32, 0.5, 1.0] {
        let op = Operator {
            gamma: 0.5,
            tau: Tau(1.0),
            eta: eta as f64,
            rho: 2.0,
            ..Operator::prune(Signal::Last, Source::Previous)
        };
        let a = unified::operate(&op, &[1.0, 0.0], Some(&metric), &[(0, 0), (0, 1)], 1).unwrap();
        let (y, sizes) = ops::apply(&x, &[1.0, 3.0], &a).unwrap();
        // x' = (1·x0 + 0.5·3·x1) / (1 + η·0.5·3), s' = 1 + 1.5.
        let den = 1.0 + eta * 1.5;
        let y = rows_of(&y);
        assert_close(y[0][0], 1.0 / den, 1e-6, "anchor share");
        assert_close(y[0][1], 1.5 / den, 1e-6, "transferred share");
        assert_close(sizes[0], 2.5, 1e-6, "size");
        // ρ · z-score of the score (z of [1, 0] is [1, −1]).
        assert_eq!(a.boost, vec![2.0]);
    }
}

#[test]
fn unified_presets_reproduce_each_method_inside_the_model() {
    use crate::unified::unified_plan;
    let mut expressed = std::collections::BTreeSet::new();
    for summary in [false, true] {
        let model = tiny_model(summary);
        let g = Geometry::of(&model.config);
        let inputs = prompts(&model, &[3, 6, 4], 5);
        let mut plans: Vec<Plan> = Vec::new();
        for budget in [0.6, 0.3, STANDARD_BUDGETS[2]] {
            for method in Method::ALL {
                if let Ok(plan) = fit(method, budget, g) {
                    plans.push(plan);
                }
            }
        }
        // SparseVLM's selection alone (its recycling makes cluster tokens the operator cannot express).
        let mut selection = fit(Method::Sparsevlm, 0.3, g).unwrap();
        selection.stages.iter_mut().for_each(|s| s.recycle = None);
        plans.push(selection);
        for plan in plans {
            let Some(unified) = unified_plan(&plan, g) else {
                continue;
            };
            unified.validate(g.n_layers).unwrap();
            let run = |plan: &Plan| {
                let mut hook = FoldHook::new(&model, plan);
                model
                    .prefill(&inputs, &mut hook, &mut KvCache::default())
                    .unwrap()
            };
            let diff = max_diff(&run(&plan), &run(&unified));
            assert!(diff <= 1e-5, "{}: logits differ by {diff}", plan.name);
            expressed.insert(plan.name.clone());
        }
    }
    for name in ["fastv", "pdrop", "sparsevlm", "dart", "tome", "pool"] {
        assert!(
            expressed.contains(name),
            "{name} was never expressed: {expressed:?}"
        );
    }
}

#[test]
fn unified_stages_are_validated_with_the_parameter_named() {
    use crate::unified::{Operator, Signal, Source};
    let bad = |op: Operator, needle: &str| {
        let plan = Plan {
            name: "bad".into(),
            proportional_attention: false,
            stages: vec![Stage::unified(1, 0.5, op)],
        };
        let err = plan.validate(4).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    };
    let base = Operator::prune(Signal::Last, Source::Previous);
    bad(
        Operator {
            gamma: 1.5,
            ..base.clone()
        },
        "gamma 1.5",
    );
    bad(
        Operator {
            signals: Default::default(),
            ..base.clone()
        },
        "at least one signal",
    );
    bad(
        Operator {
            locality: Some(0.0),
            ..base.clone()
        },
        "locality",
    );
    let text = r#"{"stages":[{"layer":1,"method":"unified","keep":0.2,
        "operator":{"signals":{"last":1.0},"gamma":0.1,"tau":"inf"}}]}"#;
    let plan: Plan = serde_json::from_str(text).unwrap();
    plan.validate(4).unwrap();
    let round_trip: Plan = serde_json::from_str(&serde_json::to_string(&plan).unwrap()).unwrap();
    assert_eq!(plan, round_trip);
    let wrong = r#"{"stages":[{"layer":1,"method":"unified","keep":0.2,
        "operator":{"signals":{"last":1.0},"tau":"hot"}}]}"#;
    let err = serde_json::from_str::<Plan>(wrong).unwrap_err().to_string();
    assert!(err.contains("hot"), "{err}");
}

/// A [`FoldHook`] whose stages' keys pass through `edit` on their way to the layer; it counts the
/// layers they were handed to.
struct KeysHook<'a, F: FnMut(Tensor) -> Option<Tensor>> {
    hook: FoldHook<'a>,
    edit: F,
    handed: usize,
}

impl<'a, F: FnMut(Tensor) -> Option<Tensor>> KeysHook<'a, F> {
    fn new(model: &'a NativeModel, plan: &'a Plan, edit: F) -> Self {
        KeysHook {
            hook: FoldHook::new(model, plan),
            edit,
            handed: 0,
        }
    }
}

impl<F: FnMut(Tensor) -> Option<Tensor>> LayerHook for KeysHook<'_, F> {
    fn before_layer(&mut self, layer: usize, state: &mut SeqState) -> candle_core::Result<bool> {
        let changed = self.hook.before_layer(layer, state)?;
        self.handed += usize::from(state.known_keys.is_some());
        state.known_keys = state.known_keys.take().and_then(&mut self.edit);
        Ok(changed)
    }

    fn capture(&self, layer: usize) -> bool {
        self.hook.capture(layer)
    }

    fn reads_hidden(&self, layer: usize) -> bool {
        self.hook.reads_hidden(layer)
    }
}

fn bits_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn a_layer_given_its_stages_keys_computes_the_same_bits() {
    // Heads of 8 values take the split product, which computes the keys anyway (so none are handed
    // on); heads of 16 take the fused panels.
    for d_model in [32, 64] {
        let shape = Shape {
            d_model,
            n_layers: 4,
            n_heads: 4,
            d_ff: 48,
        };
        let mut config = ModelConfig::from_shape(shape, 40, 12, 4, 128);
        config.summary_token = true;
        let mut model = NativeModel::new(config, 5, &Device::Cpu)
            .unwrap()
            .frozen()
            .unwrap();
        model.prepare_inference().unwrap();
        let g = Geometry::of(&model.config);
        // One sample runs the padded layout, three of different lengths the packed one.
        for lens in [&[4usize][..], &[2, 7, 4]] {
            let inputs = prompts(&model, lens, 6);
            let mut handed = Vec::new();
            for plan in plans_for(g) {
                // As handed on; dropped, so that each layer projects its own; doubled.
                let mut counted = KeysHook::new(&model, &plan, Some);
                let mut cache = KvCache::default();
                let given = model.prefill(&inputs, &mut counted, &mut cache).unwrap();
                let mut own = KeysHook::new(&model, &plan, |_| None);
                let mut own_cache = KvCache::default();
                let computed = model.prefill(&inputs, &mut own, &mut own_cache).unwrap();
                let what = format!("{} (d {d_model}, lengths {lens:?})", plan.name);
                assert_eq!(bits_of(&given), bits_of(&computed), "{what}: logits");
                // Keys handed on are the ones the layer uses.
                if counted.handed > 0 {
                    let mut doubled = KeysHook::new(&model, &plan, |k| Some((k * 2.0).unwrap()));
                    let altered = model
                        .prefill(&inputs, &mut doubled, &mut KvCache::default())
                        .unwrap();
                    assert!(max_diff(&given, &altered) > 1e-4, "{what}: keys unused");
                }
                for (layer, (a, b)) in cache.layers.iter().zip(&own_cache.layers).enumerate() {
                    let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                    assert_eq!(
                        bits_of(&a.k),
                        bits_of(&b.k),
                        "{what}: keys of layer {layer}"
                    );
                    assert_eq!(
                        bits_of(&a.v),
                        bits_of(&b.v),
                        "{what}: values of layer {layer}"
                    );
                }
                // Stages that prune and rank by their own layer's keys (PDrop's, and FastV's and
                // DART's at layer 0, which has no previous layer) hand them on; stages that merge
                // tokens, or read the previous layer's keys, or none, do not.
                let handing = plan
                    .stages
                    .iter()
                    .filter(|st| {
                        matches!(st.method, Method::Pdrop | Method::Fastv | Method::Dart)
                            && (st.layer == 0 || !st.uses_previous_layer())
                    })
                    .count()
                    * usize::from(model.reuses_keys_of(1));
                assert_eq!(counted.handed, handing, "{what}: layers handed keys");
                // The stages' own projections: the keys of every row entering a stage that reads its
                // own layer's, and the queries of the last prompt token and the summary token for
                // FastV and PDrop, less the keys handed on (the rows the stage keeps).
                if matches!(
                    plan.stages[0].method,
                    Method::Pdrop | Method::Fastv | Method::Dart | Method::Tome
                ) {
                    let trace = &counted.hook.trace;
                    let reused = model.reuses_keys_of(1);
                    let expected: u64 = plan
                        .stages
                        .iter()
                        .filter(|st| st.layer == 0 || !st.uses_previous_layer())
                        .map(|st| {
                            let before = match st.layer {
                                0 => trace.prompt_tokens,
                                l => trace.entering_all[l - 1],
                            };
                            let queries = match st.method {
                                Method::Pdrop | Method::Fastv => 2 * trace.samples,
                                _ => 0,
                            };
                            let handed = if reused && st.method != Method::Tome {
                                trace.entering_all[st.layer]
                            } else {
                                0
                            };
                            before + queries - handed
                        })
                        .sum();
                    assert_eq!(trace.signal_projections, expected, "{what}: projections");
                }
                handed.push((plan.stages[0].method, counted.handed));
            }
            // Where the model reuses keys (panel kernels, heads of 16), PDrop's three stages all hand
            // theirs on: the comparison above is not one of unused keys.
            if model.reuses_keys_of(1) {
                assert!(handed.contains(&(Method::Pdrop, 3)), "{handed:?}");
            }
        }
    }
}
