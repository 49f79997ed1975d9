//! Snapshots of process, system and GPU memory: the seed's `get_memory_info()`.
//!
//! Process memory on Linux comes from `/proc/self/statm` (what psutil reads there), elsewhere
//! from `sysinfo`; system memory always from `sysinfo`. GPU memory comes from a [`GpuProbe`] the
//! engine registers, because this crate has no device code (no candle, no CUDA).

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// Device memory of one GPU, as its driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuMemory {
    /// Bytes in use on the device, by every process (CUDA: `total - free`).
    pub used_bytes: u64,
    /// Bytes the driver could still hand out.
    pub free_bytes: u64,
    /// Device memory size.
    pub total_bytes: u64,
}

/// A source of GPU memory figures, implemented by the engine per backend (CUDA `cuMemGetInfo`,
/// Metal allocated size / recommended working set) and registered with [`set_gpu_probe`].
///
/// Implementations are called from the sampler thread every few milliseconds: they must be
/// cheap, thread-safe and must not panic, and must make their device context current
/// themselves (CUDA: `cuCtxSetCurrent` before `cuMemGetInfo`), since that thread is not the
/// engine's.
pub trait GpuProbe: Send + Sync {
    /// Current device memory, or `None` when the query failed (then the figure is left out
    /// rather than guessed).
    fn memory(&self) -> Option<GpuMemory>;

    /// Resets the device's own peak counter, where it keeps one (e.g. the CUDA stream-ordered
    /// pool's `CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH`). Called at every stage start.
    fn reset_peak(&self) {}

    /// Peak bytes in use since the last [`reset_peak`](Self::reset_peak), where the device keeps
    /// such a counter. It catches spikes shorter than the sampling interval.
    fn peak_used_bytes(&self) -> Option<u64> {
        None
    }

    /// Peak bytes held by live allocations since the last reset (no cached blocks, no context or
    /// library memory outside the allocator): the figure PyTorch calls `max_memory_allocated`,
    /// so a stage's own working set can be set beside a peer's.
    fn peak_allocated_bytes(&self) -> Option<u64> {
        None
    }
}

static GPU_PROBE: RwLock<Option<Arc<dyn GpuProbe>>> = RwLock::new(None);

/// Registers the probe that fills [`MemoryInfo::gpu`] (or removes it with `None`); returns the
/// previous one. The engine calls this once it has opened a discrete GPU.
pub fn set_gpu_probe(probe: Option<Arc<dyn GpuProbe>>) -> Option<Arc<dyn GpuProbe>> {
    let mut slot = GPU_PROBE.write().unwrap_or_else(|e| e.into_inner());
    std::mem::replace(&mut *slot, probe)
}

/// The registered GPU probe, if any.
pub fn gpu_probe() -> Option<Arc<dyn GpuProbe>> {
    GPU_PROBE.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// One memory snapshot: the seed's fields (process RSS/VMS, system used/available/percent) in
/// bytes, plus the system total and, with a GPU probe registered, device memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Resident set size of this process.
    pub process_rss_bytes: u64,
    /// Virtual memory size of this process (address space reserved, mostly untouched).
    pub process_vms_bytes: u64,
    /// `system_total_bytes - system_available_bytes`, so that used/total equals the percent and
    /// the console line is self-consistent. psutil 7 computes `used` and `percent` this way on
    /// Linux; on macOS its `used` (active + wired pages) is somewhat smaller.
    pub system_used_bytes: u64,
    /// Memory the OS can give to new allocations without swapping (Linux `MemAvailable`).
    pub system_available_bytes: u64,
    /// Physical memory of the machine.
    pub system_total_bytes: u64,
    /// `100 * used / total`, in percent.
    pub system_percent: f64,
    /// Device memory, when a [`GpuProbe`] is registered and answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuMemory>,
}

/// A memory snapshot using the registered GPU probe (the seed's `get_memory_info()`).
pub fn memory_info() -> MemoryInfo {
    let probe = gpu_probe();
    memory_info_with(probe.as_deref())
}

/// A memory snapshot with an explicit GPU probe (or none), bypassing the registry.
pub fn memory_info_with(gpu: Option<&dyn GpuProbe>) -> MemoryInfo {
    let (process_rss_bytes, process_vms_bytes) = process_memory();
    let (system_total_bytes, system_available_bytes) = system_memory();
    let system_used_bytes = system_total_bytes.saturating_sub(system_available_bytes);
    let system_percent =
        if system_total_bytes == 0 { 0.0 } else { 100.0 * system_used_bytes as f64 / system_total_bytes as f64 };
    MemoryInfo {
        process_rss_bytes,
        process_vms_bytes,
        system_used_bytes,
        system_available_bytes,
        system_total_bytes,
        system_percent,
        gpu: gpu.and_then(|p| p.memory()),
    }
}

/// This process's resident set size, as cheaply as the platform allows (the sampler's read).
pub fn process_rss_bytes() -> u64 {
    process_memory().0
}

/// `(rss_bytes, vms_bytes)` of this process; zeros when the OS refuses to say.
pub(crate) fn process_memory() -> (u64, u64) {
    #[cfg(target_os = "linux")]
    {
        crate::procfs::statm().unwrap_or((0, 0))
    }
    #[cfg(not(target_os = "linux"))]
    {
        use sysinfo::{ProcessRefreshKind, ProcessesToUpdate};
        let Ok(pid) = sysinfo::get_current_pid() else { return (0, 0) };
        let mut system = shared_system().lock().unwrap_or_else(|e| e.into_inner());
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            false,
            ProcessRefreshKind::nothing().with_memory(),
        );
        system.process(pid).map(|p| (p.memory(), p.virtual_memory())).unwrap_or((0, 0))
    }
}

/// `(total_bytes, available_bytes)` of physical memory.
fn system_memory() -> (u64, u64) {
    let mut system = shared_system().lock().unwrap_or_else(|e| e.into_inner());
    system.refresh_memory_specifics(sysinfo::MemoryRefreshKind::nothing().with_ram());
    (system.total_memory(), system.available_memory())
}

/// One `sysinfo::System` for the process: it caches per-process handles between refreshes.
fn shared_system() -> &'static Mutex<sysinfo::System> {
    static SYSTEM: OnceLock<Mutex<sysinfo::System>> = OnceLock::new();
    SYSTEM.get_or_init(|| Mutex::new(sysinfo::System::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FixedGpu;
    impl GpuProbe for FixedGpu {
        fn memory(&self) -> Option<GpuMemory> {
            Some(GpuMemory { used_bytes: 3, free_bytes: 7, total_bytes: 10 })
        }
    }

    #[test]
    fn snapshot_is_plausible_and_consistent() {
        let info = memory_info_with(None);
        assert!(info.process_rss_bytes > 0, "{info:?}");
        assert!(info.process_vms_bytes >= info.process_rss_bytes, "{info:?}");
        assert!(info.system_total_bytes > 0, "{info:?}");
        assert!(info.system_available_bytes <= info.system_total_bytes, "{info:?}");
        assert_eq!(info.system_used_bytes + info.system_available_bytes, info.system_total_bytes);
        assert!((0.0..=100.0).contains(&info.system_percent), "{info:?}");
        assert!(info.gpu.is_none());
    }

    #[test]
    fn explicit_probe_fills_gpu_and_serde_round_trips() {
        let info = memory_info_with(Some(&FixedGpu));
        assert_eq!(info.gpu, Some(GpuMemory { used_bytes: 3, free_bytes: 7, total_bytes: 10 }));
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.contains("\"process_rss_bytes\""), "{json}");
        // serde_json (without its `float_roundtrip` feature) may parse floats 1 ulp off.
        let same = |a: &MemoryInfo, b: &MemoryInfo| {
            (a.system_percent - b.system_percent).abs() < 1e-9
                && MemoryInfo { system_percent: 0.0, ..a.clone() } == MemoryInfo { system_percent: 0.0, ..b.clone() }
        };
        let back: MemoryInfo = serde_json::from_str(&json).unwrap();
        assert!(same(&back, &info), "{back:?} != {info:?}");
        // Without a GPU the field is left out, and old records without it still parse.
        let cpu_only = MemoryInfo { gpu: None, ..info };
        let json = serde_json::to_string(&cpu_only).unwrap();
        assert!(!json.contains("gpu"), "{json}");
        assert!(same(&serde_json::from_str::<MemoryInfo>(&json).unwrap(), &cpu_only));
    }
}
