//! `GET /metrics`: counters in Prometheus' text format (version 0.0.4), written by hand — a few
//! counters and one histogram do not need a metrics crate.
//!
//! With a broker, the jobs run in `sdgen-server --worker` processes: each publishes its own
//! [`Figures`] in Redis (`redis_broker::heartbeat`), and the server writes every family once, its
//! own samples (unlabelled: what this server saw) beside each live worker's, labelled
//! `worker="…"` (what that worker ran), with `sdgen_workers` the number alive.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use sdgen::engine::{WarmReport, WeightCounts};
use sdgen_memory::MemoryInfo;
use serde::{Deserialize, Serialize};

use crate::jobs::JobEvent;

/// Step latency histogram bounds, in seconds: tiny test models take milliseconds a step, SDXL
/// on a CPU tens of seconds.
const STEP_BUCKETS_S: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The outcomes a job ends with, as `sdgen_jobs_total` lists them (0 where none).
const OUTCOMES: [&str; 3] = ["done", "failed", "cancelled"];

/// What the server (or a broker's worker) counts.
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
    /// The largest process resident memory and GPU memory in use seen at the engine's memory
    /// points (model loads, generation) of the jobs run here.
    peak_rss_bytes: AtomicU64,
    peak_gpu_bytes: AtomicU64,
}

/// A snapshot of [`Metrics`]' counts, as a worker publishes them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Jobs ended, by outcome.
    pub outcomes: BTreeMap<String, u64>,
    /// Steps at or under each of [`STEP_BUCKETS_S`] seconds.
    pub step_buckets: Vec<u64>,
    /// Steps in all.
    pub steps: u64,
    /// Their seconds in all.
    pub step_seconds: f64,
    /// Models opened.
    pub model_opens: u64,
    /// Stages run, by name.
    pub stages: BTreeMap<String, u64>,
    /// Images made.
    pub images: u64,
    /// Largest process resident memory seen while running jobs.
    pub peak_rss_bytes: u64,
    /// Largest GPU memory in use seen while running jobs (0 without a GPU).
    pub peak_gpu_bytes: u64,
}

/// One process's figures of now: its counts, its memory, its warm weights and whether it runs a
/// job — the server's own, or a broker's worker's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figures {
    /// What it counted.
    pub counts: Counts,
    /// Its memory now.
    pub memory: MemoryInfo,
    /// Its warm weights (none where the process runs no jobs or keeps none).
    pub warm: Option<WarmReport>,
    /// Whether a job is running.
    pub running: bool,
}

/// A broker's worker as its last heartbeat described it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Its name in the consumer group (`--worker-name`).
    pub name: String,
    /// The device it runs jobs on.
    pub device: String,
    /// Its `--max-memory`, when it has one.
    pub max_memory_bytes: Option<u64>,
    /// When it published these figures.
    pub updated_unix_ms: u64,
    /// Its figures.
    pub figures: Figures,
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

    /// A memory snapshot of a running job: the peaks follow.
    pub fn memory_seen(&self, info: &MemoryInfo) {
        self.peak_rss_bytes.fetch_max(info.process_rss_bytes, Ordering::Relaxed);
        if let Some(gpu) = &info.gpu {
            self.peak_gpu_bytes.fetch_max(gpu.used_bytes, Ordering::Relaxed);
        }
    }

    /// An event of a job running in this process, where no [`Job`](crate::jobs::Job) mirrors it
    /// (a broker's worker): the stage, step and image counts follow. `last_step` is when its
    /// last step or stage began.
    pub fn job_event(&self, event: &JobEvent, last_step: &Mutex<Instant>) {
        let mut last = last_step.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            JobEvent::StageStart { stage } => {
                self.stage(stage);
                *last = Instant::now();
            }
            JobEvent::Step { .. } => {
                self.step(last.elapsed().as_secs_f64());
                *last = Instant::now();
            }
            JobEvent::Image { .. } => {
                self.images.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// The counts of now.
    pub fn counts(&self) -> Counts {
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        let stages = self.stage_runs.lock().unwrap_or_else(|e| e.into_inner());
        Counts {
            outcomes: outcomes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            step_buckets: self.step_counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            steps: self.step_total.load(Ordering::Relaxed),
            step_seconds: self.step_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            model_opens: self.model_opens.load(Ordering::Relaxed),
            stages: stages.clone(),
            images: self.images.load(Ordering::Relaxed),
            peak_rss_bytes: self.peak_rss_bytes.load(Ordering::Relaxed),
            peak_gpu_bytes: self.peak_gpu_bytes.load(Ordering::Relaxed),
        }
    }

    /// This process's figures of now; `running`: whether it runs a job.
    pub fn figures(&self, running: bool, warm: Option<WarmReport>) -> Figures {
        Figures { counts: self.counts(), memory: sdgen_memory::memory_info(), warm, running }
    }

    /// The text for `/metrics`: the queue's depth, this server's figures (`own`) and, with a
    /// broker, its live workers' (`workers`), each labelled with its name.
    pub fn render(&self, queue_depth: usize, own: &Figures, workers: Option<&[WorkerReport]>) -> String {
        let mut out = Text::default();
        out.family(
            "sdgen_queue_depth",
            "Jobs waiting for a worker.",
            "gauge",
            [sample("", String::new(), queue_depth)],
        );
        if let Some(workers) = workers {
            let help = "Broker workers alive (a heartbeat within their --claim-idle).";
            out.family("sdgen_workers", help, "gauge", [sample("", String::new(), workers.len())]);
        }
        let sources: Vec<(Option<&str>, &Figures)> = std::iter::once((None, own))
            .chain(workers.unwrap_or_default().iter().map(|w| (Some(w.name.as_str()), &w.figures)))
            .collect();
        let each = |value: fn(&Figures) -> Option<u64>| {
            sources.iter().filter_map(move |(w, f)| Some(sample("", labels(*w, &[]), value(f)?)))
        };
        let gauges: [Gauge; 7] = [
            ("sdgen_jobs_running", "Jobs running (0 or 1 per worker).", |f| Some(u64::from(f.running))),
            ("sdgen_process_rss_bytes", "Resident memory of the process.", |f| Some(f.memory.process_rss_bytes)),
            ("sdgen_process_rss_peak_bytes", "Largest resident memory seen while running jobs.", |f| {
                Some(f.counts.peak_rss_bytes)
            }),
            ("sdgen_system_available_bytes", "System memory available to new allocations.", |f| {
                Some(f.memory.system_available_bytes)
            }),
            ("sdgen_gpu_used_bytes", "GPU memory in use (every process).", |f| f.memory.gpu.map(|g| g.used_bytes)),
            ("sdgen_gpu_used_peak_bytes", "Largest GPU memory in use seen while running jobs.", |f| {
                f.memory.gpu.map(|_| f.counts.peak_gpu_bytes)
            }),
            ("sdgen_gpu_total_bytes", "GPU memory size.", |f| f.memory.gpu.map(|g| g.total_bytes)),
        ];
        for (name, help, value) in gauges {
            out.family(name, help, "gauge", each(value));
        }
        let outcomes = sources.iter().flat_map(|(w, f)| {
            OUTCOMES.map(|o| sample("", labels(*w, &[("outcome", o)]), f.counts.outcomes.get(o).copied().unwrap_or(0)))
        });
        out.family("sdgen_jobs_total", "Jobs ended, by outcome.", "counter", outcomes);
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner()).clone();
        out.family(
            "sdgen_requests_refused_total",
            "Requests refused before queueing, by reason.",
            "counter",
            refused.iter().map(|(reason, n)| sample("", labels(None, &[("reason", reason)]), n)),
        );
        out.family(
            "sdgen_step_seconds",
            "Denoising step latency.",
            "histogram",
            sources.iter().flat_map(|(w, f)| histogram(*w, &f.counts)),
        );
        out.family(
            "sdgen_model_opens_total",
            "Models opened by the engine (configs and headers parsed).",
            "counter",
            each(|f| Some(f.counts.model_opens)),
        );
        let stages = sources.iter().flat_map(|(w, f)| {
            f.counts.stages.iter().map(move |(stage, n)| sample("", labels(*w, &[("stage", stage)]), n))
        });
        out.family(
            "sdgen_stage_loads_total",
            "Pipeline stages run (sdgen_weight_loads_total: the weights read).",
            "counter",
            stages,
        );
        render_warm(&mut out, &sources);
        out.family("sdgen_images_total", "Images made.", "counter", each(|f| Some(f.counts.images)));
        out.0
    }
}

/// A gauge every process has (or, `None`, lacks: a GPU's): its name, help and value.
type Gauge = (&'static str, &'static str, fn(&Figures) -> Option<u64>);

/// One sample: the suffix of the family's name (`_bucket`…), its labels (`{…}` or empty) and
/// its value.
type Sample = (&'static str, String, String);

fn sample(suffix: &'static str, labels: String, value: impl ToString) -> Sample {
    (suffix, labels, value.to_string())
}

/// `{worker="w1",k="v"}` (the worker's label first where there is one), or empty.
fn labels(worker: Option<&str>, pairs: &[(&str, &str)]) -> String {
    let all: Vec<String> = worker
        .map(|w| ("worker", w))
        .into_iter()
        .chain(pairs.iter().copied())
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect();
    if all.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", all.join(","))
    }
}

/// The step latency histogram's samples of one process.
fn histogram(worker: Option<&str>, counts: &Counts) -> Vec<Sample> {
    let mut samples: Vec<Sample> = STEP_BUCKETS_S
        .iter()
        .zip(&counts.step_buckets)
        .map(|(bound, n)| sample("_bucket", labels(worker, &[("le", &bound.to_string())]), n))
        .collect();
    samples.push(sample("_bucket", labels(worker, &[("le", "+Inf")]), counts.steps));
    samples.push(sample("_sum", labels(worker, &[]), counts.step_seconds));
    samples.push(sample("_count", labels(worker, &[]), counts.steps));
    samples
}

/// The exposition text, family by family.
#[derive(Default)]
struct Text(String);

impl Text {
    /// A family's `HELP` and `TYPE` and its samples (every process's together, as the format
    /// wants them).
    fn family(&mut self, name: &str, help: &str, kind: &str, samples: impl IntoIterator<Item = Sample>) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (suffix, labels, value) in samples {
            let _ = writeln!(self.0, "{name}{suffix}{labels} {value}");
        }
    }
}

/// One of a component's counts.
type Count = fn(&WeightCounts) -> u64;

/// The warm weights' gauge and, per component, their loads, reuses and evictions, of each
/// process that keeps them.
fn render_warm(out: &mut Text, sources: &[(Option<&str>, &Figures)]) {
    let warm: Vec<(Option<&str>, &WarmReport)> =
        sources.iter().filter_map(|(w, f)| Some((*w, f.warm.as_ref()?))).collect();
    if warm.is_empty() {
        return;
    }
    let bytes = warm.iter().map(|(w, r)| sample("", labels(*w, &[]), r.bytes));
    out.family("sdgen_warm_weight_bytes", "Weights kept loaded between jobs.", "gauge", bytes);
    let counters: [(&str, &str, Count); 3] = [
        ("sdgen_weight_loads_total", "Weights read from the files, by component.", |c| c.loads),
        ("sdgen_weight_reuses_total", "Stages that took their weights warm, by component.", |c| c.reuses),
        ("sdgen_weight_evictions_total", "Warm weights dropped to make room, by component.", |c| c.evictions),
    ];
    for (name, help, count) in counters {
        let samples = warm.iter().flat_map(|(w, r)| {
            r.counts.iter().map(move |(component, c)| sample("", labels(*w, &[("component", component)]), count(c)))
        });
        out.family(name, help, "counter", samples);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(done: u64, running: bool) -> Figures {
        let metrics = Metrics::default();
        for _ in 0..done {
            metrics.job_ended("done");
        }
        metrics.step(0.02);
        metrics.figures(running, None)
    }

    /// Every family once, the server's samples beside each worker's, labelled.
    #[test]
    fn workers_samples_sit_in_the_servers_families_labelled() {
        let own = Metrics::default();
        own.job_ended("done");
        let worker = |name: &str, done| WorkerReport {
            name: name.into(),
            device: "cpu".into(),
            max_memory_bytes: None,
            updated_unix_ms: 0,
            figures: figures(done, done == 2),
        };
        let workers = [worker("w1", 2), worker("w\"2", 3)];
        let text = own.render(0, &own.figures(false, None), Some(&workers));
        for line in [
            "sdgen_workers 2",
            "sdgen_jobs_total{outcome=\"done\"} 1",
            "sdgen_jobs_total{worker=\"w1\",outcome=\"done\"} 2",
            "sdgen_jobs_total{worker=\"w\\\"2\",outcome=\"done\"} 3",
            "sdgen_jobs_running{worker=\"w1\"} 1",
            "sdgen_step_seconds_bucket{worker=\"w1\",le=\"0.025\"} 1",
            "sdgen_step_seconds_count{worker=\"w1\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "`{line}` not in:\n{text}");
        }
        for family in ["sdgen_jobs_total", "sdgen_step_seconds", "sdgen_process_rss_bytes"] {
            assert_eq!(text.matches(&format!("# TYPE {family} ")).count(), 1, "{text}");
        }
        // Without a broker, no workers' gauge.
        assert!(!own.render(0, &own.figures(false, None), None).contains("sdgen_workers"));
    }
}
