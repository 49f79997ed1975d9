//! Memory management for SD-Generate, without tensors or models: what the process, the system
//! and the GPU use now ([`memory_info`]), the true peak of each stage ([`StagePeak`]: the
//! kernel's resettable high-water mark plus a [`Sampler`] thread), returning freed memory
//! ([`cleanup_memory`]), the seed's console lines ([`log_memory_status`],
//! [`format_low_memory_warning`]), its requirement table ([`MODEL_REQUIREMENTS`]) and the
//! memory planner ([`plan`]: from the model's tensor manifest to what runs where, refusing
//! before loading when nothing fits).
//!
//! The seed's developer API maps as: `get_memory_info()` → [`memory_info`],
//! `cleanup_memory(aggressive)` → [`cleanup_memory`], `log_memory_status(label)` →
//! [`log_memory_status`]. Sizes are bytes everywhere (`rss_bytes`); the console shows GiB and
//! calls them "GB", like the seed.
//!
//! Device specifics stay in the engine, which plugs them in: a [`GpuProbe`] for device memory
//! ([`set_gpu_probe`]) and cleanup hooks for device caches ([`register_cleanup_hook`]).
//!
//! ```no_run
//! use sdgen_memory::{cleanup_memory, log_memory_status, StagePeak};
//!
//! log_memory_status("Startup");
//! let stage = StagePeak::start("denoise");
//! // … run the stage …
//! let memory = stage.finish();
//! eprintln!("peak {} bytes ({:?})", memory.peak_rss_bytes, memory.peak_source);
//! cleanup_memory(false);
//! log_memory_status("After generation");
//! ```
#![deny(missing_docs)]

mod cleanup;
mod console;
mod info;
pub mod limits;
mod peak;
pub mod plan;
mod process_limit;
#[cfg(target_os = "linux")]
mod procfs;
mod requirements;
mod sampler;

pub use cleanup::{
    cleanup_hook_names, cleanup_memory, register_cleanup_hook, unregister_cleanup_hook, CleanupHookId, CleanupReport,
    AGGRESSIVE_PAUSE,
};
pub use console::{
    bytes_to_gb, format_gb, format_low_memory_warning, format_memory_line, log_memory_status, BYTES_PER_GB,
};
pub use info::{
    gpu_probe, memory_info, memory_info_with, process_rss_bytes, set_gpu_probe, GpuMemory, GpuProbe, MemoryInfo,
};
pub use peak::{kernel_peak_supported, PeakSource, StageMemory, StagePeak};
pub use process_limit::{process_memory_limit, LimitKind, ProcessLimit};
pub use requirements::{MemoryVerdict, ModelClass, ModelRequirement, MODEL_REQUIREMENTS};
pub use sampler::{Sample, Sampler, SamplerConfig, Timeline};
