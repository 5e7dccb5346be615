use thiserror::Error;

#[derive(Debug, Error)]
pub enum SearchError {
    #[error("search: {0}")]
    Config(String),
    #[error(transparent)]
    Fold(#[from] tokenfold_fold::FoldError),
    #[error(transparent)]
    Model(#[from] tokenfold_model::ModelError),
    #[error(transparent)]
    Data(#[from] tokenfold_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, SearchError>;
