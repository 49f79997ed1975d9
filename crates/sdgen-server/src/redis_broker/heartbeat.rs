//! Workers' heartbeats: each `sdgen-server --worker` publishes what it counted (jobs by outcome,
//! step latency, stages, model opens, images, memory and its peaks, its warm weights and their
//! loads, reuses and evictions) for the servers' `/metrics` and `/v1/memory`, which otherwise see
//! only their own process.
//!
//! - `sdgen:workers`: a set of the workers' names.
//! - `sdgen:worker:{name}`: a hash: `report`, the worker's [`WorkerReport`] as JSON, and
//!   `updated_ms`. It expires after the worker's `--claim-idle` (the time after which its job
//!   is taken over too) and is published again every quarter of it and as each job ends, so a
//!   worker that died drops out within `--claim-idle`; a server that finds a name without its
//!   hash removes it from the set. A worker that stops cleanly removes itself at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use redis::{Connection, RedisResult};
use sdgen::engine::WarmWeights;

use super::{connect, now_ms};
use crate::jobs::JobState;
use crate::metrics::{Metrics, WorkerReport};

/// The set of the workers' names.
const WORKERS: &str = "sdgen:workers";

fn worker_key(name: &str) -> String {
    format!("sdgen:worker:{name}")
}

/// What a worker counts, and publishes with each heartbeat.
#[derive(Debug)]
pub struct WorkerStats {
    /// Its counts (no server mirrors its jobs: its reporters count them).
    pub metrics: Metrics,
    name: String,
    device: String,
    max_memory_bytes: Option<u64>,
    warm: Option<WarmWeights>,
    running: AtomicBool,
    /// Wakes the heartbeat (a job ended: its counts go out now).
    wake: Mutex<Option<Sender<()>>>,
}

impl WorkerStats {
    /// A worker `name` running jobs on `device` within `max_memory_bytes`, its engine keeping
    /// `warm`.
    pub fn new(name: &str, device: &str, max_memory_bytes: Option<u64>, warm: Option<WarmWeights>) -> Self {
        Self {
            metrics: Metrics::default(),
            name: name.to_string(),
            device: device.to_string(),
            max_memory_bytes,
            warm,
            running: AtomicBool::new(false),
            wake: Mutex::new(None),
        }
    }

    /// A job started.
    pub fn job_started(&self) {
        self.running.store(true, Ordering::Relaxed);
    }

    /// The running job ended as `state`: counted, and published at once.
    pub fn job_ended(&self, state: JobState) {
        self.metrics.job_ended(state.name());
        self.running.store(false, Ordering::Relaxed);
        if let Some(wake) = &*self.wake.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = wake.send(());
        }
    }

    /// The report of now.
    fn report(&self) -> WorkerReport {
        WorkerReport {
            name: self.name.clone(),
            device: self.device.clone(),
            max_memory_bytes: self.max_memory_bytes,
            updated_unix_ms: now_ms(),
            figures: self.metrics.figures(self.running.load(Ordering::Relaxed), self.warm.as_ref().map(|w| w.report())),
        }
    }
}

/// Publishes `report`, alive for `ttl`.
fn publish(conn: &mut Connection, report: &WorkerReport, ttl: Duration) -> RedisResult<()> {
    let json = serde_json::to_string(report).expect("plain data serializes");
    let key = worker_key(&report.name);
    redis::pipe()
        .atomic()
        .cmd("HSET")
        .arg(&key)
        .arg("report")
        .arg(json)
        .arg("updated_ms")
        .arg(report.updated_unix_ms)
        .ignore()
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(ttl.as_millis() as u64)
        .ignore()
        .cmd("SADD")
        .arg(WORKERS)
        .arg(&report.name)
        .ignore()
        .query(conn)
}

/// The workers whose heartbeat is alive, by name; the names of those whose hash has expired are
/// removed from the set.
pub(super) fn live_workers(conn: &mut Connection) -> RedisResult<Vec<WorkerReport>> {
    let names: Vec<String> = redis::cmd("SMEMBERS").arg(WORKERS).query(conn)?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for name in &names {
        pipe.cmd("HGET").arg(worker_key(name)).arg("report");
    }
    let reports: Vec<Option<String>> = pipe.query(conn)?;
    let (mut live, mut gone) = (Vec::new(), Vec::new());
    for (name, report) in names.into_iter().zip(reports) {
        match report.and_then(|r| serde_json::from_str::<WorkerReport>(&r).ok()) {
            Some(r) => live.push(r),
            None => gone.push(name),
        }
    }
    if !gone.is_empty() {
        redis::cmd("SREM").arg(WORKERS).arg(&gone).query::<()>(conn)?;
    }
    live.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(live)
}

/// A worker's heartbeat: a thread publishing its [`WorkerStats`] every quarter of `ttl`, and as
/// each job ends.
pub struct Heartbeat {
    client: redis::Client,
    stats: Arc<WorkerStats>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Heartbeat {
    /// Starts beating for `stats` on `client`'s Redis, each report alive for `ttl`.
    pub fn start(client: redis::Client, stats: Arc<WorkerStats>, ttl: Duration) -> std::io::Result<Self> {
        let (wake, woken) = mpsc::channel();
        *stats.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("sdgen-heartbeat".into()).spawn({
            let (client, stats, stop) = (client.clone(), stats.clone(), stop.clone());
            move || beat(&client, &stats, ttl, &woken, &stop)
        })?;
        Ok(Self { client, stats, stop, thread })
    }

    /// Stops beating and removes the worker now (it stopped cleanly: no need to wait for its
    /// report to expire).
    pub fn retire(self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(wake) = self.stats.wake.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = wake.send(());
        }
        let _ = self.thread.join();
        let name = &self.stats.name;
        let removed = connect(&self.client).and_then(|mut c| {
            redis::pipe().cmd("DEL").arg(worker_key(name)).cmd("SREM").arg(WORKERS).arg(name).query::<()>(&mut c)
        });
        if let Err(e) = removed {
            eprintln!("sdgen-server worker {name}: cannot remove its heartbeat (it expires): {e}");
        }
    }
}

/// The heartbeat's loop: publish, then wait a quarter of `ttl` or a job's end, until `stop`.
fn beat(client: &redis::Client, stats: &WorkerStats, ttl: Duration, woken: &Receiver<()>, stop: &AtomicBool) {
    let mut conn: Option<Connection> = None;
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        let result = match conn.as_mut() {
            Some(c) => publish(c, &stats.report(), ttl),
            None => connect(client).and_then(|c| publish(conn.insert(c), &stats.report(), ttl)),
        };
        match result {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    eprintln!("sdgen-server worker {}: cannot publish its heartbeat: {e} (retrying)", stats.name);
                }
                failing = true;
                conn = None;
            }
        }
        if let Err(RecvTimeoutError::Disconnected) = woken.recv_timeout(ttl / 4) {
            break;
        }
    }
}
