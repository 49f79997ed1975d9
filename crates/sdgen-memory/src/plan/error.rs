//! The planner's errors: a refusal before anything is loaded, with the numbers and what would
//! help, or a request it cannot plan.

use serde::{Deserialize, Serialize};

use super::planner::Plan;
use super::table::format_bytes;

/// A request field a suggestion changes and the value to give it. The field is the engine
/// request's name (`max_memory`); each caller spells it its own way ([`Suggestion::describe`]: a
/// command line's flag, a server's JSON field), so the advice names what its reader can send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fix {
    /// The field (`width`).
    pub field: String,
    /// Its value (`512`).
    pub value: String,
}

impl Fix {
    /// `field` set to `value`.
    pub fn new(field: &str, value: impl Into<String>) -> Self {
        Self { field: field.into(), value: value.into() }
    }
}

/// A field spelled as `generate`'s flag (`max_memory` → `--max-memory`): how the planner's own
/// `Display` names fields, for the command line and the logs.
pub fn flag_name(field: &str) -> String {
    format!("--{}", field.replace('_', "-"))
}

/// Something that would make a refused generation fit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suggestion {
    /// The fields to change (`width` 512 and `height` 512), when it is a change of fields.
    pub fixes: Vec<Fix>,
    /// Why, or what to do when it is not a change of fields.
    pub detail: String,
}

impl Suggestion {
    /// The suggestion with each field named as `name` says.
    pub fn describe(&self, name: &dyn Fn(&str) -> String) -> String {
        match (self.flags_named(name), self.detail.is_empty()) {
            (Some(fixes), true) => fixes,
            (Some(fixes), false) => format!("{fixes} ({})", self.detail),
            (None, _) => self.detail.clone(),
        }
    }

    /// The flags to pass (`--width 512 --height 512`), when it is a change of fields.
    pub fn flags(&self) -> Option<String> {
        self.flags_named(&flag_name)
    }

    fn flags_named(&self, name: &dyn Fn(&str) -> String) -> Option<String> {
        let fixes: Vec<String> = self.fixes.iter().map(|f| format!("{} {}", name(&f.field), f.value)).collect();
        (!fixes.is_empty()).then(|| fixes.join(" "))
    }
}

impl std::fmt::Display for Suggestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe(&flag_name))
    }
}

/// Why there is no plan.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanError {
    /// No plan fits: even with every option the mode allows, `stage` needs more than the budget.
    DoesNotFit {
        /// The first stage that does not fit.
        stage: String,
        /// Its smallest estimated peak (every allowed option on, one image per batch).
        need_bytes: u64,
        /// The budget.
        budget_bytes: u64,
        /// The budget less the safety margin.
        usable_bytes: u64,
        /// What would help, most useful first.
        suggestions: Vec<Suggestion>,
        /// The leanest plan tried (verdict [`DoesNotFit`](super::Verdict::DoesNotFit)), for
        /// `--check` and the logs.
        plan: Box<Plan>,
    },
    /// The manifest lacks a component a stage needs (or its tensors).
    MissingComponent {
        /// The planner's component (`vae_decoder`).
        component: String,
        /// The model folder's component it comes from (`vae`).
        source: String,
        /// The stage that needs it.
        stage: String,
    },
    /// The request itself is invalid (names the field and value).
    InvalidRequest(String),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.write_named(f, &flag_name)
    }
}

impl PlanError {
    /// The message with each field its suggestions change named as `name` says (its `Display`
    /// names them as `generate`'s flags).
    pub fn describe(&self, name: &dyn Fn(&str) -> String) -> String {
        struct Named<'a>(&'a PlanError, &'a dyn Fn(&str) -> String);
        impl std::fmt::Display for Named<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.write_named(f, self.1)
            }
        }
        Named(self, name).to_string()
    }

    fn write_named(&self, f: &mut std::fmt::Formatter<'_>, name: &dyn Fn(&str) -> String) -> std::fmt::Result {
        match self {
            PlanError::DoesNotFit { stage, need_bytes, budget_bytes, usable_bytes, suggestions, plan } => {
                // What the leanest plan already does: the stage's slower options, and the weights
                // the planner's last rung holds quantised (the denoiser's, whichever stage failed).
                let mut leanest =
                    plan.stages.iter().find(|s| s.stage == *stage).map_or(vec![], |s| s.options.describe());
                leanest.extend(plan.quantised.as_ref().map(|q| format!("weights quantised to {}", q.weights)));
                let with =
                    if leanest.is_empty() { String::new() } else { format!(" even with {}", leanest.join(", ")) };
                let per_batch = if plan.n_images > 1 { ", one image per batch" } else { "" };
                write!(
                    f,
                    "{} at {}×{} does not fit in {} ({}; {} usable after the {:.0}% safety margin): the {stage} stage \
                     needs {}{with}{per_batch}",
                    plan.family,
                    plan.width,
                    plan.height,
                    format_bytes(*budget_bytes),
                    plan.budget_source.label(),
                    format_bytes(*usable_bytes),
                    plan.safety_margin * 100.0,
                    format_bytes(*need_bytes),
                )?;
                if !suggestions.is_empty() {
                    let list: Vec<String> = suggestions.iter().map(|s| s.describe(name)).collect();
                    write!(f, ". What would help: {}", list.join("; "))?;
                }
                Ok(())
            }
            PlanError::MissingComponent { component, source, stage } => write!(
                f,
                "the model has no `{source}` weights for its {component} (needed by the {stage} stage): is the model \
                 folder complete?"
            ),
            PlanError::InvalidRequest(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for PlanError {}
