//! CPU fast paths: whole operations in one pass over memory, on all cores, where candle's
//! reference path chains whole-tensor ops (GroupNorm: about a dozen passes with temporaries).

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use super::bf16_gemm::{self, PanelWriter, Rhs};
use super::direct_conv;
use super::norm::GroupNorm;

/// GroupNorm of an f32 `x: [b, c, ...]` (`norm`'s groups, weights and epsilon), of `x + add`
/// (`add: [b, c]`, checked by the caller) when given, then SiLU when `silu`: per group, the mean
/// and variance in f64 (two passes over the group, which stays in cache), then one pass writing
/// `(v − mean)·rstd·γ + β`. A bf16 `x` is normalised in f32 and rounded once, as PyTorch's CPU
/// bf16 GroupNorm computes (candle's reference makes a dozen whole-tensor passes of it); its
/// `add` is added in bf16 first, as diffusers' separate add rounds it. `None` for other dtypes
/// (the reference path runs them).
pub(crate) fn group_norm(norm: &GroupNorm, x: &Tensor, add: Option<&Tensor>, silu: bool) -> Result<Option<Tensor>> {
    if x.dtype() == DType::BF16 && x.device().is_cpu() {
        let x = match add {
            Some(a) => {
                let shape: Vec<usize> = a.dims().iter().copied().chain(std::iter::repeat_n(1, x.rank() - 2)).collect();
                x.broadcast_add(&a.reshape(shape)?)?
            }
            None => x.clone(),
        };
        let y = group_norm(norm, &x.to_dtype(DType::F32)?, None, silu)?;
        return y.map(|y| y.to_dtype(DType::BF16)).transpose();
    }
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Ok(None);
    }
    let dims = x.dims().to_vec();
    let (c, groups, eps) = (dims[1], norm.groups, norm.eps);
    let hw: usize = dims[2..].iter().product();
    let cpg = c / groups;
    let x = x.contiguous()?;
    let (weight, bias) =
        (norm.weight.to_dtype(DType::F32)?.contiguous()?, norm.bias.to_dtype(DType::F32)?.contiguous()?);
    let add = add.map(|a| a.to_dtype(DType::F32)?.contiguous()).transpose()?;
    let (x_in, w_in, b_in) = (CpuInput::new(&x)?, CpuInput::new(&weight)?, CpuInput::new(&bias)?);
    let add_in = add.as_ref().map(CpuInput::new).transpose()?;
    let (xs, gamma, beta) = (x_in.f32s()?, w_in.f32s()?, b_in.f32s()?);
    let adds = add_in.as_ref().map(CpuInput::f32s).transpose()?;
    let group_len = cpg * hw;
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(group_len.max(1)).enumerate().for_each(|(bg, y)| {
        let (bi, g) = (bg / groups, bg % groups);
        let x = &xs[bg * group_len..(bg + 1) * group_len];
        let extra = |ch: usize| adds.as_ref().map_or(0.0, |a| a[bi * c + g * cpg + ch]);
        // The mean and variance from one pass of f64 sums of the values and their squares (f64
        // keeps `Σv² − n·mean²` exact to ~1e-16 of `Σv²`: far inside the f32 result's rounding
        // unless the mean is 10⁵ standard deviations from zero).
        let (mut sum, mut squares) = (0f64, 0f64);
        for ch in 0..cpg {
            let (s, q) = sums(&x[ch * hw..(ch + 1) * hw], extra(ch));
            (sum, squares) = (sum + s, squares + q);
        }
        let mean = sum / group_len as f64;
        let variance = (squares / group_len as f64 - mean * mean).max(0.0);
        let rstd = 1.0 / (variance + eps).sqrt();
        for ch in 0..cpg {
            let cc = g * cpg + ch;
            let (scale, shift) = ((rstd * gamma[cc] as f64) as f32, beta[cc]);
            let (x, y) = (&x[ch * hw..(ch + 1) * hw], &mut y[ch * hw..(ch + 1) * hw]);
            normalise(x, y, extra(ch) - mean as f32, scale, shift, silu);
        }
    });
    Ok(Some(Tensor::from_vec(out, dims, &Device::Cpu)?))
}

/// `(Σ (v + e), Σ (v + e)²)` over `x` in f64 (each `v + e` rounded to f32 first, as the
/// normalisation then uses it): 16 values a step with AVX-512 where the processor has it.
fn sums(x: &[f32], e: f32) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the processor has AVX-512F, checked just above.
        return unsafe { sums_avx512(x, e) };
    }
    x.iter().fold((0.0, 0.0), |(s, q), &v| {
        let v = (v + e) as f64;
        (s + v, q + v * v)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sums_avx512(x: &[f32], e: f32) -> (f64, f64) {
    use std::arch::x86_64::*;
    let es = _mm512_set1_ps(e);
    let (mut s0, mut s1, mut q0, mut q1) =
        (_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd());
    let mut chunks = x.chunks_exact(16);
    for chunk in chunks.by_ref() {
        let v = _mm512_add_ps(_mm512_loadu_ps(chunk.as_ptr()), es);
        let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
        (s0, s1) = (_mm512_add_pd(s0, lo), _mm512_add_pd(s1, hi));
        (q0, q1) = (_mm512_fmadd_pd(lo, lo, q0), _mm512_fmadd_pd(hi, hi, q1));
    }
    let tail = chunks.remainder().iter().fold((0.0, 0.0), |(s, q), &v| {
        let v = (v + e) as f64;
        (s + v, q + v * v)
    });
    (_mm512_reduce_add_pd(_mm512_add_pd(s0, s1)) + tail.0, _mm512_reduce_add_pd(_mm512_add_pd(q0, q1)) + tail.1)
}

/// `y = (x + shift_in)·scale + shift`, then SiLU (`n / (1 + e^−n)`, [`exp`]) when `silu`: 16
/// values a step with AVX-512 where the processor has it (the same arithmetic lane by lane).
fn normalise(x: &[f32], y: &mut [f32], shift_in: f32, scale: f32, shift: f32, silu: bool) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the processor has AVX-512F, checked just above.
        return unsafe { normalise_avx512(x, y, shift_in, scale, shift, silu) };
    }
    for (o, &v) in y.iter_mut().zip(x) {
        *o = normalised(v, shift_in, scale, shift, silu);
    }
}

/// One value of [`normalise`].
#[inline(always)]
fn normalised(v: f32, shift_in: f32, scale: f32, shift: f32, silu: bool) -> f32 {
    let n = (v + shift_in) * scale + shift;
    if silu {
        n / (1.0 + exp(-n))
    } else {
        n
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn normalise_avx512(x: &[f32], y: &mut [f32], shift_in: f32, scale: f32, shift: f32, silu: bool) {
    use std::arch::x86_64::*;
    let (shift_ins, scales, shifts, ones) =
        (_mm512_set1_ps(shift_in), _mm512_set1_ps(scale), _mm512_set1_ps(shift), _mm512_set1_ps(1.0));
    let n = x.len().min(y.len());
    let whole = n - n % 16;
    for i in (0..whole).step_by(16) {
        let v = _mm512_loadu_ps(x.as_ptr().add(i));
        let mut o = _mm512_add_ps(_mm512_mul_ps(_mm512_add_ps(v, shift_ins), scales), shifts);
        if silu {
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), o));
            o = _mm512_div_ps(o, _mm512_add_ps(ones, e));
        }
        _mm512_storeu_ps(y.as_mut_ptr().add(i), o);
    }
    for i in whole..n {
        y[i] = normalised(x[i], shift_in, scale, shift, silu);
    }
}

/// Bytes of one band of the convolution's column matrix: bands of output rows are unfolded and
/// multiplied one at a time, so the column (2.4 G elements for the VAE decoder's 256-channel
/// convolutions at 1024²) never exists whole, while each product stays large enough to run at the
/// matrix kernel's full speed.
pub(super) const CONV_BAND_BYTES: usize = 16 << 20;

/// Whether `t` is an f32 tensor on the CPU (what every kernel here takes).
fn f32_cpu(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu()
}

/// `conv2d(x, weight) + bias` for f32 `x: [b, c, h, w]`, `weight: [o, c, kh, kw]` on the CPU, zero
/// `padding` on every side. 3×3 "same" convolutions run direct (`direct_conv`: no column);
/// the others per image: bands of output rows are unfolded into a `[c·kh·kw, pixels]`
/// column (all cores) and multiplied by the weight as `[o, c·kh·kw]` straight into the NCHW output,
/// which starts as the bias (no column of the whole image, no transposed copy of the output, no
/// separate bias pass). 1×1 stride-1 convolutions multiply the input itself. `None` for other
/// dtypes or devices, or a kernel larger than the padded input (the reference path reports it).
///
/// Plus `residual` when given (the output's shape and dtype), added as the direct convolution
/// writes each output row (no separate pass, no second output). With a residual, `None` where
/// the direct convolution does not apply (the caller adds it).
pub(crate) fn conv2d_add(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if !(f32_cpu(x) && f32_cpu(weight) && bias.is_none_or(f32_cpu) && residual.is_none_or(f32_cpu)) {
        return Ok(None);
    }
    let Some((b, o, geometry)) = ConvGeometry::of(x, weight, padding, stride)? else {
        return Ok(None);
    };
    let direct = direct_conv::applies(&geometry, geometry.wo);
    if residual.is_some_and(|r| !direct || r.dims() != [b, o, geometry.ho, geometry.wo]) {
        return Ok(None);
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let (x_in, w_in) = (CpuInput::new(&x)?, CpuInput::new(&weight)?);
    let (xs, ws) = (x_in.f32s()?, w_in.f32s()?);
    let pixels = geometry.ho * geometry.wo;
    if direct {
        let residual = residual.map(Tensor::contiguous).transpose()?;
        let r_in = residual.as_ref().map(CpuInput::new).transpose()?;
        let mut out = vec![0f32; b * o * pixels];
        let shape = direct_conv::Shape { b, c: geometry.c, h: geometry.h, w: geometry.w, o };
        let bias = bias_values(bias)?;
        direct_conv::conv3x3_f32(
            shape,
            xs,
            ws,
            bias.as_deref(),
            r_in.as_ref().map(CpuInput::f32s).transpose()?,
            &mut out,
        );
        return Ok(Some(Tensor::from_vec(out, (b, o, geometry.ho, geometry.wo), &Device::Cpu)?));
    }
    let mut out = geometry.output(b, o, bias)?;
    for (xi, yi) in xs.chunks(geometry.c * geometry.h * geometry.w).zip(out.chunks_mut(o * pixels)) {
        geometry.image(xi, ws, o, yi, bias.is_some());
    }
    Ok(Some(Tensor::from_vec(out, (b, o, geometry.ho, geometry.wo), &Device::Cpu)?))
}

/// `conv2d(upsample_nearest2d(x, 2h, 2w), weight) + bias` (3×3, padding 1, stride 1) for f32
/// `x: [b, c, h, w]` on the CPU without the upsampled input ([`direct_conv::upsample_conv3x3_f32`]:
/// 4/9 of the multiply-adds). `None` where it does not apply (another dtype, device or kernel, a
/// processor without the kernels).
pub(crate) fn upsample_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    if !(f32_cpu(x) && f32_cpu(weight) && bias.is_none_or(f32_cpu)) {
        return Ok(None);
    }
    let Some((b, o, geometry)) = ConvGeometry::of(x, weight, padding, stride)? else {
        return Ok(None);
    };
    if !direct_conv::applies(&geometry, 2 * geometry.w) {
        return Ok(None);
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let (x_in, w_in) = (CpuInput::new(&x)?, CpuInput::new(&weight)?);
    let (h, w) = (geometry.h, geometry.w);
    let mut out = vec![0f32; b * o * 4 * h * w];
    let shape = direct_conv::Shape { b, c: geometry.c, h, w, o };
    direct_conv::upsample_conv3x3_f32(shape, x_in.f32s()?, w_in.f32s()?, bias_values(bias)?.as_deref(), &mut out);
    Ok(Some(Tensor::from_vec(out, (b, o, 2 * h, 2 * w), &Device::Cpu)?))
}

/// Rows of `x` below which [`linear`] leaves the product to candle: packing the weight costs as
/// much as a product of this many rows.
const LINEAR_MIN_ROWS: usize = 16;

/// `x·Wᵀ + b` for f32 `x: [.., in]`, `weight: [out, in]`, `bias: [out]` on the CPU through our
/// AVX-512 kernel: the weight packed once per call into the kernel's panels (its transpose),
/// the output rows starting as the bias. `None` where it does not apply (another
/// dtype or device, a processor without the kernel, fewer than [`LINEAR_MIN_ROWS`] rows).
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (n, k) = weight.dims2()?;
    if !(bf16_gemm::supported() && f32_cpu(x) && f32_cpu(weight) && bias.is_none_or(f32_cpu))
        || x.dim(candle_core::D::Minus1)? != k
    {
        return Ok(None);
    }
    let m = x.elem_count() / k.max(1);
    if m < LINEAR_MIN_ROWS {
        return Ok(None);
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let (x_in, w_in) = (CpuInput::new(&x)?, CpuInput::new(&weight)?);
    let w = w_in.f32s()?;
    let mut packed = vec![0u32; bf16_gemm::panels_len(n, k)];
    bf16_gemm::pack_panels(n, k, &mut packed, |j, p| w[j * k + p].to_bits());
    let mut out = match bias_values(bias)? {
        Some(b) => b.repeat(m),
        None => vec![0f32; m * n],
    };
    let b = Rhs::Panels { data: &packed, depth: k };
    bf16_gemm::gemm_f32(m, n, k, (x_in.f32s()?, k), b, &mut out, n, bias.is_some(), true);
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("x has the in dimension") = n;
    Ok(Some(Tensor::from_vec(out, shape, &Device::Cpu)?))
}

/// One convolution's sizes: input `c × h × w`, kernel `kh × kw`, output `ho × wo`.
pub(super) struct ConvGeometry {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub padding: usize,
    pub stride: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeometry {
    /// The batch, output channels and geometry of convolving `x: [b, c, h, w]` by `weight:
    /// [o, c, kh, kw]`; `None` when the channels differ, the kernel is larger than the padded
    /// input or the stride is 0 (the reference path reports those).
    pub fn of(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Option<(usize, usize, Self)>> {
        let (b, c, h, w) = x.dims4()?;
        let (o, wc, kh, kw) = weight.dims4()?;
        if wc != c || h + 2 * padding < kh || w + 2 * padding < kw || stride == 0 {
            return Ok(None);
        }
        let (ho, wo) = ((h + 2 * padding - kh) / stride + 1, (w + 2 * padding - kw) / stride + 1);
        Ok(Some((b, o, Self { c, h, w, kh, kw, padding, stride, ho, wo })))
    }

    /// The f32 output `[b, o, ho, wo]` the products add into: each plane starts as its bias (in
    /// f32 whatever the bias's dtype), or zeros.
    pub fn output(&self, b: usize, o: usize, bias: Option<&Tensor>) -> Result<Vec<f32>> {
        let pixels = self.ho * self.wo;
        let mut out = vec![0f32; b * o * pixels];
        if let Some(bias) = bias_values(bias)? {
            out.par_chunks_mut(pixels.max(1)).enumerate().for_each(|(i, plane)| plane.fill(bias[i % o]));
        }
        Ok(out)
    }

    /// Convolves one image `x` (`c·h·w`) with `weights` (`o × c·kh·kw`) into `y` (`o × ho·wo`),
    /// added to what `y` holds when `accumulate`.
    fn image(&self, x: &[f32], weights: &[f32], o: usize, y: &mut [f32], accumulate: bool) {
        let k = self.c * self.kh * self.kw;
        let pixels = self.ho * self.wo;
        if self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0 {
            // The input is its own column: `[c, h·w]`.
            matmul(o, pixels, k, y, pixels, weights, x, pixels, accumulate);
            return;
        }
        let band_rows = (CONV_BAND_BYTES / 4 / (k * self.wo).max(1)).clamp(1, self.ho);
        if bf16_gemm::supported() {
            self.image_in_panels(x, weights, o, y, accumulate, band_rows);
            return;
        }
        let mut column = vec![0f32; k * band_rows * self.wo];
        for r0 in (0..self.ho).step_by(band_rows) {
            let rows = band_rows.min(self.ho - r0);
            let n = rows * self.wo;
            let column = &mut column[..k * n];
            column.par_chunks_mut(n).enumerate().for_each(|(row, dst)| self.unfold(x, row, r0, rows, dst));
            matmul(o, n, k, &mut y[r0 * self.wo..], pixels, weights, column, n, accumulate);
        }
    }

    /// [`Self::image`] through our kernel: each band's column unfolded straight into the product's
    /// panels (one task per column row), so the product reads it in place.
    fn image_in_panels(&self, x: &[f32], weights: &[f32], o: usize, y: &mut [f32], accumulate: bool, band_rows: usize) {
        let (k, pixels) = (self.c * self.kh * self.kw, self.ho * self.wo);
        let mut column = vec![0u32; bf16_gemm::panels_len(band_rows * self.wo, k)];
        for r0 in (0..self.ho).step_by(band_rows) {
            let rows = band_rows.min(self.ho - r0);
            let n = rows * self.wo;
            let panels = PanelWriter::new(&mut column, n, k);
            (0..k).into_par_iter().for_each_init(
                || vec![0f32; n],
                |row, p| {
                    self.unfold(x, p, r0, rows, row);
                    // SAFETY: each column row is written by this task alone, and the column is
                    // read only after every task has finished.
                    unsafe { panels.write_row(p, bf16_gemm::f32_bits(row)) };
                },
            );
            let b = Rhs::Panels { data: &column, depth: k };
            bf16_gemm::gemm_f32(o, n, k, (weights, k), b, &mut y[r0 * self.wo..], pixels, accumulate, true);
        }
    }

    /// Column row `row` (input channel, kernel row, kernel column) for output rows
    /// `r0..r0 + rows`: the input values each output pixel multiplies by that weight, zero where
    /// the kernel overhangs the padding.
    pub fn unfold<T: Copy + Default>(&self, x: &[T], row: usize, r0: usize, rows: usize, dst: &mut [T]) {
        let (ci, ky, kx) = (row / (self.kh * self.kw), (row / self.kw) % self.kh, row % self.kw);
        let plane = &x[ci * self.h * self.w..(ci + 1) * self.h * self.w];
        for (r, out) in dst.chunks_mut(self.wo).take(rows).enumerate() {
            let iy = ((r0 + r) * self.stride + ky) as isize - self.padding as isize;
            if iy < 0 || iy >= self.h as isize {
                out.fill(T::default());
                continue;
            }
            let src = &plane[iy as usize * self.w..(iy as usize + 1) * self.w];
            if self.stride == 1 {
                // One contiguous run of the input row, zeros where it overhangs either edge.
                let shift = kx as isize - self.padding as isize;
                let first = (-shift).clamp(0, self.wo as isize) as usize;
                let last = (self.w as isize - shift).clamp(first as isize, self.wo as isize) as usize;
                out[..first].fill(T::default());
                out[first..last]
                    .copy_from_slice(&src[(first as isize + shift) as usize..(last as isize + shift) as usize]);
                out[last..].fill(T::default());
            } else {
                for (ox, v) in out.iter_mut().enumerate() {
                    let ix = (ox * self.stride + kx) as isize - self.padding as isize;
                    *v = if ix >= 0 && ix < self.w as isize { src[ix as usize] } else { T::default() };
                }
            }
        }
    }
}

/// `y[m, n] (+)= a[m, k] · b[k, n]` on all cores; `a` row-major with rows `k` apart, `b` and `y`
/// with rows `ldb` and `ldy` apart. Through our AVX-512 kernel where the processor has it (about
/// twice the `gemm` crate's rate at the convolutions' shapes), else through `gemm`.
#[allow(clippy::too_many_arguments)]
fn matmul(m: usize, n: usize, k: usize, y: &mut [f32], ldy: usize, a: &[f32], b: &[f32], ldb: usize, accumulate: bool) {
    assert!(
        m == 0 || n == 0 || (y.len() >= (m - 1) * ldy + n && a.len() >= m * k && b.len() >= (k.max(1) - 1) * ldb + n)
    );
    if bf16_gemm::supported() {
        let b = Rhs::Rows { data: bf16_gemm::f32_bits(b), ld: ldb };
        bf16_gemm::gemm_f32(m, n, k, (a, k), b, y, ldy, accumulate, true);
        return;
    }
    // SAFETY: the assertion keeps every element gemm touches inside the three slices; `y` is
    // borrowed mutably, so nothing else writes it meanwhile.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            ldy as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            ldb as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// Query rows per task of [`attention`]: a task's scores (`rows · kv_len` f32) stay in cache.
const ATTENTION_ROWS: usize = 64;

/// `softmax(q·kᵀ·scale)·v` for f32 `q: [b, heads, q_len, d]`, `k`, `v: [b, heads, kv_len, d]` on the
/// CPU (no mask), in any layout whose last axis is contiguous (the heads' views of
/// `[b, seq, heads·d]` are read in place): one task per (batch, head, 64 query rows) on all cores,
/// each scoring its rows against every key, taking the softmax and multiplying by `v` while its
/// scores are in cache. The full score matrix (1 GiB for SD 1.5 at 512² with CFG) never exists.
/// Returns `[b, heads, q_len, d]` as a view of a `[b, q_len, heads, d]` buffer (which
/// `merge_heads` reshapes without a copy); `None` for other dtypes.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let rows_f32_cpu = |t: &Tensor| f32_cpu(t) && t.stride()[3] == 1;
    if !(rows_f32_cpu(q) && rows_f32_cpu(k) && rows_f32_cpu(v)) {
        return Ok(None);
    }
    let (b, heads, q_len, d) = q.dims4()?;
    let kv_len = k.dim(2)?;
    if kv_len == 0 || q_len == 0 {
        return Ok(None);
    }
    let (qg, ql) = q.storage_and_layout();
    let (kg, kl) = k.storage_and_layout();
    let (vg, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qg, &*kg, &*vg) else {
        return Ok(None);
    };
    let (qd, kd, vd) = (qs.as_slice::<f32>()?, ks.as_slice::<f32>()?, vs.as_slice::<f32>()?);
    let (qst, kst, vst) = (ql.stride(), kl.stride(), vl.stride());
    let (qo, ko, vo) = (ql.start_offset(), kl.start_offset(), vl.start_offset());
    if bf16_gemm::supported() {
        let operands = (qd, kd, vd, qst, kst, vst, qo, ko, vo);
        let out = attention_in_panels((b, heads, q_len, kv_len, d), operands, scale as f32);
        drop((qg, kg, vg));
        return Ok(Some(Tensor::from_vec(out, (b, q_len, heads, d), &Device::Cpu)?.transpose(1, 2)?));
    }
    let row_blocks = q_len.div_ceil(ATTENTION_ROWS);
    // Output `[b, q_len, heads, d]`: a task writes rows `heads·d` apart, one head's `d` columns.
    let mut out = vec![0f32; b * q_len * heads * d];
    let out_ptr = out.as_mut_ptr() as usize;
    let scale = scale as f32;
    (0..b * heads * row_blocks).into_par_iter().for_each_init(
        || vec![0f32; ATTENTION_ROWS * kv_len],
        |scores, task| {
            let (_, bi, h, r0, rows) = attention_task(task, row_blocks, heads, q_len);
            let q_at = qo + bi * qst[0] + h * qst[1] + r0 * qst[2];
            let k_at = ko + bi * kst[0] + h * kst[1];
            let v_at = vo + bi * vst[0] + h * vst[1];
            let o_at = (bi * q_len + r0) * heads * d + h * d;
            // SAFETY: every operand lies inside its tensor's storage (the offsets and strides
            // are its layout's, the extents its dims); each task writes only its own rows of
            // its own head in `out`, so no two tasks write one element.
            unsafe {
                // scores[rows, kv] = scale · q[rows, d] · kᵀ[d, kv]
                gemm::gemm(
                    rows,
                    kv_len,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    kv_len as isize,
                    false,
                    qd.as_ptr().add(q_at),
                    1,
                    qst[2] as isize,
                    kd.as_ptr().add(k_at),
                    kst[2] as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for row in scores[..rows * kv_len].chunks_mut(kv_len) {
                let inv = 1.0 / scaled_exp(row, 1.0);
                row.iter_mut().for_each(|s| *s *= inv);
            }
            // SAFETY: as above.
            unsafe {
                // out[rows, d] = probs[rows, kv] · v[kv, d]
                gemm::gemm(
                    rows,
                    d,
                    kv_len,
                    (out_ptr as *mut f32).add(o_at),
                    1,
                    (heads * d) as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    kv_len as isize,
                    vd.as_ptr().add(v_at),
                    1,
                    vst[2] as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    drop((qg, kg, vg));
    Ok(Some(Tensor::from_vec(out, (b, q_len, heads, d), &Device::Cpu)?.transpose(1, 2)?))
}

/// Task `task` of an attention split into [`ATTENTION_ROWS`]-row blocks of `q_len` queries per
/// head: its (batch, head) index, batch, head, first query row and row count.
fn attention_task(task: usize, row_blocks: usize, heads: usize, q_len: usize) -> (usize, usize, usize, usize, usize) {
    let (bh, block) = (task / row_blocks, task % row_blocks);
    let r0 = block * ATTENTION_ROWS;
    (bh, bh / heads, bh % heads, r0, ATTENTION_ROWS.min(q_len - r0))
}

/// The operands of [`attention`] as they lie: `q`, `k`, `v`'s storage, strides and offsets.
type AttentionOperands<'a> =
    (&'a [f32], &'a [f32], &'a [f32], &'a [usize], &'a [usize], &'a [usize], usize, usize, usize);

/// [`attention`] through our kernel: per (batch, head) the keys (as `kᵀ`, `d` deep) and the
/// values (`kv_len` deep) packed into the product's panels once, then one task per 64 query rows
/// scoring, taking the softmax in place and multiplying by the values straight into the output.
/// Returns the `[b, q_len, heads, d]` buffer.
fn attention_in_panels(
    (b, heads, q_len, kv_len, d): (usize, usize, usize, usize, usize),
    (qd, kd, vd, qst, kst, vst, qo, ko, vo): AttentionOperands,
    scale: f32,
) -> Vec<f32> {
    let (key_words, value_words) = (bf16_gemm::panels_len(kv_len, d), bf16_gemm::panels_len(d, kv_len));
    let mut keys = vec![0u32; b * heads * key_words];
    let mut values = vec![0u32; b * heads * value_words];
    for bh in 0..b * heads {
        let (bi, h) = (bh / heads, bh % heads);
        let (k_at, v_at) = (ko + bi * kst[0] + h * kst[1], vo + bi * vst[0] + h * vst[1]);
        let kdst = &mut keys[bh * key_words..(bh + 1) * key_words];
        bf16_gemm::pack_panels(kv_len, d, kdst, |j, p| kd[k_at + j * kst[2] + p].to_bits());
        let vdst = &mut values[bh * value_words..(bh + 1) * value_words];
        bf16_gemm::pack_panels(d, kv_len, vdst, |j, p| vd[v_at + p * vst[2] + j].to_bits());
    }
    let row_blocks = q_len.div_ceil(ATTENTION_ROWS);
    let mut out = vec![0f32; b * q_len * heads * d];
    let out_at = out.as_mut_ptr() as usize;
    (0..b * heads * row_blocks).into_par_iter().for_each_init(
        || vec![0f32; ATTENTION_ROWS * kv_len],
        |scores, task| {
            let (bh, bi, h, r0, rows) = attention_task(task, row_blocks, heads, q_len);
            let q_rows = (&qd[qo + bi * qst[0] + h * qst[1] + r0 * qst[2]..], qst[2]);
            let key_panels = Rhs::Panels { data: &keys[bh * key_words..(bh + 1) * key_words], depth: d };
            bf16_gemm::gemm_f32(rows, kv_len, d, q_rows, key_panels, scores, kv_len, false, false);
            for row in scores[..rows * kv_len].chunks_mut(kv_len) {
                let inv = 1.0 / scaled_exp(row, scale);
                row.iter_mut().for_each(|s| *s *= inv);
            }
            let value_panels = Rhs::Panels { data: &values[bh * value_words..(bh + 1) * value_words], depth: kv_len };
            let (at, ld) = ((bi * q_len + r0) * heads * d + h * d, heads * d);
            // SAFETY: rows `at + r·ld .. + d` (r < rows) lie inside `out` (its shape is
            // `[b, q_len, heads, d]`); each task writes only its own rows of its own head, so no
            // two tasks write one element, and `out` outlives the parallel loop.
            let dst = unsafe { std::slice::from_raw_parts_mut((out_at as *mut f32).add(at), (rows - 1) * ld + d) };
            bf16_gemm::gemm_f32(rows, d, kv_len, (scores, kv_len), value_panels, dst, ld, false, false);
        },
    );
    out
}

/// `row[i] = exp(scale · row[i] − max_j scale · row[j])` (a softmax's numerators; `scale > 0`),
/// returning their sum: with AVX-512 where the processor has it, 16 lanes at a time.
pub(super) fn scaled_exp(row: &mut [f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the processor has AVX-512F, checked just above.
        return unsafe { scaled_exp_avx512(row, scale) };
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) * scale;
    row.iter_mut().fold(0.0, |sum, s| {
        *s = exp(*s * scale - max);
        sum + *s
    })
}

/// [`scaled_exp`] 16 lanes at a time ([`exp16`]; the tail by [`exp`], the same arithmetic).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scaled_exp_avx512(row: &mut [f32], scale: f32) -> f32 {
    use std::arch::x86_64::*;
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) * scale;
    let (scales, maxes) = (_mm512_set1_ps(scale), _mm512_set1_ps(max));
    let mut sums = _mm512_setzero_ps();
    let mut chunks = row.chunks_exact_mut(16);
    for chunk in chunks.by_ref() {
        let at = chunk.as_mut_ptr();
        let e = exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(at), scales), maxes));
        _mm512_storeu_ps(at, e);
        sums = _mm512_add_ps(sums, e);
    }
    chunks.into_remainder().iter_mut().fold(_mm512_reduce_add_ps(sums), |sum, s| {
        *s = exp(*s * scale - max);
        sum + *s
    })
}

/// [`exp`] of 16 lanes, operation for operation (no fused multiply-adds, so each lane equals it).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = _mm512_set1_ps;
    // max/min return their second operand when either is NaN: a NaN stays NaN.
    let x = _mm512_min_ps(c(EXP_MAX), _mm512_max_ps(c(EXP_MIN), x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        c(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, c(LN2_HI))), _mm512_mul_ps(n, c(LN2_LO)));
    let mut p = c(EXP_TAYLOR[0]);
    for &coefficient in &EXP_TAYLOR[1..] {
        p = _mm512_add_ps(c(coefficient), _mm512_mul_ps(r, p));
    }
    let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
    _mm512_mul_ps(p, _mm512_castsi512_ps(two_n))
}

/// ln 2 in two parts: `n · LN2_HI` is exact for the `n` [`exp`] sees.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// [`exp`]'s argument range: below it f32 has no normal result, above it overflows.
const EXP_MIN: f32 = -87.3;
const EXP_MAX: f32 = 88.7;
/// `e^r`'s Taylor coefficients from degree 6 down, for Horner's rule.
const EXP_TAYLOR: [f32; 7] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// `e^x` to within 2 ulp for the softmax's arguments (`x ≤ 0`; 0 below −87.3, where f32 has no
/// normal result) and SiLU's (`e^−n` of either sign: infinite past 88.7, where f32 overflows): `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `e^r` by its degree-6 Taylor
/// polynomial, `2^n` built in the exponent bits ([`exp16`] computes the same 16 at a time).
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = EXP_TAYLOR[1..].iter().fold(EXP_TAYLOR[0], |p, &coefficient| coefficient + r * p);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A bias as f32 values (the convolutions' outputs start as it, or their f32 sums add it before
/// they are rounded).
pub(crate) fn bias_values(bias: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()
}

/// A contiguous CPU tensor's storage, read-locked while its elements are borrowed.
pub(super) struct CpuInput<'a> {
    guard: candle_core::StorageRef<'a>,
    layout: &'a candle_core::Layout,
}

impl<'a> CpuInput<'a> {
    pub fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        Ok(Self { guard, layout })
    }

    /// The tensor's f32 elements in layout order (it must be contiguous).
    pub fn f32s(&self) -> Result<&[f32]> {
        self.elements::<f32>()
    }

    /// The tensor's elements of type `T` in layout order (it must be contiguous).
    pub fn elements<T: candle_core::WithDType>(&self) -> Result<&[T]> {
        let (start, end) = self
            .layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("CPU fast path given a non-contiguous tensor".into()))?;
        match &*self.guard {
            Storage::Cpu(s) => Ok(&s.as_slice::<T>()?[start..end]),
            _ => candle_core::bail!("CPU fast path given a tensor on another device"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::{merge_heads, split_heads, AttentionOptions};
    use candle_nn::{Module, VarBuilder};

    /// The blocked CPU attention against the reference path at SD's real head dims (SD 1.5's 40
    /// and 80 at 512²'s 4096 and 1024 tokens, SDXL's 64, the VAE's single 512-wide head), on the
    /// heads' views of `[b, seq, heads·d]` as the models pass them, with partial row blocks and
    /// the 77-token text context: within 1e-5 relative.
    #[test]
    fn blocked_attention_equals_the_reference_at_real_head_dims() -> Result<()> {
        let dev = Device::Cpu;
        for (b, heads, q_len, kv_len, d) in [
            (2, 8, 4096, 4096, 40),
            (2, 8, 4096, 77, 40),
            (2, 10, 1000, 333, 64),
            (2, 16, 1024, 1024, 80),
            (1, 1, 1100, 1100, 512),
        ] {
            let q = split_heads(&Tensor::randn(0f32, 1.0, (b, q_len, heads * d), &dev)?, heads)?;
            let k = split_heads(&Tensor::randn(0f32, 1.0, (b, kv_len, heads * d), &dev)?, heads)?;
            let v = split_heads(&Tensor::randn(0f32, 1.0, (b, kv_len, heads * d), &dev)?, heads)?;
            let scale = (d as f64).powf(-0.5);
            let fast = attention(&q, &k, &v, scale)?.expect("f32 on the CPU");
            let reference = crate::ops::attention::reference(&q, &k, &v, scale, None, AttentionOptions::FULL)?;
            assert_eq!(fast.dims(), reference.dims());
            assert_eq!(merge_heads(&fast)?.dims(), &[b, q_len, heads * d]);
            let diff = (&fast - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-5 * scale, "b{b} h{heads} {q_len}×{kv_len} d{d}: max diff {diff} (scale {scale})");
        }
        Ok(())
    }

    /// The f32 linear through our kernel against candle's at SD's widths (a UNet's 320→1280 over
    /// 4096 tokens, the 1280→320 back, a text context's 768→320 without bias) and odd ones:
    /// within 1e-5 of the largest output; below 16 rows it leaves the product to candle.
    #[test]
    fn f32_linear_equals_candles_at_sd_widths() -> Result<()> {
        if !crate::ops::bf16_gemm::supported() {
            return Ok(());
        }
        let dev = Device::Cpu;
        for (rows, k, n, with_bias) in
            [(4096, 320, 1280, true), (4096, 1280, 320, true), (77, 768, 320, false), (17, 5, 3, true)]
        {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev)?;
            let w = (Tensor::randn(0f32, 1.0, (n, k), &dev)? * (k as f64).powf(-0.5))?;
            let b = with_bias.then(|| Tensor::randn(0f32, 1.0, n, &dev)).transpose()?;
            let fast = linear(&x, &w, b.as_ref())?.expect("f32 on the CPU");
            let reference = candle_nn::Linear::new(w, b).forward(&x)?;
            assert_eq!(fast.dims(), reference.dims());
            let diff = (&fast - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-5 * scale, "{rows}×{k}→{n}: max diff {diff} (scale {scale})");
        }
        let few = Tensor::randn(0f32, 1.0, (2, 64), &dev)?;
        assert!(linear(&few, &Tensor::zeros((8, 64), DType::F32, &dev)?, None)?.is_none());
        Ok(())
    }

    /// The bf16 GroupNorm (normalised in f32, rounded once) against candle's on the same bf16
    /// values at SD 1.5's first level (with the time embedding added and SiLU, as the ResNets
    /// call it): within two bf16 steps of the largest value (2⁻⁶ of it). Both normalise in f32;
    /// candle rounds the normalised value, its product by γ and the sum with β to bf16 in turn
    /// (three roundings before SiLU's), ours only the result.
    #[test]
    fn bf16_group_norm_equals_candles() -> Result<()> {
        let dev = Device::Cpu;
        let (b, c) = (2usize, 320usize);
        let vb = VarBuilder::from_tensors(
            [
                ("weight".to_string(), (Tensor::randn(0f32, 0.5, c, &dev)? + 1.0)?),
                ("bias".to_string(), Tensor::randn(0f32, 0.1, c, &dev)?),
            ]
            .into_iter()
            .collect(),
            DType::BF16,
            &dev,
        );
        let norm = GroupNorm::new(32, c, 1e-5, vb)?;
        let x = (Tensor::randn(0f32, 2.0, (b, c, 64, 64), &dev)? + 3.0)?.to_dtype(DType::BF16)?;
        let add = Tensor::randn(0f32, 1.0, (b, c), &dev)?.to_dtype(DType::BF16)?;
        let reference = norm.reference(&x, Some(&add), true)?.to_dtype(DType::F32)?;
        let fast = group_norm(&norm, &x, Some(&add), true)?.expect("bf16 on the CPU");
        assert_eq!(fast.dtype(), DType::BF16);
        let diff = (fast.to_dtype(DType::F32)? - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= scale / 64.0, "max diff {diff} (scale {scale})");
        Ok(())
    }

    /// The softmax's exponential against the C library's over its whole useful range (and the
    /// vectorised numerators against it): within 2.5 f32 ulp (3e-7 relative), 0 for nothing
    /// below f32's normal range.
    #[test]
    fn the_vectorised_exp_is_within_3e7_of_libm() {
        let xs: Vec<f32> = (0..200_001).map(|i| -87.0 + 87.0 * i as f32 / 200_000.0).collect();
        // SiLU's positive arguments too (the numerators below see only the softmax's).
        for x in xs.iter().copied().chain((0..100_001).map(|i| 88.0 * i as f32 / 100_000.0)) {
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 3e-7 * want, "exp({x}) = {got}, libm {want}");
        }
        assert_eq!(exp(89.0), f32::INFINITY);
        let mut row: Vec<f32> = xs.iter().map(|x| x / 0.5).collect();
        let sum = scaled_exp(&mut row, 0.5);
        let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        for ((got, want), x) in row.iter().zip(&want).zip(&xs) {
            assert!((got - want).abs() <= 3e-7 * want, "numerator at {x}: {got} vs {want}");
        }
        let want_sum: f64 = want.iter().map(|&w| w as f64).sum();
        assert!((sum as f64 - want_sum).abs() <= 1e-5 * want_sum, "{sum} vs {want_sum}");
    }

    /// The fused CPU GroupNorm against candle's at SD's real channel counts and sizes (SD 1.5's
    /// UNet at 512², its VAE decoder's widest map at 256², SDXL's 640-channel level, and a 7×9
    /// map whose rows end in a partial 16-lane vector), with and without the added term and SiLU: within 1e-5 relative (f32; the statistics are summed in
    /// f64 here, in f32 there).
    #[test]
    fn fused_group_norm_equals_candles_at_real_shapes() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, add, silu) in [
            ([2usize, 320, 64, 64], true, true),
            ([1, 128, 256, 256], false, true),
            ([2, 640, 32, 32], false, false),
            ([1, 64, 7, 9], true, true),
        ] {
            let c = shape[1];
            let vb = VarBuilder::from_tensors(
                [
                    ("weight".to_string(), (Tensor::randn(0f32, 0.5, c, &dev)? + 1.0)?),
                    ("bias".to_string(), Tensor::randn(0f32, 0.1, c, &dev)?),
                ]
                .into_iter()
                .collect(),
                DType::F32,
                &dev,
            );
            let norm = GroupNorm::new(32, c, 1e-5, vb)?;
            let x = (Tensor::randn(0f32, 2.0, &shape, &dev)? + 3.0)?;
            let a = if add { Some(Tensor::randn(0f32, 1.0, (shape[0], c), &dev)?) } else { None };
            let reference = norm.reference(&x, a.as_ref(), silu)?;
            let fast = group_norm(&norm, &x, a.as_ref(), silu)?.expect("f32 on the CPU");
            let diff = (&fast - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-5 * scale, "{shape:?}: max diff {diff} (scale {scale})");
        }
        Ok(())
    }
}
