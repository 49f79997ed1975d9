//! True per-stage peaks: the kernel's resettable RSS high-water mark where the OS has one
//! (Linux `VmHWM`, reset through `/proc/self/clear_refs`), the device's own peak counter where
//! the GPU probe has one, and a [`Sampler`] thread for the timeline and as the fallback.
//!
//! Stages may nest (a "generation" stage around "load" and "denoise") or overlap on different
//! threads, while the kernel keeps one high-water mark per process. So every reset first folds
//! the peak reached so far into every open stage: no stage loses the peak that a later stage's
//! reset wipes out.

use crate::info::{memory_info_with, GpuProbe, MemoryInfo};
use crate::sampler::{max_opt, Sampler, SamplerConfig, Timeline};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

/// Where a stage's `peak_rss_bytes` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeakSource {
    /// The kernel's high-water mark, reset at the stage start: exact, misses nothing.
    KernelHighWaterMark,
    /// The sampler's maximum (no resettable kernel counter here, or the reset was refused):
    /// spikes shorter than the sampling interval may be missed.
    Sampler,
}

/// Memory of one finished stage, for the console and the metadata sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageMemory {
    /// The stage's name ("text encoders", "denoise", "vae decode", …).
    pub label: String,
    /// Snapshot when the stage started.
    pub before: MemoryInfo,
    /// Snapshot when it finished.
    pub after: MemoryInfo,
    /// Highest process RSS during the stage.
    pub peak_rss_bytes: u64,
    /// Highest GPU memory in use during the stage (sampled, or the device's own counter when
    /// the probe keeps one), when a GPU probe is registered.
    pub peak_gpu_bytes: Option<u64>,
    /// Highest GPU memory held by live allocations during the stage (PyTorch's
    /// `max_memory_allocated`: no context, no cached blocks), where the probe counts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gpu_allocated_bytes: Option<u64>,
    /// How `peak_rss_bytes` was measured.
    pub peak_source: PeakSource,
    /// Wall time of the stage.
    pub elapsed_ms: f64,
    /// The sampler's record (empty if the OS refused the sampler thread).
    pub timeline: Timeline,
}

/// Peaks accumulated by an open stage from resets made by stages started after it.
#[derive(Default)]
struct Accumulator {
    rss_bytes: AtomicU64,
    /// 0 = nothing seen (a GPU using 0 bytes is not worth distinguishing).
    gpu_bytes: AtomicU64,
    /// The same for the allocated peak.
    gpu_allocated_bytes: AtomicU64,
}

/// Open stages, oldest first. Guarded by this lock: reading the peaks, folding them in and
/// resetting the counters happen as one step.
static OPEN_STAGES: Mutex<Vec<Weak<Accumulator>>> = Mutex::new(Vec::new());

/// Measures one stage: create it with [`StagePeak::start`] when the stage begins, call
/// [`finish`](StagePeak::finish) when it ends. Dropping it unfinished stops its sampler.
pub struct StagePeak {
    label: String,
    started: Instant,
    before: MemoryInfo,
    probe: Option<Arc<dyn GpuProbe>>,
    accumulator: Arc<Accumulator>,
    hwm_reset: bool,
    sampler: Option<Sampler>,
}

impl StagePeak {
    /// Starts measuring a stage with the default sampler (20 ms) and the registered GPU probe.
    pub fn start(label: impl Into<String>) -> StagePeak {
        Self::start_with(label, SamplerConfig::default())
    }

    /// Starts measuring a stage with the given sampler settings.
    pub fn start_with(label: impl Into<String>, config: SamplerConfig) -> StagePeak {
        let started = Instant::now();
        let probe = if config.sample_gpu { crate::info::gpu_probe() } else { None };
        let before = memory_info_with(probe.as_deref());
        let accumulator = Arc::new(Accumulator::default());
        let hwm_reset = open_stage(&accumulator, probe.as_deref());
        // Without a thread the kernel counter (where there is one) still gives the peak.
        let sampler = Sampler::start_with_probe(config, probe.clone()).ok();
        StagePeak { label: label.into(), started, before, probe, accumulator, hwm_reset, sampler }
    }

    /// The stage's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether the kernel high-water mark was reset at the start (and so will be the source).
    pub fn uses_kernel_peak(&self) -> bool {
        self.hwm_reset
    }

    /// Ends the stage: stops the sampler, reads the peaks and takes the closing snapshot.
    pub fn finish(mut self) -> StageMemory {
        let timeline = self.sampler.take().map(Sampler::stop).unwrap_or_default();
        let (kernel_rss, device_gpu, allocated_gpu) = {
            let _open = OPEN_STAGES.lock().unwrap_or_else(|e| e.into_inner());
            let kernel = if self.hwm_reset { read_hwm_bytes() } else { None };
            let probe = self.probe.as_deref();
            (kernel, probe.and_then(|p| p.peak_used_bytes()), probe.and_then(|p| p.peak_allocated_bytes()))
        };
        let after = memory_info_with(self.probe.as_deref());
        let elapsed_ms = self.started.elapsed().as_secs_f64() * 1e3;

        let folded_rss = self.accumulator.rss_bytes.load(Ordering::Acquire);
        let peak_source = if kernel_rss.is_some() { PeakSource::KernelHighWaterMark } else { PeakSource::Sampler };
        let peak_rss_bytes = [
            kernel_rss.unwrap_or(0),
            if kernel_rss.is_some() { folded_rss } else { 0 },
            timeline.max_rss_bytes,
            self.before.process_rss_bytes,
            after.process_rss_bytes,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);

        let peak_gpu_bytes = if self.probe.is_some() {
            let folded = Some(self.accumulator.gpu_bytes.load(Ordering::Acquire)).filter(|&b| b > 0);
            [
                device_gpu,
                folded,
                timeline.max_gpu_used_bytes,
                self.before.gpu.map(|g| g.used_bytes),
                after.gpu.map(|g| g.used_bytes),
            ]
            .into_iter()
            .fold(None, max_opt)
        } else {
            None
        };

        let folded_allocated = Some(self.accumulator.gpu_allocated_bytes.load(Ordering::Acquire)).filter(|&b| b > 0);
        let peak_gpu_allocated_bytes = allocated_gpu.map(|a| folded_allocated.map_or(a, |f| f.max(a)));

        StageMemory {
            label: std::mem::take(&mut self.label),
            before: self.before.clone(),
            after,
            peak_rss_bytes,
            peak_gpu_bytes,
            peak_gpu_allocated_bytes,
            peak_source,
            elapsed_ms,
            timeline,
        }
    }
}

/// Registers a new stage: folds the current peaks into the open stages, resets the kernel and
/// device peak counters, and returns whether the kernel reset took.
fn open_stage(accumulator: &Arc<Accumulator>, probe: Option<&dyn GpuProbe>) -> bool {
    let mut open = OPEN_STAGES.lock().unwrap_or_else(|e| e.into_inner());
    fold_into_open_stages(&mut open, probe);
    if let Some(probe) = probe {
        probe.reset_peak();
    }
    let reset = reset_hwm();
    open.push(Arc::downgrade(accumulator));
    reset
}

/// Hands the peaks reached so far to every open stage, before a reset wipes them.
fn fold_into_open_stages(open: &mut Vec<Weak<Accumulator>>, probe: Option<&dyn GpuProbe>) {
    open.retain(|w| w.strong_count() > 0);
    if open.is_empty() {
        return;
    }
    let rss = read_hwm_bytes();
    let gpu = probe.and_then(|p| p.peak_used_bytes());
    let allocated = probe.and_then(|p| p.peak_allocated_bytes());
    for stage in open.iter().filter_map(Weak::upgrade) {
        for (slot, value) in [(&stage.rss_bytes, rss), (&stage.gpu_bytes, gpu), (&stage.gpu_allocated_bytes, allocated)]
        {
            if let Some(v) = value {
                slot.fetch_max(v, Ordering::AcqRel);
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn reset_hwm() -> bool {
    crate::procfs::reset_hwm()
}

#[cfg(target_os = "linux")]
fn read_hwm_bytes() -> Option<u64> {
    crate::procfs::hwm_and_rss().map(|(hwm, _)| hwm)
}

// macOS and Windows have lifetime peaks (ru_maxrss, PeakWorkingSetSize) but no reset of them:
// per-stage peaks there come from the sampler.
#[cfg(not(target_os = "linux"))]
fn reset_hwm() -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
fn read_hwm_bytes() -> Option<u64> {
    None
}

/// Whether this machine gives exact per-stage RSS peaks (the kernel high-water mark can be
/// reset and the reset takes). Performs one reset, safely: open stages keep their peaks.
pub fn kernel_peak_supported() -> bool {
    let mut open = OPEN_STAGES.lock().unwrap_or_else(|e| e.into_inner());
    fold_into_open_stages(&mut open, None);
    reset_hwm()
}
