//! What the engine needs to know of a family's denoiser before loading it, read from its
//! `config.json` by its architecture ([`DenoiserArch`]).

use super::family::DenoiserArch;
use super::ModelFolder;
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
                let c: sdgen_models::unet::UNetConfig = self.config(component, "config.json")?;
                Ok(DenoiserGeometry {
                    in_channels: c.in_channels,
                    out_channels: c.out_channels,
                    sample_size: c.sample_size,
                })
            }
        }
    }
}
