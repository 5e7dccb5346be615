//! Budgets: fitting every method to a visual-token budget by one rule, and the analytical prefill FLOPs.
//!
//! **The budget** is the FLOPs-equivalent visual-token average Σ_ℓ n_ℓ / L (n_ℓ the visual tokens entering
//! layer ℓ) as a share of the original count n₀: the literature's 192/128/64/16 of 576 are 33.3%, 22.2%,
//! 11.1% and 2.8%.
//!
//! **The fitting rule**, the same for every method: take the method's layers from the literature (set for
//! the 32-layer LLaVA-1.5) scaled to the model's depth, layer l → round(l · L / 32), and choose its
//! keep counts as large as possible with an equivalent average not above the budget. If the scaled layers
//! admit no token at all, every stage moves one layer earlier until they do. Pre-LLM methods (VisionZip,
//! PruMerge+, random) act at the input of layer 0; pooling takes the (layer, window) that uses the most of
//! the budget without exceeding it.

use tokenfold_model::ModelConfig;

use crate::error::{FoldError, Result};
use crate::plan::{Method, Plan, Stage};

/// The literature's standard budgets: 192, 128, 64 and 16 of 576 visual tokens.
pub const STANDARD_BUDGETS: [f64; 4] = [192.0 / 576.0, 128.0 / 576.0, 64.0 / 576.0, 16.0 / 576.0];

/// What a plan is fitted for: the model depth and the image's token grid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub n_layers: usize,
    pub grid: usize,
}

impl Geometry {
    pub fn of(config: &ModelConfig) -> Geometry {
        Geometry {
            n_layers: config.n_layers,
            grid: config.image_grid,
        }
    }

    pub fn n0(&self) -> usize {
        self.grid * self.grid
    }

    fn share(&self, plan: &Plan) -> f64 {
        plan.equivalent_share(self.n_layers, self.n0(), self.grid)
    }

    fn fits(&self, plan: &Plan, budget: f64) -> bool {
        self.share(plan) <= budget + 1e-12
    }

    /// Layer `l` of a 32-layer model at this depth.
    fn scaled(&self, l: usize) -> usize {
        ((l as f64 * self.n_layers as f64 / 32.0).round() as usize)
            .min(self.n_layers.saturating_sub(1))
    }
}

/// The plan of `method` fitted to `budget` (a share of the visual tokens in (0, 1]).
pub fn fit(method: Method, budget: f64, geometry: Geometry) -> Result<Plan> {
    if !(budget > 0.0 && budget <= 1.0) {
        return Err(FoldError::Budget(format!(
            "budget {budget} is outside (0, 1]"
        )));
    }
    if method == Method::Unified {
        return Err(FoldError::Budget(
            "unified plans are not fitted by rule: `tokenfold search` finds them".into(),
        ));
    }
    let g = geometry;
    let n0 = g.n0();
    let plan = |stages: Vec<Stage>| Plan {
        name: method.name().to_string(),
        proportional_attention: method == Method::Tome,
        stages,
    };
    // Largest single keep count at `layer` within the budget.
    let single = |layer: usize, method: Method| -> Option<Plan> {
        (1..=n0)
            .rev()
            .map(|k| plan(vec![Stage::new(layer, method, k as f64 / n0 as f64)]))
            .find(|p| g.fits(p, budget))
    };
    // The method's stages at `layers`, keep counts from a scale in (0, 1] by `counts`; the largest scale
    // that fits, moving every layer earlier while none does.
    let staged = |layers: Vec<usize>, counts: &dyn Fn(f64) -> Vec<usize>| -> Option<Plan> {
        let mut layers = layers;
        loop {
            let found = (1..=1000)
                .rev()
                .map(|i| i as f64 / 1000.0)
                .find_map(|scale| {
                    let stages: Vec<Stage> = layers
                        .iter()
                        .zip(counts(scale))
                        .map(|(&l, c)| Stage::new(l, method, c.max(1) as f64 / n0 as f64))
                        .collect();
                    let p = plan(stages);
                    (g.fits(&p, budget) && p.validate(g.n_layers).is_ok()).then_some(p)
                });
            if found.is_some() {
                return found;
            }
            // Move every stage one layer earlier (keeping them distinct) and retry.
            if layers.iter().enumerate().all(|(i, &l)| l == i) {
                return None;
            }
            let mut next = Vec::with_capacity(layers.len());
            for (i, &l) in layers.iter().enumerate() {
                next.push(l.saturating_sub(1).max(i));
            }
            layers = next;
        }
    };
    let fitted = match method {
        Method::Fastv | Method::Dart => {
            let k = g.scaled(2);
            (0..=k).rev().find_map(|layer| single(layer, method))
        }
        Method::Visionzip | Method::Prumerge | Method::Random => single(0, method),
        Method::Pdrop => {
            let layers: Vec<usize> =
                dedup_increasing([8, 16, 24].map(|l| g.scaled(l)).to_vec(), g.n_layers);
            let stages = layers.len() as i32;
            staged(layers, &|lambda| {
                (1..=stages)
                    .map(|i| (n0 as f64 * lambda.powi(i)).round() as usize)
                    .collect()
            })
        }
        Method::Sparsevlm => {
            let layers = dedup_increasing([2, 6, 15].map(|l| g.scaled(l)).to_vec(), g.n_layers);
            let schedule = [300.0 / 576.0, 200.0 / 576.0, 110.0 / 576.0];
            let stages = layers.len();
            staged(layers, &|scale| {
                schedule[..stages]
                    .iter()
                    .map(|r| (n0 as f64 * r * scale).round() as usize)
                    .collect()
            })
            .map(|mut p| {
                for s in &mut p.stages {
                    s.recycle = Some(true);
                }
                p
            })
        }
        Method::Tome => {
            // A constant number r of tokens merged at every layer (ToMe's schedule), the smallest r within
            // the budget.
            (1..=n0).find_map(|r| {
                let stages: Vec<Stage> = (0..g.n_layers)
                    .map(|l| {
                        let kept = n0.saturating_sub((l + 1) * r).max(1);
                        Stage::new(l, method, kept as f64 / n0 as f64)
                    })
                    .collect();
                let mut stages_dedup: Vec<Stage> = Vec::new();
                for s in stages {
                    if stages_dedup.last().is_none_or(|p| p.keep != s.keep) {
                        stages_dedup.push(s);
                    }
                }
                let p = plan(stages_dedup);
                g.fits(&p, budget).then_some(p)
            })
        }
        Method::Pool => {
            let mut best: Option<(f64, Plan)> = None;
            for layer in 0..g.n_layers {
                for window in 2..=g.grid as u32 {
                    let p = plan(vec![Stage::pool(layer, window)]);
                    let share = g.share(&p);
                    if share <= budget + 1e-12 && best.as_ref().is_none_or(|(b, _)| share > *b) {
                        best = Some((share, p));
                    }
                }
            }
            best.map(|(_, p)| p)
        }
        Method::Unified => None,
    };
    fitted.ok_or_else(|| {
        FoldError::Budget(format!(
            "{} cannot meet a budget of {:.1}% on a {}-layer model with {n0} visual tokens",
            method.name(),
            100.0 * budget,
            g.n_layers
        ))
    })
}

/// Makes scaled layers strictly increasing and below `n_layers`; stages that no longer fit are dropped
/// (a shallow model gets fewer stages).
fn dedup_increasing(layers: Vec<usize>, n_layers: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::with_capacity(layers.len());
    for layer in layers {
        let layer = match out.last() {
            Some(&previous) if layer <= previous => previous + 1,
            _ => layer,
        };
        if layer < n_layers {
            out.push(layer);
        }
    }
    out
}

/// Analytical prefill FLOPs of one layer over `t` tokens (multiply-adds count 2): the q, k, v, o
/// projections and the SwiGLU MLP, 2·t·(4d² + 3·d·d_ff), plus the attention scores and their weighted sum
/// over all heads, 2·2·t²·d.
pub fn layer_flops(config: &ModelConfig, t: f64) -> f64 {
    let (d, ff) = (config.d_model as f64, config.d_ff as f64);
    2.0 * t * (4.0 * d * d + 3.0 * d * ff) + 4.0 * t * t * d
}

/// Analytical prefill FLOPs of the decoder for per-layer token counts and per-layer Σ t² (so that a batch
/// of different lengths is counted exactly).
pub fn prefill_flops(config: &ModelConfig, tokens: &[f64], tokens_sq: &[f64]) -> f64 {
    let (d, ff) = (config.d_model as f64, config.d_ff as f64);
    tokens
        .iter()
        .zip(tokens_sq)
        .map(|(&t, &t2)| 2.0 * t * (4.0 * d * d + 3.0 * d * ff) + 4.0 * t2 * d)
        .sum()
}
