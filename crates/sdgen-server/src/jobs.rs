//! Jobs as the HTTP side sees them, and the seam to where they wait and run: the [`Broker`]
//! trait, implemented by the in-process queue ([`crate::queue`], the default) and by a Redis
//! broker with workers in other processes ([`crate::redis_broker`]).
//!
//! A job is shared (`Arc<Job>`) by the handler that made it, the broker and whoever watches it.
//! Everything that happens to it arrives as a [`JobEvent`] (from the in-process worker directly,
//! or read back from Redis) and goes through [`Job::apply`], which updates its state and
//! progress, appends the event to its log and bumps its `version` (a `watch` channel), so a late
//! subscriber to its event stream replays the log and then waits for more without missing any.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

pub use sdgen::engine::wire::JobEvent;
use sdgen::engine::{CancelToken, GenerateRequest};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::ApiError;
use crate::metrics::Metrics;

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
    /// When the last step (or stage) began, for the step latency.
    pub last_step: Instant,
    /// The server stopped watching it before it ended (a broker's job goes on without this
    /// server): its event streams and waiting requests end.
    pub detached: bool,
}

impl JobStatus {
    /// Whether nothing more will be heard of the job here.
    pub fn is_settled(&self) -> bool {
        self.state.is_final() || self.detached
    }
}

/// What a job asks for, as the engine takes it, plus what the responses report. A broker
/// carries it to its workers as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    /// The engine's request (the model, the prompt, every setting, the seed drawn).
    pub request: GenerateRequest,
    /// Which API made it: its field names go in error messages.
    pub api: Api,
    /// The longest the job may run on a worker (`--job-timeout`); `None`: no limit.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The API a job came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A queued job with a fresh id (unique across servers sharing a broker: the random part is
    /// 64 bits).
    pub fn new(spec: JobSpec) -> Arc<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("job-{n}-{:016x}", random_u64());
        Self::restore(id, spec, SystemTime::now())
    }

    /// The job `id` made at `created`, as its events will tell the rest (a broker's job this
    /// server has not seen yet).
    pub fn restore(id: String, spec: JobSpec, created: SystemTime) -> Arc<Self> {
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
            last_step: Instant::now(),
            detached: false,
        };
        Arc::new(Self {
            id,
            spec,
            cancel: CancelToken::new(),
            created,
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
        self.finish_counted(state, error, None)
    }

    /// [`Job::finish`], counted in `metrics` when it ended the job.
    pub fn end(&self, state: JobState, error: Option<ApiError>, metrics: &Metrics) {
        self.finish_counted(state, error, Some(metrics));
    }

    /// Ends the job, counted before the end can be seen: a client that sees it ended and then
    /// reads `/metrics` finds it counted.
    fn finish_counted(&self, state: JobState, error: Option<ApiError>, metrics: Option<&Metrics>) -> bool {
        let mut ended = false;
        self.update(None, |s| {
            if s.state.is_final() {
                return;
            }
            if let Some(m) = metrics {
                m.job_ended(state.name());
            }
            ended = true;
            s.events.push(final_event(state, s.images.len(), error.as_ref()));
            s.state = state;
            s.error = error;
            s.finished = Some(Instant::now());
            s.progress.stage = None;
        });
        ended
    }

    /// One event as a worker reported it (an `image` event with its image): the state, the
    /// progress and the metrics follow, and the event is logged; a final event ends the job.
    pub fn apply(&self, event: JobEvent, image: Option<JobImage>, metrics: &Metrics) {
        let end = match &event {
            JobEvent::Done { .. } => Some((JobState::Done, None)),
            JobEvent::Cancelled { .. } => Some((JobState::Cancelled, None)),
            JobEvent::Failed { status, field, message, template } => {
                let error = ApiError::from_failed(*status, field.clone(), message.clone(), template.clone());
                Some((JobState::Failed, Some(error)))
            }
            _ => None,
        };
        if let Some((state, error)) = end {
            return self.end(state, error, metrics);
        }
        if let JobEvent::StageStart { stage } = &event {
            metrics.stage(stage);
        }
        let (mut step_s, mut new_image) = (None, false);
        self.update(Some(event.clone()), |s| match event {
            JobEvent::Started => {
                s.state = JobState::Running;
                s.started = Some(Instant::now());
            }
            JobEvent::StageStart { stage } => {
                s.progress.stage = Some(stage);
                s.last_step = Instant::now();
            }
            JobEvent::StageEnd { .. } => s.progress.stage = None,
            JobEvent::Step { step, steps, .. } => {
                step_s = Some(s.last_step.elapsed().as_secs_f64());
                s.last_step = Instant::now();
                let per_batch = s.per_batch;
                let p = &mut s.progress;
                (p.step, p.steps) = (step, steps);
                let batch = per_batch.min(p.images.saturating_sub(p.images_done)).max(1);
                let done = p.images_done as f64 + batch as f64 * step as f64 / steps.max(1) as f64;
                p.fraction = (done / p.images.max(1) as f64).min(1.0);
            }
            JobEvent::Image { .. } => {
                // Keyed by index: an image made again (a broker's job re-run) is not added twice.
                if let Some(image) = image.filter(|i| !s.images.iter().any(|have| have.index == i.index)) {
                    s.images.push(image);
                    new_image = true;
                }
                s.progress.images_done = s.images.len();
                s.progress.fraction = s.images.len() as f64 / s.progress.images.max(1) as f64;
                s.progress.step = 0;
            }
            _ => {}
        });
        if new_image {
            metrics.images.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(seconds) = step_s {
            metrics.step(seconds);
        }
    }

    /// Stops watching the job here without ending it (its events streams and waiting requests
    /// end): a broker's job goes on while this server stops.
    pub fn detach(&self) {
        self.update(None, |s| s.detached = true);
    }

    /// A receiver that sees every later update.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Waits until the job has ended (or is no longer watched here).
    pub async fn wait(&self) {
        let mut rx = self.subscribe();
        while !self.status().is_settled() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// A job's last event: how it ended.
pub fn final_event(state: JobState, images: usize, error: Option<&ApiError>) -> JobEvent {
    match state {
        JobState::Done => JobEvent::Done { images },
        JobState::Cancelled => JobEvent::Cancelled { images },
        _ => {
            let e = error.cloned().unwrap_or_else(|| ApiError::bad_request("failed"));
            JobEvent::Failed { status: e.status.as_u16(), field: e.field, message: e.message, template: e.template }
        }
    }
}

/// What cancelling a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// It was waiting: it left the queue, cancelled.
    FromQueue,
    /// It is running: it stops at its next step or stage boundary.
    Running,
    /// It had already ended: nothing changed.
    AlreadyEnded,
    /// The broker could not be reached: nothing changed.
    Unreachable(String),
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueRefusal {
    /// The queue holds its capacity.
    Full,
    /// The server is stopping.
    Closed,
    /// The broker could not be reached (what went wrong).
    Unreachable(String),
}

/// Where jobs wait for a worker, and how the server hears what happens to them: the one seam
/// between the HTTP side and the workers. The in-process [`crate::queue::Queue`] hands jobs to a
/// thread of this process; [`crate::redis_broker::RedisBroker`] to `sdgen-server --worker`
/// processes through a Redis Stream. The routes see only this.
pub trait Broker: Send + Sync + std::fmt::Debug {
    /// Queues `job` (its `queued` event says how many are ahead), or says why not.
    fn push(&self, job: Arc<Job>) -> Result<(), QueueRefusal>;
    /// A job by id (one this server made, or, with a broker, any the broker still holds).
    fn get(&self, id: &str) -> Option<Arc<Job>>;
    /// Cancels `job`: a queued one leaves the queue now (cancelled), a running one stops at its
    /// next step or stage boundary.
    fn cancel(&self, job: &Arc<Job>) -> Cancelled;
    /// Jobs waiting.
    fn depth(&self) -> usize;
    /// The running jobs, the longest-running first: one at most in process, one per busy
    /// worker with a broker.
    fn running(&self) -> Vec<Running>;
    /// Jobs allowed to wait.
    fn capacity(&self) -> usize;
    /// Refuses new jobs: shutdown. The in-process queue cancels its jobs (they die with the
    /// process); a broker's jobs go on, and this server stops watching them.
    fn close(&self);
    /// A broker's live workers, as their last heartbeats describe them; `None` where the jobs
    /// run in this process.
    fn workers(&self) -> Option<Vec<crate::metrics::WorkerReport>> {
        None
    }
}

/// A running job and the worker running it.
#[derive(Debug, Clone)]
pub struct Running {
    /// The job.
    pub job: Arc<Job>,
    /// The broker's worker that runs it (`--worker-name`); `None` in process.
    pub worker: Option<String>,
}

/// The jobs a server remembers: every job not yet ended, and the last `keep` that ended.
#[derive(Debug)]
pub struct Registry {
    all: HashMap<String, Arc<Job>>,
    /// Ended jobs, oldest first, forgotten past `keep`.
    finished: VecDeque<String>,
    keep: usize,
}

impl Registry {
    /// Remembers `keep` ended jobs.
    pub fn new(keep: usize) -> Self {
        Self { all: HashMap::new(), finished: VecDeque::new(), keep }
    }

    /// Remembers `job`.
    pub fn insert(&mut self, job: Arc<Job>) {
        self.all.insert(job.id.clone(), job);
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.all.get(id).cloned()
    }

    /// `id` ended: the oldest ended jobs past the limit are forgotten.
    pub fn ended(&mut self, id: &str) {
        self.finished.push_back(id.to_string());
        while self.finished.len() > self.keep {
            if let Some(old) = self.finished.pop_front() {
                self.all.remove(&old);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Arc<Job> {
        let mut request = GenerateRequest::new(sdgen::loading::ModelSource::parse("sd15"), "a cat");
        request.params.n = 2;
        Job::new(JobSpec { request, api: Api::Jobs, timeout_ms: None })
    }

    fn image(index: usize) -> JobImage {
        JobImage {
            index,
            seed: index as u64,
            png: vec![index as u8],
            parameters: String::new(),
            metadata: Default::default(),
        }
    }

    #[test]
    fn events_drive_the_state_and_an_image_made_twice_is_kept_once() {
        let (job, metrics) = (job(), Metrics::default());
        job.apply(JobEvent::Queued { position: 0 }, None, &metrics);
        job.apply(JobEvent::Started, None, &metrics);
        assert_eq!(job.status().state, JobState::Running);
        job.apply(JobEvent::Step { step: 1, steps: 4, images_done: 0, images: 2 }, None, &metrics);
        assert_eq!(job.status().progress.fraction, 0.125);
        let event = JobEvent::Image { index: 0, seed: 0, url: "/v1/jobs/x/images/0".into() };
        job.apply(event.clone(), Some(image(0)), &metrics);
        job.apply(event, Some(image(0)), &metrics);
        assert_eq!(job.status().images.len(), 1);
        assert_eq!(metrics.images.load(Ordering::Relaxed), 1);
        job.apply(JobEvent::Done { images: 1 }, None, &metrics);
        assert_eq!(job.status().state, JobState::Done);
        // Nothing changes an ended job.
        let late = JobEvent::Failed { status: 500, field: None, message: "late".into(), template: None };
        job.apply(late, None, &metrics);
        assert_eq!(job.status().state, JobState::Done);
        assert!(metrics
            .render(0, &metrics.figures(false, None), None)
            .contains("sdgen_jobs_total{outcome=\"done\"} 1"));
    }

    #[test]
    fn a_failed_event_gives_back_the_error_it_was_made_from() {
        for error in [
            ApiError::timed_out(1500, 1, 4),
            ApiError::from_engine(&sdgen::Error::invalid("width", "7 is odd"), &|_| None),
            ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "generation_failed", "out of memory"),
        ] {
            let JobEvent::Failed { status, field, message, template } = final_event(JobState::Failed, 0, Some(&error))
            else {
                panic!("not a failed event")
            };
            let back = ApiError::from_failed(status, field, message, template);
            assert_eq!(
                (back.status, back.error, back.field, back.message, back.template),
                (error.status, error.error, error.field, error.message, error.template)
            );
        }
        assert!(ApiError::timed_out(1500, 1, 4).message.contains("time limit of 1.5 s (--job-timeout)"));
    }
}
