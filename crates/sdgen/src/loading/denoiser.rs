//! A family's denoiser, by its architecture ([`DenoiserArch`]): what the engine needs to know of
//! it before loading (from its `config.json`), and the model itself behind the [`Denoiser`] trait
//! the pipelines call.

use candle_core::{DType, Device};
use sdgen_models::denoiser::Denoiser;
use sdgen_models::mmdit::{MMDiTConfig, SD3Transformer2DModel};
use sdgen_models::stream::{Residency, StreamableModel};
use sdgen_models::unet::{UNet2DConditionModel, UNetConfig};

use super::family::DenoiserArch;
use super::{model_error, ModelFolder};
use crate::Result;

/// A denoiser's input and output shape, as its config states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenoiserGeometry {
    /// Channels it takes.
    pub in_channels: usize,
    /// Channels it predicts.
    pub out_channels: usize,
    /// The latent side it was trained at, if stated.
    pub sample_size: Option<usize>,
    /// The width of the text context it reads (a UNet's `cross_attention_dim`, an MMDiT's
    /// `joint_attention_dim`).
    pub context_width: usize,
    /// Its transformer blocks, for an architecture whose blocks can be skipped (MMDiT).
    pub blocks: Option<usize>,
    /// Latent pixels per side of one token (an MMDiT's patches; 1 for a UNet).
    pub patch_size: usize,
    /// The width of its guidance embedding, for a denoiser with guidance distilled into it (an
    /// LCM UNet's `time_cond_proj_dim`): it takes the scale instead of classifier-free guidance.
    pub guidance_embedding_dim: Option<usize>,
}

impl ModelFolder {
    /// The family's denoiser folder (`unet`, `transformer`).
    pub fn denoiser_component(&self) -> &'static str {
        self.family().denoiser.component
    }

    /// The denoiser's geometry from its `config.json`.
    pub fn denoiser_geometry(&self) -> Result<DenoiserGeometry> {
        let component = self.denoiser_component();
        match self.family().denoiser.arch {
            DenoiserArch::UNet2DCondition => {
                let c: UNetConfig = self.config(component, "config.json")?;
                Ok(DenoiserGeometry {
                    in_channels: c.in_channels,
                    out_channels: c.out_channels,
                    sample_size: c.sample_size,
                    context_width: c.cross_attention_dim,
                    blocks: None,
                    patch_size: 1,
                    guidance_embedding_dim: c.time_cond_proj_dim,
                })
            }
            DenoiserArch::SD3Transformer2D => {
                let c: MMDiTConfig = self.config(component, "config.json")?;
                Ok(DenoiserGeometry {
                    in_channels: c.in_channels,
                    out_channels: c.out_channels(),
                    sample_size: Some(c.sample_size),
                    context_width: c.joint_attention_dim,
                    blocks: Some(c.num_layers),
                    patch_size: c.patch_size,
                    guidance_embedding_dim: None,
                })
            }
        }
    }

    /// Loads the denoiser with its weights in `dtype` on `device`, every block resident.
    pub fn load_denoiser(&self, dtype: DType, device: &Device) -> Result<Box<dyn Denoiser>> {
        self.load_denoiser_with(dtype, device, Residency::Resident)
    }

    /// The denoiser's streamable blocks by checkpoint prefix, in forward order (what the planner
    /// sizes from the headers, and what [`Residency::Streamed`] counts).
    pub fn denoiser_stream_blocks(&self) -> Result<Vec<String>> {
        let component = self.denoiser_component();
        Ok(match self.family().denoiser.arch {
            DenoiserArch::UNet2DCondition => {
                UNet2DConditionModel::stream_blocks(&self.config(component, "config.json")?)
            }
            DenoiserArch::SD3Transformer2D => {
                SD3Transformer2DModel::stream_blocks(&self.config(component, "config.json")?)
            }
        })
    }

    /// [`Self::load_denoiser`] with its blocks held as `residency` says (streamed blocks read
    /// from the weights' streamed source on `device`: see [`super::stream`]).
    pub fn load_denoiser_with(&self, dtype: DType, device: &Device, residency: Residency) -> Result<Box<dyn Denoiser>> {
        let component = self.denoiser_component();
        let weights = self.weights(component)?;
        let vb = weights.var_builder(dtype, device)?;
        let streamed = weights.streamed_var_builder(dtype, device)?;
        match self.family().denoiser.arch {
            DenoiserArch::UNet2DCondition => {
                let cfg: UNetConfig = self.config(component, "config.json")?;
                let unet = UNet2DConditionModel::new_streamed(&cfg, vb, streamed, residency)
                    .map_err(|e| model_error(&weights, "a UNet2DConditionModel", e))?;
                Ok(Box::new(unet))
            }
            DenoiserArch::SD3Transformer2D => {
                let cfg: MMDiTConfig = self.config(component, "config.json")?;
                cfg.validate().map_err(|e| {
                    crate::Error::BadModel(format!("{}/{component}/config.json: {e}", self.root().display()))
                })?;
                let mmdit = SD3Transformer2DModel::new_streamed(&cfg, vb, streamed, residency)
                    .map_err(|e| model_error(&weights, "an SD3Transformer2DModel (MMDiT)", e))?;
                Ok(Box::new(mmdit))
            }
        }
    }
}
