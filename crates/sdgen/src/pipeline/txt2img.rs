//! Text-to-image for the SD 1.5 family, step for step as diffusers' `StableDiffusionPipeline`.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdgen_models::clip::{ClipTextConfig, ClipTextModel};
use sdgen_models::unet::{UNet2DConditionModel, UNetConfig};
use sdgen_models::vae::{AutoencoderKL, VaeConfig};

use super::{resolve, scheduler_config, GeneratedImage, Generation, Progress, Request, Runtime};
use crate::loading::{model_error, ModelFolder};
use crate::rng::batch::BatchNoise;
use crate::schedulers;
use crate::tokenizer::ClipTokenizer;
use crate::Result;

/// Records a stage's wall time and reports its end.
fn timed(stage: &'static str, progress: &mut dyn FnMut(Progress), timings: &mut BTreeMap<String, f64>, start: Instant) {
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    timings.insert(stage.to_string(), ms);
    progress(Progress::StageEnd { stage, elapsed_ms: ms });
}

/// Runs a whole generation: encode the prompts, denoise, decode.
pub fn txt2img(
    model: &ModelFolder,
    req: &Request,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation> {
    let settings = resolve(model, req)?;
    let mut timings_ms = BTreeMap::new();
    let mut warnings = Vec::new();
    let cfg_guidance = settings.guidance > 1.0;

    // 1. Encode the prompts: [negative; positive] when guiding, as diffusers concatenates them.
    progress(Progress::StageStart("text_encoder"));
    let start = Instant::now();
    let context = {
        let tokenizer = ClipTokenizer::from_dir(&model.component_dir("tokenizer")?)?;
        let cfg: ClipTextConfig = model.config("text_encoder", "config.json")?;
        let weights = model.weights("text_encoder")?;
        let encoder = ClipTextModel::new(&cfg, false, weights.var_builder(rt.dtype, &rt.device)?)
            .map_err(|e| model_error(&weights, "a CLIP text encoder", e))?;
        let mut texts = Vec::new();
        if cfg_guidance {
            texts.push(req.negative_prompt.clone().unwrap_or_default());
        }
        texts.push(req.prompt.clone());
        let mut embeds = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let tokens = tokenizer.encode(text)?;
            if tokens.dropped_tokens > 0 {
                let which = if cfg_guidance && i == 0 { "negative prompt" } else { "prompt" };
                warnings.push(format!(
                    "the {which} is longer than CLIP's {} tokens: its last {} tokens were dropped",
                    tokenizer.max_length(),
                    tokens.dropped_tokens
                ));
            }
            let ids = Tensor::new(tokens.ids.as_slice(), &rt.device)?.unsqueeze(0)?;
            embeds.push(encoder.forward(&ids)?.last_hidden_state);
        }
        // Each image of the batch gets the same embeddings: [neg × n, pos × n].
        let parts: Vec<Tensor> = embeds.iter().map(|e| e.repeat((req.n, 1, 1))).collect::<candle_core::Result<_>>()?;
        Tensor::cat(&parts, 0)?
    };
    timed("text_encoder", progress, &mut timings_ms, start);

    // 2. Timesteps.
    let mut scheduler = schedulers::build(settings.scheduler, &scheduler_config(model)?, settings.steps)?;

    // 3. Initial noise: one generator per image, seeded `seed + i`, drawn on the CPU in the
    //    embeddings' dtype exactly as torch does, so each image equals diffusers' for its seed.
    //    The same generators then go to the scheduler, whose ancestral steps draw from them as
    //    diffusers' do (`generator=` reaches both `prepare_latents` and `scheduler.step`).
    let vae_cfg: VaeConfig = model.config("vae", "config.json")?;
    let unet_cfg: UNetConfig = model.config("unet", "config.json")?;
    let f = vae_cfg.scale_factor();
    let mut generators = BatchNoise::for_batch(req.seed, req.n);
    let shape = [req.n, unet_cfg.in_channels, settings.height / f, settings.width / f];
    let mut latents = (generators.randn(&shape, rt.dtype, &rt.device)? * scheduler.init_noise_sigma())?;

    // 4. Denoise.
    progress(Progress::StageStart("unet"));
    let start = Instant::now();
    {
        let weights = model.weights("unet")?;
        let unet = UNet2DConditionModel::new(&unet_cfg, weights.var_builder(rt.dtype, &rt.device)?)
            .map_err(|e| model_error(&weights, "an SD 1.5 UNet", e))?;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if cfg_guidance { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let input = scheduler.scale_model_input(&input, i)?;
            let pred = unet.forward(&input, t, &context)?;
            let pred = if cfg_guidance {
                let parts = pred.chunk(2, 0)?;
                (&parts[0] + ((&parts[1] - &parts[0])? * settings.guidance)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, i, &latents, &mut generators)?;
            progress(Progress::Step { index: i + 1, total: timesteps.len() });
        }
    }
    timed("unet", progress, &mut timings_ms, start);

    // 5. Decode and post-process as diffusers: (x / 2 + 0.5).clamp(0, 1), then ×255 rounded.
    progress(Progress::StageStart("vae"));
    let start = Instant::now();
    let pixels = {
        let weights = model.weights("vae")?;
        let vae = AutoencoderKL::new(&vae_cfg, false, true, weights.var_builder(rt.dtype, &rt.device)?)
            .map_err(|e| model_error(&weights, "an AutoencoderKL VAE", e))?;
        let z = match vae_cfg.shift_factor {
            Some(s) => ((latents / vae_cfg.scaling_factor)? + s)?,
            None => (latents / vae_cfg.scaling_factor)?,
        };
        let image = vae.decode(&z)?;
        ((image / 2.0)? + 0.5)?
            .clamp(0f32, 1f32)?
            .permute((0, 2, 3, 1))?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
    };
    timed("vae", progress, &mut timings_ms, start);

    let per_image = settings.height * settings.width * 3;
    let flat: Vec<f32> = pixels.flatten_all()?.to_vec1()?;
    let images = flat
        .chunks(per_image)
        .enumerate()
        .map(|(i, px)| GeneratedImage {
            index: i,
            seed: req.seed.wrapping_add(i as u64),
            rgb8: px.iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect(),
            pixels: px.to_vec(),
        })
        .collect();
    Ok(Generation { images, settings, timings_ms, warnings })
}
