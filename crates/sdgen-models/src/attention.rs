//! The one scaled-dot-product attention of the crate.
//!
//! Every model routes its attention through [`attention`], so a fused or flash kernel can be
//! substituted here for all families at once.

use candle_core::{DType, Result, Tensor, D};

/// `softmax(q·kᵀ·scale + mask)·v` for `q: [b, heads, q_len, d]`, `k`, `v: [b, heads, kv_len, d]`.
///
/// The softmax runs in f32 whatever the inputs' dtype (as PyTorch's SDPA accumulates in f32), and
/// the result is returned in the dtype of `q`. `mask`, when given, is added to the scores and must
/// broadcast to `[b, heads, q_len, kv_len]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let dtype = q.dtype();
    let q = q.contiguous()?;
    let kt = k.t()?.contiguous()?;
    let scores = (q.matmul(&kt)? * scale)?;
    let scores = scores.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs.matmul(&v.contiguous()?)
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
        assert_eq!(row, vec![4.0, 5.0, 6.0, 7.0]);
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
}
