//! `GET /metrics`: counters in Prometheus' text format (version 0.0.4), written by hand — a few
//! counters and one histogram do not need a metrics crate.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sdgen::engine::{WarmReport, WeightCounts};

/// Step latency histogram bounds, in seconds: tiny test models take milliseconds a step, SDXL
/// on a CPU tens of seconds.
const STEP_BUCKETS_S: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// What the server counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Jobs ended, by outcome (`done`, `failed`, `cancelled`).
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests refused before queueing, by reason (`queue_full`, `does_not_fit`, `invalid`,
    /// `unauthorized`).
    refused: Mutex<BTreeMap<&'static str, u64>>,
    step_counts: [AtomicU64; STEP_BUCKETS_S.len()],
    step_total: AtomicU64,
    step_sum_us: AtomicU64,
    /// Models the engine opened (configs and headers parsed; later jobs reuse them).
    pub model_opens: AtomicU64,
    /// Stages run, by name (each loads its component's weights or takes them warm).
    stage_runs: Mutex<BTreeMap<String, u64>>,
    /// Images made.
    pub images: AtomicU64,
}

impl Metrics {
    /// One more job ended as `outcome`.
    pub fn job_ended(&self, outcome: &'static str) {
        *self.outcomes.lock().unwrap_or_else(|e| e.into_inner()).entry(outcome).or_default() += 1;
    }

    /// One more request refused for `reason`.
    pub fn refused(&self, reason: &'static str) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()).entry(reason).or_default() += 1;
    }

    /// One denoising step took `seconds`.
    pub fn step(&self, seconds: f64) {
        for (i, bound) in STEP_BUCKETS_S.iter().enumerate() {
            if seconds <= *bound {
                self.step_counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.step_total.fetch_add(1, Ordering::Relaxed);
        self.step_sum_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// A stage started (its component loads).
    pub fn stage(&self, stage: &str) {
        *self.stage_runs.lock().unwrap_or_else(|e| e.into_inner()).entry(stage.to_string()).or_default() += 1;
    }

    /// The text for `/metrics`, with the queue's depth, the memory figures of now and the warm
    /// weights' (when the server keeps them).
    pub fn render(&self, queue_depth: usize, running: bool, warm: Option<&WarmReport>) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        gauge("sdgen_queue_depth", "Jobs waiting for the worker.", queue_depth.to_string());
        gauge("sdgen_jobs_running", "Jobs on the worker (0 or 1).", u8::from(running).to_string());
        let info = sdgen_memory::memory_info();
        gauge("sdgen_process_rss_bytes", "Resident memory of the server process.", info.process_rss_bytes.to_string());
        gauge(
            "sdgen_system_available_bytes",
            "System memory available to new allocations.",
            info.system_available_bytes.to_string(),
        );
        if let Some(g) = info.gpu {
            gauge("sdgen_gpu_used_bytes", "GPU memory in use (every process).", g.used_bytes.to_string());
            gauge("sdgen_gpu_total_bytes", "GPU memory size.", g.total_bytes.to_string());
        }
        let _ = writeln!(out, "# HELP sdgen_jobs_total Jobs ended, by outcome.\n# TYPE sdgen_jobs_total counter");
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        for outcome in ["done", "failed", "cancelled"] {
            let n = outcomes.get(outcome).copied().unwrap_or(0);
            let _ = writeln!(out, "sdgen_jobs_total{{outcome=\"{outcome}\"}} {n}");
        }
        drop(outcomes);
        let _ = writeln!(
            out,
            "# HELP sdgen_requests_refused_total Requests refused before queueing, by reason.\n\
             # TYPE sdgen_requests_refused_total counter"
        );
        for (reason, n) in self.refused.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "sdgen_requests_refused_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP sdgen_step_seconds Denoising step latency.\n# TYPE sdgen_step_seconds histogram");
        for (i, bound) in STEP_BUCKETS_S.iter().enumerate() {
            let n = self.step_counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "sdgen_step_seconds_bucket{{le=\"{bound}\"}} {n}");
        }
        let total = self.step_total.load(Ordering::Relaxed);
        let _ = writeln!(out, "sdgen_step_seconds_bucket{{le=\"+Inf\"}} {total}");
        let sum = self.step_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "sdgen_step_seconds_sum {sum}\nsdgen_step_seconds_count {total}");
        let _ = writeln!(
            out,
            "# HELP sdgen_model_opens_total Models opened by the engine (configs and headers parsed).\n\
             # TYPE sdgen_model_opens_total counter\nsdgen_model_opens_total {}",
            self.model_opens.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP sdgen_stage_loads_total Pipeline stages run (sdgen_weight_loads_total: the weights read).\n\
             # TYPE sdgen_stage_loads_total counter"
        );
        for (stage, n) in self.stage_runs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "sdgen_stage_loads_total{{stage=\"{stage}\"}} {n}");
        }
        if let Some(warm) = warm {
            render_warm(&mut out, warm);
        }
        let _ = writeln!(
            out,
            "# HELP sdgen_images_total Images made.\n# TYPE sdgen_images_total counter\nsdgen_images_total {}",
            self.images.load(Ordering::Relaxed)
        );
        out
    }
}

/// One of a component's counts.
type Count = fn(&WeightCounts) -> u64;

/// The warm weights' gauge and, per component, their loads, reuses and evictions.
fn render_warm(out: &mut String, warm: &WarmReport) {
    let _ = writeln!(
        out,
        "# HELP sdgen_warm_weight_bytes Weights kept loaded between jobs.\n# TYPE sdgen_warm_weight_bytes gauge\n\
         sdgen_warm_weight_bytes {}",
        warm.bytes
    );
    let counters: [(&str, &str, Count); 3] = [
        ("sdgen_weight_loads_total", "Weights read from the files, by component.", |c| c.loads),
        ("sdgen_weight_reuses_total", "Stages that took their weights warm, by component.", |c| c.reuses),
        ("sdgen_weight_evictions_total", "Warm weights dropped to make room, by component.", |c| c.evictions),
    ];
    for (name, help, count) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (component, c) in &warm.counts {
            let _ = writeln!(out, "{name}{{component=\"{component}\"}} {}", count(c));
        }
    }
}
