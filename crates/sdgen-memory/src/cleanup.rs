//! Returning memory after a stage: the seed's `cleanup_memory(aggressive)`.
//!
//! Rust frees eagerly, so there is no garbage collector to run; what holds on to freed memory
//! is caches: glibc keeps freed heap pages in its arenas (`malloc_trim` hands them back to the
//! OS), and device backends keep freed device memory in pools (CUDA sync + pool trim, Metal
//! buffer caches). The device part lives in the engine, which registers it here as a hook.

use crate::info::{gpu_probe, process_rss_bytes};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Pause between the two passes of aggressive cleanup: the seed's 0.5 s, which lets
/// asynchronous frees (device work still in flight, other threads' drops) land before the
/// second pass.
pub const AGGRESSIVE_PAUSE: Duration = Duration::from_millis(500);

type Hook = Arc<dyn Fn() + Send + Sync>;

static HOOKS: Mutex<Vec<(u64, String, Hook)>> = Mutex::new(Vec::new());
static NEXT_HOOK_ID: AtomicU64 = AtomicU64::new(1);

/// Identifies a registered cleanup hook, for [`unregister_cleanup_hook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CleanupHookId(u64);

/// Registers a callback that [`cleanup_memory`] runs on every pass, before trimming the heap:
/// the engine's device-cache release (CUDA stream sync + memory-pool trim, Metal cache release).
/// `name` is for diagnostics. Hooks run on the calling thread, in registration order, and must
/// not panic.
pub fn register_cleanup_hook(name: impl Into<String>, hook: impl Fn() + Send + Sync + 'static) -> CleanupHookId {
    let id = NEXT_HOOK_ID.fetch_add(1, Ordering::Relaxed);
    HOOKS.lock().unwrap_or_else(|e| e.into_inner()).push((id, name.into(), Arc::new(hook)));
    CleanupHookId(id)
}

/// Removes a hook (e.g. when its device is closed); returns whether it was registered.
pub fn unregister_cleanup_hook(id: CleanupHookId) -> bool {
    let mut hooks = HOOKS.lock().unwrap_or_else(|e| e.into_inner());
    let before = hooks.len();
    hooks.retain(|(hook_id, _, _)| *hook_id != id.0);
    hooks.len() != before
}

/// Names of the registered hooks, in the order they run.
pub fn cleanup_hook_names() -> Vec<String> {
    HOOKS.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(_, name, _)| name.clone()).collect()
}

/// What a cleanup did, measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CleanupReport {
    /// Whether it was the aggressive (two-pass) cleanup.
    pub aggressive: bool,
    /// Passes made (1, or 2 when aggressive).
    pub passes: u32,
    /// Hook calls made, over all passes.
    pub hooks_run: usize,
    /// Process RSS before the cleanup.
    pub rss_before_bytes: u64,
    /// Process RSS after it.
    pub rss_after_bytes: u64,
    /// `rss_before_bytes - rss_after_bytes`, or 0 if RSS grew meanwhile (other threads).
    pub released_bytes: u64,
    /// Drop in GPU memory in use, when a GPU probe is registered (device-wide figure: other
    /// processes' activity shows in it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_released_bytes: Option<u64>,
    /// Wall time, including the aggressive pause.
    pub elapsed_ms: f64,
}

/// Returns freed memory to the OS and device: runs the registered hooks, then trims the glibc
/// heap. `aggressive` does it twice with [`AGGRESSIVE_PAUSE`] between, like the seed's
/// aggressive mode. Reports the bytes released, as measured by RSS before and after.
pub fn cleanup_memory(aggressive: bool) -> CleanupReport {
    let started = Instant::now();
    let probe = gpu_probe();
    let gpu_before = probe.as_ref().and_then(|p| p.memory()).map(|m| m.used_bytes);
    let rss_before_bytes = process_rss_bytes();
    let passes = if aggressive { 2 } else { 1 };
    let mut hooks_run = 0;
    for pass in 0..passes {
        if pass > 0 {
            std::thread::sleep(AGGRESSIVE_PAUSE);
        }
        // Clone out of the lock so a hook may (un)register hooks without deadlocking.
        let hooks: Vec<Hook> =
            HOOKS.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(_, _, h)| Arc::clone(h)).collect();
        for hook in &hooks {
            hook();
        }
        hooks_run += hooks.len();
        trim_heap();
    }
    let rss_after_bytes = process_rss_bytes();
    let gpu_after = probe.as_ref().and_then(|p| p.memory()).map(|m| m.used_bytes);
    CleanupReport {
        aggressive,
        passes,
        hooks_run,
        rss_before_bytes,
        rss_after_bytes,
        released_bytes: rss_before_bytes.saturating_sub(rss_after_bytes),
        gpu_released_bytes: gpu_before.zip(gpu_after).map(|(b, a)| b.saturating_sub(a)),
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    }
}

/// Gives free heap pages back to the OS. glibc's `free` returns only the top of the main heap
/// and whole mmap'd chunks; `malloc_trim(0)` also releases free pages inside every arena
/// (glibc ≥ 2.8, via `MADV_DONTNEED`), which is where freed tensors' host buffers end up.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; any pad is valid.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl, macOS libmalloc, Windows) have no such call or return pages on
/// their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}
