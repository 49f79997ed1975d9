//! The server's side of the broker: jobs into Redis, and the jobs it is asked about mirrored
//! from their events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use redis::streams::{StreamId, StreamRangeReply};
use redis::{Connection, RedisResult};

use super::*;
use crate::jobs::{Broker, Cancelled, Job, JobEvent, JobImage, JobSpec, JobState, QueueRefusal, Registry, Running};
use crate::metrics::{Metrics, WorkerReport};

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

    /// Every job in the running set, by start time, with the worker its hash names (a job
    /// another server queued too: every server of the broker reports the same).
    fn running(&self) -> Vec<Running> {
        let ids: RedisResult<Vec<String>> =
            self.pool.with(|c| redis::cmd("ZRANGE").arg(RUNNING).arg(0).arg(-1).query(c));
        let ids = ids.unwrap_or_else(|e| {
            eprintln!("sdgen-server: reading the running jobs: {}", self.unreachable(&e));
            Vec::new()
        });
        let workers: Vec<Option<String>> = match ids.is_empty() {
            true => Vec::new(),
            false => {
                let mut pipe = redis::pipe();
                for id in &ids {
                    pipe.cmd("HGET").arg(job_key(id)).arg("worker");
                }
                self.pool.with(|c| pipe.query(c)).unwrap_or_else(|_| vec![None; ids.len()])
            }
        };
        let found = ids.iter().zip(workers).filter_map(|(id, worker)| Some(Running { job: self.get(id)?, worker }));
        found.collect()
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

    /// The workers whose heartbeat is alive (none, said on the log, while Redis cannot be
    /// reached).
    fn workers(&self) -> Option<Vec<WorkerReport>> {
        match self.pool.with(heartbeat::live_workers) {
            Ok(workers) => Some(workers),
            Err(e) => {
                eprintln!("sdgen-server: reading the workers' heartbeats: {}", self.unreachable(&e));
                Some(Vec::new())
            }
        }
    }
}
