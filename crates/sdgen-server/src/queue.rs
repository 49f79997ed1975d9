//! The in-process queue, the server's default [`Broker`]: jobs wait in memory for the worker
//! thread of this process, which reports straight into each [`Job`].
//!
//! It is bounded: a job that does not fit is refused at once (503), never buffered without
//! limit. The worker takes one job at a time (one per device).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::ApiError;
use crate::jobs::{Broker, Cancelled, Job, JobEvent, JobImage, JobState, QueueRefusal, Registry, Running};
use crate::metrics::Metrics;
use crate::worker::{JobSource, Reporter, Task};

/// The jobs waiting for the worker, the one it runs, and every job still remembered.
#[derive(Debug)]
pub struct Queue {
    inner: Mutex<QueueInner>,
    ready: Condvar,
    /// Waiting jobs allowed (the running one not counted).
    capacity: usize,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct QueueInner {
    waiting: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    closed: bool,
    jobs: Registry,
}

impl Queue {
    /// An empty queue of `capacity` waiting jobs, remembering `keep_finished` ended ones; the
    /// worker's reports are counted in `metrics`.
    pub fn new(capacity: usize, keep_finished: usize, metrics: Arc<Metrics>) -> Self {
        let inner =
            QueueInner { waiting: VecDeque::new(), running: None, closed: false, jobs: Registry::new(keep_finished) };
        Self { inner: Mutex::new(inner), ready: Condvar::new(), capacity, metrics }
    }

    fn lock(&self) -> MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The worker finished its job.
    fn done(&self, job: &Job) {
        let mut q = self.lock();
        if q.running.as_ref().is_some_and(|r| r.id == job.id) {
            q.running = None;
        }
        q.jobs.ended(&job.id);
    }
}

impl Broker for Queue {
    fn push(&self, job: Arc<Job>) -> Result<(), QueueRefusal> {
        let mut q = self.lock();
        if q.closed {
            return Err(QueueRefusal::Closed);
        }
        if q.waiting.len() >= self.capacity {
            return Err(QueueRefusal::Full);
        }
        let position = q.waiting.len() + usize::from(q.running.is_some());
        q.jobs.insert(job.clone());
        q.waiting.push_back(job.clone());
        job.apply(JobEvent::Queued { position }, None, &self.metrics);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.lock().jobs.get(id)
    }

    fn cancel(&self, job: &Arc<Job>) -> Cancelled {
        job.cancel.cancel();
        let mut q = self.lock();
        if let Some(pos) = q.waiting.iter().position(|j| j.id == job.id) {
            q.waiting.remove(pos);
            job.finish(JobState::Cancelled, None);
            q.jobs.ended(&job.id);
            return Cancelled::FromQueue;
        }
        if job.status().state.is_final() {
            Cancelled::AlreadyEnded
        } else {
            Cancelled::Running
        }
    }

    fn depth(&self) -> usize {
        self.lock().waiting.len()
    }

    fn running(&self) -> Vec<Running> {
        self.lock().running.iter().map(|job| Running { job: job.clone(), worker: None }).collect()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    /// Also cancels the waiting jobs and the running one, and lets the worker stop: every job
    /// ends now (the running one at its next step), so every open event stream and waiting
    /// A1111 request finishes and the server can stop.
    fn close(&self) {
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

/// The in-process worker's side of the queue.
impl JobSource for Arc<Queue> {
    fn next(&self) -> Option<Task> {
        let mut q = self.lock();
        loop {
            if q.closed {
                return None;
            }
            if let Some(job) = q.waiting.pop_front() {
                q.running = Some(job.clone());
                let reporter = Box::new(LocalReporter { job: job.clone(), queue: self.clone() });
                return Some(Task { id: job.id.clone(), spec: job.spec.clone(), cancel: job.cancel.clone(), reporter });
            }
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Reports straight into the job.
struct LocalReporter {
    job: Arc<Job>,
    queue: Arc<Queue>,
}

impl Reporter for LocalReporter {
    fn event(&self, event: JobEvent, image: Option<JobImage>) {
        self.job.apply(event, image, &self.queue.metrics);
    }

    fn models_opened(&self, n: usize) {
        self.queue.metrics.model_opens.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn memory(&self, info: &sdgen_memory::MemoryInfo) {
        self.queue.metrics.memory_seen(info);
    }

    /// The worker is free before anyone hears that the job ended.
    fn finish(&self, state: JobState, error: Option<ApiError>) {
        self.queue.done(&self.job);
        self.job.end(state, error, &self.queue.metrics);
    }
}
