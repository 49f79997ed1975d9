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

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdgen_models::clip::{ClipTextConfig, ClipTextModel};
pub use sdgen_models::denoiser::Conditioning;
use sdgen_models::stream::StreamableModel;
use sdgen_models::t5::{T5Config, T5EncoderModel};

use super::stages::{loaded, stage, StageLog};
use super::{Progress, Request, Runtime};
use crate::error::field::{MAX_SEQUENCE_LENGTH, NO_T5, PROMPT_STYLE};
use crate::loading::family::{ContextJoin, HiddenLayer, MicroConditioning, TextEncoderArch, TextEncoderSpec};
use crate::loading::{model_error, ModelFolder};
use crate::prompt::{self, PromptChunk};
use crate::tokenizer::{ClipTokenizer, T5Tokenizer, Tokenized, T5_DEFAULT_MAX_LENGTH, T5_MAX_LENGTH};
use crate::{Error, Result};

/// diffusers' default `aesthetic_score` of the refiner (positive half).
pub const AESTHETIC_SCORE: f64 = 6.0;
/// diffusers' default `negative_aesthetic_score` of the refiner.
pub const NEGATIVE_AESTHETIC_SCORE: f64 = 2.5;

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

/// Runs the text-encoder stage(s) of `model`, one per encoder of its family, and returns the
/// conditioning of a batch of `req.n`. `pass`: the prefix of the stages' names in a pass after
/// the base's (`refiner_` for a refiner's half, `hires_` for a hires pass; `""` for the base), so
/// the metadata keeps the passes apart.
#[allow(clippy::too_many_arguments)]
pub(super) fn encode_prompts(
    model: &ModelFolder,
    req: &Request,
    cfg_guidance: bool,
    size: ImageSize,
    pass: &str,
    rt: &Runtime,
    log: &mut StageLog,
    warnings: &mut Vec<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Conditioning> {
    let mut texts = Vec::new();
    if cfg_guidance {
        texts.push(req.negative_prompt.clone().unwrap_or_default());
    } else if req.negative_prompt.as_deref().is_some_and(|n| !n.trim().is_empty()) {
        // diffusers drops it silently; say so (guidance ≤ 1, or guidance distilled into the UNet).
        warn_once(
            warnings,
            "the negative prompt is not used: this run does not guide classifier-free (guidance ≤ 1, or a              model with its guidance distilled in, such as an LCM UNet)"
                .into(),
        );
    }
    texts.push(req.prompt.clone());
    let mut outputs = Vec::new();
    let skipped = super::skipped_encoders(model, &req.family_options);
    for spec in model.family().encoders {
        if skipped.contains(&spec.component) {
            if !req.family_options.no_t5 {
                warn_once(
                    warnings,
                    format!(
                        "{} has no {}: the prompt is read by the other encoders only (as {NO_T5})",
                        model.root().display(),
                        spec.component.replace('_', " ")
                    ),
                );
            }
            outputs.push((spec, absent_encoder(model, req, texts.len(), rt)?));
            continue;
        }
        let name = format!("{pass}{}", spec.component);
        let out = stage(&name, progress, log, rt, |rt, progress| {
            encode_with(&name, model, spec, req, &texts, cfg_guidance, rt, warnings, progress)
        })?;
        outputs.push((spec, out));
    }
    // With no negative prompt, the families that honour `force_zeros_for_empty_prompt` (read from
    // the folder, diffusers' default true; the official refiner's is false) guide against zeros.
    let zero_negative = cfg_guidance
        && req.negative_prompt.is_none()
        && model.family().conditioning.zeros_for_empty_negative
        && force_zeros_for_empty_prompt(model)?;
    let (hidden, pooled) = combine(&outputs, texts.len(), zero_negative)?;
    let n = req.n;
    let batch = |per_prompt: &[Tensor]| -> Result<Tensor> {
        let parts: Vec<Tensor> = per_prompt.iter().map(|e| e.repeat((n, 1, 1))).collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    };
    let context = batch(&hidden)?;
    let pooled = match pooled {
        Some(p) => {
            let p: Vec<Tensor> = p.iter().map(|p| p.unsqueeze(0)).collect::<candle_core::Result<_>>()?;
            Some(batch(&p)?.squeeze(1)?)
        }
        None => None,
    };
    let time_ids = match (model.family().conditioning.micro, &pooled) {
        (Some(micro), Some(pooled)) => Some(time_ids(model, micro, size, cfg_guidance, n, pooled.dim(1)?, rt)?),
        _ => None,
    };
    Ok(Conditioning { context, pooled, time_ids, timestep_cond: None })
}

/// Per prompt, the context and the pooled text from the encoders' outputs, as their specs say:
/// the `Channels` encoders' hidden states side by side, each `Tokens` encoder's appended along
/// the tokens (zero-padded to the wider channels); the pooled outputs of the encoders with a
/// projection side by side. `zero_negative`: prompt 0 (the negative) becomes zeros.
fn combine(
    outputs: &[(&TextEncoderSpec, Encoded)],
    prompts: usize,
    zero_negative: bool,
) -> Result<(Vec<Tensor>, Option<Vec<Tensor>>)> {
    let mut hidden = Vec::with_capacity(prompts);
    for i in 0..prompts {
        let side_by_side: Vec<&Tensor> =
            outputs.iter().filter(|(s, _)| s.join == ContextJoin::Channels).map(|(_, o)| &o.hidden[i]).collect();
        let mut context = Tensor::cat(&side_by_side, 2)?;
        for (_, o) in outputs.iter().filter(|(s, _)| s.join == ContextJoin::Tokens) {
            let width = context.dim(2)?.max(o.hidden[i].dim(2)?);
            let pad = |t: &Tensor| t.pad_with_zeros(2, 0, width - t.dim(2).unwrap_or(width));
            context = Tensor::cat(&[pad(&context)?, pad(&o.hidden[i])?], 1)?;
        }
        hidden.push(context);
    }
    let projected: Vec<&Encoded> = outputs.iter().filter(|(s, _)| s.projection).map(|(_, o)| o).collect();
    let mut pooled = if projected.is_empty() {
        None
    } else {
        let per_prompt = |i: usize| Tensor::cat(&projected.iter().map(|o| &o.pooled[i]).collect::<Vec<_>>(), 1);
        Some((0..prompts).map(per_prompt).collect::<candle_core::Result<Vec<_>>>()?)
    };
    if zero_negative {
        hidden[0] = hidden[0].zeros_like()?;
        if let Some(p) = pooled.as_mut() {
            p[0] = p[0].zeros_like()?;
        }
    }
    Ok((hidden, pooled))
}

/// The micro-conditioning `[B, k]` of the batch, checked against what the denoiser's added
/// embedding takes (6 numbers for the base's sizes, 5 for the refiner's aesthetic score): a
/// mismatch is a model that is not what its family says.
fn time_ids(
    model: &ModelFolder,
    micro: MicroConditioning,
    size: ImageSize,
    cfg_guidance: bool,
    n: usize,
    pooled_dim: usize,
    rt: &Runtime,
) -> Result<Tensor> {
    let rows = time_id_rows(micro, size, cfg_guidance);
    let k = rows[0].len();
    let unet: sdgen_models::unet::UNetConfig = model.config(model.denoiser_component(), "config.json")?;
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
    Ok(Tensor::from_vec(values, (rows.len() * n, k), &rt.device)?.to_dtype(rt.dtype)?)
}

/// The time-id rows, negative first when guiding. Base: `[h, w, 0, 0, h, w]` for both halves
/// (diffusers uses the positive sizes for the negative half unless told otherwise). Refiner:
/// `[h, w, 0, 0, score]` with the aesthetic scores.
fn time_id_rows(micro: MicroConditioning, size: ImageSize, cfg_guidance: bool) -> Vec<Vec<f64>> {
    let (h, w) = (size.height as f64, size.width as f64);
    let row = |score: f64| match micro {
        MicroConditioning::AestheticScore => vec![h, w, 0.0, 0.0, score],
        MicroConditioning::TargetSize => vec![h, w, 0.0, 0.0, h, w],
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
    let index: serde_json::Value = model.parse_once(&path, crate::loading::read_json)?;
    Ok(index.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true))
}

/// An optional encoder that does not run (`--no-t5`, or a folder saved without it): zeros of
/// the denoiser's context width for each prompt, as diffusers' SD 3 pipeline makes them.
fn absent_encoder(model: &ModelFolder, req: &Request, prompts: usize, rt: &Runtime) -> Result<Encoded> {
    let tokens = req.family_options.max_sequence_length.unwrap_or(T5_DEFAULT_MAX_LENGTH);
    let width = model.denoiser_geometry()?.context_width;
    let zeros = Tensor::zeros((1, tokens, width), rt.dtype, &rt.device)?;
    Ok(Encoded { hidden: vec![zeros; prompts], pooled: Vec::new() })
}

/// Records a truncation warning once (both of SDXL's tokenizers drop the same tokens).
fn warn_once(warnings: &mut Vec<String>, warning: String) {
    if !warnings.contains(&warning) {
        warnings.push(warning);
    }
}

/// A text encoder loaded with its tokenizer, by architecture (a new one is a new variant).
enum TextEncoder {
    Clip(Arc<ClipTokenizer>, Arc<ClipTextModel>),
    /// SD 3's T5 (`_get_t5_prompt_embeds`): `max_len` tokens, padded, `</s>` kept.
    T5(Arc<T5Tokenizer>, Arc<T5EncoderModel>, usize),
}

impl TextEncoder {
    /// The encoder of `spec` for the stage `stage`, in `dtype` on `device` (warm when the engine
    /// keeps it); T5 holds its blocks as the plan says (`t5_resident_blocks`).
    fn load(
        stage: &str,
        model: &ModelFolder,
        spec: &TextEncoderSpec,
        req: &Request,
        (device, dtype): (&Device, DType),
        rt: &Runtime,
    ) -> Result<Self> {
        let weights = model.weights(spec.component)?;
        let key = || super::WeightKey::new(model, spec.component, dtype, device);
        // Tokenizers are parsed once per open model (a server runs many batches on one), shared
        // by the batches through the model's parse-once cache.
        let tokenizer_dir = model.component_dir(spec.tokenizer)?;
        Ok(match spec.arch {
            TextEncoderArch::Clip => {
                let cfg: ClipTextConfig = model.config(spec.component, "config.json")?;
                let what = if spec.projection { "a CLIP text encoder with projection" } else { "a CLIP text encoder" };
                let encoder = rt.load_weights(stage, key, || {
                    ClipTextModel::new(&cfg, spec.projection, weights.var_builder(dtype, device)?)
                        .map_err(|e| model_error(&weights, what, e))
                })?;
                TextEncoder::Clip(
                    model.parse_once(&tokenizer_dir, |d| ClipTokenizer::from_dir(d).map(Arc::new))?,
                    encoder,
                )
            }
            TextEncoderArch::T5 => {
                let cfg: T5Config = model.config(spec.component, "config.json")?;
                let residency = super::residency(rt.options.t5_resident_blocks);
                let build = || {
                    let streamed = weights.streamed_var_builder(dtype, device)?;
                    T5EncoderModel::new_streamed(&cfg, weights.var_builder(dtype, device)?, streamed, residency)
                        .map_err(|e| model_error(&weights, "a T5 encoder (T5EncoderModel)", e))
                };
                let encoder = rt.load_weights_as(stage, residency, key, build)?;
                let max_len = req.family_options.max_sequence_length.unwrap_or(T5_DEFAULT_MAX_LENGTH);
                TextEncoder::T5(
                    model.parse_once(&tokenizer_dir, |d| T5Tokenizer::from_dir(d).map(Arc::new))?,
                    encoder,
                    max_len,
                )
            }
        })
    }

    /// The tokens of `text`, and the limit a truncation warning names.
    fn tokenize(&self, text: &str) -> Result<(Tokenized, String)> {
        Ok(match self {
            TextEncoder::Clip(tokenizer, _) => {
                (tokenizer.encode(text)?, format!("CLIP's {} tokens", tokenizer.max_length()))
            }
            TextEncoder::T5(tokenizer, _, max_len) => (
                tokenizer.encode(text, *max_len)?,
                format!("T5's {max_len} tokens ({MAX_SEQUENCE_LENGTH}, at most {T5_MAX_LENGTH})"),
            ),
        })
    }

    /// The hidden state `layer` names and, for CLIP with a projection, the pooled output.
    fn forward(&self, ids: &Tensor, layer: HiddenLayer) -> Result<(Tensor, Option<Tensor>)> {
        Ok(match self {
            TextEncoder::Clip(_, encoder) => {
                let o = encoder.forward(ids)?;
                let hidden = match layer {
                    HiddenLayer::Last => o.last_hidden_state,
                    HiddenLayer::Penultimate => o.penultimate_hidden_state,
                };
                (hidden, o.text_embeds)
            }
            TextEncoder::T5(_, encoder, _) => (encoder.forward(ids)?, None),
        })
    }
}

/// One text encoder over the prompts: loaded, run for each prompt, dropped.
#[allow(clippy::too_many_arguments)]
fn encode_with(
    stage_name: &str,
    model: &ModelFolder,
    spec: &TextEncoderSpec,
    req: &Request,
    texts: &[String],
    cfg_guidance: bool,
    rt: &Runtime,
    warnings: &mut Vec<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Encoded> {
    // The planner may keep the encoder off a GPU that is too small: it then runs on the host in f32.
    let (device, dtype) = if rt.options.text_encoder_runs_on_host(spec.arch) {
        (Device::Cpu, DType::F32)
    } else {
        (rt.device.clone(), rt.dtype)
    };
    let encoder = TextEncoder::load(stage_name, model, spec, req, (&device, dtype), rt)?;
    loaded(progress, stage_name);
    let options = req.prompt_options;
    // The clip skip was checked against the family and the encoder's layers (`check_clip_skip`).
    let mut out = Encoded { hidden: Vec::new(), pooled: Vec::new() };
    let chunked = match &encoder {
        TextEncoder::Clip(tokenizer, _) => prompt::needs_a1111(tokenizer, options.style, texts)?,
        TextEncoder::T5(..) => false,
    };
    if chunked {
        let TextEncoder::Clip(tokenizer, clip) = &encoder else { unreachable!("chunked is CLIP only") };
        for (hidden, pooled) in encode_a1111(clip, tokenizer, texts, spec.layer, options.clip_skip, &device)? {
            out.hidden.push(hidden.to_dtype(rt.dtype)?.to_device(&rt.device)?);
            if spec.projection {
                let pooled = pooled.ok_or_else(|| no_projection(model, spec))?;
                out.pooled.push(pooled.to_dtype(rt.dtype)?.to_device(&rt.device)?);
            }
        }
        return Ok(out);
    }
    for (i, text) in texts.iter().enumerate() {
        let (tokens, limit) = encoder.tokenize(text)?;
        if tokens.dropped_tokens > 0 {
            let which = if cfg_guidance && i == 0 { "negative prompt" } else { "prompt" };
            let dropped = tokens.dropped_tokens;
            let cut = match &encoder {
                TextEncoder::Clip(tokenizer, _) => dropped_text(tokenizer, text)?,
                TextEncoder::T5(..) => String::new(),
            };
            warn_once(
                warnings,
                format!("the {which} is longer than {limit}: its last {dropped} tokens were dropped{cut}"),
            );
        }
        let ids = Tensor::new(tokens.ids.as_slice(), &device)?.unsqueeze(0)?;
        let (hidden, pooled) = match (&encoder, options.clip_skip) {
            (TextEncoder::Clip(_, clip), Some(skip)) if skip > 1 => (clip.forward_clip_skip(&ids, skip)?, None),
            _ => encoder.forward(&ids, spec.layer)?,
        };
        out.hidden.push(hidden.to_dtype(rt.dtype)?.to_device(&rt.device)?);
        if spec.projection {
            let pooled = pooled.ok_or_else(|| no_projection(model, spec))?;
            out.pooled.push(pooled.to_dtype(rt.dtype)?.to_device(&rt.device)?);
        }
    }
    Ok(out)
}

/// The error of a family that needs a projection its encoder lacks.
fn no_projection(model: &ModelFolder, spec: &TextEncoderSpec) -> Error {
    Error::BadModel(format!(
        "{}'s {} has no text projection, which {} needs",
        model.root().display(),
        spec.component,
        model.family().display
    ))
}

/// The prompts read A1111's way (`crate::prompt`): per text its chunks' hidden states
/// concatenated along the tokens `[1, 77·k, d]`, and the pooled output of its first chunk
/// (A1111's `zs[0].pooled`, SDXL's). All texts get as many chunks: the shorter padded with empty
/// ones, as A1111 pads the unconditional side with the empty prompt's encoding.
fn encode_a1111(
    clip: &ClipTextModel,
    tokenizer: &ClipTokenizer,
    texts: &[String],
    layer: HiddenLayer,
    clip_skip: Option<usize>,
    device: &Device,
) -> Result<Vec<(Tensor, Option<Tensor>)>> {
    let per_text: Vec<Vec<PromptChunk>> =
        texts.iter().map(|t| prompt::a1111_chunks(tokenizer, t)).collect::<Result<_>>()?;
    let count = per_text.iter().map(Vec::len).max().unwrap_or(1);
    let empty = PromptChunk::empty(tokenizer.chunk_frame()?);
    let mut out = Vec::with_capacity(texts.len());
    for chunks in per_text {
        let mut hidden = Vec::with_capacity(count);
        let mut first_pooled = None;
        for chunk in chunks.iter().chain(std::iter::repeat(&empty)).take(count) {
            let (h, pooled) = encode_chunk(clip, chunk, layer, clip_skip, device)?;
            hidden.push(h);
            first_pooled.get_or_insert(pooled);
        }
        out.push((Tensor::cat(&hidden, 1)?, first_pooled.flatten()));
    }
    Ok(out)
}

/// One A1111 chunk through CLIP: the hidden state (`layer`, or the clip skip's) with the chunk's
/// emphasis applied (skipped where every weight is 1, where it is the identity), and the
/// projected pooled output.
fn encode_chunk(
    clip: &ClipTextModel,
    chunk: &PromptChunk,
    layer: HiddenLayer,
    clip_skip: Option<usize>,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let ids = Tensor::new(chunk.ids.as_slice(), device)?.unsqueeze(0)?;
    let o = clip.forward(&ids)?;
    let hidden = match (clip_skip, layer) {
        (Some(skip), _) if skip > 1 => clip.forward_clip_skip(&ids, skip)?,
        (_, HiddenLayer::Last) => o.last_hidden_state,
        (_, HiddenLayer::Penultimate) => o.penultimate_hidden_state,
    };
    let hidden = if chunk.unweighted() { hidden } else { prompt::apply_emphasis(&hidden, &chunk.multipliers)? };
    Ok((hidden, o.text_embeds))
}

/// What diffusers' cut at 77 tokens drops, for the warning: `: "…"` with the words cut (each
/// token decoded is not at hand, so the words are found by re-tokenizing word prefixes), and the
/// way to keep them.
fn dropped_text(tokenizer: &ClipTokenizer, text: &str) -> Result<String> {
    let keep = tokenizer.max_length() - 2;
    // The shortest prefix of words whose tokens overflow: the words from there on are cut.
    let words: Vec<(usize, &str)> =
        text.split_whitespace().map(|w| (w.as_ptr() as usize - text.as_ptr() as usize, w)).collect();
    let mut cut_at = None;
    for &(start, w) in &words {
        let end = start + w.len();
        if tokenizer.content_ids(&text[..end])?.len() > keep {
            cut_at = Some(start);
            break;
        }
    }
    Ok(match cut_at {
        Some(start) => format!(
            " (from about \"{}\"; {PROMPT_STYLE} a1111 encodes all of it in chunks of 75)",
            abbreviate(&text[start..], 60)
        ),
        None => String::new(),
    })
}

/// `text` cut to `max_chars` characters with an ellipsis.
fn abbreviate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(max_chars).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(projection: bool, join: ContextJoin) -> TextEncoderSpec {
        TextEncoderSpec {
            component: "text_encoder",
            tokenizer: "tokenizer",
            arch: TextEncoderArch::Clip,
            layer: HiddenLayer::Last,
            projection,
            join,
            optional: false,
        }
    }

    fn encoded(tokens: usize, width: usize, value: f32, pooled: Option<usize>) -> Encoded {
        let t = |shape: &[usize]| Tensor::full(value, shape, &Device::Cpu).unwrap();
        let per_prompt = |shape: &[usize]| vec![t(shape), t(shape)];
        Encoded { hidden: per_prompt(&[1, tokens, width]), pooled: pooled.map_or(Vec::new(), |d| per_prompt(&[1, d])) }
    }

    /// SDXL's shape: states side by side along the channels, the projected encoder's pooled text.
    #[test]
    fn channel_encoders_sit_side_by_side() {
        let (a, b) = (spec(false, ContextJoin::Channels), spec(true, ContextJoin::Channels));
        let outputs = [(&a, encoded(3, 2, 1.0, None)), (&b, encoded(3, 4, 2.0, Some(5)))];
        let (hidden, pooled) = combine(&outputs, 2, false).unwrap();
        assert_eq!(hidden[1].dims(), &[1, 3, 6]);
        let row: Vec<f32> = hidden[1].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&row[..6], &[1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
        assert_eq!(pooled.unwrap()[0].dims(), &[1, 5]);
    }

    /// A token-joined encoder follows along the tokens, the narrower zero-padded (SD 3's T5).
    #[test]
    fn token_encoders_follow_padded() {
        let (a, t5) = (spec(true, ContextJoin::Channels), spec(false, ContextJoin::Tokens));
        let outputs = [(&a, encoded(2, 2, 1.0, Some(2))), (&t5, encoded(3, 4, 3.0, None))];
        let (hidden, _) = combine(&outputs, 2, true).unwrap();
        assert_eq!(hidden[1].dims(), &[1, 5, 4]);
        let v: Vec<f32> = hidden[1].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&v[..4], &[1.0, 1.0, 0.0, 0.0]);
        assert_eq!(&v[8..12], &[3.0; 4]);
        // The zeroed negative half.
        assert_eq!(hidden[0].abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}

#[cfg(test)]
#[path = "conditioning_prompt_tests.rs"]
mod prompt_tests;
