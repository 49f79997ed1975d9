//! Linear layers, and the seam where quantised weights come in. Half precision on CUDA runs one
//! cuBLASLt GEMM with the bias in its epilogue (as PyTorch's `addmm`); bf16 on a CPU with
//! AVX512-BF16 runs our bf16 GEMM (`cpu_bf16::linear`), on other CPUs in f32; everything else runs
//! candle's `Linear` (its matmul, then the bias added over the output).
//!
//! A weight the backend holds quantised ([`super::quantised`]: a GGUF file's blocks, or
//! `--weights q8|q4`) stays quantised in memory; [`QUANTISED_PATH`] says how each device
//! multiplies it (candle's `QMatMul` kernels, or the blocks dequantised into a transient dense
//! weight for the paths above), as measured. An fp8 weight ([`super::fp8`]) stays one byte a
//! weight and is dequantised (`w·scale` in the activations' dtype) for each product.

use std::cell::Cell;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::fp8::Fp8Weight;

/// `y = x·Wᵀ + b` over the last dimension of `x`.
#[derive(Debug, Clone)]
pub struct Linear(Weight);

#[derive(Debug, Clone)]
enum Weight {
    Dense(candle_nn::Linear),
    /// GGML blocks `[out, in]`, and the bias in the run's dtype.
    Quantised(Arc<QTensor>, Option<Tensor>),
    /// fp8 bytes `[out, in]` with their scale, and the bias in the run's dtype.
    Fp8(Arc<Fp8Weight>, Option<Tensor>),
}

/// How a quantised weight is multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantisedPath {
    /// candle's quantised matrix product (`QMatMul`: the activations quantised to 8 bits per
    /// block on the CPU, MMQ/MMVQ kernels on CUDA): no dense copy of the weight ever exists.
    Kernel,
    /// The weight dequantised to the activations' dtype for this product only, then the dense
    /// path: one layer's dense weight at a time.
    Dequantise,
}

/// The path per device, activation dtype and rows of activations (BENCHMARKS.md, "Quantised
/// linears"). On the CPU, [`QUANTISED_PATH`] (f16 has no candle kernel worth the name there, a
/// scalar loop, so it dequantises). On a GPU, dequantised (candle's dequantisation kernels, then
/// the dense GEMM on tensor cores, as diffusers runs GGUF weights): at a denoiser's thousands of
/// tokens candle's MMQ kernels run 5–7× slower and quantise the activations to 8 bits as well
/// (twice the error). Only a matrix–vector product in half precision (at most
/// [`GPU_KERNEL_MAX_ROWS`] rows: the MMDiT's adaLN, one row per image) takes candle's MMVQ
/// kernel, 9× faster than dequantising the whole weight for two rows. [`set_quantised_path`]
/// overrides it on the calling thread.
pub fn quantised_path(device: &Device, dtype: DType, rows: usize) -> QuantisedPath {
    if let Some(path) = PATH_OVERRIDE.with(Cell::get) {
        return path;
    }
    match device {
        Device::Cpu if dtype != DType::F16 => QUANTISED_PATH,
        Device::Cpu => QuantisedPath::Dequantise,
        _ if (1..=GPU_KERNEL_MAX_ROWS).contains(&rows) && dtype != DType::F32 => QuantisedPath::Kernel,
        _ => QuantisedPath::Dequantise,
    }
}

/// The most rows of activations a GPU multiplies by candle's quantised kernel (its MMVQ path).
pub const GPU_KERNEL_MAX_ROWS: usize = 8;

thread_local! {
    static PATH_OVERRIDE: Cell<Option<QuantisedPath>> = const { Cell::new(None) };
}

/// Makes every quantised layer run on this thread multiply by `path` (`None`: each device's
/// own), for comparing the two paths' speed and error on a whole model. Per thread, so tests
/// running beside each other keep their own.
pub fn set_quantised_path(path: Option<QuantisedPath>) {
    PATH_OVERRIDE.with(|p| p.set(path));
}

/// The CPU's path for f32 and bf16 activations. Dequantising: measured at SD 3.5 Medium's
/// shapes (1536 → 4608 and 6144 over 4096 tokens, 2 loaded cores), candle's kernels are 1.3–1.6×
/// faster than the f32 GEMM of the dequantised weight, but on AVX-VNNI / AVX512-VNNI processors
/// they keep a repacked copy of every Q8_0 / Q4_K / Q6_K matrix whose rows are whole 256-element
/// blocks beside its blocks (measured: +1.0× the Q8_0 blocks, +1.33× the Q4_K ones), which gives
/// back most of the memory quantising saved (a Q8_0 layer then holds more than its bf16 weight).
/// Dequantising holds the blocks alone plus one layer's dense weight while it multiplies, at the
/// dense f32 layer's speed and with less error (the activations stay in f32).
pub const QUANTISED_PATH: QuantisedPath = QuantisedPath::Dequantise;

impl Linear {
    /// A layer from its weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self(Weight::Dense(candle_nn::Linear::new(weight, bias)))
    }

    /// A layer whose weight `[out, in]` stays in GGML blocks.
    pub fn quantised(weight: QTensor, bias: Option<Tensor>) -> Self {
        Self(Weight::Quantised(Arc::new(weight), bias))
    }

    /// A layer whose weight `[out, in]` stays in fp8.
    pub fn fp8(weight: Fp8Weight, bias: Option<Tensor>) -> Self {
        Self(Weight::Fp8(Arc::new(weight), bias))
    }

    /// The dense weight `[out, in]`; `None` for a quantised or fp8 layer.
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.0 {
            Weight::Dense(l) => Some(l.weight()),
            Weight::Quantised(..) | Weight::Fp8(..) => None,
        }
    }

    /// The quantised weight, if the layer's weight is in GGML blocks.
    pub fn quantised_weight(&self) -> Option<&QTensor> {
        match &self.0 {
            Weight::Quantised(w, _) => Some(w),
            Weight::Dense(_) | Weight::Fp8(..) => None,
        }
    }

    /// The fp8 weight, if the layer's weight is held in fp8.
    pub fn fp8_weight(&self) -> Option<&Fp8Weight> {
        match &self.0 {
            Weight::Fp8(w, _) => Some(w),
            Weight::Dense(_) | Weight::Quantised(..) => None,
        }
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        self.forward_via(x, quantised_path(x.device(), x.dtype(), rows))
    }

    /// Applies the layer, a quantised weight multiplied by `path` (for tests and benchmarks:
    /// [`Linear::forward`] takes the device's).
    pub fn forward_via(&self, x: &Tensor, path: QuantisedPath) -> Result<Tensor> {
        match &self.0 {
            Weight::Dense(l) => dense(x, l.weight(), l.bias()),
            Weight::Quantised(w, bias) => match path {
                QuantisedPath::Kernel => {
                    let y = x.contiguous()?.apply_op1_no_bwd(w.as_ref())?;
                    match bias {
                        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                        None => Ok(y),
                    }
                }
                QuantisedPath::Dequantise => dense(x, &w.dequantize(x.device())?.to_dtype(x.dtype())?, bias.as_ref()),
            },
            Weight::Fp8(w, bias) => dense(x, &w.dequantise(x.dtype())?, bias.as_ref()),
        }
    }
}

/// `x·Wᵀ + b` with a dense weight, by the fastest path for the device and dtype.
fn dense(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if super::cpu_bf16(x) {
        if super::fast_cpu(x.device()) {
            if let Some(y) = super::cpu_bf16::linear(x, weight, bias)? {
                return Ok(y);
            }
        }
        // No CPU bf16 matmul in candle: multiply in f32, round once (bias included).
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let layer = candle_nn::Linear::new(f32(weight)?, bias.map(f32).transpose()?);
        return layer.forward(&f32(x)?)?.to_dtype(DType::BF16);
    }
    if super::fast_cpu(x.device()) {
        if let Some(y) = super::cpu::linear(x, weight, bias)? {
            return Ok(y);
        }
    }
    #[cfg(feature = "cuda")]
    if super::fast_cuda(x.device()) && matches!(x.dtype(), DType::BF16 | DType::F16) {
        if let Some(y) = super::cuda::linear(x, weight, bias)? {
            return Ok(y);
        }
    }
    candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(x)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Linear::forward(self, x)
    }
}

/// Loads `weight` `[out, in]` (quantised or fp8 where the backend holds it so) and `bias` `[out]`.
pub fn linear(inputs: usize, outputs: usize, vb: VarBuilder) -> Result<Linear> {
    match held(inputs, outputs, &vb)? {
        Some(w) => Ok(Linear(w.with_bias(Some(vb.get(outputs, "bias")?)))),
        None => Ok(Linear(Weight::Dense(candle_nn::linear(inputs, outputs, vb)?))),
    }
}

/// Loads `weight` `[out, in]` only (quantised or fp8 where the backend holds it so).
pub fn linear_no_bias(inputs: usize, outputs: usize, vb: VarBuilder) -> Result<Linear> {
    match held(inputs, outputs, &vb)? {
        Some(w) => Ok(Linear(w.with_bias(None))),
        None => Ok(Linear(Weight::Dense(candle_nn::linear_no_bias(inputs, outputs, vb)?))),
    }
}

/// A weight the backend holds other than dense. Short-lived (it becomes a [`Weight`] at once), so
/// the CUDA build's larger `QTensor` is not worth a box.
#[allow(clippy::large_enum_variant)]
enum Held {
    Blocks(QTensor),
    Fp8(Fp8Weight),
}

impl Held {
    fn with_bias(self, bias: Option<Tensor>) -> Weight {
        match self {
            Held::Blocks(w) => Weight::Quantised(Arc::new(w), bias),
            Held::Fp8(w) => Weight::Fp8(Arc::new(w), bias),
        }
    }
}

/// The layer's weight as the backend holds it, when it holds it in GGML blocks or fp8.
fn held(inputs: usize, outputs: usize, vb: &VarBuilder) -> Result<Option<Held>> {
    if let Some(w) = super::quantised::load(outputs, inputs, vb)? {
        return Ok(Some(Held::Blocks(w)));
    }
    Ok(super::fp8::load(outputs, inputs, vb)?.map(Held::Fp8))
}
