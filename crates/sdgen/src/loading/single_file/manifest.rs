//! The tensors each model of a single-file checkpoint must have, by diffusers name, derived from
//! its config: a checkpoint with a tensor missing is refused when it is opened, naming the key,
//! instead of after minutes of denoising when the VAE is finally built. Plus a few shapes per model
//! that tie the checkpoint to the config's widths (a real-size config over a small checkpoint is
//! refused up front too).
//!
//! The lists are the `state_dict()` names of diffusers' `UNet2DConditionModel` /
//! `AutoencoderKL` / `SD3Transformer2DModel` and transformers' `CLIPTextModel` /
//! `CLIPTextModelWithProjection` (`text_model.` prefix, as the hub stores it) / `T5EncoderModel`
//! for the SD 1.x, SDXL and SD 3.5 architectures; `tests/single_file.rs`,
//! `tests/single_file_sdxl.rs` and `tests/sd3_single_file.rs` check them against the tiny
//! folders' files and against the real models' names (`testdata/tiny-*-single/*-real-keys.json`).

use sdgen_models::clip::ClipTextConfig;
use sdgen_models::mmdit::MMDiTConfig;
use sdgen_models::t5::{FeedForwardProj, T5Config};
use sdgen_models::unet::UNetConfig;
use sdgen_models::vae::VaeConfig;

use super::rules::Ctx;

/// A model's config, as the manifest needs it.
// Three short-lived values per opened checkpoint: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ModelConfig {
    /// `unet/config.json`.
    Unet(UNetConfig),
    /// `vae/config.json`.
    Vae(VaeConfig),
    /// `text_encoder/config.json`.
    ClipText(ClipTextConfig),
    /// `text_encoder_2/config.json` of SDXL: the text model and its `text_projection`.
    ClipTextWithProjection(ClipTextConfig),
    /// `transformer/config.json` of SD 3 / 3.5.
    MMDiT(MMDiTConfig),
    /// `text_encoder_3/config.json` of SD 3 / 3.5: T5's encoder.
    T5(T5Config),
}

fn weight_bias(out: &mut Vec<String>, prefix: &str, modules: &[&str]) {
    for m in modules {
        out.push(format!("{prefix}{m}.weight"));
        out.push(format!("{prefix}{m}.bias"));
    }
}

fn unet_resnet(out: &mut Vec<String>, prefix: &str, shortcut: bool) {
    weight_bias(out, prefix, &["norm1", "conv1", "time_emb_proj", "norm2", "conv2"]);
    if shortcut {
        weight_bias(out, prefix, &["conv_shortcut"]);
    }
}

/// `Transformer2DModel` with `layers` `BasicTransformerBlock`s (self- and cross-attention).
fn transformer(out: &mut Vec<String>, prefix: &str, layers: usize) {
    weight_bias(out, prefix, &["norm", "proj_in"]);
    for t in 0..layers {
        let p = format!("{prefix}transformer_blocks.{t}.");
        for attn in ["attn1", "attn2"] {
            for w in ["to_q", "to_k", "to_v"] {
                out.push(format!("{p}{attn}.{w}.weight"));
            }
            weight_bias(out, &p, &[&format!("{attn}.to_out.0")]);
        }
        weight_bias(out, &p, &["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"]);
    }
    weight_bias(out, prefix, &["proj_out"]);
}

fn vae_resnet(out: &mut Vec<String>, prefix: &str, shortcut: bool) {
    weight_bias(out, prefix, &["norm1", "conv1", "norm2", "conv2"]);
    if shortcut {
        weight_bias(out, prefix, &["conv_shortcut"]);
    }
}

fn vae_mid(out: &mut Vec<String>, prefix: &str) {
    vae_resnet(out, &format!("{prefix}mid_block.resnets.0."), false);
    weight_bias(out, &format!("{prefix}mid_block.attentions.0."), &["group_norm", "to_q", "to_k", "to_v", "to_out.0"]);
    vae_resnet(out, &format!("{prefix}mid_block.resnets.1."), false);
}

impl ModelConfig {
    /// The component's one `layers_per_block`: the original layout numbers its blocks with it.
    fn layers_per_block(&self) -> Result<usize, String> {
        match self {
            ModelConfig::Unet(c) => {
                let per = c.layers_per_block.expand(c.block_out_channels.len());
                match per.split_first() {
                    Some((&first, rest)) if rest.iter().all(|&l| l == first) => Ok(first),
                    _ => Err(format!("layers_per_block {per:?} differs between blocks")),
                }
            }
            ModelConfig::Vae(c) => Ok(c.layers_per_block),
            _ => Ok(0),
        }
    }

    /// What the renaming rules need from the config.
    pub fn ctx(&self) -> Result<Ctx, String> {
        let layers_per_block = self.layers_per_block()?;
        Ok(match self {
            ModelConfig::Unet(c) => Ctx {
                layers_per_block,
                levels: c.block_out_channels.len(),
                up_attention: c.up_block_types.iter().map(|t| t.starts_with("CrossAttn")).collect(),
                blocks: 0,
            },
            ModelConfig::Vae(c) => Ctx { layers_per_block, levels: c.block_out_channels.len(), ..Ctx::default() },
            ModelConfig::MMDiT(c) => Ctx { blocks: c.num_layers, ..Ctx::default() },
            _ => Ctx::default(),
        })
    }

    /// Every tensor the model is built from, by diffusers name, in the model's order.
    pub fn expected(&self) -> Result<Vec<String>, String> {
        let lpb = self.layers_per_block()?;
        if matches!(self, ModelConfig::Unet(c) if c.block_out_channels.is_empty())
            || matches!(self, ModelConfig::Vae(c) if c.block_out_channels.is_empty())
        {
            return Err("block_out_channels is empty".into());
        }
        let mut out = Vec::new();
        match self {
            ModelConfig::Unet(c) => {
                let boc = &c.block_out_channels;
                let n = boc.len();
                let depth = c.transformer_layers_per_block.expand(n);
                if c.down_block_types.len() != n || c.up_block_types.len() != n || depth.len() != n {
                    return Err(format!(
                        "{n} levels but {} down / {} up block types",
                        c.down_block_types.len(),
                        c.up_block_types.len()
                    ));
                }
                weight_bias(&mut out, "", &["conv_in", "time_embedding.linear_1", "time_embedding.linear_2"]);
                if c.addition_embed_type.is_some() {
                    // SDXL's "text_time" (the config loader refuses any other kind).
                    weight_bias(&mut out, "", &["add_embedding.linear_1", "add_embedding.linear_2"]);
                }
                for b in 0..n {
                    let input = if b == 0 { boc[0] } else { boc[b - 1] };
                    for l in 0..lpb {
                        let in_ch = if l == 0 { input } else { boc[b] };
                        unet_resnet(&mut out, &format!("down_blocks.{b}.resnets.{l}."), in_ch != boc[b]);
                        if c.down_block_types[b].starts_with("CrossAttn") {
                            transformer(&mut out, &format!("down_blocks.{b}.attentions.{l}."), depth[b]);
                        }
                    }
                    if b + 1 < n {
                        weight_bias(&mut out, "", &[&format!("down_blocks.{b}.downsamplers.0.conv")]);
                    }
                }
                unet_resnet(&mut out, "mid_block.resnets.0.", false);
                transformer(&mut out, "mid_block.attentions.0.", depth[n - 1]);
                unet_resnet(&mut out, "mid_block.resnets.1.", false);
                for b in 0..n {
                    // Up resnets take the skip connection concatenated: always a channel change.
                    for l in 0..=lpb {
                        unet_resnet(&mut out, &format!("up_blocks.{b}.resnets.{l}."), true);
                        if c.up_block_types[b].starts_with("CrossAttn") {
                            transformer(&mut out, &format!("up_blocks.{b}.attentions.{l}."), depth[n - 1 - b]);
                        }
                    }
                    if b + 1 < n {
                        weight_bias(&mut out, "", &[&format!("up_blocks.{b}.upsamplers.0.conv")]);
                    }
                }
                weight_bias(&mut out, "", &["conv_norm_out", "conv_out"]);
            }
            ModelConfig::Vae(c) => {
                let boc = &c.block_out_channels;
                let n = boc.len();
                weight_bias(&mut out, "encoder.", &["conv_in"]);
                for i in 0..n {
                    let input = if i == 0 { boc[0] } else { boc[i - 1] };
                    for j in 0..lpb {
                        let in_ch = if j == 0 { input } else { boc[i] };
                        vae_resnet(&mut out, &format!("encoder.down_blocks.{i}.resnets.{j}."), in_ch != boc[i]);
                    }
                    if i + 1 < n {
                        weight_bias(&mut out, "", &[&format!("encoder.down_blocks.{i}.downsamplers.0.conv")]);
                    }
                }
                vae_mid(&mut out, "encoder.");
                weight_bias(&mut out, "encoder.", &["conv_norm_out", "conv_out"]);
                if c.use_quant_conv {
                    weight_bias(&mut out, "", &["quant_conv"]);
                }
                if c.use_post_quant_conv {
                    weight_bias(&mut out, "", &["post_quant_conv"]);
                }
                weight_bias(&mut out, "decoder.", &["conv_in"]);
                vae_mid(&mut out, "decoder.");
                let rev: Vec<usize> = boc.iter().rev().copied().collect();
                for i in 0..n {
                    let prev = if i == 0 { rev[0] } else { rev[i - 1] };
                    for j in 0..=lpb {
                        let in_ch = if j == 0 { prev } else { rev[i] };
                        vae_resnet(&mut out, &format!("decoder.up_blocks.{i}.resnets.{j}."), in_ch != rev[i]);
                    }
                    if i + 1 < n {
                        weight_bias(&mut out, "", &[&format!("decoder.up_blocks.{i}.upsamplers.0.conv")]);
                    }
                }
                weight_bias(&mut out, "decoder.", &["conv_norm_out", "conv_out"]);
            }
            ModelConfig::ClipText(c) | ModelConfig::ClipTextWithProjection(c) => {
                out.push("text_model.embeddings.token_embedding.weight".into());
                out.push("text_model.embeddings.position_embedding.weight".into());
                for i in 0..c.num_hidden_layers {
                    let p = format!("text_model.encoder.layers.{i}.");
                    weight_bias(
                        &mut out,
                        &p,
                        &["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj"],
                    );
                    weight_bias(&mut out, &p, &["layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"]);
                }
                weight_bias(&mut out, "text_model.", &["final_layer_norm"]);
                if matches!(self, ModelConfig::ClipTextWithProjection(_)) {
                    out.push("text_projection.weight".into());
                }
            }
            ModelConfig::MMDiT(c) => mmdit(&mut out, c)?,
            ModelConfig::T5(c) => {
                out.push("shared.weight".into());
                let ff: &[&str] = match c.feed_forward_proj {
                    FeedForwardProj::Relu => &["wi", "wo"],
                    FeedForwardProj::GatedGelu => &["wi_0", "wi_1", "wo"],
                };
                for i in 0..c.num_layers {
                    let p = format!("encoder.block.{i}.layer.");
                    for w in ["q", "k", "v", "o"] {
                        out.push(format!("{p}0.SelfAttention.{w}.weight"));
                    }
                    if i == 0 {
                        // The relative-position table lives in the first block, shared by all.
                        out.push(format!("{p}0.SelfAttention.relative_attention_bias.weight"));
                    }
                    out.push(format!("{p}0.layer_norm.weight"));
                    out.extend(ff.iter().map(|w| format!("{p}1.DenseReluDense.{w}.weight")));
                    out.push(format!("{p}1.layer_norm.weight"));
                }
                out.push("encoder.final_layer_norm.weight".into());
            }
        }
        Ok(out)
    }

    /// Whether a checkpoint tensor that the config has no place for is refused: an MMDiT's blocks
    /// and dual attentions are counted by the config, so a block beyond them (or an `attn2` where
    /// it has none) means another architecture, not leftovers to ignore (as an SD 1.x file's
    /// EMA copies or `position_ids` are).
    pub fn refuses_extra(&self, name: &str) -> bool {
        // The position table is a buffer the model can also compute.
        matches!(self, ModelConfig::MMDiT(_)) && name != "pos_embed.pos_embed"
    }

    /// Shapes that tie the checkpoint to the config: every level's width, the conditioning width,
    /// the vocabulary. (The model checks every shape again when it is built.)
    pub fn spot_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        match self {
            ModelConfig::Unet(c) => {
                let boc = &c.block_out_channels;
                let (first, last) = (boc[0], boc[boc.len() - 1]);
                out.push(("conv_in.weight".into(), vec![first, c.in_channels, 3, 3]));
                out.push(("time_embedding.linear_1.weight".into(), vec![4 * first, first]));
                if let (Some(_), Some(input)) = (&c.addition_embed_type, c.projection_class_embeddings_input_dim) {
                    // Base and refiner differ here (2816 = 1280 + 6·256 vs 2560 = 1280 + 5·256).
                    out.push(("add_embedding.linear_1.weight".into(), vec![4 * first, input]));
                }
                for (b, &ch) in boc.iter().enumerate() {
                    let input = if b == 0 { first } else { boc[b - 1] };
                    out.push((format!("down_blocks.{b}.resnets.0.conv1.weight"), vec![ch, input, 3, 3]));
                }
                if let Some(b) = c.down_block_types.iter().position(|t| t.starts_with("CrossAttn")) {
                    let name = format!("down_blocks.{b}.attentions.0.transformer_blocks.0.attn2.to_k.weight");
                    out.push((name, vec![boc[b], c.cross_attention_dim]));
                }
                out.push(("mid_block.resnets.0.conv1.weight".into(), vec![last, last, 3, 3]));
                out.push(("conv_out.weight".into(), vec![c.out_channels, first, 3, 3]));
            }
            ModelConfig::Vae(c) => {
                let boc = &c.block_out_channels;
                let (first, last) = (boc[0], boc[boc.len() - 1]);
                out.push(("encoder.conv_in.weight".into(), vec![first, c.in_channels, 3, 3]));
                for (i, &ch) in boc.iter().enumerate() {
                    let input = if i == 0 { first } else { boc[i - 1] };
                    out.push((format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"), vec![ch, input, 3, 3]));
                }
                out.push(("decoder.conv_in.weight".into(), vec![last, c.latent_channels, 3, 3]));
                out.push(("decoder.conv_out.weight".into(), vec![c.out_channels, first, 3, 3]));
            }
            ModelConfig::ClipText(c) | ModelConfig::ClipTextWithProjection(c) => {
                let h = c.hidden_size;
                out.push(("text_model.embeddings.token_embedding.weight".into(), vec![c.vocab_size, h]));
                out.push((
                    "text_model.embeddings.position_embedding.weight".into(),
                    vec![c.max_position_embeddings, h],
                ));
                if c.num_hidden_layers > 0 {
                    out.push(("text_model.encoder.layers.0.mlp.fc1.weight".into(), vec![c.intermediate_size, h]));
                }
                if matches!(self, ModelConfig::ClipTextWithProjection(_)) {
                    out.push(("text_projection.weight".into(), vec![c.projection_dim.unwrap_or(h), h]));
                }
            }
            ModelConfig::MMDiT(c) => {
                let (dim, p) = (c.inner_dim(), c.patch_size);
                out.push(("pos_embed.proj.weight".into(), vec![dim, c.in_channels, p, p]));
                out.push(("context_embedder.weight".into(), vec![c.caption_projection_dim, c.joint_attention_dim]));
                out.push(("time_text_embed.text_embedder.linear_1.weight".into(), vec![dim, c.pooled_projection_dim]));
                // Shift, scale and gate for attention and feed-forward; three more for `attn2`.
                let chunks = if c.dual_attention_layers.contains(&0) { 9 } else { 6 };
                out.push(("transformer_blocks.0.norm1.linear.weight".into(), vec![chunks * dim, dim]));
                out.push(("proj_out.weight".into(), vec![p * p * c.out_channels(), dim]));
            }
            ModelConfig::T5(c) => {
                out.push(("shared.weight".into(), vec![c.vocab_size, c.d_model]));
                if c.num_layers > 0 {
                    let q = "encoder.block.0.layer.0.SelfAttention.q.weight";
                    out.push((q.into(), vec![c.num_heads * c.d_kv, c.d_model]));
                }
            }
        }
        out
    }
}

/// diffusers' `SD3Transformer2DModel` (`transformer_sd3.py`): the embedders, the joint blocks (the
/// last one's context stream only feeds the attention: no output projection, feed-forward or
/// zero-init modulation of its own), the final norm and projection.
fn mmdit(out: &mut Vec<String>, c: &MMDiTConfig) -> Result<(), String> {
    if c.num_layers == 0 {
        return Err("num_layers is 0".into());
    }
    if let Some(&i) = c.dual_attention_layers.iter().find(|&&i| i >= c.num_layers) {
        return Err(format!("dual_attention_layers names block {i} of {}", c.num_layers));
    }
    weight_bias(
        out,
        "",
        &[
            "pos_embed.proj",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
            "time_text_embed.text_embedder.linear_1",
            "time_text_embed.text_embedder.linear_2",
            "context_embedder",
        ],
    );
    for i in 0..c.num_layers {
        let p = format!("transformer_blocks.{i}.");
        let last = i + 1 == c.num_layers;
        weight_bias(out, &p, &["norm1.linear", "norm1_context.linear"]);
        weight_bias(
            out,
            &p,
            &["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
        );
        weight_bias(out, &p, &["attn.to_out.0"]);
        if !last {
            weight_bias(out, &p, &["attn.to_add_out"]);
        }
        if c.has_qk_norm() {
            for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
                out.push(format!("{p}attn.{n}.weight"));
            }
        }
        if c.dual_attention_layers.contains(&i) {
            weight_bias(out, &p, &["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]);
            if c.has_qk_norm() {
                out.extend(["norm_q", "norm_k"].map(|n| format!("{p}attn2.{n}.weight")));
            }
        }
        weight_bias(out, &p, &["ff.net.0.proj", "ff.net.2"]);
        if !last {
            weight_bias(out, &p, &["ff_context.net.0.proj", "ff_context.net.2"]);
        }
    }
    weight_bias(out, "", &["norm_out.linear", "proj_out"]);
    Ok(())
}
