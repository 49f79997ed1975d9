//! The engine's error type: every message names the offending thing and, where there is one, what
//! to do about it.

use std::path::PathBuf;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad user input: a request that can never succeed as given (exit code 2 in the CLI).
    #[error("{0}")]
    InvalidInput(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A model file or folder is not what it should be (missing tensor, wrong shape, bad JSON...).
    #[error("{0}")]
    BadModel(String),
    /// A failure inside the tensor engine while generating.
    #[error("tensor engine: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Whether the error is a device allocation failure (CUDA out of memory), which the pipeline
    /// recovers from by retrying the stage under a leaner plan.
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Error::Candle(e) => {
                let text = e.to_string();
                text.contains("OUT_OF_MEMORY") || text.to_ascii_lowercase().contains("out of memory")
            }
            _ => false,
        }
    }

    /// Whether the error is the user's input (as opposed to a failure while generating).
    pub fn is_user_error(&self) -> bool {
        matches!(self, Error::InvalidInput(_) | Error::BadModel(_) | Error::Io { .. })
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
