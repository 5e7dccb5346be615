//! The training stream: batches generated on the fly from a seed by background workers.
//!
//! Sample `i` of the stream depends only on (seed, i) — its task is drawn from the mixture of its curriculum
//! stage and its content
//! generated with [`sample_rng`] — so the stream is the same whatever the number of workers, and a run
//! resumes exactly from a batch position. Workers produce whole batches in turn (worker w makes batches
//! w, w + W, …) into bounded channels; the consumer reads them round-robin, in order.
//!
//! Workers are plain threads, and what they run must never use rayon: the `tokenfold` binary's main
//! thread is a worker of rayon's pool (and, with one thread, all of it) while it waits on these
//! channels, so rayon work submitted by a loader thread could wait forever.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::sequence::{Batch, SequenceConfig};
use crate::tasks::{Assets, Sample, Split, Task, sample_rng};
use crate::tokenizer::TextTokenizer;

/// Task weights of the training mixture (relative; they need not sum to 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mixture(pub Vec<(Task, f64)>);

impl Mixture {
    /// Equal weights on every image task and on text.
    pub fn uniform() -> Mixture {
        Mixture(Task::ALL.iter().map(|&t| (t, 1.0)).collect())
    }

    pub fn validate(&self) -> Result<()> {
        if self.0.iter().any(|(_, w)| !w.is_finite() || *w < 0.0) {
            return Err(DataError::config(
                "mixture",
                "weights must be finite and >= 0",
            ));
        }
        if self.0.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
            return Err(DataError::config(
                "mixture",
                "at least one weight must be positive",
            ));
        }
        Ok(())
    }

    /// The share of text in the mixture, and its text and image parts as mixtures of their own; `None`
    /// when the mixture is all text or has none.
    pub fn split_text(&self) -> Option<(f64, Mixture, Mixture)> {
        let total: f64 = self.0.iter().map(|(_, w)| w).sum();
        let (text, image): (Vec<_>, Vec<_>) = self.0.iter().partition(|(t, _)| *t == Task::Text);
        let text_weight: f64 = text.iter().map(|(_, w)| w).sum();
        if text_weight <= 0.0 || text_weight >= total {
            return None;
        }
        Some((text_weight / total, Mixture(text), Mixture(image)))
    }

    fn pick(&self, rng: &mut impl Rng) -> Task {
        let total: f64 = self.0.iter().map(|(_, w)| w).sum();
        let mut target = rng.random::<f64>() * total;
        for &(task, weight) in &self.0 {
            if target < weight {
                return task;
            }
            target -= weight;
        }
        self.0
            .iter()
            .rev()
            .find(|(_, w)| *w > 0.0)
            .map(|(t, _)| *t)
            .unwrap_or(Task::Text)
    }
}

impl FromStr for Mixture {
    type Err = DataError;
    /// Parses `exist=2,count=1,text=0.5`.
    fn from_str(s: &str) -> Result<Mixture> {
        let mut weights = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (task, weight) = part.split_once('=').ok_or_else(|| {
                DataError::config("mixture", format!("'{part}' is not task=weight"))
            })?;
            let weight: f64 = weight.trim().parse().map_err(|_| {
                DataError::config(
                    "mixture",
                    format!("weight '{weight}' of {task} is not a number"),
                )
            })?;
            weights.push((task.trim().parse()?, weight));
        }
        let mixture = Mixture(weights);
        mixture.validate()?;
        Ok(mixture)
    }
}

/// Sample `index` of the training stream under `seed`, with up to `follow_ups` further questions about its
/// scene ([`Assets::add_follow_ups`]).
pub fn training_sample(
    assets: &Assets,
    mixture: &Mixture,
    seed: u64,
    index: u64,
    follow_ups: usize,
) -> Sample {
    let mut rng = sample_rng(seed, 0, index);
    let task = mixture.pick(&mut rng);
    let mut sample = assets.sample(task, Split::Train, None, &mut rng);
    assets.add_follow_ups(&mut sample, follow_ups, &mut rng);
    sample
}

/// Batch `batch_index` of the training stream.
// Every argument is one coordinate of the stream; callers outside a `StreamConfig` (the search's
// held-out batches) pass them directly.
#[allow(clippy::too_many_arguments)]
pub fn training_batch(
    assets: &Assets,
    tokenizer: &TextTokenizer,
    seq: &SequenceConfig,
    mixture: &Mixture,
    seed: u64,
    batch_size: usize,
    batch_index: u64,
    follow_ups: usize,
) -> Result<Batch> {
    let first = batch_index * batch_size as u64;
    let samples: Vec<Sample> = (first..first + batch_size as u64)
        .map(|i| training_sample(assets, mixture, seed, i, follow_ups))
        .collect();
    Batch::from_samples(&samples, tokenizer, seq)
}

/// Batch `batch_index` of `stream`, drawn from the mixture of its curriculum stage. With
/// `stream.group_text`, the batch is all text (with the mixture's text share, drawn per batch) or all
/// image samples, each sample still a pure function of (seed, index).
pub fn stream_batch(
    assets: &Assets,
    tokenizer: &TextTokenizer,
    stream: &StreamConfig,
    batch_index: u64,
) -> Result<Batch> {
    let mixture = stream.mixture_at(batch_index);
    let grouped = match (stream.group_text, mixture.split_text()) {
        (true, Some((text_share, text, image))) => {
            // Stream 1 holds the per-batch draws; stream 0 the samples.
            let mut rng = sample_rng(stream.seed, 1, batch_index);
            Some(if rng.random::<f64>() < text_share {
                text
            } else {
                image
            })
        }
        _ => None,
    };
    training_batch(
        assets,
        tokenizer,
        &stream.seq,
        grouped.as_ref().unwrap_or(mixture),
        stream.seed,
        stream.batch_size,
        batch_index,
        stream.follow_ups,
    )
}

/// A curriculum stage: `mixture` applies to the batches before `until_batch` (and after the previous stage).
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub until_batch: u64,
    pub mixture: Mixture,
}

/// What the loader generates.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub seed: u64,
    pub batch_size: usize,
    /// The mixture after the last curriculum stage (all along when there is none).
    pub mixture: Mixture,
    /// Curriculum stages, by increasing `until_batch`.
    pub stages: Vec<Stage>,
    pub seq: SequenceConfig,
    /// Each batch all text or all images (see [`stream_batch`]): a text passage pads a batch of short
    /// image prompts to its own length.
    pub group_text: bool,
    /// Further questions per scene sample ([`Assets::add_follow_ups`]), 0 for none.
    pub follow_ups: usize,
}

/// The most follow-ups a sample may ask for: more do not fit a sequence of usual length.
pub const MAX_FOLLOW_UPS: usize = 8;

impl StreamConfig {
    /// The mixture batch `batch_index` is drawn from.
    pub fn mixture_at(&self, batch_index: u64) -> &Mixture {
        self.stages
            .iter()
            .find(|s| batch_index < s.until_batch)
            .map_or(&self.mixture, |s| &s.mixture)
    }

    pub fn validate(&self) -> Result<()> {
        self.mixture.validate()?;
        self.seq.validate()?;
        if self.batch_size == 0 {
            return Err(DataError::config("batch_size", "must be at least 1"));
        }
        if self.follow_ups > MAX_FOLLOW_UPS {
            return Err(DataError::config(
                "follow_ups",
                format!("{} is above the maximum {MAX_FOLLOW_UPS}", self.follow_ups),
            ));
        }
        let mut previous = 0;
        for (i, stage) in self.stages.iter().enumerate() {
            stage.mixture.validate()?;
            if stage.until_batch <= previous {
                return Err(DataError::config(
                    "curriculum",
                    format!(
                        "stage {i} ends at batch {} but must end after the previous stage (batch {previous})",
                        stage.until_batch
                    ),
                ));
            }
            previous = stage.until_batch;
        }
        Ok(())
    }
}

/// Background batch generation; see the module docs.
pub struct Loader {
    receivers: Vec<Receiver<Result<Batch>>>,
    workers: Vec<JoinHandle<()>>,
    start: u64,
    position: u64,
}

impl Loader {
    /// Starts `workers` threads producing batches from `start_batch` on, each keeping up to `prefetch`
    /// batches ready.
    pub fn spawn(
        assets: Arc<Assets>,
        tokenizer: Arc<TextTokenizer>,
        stream: StreamConfig,
        start_batch: u64,
        workers: usize,
        prefetch: usize,
    ) -> Result<Loader> {
        stream.validate()?;
        let workers_n = workers.max(1);
        let stream = Arc::new(stream);
        let mut receivers = Vec::with_capacity(workers_n);
        let mut handles = Vec::with_capacity(workers_n);
        for worker in 0..workers_n {
            let (sender, receiver): (SyncSender<Result<Batch>>, _) = sync_channel(prefetch.max(1));
            let (assets, tokenizer, stream) = (assets.clone(), tokenizer.clone(), stream.clone());
            handles.push(std::thread::spawn(move || {
                let mut batch_index = start_batch + worker as u64;
                loop {
                    let batch = stream_batch(&assets, &tokenizer, &stream, batch_index);
                    if sender.send(batch).is_err() {
                        return; // the loader was dropped
                    }
                    batch_index += workers_n as u64;
                }
            }));
            receivers.push(receiver);
        }
        Ok(Loader {
            receivers,
            workers: handles,
            start: start_batch,
            position: start_batch,
        })
    }

    /// The next batch, in stream order.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let worker = ((self.position - self.start) % self.receivers.len() as u64) as usize;
        let batch = self.receivers[worker]
            .recv()
            .map_err(|_| DataError::config("loader", "a worker thread stopped"))??;
        self.position += 1;
        Ok(batch)
    }

    /// Index of the batch `next_batch` returns next: the data-stream position to checkpoint.
    pub fn position(&self) -> u64 {
        self.position
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.receivers.clear();
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}
