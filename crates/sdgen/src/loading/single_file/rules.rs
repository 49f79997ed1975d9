//! Original (CompVis / A1111 / ComfyUI) tensor names ↔ diffusers names, as tables of prefix
//! rules. A port of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
//! `convert_ldm_clip_checkpoint` (`loaders/single_file_utils.py`): there the renaming is spread over
//! loops and `str.replace` chains; here each module kind is one row, read both ways — forwards to
//! serve a checkpoint's tensors under diffusers names, backwards to name the original key a
//! missing tensor should have had.
//!
//! A pattern's `{}` stands for a decimal index; [`Index`] says how the original indices become
//! the diffusers ones (the UNet's flat `input_blocks.{i}` are `down_blocks.{b}` × `{l}`, the
//! VAE's decoder levels run in the opposite order, ...). What follows the matched prefix is kept,
//! except for the renamed leaves of the rule (`in_layers.0.` → `norm1.`).

use std::fmt::Write;

/// What the index arithmetic needs from the component's config.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    /// Resnets per down block (`layers_per_block`); up blocks have one more.
    pub layers_per_block: usize,
    /// Resolution levels (`block_out_channels.len()`).
    pub levels: usize,
    /// Per up block, whether it has attentions (its upsampler then sits in slot 2, not 1).
    pub up_attention: Vec<bool>,
}

/// How a rule's original indices map to its diffusers indices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Index {
    /// The same numbers in the same order.
    Same,
    /// UNet `input_blocks.{i}` (i ≥ 1) ↔ `down_blocks.{b}.….{l}`: `i = 1 + b·(L+1) + l`.
    Down,
    /// UNet `input_blocks.{i}.0.op` ↔ `down_blocks.{b}.downsamplers.0`: `i = 1 + b·(L+1) + L`.
    DownSampler,
    /// UNet `output_blocks.{i}` ↔ `up_blocks.{b}.….{l}`: `i = b·(L+1) + l`.
    Up,
    /// UNet `output_blocks.{i}.{slot}.conv` ↔ `up_blocks.{b}.upsamplers.0.conv`, `i = b·(L+1) + L`;
    /// slot 2 after an attention, 1 otherwise.
    UpSampler {
        /// 1 or 2.
        slot: usize,
    },
    /// VAE `decoder.up.{i}` ↔ `decoder.up_blocks.{levels − 1 − i}`: ldm counts from the bottom.
    Reversed,
}

impl Index {
    fn forward(self, n: &[usize], c: &Ctx) -> Option<Vec<usize>> {
        let per = c.layers_per_block + 1;
        Some(match self {
            Index::Same => n.to_vec(),
            Index::Down => {
                let i = n[0].checked_sub(1)?;
                vec![i / per, i % per]
            }
            Index::DownSampler => vec![n[0].checked_sub(1)? / per],
            Index::Up => vec![n[0] / per, n[0] % per],
            Index::UpSampler { .. } => vec![n[0] / per],
            Index::Reversed => reversed(n, c)?,
        })
    }

    fn inverse(self, n: &[usize], c: &Ctx) -> Option<Vec<usize>> {
        let per = c.layers_per_block + 1;
        Some(match self {
            Index::Same => n.to_vec(),
            Index::Down => vec![1 + n[0] * per + n[1]],
            Index::DownSampler => vec![1 + n[0] * per + c.layers_per_block],
            Index::Up => vec![n[0] * per + n[1]],
            Index::UpSampler { slot } => {
                if (slot == 2) != *c.up_attention.get(n[0])? {
                    return None;
                }
                vec![n[0] * per + c.layers_per_block]
            }
            Index::Reversed => reversed(n, c)?,
        })
    }
}

fn reversed(n: &[usize], c: &Ctx) -> Option<Vec<usize>> {
    let mut v = n.to_vec();
    v[0] = c.levels.checked_sub(1)?.checked_sub(n[0])?;
    Some(v)
}

/// One row: a module's original prefix, its diffusers prefix, and the leaves renamed inside it.
#[derive(Debug)]
pub struct Rule {
    /// Original prefix (after the component's prefix), `{}` for indices.
    pub original: &'static str,
    /// diffusers prefix.
    pub diffusers: &'static str,
    /// How the indices map.
    pub index: Index,
    /// `(original, diffusers)` leaf prefixes renamed inside the module; others are kept.
    pub leaves: &'static [(&'static str, &'static str)],
    /// Weights stored as 1×1 convolutions (`[C, C, 1, 1]`, or `[C, C, 1]`) that diffusers holds
    /// as linear `[C, C]` (diffusers' `conv_attn_to_linear`).
    pub conv_to_linear: bool,
}

const fn rule(original: &'static str, diffusers: &'static str) -> Rule {
    Rule { original, diffusers, index: Index::Same, leaves: &[], conv_to_linear: false }
}

const fn indexed(original: &'static str, diffusers: &'static str, index: Index) -> Rule {
    Rule { original, diffusers, index, leaves: &[], conv_to_linear: false }
}

const fn resnet(
    original: &'static str,
    diffusers: &'static str,
    index: Index,
    leaves: &'static [(&'static str, &'static str)],
) -> Rule {
    Rule { original, diffusers, index, leaves, conv_to_linear: false }
}

/// `openaimodel.ResBlock` → `ResnetBlock2D` (diffusers' `update_unet_resnet_ldm_to_diffusers`).
const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

/// SD 1.x/2.x UNet (`model.diffusion_model.*`). Order matters: the first matching row wins.
/// The transformer blocks inside `input_blocks.{i}.1` keep their names.
pub const LDM_UNET: &[Rule] = &[
    rule("time_embed.0.", "time_embedding.linear_1."),
    rule("time_embed.2.", "time_embedding.linear_2."),
    rule("input_blocks.0.0.", "conv_in."),
    rule("out.0.", "conv_norm_out."),
    rule("out.2.", "conv_out."),
    indexed("input_blocks.{}.0.op.", "down_blocks.{}.downsamplers.0.conv.", Index::DownSampler),
    resnet("input_blocks.{}.0.", "down_blocks.{}.resnets.{}.", Index::Down, UNET_RESNET),
    indexed("input_blocks.{}.1.", "down_blocks.{}.attentions.{}.", Index::Down),
    resnet("middle_block.0.", "mid_block.resnets.0.", Index::Same, UNET_RESNET),
    rule("middle_block.1.", "mid_block.attentions.0."),
    resnet("middle_block.2.", "mid_block.resnets.1.", Index::Same, UNET_RESNET),
    resnet("output_blocks.{}.0.", "up_blocks.{}.resnets.{}.", Index::Up, UNET_RESNET),
    indexed("output_blocks.{}.1.conv.", "up_blocks.{}.upsamplers.0.conv.", Index::UpSampler { slot: 1 }),
    indexed("output_blocks.{}.2.conv.", "up_blocks.{}.upsamplers.0.conv.", Index::UpSampler { slot: 2 }),
    indexed("output_blocks.{}.1.", "up_blocks.{}.attentions.{}.", Index::Up),
];

/// ldm `ResnetBlock` → `ResnetBlock2D` (diffusers' `update_vae_resnet_ldm_to_diffusers`).
const VAE_RESNET: &[(&str, &str)] = &[("nin_shortcut.", "conv_shortcut.")];

/// ldm `AttnBlock` → `Attention` (diffusers' `update_vae_attentions_ldm_to_diffusers`).
const VAE_ATTENTION: &[(&str, &str)] =
    &[("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")];

const fn vae_attention(original: &'static str, diffusers: &'static str) -> Rule {
    Rule { original, diffusers, index: Index::Same, leaves: VAE_ATTENTION, conv_to_linear: true }
}

/// The KL autoencoder (`first_stage_model.*`).
pub const LDM_VAE: &[Rule] = &[
    rule("encoder.conv_in.", "encoder.conv_in."),
    rule("encoder.conv_out.", "encoder.conv_out."),
    rule("encoder.norm_out.", "encoder.conv_norm_out."),
    rule("decoder.conv_in.", "decoder.conv_in."),
    rule("decoder.conv_out.", "decoder.conv_out."),
    rule("decoder.norm_out.", "decoder.conv_norm_out."),
    rule("quant_conv.", "quant_conv."),
    rule("post_quant_conv.", "post_quant_conv."),
    indexed("encoder.down.{}.downsample.conv.", "encoder.down_blocks.{}.downsamplers.0.conv.", Index::Same),
    resnet("encoder.down.{}.block.{}.", "encoder.down_blocks.{}.resnets.{}.", Index::Same, VAE_RESNET),
    resnet("encoder.mid.block_1.", "encoder.mid_block.resnets.0.", Index::Same, VAE_RESNET),
    resnet("encoder.mid.block_2.", "encoder.mid_block.resnets.1.", Index::Same, VAE_RESNET),
    vae_attention("encoder.mid.attn_1.", "encoder.mid_block.attentions.0."),
    resnet("decoder.mid.block_1.", "decoder.mid_block.resnets.0.", Index::Same, VAE_RESNET),
    resnet("decoder.mid.block_2.", "decoder.mid_block.resnets.1.", Index::Same, VAE_RESNET),
    vae_attention("decoder.mid.attn_1.", "decoder.mid_block.attentions.0."),
    indexed("decoder.up.{}.upsample.conv.", "decoder.up_blocks.{}.upsamplers.0.conv.", Index::Reversed),
    resnet("decoder.up.{}.block.{}.", "decoder.up_blocks.{}.resnets.{}.", Index::Reversed, VAE_RESNET),
];

/// transformers' `CLIPTextModel` under `cond_stage_model.transformer.`: the names are already
/// transformers' (`text_model.*`), only the prefix goes.
pub const CLIP_TEXT: &[Rule] = &[rule("", "")];

/// An original key's diffusers name, and whether its 1×1-convolution shape drops to linear.
pub fn to_diffusers(rules: &[Rule], ctx: &Ctx, key: &str) -> Option<(String, bool)> {
    rules.iter().find_map(|r| {
        let (nums, rest) = match_pattern(r.original, key)?;
        let nums = r.index.forward(&nums, ctx)?;
        Some((fill(r.diffusers, &nums) + &rename_leaf(rest, r.leaves, false), r.conv_to_linear))
    })
}

/// The original key that would hold the diffusers tensor `name` (the first rule that fits).
pub fn to_original(rules: &[Rule], ctx: &Ctx, name: &str) -> Option<String> {
    rules.iter().find_map(|r| {
        let (nums, rest) = match_pattern(r.diffusers, name)?;
        let nums = r.index.inverse(&nums, ctx)?;
        let key = fill(r.original, &nums) + &rename_leaf(rest, r.leaves, true);
        // Only a name the forward direction gives back counts: an earlier row may claim the key.
        (to_diffusers(rules, ctx, &key).map(|(n, _)| n).as_deref() == Some(name)).then_some(key)
    })
}

fn rename_leaf(rest: &str, leaves: &[(&str, &str)], backwards: bool) -> String {
    for &(original, diffusers) in leaves {
        let (from, to) = if backwards { (diffusers, original) } else { (original, diffusers) };
        if let Some(tail) = rest.strip_prefix(from) {
            return format!("{to}{tail}");
        }
    }
    rest.to_string()
}

/// Matches `pattern` (literal text and `{}` indices) against the start of `key`: the indices and
/// the unmatched rest.
fn match_pattern<'k>(pattern: &str, key: &'k str) -> Option<(Vec<usize>, &'k str)> {
    let mut parts = pattern.split("{}");
    let mut rest = key.strip_prefix(parts.next().unwrap_or(""))?;
    let mut nums = Vec::new();
    for literal in parts {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        nums.push(rest[..digits].parse().ok()?);
        rest = rest[digits..].strip_prefix(literal)?;
    }
    Some((nums, rest))
}

fn fill(pattern: &str, nums: &[usize]) -> String {
    let mut out = String::with_capacity(pattern.len() + 8);
    for (i, literal) in pattern.split("{}").enumerate() {
        if i > 0 {
            let _ = write!(out, "{}", nums[i - 1]);
        }
        out.push_str(literal);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> Ctx {
        Ctx { layers_per_block: 2, levels: 4, up_attention: vec![false, true, true, true] }
    }

    #[test]
    fn unet_names_follow_diffusers() {
        let c = sd15();
        let cases = [
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
            (
                "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("input_blocks.6.0.op.bias", "down_blocks.1.downsamplers.0.conv.bias"),
            ("input_blocks.11.0.emb_layers.1.weight", "down_blocks.3.resnets.1.time_emb_proj.weight"),
            ("middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight"),
            ("middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            ("output_blocks.5.1.norm.weight", "up_blocks.1.attentions.2.norm.weight"),
            ("output_blocks.11.0.skip_connection.weight", "up_blocks.3.resnets.2.conv_shortcut.weight"),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (original, diffusers) in cases {
            assert_eq!(to_diffusers(LDM_UNET, &c, original).map(|x| x.0).as_deref(), Some(diffusers), "{original}");
            assert_eq!(to_original(LDM_UNET, &c, diffusers).as_deref(), Some(original), "{diffusers}");
        }
        assert!(to_diffusers(LDM_UNET, &c, "label_emb.0.0.weight").is_none());
    }

    #[test]
    fn vae_names_follow_diffusers() {
        let c = sd15();
        let cases = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                false,
            ),
            ("encoder.down.2.downsample.conv.weight", "encoder.down_blocks.2.downsamplers.0.conv.weight", false),
            ("decoder.up.3.block.2.conv1.bias", "decoder.up_blocks.0.resnets.2.conv1.bias", false),
            ("decoder.up.1.upsample.conv.bias", "decoder.up_blocks.2.upsamplers.0.conv.bias", false),
            ("decoder.mid.attn_1.proj_out.weight", "decoder.mid_block.attentions.0.to_out.0.weight", true),
            ("encoder.mid.attn_1.norm.bias", "encoder.mid_block.attentions.0.group_norm.bias", true),
            ("encoder.mid.block_2.norm1.weight", "encoder.mid_block.resnets.1.norm1.weight", false),
            ("decoder.norm_out.weight", "decoder.conv_norm_out.weight", false),
            ("post_quant_conv.bias", "post_quant_conv.bias", false),
        ];
        for (original, diffusers, linear) in cases {
            assert_eq!(to_diffusers(LDM_VAE, &c, original), Some((diffusers.to_string(), linear)), "{original}");
            assert_eq!(to_original(LDM_VAE, &c, diffusers).as_deref(), Some(original), "{diffusers}");
        }
        assert!(to_diffusers(LDM_VAE, &c, "loss.discriminator.main.0.weight").is_none());
    }

    #[test]
    fn patterns_need_whole_indices() {
        assert_eq!(match_pattern("a.{}.b.", "a.12.b.c"), Some((vec![12], "c")));
        assert_eq!(match_pattern("a.{}.b.", "a.x.b.c"), None);
        assert_eq!(match_pattern("a.{}.b.", "a.1.bc"), None);
        assert_eq!(fill("x.{}.y.{}.", &[3, 4]), "x.3.y.4.");
    }
}
