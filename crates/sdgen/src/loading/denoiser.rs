//! A family's denoiser, by its architecture ([`DenoiserArch`]): what the engine needs to know of
//! it before loading (from its `config.json`), and the model itself behind the [`Denoiser`] trait
//! the pipelines call.

use candle_core::{DType, Device};
use sdgen_models::denoiser::Denoiser;
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
}

impl ModelFolder {
    /// The family's denoiser folder (`unet`).
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
                })
            }
        }
    }

    /// Loads the denoiser with its weights in `dtype` on `device`.
    pub fn load_denoiser(&self, dtype: DType, device: &Device) -> Result<Box<dyn Denoiser>> {
        let component = self.denoiser_component();
        let weights = self.weights(component)?;
        match self.family().denoiser.arch {
            DenoiserArch::UNet2DCondition => {
                let cfg: UNetConfig = self.config(component, "config.json")?;
                let unet = UNet2DConditionModel::new(&cfg, weights.var_builder(dtype, device)?)
                    .map_err(|e| model_error(&weights, "a UNet2DConditionModel", e))?;
                Ok(Box::new(unet))
            }
        }
    }
}
