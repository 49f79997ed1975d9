//! Ctrl-C during `--remote`: the job is cancelled on the server (`DELETE /v1/jobs/{id}`), the
//! images it finished stay saved, and the run ends (exit 130) once the server's stream says the
//! job is cancelled. A second Ctrl-C ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};

use super::client::Server;

/// Set by the SIGINT handler (an atomic store is all a handler may safely do).
static SIGNALLED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C was pressed.
pub struct Interrupted;

impl Interrupted {
    pub fn is_set(&self) -> bool {
        SIGNALLED.load(Ordering::SeqCst)
    }
}

#[cfg(unix)]
extern "C" fn on_sigint(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
    // SAFETY: signal(2) is async-signal-safe (POSIX); the next Ctrl-C takes the default action.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
}

/// From now on, Ctrl-C cancels job `id` on `server`.
pub fn cancel_on_ctrl_c(server: &Server, id: &str) -> Interrupted {
    #[cfg(unix)]
    {
        // SAFETY: installs a handler that only stores to an atomic and resets the disposition.
        unsafe { libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t) };
        let (server, id) = (server.clone(), id.to_string());
        // The request cannot be sent from the handler: a thread watches the flag.
        std::thread::spawn(move || {
            while !SIGNALLED.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            crate::progress::warn(&format!("Cancelling job {id} on {} (Ctrl-C again to quit now)", server.url));
            if let Err(e) = server.cancel(&id) {
                crate::progress::warn(&format!("could not cancel job {id}: {e}"));
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (server, id);
    Interrupted
}
