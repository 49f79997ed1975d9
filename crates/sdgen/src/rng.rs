//! A pure-Rust port of PyTorch's CPU random generator, so that a seed gives the same initial
//! latents (and the same per-step noise of ancestral samplers) as
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=D)` in diffusers.
//!
//! What torch does (2.x, `aten/src/ATen/native/cpu/DistributionTemplates.h`,
//! `aten/src/ATen/core/DistributionsHelper.h`, `TransformationHelper.h`, `CPUGeneratorImpl.cpp`,
//! `MT19937RNGEngine.h`), and this module repeats:
//!
//! * The engine is MT19937 seeded with the low 32 bits of the seed (`manual_seed` also clears the
//!   cached normal sample). `random()` is one 32-bit draw; `random64()` is two, the first one
//!   being the high half.
//! * Uniforms in `[0, 1)`: float takes the low 24 bits of `random()` times 2^-24; double takes the
//!   low 53 bits of `random64()` times 2^-53. float16 and bfloat16 use the *float* uniform, since
//!   their `normal_fill` runs in `opmath_t = float` (since torch 2.12; see "torch versions").
//! * `numel >= 16` (contiguous), `normal_fill`: Box-Muller on blocks of 16, pairing element `j`
//!   (`u1 = 1 - u[j]`, the radius) with `j + 8` (the angle); `z[j] = r cos θ`, `z[j+8] = r sin θ`.
//!   When `numel % 16 != 0` the last 16 outputs are recomputed from 16 fresh uniforms. For float32
//!   and float64 all `numel` uniforms are drawn first, so that call consumes `numel + 16` draws;
//!   float16/bfloat16 draw per block, consuming `16 * (numel / 16) + 16`. Float64 computes in
//!   double with libm; float32/16/bf16 compute in float, cast down at the end.
//! * `numel < 16` (and any `numel` that is not contiguous, which never happens here): every element
//!   comes from the scalar `normal_distribution<double>`: `u1, u2` double uniforms,
//!   `r = sqrt(-2 log1p(-u2))`, `θ = 2π u1`, returns `r cos θ` and caches `r sin θ` *in the
//!   generator*, so the next scalar draw — even in a later `randn` call — returns the cached value
//!   without touching the engine. `normal_fill` neither reads nor clears that cache. The double
//!   is cast to the dtype (float16/bfloat16 go through float first, as `c10::Half(float)` does).
//!
//! CPU capability: the float Box-Muller arithmetic depends on what ATen dispatches to, hence
//! [`BoxMullerMath`]. x86-64 torch on any AVX2 or AVX512 CPU uses the Cephes polynomials of
//! `avx_mathfun.h` ([`BoxMullerMath::Avx2`], the default). Every build without that header's
//! code — x86-64 without AVX2 or with `ATEN_CPU_CAPABILITY=default`, and aarch64 (e.g. Apple
//! silicon) — uses the generic template: libm's `logf`/`cosf`/`sinf` with the angle computed in
//! double ([`BoxMullerMath::Libm`]). The two disagree on ~39% of float32 values, by at most ~2e-6.
//! (ppc64le's VSX path is not reproduced.) Everything else (uniforms, float64, `numel < 16`) is
//! capability independent.
//!
//! Platform: the `Avx2` path — float32/16/bf16 with `numel >= 16`, i.e. SD latents and per-step
//! noise — uses only IEEE `+ - * sqrt` and fused multiply-add, so it is bit-exact on every
//! platform. Paths through libm (`Libm`, float64 with `numel >= 16`, anything with `numel < 16`)
//! are bit-exact only where this process's libm agrees with the one torch ran on (both glibc on
//! Linux, which the tests check); elsewhere expect rare 1-ulp differences.
//!
//! torch versions: the above is torch >= 2.13, checked bit for bit against torch 2.15.0
//! (`tools/reference/make_randn.py` → `testdata/reference/randn.json`). float16/bfloat16 with
//! `numel >= 16` changed in 2.12 and again in 2.13, and that is what an fp16/bf16 diffusers
//! pipeline with a CPU generator draws its latents with: a [`TorchNoise`] per generator picks the
//! release to match ([`TorchNoise::Legacy`] for torch <= 2.11, checked against 2.11.0, and
//! [`TorchNoise::Torch2_12`], checked against 2.12.0: `make_randn.py --torch-legacy` →
//! `randn_torch211.json`, `randn_torch212.json`), and `SDGEN_TORCH_NOISE=legacy|2.12|2.15` picks
//! it for a run through [`TorchNoise::from_env`]. float32, float64 and `numel < 16` are the same in
//! all of them.

mod avx_mathfun;
pub mod batch;
mod torch_noise;

pub use torch_noise::TorchNoise;

/// The element type torch generates the noise in: it changes which code path runs, hence the
/// values, not just their rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoiseDType {
    /// `torch.float32`.
    F32,
    /// `torch.float16`.
    F16,
    /// `torch.bfloat16`.
    BF16,
    /// `torch.float64`.
    F64,
}

/// Which float arithmetic torch's CPU `normal_fill` runs its Box-Muller in, for float32, float16
/// and bfloat16 with `numel >= 16`. See the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BoxMullerMath {
    /// `avx_mathfun.h`'s `log256_ps`/`sincos256_ps`: torch on x86-64 with AVX2 or AVX512.
    #[default]
    Avx2,
    /// This platform's `logf`/`cosf`/`sinf`: torch's generic code (x86-64 without AVX2 or with
    /// `ATEN_CPU_CAPABILITY=default`, aarch64). Bit-exact only with the same libm as torch's.
    Libm,
}

/// MT19937 state size, in 32-bit words.
const MT_N: usize = 624;
/// MT19937 twist offset.
const MT_M: usize = 397;

/// The 32-bit Mersenne Twister exactly as `at::mt19937` (the reference `mt19937ar` algorithm).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    /// Index of the next word to temper; `MT_N` means the state must be regenerated first.
    next: usize,
}

impl Mt19937 {
    /// `init_genrand`: torch keeps only the low 32 bits of its 64-bit seed here.
    fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed as u32;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Mt19937 { state, next: MT_N }
    }

    fn regenerate(&mut self) {
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..MT_N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % MT_N] & 0x7fff_ffff);
            let mag = if y & 1 != 0 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.regenerate();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// Bit-for-bit stand-in for `torch.Generator("cpu")` as far as `torch.randn` is concerned.
///
/// ```
/// use sdgen::rng::{NoiseDType, TorchGenerator};
/// let mut g = TorchGenerator::new(0);
/// // torch.randn(5, generator=torch.Generator("cpu").manual_seed(0))[0] == 1.5409960746765137
/// assert_eq!(g.randn(5, NoiseDType::F32)[0], 1.540_996_1_f32);
/// ```
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    math: BoxMullerMath,
    noise: TorchNoise,
    engine: Mt19937,
    /// `CPUGeneratorImpl::next_double_normal_sample_`: the `r sin θ` half of the last scalar
    /// Box-Muller pair, waiting to be returned. (torch's float cache is never used by `randn`.)
    next_double_normal: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("seed", &self.seed)
            .field("math", &self.math)
            .field("noise", &self.noise)
            .field("next_double_normal", &self.next_double_normal)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`, with torch-on-AVX2 float arithmetic.
    pub fn new(seed: u64) -> Self {
        Self::with_math(seed, BoxMullerMath::default())
    }

    /// Like [`TorchGenerator::new`], matching a torch that runs its float Box-Muller with `math`.
    pub fn with_math(seed: u64, math: BoxMullerMath) -> Self {
        Self::with_options(seed, math, TorchNoise::default())
    }

    /// `torch.Generator("cpu").manual_seed(seed)` as torch release `noise` draws from it, on a CPU
    /// whose float Box-Muller is `math` (which [`TorchNoise::Legacy`] and
    /// [`TorchNoise::Torch2_12`] ignore for float16/bfloat16: they use libm everywhere).
    pub fn with_options(seed: u64, math: BoxMullerMath, noise: TorchNoise) -> Self {
        TorchGenerator { seed, math, noise, engine: Mt19937::new(seed), next_double_normal: None }
    }

    /// The seed this generator was created with (`Generator.initial_seed()`).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The float Box-Muller arithmetic this generator reproduces.
    pub fn math(&self) -> BoxMullerMath {
        self.math
    }

    /// The torch release whose float16/bfloat16 noise this generator reproduces.
    pub fn noise(&self) -> TorchNoise {
        self.noise
    }

    /// `torch.randn(numel, generator=self, dtype=dtype)`, flattened (the shape does not change the
    /// values, only `numel` does). float16/bfloat16 values are returned exactly (they are
    /// representable in f32); float64 values are rounded to f32 — use
    /// [`TorchGenerator::randn_f64`] for the doubles.
    pub fn randn(&mut self, numel: usize, dtype: NoiseDType) -> Vec<f32> {
        match dtype {
            NoiseDType::F64 => self.randn_f64(numel).into_iter().map(|v| v as f32).collect(),
            NoiseDType::F32 if numel >= 16 => self.normal_fill_f32(numel),
            NoiseDType::F16 | NoiseDType::BF16 if numel >= 16 => match self.noise {
                TorchNoise::Torch2_13 => self.normal_fill_reduced(numel, dtype, self.math),
                TorchNoise::Torch2_12 => self.normal_fill_reduced(numel, dtype, BoxMullerMath::Libm),
                TorchNoise::Legacy => self.normal_fill_half_math(numel, dtype),
            },
            // `static_cast<scalar_t>(double)`: Half and BFloat16 only have a float constructor,
            // so the double is rounded to float first.
            _ => (0..numel).map(|_| torch_noise::round_to(dtype, self.scalar_normal() as f32)).collect(),
        }
    }

    /// `torch.randn(numel, generator=self, dtype=torch.float64)`.
    pub fn randn_f64(&mut self, numel: usize) -> Vec<f64> {
        if numel < 16 {
            return (0..numel).map(|_| self.scalar_normal()).collect();
        }
        let mut data: Vec<f64> = (0..numel).map(|_| self.uniform_f64()).collect();
        let mut blocks = data.chunks_exact_mut(16);
        blocks.by_ref().for_each(box_muller16_f64);
        if !blocks.into_remainder().is_empty() {
            let tail = &mut data[numel - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f64();
            }
            box_muller16_f64(tail);
        }
        data
    }

    /// `CPUGeneratorImpl::random64`: two engine draws, the first is the high word.
    fn random64(&mut self) -> u64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits.
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `normal_distribution<double>(0, 1)`, with the generator-wide cached second sample.
    fn scalar_normal(&mut self) -> f64 {
        // `transformation::normal` computes `v * 1.0 + 0.0`; `+ 0.0` alone is the same (it only
        // turns -0 into +0).
        if let Some(v) = self.next_double_normal.take() {
            return v + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos() + 0.0
    }

    /// `normal_fill<float>`: every uniform first, then blocks, then the re-drawn tail block.
    fn normal_fill_f32(&mut self, numel: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        let mut blocks = data.chunks_exact_mut(16);
        let math = self.math;
        blocks.by_ref().for_each(|block| box_muller16_f32(math, block));
        if !blocks.into_remainder().is_empty() {
            let tail_start = numel - 16;
            for v in &mut data[tail_start..] {
                *v = self.uniform_f32();
            }
            box_muller16_f32(math, &mut data[tail_start..]);
        }
        data
    }

    /// `normal_fill<Half>` / `normal_fill<BFloat16>` (torch >= 2.12): float math with `math`
    /// through a 16-float buffer that is filled per block, so fewer uniforms are drawn than for
    /// float32.
    fn normal_fill_reduced(&mut self, numel: usize, dtype: NoiseDType, math: BoxMullerMath) -> Vec<f32> {
        let mut out = vec![0f32; numel];
        let mut buf = [0f32; 16];
        let mut fill = |g: &mut Self, dst: &mut [f32]| {
            for v in buf.iter_mut() {
                *v = g.uniform_f32();
            }
            box_muller16_f32(math, &mut buf);
            for (d, &v) in dst.iter_mut().zip(&buf) {
                *d = torch_noise::round_to(dtype, v);
            }
        };
        let mut blocks = out.chunks_exact_mut(16);
        blocks.by_ref().for_each(|block| fill(self, block));
        if !blocks.into_remainder().is_empty() {
            fill(self, &mut out[numel - 16..]);
        }
        out
    }
}

/// `NormalFill16<float>` on one block of 16 uniforms, in place, with `math`.
fn box_muller16_f32(math: BoxMullerMath, data: &mut [f32]) {
    // `2.0f * c10::pi<double>` is a double; the AVX2 code rounds it to float before
    // multiplying, the scalar code multiplies in double and rounds the angle.
    const TWO_PI: f64 = 2.0 * std::f64::consts::PI;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let (radius, sin, cos) = match math {
            BoxMullerMath::Avx2 => {
                let radius = (-2.0 * avx_mathfun::log_ps(u1)).sqrt();
                let (sin, cos) = avx_mathfun::sincos_ps(TWO_PI as f32 * u2);
                (radius, sin, cos)
            }
            BoxMullerMath::Libm => {
                let radius = (-2.0 * u1.ln()).sqrt();
                let theta = (TWO_PI * u2 as f64) as f32;
                (radius, theta.sin(), theta.cos())
            }
        };
        // torch ends with `fma(n, std, mean)` = `n * 1 + 0`, i.e. `n + 0.0`.
        data[j] = radius * cos + 0.0;
        data[j + 8] = radius * sin + 0.0;
    }
}

/// `NormalFill16<double>`: the generic template, libm in double precision.
fn box_muller16_f64(data: &mut [f64]) {
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        data[j] = radius * theta.cos() + 0.0;
        data[j + 8] = radius * theta.sin() + 0.0;
    }
}

#[cfg(test)]
mod tests;
