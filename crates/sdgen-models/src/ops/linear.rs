//! Linear layers, and the seam where quantised weights will come in. Half precision on CUDA runs
//! one cuBLASLt GEMM with the bias in its epilogue (as PyTorch's `addmm`); bf16 on a CPU with
//! AVX512-BF16 runs our bf16 GEMM (`cpu_bf16::linear`), on other CPUs in f32; everything else runs
//! candle's `Linear` (its matmul, then the bias added over the output).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `y = x·Wᵀ + b` over the last dimension of `x`.
#[derive(Debug, Clone)]
pub struct Linear(candle_nn::Linear);

impl Linear {
    /// A layer from its weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self(candle_nn::Linear::new(weight, bias))
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::cpu_bf16(x) {
            if super::fast_cpu(x.device()) {
                if let Some(y) = super::cpu_bf16::linear(x, self.0.weight(), self.0.bias())? {
                    return Ok(y);
                }
            }
            // No CPU bf16 matmul in candle: multiply in f32, round once (bias included).
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let layer = candle_nn::Linear::new(f32(self.0.weight())?, self.0.bias().map(f32).transpose()?);
            return layer.forward(&f32(x)?)?.to_dtype(DType::BF16);
        }
        #[cfg(feature = "cuda")]
        if super::fast_cuda(x.device()) && matches!(x.dtype(), DType::BF16 | DType::F16) {
            if let Some(y) = super::cuda::linear(x, self.0.weight(), self.0.bias())? {
                return Ok(y);
            }
        }
        self.0.forward(x)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Linear::forward(self, x)
    }
}

/// Loads `weight` `[out, in]` and `bias` `[out]`.
pub fn linear(inputs: usize, outputs: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear(inputs, outputs, vb)?))
}

/// Loads `weight` `[out, in]` only.
pub fn linear_no_bias(inputs: usize, outputs: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear_no_bias(inputs, outputs, vb)?))
}
