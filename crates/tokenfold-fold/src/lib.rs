//! # tokenfold-fold
//!
//! Visual-token reduction inside tokenfold's models, under one budget accounting:
//!
//! - [`ops`]: the operators as pure functions of (tokens, signals, parameters) → weighted groups of tokens —
//!   prune, merge (bipartite soft matching, nearest anchor), pool, soft redistribution, re-weighting,
//!   random — with [`ops::apply`] turning any of them into tokens and sizes;
//! - [`signals`]: ranking signals from one layer's queries and keys without the full attention matrix;
//! - [`plan`]: the reduction plan (JSON stages of layer, method, parameters) and its validation;
//! - [`hook`]: a [`tokenfold_model::LayerHook`] that runs a plan in the forward pass, batch > 1, KV cache
//!   included, and traces the tokens entering each layer;
//! - [`budget`]: fitting each method to a budget by one rule, analytical prefill FLOPs;
//! - [`unified`]: the unified operator whose parameters span pruning, merging, pooling and re-weighting,
//!   and the settings that reproduce the hand-designed methods;
//! - [`report`]: evaluating a plan (accuracy, budget, measured latency) and the comparison table.
//!
//! It builds on `tokenfold-model` and owns no training code. `docs/token-reduction.md` describes each
//! method and its early-fusion adaptation.

pub mod budget;
pub mod error;
pub mod hook;
pub mod ops;
pub mod plan;
pub mod report;
pub mod signals;
pub mod unified;

#[cfg(test)]
mod tests;

pub use error::{FoldError, Result};
pub use hook::{DART_PIVOTS, FoldHook, SampleSignals, Trace};
pub use plan::{Method, Plan, Stage};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a reader never
/// sees a half-written file.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let io = |e| FoldError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
