//! CPU fast paths: whole operations in one pass over memory, on all cores, where candle's
//! reference path chains whole-tensor ops (GroupNorm: about a dozen passes with temporaries).

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use super::norm::GroupNorm;

/// GroupNorm of an f32 `x: [b, c, ...]` (`norm`'s groups, weights and epsilon), of `x + add`
/// (`add: [b, c]`, checked by the caller) when given, then SiLU when `silu`: per group, the mean
/// and variance in f64 (two passes over the group, which stays in cache), then one pass writing
/// `(v − mean)·rstd·γ + β`. `None` for other dtypes (the reference path runs them).
pub(crate) fn group_norm(norm: &GroupNorm, x: &Tensor, add: Option<&Tensor>, silu: bool) -> Result<Option<Tensor>> {
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
        // Mean, then the variance around it: two passes, f64 sums.
        let mut sum = 0f64;
        for ch in 0..cpg {
            let e = extra(ch);
            sum += x[ch * hw..(ch + 1) * hw].iter().map(|&v| (v + e) as f64).sum::<f64>();
        }
        let mean = sum / group_len as f64;
        let mut sq = 0f64;
        for ch in 0..cpg {
            let e = extra(ch);
            sq += x[ch * hw..(ch + 1) * hw].iter().map(|&v| ((v + e) as f64 - mean).powi(2)).sum::<f64>();
        }
        let rstd = 1.0 / (sq / group_len as f64 + eps).sqrt();
        for ch in 0..cpg {
            let e = extra(ch);
            let cc = g * cpg + ch;
            let (scale, shift) = ((rstd * gamma[cc] as f64) as f32, beta[cc]);
            let mean = mean as f32;
            for (o, &v) in y[ch * hw..(ch + 1) * hw].iter_mut().zip(&x[ch * hw..(ch + 1) * hw]) {
                let n = (v + e - mean) * scale + shift;
                *o = if silu { n / (1.0 + (-n).exp()) } else { n };
            }
        }
    });
    Ok(Some(Tensor::from_vec(out, dims, &Device::Cpu)?))
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
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && t.stride()[3] == 1;
    if !(f32_cpu(q) && f32_cpu(k) && f32_cpu(v)) {
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
    let row_blocks = q_len.div_ceil(ATTENTION_ROWS);
    // Output `[b, q_len, heads, d]`: a task writes rows `heads·d` apart, one head's `d` columns.
    let mut out = vec![0f32; b * q_len * heads * d];
    let out_ptr = out.as_mut_ptr() as usize;
    let scale = scale as f32;
    (0..b * heads * row_blocks).into_par_iter().for_each_init(
        || vec![0f32; ATTENTION_ROWS * kv_len],
        |scores, task| {
            let (bh, block) = (task / row_blocks, task % row_blocks);
            let (bi, h) = (bh / heads, bh % heads);
            let r0 = block * ATTENTION_ROWS;
            let rows = ATTENTION_ROWS.min(q_len - r0);
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
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
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

/// A contiguous CPU tensor's storage, read-locked while its elements are borrowed.
struct CpuInput<'a> {
    guard: candle_core::StorageRef<'a>,
    layout: &'a candle_core::Layout,
}

impl<'a> CpuInput<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        Ok(Self { guard, layout })
    }

    /// The tensor's f32 elements in layout order (it must be contiguous).
    fn f32s(&self) -> Result<&[f32]> {
        let (start, end) = self
            .layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("CPU fast path given a non-contiguous tensor".into()))?;
        match &*self.guard {
            Storage::Cpu(s) => Ok(&s.as_slice::<f32>()?[start..end]),
            _ => candle_core::bail!("CPU fast path given a tensor on another device"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::{merge_heads, split_heads, AttentionOptions};
    use candle_nn::VarBuilder;

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

    /// The fused CPU GroupNorm against candle's at SD's real channel counts and sizes (SD 1.5's
    /// UNet at 512², its VAE decoder's widest map at 256², SDXL's 640-channel level), with and
    /// without the added term and SiLU: within 1e-5 relative (f32; the statistics are summed in
    /// f64 here, in f32 there).
    #[test]
    fn fused_group_norm_equals_candles_at_real_shapes() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, add, silu) in
            [([2usize, 320, 64, 64], true, true), ([1, 128, 256, 256], false, true), ([2, 640, 32, 32], false, false)]
        {
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
