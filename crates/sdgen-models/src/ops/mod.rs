//! The kernel seam: every operation whose fast implementation depends on the device lives here,
//! each with its reference path (candle's stock ops: every device, and the CPU's only path) and,
//! a fast one (on CUDA: cuDNN convolutions, our own fused kernels, flash attention; on the CPU:
//! fused norms), chosen per call from the tensor's device. Model code calls these and nothing below
//! them, so a faster kernel lands for every family at once.
//!
//! | op | reference | CUDA fast path |
//! |---|---|---|
//! | [`attention`] | matmul → f32 softmax → matmul, query rows in bounded chunks | CUDA, half precision, head dims up to 128: our flash-attention kernel (tensor cores, no score matrix in memory); otherwise strided cuBLAS GEMMs straight from the heads' layout (no permute copies), scale in the GEMM, one in-place softmax kernel. CPU: 64 query rows per task on all cores, scores kept in cache (bf16: both products through `bf16_gemm`, the probabilities rounded to bf16 as PyTorch does) |
//! | [`norm::GroupNorm`] (+ SiLU, + a per-channel add before it) | candle's GroupNorm, then `silu` | two kernels (Welford statistics, normalise + affine + SiLU); on the CPU, one pass per group on all cores (f32; bf16 normalised in f32, rounded once) |
//! | [`norm::LayerNorm`] | candle's fused layer norm | the same (made contiguous first so it never falls back to the 10-op path) |
//! | [`norm::RmsNorm`] | candle's fused RMS norm (half precision: in f32 with a unit scale, rounded, then × weight, diffusers' rule) | the same |
//! | [`norm::modulate`] (adaLN `x·(1 + scale) + shift`) | three broadcast ops | the same (one function, so a fused LayerNorm + modulate kernel can replace it) |
//! | [`conv::Conv2d`] | candle's im2col convolution, banded under a column limit | cuDNN with a per-shape algorithm found once (`cudnnFind…`), tensor-op math for half precision; channels-last (NHWC) stacks where [`prefers_channels_last`] says (the VAE decoder), the norms and upsampling then channels-last too. CPU: 3×3 stride-1 convolutions direct on `bf16_gemm`'s register tiles, no column (`direct_conv`); the others in bands of the column unfolded and multiplied into the output (bf16: unfolded pair-interleaved for `bf16_gemm`) |
//! | [`geglu`] | chunk, `gelu_erf`, multiply | one kernel |
//! | [`linear::Linear`] | candle's `Linear`: matmul, then the bias added | half precision: one cuBLASLt GEMM with the bias in its epilogue. CPU bf16: `bf16_gemm` into rows that start as the bias |
//! | [`linear::Linear`] with a quantised weight ([`quantised`]: GGUF blocks, `--weights`) | the blocks dequantised to the activations' dtype for the product, then the dense path (the CPU's choice: [`linear::QUANTISED_PATH`]) | candle's quantised kernels (`QMatMul`: MMQ/MMVQ, f32/f16/bf16 activations) |
//! | [`linear::Linear`] with an fp8 weight ([`fp8`]: fp8-scaled files, `--weights fp8`) | the bytes dequantised (`w·scale` in the activations' dtype, a 256-entry table) for the product, then the dense path | candle's fp8 cast, × the scale, then the dense path |
//!
//! bf16 on the CPU: candle 0.11.1 has no CPU matrix product for bf16 ("unsupported dtype BF16 for
//! op matmul"). On processors with AVX512-BF16 ([`cpu_bf16_supported`]) [`attention`],
//! [`linear::Linear`] and [`conv::Conv2d`] multiply bf16 operands with `vdpbf16ps` (our GEMM,
//! `bf16_gemm`, f32 sums; `cpu_bf16`); elsewhere, or with the fast kernels off, they compute such
//! inputs in f32 and round the result to bf16 once (as PyTorch's CPU bf16 GEMMs accumulate in f32).
//!
//! [`set_fast_kernels`] (or `SDGEN_NO_FAST_KERNELS=1`) turns every fast path off, so a user can
//! rule our kernels out when reporting a wrong image; `SDGEN_FAST_KERNELS=1` turns the CUDA ones
//! on while they are not yet the default ([`CUDA_FAST_BY_DEFAULT`]).

pub mod attention;
pub(crate) mod bf16_gemm;
pub mod conv;
pub(crate) mod cpu;
pub(crate) mod cpu_bf16;
pub(crate) mod direct_conv;
pub mod fp8;
pub mod linear;
pub mod norm;
pub mod quantised;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "cudnn")]
pub(crate) mod cudnn;

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{Device, Result, Tensor};

/// The environment variable that turns the fast kernels off (any value but empty or `0`).
pub const NO_FAST_KERNELS_ENV: &str = "SDGEN_NO_FAST_KERNELS";

/// The environment variable that turns the fast kernels on for every device, CUDA included while
/// [`CUDA_FAST_BY_DEFAULT`] is off (any value but empty or `0`).
pub const FAST_KERNELS_ENV: &str = "SDGEN_FAST_KERNELS";

/// Whether CUDA devices run our kernels without being asked ([`FAST_KERNELS_ENV`]). On since the
/// GPU test binary (`tools/gpu/speed.sh`, its `ops` part) passed on an H100 with these kernels and
/// full-size images matched diffusers' as closely as the stock path's (BENCHMARKS.md, 2026-12-06):
/// a fast path is only the default once it is proven at real shapes. Turn it off while a kernel
/// is reworked until the binary passes again.
pub const CUDA_FAST_BY_DEFAULT: bool = true;

/// The switch's states: 0 not decided yet (read the environment on first use), 1 on for every
/// device, 2 off, 3 the default (the CPU's fast paths; CUDA's per [`CUDA_FAST_BY_DEFAULT`]).
static FAST_KERNELS: AtomicU8 = AtomicU8::new(0);

/// Turns the fast kernels on (every device) or off for the whole process, from the next
/// operation on (`--no-fast-kernels`). Overrides the environment.
pub fn set_fast_kernels(on: bool) {
    FAST_KERNELS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

fn switch_state() -> u8 {
    match FAST_KERNELS.load(Ordering::Relaxed) {
        0 => {
            let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0");
            let state = if set(NO_FAST_KERNELS_ENV) {
                2
            } else if set(FAST_KERNELS_ENV) {
                1
            } else {
                3
            };
            FAST_KERNELS.store(state, Ordering::Relaxed);
            state
        }
        s => s,
    }
}

/// Whether `x` is bf16 on the CPU, whose products the seam runs through [`cpu_bf16`] or in f32:
/// see the module's overview.
pub(crate) fn cpu_bf16(x: &Tensor) -> bool {
    x.dtype() == candle_core::DType::BF16 && x.device().is_cpu()
}

/// The processor feature bf16 on the CPU needs (AVX512-BF16's `vdpbf16ps`), as `/proc/cpuinfo`
/// names it.
pub const CPU_BF16_FEATURE: &str = "avx512_bf16";

/// Whether this processor multiplies bf16 itself ([`CPU_BF16_FEATURE`]), so bf16 runs on the CPU
/// at bf16's speed; elsewhere the seam would compute every bf16 product in f32, slower than f32.
pub fn cpu_bf16_supported() -> bool {
    bf16_gemm::supported()
}

/// Sets how many threads the CPU's work uses, ours and candle's alike: rayon's global pool (our
/// kernels, and `gemm` through `Parallelism::Rayon(0)`) and `RAYON_NUM_THREADS`, which candle's
/// CPU matmul reads on every call (`candle_core::utils::get_num_threads`). Without it both take
/// every logical core, and a process sharing the machine oversubscribes it. Call it first thing
/// in `main`: the pool can be built once, and the environment may only be written while the
/// process has a single thread.
pub fn set_cpu_threads(threads: usize) -> std::result::Result<(), String> {
    if threads == 0 {
        return Err("at least one thread is needed".into());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| format!("the CPU thread pool is already running ({e}): set the thread count before any work"))?;
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    Ok(())
}

/// The threads the CPU's work runs on (rayon's global pool, which [`set_cpu_threads`] sizes).
pub fn cpu_threads() -> usize {
    rayon::current_num_threads()
}

/// Whether fast kernels may be used at all (they are unless turned off); a device without them
/// runs the reference path regardless.
pub fn fast_kernels_enabled() -> bool {
    switch_state() != 2
}

/// Whether `device` runs our own CUDA kernels now: a CUDA device, a build with the `cuda`
/// feature, and fast kernels on for CUDA.
pub fn fast_cuda(device: &Device) -> bool {
    let on = match switch_state() {
        1 => true,
        3 => CUDA_FAST_BY_DEFAULT,
        _ => false,
    };
    cfg!(feature = "cuda") && device.is_cuda() && on
}

/// Whether `device` runs our CPU fast paths now (the CPU, fast kernels on).
pub fn fast_cpu(device: &Device) -> bool {
    device.is_cpu() && fast_kernels_enabled()
}

/// Whether convolutions on `device` go through cuDNN now (a build with the `cudnn` feature).
pub fn fast_conv(device: &Device) -> bool {
    cfg!(feature = "cudnn") && fast_cuda(device)
}

/// `SDGEN_CHANNELS_LAST=1` / `=0`: run convolution stacks channels-last where cuDNN can, or
/// never (overrides [`CHANNELS_LAST_BY_DEFAULT`]).
pub const CHANNELS_LAST_ENV: &str = "SDGEN_CHANNELS_LAST";

/// Whether channels-last stacks are on without being asked. On since the GPU test binary's
/// `channels_last_at_real_shapes` passed on an H100 (every conv and norm at the VAE's real shapes
/// exactly as close to the f32 reference as the channels-first path) and the SDXL decode ran
/// faster at a lower peak (45.4 ms and 1.74 GB allocated against 49.3 ms and 2.42 GB; BENCHMARKS.md,
/// 2026-12-07). Turn it off while a channels-last kernel is reworked until the binary passes again.
pub const CHANNELS_LAST_BY_DEFAULT: bool = true;

/// Whether a convolution stack loaded for `device` in `dtype` should keep its activations
/// channels-last (`[b, h, w, c]`): on cuDNN in half precision, whose tensor-core kernels read
/// NHWC natively (given NCHW they transpose the full-resolution tensors in their workspace).
/// Decided once at load: the weights are stored in the matching order.
pub fn prefers_channels_last(device: &Device, dtype: candle_core::DType) -> bool {
    let on = match std::env::var(CHANNELS_LAST_ENV).as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => CHANNELS_LAST_BY_DEFAULT,
    };
    on && fast_conv(device) && dtype != candle_core::DType::F32
}

/// The kernels operations on `device` use, as recorded in a generation's metadata.
pub fn kernel_summary(device: &Device) -> &'static str {
    match (fast_cuda(device), fast_conv(device)) {
        (true, true) => "fast (cuDNN convolutions, fused kernels)",
        (true, false) => "fast (fused kernels; im2col convolutions: built without cuDNN)",
        _ if fast_cpu(device) => "fast (CPU: direct and banded convolutions, fused GroupNorm, blocked attention)",
        _ if !fast_kernels_enabled() => "stock (fast kernels turned off)",
        _ if device.is_cuda() && cfg!(feature = "cuda") => {
            "stock (CUDA kernels not yet on by default: SDGEN_FAST_KERNELS=1)"
        }
        _ => "stock",
    }
}

/// Starts or stops the CUDA profiler's capture (`ncu --profile-from-start off` profiles only
/// what runs between the two), so a benchmark can profile one evaluation and not its warm-up. A
/// no-op without the `cuda` feature.
pub fn cuda_profiler(start: bool) {
    #[cfg(feature = "cuda")]
    // SAFETY: plain driver calls without arguments; their status only says whether a profiler
    // is attached, which does not matter here.
    unsafe {
        let _ = if start { cudarc::driver::sys::cuProfilerStart() } else { cudarc::driver::sys::cuProfilerStop() };
    }
    #[cfg(not(feature = "cuda"))]
    let _ = start;
}

/// diffusers' GEGLU activation: `x: [.., 2·inner]` → `a · gelu(g)` with `a, g` its two halves
/// (the exact erf GELU).
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fast_cuda(x.device()) {
        return cuda::geglu(x);
    }
    let chunks = x.chunk(2, candle_core::D::Minus1)?;
    &chunks[0] * chunks[1].gelu_erf()?
}

/// The tanh GELU of `x` (PyTorch's `approximate="tanh"`, candle's `gelu`), taking `x` by value:
/// on CUDA, a contiguous `x` is overwritten with the result (candle's own kernel, run in place),
/// so an MLP's 4×-wide hidden activation is held once rather than twice (the MMDiT's largest
/// transient). The caller must hold the only handle to `x`'s storage (a layer's fresh output).
pub fn gelu_in_place(x: Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fast_cuda(x.device()) && x.is_contiguous() {
        return cuda::gelu_in_place(x);
    }
    x.gelu()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geglu_multiplies_the_first_half_by_gelu_of_the_second() -> Result<()> {
        let x = Tensor::new(&[[1f32, -2., 0.5, 3.]], &Device::Cpu)?;
        let y: Vec<f32> = geglu(&x)?.flatten_all()?.to_vec1()?;
        let gelu = |g: f64| 0.5 * g * (1.0 + libm_erf(g / std::f64::consts::SQRT_2));
        let want = [1.0 * gelu(0.5), -2.0 * gelu(3.0)];
        for (got, want) in y.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-5, "{y:?} vs {want}");
        }
        Ok(())
    }

    /// erf by its Abramowitz–Stegun 7.1.26 approximation (|error| < 1.5e-7), enough for the check.
    fn libm_erf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.3275911 * x.abs());
        let y = 1.0
            - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592)
                * t
                * (-x * x).exp();
        y.copysign(x)
    }
}
