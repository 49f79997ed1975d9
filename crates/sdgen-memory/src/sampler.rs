//! A background thread that samples process RSS (and GPU memory through the registered probe)
//! at a fixed interval, keeping its maxima and a bounded timeline for the metadata.
//!
//! Snapshots at stage boundaries miss the peak in the middle of a stage (attention
//! intermediates, the VAE decode's activations); the sampler sees it up to its interval. The
//! timeline is bounded: when it fills up, neighbouring samples are merged pairwise keeping the
//! larger values, so a 15-minute stage costs as much metadata as a 5-second one and no spike is
//! lost from the maxima.

use crate::info::{process_rss_bytes, GpuProbe};
use serde::{Deserialize, Serialize};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the sampler runs.
#[derive(Debug, Clone)]
pub struct SamplerConfig {
    /// Time between samples; 20 ms by default (50 Hz: a few µs of work per sample).
    pub interval: Duration,
    /// Most samples kept in the timeline (at least 2); older ones are merged pairwise beyond it.
    pub max_samples: usize,
    /// Whether to sample the registered GPU probe too.
    pub sample_gpu: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        // 256 samples ≈ 10 KB of JSON per stage: enough to see the shape of a stage.
        Self { interval: Duration::from_millis(20), max_samples: 256, sample_gpu: true }
    }
}

/// One point of the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Milliseconds since the sampler started.
    pub t_ms: f64,
    /// Process RSS (the largest of the raw samples merged into this one).
    pub rss_bytes: u64,
    /// GPU memory in use (largest merged), when a probe was sampled and answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_used_bytes: Option<u64>,
}

impl Sample {
    fn merge(self, later: Sample) -> Sample {
        Sample {
            t_ms: self.t_ms,
            rss_bytes: self.rss_bytes.max(later.rss_bytes),
            gpu_used_bytes: max_opt(self.gpu_used_bytes, later.gpu_used_bytes),
        }
    }
}

pub(crate) fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// What a stopped sampler saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// Samples in time order (strictly increasing `t_ms`), at most `max_samples`.
    pub samples: Vec<Sample>,
    /// Raw samples taken (before merging).
    pub sample_count: u64,
    /// Raw samples per timeline entry at the end (1, 2, 4, …): the timeline's resolution is
    /// `interval × samples_per_entry`.
    pub samples_per_entry: u64,
    /// Largest RSS of any raw sample.
    pub max_rss_bytes: u64,
    /// Largest GPU memory in use of any raw sample, when the GPU was sampled.
    pub max_gpu_used_bytes: Option<u64>,
}

/// Accumulates raw samples into a bounded timeline.
struct Recorder {
    timeline: Timeline,
    max_samples: usize,
    /// The entry being filled with `samples_per_entry` raw samples, and how many it holds.
    pending: Option<(Sample, u64)>,
}

impl Recorder {
    fn new(max_samples: usize) -> Self {
        let max_samples = max_samples.max(2);
        let timeline =
            Timeline { samples: Vec::with_capacity(max_samples), samples_per_entry: 1, ..Timeline::default() };
        Self { timeline, max_samples, pending: None }
    }

    fn push(&mut self, sample: Sample) {
        let tl = &mut self.timeline;
        tl.sample_count += 1;
        tl.max_rss_bytes = tl.max_rss_bytes.max(sample.rss_bytes);
        tl.max_gpu_used_bytes = max_opt(tl.max_gpu_used_bytes, sample.gpu_used_bytes);
        let (entry, n) = match self.pending.take() {
            Some((entry, n)) => (entry.merge(sample), n + 1),
            None => (sample, 1),
        };
        if n < tl.samples_per_entry {
            self.pending = Some((entry, n));
            return;
        }
        tl.samples.push(entry);
        if tl.samples.len() == self.max_samples {
            // Halve the resolution: merge neighbours in place, keeping maxima.
            let merged: Vec<Sample> =
                tl.samples.chunks(2).map(|c| if c.len() == 2 { c[0].merge(c[1]) } else { c[0] }).collect();
            tl.samples.clear();
            tl.samples.extend(merged);
            tl.samples_per_entry *= 2;
        }
    }

    fn finish(mut self) -> Timeline {
        if let Some((entry, _)) = self.pending.take() {
            self.timeline.samples.push(entry);
        }
        self.timeline
    }
}

/// A running sampler thread. Stop it with [`stop`](Self::stop) to get its [`Timeline`];
/// dropping it also stops and joins the thread, so none outlives it.
pub struct Sampler {
    stop_tx: Option<mpsc::Sender<()>>,
    handle: Option<JoinHandle<Timeline>>,
    thread_id: Option<u64>,
}

impl Sampler {
    /// Starts sampling, with the registered GPU probe if `config.sample_gpu`. The first sample
    /// is taken before this returns, so even an instant stage has one. Fails only if the OS
    /// refuses a thread.
    pub fn start(config: SamplerConfig) -> std::io::Result<Sampler> {
        let probe = if config.sample_gpu { crate::info::gpu_probe() } else { None };
        Self::start_with_probe(config, probe)
    }

    /// Starts sampling with an explicit GPU probe (or none), bypassing the registry.
    pub fn start_with_probe(config: SamplerConfig, probe: Option<Arc<dyn GpuProbe>>) -> std::io::Result<Sampler> {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<u64>();
        let interval = config.interval.max(Duration::from_micros(100));
        let handle = std::thread::Builder::new()
            .name("sdgen-mem-sampler".into())
            // The loop itself needs ≤ 8 KB; 1 MiB leaves room for the engine's probe (driver
            // calls) while keeping the 8 MiB default out of VMS.
            .stack_size(1 << 20)
            .spawn(move || {
                let start = Instant::now();
                let mut recorder = Recorder::new(config.max_samples);
                let sample = |recorder: &mut Recorder| {
                    recorder.push(Sample {
                        // µs resolution: enough, and short in the JSON.
                        t_ms: start.elapsed().as_micros() as f64 / 1e3,
                        rss_bytes: process_rss_bytes(),
                        gpu_used_bytes: probe.as_ref().and_then(|p| p.memory()).map(|m| m.used_bytes),
                    })
                };
                sample(&mut recorder);
                let _ = ready_tx.send(thread_id());
                let mut next = start + interval;
                loop {
                    // Deadlines on a fixed grid, so slow probes don't stretch the interval.
                    let wait = next.saturating_duration_since(Instant::now());
                    match stop_rx.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        // Stop requested or the Sampler dropped: one last sample, then exit.
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    }
                    sample(&mut recorder);
                    let now = Instant::now();
                    next += interval;
                    if next < now {
                        // Fell behind (suspended, overloaded): skip missed slots, don't burst.
                        next = now + interval;
                    }
                }
                sample(&mut recorder);
                recorder.finish()
            })?;
        // A spawned thread always reaches the send before it can exit.
        let thread_id = ready_rx.recv().ok();
        Ok(Sampler { stop_tx: Some(stop_tx), handle: Some(handle), thread_id })
    }

    /// Stops the thread (after one final sample) and returns what it saw.
    pub fn stop(mut self) -> Timeline {
        self.stop_and_join()
    }

    /// The OS thread id of the sampler thread (`/proc/self/task/<id>` on Linux); `None` on other
    /// platforms. For tests and diagnostics.
    pub fn os_thread_id(&self) -> Option<u64> {
        self.thread_id.filter(|&id| id != 0)
    }

    fn stop_and_join(&mut self) -> Timeline {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(timeline)) => timeline,
            // The loop has no panicking path; a panic there is a bug we don't re-raise in Drop.
            Some(Err(_)) | None => Timeline::default(),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn thread_id() -> u64 {
    #[cfg(target_os = "linux")]
    {
        crate::procfs::current_thread_id()
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t_ms: f64, rss_bytes: u64) -> Sample {
        Sample { t_ms, rss_bytes, gpu_used_bytes: None }
    }

    #[test]
    fn recorder_bounds_timeline_and_keeps_maxima() {
        let mut r = Recorder::new(8);
        for i in 0..100u64 {
            r.push(s(i as f64, if i == 37 { 1_000 } else { i }));
        }
        let tl = r.finish();
        assert!(tl.samples.len() <= 8, "{tl:?}");
        assert_eq!(tl.sample_count, 100);
        assert_eq!(tl.max_rss_bytes, 1_000);
        assert!(tl.samples.iter().any(|x| x.rss_bytes == 1_000), "spike merged away: {tl:?}");
        assert!(tl.samples.windows(2).all(|w| w[0].t_ms < w[1].t_ms), "{tl:?}");
        assert_eq!(tl.samples[0].t_ms, 0.0);
    }

    #[test]
    fn recorder_small_input_is_kept_verbatim() {
        let mut r = Recorder::new(8);
        for i in 0..5u64 {
            r.push(s(i as f64, i));
        }
        let tl = r.finish();
        assert_eq!(tl.samples, (0..5u64).map(|i| s(i as f64, i)).collect::<Vec<_>>());
        assert_eq!(tl.samples_per_entry, 1);
    }
}
