//! Which torch release's float16/bfloat16 noise to reproduce ([`TorchNoise`], whose docs tell the
//! versions apart), and the arithmetic of torch <= 2.11's half-type Box-Muller.

use super::{NoiseDType, TorchGenerator};
use crate::error::{Error, Result};

/// Which torch release's CPU `randn` a [`TorchGenerator`] reproduces.
///
/// torch changed how `normal_fill` (`numel >= 16`) computes float16 and bfloat16 twice, in
/// `aten/src/ATen/native/cpu/DistributionTemplates.h` (read in the wheels of 2.11.0, 2.12.0,
/// 2.12.1, 2.13.0, 2.14.0 and 2.15.0):
///
/// * torch <= 2.11 ([`TorchNoise::Legacy`]) runs the generic template in the half type itself:
///   uniforms of 11 (float16) or 8 (bfloat16) bits, all drawn before the first block as for
///   float32, and every Box-Muller operation rounded to the half type, `log`/`sqrt`/`cos`/`sin`
///   included (c10's `BFloat16-math.h` overloads return the half type). The same on every CPU
///   capability (checked: AVX2, AVX512, DEFAULT).
/// * torch 2.12 ([`TorchNoise::Torch2_12`]) computes in float with 24-bit uniforms drawn per
///   16-element block (so fewer draws when `numel % 16 != 0`), but always through the generic
///   float code, i.e. libm ([`BoxMullerMath::Libm`](super::BoxMullerMath::Libm)) even where float32
///   uses AVX2.
/// * torch >= 2.13 ([`TorchNoise::Torch2_13`], the default) is 2.12 with float32's arithmetic:
///   AVX2 polynomials where ATen dispatches to AVX2 or AVX512 (pytorch PR #179834).
///
/// float32, float64 and every `numel < 16` draw are the same in all three. The half-type noise is
/// what a float16/bfloat16 diffusers pipeline draws its initial latents with (on a CPU generator,
/// in the pipeline dtype), so its images depend on the torch release: `SDGEN_TORCH_NOISE` picks
/// the one to match for a run (see [`TorchNoise::from_env`]).
///
/// ```
/// use sdgen::rng::{BoxMullerMath, NoiseDType, TorchGenerator, TorchNoise};
/// let mut g = TorchGenerator::with_options(0, BoxMullerMath::default(), TorchNoise::Legacy);
/// // torch 2.11: torch.randn(16, generator=torch.Generator("cpu").manual_seed(0), dtype=torch.float16)[0]
/// assert_eq!(g.randn(16, NoiseDType::F16)[0], -0.901_367_187_5);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TorchNoise {
    /// torch 2.13 and later (checked bit for bit against 2.15.0): float math, AVX2 where float32
    /// uses it. The default.
    #[default]
    Torch2_13,
    /// torch 2.12.x (checked against 2.12.0): float math through libm on every CPU.
    Torch2_12,
    /// torch 2.11 and earlier (checked against 2.11.0): Box-Muller in the half type itself.
    Legacy,
}

impl TorchNoise {
    /// The environment variable [`TorchNoise::from_env`] reads.
    pub const ENV_VAR: &'static str = "SDGEN_TORCH_NOISE";

    /// The variant `$SDGEN_TORCH_NOISE` asks for, or the default when it is unset or empty. This
    /// is the only place that reads it. Values: `legacy` (torch <= 2.11) or a torch version as
    /// `torch.__version__` prints it (`2.11`, `2.12`, `2.15`, `2.11.0+cu130`; see
    /// [`TorchNoise::for_torch_version`]): set it to the release of the torch whose images are to
    /// be reproduced. Errors (naming the variable and its value) on anything else.
    pub fn from_env() -> Result<Self> {
        match std::env::var_os(Self::ENV_VAR) {
            None => Ok(Self::default()),
            Some(value) => Self::from_setting(&value.to_string_lossy()),
        }
    }

    /// Parses one value of [`TorchNoise::ENV_VAR`]; empty means the default.
    pub(super) fn from_setting(value: &str) -> Result<Self> {
        if value.trim().is_empty() {
            return Ok(Self::default());
        }
        value.parse().map_err(|e: Error| Error::InvalidInput(format!("{}: {e}", Self::ENV_VAR)))
    }

    /// The variant for torch `major.minor`.
    pub fn for_torch_version(major: u32, minor: u32) -> Self {
        match (major, minor) {
            (0..=1, _) | (2, 0..=11) => TorchNoise::Legacy,
            (2, 12) => TorchNoise::Torch2_12,
            _ => TorchNoise::Torch2_13,
        }
    }
}

impl std::str::FromStr for TorchNoise {
    type Err = Error;

    /// `legacy`, or a torch version `MAJOR.MINOR[.PATCH][+LOCAL]` (case and surrounding spaces
    /// ignored).
    fn from_str(s: &str) -> Result<Self> {
        let text = s.trim().to_ascii_lowercase();
        if text == "legacy" {
            return Ok(TorchNoise::Legacy);
        }
        let version = text.strip_prefix("torch").unwrap_or(&text).trim_start_matches(['=', '-', ' ', 'v']);
        let mut parts = version.split(['.', '+']);
        let number = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok());
        match (number(parts.next()), number(parts.next())) {
            (Some(major), Some(minor)) => Ok(Self::for_torch_version(major, minor)),
            _ => Err(Error::InvalidInput(format!(
                "`{s}` is neither `legacy` nor a torch version like `2.11` or `2.15` \
                 (legacy = torch <= 2.11, the default = torch >= 2.13)"
            ))),
        }
    }
}

impl std::fmt::Display for TorchNoise {
    /// A value [`TorchNoise::from_env`] accepts back: `2.13`, `2.12` or `legacy`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TorchNoise::Torch2_13 => "2.13",
            TorchNoise::Torch2_12 => "2.12",
            TorchNoise::Legacy => "legacy",
        })
    }
}

/// `c10::Half(float)` / `c10::BFloat16(float)`: round to nearest even, back in f32.
pub(super) fn round_to(dtype: NoiseDType, v: f32) -> f32 {
    match dtype {
        NoiseDType::F16 => half::f16::from_f32(v).to_f32(),
        NoiseDType::BF16 => half::bf16::from_f32(v).to_f32(),
        NoiseDType::F32 | NoiseDType::F64 => v,
    }
}

impl TorchGenerator {
    /// torch <= 2.11's `normal_fill<Half>` / `normal_fill<BFloat16>`: like `normal_fill<float>`
    /// (every uniform first, then the blocks, then the re-drawn tail block), in the half type.
    pub(super) fn normal_fill_half_math(&mut self, numel: usize, dtype: NoiseDType) -> Vec<f32> {
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_half(dtype)).collect();
        let mut blocks = data.chunks_exact_mut(16);
        blocks.by_ref().for_each(|block| box_muller16_half(block, dtype));
        if !blocks.into_remainder().is_empty() {
            let tail = &mut data[numel - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_half(dtype);
            }
            box_muller16_half(tail, dtype);
        }
        data
    }

    /// `uniform_real_distribution<Half>(0, 1)` (or `<BFloat16>`): `numeric_limits<T>::digits`
    /// random bits (11 or 8) of one `random()`, scaled in float; exact in the half type.
    fn uniform_half(&mut self, dtype: NoiseDType) -> f32 {
        let digits = if dtype == NoiseDType::F16 { 11 } else { 8 };
        (self.engine.next_u32() & ((1 << digits) - 1)) as f32 * (1.0 / (1u32 << digits) as f32)
    }
}

/// `normal_fill_16<Half>` (or `<BFloat16>`) with mean 0 and std 1, in place. Each step is what
/// c10's operators do: convert to float, compute, round back to the half type.
fn box_muller16_half(data: &mut [f32], dtype: NoiseDType) {
    const TWO_PI: f64 = 2.0 * std::f64::consts::PI;
    let round = |v: f32| round_to(dtype, v);
    for j in 0..8 {
        // `1 - Half` is a Half subtraction (exact for these uniforms).
        let u1 = round(1.0 - data[j]);
        let u2 = data[j + 8];
        // `std::log`/`std::sqrt` of a Half return a Half; `-2 * Half` is a Half product.
        let radius = round(round(-2.0 * round(u1.ln())).sqrt());
        // `2.0f * pi<double> * u2` is a double; Half has only a float constructor, so it is
        // rounded to float first, then to the half type.
        let theta = round((TWO_PI * u2 as f64) as f32);
        let (sin, cos) = (round(theta.sin()), round(theta.cos()));
        // `radius * cos * std + mean`, each a Half operation: with std 1 and mean 0 only the
        // product rounds, and `+ 0` turns -0 into +0.
        data[j] = round(radius * cos) + 0.0;
        data[j + 8] = round(radius * sin) + 0.0;
    }
}
