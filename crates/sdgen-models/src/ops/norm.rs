//! The normalisations the models use: GroupNorm (optionally with the SiLU that follows it and a
//! per-channel term added before it, fused into two kernels on CUDA), LayerNorm (with or without
//! its affine parameters), diffusers' RMSNorm, and the adaptive layer norms' modulation
//! [`modulate`] (DiT's `x·(1 + scale) + shift`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Group normalisation over `[b, c, ...]`, or channels-last `[b, h, w, c]`
/// ([`Self::into_channels_last`]); statistics in f32 for half-precision inputs.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    // The fast paths' parameters; `inner` checked at construction that `groups` divides the
    // channels and the weights have one entry per channel.
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    channels_last: bool,
}

impl GroupNorm {
    /// Loads `weight` and `bias` of `channels` elements.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self { inner, weight, bias, groups, eps, channels_last: false })
    }

    /// The same norm over channels-last activations `[b, h, w, c]`.
    pub fn into_channels_last(self) -> Self {
        Self { channels_last: true, ..self }
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
            let channel_axis = if self.channels_last { x.rank().saturating_sub(1) } else { 1 };
            let (b, c) = (x.dim(0)?, x.dim(channel_axis)?);
            if a.dims() != [b, c] {
                candle_core::bail!("group norm add term {:?} for input {:?}: expected [{b}, {c}]", a.dims(), x.dims());
            }
        }
        if self.channels_last {
            return self.forward_channels_last(x, add, silu);
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

    /// [`Self::forward_with`] of channels-last `x: [b, h, w, c]`: one set of kernels on CUDA,
    /// elsewhere the channels-first paths between two transposes.
    fn forward_channels_last(&self, x: &Tensor, add: Option<&Tensor>, silu: bool) -> Result<Tensor> {
        if x.rank() != 4 {
            candle_core::bail!("channels-last group norm of {:?}: expected [b, h, w, c]", x.dims());
        }
        #[cfg(feature = "cuda")]
        if super::fast_cuda(x.device()) {
            if let Some(y) = super::cuda::group_norm_nhwc(self, x, add, silu)? {
                return Ok(y);
            }
        }
        let first = Self { channels_last: false, ..self.clone() };
        let y = first.forward_with(&x.permute((0, 3, 1, 2))?.contiguous()?, add, silu)?;
        y.permute((0, 2, 3, 1))?.contiguous()
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

/// Layer normalisation over the last dimension, with weight and bias or without either
/// (PyTorch's `elementwise_affine=False`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// `None` for [`LayerNorm::no_affine`].
    affine: Option<candle_nn::LayerNorm>,
    dim: usize,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of `dim` elements.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { affine: Some(candle_nn::layer_norm(dim, eps, vb)?), dim, eps })
    }

    /// A layer norm without weight or bias (`nn.LayerNorm(dim, elementwise_affine=False)`, the
    /// adaptive layer norms' inner norm in DiT/MMDiT).
    pub fn no_affine(dim: usize, eps: f64) -> Self {
        Self { affine: None, dim, eps }
    }

    /// Normalises `x` over its last dimension. candle's one-kernel layer norm needs a contiguous
    /// input (it falls back to ten whole-tensor ops otherwise): a copy is far cheaper than that.
    /// Half-precision inputs are normalised in f32 and rounded once, as PyTorch's kernels do.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
        let dim = x.dim(candle_core::D::Minus1)?;
        if dim != self.dim {
            candle_core::bail!("layer norm over {} elements given {:?}", self.dim, x.dims());
        }
        match &self.affine {
            Some(ln) => ln.forward(&x),
            None => {
                // The fused kernel with a unit scale and zero shift: the same one pass, and
                // `· 1 + 0` is exact.
                let ones = Tensor::ones(dim, x.dtype(), x.device())?;
                let zeros = Tensor::zeros(dim, x.dtype(), x.device())?;
                candle_nn::ops::layer_norm(&x, &ones, &zeros, self.eps as f32)
            }
        }
    }

    /// [`modulate`]`(self.forward(x), shift, scale)` for `x: [b, n, d]`: the adaptive layer
    /// norms' whole pattern, one kernel on CUDA for a norm without affine parameters (the
    /// roundings of the separate ops kept).
    pub fn forward_modulated(&self, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        check_modulation(x, shift, scale)?;
        #[cfg(feature = "cuda")]
        if self.affine.is_none() && super::fast_cuda(x.device()) && x.dim(2)? == self.dim {
            if let Some(y) = super::cuda::ln_modulate(x, shift, scale, self.eps)? {
                return Ok(y);
            }
        }
        modulate(&self.forward(x)?, shift, scale)
    }
}

/// diffusers' `RMSNorm` (`normalization.py`) with its weight: `x / sqrt(mean(x²) + eps)` with the
/// mean and the division in f32, the result rounded to the input's dtype, **then** multiplied by
/// the weight in that dtype (two roundings in half precision, as diffusers does; candle's fused
/// CPU kernel would round `sqrt(mean(x²) + eps)` to the half dtype first). MMDiT's QK-norm.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    /// Ones in f32 on the weight's device: the unit scale of the f32 pass for half precision.
    ones: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `weight` of `dim` elements.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let ones = Tensor::ones(dim, DType::F32, weight.device())?;
        Ok(Self { weight, ones, eps })
    }

    /// The weight `[dim]` and epsilon, for kernels that fuse the norm into other work.
    #[cfg(feature = "cuda")]
    pub(crate) fn parts(&self) -> (&Tensor, f64) {
        (&self.weight, self.eps)
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
        let eps = self.eps as f32;
        if x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            return candle_nn::ops::rms_norm(&x, &self.weight, eps);
        }
        let normed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &self.ones, eps)?;
        normed.to_dtype(x.dtype())?.broadcast_mul(&self.weight.to_dtype(x.dtype())?)
    }
}

/// The adaptive layer norms' modulation `x · (1 + scale) + shift` for `x: [b, n, d]` and
/// per-image `shift`, `scale: [b, d]`, in `x`'s dtype, rounded after each operation as diffusers'
/// `norm(x) * (1 + scale[:, None]) + shift[:, None]` is. One function so a fused kernel (with the
/// layer norm before it) can replace it for every DiT-type model at once.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    check_modulation(x, shift, scale)?;
    let scale = (scale + 1.0)?.unsqueeze(1)?;
    x.broadcast_mul(&scale)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// That `shift` and `scale` are `[b, d]` for `x: [b, n, d]`.
fn check_modulation(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<()> {
    let (b, _, d) = x.dims3()?;
    if shift.dims() != [b, d] || scale.dims() != [b, d] {
        candle_core::bail!(
            "modulation of {:?} by shift {:?} and scale {:?}: expected [{b}, {d}] each",
            x.dims(),
            shift.dims(),
            scale.dims()
        );
    }
    Ok(())
}

/// adaLN-Zero's gated residual `x + gate[:, None] · y` for `x`, `y: [b, n, d]` and `gate: [b, d]`,
/// the product rounded before the sum as diffusers' two ops round; one kernel on CUDA.
pub fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (b, _, d) = x.dims3()?;
    if gate.dims() != [b, d] || y.dims() != x.dims() {
        candle_core::bail!(
            "gated residual {:?} + {:?} · gate {:?}: mismatched shapes",
            x.dims(),
            y.dims(),
            gate.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if super::fast_cuda(x.device()) {
        if let Some(out) = super::cuda::gated_add(x, gate, y)? {
            return Ok(out);
        }
    }
    x + y.broadcast_mul(&gate.unsqueeze(1)?)?
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

    #[test]
    fn layer_norm_without_affine_normalises_each_row() -> Result<()> {
        let x = Tensor::new(&[[1f32, 2., 3., 6.], [-1., 0., 1., 100.]], &Device::Cpu)?;
        let y = LayerNorm::no_affine(4, 1e-6).forward(&x)?;
        let rows: Vec<Vec<f32>> = y.to_vec2()?;
        for (row, input) in rows.iter().zip(x.to_vec2::<f32>()?) {
            let mean = input.iter().sum::<f32>() / 4.0;
            let var = input.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
            for (got, v) in row.iter().zip(&input) {
                let want = (v - mean) / (var + 1e-6).sqrt();
                assert!((got - want).abs() < 1e-5, "{rows:?}");
            }
        }
        assert!(LayerNorm::no_affine(3, 1e-6).forward(&x).is_err());
        Ok(())
    }

    #[test]
    fn rms_norm_rounds_to_the_dtype_before_the_weight() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.3f32, -1.7, 2.2, 0.05], [10.0, -3.0, 0.5, 7.0]], &dev)?;
        let w = Tensor::new(&[1.1f32, 0.9, 1.05, 0.97], &dev)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let vb = VarBuilder::from_tensors([("weight".to_string(), w.to_dtype(dtype)?)].into(), dtype, &dev);
            let got = RmsNorm::new(4, 1e-6, vb)?.forward(&x.to_dtype(dtype)?)?;
            // diffusers: (x·rsqrt(mean(x²) + eps)) in f32, `.to(weight.dtype)`, then `* weight`.
            let xs = x.to_dtype(dtype)?.to_dtype(DType::F32)?;
            let inv = (xs.sqr()?.mean_keepdim(1)? + 1e-6)?.sqrt()?.recip()?;
            let want = xs.broadcast_mul(&inv)?.to_dtype(dtype)?.broadcast_mul(&w.to_dtype(dtype)?)?;
            let diff =
                (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-6, "{dtype:?}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn modulate_is_one_plus_scale_then_shift() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32, 2.], [3., 4.]]], &dev)?;
        let shift = Tensor::new(&[[10f32, 20.]], &dev)?;
        let scale = Tensor::new(&[[1f32, -0.5]], &dev)?;
        let y: Vec<Vec<f32>> = modulate(&x, &shift, &scale)?.get(0)?.to_vec2()?;
        assert_eq!(y, vec![vec![12.0, 21.0], vec![16.0, 22.0]]);
        assert!(modulate(&x, &scale, &shift.reshape((2, 1))?).is_err());
        Ok(())
    }
}
