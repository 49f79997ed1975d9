//! Single-file checkpoints recognised by the names and shapes of their tensors: a table of
//! signatures (diffusers' `infer_diffusers_model_type`), each naming the family row that runs it
//! or, for kinds this build cannot run, only what it is.

use std::collections::BTreeMap;

use super::{FamilySpec, SD15, SD35_LARGE, SD35_MEDIUM, SDXL, SDXL_REFINER};
use crate::loading::TensorInfo;

/// One condition on a checkpoint's tensors.
#[derive(Debug)]
pub enum Marker {
    /// The tensor exists.
    Has(&'static str),
    /// One of the tensors exists (files with and without the `model.diffusion_model.` prefix).
    HasAny(&'static [&'static str]),
    /// The tensor does not exist.
    Lacks(&'static str),
    /// Some tensor's name starts with this.
    Prefix(&'static str),
    /// The tensor exists and its dimension `axis` is `size`.
    Dim {
        /// The tensor.
        key: &'static str,
        /// Which dimension.
        axis: usize,
        /// Its size.
        size: usize,
    },
}

impl Marker {
    /// Whether the tensors satisfy this marker.
    pub(crate) fn holds(&self, tensors: &BTreeMap<String, TensorInfo>) -> bool {
        match self {
            Marker::Has(k) => tensors.contains_key(*k),
            Marker::HasAny(ks) => ks.iter().any(|k| tensors.contains_key(*k)),
            Marker::Lacks(k) => !tensors.contains_key(*k),
            Marker::Prefix(p) => tensors.range(p.to_string()..).next().is_some_and(|(k, _)| k.starts_with(p)),
            Marker::Dim { key, axis, size } => tensors.get(*key).is_some_and(|t| t.shape.get(*axis) == Some(size)),
        }
    }

    /// The evidence, for messages: "`key`" or "`key` with dimension 1 = 9".
    pub(crate) fn describe(&self, tensors: &BTreeMap<String, TensorInfo>) -> String {
        match self {
            Marker::Has(k) => format!("`{k}`"),
            Marker::HasAny(ks) => {
                ks.iter().find(|k| tensors.contains_key(**k)).map_or(String::new(), |k| format!("`{k}`"))
            }
            Marker::Prefix(p) => format!("`{p}*` tensors"),
            Marker::Lacks(k) => format!("no `{k}`"),
            Marker::Dim { key, axis, size } => format!("`{key}` with dimension {axis} = {size}"),
        }
    }
}

/// A kind of single-file checkpoint and the tensors that identify it.
#[derive(Debug)]
pub struct Signature {
    /// What it is, for messages ("an SDXL base checkpoint").
    pub display: &'static str,
    /// The family that runs it, if this build does.
    pub family: Option<&'static FamilySpec>,
    /// All must hold.
    pub markers: &'static [Marker],
    /// For a kind this build runs only with its own configs: what to do, said instead of "which
    /// this build cannot run".
    pub advice: Option<&'static str>,
}

pub(super) const LDM_CONV_IN: &str = "model.diffusion_model.input_blocks.0.0.weight";

/// SD 3.5's RMS QK-norm (SD 3.0 has none).
const SAI_MMDIT_QK_NORM: &str = "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight";

/// MMDiT-X's second, image-only attention (3.5 Medium's first 13 blocks; Large has none).
const SAI_MMDIT_X_ATTN2: &str = "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight";

/// What single-file checkpoints can be, tried in order (diffusers' `infer_diffusers_model_type`
/// as a table, with its keys): the first whose markers all hold names the checkpoint. The kinds
/// this build cannot run are listed too, so such a file is refused as what it is.
pub const SIGNATURES: &[Signature] = &[
    Signature {
        display: "an inpainting checkpoint (9-channel UNet input)",
        family: None,
        advice: None,
        markers: &[Marker::Dim { key: LDM_CONV_IN, axis: 1, size: 9 }],
    },
    Signature {
        display: "an InstructPix2Pix checkpoint (8-channel UNet input)",
        family: None,
        advice: None,
        markers: &[Marker::Dim { key: LDM_CONV_IN, axis: 1, size: 8 }],
    },
    Signature {
        display: "a Stable Diffusion 2.x checkpoint",
        family: None,
        advice: None,
        markers: &[Marker::Dim {
            key: "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
            axis: 1,
            size: 1024,
        }],
    },
    Signature {
        display: "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder)",
        family: None,
        advice: None,
        markers: &[Marker::Has("cond_stage_model.model.token_embedding.weight")],
    },
    Signature {
        display: "a Playground v2.5 checkpoint",
        family: None,
        advice: None,
        markers: &[Marker::Has("edm_mean")],
    },
    Signature {
        display: "an SDXL base checkpoint",
        family: Some(&SDXL),
        advice: None,
        markers: &[Marker::Has("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias")],
    },
    Signature {
        display: "an SDXL refiner checkpoint",
        family: Some(&SDXL_REFINER),
        advice: None,
        markers: &[Marker::Has("conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias")],
    },
    Signature {
        display: "an SDXL UNet (size/crop conditioning `label_emb`)",
        family: None,
        advice: Some(concat!(
            "but not the text encoders of the standard SDXL base or refiner (the 10th layer of OpenCLIP bigG, \
             `conditioner.embedders.1.model.transformer.resblocks.9.*` or `conditioner.embedders.0.…`): an SDXL \
             of another size, which runs with its own configs: pass ",
            crate::field_ref!("config_from"),
            " DIR, a diffusers folder of the same model (its model_index.json and each component's config.json, \
             as diffusers' `from_single_file(config=...)`)",
        )),
        markers: &[Marker::Has("model.diffusion_model.label_emb.0.0.weight")],
    },
    Signature {
        display: "a Stable Diffusion x4 upscaler checkpoint",
        family: None,
        advice: None,
        markers: &[Marker::Has("model.diffusion_model.input_blocks.10.0.skip_connection.bias")],
    },
    Signature {
        display: "a ControlNet",
        family: None,
        advice: None,
        markers: &[Marker::HasAny(&["control_model.time_embed.0.weight", "controlnet_cond_embedding.conv_in.weight"])],
    },
    // SD 3.5 by its blocks, whatever its size: Medium's first block has a second attention,
    // Large's none (their depth and width are checked against the configs).
    Signature {
        display: "an SD 3.5 Medium checkpoint (MMDiT-X)",
        family: Some(&SD35_MEDIUM),
        advice: None,
        markers: &[Marker::Has(SAI_MMDIT_QK_NORM), Marker::Has(SAI_MMDIT_X_ATTN2)],
    },
    Signature {
        display: "an SD 3.5 Large checkpoint",
        family: Some(&SD35_LARGE),
        advice: None,
        markers: &[Marker::Has(SAI_MMDIT_QK_NORM), Marker::Lacks(SAI_MMDIT_X_ATTN2)],
    },
    Signature {
        display: "a Stable Diffusion 3 checkpoint (an MMDiT without QK-norm: SD 3.0, not 3.5) or a lone SD 3 MMDiT",
        family: None,
        advice: None,
        markers: &[Marker::HasAny(&[
            "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
            "joint_blocks.0.context_block.adaLN_modulation.1.bias",
        ])],
    },
    Signature {
        display: "a FLUX checkpoint",
        family: None,
        advice: None,
        markers: &[Marker::HasAny(&[
            "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
            "double_blocks.0.img_attn.norm.key_norm.scale",
        ])],
    },
    // SD 1.x: the ldm UNet with 4 latent input channels (diffusers' fallback "v1"). Its text
    // encoder and VAE are required by the layout, and reported by name if absent.
    Signature {
        display: "a Stable Diffusion 1.x checkpoint",
        family: Some(&SD15),
        advice: None,
        markers: &[
            Marker::Dim { key: LDM_CONV_IN, axis: 1, size: 4 },
            Marker::Has("model.diffusion_model.time_embed.0.weight"),
        ],
    },
];

/// Files that are parts of a model, not whole checkpoints (checked after [`SIGNATURES`]).
pub const PART_SIGNATURES: &[Signature] = &[
    Signature {
        display: "a LoRA (`lora_unet_*` tensors)",
        family: None,
        advice: None,
        markers: &[Marker::Prefix("lora_unet_")],
    },
    Signature {
        display: "a LoRA (`lora_te_*` tensors)",
        family: None,
        advice: None,
        markers: &[Marker::Prefix("lora_te")],
    },
    Signature {
        display: "a lone diffusers UNet file, not a whole checkpoint (open its diffusers folder instead)",
        family: None,
        advice: None,
        markers: &[Marker::Has("conv_in.weight"), Marker::Has("time_embedding.linear_1.weight")],
    },
    Signature {
        display: "a lone VAE file, not a whole checkpoint",
        family: None,
        advice: None,
        markers: &[Marker::Has("encoder.conv_in.weight"), Marker::Has("decoder.conv_out.weight")],
    },
    Signature {
        display: "a lone text encoder file, not a whole checkpoint",
        family: None,
        advice: None,
        markers: &[Marker::HasAny(&[
            "text_model.embeddings.token_embedding.weight",
            "embeddings.token_embedding.weight",
        ])],
    },
];

/// What a single-file checkpoint is, going by its tensors.
#[derive(Debug)]
pub enum Recognised {
    /// A family this build runs.
    Family(&'static FamilySpec),
    /// A known kind this build does not run (or runs only with its configs), with the evidence.
    Unsupported {
        /// What it looks like.
        display: &'static str,
        /// The tensors that say so.
        evidence: String,
        /// What to do, where something can be done ([`Signature::advice`]).
        advice: Option<&'static str>,
    },
    /// Nothing known.
    Unknown,
}

/// Recognises a single-file checkpoint from its tensors' names and shapes.
pub fn recognise(tensors: &BTreeMap<String, TensorInfo>) -> Recognised {
    let Some(sig) = SIGNATURES.iter().chain(PART_SIGNATURES).find(|s| s.markers.iter().all(|m| m.holds(tensors)))
    else {
        return Recognised::Unknown;
    };
    let family = sig.family.filter(|f| f.single_file.is_some());
    match family {
        Some(f) => Recognised::Family(f),
        None => Recognised::Unsupported {
            display: sig.display,
            evidence: sig.markers.iter().map(|m| m.describe(tensors)).collect::<Vec<_>>().join(" and "),
            advice: sig.advice,
        },
    }
}
