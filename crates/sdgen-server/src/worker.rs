//! The worker: one thread that owns the engine (so models stay open between jobs) and runs jobs
//! one at a time, from wherever they wait — the in-process queue, or a Redis broker in
//! `sdgen-server --worker`. It turns the engine's events into the job's, each finished image
//! into the PNG the command line would write, and enforces the job's time limit; where the
//! reports go is the [`Reporter`]'s business.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use sdgen::engine::{Batch, CancelToken, Engine, EngineConfig, Event};
use sdgen::error::FieldNames;
use sdgen::pipeline::Progress;

use crate::error::ApiError;
use crate::jobs::{JobEvent, JobImage, JobSpec, JobState};

/// How often a running job's watcher looks at its clock and its reporter (a cancellation made
/// on another machine, a broker's keep-alive).
const TICK: Duration = Duration::from_millis(100);

/// A job handed to the worker.
pub struct Task {
    /// The job's id.
    pub id: String,
    /// What to run.
    pub spec: JobSpec,
    /// Set to stop it (by a cancellation, its time limit or shutdown).
    pub cancel: CancelToken,
    /// Where its events and its end go.
    pub reporter: Box<dyn Reporter>,
}

/// Where a running job's reports go.
pub trait Reporter: Send + Sync {
    /// Something happened (an `image` event comes with its image).
    fn event(&self, event: JobEvent, image: Option<JobImage>);
    /// Called every [`TICK`] while the job runs (from another thread): whether it was cancelled
    /// somewhere the token does not reach. A broker also keeps its claim on the job alive here.
    fn tick(&self) -> bool {
        false
    }
    /// The engine opened `n` more models for this job.
    fn models_opened(&self, _n: usize) {}
    /// A memory snapshot the engine took (at a model load, before and after generating).
    fn memory(&self, _info: &sdgen_memory::MemoryInfo) {}
    /// The job ended.
    fn finish(&self, state: JobState, error: Option<ApiError>);
}

/// Where the worker takes its jobs from.
pub trait JobSource: Send + Sync {
    /// The next job: waits for one; `None` once the worker should stop.
    fn next(&self) -> Option<Task>;
}

/// Starts the worker thread; it ends once `source` has no more jobs for it.
pub fn spawn(config: EngineConfig, source: impl JobSource + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("sdgen-worker".into())
        .spawn(move || serve(config, &source))
        .expect("the worker thread starts")
}

/// Runs `source`'s jobs one at a time until it has no more.
pub fn serve(config: EngineConfig, source: &dyn JobSource) {
    // GPU memory probe and pool trim for the memory manager (nothing on the CPU).
    let _device_memory = sdgen::device_memory::DeviceMemory::install(&config.runtime.device);
    let mut engine = Engine::new(config);
    while let Some(task) = source.next() {
        let (outcome, error) = run(&mut engine, &task);
        // The seed's completion point: what the job held is returned before the job is
        // reported ended. One pass, not the aggressive two with the seed's 0.5 s between
        // (which capped a server at ~2 jobs a second): everything the job held was dropped on
        // this thread before `run` returned, the trim reaches every thread's arena, and the
        // device hook synchronises its stream before trimming the pool, so no free is still in
        // flight for a second pass to catch (the load and cancel tests measure the return).
        sdgen_memory::cleanup_memory(false);
        task.reporter.finish(outcome, error);
    }
}

/// Runs one job to its end: how it ended.
fn run(engine: &mut Engine, task: &Task) -> (JobState, Option<ApiError>) {
    if task.cancel.is_cancelled() {
        return (JobState::Cancelled, None);
    }
    let reporter = &*task.reporter;
    // The engine writes the fields its lines name as templates (`{steps}`): each event carries
    // the line worded as the job's API names them and the template, for a client to word with
    // its own names (`generate --remote`: its flags).
    engine.set_field_names(sdgen::error::as_template);
    let names = task.spec.api.field_names();
    reporter.event(JobEvent::Started, None);
    let opened = engine.models_opened();
    let timed_out = AtomicBool::new(false);
    let images = task.spec.request.image_count();
    let images_done = Cell::new(0);
    let result = std::thread::scope(|scope| {
        let (done, watching) = mpsc::channel::<()>();
        scope.spawn(|| watch(task, &timed_out, watching));
        let mut events = |e: Event| on_event(reporter, names, &images_done, images, e);
        let mut on_batch = |batch: Batch| save_batch(&task.id, reporter, names, &images_done, batch);
        let result = engine.generate_each(&task.spec.request, &mut events, &task.cancel, &mut on_batch);
        drop(done);
        result
    });
    reporter.models_opened(engine.models_opened() - opened);
    match result {
        Ok(()) => (JobState::Done, None),
        Err(sdgen::Error::Cancelled) if timed_out.load(Ordering::Relaxed) => {
            let limit_ms = task.spec.timeout_ms.unwrap_or_default();
            (JobState::Failed, Some(ApiError::timed_out(limit_ms, images_done.get(), images)))
        }
        Err(sdgen::Error::Cancelled) => (JobState::Cancelled, None),
        Err(e) => (JobState::Failed, Some(ApiError::from_engine(&e, &task.spec.api.field_names()))),
    }
}

/// Watches a running job until `done` closes: past its time limit, or cancelled where its token
/// does not reach, it is cancelled (stopping at its next step or stage boundary).
fn watch(task: &Task, timed_out: &AtomicBool, done: mpsc::Receiver<()>) {
    let deadline = task.spec.timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
    while let Err(RecvTimeoutError::Timeout) = done.recv_timeout(TICK) {
        if task.reporter.tick() {
            task.cancel.cancel();
        }
        if deadline.is_some_and(|d| Instant::now() >= d) && !timed_out.swap(true, Ordering::Relaxed) {
            task.cancel.cancel();
        }
    }
}

/// A line the engine wrote with its fields as templates: as the job's API (`names`) words it, and
/// its template where it names a field.
fn worded(line: &str, names: FieldNames) -> (String, Option<String>) {
    let message = sdgen::error::fill(line, &names);
    let template = (message != line).then(|| line.to_string());
    (message, template)
}

/// The engine's report, as the job's events (fields named as `names` does).
fn on_event(reporter: &dyn Reporter, names: FieldNames, images_done: &Cell<usize>, images: usize, event: Event) {
    let event = match event {
        Event::Log(line) => {
            let (message, template) = worded(line, names);
            JobEvent::Log { message, template }
        }
        Event::Warning(line) => {
            let (message, template) = worded(line, names);
            JobEvent::Warning { message, template }
        }
        Event::Detail(_) | Event::Download(_) => return,
        // The server's log says when and why it evicts; the job's too.
        Event::Evicted(eviction) => {
            eprintln!("sdgen-server: {eviction}");
            JobEvent::Log { message: eviction.to_string(), template: None }
        }
        Event::Pipeline(p) => match p {
            Progress::StageStart(stage) => JobEvent::StageStart { stage: stage.to_string() },
            Progress::StageEnd { stage, elapsed_ms } => JobEvent::StageEnd { stage: stage.to_string(), elapsed_ms },
            Progress::Step { index, total } => {
                JobEvent::Step { step: index, steps: total, images_done: images_done.get(), images }
            }
            Progress::Memory { info, .. } => return reporter.memory(info),
            Progress::Note(_) => return,
        },
    };
    reporter.event(event, None);
}

/// A finished batch: each image encoded as the command line saves it, the warnings it records
/// naming fields as `names` does.
fn save_batch(
    id: &str,
    reporter: &dyn Reporter,
    names: FieldNames,
    images_done: &Cell<usize>,
    batch: Batch,
) -> Result<(), sdgen::Error> {
    for mut image in batch.images {
        for w in &mut image.metadata.warnings {
            *w = sdgen::error::fill(w, &names);
        }
        for plan in image.metadata.extra.values_mut() {
            fill_plan_warnings(plan, names);
        }
        let png = sdgen::output::image_png(&image.metadata, &image.image.rgb8)?;
        let parameters = sdgen::output::a1111_parameters(&image.metadata);
        let (index, seed) = (image.index, image.image.seed);
        let event = JobEvent::Image { index, seed, url: format!("/v1/jobs/{id}/images/{index}") };
        images_done.set(images_done.get() + 1);
        reporter.event(event, Some(JobImage { index, seed, png, parameters, metadata: image.metadata }));
    }
    Ok(())
}

/// The plans a job's metadata records (`plan`, `refiner_plan`, `hires_plan`, each of
/// `hires_plans`): their `warning`, written with templates, worded as `names` does.
fn fill_plan_warnings(value: &mut serde_json::Value, names: FieldNames) {
    match value {
        serde_json::Value::Object(plan) => {
            if let Some(serde_json::Value::String(w)) = plan.get_mut("warning") {
                *w = sdgen::error::fill(w, &names);
            }
        }
        serde_json::Value::Array(plans) => plans.iter_mut().for_each(|p| fill_plan_warnings(p, names)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::fill_plan_warnings;
    use serde_json::json;

    /// The plans' warnings the engine wrote with templates read as the job's API names fields;
    /// other values stay as they are.
    #[test]
    fn the_recorded_plans_warnings_name_the_apis_fields() {
        let warning = "Consider using {width} 656 {height} 656 or {max_memory} 0.3GB instead";
        let mut extra = json!({
            "plan": {"warning": warning, "width": 1024},
            "hires_plans": [{"warning": "pass {weights} to choose"}, {"stages": []}],
            "kernels": "fast {width}",
        });
        for value in extra.as_object_mut().unwrap().values_mut() {
            fill_plan_warnings(value, crate::jobs::Api::A1111.field_names());
        }
        assert_eq!(
            extra["plan"]["warning"],
            "Consider using width 656 height 656 or the server's --max-memory 0.3GB instead"
        );
        assert_eq!(extra["hires_plans"][0]["warning"], "pass weights to choose");
        assert_eq!(extra["kernels"], "fast {width}");
    }
}
