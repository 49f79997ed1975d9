//! The one scaled-dot-product attention of the crate.
//!
//! Every model routes its attention through [`attention_with`] (or its unsliced shorthand
//! [`attention`]), so a fused or flash kernel can be substituted here for all families at once.
//!
//! Memory: the f32 score matrix `[b, heads, q_len, kv_len]` is by far the largest tensor of an
//! attention call (SD 1.5 at 512×512 with CFG: 2·8·4096·4096·4 B = 1 GiB; the VAE's single-head
//! mid-block attention at 2048×2048: 65536²·4 B = 16 GiB). [`AttentionOptions::slice`] bounds it
//! by processing the query rows in chunks. Unlike candle-transformers 0.11.1's sliced attention
//! (which slices the batch·heads axis and returns wrong results), the chunks here are exact: each
//! query row's softmax only ever sees its own row, so a chunk computes exactly the rows it would
//! compute unsliced.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::norm::RmsNorm;
use candle_core::{DType, Device, Result, Tensor, D};

/// How [`attention_with`] bounds the memory of its score matrix; chosen at run time per model
/// (see the models' `set_attention_options`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttentionOptions {
    /// At most this many query rows (of every batch entry and head at once) are scored at a time;
    /// `None` scores all of them together. `Some(0)` is rejected when attention runs. The score
    /// bytes held per chunk are [`attention_scores_bytes`].
    pub slice: Option<usize>,
}

impl AttentionOptions {
    /// Unsliced attention.
    pub const FULL: Self = Self { slice: None };

    /// Attention over chunks of `rows` query rows.
    pub fn sliced(rows: usize) -> Self {
        Self { slice: Some(rows) }
    }
}

/// An [`AttentionOptions`] that can be changed through a shared reference, held by each
/// attention layer, so a built model (even one behind an `Arc`) is re-configured between calls
/// without reloading. Reads and writes are relaxed atomics: a change takes effect from the next
/// forward call, and a concurrent forward sees either the old or the new setting.
#[derive(Debug, Default)]
pub struct AttentionOptionsCell {
    /// `0` is `slice: None`; `n + 1` is `slice: Some(n)` (saturating; `usize::MAX` rows is
    /// unsliced in effect anyway).
    slice: AtomicUsize,
}

impl AttentionOptionsCell {
    /// The current options.
    pub fn get(&self) -> AttentionOptions {
        match self.slice.load(Ordering::Relaxed) {
            0 => AttentionOptions { slice: None },
            n => AttentionOptions { slice: Some(n - 1) },
        }
    }

    /// Replaces the options.
    pub fn set(&self, options: AttentionOptions) {
        let encoded = options.slice.map_or(0, |n| n.saturating_add(1));
        self.slice.store(encoded, Ordering::Relaxed);
    }
}

/// Bytes of the f32 score matrix that [`attention_with`] holds at once for `q: [b, heads, q_len,
/// d]` against `kv_len` keys, with `slice` query rows per chunk (`None`: all `q_len`).
///
/// Within each chunk the softmax reads the scores and writes its f32 output while they are alive,
/// so the transient peak of one call is about **twice** this (plus, for f16/bf16 inputs, a
/// half-width copy of the probabilities), on top of q/k/v and the `[b, heads, q_len, d]` output.
pub fn attention_scores_bytes(b: usize, heads: usize, q_len: usize, kv_len: usize, slice: Option<usize>) -> u64 {
    let rows = slice.map_or(q_len, |s| s.clamp(1, q_len.max(1))).min(q_len);
    (b as u64) * (heads as u64) * (rows as u64) * (kv_len as u64) * 4
}

/// Unsliced [`attention_with`], for attentions whose score matrix is always small (CLIP's 77
/// tokens: 0.6 MB for SD 1.5 with CFG).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    attention_with(q, k, v, scale, mask, AttentionOptions::FULL)
}

/// The most score elements one attention call materialises on the CPU
/// ([`sdgen_memory::limits::MAX_SCORE_ELEMENTS_CPU`]: defined beside the planner that models it).
pub const MAX_SCORE_ELEMENTS: usize = sdgen_memory::limits::MAX_SCORE_ELEMENTS_CPU;

/// The same on a CUDA device ([`sdgen_memory::limits::MAX_SCORE_ELEMENTS_GPU`], which says why
/// it is smaller); the fast path holds the scores in the input's dtype, one batch entry at a time.
pub const MAX_SCORE_ELEMENTS_CUDA: usize = sdgen_memory::limits::MAX_SCORE_ELEMENTS_GPU;

/// The most score elements one attention call materialises on `device` (GPUs: the CUDA bound,
/// which the planner assumes for every GPU, Metal included).
pub fn max_score_elements(device: &Device) -> usize {
    if device.is_cpu() {
        MAX_SCORE_ELEMENTS
    } else {
        MAX_SCORE_ELEMENTS_CUDA
    }
}

/// `softmax(q·kᵀ·scale + mask)·v` for `q: [b, heads, q_len, d]`, `k`, `v: [b, heads, kv_len, d]`.
///
/// The softmax runs in f32 whatever the inputs' dtype (as PyTorch's SDPA accumulates in f32), and
/// the result is returned in the dtype of `q`. `mask`, when given, is added to the scores and must
/// broadcast to `[b, heads, q_len, kv_len]`. With `options.slice = Some(n)` the query rows are
/// processed `n` at a time; the result equals the unsliced one up to float rounding (the matmul
/// kernels may block a smaller problem differently).
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    options: AttentionOptions,
) -> Result<Tensor> {
    if options.slice == Some(0) {
        candle_core::bail!("attention slice of 0 query rows: use None for unsliced attention");
    }
    if super::cpu_bf16(q) {
        if mask.is_none() && super::fast_cpu(q.device()) {
            if let Some(out) = super::cpu_bf16::attention(q, k, v, scale)? {
                return Ok(out);
            }
        }
        // No CPU bf16 matmul in candle: attend in f32 (scores are f32 anyway), round once.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let mask = mask.map(f32).transpose()?;
        return attention_with(&f32(q)?, &f32(k)?, &f32(v)?, scale, mask.as_ref(), options)?.to_dtype(DType::BF16);
    }
    if mask.is_none() && super::fast_cpu(q.device()) {
        // One cache-sized block of query rows per task: no score matrix to bound.
        if let Some(out) = super::cpu::attention(q, k, v, scale)? {
            return Ok(out);
        }
    }
    #[cfg(feature = "cuda")]
    if mask.is_none() && super::fast_cuda(q.device()) {
        // Flash attention holds no scores at all, so slicing has nothing to bound.
        if let Some(out) = super::cuda::flash_attention(q, k, v, scale)? {
            return Ok(out);
        }
        let (_, heads, q_len, _) = q.dims4()?;
        let kv_len = k.dim(2)?;
        let max_rows = (max_score_elements(q.device()) / (heads * kv_len).max(1)).max(1);
        let rows = options.slice.map_or(max_rows, |n| n.min(max_rows)).min(q_len.max(1));
        return super::cuda::attention(q, k, v, scale, rows);
    }
    reference(q, k, v, scale, mask, options)
}

/// The heads of several token sequences, packed for one joint attention: each `x: [b, rows,
/// heads · d]` split into heads, RMS-normalised per head when it has a norm (SD 3.5's QK-norm),
/// and the sequences concatenated along the tokens: `[b, Σ rows, heads, d]` (transpose 1 and 2
/// for [`attention_with`]). One kernel per sequence on CUDA instead of a norm's four passes and
/// a concatenation's copy.
pub fn pack_heads(parts: &[(&Tensor, Option<&RmsNorm>)], heads: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if parts.first().is_some_and(|(x, _)| super::fast_cuda(x.device())) && !(parts.len() == 1 && parts[0].1.is_none()) {
        let sources: Vec<_> =
            parts.iter().map(|(x, norm)| super::cuda::HeadsSource { x, norm: norm.map(|n| n.parts()) }).collect();
        if let Some(packed) = super::cuda::pack_heads(&sources, heads)? {
            return Ok(packed);
        }
    }
    let split = parts
        .iter()
        .map(|(x, norm)| {
            let (b, n, _) = x.dims3()?;
            let x = x.reshape((b, n, heads, ()))?;
            norm.map_or(Ok(x.clone()), |norm| norm.forward(&x))
        })
        .collect::<Result<Vec<_>>>()?;
    match split.as_slice() {
        [one] => Ok(one.clone()),
        many => Tensor::cat(many, 1),
    }
}

/// The reference path of [`attention_with`] on every device: matmul, f32 softmax, matmul, the
/// query rows in chunks under the device's score limit.
pub(crate) fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    options: AttentionOptions,
) -> Result<Tensor> {
    let (b, heads, q_len, _) = q.dims4()?;
    let kv_len = k.dim(2)?;
    let kt = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    // candle's CUDA kernels index elements with 32-bit integers: a score tensor of 2^31 elements
    // or more (SD 1.5 at 768² with 4 images: 8 × 8 × 9216² = 5.4 G) never finishes; and on CUDA
    // large score buffers fragment the memory pool (see `MAX_SCORE_ELEMENTS_CUDA`). Such calls
    // are sliced whatever was asked, in chunks of equal size (so freed buffers fit the next).
    let max_rows = ((max_score_elements(q.device()) / (b * heads * kv_len).max(1)).max(1)).min(q_len.max(1));
    let rows = match options.slice {
        Some(0) => candle_core::bail!("attention slice of 0 query rows: use None for unsliced attention"),
        Some(n) if n < q_len => {
            let rows = n.min(max_rows);
            q_len.div_ceil(q_len.div_ceil(rows))
        }
        _ if max_rows < q_len => q_len.div_ceil(q_len.div_ceil(max_rows)),
        _ => return attention_rows(&q.contiguous()?, &kt, &v, scale, mask),
    };
    let mut chunks = Vec::with_capacity(q_len.div_ceil(rows));
    for start in (0..q_len).step_by(rows) {
        let len = rows.min(q_len - start);
        let q_chunk = q.narrow(2, start, len)?.contiguous()?;
        let mask_chunk = match mask {
            Some(m) => Some(mask_rows(m, q_len, start, len)?),
            None => None,
        };
        chunks.push(attention_rows(&q_chunk, &kt, &v, scale, mask_chunk.as_ref())?);
    }
    Tensor::cat(&chunks, 2)
}

/// The attention of some query rows against all keys (`kt` already transposed, all contiguous).
///
/// Written as separate statements so each intermediate is dropped as soon as the next exists:
/// the peak is two f32 score-sized tensors (the softmax's input and output), not all five.
fn attention_rows(q: &Tensor, kt: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let dtype = q.dtype();
    // Scaling after the matmul, in the input dtype, as the parity tests were established with.
    let mut scores = {
        let raw = (q.matmul(kt)? * scale)?;
        raw.to_dtype(DType::F32)?
    };
    if let Some(m) = mask {
        scores = scores.broadcast_add(&m.to_dtype(DType::F32)?)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    drop(scores);
    let probs = probs.to_dtype(dtype)?;
    probs.matmul(v)
}

/// The rows `start..start + len` of a mask that broadcasts to `[.., q_len, kv_len]`: narrowed when
/// it has a query axis of its own, left to broadcast when that axis is 1 or absent.
fn mask_rows(mask: &Tensor, q_len: usize, start: usize, len: usize) -> Result<Tensor> {
    let rank = mask.rank();
    if rank >= 2 && mask.dim(rank - 2)? == q_len && q_len != 1 {
        mask.narrow(rank - 2, start, len)
    } else {
        Ok(mask.clone())
    }
}

/// Splits `[b, seq, heads·d]` into `[b, heads, seq, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, seq, dim) = x.dims3()?;
    x.reshape((b, seq, heads, dim / heads))?.transpose(1, 2)
}

/// Merges `[b, heads, seq, d]` back into `[b, seq, heads·d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, seq, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, seq, heads * d))
}

/// A causal mask `[seq, seq]` of zeros on and below the diagonal and −∞ above it.
pub fn causal_mask(seq: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..seq).flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (seq, seq), device)
}

/// The last dimension's size, for assertions in callers.
pub fn last_dim(x: &Tensor) -> Result<usize> {
    x.dim(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn uniform_scores_average_values() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 1, 2, 4), DType::F32, &dev)?;
        let k = Tensor::zeros((1, 1, 3, 4), DType::F32, &dev)?;
        let v = Tensor::arange(0f32, 12., &dev)?.reshape((1, 1, 3, 4))?;
        let out = attention(&q, &k, &v, 0.5, None)?;
        let row: Vec<f32> = out.get(0)?.get(0)?.get(0)?.to_vec1()?;
        // Not bit-exact: the weights are 0.33333334, and gemm's accumulation order varies with
        // the CPU (7.0000005 on an AVX-512 machine).
        for (got, want) in row.iter().zip([4.0f32, 5.0, 6.0, 7.0]) {
            assert!((got - want).abs() <= 1e-6 * want, "{row:?}");
        }
        Ok(())
    }

    #[test]
    fn causal_mask_hides_the_future() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::ones((1, 1, 2, 1), DType::F32, &dev)?;
        let k = Tensor::ones((1, 1, 2, 1), DType::F32, &dev)?;
        let v = Tensor::new(&[[[[1f32], [3.]]]], &dev)?;
        let mask = causal_mask(2, &dev)?;
        let out: Vec<f32> = attention(&q, &k, &v, 1.0, Some(&mask))?.flatten_all()?.to_vec1()?;
        assert_eq!(out, vec![1.0, 2.0]);
        Ok(())
    }

    /// Deterministic values in [−2, 2) from a 64-bit LCG (candle's CPU RNG cannot be seeded).
    fn lcg_tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    /// `max|a − b| / max|b|`.
    fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / scale)
    }

    #[test]
    fn slicing_equals_unsliced_attention() -> Result<()> {
        // q_len 37 is prime, so every slice below but 37 and 64 leaves a partial last chunk.
        let (b, heads, q_len, kv_len, d) = (2, 3, 37, 29, 8);
        let q = lcg_tensor(&[b, heads, q_len, d], 1)?;
        let k = lcg_tensor(&[b, heads, kv_len, d], 2)?;
        let v = lcg_tensor(&[b, heads, kv_len, d], 3)?;
        let full = attention(&q, &k, &v, 0.35, None)?;
        for slice in [1, 2, 5, 7, 16, 36, 37, 64] {
            let sliced = attention_with(&q, &k, &v, 0.35, None, AttentionOptions::sliced(slice))?;
            assert_eq!(sliced.dims(), full.dims());
            let rel = rel_diff(&sliced, &full)?;
            assert!(rel <= 1e-6, "slice {slice}: max rel diff {rel:e}");
        }
        Ok(())
    }

    #[test]
    fn slicing_narrows_a_per_row_mask() -> Result<()> {
        let seq = 13;
        let q = lcg_tensor(&[1, 2, seq, 4], 4)?;
        let k = lcg_tensor(&[1, 2, seq, 4], 5)?;
        let v = lcg_tensor(&[1, 2, seq, 4], 6)?;
        let mask = causal_mask(seq, &Device::Cpu)?;
        let full = attention(&q, &k, &v, 0.5, Some(&mask))?;
        for slice in [1, 4, 6, 12] {
            let sliced = attention_with(&q, &k, &v, 0.5, Some(&mask), AttentionOptions::sliced(slice))?;
            let rel = rel_diff(&sliced, &full)?;
            assert!(rel <= 1e-6, "slice {slice}: max rel diff {rel:e}");
        }
        Ok(())
    }

    #[test]
    fn zero_slice_is_an_error() -> Result<()> {
        let q = lcg_tensor(&[1, 1, 4, 2], 7)?;
        let err = attention_with(&q, &q, &q, 1.0, None, AttentionOptions::sliced(0)).unwrap_err();
        assert!(err.to_string().contains("slice of 0"), "{err}");
        Ok(())
    }

    #[test]
    fn cell_round_trips_options() {
        let cell = AttentionOptionsCell::default();
        assert_eq!(cell.get(), AttentionOptions::FULL);
        for opts in [AttentionOptions::sliced(0), AttentionOptions::sliced(4096), AttentionOptions::FULL] {
            cell.set(opts);
            assert_eq!(cell.get(), opts);
        }
        cell.set(AttentionOptions::sliced(usize::MAX));
        assert_eq!(cell.get(), AttentionOptions::sliced(usize::MAX - 1));
    }

    #[test]
    fn score_bytes_count_one_chunk() {
        // SD 1.5, 512×512, CFG batch: 1 GiB unsliced, a quarter with 1024-row chunks.
        assert_eq!(attention_scores_bytes(2, 8, 4096, 4096, None), 1 << 30);
        assert_eq!(attention_scores_bytes(2, 8, 4096, 4096, Some(1024)), 1 << 28);
        assert_eq!(attention_scores_bytes(2, 8, 4096, 4096, Some(10_000)), 1 << 30);
        assert_eq!(attention_scores_bytes(1, 1, 10, 7, Some(3)), 3 * 7 * 4);
    }
}
