//! How LoRA files name their tensors, as tables: the key formats (the suffixes of a module's
//! down / up matrices and its alpha), the prefix each format gives each model, and the names a
//! model's modules go by in LoRA files.
//!
//! A LoRA key is `<prefix><module><suffix>`:
//! - kohya / A1111 (kohya-ss/sd-scripts `networks/lora.py`, `LoRANetwork.create_modules`): the
//!   module path with every `.` made `_`, after `lora_unet_`, `lora_te_` (SD 1.x's encoder),
//!   `lora_te1_` / `lora_te2_` (SDXL's two); `.lora_down.weight`, `.lora_up.weight`, `.alpha`.
//!   SD 1.x UNets are named as diffusers names them (sd-scripts trains them on diffusers' module
//!   tree), SDXL UNets as the SGM checkpoint does (`input_blocks_4_1_transformer_blocks_0_…`),
//!   text encoders as transformers 4 did (`text_model_encoder_layers_0_self_attn_q_proj`).
//! - diffusers / PEFT (`save_lora_weights`): `unet.`, `text_encoder.`, `text_encoder_2.` and the
//!   dotted module path; `.lora_A.weight`, `.lora_B.weight` (diffusers' older own format:
//!   `.lora.down.weight`, `.lora.up.weight`).
//!
//! The module names are not listed: [`ModuleIndex`] derives them from the model's own tensors
//! (every matrix or convolution kernel `M.weight` is module `M`), under each name a LoRA may use
//! for it (diffusers' path, without transformers' `text_model.` level, the SGM path through the
//! single-file renaming rules), dotted and underscored. So any module of any component can carry a
//! LoRA, and a key that names no module is known to be wrong rather than silently skipped.

use std::collections::HashMap;

use crate::loading::single_file::rules::{to_original, Ctx, LDM_UNET};
use crate::loading::TensorInfo;

/// One way of naming a module's LoRA matrices.
#[derive(Debug)]
pub struct KeyFormat {
    /// For messages and metadata.
    pub name: &'static str,
    /// The down (A) matrix's suffix: `[rank, in]` or `[rank, in, kh, kw]`.
    pub down: &'static str,
    /// The up (B) matrix's suffix: `[out, rank]` or `[out, rank, 1, 1]`.
    pub up: &'static str,
    /// What stands for `.` in module paths.
    pub separator: char,
    /// The prefix of each component's keys.
    pub prefixes: &'static [(&'static str, &'static str)],
}

/// The suffix of a module's alpha (a scalar) in every format; without it alpha is the rank.
pub const ALPHA: &str = ".alpha";

const DIFFUSERS_PREFIXES: &[(&str, &str)] =
    &[("unet.", "unet"), ("text_encoder.", "text_encoder"), ("text_encoder_2.", "text_encoder_2")];

/// The formats read, in the order keys are tried.
pub const FORMATS: &[KeyFormat] = &[
    KeyFormat {
        name: "kohya",
        down: ".lora_down.weight",
        up: ".lora_up.weight",
        separator: '_',
        prefixes: &[
            ("lora_unet_", "unet"),
            ("lora_te_", "text_encoder"),
            ("lora_te1_", "text_encoder"),
            ("lora_te2_", "text_encoder_2"),
        ],
    },
    KeyFormat {
        name: "diffusers/PEFT",
        down: ".lora_A.weight",
        up: ".lora_B.weight",
        separator: '.',
        prefixes: DIFFUSERS_PREFIXES,
    },
    KeyFormat {
        name: "diffusers",
        down: ".lora.down.weight",
        up: ".lora.up.weight",
        separator: '.',
        prefixes: DIFFUSERS_PREFIXES,
    },
];

/// Whether a LoRA key is a down or up matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `lora_down` / `lora_A`.
    Down,
    /// `lora_up` / `lora_B`.
    Up,
}

/// A LoRA key, parsed.
#[derive(Debug, Clone)]
pub struct ParsedKey<'k> {
    /// Its format.
    pub format: &'static KeyFormat,
    /// The component its prefix names.
    pub component: &'static str,
    /// The module as the file names it (prefix and suffix removed).
    pub module: &'k str,
    /// The key without its suffix: the module's alpha is `stem + ".alpha"`.
    pub stem: &'k str,
    /// Down or up.
    pub role: Role,
}

/// Parses a down or up key; `None` for anything else (alphas, unknown keys).
pub fn parse(key: &str) -> Option<ParsedKey<'_>> {
    FORMATS.iter().find_map(|format| {
        let (stem, role) = match (key.strip_suffix(format.down), key.strip_suffix(format.up)) {
            (Some(s), _) => (s, Role::Down),
            (_, Some(s)) => (s, Role::Up),
            _ => return None,
        };
        let (prefix, component) = format.prefixes.iter().find(|(p, _)| stem.starts_with(p))?;
        Some(ParsedKey { format, component, module: &stem[prefix.len()..], stem, role })
    })
}

/// A component's modules under the names LoRA files give them.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// Name (dotted or underscored) → the module's weight tensor, by its diffusers name.
    names: HashMap<(char, String), String>,
}

/// What `text_model.`-less and SGM names are derived for.
#[derive(Debug, Clone)]
pub enum Aliases {
    /// A text encoder: also without transformers 4's `text_model.` level.
    TextEncoder,
    /// A UNet: also its SGM (ldm) path, through the single-file renaming rules with `ctx`.
    Unet(Ctx),
}

impl ModuleIndex {
    /// The modules of a component whose tensors are `tensors` (by diffusers name).
    pub fn new<'t>(tensors: impl IntoIterator<Item = (&'t String, &'t TensorInfo)>, aliases: &Aliases) -> Self {
        let mut index = Self::default();
        for (name, info) in tensors {
            let Some(module) = name.strip_suffix(".weight").filter(|_| info.shape.len() >= 2) else { continue };
            let mut add = |alias: &str| {
                for sep in ['.', '_'] {
                    index.names.entry((sep, alias.replace('.', &sep.to_string()))).or_insert_with(|| name.clone());
                }
            };
            add(module);
            match aliases {
                Aliases::TextEncoder => {
                    if let Some(m) = module.strip_prefix("text_model.") {
                        add(m);
                    }
                }
                Aliases::Unet(ctx) => {
                    if let Some(original) = to_original(LDM_UNET, ctx, name) {
                        add(original.strip_suffix(".weight").unwrap_or(&original));
                    }
                }
            }
        }
        index
    }

    /// The weight tensor a parsed key's module is, if the component has it.
    pub fn find(&self, key: &ParsedKey) -> Option<&str> {
        self.names.get(&(key.format.separator, key.module.to_string())).map(String::as_str)
    }

    /// Whether the component has no modules (a model without it).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(shape: &[usize]) -> TensorInfo {
        TensorInfo { dtype: "F32".into(), shape: shape.to_vec(), data_offsets: (0, 0) }
    }

    #[test]
    fn each_format_parses_to_its_component_and_module() {
        let k = parse("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight").unwrap();
        assert_eq!(
            (k.format.name, k.component, k.module, k.role),
            ("kohya", "text_encoder_2", "text_model_encoder_layers_0_self_attn_q_proj", Role::Up)
        );
        let k = parse("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight").unwrap();
        assert_eq!((k.format.name, k.component, k.role), ("diffusers/PEFT", "text_encoder_2", Role::Down));
        assert_eq!(k.stem, "text_encoder_2.text_model.encoder.layers.0.mlp.fc1");
        let k = parse("unet.mid_block.attentions.0.proj_in.lora.down.weight").unwrap();
        assert_eq!((k.format.name, k.module), ("diffusers", "mid_block.attentions.0.proj_in"));
        assert!(parse("lora_unet_x.alpha").is_none());
        assert!(parse("lora_unet_x.hada_w1_a").is_none());
        assert!(parse("transformer.x.lora_A.weight").is_none(), "no component of the table");
    }

    #[test]
    fn unet_modules_answer_to_diffusers_and_sgm_names() {
        let ctx = Ctx { layers_per_block: 2, levels: 3, up_attention: vec![true, true, false], ..Ctx::default() };
        let q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight".to_string();
        let conv = "down_blocks.1.resnets.0.conv1.weight".to_string();
        let bias = "down_blocks.1.resnets.0.conv1.bias".to_string();
        let tensors = [(q.clone(), info(&[16, 16])), (conv.clone(), info(&[16, 8, 3, 3])), (bias, info(&[16]))];
        let index = ModuleIndex::new(tensors.iter().map(|(n, i)| (n, i)), &Aliases::Unet(ctx));
        let find = |key: &str| index.find(&parse(key).unwrap()).map(str::to_string);
        assert_eq!(
            find("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"),
            Some(q.clone())
        );
        assert_eq!(
            find("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"),
            Some(q.clone())
        );
        assert_eq!(find("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"), Some(q));
        assert_eq!(find("lora_unet_input_blocks_4_0_in_layers_2.lora_up.weight"), Some(conv));
        // A bias is no module; a module of another UNet is none of this one's.
        assert_eq!(find("lora_unet_down_blocks_1_resnets_0_conv1_bias.lora_up.weight"), None);
        assert_eq!(find("lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight"), None);
    }

    #[test]
    fn text_encoder_modules_answer_with_and_without_text_model() {
        let q = "text_model.encoder.layers.0.self_attn.q_proj.weight".to_string();
        let tensors = [(q.clone(), info(&[32, 32]))];
        let index = ModuleIndex::new(tensors.iter().map(|(n, i)| (n, i)), &Aliases::TextEncoder);
        for key in [
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te1_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        ] {
            assert_eq!(index.find(&parse(key).unwrap()), Some(q.as_str()), "{key}");
        }
    }
}
