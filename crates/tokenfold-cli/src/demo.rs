//! `tokenfold demo`: the main job for a new user, on the real data: check the data, build the tokenizer
//! and evaluation sets, train the small model `nmm-xs`, evaluate it on the test sets, ask it a question.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use tokenfold_data::evalset::EVAL_SIZE;
use tokenfold_data::store::load_assets;
use tokenfold_data::{DataPaths, EvalSpec, Negatives, SceneConfig, Split, Task, TextTokenizer};
use tokenfold_model::eval::{answer_question, evaluate, markdown, mean_accuracy};
use tokenfold_model::train::{
    RunConfig, RunDir, TrainOptions, default_device, prepare_tokenizer, train,
};

/// The demo trains with the committed nmm-xs configuration.
const DEMO_CONFIG: &str = include_str!("../../../configs/nmm-xs.toml");

#[derive(Args)]
pub struct DemoArgs {
    /// Folder for the demo's outputs (the trained model goes to <out>/nmm-xs).
    #[arg(long, default_value = "results/demo")]
    out: PathBuf,
    /// Training steps [default: train.steps of configs/nmm-xs.toml]
    #[arg(long)]
    steps: Option<u64>,
    /// Test samples per evaluation set.
    #[arg(short = 'n', long, default_value_t = 200)]
    eval_samples: usize,
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
    if tokenizer_path.exists() {
        let tokenizer = TextTokenizer::load(&tokenizer_path)?;
        println!(
            "using {} ({} tokens)",
            tokenizer_path.display(),
            tokenizer.vocab_size()
        );
    } else {
        crate::data::train_tokenizer(paths, 2048, &tokenizer_path)?;
    }

    println!("\n== 3. benchmark tasks and evaluation sets");
    let assets = Arc::new(load_assets(paths, SceneConfig::default())?);
    crate::data::print_evalsets(&assets, Some(Split::Test), EVAL_SIZE);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for task in Task::ALL {
        let spec = EvalSpec {
            task,
            split: Split::Test,
            negatives: (task == Task::Exist).then_some(Negatives::Adversarial),
        };
        let sheet = tokenfold_data::preview::contact_sheet(
            &spec.build(&assets, 8),
            4,
            3,
            assets.scene.canvas,
        );
        tokenfold_data::preview::save_png(
            &sheet,
            &args.out.join(format!("{}.png", spec.task_name())),
        )?;
    }
    println!(
        "sample sheets (first 8 test samples of each task): {}/*.png",
        args.out.display()
    );

    println!("\n== 4. train nmm-xs (configs/nmm-xs.toml)");
    let mut config = RunConfig::parse(DEMO_CONFIG, false, "configs/nmm-xs.toml")?;
    if let Some(steps) = args.steps {
        config = config.with_steps(steps);
        config.validate()?;
    }
    let run = RunDir::new(&args.out.join("nmm-xs"));
    match run.checkpoint_step() {
        Some(step) if step == config.train.steps => {
            println!(
                "{} is already trained ({step} steps); delete it to train again",
                run.root.display()
            );
        }
        done => {
            let resume = done.is_some();
            let tokenizer = prepare_tokenizer(
                &run,
                &tokenizer_path,
                &assets,
                config.tokenizer.vocab_size,
                resume,
            )?;
            let model_config = config.model_config(tokenizer.vocab_size())?;
            println!(
                "{} parameters, {} steps of {} sequences{}",
                model_config.parameter_count(),
                config.train.steps,
                config.train.batch_size,
                if resume { " (resuming)" } else { "" }
            );
            let options = TrainOptions {
                resume,
                progress: true,
                stop_after: None,
            };
            let summary = train(&config, &run.root, assets.clone(), tokenizer, &options)?;
            println!(
                "trained in {:.1} min at {:.0} tokens/s; final training loss {:.3}",
                summary.elapsed_s / 60.0,
                summary.tokens_per_s,
                summary.final_loss
            );
        }
    }

    println!(
        "\n== 5. evaluate on the test sets ({} samples each)",
        args.eval_samples
    );
    let device = default_device()?;
    let (model, tokenizer, config) = run.load(&device)?;
    let results = evaluate(
        &model,
        &tokenizer,
        &assets,
        &config.sequence,
        &EvalSpec::all(Split::Test),
        args.eval_samples,
        32,
    )?;
    println!("{}", markdown(&results));
    tokenfold_data::write_atomic(
        &run.root.join("eval-test.json"),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;

    println!("== 6. ask");
    for task in [Task::Count, Task::Locate, Task::Caption] {
        let sample = EvalSpec {
            task,
            split: Split::Test,
            negatives: None,
        }
        .sample(&assets, 0);
        let image = sample.image.as_ref().expect("image tasks have an image");
        let reply = answer_question(
            &model,
            &tokenizer,
            &config.sequence,
            image,
            &sample.question,
        )?;
        println!(
            "{task}: \"{}\" → model: \"{}\", expected: \"{}\"",
            sample.question, reply, sample.answer
        );
    }
    println!(
        "\ndemo finished in {:.1} min; image-task mean accuracy {:.1}%. Model: {} (try `tokenfold eval --model {}`)",
        started.elapsed().as_secs_f64() / 60.0,
        100.0 * mean_accuracy(&results),
        run.root.display(),
        run.root.display()
    );
    Ok(())
}
