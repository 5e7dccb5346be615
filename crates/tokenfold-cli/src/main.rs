//! The `tokenfold` binary: a thin layer over the tokenfold crates.

mod bench;
mod bench_train;
mod data;
mod demo;
mod fold;
mod model;
mod plot;
mod scaling;
mod search;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc, in place of glibc's allocator: a reduction stage makes many small vectors per sample, and
/// every layer allocates its outputs afresh, which glibc served slowly; mimalloc also keeps freed memory
/// for reuse without the thresholds glibc needed raised. The measurements (prefills faster, training
/// the same) are in docs/performance.md, "mimalloc as the global allocator".
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Makes the main thread one of the workers of rayon's global pool, which keeps its usual size
/// (`RAYON_NUM_THREADS`, else the cores available). Called from outside the pool, every parallel
/// operation of gemm and of our kernels handed its work to the pool's threads and put the main thread to
/// sleep until they finished: two context switches per operation, and a prefill of a few tokens runs
/// hundreds of operations (measured: FastV's batch-1 planned prefill of nmm-s, 5.5–7.7 → 3.7–4.8 ms).
/// As a worker, the main thread takes its own share of each operation.
///
/// The main thread only runs pool work while it is inside a parallel operation. So no other thread may
/// submit rayon work and have the main thread wait for it: with one thread in all, nothing would ever
/// run it. The data loader's threads therefore never use rayon (see `tokenfold_data::loader`).
fn join_the_thread_pool() {
    if let Err(error) = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global()
    {
        // Only possible if something built the global pool first; the work still runs, on that pool.
        eprintln!("warning: the thread pool is not set up as intended: {error}");
    }
}

#[derive(Parser)]
#[command(
    name = "tokenfold",
    version,
    about = "Efficient native multimodal models: real data, visual-token reduction, scaling laws.",
    after_help = "Start with `scripts/fetch-data.sh`, then `tokenfold demo`."
)]
struct Cli {
    /// Data folder filled by scripts/fetch-data.sh [default: $TOKENFOLD_DATA, else ./data]
    #[arg(long, global = true, value_name = "DIR")]
    data: Option<PathBuf>,

    /// Emoji style: images come from <data>/emoji-datasource-<style>.
    #[arg(long, global = true, default_value = "google", value_name = "STYLE")]
    emoji_style: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect the datasets, the benchmark tasks and the tokenizer.
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
    /// Measure speed (never in unit tests: here, on the real data).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Train a native multimodal model from a run configuration.
    #[command(
        after_help = "Examples:\n  tokenfold train --config configs/nmm-s.toml --out runs/nmm-s\n  tokenfold train --config configs/nmm-s.toml --out runs/nmm-s --resume"
    )]
    Train(model::TrainArgs),
    /// Evaluate a trained model on the fixed evaluation sets: per-task accuracy (markdown and JSON).
    #[command(
        after_help = "Examples:\n  tokenfold eval --model runs/nmm-s\n  tokenfold eval --model runs/nmm-s --tasks count,read --split val -n 200"
    )]
    Eval(model::EvalArgs),
    /// Ask a trained model a question about an image.
    #[command(
        after_help = "Example:\n  tokenfold ask --model runs/nmm-s --image scene.png \"how many animals are there?\""
    )]
    Ask(model::AskArgs),
    /// Visual-token reduction: evaluate plans, compare methods at the standard budgets, show kept patches.
    Fold {
        #[command(subcommand)]
        command: fold::FoldCommand,
    },
    /// Efficient Operator Search: a differentiable search for where, how much and how to reduce visual
    /// tokens at one budget; writes a plan that `fold eval` and `fold compare` run.
    #[command(
        after_help = "Examples:\n  tokenfold search --model runs/nmm-s --budget 0.111 --out results/search/plan-11.json\n  tokenfold fold compare --model runs/nmm-s --methods all,results/search/plan-11.json --budgets 0.111 --out results/fold"
    )]
    Search(search::SearchArgs),
    /// Fit scaling laws to a runs file: L(N, D) Chinchilla-style, compute-optimal N* and D*, the
    /// loss–compute frontier, bootstrap intervals, held-out error and the compression-factor law.
    #[command(
        after_help = "Examples:\n  tokenfold fit results/study/runs.jsonl --report results/study\n  tokenfold fit runs.jsonl --target caption --holdout 'params>=5e6'\n  tokenfold fit my-runs.csv --bootstrap 0   # columns n,d,loss[,flops]"
    )]
    Fit(scaling::FitArgs),
    /// Scaling sweeps: train a grid of model sizes × token budgets × mixtures, one record per run.
    Sweep {
        #[command(subcommand)]
        command: scaling::SweepCommand,
    },
    /// The main job for a new user: check the data, build the tokenizer and evaluation sets, show samples.
    #[command(
        after_help = "Example:\n  scripts/fetch-data.sh && tokenfold demo --out results/demo"
    )]
    Demo(demo::DemoArgs),
}

/// Leaves candle's own elementwise thread pool without workers, so that rayon's pool is the only one.
/// candle 0.11 runs its large elementwise operations (64 Ki elements and more) on a second pool of its
/// own, whose threads wake, spin and park apart from rayon's. With rayon's threads kept awake through a
/// pass ([`tokenfold_model::awake`]), one of candle's threads woken on a busy core waited for the
/// scheduler: a 1 MB broadcast addition in the batch-16 prefill took 1.1–1.5 ms instead of 0.1 ms.
/// Without workers, candle runs those operations on the calling thread. A value the user set is kept.
fn one_thread_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists, so nothing can read the
        // environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

fn main() -> ExitCode {
    one_thread_pool();
    join_the_thread_pool();
    let cli = Cli::parse();
    let mut paths = tokenfold_data::DataPaths::resolve(cli.data.as_deref());
    paths.emoji_style = cli.emoji_style;
    let result = match cli.command {
        Command::Data { command } => data::run(command, &paths),
        Command::Bench { command } => bench::run(command, &paths),
        Command::Demo(args) => demo::run(args, &paths),
        Command::Fold { command } => fold::run(command, &paths),
        Command::Train(args) => model::run_train(args, &paths),
        Command::Eval(args) => model::run_eval(args, &paths),
        Command::Ask(args) => model::run_ask(args),
        Command::Search(args) => search::run(args, &paths),
        Command::Fit(args) => scaling::run_fit(args),
        Command::Sweep { command } => scaling::run_sweep(command, &paths),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", message(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, joined by ": ", leaving out a cause the message before it already ends
/// with (our error types name the file and then print the I/O error they wrap).
fn message(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !message.ends_with(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}
