//! diffusers' `ResnetBlock2D` and the 2× down/up samplers, shared by the UNet and the VAE.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use crate::norm::GroupNorm;

/// The most elements of the column (im2col) buffer one convolution call may build on the CPU:
/// half of the 2^31 that 32-bit kernel indexing allows (the VAE decoder's 256-channel
/// convolutions at 1024² would need 2.4 G).
pub const MAX_CONV_COLUMN_ELEMENTS: usize = 1 << 30;

/// The same on a CUDA device: 2^28 (1 GiB at f32). candle builds the column whole on GPUs, and
/// transient buffers of several GB fragment the stream-ordered memory pool: the VAE decoder's
/// measured peak at 768² varied between identical runs by 2 GB with 4 GiB bands.
pub const MAX_CONV_COLUMN_ELEMENTS_CUDA: usize = 1 << 28;

/// The most column elements one convolution call builds on `device`.
pub fn max_conv_column_elements(device: &candle_core::Device) -> usize {
    // Every GPU (Metal too, as the planner assumes): its kernels build the column whole.
    if device.is_cpu() {
        MAX_CONV_COLUMN_ELEMENTS
    } else {
        MAX_CONV_COLUMN_ELEMENTS_CUDA
    }
}

/// A 3×3 convolution (stride 1 or 2, zero padding) that keeps every kernel call's column buffer
/// under its device's limit ([`max_conv_column_elements`]): past it, the batch's images are
/// convolved one at a time and, if one is still too large, in bands of output rows over the
/// explicitly padded input. Each output pixel then sees exactly the inputs it sees unbanded, so
/// the result is the unbanded one (up to the matmul's blocking), unlike VAE tiling, which changes
/// the image.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    /// The convolution as configured: the normal path.
    direct: Conv2d,
    /// The same weights with padding 0, applied to an explicitly padded input in bands.
    unpadded: Conv2d,
    /// Zero padding on every side (1 for "same" convolutions, 0 for the VAE's downsamplers).
    padding: usize,
    stride: usize,
    /// An extra zero row and column at the bottom and right first (the VAE encoder's
    /// downsamplers: diffusers pads `(0, 1, 0, 1)` before a stride-2, padding-0 convolution).
    pad_right_bottom: bool,
}

impl Module for Conv3x3 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_bounded(x, max_conv_column_elements(x.device()))
    }
}

impl Conv3x3 {
    fn new(
        cin: usize,
        cout: usize,
        padding: usize,
        stride: usize,
        pad_right_bottom: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let direct = candle_nn::conv2d(cin, cout, 3, Conv2dConfig { padding, stride, ..Default::default() }, vb)?;
        let unpadded =
            Conv2d::new(direct.weight().clone(), direct.bias().cloned(), Conv2dConfig { stride, ..Default::default() });
        Ok(Self { direct, unpadded, padding, stride, pad_right_bottom })
    }

    /// Output rows or columns for `n` input ones.
    fn out_len(&self, n: usize) -> usize {
        (n + 2 * self.padding).saturating_sub(3) / self.stride + 1
    }

    fn column_elements(&self, b: usize, rows_out: usize, w_out: usize) -> usize {
        let cin = self.direct.weight().dim(1).unwrap_or(1);
        b * rows_out * w_out * cin * 9
    }

    /// The convolution with every call's column buffer under `limit` elements.
    fn forward_bounded(&self, x: &Tensor, limit: usize) -> Result<Tensor> {
        let x = if self.pad_right_bottom { x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)? } else { x.clone() };
        let (b, _, h, w) = x.dims4()?;
        let (h_out, w_out) = (self.out_len(h), self.out_len(w));
        if self.column_elements(b, h_out, w_out) < limit {
            return self.direct.forward(&x);
        }
        if b > 1 {
            let images =
                (0..b).map(|i| self.forward_unpadded_bands(&x.narrow(0, i, 1)?, limit)).collect::<Result<Vec<_>>>()?;
            return Tensor::cat(&images, 0);
        }
        self.forward_unpadded_bands(&x, limit)
    }

    /// One image (its extra right/bottom padding already added) in bands of output rows.
    fn forward_unpadded_bands(&self, x: &Tensor, limit: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (h_out, w_out) = (self.out_len(h), self.out_len(w));
        if self.column_elements(1, h_out, w_out) < limit {
            return self.direct.forward(x);
        }
        let rows = (limit / self.column_elements(1, 1, w_out).max(1)).max(1);
        let p = self.padding;
        let padded = if p > 0 { x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)? } else { x.clone() };
        let mut bands = Vec::with_capacity(h_out.div_ceil(rows));
        for start in (0..h_out).step_by(rows) {
            let len = rows.min(h_out - start);
            // Output rows start..start+len read padded rows from start·stride, (len − 1)·stride + 3 of them.
            let input = padded.narrow(2, start * self.stride, (len - 1) * self.stride + 3)?;
            bands.push(self.unpadded.forward(&input)?);
        }
        Tensor::cat(&bands, 2)
    }
}

/// A 3×3 convolution with padding 1, see [`Conv3x3`].
pub(crate) fn conv3x3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv3x3> {
    Conv3x3::new(cin, cout, 1, 1, false, vb)
}

/// A 1×1 convolution.
pub(crate) fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    candle_nn::conv2d(cin, cout, 1, Default::default(), vb)
}

/// `ResnetBlock2D`: GroupNorm → SiLU → conv → (+ time embedding) → GroupNorm → SiLU → conv, plus a
/// 1×1 shortcut when the channel count changes.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv3x3,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv3x3,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    /// Loads a block; `temb_channels` is `None` in the VAE, which has no time embedding.
    pub fn new(
        cin: usize,
        cout: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let time_emb_proj = match temb_channels {
            Some(t) => Some(candle_nn::linear(t, cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let shortcut = if cin != cout { Some(conv1x1(cin, cout, vb.pp("conv_shortcut"))?) } else { None };
        Ok(Self {
            norm1: GroupNorm::new(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: GroupNorm::new(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, vb.pp("conv2"))?,
            shortcut,
        })
    }

    /// Applies the block; `temb` is the (un-activated) time embedding `[b, temb_channels]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&t.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
                h.broadcast_add(&t)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// `Downsample2D` with a convolution: stride 2, padding 1 in the UNet; padding 0 after an
/// asymmetric (right/bottom) zero pad in the VAE encoder. Bounded like every [`Conv3x3`].
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv3x3,
}

impl Downsample2D {
    /// `padding` is diffusers' `downsample_padding` (1 in the UNet, 0 in the VAE).
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: Conv3x3::new(channels, channels, padding, 2, padding == 0, vb.pp("conv"))? })
    }

    /// Halves the spatial size (rounding up).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

/// `Upsample2D`: nearest-neighbour 2× (or to an explicit size) then a 3×3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv3x3,
}

impl Upsample2D {
    /// Loads `conv`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv3x3(channels, channels, vb.pp("conv"))? })
    }

    /// Upsamples to `size` (h, w) when given, else doubles. Nearest-neighbour with PyTorch's
    /// index rule `floor(dst · in / out)`, which candle's kernel uses too.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn weights(cin: usize, cout: usize) -> candle_nn::VarBuilder<'static> {
        let dev = Device::Cpu;
        candle_nn::VarBuilder::from_tensors(
            [
                ("weight".to_string(), Tensor::randn(0f32, 1.0, (cout, cin, 3, 3), &dev).unwrap()),
                ("bias".to_string(), Tensor::randn(0f32, 1.0, cout, &dev).unwrap()),
            ]
            .into_iter()
            .collect(),
            DType::F32,
            &dev,
        )
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Banded and per-image convolution equal the plain one: a 2-image batch of 5×7 maps with 3
    /// channels (27 column elements per pixel) under limits that force per-image calls, bands of
    /// 2 rows, and single rows; for the stride-1 "same" convolution and both stride-2 downsamplers
    /// (the UNet's padding 1, the VAE's right/bottom pad), on odd and even sizes.
    #[test]
    fn bounded_convolution_equals_the_plain_one() {
        let cases = [(1, 1, false), (1, 2, false), (0, 2, true)];
        for (padding, stride, pad_rb) in cases {
            let conv = Conv3x3::new(3, 4, padding, stride, pad_rb, weights(3, 4)).unwrap();
            for (h, w) in [(5, 7), (8, 6), (3, 4)] {
                let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
                let plain = conv.forward_bounded(&x, usize::MAX).unwrap();
                for limit in [27 * 35 + 1, 27 * 14 + 1, 1] {
                    let out = conv.forward_bounded(&x, limit).unwrap();
                    let diff = max_diff(&out, &plain);
                    assert!(diff < 1e-5, "padding {padding} stride {stride} {h}×{w} limit {limit}: {diff}");
                }
            }
        }
        // The plain path is candle's convolution as configured.
        let conv = Conv3x3::new(3, 4, 1, 1, false, weights(3, 4)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 3, 6, 6), &Device::Cpu).unwrap();
        assert!(max_diff(&conv.forward_bounded(&x, 1).unwrap(), &conv.direct.forward(&x).unwrap()) < 1e-5);
    }
}
