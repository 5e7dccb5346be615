//! `tokenfold bench …`: speed measured on the real data, reported as a table and JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;
use tokenfold_data::loader::training_sample;
use tokenfold_data::sequence::encode;
use tokenfold_data::store::load_assets;
use tokenfold_data::tasks::sample_rng;
use tokenfold_data::{
    DataPaths, Loader, Mixture, SceneConfig, SequenceConfig, Split, StreamConfig, Task,
    TextTokenizer,
};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Samples per second of scene generation and sequence encoding on one core, and of the background
    /// loader with 1 and 2 workers.
    #[command(
        after_help = "Example:\n  tokenfold bench data --seconds 2 --out results/bench-data.json"
    )]
    Data {
        /// Time per measurement.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Tokenizer file [default: <data>/tokenizer.json]
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Also write the figures as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Prefill latency of a trained model at batch 1 and 16 (or the sizes given), full and with a
    /// reduction plan: the speed-up, the one its FLOPs predict, the one its projection matmuls alone
    /// reach on this machine, and the share of the plan's prefill spent in reduction.
    #[command(
        after_help = "Example:\n  tokenfold bench prefill --model runs/nmm-s --plan fastv.json --out results/bench-prefill.json"
    )]
    Prefill {
        #[arg(long)]
        model: PathBuf,
        /// A reduction plan (JSON); without it only the full model is timed.
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Timed repeats per measurement (the fastest is reported).
        #[arg(long, default_value_t = 10,
            value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        repeats: usize,
        /// Compute padded batches as they are, padding included, instead of packing their rows (the
        /// layout before packing, for comparison; as `TOKENFOLD_PACKED=0`).
        #[arg(long)]
        padded: bool,
        /// Batch sizes to time, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16],
            value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        batch: Vec<usize>,
        /// Also write the figures as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Speed of a full training step (forward, backward, clipping, AdamW) of a configuration on real
    /// batches, split by phase, with the model FLOP utilisation against the machine's GEMM peak (measured
    /// by the command itself). `bench/compare.sh` runs the same steps in PyTorch.
    #[command(
        after_help = "Example:\n  tokenfold bench train --config configs/bench.toml --out results/bench-train.json --baseline results/bench-train-before.json"
    )]
    Train(crate::bench_train::Options),
}

pub fn run(command: BenchCommand, paths: &DataPaths) -> Result<()> {
    match command {
        BenchCommand::Data {
            seconds,
            tokenizer,
            out,
        } => bench_data(paths, seconds, tokenizer, out),
        BenchCommand::Prefill {
            model,
            plan,
            repeats,
            padded,
            batch,
            out,
        } => bench_prefill(paths, &model, plan.as_deref(), repeats, padded, &batch, out),
        BenchCommand::Train(options) => crate::bench_train::run(paths, &options),
    }
}

fn bench_prefill(
    paths: &DataPaths,
    model_dir: &std::path::Path,
    plan: Option<&std::path::Path>,
    repeats: usize,
    padded: bool,
    batches: &[usize],
    out: Option<PathBuf>,
) -> Result<()> {
    let device = tokenfold_model::train::default_device()?;
    let (mut model, tokenizer, config) =
        tokenfold_model::train::RunDir::new(model_dir).load(&device)?;
    if padded {
        model.set_pack_rows(false);
    }
    let layout = if model.packs_rows() {
        "packed: each batch computes its samples' real rows only"
    } else {
        "padded: each batch computes every sample at its longest length"
    };
    let plan = match plan {
        Some(path) => {
            let plan = tokenfold_fold::Plan::load(path)?;
            plan.validate(model.n_layers())?;
            plan
        }
        None => tokenfold_fold::Plan::full(),
    };
    let assets = crate::model::checked_assets(paths, &config)?;
    println!(
        "prefill of {} with plan '{}' (fastest of {repeats}, full and planned alternating in blocks of {}); rows {layout}\n",
        model_dir.display(),
        plan.name,
        tokenfold_fold::report::LATENCY_BLOCK
    );
    println!(
        "| batch | full ms | plan ms | speed-up | FLOPs-predicted speed-up | measured / predicted | plan's matmuls ms | matmul speed-up | row ratio | predicted if padded | measured / padded | reduction ms | reduction share |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut rows = Vec::new();
    let mut after_full = Vec::new();
    let mut with_signals = Vec::new();
    for &batch in batches {
        let l = tokenfold_fold::report::measure_latency(
            &model,
            &tokenizer,
            &assets,
            &config.sequence,
            &plan,
            batch,
            repeats,
        )?;
        // The projection matmuls alone at the same rows, and the speed-up they keep of the row ratio.
        let matmuls =
            tokenfold_fold::report::matmul_ms(&model, &l.full_rows, &l.plan_rows, repeats)?;
        let (plan_matmuls, matmul_speedup) = match matmuls {
            Some((full, plan)) => (
                format!("{plan:.2}"),
                format!("{:.2}×", full / plan.max(1e-9)),
            ),
            None => ("–".into(), "– (experts)".into()),
        };
        println!(
            "| {} | {:.2} | {:.2} | {:.2}× | {:.2}× | {:.2} | {} | {} | {:.2}× | {:.2}× | {:.2} | {:.2} | {:.1}% |",
            l.batch,
            l.full_ms,
            l.plan_ms,
            l.speedup(),
            l.predicted_speedup,
            l.speedup_efficiency(),
            plan_matmuls,
            matmul_speedup,
            l.row_ratio(),
            l.predicted_speedup_padded,
            l.speedup() / l.predicted_speedup_padded.max(1e-9),
            l.overhead_ms,
            100.0 * l.overhead_share()
        );
        if l.signal_flops > 0.0 {
            let predicted = l.predicted_speedup_with_signals();
            with_signals.push(format!(
                "batch {}: {:.1} MFLOPs, {:.1}% of the plan's layers; predicted speed-up {predicted:.2}×, measured / that {:.2}",
                l.batch,
                l.signal_flops / 1e6,
                100.0 * l.signal_flops / l.plan_flops.max(1e-9),
                l.speedup() / predicted.max(1e-9)
            ));
        }
        if let (Some(ms), Some(speedup)) = (l.plan_after_full_ms, l.speedup_after_full())
            && !plan.stages.is_empty()
        {
            after_full.push(format!(
                "batch {}: {ms:.2} ms, speed-up {speedup:.2}×, {:.2} of the predicted",
                l.batch,
                speedup / l.predicted_speedup.max(1e-9)
            ));
        }
        rows.push(json!({"batch": l.batch, "full_ms": l.full_ms, "plan_ms": l.plan_ms,
            "plan_after_full_ms": l.plan_after_full_ms,
            "speedup_after_full": l.speedup_after_full(),
            "speedup": l.speedup(), "predicted_speedup": l.predicted_speedup,
            "plan_flops": l.plan_flops, "signal_flops": l.signal_flops,
            "predicted_speedup_with_signals": l.predicted_speedup_with_signals(),
            "speedup_efficiency": l.speedup_efficiency(),
            "matmul_full_ms": matmuls.map(|m| m.0), "matmul_plan_ms": matmuls.map(|m| m.1),
            "row_ratio": l.row_ratio(), "full_rows": l.full_rows, "plan_rows": l.plan_rows,
            "predicted_speedup_padded": l.predicted_speedup_padded, "reduction_ms": l.overhead_ms,
            "reduction_share": l.overhead_share(), "lengths": l.lengths, "image_starts": l.image_starts}));
    }
    if !with_signals.is_empty() {
        println!(
            "\nthe stages' own key and query projections (where a stage reads its own layer's: the keys of every real row and the queries it projects, less the keys handed on to the layer), which the FLOPs prediction above leaves out:"
        );
        for line in &with_signals {
            println!("- {line}");
        }
    }
    if !after_full.is_empty() {
        println!(
            "\nplanned prefill right after a full one (the first of each block; the full one leaves part of the weights out of the caches):"
        );
        for line in &after_full {
            println!("- {line}");
        }
    }
    if let Some(path) = out {
        let report = json!({"command": "bench prefill", "model": model_dir, "config": model.config,
            "parameters": model.parameter_count(), "threads": candle_core::utils::get_num_threads(),
            "git_revision": tokenfold_scaling::sweep::git_revision(), "plan": plan,
            "repeats": repeats, "block": tokenfold_fold::report::LATENCY_BLOCK,
            "packed_rows": model.packs_rows(), "rows": rows});
        tokenfold_data::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// Runs `step` repeatedly for about `seconds`; returns calls per second.
fn rate(seconds: f64, mut step: impl FnMut(u64)) -> f64 {
    let budget = Duration::from_secs_f64(seconds.max(0.05));
    let started = Instant::now();
    let mut calls = 0u64;
    while started.elapsed() < budget {
        step(calls);
        calls += 1;
    }
    calls as f64 / started.elapsed().as_secs_f64()
}

fn bench_data(
    paths: &DataPaths,
    seconds: f64,
    tokenizer: Option<PathBuf>,
    out: Option<PathBuf>,
) -> Result<()> {
    let started = Instant::now();
    let assets = Arc::new(load_assets(paths, SceneConfig::default())?);
    let load_s = started.elapsed().as_secs_f64();
    let tokenizer = Arc::new(TextTokenizer::load(
        &tokenizer.unwrap_or_else(|| paths.tokenizer()),
    )?);
    let seq = SequenceConfig::default();
    println!(
        "assets loaded in {load_s:.2} s ({} objects, {} digits)",
        assets.vocab.len(),
        assets.digits.len()
    );
    println!("\none core, {seconds} s per row\n");
    println!("| task | generated samples/s | generated + encoded samples/s |\n|---|---:|---:|");
    let mut rows = Vec::new();
    for task in Task::ALL {
        let generate = rate(seconds, |i| {
            std::hint::black_box(assets.sample(task, Split::Train, None, &mut sample_rng(1, 0, i)));
        });
        let encoded = rate(seconds, |i| {
            let sample = assets.sample(task, Split::Train, None, &mut sample_rng(1, 0, i));
            std::hint::black_box(
                encode(&sample, &tokenizer, &seq).expect("sample fits the sequence"),
            );
        });
        println!("| {task} | {generate:.0} | {encoded:.0} |");
        rows.push(
            json!({"task": task.name(), "generated_per_s": generate, "encoded_per_s": encoded}),
        );
    }
    let mixture = Mixture::uniform();
    let mixed = rate(seconds, |i| {
        let sample = training_sample(&assets, &mixture, 1, i, 0);
        std::hint::black_box(encode(&sample, &tokenizer, &seq).expect("sample fits the sequence"));
    });
    println!("| uniform mixture | | {mixed:.0} |");

    let batch_size = 16;
    let mut loader_rows = Vec::new();
    println!("\nbackground loader, batch {batch_size}, uniform mixture\n");
    println!("| workers | samples/s |\n|---:|---:|");
    for workers in [1usize, 2] {
        let stream = StreamConfig {
            seed: 1,
            batch_size,
            mixture: mixture.clone(),
            stages: Vec::new(),
            seq: seq.clone(),
            group_text: false,
            follow_ups: 0,
        };
        let mut loader = Loader::spawn(assets.clone(), tokenizer.clone(), stream, 0, workers, 4)?;
        loader.next_batch()?; // warm-up: thread start
        let batches_per_s = rate(seconds, |_| {
            std::hint::black_box(loader.next_batch().expect("the loader produces batches"));
        });
        let per_s = batches_per_s * batch_size as f64;
        println!("| {workers} | {per_s:.0} |");
        loader_rows.push(json!({"workers": workers, "samples_per_s": per_s}));
    }
    if let Some(out) = out {
        let report = json!({
            "benchmark": "data",
            "seconds_per_measurement": seconds,
            "assets_load_s": load_s,
            "one_core": rows,
            "mixture_encoded_per_s": mixed,
            "loader": loader_rows,
        });
        tokenfold_data::write_atomic(&out, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("\nwrote {}", out.display());
    }
    Ok(())
}
