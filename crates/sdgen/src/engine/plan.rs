//! What a job will do, decided from the weights' headers and the memory available before any
//! weight is read: its settings, its memory plan (and the refiner's), the options its stages run
//! with, the images per batch, and the metadata every image of the job shares.
//!
//! [`plan`] is the whole decision for opened models, the one the engine runs before a job: a
//! server asks it before queueing a job, so a job is refused there exactly when the engine would
//! refuse it.

use sdgen_memory::plan::{Placement, Plan};

use super::{plural, Event, GenerateRequest};
use crate::error::field::{BATCH_SIZE, MAX_MEMORY, REFINER, STEPS, WEIGHTS};
use crate::error::FieldNames;
use crate::loading::quantise::Quantise;
use crate::loading::{ModelFolder, ModelSource};
use crate::pipeline::{
    resolve_hires, resolve_image_refiner, resolve_img2img, Img2ImgRequest, Img2ImgSettings, JobStage, RefinerRun,
    Runtime, Settings, StageOptions, WeightKey,
};
use crate::planning::MemoryRequest;
use crate::Result;

/// A job, planned: every pass's memory plan (each with its verdict), the options its stages run
/// with, its batches and sizes.
#[derive(Debug)]
pub struct JobPlan {
    /// The image-to-image settings (strength, steps skipped) of an image-to-image job.
    pub img2img: Option<Img2ImgSettings>,
    /// The base's memory plan.
    pub plan: Plan,
    /// The refiner's, planned on its own: it runs after the base is unloaded.
    pub refiner_plan: Option<Plan>,
    /// The options every stage runs with: the leaner of both plans' where they share one.
    pub options: StageOptions,
    /// Images per batch: what fits both halves with a refiner.
    pub per_batch: usize,
    /// diffusers' pipeline class, as the sidecar records it.
    pub pipeline_type: String,
    /// The upscaling steps after the first pass, in order, each with its hires pass.
    pub upscales: Vec<UpscalePlan>,
    /// The first pass's size.
    pub first_size: (usize, usize),
    /// What the request asks that the model is not made for (steps past a distilled model's),
    /// said before the run and recorded with the images.
    pub warnings: Vec<String>,
    /// The size of the images the job hands back (the first pass's, upscaled).
    pub output_size: (usize, usize),
    /// The weights the planner quantised because nothing fit at full precision: the job runs
    /// the model with them.
    pub weights: Option<Quantise>,
}

/// One upscaling step of a job, planned.
#[derive(Debug)]
pub struct UpscalePlan {
    /// Each side multiplied by this.
    pub factor: u32,
    /// The size it leaves.
    pub size: (usize, usize),
    /// The hires pass after it.
    pub hires: Option<HiresPlan>,
}

/// A hires pass, planned on its own at its size (it runs alone, so the first pass keeps its own
/// options).
#[derive(Debug)]
pub struct HiresPlan {
    /// Its settings (its tiles with MultiDiffusion).
    pub settings: Img2ImgSettings,
    /// The options of its plan.
    pub options: StageOptions,
    /// Its memory plan.
    pub plan: Plan,
}

/// One pass of a job, as [`JobPlan::passes`] lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The first pass: the model's text-to-image or image-to-image run.
    Base,
    /// The refiner's, after the base is unloaded.
    Refiner,
    /// The hires pass after upscaling step `i` (from 0).
    Hires(usize),
}

impl JobPlan {
    /// The hires passes' plans, in order.
    pub fn hires_plans(&self) -> impl Iterator<Item = &Plan> {
        self.upscales.iter().filter_map(|u| u.hires.as_ref().map(|h| &h.plan))
    }

    /// Every pass's memory plan, in the order they run, each planned on its own (the one before
    /// is unloaded) with its verdict.
    pub fn passes(&self) -> Vec<(Pass, &Plan)> {
        let hires =
            self.upscales.iter().enumerate().filter_map(|(i, u)| u.hires.as_ref().map(|h| (Pass::Hires(i), &h.plan)));
        std::iter::once((Pass::Base, &self.plan))
            .chain(self.refiner_plan.as_ref().map(|p| (Pass::Refiner, p)))
            .chain(hires)
            .collect()
    }
}

/// A job made ready to run: the models as it runs them and its plan.
pub(super) struct Ready<'r> {
    /// The base quantised as the request asks (`weights`), where it does.
    pub quantised: Option<ModelFolder>,
    /// How the refiner takes over, with a refiner.
    pub refiner: Option<RefinerRun<'r>>,
    /// The image-to-image request, for an image-to-image job.
    pub img2img: Option<Img2ImgRequest>,
    /// The plan.
    pub job: JobPlan,
}

/// Plans `req` on its opened models as the engine plans it before it loads a weight: `model`
/// with the request's VAE and LoRAs attached, `refiner` the refiner (with its VAE) when the
/// request has one. Everything that can refuse the job before it runs is here — the preset
/// against the model, the quantisation, the refiner's handoff, each pass's settings, each
/// pass's memory plan (the planner's refusal is [`crate::Error::DoesNotFit`], a later pass's
/// about its field) — and the lines the engine logs for it go to `events`.
pub fn plan(
    model: &ModelFolder,
    refiner: Option<&ModelFolder>,
    req: &GenerateRequest,
    rt: &Runtime,
    events: &mut dyn FnMut(Event),
) -> Result<JobPlan> {
    Ok(ready(model, refiner, req, rt, events)?.job)
}

/// [`plan`], keeping what the run needs beside the plan.
pub(super) fn ready<'r>(
    model: &ModelFolder,
    refiner: Option<&'r ModelFolder>,
    req: &GenerateRequest,
    rt: &Runtime,
    events: &mut dyn FnMut(Event),
) -> Result<Ready<'r>> {
    if let Some(preset) = &req.preset {
        crate::presets::check_model(preset, model.family())?;
    }
    let quantised = req.open.weights.map(|q| model.clone().with_quantise(Some(q))).transpose()?;
    let model = quantised.as_ref().unwrap_or(model);
    // How the refiner takes over (from the base's latents or its images) is the rows' to say.
    let refiner = match (refiner, &req.refiner) {
        (Some(m), Some(r)) => Some(RefinerRun::choose(model, m, r.start, r.strength)?),
        _ => None,
    };
    let img2img = req.img2img.as_ref().map(|i| Img2ImgRequest {
        request: req.params.clone(),
        init_image: i.image.clone(),
        strength: i.strength,
    });
    let job = plan_job(model, refiner.as_ref(), img2img.as_ref(), req, rt, events)?;
    Ok(Ready { quantised, refiner, img2img, job })
}

/// A warning when `steps` is past what a distilled model is made for (`RunDefaults::max_steps`).
pub(super) fn steps_warning(model: &ModelFolder, name: &str, steps: usize) -> Option<String> {
    let defaults = model.run_defaults();
    let max = defaults.max_steps.filter(|&max| steps > max)?;
    Some(format!(
        "{name} is distilled for at most {max} steps; {steps} take longer and make a worse image, not a better one \
         (its default is {}: leave {STEPS} out)",
        defaults.steps
    ))
}

/// Validates the request against the models, plans it (refusing a job that cannot fit, with the
/// numbers and what would help) and reports what it will do.
fn plan_job(
    model: &ModelFolder,
    refiner: Option<&RefinerRun>,
    img2img_request: Option<&Img2ImgRequest>,
    req: &GenerateRequest,
    rt: &Runtime,
    events: &mut dyn FnMut(Event),
) -> Result<JobPlan> {
    let request = &req.params;
    let all = req.image_count();
    let (settings, img2img_settings) = match img2img_request {
        Some(r) => {
            let s = resolve_img2img(model, r)?;
            (s.settings.clone(), Some(s))
        }
        None => (crate::pipeline::resolve(model, request)?, None),
    };
    let from = match (img2img_request, &img2img_settings) {
        (Some(r), Some(s)) => format!(
            " from {} (strength {}: the last {} of {} steps)",
            r.init_image.name, s.strength, s.denoising_steps, settings.steps
        ),
        _ => String::new(),
    };
    let warnings: Vec<String> = steps_warning(model, &req.model.label(), settings.steps).into_iter().collect();
    for w in &warnings {
        events(Event::Warning(&format!("⚠️  WARNING: {w}")));
    }
    events(Event::Log(&format!(
        "Generating {} with {} ({}) at {}x{}, {} steps, {} scheduler, guidance {}, seed {}{from}",
        plural(all, "image"),
        model.family().display,
        req.model.label(),
        settings.width,
        settings.height,
        settings.steps,
        settings.scheduler,
        settings.guidance,
        request.seed
    )));
    // Planned as if no weight were warm: warm ones the plan needs the room of are evicted.
    let memory = MemoryRequest { warm_bytes: rt.warm_bytes(), ..req.memory };
    let plan_for = |m: &ModelFolder, settings: &Settings, img2img: bool| {
        crate::planning::plan_run(m, settings, request.n, img2img, &rt.device, rt.dtype, memory)
    };
    let batch_size = req.memory.max_images_per_batch.unwrap_or(request.n);
    let plan = plan_for(model, &settings, img2img_request.is_some())?;
    report_plan(&plan, batch_size, events);
    report_streaming(&plan, settings.steps, events);
    // The planner's last rung quantised the weights: the rest of the job plans and runs with them.
    let weights = plan.quantised.as_ref().map(|q| q.weights.parse::<Quantise>()).transpose();
    let weights = weights.map_err(crate::Error::InvalidInput)?;
    let quantised = weights.map(|q| model.clone().with_quantise(Some(q))).transpose()?;
    let model = quantised.as_ref().unwrap_or(model);
    let mut options = crate::planning::stage_options(model, &plan, &settings, false)?;
    // The refiner runs after the base is unloaded: its stages are planned on their own (with its
    // VAE encoder when it takes the base's images), and the run takes the leaner of both plans'
    // options where they share one.
    let refiner_plan = match refiner {
        Some(run) => {
            let (r_model, r_settings, takes_images) = match run {
                RefinerRun::Latents(r) => (r.model, settings.clone(), false),
                RefinerRun::Image(r) => {
                    let s = resolve_image_refiner(model, r, request)?;
                    events(Event::Log(&format!(
                        "Then refining with {} ({}) from the decoded images: strength {} (the last {} of {} steps), \
                         {} scheduler, guidance {}",
                        r.model.family().display,
                        req.refiner.as_ref().map_or(String::new(), |a| a.source.label()),
                        s.strength,
                        s.denoising_steps,
                        s.settings.steps,
                        s.settings.scheduler,
                        s.settings.guidance
                    )));
                    (r.model, s.settings, true)
                }
            };
            let p = plan_for(r_model, &r_settings, takes_images).map_err(|e| crate::Error::about("refiner", e))?;
            only_at_full_precision(&p, "refiner", "the refiner", |_| format!("or run without {REFINER}"))?;
            report_plan(&p, batch_size, events);
            options = options.merged(crate::planning::stage_options(r_model, &p, &r_settings, false)?);
            Some(p)
        }
        None => None,
    };
    // Upscaling, each step followed by its hires pass: resolved and planned on its own at the
    // upscaled size (the planner decides its VAE tiling); batches are what fits every pass.
    let first_size = (settings.width, settings.height);
    let mut output_size = first_size;
    let mut upscales = Vec::new();
    for step in upscale_steps(model, request, first_size, &req.upscale)? {
        let (f, (w, h)) = (step.factor, step.size);
        output_size = step.size;
        events(Event::Log(&format!("Then upscaling ×{f} with Lanczos to {w}x{h}")));
        let hires = match step.hires {
            Some(s) => {
                events(Event::Log(&format!(
                    "Then a hires image-to-image pass at {w}x{h}: strength {} (the last {} of {} steps){}",
                    s.strength, s.denoising_steps, s.settings.steps, step.tiles
                )));
                let p = plan_for(model, &s.settings, true).map_err(|e| crate::Error::about("hires_strength", e))?;
                only_at_full_precision(&p, "hires_strength", "the hires pass", |w| {
                    format!("pass {WEIGHTS} {w} to run the whole job so, or upscale without it")
                })?;
                report_plan(&p, batch_size, events);
                let options = crate::planning::stage_options(model, &p, &s.settings, false)?;
                Some(HiresPlan { settings: s, options, plan: p })
            }
            None => None,
        };
        upscales.push(UpscalePlan { factor: f, size: step.size, hires });
    }
    events(Event::Detail(&format!("Kernels: {}", crate::kernels::kernel_summary(&rt.device))));
    let enabled = options.enabled();
    events(Event::Detail(&format!(
        "Memory options: {}",
        if enabled.is_empty() { "none".into() } else { enabled.join(", ") }
    )));
    let per_batch = (refiner_plan.iter().chain(upscales.iter().filter_map(|u| u.hires.as_ref().map(|h| &h.plan))))
        .fold(plan.images_per_batch, |n, p| n.min(p.images_per_batch))
        .clamp(1, request.n);
    // diffusers names its image-to-image classes by inserting "Img2Img" before "Pipeline"
    // (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline).
    let family_type = model.family().pipeline_type;
    let pipeline_type = if img2img_request.is_some() && !family_type.contains("Img2Img") {
        family_type.replacen("Pipeline", "Img2ImgPipeline", 1)
    } else {
        family_type.to_string()
    };
    Ok(JobPlan {
        img2img: img2img_settings,
        plan,
        refiner_plan,
        options,
        per_batch,
        pipeline_type,
        upscales,
        first_size,
        warnings,
        output_size,
        weights,
    })
}

/// One step of a job's upscale chain, resolved before anything is planned.
#[derive(Debug)]
pub struct UpscaleStep {
    /// Each side multiplied by this.
    pub factor: u32,
    /// The size it leaves.
    pub size: (usize, usize),
    /// The settings of the hires pass after it, if any.
    pub hires: Option<Img2ImgSettings>,
    /// How that pass is denoised, for messages: `", denoised in 2×2 tiles … (MultiDiffusion)"`
    /// for a tiled pass, empty otherwise.
    pub tiles: String,
}

/// The steps of `upscale` after a first pass of `first` size, each hires pass resolved at its
/// upscaled size (a tiled one's denoiser at its tile's size): what the engine plans and runs,
/// and what `generate --check` plans.
pub fn upscale_steps(
    model: &ModelFolder,
    request: &crate::pipeline::Request,
    first: (usize, usize),
    upscale: &[super::UpscaleRequest],
) -> Result<Vec<UpscaleStep>> {
    let mut size = first;
    upscale
        .iter()
        .map(|u| {
            let f = u.factor as usize;
            size = (size.0 * f, size.1 * f);
            let (w, h) = size;
            let hires =
                u.hires_strength.map(|strength| resolve_hires(model, request, w, h, strength, u.tiled)).transpose()?;
            let tiles = match hires.as_ref().and_then(|s| s.settings.denoise_tiles) {
                Some(t) => format!(", denoised in {} (MultiDiffusion)", t.layout_px(w, h).describe()),
                None => String::new(),
            };
            Ok(UpscaleStep { factor: u.factor, size, hires, tiles })
        })
        .collect()
}

/// Refuses a later pass's plan (the refiner's, a hires pass's) that fits only with quantised
/// weights: the planner quantises the job's first pass alone (its model is the one the job then
/// runs), so such a pass would run over the budget.
fn only_at_full_precision(
    plan: &Plan,
    field: &'static str,
    what: &str,
    instead: impl Fn(&str) -> String,
) -> Result<()> {
    match &plan.quantised {
        Some(q) => Err(crate::Error::about(
            field,
            crate::Error::DoesNotFit(format!(
                "{what} fits in the memory available only with the weights quantised to {}, which the planner does \
                 for the first pass alone: give more {MAX_MEMORY}, {}",
                q.weights,
                instead(&q.weights)
            )),
        )),
        None => Ok(()),
    }
}

/// The job's stages as the warm store sees them, every plan's (the base's, the refiner's with
/// its model, each hires pass's), each with the weights it loads and their bytes. A stage on the
/// host of a GPU (its weights are not in the budget's pool) or of several components (one figure
/// for all) lists none: its weights are never kept.
pub(super) fn warm_stages(
    model: &ModelFolder,
    refiner: Option<&ModelFolder>,
    job: &JobPlan,
    rt: &Runtime,
) -> Result<Vec<JobStage>> {
    let base = std::iter::once((model, &job.plan, ""));
    let refined = job.refiner_plan.iter().zip(refiner).map(|(p, m)| (m, p, "refiner "));
    let hires = job.hires_plans().map(|p| (model, p, "hires "));
    let mut stages = Vec::new();
    for (m, plan, pass) in base.chain(refined).chain(hires) {
        for s in &plan.stages {
            let loads = match (s.placement, s.components.as_slice()) {
                (Placement::Device, [component]) => {
                    let dtype = crate::planning::dtype(s.precision);
                    vec![(WeightKey::new(m, component, dtype, &rt.device)?, s.weight_bytes)]
                }
                _ => Vec::new(),
            };
            stages.push(JobStage {
                name: format!("{pass}{}", s.stage),
                peak_bytes: s.device_bytes(),
                usable_bytes: plan.usable_bytes,
                loads,
            });
        }
    }
    Ok(stages)
}

/// Reports a plan, its warning, and why batches are smaller than the batch size asked for.
fn report_plan(plan: &Plan, batch_size: usize, events: &mut dyn FnMut(Event)) {
    for line in plan.to_string().lines() {
        events(Event::Log(line));
    }
    if plan.batch_split() {
        events(Event::Log(&format!(
            "{BATCH_SIZE} {batch_size} does not fit in the memory available: {} at a time",
            plural(plan.images_per_batch, "image")
        )));
    }
    if let Some(w) = &plan.warning {
        events(Event::Warning(w));
    }
}

/// What block streaming adds to the run: each streamed stage's expected time per evaluation
/// over the denoiser's `steps` per batch (the encoders run once a batch).
fn report_streaming(plan: &Plan, steps: usize, events: &mut dyn FnMut(Event)) {
    if let Some(q) = &plan.quantised {
        let evaluations = plan.batch_count * steps;
        events(Event::Log(&format!(
            "Quantised weights: the denoiser runs on {} weights, about {:.0} s more over {}",
            q.weights,
            (q.expected_ms_per_forward * evaluations as u64) as f64 / 1000.0,
            plural(evaluations, "evaluation")
        )));
    }
    for s in &plan.stages {
        let Some(st) = s.options.streaming else { continue };
        let evaluations = plan.batch_count * if s.stage == "denoise" { steps } else { 1 };
        events(Event::Log(&format!(
            "Block streaming: {} keeps {} of {} blocks resident and streams {} per evaluation: about {:.0} s more over \
             {}",
            s.stage,
            st.resident_blocks,
            st.blocks,
            sdgen_memory::plan::format_bytes(st.streamed_bytes),
            (st.expected_ms_per_forward * evaluations as u64) as f64 / 1000.0,
            plural(evaluations, "evaluation")
        )));
    }
}

/// The sidecar fields every image of the job shares; the plans' warnings name fields as `names`
/// does.
pub(super) fn run_metadata(
    req: &GenerateRequest,
    model: &ModelFolder,
    job: &JobPlan,
    rt: &Runtime,
    model_hash: Option<&str>,
    names: FieldNames,
) -> serde_json::Map<String, serde_json::Value> {
    let plan_json = |p: &Plan| to_json(&crate::planning::named(p.clone(), &names));
    let mut extra = serde_json::Map::new();
    extra.insert("plan".into(), plan_json(&job.plan));
    // Which kernels made the image: a wrong image reported with "stock" rules our kernels out.
    extra.insert("kernels".into(), crate::kernels::kernel_summary(&rt.device).into());
    // The CPU's stages (and a GPU run's host work) take as long as the threads they had.
    extra.insert("cpu_threads".into(), crate::kernels::cpu_threads().into());
    if let Some(p) = &job.refiner_plan {
        extra.insert("refiner_plan".into(), plan_json(p));
    }
    if let Some(vae) = &req.vae {
        extra.insert("vae".into(), vae.label().into());
    }
    // The LoRAs as given (a hub repository, not its cache file) and what each changed; A1111's
    // `<lora:name:scale>` prompt tags are made from these.
    if !model.loras().is_empty() {
        let loras: Vec<serde_json::Value> = model
            .loras()
            .applied
            .iter()
            .zip(&req.loras)
            .map(|(l, r)| {
                serde_json::json!({
                    "name": l.name, "source": r.source.label(), "scale": l.scale, "format": l.format,
                    "modules": l.modules, "file_bytes": l.file_bytes,
                })
            })
            .collect();
        extra.insert("loras".into(), loras.into());
    }
    // Quantised weights: `--weights`, an fp8 file's, or a GGUF's types (how many tensors each).
    if let Some(q) = model.quantise() {
        extra.insert("weights".into(), q.name().into());
    } else if model.checkpoint().is_some_and(|c| c.fp8_tensors() > 0) {
        extra.insert("weights".into(), crate::loading::quantise::Quantise::Fp8.name().into());
    } else if let Some(c) = model.checkpoint().filter(|c| c.is_gguf()) {
        let mut types = std::collections::BTreeMap::<&str, usize>::new();
        for t in c.header.tensors.values() {
            *types.entry(t.dtype.as_str()).or_default() += 1;
        }
        extra.insert("weights".into(), serde_json::json!({ "gguf": types }));
    }
    // A1111's `Model hash` is a checkpoint file's (folders and hub repos have none to give).
    if let Some(hash) = model_hash {
        extra.insert("model_hash".into(), hash.into());
    }
    // How the prompt was read, where not the default: A1111's `Clip skip` is made from this.
    let prompt = req.params.prompt_options;
    if let Some(skip) = prompt.clip_skip {
        extra.insert("clip_skip".into(), skip.into());
    }
    if prompt.style == crate::prompt::PromptStyle::Diffusers {
        extra.insert("prompt_style".into(), "diffusers".into());
    }
    let o = &req.params.family_options;
    if let Some(len) = o.max_sequence_length {
        extra.insert("max_sequence_length".into(), len.into());
    }
    if let Some(slg) = &o.skip_layer_guidance {
        let value = serde_json::json!({"layers": slg.layers, "scale": slg.scale, "start": slg.start, "stop": slg.stop});
        extra.insert("skip_layer_guidance".into(), value);
    }
    if let (Some(i), Some(s)) = (&req.img2img, &job.img2img) {
        extra.insert("init_image".into(), i.image.name.clone().into());
        extra.insert("strength".into(), s.strength.into());
    }
    if let Some(name) = &req.preset {
        extra.insert("preset".into(), name.clone().into());
    }
    // One hires pass's plan as `hires_plan`; a chain's (`4k-ultra`) as `hires_plans`, in order.
    match job.hires_plans().collect::<Vec<_>>().as_slice() {
        [] => {}
        [one] => {
            extra.insert("hires_plan".into(), plan_json(one));
        }
        all => {
            extra.insert("hires_plans".into(), all.iter().map(|p| plan_json(p)).collect());
        }
    }
    if let Some(passes) = passes(job) {
        extra.insert("passes".into(), passes);
    }
    extra
}

/// The passes of a job with more than the first, in order, with the size each leaves:
/// `generate` (its steps), `upscale` (factor, filter), `hires` (strength, steps run of the
/// schedule's). A1111's `Hires …`/`Postprocess …` fields are made from these.
fn passes(job: &JobPlan) -> Option<serde_json::Value> {
    if job.upscales.is_empty() {
        return None;
    }
    let (w, h) = job.first_size;
    let mut passes = vec![serde_json::json!({"pass": "generate", "width": w, "height": h})];
    for u in &job.upscales {
        let (w, h) = u.size;
        passes.push(serde_json::json!({
            "pass": "upscale", "factor": u.factor, "filter": "lanczos", "width": w, "height": h,
        }));
        if let Some(HiresPlan { settings: s, .. }) = &u.hires {
            let mut pass = serde_json::json!({
                "pass": "hires", "strength": s.strength, "steps": s.settings.steps,
                "denoising_steps": s.denoising_steps, "width": w, "height": h,
            });
            // MultiDiffusion's tiles, in latent cells and in pixels.
            if let Some(t) = s.settings.denoise_tiles {
                pass["tiles"] = serde_json::json!({
                    "method": "MultiDiffusion", "count": t.layout_px(w, h).tiles.len(), "tile_latents": t.tile,
                    "overlap_latents": t.overlap, "tile_px": t.tile * t.scale, "overlap_px": t.overlap * t.scale,
                });
            }
            passes.push(pass);
        }
    }
    Some(passes.into())
}

/// The checkpoint file a model source names, whose hash A1111's metadata records.
pub(super) fn checkpoint_file(source: &ModelSource) -> Option<&std::path::Path> {
    match source {
        ModelSource::Path(path) if path.is_file() => Some(path),
        _ => None,
    }
}

/// A plain-data value (plans, memory records) as JSON: string keys and finite numbers only, so
/// it cannot fail.
pub(super) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("plain data serializes")
}

#[cfg(test)]
mod tests {
    use sdgen_memory::plan::{
        plan, Blocks, Budget, BudgetSource, ComponentManifest, FamilyProfile, ModelManifest, PlanRequest,
        QuantisedWeights, StoredDType, TensorEntry, QUANTISED_KINDS,
    };

    use super::only_at_full_precision;
    use crate::error::field::WEIGHTS;

    /// A later pass whose plan fits only with quantised weights is refused naming the field, the
    /// weights and what to do; a plan at full precision passes.
    #[test]
    fn a_later_pass_that_fits_only_quantised_is_refused() {
        let t = |name: &str, n: usize| TensorEntry::new(name, vec![n, 1024], StoredDType::F32);
        let m = ModelManifest::new(vec![
            ComponentManifest::new("text_encoder", vec![t("w.weight", 16)]),
            ComponentManifest::new(
                "unet",
                (0..64).map(|i| t(&format!("down_blocks.0.w{i}.weight"), 16 << 10)).collect(),
            ),
            ComponentManifest::new("vae", vec![t("encoder.w.weight", 16), t("decoder.w.weight", 16)]),
        ]);
        let mut q8 = m.clone();
        for w in &mut q8.components[1].tensors {
            w.held = Some(Blocks { elements: 32, bytes: 34 });
        }
        let p = FamilyProfile::sd15();
        // 4 GB of f32 UNet in a 3 GB budget; its Q8_0 blocks take 1.1 GB.
        let request = PlanRequest {
            quantised: vec![QuantisedWeights { kind: &QUANTISED_KINDS[0], manifest: q8 }],
            ..PlanRequest::new(&p, &m, 512, 512, Budget::new(3 << 30, BudgetSource::MaxMemory))
        };
        let quantised = plan(&request).unwrap();
        let e = only_at_full_precision(&quantised, "hires_strength", "the hires pass", |w| format!("{WEIGHTS} {w}"))
            .unwrap_err();
        assert_eq!(e.field(), Some("hires_strength"));
        let text = e.describe(&|f| (f == "weights").then_some("--weights"));
        assert!(
            text.contains("the hires pass fits") && text.contains("quantised to q8") && text.contains("--weights q8"),
            "{text}"
        );
        let roomy = PlanRequest { budget: Budget::new(64 << 30, BudgetSource::MaxMemory), ..request };
        assert!(only_at_full_precision(&plan(&roomy).unwrap(), "refiner", "the refiner", |_| String::new()).is_ok());
    }
}
