//! The engine's error type: every message names the offending thing and, where there is one, what
//! to do about it.

use std::path::PathBuf;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad user input: a request that can never succeed as given (exit code 2 in the CLI).
    #[error("{0}")]
    InvalidInput(String),
    /// A request field with a value it cannot take: the field as the engine's request names it
    /// (`width`, `refiner_start`, `skip_layer_guidance`), and what is wrong, worded to follow the
    /// field's name (`width 100 is not a positive multiple of 8`). The CLI names its flag instead,
    /// a server its JSON field ([`Error::describe`]).
    #[error("{field} {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with its value.
        message: String,
    },
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
    /// An error about what one field of the request names (the `refiner`'s model): the field,
    /// the value when it says which, then the cause.
    #[error("{field}{}: {source}", .value.as_ref().map(|v| format!(" {v}")).unwrap_or_default())]
    About {
        /// The field.
        field: &'static str,
        /// Its value, when the cause does not name it.
        value: Option<String>,
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
        Error::About { field, value: None, source: Box::new(source) }
    }

    /// `field`'s value is wrong: `message` says how, worded to follow the field's name.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid { field, message: message.into() }
    }

    /// The field the error is about, if it is about one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::Invalid { field, .. } | Error::About { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The message with each field named as `name` says: a CLI's flags (`width` → `--width`), a
    /// server's JSON fields. Fields `name` does not know keep the engine's names.
    pub fn describe(&self, name: &dyn Fn(&'static str) -> Option<&'static str>) -> String {
        let label = |field: &'static str| name(field).unwrap_or(field);
        match self {
            Error::Invalid { field, message } => format!("{} {message}", label(field)),
            Error::About { field, value, source } => match value {
                Some(v) => format!("{} {v}: {}", label(field), source.describe(name)),
                None => format!("{}: {}", label(field), source.describe(name)),
            },
            other => other.to_string(),
        }
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
            other => {
                matches!(other, Error::InvalidInput(_) | Error::Invalid { .. } | Error::BadModel(_) | Error::Io { .. })
            }
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
