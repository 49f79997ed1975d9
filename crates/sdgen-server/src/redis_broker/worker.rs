//! A worker's side of the broker: jobs taken from the consumer group (a dead worker's first),
//! their reports written back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{Connection, RedisResult};

use super::*;
use crate::error::ApiError;
use crate::jobs::{final_event, JobEvent, JobImage, JobSpec, JobState};
use crate::worker::{JobSource, Reporter, Task};

use super::heartbeat::WorkerStats;

/// Ends job `id` in Redis with `state` (once); `images` made.
fn finish_job(
    conn: &mut Connection,
    id: &str,
    state: JobState,
    images: usize,
    error: Option<&ApiError>,
) -> RedisResult<bool> {
    let event = serde_json::to_string(&final_event(state, images, error)).expect("plain data serializes");
    let mut call = FINISH.prepare_invoke();
    for key in ending_keys(id) {
        call.key(key);
    }
    let ended: i64 = call.arg(id).arg(state.name()).arg(event).arg(FINISHED_TTL_S).invoke(conn)?;
    Ok(ended == 1)
}

/// Acknowledges and deletes a jobs stream entry: its job has ended (or will not run).
fn acknowledge(conn: &mut Connection, entry: &str) -> RedisResult<()> {
    redis::pipe().cmd("XACK").arg(&[JOBS, GROUP, entry][..]).cmd("XDEL").arg(&[JOBS, entry][..]).query(conn)
}

/// A worker's side: takes jobs from the consumer group, reclaiming those of dead workers first.
pub struct RedisSource {
    client: redis::Client,
    conn: Mutex<Option<Connection>>,
    url: String,
    /// This worker's consumer name.
    pub name: String,
    claim_idle: Duration,
    /// This worker's `--max-memory`: a job's own budget (the server's) is lowered to it.
    max_memory_bytes: Option<u64>,
    stop: Arc<AtomicBool>,
    /// What it counts for its heartbeat.
    stats: Arc<WorkerStats>,
}

/// One entry of the jobs stream: its entry id and the job's.
struct Entry {
    entry: String,
    id: String,
}

impl RedisSource {
    /// Connects as consumer `name`; a job idle for `claim_idle` on a dead worker is taken over;
    /// jobs run within `max_memory_bytes` (and their own budget), counted in `stats`; `stop`
    /// ends [`JobSource::next`].
    pub fn connect(
        url: &str,
        name: String,
        claim_idle: Duration,
        max_memory_bytes: Option<u64>,
        stop: Arc<AtomicBool>,
        stats: Arc<WorkerStats>,
    ) -> anyhow::Result<Self> {
        let client = open(url)?;
        let url = redacted(url);
        Ok(Self { client, conn: Mutex::new(None), url, name, claim_idle, max_memory_bytes, stop, stats })
    }

    /// The Redis client it takes jobs through.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> RedisResult<T>) -> RedisResult<T> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let conn = match slot.as_mut() {
            Some(c) => c,
            None => slot.insert(connect(&self.client)?),
        };
        let result = f(conn);
        if result.as_ref().is_err_and(|e| e.is_unrecoverable_error() || e.is_timeout()) {
            *slot = None;
        }
        result
    }

    /// A dead worker's job, else a new one (waiting up to a second).
    fn take(&self) -> RedisResult<Option<Entry>> {
        let entry_of = |s: StreamId| s.get::<String>("id").map(|id| Entry { entry: s.id.clone(), id });
        let claimed: StreamAutoClaimReply = self.with(|c| {
            redis::cmd("XAUTOCLAIM")
                .arg(&[JOBS, GROUP, self.name.as_str()][..])
                .arg(self.claim_idle.as_millis() as u64)
                .arg(&["0-0", "COUNT", "1"][..])
                .query(c)
        })?;
        if let Some(entry) = claimed.claimed.into_iter().next() {
            eprintln!("sdgen-server worker {}: taking over entry {} from a worker that stopped", self.name, entry.id);
            return Ok(entry_of(entry));
        }
        let read: Option<StreamReadReply> = self.with(|c| {
            redis::cmd("XREADGROUP")
                .arg(&["GROUP", GROUP, self.name.as_str(), "COUNT", "1", "BLOCK", "1000", "STREAMS", JOBS, ">"][..])
                .query(c)
        })?;
        Ok(read.and_then(|r| r.keys.into_iter().flat_map(|k| k.ids).next()).and_then(entry_of))
    }

    /// Starts `entry`'s job: its task, or `None` when there is nothing to run (acknowledged).
    fn start(&self, entry: Entry) -> RedisResult<Option<Task>> {
        let keys = [job_key(&entry.id), QUEUED.into(), RUNNING.into()];
        let reply: Vec<String> = self.with(|c| {
            let mut call = START.prepare_invoke();
            for key in &keys {
                call.key(key);
            }
            call.arg(&entry.id).arg(&self.name).arg(now_ms()).arg(MAX_ATTEMPTS).invoke(c)
        })?;
        let spec = match reply.first().map(String::as_str) {
            Some("run") => reply.get(1).and_then(|s| serde_json::from_str::<JobSpec>(s).ok()),
            Some("exhausted") => {
                let runs = reply.get(1).cloned().unwrap_or_default();
                let error = ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "generation_failed",
                    format!(
                        "the job's worker stopped {runs} times while running it (killed, out of memory?): it is not \
                         run again"
                    ),
                );
                self.with(|c| finish_job(c, &entry.id, JobState::Failed, 0, Some(&error)))?;
                None
            }
            // Cancelled while queued, ended by another worker, or expired.
            _ => None,
        };
        let Some(mut spec) = spec else {
            self.with(|c| acknowledge(c, &entry.entry))?;
            return Ok(None);
        };
        if let Some(limit) = self.max_memory_bytes {
            let budget = &mut spec.request.memory.max_memory_bytes;
            *budget = Some(budget.map_or(limit, |b| b.min(limit)));
        }
        let conn = connect(&self.client)?;
        let reporter = RedisReporter {
            conn: Mutex::new(conn),
            id: entry.id.clone(),
            entry: entry.entry,
            worker: self.name.clone(),
            milestones: AtomicU64::new(0),
            live: AtomicBool::new(false),
            beat_every: self.claim_idle / 4,
            last_beat: Mutex::new(Instant::now()),
            client: self.client.clone(),
            stats: self.stats.clone(),
            last_step: Mutex::new(Instant::now()),
        };
        self.stats.job_started();
        eprintln!("sdgen-server worker {}: running {}", self.name, entry.id);
        Ok(Some(Task { id: entry.id, spec, cancel: Default::default(), reporter: Box::new(reporter) }))
    }
}

impl JobSource for RedisSource {
    fn next(&self) -> Option<Task> {
        let mut failing = false;
        while !self.stop.load(Ordering::Relaxed) {
            let task = self.take().and_then(|entry| entry.map_or(Ok(None), |e| self.start(e)));
            match task {
                Ok(Some(task)) => return Some(task),
                Ok(None) => failing = false,
                Err(e) => {
                    if !failing {
                        eprintln!("sdgen-server worker {}: the broker at {}: {e} (retrying)", self.name, self.url);
                    }
                    failing = true;
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        None
    }
}

/// A running job's reports, into Redis.
struct RedisReporter {
    conn: Mutex<Connection>,
    client: redis::Client,
    id: String,
    /// Its entry in the jobs stream.
    entry: String,
    worker: String,
    /// Milestone events of this run so far.
    milestones: AtomicU64,
    /// This run has appended a milestone of its own (it is past what an earlier run sent).
    live: AtomicBool,
    beat_every: Duration,
    last_beat: Mutex<Instant>,
    /// The worker's counts (its heartbeat's).
    stats: Arc<WorkerStats>,
    /// When the job's last step or stage began (its step latency).
    last_step: Mutex<Instant>,
}

impl RedisReporter {
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> RedisResult<T>) -> RedisResult<T> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = f(&mut conn);
        if result.as_ref().is_err_and(|e| e.is_unrecoverable_error() || e.is_timeout()) {
            if let Ok(fresh) = connect(&self.client) {
                *conn = fresh;
            }
        }
        result
    }

    fn report(&self, event: JobEvent, image: Option<JobImage>) -> RedisResult<()> {
        if let Some(i) = &image {
            let stored = StoredImage { seed: i.seed, parameters: i.parameters.clone(), metadata: i.metadata.clone() };
            let meta = serde_json::to_string(&stored).expect("plain data serializes");
            self.with(|c| {
                redis::pipe()
                    .cmd("HSETNX")
                    .arg(images_key(&self.id))
                    .arg(i.index)
                    .arg(meta)
                    .cmd("HSETNX")
                    .arg(pngs_key(&self.id))
                    .arg(i.index)
                    .arg(i.png.as_slice())
                    .query::<()>(c)
            })?;
        }
        let milestone = !matches!(event, JobEvent::Log { .. } | JobEvent::Warning { .. });
        let n = if milestone { self.milestones.fetch_add(1, Ordering::Relaxed) + 1 } else { 0 };
        if !milestone && !self.live.load(Ordering::Relaxed) {
            return Ok(());
        }
        let text = serde_json::to_string(&event).expect("plain data serializes");
        let image_index = image.map_or(String::new(), |i| i.index.to_string());
        let appended: i64 = self.with(|c| {
            APPEND.key(job_key(&self.id)).key(events_key(&self.id)).arg(n).arg(text).arg(image_index).invoke(c)
        })?;
        if milestone {
            self.live.store(appended == 1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn complain(&self, what: &str, e: &redis::RedisError) {
        eprintln!("sdgen-server worker {}: job {}: {what}: {e}", self.worker, self.id);
    }
}

impl Reporter for RedisReporter {
    fn event(&self, event: JobEvent, image: Option<JobImage>) {
        self.stats.metrics.job_event(&event, &self.last_step);
        if let Err(e) = self.report(event, image) {
            self.complain("cannot report to the broker", &e);
        }
    }

    /// Cancelled when a server set the flag, or when the job has ended elsewhere (a worker that
    /// took it over while this one was thought dead finished it); keeps the claim fresh.
    fn tick(&self) -> bool {
        let beat = {
            let mut last = self.last_beat.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.elapsed() >= self.beat_every;
            if due {
                *last = Instant::now();
            }
            due
        };
        let result: RedisResult<(Option<String>, Option<String>)> = self.with(|c| {
            if beat {
                redis::cmd("XCLAIM")
                    .arg(&[JOBS, GROUP, &self.worker, "0", &self.entry, "JUSTID"][..])
                    .query::<redis::Value>(c)?;
            }
            redis::cmd("HMGET").arg(job_key(&self.id)).arg(&["state", "cancel"][..]).query(c)
        });
        match result {
            Ok((state, cancel)) => cancel.is_some() || state.is_none_or(|s| has_ended(&s)),
            Err(e) => {
                self.complain("cannot reach the broker", &e);
                false
            }
        }
    }

    fn models_opened(&self, n: usize) {
        self.stats.metrics.model_opens.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn memory(&self, info: &sdgen_memory::MemoryInfo) {
        self.stats.metrics.memory_seen(info);
    }

    fn finish(&self, state: JobState, error: Option<ApiError>) {
        self.stats.job_ended(state);
        let result = self.with(|c| {
            let images: usize = redis::cmd("HLEN").arg(images_key(&self.id)).query(c)?;
            finish_job(c, &self.id, state, images, error.as_ref())?;
            acknowledge(c, &self.entry)
        });
        match result {
            Ok(()) => eprintln!("sdgen-server worker {}: {} {}", self.worker, self.id, state.name()),
            // Its entry stays pending: another worker takes it over after the claim's idle time.
            Err(e) => self.complain("cannot record its end", &e),
        }
    }
}

/// Whether a job in the state named `state` has ended.
fn has_ended(state: &str) -> bool {
    [JobState::Done, JobState::Failed, JobState::Cancelled].iter().any(|s| s.name() == state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_final_states_count_as_ended() {
        let ended: Vec<&str> =
            ["queued", "running", "done", "failed", "cancelled", "x"].into_iter().filter(|s| has_ended(s)).collect();
        assert_eq!(ended, ["done", "failed", "cancelled"]);
    }
}
