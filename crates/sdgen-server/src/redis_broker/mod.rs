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
//! - `sdgen:workers` and `sdgen:worker:{name}`: the workers' heartbeats, their counts and memory
//!   for the servers' `/metrics` and `/v1/memory` ([`heartbeat`]).
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

mod heartbeat;
mod server;
mod worker;

use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{Connection, RedisResult, Script};
use serde::{Deserialize, Serialize};

pub use heartbeat::{Heartbeat, WorkerStats};
pub use server::RedisBroker;
pub use worker::RedisSource;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(redacted("redis://:secret@host:6379/2"), "redis://…@host:6379/2");
        assert_eq!(redacted("redis://user:secret@host"), "redis://…@host");
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
