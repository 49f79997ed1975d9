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
    /// An error about what one field of the request names (`--refiner`): the field, then the
    /// cause.
    #[error("{field}: {source}")]
    About {
        /// The field.
        field: &'static str,
        /// What went wrong with it.
        #[source]
        source: Box<Error>,
    },
    /// The job was cancelled (its [`CancelToken`](crate::pipeline::CancelToken)) before it
    /// finished; the batches delivered before stand, nothing of the one in progress is.
    #[error("cancelled")]
    Cancelled,
    /// A failure inside the tensor engine while generating.
    #[error("tensor engine: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// `source`, as an error about `field`.
    pub fn about(field: &'static str, source: Error) -> Self {
        Error::About { field, source: Box::new(source) }
    }

    /// Whether the error is a device allocation failure (CUDA out of memory), which the pipeline
    /// recovers from by retrying the stage under a leaner plan.
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Error::Candle(e) => {
                let text = e.to_string();
                text.contains("OUT_OF_MEMORY") || text.to_ascii_lowercase().contains("out of memory")
            }
            Error::About { source, .. } => source.is_out_of_memory(),
            _ => false,
        }
    }

    /// Whether the error is the user's input (as opposed to a failure while generating).
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::About { source, .. } => source.is_user_error(),
            other => matches!(other, Error::InvalidInput(_) | Error::BadModel(_) | Error::Io { .. }),
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
