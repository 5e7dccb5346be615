//! `tokenfold train`, `tokenfold eval`, `tokenfold ask`: train, evaluate and query native multimodal models.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokenfold_data::evalset::EVAL_SIZE;
use tokenfold_data::store::load_assets;
use tokenfold_data::tokenizer::TextTokenizer;
use tokenfold_data::{DataPaths, EvalSpec, SceneConfig, Split, Task};
use tokenfold_model::eval::{answer_question, evaluate, markdown, mean_accuracy};
use tokenfold_model::train::{
    RunConfig, RunDir, TrainOptions, default_device, prepare_tokenizer, train,
};

#[derive(Args)]
pub struct TrainArgs {
    /// Run configuration (TOML or JSON), e.g. configs/nmm-s.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Run directory: checkpoints, metrics, tokenizer.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Override train.steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Train with this tokenizer.json instead of <data>/tokenizer.json, e.g. a reference run's own, to
    /// reproduce it exactly (tokenizers trained before digits were split merge numbers).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Run directory of a trained model.
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated tasks, or all; `describe` adds the recognition diagnostic (objects named with
    /// their cell), e.g. `all,describe`.
    #[arg(long, default_value = "all")]
    pub tasks: String,
    #[arg(long, default_value = "test")]
    pub split: Split,
    /// Samples per evaluation set.
    #[arg(short = 'n', long, default_value_t = EVAL_SIZE)]
    pub count: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Where to write the JSON results [default: <model>/eval-<split>.json]
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct AskArgs {
    /// Run directory of a trained model.
    #[arg(long)]
    pub model: PathBuf,
    /// An image (PNG or any format the image crate reads); resized to the model's input size.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The question, e.g. "how many animals are there?"
    pub question: String,
}

pub fn checked_assets(paths: &DataPaths, config: &RunConfig) -> Result<tokenfold_data::Assets> {
    let scene = SceneConfig {
        canvas: config.sequence.image_size,
        ..SceneConfig::default()
    };
    Ok(load_assets(paths, scene)?)
}

pub fn run_train(args: TrainArgs, paths: &DataPaths) -> Result<()> {
    let mut config = RunConfig::load(&args.config)?;
    if let Some(steps) = args.steps {
        config = config.with_steps(steps);
    }
    config.validate()?;
    let assets = Arc::new(checked_assets(paths, &config)?);
    let run = RunDir::new(&args.out);
    let tokenizer = match &args.tokenizer {
        // On resume the run's own tokenizer is the one its checkpoint was trained with.
        Some(path) if !(args.resume && run.tokenizer().is_file()) => {
            let tokenizer = TextTokenizer::load(path)?;
            if tokenizer.vocab_size() != config.tokenizer.vocab_size {
                bail!(
                    "--tokenizer {}: {} tokens, but tokenizer.vocab_size of {} is {}",
                    path.display(),
                    tokenizer.vocab_size(),
                    args.config.display(),
                    config.tokenizer.vocab_size
                );
            }
            tokenizer
        }
        _ => prepare_tokenizer(
            &run,
            &paths.tokenizer(),
            &assets,
            config.tokenizer.vocab_size,
            args.resume,
        )?,
    };
    let model_config = config.model_config(tokenizer.vocab_size())?;
    println!(
        "training {} parameters ({} without embeddings): d_model {}, {} layers, {} heads, d_ff {}; {} steps of {} × {} sequences",
        model_config.parameter_count(),
        model_config.non_embedding_parameter_count(),
        model_config.d_model,
        model_config.n_layers,
        model_config.n_heads,
        model_config.d_ff,
        config.train.steps,
        config.train.batch_size,
        config.train.grad_accum
    );
    let options = TrainOptions {
        resume: args.resume,
        progress: !args.quiet,
        stop_after: None,
    };
    let summary = train(&config, &args.out, assets, tokenizer, &options)?;
    println!(
        "trained {} steps in {:.1} min: {:.0} tokens/s, {} tokens, final loss {:.4}",
        summary.steps,
        summary.elapsed_s / 60.0,
        summary.tokens_per_s,
        summary.tokens_seen,
        summary.final_loss
    );
    println!(
        "\nvalidation ({} samples per set)\n\n{}",
        config.train.eval_samples,
        markdown(&summary.validation)
    );
    println!("run directory: {}", args.out.display());
    Ok(())
}

pub fn parse_tasks(tasks: &str) -> Result<Vec<Task>> {
    if tasks == "all" {
        return Ok(Task::ALL.to_vec());
    }
    tasks
        .split(',')
        .map(|t| {
            let task = t.trim().parse::<Task>()?;
            if !Task::ALL.contains(&task) {
                bail!("--tasks: {task} is a training-only task with no evaluation set");
            }
            Ok(task)
        })
        .collect()
}

pub fn run_eval(args: EvalArgs, paths: &DataPaths) -> Result<()> {
    if args.split == Split::Train {
        bail!("--split train: evaluation uses the fixed val or test sets");
    }
    // `describe` has an evaluation set but is a diagnostic, not a benchmark task: only eval takes it.
    let mut describe = false;
    let mut tasks = Vec::new();
    for name in args.tasks.split(',').map(str::trim) {
        match name {
            "describe" => describe = true,
            name => tasks.extend(parse_tasks(name)?),
        }
    }
    let device = default_device()?;
    let (model, tokenizer, config) = RunDir::new(&args.model).load(&device)?;
    let assets = checked_assets(paths, &config)?;
    let mut specs: Vec<EvalSpec> = EvalSpec::all(args.split)
        .into_iter()
        .filter(|s| tasks.contains(&s.task))
        .collect();
    if describe {
        specs.push(EvalSpec::describe(args.split));
    }
    let started = Instant::now();
    let results = evaluate(
        &model,
        &tokenizer,
        &assets,
        &config.sequence,
        &specs,
        args.count,
        args.batch_size,
    )?;
    println!("{}", markdown(&results));
    println!(
        "{} sets × {} samples in {:.1} s; image-task mean accuracy {:.1}%",
        specs.len(),
        args.count,
        started.elapsed().as_secs_f64(),
        100.0 * mean_accuracy(&results)
    );
    let out = args
        .json
        .unwrap_or_else(|| args.model.join(format!("eval-{}.json", args.split)));
    tokenfold_data::write_atomic(&out, serde_json::to_string_pretty(&results)?.as_bytes())?;
    println!("wrote {}", out.display());
    Ok(())
}

pub fn load_image(path: &Path, size: u32) -> Result<image::RgbImage> {
    let image =
        image::open(path).with_context(|| format!("cannot read image {}", path.display()))?;
    let rgb = image.to_rgb8();
    Ok(if rgb.dimensions() == (size, size) {
        rgb
    } else {
        image::imageops::resize(&rgb, size, size, image::imageops::FilterType::Triangle)
    })
}

pub fn run_ask(args: AskArgs) -> Result<()> {
    let Some(path) = args.image.as_deref() else {
        bail!("--image is required: the model answers questions about an image");
    };
    let device = default_device()?;
    let (model, tokenizer, config) = RunDir::new(&args.model).load(&device)?;
    let image = load_image(path, config.sequence.image_size)?;
    let reply = answer_question(
        &model,
        &tokenizer,
        &config.sequence,
        &image,
        args.question.trim(),
    )?;
    println!("{reply}");
    Ok(())
}
