//! `tokenfold data …`: what is installed, the vocabulary, sample sheets, the tokenizer, the eval sets.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Subcommand;
use tokenfold_data::evalset::{EVAL_SIZE, EVAL_VERSION, digest};
use tokenfold_data::store::{load_assets, stats};
use tokenfold_data::tasks::sample_rng;
use tokenfold_data::{
    Assets, DataPaths, EvalSpec, Negatives, Sample, SceneConfig, Split, Task, TextTokenizer,
};

#[derive(Subcommand)]
pub enum DataCommand {
    /// What is installed and how much: emoji with labels, digits, speeches and their size.
    #[command(after_help = "Example:\n  tokenfold data stats --json")]
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The object vocabulary of the scenes (label, kind, subcategory, popularity rank).
    #[command(after_help = "Example:\n  tokenfold data vocab > vocabulary.md")]
    Vocab,
    /// A PNG sheet of samples with their question and answer under each.
    #[command(
        after_help = "Examples:\n  tokenfold data show --task exist --split test --negatives adversarial -n 16 --out grid.png\n  tokenfold data show --task read --split train --seed 7"
    )]
    Show {
        #[arg(long)]
        task: Task,
        /// train (generated from --seed), val or test (the fixed evaluation sets).
        #[arg(long, default_value = "test")]
        split: Split,
        /// Negatives of the exist task on val/test: random, popular or adversarial.
        #[arg(long, default_value = "random")]
        negatives: Negatives,
        #[arg(short = 'n', long, default_value_t = 16)]
        count: usize,
        #[arg(long, default_value_t = 4)]
        columns: usize,
        /// Image magnification in the sheet.
        #[arg(long, default_value_t = 3)]
        scale: u32,
        /// Seed of the training stream (train split only).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "grid.png")]
        out: PathBuf,
        /// Also write each sample's image as it is (canvas size) into this folder, as <task>-<i>.png,
        /// with its question and answer in <task>-<i>.txt: inputs for `tokenfold ask` and `fold show`.
        #[arg(long, value_name = "DIR")]
        images: Option<PathBuf>,
    },
    /// Train the byte-level BPE tokenizer and report bytes per token on held-out speeches.
    #[command(after_help = "Example:\n  tokenfold data tokenizer --vocab-size 2048")]
    Tokenizer {
        /// Vocabulary size, special tokens and the 256 byte symbols included.
        #[arg(long, default_value_t = 2048)]
        vocab_size: usize,
        /// Where to write tokenizer.json [default: <data>/tokenizer.json]
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Build the fixed evaluation sets and print their sizes and SHA-256 digests.
    #[command(after_help = "Example:\n  tokenfold data evalsets --split test")]
    Evalsets {
        /// val, test, or both when omitted.
        #[arg(long)]
        split: Option<Split>,
        /// Samples per set.
        #[arg(short = 'n', long, default_value_t = EVAL_SIZE)]
        count: usize,
    },
}

pub fn run(command: DataCommand, paths: &DataPaths) -> Result<()> {
    match command {
        DataCommand::Stats { json } => print_stats(paths, json),
        DataCommand::Vocab => print_vocab(paths),
        DataCommand::Show {
            task,
            split,
            negatives,
            count,
            columns,
            scale,
            seed,
            out,
            images,
        } => {
            let assets = load_assets(paths, SceneConfig::default())?;
            let samples = samples(&assets, task, split, negatives, seed, count);
            if let Some(dir) = images {
                std::fs::create_dir_all(&dir)?;
                for (i, sample) in samples.iter().enumerate() {
                    if let Some(image) = &sample.image {
                        let path = dir.join(format!("{task}-{i}.png"));
                        tokenfold_data::preview::save_png(image, &path)?;
                        let text = format!("{}\n{}\n", sample.question, sample.answer);
                        tokenfold_data::write_atomic(&path.with_extension("txt"), text.as_bytes())?;
                    }
                }
                println!("wrote {} images to {}", samples.len(), dir.display());
            }
            let sheet = tokenfold_data::preview::contact_sheet(
                &samples,
                columns,
                scale.clamp(1, 16),
                assets.scene.canvas,
            );
            tokenfold_data::preview::save_png(&sheet, &out)?;
            println!(
                "wrote {} {task}/{split} samples to {}",
                samples.len(),
                out.display()
            );
            Ok(())
        }
        DataCommand::Tokenizer { vocab_size, out } => {
            let out = out.unwrap_or_else(|| paths.tokenizer());
            train_tokenizer(paths, vocab_size, &out).map(|_| ())
        }
        DataCommand::Evalsets { split, count } => {
            let assets = load_assets(paths, SceneConfig::default())?;
            print_evalsets(&assets, split, count);
            Ok(())
        }
    }
}

pub fn print_stats(paths: &DataPaths, json: bool) -> Result<()> {
    let s = stats(paths)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("data folder: {}", s.root.display());
    println!("| source | count | detail |\n|---|---:|---|");
    println!(
        "| emoji ({}) | {} | {} with CLDR labels, {} images present |",
        s.emoji_style, s.emoji, s.emoji_with_label, s.emoji_images_present
    );
    println!(
        "| MNIST digits | {} | per class 0–9: {:?} |",
        s.digits, s.digits_per_class
    );
    println!(
        "| speeches | {} | {} bytes, {} words, {}–{} |",
        s.speeches, s.speech_bytes, s.speech_words, s.first_year, s.last_year
    );
    println!(
        "| object vocabulary | {} | kinds: {} |",
        s.vocabulary,
        s.kinds.join(", ")
    );
    Ok(())
}

fn print_vocab(paths: &DataPaths) -> Result<()> {
    paths.check()?;
    let emoji =
        tokenfold_data::emoji::EmojiSet::load(&paths.emoji_datasource(), &paths.emojibase())?;
    let vocab = tokenfold_data::vocab::Vocabulary::from_emoji(&emoji)?;
    println!(
        "| # | label | kind | subcategory | code points | popularity rank |\n|---:|---|---|---|---|---:|"
    );
    for (i, o) in vocab.objects.iter().enumerate() {
        println!(
            "| {i} | {} | {} | {} | {} | {} |",
            o.label, o.kind, o.subcategory, o.unified, o.popularity_rank
        );
    }
    println!("\n{} objects in {} kinds", vocab.len(), vocab.kinds().len());
    Ok(())
}

/// The first `count` samples of an evaluation set (val/test) or of the task's training stream.
pub fn samples(
    assets: &Assets,
    task: Task,
    split: Split,
    negatives: Negatives,
    seed: u64,
    count: usize,
) -> Vec<Sample> {
    match split {
        Split::Train => (0..count as u64)
            .map(|i| {
                assets.sample(
                    task,
                    Split::Train,
                    None,
                    &mut sample_rng(seed, 1 + task as u64, i),
                )
            })
            .collect(),
        _ => EvalSpec {
            task,
            split,
            negatives: (task == Task::Exist).then_some(negatives),
        }
        .build(assets, count),
    }
}

/// Trains the tokenizer on the training speeches and every task text, saves it, reports bytes per token.
pub fn train_tokenizer(
    paths: &DataPaths,
    vocab_size: usize,
    out: &std::path::Path,
) -> Result<TextTokenizer> {
    let assets = load_assets(paths, SceneConfig::default())?;
    let started = Instant::now();
    let tokenizer = TextTokenizer::train_on_assets(&assets, vocab_size)?;
    let task_texts = assets.task_texts();
    tokenizer.save(out)?;
    let held_out: Vec<&str> = assets
        .speeches
        .split(Split::Test)
        .map(|s| s.text.as_str())
        .collect();
    let bytes_per_token = tokenizer.bytes_per_token(held_out.iter().copied())?;
    let task_bpt = tokenizer.bytes_per_token(task_texts.iter().map(String::as_str))?;
    println!(
        "tokenizer: {} tokens, trained in {:.1} s, saved to {}",
        tokenizer.vocab_size(),
        started.elapsed().as_secs_f64(),
        out.display()
    );
    println!(
        "bytes per token: {bytes_per_token:.3} on {} held-out (test) speeches ({} bytes); {task_bpt:.3} on task texts",
        held_out.len(),
        held_out.iter().map(|s| s.len()).sum::<usize>()
    );
    Ok(tokenizer)
}

pub fn print_evalsets(assets: &Assets, split: Option<Split>, count: usize) {
    let splits = match split {
        Some(s) => vec![s],
        None => vec![Split::Val, Split::Test],
    };
    println!("evaluation sets, version {EVAL_VERSION}, {count} samples each\n");
    println!("| set | samples | distinct answers | sha256 |\n|---|---:|---:|---|");
    for split in splits.into_iter().filter(|s| *s != Split::Train) {
        for spec in EvalSpec::all(split) {
            let samples = spec.build(assets, count);
            let answers: std::collections::HashSet<&str> =
                samples.iter().map(|s| s.answer.as_str()).collect();
            println!(
                "| {spec} | {} | {} | {} |",
                samples.len(),
                answers.len(),
                digest(&samples)
            );
        }
    }
}
