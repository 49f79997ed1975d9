//! Text-to-image for the SD 1.5 family, step for step as diffusers' `StableDiffusionPipeline`.

use sdgen_models::unet::UNetConfig;
use sdgen_models::vae::VaeConfig;

use super::stages::{decode, denoise, encode_prompts, into_images, stage, StageLog};
use super::{resolve, scheduler_config, Generation, Progress, Request, Runtime};
use crate::loading::ModelFolder;
use crate::rng::batch::BatchNoise;
use crate::rng::TorchNoise;
use crate::schedulers;
use crate::Result;

/// Runs a whole generation: encode the prompts, denoise, decode.
pub fn txt2img(
    model: &ModelFolder,
    req: &Request,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation> {
    let settings = resolve(model, req)?;
    let mut log = StageLog::default();
    let mut warnings = Vec::new();
    let cfg_guidance = settings.guidance > 1.0;

    // 1. Encode the prompts.
    let context = stage("text_encoder", progress, &mut log, rt, |rt, progress| {
        encode_prompts(model, req, cfg_guidance, rt, &mut warnings, progress)
    })?;

    // 2. Timesteps.
    let scheduler_cfg = scheduler_config(model)?;
    let build_scheduler = || schedulers::build(settings.scheduler, &scheduler_cfg, settings.steps);
    let scheduler = build_scheduler()?;

    // 3. Initial noise: one generator per image, seeded `seed + i`, drawn on the CPU in the
    //    embeddings' dtype exactly as torch does, so each image equals diffusers' for its seed.
    //    The same generators then go to the scheduler, whose ancestral steps draw from them as
    //    diffusers' do (`generator=` reaches both `prepare_latents` and `scheduler.step`).
    let vae_cfg: VaeConfig = model.config("vae", "config.json")?;
    let unet_cfg: UNetConfig = model.config("unet", "config.json")?;
    let f = vae_cfg.scale_factor();
    let mut generators = BatchNoise::for_batch_with_noise(req.seed, req.n, TorchNoise::from_env()?);
    let shape = [req.n, unet_cfg.in_channels, settings.height / f, settings.width / f];
    let latents = (generators.randn(&shape, rt.dtype, &rt.device)? * scheduler.init_noise_sigma())?;

    // 4. Denoise.
    // A retried stage starts again from a fresh scheduler and the generators' state before it.
    let latents = stage("unet", progress, &mut log, rt, |rt, progress| {
        denoise(
            model,
            &unet_cfg,
            build_scheduler()?.as_mut(),
            0,
            latents.clone(),
            &context,
            settings.guidance,
            &mut generators.clone(),
            rt,
            progress,
        )
    })?;

    // 5. Decode.
    let pixels =
        stage("vae", progress, &mut log, rt, |rt, progress| decode(model, &vae_cfg, latents.clone(), rt, progress))?;
    let images = into_images(&pixels, req, &settings)?;
    Ok(log.into_generation(images, settings, warnings))
}
