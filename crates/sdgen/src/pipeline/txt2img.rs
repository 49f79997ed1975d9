//! Text-to-image, step for step as diffusers' `StableDiffusionPipeline` /
//! `StableDiffusionXLPipeline`, and SDXL's base → refiner "ensemble of experts": the base
//! denoises the high-noise part of the schedule (up to `denoising_end`), its latents are handed
//! to the refiner (`StableDiffusionXLImg2ImgPipeline` with `denoising_start`), which finishes the
//! schedule and decodes with its own VAE. The base's models are all dropped before the refiner's
//! load (each stage drops its model when it ends).

use sdgen_models::vae::VaeConfig;
use serde::Serialize;

use super::conditioning::{encode_prompts, ImageSize};
use super::stages::{decode, denoise, into_images, memory_point, stage, Guide, StageLog};
use super::{resolve, scheduler_config, Generation, Progress, Request, Runtime, Settings};
use crate::loading::ModelFolder;
use crate::rng::batch::BatchNoise;
use crate::rng::TorchNoise;
use crate::schedulers::{mul_scalar, SchedulerConfig};
use crate::{Error, Result};

/// diffusers' documented split for SDXL base + refiner: the base runs the first 80% of the
/// schedule (`denoising_end = 0.8`), the refiner the rest.
pub const DEFAULT_HIGH_NOISE_FRACTION: f64 = 0.8;

/// A refiner to finish a text-to-image run.
#[derive(Debug, Clone, Copy)]
pub struct Refiner<'a> {
    /// The refiner model (a family that [`refines`](crate::loading::FamilySpec::refines) the
    /// base's).
    pub model: &'a ModelFolder,
    /// Where the base hands over, as a fraction of the schedule in (0, 1): the base's
    /// `denoising_end` and the refiner's `denoising_start`.
    pub high_noise_fraction: f64,
}

/// What a refined run recorded about the handoff (for the metadata).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refinement {
    /// The refiner's folder.
    pub model: String,
    /// The handoff point (`denoising_end` of the base, `denoising_start` of the refiner).
    pub high_noise_fraction: f64,
    /// Steps the base ran (of `settings.steps`).
    pub base_steps: usize,
    /// Steps the refiner ran.
    pub refiner_steps: usize,
    /// The timestep at which the refiner took over.
    pub handoff_timestep: f64,
    /// The base pipeline was unloaded before the refiner loaded.
    pub base_unloaded: bool,
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

/// Checks that `refiner` can finish `model`'s runs before anything is loaded.
pub fn check_refiner(model: &ModelFolder, refiner: &Refiner) -> Result<()> {
    let r = refiner.model;
    let Some(base_family) = r.family().refines else {
        return Err(Error::InvalidInput(format!(
            "--refiner {} is {} ({}), not an SDXL refiner (a StableDiffusionXLImg2ImgPipeline with only \
             text_encoder_2, such as stabilityai/stable-diffusion-xl-refiner-1.0)",
            r.root().display(),
            r.family().display,
            r.pipeline_class()
        )));
    };
    if base_family.name != model.family().name {
        return Err(Error::InvalidInput(format!(
            "--refiner refines SDXL base runs; {} is {}",
            model.root().display(),
            model.family().display
        )));
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
        Err(Error::InvalidInput(format!("--refiner {} cannot continue from the base: {what}", r.root().display())))
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

/// [`txt2img`], finished by `refiner` when given (SDXL only).
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
    let cfg_guidance = settings.guidance > 1.0;
    let size = ImageSize { height: settings.height, width: settings.width };

    super::stages::before_models(rt, progress);
    // 1. Encode the prompts (one stage per text encoder).
    let cond = encode_prompts(model, req, cfg_guidance, size, false, rt, &mut log, &mut warnings, progress)?;

    // 2. Timesteps; with a refiner, the base stops at the handoff point.
    let scheduler_cfg = scheduler_config(model)?;
    let build_scheduler =
        || super::build_scheduler(model, settings.scheduler, settings.steps, settings.width, settings.height);
    let scheduler = build_scheduler()?;
    let timesteps = scheduler.timesteps().to_vec();
    let base_end = match &refiner {
        Some(r) => {
            let cutoff = timestep_cutoff(&scheduler_cfg, r.high_noise_fraction);
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
    let latents = stage(denoiser, progress, &mut log, rt, |rt, progress| {
        denoise(
            denoiser,
            model,
            build_scheduler()?.as_mut(),
            0..base_end,
            latents.clone(),
            &cond,
            &Guide::new(&settings, req),
            &mut generators.clone(),
            rt,
            progress,
        )
    })?;
    drop(cond);

    let Some(refiner) = refiner else {
        // 5. Decode.
        let pixels = stage("vae", progress, &mut log, rt, |rt, progress| {
            decode(model, &vae_cfg, latents.clone(), rt, progress)
        })?;
        let images = into_images(&pixels, req, &settings)?;
        return Ok(log.into_generation(images, settings, warnings));
    };

    // 5'. The refiner. Every base model is already dropped (each stage drops its own): return
    //     their memory at once, aggressively, as the seed does before loading the refiner.
    sdgen_memory::cleanup_memory(true);
    memory_point(progress, "After main pipeline unload");
    let (pixels, refinement) =
        refine_latents(&refiner, latents, req, &settings, size, rt, &mut log, &mut warnings, progress)?;
    memory_point(progress, "After refiner");
    let images = into_images(&pixels, req, &settings)?;
    let mut generation = log.into_generation(images, settings, warnings);
    generation.refinement = Some(Refinement { base_steps: base_end, ..refinement });
    Ok(generation)
}

/// The refiner's half of the ensemble: its prompts, the schedule from the handoff point on, its
/// VAE's decode. Returns the decoded pixels.
#[allow(clippy::too_many_arguments)]
fn refine_latents(
    refiner: &Refiner,
    latents: candle_core::Tensor,
    req: &Request,
    settings: &Settings,
    size: ImageSize,
    rt: &Runtime,
    log: &mut StageLog,
    warnings: &mut Vec<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(candle_core::Tensor, Refinement)> {
    let model = refiner.model;
    let cfg_guidance = settings.guidance > 1.0;
    let cond = encode_prompts(model, req, cfg_guidance, size, true, rt, log, warnings, progress)?;
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
            &Guide { scale: settings.guidance, skip_layers: None, steps: settings.steps },
            &mut generators.clone(),
            rt,
            progress,
        )
    })?;
    drop(cond);
    let pixels =
        stage("vae", progress, log, rt, |rt, progress| decode(model, &vae_cfg, latents.clone(), rt, progress))?;
    let refinement = Refinement {
        model: model.root().display().to_string(),
        high_noise_fraction: refiner.high_noise_fraction,
        base_steps: 0,
        refiner_steps: timesteps.len() - start,
        handoff_timestep: timesteps.get(start).copied().unwrap_or(0.0),
        base_unloaded: true,
    };
    Ok((pixels, refinement))
}
