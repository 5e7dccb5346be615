//! # tokenfold-search
//!
//! Efficient Operator Search (EOS): a differentiable search over the unified reduction operator of
//! [`tokenfold_fold::unified`] that decides, per layer of a frozen model, whether it reduces, how many
//! visual tokens it keeps and how it treats the others, minimising the expected task loss under one-sided
//! budget and cost constraints, and emits a discrete plan that `tokenfold fold` runs.
//!
//! - [`space`]: the search variables and their maps onto the operator's parameters;
//! - [`relax`]: the relaxed operator (soft top-k, soft transfer, expected activation) inside the forward
//!   pass;
//! - [`search`]: objective, constraints, phases, and the discrete plan with its report;
//! - [`seed`]: hand-designed plans as starting points, the hill-climb over the best one's schedule (tokens
//!   per layer), and the held-out selection of the plan emitted.
//!
//! `docs/operator-space.md` defines the space, its special cases and the relaxation.

pub mod error;
pub mod relax;
pub mod search;
pub mod seed;
pub mod space;

#[cfg(test)]
mod tests;

pub use error::{Result, SearchError};
pub use search::{
    Candidate, ScoredSchedule, SearchConfig, SearchReport, SeededRun, StepRecord, discretise,
    search,
};
pub use space::{LayerParams, SearchSpace, SpaceInit};
