//! Evaluating a plan: accuracy on the evaluation sets, the budget figures (planned and measured), the
//! analytical prefill FLOPs and the measured prefill latency; and the comparison table of many plans.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use tokenfold_data::sequence::{SequenceConfig, encode_prompt};
use tokenfold_data::{Assets, EvalSpec, Task, TextTokenizer};
use tokenfold_model::eval::{SetResult, evaluate_with, mean_accuracy, prompt_inputs};
use tokenfold_model::panels::PackedWeight;
use tokenfold_model::{KvCache, NativeModel, NoHook};

use crate::budget::{Geometry, prefill_flops};
use crate::error::Result;
use crate::hook::{FoldHook, Trace};
use crate::plan::Plan;

/// Budget figures of a plan, as the plan prescribes and as measured on the evaluated samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetFigures {
    /// Visual tokens of an image before reduction.
    pub visual_tokens: usize,
    /// Mean visual tokens entering each layer (measured).
    pub entering: Vec<f64>,
    /// Mean visual tokens entering the first layer (measured).
    pub first_layer: f64,
    /// Σ_ℓ n_ℓ / L over n₀: prescribed by the plan, and measured.
    pub planned_share: f64,
    pub measured_share: f64,
    /// Analytical prefill FLOPs relative to the full model on the same prompts.
    pub flops_share: f64,
}

/// Prefill latency on one batch, fastest of repeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub batch: usize,
    pub full_ms: f64,
    pub plan_ms: f64,
    /// Time in reduction per plan prefill: signals, operators, and the layer-0 bookkeeping every plan
    /// needs (see [`Trace::overhead`]).
    pub overhead_ms: f64,
    /// The fastest planned prefill run right after a full one (the first of each block, see
    /// [`measure_latency`]): the full prefill leaves part of the weights out of the caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_after_full_ms: Option<f64>,
    /// The speed-up the decoder's analytical prefill FLOPs predict for this batch: full over planned.
    #[serde(default)]
    pub predicted_speedup: f64,
    /// The same prediction from the rows a padded batch computes (each sample padded to the longest in
    /// the batch, before and after reduction): the speed-up the FLOPs allow that layout. An inference
    /// model packs its rows instead (`NativeModel::forward`), and computes no padding.
    #[serde(default)]
    pub predicted_speedup_padded: f64,
    /// FLOPs of the stages' own projections per prefill ([`Trace::signal_projections`] × 2·d²): the
    /// work of a plan's signals that the layers' FLOPs, and so [`Latency::predicted_speedup`], leave out.
    #[serde(default)]
    pub signal_flops: f64,
    /// The planned prefill's FLOPs in the layers (the prediction's denominator).
    #[serde(default)]
    pub plan_flops: f64,
    /// The rows each decoder layer computes in the full and in the planned prefill (real rows when the
    /// model packs them, padded batches otherwise): what [`matmul_ms`] times.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub full_rows: Vec<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan_rows: Vec<usize>,
    /// The prompts' lengths and image spans (what a reference implementation needs to time the same
    /// prefill).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lengths: Vec<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_starts: Vec<Option<usize>>,
}

impl Latency {
    pub fn speedup(&self) -> f64 {
        self.full_ms / self.plan_ms.max(1e-9)
    }
    /// The speed-up of the planned prefill right after a full one ([`Latency::plan_after_full_ms`]).
    pub fn speedup_after_full(&self) -> Option<f64> {
        self.plan_after_full_ms
            .map(|ms| self.full_ms / ms.max(1e-9))
    }
    /// The measured speed-up as a share of the one the FLOPs predict.
    pub fn speedup_efficiency(&self) -> f64 {
        self.speedup() / self.predicted_speedup.max(1e-9)
    }
    /// The speed-up the FLOPs predict when the plan's cost counts its stages' own projections too
    /// ([`Latency::signal_flops`]).
    pub fn predicted_speedup_with_signals(&self) -> f64 {
        if self.signal_flops <= 0.0 || self.plan_flops <= 0.0 {
            // Nothing to add, or a report written before the FLOPs were kept.
            return self.predicted_speedup;
        }
        self.predicted_speedup * self.plan_flops / (self.plan_flops + self.signal_flops)
    }
    pub fn overhead_share(&self) -> f64 {
        self.overhead_ms / self.plan_ms.max(1e-9)
    }
    /// Rows through the decoder, full over planned: the speed-up the projection matmuls' FLOPs predict
    /// (they are proportional to the rows).
    pub fn row_ratio(&self) -> f64 {
        self.full_rows.iter().sum::<usize>() as f64
            / (self.plan_rows.iter().sum::<usize>() as f64).max(1e-9)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    pub plan: Plan,
    pub sets: Vec<SetResult>,
    pub mean_accuracy: f64,
    pub budget: BudgetFigures,
    pub latency: Option<Latency>,
}

/// Budget figures from a trace of the plan over some prompts.
pub fn budget_figures(model: &NativeModel, plan: &Plan, trace: &Trace) -> BudgetFigures {
    let g = Geometry::of(&model.config);
    let entering = trace.mean_entering();
    let layers = model.n_layers();
    let tokens: Vec<f64> = trace.entering_all.iter().map(|&t| t as f64).collect();
    let full_tokens = vec![trace.prompt_tokens as f64; layers];
    let full_sq = vec![trace.prompt_tokens_sq; layers];
    let full = prefill_flops(&model.config, &full_tokens, &full_sq);
    BudgetFigures {
        visual_tokens: g.n0(),
        first_layer: entering.first().copied().unwrap_or(0.0),
        entering,
        planned_share: plan.equivalent_share(layers, g.n0(), g.grid),
        measured_share: trace.equivalent_share(),
        flops_share: if trace.samples == 0 {
            1.0
        } else {
            prefill_flops(&model.config, &tokens, &trace.entering_all_sq) / full
        },
    }
}

/// Evaluates `plan` on `n` samples of each set: accuracy and measured budget.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_plan(
    model: &NativeModel,
    tokenizer: &TextTokenizer,
    assets: &Assets,
    seq: &SequenceConfig,
    specs: &[EvalSpec],
    n: usize,
    batch_size: usize,
    plan: &Plan,
) -> Result<PlanReport> {
    plan.validate(model.n_layers())?;
    let mut hook = FoldHook::new(model, plan);
    let sets = evaluate_with(
        model, tokenizer, assets, seq, specs, n, batch_size, &mut hook,
    )?;
    let budget = budget_figures(model, plan, &hook.trace);
    Ok(PlanReport {
        plan: plan.clone(),
        mean_accuracy: mean_accuracy(&sets),
        sets,
        budget,
        latency: None,
    })
}

/// Runs of one prefill in a row when [`measure_latency`] alternates the full and the planned one.
pub const LATENCY_BLOCK: usize = 5;

/// Prefill latency of one batch of `batch` image prompts (drawn from the image-task sets), full model and
/// with `plan`: the fastest of `repeats` timed runs after one warm-up each (the minimum is the least
/// disturbed by other work on the machine), the two alternating in blocks of [`LATENCY_BLOCK`] runs.
pub fn measure_latency(
    model: &NativeModel,
    tokenizer: &TextTokenizer,
    assets: &Assets,
    seq: &SequenceConfig,
    plan: &Plan,
    batch: usize,
    repeats: usize,
) -> Result<Latency> {
    let specs: Vec<EvalSpec> = EvalSpec::all(tokenfold_data::Split::Test)
        .into_iter()
        .filter(|s| s.task != Task::Text)
        .collect();
    let per_set = batch.div_ceil(specs.len());
    let prompts = specs
        .iter()
        .flat_map(|s| s.build(assets, per_set))
        .take(batch)
        .map(|s| encode_prompt(s.image.as_ref(), &s.question, tokenizer, seq))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let inputs = prompt_inputs(&prompts, tokenizer.special.pad, seq, model.device())?;
    let full = || -> Result<()> {
        model.prefill(&inputs, &mut NoHook, &mut KvCache::default())?;
        Ok(())
    };
    let mut trace = None;
    let mut planned = || -> Result<Duration> {
        let mut hook = FoldHook::new(model, plan);
        model.prefill(&inputs, &mut hook, &mut KvCache::default())?;
        let overhead = hook.trace.overhead;
        trace = Some(hook.trace);
        Ok(overhead)
    };
    // The full and the planned prefill alternate, after one warm-up each, and the fastest run of each is
    // reported (the plan's with its own reduction time): this machine's speed drifts by a fifth over
    // seconds, and timing all of one before the other put that drift into the speed-up. They alternate
    // in blocks of LATENCY_BLOCK runs, not run by run: a planned prefill right after a full one finds
    // part of its weights pushed out of the caches by the full one's larger activations, and at batch 1
    // it ran 10% slower than after another planned one, while the full prefill was as fast after a
    // planned one as after a full one (docs/performance.md). The fastest run of a block is the speed each
    // keeps when it runs on its own; the first planned run of each block is kept apart.
    full()?;
    planned()?;
    let (mut full_ms, mut plan_ms, mut overhead_ms) = (f64::INFINITY, f64::INFINITY, 0.0);
    let mut after_full_ms = f64::INFINITY;
    let repeats = repeats.max(1);
    let mut timed = 0;
    while timed < repeats {
        let runs = LATENCY_BLOCK.min(repeats - timed);
        for _ in 0..runs {
            let started = Instant::now();
            full()?;
            full_ms = full_ms.min(started.elapsed().as_secs_f64() * 1e3);
        }
        for run in 0..runs {
            let started = Instant::now();
            let overhead = planned()?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            if run == 0 {
                after_full_ms = after_full_ms.min(ms);
            }
            if ms < plan_ms {
                (plan_ms, overhead_ms) = (ms, overhead.as_secs_f64() * 1e3);
            }
        }
        timed += runs;
    }
    let trace = trace.expect("the plan ran at least once");
    let layers = model.n_layers();
    let full_flops = prefill_flops(
        &model.config,
        &vec![trace.prompt_tokens as f64; layers],
        &vec![trace.prompt_tokens_sq; layers],
    );
    let entering: Vec<f64> = trace.entering_all.iter().map(|&t| t as f64).collect();
    let plan_flops = prefill_flops(&model.config, &entering, &trace.entering_all_sq);
    let padded = inputs.tokens.dim(1)? * trace.samples as usize;
    let full_computed = prefill_flops(
        &model.config,
        &vec![padded as f64; layers],
        &vec![(padded * inputs.tokens.dim(1)?) as f64; layers],
    );
    let computed: Vec<f64> = trace.computed_rows.iter().map(|&t| t as f64).collect();
    let plan_computed = prefill_flops(&model.config, &computed, &trace.computed_rows_sq);
    // The rows each layer computes: the real ones when the model packs them, else padded batches.
    let (full_rows, plan_rows): (Vec<usize>, Vec<usize>) = if model.packs_rows() {
        (
            vec![trace.prompt_tokens as usize; layers],
            trace.entering_all.iter().map(|&t| t as usize).collect(),
        )
    } else {
        (
            vec![padded; layers],
            trace.computed_rows.iter().map(|&t| t as usize).collect(),
        )
    };
    Ok(Latency {
        batch: prompts.len(),
        full_ms,
        plan_ms,
        overhead_ms,
        plan_after_full_ms: Some(after_full_ms),
        predicted_speedup: full_flops / plan_flops.max(1e-9),
        predicted_speedup_padded: full_computed / plan_computed.max(1e-9),
        signal_flops: 2.0 * (model.config.d_model as f64).powi(2) * trace.signal_projections as f64,
        plan_flops,
        full_rows,
        plan_rows,
        lengths: inputs.lengths.clone(),
        image_starts: inputs.image_starts.clone(),
    })
}

/// The time (ms) of the decoder's projection matmuls alone ([`NativeModel::projection_shapes`]) with
/// `full_rows[ℓ]` rows entering layer ℓ, and with `plan_rows[ℓ]`: the fastest of `repeats` passes each,
/// alternating. Each layer has its own random f32 weights, so that the matmuls read as many weight bytes
/// as the model's, and they take the path a prepared model's projections take (panels for few rows,
/// gemm for many: [`tokenfold_model::panels`]). A matmul over few rows runs further from the machine's
/// peak than one over many (every weight is read whatever the rows), which the FLOPs do not see; the two
/// times show how much of the speed-up the rows predict the matmuls themselves keep. `None` for a
/// mixture-of-experts model.
pub fn matmul_ms(
    model: &NativeModel,
    full_rows: &[usize],
    plan_rows: &[usize],
    repeats: usize,
) -> Result<Option<(f64, f64)>> {
    let Some(shapes) = model.projection_shapes() else {
        return Ok(None);
    };
    let device = model.device();
    let weights = (0..full_rows.len().max(plan_rows.len()))
        .map(|_| {
            shapes
                .iter()
                .map(|&(i, o)| PackedWeight::new(&Tensor::randn(0f32, 1.0, (i, o), device)?))
                .collect::<candle_core::Result<Vec<_>>>()
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    // Per layer, the input of each projection: (rows, in).
    let inputs = |rows: &[usize]| -> candle_core::Result<Vec<Vec<Tensor>>> {
        rows.iter()
            .map(|&r| {
                shapes
                    .iter()
                    .map(|&(i, _)| Tensor::ones((r, i), DType::F32, device))
                    .collect()
            })
            .collect()
    };
    let (full_inputs, plan_inputs) = (inputs(full_rows)?, inputs(plan_rows)?);
    let pass = |inputs: &[Vec<Tensor>]| -> candle_core::Result<f64> {
        // As in a prefill, the pool's threads stay awake through the pass.
        let _awake = tokenfold_model::awake::Awake::new();
        let started = Instant::now();
        for (xs, layer) in inputs.iter().zip(&weights) {
            for (x, w) in xs.iter().zip(layer) {
                if x.dim(0)? > 0 {
                    w.matmul(x)?;
                }
            }
        }
        Ok(started.elapsed().as_secs_f64() * 1e3)
    };
    pass(&full_inputs)?;
    pass(&plan_inputs)?;
    let (mut full, mut plan) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..repeats.max(1) {
        full = full.min(pass(&full_inputs)?);
        plan = plan.min(pass(&plan_inputs)?);
    }
    Ok(Some((full, plan)))
}

/// The comparison table: one row per plan, per-set accuracy, the average, the average relative to the
/// full model, and the budget figures.
pub fn compare_markdown(reports: &[PlanReport]) -> String {
    let Some(first) = reports.first() else {
        return String::new();
    };
    let image_sets: Vec<&SetResult> = first.sets.iter().filter(|s| s.task != Task::Text).collect();
    let full = reports
        .iter()
        .find(|r| r.plan.stages.is_empty())
        .map(|r| r.mean_accuracy);
    let mut out = String::from("| plan | budget | tokens/layer | FLOPs |");
    for s in &image_sets {
        out.push_str(&format!(" {} |", short_set(&s.set)));
    }
    out.push_str(" average | relative | speed-up |\n|---|---:|---:|---:|");
    out.push_str(&"---:|".repeat(image_sets.len() + 3));
    out.push('\n');
    for r in reports {
        out.push_str(&format!(
            "| {} | {:.1}% | {:.1} | {:.1}% |",
            r.plan.name,
            100.0 * r.budget.measured_share,
            r.budget.measured_share * r.budget.visual_tokens as f64,
            100.0 * r.budget.flops_share
        ));
        for s in r.sets.iter().filter(|s| s.task != Task::Text) {
            out.push_str(&format!(" {:.1} |", 100.0 * s.accuracy));
        }
        let relative = full.map_or(String::new(), |f| {
            format!("{:.1}%", 100.0 * r.mean_accuracy / f.max(1e-9))
        });
        let speedup = r
            .latency
            .as_ref()
            .map_or(String::new(), |l| format!("{:.2}×", l.speedup()));
        out.push_str(&format!(
            " **{:.1}** | {relative} | {speedup} |\n",
            100.0 * r.mean_accuracy
        ));
    }
    out
}

fn short_set(set: &str) -> String {
    set.split('/').next().unwrap_or(set).to_string()
}
