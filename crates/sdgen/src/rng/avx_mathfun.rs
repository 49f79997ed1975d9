//! Scalar, bit-exact ports of `log256_ps` and `sincos256_ps` from PyTorch's
//! `aten/src/ATen/native/cpu/avx_mathfun.h` (Giovanni Garberoglio's AVX port of Julien Pommier's
//! sse_mathfun, itself the Cephes `logf`/`sinf`/`cosf`).
//!
//! torch's AVX2 and AVX512 CPU builds run `torch.randn`'s float Box-Muller through these
//! polynomials (`NormalFill16<float>` in `DistributionTemplates.h`), so matching torch's noise
//! bit for bit means repeating every one of their float operations in the same order: each lane
//! of the vector code is independent, so a scalar loop over lanes gives the same bits. The masks
//! and integer tricks are kept as bit operations rather than rewritten as branches so the
//! correspondence with the C source stays line by line.
//!
//! FMA contraction: torch's Linux wheels are built by GCC (13.3 for torch 2.15) with `-mfma` for
//! the AVX2/AVX512 kernels, and GCC's default for C++ is `-ffp-contract=fast`. `_mm256_mul_ps`
//! and `_mm256_add_ps` are plain vector `*` and `+` in GCC's headers, so a product whose only use
//! is an add gets fused into one FMA. The `mul_add` calls below sit exactly where GCC's
//! `widening_mul` pass fuses (the first product, in statement order, feeding each add); the other
//! products stay rounded on their own. Without the fusion about 0.5% of the values come out 1-3
//! ulp off; with it, 2.7M values across seeds, sizes and dtypes match torch 2.15 bit for bit. (A
//! torch built by another compiler, e.g. MSVC on Windows, may not fuse and then differs like that.)

// The constants are spelled as in the header (the C compiler rounds each to the nearest f32), hence
// the allowed excess precision.
#![allow(clippy::excessive_precision)]

/// `cephes_SQRTHF` = 0.707106781186547524.
const SQRTHF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
const LOG_P: [f32; 9] = [
    7.037_683_629_2e-2,
    -1.151_461_031_0e-1,
    1.167_699_874_0e-1,
    -1.242_014_084_6e-1,
    1.424_932_278_7e-1,
    -1.666_805_766_5e-1,
    2.000_071_476_5e-1,
    -2.499_999_399_3e-1,
    3.333_333_117_4e-1,
];
const LOG_Q1: f32 = -2.121_944_40e-4;
const LOG_Q2: f32 = 0.693_359_375;
const MIN_NORM_POS: u32 = 0x0080_0000;
const MANT_MASK: u32 = 0x7f80_0000;
const SIGN_MASK: u32 = 0x8000_0000;

const MINUS_DP1: f32 = -0.785_156_25;
const MINUS_DP2: f32 = -2.418_756_484_985_351_562_5e-4;
const MINUS_DP3: f32 = -3.774_894_977_445_941_08e-8_f64 as f32;
const SINCOF_P0: f32 = -1.951_529_589_1e-4;
const SINCOF_P1: f32 = 8.332_160_873_6e-3;
const SINCOF_P2: f32 = -1.666_665_461_1e-1;
const COSCOF_P0: f32 = 2.443_315_711_809_948e-5_f64 as f32;
const COSCOF_P1: f32 = -1.388_731_625_493_765e-3_f64 as f32;
const COSCOF_P2: f32 = 4.166_664_568_298_827e-2_f64 as f32;
const FOPI: f32 = 1.273_239_544_735_16_f64 as f32;

/// All ones where `cond` holds, else zero: a lane of an AVX compare result.
fn mask(cond: bool) -> u32 {
    if cond {
        u32::MAX
    } else {
        0
    }
}

/// `f32` from bits, for the `_mm256_and_ps`/`_mm256_or_ps` steps.
fn f(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// One lane of `log256_ps`: natural log, NaN for `x <= 0`.
pub(crate) fn log_ps(x: f32) -> f32 {
    let one = 1.0_f32;
    let invalid_mask = mask(x <= 0.0);
    // `_mm256_max_ps(x, min_norm_pos)` returns the second operand when `x` is NaN.
    let min_norm = f(MIN_NORM_POS);
    let x = if x > min_norm { x } else { min_norm };
    let mut imm0 = (x.to_bits() >> 23) as i32;
    let mut x = f((x.to_bits() & !MANT_MASK) | 0.5_f32.to_bits());
    imm0 = imm0.wrapping_sub(0x7f);
    let mut e = imm0 as f32;
    e += one;

    let m = mask(x < SQRTHF);
    let tmp = f(x.to_bits() & m);
    x -= one;
    e -= f(one.to_bits() & m);
    x += tmp;

    let z = x * x;
    let mut y = LOG_P[0];
    for &p in &LOG_P[1..] {
        // Fused by GCC, like every `mul_add` here (see the module docs).
        y = y.mul_add(x, p);
    }
    y *= x;
    // `y*z` comes first in statement order, so it is the product fused with `+ e*q1`.
    y = y.mul_add(z, e * LOG_Q1);
    y = (-z).mul_add(0.5, y);
    x += y;
    x = e.mul_add(LOG_Q2, x);
    f(x.to_bits() | invalid_mask)
}

/// One lane of `sincos256_ps`: `(sin x, cos x)`, accurate for `|x| < 8192`.
pub(crate) fn sincos_ps(x: f32) -> (f32, f32) {
    let mut sign_bit_sin = x.to_bits() & SIGN_MASK;
    let mut x = f(x.to_bits() & !SIGN_MASK);
    let y = x * FOPI;

    // `_mm256_cvttps_epi32`: truncation; out-of-range lanes give i32::MIN (0x80000000).
    let mut imm2 = if y.is_finite() && y.abs() < 2_147_483_648.0 { y as i32 } else { i32::MIN };
    imm2 = imm2.wrapping_add(1) & !1;
    let y = imm2 as f32;
    let imm4 = imm2;

    let swap_sign_bit_sin = ((imm2 & 4) as u32) << 29;
    let poly_mask = mask(imm2 & 2 == 0);

    // Extended precision modular arithmetic: x = ((x - y*DP1) - y*DP2) - y*DP3.
    x = y.mul_add(MINUS_DP1, x);
    x = y.mul_add(MINUS_DP2, x);
    x = y.mul_add(MINUS_DP3, x);

    let sign_bit_cos = ((!imm4.wrapping_sub(2) & 4) as u32) << 29;
    sign_bit_sin ^= swap_sign_bit_sin;

    // First polynomial (0 <= x <= Pi/4): cosine.
    let z = x * x;
    let mut y = COSCOF_P0.mul_add(z, COSCOF_P1);
    y = y.mul_add(z, COSCOF_P2);
    y *= z;
    y = y.mul_add(z, -(z * 0.5));
    y += 1.0;

    // Second polynomial (Pi/4 <= x <= 0): sine.
    let mut y2 = SINCOF_P0.mul_add(z, SINCOF_P1);
    y2 = y2.mul_add(z, SINCOF_P2);
    y2 *= z;
    y2 = y2.mul_add(x, x);

    // Select the right polynomial for each output.
    let ysin2 = f(poly_mask & y2.to_bits());
    let ysin1 = f(!poly_mask & y.to_bits());
    let y2 = y2 - ysin2;
    let y = y - ysin1;
    let xmm1 = ysin1 + ysin2;
    let xmm2 = y + y2;
    (f(xmm1.to_bits() ^ sign_bit_sin), f(xmm2.to_bits() ^ sign_bit_cos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_and_sincos_are_close_to_libm() {
        for i in 1..=1000 {
            let x = i as f32 / 1000.0;
            assert!((log_ps(x) - x.ln()).abs() <= 2e-7 * x.ln().abs().max(1.0), "log({x})");
            let t = x * std::f32::consts::TAU;
            let (s, c) = sincos_ps(t);
            assert!((s - t.sin()).abs() <= 3e-7, "sin({t})");
            assert!((c - t.cos()).abs() <= 3e-7, "cos({t})");
        }
        assert!(log_ps(0.0).is_nan() && log_ps(-1.0).is_nan());
        assert_eq!(log_ps(1.0), 0.0);
    }
}
