//! Pipelines (text-to-image, image-to-image): a validated request in, finished images out, each
//! stage (text encoders → [VAE encoder →] denoiser → VAE) loaded, used and dropped in its own
//! scope — the lifecycle the memory manager drives. The stages both share are in `stages.rs`;
//! the passes after an image is made (upscaling, the hires pass) in `upscale.rs`.

mod cancel;
mod conditioning;
mod img2img;
mod refine_image;
mod stages;
mod tiles;
mod txt2img;
mod upscale;
mod warm;

use std::collections::BTreeMap;

use candle_core::{DType, Device};

pub use crate::loading::family::Handoff;
pub use cancel::CancelToken;
pub use conditioning::{AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE};
pub use img2img::{
    check_strength, img2img, preprocess, resolve_img2img, skipped_steps, skipped_steps_flow, skipped_steps_for,
    Img2ImgRequest, Img2ImgSettings, InitImage, DEFAULT_STRENGTH,
};
pub use refine_image::{resolve_image_refiner, txt2img_image_refined, ImageRefiner};
pub use stages::{BEFORE_GENERATION, INJECT_OOM_VAR};
pub use tiles::{tile_starts, DenoiseTiles, Tile, TileLayout, TILE_OVERLAP};
pub use txt2img::{
    check_refiner, refiner_handoff, txt2img, txt2img_refined, txt2img_with_refiner, Refinement, Refiner, RefinerRun,
    DEFAULT_HIGH_NOISE_FRACTION,
};
pub use upscale::{check_upscale, hires_pass, resolve_hires, upscale, UPSCALE_FACTORS, UPSCALE_STAGE, UPSCALE_STEPS};
pub use warm::{Eviction, JobStage, WarmEntry, WarmReport, WarmWeights, WeightCounts, WeightKey, WeightUse};

use crate::error::field::{GUIDANCE, SCHEDULER};
use crate::loading::family::{HiddenLayer, TextEncoderArch};
use crate::loading::ModelFolder;
use crate::schedulers::{RunInputs, SchedulerConfig, SchedulerKind};
use crate::tokenizer::T5_MAX_LENGTH;
use crate::{Error, Result};

/// Largest image side accepted; beyond it even the planner-to-come could not help.
pub const MAX_SIDE_PIXELS: usize = 16384;

/// What the user asked for. `None` fields take the model family's defaults.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Request {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt; `None` means none (an unconditional embedding of "").
    pub negative_prompt: Option<String>,
    /// Number of images.
    pub n: usize,
    /// Seed of image 0; image `i` uses `seed + i`.
    pub seed: u64,
    /// Denoising steps.
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (≤ 1 disables guidance, as in diffusers).
    pub guidance: Option<f64>,
    /// Image width in pixels.
    pub width: Option<usize>,
    /// Image height in pixels.
    pub height: Option<usize>,
    /// Scheduler; `None` uses the model's own (`scheduler/scheduler_config.json`).
    pub scheduler: Option<SchedulerKind>,
    /// The options only some families honour (SD 3's T5 and skip-layer guidance).
    pub family_options: FamilyOptions,
    /// How the prompts are read (A1111's syntax and chunking, or diffusers'), and the clip skip.
    pub prompt_options: crate::prompt::PromptOptions,
}

/// Options of the families with a T5 encoder and an MMDiT (SD 3.5); refused for the others.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FamilyOptions {
    /// Tokens the T5 encoder reads (diffusers' `max_sequence_length`, default 256, at most 512).
    pub max_sequence_length: Option<usize>,
    /// Runs without the T5 encoder: its part of the context is zeros (diffusers'
    /// `text_encoder_3=None`), saving its ~9.5 GB (bf16) of weights and its time.
    pub no_t5: bool,
    /// Skip-layer guidance (diffusers' `skip_guidance_layers`), the quality trick Stability
    /// recommends for SD 3.5 Medium.
    pub skip_layer_guidance: Option<SkipLayerGuidance>,
}

/// Skip-layer guidance: between `start` and `stop` (fractions of the steps), each guided step
/// also runs the denoiser on the prompt with `layers` skipped and pushes the prediction away from
/// it: `pred += (pred_text − pred_skip) · scale`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SkipLayerGuidance {
    /// The transformer blocks skipped (Stability's choice for 3.5 Medium: 7, 8, 9).
    pub layers: Vec<usize>,
    /// The guidance scale (diffusers' default 2.8).
    pub scale: f64,
    /// From this fraction of the steps on (exclusive; default 0.01).
    pub start: f64,
    /// Up to this fraction (exclusive; default 0.2).
    pub stop: f64,
}

impl SkipLayerGuidance {
    /// diffusers' default `skip_layer_guidance_scale`.
    pub const DEFAULT_SCALE: f64 = 2.8;

    /// `layers` with diffusers' default scale and window.
    pub fn new(layers: Vec<usize>) -> Self {
        Self { layers, scale: Self::DEFAULT_SCALE, start: 0.01, stop: 0.2 }
    }

    /// Whether step `i` of `steps` is guided (diffusers: `steps·start < i < steps·stop`).
    pub fn applies(&self, i: usize, steps: usize) -> bool {
        let (i, n) = (i as f64, steps as f64);
        i > n * self.start && i < n * self.stop
    }
}

/// Where and in what precision to run.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The device.
    pub device: Device,
    /// The weights' and activations' dtype.
    pub dtype: DType,
    /// The memory optimisations each stage runs with (chosen by the planner).
    pub options: StageOptions,
    /// Checked before each stage and after each denoising step: a cancelled run stops there with
    /// [`Error::Cancelled`].
    pub cancel: CancelToken,
    /// The engine's warm weights, when it keeps models loaded between jobs; `None`: every stage
    /// drops its model when it ends.
    pub warm: Option<WarmWeights>,
}

impl Runtime {
    /// `dtype` on `device` with no memory optimisations.
    pub fn new(device: Device, dtype: DType) -> Self {
        Self { device, dtype, options: StageOptions::default(), cancel: CancelToken::new(), warm: None }
    }

    /// Bytes of the warm weights (0 without a store).
    pub fn warm_bytes(&self) -> u64 {
        self.warm.as_ref().map_or(0, WarmWeights::bytes)
    }

    /// f32 on the CPU.
    pub fn cpu() -> Self {
        Self::new(Device::Cpu, DType::F32)
    }
}

/// Memory optimisations a run can use; each trades speed for a lower peak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StageOptions {
    /// UNet attention over query rows in chunks of this many (bounds the score matrix).
    pub attention_slice: Option<usize>,
    /// VAE mid-block attention over query rows in chunks of this many.
    pub vae_attention_slice: Option<usize>,
    /// Run the text encoders on the CPU in f32 (the embeddings then move to the device), all but
    /// a T5 streamed on the device ([`StageOptions::text_encoder_runs_on_host`]).
    pub text_encoder_on_host: bool,
    /// Decode (and encode) one image of the batch at a time.
    pub vae_slicing: bool,
    /// Decode (and encode) in overlapping tiles of this many pixels, blended.
    pub vae_tile_px: Option<usize>,
    /// Return memory at every stage boundary twice, with a pause (the seed's aggressive mode).
    pub aggressive_cleanup: bool,
    /// The model is large (see [`crate::planning::LARGE_MODEL_BYTES`]): memory is returned aggressively
    /// before its first stage loads (the seed's `🧹 Preparing memory for large model...`).
    #[serde(default)]
    pub prepare_large_model: bool,
    /// Block streaming of the denoiser (`sdgen_models::stream`): its first this many blocks
    /// resident, the others read per use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoiser_resident_blocks: Option<usize>,
    /// Block streaming of T5 (SD 3's third text encoder), likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t5_resident_blocks: Option<usize>,
}

/// The optimisations a run can enable, in the seed's order: whether it is on, its
/// `memory_optimizations` name, and its console phrase (`  → Enabled …`).
type Optimisation = (fn(&StageOptions) -> bool, &'static str, &'static str);
const OPTIMISATIONS: [Optimisation; 5] = [
    (|o| o.attention_slice.is_some() || o.vae_attention_slice.is_some(), "attention_slicing", "attention slicing"),
    (|o| o.vae_slicing, "vae_slicing", "VAE slicing"),
    (|o| o.vae_tile_px.is_some(), "vae_tiling", "VAE tiling"),
    (|o| o.text_encoder_on_host, "text_encoder_on_cpu", "the text encoder on the CPU"),
    (|o| o.denoiser_resident_blocks.is_some() || o.t5_resident_blocks.is_some(), "block_streaming", "block streaming"),
];

/// How a model with `resident_blocks` from the options holds its blocks.
pub fn residency(resident_blocks: Option<usize>) -> sdgen_models::stream::Residency {
    match resident_blocks {
        Some(resident_blocks) => sdgen_models::stream::Residency::Streamed { resident_blocks },
        None => sdgen_models::stream::Residency::Resident,
    }
}

impl StageOptions {
    /// The optimisations the run enables, as the seed's console lines name them
    /// (`attention slicing`, `VAE slicing`, …), in the order it prints them.
    pub fn enabled(&self) -> Vec<&'static str> {
        OPTIMISATIONS.iter().filter(|(on, ..)| on(self)).map(|&(_, _, phrase)| phrase).collect()
    }

    /// Whether a text encoder of `arch` runs on the host. The one switch moves every encoder
    /// but a T5 the plan streams on the device: streamed, it needs one block of device memory,
    /// where the host would hold it whole in f32 and run it on the CPU.
    pub fn text_encoder_runs_on_host(&self, arch: TextEncoderArch) -> bool {
        self.text_encoder_on_host && !(arch == TextEncoderArch::T5 && self.t5_resident_blocks.is_some())
    }

    /// The seed's `memory_optimizations` names of what is on, plus what every run does.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = vec!["low_cpu_mem_usage", "pipeline_unloading"];
        v.extend(OPTIMISATIONS.iter().filter(|(on, ..)| on(self)).map(|&(_, name, _)| name));
        if self.aggressive_cleanup {
            v.push("aggressive_cleanup");
        }
        v
    }
}

/// The request with every default filled in and every value checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// The scheduler.
    pub scheduler: SchedulerKind,
    /// The optional encoders that do not run (`text_encoder_3` for `--no-t5` or a folder
    /// without T5): zeros take their place.
    pub skipped_encoders: Vec<&'static str>,
    /// MultiDiffusion's tiles where the pass denoises tile by tile (the `4k-ultra` preset's
    /// hires passes); `None`: the whole latent at once.
    pub denoise_tiles: Option<DenoiseTiles>,
}

/// Progress reported while generating.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// A stage begins (`text_encoder`, `vae_encoder` for img2img, `unet`, `vae`).
    StageStart(&'a str),
    /// A stage ended after `elapsed_ms`.
    StageEnd {
        /// The stage.
        stage: &'a str,
        /// Its wall time.
        elapsed_ms: f64,
    },
    /// Denoising step `index` (1-based) of `total` finished (img2img counts only the steps it
    /// runs).
    Step {
        /// Steps done.
        index: usize,
        /// Steps in all.
        total: usize,
    },
    /// One of the seed's console lines that is not a snapshot (`🧹 Cleaning memory before
    /// generation...`, `  → Enabled attention slicing`).
    Note(&'a str),
    /// A memory snapshot at one of the seed's points ("Before UNet load", "After generation", ...).
    Memory {
        /// The point.
        label: &'a str,
        /// The snapshot.
        info: &'a sdgen_memory::MemoryInfo,
    },
}

/// One finished image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// Position in the batch.
    pub index: usize,
    /// The seed of its generator.
    pub seed: u64,
    /// `height × width × 3` bytes, as diffusers' `numpy_to_pil` rounds.
    pub rgb8: Vec<u8>,
    /// The same pixels as floats in [0, 1] (diffusers' `output_type="np"`).
    pub pixels: Vec<f32>,
}

/// The result of a generation.
#[derive(Debug)]
pub struct Generation {
    /// The images, in seed order.
    pub images: Vec<GeneratedImage>,
    /// The settings used.
    pub settings: Settings,
    /// Wall time per stage.
    pub timings_ms: BTreeMap<String, f64>,
    /// Things the user should know (e.g. a truncated prompt).
    pub warnings: Vec<String>,
    /// Memory of each stage: snapshots before and after, measured peaks, timeline.
    pub memory: Vec<sdgen_memory::StageMemory>,
    /// Out-of-memory failures the run recovered from, each with the fallback it took.
    pub failures: Vec<String>,
    /// The memory options the stages actually ran with (the plan's, plus any fallback).
    pub options_used: StageOptions,
    /// The refiner's part, when one finished the run.
    pub refinement: Option<Refinement>,
    /// How each stage came by its weights (loaded, or reused warm), by stage; empty when the
    /// engine keeps no weights warm.
    pub weights: BTreeMap<String, WeightUse>,
}

/// Fills in the family's defaults and validates the request before anything is loaded.
pub fn resolve(model: &ModelFolder, req: &Request) -> Result<Settings> {
    let family = model.family();
    let bad = |field, m: String| Err(Error::invalid(field, m));
    if req.n == 0 {
        return bad("n", "must be at least 1".into());
    }
    let defaults = model.run_defaults();
    let steps = req.steps.unwrap_or(defaults.steps);
    if steps == 0 {
        return bad("steps", "must be at least 1".into());
    }
    let guidance = req.guidance.unwrap_or(defaults.guidance);
    if !guidance.is_finite() || guidance < 0.0 {
        return bad("guidance", format!("must be a number ≥ 0, got {guidance}"));
    }
    let (dw, dh) = default_size(model)?;
    let width = req.width.unwrap_or(dw);
    let height = req.height.unwrap_or(dh);
    let m = family.size_multiple;
    for (name, v) in [("width", width), ("height", height)] {
        if v == 0 || v % m != 0 {
            return bad(
                name,
                format!(
                    "{v} is not a positive multiple of {m}, which {} needs (try {})",
                    family.display,
                    ((v.max(1) + m / 2) / m).max(1) * m
                ),
            );
        }
        if v > MAX_SIDE_PIXELS {
            return bad(name, format!("{v} is larger than the supported maximum of {MAX_SIDE_PIXELS}"));
        }
    }
    let scheduler = match req.scheduler {
        // `euler` on a flow-matching model is its flow-matching Euler; other mismatches refused.
        Some(k) => SchedulerKind::for_schedule(k, family.schedule)?,
        None => {
            let cfg = scheduler_config(model)?;
            let class = cfg.class_name().unwrap_or("PNDMScheduler").to_string();
            SchedulerKind::from_class_name(&class).ok_or_else(|| {
                Error::BadModel(format!(
                    "{}/scheduler/scheduler_config.json names `{class}`, which is not supported; choose one with {SCHEDULER}",
                    model.root().display()
                ))
            })?
        }
    };
    // The schedule itself is checked now (each scheduler's step limits), not after the models load.
    build_scheduler(model, scheduler, steps, width, height)?;
    check_family_options(model, &req.family_options, guidance)?;
    check_clip_skip(model, req.prompt_options.clip_skip)?;
    let skipped_encoders = skipped_encoders(model, &req.family_options);
    // An encoder the run needs but cannot load (a single file's missing T5) is refused now, not
    // after the others have run.
    let needed = family.encoders.iter().filter(|e| !skipped_encoders.contains(&e.component));
    if let Some(e) = needed.filter_map(|e| model.unavailable(e.component)).next() {
        return Err(e);
    }
    Ok(Settings { steps, guidance, width, height, scheduler, skipped_encoders, denoise_tiles: None })
}

/// The optional encoders of `model`'s family that a run with `o` leaves out: all of them for
/// `--no-t5`, else those the folder was saved without.
pub fn skipped_encoders(model: &ModelFolder, o: &FamilyOptions) -> Vec<&'static str> {
    let family = model.family().encoders.iter().filter(|e| e.optional);
    family.filter(|e| o.no_t5 || !model.has_component(e.component)).map(|e| e.component).collect()
}

/// Whether a run of `model` at `guidance` guides classifier-free (a doubled batch, negative
/// first): above 1, as diffusers, unless the denoiser has guidance distilled into it (an LCM UNet:
/// `time_cond_proj_dim`), which takes the scale as an embedding instead (diffusers'
/// `do_classifier_free_guidance`: `guidance_scale > 1 and time_cond_proj_dim is None`).
pub fn classifier_free(model: &ModelFolder, guidance: f64) -> Result<bool> {
    Ok(guidance > 1.0 && model.denoiser_geometry()?.guidance_embedding_dim.is_none())
}

/// The request field of skip-layer guidance.
const SLG: &str = "skip_layer_guidance";

/// A1111's clip skip is SD 1.5's setting: refused for families whose encoders are not one CLIP
/// read at its last layer (SDXL already reads the penultimate ones), and outside 1..=layers.
fn check_clip_skip(model: &ModelFolder, clip_skip: Option<usize>) -> Result<()> {
    let Some(skip) = clip_skip else { return Ok(()) };
    let family = model.family();
    let sd15_like = matches!(family.encoders, [e] if e.arch == TextEncoderArch::Clip && e.layer == HiddenLayer::Last);
    if !sd15_like {
        return Err(Error::invalid(
            "clip_skip",
            format!("applies to SD 1.5's text encoder; {} conditions on other layers", family.display),
        ));
    }
    let cfg: sdgen_models::clip::ClipTextConfig = model.config(family.encoders[0].component, "config.json")?;
    if skip == 0 || skip > cfg.num_hidden_layers {
        return Err(Error::invalid(
            "clip_skip",
            format!("{skip} is outside 1..={} (1 = the last layer, A1111's default)", cfg.num_hidden_layers),
        ));
    }
    Ok(())
}

/// Refuses the T5 and skip-layer options for families without a T5 encoder or transformer
/// blocks, and values the model cannot take.
fn check_family_options(model: &ModelFolder, o: &FamilyOptions, guidance: f64) -> Result<()> {
    let family = model.family();
    let bad = |field, m: String| Err(Error::invalid(field, m));
    let has_t5 = family.encoders.iter().any(|e| e.arch == TextEncoderArch::T5);
    if !has_t5 && (o.no_t5 || o.max_sequence_length.is_some()) {
        let field = if o.no_t5 { "no_t5" } else { "max_sequence_length" };
        return bad(field, format!("applies to models with a T5 encoder (SD 3.5); {} has none", family.display));
    }
    if let Some(len) = o.max_sequence_length {
        if len == 0 || len > T5_MAX_LENGTH {
            return bad("max_sequence_length", format!("{len} is outside 1..={T5_MAX_LENGTH} (T5's limit)"));
        }
    }
    let Some(slg) = &o.skip_layer_guidance else { return Ok(()) };
    let blocks = model.denoiser_geometry()?.blocks;
    let Some(blocks) = blocks else {
        return bad(SLG, format!("skips transformer blocks of an MMDiT (SD 3.5); {} has none", family.display));
    };
    if guidance <= 1.0 {
        return bad(
            SLG,
            format!("guides alongside classifier-free guidance: it needs {GUIDANCE} above 1 (got {guidance})"),
        );
    }
    if slg.layers.is_empty() {
        return bad(SLG, "needs at least one layer".into());
    }
    if let Some(&l) = slg.layers.iter().find(|&&l| l >= blocks) {
        return bad(SLG, format!("layer {l} does not exist: the transformer has blocks 0..={}", blocks - 1));
    }
    if !(slg.scale.is_finite()
        && (0.0..=1.0).contains(&slg.start)
        && (0.0..=1.0).contains(&slg.stop)
        && slg.start < slg.stop)
    {
        return bad(
            SLG,
            format!(
                "needs a finite scale and 0 ≤ start < stop ≤ 1 (got scale {}, start {}, stop {})",
                slg.scale, slg.start, slg.stop
            ),
        );
    }
    Ok(())
}

/// The run's scheduler over `steps`, with what its config asks of the image: a flow-matching
/// config with `use_dynamic_shifting` shifts by the image's token count (SD 3's pipelines).
pub fn build_scheduler(
    model: &ModelFolder,
    kind: SchedulerKind,
    steps: usize,
    width: usize,
    height: usize,
) -> Result<Box<dyn crate::schedulers::Scheduler>> {
    let cfg = scheduler_config(model)?;
    let vae: sdgen_models::vae::VaeConfig = model.config("vae", "config.json")?;
    let tokens_per_side = vae.scale_factor() * model.denoiser_geometry()?.patch_size;
    let image_seq_len = (height / tokens_per_side) * (width / tokens_per_side);
    let inputs = RunInputs { mu: crate::schedulers::dynamic_shift_mu(&cfg, image_seq_len) };
    crate::schedulers::build_with(kind, &cfg, steps, &inputs)
}

/// The model's own scheduler configuration.
pub fn scheduler_config(model: &ModelFolder) -> Result<SchedulerConfig> {
    model
        .parse_once(&model.component_dir("scheduler")?.join("scheduler_config.json"), |p| SchedulerConfig::from_file(p))
}

/// The size the model was trained at: the denoiser's `sample_size` × the VAE's factor.
fn default_size(model: &ModelFolder) -> Result<(usize, usize)> {
    if let Some(side) = model.run_defaults().side {
        return Ok((side, side));
    }
    let denoiser = model.denoiser_geometry()?;
    let vae: sdgen_models::vae::VaeConfig = model.config("vae", "config.json")?;
    let side = denoiser.sample_size.unwrap_or(64) * vae.scale_factor();
    Ok((side, side))
}
