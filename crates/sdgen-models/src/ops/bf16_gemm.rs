//! bf16 matrix products on x86-64 processors with AVX512-BF16: `vdpbf16ps` multiplies 16 pairs of
//! bf16 values from each operand and adds both products of a pair to one of 16 f32 accumulators,
//! twice the multiply-adds of an f32 FMA per instruction, from half the bytes. Products are
//! exact (8-bit significands) and sums are f32, as PyTorch's oneDNN bf16 GEMMs accumulate.
//!
//! Operands are read where they lie, in the layouts the callers make for them (no packing here):
//! `A` (`m × k`, bf16) row-major with `k` contiguous, read as 32-bit pairs `(a[i, 2p], a[i, 2p+1])`
//! and broadcast; `B` (`k × n`) "pair-interleaved" (oneDNN's VNNI layout): row `p` holds
//! `(b[2p, j], b[2p+1, j])` as one 32-bit word per column `j`, so 16 columns are one vector load.
//! The convolution unfolds its column straight into that layout and the linears and attention
//! interleave their right-hand operand once per call ([`interleave_rows`], [`interleave_cols`]).
//! `C` (`m × n`, f32) is written or added to.
//!
//! Each [`MR`] × [`NR`] tile of `C` is held in 24 of the 32 vector registers over a block of
//! [`KC`] pairs; tiles are grouped into [`MC`] × [`NC`] blocks, one rayon task each.

use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

/// Rows of `C` per register tile.
pub(crate) const MR: usize = 8;
/// 16-column vectors of `C` per register tile.
pub(crate) const NV: usize = 3;
/// Columns of `C` per register tile.
pub(crate) const NR: usize = 16 * NV;
/// Pairs of `k` per pass over a tile: its `B` panel (`KC · NR` words, 24 KiB) stays in the L1
/// cache while every row tile of the block passes over it.
const KC: usize = 128;
/// Rows of `C` per task.
const MC: usize = MR * 12;
/// Columns of `C` per task.
const NC: usize = NR * 8;
/// Multiply-adds below which one call runs on the calling thread (rayon's hand-off costs more).
const SERIAL_WORK: usize = 1 << 21;

/// Whether this processor has AVX512-BF16 (and AVX512-F), detected once.
pub(crate) fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// The left operand: `m` rows of `2 · pairs` bf16 values, row `i` starting at `i · ld`.
#[derive(Clone, Copy)]
pub(crate) struct Lhs<'a> {
    pub data: &'a [u16],
    pub ld: usize,
}

/// The right operand, pair-interleaved: `pairs` rows of `n` 32-bit words, row `p` at `p · ld`.
#[derive(Clone, Copy)]
pub(crate) struct Rhs<'a> {
    pub data: &'a [u32],
    pub ld: usize,
}

/// `c[i, j] (+)= Σ_p a[i, 2p]·b[2p, j] + a[i, 2p+1]·b[2p+1, j]` for `i < m`, `j < n`, `p < pairs`,
/// with `c`'s rows `ldc` apart; added to what `c` holds when `accumulate`. On all cores when
/// `parallel` and the product is large enough. Panics if the processor lacks AVX512-BF16
/// (callers check [`supported`]) or an operand is too short for its shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    pairs: usize,
    a: Lhs,
    b: Rhs,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    assert!(supported(), "bf16 GEMM on a processor without AVX512-BF16");
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.data.len() >= (m - 1) * a.ld + 2 * pairs && ldc >= n && c.len() >= (m - 1) * ldc + n);
    assert!(pairs == 0 || b.data.len() >= (pairs - 1) * b.ld + n);
    if pairs == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    let (row_blocks, col_blocks) = (m.div_ceil(MC), n.div_ceil(NC));
    let c_at = c.as_mut_ptr() as usize;
    let block = |task: usize| {
        let (i0, j0) = ((task / col_blocks) * MC, (task % col_blocks) * NC);
        let (rows, cols) = (MC.min(m - i0), NC.min(n - j0));
        // SAFETY: the assertions above keep every tile of this block inside the operands (the
        // tile reads `a` rows i0.., `b` columns j0.. under masks for partial tiles); blocks
        // are disjoint in `c`, so no two tasks write one element; the processor was checked.
        unsafe {
            block(
                rows,
                cols,
                pairs,
                a.data.as_ptr().add(i0 * a.ld),
                a.ld,
                b,
                j0,
                (c_at as *mut f32).add(i0 * ldc + j0),
                ldc,
                accumulate,
            )
        }
    };
    let tasks = row_blocks * col_blocks;
    if parallel && tasks > 1 && m * n * pairs * 2 >= SERIAL_WORK {
        (0..tasks).into_par_iter().for_each(block);
    } else {
        (0..tasks).for_each(block);
    }
}

/// One task's block: `rows × cols` of `c` (already offset), `b`'s columns from `j0`. Per block
/// of [`KC`] pairs, each [`NR`]-column panel of `b` is copied into a contiguous `[pair][NR]`
/// that every row tile then reads from L1 (rows of `b` a power of two apart would otherwise
/// map to the same few L1 sets). `a` is read in place (each tile reads `MR` row streams).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block(
    rows: usize,
    cols: usize,
    pairs: usize,
    a: *const u16,
    lda: usize,
    b: Rhs,
    j0: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.resize(KC * NR, 0);
        let b_pack = &mut scratch[..];
        for p0 in (0..pairs).step_by(KC) {
            let kc = KC.min(pairs - p0);
            let add = accumulate || p0 > 0;
            for j in (0..cols).step_by(NR) {
                let width = NR.min(cols - j);
                for p in 0..kc {
                    let src = &b.data[(p0 + p) * b.ld + j0 + j..][..width];
                    b_pack[p * NR..p * NR + width].copy_from_slice(src);
                }
                for i in (0..rows).step_by(MR) {
                    let ap = a.add(i * lda + 2 * p0);
                    tile_any(MR.min(rows - i), width, kc, ap, lda, b_pack.as_ptr(), c.add(i * ldc + j), ldc, add);
                }
            }
        }
    })
}

/// A tile of `height ≤ MR` rows and `width ≤ NR` columns, through the kernel of its size.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_any(
    height: usize,
    width: usize,
    kc: usize,
    a: *const u16,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    macro_rules! by_height {
        ($nv:literal) => {
            match height {
                8 => tile::<8, $nv>(kc, a, lda, b, c, ldc, width, add),
                7 => tile::<7, $nv>(kc, a, lda, b, c, ldc, width, add),
                6 => tile::<6, $nv>(kc, a, lda, b, c, ldc, width, add),
                5 => tile::<5, $nv>(kc, a, lda, b, c, ldc, width, add),
                4 => tile::<4, $nv>(kc, a, lda, b, c, ldc, width, add),
                3 => tile::<3, $nv>(kc, a, lda, b, c, ldc, width, add),
                2 => tile::<2, $nv>(kc, a, lda, b, c, ldc, width, add),
                _ => tile::<1, $nv>(kc, a, lda, b, c, ldc, width, add),
            }
        };
    }
    match width.div_ceil(16) {
        3 => by_height!(3),
        2 => by_height!(2),
        _ => by_height!(1),
    }
}

/// The register tile: `R` rows × `V` vectors of `c`, over `kc` pairs of `a` (rows `lda` apart)
/// and the packed `b` (`[pair][NR]`); columns from `width` on are neither read nor written.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const R: usize, const V: usize>(
    kc: usize,
    a: *const u16,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    width: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut masks = [0xffffu16; V];
    for (v, mask) in masks.iter_mut().enumerate() {
        let lanes = width.saturating_sub(16 * v).min(16);
        *mask = ((1u32 << lanes) - 1) as u16;
    }
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for p in 0..kc {
        let bp = b.add(p * NR);
        let mut bv = [_mm512_setzero_si512(); V];
        for v in 0..V {
            bv[v] = _mm512_loadu_si512(bp.add(16 * v) as *const __m512i);
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let pair = (a.add(i * lda + 2 * p) as *const u32).read_unaligned();
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
            for v in 0..V {
                row[v] = _mm512_dpbf16_ps(row[v], ai, std::mem::transmute::<__m512i, __m512bh>(bv[v]));
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for v in 0..V {
            let cp = c.add(i * ldc + 16 * v);
            let sum = if add { _mm512_add_ps(row[v], _mm512_maskz_loadu_ps(masks[v], cp)) } else { row[v] };
            _mm512_mask_storeu_ps(cp, masks[v], sum);
        }
    }
}

/// `dst[p·n + j] = (src[2p][j], src[2p+1][j])` for the `rows × n` bf16 matrix `src` (rows `ld`
/// apart): a row-major right-hand operand interleaved (the attention's values, `rows` their
/// tokens), a zero second half for the last pair when `rows` is odd.
pub(crate) fn interleave_rows(src: &[u16], rows: usize, n: usize, ld: usize, dst: &mut [u32]) {
    for (p, out) in dst.chunks_mut(n).take(rows.div_ceil(2)).enumerate() {
        let lo = &src[2 * p * ld..2 * p * ld + n];
        if 2 * p + 1 < rows {
            let hi = &src[(2 * p + 1) * ld..(2 * p + 1) * ld + n];
            out.iter_mut().zip(lo.iter().zip(hi)).for_each(|(o, (&l, &h))| *o = l as u32 | (h as u32) << 16);
        } else {
            out.iter_mut().zip(lo).for_each(|(o, &l)| *o = l as u32);
        }
    }
}

/// `dst[p·ldd + j] = (src[j][2p], src[j][2p+1])` for `n` rows of `2·pairs` bf16 values (rows `ld`
/// apart): a transposed right-hand operand interleaved (a linear's weight `[out, in]`, the
/// attention's keys), `dst` rows `ldd ≥ n` apart.
pub(crate) fn interleave_cols(src: &[u16], n: usize, pairs: usize, ld: usize, dst: &mut [u32], ldd: usize) {
    // Blocks of 16 source rows: each reads 16 short runs and writes whole output rows' pieces.
    const BLOCK: usize = 16;
    for j0 in (0..n).step_by(BLOCK) {
        let rows = BLOCK.min(n - j0);
        for p in 0..pairs {
            let out = &mut dst[p * ldd + j0..p * ldd + j0 + rows];
            for (r, o) in out.iter_mut().enumerate() {
                let at = (j0 + r) * ld + 2 * p;
                *o = src[at] as u32 | (src[at + 1] as u32) << 16;
            }
        }
    }
}

/// The bf16 bits of `x`, rounded to nearest even (as `half::bf16::from_f32`: NaN stays NaN).
pub(crate) fn to_bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// `src` rounded to bf16 into `dst` (as [`to_bf16_bits`]), on all cores for long slices.
pub(crate) fn round_to_bf16(src: &[f32], dst: &mut [bf16]) {
    const CHUNK: usize = 1 << 16;
    let convert = |(s, d): (&[f32], &mut [bf16])| d.iter_mut().zip(s).for_each(|(d, &s)| *d = bf16::from_f32(s));
    if src.len() > CHUNK {
        src.par_chunks(CHUNK).zip(dst.par_chunks_mut(CHUNK)).for_each(convert);
    } else {
        convert((src, dst));
    }
}
