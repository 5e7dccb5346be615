//! Errors of the fold crate, each naming the plan field, stage or file at fault.

pub type Result<T, E = FoldError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("invalid plan: {0}")]
    Plan(String),
    #[error("budget: {0}")]
    Budget(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] tokenfold_model::ModelError),
    #[error(transparent)]
    Data(#[from] tokenfold_data::DataError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}
