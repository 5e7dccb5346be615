//! The one error type of the data layer: every variant names the file, field or value at fault.

use std::path::PathBuf;

pub type Result<T, E = DataError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "data folder {path} has no {what}: run scripts/fetch-data.sh (or set TOKENFOLD_DATA to the folder it filled)"
    )]
    MissingData { path: PathBuf, what: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: record {index}: {message}")]
    Record {
        path: PathBuf,
        index: usize,
        message: String,
    },

    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },

    #[error("invalid value for {field}: {message}")]
    Config { field: String, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        DataError::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

/// Parses a whole JSON file, naming it in the error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|source| DataError::Json {
        path: path.to_path_buf(),
        source,
    })
}
