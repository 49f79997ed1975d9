//! bf16 on the CPU through the processor's bf16 dot products ([`bf16_gemm`]): linears,
//! convolutions and attention read their bf16 operands as they are (no f32 copies of weights or
//! activations), multiply-add in f32 and round each result to bf16 once, as PyTorch's oneDNN
//! paths do. Each returns `None` where it does not apply (another dtype or device, a processor
//! without AVX512-BF16, an odd reduction length): the caller then computes in f32.

use candle_core::{DType, Device, Result, Storage, Tensor};
use half::bf16;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use rayon::prelude::*;

use super::bf16_gemm::{self, Bias, Lhs, PanelWriter, Rhs};
use super::cpu::{bias_values, ConvGeometry, CpuInput, CONV_BAND_BYTES};
use super::direct_conv;

/// Whether every tensor is bf16 on the CPU and the processor multiplies bf16 itself.
fn applies(tensors: &[&Tensor]) -> bool {
    bf16_gemm::supported() && tensors.iter().all(|t| t.dtype() == DType::BF16 && t.device().is_cpu())
}

/// A contiguous bf16 tensor's elements as their bits.
fn bits<'a>(input: &'a CpuInput<'a>) -> Result<&'a [u16]> {
    Ok(input.elements::<bf16>()?.reinterpret_cast())
}

/// `x·Wᵀ + b` for bf16 `x: [.., in]`, `weight: [out, in]`, `bias: [out]`: the weight interleaved
/// into the product's panels once per call, the product on all cores, the bias added and each result
/// rounded as its block of sums is finished.
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (n, k) = weight.dims2()?;
    if !applies(&[x, weight])
        || bias.is_some_and(|b| !applies(&[b]))
        || k % 2 == 1
        || x.dim(candle_core::D::Minus1)? != k
    {
        return Ok(None);
    }
    let m = x.elem_count() / k.max(1);
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let (x_in, w_in) = (CpuInput::new(&x)?, CpuInput::new(&weight)?);
    let w = bits(&w_in)?;
    let mut packed = vec![0u32; bf16_gemm::panels_len(n, k / 2)];
    bf16_gemm::pack_panels(n, k / 2, &mut packed, |j, p| w[j * k + 2 * p] as u32 | (w[j * k + 2 * p + 1] as u32) << 16);
    let bias = bias_values(bias)?;
    let bias = bias.as_deref().map_or(Bias::None, Bias::PerColumn);
    let mut out = vec![0u16; m * n];
    let (a, b) = (Lhs { data: bits(&x_in)?, ld: k }, Rhs::Panels { data: &packed, depth: k / 2 });
    bf16_gemm::gemm_to_bf16(m, n, k / 2, a, b, &mut out, n, bias, true);
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("x has the in dimension") = n;
    Ok(Some(Tensor::from_vec(out.reinterpret_into::<bf16>(), shape, &Device::Cpu)?))
}

/// `conv2d(x, weight) + bias` for bf16 `x: [b, c, h, w]`, `weight: [o, c, kh, kw]`: 3×3 "same"
/// convolutions direct (`direct_conv`, channel pairs interleaved as they are buffered, an odd
/// last channel paired with zero); the others through the f32 convolution's bands (`cpu::conv2d_add`), each unfolded straight into the interleaved layout the
/// bf16 product reads (`[c·kh·kw / 2, pixels]`: column rows `2p` and `2p + 1` side by side) and
/// multiplied by the weight as it lies (`[o, c·kh·kw]`), the bias added and each output rounded
/// to bf16 once, straight into the bf16 output. `None` when `c·kh·kw` is odd there.
///
/// Plus the bf16 `residual` (the output's shape), added as the direct convolution
/// writes each output row: the rounded output plus the residual, rounded again, as PyTorch adds
/// two bf16 tensors. With a residual, `None` where the direct convolution does not apply.
pub(crate) fn conv2d_add(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if !applies(&[x, weight]) || bias.is_some_and(|b| !applies(&[b])) || residual.is_some_and(|r| !applies(&[r])) {
        return Ok(None);
    }
    let Some((b, o, geometry)) = ConvGeometry::of(x, weight, padding, stride)? else {
        return Ok(None);
    };
    let (c, h, w) = (geometry.c, geometry.h, geometry.w);
    let k = c * geometry.kh * geometry.kw;
    let direct = direct_conv::applies(&geometry, geometry.wo);
    if (k % 2 == 1 && !direct) || residual.is_some_and(|r| !direct || r.dims() != [b, o, h, w]) {
        return Ok(None);
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let (x_in, w_in) = (CpuInput::new(&x)?, CpuInput::new(&weight)?);
    let (xs, ws) = (bits(&x_in)?, bits(&w_in)?);
    let pixels = geometry.ho * geometry.wo;
    let bias = bias_values(bias)?;
    if direct {
        let residual = residual.map(Tensor::contiguous).transpose()?;
        let r_in = residual.as_ref().map(CpuInput::new).transpose()?;
        let r_bits = r_in.as_ref().map(|r| bits(r)).transpose()?;
        let mut out = vec![0u16; b * o * pixels];
        let shape = direct_conv::Shape { b, c, h, w, o };
        direct_conv::conv3x3_bf16(shape, xs, ws, bias.as_deref(), r_bits, &mut out);
        return Ok(Some(Tensor::from_vec(out.reinterpret_into::<bf16>(), (b, o, h, w), &Device::Cpu)?));
    }
    let bias = bias.as_deref().map_or(Bias::None, Bias::PerRow);
    let mut out = vec![0u16; b * o * pixels];
    let band_rows = (CONV_BAND_BYTES / (2 * k * geometry.wo).max(1)).clamp(1, geometry.ho.max(1));
    let pairs = k / 2;
    let mut column = vec![0u32; bf16_gemm::panels_len(band_rows * geometry.wo, pairs)];
    for (xi, yi) in xs.chunks(c * h * w).zip(out.chunks_mut(o * pixels)) {
        for r0 in (0..geometry.ho).step_by(band_rows) {
            let rows = band_rows.min(geometry.ho - r0);
            let n = rows * geometry.wo;
            let panels = PanelWriter::new(&mut column, n, pairs);
            (0..pairs).into_par_iter().for_each_init(
                || (vec![0u16; n], vec![0u16; n], vec![0u32; n]),
                |(lo, hi, row), p| {
                    geometry.unfold(xi, 2 * p, r0, rows, lo);
                    geometry.unfold(xi, 2 * p + 1, r0, rows, hi);
                    row.iter_mut()
                        .zip(lo.iter().zip(hi.iter()))
                        .for_each(|(d, (&l, &h))| *d = l as u32 | (h as u32) << 16);
                    // SAFETY: each pair's row is written by this task alone, and the column is
                    // read only after every task has finished.
                    unsafe { panels.write_row(p, row) };
                },
            );
            let (a, bm) = (Lhs { data: ws, ld: k }, Rhs::Panels { data: &column, depth: pairs });
            bf16_gemm::gemm_to_bf16(o, n, k / 2, a, bm, &mut yi[r0 * geometry.wo..], pixels, bias, true);
        }
    }
    Ok(Some(Tensor::from_vec(out.reinterpret_into::<bf16>(), (b, o, geometry.ho, geometry.wo), &Device::Cpu)?))
}

/// Query rows per task of [`attention`] (as the f32 attention's, `cpu.rs`).
const ATTENTION_ROWS: usize = 64;

/// `softmax(q·kᵀ·scale)·v` for bf16 `q: [b, heads, q_len, d]`, `k`, `v: [b, heads, kv_len, d]` on
/// the CPU in any layout whose last axis is contiguous, as PyTorch's CPU flash attention computes
/// it in bf16: scores `q·kᵀ` in f32, the softmax in f32, the probabilities rounded to bf16 and
/// multiplied by `v` with f32 sums, the result rounded once. The keys (`[d/2, kv_len]` per head)
/// and values (`[kv_len/2, d]`) are interleaved once per call; then one task per (batch, head,
/// 64 query rows) on all cores, its scores in cache. Returns `[b, heads, q_len, d]` as a view of
/// a `[b, q_len, heads, d]` buffer, like the f32 path. `None` for an odd head dim.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let last_contiguous = |t: &Tensor| t.stride()[3] == 1;
    if !(applies(&[q, k, v]) && last_contiguous(q) && last_contiguous(k) && last_contiguous(v)) {
        return Ok(None);
    }
    let (b, heads, q_len, d) = q.dims4()?;
    let kv_len = k.dim(2)?;
    if kv_len == 0 || q_len == 0 || d % 2 == 1 {
        return Ok(None);
    }
    let (qg, ql) = q.storage_and_layout();
    let (kg, kl) = k.storage_and_layout();
    let (vg, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qg, &*kg, &*vg) else {
        return Ok(None);
    };
    let (qd, kd, vd): (&[u16], &[u16], &[u16]) = (
        qs.as_slice::<bf16>()?.reinterpret_cast(),
        ks.as_slice::<bf16>()?.reinterpret_cast(),
        vs.as_slice::<bf16>()?.reinterpret_cast(),
    );
    let (qst, kst, vst) = (ql.stride(), kl.stride(), vl.stride());
    let (qo, ko, vo) = (ql.start_offset(), kl.start_offset(), vl.start_offset());
    let (pairs, kv_pairs) = (d / 2, kv_len.div_ceil(2));
    // Per head: keys as the right operand of q·kᵀ, values as that of p·v.
    let (key_words, value_words) = (pairs * kv_len, kv_pairs * d);
    let mut keys = vec![0u32; b * heads * key_words];
    let mut values = vec![0u32; b * heads * value_words];
    keys.par_chunks_mut(key_words).zip(values.par_chunks_mut(value_words)).enumerate().for_each(
        |(bh, (kdst, vdst))| {
            let (bi, h) = (bh / heads, bh % heads);
            let k_at = ko + bi * kst[0] + h * kst[1];
            let v_at = vo + bi * vst[0] + h * vst[1];
            bf16_gemm::interleave_cols(&kd[k_at..], kv_len, pairs, kst[2], kdst, kv_len);
            bf16_gemm::interleave_rows(&vd[v_at..], kv_len, d, vst[2], vdst);
        },
    );
    let row_blocks = q_len.div_ceil(ATTENTION_ROWS);
    let mut out = vec![bf16::ZERO; b * q_len * heads * d];
    let out_at = out.as_mut_ptr() as usize;
    let scale = scale as f32;
    let probs_ld = 2 * kv_pairs;
    (0..b * heads * row_blocks).into_par_iter().for_each_init(
        || (vec![0f32; ATTENTION_ROWS * kv_len], vec![0u16; ATTENTION_ROWS * probs_ld], vec![0f32; ATTENTION_ROWS * d]),
        |(scores, probs, acc), task| {
            let (bh, block) = (task / row_blocks, task % row_blocks);
            let (bi, h) = (bh / heads, bh % heads);
            let r0 = block * ATTENTION_ROWS;
            let rows = ATTENTION_ROWS.min(q_len - r0);
            let q_rows = Lhs { data: &qd[qo + bi * qst[0] + h * qst[1] + r0 * qst[2]..], ld: qst[2] };
            let key_rhs = Rhs::Rows { data: &keys[bh * key_words..(bh + 1) * key_words], ld: kv_len };
            bf16_gemm::gemm(rows, kv_len, pairs, q_rows, key_rhs, scores, kv_len, false, false);
            for (row, p) in scores.chunks_mut(kv_len).zip(probs.chunks_mut(probs_ld)).take(rows) {
                softmax_to_bf16(row, scale, p);
            }
            let p_rows = Lhs { data: probs, ld: probs_ld };
            let value_rhs = Rhs::Rows { data: &values[bh * value_words..(bh + 1) * value_words], ld: d };
            bf16_gemm::gemm(rows, d, kv_pairs, p_rows, value_rhs, acc, d, false, false);
            for (r, row) in acc.chunks(d).take(rows).enumerate() {
                let at = (bi * q_len + r0 + r) * heads * d + h * d;
                // SAFETY: `at..at + d` lies inside `out` (its shape is `[b, q_len, heads, d]`);
                // each task writes only its own rows of its own head, so no two tasks write one
                // element, and `out` outlives the parallel loop.
                let dst = unsafe { std::slice::from_raw_parts_mut((out_at as *mut u16).add(at), d) };
                bf16_gemm::to_bf16_scaled(row, 1.0, dst);
            }
        },
    );
    drop((qg, kg, vg));
    Ok(Some(Tensor::from_vec(out, (b, q_len, heads, d), &Device::Cpu)?.transpose(1, 2)?))
}

/// `softmax(scale · scores)` in f32 (the exponentials left in `scores`), rounded to bf16 into
/// `probs` (zeros past `scores.len()`: the pad that makes the value rows an even count).
fn softmax_to_bf16(scores: &mut [f32], scale: f32, probs: &mut [u16]) {
    let inv = 1.0 / super::cpu::scaled_exp(scores, scale);
    bf16_gemm::to_bf16_scaled(scores, inv, probs);
    probs[scores.len()..].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::{merge_heads, split_heads, AttentionOptions};

    /// The tolerance, relative to the largest value: 2⁻⁸, one bf16 step at the top of a binade
    /// (bf16 keeps 8 significant bits: a value rounded to it moves by up to 2⁻⁹ of itself).
    const BF16_EPS: f32 = 1.0 / 256.0;

    /// Normal bf16 values of `shape` (std `std`).
    fn randn(shape: &[usize], std: f32) -> Result<Tensor> {
        Tensor::randn(0f32, std, shape, &Device::Cpu)?.to_dtype(DType::BF16)
    }

    fn f32(t: &Tensor) -> Result<Tensor> {
        t.to_dtype(DType::F32)
    }

    /// `max|fast − reference|` and `max|reference|`, in f32.
    fn diff_and_scale(fast: &Tensor, reference: &Tensor) -> Result<(f32, f32)> {
        assert_eq!(fast.dims(), reference.dims());
        let diff = (f32(fast)? - f32(reference)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok((diff, f32(reference)?.abs()?.max_all()?.to_scalar::<f32>()?))
    }

    /// The bf16 linear against the same product in f32 (the bf16 inputs made f32: the products
    /// are then exact on both sides, so they differ by the sums' order and the final rounding) at
    /// SD 1.5's widths (320 → 1280 over the 4096 tokens of two 64×64 maps, 1280 → 320, the 768-wide
    /// text context): within 2⁻⁸ of the largest value. A wrong pairing or layout of the operands
    /// is off by the size of the values.
    #[test]
    fn bf16_linear_equals_f32_at_sd_widths() -> Result<()> {
        if !bf16_gemm::supported() {
            return Ok(());
        }
        for (tokens, k, n, bias) in [(2 * 4096, 320, 1280, true), (4096, 1280, 320, false), (2 * 77, 768, 320, true)] {
            let x = randn(&[tokens / 2, 2, k], 1.0)?.transpose(0, 1)?;
            let weight = randn(&[n, k], (k as f32).powf(-0.5))?;
            let bias = if bias { Some(randn(&[n], 1.0)?) } else { None };
            let fast = linear(&x, &weight, bias.as_ref())?.expect("bf16 on a CPU with AVX512-BF16");
            let reference = candle_nn::Linear::new(f32(&weight)?, bias.as_ref().map(f32).transpose()?);
            let reference = candle_core::Module::forward(&reference, &f32(&x)?)?;
            let (diff, scale) = diff_and_scale(&fast, &reference)?;
            assert!(diff <= BF16_EPS * scale, "{tokens}×{k} → {n}: max diff {diff} (scale {scale})");
        }
        Ok(())
    }

    /// The bf16 convolution against the f32 one on the same bf16 values, at SD's channel counts:
    /// the UNet's 320 → 320 3×3 at 64×64 (two images), its 640 → 640 stride-2 downsampler, a
    /// 1×1 projection, the VAE decoder's 512 → 512 at 64×64 (several bands) and the UNet's
    /// 4-channel input; within 2⁻⁸ of the largest value. An odd column length (3 channels, 1×1)
    /// is left to the f32 path.
    #[test]
    fn bf16_convolution_equals_f32_at_sd_channel_counts() -> Result<()> {
        if !bf16_gemm::supported() {
            return Ok(());
        }
        for (b, c, o, size, k, padding, stride) in [
            (2, 320, 320, 64, 3, 1, 1),
            (1, 640, 640, 32, 3, 1, 2),
            (2, 640, 320, 32, 1, 0, 1),
            (1, 512, 512, 64, 3, 1, 1),
            (1, 4, 320, 64, 3, 1, 1),
        ] {
            let x = randn(&[b, c, size, size], 1.0)?;
            let weight = randn(&[o, c, k, k], ((c * k * k) as f32).powf(-0.5))?;
            let bias = randn(&[o], 1.0)?;
            let fast =
                conv2d_add(&x, &weight, Some(&bias), padding, stride, None)?.expect("bf16 on a CPU with AVX512-BF16");
            let reference =
                super::super::cpu::conv2d_add(&f32(&x)?, &f32(&weight)?, Some(&f32(&bias)?), padding, stride, None)?
                    .expect("f32 on the CPU");
            let (diff, scale) = diff_and_scale(&fast, &reference)?;
            assert!(diff <= BF16_EPS * scale, "{c} → {o} {k}×{k}/{stride} at {size}²: max diff {diff} (scale {scale})");
        }
        let odd = conv2d_add(&randn(&[1, 3, 8, 8], 1.0)?, &randn(&[4, 3, 1, 1], 1.0)?, None, 0, 1, None)?;
        assert!(odd.is_none(), "an odd column length has no bf16 pairs");
        Ok(())
    }

    /// The bf16 attention against the f32 reference on the same bf16 values, at SD's head dims
    /// (SD 1.5's 8 × 40 over 4096 tokens and against the 77-token context — an odd key count —,
    /// 8 × 80 at 1024, SDXL's 64, the VAE's one 512-wide head), on the heads' views of
    /// `[b, seq, heads·d]`. The probabilities are rounded to bf16 before they multiply `v` (as
    /// PyTorch does), each within 2⁻⁹ of itself, so the output is within 2⁻⁹ · max|v| of the f32
    /// one before its own rounding: the bound is 2⁻⁸ · max|v|.
    #[test]
    fn bf16_attention_equals_f32_at_sd_head_dims() -> Result<()> {
        if !bf16_gemm::supported() {
            return Ok(());
        }
        for (b, heads, q_len, kv_len, d) in [
            (2, 8, 4096, 4096, 40),
            (2, 8, 4096, 77, 40),
            (2, 8, 1024, 1024, 80),
            (1, 10, 1000, 333, 64),
            (1, 1, 1100, 1100, 512),
        ] {
            let q = split_heads(&randn(&[b, q_len, heads * d], 1.0)?, heads)?;
            let k = split_heads(&randn(&[b, kv_len, heads * d], 1.0)?, heads)?;
            let v = split_heads(&randn(&[b, kv_len, heads * d], 1.0)?, heads)?;
            let scale = (d as f64).powf(-0.5);
            let fast = attention(&q, &k, &v, scale)?.expect("bf16 on a CPU with AVX512-BF16");
            assert_eq!(merge_heads(&fast)?.dims(), &[b, q_len, heads * d]);
            let reference =
                crate::ops::attention::reference(&f32(&q)?, &f32(&k)?, &f32(&v)?, scale, None, AttentionOptions::FULL)?;
            let (diff, _) = diff_and_scale(&fast, &reference)?;
            let v_max = f32(&v)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= BF16_EPS * v_max, "b{b} h{heads} {q_len}×{kv_len} d{d}: max diff {diff} (max |v| {v_max})");
        }
        Ok(())
    }
}
