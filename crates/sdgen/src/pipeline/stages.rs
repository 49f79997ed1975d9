//! The stages every SD 1.5 pipeline shares, as diffusers' `StableDiffusionPipeline` and
//! `StableDiffusionImg2ImgPipeline` run them: prompt encoding, the denoising loop and the VAE
//! decode. Each loads its model, uses it and drops it before returning.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdgen_models::clip::{ClipTextConfig, ClipTextModel};
use sdgen_models::unet::{UNet2DConditionModel, UNetConfig};
use sdgen_models::vae::{AutoencoderKL, VaeConfig};

use super::{GeneratedImage, Progress, Request, Runtime, Settings};
use crate::loading::{model_error, ModelFolder};
use crate::rng::batch::BatchNoise;
use crate::schedulers::Scheduler;
use crate::tokenizer::ClipTokenizer;
use crate::Result;

/// Runs `body` as the stage `name`: reports its start and end, and records its wall time.
pub(super) fn stage<T>(
    name: &'static str,
    progress: &mut dyn FnMut(Progress),
    timings_ms: &mut BTreeMap<String, f64>,
    body: impl FnOnce(&mut dyn FnMut(Progress)) -> Result<T>,
) -> Result<T> {
    progress(Progress::StageStart(name));
    let start = Instant::now();
    let out = body(progress)?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    timings_ms.insert(name.to_string(), ms);
    progress(Progress::StageEnd { stage: name, elapsed_ms: ms });
    Ok(out)
}

/// The prompt embeddings for a batch of `req.n`: `[negative × n; positive × n]` when guiding (as
/// diffusers concatenates them), `[positive × n]` otherwise. Truncated prompts add a warning.
pub(super) fn encode_prompts(
    model: &ModelFolder,
    req: &Request,
    cfg_guidance: bool,
    rt: &Runtime,
    warnings: &mut Vec<String>,
) -> Result<Tensor> {
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
    Ok(Tensor::cat(&parts, 0)?)
}

/// The denoising loop from `timesteps()[first_step]` to the end (txt2img starts at 0, img2img
/// later): classifier-free guidance when `guidance > 1`, one scheduler step per timestep, the
/// ancestral noise drawn from `generators`. Reports each step, numbered from 1.
#[allow(clippy::too_many_arguments)]
pub(super) fn denoise(
    model: &ModelFolder,
    unet_cfg: &UNetConfig,
    scheduler: &mut dyn Scheduler,
    first_step: usize,
    mut latents: Tensor,
    context: &Tensor,
    guidance: f64,
    generators: &mut BatchNoise,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let cfg_guidance = guidance > 1.0;
    let weights = model.weights("unet")?;
    let unet = UNet2DConditionModel::new(unet_cfg, weights.var_builder(rt.dtype, &rt.device)?)
        .map_err(|e| model_error(&weights, "an SD 1.5 UNet", e))?;
    let timesteps = scheduler.timesteps().to_vec();
    let total = timesteps.len().saturating_sub(first_step);
    for (i, &t) in timesteps.iter().enumerate().skip(first_step) {
        let input = if cfg_guidance { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let input = scheduler.scale_model_input(&input, i)?;
        let pred = unet.forward(&input, t, context)?;
        let pred = if cfg_guidance {
            let parts = pred.chunk(2, 0)?;
            (&parts[0] + ((&parts[1] - &parts[0])? * guidance)?)?
        } else {
            pred
        };
        latents = scheduler.step(&pred, i, &latents, generators)?;
        progress(Progress::Step { index: i + 1 - first_step, total });
    }
    Ok(latents)
}

/// Decodes latents and post-processes as diffusers: `(x / 2 + 0.5).clamp(0, 1)`, as
/// `[n, h, w, 3]` f32 on the CPU.
pub(super) fn decode(model: &ModelFolder, vae_cfg: &VaeConfig, latents: Tensor, rt: &Runtime) -> Result<Tensor> {
    let weights = model.weights("vae")?;
    let vae = AutoencoderKL::new(vae_cfg, false, true, weights.var_builder(rt.dtype, &rt.device)?)
        .map_err(|e| model_error(&weights, "an AutoencoderKL VAE", e))?;
    let z = match vae_cfg.shift_factor {
        Some(s) => ((latents / vae_cfg.scaling_factor)? + s)?,
        None => (latents / vae_cfg.scaling_factor)?,
    };
    let image = vae.decode(&z)?;
    Ok(((image / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?)
}

/// Splits decoded `[n, h, w, 3]` pixels into images, with 8-bit values rounded as diffusers'
/// `numpy_to_pil` rounds them.
pub(super) fn into_images(pixels: &Tensor, req: &Request, settings: &Settings) -> Result<Vec<GeneratedImage>> {
    let per_image = settings.height * settings.width * 3;
    let flat: Vec<f32> = pixels.flatten_all()?.to_vec1()?;
    Ok(flat
        .chunks(per_image)
        .enumerate()
        .map(|(i, px)| GeneratedImage {
            index: i,
            seed: req.seed.wrapping_add(i as u64),
            rgb8: px.iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect(),
            pixels: px.to_vec(),
        })
        .collect())
}
