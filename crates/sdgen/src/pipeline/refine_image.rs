//! Refining by image, for a base whose latents the refiner cannot read (SD 3.5's 16-channel
//! space; the SDXL refiner reads SDXL's 4): the base runs all its steps and decodes, the whole
//! base pipeline is unloaded, and the refiner encodes the images with its own VAE and reworks
//! them by image-to-image at a strength. Step for step as diffusers'
//! `StableDiffusion3Pipeline(..., output_type="pt")` followed by
//! `StableDiffusionXLImg2ImgPipeline(image=..., strength=...)`, each call with generators seeded
//! `seed + i` (`tools/reference/make_sd3_refiner.py`).
//!
//! - The handoff is the float image in [0, 1] (`output_type="pt"`), not 8-bit: nothing is lost
//!   to rounding between the halves. The refiner's image processor maps it to `2x − 1`.
//! - The refiner is a pipeline call of its own: the request's steps, guidance and scheduler where
//!   given, else its own defaults (the SDXL refiner: 50 steps, guidance 5, its Euler config),
//!   since SD 3.5's (28 steps at guidance 3.5, Turbo's 4 at 0, flow matching) are no settings
//!   for it; the base's size, prompts and seeds; none of the base family's options (T5,
//!   skip-layer guidance).
//! - Its strength defaults to the refiner row's image-to-image default (0.3 for SDXL's, diffusers'
//!   `StableDiffusionXLImg2ImgPipeline` default): it re-noises the image to that level and
//!   denoises the last `int(steps × strength)` steps.

use sdgen_models::vae::VaeConfig;

use super::img2img::{img2img_stages, skipped_steps_for};
use super::stages::{before_models, decode, into_images, memory_point, stage, StageLog};
use super::txt2img::{base_latents, refiner_handoff, Refinement};
use super::{resolve, FamilyOptions, Generation, Img2ImgSettings, Progress, Request, Runtime, Settings};
use crate::error::field::{REFINER_STRENGTH, STEPS};
use crate::loading::family::Handoff;
use crate::loading::ModelFolder;
use crate::{Error, Result};

/// A refiner to finish a text-to-image run from the base's decoded images.
#[derive(Debug, Clone, Copy)]
pub struct ImageRefiner<'a> {
    /// The refiner model (a family that refines the base's runs, in another latent space).
    pub model: &'a ModelFolder,
    /// How much of each image it reworks, in [0, 1]: the last `int(steps × strength)` steps of
    /// its schedule; `None` is the refiner's image-to-image default
    /// ([`FamilySpec::default_strength`](crate::loading::FamilySpec::default_strength): 0.3).
    pub strength: Option<f64>,
}

/// The refiner's request: the base's prompts, batch, seed and size (`base`'s); steps, guidance
/// and scheduler as `req` asks, else the refiner's own defaults; no family options, no clip skip
/// (an SD 1.5 setting; the prompt style carries over).
fn refiner_request(req: &Request, base: &Settings) -> Request {
    Request {
        width: Some(base.width),
        height: Some(base.height),
        family_options: FamilyOptions::default(),
        prompt_options: crate::prompt::PromptOptions { clip_skip: None, ..req.prompt_options },
        ..req.clone()
    }
}

/// Checks that `refiner` finishes `model`'s runs from their images and resolves its half before
/// anything loads: its settings, strength and the steps it runs. Errors are `InvalidInput`
/// naming `--refiner` or `--refiner-strength`.
pub fn resolve_image_refiner(model: &ModelFolder, refiner: &ImageRefiner, req: &Request) -> Result<Img2ImgSettings> {
    let r = refiner.model;
    if refiner_handoff(model, r)? != Handoff::Image {
        return Err(Error::invalid(
            "refiner",
            format!(
                "{} continues the latents of {} ({}) mid-schedule, not its decoded images",
                r.root().display(),
                model.root().display(),
                model.family().display
            ),
        ));
    }
    let strength = refiner.strength.unwrap_or(r.family().default_strength);
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::invalid(
            "refiner_strength",
            format!("{strength} is outside [0, 1] (0 keeps the base's image, 1 replaces it entirely)"),
        ));
    }
    let base = resolve(model, req)?;
    let settings = resolve(r, &refiner_request(req, &base)).map_err(|e| match e {
        e @ (Error::InvalidInput(_) | Error::Invalid { .. }) => {
            Error::About { field: "refiner", value: Some(r.root().display().to_string()), source: Box::new(e) }
        }
        other => other,
    })?;
    let skipped = skipped_steps_for(r.family().schedule, settings.steps, strength).map_err(|_| {
        Error::invalid(
            "refiner_strength",
            format!(
                "{strength} with {} steps leaves the refiner no step to run: raise {REFINER_STRENGTH} or {STEPS}",
                settings.steps
            ),
        )
    })?;
    Ok(Img2ImgSettings { denoising_steps: settings.steps - skipped, settings, strength, skipped_steps: skipped })
}

/// Runs the base's whole text-to-image, unloads it, and refines its images with `refiner`.
pub fn txt2img_image_refined(
    model: &ModelFolder,
    refiner: &ImageRefiner,
    req: &Request,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation> {
    let plan = resolve_image_refiner(model, refiner, req)?;
    let settings = resolve(model, req)?;
    let mut log = StageLog::default();
    let mut warnings = Vec::new();

    let (before, warm_before) = (before_models(rt, progress), rt.warm_bytes());
    // 1.–4. The base's whole schedule.
    let (latents, base_steps) = base_latents(model, req, &settings, None, rt, &mut log, &mut warnings, progress)?;
    // 5. Its decode: `[n, h, w, 3]` in [0, 1], what `output_type="pt"` gives (channels last).
    let vae_cfg: VaeConfig = model.config("vae", "config.json")?;
    let pixels = stage("vae", progress, &mut log, rt, |rt, progress| {
        decode("vae", model, &vae_cfg, latents.clone(), rt, progress)
    })?;
    drop(latents);

    // 6. The whole base pipeline is unloaded (each stage dropped its model): return the memory
    //    at once, aggressively, as the seed does before loading the refiner.
    sdgen_memory::cleanup_memory(true);
    let after = memory_point(progress, "After main pipeline unload");
    let kept = rt.warm_bytes().saturating_sub(warm_before);
    let unload = super::stages::measure_unload(&before, after, super::txt2img::denoiser_bytes(model)?, kept);

    // 7. The refiner's image-to-image on each image: `VaeImageProcessor.preprocess` of a [0, 1]
    //    tensor is `2x − 1` (computed as torch does: the product, then the difference).
    let image = ((pixels.permute((0, 3, 1, 2))?.contiguous()? * 2.0)? - 1.0)?;
    drop(pixels);
    let refiner_req = refiner_request(req, &settings);
    let r = refiner.model;
    let refined = img2img_stages(r, &refiner_req, &plan, &image, "refiner_", rt, &mut log, &mut warnings, progress)?;
    memory_point(progress, "After refiner");

    let s = &plan.settings;
    let scheduler = super::build_scheduler(r, s.scheduler, s.steps, s.width, s.height)?;
    let first_step = plan.skipped_steps * scheduler.order();
    let refinement = Refinement {
        model: r.root().display().to_string(),
        pipeline_type: r.family().pipeline_type.to_string(),
        handoff: Handoff::Image,
        high_noise_fraction: None,
        strength: Some(plan.strength),
        steps: s.steps,
        guidance: s.guidance,
        scheduler: s.scheduler.to_string(),
        base_steps,
        refiner_steps: plan.denoising_steps,
        handoff_timestep: scheduler.timesteps().get(first_step).copied().unwrap_or(0.0),
        base_unloaded: unload.unloaded,
        base_resident_bytes: unload.resident_bytes,
        memory_after_unload: unload.memory_after,
    };
    let images = into_images(&refined, req, &settings)?;
    let mut generation = log.into_generation(images, settings, warnings);
    generation.refinement = Some(refinement);
    Ok(generation)
}
