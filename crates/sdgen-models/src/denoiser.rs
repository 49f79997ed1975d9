//! The seam between the pipelines and a family's denoiser architecture: every denoiser (diffusers'
//! `UNet2DConditionModel` here; SD 3's MMDiT is another implementation) predicts from the
//! latents, the timesteps and one [`Conditioning`], whatever it does inside, so the denoising loop
//! is written once.

use candle_core::{Result, Tensor};

use crate::attention::AttentionOptions;

/// What a denoiser is conditioned on, one type for every family (as stable-diffusion.cpp's
/// conditioner): the batch is `[negative × n; positive × n]` when guiding, `[positive × n]`
/// otherwise, in the run's dtype.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// The text context the denoiser attends to, `[B, tokens, d]` (cross-attention for a UNet).
    pub context: Tensor,
    /// The projected pooled text embeddings `[B, d_pooled]`, for families whose encoders have a
    /// projection (SDXL's `text_embeds`, SD 3's `pooled_projections`).
    pub pooled: Option<Tensor>,
    /// Micro-conditioning numbers `[B, k]` (SDXL's `time_ids`: sizes, crop, aesthetic score).
    pub time_ids: Option<Tensor>,
    /// The guidance embedding `[B, d]` of an LCM UNet (`time_cond_proj_dim`: guidance distilled
    /// into the model, so the batch is `[positive × n]`); `None` for every other denoiser.
    pub timestep_cond: Option<Tensor>,
}

/// A denoiser: one forward per sampling step. `Send + Sync`: a long-lived engine keeps loaded
/// denoisers between jobs, where a server's routes may drop them.
pub trait Denoiser: Send + Sync {
    /// The model's prediction (noise, v or velocity, as its schedule defines) for
    /// `latents: [B, C, H, W]` at `timesteps: [B]` (one per batch entry, as values in the
    /// scheduler's units; any dtype and device), conditioned on `cond`.
    fn forward(&self, latents: &Tensor, timesteps: &Tensor, cond: &Conditioning) -> Result<Tensor>;

    /// [`Self::forward`] with the transformer blocks `skip_layers` passed through unchanged
    /// (skip-layer guidance). Architectures without such blocks refuse.
    fn forward_skipping(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        cond: &Conditioning,
        skip_layers: &[usize],
    ) -> Result<Tensor> {
        let _ = (latents, timesteps, cond);
        candle_core::bail!("this denoiser has no transformer blocks to skip (layers {skip_layers:?})")
    }

    /// Bounds its attention's score matrices from the next forward on (no reload needed).
    fn set_attention_options(&self, options: AttentionOptions);
}
