//! The worker: one thread that owns the engine (so models stay open between jobs) and runs the
//! queue's jobs one at a time, turning the engine's events into the job's and each finished
//! image into the PNG the command line would write.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use sdgen::engine::{Batch, Engine, EngineConfig, Event};
use sdgen::pipeline::Progress;

use crate::error::ApiError;
use crate::jobs::{Job, JobEvent, JobImage, JobState, Queue};
use crate::metrics::Metrics;
use crate::routes::field_namer;

/// Starts the worker thread; it ends once the queue is closed and its job is done.
pub fn spawn(config: EngineConfig, queue: Arc<Queue>, metrics: Arc<Metrics>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("sdgen-worker".into())
        .spawn(move || {
            // GPU memory probe and pool trim for the memory manager (nothing on the CPU).
            let _device_memory = sdgen::device_memory::DeviceMemory::install(&config.runtime.device);
            let mut engine = Engine::new(config);
            while let Some(job) = queue.next() {
                let (outcome, error) = run(&mut engine, &job, &metrics);
                // The seed's completion point: what the job held is returned before the job is
                // reported ended, and the worker is free before anyone hears of it.
                sdgen_memory::cleanup_memory(true);
                queue.done(&job);
                if job.finish(outcome, error) {
                    metrics.job_ended(outcome.name());
                }
            }
        })
        .expect("the worker thread starts")
}

/// Runs one job to its end: how it ended.
fn run(engine: &mut Engine, job: &Arc<Job>, metrics: &Metrics) -> (JobState, Option<ApiError>) {
    if job.cancel.is_cancelled() {
        return (JobState::Cancelled, None);
    }
    job.update(Some(JobEvent::Started), |s| {
        s.state = JobState::Running;
        s.started = Some(Instant::now());
    });
    let opened = engine.models_opened();
    let mut last_step = Instant::now();
    let mut events = |e: Event| on_event(job, metrics, &mut last_step, e);
    let mut on_batch = |batch: Batch| save_batch(job, metrics, batch);
    let result = engine.generate_each(&job.spec.request, &mut events, &job.cancel, &mut on_batch);
    metrics.model_opens.fetch_add((engine.models_opened() - opened) as u64, Ordering::Relaxed);
    match result {
        Ok(()) => (JobState::Done, None),
        Err(sdgen::Error::Cancelled) => (JobState::Cancelled, None),
        Err(e) => (JobState::Failed, Some(ApiError::from_engine(&e, &field_namer(job.spec.api)))),
    }
}

/// The engine's report, as the job's events and progress.
fn on_event(job: &Job, metrics: &Metrics, last_step: &mut Instant, event: Event) {
    let (event, stage): (JobEvent, Option<Option<String>>) = match event {
        Event::Log(line) => (JobEvent::Log { message: line.to_string() }, None),
        Event::Warning(line) => (JobEvent::Warning { message: line.to_string() }, None),
        Event::Detail(_) | Event::Download(_) => return,
        Event::Pipeline(p) => match p {
            Progress::StageStart(stage) => {
                metrics.stage(stage);
                *last_step = Instant::now();
                (JobEvent::StageStart { stage: stage.to_string() }, Some(Some(stage.to_string())))
            }
            Progress::StageEnd { stage, elapsed_ms } => {
                (JobEvent::StageEnd { stage: stage.to_string(), elapsed_ms }, Some(None))
            }
            Progress::Step { index, total } => {
                metrics.step(last_step.elapsed().as_secs_f64());
                *last_step = Instant::now();
                let mut images = (0, 0);
                job.update(None, |s| {
                    let p = &mut s.progress;
                    (p.step, p.steps) = (index, total);
                    let batch = s.per_batch.min(p.images.saturating_sub(p.images_done)).max(1);
                    let done = p.images_done as f64 + batch as f64 * index as f64 / total.max(1) as f64;
                    p.fraction = (done / p.images.max(1) as f64).min(1.0);
                    images = (p.images_done, p.images);
                });
                let (images_done, images) = images;
                (JobEvent::Step { step: index, steps: total, images_done, images }, None)
            }
            Progress::Note(_) | Progress::Memory { .. } => return,
        },
    };
    job.update(Some(event), |s| {
        if let Some(stage) = stage {
            s.progress.stage = stage;
        }
    });
}

/// A finished batch: each image encoded as the command line saves it.
fn save_batch(job: &Job, metrics: &Metrics, batch: Batch) -> Result<(), sdgen::Error> {
    for image in batch.images {
        let png = sdgen::output::image_png(&image.metadata, &image.image.rgb8)?;
        let parameters = sdgen::output::a1111_parameters(&image.metadata);
        let seed = image.image.seed;
        let index = image.index;
        let url = format!("/v1/jobs/{}/images/{index}", job.id);
        metrics.images.fetch_add(1, Ordering::Relaxed);
        job.update(Some(JobEvent::Image { index, seed, url }), |s| {
            s.images.push(JobImage { index, seed, png, parameters, metadata: image.metadata });
            s.progress.images_done = s.images.len();
            s.progress.fraction = s.images.len() as f64 / s.progress.images.max(1) as f64;
            s.progress.step = 0;
        });
    }
    Ok(())
}
