//! The stages every pipeline shares, as diffusers' `StableDiffusionPipeline` and
//! `StableDiffusionImg2ImgPipeline` run them: prompt encoding, the denoising loop (over the
//! family's [`Denoiser`](sdgen_models::denoiser::Denoiser)) and the VAE decode. Each loads its model, uses it and drops it before returning.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdgen_models::vae::{AutoencoderKL, VaeConfig};

use sdgen_memory::{StageMemory, StagePeak};
use sdgen_models::attention::AttentionOptions;
use sdgen_models::vae::{VaeOptions, VaeTiling};

use super::conditioning::Conditioning;
use super::tiles::DenoiseTiles;
use super::{GeneratedImage, Generation, Progress, Request, Runtime, Settings, SkipLayerGuidance, StageOptions};
use crate::loading::family::TextEncoderArch;
use crate::loading::{model_error, ModelFolder, FAMILIES};
use crate::rng::batch::BatchNoise;
use crate::schedulers::{div_scalar, Scheduler};
use crate::Result;

/// What the stages of one run recorded.
#[derive(Default)]
pub(super) struct StageLog {
    /// Wall time per stage.
    pub timings_ms: BTreeMap<String, f64>,
    /// Memory per stage.
    pub memory: Vec<StageMemory>,
    /// Out-of-memory failures and what the stage was retried with (the seed's `failures`).
    pub failures: Vec<String>,
    /// The options the stages actually ran with, merged (the planned ones plus any fallback).
    pub options_used: StageOptions,
    /// How each stage came by its weights, when the engine keeps weights warm.
    pub weights: BTreeMap<String, super::WeightUse>,
}

impl StageOptions {
    /// The leaner of both, option by option: the smaller slice or tile, any switch that either
    /// turns on. The one rule for combining options: what a run's stages used (a fallback's on top
    /// of the plan's), and a refined run's two plans (the base's and the refiner's share one
    /// runtime).
    pub fn merged(self, other: StageOptions) -> StageOptions {
        let leaner = |a: Option<usize>, b: Option<usize>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        StageOptions {
            attention_slice: leaner(self.attention_slice, other.attention_slice),
            vae_attention_slice: leaner(self.vae_attention_slice, other.vae_attention_slice),
            text_encoder_on_host: self.text_encoder_on_host || other.text_encoder_on_host,
            vae_slicing: self.vae_slicing || other.vae_slicing,
            vae_tile_px: leaner(self.vae_tile_px, other.vae_tile_px),
            aggressive_cleanup: self.aggressive_cleanup || other.aggressive_cleanup,
            prepare_large_model: self.prepare_large_model || other.prepare_large_model,
            denoiser_resident_blocks: leaner(self.denoiser_resident_blocks, other.denoiser_resident_blocks),
            t5_resident_blocks: leaner(self.t5_resident_blocks, other.t5_resident_blocks),
        }
    }
}

/// Test-only hook: `SDGEN_INJECT_OOM=<stage>` makes that stage's first attempt fail as a CUDA
/// out-of-memory error would, so the recovery path is exercised without a GPU.
pub const INJECT_OOM_VAR: &str = "SDGEN_INJECT_OOM";

/// Makes the stage's options one step leaner; `None` when nothing leaner is left. The order is
/// the planner's: cheapest first.
fn leaner(stage: &str, o: &mut StageOptions) -> Option<String> {
    let next = |slice: Option<usize>| match slice {
        None => Some(1024),
        Some(s) if s > 64 => Some(s / 4),
        Some(_) => None,
    };
    match role(stage) {
        Role::TextEncoder(arch) if o.text_encoder_runs_on_host(arch) => None,
        Role::TextEncoder(arch) => {
            o.text_encoder_on_host = true;
            // A T5 streamed on the device goes to the host whole, as the host runs encoders.
            if arch == TextEncoderArch::T5 {
                o.t5_resident_blocks = None;
            }
            Some("the text encoder on the CPU".into())
        }
        Role::Denoiser(_) => match next(o.attention_slice) {
            Some(rows) => {
                o.attention_slice = Some(rows);
                Some(format!("attention slicing ({rows} query rows at a time)"))
            }
            // Past the finest slicing: every block streamed.
            None if o.denoiser_resident_blocks != Some(0) => {
                o.denoiser_resident_blocks = Some(0);
                Some("block streaming (every block read per use)".into())
            }
            None => None,
        },
        _ => leaner_vae(stage, o),
    }
}

/// [`leaner`] for the VAE stages (a refiner's `refiner_vae*` and a hires pass's as the base's).
fn leaner_vae(stage: &str, o: &mut StageOptions) -> Option<String> {
    match split_pass(stage).1 {
        "vae" | "vae_encoder" if !o.vae_slicing => {
            o.vae_slicing = true;
            Some("VAE slicing".into())
        }
        "vae" | "vae_encoder" if o.vae_tile_px.is_none() => {
            o.vae_tile_px = Some(512);
            Some("VAE tiling (512 px tiles)".into())
        }
        "vae" | "vae_encoder" if o.vae_tile_px.is_some_and(|t| t > 256) => {
            o.vae_tile_px = Some(256);
            o.vae_attention_slice = Some(256);
            Some("VAE tiling (256 px tiles) with attention slicing".into())
        }
        _ => None,
    }
}

impl StageLog {
    /// The finished generation: the images with everything the stages recorded.
    pub(super) fn into_generation(
        self,
        images: Vec<GeneratedImage>,
        settings: Settings,
        warnings: Vec<String>,
    ) -> Generation {
        Generation {
            images,
            settings,
            timings_ms: self.timings_ms,
            warnings,
            memory: self.memory,
            failures: self.failures,
            options_used: self.options_used,
            refinement: None,
            weights: self.weights,
        }
    }
}

/// What a stage runs, from its name: the stages of text encoders and denoisers are named after
/// their components (`text_encoder_2`, `unet`; `refiner_*` in a refiner's half), as the family
/// rows list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    TextEncoder(TextEncoderArch),
    Denoiser(&'static str),
    Other,
}

/// The passes after the base's whose stages are named with a prefix (`refiner_unet`, `hires_vae`),
/// with how the console names them.
pub(super) const PASS_PREFIXES: [(&str, &str); 3] =
    [("refiner_", "refiner "), ("hires_", "hires "), ("hires2_", "second hires ")];

/// A stage's pass, as the console names it (`""` for the base's), and its component.
fn split_pass(stage: &str) -> (&'static str, &str) {
    PASS_PREFIXES
        .iter()
        .find_map(|&(prefix, display)| stage.strip_prefix(prefix).map(|c| (display, c)))
        .unwrap_or(("", stage))
}

fn role(stage: &str) -> Role {
    let component = split_pass(stage).1;
    if let Some(f) = FAMILIES.iter().find(|f| f.denoiser.component == component) {
        Role::Denoiser(f.denoiser.display)
    } else if let Some(e) = FAMILIES.iter().flat_map(|f| f.encoders).find(|e| e.component == component) {
        Role::TextEncoder(e.arch)
    } else {
        Role::Other
    }
}

/// How a stage is named in the seed's console lines ("text encoder 2", "refiner UNet").
fn display_name(stage: &str) -> String {
    let (pass, component) = split_pass(stage);
    let name = match (role(stage), component) {
        (Role::Denoiser(display), _) => display.to_string(),
        (Role::TextEncoder(_), c) => c.replace('_', " "),
        (Role::Other, "vae_encoder") => "VAE encoder".into(),
        (Role::Other, "vae") => "VAE".into(),
        (Role::Other, _) => return "model".into(),
    };
    format!("{pass}{name}")
}

/// The seed's memory point just before the first denoising step (after the denoiser's load and
/// cleanup): where progress readers start timing the steps.
pub const BEFORE_GENERATION: &str = "Before generation";

/// Reports a memory snapshot at one of the seed's points, and returns it.
pub(super) fn memory_point(progress: &mut dyn FnMut(Progress), label: &str) -> sdgen_memory::MemoryInfo {
    let info = sdgen_memory::memory_info();
    progress(Progress::Memory { label, info: &info });
    info
}

/// The seed's lines before a generation's first model loads: the aggressive cleanup for a large
/// model (`🧹 Preparing memory for large model...`, as the plan decided), the snapshot before
/// loading, and one `  → Enabled …` line per memory optimisation the run enables.
pub(super) fn before_models(rt: &Runtime, progress: &mut dyn FnMut(Progress)) -> sdgen_memory::MemoryInfo {
    if rt.options.prepare_large_model {
        progress(Progress::Note("🧹 Preparing memory for large model..."));
        sdgen_memory::cleanup_memory(true);
    }
    let before = memory_point(progress, "Before model load");
    for what in rt.options.enabled() {
        progress(Progress::Note(&format!("  → Enabled {what}")));
    }
    before
}

/// What a base pipeline left in memory once unloaded, before a refiner loads.
#[derive(Debug, Clone)]
pub(super) struct Unload {
    /// The snapshot after the unload.
    pub memory_after: sdgen_memory::MemoryInfo,
    /// In-use memory above what was in use before the base loaded anything: the device's on a
    /// GPU, the process's resident set otherwise.
    pub resident_bytes: u64,
    /// Whether its weights are gone: what is left is under a quarter of its denoiser's weights
    /// (and under the allocator's slack of [`UNLOAD_SLACK_BYTES`] for small models).
    pub unloaded: bool,
}

/// Memory an unloaded pipeline may still show without holding a model: allocator pools and
/// arenas, library handles, the decoded images.
pub(super) const UNLOAD_SLACK_BYTES: u64 = 64 << 20;

/// Measures the unload: `before` the base loaded, `after` it was dropped and memory returned,
/// `denoiser_bytes` the base denoiser's weights, `kept_bytes` the weights its stages kept warm
/// on purpose (a long-lived engine's, which the plan has room for beside the refiner).
pub(super) fn measure_unload(
    before: &sdgen_memory::MemoryInfo,
    after: sdgen_memory::MemoryInfo,
    denoiser_bytes: u64,
    kept_bytes: u64,
) -> Unload {
    let in_use = |m: &sdgen_memory::MemoryInfo, gpu: bool| match (&m.gpu, gpu) {
        (Some(g), true) => g.used_bytes,
        _ => m.process_rss_bytes,
    };
    let gpu = before.gpu.is_some() && after.gpu.is_some();
    let resident_bytes = in_use(&after, gpu).saturating_sub(in_use(before, gpu)).saturating_sub(kept_bytes);
    let unloaded = resident_bytes <= (denoiser_bytes / 4).max(UNLOAD_SLACK_BYTES);
    Unload { memory_after: after, resident_bytes, unloaded }
}

/// Reports the snapshot right after a stage's model is loaded.
pub(super) fn loaded(progress: &mut dyn FnMut(Progress), stage: &str) {
    memory_point(progress, &format!("After {} load", display_name(stage)));
}

/// Runs `body` as the stage `name`: reports its start and end, measures its wall time and its
/// memory peaks (process and GPU), and after the body has dropped its model gives the memory
/// back (`cleanup_memory`: allocator trim, CUDA pool trim) before the next stage loads.
///
/// A device out-of-memory error is recovered from: everything of the attempt is dropped, memory
/// is returned aggressively, and the stage runs again with the next leaner options; the failure
/// and the fallback are recorded in `log.failures`. The body gets the runtime to use.
pub(super) fn stage<T>(
    name: &str,
    progress: &mut dyn FnMut(Progress),
    log: &mut StageLog,
    rt: &Runtime,
    mut body: impl FnMut(&Runtime, &mut dyn FnMut(Progress)) -> Result<T>,
) -> Result<T> {
    // Between stages: nothing of this one is loaded yet.
    rt.cancel.check()?;
    progress(Progress::StageStart(name));
    memory_point(progress, &format!("Before {} load", display_name(name)));
    let peak = StagePeak::start(name);
    let start = Instant::now();
    let mut run = rt.clone();
    let mut inject = std::env::var(INJECT_OOM_VAR).is_ok_and(|v| v == name);
    let out = loop {
        let result = if std::mem::take(&mut inject) {
            Err(crate::Error::Candle(candle_core::Error::Msg(format!(
                "CUDA_ERROR_OUT_OF_MEMORY (injected by {INJECT_OOM_VAR} for tests)"
            ))))
        } else {
            body(&run, progress)
        };
        // The stage's model is gone (or warm, on purpose): return its memory whether the stage
        // succeeded or not.
        sdgen_memory::cleanup_memory(run.options.aggressive_cleanup || result.is_err());
        if let Some(warm) = &rt.warm {
            log.weights.extend(warm.take_uses());
        }
        match result {
            Err(e) if e.is_out_of_memory() => match leaner(name, &mut run.options) {
                Some(fallback) => {
                    // Nothing warm stays in the way of the retry.
                    if let Some(eviction) = rt.warm.as_ref().and_then(|w| w.clear(&format!("{name} ran out of memory")))
                    {
                        progress(Progress::Note(&eviction.to_string()));
                    }
                    // The first line only: candle may append a backtrace to device errors.
                    let what = e.to_string();
                    let what = what.lines().next().unwrap_or_default().trim_end();
                    log.failures.push(format!("{name}: {what}; retried with {fallback}"))
                }
                None => return Err(e),
            },
            other => break other?,
        }
    };
    log.options_used = log.options_used.merged(run.options);
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    log.memory.push(peak.finish());
    log.timings_ms.insert(name.to_string(), ms);
    progress(Progress::StageEnd { stage: name, elapsed_ms: ms });
    memory_point(progress, &format!("After {}", display_name(name)));
    Ok(out)
}

/// The denoising loop over `timesteps()[steps]` (txt2img runs them all, img2img and a refiner
/// start later, a base handing over to a refiner stops early): classifier-free guidance when `guidance > 1`, one scheduler step per timestep, the
/// ancestral noise drawn from `generators`. Reports each step, numbered from 1.
#[allow(clippy::too_many_arguments)]
pub(super) fn denoise(
    stage_name: &str,
    model: &ModelFolder,
    scheduler: &mut dyn Scheduler,
    steps: std::ops::Range<usize>,
    mut latents: Tensor,
    cond: &Conditioning,
    guide: &Guide,
    generators: &mut BatchNoise,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let (guidance, cfg_guidance) = (guide.scale, super::classifier_free(model, guide.scale)?);
    // Skip-layer guidance runs on the prompt's half of the conditioning.
    let positive = match guide.skip_layers {
        Some(_) if cfg_guidance => Some(second_half(cond)?),
        _ => None,
    };
    // A denoiser with distilled guidance (LCM) takes the scale as an embedding, made once before
    // the loop as diffusers' pipelines make `timestep_cond` from `guidance_scale − 1`.
    let embedded;
    let cond = match model.denoiser_geometry()?.guidance_embedding_dim {
        Some(dim) => {
            let w = sdgen_models::unet::guidance_scale_embedding(guidance - 1.0, latents.dim(0)?, dim, &rt.device)?;
            embedded = Conditioning { timestep_cond: Some(w.to_dtype(rt.dtype)?), ..cond.clone() };
            &embedded
        }
        None => cond,
    };
    let residency = super::residency(rt.options.denoiser_resident_blocks);
    let load = || model.load_denoiser_with(rt.dtype, &rt.device, residency);
    let key = || super::WeightKey::new(model, model.denoiser_component(), rt.dtype, &rt.device);
    let denoiser = rt.load_weights_as(stage_name, residency, key, load)?;
    denoiser.set_attention_options(AttentionOptions { slice: rt.options.attention_slice });
    loaded(progress, stage_name);
    // The seed's points around the denoising loop: the model is loaded, memory is cleaned, and
    // generation starts.
    memory_point(progress, "After model load");
    progress(Progress::Note("🧹 Cleaning memory before generation..."));
    sdgen_memory::cleanup_memory(rt.options.aggressive_cleanup);
    memory_point(progress, BEFORE_GENERATION);
    let timesteps = scheduler.timesteps().to_vec();
    let steps = steps.start..steps.end.min(timesteps.len());
    let (first_step, total) = (steps.start, steps.len());
    // Progress counts steps, not evaluations: a scheduler's warm-up evaluations (PNDM's doubled
    // timestep) are not steps of their own, as in diffusers' bar (`num_warmup_steps`, the run's
    // timesteps less its steps, also for image-to-image's shorter runs).
    let warmup = scheduler.warmup_evaluations().min(total.saturating_sub(1));
    // MultiDiffusion: a pass above the model's native size denoises tile by tile.
    let (_, _, height, width) = latents.dims4()?;
    let tiles = guide.tiles.map(|t| t.layout(height, width));
    if let Some(layout) = &tiles {
        progress(Progress::Note(&format!("  → MultiDiffusion: {} per step", layout.describe())));
    }
    for (i, &t) in timesteps.iter().enumerate().take(steps.end).skip(first_step) {
        // The guided prediction for `x`, the whole latent or one tile of it.
        let predict = |x: &Tensor| -> Result<Tensor> {
            let input = if cfg_guidance { Tensor::cat(&[x, x], 0)? } else { x.clone() };
            let input = scheduler.scale_model_input(&input, i)?;
            // The timestep as f64 values, exactly as the scheduler holds it.
            let timesteps = Tensor::full(t, input.dim(0)?, &Device::Cpu)?;
            let pred = denoiser.forward(&input, &timesteps, cond)?;
            if !cfg_guidance {
                return Ok(pred);
            }
            let parts = pred.chunk(2, 0)?;
            let guided = (&parts[0] + ((&parts[1] - &parts[0])? * guidance)?)?;
            Ok(match (guide.skip_layers, &positive) {
                (Some(slg), Some(positive)) if slg.applies(i, guide.steps) => {
                    let t = Tensor::full(t, x.dim(0)?, &Device::Cpu)?;
                    let skipped = denoiser.forward_skipping(x, &t, positive, &slg.layers)?;
                    (guided + ((&parts[1] - skipped)? * slg.scale)?)?
                }
                _ => guided,
            })
        };
        let pred = match &tiles {
            Some(layout) => layout.blend(&latents, predict)?,
            None => predict(&latents)?,
        };
        latents = scheduler.step(&pred, i, &latents, generators)?;
        let done = i + 1 - first_step;
        if done > warmup {
            progress(Progress::Step { index: done - warmup, total: total - warmup });
        }
        // Between steps: the denoiser is dropped on the way out, and `stage` returns its memory.
        rt.cancel.check()?;
    }
    memory_point(progress, "After generation");
    Ok(latents)
}

/// How the denoising loop guides: the classifier-free scale (> 1 guides) and, for the
/// families that have it, skip-layer guidance over a run of `steps` steps; and whether it
/// denoises in MultiDiffusion's tiles (a pass above the model's native size).
pub(super) struct Guide<'a> {
    pub scale: f64,
    pub skip_layers: Option<&'a SkipLayerGuidance>,
    pub steps: usize,
    pub tiles: Option<DenoiseTiles>,
}

impl<'a> Guide<'a> {
    /// The guidance of `settings` for a run of `req`.
    pub fn new(settings: &Settings, req: &'a Request) -> Self {
        Self {
            scale: settings.guidance,
            skip_layers: req.family_options.skip_layer_guidance.as_ref(),
            steps: settings.steps,
            tiles: settings.denoise_tiles,
        }
    }
}

/// The prompt's (second) half of a guided batch's conditioning.
fn second_half(cond: &Conditioning) -> Result<Conditioning> {
    let half = |t: &Tensor| -> Result<Tensor> {
        let n = t.dim(0)? / 2;
        Ok(t.narrow(0, n, n)?)
    };
    Ok(Conditioning {
        context: half(&cond.context)?,
        pooled: cond.pooled.as_ref().map(half).transpose()?,
        time_ids: cond.time_ids.as_ref().map(half).transpose()?,
        timestep_cond: cond.timestep_cond.as_ref().map(half).transpose()?,
    })
}

/// Decodes latents (as the stage `stage_name`) and post-processes as diffusers:
/// `(x / 2 + 0.5).clamp(0, 1)`, as `[n, h, w, 3]` f32 on the CPU.
pub(super) fn decode(
    stage_name: &str,
    model: &ModelFolder,
    vae_cfg: &VaeConfig,
    latents: Tensor,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let dtype = decode_dtype(model, vae_cfg, rt.dtype);
    let vae = load_vae(stage_name, model, vae_cfg, VaePart::Decoder, dtype, rt, progress)?;
    // diffusers casts to the VAE's dtype first (SDXL's f16 upcast), then divides in that dtype
    // with torch's f32 scalar arithmetic.
    let z = div_scalar(&latents.to_dtype(dtype)?, vae_cfg.scaling_factor as f32)?;
    let z = match vae_cfg.shift_factor {
        Some(s) => z.to_dtype(DType::F32)?.affine(1.0, s)?.to_dtype(dtype)?,
        None => z,
    };
    let image = vae.decode_with(&z, &vae_options(vae_cfg, rt))?;
    Ok(((image / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?)
}

/// The half of the VAE a stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VaePart {
    /// Image-to-image's encoding of the init image.
    Encoder,
    /// The decode of the latents.
    Decoder,
}

/// `model`'s VAE half `part` in `dtype` for the stage `stage_name` (warm when the engine keeps
/// it: the planner's `vae_encoder` and `vae_decoder` are components of their own), with the
/// run's attention slicing, reported loaded.
pub(super) fn load_vae(
    stage_name: &str,
    model: &ModelFolder,
    vae_cfg: &VaeConfig,
    part: VaePart,
    dtype: DType,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<std::sync::Arc<AutoencoderKL>> {
    let (component, encoder) = match part {
        VaePart::Encoder => ("vae_encoder", true),
        VaePart::Decoder => ("vae_decoder", false),
    };
    let vae = rt.load_weights(
        stage_name,
        || super::WeightKey::new(model, component, dtype, &rt.device),
        || {
            let weights = model.weights("vae")?;
            AutoencoderKL::new(vae_cfg, encoder, !encoder, weights.var_builder(dtype, &rt.device)?)
                .map_err(|e| model_error(&weights, "an AutoencoderKL VAE", e))
        },
    )?;
    vae.set_attention_options(AttentionOptions { slice: rt.options.vae_attention_slice });
    loaded(progress, stage_name);
    Ok(vae)
}

/// The dtype the VAE decodes in: the families that honour `force_upcast` (SDXL's pipelines)
/// upcast an f16 VAE whose config says so to f32 (its activations overflow f16); bf16 and the
/// others (SD 1.5) stay as they are.
pub(super) fn decode_dtype(model: &ModelFolder, vae_cfg: &VaeConfig, dtype: DType) -> DType {
    if model.family().vae.honours_force_upcast && dtype == DType::F16 && vae_cfg.force_upcast.unwrap_or(true) {
        DType::F32
    } else {
        dtype
    }
}

/// The VAE options of the run (the convolutions bound their own kernel calls, see
/// `sdgen_models::ops::conv::Conv2d`, so the plan's options are the only ones).
pub(super) fn vae_options(vae_cfg: &VaeConfig, rt: &Runtime) -> VaeOptions {
    VaeOptions {
        slicing: rt.options.vae_slicing,
        tiling: rt.options.vae_tile_px.map(|px| VaeTiling::with_tile_size(vae_cfg, px)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn testdata(name: &str) -> std::path::PathBuf {
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata")).join(name)
    }

    /// SDXL's pipelines decode an f16 run with the VAE in f32 when its config says
    /// `force_upcast` (SDXL's VAE overflows f16); bf16, f32, a VAE without the flag set and SD 1.5
    /// keep the run's dtype.
    #[test]
    fn only_sdxl_upcasts_an_f16_vae() {
        let sdxl = ModelFolder::open(&testdata("tiny-sdxl")).unwrap();
        let sd15 = ModelFolder::open(&testdata("tiny-sd15")).unwrap();
        let cfg: VaeConfig = sdxl.config("vae", "config.json").unwrap();
        assert_eq!(cfg.force_upcast, Some(true));
        assert_eq!(decode_dtype(&sdxl, &cfg, DType::F16), DType::F32);
        assert_eq!(decode_dtype(&sdxl, &cfg, DType::BF16), DType::BF16);
        assert_eq!(decode_dtype(&sdxl, &cfg, DType::F32), DType::F32);
        let fp16_fix = VaeConfig { force_upcast: Some(false), ..cfg.clone() };
        assert_eq!(decode_dtype(&sdxl, &fp16_fix, DType::F16), DType::F16);
        assert_eq!(decode_dtype(&sd15, &cfg, DType::F16), DType::F16);
    }

    /// The console names of the seed, now derived from the rows' components.
    #[test]
    fn stages_are_named_and_made_leaner_by_role() {
        for (stage, name) in [
            ("text_encoder", "text encoder"),
            ("text_encoder_2", "text encoder 2"),
            ("refiner_text_encoder_2", "refiner text encoder 2"),
            ("vae_encoder", "VAE encoder"),
            ("unet", "UNet"),
            ("refiner_unet", "refiner UNet"),
            ("hires_unet", "hires UNet"),
            ("hires_vae_encoder", "hires VAE encoder"),
            ("vae", "VAE"),
            ("scheduler", "model"),
        ] {
            assert_eq!(display_name(stage), name);
        }
        let mut o = StageOptions::default();
        assert!(leaner("refiner_unet", &mut o).is_some_and(|f| f.contains("attention slicing")));
        assert!(leaner("refiner_text_encoder_2", &mut o).is_some() && o.text_encoder_on_host);
        // A refiner's own VAE stages (image handoff) fall back as the base's.
        assert!(leaner("refiner_vae_encoder", &mut o).is_some_and(|f| f.contains("VAE slicing")) && o.vae_slicing);
        assert_eq!(display_name("refiner_vae"), "refiner VAE");
        assert_eq!(leaner("text_encoder", &mut o), None);
        assert_eq!(leaner("scheduler", &mut o), None);
        // The host switch moves a T5 only when it is not streamed on the device; T5's own
        // fallback takes it to the host whole.
        let mut o = StageOptions { text_encoder_on_host: true, t5_resident_blocks: Some(2), ..Default::default() };
        assert!(o.text_encoder_runs_on_host(TextEncoderArch::Clip));
        assert!(!o.text_encoder_runs_on_host(TextEncoderArch::T5));
        assert!(leaner("text_encoder_3", &mut o).is_some() && o.t5_resident_blocks.is_none());
        assert!(o.text_encoder_runs_on_host(TextEncoderArch::T5) && leaner("text_encoder_3", &mut o).is_none());
        // A hires pass's stages fall back as the base's.
        let mut o = StageOptions::default();
        assert!(leaner("hires_vae", &mut o).is_some_and(|f| f.contains("VAE slicing")));
        assert!(leaner("hires_unet", &mut o).is_some_and(|f| f.contains("attention slicing")));
    }
}

#[cfg(test)]
mod unload_tests {
    use super::*;
    use sdgen_memory::{GpuMemory, MemoryInfo};

    fn info(rss: u64, gpu_used: Option<u64>) -> MemoryInfo {
        MemoryInfo {
            process_rss_bytes: rss,
            process_vms_bytes: 0,
            system_used_bytes: 0,
            system_available_bytes: 0,
            system_total_bytes: 0,
            system_percent: 0.0,
            gpu: gpu_used.map(|used_bytes| GpuMemory { used_bytes, free_bytes: 0, total_bytes: 0 }),
        }
    }

    #[test]
    fn an_unload_is_measured_on_the_memory_that_held_the_model() {
        const GB: u64 = 1 << 30;
        // A 5 GB UNet on a GPU, all returned: a few MB of pool left on the device.
        let u = measure_unload(&info(GB, Some(GB)), info(3 * GB, Some(GB + (10 << 20))), 5 * GB, 0);
        assert!(u.unloaded && u.resident_bytes == 10 << 20, "{u:?}");
        // Still resident: the device holds the weights (host memory is not what counts there).
        let u = measure_unload(&info(GB, Some(GB)), info(GB, Some(6 * GB)), 5 * GB, 0);
        assert!(!u.unloaded && u.resident_bytes == 5 * GB, "{u:?}");
        // The CPU: the resident set; a tiny model's allocator slack is not a model.
        let u = measure_unload(&info(GB, None), info(GB + (5 << 20), None), 1 << 20, 0);
        assert!(u.unloaded, "{u:?}");
        let u = measure_unload(&info(GB, None), info(2 * GB, None), 5 * GB, 0);
        assert!(u.unloaded, "under a quarter of the weights: {u:?}");
        let u = measure_unload(&info(GB, None), info(4 * GB, None), 5 * GB, 0);
        assert!(!u.unloaded, "{u:?}");
        // The same, of which the engine kept 3 GB warm on purpose: nothing else was left.
        let u = measure_unload(&info(GB, None), info(4 * GB, None), 5 * GB, 3 * GB);
        assert!(u.unloaded && u.resident_bytes == 0, "{u:?}");
    }
}
