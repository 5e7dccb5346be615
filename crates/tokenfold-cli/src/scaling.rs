//! `tokenfold fit`: scaling laws from a runs file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;
use tokenfold_scaling::law::{
    self, Allocation, Bootstrap, ComputeFrontier, FitOptions, PredictionError, StartGrid,
};
use tokenfold_scaling::runs::{self, Holdout};
use tokenfold_scaling::sweep::{self, Grid, Outcome, Shard};
use tokenfold_scaling::{Fit, RunRecord};

use crate::plot::{self, Chart, Series};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GridChoice {
    /// Chinchilla's 4,500 starts.
    Chinchilla,
    /// 243 starts over the same ranges (quick looks).
    Coarse,
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// `runs.jsonl` from `tokenfold sweep run`, or a CSV with columns n, d, loss (and optionally flops).
    pub runs: PathBuf,
    /// Validation loss to fit: `avg` (mean over task types) or one task type (`caption`, `text`, …).
    /// A CSV's loss column is `loss`.
    #[arg(long, default_value = "avg")]
    pub target: String,
    /// Runs to hold out of the fit and predict, e.g. `params>=5e6` or `flops>1e15`.
    #[arg(long)]
    pub holdout: Option<String>,
    /// Bootstrap resamples for the confidence intervals (0: none).
    #[arg(long, default_value_t = 100)]
    pub bootstrap: usize,
    #[arg(long, value_enum, default_value_t = GridChoice::Chinchilla)]
    pub grid: GridChoice,
    /// Runs at or below this many FLOPs are left out of the loss–compute frontier.
    #[arg(long, default_value_t = 0.0)]
    pub min_flops: f64,
    /// Write fit.json, report.md and the plots (SVG and PNG) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Everything fitted for one architecture.
struct Family {
    architecture: String,
    runs: Vec<RunRecord>,
    held_out: Vec<RunRecord>,
    fit: Fit,
    held_in_error: PredictionError,
    held_out_error: Option<PredictionError>,
    bootstrap: Option<Bootstrap>,
    regression: Allocation,
    frontier: Option<ComputeFrontier>,
    compression: Option<Compression>,
}

/// The compression-factor law against the plain one.
struct Compression {
    modalities: Vec<String>,
    /// Lowest and highest share of tokens from the second modality over the runs: the weights are only
    /// identifiable if it varies.
    share_range: (f64, f64),
    /// Measured raw bytes per token, median over runs.
    bytes_per_token: Vec<f64>,
    /// The weighted fit and its error; None when the modality mix barely varies (see [`MIN_SHARE_RANGE`]).
    fit: Option<(Fit, PredictionError)>,
}

/// Below this spread of the second modality's token share across runs, D_eff is nearly a constant
/// multiple of D and the modality weights are not identifiable: the fit is not attempted.
const MIN_SHARE_RANGE: f64 = 0.05;

/// N as a function of (C, D) for the architecture's FLOPs convention: C = 6·D·N·(1 + x) for late
/// fusion, where x = N_v·D_v/(N·D) is the encoder's share taken as the runs' median. Each run's x is
/// read off its own recorded FLOPs, so encoder tokens count as the record counted them (r² per image
/// token under pixel-unshuffle).
fn params_for(runs: &[RunRecord]) -> impl Fn(f64, f64) -> f64 + use<> {
    let ratios: Vec<f64> = runs
        .iter()
        .filter(|r| r.vision_params.is_some())
        .map(|r| r.flops / (6.0 * r.params * r.tokens) - 1.0)
        .collect();
    let extra = median(ratios).unwrap_or(0.0);
    move |c, d| c / (6.0 * d * (1.0 + extra))
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

fn fit_family(
    architecture: &str,
    all: Vec<RunRecord>,
    holdout: Option<&Holdout>,
    args: &FitArgs,
    options: &FitOptions,
) -> Result<Family> {
    let (held_out, runs): (Vec<RunRecord>, Vec<RunRecord>) = all
        .into_iter()
        .partition(|r| holdout.is_some_and(|h| h.holds_out(r)));
    let points =
        runs::points(&runs, &args.target).with_context(|| format!("{architecture} runs"))?;
    let fit =
        law::fit(&points, options).with_context(|| format!("fitting the {architecture} runs"))?;
    let held_in_error = law::prediction_error(&fit.law, &points);
    let held_out_error = if held_out.is_empty() {
        None
    } else {
        Some(law::prediction_error(
            &fit.law,
            &runs::points(&held_out, &args.target)?,
        ))
    };
    let bootstrap = (args.bootstrap > 0)
        .then(|| law::bootstrap(&points, &fit, options, args.bootstrap, args.seed))
        .transpose()?;
    let flops: Vec<f64> = runs.iter().map(|r| r.flops).collect();
    let (lo, hi) = flops
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &c| (a.min(c), b.max(c)));
    // Budgets from the smallest run to 100× the largest, 12 per decade.
    let decades = ((hi * 100.0) / lo).log10().max(1.0);
    let count = (decades * 12.0).ceil() as usize + 1;
    let budgets: Vec<f64> = (0..count)
        .map(|i| lo * 10f64.powf(decades * i as f64 / (count - 1) as f64))
        .collect();
    let regression = law::optimal_by_regression(&fit.law, &budgets, params_for(&runs))?;
    let frontier_points: Vec<(f64, f64)> = runs
        .iter()
        .zip(&points)
        .map(|(r, p)| (r.flops, p.loss))
        .collect();
    let frontier = law::compute_frontier(&frontier_points, args.min_flops).ok();
    let compression = fit_compression(&runs, args, options)?;
    Ok(Family {
        architecture: architecture.to_string(),
        runs,
        held_out,
        fit,
        held_in_error,
        held_out_error,
        bootstrap,
        regression,
        frontier,
        compression,
    })
}

/// Fits D_eff = Σ w_j·T_j when every run has per-modality tokens and bytes; text first as the reference.
fn fit_compression(
    runs: &[RunRecord],
    args: &FitArgs,
    options: &FitOptions,
) -> Result<Option<Compression>> {
    let Some(first) = runs.first() else {
        return Ok(None);
    };
    let mut modalities: Vec<String> = first.tokens_by_modality.keys().cloned().collect();
    modalities.sort_by_key(|m| (m != "text", m.clone()));
    let complete = modalities.len() >= 2
        && runs.iter().all(|r| {
            modalities
                .iter()
                .all(|m| r.compression(m).is_some_and(|c| c > 0.0))
        });
    // Five parameters plus one weight per extra modality need as many runs.
    if !complete || runs.len() < 4 + modalities.len() {
        return Ok(None);
    }
    let points = runs::modality_points(runs, &args.target, &modalities)?;
    let bytes_per_token = modalities
        .iter()
        .map(|m| median(runs.iter().filter_map(|r| r.compression(m)).collect()).unwrap_or(f64::NAN))
        .collect();
    let shares: Vec<f64> = points
        .iter()
        .map(|p| p.tokens[1] / p.tokens.iter().sum::<f64>())
        .collect();
    let share_range = shares
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &s| (lo.min(s), hi.max(s)));
    let fit = if share_range.1 - share_range.0 >= MIN_SHARE_RANGE {
        let fit = law::fit(&points, options).context("fitting the compression-factor law")?;
        let error = law::prediction_error(&fit.law, &points);
        Some((fit, error))
    } else {
        None
    };
    Ok(Some(Compression {
        modalities,
        share_range,
        bytes_per_token,
        fit,
    }))
}

fn interval(i: &law::Interval) -> String {
    let [mean, std, p05, p95] = [i.mean, i.std, i.p05, i.p95].map(number);
    format!("{mean} ± {std} [{p05}, {p95}]")
}

/// Four decimals in the everyday range, scientific notation outside it (a bootstrap of a loose fit can
/// reach 1e100).
fn number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() || (1e-3..1e4).contains(&x.abs()) {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

fn error_row(name: &str, e: &PredictionError) -> String {
    format!(
        "| {name} | {} | {:.3e} | {:.4} | {:.2}% |\n",
        e.runs, e.mse, e.r2, e.mae_percent
    )
}

fn markdown(families: &[Family], args: &FitArgs) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Scaling-law fit: `{}`, target `{}`\n",
        args.runs.display(),
        args.target
    );
    for f in families {
        let l = &f.fit.law;
        let (a, b) = l.allocation_exponents();
        let _ = writeln!(
            out,
            "## {} ({} runs fitted, {} held out)\n",
            f.architecture,
            f.runs.len(),
            f.held_out.len()
        );
        let _ = writeln!(
            out,
            "L(N, D) = {:.4} + {:.4e}/N^{:.4} + {:.4e}/D^{:.4}  (summed Huber {:.3e}, {} starts, {} failed)\n",
            l.e, l.a, l.alpha, l.b, l.beta, f.fit.objective, f.fit.starts, f.fit.failed_starts
        );
        if f.fit.on_boundary() {
            let _ = writeln!(
                out,
                "**Warning: the optimum is at the edge of the start grid** (edge: {}; outside: {}). Widen the grid or add runs.\n",
                f.fit.boundary.join(", "),
                f.fit.outside_grid.join(", ")
            );
        }
        let _ = writeln!(out, "| | a (N* ∝ C^a) | b (D* ∝ C^b) |\n|---|---|---|");
        let _ = writeln!(out, "| closed form | {a:.4} | {b:.4} |");
        let _ = writeln!(
            out,
            "| regression | {:.4} | {:.4} |\n",
            f.regression.n_exponent, f.regression.d_exponent
        );
        if let Some(boot) = &f.bootstrap {
            let _ = writeln!(
                out,
                "Bootstrap ({} resamples, {} failed): mean ± std [5%, 95%]\n",
                boot.resamples, boot.failed
            );
            let _ = writeln!(out, "| parameter | interval |\n|---|---|");
            for (name, i) in [
                ("E", &boot.e),
                ("A", &boot.a),
                ("B", &boot.b),
                ("α", &boot.alpha),
                ("β", &boot.beta),
                ("a", &boot.n_exponent),
                ("b", &boot.d_exponent),
            ] {
                let _ = writeln!(out, "| {name} | {} |", interval(i));
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "| runs | count | MSE | R² | MAE |\n|---|---|---|---|---|"
        );
        out.push_str(&error_row("held in", &f.held_in_error));
        if let Some(e) = &f.held_out_error {
            out.push_str(&error_row("held out", e));
        }
        out.push('\n');
        if let Some(fr) = &f.frontier {
            let _ = writeln!(
                out,
                "Loss–compute frontier: L = {:.4}·C^{:.4} over {} hull runs.\n",
                fr.k,
                fr.c,
                fr.hull.len()
            );
        }
        let _ = writeln!(
            out,
            "| C (FLOPs) | N* closed form | D* closed form | N* regression | D* regression |\n|---|---|---|---|---|"
        );
        for &(c, n, d) in f.regression.optima.iter().step_by(12) {
            let (cn, cd) = l.optimal(c);
            let _ = writeln!(out, "| {c:.2e} | {cn:.3e} | {cd:.3e} | {n:.3e} | {d:.3e} |");
        }
        out.push('\n');
        let moe: Vec<&RunRecord> = f
            .runs
            .iter()
            .filter(|r| !r.specialisation.is_empty())
            .collect();
        if !moe.is_empty() {
            let layers = moe
                .iter()
                .map(|r| r.specialisation.len())
                .max()
                .unwrap_or(0);
            let mean: Vec<String> = (0..layers)
                .map(|l| {
                    let v: Vec<f64> = moe
                        .iter()
                        .filter_map(|r| r.specialisation.get(l).copied())
                        .collect();
                    format!("{:.3}", v.iter().sum::<f64>() / v.len() as f64)
                })
                .collect();
            let _ = writeln!(
                out,
                "Expert specialisation per layer (mean over {} runs): {}\n",
                moe.len(),
                mean.join(", ")
            );
        }
        if let Some(c) = &f.compression {
            let _ = writeln!(out, "### Compression-factor law: D_eff = Σ w_i·T_i\n");
            let (lo, hi) = c.share_range;
            let _ = writeln!(
                out,
                "The {} share of tokens ranges over {:.1}–{:.1}% across runs.\n",
                c.modalities[1],
                100.0 * lo,
                100.0 * hi
            );
            match &c.fit {
                Some((fit, error)) => {
                    let _ = writeln!(
                        out,
                        "| modality | bytes per token C_i | weight w_i | bytes per effective token C_i/w_i |\n|---|---|---|---|"
                    );
                    for ((m, bytes), w) in c
                        .modalities
                        .iter()
                        .zip(&c.bytes_per_token)
                        .zip(&fit.law.weights)
                    {
                        let _ = writeln!(out, "| {m} | {bytes:.2} | {w:.4} | {:.2} |", bytes / w);
                    }
                    let _ = writeln!(
                        out,
                        "\nWith fitted weights: objective {:.3e}, MAE {:.2}%; with every token counted alike (the hypothesis as stated, D = Σ T_i/C_i): objective {:.3e}, MAE {:.2}%.\n",
                        fit.objective,
                        error.mae_percent,
                        f.fit.objective,
                        f.held_in_error.mae_percent
                    );
                }
                None => {
                    let _ = writeln!(out, "| modality | bytes per token C_i |\n|---|---|");
                    for (m, bytes) in c.modalities.iter().zip(&c.bytes_per_token) {
                        let _ = writeln!(out, "| {m} | {bytes:.2} |");
                    }
                    let _ = writeln!(
                        out,
                        "\n**The modality weights are not identifiable from these runs**: with a nearly fixed modality mix (share range under {:.0} points), D_eff is a constant multiple of D and any weight fits equally well, so the weighted law was not fitted. Sweep several mixtures to test the hypothesis.\n",
                        100.0 * MIN_SHARE_RANGE
                    );
                }
            }
        }
    }
    out
}

/// Architectures compared run by run: runs of the same width, steps and mixture in two families.
fn comparisons(by_architecture: &BTreeMap<String, Vec<RunRecord>>, target: &str) -> String {
    let key = |r: &RunRecord| {
        ["width", "steps", "mixture"]
            .map(|k| r.labels.get(k).cloned().unwrap_or_default())
            .join("/")
    };
    let mut out = String::new();
    let families: Vec<(&String, &Vec<RunRecord>)> = by_architecture.iter().collect();
    for (i, (a, a_runs)) in families.iter().enumerate() {
        for (b, b_runs) in &families[i + 1..] {
            let mut pairs = Vec::new();
            for ra in a_runs.iter() {
                if let Some(rb) = b_runs
                    .iter()
                    .find(|rb| key(rb) == key(ra) && !key(ra).is_empty())
                    && let (Some(la), Some(lb)) = (ra.target_loss(target), rb.target_loss(target))
                {
                    pairs.push((key(ra), ra.active(), la, lb));
                }
            }
            if pairs.is_empty() {
                continue;
            }
            if out.is_empty() {
                let _ = writeln!(
                    out,
                    "## Architectures compared run by run (same width, steps, mixture)\n"
                );
            }
            let better = pairs.iter().filter(|p| p.3 < p.2).count();
            let mean = pairs.iter().map(|p| p.3 - p.2).sum::<f64>() / pairs.len() as f64;
            let _ = writeln!(
                out,
                "**{b} against {a}**: lower loss in {better} of {} pairs, mean difference {mean:+.4} nats/token.\n",
                pairs.len()
            );
            let _ = writeln!(
                out,
                "| run | N_active ({a}) | {a} | {b} |\n|---|---|---|---|"
            );
            for (k, n, la, lb) in &pairs {
                let _ = writeln!(out, "| {k} | {n:.3e} | {la:.4} | {lb:.4} |");
            }
            out.push('\n');
        }
    }
    out
}

fn family_json(f: &Family) -> serde_json::Value {
    json!({
        "architecture": f.architecture,
        "runs": f.runs.iter().map(|r| &r.name).collect::<Vec<_>>(),
        "held_out": f.held_out.iter().map(|r| &r.name).collect::<Vec<_>>(),
        "fit": f.fit,
        "allocation_closed_form": { "a": f.fit.law.allocation_exponents().0, "b": f.fit.law.allocation_exponents().1 },
        "allocation_regression": f.regression,
        "held_in_error": f.held_in_error,
        "held_out_error": f.held_out_error,
        "bootstrap": f.bootstrap,
        "frontier": f.frontier,
        "compression": f.compression.as_ref().map(|c| json!({
            "modalities": c.modalities, "bytes_per_token": c.bytes_per_token,
            "fit": c.fit.as_ref().map(|f| &f.0), "error": c.fit.as_ref().map(|f| &f.1),
            "share_range": c.share_range,
        })),
    })
}

fn plots(families: &[Family], target: &str, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    // Loss against FLOPs: one line per (architecture, model size), the frontier per architecture.
    let mut series = Vec::new();
    for f in families {
        let mut by_size: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
        for run in &f.runs {
            if let Some(loss) = run.target_loss(target) {
                by_size
                    .entry(run.active() as u64)
                    .or_default()
                    .push((run.flops.log10(), loss));
            }
        }
        for (size, mut pts) in by_size {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            series.push(Series {
                name: format!("{} N={:.2e}", f.architecture, size as f64),
                points: pts,
                line: true,
            });
        }
        if let Some(fr) = &f.frontier {
            let (c0, c1) = (fr.hull[0].0.log10(), fr.hull[fr.hull.len() - 1].0.log10());
            let pts = (0..20)
                .map(|i| {
                    let x = c0 + (c1 - c0) * i as f64 / 19.0;
                    (x, fr.k * 10f64.powf(x * fr.c))
                })
                .collect();
            series.push(Series {
                name: format!("{} frontier C^{:.3}", f.architecture, fr.c),
                points: pts,
                line: true,
            });
        }
    }
    let y_label = format!("validation loss ({target}), nats/token");
    let chart = Chart {
        title: "Loss against training compute",
        x_label: "log10 FLOPs",
        y_label: &y_label,
        series: &series,
    };
    let (svg, png) = plot::save(&chart, &dir.join("loss-vs-flops"))?;
    written.extend([svg, png]);

    // Iso-FLOP curves of each family's law (one plot per architecture), and N*, D* against C.
    let mut optimal = Vec::new();
    for f in families {
        let mut iso = Vec::new();
        let params_for = params_for(&f.runs);
        for &(c, _, d_opt) in f.regression.optima.iter().step_by(12).take(5) {
            // Token counts from 1/30 to 30 times the compute-optimal one, kept up to 1.5 times the
            // curve's minimum, so each curve shows its valley.
            let pts: Vec<(f64, f64)> = (0..60)
                .filter_map(|i| {
                    let d = d_opt * 10f64.powf(-1.5 + 3.0 * i as f64 / 59.0);
                    let n = params_for(c, d);
                    (n >= 1.0).then(|| (n.log10(), f.fit.law.loss(n, d)))
                })
                .collect();
            let floor = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
            iso.push(Series {
                name: format!("C={c:.1e}"),
                points: pts.into_iter().filter(|p| p.1 <= 1.5 * floor).collect(),
                line: true,
            });
        }
        let title = format!("Iso-FLOP curves of the fitted law ({})", f.architecture);
        let chart = Chart {
            title: &title,
            x_label: "log10 N",
            y_label: "predicted loss",
            series: &iso,
        };
        let (svg, png) = plot::save(&chart, &dir.join(format!("iso-flops-{}", f.architecture)))?;
        written.extend([svg, png]);
        let opt = &f.regression.optima;
        optimal.push(Series {
            name: format!("{} N*", f.architecture),
            points: opt.iter().map(|(c, n, _)| (c.log10(), n.log10())).collect(),
            line: true,
        });
        optimal.push(Series {
            name: format!("{} D*", f.architecture),
            points: opt.iter().map(|(c, _, d)| (c.log10(), d.log10())).collect(),
            line: true,
        });
    }
    let chart = Chart {
        title: "Compute-optimal allocation",
        x_label: "log10 FLOPs",
        y_label: "log10 N* or D*",
        series: &optimal,
    };
    let (svg, png) = plot::save(&chart, &dir.join("optimal-allocation"))?;
    written.extend([svg, png]);

    // Mixture-of-experts specialisation per layer, averaged over each architecture's runs.
    let mut specialisation = Vec::new();
    for f in families {
        let runs: Vec<&RunRecord> = f
            .runs
            .iter()
            .filter(|r| !r.specialisation.is_empty())
            .collect();
        if let Some(layers) = runs.iter().map(|r| r.specialisation.len()).max() {
            let points = (0..layers)
                .map(|l| {
                    let values: Vec<f64> = runs
                        .iter()
                        .filter_map(|r| r.specialisation.get(l).copied())
                        .collect();
                    (l as f64, values.iter().sum::<f64>() / values.len() as f64)
                })
                .collect();
            specialisation.push(Series {
                name: f.architecture.clone(),
                points,
                line: true,
            });
        }
    }
    if !specialisation.is_empty() {
        let chart = Chart {
            title: "Expert specialisation per layer (1 − binary entropy of the image share)",
            x_label: "layer",
            y_label: "specialisation",
            series: &specialisation,
        };
        let (svg, png) = plot::save(&chart, &dir.join("moe-specialisation"))?;
        written.extend([svg, png]);
    }
    Ok(written)
}

pub fn run_fit(args: FitArgs) -> Result<()> {
    let all = runs::read_any(&args.runs)?;
    let target = if args.runs.extension().is_some_and(|e| e == "csv") && args.target == "avg" {
        "loss".to_string()
    } else {
        args.target.clone()
    };
    let args = FitArgs { target, ..args };
    let options = FitOptions {
        grid: match args.grid {
            GridChoice::Chinchilla => StartGrid::chinchilla(),
            GridChoice::Coarse => StartGrid::coarse(),
        },
        ..FitOptions::default()
    };
    let mut by_architecture: BTreeMap<String, Vec<RunRecord>> = BTreeMap::new();
    for run in all {
        by_architecture
            .entry(run.architecture.clone())
            .or_default()
            .push(run);
    }
    let holdout = args.holdout.as_deref().map(Holdout::parse).transpose()?;
    let mut families = Vec::new();
    let mut too_few = Vec::new();
    for (architecture, runs) in &by_architecture {
        let fitted = runs
            .iter()
            .filter(|r| !holdout.as_ref().is_some_and(|h| h.holds_out(r)))
            .count();
        // Five unknowns need five runs; a family with fewer is still compared run by run.
        if fitted < 5 {
            too_few.push(format!("{architecture} ({fitted} runs)"));
            continue;
        }
        families.push(fit_family(
            architecture,
            runs.clone(),
            holdout.as_ref(),
            &args,
            &options,
        )?);
    }
    if families.is_empty() {
        bail!(
            "{}: no architecture has the 5 runs a fit needs: {}",
            args.runs.display(),
            too_few.join(", ")
        );
    }
    let mut text = markdown(&families, &args);
    if !too_few.is_empty() {
        let _ = writeln!(
            text,
            "Not fitted, too few runs for the five parameters: {}.\n",
            too_few.join(", ")
        );
    }
    text += &comparisons(&by_architecture, &args.target);
    print!("{text}");
    if let Some(dir) = &args.report {
        let report = json!({
            "runs": args.runs, "target": args.target, "holdout": args.holdout,
            "families": families.iter().map(family_json).collect::<Vec<_>>(),
        });
        tokenfold_data::write_atomic(
            &dir.join("fit.json"),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
        tokenfold_data::write_atomic(&dir.join("report.md"), text.as_bytes())?;
        let written = plots(&families, &args.target, dir)?;
        eprintln!(
            "wrote {}/fit.json, report.md and {} plots",
            dir.display(),
            written.len()
        );
    }
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum SweepCommand {
    /// Train, evaluate and record every run of a grid (or one shard of it); finished runs are skipped.
    #[command(
        after_help = "Examples:\n  tokenfold sweep run configs/study-small.toml                 # into results/study-small\n  tokenfold sweep run configs/study-small.toml --shard 1/4 --out results/study"
    )]
    Run {
        grid: PathBuf,
        /// Folder for `runs.jsonl` and the run directories [default: results/<grid name>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// `i/n`: run every n-th run of the grid from the i-th (0-based).
        #[arg(long, default_value = "0/1")]
        shard: String,
        #[arg(long)]
        quiet: bool,
    },
    /// List a grid's runs with their parameter counts and whether they are recorded yet.
    List {
        grid: PathBuf,
        /// The sweep's folder [default: results/<grid name>].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write a Slurm job-array script that runs the grid's shards on a cluster.
    #[command(
        after_help = "Example:\n  tokenfold sweep slurm configs/study-small.toml --out results/study --shards 8 > sweep.sbatch && sbatch sweep.sbatch"
    )]
    Slurm {
        grid: PathBuf,
        /// The sweep's folder on the cluster [default: results/<grid name>].
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 4)]
        shards: usize,
        /// CPUs per array task.
        #[arg(long, default_value_t = 2)]
        cpus: usize,
        /// Wall-time limit per array task (Slurm's HH:MM:SS).
        #[arg(long, default_value = "04:00:00")]
        time: String,
    },
}

/// Where a sweep writes unless told: `results/<grid name>`.
fn default_out(grid: &Grid) -> PathBuf {
    PathBuf::from("results").join(&grid.name)
}

pub fn run_sweep(command: SweepCommand, paths: &tokenfold_data::DataPaths) -> Result<()> {
    match command {
        SweepCommand::Run {
            grid: grid_path,
            out,
            shard,
            quiet,
        } => {
            let grid = Grid::load(&grid_path)?;
            let out = out.unwrap_or_else(|| default_out(&grid));
            let shard = Shard::parse(&shard)?;
            let planned = grid.expand()?;
            let base = planned
                .first()
                .map(|p| p.config.clone())
                .context("the grid has no runs")?;
            let assets = std::sync::Arc::new(crate::model::checked_assets(paths, &base)?);
            let mine = shard.select(planned).len();
            eprintln!(
                "sweep {}: {mine} runs in shard {}/{}",
                grid.name, shard.index, shard.count
            );
            let started = std::time::Instant::now();
            let outcomes = sweep::run(
                &grid,
                &out,
                shard,
                assets,
                &paths.tokenizer(),
                !quiet,
                |run, outcome| match outcome {
                    Outcome::Skipped(_) => eprintln!("{}: already recorded, skipped", run.name),
                    Outcome::Trained(r) => eprintln!(
                        "{}: N={:.3e} D={:.3e} C={:.3e} FLOPs, avg loss {:.4} nats/token, {:.1} min",
                        r.name,
                        r.params,
                        r.tokens,
                        r.flops,
                        r.target_loss("avg").unwrap_or(f64::NAN),
                        r.wall_s / 60.0
                    ),
                },
            )?;
            let trained = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Trained(_)))
                .count();
            eprintln!(
                "trained {trained}, skipped {} in {:.1} min; records in {}",
                outcomes.len() - trained,
                started.elapsed().as_secs_f64() / 60.0,
                sweep::records_path(&out).display()
            );
            Ok(())
        }
        SweepCommand::List { grid, out } => {
            let grid = Grid::load(&grid)?;
            let out = out.unwrap_or_else(|| default_out(&grid));
            let recorded = sweep::recorded_runs(&out)?;
            let planned = grid.expand()?;
            println!(
                "| run | d_model | layers | steps | peak lr | status |\n|---|---:|---:|---:|---:|---|"
            );
            for run in planned {
                let status = if recorded.contains(&run.name) {
                    "recorded"
                } else {
                    "to do"
                };
                println!(
                    "| {} | {} | {} | {} | {} | {status} |",
                    run.name,
                    run.width.d_model,
                    run.width.n_layers,
                    run.config.train.steps,
                    run.config.train.lr
                );
            }
            Ok(())
        }
        SweepCommand::Slurm {
            grid: grid_path,
            out,
            shards,
            cpus,
            time,
        } => {
            if shards == 0 || cpus == 0 {
                bail!("--shards and --cpus must be at least 1");
            }
            let grid = Grid::load(&grid_path)?;
            let out = out.unwrap_or_else(|| default_out(&grid));
            print!(
                "{}",
                sweep::slurm_script(&grid_path, &grid, &out, shards, cpus, &time)
            );
            Ok(())
        }
    }
}
