//! Jobs and the queue between the HTTP side and the engine's worker thread.
//!
//! A job is shared (`Arc<Job>`) by the handler that made it, the queue, the worker and whoever
//! watches it. Everything that happens to it is appended to its event log, and its `version`
//! (a `watch` channel) is bumped, so a late subscriber to its event stream replays the log and
//! then waits for more without missing any.
//!
//! The queue is bounded: a job that does not fit is refused at once (503), never buffered
//! without limit. The worker takes one job at a time (one per device).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

pub use sdgen::engine::wire::JobEvent;
use sdgen::engine::{CancelToken, GenerateRequest};
use serde::Serialize;
use tokio::sync::watch;

use crate::error::ApiError;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting in the queue.
    Queued,
    /// On the worker.
    Running,
    /// Finished with all its images.
    Done,
    /// Ended by an error.
    Failed,
    /// Cancelled before it finished (its finished batches stay).
    Cancelled,
}

impl JobState {
    /// Whether nothing more will happen to the job.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Cancelled)
    }

    /// Its name, as the API and the metrics write it.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A finished image.
#[derive(Debug, Clone)]
pub struct JobImage {
    /// Its index in the job.
    pub index: usize,
    /// Its seed.
    pub seed: u64,
    /// The PNG file, as the command line writes it.
    pub png: Vec<u8>,
    /// Its A1111 `parameters` text (also in the PNG).
    pub parameters: String,
    /// Its sidecar metadata.
    pub metadata: sdgen::output::ImageMetadata,
}

/// Where a running job is.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobProgress {
    /// The stage running now.
    pub stage: Option<String>,
    /// Steps done of the current batch.
    pub step: usize,
    /// Steps of the current batch.
    pub steps: usize,
    /// Images finished.
    pub images_done: usize,
    /// Images the job makes.
    pub images: usize,
    /// The whole job's progress, in [0, 1].
    pub fraction: f64,
}

/// What changes as a job runs.
#[derive(Debug)]
pub struct JobStatus {
    pub state: JobState,
    pub events: Vec<JobEvent>,
    pub images: Vec<JobImage>,
    pub progress: JobProgress,
    pub error: Option<ApiError>,
    pub started: Option<Instant>,
    pub finished: Option<Instant>,
    /// Images per batch, for the progress fraction.
    pub per_batch: usize,
}

/// What a job asks for, as the engine takes it, plus what the responses report.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The engine's request (the model, the prompt, every setting, the seed drawn).
    pub request: GenerateRequest,
    /// Which API made it: its field names go in error messages.
    pub api: Api,
}

/// The API a job came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/jobs`.
    Jobs,
    /// `/sdapi/v1/…`.
    A1111,
}

/// A job.
#[derive(Debug)]
pub struct Job {
    /// Its id (`job-<n>-<random>`).
    pub id: String,
    /// What it asks for.
    pub spec: JobSpec,
    /// Cancels it, queued or running.
    pub cancel: CancelToken,
    /// When it was made.
    pub created: SystemTime,
    status: Mutex<JobStatus>,
    version: watch::Sender<u64>,
}

impl Job {
    /// A queued job with a fresh id.
    pub fn new(spec: JobSpec) -> Arc<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("job-{n}-{:08x}", random_u64() as u32);
        let images = spec.request.image_count();
        let status = JobStatus {
            state: JobState::Queued,
            events: Vec::new(),
            images: Vec::new(),
            progress: JobProgress { images, ..Default::default() },
            error: None,
            started: None,
            finished: None,
            per_batch: spec.request.memory.max_images_per_batch.unwrap_or(1).max(1),
        };
        Arc::new(Self {
            id,
            spec,
            cancel: CancelToken::new(),
            created: SystemTime::now(),
            status: Mutex::new(status),
            version: watch::channel(0).0,
        })
    }

    /// Its status, locked.
    pub fn status(&self) -> MutexGuard<'_, JobStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the status and appends `event` (if any), waking every watcher.
    pub fn update(&self, event: Option<JobEvent>, change: impl FnOnce(&mut JobStatus)) {
        {
            let mut s = self.status();
            change(&mut s);
            if let Some(e) = event {
                s.events.push(e);
            }
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// Ends the job in `state` with its final event (once: a job already ended stays as it was).
    pub fn finish(&self, state: JobState, error: Option<ApiError>) -> bool {
        let mut ended = false;
        self.update(None, |s| {
            if s.state.is_final() {
                return;
            }
            ended = true;
            let images = s.images.len();
            let event = match state {
                JobState::Done => JobEvent::Done { images },
                JobState::Cancelled => JobEvent::Cancelled { images },
                _ => {
                    let e = error.clone().unwrap_or_else(|| ApiError::bad_request("failed"));
                    JobEvent::Failed { status: e.status.as_u16(), field: e.field.clone(), message: e.message.clone() }
                }
            };
            s.events.push(event);
            s.state = state;
            s.error = error;
            s.finished = Some(Instant::now());
            s.progress.stage = None;
        });
        ended
    }

    /// A receiver that sees every later update.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Waits until the job has ended.
    pub async fn wait(&self) {
        let mut rx = self.subscribe();
        while !self.status().state.is_final() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// What cancelling a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// It was waiting: it left the queue, cancelled.
    FromQueue,
    /// It is running: it stops at its next step or stage boundary.
    Running,
    /// It had already ended: nothing changed.
    AlreadyEnded,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueRefusal {
    /// The queue holds its capacity.
    Full,
    /// The server is stopping.
    Closed,
}

/// The jobs waiting for the worker, the one it runs, and every job still remembered.
#[derive(Debug)]
pub struct Queue {
    inner: Mutex<QueueInner>,
    ready: Condvar,
    /// Waiting jobs allowed (the running one not counted).
    pub capacity: usize,
    /// Finished jobs remembered for `GET /v1/jobs/{id}`.
    pub keep_finished: usize,
}

#[derive(Debug, Default)]
struct QueueInner {
    waiting: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    closed: bool,
    all: HashMap<String, Arc<Job>>,
    /// Finished jobs, oldest first, forgotten past `keep_finished`.
    finished: VecDeque<String>,
}

impl Queue {
    /// An empty queue of `capacity` waiting jobs.
    pub fn new(capacity: usize, keep_finished: usize) -> Self {
        Self { inner: Mutex::default(), ready: Condvar::new(), capacity, keep_finished }
    }

    fn lock(&self) -> MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job` (its `queued` event says how many are ahead), or says why not.
    pub fn push(&self, job: Arc<Job>) -> Result<(), QueueRefusal> {
        let mut q = self.lock();
        if q.closed {
            return Err(QueueRefusal::Closed);
        }
        if q.waiting.len() >= self.capacity {
            return Err(QueueRefusal::Full);
        }
        let position = q.waiting.len() + usize::from(q.running.is_some());
        q.all.insert(job.id.clone(), job.clone());
        q.waiting.push_back(job.clone());
        job.update(Some(JobEvent::Queued { position }), |_| {});
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// The worker's next job: waits for one; `None` once the queue is closed.
    pub fn next(&self) -> Option<Arc<Job>> {
        let mut q = self.lock();
        loop {
            if q.closed {
                return None;
            }
            if let Some(job) = q.waiting.pop_front() {
                q.running = Some(job.clone());
                return Some(job);
            }
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The worker finished its job.
    pub fn done(&self, job: &Job) {
        let mut q = self.lock();
        if q.running.as_ref().is_some_and(|r| r.id == job.id) {
            q.running = None;
        }
        self.remember(&mut q, &job.id);
    }

    fn remember(&self, q: &mut QueueInner, id: &str) {
        q.finished.push_back(id.to_string());
        while q.finished.len() > self.keep_finished {
            if let Some(old) = q.finished.pop_front() {
                q.all.remove(&old);
            }
        }
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.lock().all.get(id).cloned()
    }

    /// The running job.
    pub fn running(&self) -> Option<Arc<Job>> {
        self.lock().running.clone()
    }

    /// Jobs waiting.
    pub fn depth(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Cancels `job`: a queued one leaves the queue now (cancelled), a running one stops at its
    /// next step or stage boundary.
    pub fn cancel(&self, job: &Arc<Job>) -> Cancelled {
        job.cancel.cancel();
        let mut q = self.lock();
        if let Some(pos) = q.waiting.iter().position(|j| j.id == job.id) {
            q.waiting.remove(pos);
            job.finish(JobState::Cancelled, None);
            self.remember(&mut q, &job.id);
            return Cancelled::FromQueue;
        }
        if job.status().state.is_final() {
            Cancelled::AlreadyEnded
        } else {
            Cancelled::Running
        }
    }

    /// Refuses new jobs, cancels the waiting ones and the running one, and lets the worker
    /// stop: shutdown.
    pub fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        let waiting: Vec<_> = q.waiting.drain(..).collect();
        for job in waiting {
            job.cancel.cancel();
            job.finish(JobState::Cancelled, None);
        }
        if let Some(job) = &q.running {
            job.cancel.cancel();
        }
        drop(q);
        self.ready.notify_all();
    }
}

/// A random number from the standard library's per-process random hash keys and the clock (ids
/// and A1111's seed -1 need no stronger randomness).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}
