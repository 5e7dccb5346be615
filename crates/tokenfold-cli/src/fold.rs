//! `tokenfold fold …`: run visual-token reduction plans on a trained model, compare methods at the standard
//! budgets, and show which patches survive.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tokenfold_data::evalset::EVAL_SIZE;
use tokenfold_data::{DataPaths, EvalSpec, Split};
use tokenfold_fold::budget::{Geometry, fit};
use tokenfold_fold::report::{PlanReport, compare_markdown, evaluate_plan, measure_latency};
use tokenfold_fold::{FoldHook, Method, Plan};
use tokenfold_model::eval::markdown;
use tokenfold_model::train::{RunDir, default_device};
use tokenfold_model::{KvCache, NativeModel};

use crate::model::{checked_assets, load_image, parse_tasks};
use crate::plot::{self, Chart, Series};

#[derive(Subcommand)]
pub enum FoldCommand {
    /// Evaluate one plan: per-task accuracy, budget figures, prefill latency.
    #[command(
        after_help = "Example:\n  tokenfold fold plan --model runs/nmm-s --method fastv --budget 0.111 --out plan.json\n  tokenfold fold eval --model runs/nmm-s --plan plan.json"
    )]
    Eval(EvalArgs),
    /// Every method at every budget, fitted by one rule: the literature's main table on our benchmark.
    #[command(
        after_help = "Example:\n  tokenfold fold compare --model runs/nmm-s --budgets 0.333,0.222,0.111,0.028 --methods all --out results/fold"
    )]
    Compare(CompareArgs),
    /// Write the plan of a method fitted to a budget.
    #[command(
        after_help = "Example:\n  tokenfold fold plan --model runs/nmm-s --method pdrop --budget 0.222 --out pdrop.json"
    )]
    Plan(PlanArgs),
    /// Draw which patches survive each stage of a plan over an image.
    #[command(
        after_help = "Example:\n  tokenfold fold show --model runs/nmm-s --image scene.png --plan plan.json --out kept.png \"how many animals are there?\""
    )]
    Show(ShowArgs),
}

#[derive(Args)]
pub struct EvalArgs {
    /// Run directory of a trained model.
    #[arg(long)]
    pub model: PathBuf,
    /// A plan (JSON), as `fold plan` or `search` write it.
    #[arg(long)]
    pub plan: PathBuf,
    #[arg(long, default_value = "all")]
    pub tasks: String,
    #[arg(long, default_value = "test")]
    pub split: Split,
    /// Samples per evaluation set.
    #[arg(short = 'n', long, default_value_t = EVAL_SIZE)]
    pub count: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct CompareArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Budgets as shares of the visual tokens (FLOPs-equivalent average).
    #[arg(long, default_value = "0.333,0.222,0.111,0.028", value_delimiter = ',')]
    pub budgets: Vec<f64>,
    /// Methods (fastv, pdrop, sparsevlm, dart, tome, visionzip, prumerge, pool, random), `all`, and plan
    /// files (*.json), comma-separated.
    #[arg(long, default_value = "all")]
    pub methods: String,
    #[arg(long, default_value = "all")]
    pub tasks: String,
    #[arg(long, default_value = "test")]
    pub split: Split,
    #[arg(short = 'n', long, default_value_t = EVAL_SIZE)]
    pub count: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Prefill latency: batch size and timed repeats per plan (0 repeats: skip).
    #[arg(long, default_value_t = 16,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub latency_batch: usize,
    #[arg(long, default_value_t = 5)]
    pub latency_repeats: usize,
    /// Output folder: compare.md, compare.json, accuracy-flops.{svg,png}, and rows/ with each finished
    /// row (a rerun reuses the rows whose model, plan and settings are unchanged).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct PlanArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub method: String,
    /// Share of the visual tokens (FLOPs-equivalent average), e.g. 0.111.
    #[arg(long)]
    pub budget: f64,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct ShowArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub image: PathBuf,
    #[arg(long)]
    pub plan: PathBuf,
    /// PNG with the image, then one panel per stage.
    #[arg(long)]
    pub out: PathBuf,
    /// The question the text-guided methods rank patches by.
    #[arg(default_value = "what is in the picture?")]
    pub question: String,
}

pub fn run(command: FoldCommand, paths: &DataPaths) -> Result<()> {
    match command {
        FoldCommand::Eval(args) => run_eval(args, paths),
        FoldCommand::Compare(args) => run_compare(args, paths),
        FoldCommand::Plan(args) => run_plan(args),
        FoldCommand::Show(args) => run_show(args),
    }
}

fn specs_for(tasks: &str, split: Split) -> Result<Vec<EvalSpec>> {
    if split == Split::Train {
        bail!("--split train: evaluation uses the fixed val or test sets");
    }
    let tasks = parse_tasks(tasks)?;
    Ok(EvalSpec::all(split)
        .into_iter()
        .filter(|s| tasks.contains(&s.task))
        .collect())
}

fn print_report(report: &PlanReport) {
    println!("{}", markdown(&report.sets));
    let b = &report.budget;
    println!(
        "visual tokens: {} per image; entering layer 0: {:.1}; per layer: [{}]",
        b.visual_tokens,
        b.first_layer,
        b.entering
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "FLOPs-equivalent tokens: {:.1}% measured ({:.1}% planned); analytical prefill FLOPs {:.1}% of the full model",
        100.0 * b.measured_share,
        100.0 * b.planned_share,
        100.0 * b.flops_share
    );
    if let Some(l) = &report.latency {
        println!(
            "prefill, batch {}: {:.1} ms full, {:.1} ms with the plan ({:.2}× speed-up, predicted {:.2}× by FLOPs); reduction overhead {:.2} ms ({:.1}% of the plan's prefill)",
            l.batch,
            l.full_ms,
            l.plan_ms,
            l.speedup(),
            1.0 / b.flops_share.max(1e-9),
            l.overhead_ms,
            100.0 * l.overhead_share()
        );
    }
}

fn load_model(
    dir: &Path,
) -> Result<(
    NativeModel,
    tokenfold_data::TextTokenizer,
    tokenfold_model::train::RunConfig,
)> {
    let device = default_device()?;
    Ok(RunDir::new(dir).load(&device)?)
}

fn run_eval(args: EvalArgs, paths: &DataPaths) -> Result<()> {
    let specs = specs_for(&args.tasks, args.split)?;
    let (model, tokenizer, config) = load_model(&args.model)?;
    let plan = Plan::load(&args.plan)?;
    plan.validate(model.n_layers())
        .with_context(|| format!("{}", args.plan.display()))?;
    let assets = checked_assets(paths, &config)?;
    let started = Instant::now();
    let mut report = evaluate_plan(
        &model,
        &tokenizer,
        &assets,
        &config.sequence,
        &specs,
        args.count,
        args.batch_size,
        &plan,
    )?;
    report.latency = Some(measure_latency(
        &model,
        &tokenizer,
        &assets,
        &config.sequence,
        &plan,
        16,
        5,
    )?);
    print_report(&report);
    println!("evaluated in {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = args.json {
        tokenfold_fold::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The plans `--methods` names at `budget`: fitted methods, and plan files as they are.
fn plans_for(methods: &str, budget: f64, geometry: Geometry) -> Result<Vec<Plan>> {
    let mut plans = Vec::new();
    for item in methods.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item == "all" {
            for method in Method::ALL {
                plans.push(fit(method, budget, geometry)?);
            }
        } else if item.ends_with(".json") {
            plans.push(Plan::load(Path::new(item))?);
        } else {
            plans.push(fit(Method::parse(item)?, budget, geometry)?);
        }
    }
    Ok(plans)
}

fn run_compare(args: CompareArgs, paths: &DataPaths) -> Result<()> {
    let specs = specs_for(&args.tasks, args.split)?;
    for &b in &args.budgets {
        if !(b > 0.0 && b <= 1.0) {
            bail!("--budgets: {b} is outside (0, 1]");
        }
    }
    let (model, tokenizer, config) = load_model(&args.model)?;
    let geometry = Geometry::of(&model.config);
    // Fit every plan first, so that a bad method name fails before any evaluation.
    let mut rows: Vec<(Option<f64>, Plan)> = vec![(None, Plan::full())];
    for &budget in &args.budgets {
        for plan in plans_for(&args.methods, budget, geometry)? {
            plan.validate(model.n_layers())?;
            rows.push((Some(budget), plan));
        }
    }
    let assets = checked_assets(paths, &config)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut reports: Vec<(Option<f64>, PlanReport)> = Vec::new();
    let started = Instant::now();
    // Each finished row is kept in <out>/rows/, so an interrupted comparison resumes where it stopped.
    let rows_dir = args.out.join("rows");
    let model_weights = RunDir::new(&args.model)
        .checkpoint()
        .join("model.safetensors");
    let model_stamp = std::fs::metadata(&model_weights)
        .and_then(|m| m.modified())
        .map(|t| format!("{t:?}"))
        .unwrap_or_default();
    for (i, (budget, plan)) in rows.iter().enumerate() {
        let key = serde_json::json!({
            "model": model_stamp, "plan": plan, "split": args.split.name(), "count": args.count,
            "sets": specs.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "latency": [args.latency_batch, args.latency_repeats],
        });
        let row_path = rows_dir.join(format!(
            "{}-{}.json",
            budget.map_or("full".into(), |b| format!("{b:.4}")),
            plan.name
        ));
        let cached: Option<PlanReport> = std::fs::read(&row_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .filter(|row| row["key"] == key)
            .and_then(|row| serde_json::from_value(row["report"].clone()).ok());
        let reused = cached.is_some();
        let report = match cached {
            Some(report) => report,
            None => {
                let mut report = evaluate_plan(
                    &model,
                    &tokenizer,
                    &assets,
                    &config.sequence,
                    &specs,
                    args.count,
                    args.batch_size,
                    plan,
                )?;
                if args.latency_repeats > 0 {
                    report.latency = Some(measure_latency(
                        &model,
                        &tokenizer,
                        &assets,
                        &config.sequence,
                        plan,
                        args.latency_batch,
                        args.latency_repeats,
                    )?);
                }
                let row = serde_json::json!({"key": key, "report": report});
                tokenfold_fold::write_atomic(&row_path, serde_json::to_string(&row)?.as_bytes())?;
                report
            }
        };
        eprintln!(
            "[{}/{}] {} at {}: {:.1}% ({:.0} s{})",
            i + 1,
            rows.len(),
            plan.name,
            budget.map_or("full".into(), |b| format!("{:.1}%", 100.0 * b)),
            100.0 * report.mean_accuracy,
            started.elapsed().as_secs_f64(),
            if reused { ", reused from rows/" } else { "" }
        );
        reports.push((*budget, report));
    }
    let mut md = format!(
        "# Visual-token reduction on {} ({} split, {} samples per set)\n\n",
        args.model.display(),
        args.split,
        args.count
    );
    let full: Vec<PlanReport> = reports
        .iter()
        .filter(|(b, _)| b.is_none())
        .map(|(_, r)| r.clone())
        .collect();
    for &budget in &args.budgets {
        let mut table: Vec<PlanReport> = full.clone();
        table.extend(
            reports
                .iter()
                .filter(|(b, _)| *b == Some(budget))
                .map(|(_, r)| r.clone()),
        );
        md.push_str(&format!(
            "## Budget {:.1}% of the visual tokens ({:.1} of {})\n\n{}\n",
            100.0 * budget,
            budget * geometry.n0() as f64,
            geometry.n0(),
            compare_markdown(&table)
        ));
    }
    print!("{md}");
    let md_path = args.out.join("compare.md");
    tokenfold_fold::write_atomic(&md_path, md.as_bytes())?;
    let json: Vec<serde_json::Value> = reports
        .iter()
        .map(|(budget, report)| serde_json::json!({"budget": budget, "report": report}))
        .collect();
    let json_path = args.out.join("compare.json");
    tokenfold_fold::write_atomic(&json_path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    println!("wrote {} and {}", md_path.display(), json_path.display());
    let mut series: Vec<Series> = Vec::new();
    for (budget, report) in &reports {
        if budget.is_none() {
            continue;
        }
        let point = (
            100.0 * report.budget.flops_share,
            100.0 * report.mean_accuracy,
        );
        match series.iter_mut().find(|s| s.name == report.plan.name) {
            Some(s) => s.points.push(point),
            None => series.push(Series {
                name: report.plan.name.clone(),
                points: vec![point],
                line: true,
            }),
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    if let Some(full) = full.first() {
        series.push(Series {
            name: "full model".into(),
            points: vec![(100.0, 100.0 * full.mean_accuracy)],
            line: true,
        });
    }
    let title = format!("Accuracy against prefill FLOPs ({})", args.model.display());
    let chart = Chart {
        title: &title,
        x_label: "prefill FLOPs, % of the full model",
        y_label: "mean accuracy over image-task sets, %",
        series: &series,
    };
    let (svg, png) = plot::save(&chart, &args.out.join("accuracy-flops"))?;
    println!("wrote {} and {}", svg.display(), png.display());
    Ok(())
}

fn run_plan(args: PlanArgs) -> Result<()> {
    let config: tokenfold_model::ModelConfig = serde_json::from_str(
        &std::fs::read_to_string(RunDir::new(&args.model).model_config())
            .with_context(|| format!("{} is not a run directory", args.model.display()))?,
    )?;
    let geometry = Geometry::of(&config);
    let plan = fit(Method::parse(&args.method)?, args.budget, geometry)?;
    plan.save(&args.out)?;
    println!(
        "{}: {:.1}% of the visual tokens as the FLOPs-equivalent average (budget {:.1}%); tokens entering each layer: {:?}",
        plan.name,
        100.0 * plan.equivalent_share(geometry.n_layers, geometry.n0(), geometry.grid),
        100.0 * args.budget,
        plan.planned_tokens(geometry.n_layers, geometry.n0(), geometry.grid)
    );
    println!("wrote {}", args.out.display());
    Ok(())
}

fn run_show(args: ShowArgs) -> Result<()> {
    let (model, tokenizer, config) = load_model(&args.model)?;
    let plan = Plan::load(&args.plan)?;
    plan.validate(model.n_layers())
        .with_context(|| format!("{}", args.plan.display()))?;
    let image = load_image(&args.image, config.sequence.image_size)?;
    let prompt = tokenfold_data::sequence::encode_prompt(
        Some(&image),
        args.question.trim(),
        &tokenizer,
        &config.sequence,
    )?;
    let inputs = tokenfold_model::eval::prompt_inputs(
        &[prompt],
        tokenizer.special.pad,
        &config.sequence,
        model.device(),
    )?;
    let mut hook = FoldHook::new(&model, &plan);
    hook.record_groups = true;
    let logits = model.prefill(&inputs, &mut hook, &mut KvCache::default())?;
    let first: u32 = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?[0];
    let grid = model.config.image_grid as u32;
    let scale = 4u32;
    let side = config.sequence.image_size * scale;
    let panels = 1 + hook.groups.len() as u32;
    let mut canvas =
        image::RgbImage::from_pixel(panels * (side + 8), side, image::Rgb([255, 255, 255]));
    let big = image::imageops::resize(&image, side, side, image::imageops::FilterType::Nearest);
    image::imageops::replace(&mut canvas, &big, 0, 0);
    let patch = side / grid;
    for (panel, (_, groups)) in hook.groups.iter().enumerate() {
        let x0 = (panel as u32 + 1) * (side + 8);
        let mut layer_image = image::RgbImage::new(side, side);
        // Dropped patches dimmed; merged members tinted with their group's colour; representatives bright.
        for (x, y, p) in layer_image.enumerate_pixels_mut() {
            let src = big.get_pixel(x, y);
            *p = image::Rgb(src.0.map(|v| v / 5 + 20));
        }
        for (g, members) in groups[0].iter().enumerate() {
            let colour = palette(g);
            for (m, &cell) in members.iter().enumerate() {
                let (cy, cx) = (cell / grid, cell % grid);
                for y in cy * patch..(cy + 1) * patch {
                    for x in cx * patch..(cx + 1) * patch {
                        let src = big.get_pixel(x, y).0;
                        let border = x == cx * patch
                            || y == cy * patch
                            || x + 1 == (cx + 1) * patch
                            || y + 1 == (cy + 1) * patch;
                        let pixel = if m == 0 {
                            if border { colour } else { src }
                        } else {
                            [0, 1, 2].map(|c| ((src[c] as u16 + colour[c] as u16) / 2) as u8)
                        };
                        layer_image.put_pixel(x, y, image::Rgb(pixel));
                    }
                }
            }
        }
        image::imageops::replace(&mut canvas, &layer_image, x0 as i64, 0);
    }
    canvas
        .save(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    for (layer, groups) in &hook.groups {
        let merged = groups[0].iter().filter(|g| g.len() > 1).count();
        println!(
            "layer {layer}: {} tokens survive ({merged} of them merged tokens)",
            groups[0].len()
        );
    }
    println!(
        "first answer token with the plan: {:?}",
        tokenizer.decode(&[first])?
    );
    println!(
        "wrote {} (the image, then one panel per stage)",
        args.out.display()
    );
    Ok(())
}

fn palette(i: usize) -> [u8; 3] {
    const COLOURS: [[u8; 3]; 8] = [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
    ];
    COLOURS[i % COLOURS.len()]
}
