//! Cooperative cancellation: a flag the caller raises and the pipeline checks between denoising
//! steps and before each stage, so a cancelled job stops at the next boundary with every model it
//! loaded dropped (each stage drops its own) instead of in the middle of a kernel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{Error, Result};

/// A shared cancel flag: clones observe the same flag, so one can be handed to another thread
/// (a server's request handler) while the job runs with its twin.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the job holding this token (or a clone) to stop at its next step or stage boundary.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err(Error::Cancelled)` once cancelled: the check made between steps and stages.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}
