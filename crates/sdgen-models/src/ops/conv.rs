//! 2-D convolutions: cuDNN on CUDA builds with the `cudnn` feature; on the CPU our direct 3×3
//! convolution (`direct_conv`) and banded unfold-and-multiply for the other kernels
//! (`cpu::conv2d_add` in f32, `cpu_bf16::conv2d_add` in bf16 where the processor has AVX512-BF16);
//! elsewhere candle's im2col convolution with every call's column buffer bounded (banded), which
//! is also the reference the fast paths are tested against.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// The most elements of the column (im2col) buffer one convolution call may build on the CPU
/// ([`sdgen_memory::limits::MAX_CONV_COLUMN_ELEMENTS_CPU`]: defined beside the planner that
/// models it).
pub const MAX_CONV_COLUMN_ELEMENTS: usize = sdgen_memory::limits::MAX_CONV_COLUMN_ELEMENTS_CPU;

/// The same on a GPU running candle's convolution ([`sdgen_memory::limits::MAX_CONV_COLUMN_ELEMENTS_GPU`]).
/// (cuDNN builds no column buffer: its workspace is bounded by `cudnn::workspace_cap`.)
pub const MAX_CONV_COLUMN_ELEMENTS_CUDA: usize = sdgen_memory::limits::MAX_CONV_COLUMN_ELEMENTS_GPU;

/// The most column elements one reference convolution call builds on `device`.
pub fn max_conv_column_elements(device: &Device) -> usize {
    // Every GPU (Metal too, as the planner assumes): its kernels build the column whole.
    if device.is_cpu() {
        MAX_CONV_COLUMN_ELEMENTS
    } else {
        MAX_CONV_COLUMN_ELEMENTS_CUDA
    }
}

/// A square-kernel convolution with zero padding and a bias: diffusers' `nn.Conv2d` as the UNet
/// and the VAE use it (3×3 "same", 3×3 stride-2 downsamplers, 1×1 projections).
///
/// On the reference path a call whose column buffer would pass its device's limit
/// ([`max_conv_column_elements`]) is split: the batch's images one at a time and, if one is still
/// too large, bands of output rows over the explicitly padded input. Each output pixel then sees
/// exactly the inputs it sees unbanded, so the result is the unbanded one (up to the matmul's
/// blocking), unlike VAE tiling, which changes the image.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    kernel: usize,
    /// Zero padding on every side (1 for "same" 3×3 convolutions, 0 for 1×1 and the VAE's
    /// downsamplers).
    padding: usize,
    stride: usize,
    /// An extra zero row and column at the bottom and right first (the VAE encoder's
    /// downsamplers: diffusers pads `(0, 1, 0, 1)` before a stride-2, padding-0 convolution).
    pad_right_bottom: bool,
    /// Channels-last activations (`[b, h, w, c]` in and out) and the weight stored
    /// `[cout, k, k, cin]` ([`Self::into_channels_last`]).
    channels_last: bool,
}

impl Conv2d {
    /// Loads `weight` `[cout, cin, kernel, kernel]` and `bias` `[cout]`.
    pub fn load(
        cin: usize,
        cout: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
        pad_right_bottom: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((cout, cin, kernel, kernel), "weight")?;
        let bias = Some(vb.get(cout, "bias")?);
        Ok(Self { weight, bias, kernel, padding, stride, pad_right_bottom, channels_last: false })
    }

    /// The weight: `[cout, cin, k, k]`, or `[cout, k, k, cin]` when channels-last.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The same convolution over channels-last activations (`[b, h, w, c]` in and out), the
    /// weight reordered once to `[cout, k, k, cin]` (and the channels-first copy dropped).
    pub fn into_channels_last(self) -> Result<Self> {
        if self.channels_last {
            return Ok(self);
        }
        let weight = self.weight.permute((0, 2, 3, 1))?.contiguous()?;
        Ok(Self { weight, channels_last: true, ..self })
    }

    /// Convolves `x: [b, cin, h, w]` (channels-last: `[b, h, w, cin]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.channels_last {
            return self.forward_channels_last(x);
        }
        let x = if self.pad_right_bottom { x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)? } else { x.clone() };
        if super::cpu_bf16(&x) {
            if let Some(y) = self.forward_cpu(&x, None)? {
                return Ok(y);
            }
            // No bf16 product here: convolve in f32 (the input already padded), round once.
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let conv = Self {
                weight: f32(&self.weight)?,
                bias: self.bias.as_ref().map(f32).transpose()?,
                pad_right_bottom: false,
                ..self.clone()
            };
            return conv.forward(&f32(&x)?)?.to_dtype(DType::BF16);
        }
        #[cfg(feature = "cudnn")]
        if super::fast_conv(x.device()) {
            return super::cudnn::conv2d(&x, &self.weight, self.bias.as_ref(), self.padding, self.stride, false);
        }
        if let Some(y) = self.forward_cpu(&x, None)? {
            return Ok(y);
        }
        self.forward_bounded(&x, max_conv_column_elements(x.device()))
    }

    /// The CPU's fast convolution of `x` (already padded; channels-first) in its dtype, plus
    /// `residual` when given (added as the output is written): `None` where it does not apply
    /// (another device, the fast kernels off, a shape or dtype its kernels do not take).
    fn forward_cpu(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
        if !super::fast_cpu(x.device()) {
            return Ok(None);
        }
        let (w, b, p, s) = (&self.weight, self.bias.as_ref(), self.padding, self.stride);
        if super::cpu_bf16(x) {
            super::cpu_bf16::conv2d_add(x, w, b, p, s, residual)
        } else {
            super::cpu::conv2d_add(x, w, b, p, s, residual)
        }
    }

    /// `residual + self.forward(x)` (a ResNet block's `input + hidden`; `residual` in the
    /// output's shape): on the CPU's direct convolutions the sum is made as each output row is
    /// written, with no separate pass or second output (bf16: the rounded output plus the
    /// residual, rounded again, as the separate add rounds); elsewhere the separate add.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if !self.channels_last && !self.pad_right_bottom {
            if let Some(y) = self.forward_cpu(x, Some(residual))? {
                return Ok(y);
            }
        }
        residual + self.forward(x)?
    }

    /// [`Self::forward`] of `x` upsampled 2× by nearest neighbour (each pixel repeated over a 2×2
    /// block: `upsample_nearest2d(2h, 2w)`, diffusers' `Upsample2D`). Channels-first on the CPU in
    /// f32, a 3×3 "same" convolution runs on `x` itself (`cpu::upsample_conv2d`: no upsampled
    /// copy, 4/9 of the multiply-adds); channels-last it runs between transposes, except through
    /// cuDNN, which convolves the upsampled copy (one broadcast copy, no transposes).
    pub fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        if self.channels_last {
            #[cfg(feature = "cudnn")]
            if super::fast_conv(x.device()) {
                let (b, h, w, c) = x.dims4()?;
                let up = x.reshape((b, h, 1, w, 1, c))?.broadcast_as((b, h, 2, w, 2, c))?.contiguous()?;
                return self.forward(&up.reshape((b, 2 * h, 2 * w, c))?);
            }
            let first =
                Self { weight: self.weight.permute((0, 3, 1, 2))?.contiguous()?, channels_last: false, ..self.clone() };
            let y = first.forward_upsampled(&x.permute((0, 3, 1, 2))?.contiguous()?)?;
            return y.permute((0, 2, 3, 1))?.contiguous();
        }
        if !self.pad_right_bottom && super::fast_cpu(x.device()) {
            if let Some(y) =
                super::cpu::upsample_conv2d(x, &self.weight, self.bias.as_ref(), self.padding, self.stride)?
            {
                return Ok(y);
            }
        }
        let (_, _, h, w) = x.dims4()?;
        self.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }

    /// [`Self::forward`] of channels-last `x: [b, h, w, cin]`: cuDNN's channels-last kernels,
    /// else the channels-first path between two transposes (every device, every dtype).
    fn forward_channels_last(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cudnn")]
        if super::fast_conv(x.device()) {
            let x = if self.pad_right_bottom { x.pad_with_zeros(1, 0, 1)?.pad_with_zeros(2, 0, 1)? } else { x.clone() };
            return super::cudnn::conv2d(&x, &self.weight, self.bias.as_ref(), self.padding, self.stride, true);
        }
        let first =
            Self { weight: self.weight.permute((0, 3, 1, 2))?.contiguous()?, channels_last: false, ..self.clone() };
        first.forward(&x.permute((0, 3, 1, 2))?.contiguous()?)?.permute((0, 2, 3, 1))?.contiguous()
    }

    /// The reference convolution of `x` (its right/bottom padding already added), with every
    /// call's column buffer under `limit` elements.
    fn forward_bounded(&self, x: &Tensor, limit: usize) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let (h_out, w_out) = (self.out_len(h), self.out_len(w));
        if self.column_elements(b, h_out, w_out) < limit {
            return self.plain(x, self.padding);
        }
        if b > 1 {
            let images = (0..b).map(|i| self.image_in_bands(&x.narrow(0, i, 1)?, limit)).collect::<Result<Vec<_>>>()?;
            return Tensor::cat(&images, 0);
        }
        self.image_in_bands(x, limit)
    }

    /// candle's convolution and the bias, as `candle_nn::Conv2d` applies them.
    fn plain(&self, x: &Tensor, padding: usize) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }

    /// Output rows or columns for `n` input ones.
    fn out_len(&self, n: usize) -> usize {
        (n + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1
    }

    fn column_elements(&self, b: usize, rows_out: usize, w_out: usize) -> usize {
        let cin = self.weight.dim(1).unwrap_or(1);
        b * rows_out * w_out * cin * self.kernel * self.kernel
    }

    /// One image in bands of output rows.
    fn image_in_bands(&self, x: &Tensor, limit: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (h_out, w_out) = (self.out_len(h), self.out_len(w));
        if self.column_elements(1, h_out, w_out) < limit {
            return self.plain(x, self.padding);
        }
        let rows = (limit / self.column_elements(1, 1, w_out).max(1)).max(1);
        let p = self.padding;
        let padded = if p > 0 { x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)? } else { x.clone() };
        let mut bands = Vec::with_capacity(h_out.div_ceil(rows));
        for start in (0..h_out).step_by(rows) {
            let len = rows.min(h_out - start);
            // Output rows start..start+len read padded rows from start·stride, (len − 1)·stride + k of them.
            let input = padded.narrow(2, start * self.stride, (len - 1) * self.stride + self.kernel)?;
            bands.push(self.plain(&input, 0)?);
        }
        Tensor::cat(&bands, 2)
    }
}

/// A 3×3 convolution with padding 1.
pub fn conv3x3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::load(cin, cout, 3, 1, 1, false, vb)
}

/// A 1×1 convolution.
pub fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::load(cin, cout, 1, 0, 1, false, vb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn weights(cin: usize, cout: usize, k: usize) -> VarBuilder<'static> {
        let dev = Device::Cpu;
        VarBuilder::from_tensors(
            [
                ("weight".to_string(), Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev).unwrap()),
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
    /// 2 rows, and single rows; for the stride-1 "same" convolution, both stride-2 downsamplers
    /// (the UNet's padding 1, the VAE's right/bottom pad) and a 1×1, on odd and even sizes.
    #[test]
    fn bounded_convolution_equals_the_plain_one() {
        let cases = [(3, 1, 1, false), (3, 1, 2, false), (3, 0, 2, true), (1, 0, 1, false)];
        for (k, padding, stride, pad_rb) in cases {
            let conv = Conv2d::load(3, 4, k, padding, stride, pad_rb, weights(3, 4, k)).unwrap();
            for (h, w) in [(5, 7), (8, 6), (3, 4)] {
                let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
                let x = if pad_rb { x.pad_with_zeros(2, 0, 1).unwrap().pad_with_zeros(3, 0, 1).unwrap() } else { x };
                let plain = conv.forward_bounded(&x, usize::MAX).unwrap();
                for limit in [27 * 35 + 1, 27 * 14 + 1, 1] {
                    let out = conv.forward_bounded(&x, limit).unwrap();
                    let diff = max_diff(&out, &plain);
                    assert!(diff < 1e-5, "k {k} padding {padding} stride {stride} {h}×{w} limit {limit}: {diff}");
                }
            }
        }
        // The plain path is candle_nn's convolution as configured.
        let vb = weights(3, 4, 3);
        let conv = Conv2d::load(3, 4, 3, 1, 1, false, vb.clone()).unwrap();
        let stock =
            candle_nn::conv2d(3, 4, 3, candle_nn::Conv2dConfig { padding: 1, ..Default::default() }, vb).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 3, 6, 6), &Device::Cpu).unwrap();
        use candle_core::Module;
        assert!(max_diff(&conv.forward_bounded(&x, 1).unwrap(), &stock.forward(&x).unwrap()) < 1e-5);
        assert_eq!(max_diff(&conv.forward_bounded(&x, usize::MAX).unwrap(), &stock.forward(&x).unwrap()), 0.0);
    }

    /// A channels-last convolution equals the channels-first one on transposed data, for every
    /// kind the models use (here the transposing path; `gpu_ops` checks cuDNN's NHWC kernels).
    #[test]
    fn channels_last_equals_channels_first() {
        for (k, padding, stride, pad_rb) in [(3, 1, 1, false), (3, 1, 2, false), (3, 0, 2, true), (1, 0, 1, false)] {
            let conv = Conv2d::load(5, 4, k, padding, stride, pad_rb, weights(5, 4, k)).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, 5, 7, 6), &Device::Cpu).unwrap();
            let first = conv.forward(&x).unwrap();
            let last = conv.into_channels_last().unwrap();
            assert_eq!(last.weight().dims(), [4, k, k, 5]);
            let y = last.forward(&x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()).unwrap();
            let y = y.permute((0, 3, 1, 2)).unwrap();
            assert_eq!(max_diff(&y, &first), 0.0, "k {k} padding {padding} stride {stride}");
        }
    }

    /// The CPU's direct 3×3 convolution (`direct_conv`, where the processor has the kernels)
    /// against the banded reference at the VAE decoder's real shapes — its 512-channel blocks at
    /// 64², the 128-channel last level at the full 512², `conv_in` from the 4 latent channels and
    /// `conv_out` to 3 — and on the tiling edges: widths that are not a multiple of the 64-pixel
    /// tile (60, 121, 190: the narrowest that fill 8/9 of their tiles; a 1-pixel image takes the
    /// unfolded path), a height of 1, output channels that fill no 6-channel tile or 48-channel task, input
    /// channels past one 16-channel block, a batch. f32 within 1e-5 of the largest output (sums of
    /// up to 4608 products in another order); bf16 against the f32 result on the same bf16 values
    /// within 2⁻⁸ of it (the bf16 path's exact products and f32 sums, then one rounding: half a
    /// bf16 step, 2⁻⁹, of the value; an odd channel count is paired with zero).
    #[test]
    fn the_direct_convolution_equals_the_reference_at_vae_shapes() {
        if !crate::ops::bf16_gemm::supported() {
            return;
        }
        let cases = [
            (1, 512, 512, 64, 64),
            (1, 128, 128, 512, 512),
            (1, 4, 512, 64, 64),
            (1, 128, 3, 512, 512),
            (2, 5, 7, 67, 60),
            (1, 4, 13, 1, 1),
            (1, 17, 50, 2, 121),
            (1, 33, 49, 3, 190),
        ];
        for (b, cin, cout, h, w) in cases {
            let conv = Conv2d::load(cin, cout, 3, 1, 1, false, weights(cin, cout, 3)).unwrap();
            let conv = Conv2d { weight: (conv.weight.clone() * (9.0 * cin as f64).powf(-0.5)).unwrap(), ..conv };
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &Device::Cpu).unwrap();
            let reference = conv.forward_bounded(&x, MAX_CONV_COLUMN_ELEMENTS).unwrap();
            let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let fast =
                crate::ops::cpu::conv2d_add(&x, &conv.weight, conv.bias.as_ref(), 1, 1, None).unwrap().expect("f32");
            let diff = max_diff(&fast, &reference);
            assert!(diff <= 1e-5 * scale, "f32 {b}×{cin}→{cout} at {h}×{w}: max diff {diff} (scale {scale})");
            let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
            let (xb, wb, bb) = (bf16(&x), bf16(&conv.weight), bf16(conv.bias.as_ref().unwrap()));
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let exact =
                crate::ops::cpu::conv2d_add(&f32(&xb), &f32(&wb), Some(&f32(&bb)), 1, 1, None).unwrap().expect("f32");
            let half = crate::ops::cpu_bf16::conv2d_add(&xb, &wb, Some(&bb), 1, 1, None).unwrap().expect("bf16");
            assert_eq!(half.dtype(), DType::BF16);
            let diff = max_diff(&f32(&half), &exact);
            let scale = exact.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= scale / 256.0, "bf16 {b}×{cin}→{cout} at {h}×{w}: max diff {diff} (scale {scale})");
        }
    }

    /// A convolution with its residual added as the output is written ([`Conv2d::forward_add`])
    /// equals the separate add bit for bit, f32 and bf16 (the same sums, the same roundings):
    /// the VAE's 512-channel ResNet convolution at 64², odd sizes in a batch, and a 1×1
    /// convolution (no direct path: the separate add).
    #[test]
    fn the_fused_residual_add_equals_the_separate_one() {
        for (b, cin, cout, h, w, k) in [(1, 512, 512, 64, 64, 3), (2, 5, 7, 9, 60, 3), (1, 8, 6, 5, 5, 1)] {
            let conv = Conv2d::load(cin, cout, k, k / 2, 1, false, weights(cin, cout, k)).unwrap();
            let conv = Conv2d { weight: (conv.weight.clone() * (9.0 * cin as f64).powf(-0.5)).unwrap(), ..conv };
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &Device::Cpu).unwrap();
            let skip = Tensor::randn(0f32, 1.0, (b, cout, h, w), &Device::Cpu).unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
                let conv = Conv2d { weight: cast(&conv.weight), bias: conv.bias.as_ref().map(cast), ..conv.clone() };
                let (x, skip) = (cast(&x), cast(&skip));
                let fused = conv.forward_add(&x, &skip).unwrap();
                if crate::ops::bf16_gemm::supported() {
                    let (w, bias) = (&conv.weight, conv.bias.as_ref());
                    let direct = match dtype {
                        DType::F32 => crate::ops::cpu::conv2d_add(&x, w, bias, k / 2, 1, Some(&skip)),
                        _ => crate::ops::cpu_bf16::conv2d_add(&x, w, bias, k / 2, 1, Some(&skip)),
                    };
                    assert_eq!(direct.unwrap().is_some(), k == 3, "the fused path runs for 3×3 only");
                }
                let separate = (&skip + conv.forward(&x).unwrap()).unwrap();
                assert_eq!(fused.dtype(), dtype);
                let (fused, separate) = (fused.to_dtype(DType::F32).unwrap(), separate.to_dtype(DType::F32).unwrap());
                assert_eq!(max_diff(&fused, &separate), 0.0, "{dtype:?} {b}×{cin}→{cout} {k}×{k} at {h}×{w}");
            }
        }
    }

    /// The CPU's convolution of a 2× nearest-upsampled input without the upsampled copy
    /// ([`Conv2d::forward_upsampled`]: 2×2 kernels of summed weights per output parity) against
    /// the reference convolution of candle's upsampled input: the VAE decoder's real 512-channel
    /// upsampler at 64² → 128², and the edges (odd heights, a 1-row input, output rows of 58 and
    /// 60 pixels, one of two tiles with the second partial, channels past one block, a batch; 80-
    /// pixel rows, which would leave a third of their tiles idle, take the upsampled copy), f32 within 1e-5 of the largest
    /// output (the summed weights round once more, 2⁻²⁴ of each); bf16 takes the upsampled copy.
    #[test]
    fn the_upsampling_convolution_equals_the_reference() {
        if !crate::ops::bf16_gemm::supported() {
            return;
        }
        for (b, cin, cout, h, w) in
            [(1, 512, 512, 64, 64), (2, 5, 7, 3, 30), (1, 3, 13, 1, 29), (1, 17, 50, 4, 61), (1, 33, 8, 40, 40)]
        {
            let conv = Conv2d::load(cin, cout, 3, 1, 1, false, weights(cin, cout, 3)).unwrap();
            let conv = Conv2d { weight: (conv.weight.clone() * (9.0 * cin as f64).powf(-0.5)).unwrap(), ..conv };
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &Device::Cpu).unwrap();
            let up = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
            let reference = conv.forward_bounded(&up, MAX_CONV_COLUMN_ELEMENTS).unwrap();
            let direct = crate::ops::cpu::upsample_conv2d(&x, &conv.weight, conv.bias.as_ref(), 1, 1).unwrap();
            assert_eq!(direct.is_some(), w != 40, "the direct path for {w}-pixel inputs");
            let fast = conv.forward_upsampled(&x).unwrap();
            let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = max_diff(&fast, &reference);
            assert!(diff <= 1e-5 * scale, "{b}×{cin}→{cout} at {h}×{w} → ×2: max diff {diff} (scale {scale})");
            if let Some(direct) = direct {
                assert_eq!(max_diff(&direct, &fast), 0.0);
            }
            let half = conv.forward_upsampled(&x.to_dtype(DType::BF16).unwrap());
            assert_eq!(half.unwrap().dims(), reference.dims());
        }
    }

    /// The CPU's banded unfold-and-multiply equals the reference: every kind of convolution the
    /// models use, odd and even sizes, a batch, and an image large enough for several bands.
    #[test]
    fn the_cpu_convolution_equals_the_reference() {
        let cases = [(3, 1, 1, false), (3, 1, 2, false), (3, 0, 2, true), (1, 0, 1, false), (1, 0, 2, false)];
        for (k, padding, stride, pad_rb) in cases {
            for (cin, cout, h, w, b) in [(5, 4, 7, 9, 2), (3, 8, 8, 6, 1), (64, 16, 128, 128, 1), (320, 320, 24, 24, 2)]
            {
                let conv = Conv2d::load(cin, cout, k, padding, stride, pad_rb, weights(cin, cout, k)).unwrap();
                let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &Device::Cpu).unwrap();
                let padded = if pad_rb {
                    x.pad_with_zeros(2, 0, 1).unwrap().pad_with_zeros(3, 0, 1).unwrap()
                } else {
                    x.clone()
                };
                let reference = conv.forward_bounded(&padded, usize::MAX).unwrap();
                let fast =
                    crate::ops::cpu::conv2d_add(&padded, &conv.weight, conv.bias.as_ref(), padding, stride, None)
                        .unwrap()
                        .expect("f32 on the CPU");
                let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let diff = max_diff(&fast, &reference);
                assert!(diff <= 1e-5 * scale.max(1.0), "k {k} p {padding} s {stride} {cin}→{cout} {h}×{w}: {diff}");
                assert_eq!(fast.dims(), reference.dims());
            }
        }
    }
}
