//! The engine: one object a process keeps (the CLI for one run, a server for its lifetime) that
//! takes a [`GenerateRequest`] and gives back finished images with their metadata, batch by
//! batch, reporting progress and honouring a [`CancelToken`].
//!
//! A job goes: validate the request → open the model, its VAE and refiner (from the engine's
//! cache when it opened them before) → resolve and plan it against the memory available, before
//! any weight is read → (an engine that keeps weights warm: evict what the plan needs room for)
//! → run it in batches of what fits, each finished by the passes the request asks for
//! (upscaling, the hires pass) and handed to the caller as soon as it is made (an interrupted
//! run keeps what it finished).

mod cache;
mod device;
mod plan;
mod request;
pub mod wire;

use std::collections::BTreeMap;

use crate::error::{render, FieldNames};
use crate::hub::{DownloadProgress, HubOptions};
use crate::loading::lora::LoraFile;
use crate::loading::{ModelFolder, ModelSource, OpenOptions};
use crate::output::ImageMetadata;
use crate::pipeline::{
    hires_pass, img2img, txt2img_with_refiner, upscale, GeneratedImage, Generation, Handoff, Img2ImgRequest, Progress,
    Request, Runtime, Settings, UPSCALE_STEPS,
};
use crate::{Error, Result};

pub use crate::loading::lora::LoraRequest;
pub use crate::pipeline::{CancelToken, Eviction, WarmReport, WarmWeights, WeightCounts, WeightUse};
pub use device::{check_dtype, open_device};
pub use plan::{plan, upscale_steps, HiresPlan, JobPlan, Pass, UpscalePlan, UpscaleStep};
pub use request::{GenerateRequest, Img2ImgInput, RefinerRequest, UpscaleRequest, FIELDS, MAX_IMAGES};

use cache::{ModelCache, OpenedModel};
use request::ModelKey;

/// How many opened models the engine keeps by default (configs and headers: kilobytes each).
pub const DEFAULT_CACHED_MODELS: usize = 4;

/// What the engine reports while it works.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A line for the log: what the job makes, its plan.
    Log(&'a str),
    /// A line a detailed log shows: the kernels and memory options that run.
    Detail(&'a str),
    /// A warning, ready to print (a tight plan, a truncated prompt, a recovered failure).
    Warning(&'a str),
    /// A model is being downloaded.
    Download(&'a DownloadProgress<'a>),
    /// The pipeline's progress: stages, steps (`index` of `total`), memory snapshots.
    Pipeline(Progress<'a>),
    /// Warm weights were dropped to make room for the job: what, why, and the memory given back
    /// (a line for the log, and for a server's own).
    Evicted(&'a Eviction),
}

/// One finished image of a job.
#[derive(Debug, Clone)]
pub struct FinishedImage {
    /// Its index in the whole job, from 0 (its seed is the job's seed + this).
    pub index: usize,
    /// The pixels.
    pub image: GeneratedImage,
    /// What its sidecar and PNG text record.
    pub metadata: ImageMetadata,
}

/// One batch of a job, as it finishes.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Which of the request's prompts it is for.
    pub prompt_index: usize,
    /// Images the whole job makes.
    pub job_images: usize,
    /// Its images, in seed order.
    pub images: Vec<FinishedImage>,
    /// The settings the batch ran with (every default filled in; its size the first pass's).
    pub settings: Settings,
    /// The size of its images, width × height: the first pass's, upscaled where the job asks.
    pub output_size: (usize, usize),
    /// Wall time per stage.
    pub timings_ms: BTreeMap<String, f64>,
    /// What the pipeline warned about while making it.
    pub warnings: Vec<String>,
    /// The metadata every image of the job shares (plans, kernels, VAE, model hash…), also in
    /// each image's `metadata.extra`.
    pub job_metadata: serde_json::Map<String, serde_json::Value>,
}

/// Where the engine runs and how it fetches models.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The device, dtype and (per job, from its plan) memory options.
    pub runtime: Runtime,
    /// The device as the metadata names it (`cpu`, `cuda:0`).
    pub device_label: String,
    /// Where models come from.
    pub hub: HubOptions,
    /// Opened models kept for later jobs.
    pub cached_models: usize,
    /// Loaded weights kept for later stages and jobs while the memory plan has room for them
    /// (a server's default; the command line's `--keep-warm`); `None`: every stage drops its
    /// model when it ends.
    pub warm: Option<WarmWeights>,
    /// How the caller names the request's fields where a warning or a log line refers to one
    /// (and in the warnings the images record): the CLI's flags, a server's JSON fields; the
    /// engine's names by default. Errors carry their references and are named by their reader
    /// ([`Error::describe`]).
    pub field_names: FieldNames,
}

impl EngineConfig {
    /// `runtime` named `device_label`, models from the hub as the environment configures it.
    pub fn new(runtime: Runtime, device_label: impl Into<String>) -> Self {
        Self {
            runtime,
            device_label: device_label.into(),
            hub: HubOptions::from_env(),
            cached_models: DEFAULT_CACHED_MODELS,
            warm: None,
            field_names: |_| None,
        }
    }
}

/// The engine: a device, a dtype, where models come from, and the models it has opened.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    models: ModelCache,
}

impl Engine {
    /// An engine with nothing opened yet.
    pub fn new(config: EngineConfig) -> Self {
        let models = ModelCache::new(config.cached_models);
        Self { config, models }
    }

    /// The runtime jobs run on (without a job's memory options).
    pub fn runtime(&self) -> &Runtime {
        &self.config.runtime
    }

    /// Models opened since the engine started: a job on a model already open opens none.
    pub fn models_opened(&self) -> usize {
        self.models.opens
    }

    /// The weights it keeps warm, when it keeps them.
    pub fn warm(&self) -> Option<&WarmWeights> {
        self.config.warm.as_ref()
    }

    /// Names the request's fields in the warnings and log lines of the jobs from now on as
    /// `names` does (a server's jobs come from APIs that name them differently).
    pub fn set_field_names(&mut self, names: FieldNames) {
        self.config.field_names = names;
    }

    /// Runs `req`, collecting every batch.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        events: &mut dyn FnMut(Event),
        cancel: &CancelToken,
    ) -> Result<Vec<Batch>> {
        let mut batches = Vec::new();
        self.generate_each(req, events, cancel, &mut |b| {
            batches.push(b);
            Ok::<_, Error>(())
        })?;
        Ok(batches)
    }

    /// Runs `req`, handing each batch to `on_batch` as soon as it is made; an error from
    /// `on_batch` (a failed save) ends the job with it. A cancelled job ends with
    /// [`Error::Cancelled`] at its next step or stage boundary, the batch in progress discarded.
    pub fn generate_each<E: From<Error>>(
        &mut self,
        req: &GenerateRequest,
        events: &mut dyn FnMut(Event),
        cancel: &CancelToken,
        on_batch: &mut dyn FnMut(Batch) -> Result<(), E>,
    ) -> Result<(), E> {
        req.validate()?;
        cancel.check()?;
        let names = self.config.field_names;
        // The engine's lines name fields by reference: spelled here as the caller names them.
        let mut named_events = |e: Event| match e {
            Event::Log(text) => events(Event::Log(&render(text, &names))),
            Event::Detail(text) => events(Event::Detail(&render(text, &names))),
            Event::Warning(text) => events(Event::Warning(&render(text, &names))),
            other => events(other),
        };
        let events: &mut dyn FnMut(Event) = &mut named_events;
        // The model with its VAE, and the refiner, opened before anything loads so a wrong one
        // costs nothing.
        let base = self.open(&req.model, &req.open, req.vae.as_ref(), events)?;
        if let Some(preset) = &req.preset {
            // Before any LoRA of the preset is fetched (`plan` checks it again, for its callers).
            crate::presets::check_model(preset, base.folder.family())?;
        }
        let refiner_model = match &req.refiner {
            Some(r) => Some(self.open_refiner(&base.folder, &r.source, req.vae.as_ref(), events)?),
            None => None,
        };
        let with_loras = self.attach_loras(&base.folder, &req.loras, events)?;
        let model = with_loras.as_ref().unwrap_or(&base.folder);
        let mut rt = self.config.runtime.clone();
        rt.cancel = cancel.clone();
        rt.warm = self.config.warm.clone();
        let ready = plan::ready(model, refiner_model.as_ref(), req, &rt, events)?;
        let (model, refiner, img2img_request, job) =
            (ready.quantised.as_ref().unwrap_or(model), ready.refiner, ready.img2img, ready.job);
        // Weights the planner quantised to fit (its last rung).
        let planned = job.weights.map(|q| model.clone().with_quantise(Some(q))).transpose()?;
        let model = planned.as_ref().unwrap_or(model);
        rt.options = job.options;
        // Warm weights the plan's stages need the room of go now; what the job loads is kept
        // while they all still fit (until the job ends, however it ends).
        let _job_warmth = match self.config.warm.clone() {
            Some(warm) => {
                let stages = plan::warm_stages(model, refiner_model.as_ref(), &job, &rt)?;
                if let Some(eviction) = warm.begin_job(stages) {
                    events(Event::Evicted(&eviction));
                }
                Some(JobWarmth(warm))
            }
            None => None,
        };
        let model_hash = self.model_hash(&req.model, &req.open, req.vae.as_ref())?;
        let job_metadata = plan::run_metadata(req, model, &job, &rt, model_hash.as_deref(), names);
        let run = Run {
            req,
            job: &job,
            rt: &rt,
            job_metadata: &job_metadata,
            device_label: &self.config.device_label,
            names,
        };

        // The images, in batches of what fits; image g of the job takes seed + g whatever its
        // batch, each prompt a job of `params.n` images.
        let request = &req.params;
        for (j, prompt) in req.prompts.iter().enumerate() {
            if req.prompts.len() > 1 {
                events(Event::Log(&format!("Prompt {} of {}: {prompt}", j + 1, req.prompts.len())));
            }
            for start in (0..request.n).step_by(job.per_batch) {
                cancel.check()?;
                let first = j * request.n + start;
                let part = Request {
                    prompt: prompt.clone(),
                    n: job.per_batch.min(request.n - start),
                    seed: request.seed + first as u64,
                    ..request.clone()
                };
                let mut progress = |p: Progress| events(Event::Pipeline(p));
                let mut generation = match &img2img_request {
                    Some(r) => img2img(
                        model,
                        &Img2ImgRequest {
                            request: part.clone(),
                            init_image: r.init_image.clone(),
                            strength: r.strength,
                        },
                        &rt,
                        &mut progress,
                    )?,
                    None => txt2img_with_refiner(model, refiner, &part, &rt, &mut progress)?,
                };
                // The passes after the image is made: each upscaling step, then its hires pass with
                // the options of its own plan (it runs at another size).
                let mut size = job.first_size;
                for (step, &(stage, prefix)) in job.upscales.iter().zip(&UPSCALE_STEPS) {
                    upscale(&mut generation, size, step.factor, stage, &rt, &mut progress)?;
                    size = step.size;
                    if let Some(h) = &step.hires {
                        let hires_rt = Runtime { options: h.options, ..rt.clone() };
                        let images = &generation.images;
                        let pass = hires_pass(model, &part, &h.settings, images, prefix, &hires_rt, &mut progress)?;
                        generation = generation.followed_by(pass);
                    }
                }
                for w in &mut generation.warnings {
                    *w = render(w, &names);
                }
                for w in &generation.warnings {
                    events(Event::Warning(&format!("⚠️  WARNING: {w}")));
                }
                for f in &generation.failures {
                    events(Event::Warning(&format!("⚠️  WARNING: recovered from running out of memory: {f}")));
                }
                on_batch(run.batch(j, first, &part, generation))?;
            }
        }
        Ok(())
    }

    /// The model `source` with `vae` in place of its own, from the cache or opened now.
    fn open(
        &mut self,
        source: &ModelSource,
        options: &OpenOptions,
        vae: Option<&ModelSource>,
        events: &mut dyn FnMut(Event),
    ) -> Result<OpenedModel> {
        let key = ModelKey { source: source.clone(), vae: vae.cloned(), config_from: options.config_from.clone() };
        if let Some(m) = self.models.get(&key) {
            return Ok(m.clone());
        }
        let folder = match vae {
            None => source.open_with(&self.config.hub, options, &mut |p| events(Event::Download(p)))?,
            Some(vae) => {
                let model = self.open(source, options, None, events)?.folder;
                model.with_vae(&self.vae_dir(vae, events)?)?
            }
        };
        Ok(self.models.insert(key, folder).clone())
    }

    /// The refiner `source` for `base`'s runs. One that continues the base's latents decodes
    /// them: a `vae` replaces its VAE too (as diffusers' fp16-fix recipe passes `vae=` to both
    /// pipelines); one of another latent space (after SD 3.5) keeps its own, which encodes and
    /// decodes its half.
    fn open_refiner(
        &mut self,
        base: &ModelFolder,
        source: &ModelSource,
        vae: Option<&ModelSource>,
        events: &mut dyn FnMut(Event),
    ) -> Result<ModelFolder> {
        let about = |e| Error::about("refiner", e);
        let options = OpenOptions::default();
        let refiner = self.open(source, &options, None, events).map_err(about)?.folder;
        match refiner_vae(base, &refiner, vae) {
            Some(vae) => Ok(self.open(source, &options, Some(vae), events).map_err(about)?.folder),
            None => Ok(refiner),
        }
    }

    /// `model` with `loras` fused in (a copy: the cached model stays plain), each file found
    /// (a hub repository fetched) and checked against the model; `None` without LoRAs.
    fn attach_loras(
        &self,
        model: &ModelFolder,
        loras: &[LoraRequest],
        events: &mut dyn FnMut(Event),
    ) -> Result<Option<ModelFolder>> {
        if loras.is_empty() {
            return Ok(None);
        }
        let mut files = Vec::with_capacity(loras.len());
        for lora in loras {
            let file = match &lora.source {
                ModelSource::Path(p) if p.is_file() => LoraFile::new(p, lora.scale),
                ModelSource::Path(p) => {
                    return Err(Error::invalid(
                        "lora",
                        format!(
                        "{}: no such file; pass a LoRA .safetensors file or a hub repository (org/name) holding one",
                        p.display()
                    ),
                    ))
                }
                ModelSource::Repo { repo, .. } => {
                    let path =
                        crate::hub::fetch_lora(&self.config.hub, repo, "main", &mut |p| events(Event::Download(p)))?;
                    // Named after the repo: its file is often diffusers' generic name.
                    let name = repo.rsplit('/').next().unwrap_or(repo).to_string();
                    LoraFile { name, ..LoraFile::new(path, lora.scale) }
                }
            };
            files.push(file);
        }
        let model = model.clone().with_loras(&files)?;
        for (applied, request) in model.loras().applied.iter().zip(loras) {
            let modules: Vec<String> = applied.modules.iter().map(|(c, n)| format!("{n} in the {c}")).collect();
            events(Event::Log(&format!(
                "LoRA {} ({}, {} format) at scale {}: {} modules fused ({})",
                applied.name,
                request.source.label(),
                applied.format,
                applied.scale,
                applied.modules.values().sum::<usize>(),
                modules.join(", ")
            )));
        }
        Ok(Some(model))
    }

    /// The folder of a `--vae`: a path as given, a hub repository fetched.
    fn vae_dir(&self, vae: &ModelSource, events: &mut dyn FnMut(Event)) -> Result<std::path::PathBuf> {
        match vae {
            ModelSource::Path(p) => Ok(p.clone()),
            ModelSource::Repo { repo, .. } => {
                crate::hub::fetch_component(&self.config.hub, repo, "main", &mut |p| events(Event::Download(p)))
            }
        }
    }

    /// A1111's `Model hash` of an opened model that is a checkpoint file, computed once.
    fn model_hash(
        &mut self,
        source: &ModelSource,
        options: &OpenOptions,
        vae: Option<&ModelSource>,
    ) -> Result<Option<String>> {
        let Some(file) = plan::checkpoint_file(source) else { return Ok(None) };
        let key = ModelKey { source: source.clone(), vae: vae.cloned(), config_from: options.config_from.clone() };
        let hash = match self.models.get(&key).and_then(|m| m.model_hash.clone()) {
            Some(h) => h,
            None => crate::output::model_hash(file)?,
        };
        if let Some(m) = self.models.get(&key) {
            m.model_hash = Some(hash.clone());
        }
        Ok(Some(hash))
    }
}

/// The VAE a job's `vae` gives its refiner: the request's where the refiner continues `base`'s
/// latents and decodes them (as diffusers' fp16-fix recipe passes `vae=` to both pipelines);
/// none for a refiner of another latent space, which keeps its own.
pub fn refiner_vae<'v>(
    base: &ModelFolder,
    refiner: &ModelFolder,
    vae: Option<&'v ModelSource>,
) -> Option<&'v ModelSource> {
    vae.filter(|_| refiner.family().handoff_from(base.family()) == Some(Handoff::Latents))
}

/// Ends the warm store's job when the job ends, whichever way.
struct JobWarmth(WarmWeights);

impl Drop for JobWarmth {
    fn drop(&mut self) {
        self.0.end_job();
    }
}

/// What every batch of a job shares, for making its images' metadata.
struct Run<'a> {
    req: &'a GenerateRequest,
    job: &'a plan::JobPlan,
    rt: &'a Runtime,
    job_metadata: &'a serde_json::Map<String, serde_json::Value>,
    device_label: &'a str,
    /// How the caller names fields in the warnings the images record.
    names: FieldNames,
}

impl Run<'_> {
    /// The batch of images `first..` of the job made for `request` by prompt `prompt_index`.
    fn batch(&self, prompt_index: usize, first: usize, request: &Request, generation: Generation) -> Batch {
        let (req, job) = (self.req, self.job);
        let mut extra = self.job_metadata.clone();
        extra.insert("memory".into(), plan::to_json(&generation.memory));
        // With warm weights: which stages loaded theirs and which reused them.
        if !generation.weights.is_empty() {
            extra.insert("weight_use".into(), plan::to_json(&generation.weights));
        }
        // The encoders that did not run (SD 3.5's T5 with --no-t5 or in a folder without it).
        if !generation.settings.skipped_encoders.is_empty() {
            extra.insert("skipped_encoders".into(), plan::to_json(&generation.settings.skipped_encoders));
        }
        if let Some(r) = &generation.refinement {
            let mut r = r.clone();
            // The model as the user named it (a hub repo, not its cache folder).
            if let Some(refiner) = &req.refiner {
                r.model = refiner.source.label();
            }
            extra.insert("refiner".into(), plan::to_json(&r));
        }
        let warnings: Vec<String> = generation
            .warnings
            .iter()
            .cloned()
            .chain(job.warnings.iter().cloned())
            .chain(job.plan.warning.clone())
            .chain(job.refiner_plan.as_ref().and_then(|p| p.warning.clone()))
            .chain(job.hires_plans().filter_map(|p| p.warning.clone()))
            .map(|w| render(&w, &self.names))
            .collect();
        let images = generation
            .images
            .into_iter()
            .map(|image| {
                let index = first + image.index;
                let metadata = ImageMetadata {
                    model: req.model.label(),
                    pipeline_type: job.pipeline_type.clone(),
                    memory_optimizations: generation.options_used.names().join(","),
                    warnings: warnings.clone(),
                    failures: generation.failures.clone(),
                    prompt: request.prompt.clone(),
                    negative_prompt: request.negative_prompt.clone().unwrap_or_default(),
                    seed: image.seed,
                    batch_index: index,
                    steps: generation.settings.steps,
                    guidance: generation.settings.guidance,
                    scheduler: generation.settings.scheduler.to_string(),
                    width: job.output_size.0,
                    height: job.output_size.1,
                    device: self.device_label.to_string(),
                    dtype: format!("{:?}", self.rt.dtype).to_lowercase(),
                    timings_ms: generation.timings_ms.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    extra: extra.clone(),
                };
                FinishedImage { index, image, metadata }
            })
            .collect();
        Batch {
            prompt_index,
            job_images: req.image_count(),
            images,
            settings: generation.settings,
            output_size: job.output_size,
            timings_ms: generation.timings_ms,
            warnings: generation.warnings,
            job_metadata: self.job_metadata.clone(),
        }
    }
}

/// `1 image`, `3 images`.
pub fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod warm_tests;
