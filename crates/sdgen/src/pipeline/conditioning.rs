//! What the denoiser is conditioned on, per family, as diffusers' pipelines build it.
//!
//! - SD 1.5 (`StableDiffusionPipeline.encode_prompt`): the CLIP text encoder's last hidden state.
//! - SDXL (`StableDiffusionXLPipeline.encode_prompt`): both text encoders' *penultimate* hidden
//!   states concatenated along the channels; the second encoder's projected pooled output; and
//!   the "micro-conditioning" numbers (`add_time_ids`): original size, crop, target size. With no
//!   negative prompt and `force_zeros_for_empty_prompt` (the base model's `model_index.json`), the
//!   negative embeddings are zeros; an explicit empty negative prompt is encoded.
//! - SDXL refiner (`StableDiffusionXLImg2ImgPipeline`): the second encoder only; its time ids hold
//!   an aesthetic score (6 for the positive half, 2.5 for the negative) in place of the target size.
//!
//! Each text encoder is a stage of its own: loaded, used and dropped before the next loads.

use candle_core::{DType, Device, Tensor};
use sdgen_models::clip::{ClipTextConfig, ClipTextModel};

use super::stages::{loaded, stage, StageLog};
use super::{Progress, Request, Runtime};
use crate::loading::{model_error, ModelFolder};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// diffusers' default `aesthetic_score` of the refiner (positive half).
pub const AESTHETIC_SCORE: f64 = 6.0;
/// diffusers' default `negative_aesthetic_score` of the refiner.
pub const NEGATIVE_AESTHETIC_SCORE: f64 = 2.5;

/// The denoiser's conditioning for a batch: `[negative × n; positive × n]` when guiding, as
/// diffusers concatenates it, `[positive × n]` otherwise.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Cross-attention context, `[B, tokens, cross_attention_dim]`, in the run's dtype.
    pub context: Tensor,
    /// SDXL's added conditioning: the pooled text embeddings `[B, d]` and the time ids `[B, k]`.
    pub added: Option<(Tensor, Tensor)>,
}

/// What the text encoders of a family are and how their outputs combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// SD 1.x: one encoder, last hidden state.
    Sd15,
    /// SDXL base: two encoders, penultimate states concatenated, size/crop/target time ids.
    SdxlBase,
    /// SDXL refiner: the second encoder only, size/crop/aesthetic time ids.
    SdxlRefiner,
}

fn kind(model: &ModelFolder) -> Kind {
    match model.family().name {
        "sdxl" => Kind::SdxlBase,
        "sdxl-refiner" => Kind::SdxlRefiner,
        _ => Kind::Sd15,
    }
}

/// The image size the micro-conditioning describes: `(height, width)` of the generated image
/// (diffusers' defaults: original size = target size = the output size, crop (0, 0)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

/// One encoder's output for the batch's distinct prompts (negative first when guiding).
struct Encoded {
    /// Per prompt `[1, tokens, hidden]`.
    hidden: Vec<Tensor>,
    /// Per prompt the projected pooled output `[1, d]`, for encoders with a projection.
    pooled: Vec<Tensor>,
}

/// Runs the text-encoder stage(s) of `model` and returns the conditioning of a batch of `req.n`.
/// `refiner`: the stages are the refiner's half of a base → refiner run (named `refiner_*`, so
/// the metadata keeps both halves apart).
#[allow(clippy::too_many_arguments)]
pub(super) fn encode_prompts(
    model: &ModelFolder,
    req: &Request,
    cfg_guidance: bool,
    size: ImageSize,
    refiner: bool,
    rt: &Runtime,
    log: &mut StageLog,
    warnings: &mut Vec<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Conditioning> {
    let kind = kind(model);
    let mut texts = Vec::new();
    if cfg_guidance {
        texts.push(req.negative_prompt.clone().unwrap_or_default());
    }
    texts.push(req.prompt.clone());
    let encoders: &[(&'static str, &'static str, bool)] = match kind {
        Kind::Sd15 => &[("text_encoder", "tokenizer", false)],
        Kind::SdxlBase => &[("text_encoder", "tokenizer", false), ("text_encoder_2", "tokenizer_2", true)],
        Kind::SdxlRefiner => &[("text_encoder_2", "tokenizer_2", true)],
    };
    let mut outputs = Vec::new();
    for &(component, tokenizer, projection) in encoders {
        let penultimate = kind != Kind::Sd15;
        let name = match (refiner, component) {
            (true, "text_encoder_2") => "refiner_text_encoder_2",
            _ => component,
        };
        let out = stage(name, progress, log, rt, |rt, progress| {
            encode_with(
                name,
                model,
                component,
                tokenizer,
                projection,
                penultimate,
                &texts,
                cfg_guidance,
                rt,
                warnings,
                progress,
            )
        })?;
        outputs.push(out);
    }
    let n = req.n;
    let batch = |per_prompt: &[Tensor]| -> Result<Tensor> {
        let parts: Vec<Tensor> = per_prompt.iter().map(|e| e.repeat((n, 1, 1))).collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    };
    if kind == Kind::Sd15 {
        let context = batch(&outputs[0].hidden)?;
        return Ok(Conditioning { context, added: None });
    }

    // SDXL: per prompt, the encoders' states side by side; the last encoder's pooled output.
    let mut hidden: Vec<Tensor> = (0..texts.len())
        .map(|i| {
            let parts: Vec<&Tensor> = outputs.iter().map(|o| &o.hidden[i]).collect();
            Ok(Tensor::cat(&parts, 2)?)
        })
        .collect::<Result<_>>()?;
    let last = outputs.last().expect("SDXL has a text encoder");
    let mut pooled: Vec<Tensor> = last.pooled.clone();
    // diffusers reads the flag in both SDXL pipelines (the official refiner's is false).
    if cfg_guidance && req.negative_prompt.is_none() && force_zeros_for_empty_prompt(model)? {
        hidden[0] = hidden[0].zeros_like()?;
        pooled[0] = pooled[0].zeros_like()?;
    }
    let context = batch(&hidden)?;
    let pooled: Vec<Tensor> = pooled.iter().map(|p| p.unsqueeze(0)).collect::<candle_core::Result<_>>()?;
    let text_embeds = batch(&pooled)?.squeeze(1)?;
    let rows = time_id_rows(kind, size, cfg_guidance);
    let k = rows[0].len();
    // The UNet's added embedding fixes how many numbers it takes (6 for the base's sizes, 5 for
    // the refiner's aesthetic score): a mismatch is a model that is not what its family says.
    let unet: sdgen_models::unet::UNetConfig = model.config("unet", "config.json")?;
    let pooled_dim = text_embeds.dim(1)?;
    if let Some(want) = unet.time_ids_len(pooled_dim) {
        if want != k {
            return Err(Error::BadModel(format!(
                "{}: its UNet's added embedding takes {want} micro-conditioning numbers besides the {pooled_dim}-wide \
                 pooled text, but {} conditions with {k} (is it a {}?)",
                model.root().display(),
                model.family().display,
                if want == 5 { "refiner" } else { "base model" }
            )));
        }
    }
    let mut values = Vec::with_capacity(rows.len() * n * k);
    for row in &rows {
        for _ in 0..n {
            values.extend(row.iter().map(|&v| v as f32));
        }
    }
    let time_ids = Tensor::from_vec(values, (rows.len() * n, k), &rt.device)?.to_dtype(rt.dtype)?;
    Ok(Conditioning { context, added: Some((text_embeds, time_ids)) })
}

/// The time-id rows, negative first when guiding. Base: `[h, w, 0, 0, h, w]` for both halves
/// (diffusers uses the positive sizes for the negative half unless told otherwise). Refiner:
/// `[h, w, 0, 0, score]` with the aesthetic scores.
fn time_id_rows(kind: Kind, size: ImageSize, cfg_guidance: bool) -> Vec<Vec<f64>> {
    let (h, w) = (size.height as f64, size.width as f64);
    let row = |score: f64| match kind {
        Kind::SdxlRefiner => vec![h, w, 0.0, 0.0, score],
        _ => vec![h, w, 0.0, 0.0, h, w],
    };
    let mut rows = Vec::new();
    if cfg_guidance {
        rows.push(row(NEGATIVE_AESTHETIC_SCORE));
    }
    rows.push(row(AESTHETIC_SCORE));
    rows
}

/// `force_zeros_for_empty_prompt` of the folder's `model_index.json` (diffusers' default: true).
fn force_zeros_for_empty_prompt(model: &ModelFolder) -> Result<bool> {
    let path = model.root().join("model_index.json");
    let index: serde_json::Value = crate::loading::read_json(&path)?;
    Ok(index.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true))
}

/// One text encoder over the prompts: loaded, run for each prompt, dropped.
#[allow(clippy::too_many_arguments)]
fn encode_with(
    stage_name: &str,
    model: &ModelFolder,
    component: &'static str,
    tokenizer_dir: &str,
    projection: bool,
    penultimate: bool,
    texts: &[String],
    cfg_guidance: bool,
    rt: &Runtime,
    warnings: &mut Vec<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Encoded> {
    let tokenizer = ClipTokenizer::from_dir(&model.component_dir(tokenizer_dir)?)?;
    let cfg: ClipTextConfig = model.config(component, "config.json")?;
    let weights = model.weights(component)?;
    // The planner may keep the encoder off a GPU that is too small: it then runs on the host in f32.
    let (device, dtype) =
        if rt.options.text_encoder_on_host { (Device::Cpu, DType::F32) } else { (rt.device.clone(), rt.dtype) };
    let what = if projection { "a CLIP text encoder with projection" } else { "a CLIP text encoder" };
    let encoder = ClipTextModel::new(&cfg, projection, weights.var_builder(dtype, &device)?)
        .map_err(|e| model_error(&weights, what, e))?;
    loaded(progress, stage_name);
    let mut out = Encoded { hidden: Vec::new(), pooled: Vec::new() };
    for (i, text) in texts.iter().enumerate() {
        let tokens = tokenizer.encode(text)?;
        if tokens.dropped_tokens > 0 {
            let which = if cfg_guidance && i == 0 { "negative prompt" } else { "prompt" };
            let warning = format!(
                "the {which} is longer than CLIP's {} tokens: its last {} tokens were dropped",
                tokenizer.max_length(),
                tokens.dropped_tokens
            );
            // Both of SDXL's tokenizers drop the same tokens: say it once.
            if !warnings.contains(&warning) {
                warnings.push(warning);
            }
        }
        let ids = Tensor::new(tokens.ids.as_slice(), &device)?.unsqueeze(0)?;
        let o = encoder.forward(&ids)?;
        let hidden = if penultimate { o.penultimate_hidden_state } else { o.last_hidden_state };
        out.hidden.push(hidden.to_dtype(rt.dtype)?.to_device(&rt.device)?);
        if projection {
            let pooled = o.text_embeds.ok_or_else(|| {
                Error::BadModel(format!("{} has no text projection, which SDXL needs", weights.describe()))
            })?;
            out.pooled.push(pooled.to_dtype(rt.dtype)?.to_device(&rt.device)?);
        }
    }
    Ok(out)
}
