//! The search loop: the objective, one-sided constraints by an augmented Lagrangian, the two phases,
//! and the discrete plan at the end.
//!
//! **Objective** per batch of the training split: the answer tokens' cross-entropy of the relaxed model,
//! plus `align` × KL(full model ‖ relaxed model) on the same answer logits, plus for each constraint
//! g ≤ 0 (the FLOPs-equivalent token share minus the budget; optionally the analytical prefill-FLOPs share
//! minus its cap) the one-sided augmented-Lagrangian term (max(0, λ + μ·g)² − λ²)/(2μ), with
//! λ ← max(0, λ + μ·g) after every step. Coming in under a constraint costs nothing.
//!
//! **Phases.** The first `explore` share of the steps uses the expected layer activation a = sigmoid(α).
//! Then each layer's activation is fixed to a > ½ (at least one layer) and the remaining steps tune the
//! keep ratios and operator parameters of the active layers as they will run. The mask temperature anneals
//! geometrically from `temperature.0` to `temperature.1` over all steps.
//!
//! **The plan.** Active layers become unified stages with their parameters; keep shares are the products of
//! the keep ratios, then scaled by one common factor to the largest counts whose FLOPs-equivalent share does
//! not exceed the budget (so the plan meets it, never above).
//!
//! **Seeds and selection** ([`crate::seed`]). With `seeds`, held-out batches of the training split rank the
//! hand-designed plans the space expresses exactly; a hill-climb on the same batches moves the best one's
//! schedule (tokens per layer, one token at a time); a second run starts from that seed and schedule
//! (thawed) with its layers fixed, and the plan emitted is the best on those batches (exact-match
//! accuracy, then the objective) among the neutral search's plan, the seeded search's plan, the seeds
//! and the best seed on its schedule.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::{Result as CandleResult, Tensor};
use serde::{Deserialize, Serialize};
use tokenfold_data::Batch;
use tokenfold_fold::budget::Geometry;
use tokenfold_fold::unified::{Operator, Signal, Source, Tau};
use tokenfold_fold::{DART_PIVOTS, Plan, Stage};
use tokenfold_model::NativeModel;
use tokenfold_model::ops::cross_entropy_rows;
use tokenfold_model::optim::{AdamW, AdamWConfig};

use crate::error::{Result, SearchError};
use crate::relax::{SoftHook, kl_rows, template_plan};
use crate::seed::{Refined, Score, Seed, Selection, refine_schedule, seeds};
use crate::space::{LayerParams, SearchSpace, SpaceInit};

/// Settings of one search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    /// FLOPs-equivalent visual-token share the plan may not exceed, in (0, 1].
    pub budget: f64,
    /// Optional cap on the analytical prefill FLOPs relative to the full model.
    pub max_flops: Option<f64>,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Weight of the KL term to the unreduced model.
    pub align: f64,
    /// Penalty μ of the augmented Lagrangian.
    pub mu: f64,
    /// Share of the steps with expected (not yet fixed) layer activations.
    pub explore: f64,
    /// Mask temperature at the first and the last step.
    pub temperature: (f64, f64),
    pub init: SpaceInit,
    /// Also start from the best hand-designed seed and emit the best plan on held-out batches.
    #[serde(default)]
    pub seeds: bool,
    /// Steps of the seeded search.
    #[serde(default)]
    pub seed_steps: usize,
    /// Held-out training-split batches that rank the seeds and the plans.
    #[serde(default)]
    pub selection_batches: usize,
    /// Rounds of the schedule hill-climb from the best seed (0: the seed's own schedule).
    #[serde(default)]
    pub schedule_rounds: usize,
}

impl SearchConfig {
    pub fn new(budget: f64) -> SearchConfig {
        SearchConfig {
            budget,
            max_flops: None,
            steps: 300,
            batch_size: 16,
            lr: 0.05,
            align: 1.0,
            mu: 20.0,
            explore: 0.5,
            temperature: (0.5, 0.05),
            init: SpaceInit::default(),
            seeds: true,
            seed_steps: 150,
            selection_batches: 128,
            schedule_rounds: 3,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, value: String| {
            Err(SearchError::Config(format!(
                "{field} {value} is out of range"
            )))
        };
        if !(self.budget > 0.0 && self.budget <= 1.0) {
            return bad("budget", self.budget.to_string());
        }
        if let Some(f) = self.max_flops
            && !(f > 0.0 && f <= 1.0)
        {
            return bad("max_flops", f.to_string());
        }
        if self.steps == 0 {
            return bad("steps", "0".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "0".into());
        }
        if self.seeds && self.selection_batches == 0 {
            return bad("selection_batches", "0".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", self.lr.to_string());
        }
        if !(self.align >= 0.0 && self.align.is_finite()) {
            return bad("align", self.align.to_string());
        }
        if !(self.mu > 0.0 && self.mu.is_finite()) {
            return bad("mu", self.mu.to_string());
        }
        if !(0.0..=1.0).contains(&self.explore) {
            return bad("explore", self.explore.to_string());
        }
        let (t0, t1) = self.temperature;
        if !(t0 > 0.0 && t1 > 0.0 && t0.is_finite() && t1.is_finite()) {
            return bad("temperature", format!("({t0}, {t1})"));
        }
        Ok(())
    }
}

/// One step of the trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub task_loss: f64,
    pub kl: f64,
    /// Expected FLOPs-equivalent visual-token share, and prefill-FLOPs share.
    pub share: f64,
    pub flops_share: f64,
    /// Multipliers of the budget and FLOPs constraints.
    pub lambda_budget: f64,
    pub lambda_flops: f64,
    pub temperature: f64,
    /// The budget projection's shift of the keep logits (0: the budget is not binding).
    pub shift: f64,
    /// Every layer's parameters, keep ratios with the shift applied.
    pub layers: Vec<LayerParams>,
}

/// What a search did and found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchReport {
    pub config: SearchConfig,
    pub trajectory: Vec<StepRecord>,
    /// Layer activations fixed after the exploration phase.
    pub active: Vec<bool>,
    /// The search from the best seed, if seeds were on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeded: Option<SeededRun>,
    /// Every plan considered (the searched ones and the seeds) with its loss on the selection batches.
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    /// Every schedule the hill-climb from the best seed scored, in order (the seed's own first).
    #[serde(default)]
    pub schedules: Vec<ScoredSchedule>,
    /// The name of the plan emitted.
    #[serde(default)]
    pub chosen: String,
    pub plan: Plan,
    /// The plan's FLOPs-equivalent share (≤ the budget).
    pub plan_share: f64,
    pub wall_seconds: f64,
    /// Forward passes (the full model's and the relaxed model's) and backward passes.
    pub forward_passes: usize,
    pub backward_passes: usize,
}

/// The search from a seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeededRun {
    /// The hand-designed method it started from.
    pub seed: String,
    pub trajectory: Vec<StepRecord>,
    pub active: Vec<bool>,
    pub plan: Plan,
}

/// A schedule of the best seed's operator and its result on the selection batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredSchedule {
    /// Visual tokens through each layer.
    pub counts: Vec<usize>,
    pub selection_loss: f64,
    pub selection_accuracy: f64,
}

/// A plan considered for emission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub name: String,
    /// The search objective on the selection batches, the plan run as a hard plan.
    pub selection_loss: f64,
    /// Exact-match accuracy (teacher-forced: every answer token is the argmax) on the same batches.
    pub selection_accuracy: f64,
    pub plan_share: f64,
    pub plan: Plan,
}

/// Each sample's last prompt token: where the signals that read the prompt take their query (the
/// answers follow it in a training batch).
pub(crate) fn prompt_ends(batch: &Batch) -> Vec<u32> {
    batch
        .prompt_lens
        .iter()
        .map(|&p| p.saturating_sub(1) as u32)
        .collect()
}

/// Answer-token loss terms of one batch: the per-sample-mean cross-entropy and KL to `reference`.
pub(crate) fn answer_terms(
    logits: &Tensor,
    reference: &Tensor,
    targets: &Tensor,
    samples: &[usize],
    batch: usize,
    align: f64,
) -> CandleResult<(Tensor, Tensor)> {
    let n = samples.len();
    let mut counts = vec![0usize; batch];
    samples.iter().for_each(|&s| counts[s] += 1);
    let present = counts.iter().filter(|&&c| c > 0).count().max(1);
    // Each sample's mean over its targets, averaged over samples (as the training loss).
    let weights: Vec<f32> = samples
        .iter()
        .map(|&s| 1.0 / (counts[s] as f32 * present as f32))
        .collect();
    let weights = Tensor::from_vec(weights, n, logits.device())?;
    let ce = (cross_entropy_rows(logits, targets)? * &weights)?.sum_all()?;
    let kl = if align > 0.0 {
        (kl_rows(reference, logits)? * &weights)?.sum_all()?
    } else {
        Tensor::new(0f32, logits.device())?
    };
    Ok((ce, kl))
}

/// (max(0, λ + μ·g)² − λ²)/(2μ) for a scalar tensor g.
fn lagrangian(g: &Tensor, lambda: f64, mu: f64) -> CandleResult<Tensor> {
    (g.affine(mu, lambda)?.relu()?.sqr()? - lambda * lambda)? / (2.0 * mu)
}

/// The expected token share and the prefill-FLOPs share of one relaxed forward pass.
fn budget_terms(model: &NativeModel, hook: &SoftHook) -> CandleResult<(Tensor, Tensor)> {
    let device = model.device();
    let image: Vec<usize> = (0..hook.visual_tokens.len())
        .filter(|&s| hook.visual_tokens[s] > 0.0)
        .collect();
    if image.is_empty() {
        candle_core::bail!("the search batch has no image sample");
    }
    let mask: Vec<f32> = hook
        .visual_tokens
        .iter()
        .map(|&n| if n > 0.0 { 1.0 } else { 0.0 })
        .collect();
    let inv_n0: Vec<f32> = hook
        .visual_tokens
        .iter()
        .map(|&n| if n > 0.0 { 1.0 / n } else { 0.0 })
        .collect();
    let b = mask.len();
    let mask = Tensor::from_vec(mask, b, device)?;
    let inv_n0 = Tensor::from_vec(inv_n0, b, device)?;
    let text = Tensor::from_vec(hook.text_tokens.clone(), b, device)?;
    let n0 = Tensor::from_vec(hook.visual_tokens.clone(), b, device)?;
    let layers = hook.entering.len() as f64;
    let (d, ff) = (model.config.d_model as f64, model.config.d_ff as f64);
    let linear = 2.0 * (4.0 * d * d + 3.0 * d * ff);
    let flops = |t: &Tensor| -> CandleResult<Tensor> {
        ((t * linear)? + (t.sqr()? * (4.0 * d))?)?
            .mul(&mask)?
            .sum_all()
    };
    let mut share = Tensor::new(0f32, device)?;
    let mut spent = Tensor::new(0f32, device)?;
    for entering in &hook.entering {
        share = (share + (entering * &inv_n0)?.sum_all()?)?;
        spent = (spent + flops(&(&text + entering)?)?)?;
    }
    let share = (share / (layers * image.len() as f64))?;
    let full = (flops(&(&text + &n0)?)? * layers)?;
    Ok((share, spent.div(&full)?))
}

/// The budget projection: the shift β added to every keep logit so that the expected token share
/// ([`SearchSpace::expected_share`]) does not exceed `budget` (one-sided: β ≤ 0, and β = 0, a constant,
/// when the share is already within the budget) or, with `exact`, equals it. Otherwise β solves share(β) = budget by bisection and carries the implicit
/// gradient −(∂share/∂θ)/(∂share/∂β) in every search variable θ (a correction term whose value is 0). If
/// no β reaches the budget (activations too low), β is the bisection's floor and the augmented Lagrangian
/// term pushes the activations up. Returns β and its value.
pub fn budget_shift(
    space: &SearchSpace,
    active: Option<&[bool]>,
    budget: f64,
    exact: bool,
) -> CandleResult<(Tensor, f64)> {
    let device = space.keep.device();
    let dtype = space.keep.dtype();
    let constant = |v: f64| Tensor::new(v, device)?.to_dtype(dtype);
    let share_at = |beta: f64| -> CandleResult<f64> {
        space
            .expected_share(&constant(beta)?, active)?
            .detach()
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()
    };
    const FLOOR: f64 = -40.0;
    let ceiling = if exact { 40.0 } else { 0.0 };
    if share_at(ceiling)? <= budget {
        return Ok((constant(ceiling)?, ceiling));
    }
    if share_at(FLOOR)? > budget {
        return Ok((constant(FLOOR)?, FLOOR));
    }
    let (mut lo, mut hi) = (FLOOR, ceiling);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if share_at(mid)? > budget {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let beta = lo;
    let h = 1e-4;
    let slope = (share_at(beta + h)? - share_at(beta - h)?) / (2.0 * h);
    if slope <= 0.0 || !slope.is_finite() {
        return Ok((constant(beta)?, beta));
    }
    let share = space.expected_share(&constant(beta)?, active)?;
    let correction = ((&share - share.detach())? / -slope)?;
    Ok(((correction + beta)?, beta))
}

/// The discrete plan from the searched parameters: `active` layers as unified stages, keep shares scaled
/// to the largest counts within `budget`. If even one token per stage exceeds the budget, the first stage
/// moves earlier until it fits.
pub fn discretise(
    layers: &[LayerParams],
    active: &[bool],
    budget: f64,
    geometry: Geometry,
    name: &str,
) -> Result<Plan> {
    let n0 = geometry.n0();
    let mut active: Vec<usize> = (0..layers.len()).filter(|&l| active[l]).collect();
    if active.is_empty() {
        return Err(SearchError::Config(
            "no active layer to build a plan from".into(),
        ));
    }
    let operator = |p: &LayerParams| Operator {
        signals: p
            .weights
            .iter()
            .filter(|(_, w)| **w >= 0.005)
            .map(|(&s, &w)| (s, (w * 1000.0).round() / 1000.0))
            .collect(),
        source: Source::Previous,
        gamma: (p.gamma * 1000.0).round() / 1000.0,
        tau: Tau(p.tau),
        eta: p.eta,
        rho: p.rho,
        // κ below 10⁻³ (λ above ~30 cells) is no spatial term on our grids.
        locality: (p.locality >= 1e-3).then(|| 1.0 / p.locality.sqrt()),
        window: None,
        candidates: Default::default(),
        // Only the duplication signal reads the pivots; the default stays implicit.
        pivots: (p.pivots != DART_PIVOTS
            && p.weights
                .get(&Signal::Duplication)
                .is_some_and(|&w| w >= 0.005))
        .then_some(p.pivots),
    };
    loop {
        // Cumulative keep shares of the active layers.
        let mut share = 1.0;
        let shares: Vec<f64> = active
            .iter()
            .map(|&l| {
                share *= layers[l].keep;
                share
            })
            .collect();
        let build = |scale: f64| -> Plan {
            let mut previous = n0;
            let mut stages = Vec::new();
            for (&l, &s) in active.iter().zip(&shares) {
                let count = ((s * scale * n0 as f64).round() as usize).clamp(1, previous);
                if count < previous {
                    stages.push(Stage::unified(
                        l,
                        count as f64 / n0 as f64,
                        operator(&layers[l]),
                    ));
                    previous = count;
                }
            }
            Plan {
                name: name.to_string(),
                proportional_attention: true,
                stages,
            }
        };
        let max_scale = 1.0
            / shares
                .iter()
                .cloned()
                .fold(f64::INFINITY, f64::min)
                .max(1e-9);
        let fits = |plan: &Plan| {
            !plan.stages.is_empty()
                && plan.equivalent_share(geometry.n_layers, n0, geometry.grid) <= budget + 1e-12
        };
        // Counts grow with the scale, so the largest feasible scale is found by bisection.
        if fits(&build(max_scale)) {
            return Ok(build(max_scale));
        }
        if fits(&build(1e-12)) {
            let (mut lo, mut hi) = (1e-12, max_scale);
            for _ in 0..100 {
                let mid = 0.5 * (lo + hi);
                if fits(&build(mid)) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            // Rounding leaves budget unused: add tokens one at a time, to the stage furthest below its
            // searched proportion, while the plan still fits and counts stay non-increasing.
            let mut plan = build(lo);
            let ideal: HashMap<usize, f64> = active
                .iter()
                .zip(&shares)
                .map(|(&l, &s)| (l, s * lo * n0 as f64))
                .collect();
            let count = |stage: &Stage| (stage.keep.unwrap_or(1.0) * n0 as f64).round();
            loop {
                let mut best: Option<(f64, usize)> = None;
                for i in 0..plan.stages.len() {
                    let ceiling = if i == 0 {
                        n0 as f64
                    } else {
                        count(&plan.stages[i - 1])
                    };
                    let next = count(&plan.stages[i]) + 1.0;
                    if next > ceiling {
                        continue;
                    }
                    let mut trial = plan.clone();
                    trial.stages[i].keep = Some(next / n0 as f64);
                    if !fits(&trial) {
                        continue;
                    }
                    let ratio = count(&plan.stages[i]) / ideal[&plan.stages[i].layer].max(1e-9);
                    if best.is_none_or(|(r, _)| ratio < r) {
                        best = Some((ratio, i));
                    }
                }
                let Some((_, i)) = best else { break };
                let next = count(&plan.stages[i]) + 1.0;
                plan.stages[i].keep = Some(next / n0 as f64);
            }
            // A stage that now keeps as many as the one before it does nothing.
            let mut previous = n0 as f64;
            plan.stages.retain(|st| {
                let c = count(st);
                let keep = c < previous;
                previous = c;
                keep
            });
            return Ok(plan);
        }
        if active[0] == 0 {
            return Err(SearchError::Config(format!(
                "no plan on layers {active:?} meets a budget of {:.2}%",
                100.0 * budget
            )));
        }
        active[0] -= 1;
        active.dedup();
    }
}

/// Searches a plan for `model` (frozen inside) on the batches `batches(i)` gives (a training split):
/// the search from the neutral start over `steps`; with `seeds`, the selection batches (indices from
/// `steps` on) rank the seeds, the search runs again from the best one over `seed_steps`, and the plan
/// emitted is the best of the searched plans and the seeds on the selection batches.
pub fn search(
    model: &NativeModel,
    config: &SearchConfig,
    mut batches: impl FnMut(usize) -> Result<Batch>,
    mut progress: impl FnMut(&StepRecord),
) -> Result<SearchReport> {
    config.validate()?;
    let started = Instant::now();
    let frozen = model.frozen()?;
    let geometry = Geometry::of(&model.config);
    let n_layers = model.n_layers();
    let mut passes = Passes::default();
    let space = SearchSpace::new(n_layers, &config.init, model.device())?;
    let explore_steps = ((config.steps as f64) * config.explore).round() as usize;
    let neutral = optimise(
        &frozen,
        &space,
        config,
        None,
        config.steps,
        explore_steps,
        (config.temperature.0, config.temperature.1),
        &mut batches,
        &mut progress,
        &mut passes,
    )?;
    let name = format!("searched-{:.1}%", 100.0 * config.budget);
    let plan = discretise(
        &neutral.layers,
        &neutral.active,
        config.budget,
        geometry,
        &name,
    )?;
    let mut candidates = Vec::new();
    let mut schedules = Vec::new();
    let mut seeded = None;
    let mut chosen_plan = plan.clone();
    let mut chosen = name.clone();
    if config.seeds {
        let selection_batches = (0..config.selection_batches)
            .map(|i| batches(config.steps + i))
            .collect::<Result<Vec<_>>>()?;
        let selection = Selection::new(&frozen, selection_batches, config.align)?;
        let mut scored = vec![(name.clone(), plan.clone(), selection.score(&frozen, &plan)?)];
        let mut best_seed: Option<(Seed, Score)> = None;
        for seed in seeds(config.budget, geometry) {
            let score = selection.score(&frozen, &seed.plan)?;
            scored.push((seed.plan.name.clone(), seed.plan.clone(), score));
            if best_seed
                .as_ref()
                .is_none_or(|(_, best)| score.better_than(best))
            {
                best_seed = Some((seed, score));
            }
        }
        if let Some((seed, score)) = best_seed {
            let Refined { seed, score, tried } = refine_schedule(
                &frozen,
                &selection,
                &seed,
                score,
                config.budget,
                geometry,
                config.schedule_rounds,
            )?;
            schedules = tried;
            if seed.schedule.is_some() {
                scored.push((seed.plan.name.clone(), seed.plan.clone(), score));
            }
            let space = SearchSpace::from_layers(&thaw(&seed.layers), model.device())?;
            // The seeded search tunes the seed's layers as they will run: the second phase of the
            // neutral search, with its half of the temperature schedule.
            let middle = (config.temperature.0 * config.temperature.1).sqrt();
            let run = optimise(
                &frozen,
                &space,
                config,
                Some(seed.active.clone()),
                config.seed_steps,
                0,
                (middle, config.temperature.1),
                &mut batches,
                &mut progress,
                &mut passes,
            )?;
            let seeded_name = format!("{name}-from-{}", seed.label());
            let plan = discretise(
                &run.layers,
                &run.active,
                config.budget,
                geometry,
                &seeded_name,
            )?;
            scored.push((seeded_name, plan.clone(), selection.score(&frozen, &plan)?));
            seeded = Some(SeededRun {
                seed: seed.label(),
                trajectory: run.trajectory,
                active: run.active,
                plan,
            });
        }
        passes.forwards += selection.forward_passes();
        let mut best = 0;
        for (i, (_, _, score)) in scored.iter().enumerate() {
            if score.better_than(&scored[best].2) {
                best = i;
            }
        }
        chosen = scored[best].0.clone();
        chosen_plan = scored[best].1.clone();
        candidates = scored
            .into_iter()
            .map(|(name, plan, score)| Candidate {
                plan_share: plan.equivalent_share(n_layers, geometry.n0(), geometry.grid),
                name,
                selection_loss: score.objective,
                selection_accuracy: score.accuracy,
                plan,
            })
            .collect();
    }
    chosen_plan.validate(n_layers)?;
    let plan_share = chosen_plan.equivalent_share(n_layers, geometry.n0(), geometry.grid);
    Ok(SearchReport {
        config: config.clone(),
        trajectory: neutral.trajectory,
        active: neutral.active,
        seeded,
        candidates,
        schedules,
        chosen,
        plan: chosen_plan,
        plan_share,
        wall_seconds: started.elapsed().as_secs_f64(),
        forward_passes: passes.forwards,
        backward_passes: passes.backwards,
    })
}

/// The least a seeded search starts with of the transfer strength and of each signal weight.
pub const THAW: f64 = 0.02;

/// A seed's parameters moved off the edges of their maps, where the search could not move them: a
/// pruning seed's γ = 0 is sigmoid(−∞) (its variable, clamped at logit(10⁻⁶), has a gradient of order
/// 10⁻⁶ and would take hundreds of steps to free), and so are the signal weights it does not use. At
/// least [`THAW`] of γ (τ and η then at the neutral start's) and of each signal weight. The seed's own
/// signal keeps 0.9 of the weight, so it still decides the kept set at the start: DART's binary signal
/// has a z-score gap of about 3 at small budgets, and the five others add at most 5 × 0.018 × 3.
pub fn thaw(layers: &[LayerParams]) -> Vec<LayerParams> {
    let neutral = SpaceInit::default();
    layers
        .iter()
        .map(|p| {
            let mut p = p.clone();
            if p.gamma < THAW {
                p.gamma = THAW;
                p.tau = neutral.tau;
                p.eta = neutral.eta;
            }
            let floor: BTreeMap<Signal, f64> =
                p.weights.iter().map(|(&s, &w)| (s, w.max(THAW))).collect();
            let total: f64 = floor.values().sum();
            p.weights = floor.into_iter().map(|(s, w)| (s, w / total)).collect();
            p
        })
        .collect()
}

#[derive(Default)]
struct Passes {
    forwards: usize,
    backwards: usize,
}

/// What one optimisation run ends with.
struct Run {
    trajectory: Vec<StepRecord>,
    active: Vec<bool>,
    /// The parameters at the end, keep ratios at the exact budget shift for `active`.
    layers: Vec<LayerParams>,
}

/// `steps` steps of the search on `space`: activations fixed to `active`, or expected for the first
/// `explore_steps` and then fixed to a > ½; the mask temperature anneals geometrically over `temperature`.
#[allow(clippy::too_many_arguments)]
fn optimise(
    frozen: &NativeModel,
    space: &SearchSpace,
    config: &SearchConfig,
    mut active: Option<Vec<bool>>,
    steps: usize,
    explore_steps: usize,
    temperature: (f64, f64),
    batches: &mut impl FnMut(usize) -> Result<Batch>,
    progress: &mut impl FnMut(&StepRecord),
    passes: &mut Passes,
) -> Result<Run> {
    let mut optimizer = AdamW::new(
        space.vars(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let template = template_plan();
    let (mut lambda_budget, mut lambda_flops) = (0.0f64, 0.0f64);
    let mut trajectory = Vec::with_capacity(steps);
    for step in 0..steps {
        if step == explore_steps && active.is_none() {
            active = Some(choose_active(&space.snapshot(0.0)?));
        }
        // Exploring, the budget is a one-sided constraint; once the layers are fixed, the keep ratios are
        // tuned at the share the plan will run at (the discrete plan fills the budget).
        let (shift, shift_value) =
            budget_shift(space, active.as_deref(), config.budget, active.is_some())?;
        let progress_share = step as f64 / (steps.max(2) - 1) as f64;
        let temperature = temperature.0 * (temperature.1 / temperature.0).powf(progress_share);
        let batch = batches(step)?;
        let (reference, targets, samples) =
            frozen.target_logits(&batch, &mut tokenfold_model::NoHook)?;
        let mut hook = SoftHook::new(frozen, space, &template, prompt_ends(&batch));
        hook.temperature = temperature;
        hook.activation = active.clone();
        hook.shift = Some(shift);
        let (logits, _, _) = frozen.target_logits(&batch, &mut hook)?;
        passes.forwards += 2;
        let (ce, kl) = answer_terms(
            &logits,
            &reference.detach(),
            &targets,
            &samples,
            batch.batch_size,
            config.align,
        )?;
        let (share, flops_share) = budget_terms(frozen, &hook)?;
        let g_budget = (&share - config.budget)?;
        let mut loss =
            ((&ce + (&kl * config.align)?)? + lagrangian(&g_budget, lambda_budget, config.mu)?)?;
        if let Some(cap) = config.max_flops {
            let g_flops = (&flops_share - cap)?;
            loss = (loss + lagrangian(&g_flops, lambda_flops, config.mu)?)?;
        }
        let grads = loss.backward()?;
        passes.backwards += 1;
        let named: HashMap<String, Tensor> = space
            .vars()
            .into_iter()
            .filter_map(|(name, var)| grads.get(var.as_tensor()).map(|g| (name, g.clone())))
            .collect();
        optimizer.step(&named, config.lr)?;
        let value = |t: &Tensor| -> CandleResult<f64> { Ok(t.to_scalar::<f32>()? as f64) };
        let (share_v, flops_v) = (value(&share)?, value(&flops_share)?);
        lambda_budget = (lambda_budget + config.mu * (share_v - config.budget)).max(0.0);
        if let Some(cap) = config.max_flops {
            lambda_flops = (lambda_flops + config.mu * (flops_v - cap)).max(0.0);
        }
        let record = StepRecord {
            step,
            task_loss: value(&ce)?,
            kl: value(&kl)?,
            share: share_v,
            flops_share: flops_v,
            lambda_budget,
            lambda_flops,
            temperature,
            shift: shift_value,
            layers: space.snapshot(shift_value)?,
        };
        progress(&record);
        trajectory.push(record);
    }
    let active = match active {
        Some(active) => active,
        None => choose_active(&space.snapshot(0.0)?),
    };
    let (_, shift) = budget_shift(space, Some(&active), config.budget, true)?;
    Ok(Run {
        trajectory,
        active,
        layers: space.snapshot(shift)?,
    })
}

/// Layers with activation above ½; the most active one if none is.
pub fn choose_active(layers: &[LayerParams]) -> Vec<bool> {
    let mut active: Vec<bool> = layers.iter().map(|p| p.activation > 0.5).collect();
    if !active.iter().any(|&a| a)
        && let Some((best, _)) = layers
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.activation.total_cmp(&b.1.activation))
    {
        active[best] = true;
    }
    active
}
