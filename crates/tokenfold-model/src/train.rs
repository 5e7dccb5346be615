//! Training: the run configuration, the loop (schedule, gradient accumulation, clipping, periodic
//! evaluation, JSON-lines metrics, a progress bar) and atomic, resumable checkpoints.
//!
//! A run directory holds `run.json` (the resolved configuration), `model.json` (the model shape),
//! `tokenizer.json`, `metrics.jsonl`, `checkpoint/` (`model.safetensors`, `optimizer.safetensors`,
//! `state.json`) and `eval-val.json`. A checkpoint is written into a temporary folder and renamed into place,
//! so an interrupted run loses nothing; `--resume` continues from it exactly: weights, optimizer moments,
//! step and data-stream position are all restored, and the stream is a pure function of its position.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokenfold_data::loader::MAX_FOLLOW_UPS;
use tokenfold_data::{
    Assets, Batch, EvalSpec, Loader, Mixture, SequenceConfig, Split, Stage, StreamConfig, Task,
    TextTokenizer,
};

use crate::config::{ModelConfig, preset};
use crate::error::{ModelError, Result};
use crate::eval::{SetResult, evaluate, markdown, mean_accuracy};
use crate::model::NativeModel;
use crate::optim::{AdamW, AdamWConfig, Schedule, clip_grad_norm, learning_rate, named_grads};

/// The model section of a run configuration: a preset, optionally with fields overridden.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: Option<String>,
    pub d_model: Option<usize>,
    pub n_layers: Option<usize>,
    pub n_heads: Option<usize>,
    pub d_ff: Option<usize>,
    pub tie_embeddings: Option<bool>,
    /// `[model.moe]`: mixture-of-experts FFNs (experts, top_k, routing, balance_weight, z_loss_weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<crate::moe::MoeConfig>,
    /// `[model.vision]`: late fusion with a ViT encoder (d_model, n_layers, n_heads, d_ff, lr_scale,
    /// unshuffle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<crate::vision::VisionConfig>,
    /// Moved to `sequence.summary_token`; read so that older run directories still load.
    #[serde(default, skip_serializing)]
    pub summary_token: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    pub vocab_size: usize,
}

impl Default for TokenizerSection {
    fn default() -> Self {
        TokenizerSection { vocab_size: 2048 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: u64,
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    #[serde(default = "cooldown_fraction")]
    pub cooldown_fraction: f64,
    #[serde(default)]
    pub adamw: AdamWConfig,
    #[serde(default = "grad_clip")]
    pub grad_clip: f64,
    #[serde(default)]
    pub seed: u64,
    /// Evaluate on the validation sets every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Samples per validation set.
    #[serde(default = "eval_samples")]
    pub eval_samples: usize,
    #[serde(default = "checkpoint_every")]
    pub checkpoint_every: u64,
    /// Background data workers.
    #[serde(default = "one")]
    pub workers: usize,
    /// Task weights; every task with weight 1 when empty. After the curriculum, if any.
    #[serde(default)]
    pub mixture: BTreeMap<String, f64>,
    /// Curriculum stages before `mixture` takes over, by increasing `until_step`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curriculum: Vec<CurriculumStage>,
    /// Draw each batch all text or all image samples (text in the mixture's share of batches): a text
    /// passage pads a batch of short image prompts to its own length, so mixed batches cost up to twice
    /// as much. Off by default, which keeps earlier runs' streams.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub group_text: bool,
    /// Further questions about the scene of each exist, count, locate or relation sample, asked after its
    /// answer in the same sequence (at most 8): one image then serves several answers. 0 (the default)
    /// keeps earlier runs' streams.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub follow_ups: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// `[[train.curriculum]]`: train on `mixture` until optimizer step `until_step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurriculumStage {
    pub until_step: u64,
    pub mixture: BTreeMap<String, f64>,
}

fn one() -> usize {
    1
}
fn default_schedule() -> Schedule {
    Schedule::ConstantCooldown
}
fn cooldown_fraction() -> f64 {
    0.2
}
fn grad_clip() -> f64 {
    1.0
}
fn eval_samples() -> usize {
    100
}
fn checkpoint_every() -> u64 {
    200
}

/// A whole run configuration (`configs/*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub sequence: SequenceConfig,
    #[serde(default)]
    pub tokenizer: TokenizerSection,
    pub train: TrainConfig,
}

impl RunConfig {
    /// Reads a TOML (`.toml`) or JSON file, naming the file in any error.
    pub fn load(path: &Path) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let json = path.extension().is_some_and(|e| e == "json");
        Self::parse(&text, json, &path.display().to_string())
    }

    /// Parses TOML (or JSON) text; `origin` names it in errors.
    pub fn parse(text: &str, json: bool, origin: &str) -> Result<RunConfig> {
        let config: RunConfig = if json {
            serde_json::from_str(text).map_err(|e| ModelError::Config(format!("{origin}: {e}")))?
        } else {
            toml::from_str(text).map_err(|e| ModelError::Config(format!("{origin}: {e}")))?
        };
        config
            .validate()
            .map_err(|e| ModelError::Config(format!("{origin}: {e}")))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        let fail = |m: String| Err(ModelError::Config(m));
        if t.steps == 0 || t.batch_size == 0 || t.grad_accum == 0 {
            return fail(
                "train.steps, train.batch_size and train.grad_accum must be positive".into(),
            );
        }
        if !(t.lr > 0.0 && t.lr < 1.0) {
            return fail(format!("train.lr {} is outside (0, 1)", t.lr));
        }
        if !(0.0..=1.0).contains(&t.cooldown_fraction) {
            return fail(format!(
                "train.cooldown_fraction {} is outside [0, 1]",
                t.cooldown_fraction
            ));
        }
        if t.warmup_steps > t.steps {
            return fail(format!(
                "train.warmup_steps {} exceeds train.steps {}",
                t.warmup_steps, t.steps
            ));
        }
        if self.model.summary_token == Some(true) && !self.sequence.summary_token {
            return fail("model.summary_token has moved: set sequence.summary_token = true".into());
        }
        if t.follow_ups > MAX_FOLLOW_UPS {
            return fail(format!(
                "train.follow_ups {} is above the maximum {MAX_FOLLOW_UPS}",
                t.follow_ups
            ));
        }
        self.mixture()?;
        self.stages()?;
        self.sequence.validate()?;
        if let Some(vision) = &self.model.vision {
            vision
                .validate()
                .and_then(|()| vision.validate_patch_side(self.sequence.patch_size as usize))
                .map_err(|m| {
                    ModelError::Config(format!("model.vision: {m} (sequence.patch_size)"))
                })?;
        }
        Ok(())
    }

    pub fn mixture(&self) -> Result<Mixture> {
        if self.train.mixture.is_empty() {
            return Ok(Mixture::uniform());
        }
        parse_mixture(&self.train.mixture, "train.mixture")
    }

    /// The training data stream: seed, batch size, mixture, curriculum stages and sequence format.
    pub fn stream(&self) -> Result<StreamConfig> {
        Ok(StreamConfig {
            seed: self.train.seed,
            batch_size: self.train.batch_size,
            mixture: self.mixture()?,
            stages: self.stages()?,
            seq: self.sequence.clone(),
            group_text: self.train.group_text,
            follow_ups: self.train.follow_ups,
        })
    }

    /// The same run with `steps` optimizer steps: warmup capped at `steps`, curriculum stages scaled
    /// in proportion (each at least one step after the previous).
    pub fn with_steps(&self, steps: u64) -> RunConfig {
        let mut config = self.clone();
        let old = self.train.steps.max(1);
        config.train.steps = steps;
        config.train.warmup_steps = self.train.warmup_steps.min(steps);
        let mut previous = 0;
        for stage in &mut config.train.curriculum {
            let scaled = (stage.until_step as f64 * steps as f64 / old as f64).round() as u64;
            stage.until_step = scaled.max(previous + 1).min(steps);
            previous = stage.until_step;
        }
        config
    }

    /// The curriculum as data-stream stages (a step consumes `grad_accum` batches).
    pub fn stages(&self) -> Result<Vec<Stage>> {
        let t = &self.train;
        let mut previous = 0;
        let mut stages = Vec::new();
        for (i, stage) in t.curriculum.iter().enumerate() {
            let field = format!("train.curriculum[{i}]");
            if stage.until_step <= previous || stage.until_step > t.steps {
                return Err(ModelError::Config(format!(
                    "{field}.until_step {} must exceed the previous stage's ({previous}) and be at most train.steps ({})",
                    stage.until_step, t.steps
                )));
            }
            previous = stage.until_step;
            stages.push(Stage {
                until_batch: stage.until_step * t.grad_accum as u64,
                mixture: parse_mixture(&stage.mixture, &format!("{field}.mixture"))?,
            });
        }
        Ok(stages)
    }

    /// The model configuration for a tokenizer of `vocab_size` tokens.
    pub fn model_config(&self, vocab_size: usize) -> Result<ModelConfig> {
        let m = &self.model;
        let mut shape = match &m.preset {
            Some(name) => preset(name)?,
            None => crate::config::Shape {
                d_model: 0,
                n_layers: 0,
                n_heads: 0,
                d_ff: 0,
            },
        };
        shape.d_model = m.d_model.unwrap_or(shape.d_model);
        shape.n_layers = m.n_layers.unwrap_or(shape.n_layers);
        shape.n_heads = m.n_heads.unwrap_or(shape.n_heads);
        shape.d_ff = m.d_ff.unwrap_or(shape.d_ff);
        let seq = &self.sequence;
        let mut config = ModelConfig::from_shape(
            shape,
            vocab_size,
            seq.patch_dim(),
            seq.grid(),
            seq.max_len + 64,
        );
        config.tie_embeddings = m.tie_embeddings.unwrap_or(true);
        config.moe = m.moe.clone();
        config.vision = m.vision.clone();
        config.summary_token = seq.summary_token;
        config.validate()?;
        Ok(config)
    }
}

fn parse_mixture(weights: &BTreeMap<String, f64>, field: &str) -> Result<Mixture> {
    if weights.is_empty() {
        return Err(ModelError::Config(format!("{field} is empty")));
    }
    let mut parsed = Vec::new();
    for (task, &weight) in weights {
        let task: Task = task
            .parse()
            .map_err(|e| ModelError::Config(format!("{field}: {e}")))?;
        parsed.push((task, weight));
    }
    let mixture = Mixture(parsed);
    mixture
        .validate()
        .map_err(|e| ModelError::Config(format!("{field}: {e}")))?;
    Ok(mixture)
}

/// What `state.json` of a checkpoint records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Index of the next batch of the data stream.
    pub data_position: u64,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    /// Tokens and raw bytes seen per modality (absent from checkpoints written before they were counted).
    #[serde(default)]
    pub modalities: ModalityCounts,
}

/// Training tokens and the raw bytes behind them, per modality: the inputs of compression-factor
/// scaling laws and of a per-operation FLOPs count. Image tokens are patch tokens (their bytes the RGB
/// values they cover); text tokens are all others, markers included (their bytes the UTF-8 text they
/// decode to). Padding is not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ModalityCounts {
    pub sequences: u64,
    pub image_tokens: u64,
    pub image_bytes: u64,
    pub text_tokens: u64,
    pub text_bytes: u64,
    /// Query–key pairs the attention mask allows (causal, bidirectional within an image).
    pub attention_pairs: u64,
    /// Positions whose logits the loss needs.
    pub target_tokens: u64,
}

/// Query–key pairs our mask allows in a sequence of `length` tokens with `image_tokens` image tokens from
/// `image_start`: causal, except that image tokens see their whole image.
pub fn masked_attention_pairs(length: usize, image_start: usize, image_tokens: usize) -> u64 {
    let image_end = image_start + image_tokens;
    (0..length)
        .map(|i| {
            if (image_start..image_end).contains(&i) {
                image_end
            } else {
                i + 1
            }
        } as u64)
        .sum()
}

impl ModalityCounts {
    /// Adds what one batch feeds the model.
    pub fn add_batch(&mut self, batch: &Batch, tokenizer: &TextTokenizer) -> Result<()> {
        for s in 0..batch.batch_size {
            let row = &batch.tokens[s * batch.seq_len..s * batch.seq_len + batch.lengths[s]];
            let image = if batch.image_starts[s].is_some() {
                batch.n_patches
            } else {
                0
            };
            let length = batch.lengths[s];
            let image_start = batch.image_starts[s].unwrap_or(0);
            self.attention_pairs += masked_attention_pairs(length, image_start, image);
            self.sequences += 1;
            self.target_tokens += batch.loss_mask[s * batch.seq_len..s * batch.seq_len + length]
                .iter()
                .filter(|m| **m > 0.0)
                .count() as u64;
            self.image_tokens += image as u64;
            self.image_bytes += (image * batch.patch_dim) as u64;
            self.text_tokens += (batch.lengths[s] - image) as u64;
            self.text_bytes += tokenizer.decode(row)?.len() as u64;
        }
        Ok(())
    }
}

/// Files of a run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: &Path) -> RunDir {
        RunDir {
            root: root.to_path_buf(),
        }
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint")
    }
    pub fn tokenizer(&self) -> PathBuf {
        self.root.join("tokenizer.json")
    }
    pub fn model_config(&self) -> PathBuf {
        self.root.join("model.json")
    }
    pub fn run_config(&self) -> PathBuf {
        self.root.join("run.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// The step the checkpoint holds, if there is one.
    pub fn checkpoint_step(&self) -> Option<u64> {
        read_json::<TrainState>(&self.checkpoint().join("state.json"))
            .ok()
            .map(|s| s.step)
    }

    /// Loads the trained model, frozen and prepared for inference, its tokenizer and the run configuration.
    pub fn load(&self, device: &Device) -> Result<(NativeModel, TextTokenizer, RunConfig)> {
        let checkpoint = self.checkpoint();
        if !checkpoint.join("model.safetensors").is_file() {
            return Err(ModelError::Checkpoint(format!(
                "{} has no trained model (checkpoint/model.safetensors): train one with `tokenfold train --out {}`",
                self.root.display(),
                self.root.display()
            )));
        }
        let config: ModelConfig = read_json(&self.model_config())?;
        let run: RunConfig = read_json(&self.run_config())?;
        let tokenizer = TextTokenizer::load(&self.tokenizer())?;
        if tokenizer.vocab_size() != config.vocab_size {
            return Err(ModelError::Checkpoint(format!(
                "{}: tokenizer has {} tokens, the model {}",
                self.tokenizer().display(),
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        // Frozen, so that inference builds no gradient graph and may pack its rows
        // (`NativeModel::forward`).
        let mut model =
            NativeModel::load(config, &checkpoint.join("model.safetensors"), device)?.frozen()?;
        model.prepare_inference()?;
        Ok((model, tokenizer, run))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Checkpoint(format!("{}: {e}", path.display())))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| ModelError::Checkpoint(e.to_string()))?;
    Ok(tokenfold_data::write_atomic(path, text.as_bytes())?)
}

/// The model's trainable variables, sorted by name (the order the optimizer and checkpoints use).
pub fn sorted_vars(model: &NativeModel) -> Vec<(String, Var)> {
    let data = model.varmap.data().lock().expect("variable map lock");
    let mut vars: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Writes a checkpoint into a temporary folder, then swaps it in with renames.
fn save_checkpoint(
    dir: &RunDir,
    model: &NativeModel,
    optimizer: &AdamW,
    state: &TrainState,
) -> Result<()> {
    let target = dir.checkpoint();
    let tmp = dir.root.join(".checkpoint.tmp");
    let old = dir.root.join(".checkpoint.old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    model.varmap.save(tmp.join("model.safetensors"))?;
    candle_core::safetensors::save(
        &optimizer.state_tensors(),
        tmp.join("optimizer.safetensors"),
    )?;
    write_json(&tmp.join("state.json"), state)?;
    let _ = std::fs::remove_dir_all(&old);
    if target.exists() {
        std::fs::rename(&target, &old).map_err(|e| ModelError::io(&target, e))?;
    }
    std::fs::rename(&tmp, &target).map_err(|e| ModelError::io(&tmp, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// How a run is driven.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop (as if interrupted) after this many steps, with a checkpoint; for tests and staged runs.
    pub stop_after: Option<u64>,
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub parameters: usize,
    pub tokens_seen: u64,
    pub modalities: ModalityCounts,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
    pub final_loss: f64,
    pub validation: Vec<SetResult>,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_seen: u64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// Reads the per-step lines of a metrics file.
pub fn read_step_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<StepMetrics>(line).ok())
        .collect())
}

/// Keeps the metrics lines of steps before `step` (a resume rewrites what came after the checkpoint).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s < step)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    Ok(tokenfold_data::write_atomic(path, kept.as_bytes())?)
}

fn append_line(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| ModelError::io(path, e))?;
    // One write of a whole line: a reader never sees half a record.
    file.write_all(format!("{value}\n").as_bytes())
        .map_err(|e| ModelError::io(path, e))
}

/// The tokenizer of a run: the run's own on resume, else `<data>/tokenizer.json` if it has the configured
/// size and splits digits, else a new one trained on the assets (about a second). The new one is saved to
/// the data folder for the next run if there is none there, or if the one there predates digit splitting.
pub fn prepare_tokenizer(
    run: &RunDir,
    data_tokenizer: &Path,
    assets: &Assets,
    vocab_size: usize,
    resume: bool,
) -> Result<TextTokenizer> {
    if resume && run.tokenizer().is_file() {
        return Ok(TextTokenizer::load(&run.tokenizer())?);
    }
    let mut replace = !data_tokenizer.exists();
    if data_tokenizer.is_file() {
        let tokenizer = TextTokenizer::load(data_tokenizer)?;
        let splits_digits = tokenizer.splits_digits()?;
        if tokenizer.vocab_size() == vocab_size && splits_digits {
            return Ok(tokenizer);
        }
        if !splits_digits {
            // A one-time notice: the file is tokenfold's own cache, but it changes under the user's eyes.
            eprintln!(
                "note: {} merges digits (trained by an older tokenfold); training a new one in its place",
                data_tokenizer.display()
            );
            replace = true;
        }
    }
    let tokenizer = TextTokenizer::train_on_assets(assets, vocab_size)?;
    if replace {
        tokenizer.save(data_tokenizer)?;
    }
    Ok(tokenizer)
}

/// Trains (or resumes) a run in `out`.
pub fn train(
    config: &RunConfig,
    out: &Path,
    assets: Arc<Assets>,
    tokenizer: TextTokenizer,
    options: &TrainOptions,
) -> Result<TrainSummary> {
    config.validate()?;
    let dir = RunDir::new(out);
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let device = default_device()?;
    let model_config = config.model_config(tokenizer.vocab_size())?;
    let t = &config.train;

    let checkpoint = dir.checkpoint();
    let resuming = options.resume && checkpoint.join("state.json").is_file();
    if options.resume && !resuming {
        return Err(ModelError::Checkpoint(format!(
            "--resume: {} has no checkpoint to resume from",
            out.display()
        )));
    }
    if !resuming && checkpoint.exists() {
        return Err(ModelError::Checkpoint(format!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            out.display()
        )));
    }
    let (model, state) = if resuming {
        let saved: ModelConfig = read_json(&dir.model_config())?;
        if saved != model_config {
            return Err(ModelError::Checkpoint(format!(
                "{}: the configuration's model differs from the checkpoint's",
                dir.model_config().display()
            )));
        }
        let model = NativeModel::load(
            model_config.clone(),
            &checkpoint.join("model.safetensors"),
            &device,
        )?;
        (
            model,
            read_json::<TrainState>(&checkpoint.join("state.json"))?,
        )
    } else {
        tokenizer.save(&dir.tokenizer())?;
        write_json(&dir.model_config(), &model_config)?;
        write_json(&dir.run_config(), config)?;
        let model = NativeModel::new(model_config.clone(), t.seed, &device)?;
        (
            model,
            TrainState {
                step: 0,
                data_position: 0,
                tokens_seen: 0,
                elapsed_s: 0.0,
                modalities: ModalityCounts::default(),
            },
        )
    };
    let vars = sorted_vars(&model);
    let mut optimizer = AdamW::new(vars.clone(), t.adamw.clone())?;
    if let Some(vision) = &model_config.vision {
        optimizer.scale_lr(crate::vision::is_encoder_weight, vision.lr_scale);
    }
    if resuming {
        let path = checkpoint.join("optimizer.safetensors");
        let tensors = candle_core::safetensors::load(&path, &device)?;
        optimizer
            .load_state(&tensors, state.step)
            .map_err(|e| ModelError::Checkpoint(format!("{}: {e}", path.display())))?;
        truncate_metrics(&dir.metrics(), state.step)?;
    }

    let tokenizer = Arc::new(tokenizer);
    let stream = config.stream()?;
    let mut loader = Loader::spawn(
        assets.clone(),
        tokenizer.clone(),
        stream,
        state.data_position,
        t.workers,
        4,
    )?;

    let bar = if options.progress {
        ProgressBar::new(t.steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("valid progress template"),
    );
    bar.set_position(state.step);
    let started = Instant::now();
    let (mut tokens_seen, mut last_loss) = (state.tokens_seen, f64::NAN);
    let mut modalities = state.modalities;
    // Time spent in validation, kept out of the training throughput.
    let mut eval_s = 0f64;
    let stop = options.stop_after.unwrap_or(t.steps).min(t.steps);
    let mut step = state.step;
    while step < stop {
        let lr = learning_rate(
            t.schedule,
            t.lr,
            step,
            t.steps,
            t.warmup_steps,
            t.cooldown_fraction,
        );
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0f64;
        for _ in 0..t.grad_accum {
            let batch = loader.next_batch()?;
            tokens_seen += batch.lengths.iter().sum::<usize>() as u64;
            modalities.add_batch(&batch, &tokenizer)?;
            let loss = model.loss(&batch)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let backward = (loss / t.grad_accum as f64)?.backward()?;
            for (name, grad) in named_grads(&vars, &backward) {
                let sum = match grads.remove(&name) {
                    Some(previous) => (previous + grad)?,
                    None => grad,
                };
                grads.insert(name, sum);
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, t.grad_clip)?;
        optimizer.step(&grads, lr)?;
        step += 1;
        last_loss = loss_sum / t.grad_accum as f64;
        if !last_loss.is_finite() {
            return Err(ModelError::Config(format!(
                "loss became {last_loss} at step {step}: lower train.lr"
            )));
        }
        let elapsed = state.elapsed_s + started.elapsed().as_secs_f64();
        let tokens_per_s = (tokens_seen - state.tokens_seen) as f64
            / (started.elapsed().as_secs_f64() - eval_s).max(1e-9);
        let metrics = StepMetrics {
            step: step - 1,
            loss: last_loss,
            lr,
            grad_norm,
            tokens_seen,
            tokens_per_s,
            elapsed_s: elapsed,
        };
        append_line(
            &dir.metrics(),
            &serde_json::to_value(&metrics).map_err(|e| ModelError::Checkpoint(e.to_string()))?,
        )?;
        bar.set_position(step);
        bar.set_message(format!(
            "loss {last_loss:.3}  lr {lr:.2e}  {tokens_per_s:.0} tok/s"
        ));
        if t.eval_every > 0 && step % t.eval_every == 0 && step < t.steps {
            let eval_started = Instant::now();
            let results = validate(&model, &tokenizer, &assets, config, &dir, step)?;
            bar.println(format!(
                "step {step}: validation mean accuracy {:.1}%",
                100.0 * mean_accuracy(&results)
            ));
            eval_s += eval_started.elapsed().as_secs_f64();
        }
        if step % t.checkpoint_every == 0 || step == stop {
            let elapsed_s = state.elapsed_s + started.elapsed().as_secs_f64();
            save_checkpoint(
                &dir,
                &model,
                &optimizer,
                &TrainState {
                    step,
                    data_position: loader.position(),
                    tokens_seen,
                    elapsed_s,
                    modalities,
                },
            )?;
        }
    }
    bar.finish_and_clear();
    let elapsed_s = state.elapsed_s + started.elapsed().as_secs_f64();
    let train_s = started.elapsed().as_secs_f64() - eval_s;
    let validation = if step == t.steps {
        let results = validate(&model, &tokenizer, &assets, config, &dir, step)?;
        write_json(&out.join("eval-val.json"), &results)?;
        results
    } else {
        Vec::new()
    };
    Ok(TrainSummary {
        steps: step,
        parameters: model.parameter_count(),
        tokens_seen,
        modalities,
        elapsed_s,
        tokens_per_s: (tokens_seen - state.tokens_seen) as f64 / train_s.max(1e-9),
        final_loss: last_loss,
        validation,
    })
}

/// Evaluates on the validation sets, and on the describe diagnostic (object recall, outside the mean),
/// and records the result in `metrics.jsonl` after `step` steps.
fn validate(
    model: &NativeModel,
    tokenizer: &TextTokenizer,
    assets: &Assets,
    config: &RunConfig,
    dir: &RunDir,
    step: u64,
) -> Result<Vec<SetResult>> {
    let mut specs = EvalSpec::all(Split::Val);
    specs.push(EvalSpec::describe(Split::Val));
    let results = evaluate(
        model,
        tokenizer,
        assets,
        &config.sequence,
        &specs,
        config.train.eval_samples,
        32,
    )?;
    let line = serde_json::json!({"step": step - 1, "eval": "val", "mean_accuracy": mean_accuracy(&results), "sets": results});
    append_line(&dir.metrics(), &line)?;
    Ok(results)
}

/// The CPU, or the first CUDA device when built with the `cuda` feature and one is present.
pub fn default_device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        return Ok(Device::cuda_if_available(0)?);
    }
    #[allow(unreachable_code)]
    Ok(Device::Cpu)
}

/// The validation table of a summary, as markdown.
pub fn summary_markdown(summary: &TrainSummary) -> String {
    markdown(&summary.validation)
}
