//! Original (CompVis / A1111 / ComfyUI / Stability "SGM") tensor names ↔ diffusers names, as
//! tables of prefix rules. A port of diffusers' `convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint`
//! (`loaders/single_file_utils.py`): there the renaming is spread over loops and `str.replace`
//! chains; here each module kind is one row, read both ways — forwards to serve a checkpoint's
//! tensors under diffusers names, backwards to name the original key a missing tensor should have
//! had.
//!
//! A pattern's `{}` stands for a decimal index; [`Index`] says how the original indices become
//! the diffusers ones (the UNet's flat `input_blocks.{i}` are `down_blocks.{b}` × `{l}`, the
//! VAE's decoder levels run in the opposite order, ...). What follows the matched prefix is kept,
//! except for the renamed leaves of the rule (`in_layers.0.` → `norm1.`).
//!
//! Most tensors are served as stored. OpenCLIP's (SDXL's second text encoder) are not all: its
//! attention keeps q, k and v in one fused `in_proj_weight` that diffusers holds as three
//! matrices, and its `text_projection` is applied as `x @ P` where diffusers' `Linear` holds
//! `Pᵀ`. SD 3's MMDiT fuses q, k and v the same way (`attn.qkv`), and holds the modulation of
//! its `AdaLayerNormContinuous` layers as (shift, scale) where diffusers' holds (scale, shift)
//! (diffusers' `swap_scale_shift`). A row says so with a [`Take`]; several leaves sharing one
//! original are the pieces of a fused tensor.

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
    /// Transformer blocks (an MMDiT's `num_layers`): the last one's context stream differs.
    pub blocks: usize,
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
    /// The same number, for the last block only (`i = blocks − 1`): SD 3's last joint block, whose
    /// context stream only feeds the attention (diffusers' `context_pre_only`).
    LastBlock,
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
            Index::LastBlock => last_block(n, c)?,
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
            Index::LastBlock => last_block(n, c)?,
        })
    }
}

fn last_block(n: &[usize], c: &Ctx) -> Option<Vec<usize>> {
    (c.blocks.checked_sub(1)? == n[0]).then(|| n.to_vec())
}

fn reversed(n: &[usize], c: &Ctx) -> Option<Vec<usize>> {
    let mut v = n.to_vec();
    v[0] = c.levels.checked_sub(1)?.checked_sub(n[0])?;
    Some(v)
}

/// Which part of a stored tensor a diffusers tensor is, and how it is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// The tensor as stored.
    Whole,
    /// Slice `index` of `of` equal slices along dimension 0: rows of a row-major tensor, so a
    /// contiguous byte range of the stored one (OpenCLIP's fused q/k/v `in_proj_weight`, as
    /// PyTorch's `MultiheadAttention` stacks them).
    Chunk {
        /// Which slice, from 0.
        index: usize,
        /// How many.
        of: usize,
    },
    /// The transpose of a stored 2-D matrix (OpenCLIP's `text_projection`, stored `[width,
    /// embed]`, diffusers' `text_projection.weight` `[embed, width]`).
    Transposed,
    /// The two halves of dimension 0 swapped: SD 3's `AdaLayerNormContinuous` modulation, stored
    /// (shift, scale), served (scale, shift) as diffusers' `swap_scale_shift` does.
    SwapHalves,
    /// Not stored: the identity (SD 3's CLIP-L, whose pooled output SAI's reference does not
    /// project; diffusers' single-file loader puts `torch.eye` in its `text_projection`).
    Identity,
}

/// A leaf renamed inside a module: `original` (a prefix of what follows the module's prefix)
/// becomes `diffusers`, taking the stored tensor as `take` says.
#[derive(Debug)]
pub struct Leaf {
    /// Original leaf prefix.
    pub original: &'static str,
    /// diffusers leaf prefix.
    pub diffusers: &'static str,
    /// Which part of the stored tensor.
    pub take: Take,
}

const fn leaf(original: &'static str, diffusers: &'static str) -> Leaf {
    Leaf { original, diffusers, take: Take::Whole }
}

/// One of the three pieces of a fused q/k/v tensor.
const fn qkv(original: &'static str, diffusers: &'static str, index: usize) -> Leaf {
    Leaf { original, diffusers, take: Take::Chunk { index, of: 3 } }
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
    /// Leaves renamed inside the module, first match wins; others are kept. Consecutive leaves
    /// with the same original are the pieces of one fused tensor.
    pub leaves: &'static [Leaf],
    /// Weights stored as 1×1 convolutions (`[C, C, 1, 1]`, or `[C, C, 1]`) that diffusers holds
    /// as linear `[C, C]` (diffusers' `conv_attn_to_linear`).
    pub conv_to_linear: bool,
    /// How a tensor that no leaf renames is taken.
    pub take: Take,
    /// Whether only the leaves are renamed: a tensor under the prefix that no leaf names is left
    /// out (SD 3's two streams of a joint block share one diffusers prefix, so neither may claim
    /// the other's names).
    pub only_leaves: bool,
}

/// Where one stored tensor goes: a diffusers name and how to take it.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The diffusers name.
    pub name: String,
    /// Which part of the stored tensor, and how.
    pub take: Take,
    /// Whether a 1×1-convolution shape drops to linear.
    pub conv_to_linear: bool,
}

const fn rule(original: &'static str, diffusers: &'static str) -> Rule {
    indexed(original, diffusers, Index::Same)
}

const fn indexed(original: &'static str, diffusers: &'static str, index: Index) -> Rule {
    with_leaves(original, diffusers, index, &[])
}

const fn with_leaves(original: &'static str, diffusers: &'static str, index: Index, leaves: &'static [Leaf]) -> Rule {
    Rule { original, diffusers, index, leaves, conv_to_linear: false, take: Take::Whole, only_leaves: false }
}

/// `openaimodel.ResBlock` → `ResnetBlock2D` (diffusers' `update_unet_resnet_ldm_to_diffusers`).
const UNET_RESNET: &[Leaf] = &[
    leaf("in_layers.0.", "norm1."),
    leaf("in_layers.2.", "conv1."),
    leaf("out_layers.0.", "norm2."),
    leaf("out_layers.3.", "conv2."),
    leaf("emb_layers.1.", "time_emb_proj."),
    leaf("skip_connection.", "conv_shortcut."),
];

/// The ldm / SGM UNet (`model.diffusion_model.*`) of SD 1.x and SDXL. Order matters: the first
/// matching row wins. The transformer blocks inside `input_blocks.{i}.1` keep their names, at any
/// depth. SDXL's `label_emb` (its added text + size/crop embedding) is diffusers'
/// `add_embedding` (`addition_embed_type: "text_time"`); the config decides whether it is needed.
pub const LDM_UNET: &[Rule] = &[
    rule("time_embed.0.", "time_embedding.linear_1."),
    rule("time_embed.2.", "time_embedding.linear_2."),
    rule("label_emb.0.0.", "add_embedding.linear_1."),
    rule("label_emb.0.2.", "add_embedding.linear_2."),
    rule("input_blocks.0.0.", "conv_in."),
    rule("out.0.", "conv_norm_out."),
    rule("out.2.", "conv_out."),
    indexed("input_blocks.{}.0.op.", "down_blocks.{}.downsamplers.0.conv.", Index::DownSampler),
    with_leaves("input_blocks.{}.0.", "down_blocks.{}.resnets.{}.", Index::Down, UNET_RESNET),
    indexed("input_blocks.{}.1.", "down_blocks.{}.attentions.{}.", Index::Down),
    with_leaves("middle_block.0.", "mid_block.resnets.0.", Index::Same, UNET_RESNET),
    rule("middle_block.1.", "mid_block.attentions.0."),
    with_leaves("middle_block.2.", "mid_block.resnets.1.", Index::Same, UNET_RESNET),
    with_leaves("output_blocks.{}.0.", "up_blocks.{}.resnets.{}.", Index::Up, UNET_RESNET),
    indexed("output_blocks.{}.1.conv.", "up_blocks.{}.upsamplers.0.conv.", Index::UpSampler { slot: 1 }),
    indexed("output_blocks.{}.2.conv.", "up_blocks.{}.upsamplers.0.conv.", Index::UpSampler { slot: 2 }),
    indexed("output_blocks.{}.1.", "up_blocks.{}.attentions.{}.", Index::Up),
];

/// ldm `ResnetBlock` → `ResnetBlock2D` (diffusers' `update_vae_resnet_ldm_to_diffusers`).
const VAE_RESNET: &[Leaf] = &[leaf("nin_shortcut.", "conv_shortcut.")];

/// ldm `AttnBlock` → `Attention` (diffusers' `update_vae_attentions_ldm_to_diffusers`).
const VAE_ATTENTION: &[Leaf] = &[
    leaf("norm.", "group_norm."),
    leaf("q.", "to_q."),
    leaf("k.", "to_k."),
    leaf("v.", "to_v."),
    leaf("proj_out.", "to_out.0."),
];

const fn vae_attention(original: &'static str, diffusers: &'static str) -> Rule {
    Rule { conv_to_linear: true, ..with_leaves(original, diffusers, Index::Same, VAE_ATTENTION) }
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
    with_leaves("encoder.down.{}.block.{}.", "encoder.down_blocks.{}.resnets.{}.", Index::Same, VAE_RESNET),
    with_leaves("encoder.mid.block_1.", "encoder.mid_block.resnets.0.", Index::Same, VAE_RESNET),
    with_leaves("encoder.mid.block_2.", "encoder.mid_block.resnets.1.", Index::Same, VAE_RESNET),
    vae_attention("encoder.mid.attn_1.", "encoder.mid_block.attentions.0."),
    with_leaves("decoder.mid.block_1.", "decoder.mid_block.resnets.0.", Index::Same, VAE_RESNET),
    with_leaves("decoder.mid.block_2.", "decoder.mid_block.resnets.1.", Index::Same, VAE_RESNET),
    vae_attention("decoder.mid.attn_1.", "decoder.mid_block.attentions.0."),
    indexed("decoder.up.{}.upsample.conv.", "decoder.up_blocks.{}.upsamplers.0.conv.", Index::Reversed),
    with_leaves("decoder.up.{}.block.{}.", "decoder.up_blocks.{}.resnets.{}.", Index::Reversed, VAE_RESNET),
];

/// transformers' `CLIPTextModel` under `cond_stage_model.transformer.` (SD 1.x) or
/// `conditioner.embedders.0.transformer.` (SDXL base): the names are already transformers'
/// (`text_model.*`), only the prefix goes.
pub const CLIP_TEXT: &[Rule] = &[rule("", "")];

/// OpenCLIP's `ResidualAttentionBlock` → transformers' `CLIPEncoderLayer` (diffusers'
/// `DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]`).
const OPEN_CLIP_LAYER: &[Leaf] = &[
    leaf("ln_1.", "layer_norm1."),
    leaf("ln_2.", "layer_norm2."),
    leaf("mlp.c_fc.", "mlp.fc1."),
    leaf("mlp.c_proj.", "mlp.fc2."),
    leaf("attn.out_proj.", "self_attn.out_proj."),
    qkv("attn.in_proj_weight", "self_attn.q_proj.weight", 0),
    qkv("attn.in_proj_weight", "self_attn.k_proj.weight", 1),
    qkv("attn.in_proj_weight", "self_attn.v_proj.weight", 2),
    qkv("attn.in_proj_bias", "self_attn.q_proj.bias", 0),
    qkv("attn.in_proj_bias", "self_attn.k_proj.bias", 1),
    qkv("attn.in_proj_bias", "self_attn.v_proj.bias", 2),
];

/// OpenCLIP's text tower (ViT-bigG/14 in SDXL: `conditioner.embedders.1.model.*` in the base,
/// `conditioner.embedders.0.model.*` in the refiner) → transformers'
/// `CLIPTextModelWithProjection` (diffusers' `convert_open_clip_checkpoint`). `logit_scale`, a
/// training-only scalar, has no row and is left out.
pub const OPEN_CLIP_TEXT: &[Rule] = &[
    rule("token_embedding.", "text_model.embeddings.token_embedding."),
    rule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    rule("ln_final.", "text_model.final_layer_norm."),
    Rule { take: Take::Transposed, ..rule("text_projection", "text_projection.weight") },
    with_leaves("transformer.resblocks.{}.", "text_model.encoder.layers.{}.", Index::Same, OPEN_CLIP_LAYER),
];

/// SD 3's MMDiT x (image) stream of `joint_blocks.{}` → diffusers' `JointTransformerBlock`
/// (diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`): fused q/k/v, RMS QK-norm, and
/// 3.5 Medium's second, image-only attention (`attn2`).
const MMDIT_X_BLOCK: &[Leaf] = &[
    qkv("attn.qkv.weight", "attn.to_q.weight", 0),
    qkv("attn.qkv.weight", "attn.to_k.weight", 1),
    qkv("attn.qkv.weight", "attn.to_v.weight", 2),
    qkv("attn.qkv.bias", "attn.to_q.bias", 0),
    qkv("attn.qkv.bias", "attn.to_k.bias", 1),
    qkv("attn.qkv.bias", "attn.to_v.bias", 2),
    leaf("attn.ln_q.", "attn.norm_q."),
    leaf("attn.ln_k.", "attn.norm_k."),
    leaf("attn.proj.", "attn.to_out.0."),
    qkv("attn2.qkv.weight", "attn2.to_q.weight", 0),
    qkv("attn2.qkv.weight", "attn2.to_k.weight", 1),
    qkv("attn2.qkv.weight", "attn2.to_v.weight", 2),
    qkv("attn2.qkv.bias", "attn2.to_q.bias", 0),
    qkv("attn2.qkv.bias", "attn2.to_k.bias", 1),
    qkv("attn2.qkv.bias", "attn2.to_v.bias", 2),
    leaf("attn2.ln_q.", "attn2.norm_q."),
    leaf("attn2.ln_k.", "attn2.norm_k."),
    leaf("attn2.proj.", "attn2.to_out.0."),
    leaf("adaLN_modulation.1.", "norm1.linear."),
    leaf("mlp.fc1.", "ff.net.0.proj."),
    leaf("mlp.fc2.", "ff.net.2."),
];

/// The context (text) stream of `joint_blocks.{}`: the same modules under diffusers' `add_` /
/// `_context` names. The last block has only the modulation and q/k/v.
const MMDIT_CONTEXT_BLOCK: &[Leaf] = &[
    qkv("attn.qkv.weight", "attn.add_q_proj.weight", 0),
    qkv("attn.qkv.weight", "attn.add_k_proj.weight", 1),
    qkv("attn.qkv.weight", "attn.add_v_proj.weight", 2),
    qkv("attn.qkv.bias", "attn.add_q_proj.bias", 0),
    qkv("attn.qkv.bias", "attn.add_k_proj.bias", 1),
    qkv("attn.qkv.bias", "attn.add_v_proj.bias", 2),
    leaf("attn.ln_q.", "attn.norm_added_q."),
    leaf("attn.ln_k.", "attn.norm_added_k."),
    leaf("attn.proj.", "attn.to_add_out."),
    leaf("adaLN_modulation.1.", "norm1_context.linear."),
    leaf("mlp.fc1.", "ff_context.net.0.proj."),
    leaf("mlp.fc2.", "ff_context.net.2."),
];

/// SD 3 / 3.5's MMDiT (`model.diffusion_model.*` of `sd3.5_large.safetensors`) → diffusers'
/// `SD3Transformer2DModel`. The last block's context modulation and `final_layer`'s are
/// `AdaLayerNormContinuous` in diffusers, their halves swapped.
pub const MMDIT: &[Rule] = &[
    rule("pos_embed", "pos_embed.pos_embed"),
    rule("x_embedder.proj.", "pos_embed.proj."),
    rule("t_embedder.mlp.0.", "time_text_embed.timestep_embedder.linear_1."),
    rule("t_embedder.mlp.2.", "time_text_embed.timestep_embedder.linear_2."),
    rule("y_embedder.mlp.0.", "time_text_embed.text_embedder.linear_1."),
    rule("y_embedder.mlp.2.", "time_text_embed.text_embedder.linear_2."),
    rule("context_embedder.", "context_embedder."),
    rule("final_layer.linear.", "proj_out."),
    Rule { take: Take::SwapHalves, ..rule("final_layer.adaLN_modulation.1.", "norm_out.linear.") },
    Rule {
        take: Take::SwapHalves,
        ..indexed(
            "joint_blocks.{}.context_block.adaLN_modulation.1.",
            "transformer_blocks.{}.norm1_context.linear.",
            Index::LastBlock,
        )
    },
    Rule {
        only_leaves: true,
        ..with_leaves("joint_blocks.{}.x_block.", "transformer_blocks.{}.", Index::Same, MMDIT_X_BLOCK)
    },
    Rule {
        only_leaves: true,
        ..with_leaves("joint_blocks.{}.context_block.", "transformer_blocks.{}.", Index::Same, MMDIT_CONTEXT_BLOCK)
    },
];

/// transformers' `T5EncoderModel` under `text_encoders.t5xxl.transformer.` (or alone, in
/// `text_encoders/t5xxl_fp16.safetensors`): already transformers' names (`shared.weight`,
/// `encoder.*`), only the prefix goes (diffusers' `convert_sd3_t5_checkpoint_to_diffusers`).
pub const T5_ENCODER: &[Rule] = &[rule("", "")];

/// Where an original key goes under diffusers names: one target, several for a fused tensor,
/// none when no row covers it (a tensor the models do not use).
pub fn to_diffusers(rules: &[Rule], ctx: &Ctx, key: &str) -> Vec<Target> {
    rules
        .iter()
        .find_map(|r| {
            let (nums, rest) = match_pattern(r.original, key)?;
            let nums = r.index.forward(&nums, ctx)?;
            let base = fill(r.diffusers, &nums);
            let target = |name: String, take: Take| Target { name, take, conv_to_linear: r.conv_to_linear };
            let Some(first) = r.leaves.iter().position(|l| rest.starts_with(l.original)) else {
                return (!r.only_leaves).then(|| vec![target(base + rest, r.take)]);
            };
            let original = r.leaves[first].original;
            let tail = &rest[original.len()..];
            Some(
                r.leaves[first..]
                    .iter()
                    .take_while(|l| l.original == original)
                    .map(|l| target(format!("{base}{}{tail}", l.diffusers), l.take))
                    .collect(),
            )
        })
        .unwrap_or_default()
}

/// The original key that would hold the diffusers tensor `name` (the first rule that fits).
pub fn to_original(rules: &[Rule], ctx: &Ctx, name: &str) -> Option<String> {
    rules.iter().find_map(|r| {
        let (nums, rest) = match_pattern(r.diffusers, name)?;
        let nums = r.index.inverse(&nums, ctx)?;
        let leaf = r.leaves.iter().find_map(|l| Some((l.original, rest.strip_prefix(l.diffusers)?)));
        let key = match leaf {
            Some((original, tail)) => format!("{}{original}{tail}", fill(r.original, &nums)),
            None if r.only_leaves => return None,
            None => fill(r.original, &nums) + rest,
        };
        // Only a name the forward direction gives back counts: an earlier row may claim the key.
        to_diffusers(rules, ctx, &key).iter().any(|t| t.name == name).then_some(key)
    })
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
        Ctx { layers_per_block: 2, levels: 4, up_attention: vec![false, true, true, true], ..Ctx::default() }
    }

    /// The one target of `key`, as (name, 1×1 conv → linear).
    fn one(rules: &[Rule], c: &Ctx, key: &str) -> Option<(String, bool)> {
        let targets = to_diffusers(rules, c, key);
        assert!(targets.len() <= 1, "{key}: {targets:?}");
        targets.into_iter().next().map(|t| {
            assert_eq!(t.take, Take::Whole, "{key}");
            (t.name, t.conv_to_linear)
        })
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
            assert_eq!(one(LDM_UNET, &c, original).map(|x| x.0).as_deref(), Some(diffusers), "{original}");
            assert_eq!(to_original(LDM_UNET, &c, diffusers).as_deref(), Some(original), "{diffusers}");
        }
        assert!(one(LDM_UNET, &c, "label_emb.0.1.weight").is_none());
    }

    /// SDXL base: 3 levels, no attention on level 0 (so no `input_blocks.{1,2}.1`), the upsampler
    /// of the two attention levels in slot 2, 10 transformer blocks deep at the bottom.
    #[test]
    fn sdxl_unet_names_follow_diffusers() {
        let c = Ctx { layers_per_block: 2, levels: 3, up_attention: vec![true, true, false], ..Ctx::default() };
        let cases = [
            ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
            ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
            ("input_blocks.2.0.in_layers.0.bias", "down_blocks.0.resnets.1.norm1.bias"),
            ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
            (
                "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight",
                "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj.weight",
            ),
            (
                "middle_block.1.transformer_blocks.9.attn2.to_k.weight",
                "mid_block.attentions.0.transformer_blocks.9.attn2.to_k.weight",
            ),
            ("output_blocks.2.2.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            ("output_blocks.8.0.skip_connection.weight", "up_blocks.2.resnets.2.conv_shortcut.weight"),
        ];
        for (original, diffusers) in cases {
            assert_eq!(one(LDM_UNET, &c, original).map(|x| x.0).as_deref(), Some(diffusers), "{original}");
            assert_eq!(to_original(LDM_UNET, &c, diffusers).as_deref(), Some(original), "{diffusers}");
        }
    }

    #[test]
    fn open_clip_names_follow_diffusers() {
        let c = Ctx::default();
        let cases = [
            ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
            ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
            ("ln_final.bias", "text_model.final_layer_norm.bias"),
            ("transformer.resblocks.31.ln_2.weight", "text_model.encoder.layers.31.layer_norm2.weight"),
            ("transformer.resblocks.0.mlp.c_fc.bias", "text_model.encoder.layers.0.mlp.fc1.bias"),
            ("transformer.resblocks.7.mlp.c_proj.weight", "text_model.encoder.layers.7.mlp.fc2.weight"),
            ("transformer.resblocks.3.attn.out_proj.bias", "text_model.encoder.layers.3.self_attn.out_proj.bias"),
        ];
        for (original, diffusers) in cases {
            assert_eq!(one(OPEN_CLIP_TEXT, &c, original).map(|x| x.0).as_deref(), Some(diffusers), "{original}");
            assert_eq!(to_original(OPEN_CLIP_TEXT, &c, diffusers).as_deref(), Some(original), "{diffusers}");
        }
        let fused = to_diffusers(OPEN_CLIP_TEXT, &c, "transformer.resblocks.5.attn.in_proj_weight");
        let names: Vec<(&str, Take)> = fused.iter().map(|t| (t.name.as_str(), t.take)).collect();
        assert_eq!(
            names,
            [
                ("text_model.encoder.layers.5.self_attn.q_proj.weight", Take::Chunk { index: 0, of: 3 }),
                ("text_model.encoder.layers.5.self_attn.k_proj.weight", Take::Chunk { index: 1, of: 3 }),
                ("text_model.encoder.layers.5.self_attn.v_proj.weight", Take::Chunk { index: 2, of: 3 }),
            ]
        );
        for piece in ["q", "k", "v"] {
            let name = format!("text_model.encoder.layers.5.self_attn.{piece}_proj.bias");
            assert_eq!(
                to_original(OPEN_CLIP_TEXT, &c, &name).as_deref(),
                Some("transformer.resblocks.5.attn.in_proj_bias")
            );
        }
        let proj = to_diffusers(OPEN_CLIP_TEXT, &c, "text_projection");
        assert_eq!(proj.len(), 1);
        assert_eq!((proj[0].name.as_str(), proj[0].take), ("text_projection.weight", Take::Transposed));
        assert_eq!(to_original(OPEN_CLIP_TEXT, &c, "text_projection.weight").as_deref(), Some("text_projection"));
        assert!(to_diffusers(OPEN_CLIP_TEXT, &c, "logit_scale").is_empty());
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
            assert_eq!(one(LDM_VAE, &c, original), Some((diffusers.to_string(), linear)), "{original}");
            assert_eq!(to_original(LDM_VAE, &c, diffusers).as_deref(), Some(original), "{diffusers}");
        }
        assert!(one(LDM_VAE, &c, "loss.discriminator.main.0.weight").is_none());
    }

    /// SD 3.5's MMDiT with 24 blocks (Medium's depth): the two streams of a block under one
    /// diffusers prefix, q/k/v fused, the last block's context modulation and the final one
    /// swapped, nothing claimed that no leaf names.
    #[test]
    fn mmdit_names_follow_diffusers() {
        let c = Ctx { blocks: 24, ..Ctx::default() };
        let whole = [
            ("pos_embed", "pos_embed.pos_embed"),
            ("x_embedder.proj.weight", "pos_embed.proj.weight"),
            ("t_embedder.mlp.2.bias", "time_text_embed.timestep_embedder.linear_2.bias"),
            ("y_embedder.mlp.0.weight", "time_text_embed.text_embedder.linear_1.weight"),
            ("context_embedder.weight", "context_embedder.weight"),
            ("final_layer.linear.bias", "proj_out.bias"),
            ("joint_blocks.3.x_block.attn.ln_q.weight", "transformer_blocks.3.attn.norm_q.weight"),
            ("joint_blocks.3.context_block.attn.ln_k.weight", "transformer_blocks.3.attn.norm_added_k.weight"),
            ("joint_blocks.12.x_block.attn2.proj.bias", "transformer_blocks.12.attn2.to_out.0.bias"),
            ("joint_blocks.0.context_block.attn.proj.weight", "transformer_blocks.0.attn.to_add_out.weight"),
            (
                "joint_blocks.22.context_block.adaLN_modulation.1.bias",
                "transformer_blocks.22.norm1_context.linear.bias",
            ),
            ("joint_blocks.7.x_block.mlp.fc2.weight", "transformer_blocks.7.ff.net.2.weight"),
            ("joint_blocks.7.context_block.mlp.fc1.bias", "transformer_blocks.7.ff_context.net.0.proj.bias"),
        ];
        for (original, diffusers) in whole {
            assert_eq!(one(MMDIT, &c, original).map(|x| x.0).as_deref(), Some(diffusers), "{original}");
            assert_eq!(to_original(MMDIT, &c, diffusers).as_deref(), Some(original), "{diffusers}");
        }
        for (original, diffusers) in [
            ("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight"),
            (
                "joint_blocks.23.context_block.adaLN_modulation.1.bias",
                "transformer_blocks.23.norm1_context.linear.bias",
            ),
        ] {
            let t = to_diffusers(MMDIT, &c, original);
            assert_eq!(t.len(), 1, "{original}");
            assert_eq!((t[0].name.as_str(), t[0].take), (diffusers, Take::SwapHalves), "{original}");
            assert_eq!(to_original(MMDIT, &c, diffusers).as_deref(), Some(original), "{diffusers}");
        }
        let fused = to_diffusers(MMDIT, &c, "joint_blocks.5.context_block.attn.qkv.bias");
        let names: Vec<(&str, Take)> = fused.iter().map(|t| (t.name.as_str(), t.take)).collect();
        assert_eq!(
            names,
            [
                ("transformer_blocks.5.attn.add_q_proj.bias", Take::Chunk { index: 0, of: 3 }),
                ("transformer_blocks.5.attn.add_k_proj.bias", Take::Chunk { index: 1, of: 3 }),
                ("transformer_blocks.5.attn.add_v_proj.bias", Take::Chunk { index: 2, of: 3 }),
            ]
        );
        let x = to_diffusers(MMDIT, &c, "joint_blocks.1.x_block.attn2.qkv.weight");
        assert_eq!(x[2].name, "transformer_blocks.1.attn2.to_v.weight");
        assert_eq!(
            to_original(MMDIT, &c, "transformer_blocks.5.attn.to_k.weight").as_deref(),
            Some("joint_blocks.5.x_block.attn.qkv.weight")
        );
        // Neither stream claims the other's names, nor keys no leaf names.
        assert!(to_diffusers(MMDIT, &c, "joint_blocks.1.x_block.attn.unknown.weight").is_empty());
        assert!(to_original(MMDIT, &c, "transformer_blocks.1.attn.unknown.weight").is_none());
    }

    #[test]
    fn patterns_need_whole_indices() {
        assert_eq!(match_pattern("a.{}.b.", "a.12.b.c"), Some((vec![12], "c")));
        assert_eq!(match_pattern("a.{}.b.", "a.x.b.c"), None);
        assert_eq!(match_pattern("a.{}.b.", "a.1.bc"), None);
        assert_eq!(fill("x.{}.y.{}.", &[3, 4]), "x.3.y.4.");
    }
}
