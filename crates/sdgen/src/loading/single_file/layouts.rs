//! Where each family's models sit in its single files, as data: the key prefix of each model,
//! its renaming table and its config kind, plus the family's bundled configuration folder.

use super::{defaults, rules, ComponentLayout, ModelKind, SingleFileLayout};

const UNET: ComponentLayout = ComponentLayout {
    component: "unet",
    what: "UNet",
    prefix: "model.diffusion_model.",
    rules: rules::LDM_UNET,
    kind: ModelKind::Unet,
};

const VAE: ComponentLayout = ComponentLayout {
    component: "vae",
    what: "VAE",
    prefix: "first_stage_model.",
    rules: rules::LDM_VAE,
    kind: ModelKind::Vae,
};

/// SD 1.x: CLIP ViT-L/14, the ldm UNet and the KL-f8 autoencoder.
pub const SD15: SingleFileLayout = SingleFileLayout {
    components: &[
        ComponentLayout {
            component: "text_encoder",
            what: "CLIP text encoder",
            prefix: "cond_stage_model.transformer.",
            rules: rules::CLIP_TEXT,
            kind: ModelKind::ClipText,
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
    }
}

/// SDXL base (`sd_xl_base_1.0.safetensors`): CLIP ViT-L/14 as `conditioner.embedders.0` (in
/// transformers' names, as SD 1.x stores it), OpenCLIP bigG as `conditioner.embedders.1` (in
/// OpenCLIP's), the UNet and the VAE under their SD 1.x prefixes.
pub const SDXL: SingleFileLayout = SingleFileLayout {
    components: &[
        ComponentLayout {
            component: "text_encoder",
            what: "CLIP text encoder",
            prefix: "conditioner.embedders.0.transformer.",
            rules: rules::CLIP_TEXT,
            kind: ModelKind::ClipText,
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
