//! The Redis broker: `sdgen-server --broker redis://HOST:PORT[/DB]` queues its jobs on a Redis
//! Stream, and any number of `sdgen-server --worker --broker …` processes (other machines, other
//! GPUs) run them. The HTTP API is the same as with the in-process queue: the server keeps a
//! [`Job`] per job it is asked about and fills it from the job's events in Redis.
//!
//! # What is in Redis (every key under `sdgen:`)
//! - `sdgen:jobs`: a stream with one entry `{id}` per queued job, read through the consumer
//!   group `workers`. The worker that ran the job acknowledges (`XACK`) and deletes its entry
//!   once the job has ended. While it runs, the worker refreshes its claim (`XCLAIM … JUSTID`)
//!   every quarter of `--claim-idle`; an entry not refreshed for `--claim-idle` (its worker died)
//!   is claimed by another worker (`XAUTOCLAIM`) and run again: at-least-once, at most
//!   [`MAX_ATTEMPTS`] times.
//! - `sdgen:job:{id}`: a hash: `spec` (the [`JobSpec`] as JSON: the engine's request with its
//!   seed drawn, so a re-run makes the same images), `state`, `created_ms`, `attempts`, `worker`,
//!   `hwm` (see below) and `cancel` (set by a `DELETE`).
//! - `sdgen:job:{id}:events`: a stream of the job's [`JobEvent`]s (field `e`, JSON), in order. A
//!   server reads it from its start (so a restarted server, or another one, replays a job) and
//!   polls it for more every [`POLL`].
//! - `sdgen:job:{id}:images` and `…:pngs`: hashes keyed by image index: the image's seed,
//!   parameters and metadata (JSON), and its PNG bytes. Written before the image's event, keyed
//!   by the index: an image made again by a re-run is the same entry.
//! - `sdgen:queued` and `sdgen:running`: sorted sets of job ids by time: the queue's depth (its
//!   bound is `--queue-size`, checked as the job is added) and the running jobs.
//!
//! Ended jobs' keys expire after [`FINISHED_TTL_S`]; queued and running jobs never do.
//!
//! # Re-runs the client does not see twice
//! A worker numbers its run's milestone events — everything but log lines and warnings:
//! `started` is 1, and so on, the same sequence for the same request. The job's `hwm` holds the
//! highest number appended: a milestone at or below it was already sent by an earlier run and is
//! dropped. An image's event is sent once per index, whatever its number (should two runs'
//! sequences differ, as another plan on another machine may batch differently, every image is
//! still announced once). A run's log lines are appended only once it has appended a milestone
//! of its own (the dead run's lines up to there stand). Each transition — enqueue, start, append, finish,
//! cancel — is one Lua script, atomic in Redis; the final event is appended once, and nothing
//! after it.
//!
//! # Cancellation and time limits
//! `DELETE` sets `cancel`: a queued job ends at once (the server appends its `cancelled`); a
//! running job's worker sees the flag within a [`crate::worker`] tick and stops at its next step.
//! A job's time limit travels in its spec and is kept by the worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use redis::{Connection, RedisResult, Script};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::jobs::{final_event, Broker, Cancelled, Job, JobEvent, JobImage, JobSpec, JobState, QueueRefusal, Registry};
use crate::metrics::Metrics;
use crate::worker::{JobSource, Reporter, Task};

/// The stream of queued jobs.
const JOBS: &str = "sdgen:jobs";
/// The consumer group of the workers.
const GROUP: &str = "workers";
/// Queued job ids, by time.
const QUEUED: &str = "sdgen:queued";
/// Running job ids, by start time.
const RUNNING: &str = "sdgen:running";
/// How long an ended job's keys stay (its images, its events) for clients to fetch.
pub const FINISHED_TTL_S: u64 = 3600;
/// How often a server reads the events of the jobs it watches.
pub const POLL: Duration = Duration::from_millis(50);
/// Runs of one job at most: a job whose worker keeps dying (an out-of-memory kill) fails.
pub const MAX_ATTEMPTS: u32 = 3;
/// Events read per round trip.
const BATCH: usize = 256;

fn job_key(id: &str) -> String {
    format!("sdgen:job:{id}")
}

fn events_key(id: &str) -> String {
    format!("sdgen:job:{id}:events")
}

fn images_key(id: &str) -> String {
    format!("sdgen:job:{id}:images")
}

fn pngs_key(id: &str) -> String {
    format!("sdgen:job:{id}:pngs")
}

/// The five keys of job `id` (hash, events, images, pngs) and the running set, as the scripts
/// that end a job take them.
fn ending_keys(id: &str) -> [String; 6] {
    [job_key(id), events_key(id), images_key(id), pngs_key(id), QUEUED.into(), RUNNING.into()]
}

/// Queues a job unless the queue is full: `{position, events entry id}` or nil.
/// KEYS: queued, running, jobs, job hash, events. ARGV: id, spec, created_ms, capacity.
static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
        local queued = redis.call('ZCARD', KEYS[1])
        if queued >= tonumber(ARGV[4]) then return false end
        local position = queued + redis.call('ZCARD', KEYS[2])
        redis.call('HSET', KEYS[4], 'spec', ARGV[2], 'state', 'queued', 'created_ms', ARGV[3], 'hwm', 0, 'attempts', 0)
        redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
        local entry = redis.call('XADD', KEYS[5], '*', 'e', '{"type":"queued","position":' .. position .. '}')
        redis.call('XADD', KEYS[3], '*', 'id', ARGV[1])
        return {position, entry}
        "#,
    )
});

/// A worker takes a job: `{'run', spec}`, `{'ended'}`, `{'missing'}` or `{'exhausted', runs}`.
/// KEYS: job hash, queued, running. ARGV: id, worker, now_ms, max attempts.
static START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
        local state = redis.call('HGET', KEYS[1], 'state')
        if not state then return {'missing'} end
        if state == 'done' or state == 'failed' or state == 'cancelled' then return {'ended'} end
        local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
        if attempts > tonumber(ARGV[4]) then return {'exhausted', tostring(attempts - 1)} end
        redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2])
        redis.call('ZREM', KEYS[2], ARGV[1])
        redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
        return {'run', redis.call('HGET', KEYS[1], 'spec')}
        "#,
    )
});

/// Appends an event unless the job has ended or an earlier run sent it: 1 if appended. A
/// milestone (ARGV[1] > 0) was sent when its number is at most `hwm`; an image's event (ARGV[3]
/// its index) when that image's was, whatever its number — so an image is announced once even
/// where two runs' sequences differ (another plan on another machine).
/// KEYS: job hash, events. ARGV: milestone number (0: a log line), event, image index or ''.
static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
        local state = redis.call('HGET', KEYS[1], 'state')
        if not state or state == 'done' or state == 'failed' or state == 'cancelled' then return 0 end
        local n = tonumber(ARGV[1])
        local hwm = tonumber(redis.call('HGET', KEYS[1], 'hwm') or '0')
        if ARGV[3] ~= '' then
            if redis.call('HSETNX', KEYS[1], 'image:' .. ARGV[3], 1) == 0 then return 0 end
        elseif n > 0 and n <= hwm then
            return 0
        end
        if n > hwm then redis.call('HSET', KEYS[1], 'hwm', n) end
        redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
        return 1
        "#,
    )
});

/// Ends a job (once): its state, its final event, out of the queued and running sets, its keys
/// set to expire. 1 if it ended it. KEYS: [`ending_keys`]. ARGV: id, state, event, ttl.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
        local state = redis.call('HGET', KEYS[1], 'state')
        if not state or state == 'done' or state == 'failed' or state == 'cancelled' then return 0 end
        redis.call('HSET', KEYS[1], 'state', ARGV[2])
        redis.call('XADD', KEYS[2], '*', 'e', ARGV[3])
        redis.call('ZREM', KEYS[5], ARGV[1])
        redis.call('ZREM', KEYS[6], ARGV[1])
        for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
        return 1
        "#,
    )
});

/// Cancels a job: `missing`, `ended`, `queued` (ended now, cancelled) or `running` (flagged for
/// its worker). KEYS: [`ending_keys`]. ARGV: id, the cancelled event, ttl.
static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
        local state = redis.call('HGET', KEYS[1], 'state')
        if not state then return 'missing' end
        if state == 'done' or state == 'failed' or state == 'cancelled' then return 'ended' end
        redis.call('HSET', KEYS[1], 'cancel', 1)
        if redis.call('ZREM', KEYS[5], ARGV[1]) == 0 then return 'running' end
        redis.call('HSET', KEYS[1], 'state', 'cancelled')
        redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
        for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
        return 'queued'
        "#,
    )
});

/// An image as its `images` hash entry holds it (the PNG is in `pngs`).
#[derive(Serialize, Deserialize)]
struct StoredImage {
    seed: u64,
    parameters: String,
    metadata: sdgen::output::ImageMetadata,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `url` without its password, for messages.
pub fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://…@{}", &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Connects to `url`, checks the server is a Redis this broker can use (6.2 or newer:
/// `XAUTOCLAIM`, exclusive ranges) and creates the stream and the workers' group if missing.
fn open(url: &str) -> anyhow::Result<redis::Client> {
    use anyhow::Context as _;
    let shown = redacted(url);
    let client = redis::Client::open(url)
        .with_context(|| format!("--broker {shown} is not a Redis URL (redis://HOST:PORT[/DB])"))?;
    let mut conn = connect(&client).with_context(|| format!("cannot reach the broker at {shown}"))?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut conn)?;
    let version = info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("0").trim().to_string();
    let numbers: Vec<u32> = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    if (numbers.first().copied().unwrap_or(0), numbers.get(1).copied().unwrap_or(0)) < (6, 2) {
        anyhow::bail!("the broker at {shown} runs Redis {version}; sdgen needs Redis 6.2 or newer (XAUTOCLAIM)");
    }
    let created: RedisResult<()> =
        redis::cmd("XGROUP").arg(&["CREATE", JOBS, GROUP, "0", "MKSTREAM"][..]).query(&mut conn);
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(e).context("creating the workers' consumer group"),
        _ => Ok(client),
    }
}

fn connect(client: &redis::Client) -> RedisResult<Connection> {
    let conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
    // Longer than the workers' blocking reads (1 s).
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(conn)
}

/// Connections to Redis, reused; one that failed is dropped.
struct Pool {
    client: redis::Client,
    idle: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

impl Pool {
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> RedisResult<T>) -> RedisResult<T> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match idle {
            Some(c) => c,
            None => connect(&self.client)?,
        };
        let result = f(&mut conn);
        if !result.as_ref().is_err_and(|e| e.is_unrecoverable_error() || e.is_timeout()) {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
        }
        result
    }
}

/// Reads the image `index` of job `id`.
fn load_image(conn: &mut Connection, id: &str, index: usize) -> RedisResult<Option<JobImage>> {
    let (meta, png): (Option<String>, Option<Vec<u8>>) = redis::pipe()
        .cmd("HGET")
        .arg(images_key(id))
        .arg(index)
        .cmd("HGET")
        .arg(pngs_key(id))
        .arg(index)
        .query(conn)?;
    let stored = meta.and_then(|m| serde_json::from_str::<StoredImage>(&m).ok());
    Ok(stored.zip(png).map(|(s, png)| JobImage {
        index,
        seed: s.seed,
        png,
        parameters: s.parameters,
        metadata: s.metadata,
    }))
}

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

/// Applies one entry of a job's events stream.
fn apply(conn: &mut Connection, job: &Job, entry: &StreamId, metrics: &Metrics) -> RedisResult<()> {
    let Some(event) = entry.get::<String>("e").and_then(|t| serde_json::from_str::<JobEvent>(&t).ok()) else {
        eprintln!("sdgen-server: job {}: event {} is not one this server reads; skipped", job.id, entry.id);
        return Ok(());
    };
    let image = match &event {
        JobEvent::Image { index, .. } => load_image(conn, &job.id, *index)?,
        _ => None,
    };
    job.apply(event, image, metrics);
    Ok(())
}

/// The server's side: jobs go into Redis; the jobs this server is asked about are mirrored from
/// their events.
#[derive(Debug)]
pub struct RedisBroker {
    pool: Pool,
    url: String,
    capacity: usize,
    closed: AtomicBool,
    metrics: Arc<Metrics>,
    mirrors: Mutex<Mirrors>,
}

#[derive(Debug)]
struct Mirrors {
    jobs: Registry,
    /// The jobs not yet ended, with the id of the last event applied ("" before the first).
    live: HashMap<String, (Arc<Job>, Arc<Mutex<String>>)>,
}

impl Mirrors {
    /// Watches `job` from the event after `cursor`.
    fn watch(&mut self, job: Arc<Job>, cursor: String) -> Arc<Mutex<String>> {
        let cursor = Arc::new(Mutex::new(cursor));
        self.jobs.insert(job.clone());
        self.live.insert(job.id.clone(), (job, cursor.clone()));
        cursor
    }
}

impl RedisBroker {
    /// Connects to `url` and starts reading the events of the jobs it watches.
    pub fn connect(
        url: &str,
        capacity: usize,
        keep_finished: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let client = open(url)?;
        let broker = Arc::new(Self {
            pool: Pool { client, idle: Mutex::default() },
            url: redacted(url),
            capacity,
            closed: AtomicBool::new(false),
            metrics,
            mirrors: Mutex::new(Mirrors { jobs: Registry::new(keep_finished), live: HashMap::new() }),
        });
        let poller = broker.clone();
        std::thread::Builder::new().name("sdgen-broker-poll".into()).spawn(move || poller.poll())?;
        Ok(broker)
    }

    fn mirrors(&self) -> MutexGuard<'_, Mirrors> {
        self.mirrors.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unreachable(&self, e: &redis::RedisError) -> String {
        format!("the broker at {} cannot be reached: {e}", self.url)
    }

    /// Applies `job`'s new events (the cursor locked: one reader at a time), counted in
    /// `metrics`; forgets it as live once it has ended, or detaches it when its keys have expired.
    fn sync(&self, conn: &mut Connection, job: &Job, cursor: &Mutex<String>, metrics: &Metrics) -> RedisResult<()> {
        let mut cursor = cursor.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let start = if cursor.is_empty() { "-".to_string() } else { format!("({cursor}") };
            let (reply, exists): (StreamRangeReply, bool) = redis::pipe()
                .cmd("XRANGE")
                .arg(events_key(&job.id))
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(BATCH)
                .cmd("EXISTS")
                .arg(job_key(&job.id))
                .query(conn)?;
            let read = reply.ids.len();
            for entry in reply.ids {
                *cursor = entry.id.clone();
                apply(conn, job, &entry, metrics)?;
            }
            if !exists && !job.status().state.is_final() {
                job.detach();
            }
            if job.status().is_settled() {
                let mut m = self.mirrors();
                if m.live.remove(&job.id).is_some() {
                    m.jobs.ended(&job.id);
                }
            }
            if read < BATCH {
                return Ok(());
            }
        }
    }

    /// Reads the events of every live job, every [`POLL`], until the broker is closed.
    fn poll(&self) {
        let mut failing = false;
        while !self.closed.load(Ordering::Relaxed) {
            std::thread::sleep(POLL);
            let live: Vec<_> = self.mirrors().live.values().cloned().collect();
            let result = self
                .pool
                .with(|conn| live.iter().try_for_each(|(job, cursor)| self.sync(conn, job, cursor, &self.metrics)));
            match &result {
                Err(e) if !failing => eprintln!("sdgen-server: {} (retrying)", self.unreachable(e)),
                Ok(()) if failing => eprintln!("sdgen-server: the broker at {} answers again", self.url),
                _ => {}
            }
            failing = result.is_err();
        }
    }

    /// Reads job `id` from Redis: its spec, then its events so far.
    fn load(&self, id: &str) -> RedisResult<Option<Arc<Job>>> {
        let (spec, created_ms): (Option<String>, Option<u64>) =
            self.pool.with(|c| redis::cmd("HMGET").arg(job_key(id)).arg(&["spec", "created_ms"][..]).query(c))?;
        let Some(spec) = spec.and_then(|s| serde_json::from_str::<JobSpec>(&s).ok()) else { return Ok(None) };
        let created = UNIX_EPOCH + Duration::from_millis(created_ms.unwrap_or_default());
        let job = Job::restore(id.to_string(), spec, created);
        let cursor = {
            let mut m = self.mirrors();
            // Another request may have read it meanwhile.
            if let Some(job) = m.jobs.get(id) {
                return Ok(Some(job));
            }
            m.watch(job.clone(), String::new())
        };
        // Its past was counted by the server that watched it (or this one, before it forgot it).
        self.pool.with(|c| self.sync(c, &job, &cursor, &Metrics::default()))?;
        Ok(Some(job))
    }
}

impl Broker for RedisBroker {
    fn push(&self, job: Arc<Job>) -> Result<(), QueueRefusal> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(QueueRefusal::Closed);
        }
        let spec = serde_json::to_string(&job.spec).expect("plain data serializes");
        let created_ms = job.created.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let keys = [QUEUED.to_string(), RUNNING.into(), JOBS.into(), job_key(&job.id), events_key(&job.id)];
        let queued: Option<(usize, String)> = self
            .pool
            .with(|c| {
                let mut call = ENQUEUE.prepare_invoke();
                for key in &keys {
                    call.key(key);
                }
                call.arg(&job.id).arg(spec).arg(created_ms).arg(self.capacity).invoke(c)
            })
            .map_err(|e| QueueRefusal::Unreachable(self.unreachable(&e)))?;
        let (position, entry) = queued.ok_or(QueueRefusal::Full)?;
        job.apply(JobEvent::Queued { position }, None, &self.metrics);
        self.mirrors().watch(job, entry);
        Ok(())
    }

    fn get(&self, id: &str) -> Option<Arc<Job>> {
        if let Some(job) = self.mirrors().jobs.get(id) {
            return Some(job);
        }
        // Ids are ours (`job-<n>-<hex>`): nothing else is looked up as a key.
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return None;
        }
        self.load(id).unwrap_or_else(|e| {
            eprintln!("sdgen-server: job {id}: {}", self.unreachable(&e));
            None
        })
    }

    fn cancel(&self, job: &Arc<Job>) -> Cancelled {
        let event = serde_json::to_string(&JobEvent::Cancelled { images: 0 }).expect("plain data serializes");
        let outcome: RedisResult<String> = self.pool.with(|c| {
            let mut call = CANCEL.prepare_invoke();
            for key in ending_keys(&job.id) {
                call.key(key);
            }
            call.arg(&job.id).arg(event).arg(FINISHED_TTL_S).invoke(c)
        });
        match outcome.as_deref() {
            Ok("queued") => {
                job.finish(JobState::Cancelled, None);
                Cancelled::FromQueue
            }
            Ok("running") => Cancelled::Running,
            Ok(_) => {
                // Ended (or expired): show how, before answering.
                let cursor = self.mirrors().live.get(&job.id).map(|(_, c)| c.clone());
                if let Some(cursor) = cursor {
                    let _ = self.pool.with(|c| self.sync(c, job, &cursor, &self.metrics));
                }
                Cancelled::AlreadyEnded
            }
            Err(e) => Cancelled::Unreachable(self.unreachable(e)),
        }
    }

    fn depth(&self) -> usize {
        self.pool.with(|c| redis::cmd("ZCARD").arg(QUEUED).query(c)).unwrap_or(0)
    }

    fn running(&self) -> Option<Arc<Job>> {
        let ids: Vec<String> = self.pool.with(|c| redis::cmd("ZRANGE").arg(RUNNING).arg(0).arg(0).query(c)).ok()?;
        ids.first().and_then(|id| self.get(id))
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    /// Refuses new jobs and stops watching: the jobs stay in Redis for the workers and for any
    /// server (this one restarted) to report.
    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let live: Vec<_> = self.mirrors().live.drain().map(|(_, (job, _))| job).collect();
        for job in live {
            job.detach();
        }
    }
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
}

/// One entry of the jobs stream: its entry id and the job's.
struct Entry {
    entry: String,
    id: String,
}

impl RedisSource {
    /// Connects as consumer `name`; a job idle for `claim_idle` on a dead worker is taken over;
    /// jobs run within `max_memory_bytes` (and their own budget); `stop` ends
    /// [`JobSource::next`].
    pub fn connect(
        url: &str,
        name: String,
        claim_idle: Duration,
        max_memory_bytes: Option<u64>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Self> {
        let client = open(url)?;
        Ok(Self { client, conn: Mutex::new(None), url: redacted(url), name, claim_idle, max_memory_bytes, stop })
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
        };
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

    fn finish(&self, state: JobState, error: Option<ApiError>) {
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
    fn urls_are_shown_without_their_password() {
        assert_eq!(redacted("redis://:secret@host:6379/2"), "redis://…@host:6379/2");
        assert_eq!(redacted("redis://user:secret@host"), "redis://…@host");
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn only_final_states_count_as_ended() {
        let ended: Vec<&str> =
            ["queued", "running", "done", "failed", "cancelled", "x"].into_iter().filter(|s| has_ended(s)).collect();
        assert_eq!(ended, ["done", "failed", "cancelled"]);
    }
}
