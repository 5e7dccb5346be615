//! # tokenfold-model
//!
//! Native multimodal model building blocks on candle: the early-fusion decoder ([`model`]), the ops it is
//! made of, each with a backward pass ([`ops`]), AdamW and schedules ([`optim`]), training with atomic,
//! resumable checkpoints ([`train`]), and evaluation by greedy KV-cache generation ([`eval`]). For
//! inference, fused kernels ([`kernels`]) and weights packed for products of few rows ([`panels`]).
//!
//! It builds on `tokenfold-data` (batches, tasks, tokenizer) and owns no data logic.

pub mod awake;
pub mod config;
pub mod error;
pub mod eval;
pub mod kernels;
pub mod model;
pub mod moe;
pub mod ops;
pub mod optim;
pub mod panels;
pub mod train;
pub mod vision;

#[cfg(test)]
mod tests;

pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use model::{Inputs, KvCache, LayerHook, NativeModel, NoHook, SeqState};
