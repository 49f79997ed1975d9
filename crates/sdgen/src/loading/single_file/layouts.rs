//! Where each family's models sit in its single files, as data: the key prefix of each model,
//! its renaming table and its config kind, the file beside the checkpoint it may be in instead,
//! plus the family's bundled configuration folder.

use super::{defaults, rules, Absent, BesideFile, ComponentLayout, ModelKind, SingleFileLayout};

const UNET: ComponentLayout = ComponentLayout {
    component: "unet",
    what: "UNet",
    prefix: "model.diffusion_model.",
    rules: rules::LDM_UNET,
    kind: ModelKind::Unet,
    beside: None,
    if_absent: &[],
};

const VAE: ComponentLayout = ComponentLayout {
    component: "vae",
    what: "VAE",
    prefix: "first_stage_model.",
    rules: rules::LDM_VAE,
    kind: ModelKind::Vae,
    beside: None,
    if_absent: &[],
};

/// SD 1.x: CLIP ViT-L/14, the ldm UNet and the KL-f8 autoencoder.
pub const SD15: SingleFileLayout = SingleFileLayout {
    gguf_architecture: "sd1",
    components: &[
        ComponentLayout {
            component: "text_encoder",
            what: "CLIP text encoder",
            prefix: "cond_stage_model.transformer.",
            rules: rules::CLIP_TEXT,
            kind: ModelKind::ClipText,
            beside: None,
            if_absent: &[],
        },
        UNET,
        VAE,
    ],
    defaults: defaults::SD15,
    required_configs: &[
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
    ],
};

/// SDXL's second text encoder, OpenCLIP ViT-bigG/14, under `prefix` (Stability's `sgm` names
/// its conditioner's embedders by position, and the refiner has only this one).
const fn open_clip_big_g(prefix: &'static str) -> ComponentLayout {
    ComponentLayout {
        component: "text_encoder_2",
        what: "OpenCLIP text encoder",
        prefix,
        rules: rules::OPEN_CLIP_TEXT,
        kind: ModelKind::ClipTextWithProjection,
        beside: None,
        if_absent: &[],
    }
}

/// SDXL base (`sd_xl_base_1.0.safetensors`): CLIP ViT-L/14 as `conditioner.embedders.0` (in
/// transformers' names, as SD 1.x stores it), OpenCLIP bigG as `conditioner.embedders.1` (in
/// OpenCLIP's), the UNet and the VAE under their SD 1.x prefixes.
pub const SDXL: SingleFileLayout = SingleFileLayout {
    gguf_architecture: "sdxl",
    components: &[
        ComponentLayout {
            component: "text_encoder",
            what: "CLIP text encoder",
            prefix: "conditioner.embedders.0.transformer.",
            rules: rules::CLIP_TEXT,
            kind: ModelKind::ClipText,
            beside: None,
            if_absent: &[],
        },
        open_clip_big_g("conditioner.embedders.1.model."),
        UNET,
        VAE,
    ],
    defaults: defaults::SDXL,
    required_configs: &[
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "unet/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
        "tokenizer_2/tokenizer_config.json",
    ],
};

/// SDXL refiner (`sd_xl_refiner_1.0.safetensors`): OpenCLIP bigG alone, as
/// `conditioner.embedders.0`, its 4-level UNet and the VAE.
pub const SDXL_REFINER: SingleFileLayout = SingleFileLayout {
    gguf_architecture: "sdxl",
    components: &[open_clip_big_g("conditioner.embedders.0.model."), UNET, VAE],
    defaults: defaults::SDXL_REFINER,
    required_configs: &[
        "text_encoder_2/config.json",
        "unet/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
        "tokenizer_2/tokenizer_config.json",
    ],
};

/// Where SD 3.5's encoders sit beside `sd3.5_large.safetensors` when it holds none of them:
/// the repositories' `text_encoders/` folder.
const SD35_ENCODERS_FOLDER: &str = "text_encoders";

/// One of SD 3.5's text encoders: in the file as `text_encoders.<name>.transformer.*` (ComfyUI's
/// `*_incl_clips*` files), else in `text_encoders/` beside it under its own names.
const fn sd35_encoder(
    component: &'static str,
    what: &'static str,
    prefix: &'static str,
    files: &'static [&'static str],
    rules: &'static [rules::Rule],
    kind: ModelKind,
) -> ComponentLayout {
    ComponentLayout {
        component,
        what,
        prefix,
        rules,
        kind,
        beside: Some(BesideFile { folder: SD35_ENCODERS_FOLDER, files }),
        if_absent: &[],
    }
}

/// SD 3.5's models (`sd3.5_large.safetensors`, `sd3.5_medium.safetensors`): CLIP-L and
/// OpenCLIP bigG with projections and T5-XXL's encoder, in transformers' names (inside the file
/// or beside it), the MMDiT under `model.diffusion_model.` in SAI's names, the VAE as SD 1.x's.
/// Stability publishes T5 in 16 and 8 bits, ComfyUI also a scaled 8-bit one; the 16-bit file is
/// looked for first, then the scaled 8-bit one (its per-layer scales keep more of the weights).
const SD35_COMPONENTS: &[ComponentLayout] = &[
    // SAI's reference does not project CLIP-L's pooled output: a file without its projection
    // gets the identity, as diffusers' `create_diffusers_clip_model_from_ldm` gives it.
    ComponentLayout {
        if_absent: &[("text_projection.weight", Absent::Identity)],
        ..sd35_encoder(
            "text_encoder",
            "CLIP-L text encoder",
            "text_encoders.clip_l.transformer.",
            &["clip_l.safetensors"],
            rules::CLIP_TEXT,
            ModelKind::ClipTextWithProjection,
        )
    },
    sd35_encoder(
        "text_encoder_2",
        "CLIP-G text encoder",
        "text_encoders.clip_g.transformer.",
        &["clip_g.safetensors"],
        rules::CLIP_TEXT,
        ModelKind::ClipTextWithProjection,
    ),
    // transformers saves the tied token embedding once, as `shared.weight`; other writers keep
    // only the encoder's copy.
    ComponentLayout {
        if_absent: &[("shared.weight", Absent::TiedTo("encoder.embed_tokens.weight"))],
        ..sd35_encoder(
            "text_encoder_3",
            "T5-XXL text encoder",
            "text_encoders.t5xxl.transformer.",
            &["t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "t5xxl_fp8_e4m3fn.safetensors"],
            rules::T5_ENCODER,
            ModelKind::T5,
        )
    },
    ComponentLayout {
        component: "transformer",
        what: "MMDiT",
        prefix: "model.diffusion_model.",
        rules: rules::MMDIT,
        kind: ModelKind::MMDiT,
        beside: None,
        if_absent: &[],
    },
    VAE,
];

/// What a config folder given for an SD 3.5 file must hold. T5's config and tokenizer are
/// optional, as T5 is (`--no-t5`).
const SD35_REQUIRED_CONFIGS: &[&str] = &[
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "transformer/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/tokenizer_config.json",
];

/// SD 3.5 Large (and Large Turbo: the same network).
pub const SD35_LARGE: SingleFileLayout = SingleFileLayout {
    gguf_architecture: "sd3",
    components: SD35_COMPONENTS,
    defaults: defaults::SD35_LARGE,
    required_configs: SD35_REQUIRED_CONFIGS,
};

/// SD 3.5 Medium (MMDiT-X).
pub const SD35_MEDIUM: SingleFileLayout = SingleFileLayout { defaults: defaults::SD35_MEDIUM, ..SD35_LARGE };
