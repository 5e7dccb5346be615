use thiserror::Error;

#[derive(Debug, Error)]
pub enum ScalingError {
    #[error("fit: {0}")]
    Fit(String),
    /// A runs file, grid or CSV with a problem at a named place.
    #[error("{path}: {message}")]
    Input { path: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] tokenfold_data::DataError),
    #[error(transparent)]
    Model(#[from] tokenfold_model::ModelError),
}

pub type Result<T> = std::result::Result<T, ScalingError>;
