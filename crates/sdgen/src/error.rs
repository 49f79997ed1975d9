//! The engine's error type: every message names the offending thing and, where there is one, what
//! to do about it.
//!
//! # Fields named inside a message
//! A message that tells the user which setting to change ("raise `strength` or `steps`") names a
//! request field, and each caller spells its fields its own way: the CLI as flags (`--steps`), the
//! server's job API as JSON fields (`steps`), its A1111 routes as A1111 does (`denoising_strength`).
//! So the engine never writes a field's name into its text: it writes a *field reference*, one of
//! the [`field`] constants (`format!("raise {STRENGTH} or {STEPS}")`), which `Display`s as a
//! marker around the engine's name of the field. [`render`] replaces each marker with the field
//! as a caller's name table spells it ([`Error::describe`] for errors; the engine renders its
//! warnings and log lines with [`EngineConfig::field_names`](crate::engine::EngineConfig)), and an
//! error's own `Display` with the engine's names. The markers are two private-use characters
//! ([`OPEN`], [`CLOSE`]), which no message has otherwise.
//!
//! A server sends each message also as a *template*, every field written `{field}` by the
//! engine's name ([`Error::template`]; an engine's lines with [`as_template`] as its names), which
//! its client fills in with its own names ([`fill`]): `generate --remote` shows its flags.
//!
//! Messages about what no request field sets (a rebuild with `--features cuda`, `HF_HUB_OFFLINE`)
//! keep their text.

use std::path::PathBuf;

/// Opens a field reference in a message (U+E000, private use).
pub const OPEN: char = '\u{E000}';
/// Closes a field reference.
pub const CLOSE: char = '\u{E001}';

/// A request field named inside a message: `Display`s as a marked reference that [`render`]
/// spells as the caller names the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldRef(pub &'static str);

impl std::fmt::Display for FieldRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{OPEN}{}{CLOSE}", self.0)
    }
}

/// Declares each field a message can name: a [`FieldRef`] constant, and [`field::ALL`].
macro_rules! fields {
    ($($konst:ident = $name:literal),* $(,)?) => {
        $(
            #[doc = concat!("The request's `", $name, "`.")]
            pub const $konst: FieldRef = FieldRef($name);
        )*
        /// Every field an engine message or error can name, by the engine's name: each caller's
        /// table names them all (the CLI's flags; the server's JSON fields, where it has them).
        pub const ALL: &[&str] = &[$($name),*];
        /// Each of [`ALL`] written `{field}`, as templates write them ([`super::as_template`]).
        pub const TEMPLATES: &[&str] = &[$(concat!("{", $name, "}")),*];
    };
}

/// A field reference inside a string literal (a message in a `const` table, built with
/// `concat!`): the same marker as [`FieldRef`]'s, for a field of [`field::ALL`] (unlike the
/// constants, the name is not checked when it compiles: one not in the list is written as
/// given).
#[macro_export]
macro_rules! field_ref {
    ($name:literal) => {
        concat!("\u{E000}", $name, "\u{E001}")
    };
}

/// The request fields messages refer to ([`FieldRef`]s), by the engine's names.
pub mod field {
    use super::FieldRef;

    fields! {
        MODEL = "model",
        CONFIG_FROM = "config_from",
        N = "n",
        BATCH_SIZE = "batch_size",
        SEED = "seed",
        STEPS = "steps",
        GUIDANCE = "guidance",
        WIDTH = "width",
        HEIGHT = "height",
        SCHEDULER = "scheduler",
        STRENGTH = "strength",
        INIT_IMAGE = "init_image",
        VAE = "vae",
        REFINER = "refiner",
        REFINER_START = "refiner_start",
        REFINER_STRENGTH = "refiner_strength",
        NO_T5 = "no_t5",
        MAX_SEQUENCE_LENGTH = "max_sequence_length",
        SKIP_LAYER_GUIDANCE = "skip_layer_guidance",
        PROMPT_STYLE = "prompt_style",
        CLIP_SKIP = "clip_skip",
        LORA = "lora",
        WEIGHTS = "weights",
        DEVICE = "device",
        DTYPE = "dtype",
        UPSCALE = "upscale",
        HIRES_STRENGTH = "hires_strength",
        QUALITY = "quality",
        OUTPUT = "output",
        MAX_MEMORY = "max_memory",
        MEMORY_MODE = "memory_mode",
    }
}

/// A field named at run time (the planner's advice names the fields it would change) as a
/// reference callers spell their own way; one that is not a request field keeps its flag
/// spelling (`--name`).
pub fn field_ref_named(name: &str) -> String {
    match field::ALL.iter().find(|&&f| f == name) {
        Some(&known) => FieldRef(known).to_string(),
        None => sdgen_memory::plan::flag_name(name),
    }
}

/// A caller's names of the request's fields: `Some(name)` for each it spells its own way (the
/// CLI's `--steps`), `None` to keep the engine's.
pub type FieldNames = fn(&'static str) -> Option<&'static str>;

/// `text` with each field reference spelled as `name` says (a field it does not know keeps the
/// engine's name); an unclosed marker is dropped.
pub fn render(text: &str, name: &dyn Fn(&'static str) -> Option<&'static str>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len_utf8()..];
        let Some(end) = after.find(CLOSE) else {
            rest = after;
            break;
        };
        let given = &after[..end];
        let known = field::ALL.iter().find(|&&f| f == given);
        // Not a field (the markers in a user's text, quoted back): the text as it was given.
        out.push_str(known.and_then(|&f| name(f)).unwrap_or(given));
        rest = &after[end + CLOSE.len_utf8()..];
    }
    out.push_str(rest);
    out
}

/// `text` with each field reference spelled as the engine names the field.
pub fn plain(text: &str) -> String {
    render(text, &|_| None)
}

/// The field written `{field}`, as [`Error::template`] writes it: the [`FieldNames`] of an engine
/// whose lines a server words for each client (each line's template, filled in with [`fill`]).
pub fn as_template(field: &'static str) -> Option<&'static str> {
    field::ALL.iter().position(|&f| f == field).map(|i| field::TEMPLATES[i])
}

/// A [`Error::template`] with each `{field}` (a field of [`field::ALL`]) named as `name` says:
/// how a client of a server words the server's message with its own names (`generate --remote`
/// its flags). Other braces stay as they are.
pub fn fill(template: &str, name: &dyn Fn(&'static str) -> Option<&'static str>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let known = after.find('}').and_then(|end| field::ALL.iter().find(|&&f| f == &after[..end]));
        match known {
            Some(&f) => {
                out.push_str(name(f).unwrap_or(f));
                rest = &after[f.len() + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad user input: a request that can never succeed as given (exit code 2 in the CLI).
    #[error("{}", plain(.0))]
    InvalidInput(String),
    /// A request field with a value it cannot take: the field as the engine's request names it
    /// (`width`, `refiner_start`, `skip_layer_guidance`), and what is wrong, worded to follow the
    /// field's name (`width 100 is not a positive multiple of 8`). The CLI names its flag instead,
    /// a server its JSON field ([`Error::describe`]).
    #[error("{field} {}", plain(.message))]
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
    #[error("{}", plain(.0))]
    BadModel(String),
    /// The memory planner found no plan that fits the budget: its numbers and what would help
    /// (the fields its advice changes as references). A request that can never run as given
    /// here, like [`Error::InvalidInput`], told apart so a server answers it as a lack of memory
    /// (507), not a wrong field.
    #[error("{}", plain(.0))]
    DoesNotFit(String),
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

    /// The message with each field — the one it is about and those its text refers to — named
    /// as `name` says: a CLI's flags (`width` → `--width`), a server's JSON fields. Fields `name`
    /// does not know keep the engine's names.
    pub fn describe(&self, name: &dyn Fn(&'static str) -> Option<&'static str>) -> String {
        let label = |field: &'static str| name(field).unwrap_or(field);
        match self {
            Error::Invalid { field, message } => format!("{} {}", label(field), render(message, name)),
            Error::InvalidInput(text) | Error::BadModel(text) | Error::DoesNotFit(text) => render(text, name),
            Error::About { field, value, source } => match value {
                Some(v) => format!("{} {v}: {}", label(field), source.describe(name)),
                None => format!("{}: {}", label(field), source.describe(name)),
            },
            other => other.to_string(),
        }
    }

    /// The message with each field it names written `{field}`, by the engine's name: what a
    /// server sends beside the message it words with its own names, for a client to word with
    /// its own ([`fill`]).
    pub fn template(&self) -> String {
        self.describe(&as_template)
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
            other => matches!(
                other,
                Error::InvalidInput(_)
                    | Error::Invalid { .. }
                    | Error::BadModel(_)
                    | Error::Io { .. }
                    | Error::DoesNotFit(_)
            ),
        }
    }

    /// Whether the error is the memory planner's refusal ([`Error::DoesNotFit`]), of the job or
    /// of one of its passes.
    pub fn is_does_not_fit(&self) -> bool {
        match self {
            Error::About { source, .. } => source.is_does_not_fit(),
            other => matches!(other, Error::DoesNotFit(_)),
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::field::{STEPS, STRENGTH};
    use super::*;

    /// A message's references are spelled by whoever shows it; its `Display` uses the engine's
    /// names, as do fields a caller's table does not list.
    #[test]
    fn references_are_rendered_as_the_caller_names_fields() {
        let err =
            Error::invalid("strength", format!("0.1 with 4 steps leaves no step to run: raise {STRENGTH} or {STEPS}"));
        assert_eq!(err.to_string(), "strength 0.1 with 4 steps leaves no step to run: raise strength or steps");
        let flags = |f: &'static str| (f == "strength").then_some("--strength");
        assert_eq!(
            err.describe(&flags),
            "--strength 0.1 with 4 steps leaves no step to run: raise --strength or steps"
        );
        let wrapped = Error::about("refiner", Error::InvalidInput(format!("pass {STEPS}")));
        assert_eq!(wrapped.describe(&|f| (f == "steps").then_some("--steps")), "refiner: pass --steps");
        assert_eq!(wrapped.to_string(), "refiner: pass steps");
    }

    /// A server sends the template; its client fills it in with its own names.
    #[test]
    fn templates_are_filled_with_a_clients_names() {
        let err = Error::invalid("strength", format!("0.1 with 4 steps: raise {STRENGTH} or {STEPS}"));
        let template = err.template();
        assert_eq!(template, "{strength} 0.1 with 4 steps: raise {strength} or {steps}");
        let flags = |f: &'static str| Some(if f == "strength" { "--strength" } else { "--steps" });
        assert_eq!(fill(&template, &flags), "--strength 0.1 with 4 steps: raise --strength or --steps");
        assert_eq!(fill("{not_a_field} {x", &flags), "{not_a_field} {x");
    }

    #[test]
    fn literal_references_and_unclosed_markers() {
        assert_eq!(plain(concat!("see ", crate::field_ref!("config_from"), " DIR")), "see config_from DIR");
        assert_eq!(plain(&format!("a {OPEN}steps")), "a steps");
        // Markers around what is no field (a user's text quoted back) leave its text.
        assert_eq!(render(&format!("{OPEN}prompt{CLOSE}"), &|_| Some("--x")), "prompt");
        assert_eq!(plain("no references"), "no references");
    }
}
