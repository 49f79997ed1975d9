//! The normalisations the models use: GroupNorm (optionally with the SiLU that follows it and a
//! per-channel term added before it, fused into two kernels on CUDA) and LayerNorm.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Group normalisation over `[b, c, ...]` (statistics in f32 for half-precision inputs).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    // The fast paths' parameters; `inner` checked at construction that `groups` divides the
    // channels and the weights have one entry per channel.
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` of `channels` elements.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self { inner, weight, bias, groups, eps })
    }

    /// Normalises `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, false)
    }

    /// `silu(norm(x))`, the ResNets' and the output heads' pattern.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, true)
    }

    /// `norm(x + add)` with `add: [b, c]` broadcast over the spatial axes (added in `x`'s dtype,
    /// as a separate add would round it), then SiLU when `silu`.
    pub fn forward_with(&self, x: &Tensor, add: Option<&Tensor>, silu: bool) -> Result<Tensor> {
        if let Some(a) = add {
            let (b, c) = (x.dim(0)?, x.dim(1)?);
            if a.dims() != [b, c] {
                candle_core::bail!("group norm add term {:?} for input {:?}: expected [{b}, {c}]", a.dims(), x.dims());
            }
        }
        if super::fast_cpu(x.device()) && x.rank() >= 3 {
            if let Some(y) = super::cpu::group_norm(self, x, add, silu)? {
                return Ok(y);
            }
        }
        #[cfg(feature = "cuda")]
        if super::fast_cuda(x.device()) && x.rank() >= 3 {
            if let Some(y) = super::cuda::group_norm(self, x, add, silu)? {
                return Ok(y);
            }
        }
        self.reference(x, add, silu)
    }

    /// The reference path of [`Self::forward_with`]: candle's GroupNorm, then `silu`.
    pub(crate) fn reference(&self, x: &Tensor, add: Option<&Tensor>, silu: bool) -> Result<Tensor> {
        let y = match add {
            Some(a) => {
                let (b, c) = a.dims2()?;
                let shape: Vec<usize> = [b, c].into_iter().chain(std::iter::repeat_n(1, x.rank() - 2)).collect();
                self.inner.forward(&x.broadcast_add(&a.reshape(shape)?)?)?
            }
            None => self.inner.forward(x)?,
        };
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
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

    /// Normalises `x` over its last dimension. candle's one-kernel layer norm needs a contiguous
    /// input (it falls back to ten whole-tensor ops otherwise): a copy is far cheaper than that.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.is_contiguous() {
            self.0.forward(x)
        } else {
            self.0.forward(&x.contiguous()?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn the_added_term_and_silu_are_the_unfused_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (b, c, h, w, groups) = (2, 6, 3, 4, 3);
        let vb = VarBuilder::from_tensors(
            [
                ("weight".to_string(), Tensor::randn(0f32, 1.0, c, &dev)?),
                ("bias".to_string(), Tensor::randn(0f32, 1.0, c, &dev)?),
            ]
            .into_iter()
            .collect(),
            DType::F32,
            &dev,
        );
        let norm = GroupNorm::new(groups, c, 1e-5, vb)?;
        let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
        let add = Tensor::randn(0f32, 1.0, (b, c), &dev)?;
        // Both sides may take the fast or the reference path (another test flips the process-wide
        // switch), so the bound is rounding, not bit equality.
        let fused = norm.forward_with(&x, Some(&add), true)?;
        let unfused = norm.reference(&x.broadcast_add(&add.reshape((b, c, 1, 1))?)?, None, false)?.silu()?;
        let diff = (&fused - &unfused)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = unfused.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-5 * scale, "max diff {diff} (scale {scale})");
        Ok(())
    }
}
