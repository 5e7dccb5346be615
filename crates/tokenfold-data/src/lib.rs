//! # tokenfold-data
//!
//! The data layer of tokenfold: real multimodal data, the benchmark tasks, the tokenizer and batching.
//! It owns no tensors (the model crate turns [`Batch`]es into tensors) and no model logic.
//!
//! - Sources ([`emoji`], [`digits`], [`speeches`]): real emoji images with CLDR labels, MNIST digits and
//!   State of the Union addresses, installed by `scripts/fetch-data.sh` into `$TOKENFOLD_DATA` ([`store`]).
//! - [`vocab`]: the object vocabulary the scenes draw from, selected by a documented rule.
//! - [`scene`] and [`tasks`]: scene rendering and the seven tasks, with held-out compositions;
//!   [`evalset`]: fixed, versioned evaluation sets.
//! - [`tokenizer`]: byte-level BPE; [`sequence`]: one sequence format and batches padded to their longest sample;
//!   [`loader`]: the seeded, resumable training stream produced by background workers.
//! - [`preview`]: contact sheets of samples for people to look at.
//!
//! `docs/data.md` in the repository describes the tasks, splits and formats in prose.

pub mod digits;
pub mod emoji;
pub mod error;
pub mod evalset;
pub mod fixture;
pub mod loader;
pub mod preview;
pub mod scene;
pub mod sequence;
pub mod speeches;
pub mod store;
pub mod tasks;
pub mod tokenizer;
pub mod vocab;

#[cfg(test)]
mod tests;

pub use error::{DataError, Result};
pub use evalset::EvalSpec;
pub use loader::{Loader, Mixture, Stage, StreamConfig};
pub use scene::SceneConfig;
pub use sequence::{Batch, SequenceConfig};
pub use store::DataPaths;
pub use tasks::{Assets, Negatives, Sample, Split, Task};
pub use tokenizer::TextTokenizer;

use std::path::Path;

/// Writes a file atomically: the bytes go to a temporary file in the same folder, which is then renamed
/// over `path`, so a reader never sees half a file and an interrupted write loses nothing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
}
