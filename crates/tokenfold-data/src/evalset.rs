//! Fixed, versioned evaluation sets: sample `i` of a set depends only on ([`EVAL_VERSION`], the set, `i`),
//! so the same set is the same bytes on any machine. [`digest`] hashes a set's images and texts; the
//! digests of version 1 are listed by `tokenfold data evalsets`, and a change to generation that alters
//! them must bump [`EVAL_VERSION`].

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::tasks::{Assets, Negatives, Sample, Split, Task, sample_rng};

pub const EVAL_VERSION: u64 = 1;
/// Samples per evaluation set unless asked otherwise.
pub const EVAL_SIZE: usize = 500;
const EVAL_SEED: u64 = 0x0074_636b_666f_6c64; // "tokfold" in ASCII

/// One evaluation set: a task, a held-out split, and for `exist` the kind of negatives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EvalSpec {
    pub task: Task,
    pub split: Split,
    pub negatives: Option<Negatives>,
}

impl EvalSpec {
    /// Every evaluation set of a split: exist with each kind of negatives, then the other tasks.
    pub fn all(split: Split) -> Vec<EvalSpec> {
        let mut specs: Vec<EvalSpec> = Negatives::ALL
            .iter()
            .map(|&n| EvalSpec {
                task: Task::Exist,
                split,
                negatives: Some(n),
            })
            .collect();
        specs.extend(Task::ALL[1..].iter().map(|&task| EvalSpec {
            task,
            split,
            negatives: None,
        }));
        specs
    }

    /// The `describe` set of a split: a diagnostic of recognition (is every object of a scene named with its
    /// cell?), not a benchmark; [`EvalSpec::all`] leaves it out.
    pub fn describe(split: Split) -> EvalSpec {
        EvalSpec {
            task: Task::Describe,
            split,
            negatives: None,
        }
    }

    /// `exist-adversarial`, `count`, …: the task and, for exist, its negatives.
    pub fn task_name(&self) -> String {
        match self.negatives {
            Some(n) => format!("{}-{}", self.task, n.name()),
            None => self.task.to_string(),
        }
    }

    fn stream(&self) -> u64 {
        1 + ((self.task as u64) << 8)
            + ((self.split as u64) << 4)
            + self.negatives.map_or(0, |n| 1 + n as u64)
    }

    /// Sample `index` of the set.
    pub fn sample(&self, assets: &Assets, index: usize) -> Sample {
        let mut rng = sample_rng(EVAL_SEED ^ EVAL_VERSION, self.stream(), index as u64);
        assets.sample(self.task, self.split, self.negatives, &mut rng)
    }

    /// The first `n` samples of the set.
    pub fn build(&self, assets: &Assets, n: usize) -> Vec<Sample> {
        (0..n).map(|i| self.sample(assets, i)).collect()
    }
}

impl fmt::Display for EvalSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.task_name(), self.split)
    }
}

impl FromStr for EvalSpec {
    type Err = DataError;
    /// Parses `exist-popular/test`, `count/val`; a bare `exist` means random negatives.
    fn from_str(s: &str) -> Result<EvalSpec> {
        let (name, split) = s
            .split_once('/')
            .ok_or_else(|| DataError::config("eval set", format!("'{s}' is not <task>/<split>")))?;
        let split: Split = split.parse()?;
        if split == Split::Train {
            return Err(DataError::config(
                "eval set",
                format!("'{s}': evaluation sets are val or test"),
            ));
        }
        let (task, negatives) = match name.split_once('-') {
            Some((task, negatives)) => (task.parse()?, Some(negatives.parse()?)),
            None => (name.parse()?, None),
        };
        let negatives = match (task, negatives) {
            (Task::Exist, None) => Some(Negatives::Random),
            (Task::Exist, n) => n,
            (_, Some(_)) => {
                return Err(DataError::config(
                    "eval set",
                    format!("'{s}': only exist has negatives"),
                ));
            }
            (_, None) => None,
        };
        Ok(EvalSpec {
            task,
            split,
            negatives,
        })
    }
}

/// SHA-256 over every sample's task, image bytes, question and answer, in order.
pub fn digest(samples: &[Sample]) -> String {
    let mut hasher = Sha256::new();
    for sample in samples {
        hasher.update(sample.task.name().as_bytes());
        if let Some(image) = &sample.image {
            hasher.update(image.width().to_le_bytes());
            hasher.update(image.height().to_le_bytes());
            hasher.update(image.as_raw());
        }
        for text in [&sample.question, &sample.answer] {
            hasher.update((text.len() as u64).to_le_bytes());
            hasher.update(text.as_bytes());
        }
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
