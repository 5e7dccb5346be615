//! The `tokenfold` binary: a thin layer over the tokenfold crates.

mod bench;
mod data;
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// The main job for a new user: check the data, build the tokenizer and evaluation sets, show samples.
    #[command(
        after_help = "Example:\n  scripts/fetch-data.sh && tokenfold demo --out results/demo"
    )]
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut paths = tokenfold_data::DataPaths::resolve(cli.data.as_deref());
    paths.emoji_style = cli.emoji_style;
    let result = match cli.command {
        Command::Data { command } => data::run(command, &paths),
        Command::Bench { command } => bench::run(command, &paths),
        Command::Demo(args) => demo::run(args, &paths),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
