//! `generate`: the SD-Generate command line. A thin `main` around [`run`], which validates the
//! arguments, resolves them once into a request and a runtime, and reports errors as one line
//! with their whole chain.

mod args;
mod check;
mod models;
mod progress;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use sdgen::loading::ModelFolder;
use sdgen::output::{save_image_to, ImageMetadata};
use sdgen::pipeline::{
    img2img, resolve_image_refiner, resolve_img2img, txt2img_with_refiner, Generation, Img2ImgRequest, Img2ImgSettings,
    RefinerRun, Request, Settings,
};
use sdgen_memory::plan::Plan;

use args::{Args, Resolved};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", chain(&err));
            let user_error = err.downcast_ref::<sdgen::Error>().is_some_and(sdgen::Error::is_user_error);
            ExitCode::from(if user_error { 2 } else { 1 })
        }
    }
}

/// `a: b: c` for an error and its causes, skipping a cause its parent's message already quotes.
fn chain(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in err.chain() {
        let text = e.to_string();
        if !parts.last().is_some_and(|p| p.ends_with(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

fn run() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if args.no_fast_kernels {
        sdgen::kernels::set_fast_kernels(false);
    }
    if args.list_models {
        let mut hub = sdgen::hub::HubOptions::from_env();
        hub.offline = true;
        return models::list(&hub);
    }
    let mut resolved = args.resolve()?;
    // GPU memory probe and pool trim for the memory manager (nothing to install on the CPU).
    let _device_memory = sdgen::device_memory::DeviceMemory::install(&resolved.runtime.device);
    progress::set_quiet(args.quiet);
    progress::set_verbose(args.verbose);
    progress::memory("Startup");
    if args.check {
        return check::run(&resolved, args.json);
    }
    // Prove the output usable before any model is loaded, so a typo costs nothing, and create
    // nothing yet: a refused run leaves no folder behind (the first save makes it).
    let all_images = resolved.request.n * resolved.prompts.len();
    resolved.output.check(all_images)?;
    let mut bar = progress::Reporter::new();
    let (model, refiner_model) = open_models(&resolved, &mut bar)?;
    // How the refiner takes over (from the base's latents or its images) is the rows' to say.
    let refiner = match (&refiner_model, &resolved.refiner) {
        (Some(m), Some(r)) => Some(RefinerRun::choose(&model, m, r.start, r.strength)?),
        _ => None,
    };
    let img2img_request = resolved.img2img.take().map(|(init_image, strength)| Img2ImgRequest {
        request: resolved.request.clone(),
        init_image,
        strength,
    });
    let job = plan_job(&model, refiner.as_ref(), img2img_request.as_ref(), &mut resolved)?;
    let extra = run_metadata(&resolved, &job, img2img_request.as_ref())?;
    let mut saver = Saver { resolved: &resolved, job: &job, extra: &extra, outputs: Vec::new(), first: None };
    // The images, in batches of what fits, each saved as soon as it is made (an interrupted run
    // keeps what it finished); image i keeps seed + i whatever its batch.
    // Each prompt is a job of `request.n` images; image g of the run takes seed + g.
    let request = &resolved.request;
    for (j, prompt) in resolved.prompts.iter().enumerate() {
        if resolved.prompts.len() > 1 {
            progress::log(&format!("Prompt {} of {}: {prompt}", j + 1, resolved.prompts.len()));
        }
        for start in (0..request.n).step_by(job.per_batch) {
            let first = j * request.n + start;
            let mut part = request.clone();
            part.prompt = prompt.clone();
            part.n = job.per_batch.min(request.n - start);
            part.seed = request.seed + first as u64;
            let generation = match &img2img_request {
                Some(req) => img2img(
                    &model,
                    &Img2ImgRequest {
                        request: part.clone(),
                        init_image: req.init_image.clone(),
                        strength: req.strength,
                    },
                    &resolved.runtime,
                    &mut |p| bar.report(p),
                )?,
                None => txt2img_with_refiner(&model, refiner, &part, &resolved.runtime, &mut |p| bar.report(p))?,
            };
            bar.finish();
            saver.save(first, all_images, &part, generation)?;
        }
    }
    if args.json {
        saver.print_json()?;
    }
    // The seed's completion point: everything dropped, memory returned, final state logged.
    drop(saver);
    drop(model);
    sdgen_memory::cleanup_memory(true);
    progress::memory("Complete");
    Ok(ExitCode::SUCCESS)
}

/// Opens (downloading where needed) the model with its `--vae`, and the refiner, so a wrong one is
/// refused before any weight loads.
fn open_models(
    resolved: &Resolved,
    bar: &mut progress::Reporter,
) -> anyhow::Result<(ModelFolder, Option<ModelFolder>)> {
    let mut model = resolved.model.open_with(&resolved.hub, &resolved.open, &mut |p| bar.download(p))?;
    bar.finish();
    let vae_dir = match &resolved.vae {
        Some(sdgen::loading::ModelSource::Path(p)) => Some(p.clone()),
        Some(sdgen::loading::ModelSource::Repo { repo, .. }) => {
            let dir = sdgen::hub::fetch_component(&resolved.hub, repo, "main", &mut |p| bar.download(p))?;
            bar.finish();
            Some(dir)
        }
        None => None,
    };
    if let Some(dir) = &vae_dir {
        model = model.with_vae(dir)?;
    }
    let Some(args::RefinerArgs { source, .. }) = &resolved.refiner else { return Ok((model, None)) };
    let mut refiner = source
        .open_with(&resolved.hub, &sdgen::loading::OpenOptions::default(), &mut |p| bar.download(p))
        .map_err(|e| anyhow::Error::new(e).context("--refiner"))?;
    bar.finish();
    // A refiner that continues the base's latents decodes them: a --vae replaces its VAE too (as
    // diffusers' fp16-fix recipe passes `vae=` to both pipelines). One of another latent space
    // (after SD 3.5) keeps its own, which encodes and decodes its half.
    let shares_latents = refiner.family().handoff_from(model.family()) == Some(sdgen::pipeline::Handoff::Latents);
    if let Some(dir) = vae_dir.as_ref().filter(|_| shares_latents) {
        refiner = refiner.with_vae(dir).map_err(|e| anyhow::Error::new(e).context("--refiner"))?;
    }
    Ok((model, Some(refiner)))
}

/// What a run will do, decided from the weights' headers and the memory available before any
/// weight is read.
struct Job {
    img2img: Option<Img2ImgSettings>,
    plan: Plan,
    refiner_plan: Option<Plan>,
    /// Images per batch: what fits both halves with a refiner.
    per_batch: usize,
    /// diffusers' pipeline class, as the sidecar records it.
    pipeline_type: String,
}

/// Validates the request, plans it (refusing a run that cannot fit, with the numbers and what
/// would help), prints the plan and installs its memory options in the runtime.
fn plan_job(
    model: &ModelFolder,
    refiner: Option<&RefinerRun>,
    img2img_request: Option<&Img2ImgRequest>,
    resolved: &mut Resolved,
) -> anyhow::Result<Job> {
    let request = &resolved.request;
    let (settings, img2img_settings) = match img2img_request {
        Some(req) => {
            let s = resolve_img2img(model, req)?;
            (s.settings.clone(), Some(s))
        }
        None => (sdgen::pipeline::resolve(model, request)?, None),
    };
    let from = match (img2img_request, &img2img_settings) {
        (Some(req), Some(s)) => format!(
            " from {} (strength {}: the last {} of {} steps)",
            req.init_image.name, s.strength, s.denoising_steps, settings.steps
        ),
        _ => String::new(),
    };
    progress::log(&format!(
        "Generating {} with {} ({}) at {}x{}, {} steps, {} scheduler, guidance {}, seed {}{from}",
        plural(request.n, "image"),
        model.family().display,
        resolved.model.label(),
        settings.width,
        settings.height,
        settings.steps,
        settings.scheduler,
        settings.guidance,
        request.seed
    ));
    let plan_for = |m: &ModelFolder, settings: &Settings, img2img: bool| {
        let (device, dtype) = (&resolved.runtime.device, resolved.runtime.dtype);
        sdgen::planning::plan_run(m, settings, request.n, img2img, device, dtype, resolved.memory)
    };
    let plan = plan_for(model, &settings, img2img_request.is_some())?;
    log_plan(&plan, resolved.batch_size);
    let mut options = sdgen::planning::stage_options(model, &plan, &settings, false)?;
    // The refiner runs after the base is unloaded: its stages are planned on their own (with its
    // VAE encoder when it takes the base's images), and the run takes the leaner of both plans'
    // options where they share one.
    let refiner_plan = match refiner {
        Some(run) => {
            let (r_model, r_settings, takes_images) = match run {
                RefinerRun::Latents(r) => (r.model, settings.clone(), false),
                RefinerRun::Image(r) => {
                    let s = resolve_image_refiner(model, r, request)?;
                    progress::log(&format!(
                        "Then refining with {} ({}) from the decoded images: strength {} (the last {} of {} steps), \
                         {} scheduler, guidance {}",
                        r.model.family().display,
                        resolved.refiner.as_ref().map_or(String::new(), |a| a.source.label()),
                        s.strength,
                        s.denoising_steps,
                        s.settings.steps,
                        s.settings.scheduler,
                        s.settings.guidance
                    ));
                    (r.model, s.settings, true)
                }
            };
            let p =
                plan_for(r_model, &r_settings, takes_images).map_err(|e| anyhow::Error::new(e).context("--refiner"))?;
            log_plan(&p, resolved.batch_size);
            let o = sdgen::planning::stage_options(r_model, &p, &r_settings, false)?;
            options.attention_slice = match (options.attention_slice, o.attention_slice) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            options.vae_slicing |= o.vae_slicing;
            options.vae_tile_px = options.vae_tile_px.or(o.vae_tile_px);
            options.text_encoder_on_host |= o.text_encoder_on_host;
            Some(p)
        }
        None => None,
    };
    if progress::verbose() {
        progress::log(&format!("Kernels: {}", sdgen::kernels::kernel_summary(&resolved.runtime.device)));
        let enabled = options.enabled();
        progress::log(&format!(
            "Memory options: {}",
            if enabled.is_empty() { "none".into() } else { enabled.join(", ") }
        ));
    }
    resolved.runtime.options = options;
    let per_batch = refiner_plan
        .as_ref()
        .map_or(plan.images_per_batch, |p| p.images_per_batch.min(plan.images_per_batch))
        .clamp(1, request.n);
    // diffusers names its image-to-image classes by inserting "Img2Img" before "Pipeline"
    // (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline).
    let family_type = model.family().pipeline_type;
    let pipeline_type = if img2img_request.is_some() && !family_type.contains("Img2Img") {
        family_type.replacen("Pipeline", "Img2ImgPipeline", 1)
    } else {
        family_type.to_string()
    };
    Ok(Job { img2img: img2img_settings, plan, refiner_plan, per_batch, pipeline_type })
}

/// Prints a plan, its warning, and why batches are smaller than `--batch-size` asked.
fn log_plan(plan: &Plan, batch_size: usize) {
    for line in plan.to_string().lines() {
        progress::log(line);
    }
    if plan.batch_split() {
        progress::log(&format!(
            "--batch-size {batch_size} does not fit in the memory available: {} at a time",
            plural(plan.images_per_batch, "image")
        ));
    }
    if let Some(w) = &plan.warning {
        progress::warn(w);
    }
}

/// `1 image`, `3 images`.
pub(crate) fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The sidecar fields every image of the run shares.
fn run_metadata(
    resolved: &Resolved,
    job: &Job,
    img2img_request: Option<&Img2ImgRequest>,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut extra = serde_json::Map::new();
    extra.insert("plan".into(), serde_json::to_value(&job.plan)?);
    // Which kernels made the image: a wrong image reported with "stock" rules our kernels out.
    extra.insert("kernels".into(), sdgen::kernels::kernel_summary(&resolved.runtime.device).into());
    if let Some(p) = &job.refiner_plan {
        extra.insert("refiner_plan".into(), serde_json::to_value(p)?);
    }
    if let Some(vae) = &resolved.vae {
        extra.insert("vae".into(), vae.label().into());
    }
    // A1111's `Model hash` is a checkpoint file's (folders and hub repos have none to give).
    if let sdgen::loading::ModelSource::Path(path) = &resolved.model {
        if path.is_file() {
            extra.insert("model_hash".into(), sdgen::output::model_hash(path)?.into());
        }
    }
    let o = &resolved.request.family_options;
    if let Some(len) = o.max_sequence_length {
        extra.insert("max_sequence_length".into(), len.into());
    }
    if let Some(slg) = &o.skip_layer_guidance {
        let value = serde_json::json!({"layers": slg.layers, "scale": slg.scale, "start": slg.start, "stop": slg.stop});
        extra.insert("skip_layer_guidance".into(), value);
    }
    if let (Some(req), Some(s)) = (img2img_request, &job.img2img) {
        extra.insert("init_image".into(), req.init_image.name.clone().into());
        extra.insert("strength".into(), s.strength.into());
    }
    Ok(extra)
}

/// Saves each batch's images as it finishes and collects what `--json` reports.
struct Saver<'a> {
    resolved: &'a Resolved,
    job: &'a Job,
    extra: &'a serde_json::Map<String, serde_json::Value>,
    outputs: Vec<serde_json::Value>,
    /// The first batch's settings, timings and warnings, for `--json`.
    first: Option<(Settings, std::collections::BTreeMap<String, f64>, Vec<String>)>,
}

impl Saver<'_> {
    /// Logs the batch's warnings and writes its images (images `start..` of the run's `all`, made
    /// for `request`) with their sidecars.
    fn save(&mut self, start: usize, all: usize, request: &Request, generation: Generation) -> anyhow::Result<()> {
        for w in &generation.warnings {
            progress::warn(&format!("⚠️  WARNING: {w}"));
        }
        for f in &generation.failures {
            progress::warn(&format!("⚠️  WARNING: recovered from running out of memory: {f}"));
        }
        let (resolved, job) = (self.resolved, self.job);
        let mut extra = self.extra.clone();
        extra.insert("memory".into(), serde_json::to_value(&generation.memory)?);
        // The encoders that did not run (SD 3.5's T5 with --no-t5 or in a folder without it).
        if !generation.settings.skipped_encoders.is_empty() {
            extra.insert("skipped_encoders".into(), serde_json::to_value(&generation.settings.skipped_encoders)?);
        }
        if let Some(r) = &generation.refinement {
            let mut r = r.clone();
            // The model as the user named it (a hub repo, not its cache folder).
            if let Some(refiner) = &resolved.refiner {
                r.model = refiner.source.label();
            }
            extra.insert("refiner".into(), serde_json::to_value(&r)?);
        }
        let warnings: Vec<String> = generation
            .warnings
            .iter()
            .cloned()
            .chain(job.plan.warning.clone())
            .chain(job.refiner_plan.as_ref().and_then(|p| p.warning.clone()))
            .collect();
        for image in &generation.images {
            let index = start + image.index;
            let meta = ImageMetadata {
                model: resolved.model.label(),
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
                width: generation.settings.width,
                height: generation.settings.height,
                device: resolved.device_label.clone(),
                dtype: format!("{:?}", resolved.runtime.dtype).to_lowercase(),
                timings_ms: generation.timings_ms.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                extra: extra.clone(),
            };
            let saved = save_image_to(&resolved.output, index, all, &meta, &image.rgb8)?;
            progress::log(&format!("Saved {}", saved.png_path.display()));
            self.outputs.push(serde_json::json!({
                "png": saved.png_path,
                "metadata": saved.json_path,
                "seed": image.seed,
            }));
        }
        if self.first.is_none() {
            self.first = Some((generation.settings, generation.timings_ms, generation.warnings));
        }
        Ok(())
    }

    /// The `--json` result: one document on stdout.
    fn print_json(&self) -> anyhow::Result<()> {
        let Some((settings, timings_ms, warnings)) = &self.first else { return Ok(()) };
        let mut result = serde_json::json!({
            "images": self.outputs,
            "model": self.resolved.model.label(),
            "steps": settings.steps,
            "guidance": settings.guidance,
            "scheduler": settings.scheduler.to_string(),
            "width": settings.width,
            "height": settings.height,
            "timings_ms": timings_ms,
            "warnings": warnings,
        });
        for (k, v) in self.extra {
            result[k] = v.clone();
        }
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &result)?;
        writeln!(out)?;
        Ok(())
    }
}
