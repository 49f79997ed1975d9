//! Stage peaks, cleanup and the sampler, measured on this process. Each test takes `SERIAL`:
//! RSS is process-wide, so tests allocating concurrently would see each other's memory.

use sdgen_memory::{
    cleanup_memory, gpu_probe, kernel_peak_supported, memory_info, process_rss_bytes, register_cleanup_hook,
    set_gpu_probe, unregister_cleanup_hook, GpuMemory, GpuProbe, PeakSource, Sampler, SamplerConfig, StagePeak,
};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const MB: u64 = 1 << 20;
const ALLOC_BYTES: usize = 200 << 20;
const TOLERANCE_BYTES: u64 = 32 * MB;

/// 200 MB in 64 KB blocks (below glibc's mmap threshold, so they live in malloc arenas, not in
/// their own mappings), every page written, plus a small block allocated last that pins the top
/// of the heap: freeing the blocks then leaves free pages *inside* the heap, which only
/// `malloc_trim` hands back.
fn touch_heap_blocks() -> (Vec<Vec<u8>>, Vec<u8>) {
    let blocks: Vec<Vec<u8>> = (0..ALLOC_BYTES / (64 << 10)).map(|i| vec![(i % 251 + 1) as u8; 64 << 10]).collect();
    let pin = vec![7u8; 1024];
    (black_box(blocks), black_box(pin))
}

/// A stage config whose sampler only samples at start and stop: whatever a stage sees beyond
/// those two instants comes from the kernel high-water mark.
fn kernel_only() -> SamplerConfig {
    SamplerConfig { interval: Duration::from_secs(3600), ..SamplerConfig::default() }
}

fn expected_source() -> PeakSource {
    if kernel_peak_supported() {
        PeakSource::KernelHighWaterMark
    } else {
        PeakSource::Sampler
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / MB as f64
}

#[test]
fn allocation_shows_in_stage_peak_and_cleanup_returns_it() {
    let _serial = serial();
    cleanup_memory(false);
    let stage = StagePeak::start("alloc");
    let (blocks, pin) = touch_heap_blocks();
    // Held long enough for the 20 ms sampler to see it too.
    std::thread::sleep(Duration::from_millis(100));
    drop(blocks);
    let rss_after_drop = process_rss_bytes();
    let memory = stage.finish();
    let rss_start = memory.before.process_rss_bytes;
    let report = cleanup_memory(false);
    let rss_end = process_rss_bytes();
    eprintln!(
        "start {:.1} MB, peak {:.1} MB ({:?}), sampler max {:.1} MB, after drop {:.1} MB, \
         after cleanup {:.1} MB (released {:.1} MB)",
        mb(rss_start),
        mb(memory.peak_rss_bytes),
        memory.peak_source,
        mb(memory.timeline.max_rss_bytes),
        mb(rss_after_drop),
        mb(rss_end),
        mb(report.released_bytes),
    );
    drop(pin);

    assert_eq!(memory.peak_source, expected_source());
    assert!(memory.peak_rss_bytes >= rss_start + ALLOC_BYTES as u64 - 8 * MB, "{memory:?}");
    assert!(memory.timeline.max_rss_bytes >= rss_start + ALLOC_BYTES as u64 - 8 * MB, "sampler missed it");
    assert!(memory.peak_rss_bytes >= memory.timeline.max_rss_bytes);
    assert!(rss_end <= rss_start + TOLERANCE_BYTES, "RSS not returned: {} MB → {} MB", mb(rss_start), mb(rss_end));
    assert!(memory.elapsed_ms >= 100.0, "{}", memory.elapsed_ms);
}

#[test]
fn second_stage_peak_is_independent_of_the_first() {
    let _serial = serial();
    cleanup_memory(false);
    let first = StagePeak::start_with("first", kernel_only());
    // A spike between the sampler's two samples: only the kernel counter can see it.
    let (blocks, pin) = touch_heap_blocks();
    drop((blocks, pin));
    cleanup_memory(false);
    let first = first.finish();

    let second = StagePeak::start_with("second", kernel_only());
    let second = second.finish();
    eprintln!(
        "first: before {:.1} MB peak {:.1} MB; second: before {:.1} MB peak {:.1} MB ({:?})",
        mb(first.before.process_rss_bytes),
        mb(first.peak_rss_bytes),
        mb(second.before.process_rss_bytes),
        mb(second.peak_rss_bytes),
        second.peak_source,
    );
    assert_eq!(second.peak_source, expected_source());
    assert!(second.peak_rss_bytes <= second.before.process_rss_bytes + TOLERANCE_BYTES, "{second:?}");
    if first.peak_source == PeakSource::KernelHighWaterMark {
        assert!(first.peak_rss_bytes >= first.before.process_rss_bytes + ALLOC_BYTES as u64 - 8 * MB, "{first:?}");
    }
}

#[test]
fn nested_stage_reset_does_not_hide_the_outer_peak() {
    let _serial = serial();
    if !kernel_peak_supported() {
        eprintln!("kernel high-water mark not resettable here: nothing to test");
        return;
    }
    cleanup_memory(false);
    let outer = StagePeak::start_with("outer", kernel_only());
    let (blocks, pin) = touch_heap_blocks();
    drop((blocks, pin));
    cleanup_memory(false);
    // The inner stage's reset wipes the kernel counter; the outer stage must keep its spike.
    let inner = StagePeak::start_with("inner", kernel_only()).finish();
    let outer = outer.finish();
    assert!(outer.peak_rss_bytes >= outer.before.process_rss_bytes + ALLOC_BYTES as u64 - 8 * MB, "{outer:?}");
    assert!(inner.peak_rss_bytes <= inner.before.process_rss_bytes + TOLERANCE_BYTES, "{inner:?}");
}

#[test]
fn sampler_timeline_is_monotone_and_thread_stops_on_drop() {
    let _serial = serial();
    let config = SamplerConfig { interval: Duration::from_millis(5), max_samples: 16, sample_gpu: false };
    let sampler = Sampler::start(config.clone()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let timeline = sampler.stop();
    assert!(timeline.sample_count >= 10, "{timeline:?}");
    assert!(timeline.samples.len() <= 16, "{timeline:?}");
    assert!(timeline.samples_per_entry >= 2, "200 ms at 5 ms must have been merged: {timeline:?}");
    assert!(timeline.samples.windows(2).all(|w| w[0].t_ms < w[1].t_ms), "{timeline:?}");
    assert!(timeline.samples.iter().all(|s| s.rss_bytes > 0 && s.rss_bytes <= timeline.max_rss_bytes));
    assert_eq!(timeline.max_gpu_used_bytes, None);

    // Dropped without stop(): the thread must be gone when drop returns.
    let sampler = Sampler::start(config).unwrap();
    #[cfg(target_os = "linux")]
    {
        let task = format!("/proc/self/task/{}", sampler.os_thread_id().expect("Linux has thread ids"));
        assert!(std::path::Path::new(&task).exists(), "{task} missing while running");
        drop(sampler);
        // `join` returns once the thread has exited; the kernel removes its /proc entry a moment
        // later (the exiting task wakes the joiner before it is released), so allow for that.
        let gone = (0..1000).any(|_| {
            let gone = !std::path::Path::new(&task).exists();
            if !gone {
                std::thread::sleep(Duration::from_millis(1));
            }
            gone
        });
        assert!(gone, "{task} still running 1 s after drop");
    }
    #[cfg(not(target_os = "linux"))]
    drop(sampler);
}

/// A fake device whose usage the test scripts, with a resettable peak counter.
#[derive(Default)]
struct FakeGpu {
    used_bytes: AtomicU64,
    peak_bytes: AtomicU64,
}

impl FakeGpu {
    fn set_used(&self, bytes: u64) {
        self.used_bytes.store(bytes, Ordering::SeqCst);
        self.peak_bytes.fetch_max(bytes, Ordering::SeqCst);
    }
}

impl GpuProbe for FakeGpu {
    fn memory(&self) -> Option<GpuMemory> {
        let used = self.used_bytes.load(Ordering::SeqCst);
        Some(GpuMemory { used_bytes: used, free_bytes: 80_000 - used, total_bytes: 80_000 })
    }
    fn reset_peak(&self) {
        self.peak_bytes.store(self.used_bytes.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    fn peak_used_bytes(&self) -> Option<u64> {
        Some(self.peak_bytes.load(Ordering::SeqCst))
    }
}

#[test]
fn gpu_probe_peaks_and_cleanup_hooks() {
    let _serial = serial();
    let gpu = Arc::new(FakeGpu::default());
    gpu.set_used(1_000);
    set_gpu_probe(Some(gpu.clone()));
    assert_eq!(memory_info().gpu.map(|g| g.used_bytes), Some(1_000));

    let outer = StagePeak::start_with("outer", kernel_only());
    gpu.set_used(50_000); // a spike the sampler never sees; the device counter does
    gpu.set_used(2_000);
    let inner = StagePeak::start_with("inner", kernel_only()).finish();
    let outer = outer.finish();
    assert_eq!(inner.peak_gpu_bytes, Some(2_000));
    assert_eq!(outer.peak_gpu_bytes, Some(50_000), "inner reset lost the outer GPU peak");
    assert_eq!(outer.after.gpu.map(|g| g.used_bytes), Some(2_000));

    // A hook standing in for the engine's CUDA sync + pool trim.
    let calls = Arc::new(AtomicUsize::new(0));
    let hook = register_cleanup_hook("fake pool trim", {
        let (calls, gpu) = (calls.clone(), gpu.clone());
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            gpu.set_used(1_000);
        }
    });
    let report = cleanup_memory(false);
    assert_eq!((report.passes, report.hooks_run, calls.load(Ordering::SeqCst)), (1, 1, 1));
    assert_eq!(report.gpu_released_bytes, Some(1_000));
    let report = cleanup_memory(true);
    assert_eq!((report.passes, report.hooks_run, calls.load(Ordering::SeqCst)), (2, 2, 3));
    assert!(report.elapsed_ms >= 500.0, "aggressive cleanup skipped its pause: {report:?}");
    assert!(unregister_cleanup_hook(hook));
    assert!(!unregister_cleanup_hook(hook));
    assert_eq!(cleanup_memory(false).hooks_run, 0);

    set_gpu_probe(None);
    assert!(gpu_probe().is_none());
    assert_eq!(memory_info().gpu, None);
}
