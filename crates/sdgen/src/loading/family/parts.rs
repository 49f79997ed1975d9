//! The typed parts of a family row: what its denoiser, text encoders, conditioning, latents, VAE
//! and schedule are. Each pipeline decision that differs between families reads one of these
//! fields; none compares a family's name.

use sdgen_memory::plan::FamilyProfile;

/// A family's denoiser: the folder it is stored in and the architecture that runs it.
#[derive(Debug, Clone, Copy)]
pub struct DenoiserSpec {
    /// Its component folder (`unet`; SD 3's is `transformer`). The denoising stage is named
    /// after it too (`unet`, `refiner_unet`).
    pub component: &'static str,
    /// How its stage is named in console lines ("UNet").
    pub display: &'static str,
    /// The architecture behind `sdgen_models::denoiser::Denoiser`.
    pub arch: DenoiserArch,
}

/// The denoiser architectures this build knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenoiserArch {
    /// diffusers' `UNet2DConditionModel` (SD 1.x, SDXL base and refiner).
    UNet2DCondition,
    /// diffusers' `SD3Transformer2DModel`, the MMDiT of SD 3 / 3.5 (MMDiT-X for 3.5 Medium).
    SD3Transformer2D,
}

/// The text encoder architectures (each brings its tokenizer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderArch {
    /// transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`, with the CLIP BPE tokenizer.
    Clip,
    /// transformers' `T5EncoderModel` (SD 3's T5-XXL), with its `tokenizer.json` (Unigram).
    T5,
}

/// Which hidden state of an encoder conditions the denoiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLayer {
    /// The final layer's output, after the final norm (SD 1.x).
    Last,
    /// `hidden_states[-2]`, before the final norm (SDXL, SD 3).
    Penultimate,
}

/// How an encoder's hidden states join the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextJoin {
    /// Side by side with the other `Channels` encoders' states, along the channels (SDXL's
    /// `torch.concat(prompt_embeds_list, dim=-1)`).
    Channels,
    /// After them along the tokens, the narrower of the two zero-padded to the wider's channels
    /// (SD 3's T5 states after its CLIP states).
    Tokens,
}

/// One text encoder of a family, as data.
#[derive(Debug, Clone, Copy)]
pub struct TextEncoderSpec {
    /// Its component folder (`text_encoder_2`); its stage has the same name.
    pub component: &'static str,
    /// Its tokenizer's folder (`tokenizer_2`).
    pub tokenizer: &'static str,
    /// What runs it.
    pub arch: TextEncoderArch,
    /// Which hidden state conditions the denoiser.
    pub layer: HiddenLayer,
    /// Whether its projected pooled output conditions the denoiser too (SDXL's second encoder,
    /// a `CLIPTextModelWithProjection`). The pooled outputs of all such encoders are concatenated.
    pub projection: bool,
    /// How its hidden states join the context.
    pub join: ContextJoin,
    /// Whether the family runs without it (`--no-t5`, or a folder saved without it), zeros of
    /// the denoiser's context width in its place, as diffusers' SD 3 pipeline with
    /// `text_encoder_3=None`.
    pub optional: bool,
}

/// SDXL's micro-conditioning: what the `time_ids` after the original size and crop hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MicroConditioning {
    /// The target size: `[h, w, 0, 0, h, w]` (the base).
    TargetSize,
    /// The aesthetic score: `[h, w, 0, 0, score]` (the refiner).
    AestheticScore,
}

/// How the encoders' outputs become the denoiser's conditioning (beyond what each
/// [`TextEncoderSpec`] says).
#[derive(Debug, Clone, Copy)]
pub struct ConditioningSpec {
    /// The micro-conditioning numbers, if the denoiser takes them.
    pub micro: Option<MicroConditioning>,
    /// Whether `force_zeros_for_empty_prompt` of `model_index.json` is honoured: with no negative
    /// prompt, the negative half is zeros instead of the encoded "" (both SDXL pipelines).
    pub zeros_for_empty_negative: bool,
}

/// What the pipelines do with the VAE beyond its config (whose `scaling_factor` and
/// `shift_factor` they always apply).
#[derive(Debug, Clone, Copy)]
pub struct VaeSpec {
    /// Whether the config's `force_upcast` is honoured: encode in f32 under any half precision,
    /// decode in f32 under f16 (SDXL's pipelines; SD 1.5's ignore the flag).
    pub honours_force_upcast: bool,
}

/// The latent space a family's VAE encodes into (its channels, scaling and shift, and what the
/// denoiser learned of it). A base and a refiner of one space hand over latents mid-schedule
/// (SDXL's ensemble of experts); a refiner of another space takes the base's decoded images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentSpace {
    /// SD 1.x's VAE: 4 channels, scaling 0.18215.
    Sd1,
    /// SDXL's VAE, shared by its base and refiner: 4 channels, scaling 0.13025.
    Sdxl,
    /// SD 3's VAE: 16 channels, scaling 1.5305, shift 0.0609.
    Sd3,
}

/// How a refiner takes over a base's run ([`super::FamilySpec::handoff_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Handoff {
    /// The base stops at a point of the schedule and the refiner denoises its latents on from
    /// there (diffusers' ensemble of experts: `denoising_end` / `denoising_start`).
    Latents,
    /// The base runs all its steps and decodes; the refiner encodes the images with its own VAE
    /// and reworks them by image-to-image at a strength.
    Image,
}

/// The memory planner's profile of a family (`sdgen_memory` names its constructors itself).
pub type ProfileFn = fn() -> FamilyProfile;
