//! diffusers' `SD3Transformer2DModel` (`transformer_sd3.py`): the MMDiT denoiser of SD 3 Medium
//! and SD 3.5 Large / Large Turbo / Medium ([paper](https://arxiv.org/abs/2403.03206)), keys as in
//! the hub's `transformer/diffusion_pytorch_model*.safetensors`.
//!
//! Latents become patch tokens with a cropped 2-D position table; the text context is projected
//! to the model width; each joint transformer block modulates both streams with the
//! timestep + pooled-text vector and attends over their concatenated tokens (SD 3.5: RMS-normed
//! queries and keys; SD 3.5 Medium: a second, image-only attention in its first 13 blocks); the
//! image tokens are modulated once more, projected and unpatchified.
//!
//! Precision follows the dtype the weights are loaded in (the [`VarBuilder`]'s), as diffusers'
//! `torch_dtype`: inputs are cast to it, and the norms compute their statistics in f32 and round
//! once, as PyTorch's kernels do.

mod block;
mod config;
mod embed;

pub use config::MMDiTConfig;
pub use embed::sincos_pos_table;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::attention::AttentionOptions;
use crate::denoiser::{Conditioning, Denoiser};
use crate::ops::linear::{linear, Linear};
use crate::stream::{Block, BlockWeights, StreamableModel};
use block::{AdaNormContinuous, JointBlock};
use embed::{cast, PatchEmbed, TimeTextEmbed};

/// The SD 3 / 3.5 MMDiT denoiser.
#[derive(Debug)]
pub struct SD3Transformer2DModel {
    pos_embed: PatchEmbed,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
    blocks: Vec<Block<JointBlock>>,
    norm_out: AdaNormContinuous,
    proj_out: Linear,
    cfg: MMDiTConfig,
    dtype: DType,
}

impl SD3Transformer2DModel {
    /// Loads the model in `vb`'s dtype; `cfg` is usually `transformer/config.json`. A missing
    /// tensor is an error naming its key.
    pub fn new(cfg: &MMDiTConfig, vb: VarBuilder) -> Result<Self> {
        Self::load(cfg, BlockWeights::resident(vb))
    }
}

impl StreamableModel for SD3Transformer2DModel {
    type Config = MMDiTConfig;

    /// The joint blocks.
    fn stream_blocks(cfg: &MMDiTConfig) -> Vec<String> {
        (0..cfg.num_layers).map(|i| format!("transformer_blocks.{i}")).collect()
    }

    fn build(cfg: &MMDiTConfig, weights: BlockWeights) -> Result<Self> {
        cfg.validate()?;
        let dim = cfg.inner_dim();
        let (heads, head_dim) = (cfg.num_attention_heads, cfg.attention_head_dim);
        let qk_norm = cfg.has_qk_norm();
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let (last, dual) = (i + 1 == cfg.num_layers, cfg.dual_attention_layers.contains(&i));
                weights.block(format!("transformer_blocks.{i}"), move |vb| {
                    JointBlock::new(dim, heads, head_dim, qk_norm, last, dual, vb)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let vb = weights.vb();
        let patch = cfg.patch_size;
        Ok(Self {
            pos_embed: PatchEmbed::new(
                cfg.in_channels,
                dim,
                patch,
                cfg.pos_embed_max_size,
                cfg.sample_size,
                vb.pp("pos_embed"),
            )?,
            time_text_embed: TimeTextEmbed::new(dim, cfg.pooled_projection_dim, vb.pp("time_text_embed"))?,
            context_embedder: linear(cfg.joint_attention_dim, cfg.caption_projection_dim, vb.pp("context_embedder"))?,
            blocks,
            norm_out: AdaNormContinuous::new(dim, vb.pp("norm_out"))?,
            proj_out: linear(dim, patch * patch * cfg.out_channels(), vb.pp("proj_out"))?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }
}

impl SD3Transformer2DModel {
    /// The configuration the model was built with.
    pub fn config(&self) -> &MMDiTConfig {
        &self.cfg
    }

    /// The width of the text context it takes (`joint_attention_dim`: 4096).
    pub fn context_width(&self) -> usize {
        self.cfg.joint_attention_dim
    }

    /// The width of the pooled text embeddings it takes (`pooled_projection_dim`: 2048).
    pub fn pooled_width(&self) -> usize {
        self.cfg.pooled_projection_dim
    }

    /// The dtype it computes in (its weights').
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Sets how every attention bounds its f32 score matrix (see [`AttentionOptions`]), from the
    /// next forward on. The joint attention scores `h·w/p² + tokens` queries against as many keys.
    pub fn set_attention_options(&self, options: AttentionOptions) {
        for block in &self.blocks {
            block.set_attention_options(options);
        }
    }

    /// The velocity prediction for `latents: [b, in_channels, h, w]` at `timesteps: [b]` (values in
    /// the scheduler's units, 0–1000), conditioned on `context: [b, tokens, joint_attention_dim]`
    /// and `pooled: [b, pooled_projection_dim]`: `[b, out_channels, h, w]` in the model's dtype.
    pub fn forward(&self, latents: &Tensor, timesteps: &Tensor, context: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        self.forward_skipping(latents, timesteps, context, pooled, &[])
    }

    /// [`Self::forward`] with the blocks numbered in `skip_layers` passed through unchanged
    /// (diffusers' `skip_layers`, which skip-layer guidance uses: SD 3.5 Medium's recipe skips 7, 8
    /// and 9). A number past the last block is an error.
    pub fn forward_skipping(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        skip_layers: &[usize],
    ) -> Result<Tensor> {
        let t: Vec<f32> = timesteps.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        self.forward_at(latents, &t, context, pooled, skip_layers)
    }

    fn forward_at(
        &self,
        latents: &Tensor,
        timesteps: &[f32],
        context: &Tensor,
        pooled: &Tensor,
        skip_layers: &[usize],
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, c, h, w) = latents.dims4()?;
        let p = cfg.patch_size;
        if c != cfg.in_channels {
            candle_core::bail!("latents {:?}: the SD 3 transformer takes {} channels", latents.dims(), cfg.in_channels);
        }
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            candle_core::bail!("latents of {h}×{w}: not a multiple of the patch size {p} on each side");
        }
        if timesteps.len() != b {
            candle_core::bail!("{} timesteps for a batch of {b}", timesteps.len());
        }
        let (cb, tokens, cw) = context.dims3()?;
        if cb != b || cw != cfg.joint_attention_dim || tokens == 0 {
            candle_core::bail!(
                "text context {:?} for {b} latents: expected [{b}, tokens ≥ 1, {}]",
                context.dims(),
                cfg.joint_attention_dim
            );
        }
        if pooled.dims() != [b, cfg.pooled_projection_dim] {
            candle_core::bail!(
                "pooled text embeddings {:?} for {b} latents: expected [{b}, {}]",
                pooled.dims(),
                cfg.pooled_projection_dim
            );
        }
        if let Some(&i) = skip_layers.iter().find(|&&i| i >= self.blocks.len()) {
            candle_core::bail!("skip_layers names block {i}; the model has {}", self.blocks.len());
        }

        let mut x = self.pos_embed.forward(&cast(latents, self.dtype)?)?;
        let temb = self.time_text_embed.forward(timesteps, &cast(pooled, self.dtype)?)?;
        let mut ctx = Some(self.context_embedder.forward(&cast(context, self.dtype)?)?);
        for (i, block) in self.blocks.iter().enumerate() {
            if skip_layers.contains(&i) {
                continue;
            }
            let Some(c) = &ctx else {
                // Only the last block drops the context, and nothing follows it.
                candle_core::bail!("block {i} has no context: an earlier block was context_pre_only");
            };
            let (c, out) = block.with(|b| b.forward(&x, c, &temb))?;
            ctx = c;
            x = out;
        }
        let x = self.proj_out.forward(&self.norm_out.forward(&x, &temb)?)?;

        // Unpatchify: [b, (h/p)·(w/p), p·p·out] → [b, out, h, w] (diffusers' "nhwpqc->nchpwq").
        let out = cfg.out_channels();
        let (ph, pw) = (h / p, w / p);
        x.reshape((b, ph, pw, p, p, out))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, out, h, w))
    }
}

impl SD3Transformer2DModel {
    /// The pooled text of `cond`, which SD 3 requires; it takes no `time_ids`.
    fn pooled_of<'c>(&self, cond: &'c Conditioning) -> Result<&'c Tensor> {
        let Some(pooled) = &cond.pooled else {
            candle_core::bail!(
                "the SD 3 transformer needs the pooled text embeddings (Conditioning::pooled, [b, {}])",
                self.cfg.pooled_projection_dim
            );
        };
        if cond.time_ids.is_some() {
            candle_core::bail!("the SD 3 transformer takes no time_ids (an SDXL conditioning)");
        }
        Ok(pooled)
    }
}

impl Denoiser for SD3Transformer2DModel {
    /// The context is `cond.context` (CLIP-L ‖ CLIP-G padded, then T5, along the tokens); the
    /// pooled text `cond.pooled` is required; SD 3 takes no `time_ids`.
    fn forward(&self, latents: &Tensor, timesteps: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        SD3Transformer2DModel::forward(self, latents, timesteps, &cond.context, self.pooled_of(cond)?)
    }

    fn forward_skipping(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        cond: &Conditioning,
        skip_layers: &[usize],
    ) -> Result<Tensor> {
        let pooled = self.pooled_of(cond)?;
        SD3Transformer2DModel::forward_skipping(self, latents, timesteps, &cond.context, pooled, skip_layers)
    }

    fn set_attention_options(&self, options: AttentionOptions) {
        SD3Transformer2DModel::set_attention_options(self, options)
    }
}
