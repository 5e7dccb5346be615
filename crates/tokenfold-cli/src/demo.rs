//! `tokenfold demo`: the main job for a new user, on the real data.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use tokenfold_data::evalset::{EVAL_SIZE, digest};
use tokenfold_data::store::load_assets;
use tokenfold_data::{
    Batch, DataPaths, EvalSpec, Negatives, SceneConfig, SequenceConfig, Split, Task, TextTokenizer,
};

#[derive(Args)]
pub struct DemoArgs {
    /// Folder for the demo's outputs.
    #[arg(long, default_value = "results/demo")]
    out: PathBuf,
}

pub fn run(args: DemoArgs, paths: &DataPaths) -> Result<()> {
    let started = Instant::now();
    println!("== 1. data ({})", paths.root.display());
    paths
        .check()
        .context("the demo needs the datasets: run scripts/fetch-data.sh first")?;
    crate::data::print_stats(paths, false)?;

    println!("\n== 2. tokenizer");
    let tokenizer_path = paths.tokenizer();
    let tokenizer = if tokenizer_path.exists() {
        let tokenizer = TextTokenizer::load(&tokenizer_path)?;
        println!(
            "using {} ({} tokens)",
            tokenizer_path.display(),
            tokenizer.vocab_size()
        );
        tokenizer
    } else {
        crate::data::train_tokenizer(paths, 2048, &tokenizer_path)?
    };

    println!("\n== 3. benchmark tasks and evaluation sets");
    let assets = load_assets(paths, SceneConfig::default())?;
    crate::data::print_evalsets(&assets, Some(Split::Test), EVAL_SIZE);

    println!("\n== 4. one training batch");
    let seq = SequenceConfig::default();
    let samples: Vec<_> = Task::ALL
        .iter()
        .map(|&t| crate::data::samples(&assets, t, Split::Train, Negatives::Random, 0, 1).remove(0))
        .collect();
    let batch = Batch::from_samples(&samples, &tokenizer, &seq)?;
    println!(
        "batch of {} × {} tokens, {} patches of {} values per image; answer tokens per sample: {:?}",
        batch.batch_size,
        batch.seq_len,
        batch.n_patches,
        batch.patch_dim,
        (0..batch.batch_size)
            .map(
                |i| batch.loss_mask[i * batch.seq_len..(i + 1) * batch.seq_len]
                    .iter()
                    .sum::<f32>() as usize
            )
            .collect::<Vec<_>>()
    );

    println!("\n== 5. samples to look at");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for task in Task::ALL {
        let spec = EvalSpec {
            task,
            split: Split::Test,
            negatives: (task == Task::Exist).then_some(Negatives::Adversarial),
        };
        let samples = spec.build(&assets, 8);
        let sheet = tokenfold_data::preview::contact_sheet(&samples, 4, 3, assets.scene.canvas);
        let path = args.out.join(format!("{}.png", spec.task_name()));
        tokenfold_data::preview::save_png(&sheet, &path)?;
        println!(
            "{spec}: {} (first 8 samples, sha256 {}…)",
            path.display(),
            &digest(&samples)[..12]
        );
    }
    println!(
        "\ndemo finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
