//! Model families as typed rows: how each is recognised (through tables, as diffusers'
//! `CHECKPOINT_KEY_NAMES`, not an if-chain) and what it *does*: its denoiser, its text encoders
//! and how their outputs condition the denoiser, its latents, VAE rule and schedule. A diffusers
//! folder is named by the pipeline class of `model_index.json` and confirmed by marker tensors of
//! its denoiser; a single-file checkpoint is recognised by the names and shapes of its tensors
//! ([`SIGNATURES`]).

mod parts;
#[cfg(test)]
mod row_tests;
mod signatures;

pub use parts::{
    ConditioningSpec, ContextJoin, DenoiserArch, DenoiserSpec, Handoff, HiddenLayer, LatentSpace, MicroConditioning,
    ProfileFn, TextEncoderArch, TextEncoderSpec, VaeSpec,
};
pub use signatures::{recognise, Marker, Recognised, Signature, PART_SIGNATURES, SIGNATURES};

use sdgen_memory::plan::FamilyProfile;

use super::single_file::{self, SingleFileLayout};
#[cfg(test)]
use super::TensorInfo;
use crate::schedulers::ScheduleKind;
#[cfg(test)]
use signatures::LDM_CONV_IN;
#[cfg(test)]
use std::collections::BTreeMap;

/// One family: how it is recognised and what it needs and does.
#[derive(Debug)]
pub struct FamilySpec {
    /// Short name used on the command line and in metadata (`sd15`).
    pub name: &'static str,
    /// Human name.
    pub display: &'static str,
    /// The hub repository the name stands for (`--model sd15`).
    pub hub_repo: &'static str,
    /// `_class_name` values of `model_index.json` that belong to this family.
    pub pipeline_classes: &'static [&'static str],
    /// Tensors the denoiser must have.
    pub denoiser_markers: &'static [&'static str],
    /// Tensors whose presence means another family.
    pub denoiser_excludes: &'static [&'static str],
    /// Components `model_index.json` must name (non-null); e.g. SDXL's base has both text
    /// encoders, its refiner only the second.
    pub components: &'static [&'static str],
    /// Components it must not name (null or absent): the refiner has no `text_encoder`.
    pub absent_components: &'static [&'static str],
    /// The denoiser: its folder and architecture.
    pub denoiser: DenoiserSpec,
    /// The text encoders, in the order they run (one stage each).
    pub encoders: &'static [TextEncoderSpec],
    /// How the encoders' outputs become the conditioning.
    pub conditioning: ConditioningSpec,
    /// Channels of the latents the denoiser works on (the initial noise's).
    pub latent_channels: usize,
    /// The latent space its VAE encodes into: whether a refiner can take its latents.
    pub latent_space: LatentSpace,
    /// What the pipelines do with the VAE beyond its config.
    pub vae: VaeSpec,
    /// The schedule it was trained with.
    pub schedule: ScheduleKind,
    /// The memory planner's profile.
    pub memory_profile: ProfileFn,
    /// For a refiner, the families whose text-to-image runs it finishes (how: see
    /// [`FamilySpec::handoff_from`]); empty for the others.
    pub refines: &'static [&'static FamilySpec],
    /// `pipeline_type` recorded in the metadata.
    pub pipeline_type: &'static str,
    /// Image sides must be multiples of this (VAE factor × patch size).
    pub size_multiple: usize,
    /// Default steps when none are given (diffusers' pipeline default).
    pub default_steps: usize,
    /// Default classifier-free guidance scale.
    pub default_guidance: f64,
    /// Default image-to-image strength (diffusers' img2img pipeline default: 0.8 for SD 1.5,
    /// 0.3 for SDXL's).
    pub default_strength: f64,
    /// How its single-file checkpoints are laid out (key prefixes, renaming rules, default
    /// configs and tokenizer); `None` where only diffusers folders are supported.
    pub single_file: Option<&'static SingleFileLayout>,
}

impl FamilySpec {
    /// The row named `name` (`sdxl`).
    pub fn by_name(name: &str) -> Option<&'static FamilySpec> {
        FAMILIES.iter().find(|f| f.name == name)
    }

    /// The memory planner's profile of the family.
    pub fn memory_profile(&self) -> FamilyProfile {
        (self.memory_profile)()
    }

    /// How this refiner takes over `base`'s runs: by latents when both share a latent space, by
    /// the decoded images otherwise; `None` when it refines no run of `base`'s.
    pub fn handoff_from(&self, base: &FamilySpec) -> Option<Handoff> {
        self.refines.iter().any(|b| b.name == base.name).then(|| {
            if base.latent_space == self.latent_space {
                Handoff::Latents
            } else {
                Handoff::Image
            }
        })
    }

    /// Whether pipelines feed the denoiser pooled text embeddings (an encoder with projection).
    pub fn takes_pooled_text(&self) -> bool {
        self.encoders.iter().any(|e| e.projection)
    }
}

/// The UNet of SD 1.x and SDXL, in `unet/`.
const UNET: DenoiserSpec = DenoiserSpec { component: "unet", display: "UNet", arch: DenoiserArch::UNet2DCondition };

/// CLIP ViT-L/14 (SD 1.x's only encoder, SDXL's first).
const fn clip_l(layer: HiddenLayer) -> TextEncoderSpec {
    TextEncoderSpec {
        component: "text_encoder",
        tokenizer: "tokenizer",
        arch: TextEncoderArch::Clip,
        layer,
        projection: false,
        join: ContextJoin::Channels,
        optional: false,
    }
}

/// OpenCLIP ViT-bigG/14 with its projection (SDXL's second encoder, the refiner's only one).
const CLIP_BIG_G: TextEncoderSpec = TextEncoderSpec {
    component: "text_encoder_2",
    tokenizer: "tokenizer_2",
    arch: TextEncoderArch::Clip,
    layer: HiddenLayer::Penultimate,
    projection: true,
    join: ContextJoin::Channels,
    optional: false,
};

/// Stable Diffusion 1.5 (`StableDiffusionPipeline.encode_prompt`: CLIP's last hidden state).
pub const SD15: FamilySpec = FamilySpec {
    name: "sd15",
    display: "Stable Diffusion 1.5",
    hub_repo: "stable-diffusion-v1-5/stable-diffusion-v1-5",
    // LCM-distilled SD 1.5 folders (SimianLuo/LCM_Dreamshaper_v7) are saved as the LCM pipelines:
    // the same components, a UNet with a guidance embedding (`time_cond_proj_dim`) and an
    // LCMScheduler config.
    pipeline_classes: &[
        "StableDiffusionPipeline",
        "LatentConsistencyModelPipeline",
        "LatentConsistencyModelImg2ImgPipeline",
    ],
    denoiser_markers: &["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight"],
    denoiser_excludes: &["add_embedding.linear_1.weight"],
    components: &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
    absent_components: &[],
    denoiser: UNET,
    encoders: &[clip_l(HiddenLayer::Last)],
    conditioning: ConditioningSpec { micro: None, zeros_for_empty_negative: false },
    latent_channels: 4,
    latent_space: LatentSpace::Sd1,
    vae: VaeSpec { honours_force_upcast: false },
    schedule: ScheduleKind::Discrete,
    memory_profile: FamilyProfile::sd15,
    refines: &[],
    pipeline_type: "StableDiffusionPipeline (SD 1.5)",
    size_multiple: 8,
    default_steps: 50,
    default_guidance: 7.5,
    default_strength: 0.8,
    single_file: Some(&single_file::SD15),
};

/// SDXL base (`StableDiffusionXLPipeline.encode_prompt`): both encoders' penultimate states side
/// by side, bigG's pooled output and the size/crop/target micro-conditioning.
pub const SDXL: FamilySpec = FamilySpec {
    name: "sdxl",
    display: "Stable Diffusion XL",
    hub_repo: "stabilityai/stable-diffusion-xl-base-1.0",
    pipeline_classes: &["StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"],
    denoiser_markers: &["conv_in.weight", "time_embedding.linear_1.weight", "add_embedding.linear_1.weight"],
    denoiser_excludes: &[],
    components: &["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler"],
    absent_components: &[],
    denoiser: UNET,
    encoders: &[clip_l(HiddenLayer::Penultimate), CLIP_BIG_G],
    conditioning: ConditioningSpec { micro: Some(MicroConditioning::TargetSize), zeros_for_empty_negative: true },
    latent_channels: 4,
    latent_space: LatentSpace::Sdxl,
    vae: VaeSpec { honours_force_upcast: true },
    schedule: ScheduleKind::Discrete,
    memory_profile: FamilyProfile::sdxl,
    refines: &[],
    pipeline_type: "StableDiffusionXLPipeline (SDXL)",
    size_multiple: 8,
    default_steps: 50,
    default_guidance: 5.0,
    default_strength: 0.3,
    single_file: Some(&single_file::SDXL),
};

/// SDXL refiner (`StableDiffusionXLImg2ImgPipeline`): bigG alone, an aesthetic score in place of
/// the target size.
pub const SDXL_REFINER: FamilySpec = FamilySpec {
    name: "sdxl-refiner",
    display: "Stable Diffusion XL refiner",
    hub_repo: "stabilityai/stable-diffusion-xl-refiner-1.0",
    pipeline_classes: &["StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline"],
    denoiser_markers: &["conv_in.weight", "time_embedding.linear_1.weight", "add_embedding.linear_1.weight"],
    denoiser_excludes: &[],
    components: &["text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler"],
    absent_components: &["text_encoder"],
    denoiser: UNET,
    encoders: &[CLIP_BIG_G],
    conditioning: ConditioningSpec { micro: Some(MicroConditioning::AestheticScore), zeros_for_empty_negative: true },
    latent_channels: 4,
    latent_space: LatentSpace::Sdxl,
    vae: VaeSpec { honours_force_upcast: true },
    schedule: ScheduleKind::Discrete,
    memory_profile: FamilyProfile::sdxl_refiner,
    // SDXL's runs by latents (its own space); SD 3.5's, whose 16-channel latents it cannot read,
    // from their decoded images.
    refines: &[&SDXL, &SD35_LARGE, &SD35_MEDIUM],
    pipeline_type: "StableDiffusionXLImg2ImgPipeline (SDXL refiner)",
    size_multiple: 8,
    default_steps: 50,
    default_guidance: 5.0,
    default_strength: 0.3,
    single_file: Some(&single_file::SDXL_REFINER),
};

/// SD 3's MMDiT, in `transformer/`.
const MMDIT: DenoiserSpec =
    DenoiserSpec { component: "transformer", display: "MMDiT", arch: DenoiserArch::SD3Transformer2D };

/// SD 3's encoders (`StableDiffusion3Pipeline.encode_prompt`): CLIP-L and OpenCLIP bigG, both with
/// projections, their penultimate states side by side; T5-XXL's last state after them along the
/// tokens; the pooled text is both CLIPs' projections side by side.
const SD3_ENCODERS: &[TextEncoderSpec] = &[
    TextEncoderSpec { projection: true, ..clip_l(HiddenLayer::Penultimate) },
    CLIP_BIG_G,
    TextEncoderSpec {
        component: "text_encoder_3",
        tokenizer: "tokenizer_3",
        arch: TextEncoderArch::T5,
        layer: HiddenLayer::Last,
        projection: false,
        join: ContextJoin::Tokens,
        optional: true,
    },
];

/// The MMDiT's marker tensors: patch embedding, text embedder, RMS QK-norm (SD 3.5; SD 3.0
/// Medium has none and is not a row yet).
const SD35_MARKERS: [&str; 3] =
    ["pos_embed.proj.weight", "context_embedder.weight", "transformer_blocks.0.attn.norm_q.weight"];

/// MMDiT-X's second, image-only attention (3.5 Medium's `dual_attention_layers`).
const MMDIT_X_MARKER: &str = "transformer_blocks.0.attn2.to_q.weight";

/// Stable Diffusion 3.5 Large (and Large Turbo, the same weights' shape):
/// `StableDiffusion3Pipeline`, flow matching, 16 latent channels. Defaults: Stability's 28 steps
/// at guidance 3.5 (the seed's `--pro`).
pub const SD35_LARGE: FamilySpec = FamilySpec {
    name: "sd35-large",
    display: "Stable Diffusion 3.5 Large",
    hub_repo: "stabilityai/stable-diffusion-3.5-large",
    pipeline_classes: &["StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"],
    denoiser_markers: &SD35_MARKERS,
    denoiser_excludes: &[MMDIT_X_MARKER],
    components: &["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae", "scheduler"],
    absent_components: &[],
    denoiser: MMDIT,
    encoders: SD3_ENCODERS,
    conditioning: ConditioningSpec { micro: None, zeros_for_empty_negative: false },
    latent_channels: 16,
    latent_space: LatentSpace::Sd3,
    vae: VaeSpec { honours_force_upcast: false },
    schedule: ScheduleKind::FlowMatching,
    memory_profile: FamilyProfile::sd35_large,
    refines: &[],
    pipeline_type: "StableDiffusion3Pipeline (SD 3.5)",
    size_multiple: 16,
    default_steps: 28,
    default_guidance: 3.5,
    default_strength: 0.6,
    single_file: Some(&single_file::SD35_LARGE),
};

/// Stable Diffusion 3.5 Medium: MMDiT-X. Defaults: Stability's 40 steps at guidance 4.5.
pub const SD35_MEDIUM: FamilySpec = FamilySpec {
    name: "sd35-medium",
    display: "Stable Diffusion 3.5 Medium",
    hub_repo: "stabilityai/stable-diffusion-3.5-medium",
    denoiser_markers: &[SD35_MARKERS[0], SD35_MARKERS[1], SD35_MARKERS[2], MMDIT_X_MARKER],
    denoiser_excludes: &[],
    memory_profile: FamilyProfile::sd35_medium,
    default_steps: 40,
    default_guidance: 4.5,
    single_file: Some(&single_file::SD35_MEDIUM),
    ..SD35_LARGE
};

/// Every family this build can run, in the order detection tries them.
pub static FAMILIES: &[FamilySpec] = &[SD15, SDXL, SDXL_REFINER, SD35_LARGE, SD35_MEDIUM];

/// Finds the family of a diffusers folder from its pipeline class, the components its
/// `model_index.json` names and its denoiser's tensor names.
pub fn detect<'a>(
    pipeline_class: &str,
    has_component: impl Fn(&str) -> bool,
    has_tensor: impl Fn(&str) -> bool,
) -> Option<&'a FamilySpec> {
    FAMILIES.iter().find(|f| {
        f.pipeline_classes.contains(&pipeline_class)
            && f.components.iter().all(|c| has_component(c))
            && !f.absent_components.iter().any(|c| has_component(c))
            && f.denoiser_markers.iter().all(|k| has_tensor(k))
            && !f.denoiser_excludes.iter().any(|k| has_tensor(k))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_need_their_markers_and_components() {
        let all = |_: &str| true;
        let sd15 = |k: &str| FAMILIES[0].denoiser_markers.contains(&k);
        assert_eq!(detect("StableDiffusionPipeline", all, sd15).map(|f| f.name), Some("sd15"));
        let sdxl = |k: &str| sd15(k) || k == "add_embedding.linear_1.weight";
        assert!(detect("StableDiffusionPipeline", all, sdxl).is_none());
        assert!(detect("StableDiffusionXLPipeline", all, sd15).is_none());
        assert!(detect("StableDiffusionPipeline", all, |_| false).is_none());
        assert_eq!(detect("StableDiffusionXLPipeline", all, sdxl).map(|f| f.name), Some("sdxl"));
        // The refiner: the second text encoder only, whatever the pipeline class says.
        let refiner = |c: &str| c != "text_encoder" && c != "tokenizer";
        for class in ["StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline"] {
            assert_eq!(detect(class, refiner, sdxl).map(|f| f.name), Some("sdxl-refiner"));
        }
        // An SDXL base saved as an img2img pipeline is still the base.
        assert_eq!(detect("StableDiffusionXLImg2ImgPipeline", all, sdxl).map(|f| f.name), Some("sdxl"));
    }

    fn tensors(list: &[(&str, &[usize])]) -> BTreeMap<String, TensorInfo> {
        list.iter()
            .map(|(k, s)| (k.to_string(), TensorInfo { dtype: "F16".into(), shape: s.to_vec(), data_offsets: (0, 0) }))
            .collect()
    }

    #[test]
    fn signatures_decide_by_names_and_shapes() {
        let unet =
            [(LDM_CONV_IN, &[320usize, 4, 3, 3][..]), ("model.diffusion_model.time_embed.0.weight", &[1280, 320])];
        assert!(matches!(recognise(&tensors(&unet)), Recognised::Family(f) if f.name == "sd15"));
        let inpaint = tensors(&[(LDM_CONV_IN, &[320, 9, 3, 3]), unet[1]]);
        assert!(
            matches!(recognise(&inpaint), Recognised::Unsupported { display, .. } if display.contains("inpainting"))
        );
        let lora = tensors(&[("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", &[4, 320])]);
        assert!(matches!(recognise(&lora), Recognised::Unsupported { display, .. } if display.contains("LoRA")));
        assert!(matches!(recognise(&tensors(&[("foo", &[1])])), Recognised::Unknown));
    }
}
