//! The normalisations the models use, in one place so fused kernels can replace them later.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Group normalisation over `[b, c, ...]` (statistics in f32 for half-precision inputs).
#[derive(Debug, Clone)]
pub struct GroupNorm(candle_nn::GroupNorm);

impl GroupNorm {
    /// Loads `weight` and `bias` of `channels` elements.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self(candle_nn::group_norm(groups, channels, eps, vb)?))
    }

    /// Normalises `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}

/// Layer normalisation over the last dimension, with weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm(candle_nn::LayerNorm);

impl LayerNorm {
    /// Loads `weight` and `bias` of `dim` elements.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self(candle_nn::layer_norm(dim, eps, vb)?))
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}
