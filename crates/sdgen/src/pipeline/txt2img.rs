//! Text-to-image, step for step as diffusers' `StableDiffusionPipeline` /
//! `StableDiffusionXLPipeline` / `StableDiffusion3Pipeline`, optionally finished by a refiner in
//! the way the family rows allow ([`FamilySpec::handoff_from`]):
//! - by latents, SDXL's base → refiner "ensemble of experts": the base denoises the high-noise
//!   part of the schedule (up to `denoising_end`), its latents are handed to the refiner
//!   (`StableDiffusionXLImg2ImgPipeline` with `denoising_start`), which finishes the schedule and
//!   decodes with its own VAE;
//! - by image, for a base whose latents the refiner cannot read (SD 3.5): see `refine_image.rs`.
//!
//! Either way the base's models are all dropped before the refiner's load (each stage drops its
//! model when it ends).

use sdgen_models::vae::VaeConfig;
use serde::Serialize;

use super::conditioning::{encode_prompts, ImageSize};
use super::refine_image::{txt2img_image_refined, ImageRefiner};
use super::stages::{decode, denoise, into_images, memory_point, stage, Guide, StageLog};
use super::{resolve, scheduler_config, Generation, Progress, Request, Runtime, Settings};
use crate::error::field::{REFINER_START, REFINER_STRENGTH};
use crate::loading::family::Handoff;
#[cfg(doc)]
use crate::loading::FamilySpec;
use crate::loading::ModelFolder;
use crate::rng::batch::BatchNoise;
use crate::rng::TorchNoise;
use crate::schedulers::{mul_scalar, SchedulerConfig};
use crate::{Error, Result};

/// diffusers' documented split for SDXL base + refiner: the base runs the first 80% of the
/// schedule (`denoising_end = 0.8`), the refiner the rest.
pub const DEFAULT_HIGH_NOISE_FRACTION: f64 = 0.8;

/// A refiner to finish a text-to-image run from the base's latents (see [`RefinerRun`] for both
/// ways).
#[derive(Debug, Clone, Copy)]
pub struct Refiner<'a> {
    /// The refiner model (a family that [`refines`](crate::loading::FamilySpec::refines) the
    /// base's, in the base's latent space).
    pub model: &'a ModelFolder,
    /// Where the base hands over, as a fraction of the schedule in (0, 1): the base's
    /// `denoising_end` and the refiner's `denoising_start`.
    pub high_noise_fraction: f64,
}

/// A refiner and how it takes over the base's run, as the family rows decide
/// ([`FamilySpec::handoff_from`]).
#[derive(Debug, Clone, Copy)]
pub enum RefinerRun<'a> {
    /// From the base's latents, mid-schedule (SDXL).
    Latents(Refiner<'a>),
    /// From the base's decoded images, by image-to-image (SD 3.5).
    Image(ImageRefiner<'a>),
}

impl<'a> RefinerRun<'a> {
    /// The way `refiner` finishes `model`'s runs, with the knob of that way: `start`, the handoff
    /// point of a latent handoff ([`DEFAULT_HIGH_NOISE_FRACTION`] when `None`), or `strength`, the
    /// image-to-image strength of an image handoff (the refiner's default when `None`). The knob
    /// of the other way is refused, naming the one that applies.
    pub fn choose(
        model: &ModelFolder,
        refiner: &'a ModelFolder,
        start: Option<f64>,
        strength: Option<f64>,
    ) -> Result<Self> {
        match refiner_handoff(model, refiner)? {
            Handoff::Latents => {
                if let Some(s) = strength {
                    return Err(Error::invalid(
                        "refiner_strength",
                        format!(
                            "{s}: {} hands the refiner its latents mid-schedule, so there is no \
                         finished image to rework; set the handoff point with {REFINER_START}",
                            model.family().display
                        ),
                    ));
                }
                let r = Refiner { model: refiner, high_noise_fraction: start.unwrap_or(DEFAULT_HIGH_NOISE_FRACTION) };
                check_refiner(model, &r)?;
                Ok(Self::Latents(r))
            }
            Handoff::Image => {
                if let Some(f) = start {
                    return Err(Error::invalid(
                        "refiner_start",
                        format!(
                            "{f}: {} runs all its steps and hands the refiner its decoded images \
                         (the refiner cannot read its latents); set how much the refiner reworks them with \
                         {REFINER_STRENGTH}",
                            model.family().display
                        ),
                    ));
                }
                Ok(Self::Image(ImageRefiner { model: refiner, strength }))
            }
        }
    }
}

/// What a refined run recorded about the refiner's half (for the metadata).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refinement {
    /// The refiner's folder.
    pub model: String,
    /// The refiner's pipeline, as `pipeline_type` names the base's.
    pub pipeline_type: String,
    /// How the refiner took over: from the base's latents or its decoded images.
    pub handoff: Handoff,
    /// Latents: the handoff point (`denoising_end` of the base, `denoising_start` of the refiner).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub high_noise_fraction: Option<f64>,
    /// Image: the image-to-image strength.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// The refiner's schedule length (the base's for latents).
    pub steps: usize,
    /// The refiner's guidance scale.
    pub guidance: f64,
    /// The refiner's scheduler.
    pub scheduler: String,
    /// Steps the base ran (of its `settings.steps`).
    pub base_steps: usize,
    /// Steps the refiner ran.
    pub refiner_steps: usize,
    /// The timestep at which the refiner took over.
    pub handoff_timestep: f64,
    /// The base pipeline was unloaded before the refiner loaded: measured, what was left in use
    /// (`base_resident_bytes`) under a quarter of the base denoiser's weights.
    pub base_unloaded: bool,
    /// In-use memory after the unload above what was in use before the base loaded (the
    /// device's on a GPU, the process's resident set otherwise).
    pub base_resident_bytes: u64,
    /// Memory once the base pipeline was unloaded, before the refiner loaded.
    pub memory_after_unload: sdgen_memory::MemoryInfo,
}

/// The bytes of `model`'s denoiser weights (what an unload must give back).
pub(super) fn denoiser_bytes(model: &ModelFolder) -> Result<u64> {
    Ok(model.weights(model.denoiser_component())?.weight_bytes())
}

/// diffusers' `discrete_timestep_cutoff`: `int(round(T - fraction · T))`, Python's rounding
/// (half to even).
fn timestep_cutoff(config: &SchedulerConfig, fraction: f64) -> f64 {
    let t = config.num_train_timesteps.unwrap_or(1000) as f64;
    (t - fraction * t).round_ties_even()
}

/// Runs a whole generation: encode the prompts, denoise, decode.
pub fn txt2img(
    model: &ModelFolder,
    req: &Request,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation> {
    txt2img_refined(model, None, req, rt, progress)
}

/// How `refiner` finishes `model`'s runs ([`FamilySpec::handoff_from`]); `InvalidInput` naming
/// both when it is no refiner or does not refine `model`'s family.
pub fn refiner_handoff(model: &ModelFolder, refiner: &ModelFolder) -> Result<Handoff> {
    let r = refiner.family();
    if r.refines.is_empty() {
        return Err(Error::invalid(
            "refiner",
            format!(
                "{} is {} ({}), not an SDXL refiner (a StableDiffusionXLImg2ImgPipeline with only \
             text_encoder_2, such as stabilityai/stable-diffusion-xl-refiner-1.0)",
                refiner.root().display(),
                r.display,
                refiner.pipeline_class()
            ),
        ));
    }
    r.handoff_from(model.family()).ok_or_else(|| {
        // The seed's short names (SDXL, SD 3.5 Large), from the requirement table.
        let bases: Vec<&str> =
            r.refines.iter().map(|b| b.memory_profile().requirement.requirement().display_name).collect();
        let bases = match bases.split_last() {
            Some((last, [])) => last.to_string(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => String::new(),
        };
        Error::invalid(
            "refiner",
            format!("refines {bases} base runs; {} is {}", model.root().display(), model.family().display),
        )
    })
}

/// Checks that `refiner` can finish `model`'s runs from their latents before anything is loaded.
pub fn check_refiner(model: &ModelFolder, refiner: &Refiner) -> Result<()> {
    let r = refiner.model;
    if refiner_handoff(model, r)? == Handoff::Image {
        return Err(Error::invalid(
            "refiner",
            format!(
                "{} cannot continue the latents of {} ({}), whose latent space is not its own: it refines \
             those runs from their decoded images",
                r.root().display(),
                model.root().display(),
                model.family().display
            ),
        ));
    }
    let f = refiner.high_noise_fraction;
    if !(f > 0.0 && f < 1.0) {
        return Err(Error::InvalidInput(format!("the refiner's handoff point {f} is not strictly between 0 and 1")));
    }
    let base_vae: VaeConfig = model.config("vae", "config.json")?;
    let refiner_vae: VaeConfig = r.config("vae", "config.json")?;
    let base_unet = model.denoiser_geometry()?;
    let refiner_unet = r.denoiser_geometry()?;
    let mismatch = |what: String| {
        Err(Error::invalid("refiner", format!("{} cannot continue from the base: {what}", r.root().display())))
    };
    if refiner_unet.in_channels != base_unet.out_channels {
        return mismatch(format!(
            "its UNet takes {}-channel latents, the base's makes {}",
            refiner_unet.in_channels, base_unet.out_channels
        ));
    }
    if refiner_vae.latent_channels != refiner_unet.out_channels {
        return mismatch(format!(
            "its VAE decodes {}-channel latents, its UNet makes {}",
            refiner_vae.latent_channels, refiner_unet.out_channels
        ));
    }
    if refiner_vae.scale_factor() != base_vae.scale_factor() {
        return mismatch(format!(
            "its VAE works at 1/{} scale, the base's at 1/{}",
            refiner_vae.scale_factor(),
            base_vae.scale_factor()
        ));
    }
    Ok(())
}

/// [`txt2img`], finished by `refiner` when given, from the base's latents or its images.
pub fn txt2img_with_refiner(
    model: &ModelFolder,
    refiner: Option<RefinerRun>,
    req: &Request,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation> {
    match refiner {
        Some(RefinerRun::Image(r)) => txt2img_image_refined(model, &r, req, rt, progress),
        Some(RefinerRun::Latents(r)) => txt2img_refined(model, Some(r), req, rt, progress),
        None => txt2img_refined(model, None, req, rt, progress),
    }
}

/// [`txt2img`], finished by `refiner` from the base's latents when given (SDXL).
pub fn txt2img_refined(
    model: &ModelFolder,
    refiner: Option<Refiner>,
    req: &Request,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation> {
    if let Some(r) = &refiner {
        check_refiner(model, r)?;
    }
    let settings = resolve(model, req)?;
    let mut log = StageLog::default();
    let mut warnings = Vec::new();
    let size = ImageSize { height: settings.height, width: settings.width };

    let (before, warm_before) = (super::stages::before_models(rt, progress), rt.warm_bytes());
    // 1.–4. Encode, draw the noise, denoise; with a refiner, up to the handoff point.
    let handoff = refiner.as_ref().map(|r| r.high_noise_fraction);
    let (latents, base_end) = base_latents(model, req, &settings, handoff, rt, &mut log, &mut warnings, progress)?;
    let vae_cfg: VaeConfig = model.config("vae", "config.json")?;

    let Some(refiner) = refiner else {
        // 5. Decode.
        let pixels = stage("vae", progress, &mut log, rt, |rt, progress| {
            decode("vae", model, &vae_cfg, latents.clone(), rt, progress)
        })?;
        let images = into_images(&pixels, req, &settings)?;
        return Ok(log.into_generation(images, settings, warnings));
    };

    // 5'. The refiner. Every base model is already dropped (each stage drops its own): return
    //     their memory at once, aggressively, as the seed does before loading the refiner.
    sdgen_memory::cleanup_memory(true);
    let after = memory_point(progress, "After main pipeline unload");
    let kept = rt.warm_bytes().saturating_sub(warm_before);
    let unloaded = super::stages::measure_unload(&before, after, denoiser_bytes(model)?, kept);
    let (pixels, refinement) =
        refine_latents(&refiner, latents, req, &settings, size, unloaded, rt, &mut log, &mut warnings, progress)?;
    memory_point(progress, "After refiner");
    let images = into_images(&pixels, req, &settings)?;
    let mut generation = log.into_generation(images, settings, warnings);
    generation.refinement = Some(Refinement { base_steps: base_end, ..refinement });
    Ok(generation)
}

/// Steps 1–4 of a text-to-image run, the base's part of a refined one: the prompts encoded, the
/// initial noise drawn and denoised up to `handoff` (a fraction of the schedule; all of it for
/// `None`). Returns the latents and the steps run.
#[allow(clippy::too_many_arguments)]
pub(super) fn base_latents(
    model: &ModelFolder,
    req: &Request,
    settings: &Settings,
    handoff: Option<f64>,
    rt: &Runtime,
    log: &mut StageLog,
    warnings: &mut Vec<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(candle_core::Tensor, usize)> {
    let cfg_guidance = super::classifier_free(model, settings.guidance)?;
    let size = ImageSize { height: settings.height, width: settings.width };
    // 1. Encode the prompts (one stage per text encoder).
    let cond = encode_prompts(model, req, cfg_guidance, size, "", rt, log, warnings, progress)?;

    // 2. Timesteps; with a latent handoff, the base stops at the handoff point.
    let scheduler_cfg = scheduler_config(model)?;
    let build_scheduler =
        || super::build_scheduler(model, settings.scheduler, settings.steps, settings.width, settings.height);
    let scheduler = build_scheduler()?;
    let timesteps = scheduler.timesteps().to_vec();
    let base_end = match handoff {
        Some(fraction) => {
            let cutoff = timestep_cutoff(&scheduler_cfg, fraction);
            timesteps.iter().filter(|&&t| t >= cutoff).count()
        }
        None => timesteps.len(),
    };

    // 3. Initial noise: one generator per image, seeded `seed + i`, drawn on the CPU in the
    //    embeddings' dtype exactly as torch does, so each image equals diffusers' for its seed.
    //    The same generators then go to the scheduler, whose ancestral steps draw from them as
    //    diffusers' do (`generator=` reaches both `prepare_latents` and `scheduler.step`).
    let vae_cfg: VaeConfig = model.config("vae", "config.json")?;
    let f = vae_cfg.scale_factor();
    let mut generators = BatchNoise::for_batch_with_noise(req.seed, req.n, TorchNoise::from_env()?);
    let shape = [req.n, model.family().latent_channels, settings.height / f, settings.width / f];
    let noise = generators.randn(&shape, rt.dtype, &rt.device)?;
    let latents = mul_scalar(&noise, scheduler.init_noise_sigma() as f32)?;

    // 4. Denoise.
    // A retried stage starts again from a fresh scheduler and the generators' state before it.
    let denoiser = model.denoiser_component();
    let latents = stage(denoiser, progress, log, rt, |rt, progress| {
        denoise(
            denoiser,
            model,
            build_scheduler()?.as_mut(),
            0..base_end,
            latents.clone(),
            &cond,
            &Guide::new(settings, req),
            &mut generators.clone(),
            rt,
            progress,
        )
    })?;
    Ok((latents, base_end))
}

/// The refiner's half of the ensemble: its prompts, the schedule from the handoff point on, its
/// VAE's decode. Returns the decoded pixels and the record (`base_steps` left for the caller).
#[allow(clippy::too_many_arguments)]
fn refine_latents(
    refiner: &Refiner,
    latents: candle_core::Tensor,
    req: &Request,
    settings: &Settings,
    size: ImageSize,
    unload: super::stages::Unload,
    rt: &Runtime,
    log: &mut StageLog,
    warnings: &mut Vec<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(candle_core::Tensor, Refinement)> {
    let model = refiner.model;
    let cfg_guidance = super::classifier_free(model, settings.guidance)?;
    let cond = encode_prompts(model, req, cfg_guidance, size, "refiner_", rt, log, warnings, progress)?;
    let scheduler_cfg = scheduler_config(model)?;
    let build_scheduler =
        || super::build_scheduler(model, settings.scheduler, settings.steps, settings.width, settings.height);
    let timesteps = build_scheduler()?.timesteps().to_vec();
    // get_timesteps(denoising_start): the steps below the cutoff (one more for a second-order
    // scheduler whose count is even), from `len - n` on; no noise is added to the latents.
    let cutoff = timestep_cutoff(&scheduler_cfg, refiner.high_noise_fraction);
    let mut n = timesteps.iter().filter(|&&t| t < cutoff).count();
    if build_scheduler()?.order() == 2 && n % 2 == 0 {
        n += 1;
    }
    let start = timesteps.len().saturating_sub(n);
    let vae_cfg: VaeConfig = model.config("vae", "config.json")?;
    // As a second pipeline call with `generator=` seeded the same: fresh generators.
    let generators = BatchNoise::for_batch_with_noise(req.seed, req.n, TorchNoise::from_env()?);
    let denoiser = format!("refiner_{}", model.denoiser_component());
    let latents = stage(&denoiser, progress, log, rt, |rt, progress| {
        denoise(
            &denoiser,
            model,
            build_scheduler()?.as_mut(),
            start..timesteps.len(),
            latents.clone(),
            &cond,
            &Guide { scale: settings.guidance, skip_layers: None, steps: settings.steps, tiles: None },
            &mut generators.clone(),
            rt,
            progress,
        )
    })?;
    drop(cond);
    let pixels =
        stage("vae", progress, log, rt, |rt, progress| decode("vae", model, &vae_cfg, latents.clone(), rt, progress))?;
    let refinement = Refinement {
        model: model.root().display().to_string(),
        pipeline_type: model.family().pipeline_type.to_string(),
        handoff: Handoff::Latents,
        high_noise_fraction: Some(refiner.high_noise_fraction),
        strength: None,
        steps: settings.steps,
        guidance: settings.guidance,
        scheduler: settings.scheduler.to_string(),
        base_steps: 0,
        refiner_steps: timesteps.len() - start,
        handoff_timestep: timesteps.get(start).copied().unwrap_or(0.0),
        base_unloaded: unload.unloaded,
        base_resident_bytes: unload.resident_bytes,
        memory_after_unload: unload.memory_after,
    };
    Ok((pixels, refinement))
}
