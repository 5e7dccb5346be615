//! `tokenfold search`: Efficient Operator Search on a trained model for one budget.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokenfold_data::loader::training_batch;
use tokenfold_data::{DataPaths, Mixture, Task};
use tokenfold_model::train::{RunDir, default_device};
use tokenfold_search::{SearchConfig, SearchReport, search};

use crate::model::{checked_assets, parse_tasks};

#[derive(Args)]
pub struct SearchArgs {
    /// Run directory of a trained model.
    #[arg(long)]
    pub model: PathBuf,
    /// FLOPs-equivalent visual-token share the plan may not exceed, e.g. 0.111.
    #[arg(long)]
    pub budget: f64,
    /// The plan (JSON); the search report goes beside it as <stem>.report.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Image tasks whose training-split samples the search optimises for (`all`: every image task).
    #[arg(long, default_value = "all")]
    pub tasks: String,
    /// Optimisation steps (the first half explores layer activations, the second tunes the chosen layers).
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Training-split samples per step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Learning rate of the search variables (AdamW, no weight decay).
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// Weight of the KL term to the unreduced model's answer distribution.
    #[arg(long, default_value_t = 1.0)]
    pub align: f64,
    /// Optional cap on the analytical prefill FLOPs relative to the full model.
    #[arg(long)]
    pub max_flops: Option<f64>,
    /// Seed of the search's training-split stream (the model's own training used another stream).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Search from the neutral start only: no hand-designed seeds, no selection.
    #[arg(long)]
    pub no_seeds: bool,
    /// Steps of the search from the best hand-designed seed.
    #[arg(long, default_value_t = 150)]
    pub seed_steps: usize,
    /// Held-out training-split batches that rank the seeds and pick the plan emitted.
    #[arg(long, default_value_t = 128)]
    pub selection_batches: usize,
    /// Rounds of the hill-climb over the best seed's schedule (visual tokens per layer) on the
    /// selection batches; 0 keeps the seed's own schedule.
    #[arg(long, default_value_t = 3)]
    pub schedule_rounds: usize,
}

pub fn report_path(plan: &Path) -> PathBuf {
    let stem = plan
        .file_stem()
        .map_or("plan".into(), |s| s.to_string_lossy().into_owned());
    plan.with_file_name(format!("{stem}.report.json"))
}

pub fn run(args: SearchArgs, paths: &DataPaths) -> Result<()> {
    let tasks: Vec<Task> = parse_tasks(&args.tasks)?
        .into_iter()
        .filter(|t| t.has_image())
        .collect();
    if tasks.is_empty() {
        bail!("--tasks: the search needs at least one image task");
    }
    let mut config = SearchConfig::new(args.budget);
    config.steps = args.steps;
    config.batch_size = args.batch_size;
    config.lr = args.lr;
    config.align = args.align;
    config.max_flops = args.max_flops;
    config.seeds = !args.no_seeds;
    config.seed_steps = args.seed_steps;
    config.selection_batches = args.selection_batches;
    config.schedule_rounds = args.schedule_rounds;
    config.validate()?;
    let device = default_device()?;
    let (model, tokenizer, run) = RunDir::new(&args.model)
        .load(&device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let assets = checked_assets(paths, &run)?;
    let mixture = Mixture(tasks.iter().map(|&t| (t, 1.0)).collect());
    println!(
        "searching a plan for {} at {:.1}% of the visual tokens: {} steps × {} samples of the training split ({})",
        args.model.display(),
        100.0 * args.budget,
        args.steps,
        args.batch_size,
        tasks
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let total_steps = args.steps + if config.seeds { args.seed_steps } else { 0 };
    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("valid progress template"),
    );
    let report = search(
        &model,
        &config,
        |step| {
            Ok(training_batch(
                &assets,
                &tokenizer,
                &run.sequence,
                &mixture,
                args.seed,
                args.batch_size,
                step as u64,
                0,
            )?)
        },
        |record| {
            bar.set_message(format!(
                "loss {:.3}  kl {:.3}  tokens {:.1}%",
                record.task_loss,
                record.kl,
                100.0 * record.share
            ));
            bar.inc(1);
        },
    )?;
    bar.finish_and_clear();
    report.plan.save(&args.out)?;
    let report_file = report_path(&args.out);
    tokenfold_fold::write_atomic(&report_file, serde_json::to_string(&report)?.as_bytes())?;
    print_summary(&report);
    println!("wrote {} and {}", args.out.display(), report_file.display());
    Ok(())
}

fn print_summary(report: &SearchReport) {
    let last = report.trajectory.last();
    println!("The search from the neutral start, at its last step:\n");
    println!("| layer | active | a | keep | γ | τ | η | ρ | κ | top signals |");
    println!("|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---|");
    if let Some(last) = last {
        for (l, p) in last.layers.iter().enumerate() {
            let mut weights: Vec<_> = p.weights.iter().collect();
            weights.sort_by(|a, b| b.1.total_cmp(a.1));
            let top = weights
                .iter()
                .take(3)
                .map(|(s, w)| format!("{} {:.2}", s.name(), w))
                .collect::<Vec<_>>()
                .join(", ");
            println!(
                "| {l} | {} | {:.2} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} | {:.3} | {top} |",
                if report.active[l] { "yes" } else { "no" },
                p.activation,
                p.keep,
                p.gamma,
                p.tau,
                p.eta,
                p.rho,
                p.locality
            );
        }
        println!(
            "final step: task loss {:.3}, KL {:.3}, expected token share {:.1}%",
            last.task_loss,
            last.kl,
            100.0 * last.share
        );
    }
    let stages = report
        .plan
        .stages
        .iter()
        .map(|s| {
            format!(
                "layer {} keep {:.1}%",
                s.layer,
                100.0 * s.keep.unwrap_or(1.0)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "plan {}: {stages}; FLOPs-equivalent share {:.2}% (budget {:.2}%)",
        report.plan.name,
        100.0 * report.plan_share,
        100.0 * report.config.budget
    );
    if !report.candidates.is_empty() {
        println!(
            "\n| candidate | FLOPs-equivalent share | exact match on the selection batches | objective |"
        );
        println!("|---|---:|---:|---:|");
        for c in &report.candidates {
            println!(
                "| {}{} | {:.2}% | {:.1}% | {:.4} |",
                c.name,
                if c.name == report.chosen {
                    " (chosen)"
                } else {
                    ""
                },
                100.0 * c.plan_share,
                100.0 * c.selection_accuracy,
                c.selection_loss
            );
        }
    }
    if !report.schedules.is_empty() {
        println!("\n| schedule of the best seed (tokens per layer) | exact match | objective |");
        println!("|---|---:|---:|");
        for s in &report.schedules {
            let counts: Vec<String> = s.counts.iter().map(|c| c.to_string()).collect();
            println!(
                "| {} | {:.1}% | {:.4} |",
                counts.join(" / "),
                100.0 * s.selection_accuracy,
                s.selection_loss
            );
        }
    }
    println!(
        "search: {:.1} s wall, {} forward and {} backward passes",
        report.wall_seconds, report.forward_passes, report.backward_passes
    );
}
