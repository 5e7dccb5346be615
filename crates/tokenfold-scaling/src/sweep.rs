//! Sweeps: a grid of model shapes × training budgets × data mixtures, trained one run at a time.
//!
//! A grid file (`configs/study-small.toml`) names a base run configuration and the values to vary:
//!
//! ```toml
//! name = "study-small"
//! base = "configs/nmm-xs.toml"
//! architectures = ["early", "moe", "moe-modality"]
//! steps = [150, 300, 600]
//! eval_samples = 100
//!
//! [[width]]
//! name = "d64"
//! d_model = 64
//! n_layers = 4
//! n_heads = 4
//! d_ff = 176
//!
//! [[mixture]]
//! name = "default"        # no weights: the base configuration's mixture
//!
//! [moe]                   # for the moe (learned routing) and moe-modality (image/text experts) runs
//! experts = 4
//! top_k = 1
//! ```
//!
//! Runs are expanded in a fixed order and named `{architecture}-{width}-s{steps}-{mixture}`; shard `i/n`
//! takes every n-th run from the i-th (0-based), so shards can run on different machines. Each run
//! trains into `<out>/runs/<name>` (resuming a checkpoint that is there) and, when finished and
//! evaluated, appends one record to `<out>/runs.jsonl`. A run whose record exists is skipped, so an
//! interrupted sweep picks up where it stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokenfold_data::{Assets, EvalSpec, Split};
use tokenfold_model::eval::{SetLoss, validation_losses};
use tokenfold_model::moe::{MoeConfig, Routing};
use tokenfold_model::train::{RunConfig, RunDir, TrainOptions, prepare_tokenizer, train};
use tokenfold_model::vision::VisionConfig;

use crate::error::{Result, ScalingError};
use crate::flops::{self, Workload};
use crate::runs::{self, RunRecord};

/// One model shape of the grid.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Width {
    pub name: String,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    /// Peak learning rate of this shape; the base configuration's when absent. The study tuned one per
    /// model size (its Table 6: lower for wider models).
    #[serde(default)]
    pub lr: Option<f64>,
}

/// One data mixture of the grid: task weights, or the base configuration's when empty.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureChoice {
    pub name: String,
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    pub name: String,
    /// The run configuration every run starts from.
    pub base: PathBuf,
    #[serde(default = "early")]
    pub architectures: Vec<String>,
    pub width: Vec<Width>,
    /// Training budgets, in optimizer steps of the base configuration's batch.
    pub steps: Vec<u64>,
    #[serde(default = "default_mixture")]
    pub mixture: Vec<MixtureChoice>,
    /// Samples per validation set for the losses of the record.
    #[serde(default = "eval_samples")]
    pub eval_samples: usize,
    /// Expert settings of the `moe` and `moe-modality` architectures.
    #[serde(default)]
    pub moe: MoeSettings,
    /// Learning-rate multiplier of the late-fusion encoder.
    #[serde(default = "encoder_lr_scale")]
    pub encoder_lr_scale: f64,
    /// Pixel-unshuffle factor of the late-fusion connector (1: none).
    #[serde(default = "one")]
    pub encoder_unshuffle: usize,
}

fn encoder_lr_scale() -> f64 {
    0.1
}

/// `[moe]` of a grid: experts of the same width as the dense FFN.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSettings {
    #[serde(default = "four")]
    pub experts: usize,
    #[serde(default = "one")]
    pub top_k: usize,
    #[serde(default = "balance_weight")]
    pub balance_weight: f64,
    #[serde(default)]
    pub z_loss_weight: f64,
}

impl Default for MoeSettings {
    fn default() -> MoeSettings {
        MoeSettings {
            experts: four(),
            top_k: one(),
            balance_weight: balance_weight(),
            z_loss_weight: 0.0,
        }
    }
}

fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn balance_weight() -> f64 {
    0.01
}

fn early() -> Vec<String> {
    vec!["early".into()]
}
fn default_mixture() -> Vec<MixtureChoice> {
    vec![MixtureChoice {
        name: "default".into(),
        weights: BTreeMap::new(),
    }]
}
fn eval_samples() -> usize {
    100
}

/// The architectures a sweep can train: dense early fusion, late fusion (a ViT encoder and connector
/// scaled with the decoder), and early fusion with mixture-of-experts FFNs under learned
/// (modality-agnostic) or modality-aware routing.
pub const ARCHITECTURES: [&str; 4] = ["early", "late", "moe", "moe-modality"];

/// The late-fusion encoder of a decoder shape, scaled as in the study's Table 6: half the width (heads
/// of the decoder's head size where they divide it), the same depth, half the MLP width.
pub fn encoder_for(width: &Width, lr_scale: f64, unshuffle: usize) -> VisionConfig {
    let d_model = (width.d_model / 2).max(2);
    let head = width.d_model / width.n_heads;
    let n_heads = if d_model.is_multiple_of(head) {
        d_model / head
    } else {
        1
    };
    VisionConfig {
        d_model,
        n_layers: width.n_layers,
        n_heads,
        d_ff: (width.d_ff / 2).max(1),
        lr_scale,
        unshuffle,
    }
}

/// One expanded run of a grid.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRun {
    pub name: String,
    pub architecture: String,
    pub width: Width,
    pub mixture: MixtureChoice,
    pub config: RunConfig,
}

impl Grid {
    pub fn load(path: &Path) -> Result<Grid> {
        let text = std::fs::read_to_string(path).map_err(|source| ScalingError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let grid: Grid = toml::from_str(&text).map_err(|e| ScalingError::Input {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        grid.validate(path)?;
        Ok(grid)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| ScalingError::Input {
            path: path.display().to_string(),
            message,
        };
        if let Some(a) = self
            .architectures
            .iter()
            .find(|a| !ARCHITECTURES.contains(&a.as_str()))
        {
            return Err(bad(format!(
                "architectures: `{a}` is unknown (available: {})",
                ARCHITECTURES.join(", ")
            )));
        }
        if self.width.is_empty() || self.steps.is_empty() || self.mixture.is_empty() {
            return Err(bad(
                "width, steps and mixture each need at least one entry".into()
            ));
        }
        if let Some(w) = self
            .width
            .iter()
            .find(|w| w.lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())))
        {
            return Err(bad(format!(
                "width `{}`: lr {} must be positive",
                w.name,
                w.lr.unwrap_or_default()
            )));
        }
        if let Some(s) = self.steps.iter().find(|s| **s == 0) {
            return Err(bad(format!("steps: {s} is not a training budget")));
        }
        let mut names: Vec<&str> = vec![self.name.as_str()];
        names.extend(self.width.iter().map(|w| w.name.as_str()));
        names.extend(self.mixture.iter().map(|m| m.name.as_str()));
        if let Some(n) = names
            .iter()
            .find(|n| n.is_empty() || n.contains(['/', ' ']))
        {
            return Err(bad(format!(
                "`{n}`: grid, width and mixture names must be non-empty, without '/' or spaces"
            )));
        }
        Ok(())
    }

    /// Every run of the grid, in a fixed order, each with its validated configuration.
    pub fn expand(&self) -> Result<Vec<PlannedRun>> {
        let base = RunConfig::load(&self.base)?;
        let mut planned = Vec::new();
        // Architectures innermost: a partly finished sweep has every architecture at the same shapes
        // and budgets, so they can be compared.
        for width in &self.width {
            for &steps in &self.steps {
                for mixture in &self.mixture {
                    for architecture in &self.architectures {
                        let mut config = base.with_steps(steps);
                        config.model.preset = None;
                        config.model.d_model = Some(width.d_model);
                        config.model.n_layers = Some(width.n_layers);
                        config.model.n_heads = Some(width.n_heads);
                        config.model.d_ff = Some(width.d_ff);
                        if let Some(lr) = width.lr {
                            config.train.lr = lr;
                        }
                        config.model.vision = (architecture == "late").then(|| {
                            encoder_for(width, self.encoder_lr_scale, self.encoder_unshuffle)
                        });
                        config.model.moe = match architecture.as_str() {
                            "early" | "late" => None,
                            _ => Some(MoeConfig {
                                experts: self.moe.experts,
                                top_k: self.moe.top_k,
                                routing: if architecture == "moe" {
                                    Routing::Learned
                                } else {
                                    Routing::Modality
                                },
                                balance_weight: self.moe.balance_weight,
                                z_loss_weight: self.moe.z_loss_weight,
                            }),
                        };
                        if !mixture.weights.is_empty() {
                            config.train.mixture = mixture.weights.clone();
                            config.train.curriculum.clear();
                        }
                        // Validation during training would cost time the FLOPs do not count.
                        config.train.eval_every = 0;
                        let name =
                            format!("{architecture}-{}-s{steps}-{}", width.name, mixture.name);
                        config.validate().map_err(|e| ScalingError::Input {
                            path: self.base.display().to_string(),
                            message: format!("run {name}: {e}"),
                        })?;
                        planned.push(PlannedRun {
                            name,
                            architecture: architecture.clone(),
                            width: width.clone(),
                            mixture: mixture.clone(),
                            config,
                        });
                    }
                }
            }
        }
        Ok(planned)
    }
}

/// `i/n`: this process runs every n-th run starting at i (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    pub fn parse(text: &str) -> Result<Shard> {
        let bad = || {
            ScalingError::Fit(format!(
                "--shard `{text}`: expected i/n with 0 ≤ i < n, e.g. 0/4"
            ))
        };
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index)
            .map(|(_, t)| t)
            .collect()
    }
}

/// Where a sweep writes.
pub fn records_path(out: &Path) -> PathBuf {
    out.join("runs.jsonl")
}

/// Names of the runs recorded in the sweep folder `out` (none before its first record).
pub fn recorded_runs(out: &Path) -> Result<Vec<String>> {
    let path = records_path(out);
    if !path.is_file() {
        return Ok(Vec::new());
    }
    Ok(runs::read_runs(&path)?
        .into_iter()
        .map(|r| r.name)
        .collect())
}

/// Mean loss per task type over its sets, weighted by target tokens; bits per byte likewise by bytes.
fn per_task(losses: &[SetLoss]) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
    let mut sums: BTreeMap<String, (f64, f64, f64, f64)> = BTreeMap::new();
    for l in losses {
        let e = sums.entry(l.task.name().to_string()).or_default();
        let nats = l.nll_per_token * l.target_tokens as f64;
        e.0 += nats;
        e.1 += l.target_tokens as f64;
        e.2 += nats / std::f64::consts::LN_2;
        e.3 += l.target_bytes as f64;
    }
    let nats = sums
        .iter()
        .map(|(k, v)| (k.clone(), v.0 / v.1.max(1.0)))
        .collect();
    let bpb = sums
        .iter()
        .map(|(k, v)| (k.clone(), v.2 / v.3.max(1.0)))
        .collect();
    (nats, bpb)
}

pub fn git_revision() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Serialises appends from shards that share a file system: a lock file created exclusively.
struct Lock(PathBuf);

impl Lock {
    fn acquire(path: &Path) -> Result<Lock> {
        let lock = path.with_extension("jsonl.lock");
        let started = Instant::now();
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(_) => return Ok(Lock(lock)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if started.elapsed() > Duration::from_secs(120) {
                        return Err(ScalingError::Input {
                            path: lock.display().to_string(),
                            message: "held for over 2 minutes; if no sweep is running, delete it"
                                .into(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(source) => {
                    return Err(ScalingError::Io {
                        path: lock.display().to_string(),
                        source,
                    });
                }
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What happened to one run.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Trained(Box<RunRecord>),
    /// Its record was already in `runs.jsonl`.
    Skipped(String),
}

/// Trains, evaluates and records one run.
pub fn run_one(
    planned: &PlannedRun,
    out: &Path,
    assets: Arc<Assets>,
    data_tokenizer: &Path,
    eval_samples: usize,
    progress: bool,
) -> Result<RunRecord> {
    let dir = out.join("runs").join(&planned.name);
    let run_dir = RunDir::new(&dir);
    let resume = run_dir.checkpoint().join("state.json").is_file();
    let config = &planned.config;
    let tokenizer = prepare_tokenizer(
        &run_dir,
        data_tokenizer,
        &assets,
        config.tokenizer.vocab_size,
        resume,
    )?;
    let options = TrainOptions {
        resume,
        progress,
        stop_after: None,
    };
    let summary = train(config, &dir, assets.clone(), tokenizer.clone(), &options)?;
    let (model, tokenizer, _) = run_dir.load(&tokenfold_model::train::default_device()?)?;
    let model_config = model.config.clone();
    let specs = EvalSpec::all(Split::Val);
    let (losses, routing) = validation_losses(
        &model,
        &tokenizer,
        &assets,
        &config.sequence,
        &specs,
        eval_samples,
        32,
    )?;
    let (val_loss, val_bits_per_byte) = per_task(&losses);
    let specialisation = routing.iter().map(|layer| layer.specialisation()).collect();
    let counts = summary.modalities;
    // N is the decoder; a late-fusion encoder and connector are N_v, run on image tokens only.
    let vision = model_config
        .vision
        .as_ref()
        .map(|_| model_config.image_parameter_count() as f64);
    let params = model_config.non_embedding_parameter_count() as f64 - vision.unwrap_or(0.0);
    let active = model_config.non_embedding_active_parameter_count() as f64 - vision.unwrap_or(0.0);
    let tokens = (counts.image_tokens + counts.text_tokens) as f64;
    // With pixel-unshuffle the encoder runs over r² tokens per decoder image token.
    let encoder_tokens = counts.image_tokens as f64
        * model_config
            .vision
            .as_ref()
            .map_or(1.0, |v| v.tokens_per_image_token() as f64);
    let flops = match vision {
        Some(nv) => flops::late_fusion(nv, encoder_tokens, params, tokens),
        // 6·N_active·D, which is 6ND for dense runs.
        None => flops::mixture_of_experts(active, tokens),
    };
    let detailed = flops::forward(&model_config, &Workload::trained(&counts)).training();
    Ok(RunRecord {
        name: planned.name.clone(),
        architecture: planned.architecture.clone(),
        params,
        active_params: (active != params).then_some(active),
        vision_params: vision,
        tokens,
        tokens_by_modality: BTreeMap::from([
            ("image".to_string(), counts.image_tokens as f64),
            ("text".to_string(), counts.text_tokens as f64),
        ]),
        bytes_by_modality: BTreeMap::from([
            ("image".to_string(), counts.image_bytes as f64),
            ("text".to_string(), counts.text_bytes as f64),
        ]),
        flops,
        flops_detailed: Some(detailed),
        val_loss,
        val_bits_per_byte,
        specialisation,
        wall_s: summary.elapsed_s,
        git_revision: git_revision(),
        labels: BTreeMap::from([
            ("width".to_string(), planned.width.name.clone()),
            ("mixture".to_string(), planned.mixture.name.clone()),
            ("steps".to_string(), config.train.steps.to_string()),
            (
                "total_params".to_string(),
                model_config.parameter_count().to_string(),
            ),
            ("sequences".to_string(), counts.sequences.to_string()),
        ]),
    })
}

/// Runs this shard's share of the grid, skipping runs already recorded; calls `report` per run.
pub fn run(
    grid: &Grid,
    out: &Path,
    shard: Shard,
    assets: Arc<Assets>,
    data_tokenizer: &Path,
    progress: bool,
    mut report: impl FnMut(&PlannedRun, &Outcome),
) -> Result<Vec<Outcome>> {
    let planned = shard.select(grid.expand()?);
    let path = records_path(out);
    std::fs::create_dir_all(out).map_err(|source| ScalingError::Io {
        path: out.display().to_string(),
        source,
    })?;
    // Read once: shards never run each other's runs, so no record this shard needs appears later.
    let recorded = recorded_runs(out)?;
    let mut outcomes = Vec::new();
    for run in &planned {
        let outcome = if recorded.contains(&run.name) {
            Outcome::Skipped(run.name.clone())
        } else {
            let record = run_one(
                run,
                out,
                assets.clone(),
                data_tokenizer,
                grid.eval_samples,
                progress,
            )?;
            let _lock = Lock::acquire(&path)?;
            runs::append_run(&path, &record)?;
            Outcome::Trained(Box::new(record))
        };
        report(run, &outcome);
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// A Slurm job-array script that runs the grid's shards, one array task each.
pub fn slurm_script(
    grid_path: &Path,
    grid: &Grid,
    out: &Path,
    shards: usize,
    cpus: usize,
    time: &str,
) -> String {
    format!(
        "#!/bin/bash\n\
         # Sweep `{name}` as a Slurm job array: {shards} shards, each runs every {shards}-th run of the grid.\n\
         # Submit with `sbatch <this file>`; finished runs land in {out}/runs.jsonl, and a resubmitted\n\
         # array skips them.\n\
         #SBATCH --job-name=tokenfold-{name}\n\
         #SBATCH --array=0-{last}\n\
         #SBATCH --cpus-per-task={cpus}\n\
         #SBATCH --time={time}\n\
         #SBATCH --output={out}/slurm-%A_%a.log\n\
         set -euo pipefail\n\
         export RAYON_NUM_THREADS={cpus}\n\
         tokenfold sweep run {grid} --out {out} --shard \"${{SLURM_ARRAY_TASK_ID}}/{shards}\"\n",
        name = grid.name,
        last = shards.saturating_sub(1),
        out = out.display(),
        grid = grid_path.display(),
    )
}
