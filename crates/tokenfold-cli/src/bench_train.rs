//! `tokenfold bench train`: how long one training step takes, where the time goes, and how close it
//! comes to the machine's matrix-multiply peak.
//!
//! The batches are drawn from the configuration's own data stream before any timing starts, so data
//! generation is not measured. Each timed step runs exactly what `tokenfold train` runs: the loss, the
//! backward pass, gradient clipping and the AdamW update.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde_json::{Value, json};
use tokenfold_data::{Batch, DataPaths, Loader, TextTokenizer};
use tokenfold_model::optim::{AdamW, clip_grad_norm, named_grads};
use tokenfold_model::train::{RunConfig, default_device, sorted_vars};
use tokenfold_model::{ModelConfig, NativeModel};
use tokenfold_scaling::flops::{self, AttentionWindow, SequenceShape, Workload};

#[derive(clap::Args)]
pub struct Options {
    /// A run configuration (as for `tokenfold train`).
    #[arg(long)]
    pub config: PathBuf,
    /// Timed steps, each on the next batch of the configuration's data stream.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (allocator and thread-pool warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Tokenizer file [default: <data>/tokenizer.json]
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Also write the figures, and the shape of every timed batch, as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A previous JSON report of this command: prints how this run compares.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
}

/// One timed step.
struct Step {
    forward_s: f64,
    backward_s: f64,
    optimizer_s: f64,
    loss: f64,
}

impl Step {
    fn total_s(&self) -> f64 {
        self.forward_s + self.backward_s + self.optimizer_s
    }
}

pub fn run(paths: &DataPaths, opts: &Options) -> Result<()> {
    if opts.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let config = RunConfig::load(&opts.config)?;
    config.validate()?;
    let assets = Arc::new(crate::model::checked_assets(paths, &config)?);
    let tokenizer_path = opts.tokenizer.clone().unwrap_or_else(|| paths.tokenizer());
    let tokenizer = TextTokenizer::load(&tokenizer_path)
        .with_context(|| format!("loading the tokenizer {}", tokenizer_path.display()))?;
    if tokenizer.vocab_size() != config.tokenizer.vocab_size {
        bail!(
            "{}: tokenizer.vocab_size is {}, but {} has {} tokens",
            opts.config.display(),
            config.tokenizer.vocab_size,
            tokenizer_path.display(),
            tokenizer.vocab_size()
        );
    }
    let device = default_device()?;
    let model_config = config.model_config(tokenizer.vocab_size())?;
    let model = NativeModel::new(model_config.clone(), config.train.seed, &device)?;
    let vars = sorted_vars(&model);
    let mut optimizer = AdamW::new(vars.clone(), config.train.adamw.clone())?;
    let t = &config.train;
    if t.grad_accum != 1 {
        println!(
            "note: train.grad_accum is {}; each timed step here is one micro-batch and one update",
            t.grad_accum
        );
    }

    let batches = draw_batches(&config, assets, tokenizer, opts.warmup + opts.steps)?;
    let threads = candle_core::utils::get_num_threads();
    println!(
        "{}: {} parameters, d_model {}, {} layers, {} heads, d_ff {}, batch {}, {threads} threads\n",
        opts.config.display(),
        model.parameter_count(),
        model_config.d_model,
        model_config.n_layers,
        model_config.n_heads,
        model_config.d_ff,
        t.batch_size
    );

    let gemm = gemm_peak(&device)?;
    let peak = gemm.iter().map(|g| g.1).fold(0f64, f64::max);
    println!("GEMM microbenchmark (square f32 matmul, best of repeated calls)\n");
    println!("| n | GFLOP/s |\n|---:|---:|");
    for (n, gflops) in &gemm {
        println!("| {n} | {:.1} |", gflops / 1e9);
    }

    let mut timed = Vec::with_capacity(opts.steps);
    for (i, batch) in batches.iter().enumerate() {
        let started = Instant::now();
        let loss = model.loss(batch)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        let forward_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let grads = loss.backward()?;
        let backward_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let mut named = named_grads(&vars, &grads);
        clip_grad_norm(&mut named, t.grad_clip)?;
        optimizer.step(&named, t.lr)?;
        let optimizer_s = started.elapsed().as_secs_f64();
        if i >= opts.warmup {
            timed.push(Step {
                forward_s,
                backward_s,
                optimizer_s,
                loss: loss_value,
            });
        }
    }
    let timed_batches = &batches[opts.warmup..];

    let total_s: f64 = timed.iter().map(Step::total_s).sum();
    let tokens: usize = timed_batches
        .iter()
        .map(|b| b.lengths.iter().sum::<usize>())
        .sum();
    let padded: usize = timed_batches.iter().map(|b| b.batch_size * b.seq_len).sum();
    let model_flops: f64 = timed_batches
        .iter()
        .map(|b| training_flops(&model_config, b, AttentionWindow::Masked, false))
        .sum();
    let executed_flops: f64 = timed_batches
        .iter()
        .map(|b| training_flops(&model_config, b, AttentionWindow::Full, true))
        .sum();
    let median = |phase: fn(&Step) -> f64| median(timed.iter().map(phase).collect());
    let (forward_ms, backward_ms, optimizer_ms, step_ms) = (
        1e3 * median(|s| s.forward_s),
        1e3 * median(|s| s.backward_s),
        1e3 * median(|s| s.optimizer_s),
        1e3 * median(Step::total_s),
    );
    let tokens_per_s = tokens as f64 / total_s;
    let achieved = model_flops / total_s;
    let mfu = achieved / peak;
    let hfu = executed_flops / total_s / peak;
    println!(
        "\n{} timed steps after {} warm-up steps (median per step)\n",
        opts.steps, opts.warmup
    );
    println!(
        "| forward ms | backward ms | optimizer ms | step ms | tokens/s | padding | model GFLOP/s | MFU | HFU |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    println!(
        "| {forward_ms:.1} | {backward_ms:.1} | {optimizer_ms:.1} | {step_ms:.1} | {tokens_per_s:.0} | {:.1}% | {:.2} | {:.1}% | {:.1}% |",
        100.0 * (1.0 - tokens as f64 / padded as f64),
        achieved / 1e9,
        100.0 * mfu,
        100.0 * hfu
    );
    println!(
        "\nMFU counts the model's useful FLOPs (masked attention pairs, real tokens); HFU what the step \
         executes (padding and every attention pair). Both are over the GEMM peak above."
    );

    let report = json!({
        "command": "bench train",
        "config": opts.config,
        "git_revision": tokenfold_scaling::sweep::git_revision(),
        "threads": threads,
        "model": model_config,
        "parameters": model.parameter_count(),
        "gemm": gemm.iter().map(|(n, f)| json!({"n": n, "flops_per_s": f})).collect::<Vec<_>>(),
        "peak_flops_per_s": peak,
        "warmup": opts.warmup,
        "median_ms": {"forward": forward_ms, "backward": backward_ms, "optimizer": optimizer_ms, "step": step_ms},
        "tokens_per_s": tokens_per_s,
        "padded_tokens_per_s": padded as f64 / total_s,
        "model_flops_per_step": model_flops / timed.len() as f64,
        "executed_flops_per_step": executed_flops / timed.len() as f64,
        "mfu": mfu,
        "hfu": hfu,
        "steps": timed.iter().zip(timed_batches).map(|(s, b)| step_json(s, b)).collect::<Vec<_>>(),
        "learning_rate": t.lr,
        "grad_clip": t.grad_clip,
        "adamw": t.adamw,
    });
    if let Some(path) = &opts.baseline {
        compare_with(path, &report)?;
    }
    if let Some(path) = &opts.out {
        tokenfold_data::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// The first `n` batches of the configuration's training stream (its first curriculum stage).
fn draw_batches(
    config: &RunConfig,
    assets: Arc<tokenfold_data::Assets>,
    tokenizer: TextTokenizer,
    n: usize,
) -> Result<Vec<Batch>> {
    let mut loader = Loader::spawn(assets, Arc::new(tokenizer), config.stream()?, 0, 1, 4)?;
    (0..n)
        .map(|_| loader.next_batch().map_err(anyhow::Error::from))
        .collect()
}

/// Training FLOPs (forward and backward) of one batch. `executed` counts the padded shape the step
/// really computes; otherwise only the real tokens count. The token-embedding lookup, which Chinchilla
/// counts as a matmul with a one-hot input, is left out: no arithmetic is done for it.
fn training_flops(
    config: &ModelConfig,
    batch: &Batch,
    window: AttentionWindow,
    executed: bool,
) -> f64 {
    let t = batch.seq_len;
    (0..batch.batch_size)
        .map(|s| {
            let image_tokens = batch.image_starts[s].map_or(0, |_| batch.n_patches);
            let shape = SequenceShape {
                length: if executed { t } else { batch.lengths[s] },
                image_start: batch.image_starts[s].unwrap_or(0),
                image_tokens,
                logit_positions: targets(batch, s).len(),
            };
            let work = Workload::sequence(&shape, window);
            let forward = flops::forward(config, &work);
            let lookup = 2.0
                * (work.tokens - work.image_tokens)
                * (config.vocab_size * config.d_model) as f64;
            3.0 * (forward.total() - lookup)
        })
        .sum()
}

/// Positions of sample `s`'s target tokens.
fn targets(batch: &Batch, s: usize) -> Vec<usize> {
    let t = batch.seq_len;
    (0..t)
        .filter(|&j| batch.loss_mask[s * t + j] > 0.0)
        .collect()
}

/// What a reference implementation needs to run the same step: each sample's length, image span and
/// target positions (token values do not change the work).
fn step_json(step: &Step, batch: &Batch) -> Value {
    json!({
        "forward_ms": 1e3 * step.forward_s,
        "backward_ms": 1e3 * step.backward_s,
        "optimizer_ms": 1e3 * step.optimizer_s,
        "loss": step.loss,
        "seq_len": batch.seq_len,
        "n_patches": batch.n_patches,
        "patch_dim": batch.patch_dim,
        "lengths": batch.lengths,
        "image_starts": batch.image_starts,
        "targets": (0..batch.batch_size).map(|s| targets(batch, s)).collect::<Vec<_>>(),
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    }
}

/// Square f32 matmuls of a few sizes, each repeated for a fixed time; FLOP/s of the fastest call.
fn gemm_peak(device: &Device) -> Result<Vec<(usize, f64)>> {
    let mut rows = Vec::new();
    for n in [128usize, 256, 512, 1024] {
        let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
        std::hint::black_box(a.matmul(&b)?);
        let mut best = f64::INFINITY;
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < 1.0 {
            let call = Instant::now();
            std::hint::black_box(a.matmul(&b)?);
            best = best.min(call.elapsed().as_secs_f64());
        }
        rows.push((n, 2.0 * (n * n * n) as f64 / best));
    }
    Ok(rows)
}

/// Prints this run against a previous report of the same command.
fn compare_with(path: &Path, report: &Value) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the baseline {}", path.display()))?;
    let base: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON report", path.display()))?;
    let number = |v: &Value, field: &str| -> Result<f64> {
        field
            .split('.')
            .try_fold(v, |v, key| v.get(key))
            .and_then(Value::as_f64)
            .with_context(|| format!("{}: no number at field '{field}'", path.display()))
    };
    if base.get("model") != report.get("model") {
        println!(
            "\nnote: the baseline {} ran a different model; the ratios compare different work",
            path.display()
        );
    }
    println!(
        "\nagainst {} (revision {})\n",
        path.display(),
        base.get("git_revision")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
    );
    println!("| figure | baseline | now | now / baseline |\n|---|---:|---:|---:|");
    for field in [
        "median_ms.forward",
        "median_ms.backward",
        "median_ms.optimizer",
        "median_ms.step",
        "tokens_per_s",
        "mfu",
        "peak_flops_per_s",
    ] {
        let (before, now) = (number(&base, field)?, number(report, field)?);
        println!(
            "| {field} | {before:.4e} | {now:.4e} | {:.3} |",
            now / before
        );
    }
    Ok(())
}
