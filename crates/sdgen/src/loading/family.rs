//! Model families, recognised through tables (as diffusers' `CHECKPOINT_KEY_NAMES`), not an
//! if-chain: a diffusers folder is named by the pipeline class of `model_index.json` and confirmed
//! by marker tensors of its denoiser; a single-file checkpoint is recognised by the names and
//! shapes of its tensors ([`SIGNATURES`]).

use std::collections::BTreeMap;

use super::single_file::{self, SingleFileLayout};
use super::TensorInfo;

/// How one family is recognised and what it needs.
#[derive(Debug)]
pub struct FamilySpec {
    /// Short name used on the command line and in metadata (`sd15`).
    pub name: &'static str,
    /// Human name.
    pub display: &'static str,
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

/// Every family this build can run.
pub const FAMILIES: &[FamilySpec] = &[
    FamilySpec {
        name: "sd15",
        display: "Stable Diffusion 1.5",
        pipeline_classes: &["StableDiffusionPipeline"],
        denoiser_markers: &["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight"],
        denoiser_excludes: &["add_embedding.linear_1.weight"],
        components: &["text_encoder", "tokenizer", "unet", "vae", "scheduler"],
        absent_components: &[],
        pipeline_type: "StableDiffusionPipeline (SD 1.5)",
        size_multiple: 8,
        default_steps: 50,
        default_guidance: 7.5,
        default_strength: 0.8,
        single_file: Some(&single_file::SD15),
    },
    FamilySpec {
        name: "sdxl",
        display: "Stable Diffusion XL",
        pipeline_classes: &["StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"],
        denoiser_markers: &["conv_in.weight", "time_embedding.linear_1.weight", "add_embedding.linear_1.weight"],
        denoiser_excludes: &[],
        components: &["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler"],
        absent_components: &[],
        pipeline_type: "StableDiffusionXLPipeline (SDXL)",
        size_multiple: 8,
        default_steps: 50,
        default_guidance: 5.0,
        default_strength: 0.3,
        single_file: Some(&single_file::SDXL),
    },
    FamilySpec {
        name: "sdxl-refiner",
        display: "Stable Diffusion XL refiner",
        pipeline_classes: &["StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline"],
        denoiser_markers: &["conv_in.weight", "time_embedding.linear_1.weight", "add_embedding.linear_1.weight"],
        denoiser_excludes: &[],
        components: &["text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler"],
        absent_components: &["text_encoder"],
        pipeline_type: "StableDiffusionXLImg2ImgPipeline (SDXL refiner)",
        size_multiple: 8,
        default_steps: 50,
        default_guidance: 5.0,
        default_strength: 0.3,
        single_file: Some(&single_file::SDXL_REFINER),
    },
];

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

/// One condition on a checkpoint's tensors.
#[derive(Debug)]
pub enum Marker {
    /// The tensor exists.
    Has(&'static str),
    /// One of the tensors exists (files with and without the `model.diffusion_model.` prefix).
    HasAny(&'static [&'static str]),
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
            Marker::Dim { key, axis, size } => format!("`{key}` with dimension {axis} = {size}"),
        }
    }
}

/// A kind of single-file checkpoint and the tensors that identify it.
#[derive(Debug)]
pub struct Signature {
    /// What it is, for messages ("an SDXL base checkpoint").
    pub display: &'static str,
    /// The [`FamilySpec::name`] that runs it, if this build does.
    pub family: Option<&'static str>,
    /// All must hold.
    pub markers: &'static [Marker],
}

const LDM_CONV_IN: &str = "model.diffusion_model.input_blocks.0.0.weight";

/// What single-file checkpoints can be, tried in order (diffusers' `infer_diffusers_model_type`
/// as a table, with its keys): the first whose markers all hold names the checkpoint. The kinds
/// this build cannot run are listed too, so such a file is refused as what it is.
pub const SIGNATURES: &[Signature] = &[
    Signature {
        display: "an inpainting checkpoint (9-channel UNet input)",
        family: None,
        markers: &[Marker::Dim { key: LDM_CONV_IN, axis: 1, size: 9 }],
    },
    Signature {
        display: "an InstructPix2Pix checkpoint (8-channel UNet input)",
        family: None,
        markers: &[Marker::Dim { key: LDM_CONV_IN, axis: 1, size: 8 }],
    },
    Signature {
        display: "a Stable Diffusion 2.x checkpoint",
        family: None,
        markers: &[Marker::Dim {
            key: "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
            axis: 1,
            size: 1024,
        }],
    },
    Signature {
        display: "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder)",
        family: None,
        markers: &[Marker::Has("cond_stage_model.model.token_embedding.weight")],
    },
    Signature { display: "a Playground v2.5 checkpoint", family: None, markers: &[Marker::Has("edm_mean")] },
    Signature {
        display: "an SDXL base checkpoint",
        family: Some("sdxl"),
        markers: &[Marker::Has("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias")],
    },
    Signature {
        display: "an SDXL refiner checkpoint",
        family: Some("sdxl-refiner"),
        markers: &[Marker::Has("conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias")],
    },
    Signature {
        display: "an SDXL UNet (size/crop conditioning `label_emb`)",
        family: None,
        markers: &[Marker::Has("model.diffusion_model.label_emb.0.0.weight")],
    },
    Signature {
        display: "a Stable Diffusion x4 upscaler checkpoint",
        family: None,
        markers: &[Marker::Has("model.diffusion_model.input_blocks.10.0.skip_connection.bias")],
    },
    Signature {
        display: "a ControlNet",
        family: None,
        markers: &[Marker::HasAny(&["control_model.time_embed.0.weight", "controlnet_cond_embedding.conv_in.weight"])],
    },
    Signature {
        display: "a Stable Diffusion 3 / 3.5 checkpoint",
        family: None,
        markers: &[Marker::HasAny(&[
            "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
            "joint_blocks.0.context_block.adaLN_modulation.1.bias",
        ])],
    },
    Signature {
        display: "a FLUX checkpoint",
        family: None,
        markers: &[Marker::HasAny(&[
            "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
            "double_blocks.0.img_attn.norm.key_norm.scale",
        ])],
    },
    // SD 1.x: the ldm UNet with 4 latent input channels (diffusers' fallback "v1"). Its text
    // encoder and VAE are required by the layout, and reported by name if absent.
    Signature {
        display: "a Stable Diffusion 1.x checkpoint",
        family: Some("sd15"),
        markers: &[
            Marker::Dim { key: LDM_CONV_IN, axis: 1, size: 4 },
            Marker::Has("model.diffusion_model.time_embed.0.weight"),
        ],
    },
];

/// Files that are parts of a model, not whole checkpoints (checked after [`SIGNATURES`]).
pub const PART_SIGNATURES: &[Signature] = &[
    Signature { display: "a LoRA (`lora_unet_*` tensors)", family: None, markers: &[Marker::Prefix("lora_unet_")] },
    Signature { display: "a LoRA (`lora_te_*` tensors)", family: None, markers: &[Marker::Prefix("lora_te")] },
    Signature {
        display: "a lone diffusers UNet file, not a whole checkpoint (open its diffusers folder instead)",
        family: None,
        markers: &[Marker::Has("conv_in.weight"), Marker::Has("time_embedding.linear_1.weight")],
    },
    Signature {
        display: "a lone VAE file, not a whole checkpoint",
        family: None,
        markers: &[Marker::Has("encoder.conv_in.weight"), Marker::Has("decoder.conv_out.weight")],
    },
    Signature {
        display: "a lone text encoder file, not a whole checkpoint",
        family: None,
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
    /// A known kind this build does not run, with the evidence.
    Unsupported {
        /// What it looks like.
        display: &'static str,
        /// The tensors that say so.
        evidence: String,
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
    let family = sig.family.and_then(|name| FAMILIES.iter().find(|f| f.name == name && f.single_file.is_some()));
    match family {
        Some(f) => Recognised::Family(f),
        None => Recognised::Unsupported {
            display: sig.display,
            evidence: sig.markers.iter().map(|m| m.describe(tensors)).collect::<Vec<_>>().join(" and "),
        },
    }
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
