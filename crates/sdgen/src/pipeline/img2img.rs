//! Image-to-image for the SD 1.5 family, step for step as diffusers'
//! `StableDiffusionImg2ImgPipeline`: the init image is resized (PIL Lanczos) and encoded by the
//! VAE, noised to the level of a later timestep, and denoised from there. `strength` picks that
//! timestep: 1 starts from (almost) pure noise, small values keep the picture.
//!
//! What has to match diffusers for the same seed to give the same image:
//! - the timesteps: `init_timestep = min(int(steps · strength), steps)`,
//!   `t_start = max(steps − init_timestep, 0)`, and the loop runs over the scheduler's
//!   `timesteps[t_start · order:]` (PNDM's list has one more entry than `steps`, so it runs one
//!   more model call, as in diffusers);
//! - the random draws, all from the per-image generators seeded `seed + i`: first image i's VAE
//!   `latent_dist.sample(generator[i])` (for every i), then the noise `add_noise` mixes in, then
//!   the ancestral noise of the loop;
//! - the latents: `scaling_factor · sample`, noised by [`Scheduler::add_noise`] at the first
//!   timestep of the loop.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdgen_models::vae::VaeConfig;

use super::conditioning::{encode_prompts, ImageSize};
use super::stages::{decode, denoise, into_images, load_vae, stage, vae_options, Guide, StageLog, VaePart};
use super::{resolve, Generation, Progress, Request, Runtime, Settings};
use crate::error::field::{HEIGHT, STEPS, STRENGTH, WIDTH};
use crate::image_io::{load_rgb, resize_lanczos, RgbImage};
use crate::loading::ModelFolder;
use crate::rng::batch::BatchNoise;
use crate::rng::TorchNoise;
use crate::schedulers::mul_scalar;
use crate::schedulers::{self, ScheduleKind, Scheduler};
use crate::{Error, Result};

/// diffusers' default `strength` for SD 1.5 (`StableDiffusionImg2ImgPipeline`).
pub const DEFAULT_STRENGTH: f64 = 0.8;

/// The starting picture of an image-to-image run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InitImage {
    /// How the image is named in messages (its path, for a file).
    pub name: String,
    /// The decoded pixels.
    pub image: RgbImage,
}

impl InitImage {
    /// Reads a PNG, JPEG or WebP file as diffusers' `load_image` would (see
    /// [`crate::image_io::decode_rgb`]). Errors name the path.
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Self { name: path.display().to_string(), image: load_rgb(path)? })
    }
}

/// What an image-to-image run is asked for.
#[derive(Debug, Clone)]
pub struct Img2ImgRequest {
    /// Prompt, batch, seed, steps, guidance and scheduler, as for text-to-image. `width` and
    /// `height`, when given, are the output size the init image is resized to; when `None`, the
    /// init image's own size rounded down to a multiple of the VAE's factor (diffusers' default).
    pub request: Request,
    /// The picture to start from (the same for every image of the batch).
    pub init_image: InitImage,
    /// How much to change the picture, in [0, 1]; `None` is the family's default
    /// (`FamilySpec::default_strength`: 0.8 for SD 1.5 as [`DEFAULT_STRENGTH`], 0.3 for SDXL).
    pub strength: Option<f64>,
}

/// An image-to-image request with every default filled in and every value checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Img2ImgSettings {
    /// Steps, guidance, output size and scheduler. `steps` is the full schedule's length, of
    /// which only the last `denoising_steps` run.
    pub settings: Settings,
    /// The strength.
    pub strength: f64,
    /// Steps of the schedule skipped (diffusers' `t_start`): the loop starts at timestep index
    /// `skipped_steps · order`.
    pub skipped_steps: usize,
    /// Steps that run (diffusers' `num_inference_steps` after `get_timesteps`).
    pub denoising_steps: usize,
}

/// diffusers' `get_timesteps` arithmetic: how many steps of `steps` to skip for `strength`.
/// Errors (`Invalid` about `strength`) for a strength outside [0, 1] and when no step would remain, where
/// diffusers fails or silently does nothing useful.
pub fn skipped_steps(steps: usize, strength: f64) -> Result<usize> {
    check_strength(strength)?;
    // Python's int() of the float product: truncation, float rounding included.
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    if init_timestep == 0 {
        return Err(Error::invalid(
            "strength",
            format!(
                "{strength} with {steps} steps leaves no step to run (int({steps} × {strength}) = 0): \
                 raise {STRENGTH} or {STEPS}"
            ),
        ));
    }
    Ok(steps - init_timestep)
}

/// SD 3's `get_timesteps` ([`schedulers::img2img_start_step`]), refusing a strength that leaves
/// no step to run.
pub fn skipped_steps_flow(steps: usize, strength: f64) -> Result<usize> {
    check_strength(strength)?;
    let t_start = schedulers::img2img_start_step(steps, strength);
    if t_start >= steps {
        return Err(Error::invalid(
            "strength",
            format!("{strength} with {steps} steps leaves no step to run: raise {STRENGTH} or {STEPS}"),
        ));
    }
    Ok(t_start)
}

/// The steps an image-to-image run of `steps` at `strength` skips, by the schedule's rule.
pub fn skipped_steps_for(schedule: ScheduleKind, steps: usize, strength: f64) -> Result<usize> {
    match schedule {
        ScheduleKind::Discrete => skipped_steps(steps, strength),
        ScheduleKind::FlowMatching => skipped_steps_flow(steps, strength),
    }
}

/// Errors (`Invalid` about `strength`) unless `strength` is in [0, 1].
pub fn check_strength(strength: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::invalid(
            "strength",
            format!("{strength} is outside [0, 1] (0 keeps the init image, 1 replaces it entirely)"),
        ));
    }
    Ok(())
}

/// Fills in the defaults and validates an image-to-image request before anything is loaded.
pub fn resolve_img2img(model: &ModelFolder, req: &Img2ImgRequest) -> Result<Img2ImgSettings> {
    let strength = req.strength.unwrap_or(model.family().default_strength);
    check_strength(strength)?;
    let vae_cfg: VaeConfig = model.config("vae", "config.json")?;
    // VaeImageProcessor.get_default_height_width: the image's size rounded down to a multiple of
    // the VAE's factor, and of the family's (SD 3's patches of 2 latents need 16 pixels).
    let f = vae_cfg.scale_factor().max(model.family().size_multiple);
    let img = &req.init_image.image;
    let (default_width, default_height) = (img.width - img.width % f, img.height - img.height % f);
    let width = req.request.width.unwrap_or(default_width);
    let height = req.request.height.unwrap_or(default_height);
    if (req.request.width.is_none() && width == 0) || (req.request.height.is_none() && height == 0) {
        return Err(Error::invalid(
            "init_image",
            format!(
                "{} is {}x{}: each side must be at least {f} pixels (or give {WIDTH} and {HEIGHT})",
                req.init_image.name, img.width, img.height
            ),
        ));
    }
    let sized = Request { width: Some(width), height: Some(height), ..req.request.clone() };
    if req.request.family_options.skip_layer_guidance.is_some() {
        return Err(Error::invalid(
            "skip_layer_guidance",
            "(skip-layer guidance) runs in text-to-image only, as in diffusers' SD 3 pipelines",
        ));
    }
    let settings = resolve(model, &sized)?;
    let skipped = skipped_steps_for(model.family().schedule, settings.steps, strength)?;
    Ok(Img2ImgSettings { denoising_steps: settings.steps - skipped, settings, strength, skipped_steps: skipped })
}

/// `VaeImageProcessor.preprocess`: the image resized to `width × height` with PIL's Lanczos (not
/// at all if it already has that size), as `[1, 3, height, width]` f32 in [-1, 1] on the CPU,
/// computed as diffusers does (`x / 255` in f32, then `2x − 1`).
pub fn preprocess(image: &RgbImage, width: usize, height: usize) -> Result<Tensor> {
    let resized = resize_lanczos(image, width, height)?;
    let values: Vec<f32> = resized.data.iter().map(|&v| 2.0 * (v as f32 / 255.0) - 1.0).collect();
    Ok(Tensor::from_vec(values, (1, height, width, 3), &Device::Cpu)?.permute((0, 3, 1, 2))?.contiguous()?)
}

/// `prepare_latents` (as the stage `stage_name`): encode the image (`[1, 3, h, w]`, the picture
/// of every image, or `[n, 3, h, w]`, one per image), sample each image's latents from its
/// generator, scale, and noise them to the level of `timesteps()[first_step]`.
#[allow(clippy::too_many_arguments)]
fn initial_latents(
    stage_name: &str,
    model: &ModelFolder,
    vae_cfg: &VaeConfig,
    image: &Tensor,
    scheduler: &dyn Scheduler,
    first_step: usize,
    generators: &mut BatchNoise,
    n: usize,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    // SDXL's img2img pipelines (families that honour `force_upcast`) encode with the VAE in f32
    // when its config says so, whatever the run's dtype; SD 1.5's encodes in the run's dtype.
    let upcast = model.family().vae.honours_force_upcast && vae_cfg.force_upcast.unwrap_or(true);
    let vae_dtype = if upcast { DType::F32 } else { rt.dtype };
    let vae = load_vae(stage_name, model, vae_cfg, VaePart::Encoder, vae_dtype, rt, progress)?;
    // diffusers encodes image[i : i + 1] once per image; when the images are all the init image,
    // one batch-1 encode gives each of them exactly.
    let dist = vae.encode_with(&image.to_dtype(vae_dtype)?, &vae_options(vae_cfg, rt))?;
    let (_, c, h, w) = dist.mean.dims4()?;
    // DiagonalGaussianDistribution.sample(generator[i]): mean + exp(0.5 · logvar) · ε_i, ε_i drawn
    // in the VAE's dtype from generator i.
    let std = (dist.logvar * 0.5)?.exp()?;
    let eps = generators.randn(&[n, c, h, w], dist.mean.dtype(), dist.mean.device())?;
    let sample = eps.broadcast_mul(&std)?.broadcast_add(&dist.mean)?.to_dtype(rt.dtype)?;
    // SD 3's VAE has a shift: `(sample − shift) · scale` (decode undoes it).
    let sample = match vae_cfg.shift_factor {
        Some(shift) => sample.affine(1.0, -shift)?,
        None => sample,
    };
    let init = mul_scalar(&sample, vae_cfg.scaling_factor as f32)?;
    let noise = generators.randn(&[n, c, h, w], rt.dtype, &rt.device)?;
    Ok(scheduler.add_noise(&init, &noise, first_step)?)
}

/// Runs a whole image-to-image generation: encode the prompts, encode and noise the init
/// image, denoise the remaining steps, decode.
pub fn img2img(
    model: &ModelFolder,
    req: &Img2ImgRequest,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation> {
    let plan = resolve_img2img(model, req)?;
    let mut log = StageLog::default();
    let mut warnings = Vec::new();
    super::stages::before_models(rt, progress);
    // The init image in [-1, 1], the same for every image of the batch.
    let image = preprocess(&req.init_image.image, plan.settings.width, plan.settings.height)?;
    let pixels = img2img_stages(model, &req.request, &plan, &image, "", rt, &mut log, &mut warnings, progress)?;
    let images = into_images(&pixels, &req.request, &plan.settings)?;
    Ok(log.into_generation(images, plan.settings, warnings))
}

/// The stages of image-to-image from `image` (`[1, 3, h, w]` for one picture that every image
/// starts from, or `[n, 3, h, w]`, one each; f32 in [-1, 1]), named with the `pass` prefix after
/// the base's (`refiner_*` in a refiner's half, `hires_*` in a hires pass). Returns the decoded
/// pixels.
#[allow(clippy::too_many_arguments)]
pub(super) fn img2img_stages(
    model: &ModelFolder,
    req: &Request,
    plan: &Img2ImgSettings,
    image: &Tensor,
    pass: &str,
    rt: &Runtime,
    log: &mut StageLog,
    warnings: &mut Vec<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let settings = &plan.settings;
    let cfg_guidance = super::classifier_free(model, settings.guidance)?;
    let name = |stage: &str| format!("{pass}{stage}");

    // 1. Encode the prompts (one stage per text encoder).
    let size = ImageSize { height: settings.height, width: settings.width };
    let cond = encode_prompts(model, req, cfg_guidance, size, pass, rt, log, warnings, progress)?;

    // 2. The image in the run's dtype.
    let image = image.to_dtype(rt.dtype)?.to_device(&rt.device)?;

    // 3. Timesteps: the full schedule, entered at t_start · order (`set_begin_index`).
    let build_scheduler =
        || super::build_scheduler(model, settings.scheduler, settings.steps, settings.width, settings.height);
    let scheduler = build_scheduler()?;
    let first_step = plan.skipped_steps * scheduler.order();

    // 4. Initial latents: one generator per image, seeded `seed + i`; the VAE sample, the added
    //    noise and then the ancestral steps all draw from them, in diffusers' order.
    let vae_cfg: VaeConfig = model.config("vae", "config.json")?;
    let generators = BatchNoise::for_batch_with_noise(req.seed, req.n, TorchNoise::from_env()?);
    let encoder = name("vae_encoder");
    // A retried stage starts again from the generators' state before it.
    let (latents, generators) = stage(&encoder, progress, log, rt, |rt, progress| {
        let mut generators = generators.clone();
        let latents = initial_latents(
            &encoder,
            model,
            &vae_cfg,
            &image,
            scheduler.as_ref(),
            first_step,
            &mut generators,
            req.n,
            rt,
            progress,
        )?;
        Ok((latents, generators))
    })?;
    drop(image);

    // 5. Denoise from the first step on.
    let denoiser = name(model.denoiser_component());
    let latents = stage(&denoiser, progress, log, rt, |rt, progress| {
        denoise(
            &denoiser,
            model,
            build_scheduler()?.as_mut(),
            first_step..usize::MAX,
            latents.clone(),
            &cond,
            &Guide {
                scale: settings.guidance,
                skip_layers: None,
                steps: settings.steps,
                tiles: settings.denoise_tiles,
            },
            &mut generators.clone(),
            rt,
            progress,
        )
    })?;
    drop(cond);

    // 6. Decode.
    let vae = name("vae");
    stage(&vae, progress, log, rt, |rt, progress| decode(&vae, model, &vae_cfg, latents.clone(), rt, progress))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_steps_follow_diffusers_get_timesteps() {
        // (steps, strength, t_start), from diffusers' arithmetic in Python floats.
        for (steps, strength, want) in
            [(10, 0.3, 7), (10, 0.8, 2), (12, 0.5, 6), (10, 0.6, 4), (8, 0.7, 3), (6, 1.0, 0), (50, 0.75, 13)]
        {
            assert_eq!(skipped_steps(steps, strength).unwrap(), want, "{steps} × {strength}");
        }
        // int(10 × 0.7) is 7 (0.7 · 10 = 7.000000000000001), int(3 × 0.1) is 0.
        assert_eq!(skipped_steps(10, 0.7).unwrap(), 3);
        for (steps, strength, needle) in
            [(10, 0.0, "no step"), (3, 0.1, "no step"), (10, 1.5, "outside [0, 1]"), (10, -0.1, "outside")]
        {
            let err = skipped_steps(steps, strength).unwrap_err();
            assert!(matches!(err, Error::Invalid { field: "strength", .. }), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        assert!(skipped_steps(10, f64::NAN).is_err());
    }

    #[test]
    fn preprocess_maps_bytes_to_minus_one_one() {
        let img = RgbImage::new(1, 1, vec![0, 255, 128]).unwrap();
        let t = preprocess(&img, 1, 1).unwrap();
        assert_eq!(t.dims(), &[1, 3, 1, 1]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![-1.0, 1.0, 2.0 * (128f32 / 255.0) - 1.0]);
    }
}
