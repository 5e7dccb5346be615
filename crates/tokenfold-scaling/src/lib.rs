//! tokenfold-scaling: how big a native multimodal model should be, on how many tokens.
//!
//! - [`flops`]: training FLOPs under the scaling-law conventions (6ND, late fusion, MoE) and counted per
//!   operation with an explicit attention window.
//! - [`law`]: the Chinchilla Approach 3 fit of L(N, D) = E + A/N^α + B/D^β (summed Huber, L-BFGS from
//!   a grid of starts, boundary check), compute-optimal N* and D* in closed form and by regression, the
//!   loss–compute frontier L = K·C^c, bootstrap intervals, prediction error, and the compression-factor
//!   law with per-modality token weights.
//! - [`runs`]: run records (`runs.jsonl`, written atomically) and CSV tables of (N, D, loss).
//!
//! It owns no training: sweeps drive `tokenfold-model` and hand this crate their records. The method
//! and its choices are in `docs/scaling-laws.md`.

pub mod error;
pub mod flops;
pub mod law;
pub mod runs;
pub mod sweep;

#[cfg(test)]
mod tests;

pub use error::{Result, ScalingError};
pub use law::{Fit, FitOptions, Law, Point};
pub use runs::RunRecord;
