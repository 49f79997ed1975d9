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
//!
//! [`gemm_f32`] runs f32 products through the same blocks and tiles, one FMA per value of `k`
//! where the bf16 kernel takes a pair: the f32 convolutions and linears of the CPU path.

use std::sync::OnceLock;

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

/// The right operand, `depth` units deep (bf16 pairs, interleaved; or f32 values as their bits).
#[derive(Clone, Copy)]
pub(crate) enum Rhs<'a> {
    /// `depth` rows of `n` words, row `p` at `p · ld`: read where it lies, each task copying the
    /// panels it multiplies into the kernels' order first.
    Rows { data: &'a [u32], ld: usize },
    /// Already in the kernels' order: [`NR`]-column panels, each `[depth][NR]` ([`pack_panels`],
    /// [`PanelWriter`]), read in place. The convolutions unfold straight into it and the linears
    /// pack their weight into it, so no task copies a panel (once per 96 rows of the product, 8%
    /// of a bf16 convolution's time).
    Panels { data: &'a [u32], depth: usize },
}

/// Words an operand of `n` columns, `depth` units deep, takes as [`Rhs::Panels`] (the last panel
/// padded to [`NR`] columns).
pub(crate) fn panels_len(n: usize, depth: usize) -> usize {
    n.div_ceil(NR) * depth * NR
}

/// Fills `panels` ([`panels_len`] words) with the operand whose unit `p` of column `j` is
/// `word(j, p)`, one panel per task on all cores.
pub(crate) fn pack_panels(n: usize, depth: usize, panels: &mut [u32], word: impl Fn(usize, usize) -> u32 + Sync) {
    if depth == 0 {
        return;
    }
    panels.par_chunks_mut(depth * NR).take(n.div_ceil(NR)).enumerate().for_each(|(q, panel)| {
        for lane in 0..NR.min(n - q * NR) {
            for p in 0..depth {
                panel[p * NR + lane] = word(q * NR + lane, p);
            }
        }
    });
}

/// Writes whole unit rows of an [`Rhs::Panels`] operand from several threads at once (a
/// convolution unfolds each row of its column on its own task).
pub(crate) struct PanelWriter {
    panels: usize,
    n: usize,
    depth: usize,
}

impl PanelWriter {
    /// A writer into `panels` for `n` columns, `depth` units deep.
    pub fn new(panels: &mut [u32], n: usize, depth: usize) -> Self {
        assert!(panels.len() >= panels_len(n, depth), "panels too short for {n} columns × {depth}");
        Self { panels: panels.as_mut_ptr() as usize, n, depth }
    }

    /// Unit row `p` of the operand: `row`'s `n` words into their panels.
    ///
    /// # Safety
    /// No two calls for the same `p` may run at once, and the buffer given to [`Self::new`] must
    /// outlive the calls and not be read meanwhile.
    pub unsafe fn write_row(&self, p: usize, row: &[u32]) {
        assert!(
            p < self.depth && row.len() >= self.n,
            "row {p} of {} with {} of {} words",
            self.depth,
            row.len(),
            self.n
        );
        let base = self.panels as *mut u32;
        for (q, chunk) in row[..self.n].chunks(NR).enumerate() {
            std::ptr::copy_nonoverlapping(chunk.as_ptr(), base.add(q * self.depth * NR + p * NR), chunk.len());
        }
    }
}

/// An f32 slice as the bits the kernels read.
pub(crate) fn f32_bits(x: &[f32]) -> &[u32] {
    // SAFETY: f32 and u32 have the same size and alignment, and every bit pattern is a u32.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u32, x.len()) }
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
    assert!(m == 0 || n == 0 || (ldc >= n && c.len() >= (m - 1) * ldc + n));
    let sink = Sink::F32 { c: c.as_mut_ptr() as usize, ldc, accumulate };
    run::<false>(m, n, pairs, a.units(m, pairs), b, sink, parallel);
}

/// The f32 product `c[i, j] (+)= Σ_p a[i, p]·b[p, j]` (`a` rows `lda` apart, `b` as its bits
/// ([`f32_bits`]), `k` units deep, `c` rows `ldc` apart) through the same blocks and tiles as
/// the bf16 one, one FMA per `p` instead of a pair. Same panics as [`gemm`]: it needs
/// AVX512-BF16's [`supported`] too (one family of kernels, compiled for one feature set;
/// processors with AVX-512 but no bf16 keep the `gemm` crate).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    (a, lda): (&[f32], usize),
    b: Rhs,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    assert!(m == 0 || n == 0 || (ldc >= n && c.len() >= (m - 1) * ldc + n));
    assert!(m == 0 || a.len() >= (m - 1) * lda + k, "a is too short for {m} rows of {k}");
    let a = Units { data: a.as_ptr() as usize, ld_bytes: 4 * lda };
    let sink = Sink::F32 { c: c.as_mut_ptr() as usize, ldc, accumulate };
    run::<true>(m, n, k, a, b, sink, parallel);
}

/// A bias added to the sums before they are rounded: one value per row of the product (a
/// convolution's output channels) or per column (a linear's outputs).
#[derive(Clone, Copy)]
pub(crate) enum Bias<'a> {
    None,
    PerRow(&'a [f32]),
    PerColumn(&'a [f32]),
}

/// The product of [`gemm`] plus `bias`, rounded once to bf16 (nearest even) into `out` (rows
/// `ldo` apart): each task sums its block over every pair in an f32 scratch that stays in cache
/// and rounds it as it is finished, so no f32 copy of the whole output is ever written, filled
/// with the bias first or read back to round — at a linear's 8192 × 1280 outputs that f32
/// matrix cost more than the product (42 MB, a fresh mapping per call). The sum is
/// `(Σ products) + bias`, oneDNN's order. Same panics as [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_to_bf16(
    m: usize,
    n: usize,
    pairs: usize,
    a: Lhs,
    b: Rhs,
    out: &mut [u16],
    ldo: usize,
    bias: Bias,
    parallel: bool,
) {
    assert!(m == 0 || n == 0 || (ldo >= n && out.len() >= (m - 1) * ldo + n));
    match bias {
        Bias::PerRow(v) => assert!(v.len() >= m, "a bias per row needs {m} values"),
        Bias::PerColumn(v) => assert!(v.len() >= n, "a bias per column needs {n} values"),
        Bias::None => {}
    }
    let sink = Sink::Bf16 { out: out.as_mut_ptr() as usize, ldo, bias };
    run::<false>(m, n, pairs, a.units(m, pairs), b, sink, parallel);
}

impl Lhs<'_> {
    /// The operand as the kernels read it, checked to hold `m` rows of `pairs` pairs.
    fn units(&self, m: usize, pairs: usize) -> Units {
        assert!(m == 0 || self.data.len() >= (m - 1) * self.ld + 2 * pairs, "a is too short for {m} rows");
        Units { data: self.data.as_ptr() as usize, ld_bytes: 2 * self.ld }
    }
}

/// A left operand as the kernels read it: rows of 32-bit units (a bf16 pair, or one f32) that
/// each product's step broadcasts, rows `ld_bytes` apart from the address `data`. The callers
/// checked its length.
#[derive(Clone, Copy)]
struct Units {
    data: usize,
    ld_bytes: usize,
}

/// Where a task's sums go (addresses as integers, so the closure run on every thread is `Sync`).
#[derive(Clone, Copy)]
enum Sink<'a> {
    F32 { c: usize, ldc: usize, accumulate: bool },
    Bf16 { out: usize, ldo: usize, bias: Bias<'a> },
}

/// The product split into [`MC`] × [`NC`] blocks, one task each, delivered to `sink`; `pairs`
/// units deep (bf16 pairs, or f32 values when `F32`). The callers checked that `a` holds `m`
/// rows and the output `m` rows of `n`.
fn run<const F32: bool>(m: usize, n: usize, pairs: usize, a: Units, b: Rhs, sink: Sink, parallel: bool) {
    assert!(supported(), "bf16 GEMM on a processor without AVX512-BF16");
    if m == 0 || n == 0 {
        return;
    }
    match b {
        Rhs::Rows { data, ld } => assert!(pairs == 0 || data.len() >= (pairs - 1) * ld + n),
        Rhs::Panels { data, depth } => assert!(depth >= pairs && data.len() >= panels_len(n, depth)),
    }
    if let (0, Sink::F32 { c, ldc, accumulate: false }) = (pairs, sink) {
        // SAFETY: the caller checked that `c` holds `m` rows of `n`, `ldc` apart.
        let c = unsafe { std::slice::from_raw_parts_mut(c as *mut f32, (m - 1) * ldc + n) };
        c.chunks_mut(ldc).for_each(|row| row[..n].fill(0.0));
        return;
    }
    let (row_blocks, col_blocks) = (m.div_ceil(MC), n.div_ceil(NC));
    let task = |task: usize| {
        let (i0, j0) = ((task / col_blocks) * MC, (task % col_blocks) * NC);
        let (rows, cols) = (MC.min(m - i0), NC.min(n - j0));
        let a_rows = (a.data as *const u8).wrapping_add(i0 * a.ld_bytes);
        // SAFETY: the assertions above keep every tile of this block inside the operands (the
        // tile reads `a` rows i0.., `b` columns j0.. under masks for partial tiles) and the
        // output (checked by the callers); blocks are disjoint in the output, so no two tasks
        // write one element; the processor was checked.
        unsafe {
            match sink {
                Sink::F32 { c, ldc, accumulate } => {
                    let c = (c as *mut f32).add(i0 * ldc + j0);
                    block::<F32>(rows, cols, pairs, a_rows, a.ld_bytes, b, j0, c, ldc, accumulate);
                }
                Sink::Bf16 { out, ldo, bias } => {
                    let out = (out as *mut u16).add(i0 * ldo + j0);
                    SUMS.with_borrow_mut(|sums| {
                        sums.resize(MC * NC, 0.0);
                        if pairs == 0 {
                            sums.fill(0.0); // no product: the bias alone
                        }
                        block::<F32>(rows, cols, pairs, a_rows, a.ld_bytes, b, j0, sums.as_mut_ptr(), NC, false);
                        round_block(&sums[..], rows, cols, bias, i0, j0, out, ldo);
                    });
                }
            }
        }
    };
    let tasks = row_blocks * col_blocks;
    if parallel && tasks > 1 && m * n * pairs * 2 >= SERIAL_WORK {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

thread_local! {
    /// A task's f32 sums for [`gemm_to_bf16`] ([`MC`] × [`NC`], 144 KiB: in the L2 cache).
    static SUMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rounds a finished block of sums (rows [`NC`] apart) plus its bias to bf16 into `out`.
///
/// # Safety
/// `out` must hold `rows` rows of `cols` values, `ldo` apart, written by no one else; the
/// processor must have AVX512-BF16.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_block(
    sums: &[f32],
    rows: usize,
    cols: usize,
    bias: Bias,
    i0: usize,
    j0: usize,
    out: *mut u16,
    ldo: usize,
) {
    use std::arch::x86_64::*;
    for r in 0..rows {
        let src = &sums[r * NC..r * NC + cols];
        let dst = std::slice::from_raw_parts_mut(out.add(r * ldo), cols);
        let bias_at = |j: usize| match bias {
            Bias::None => 0.0,
            Bias::PerRow(b) => b[i0 + r],
            Bias::PerColumn(b) => b[j0 + j],
        };
        let mut j = 0;
        while j + 16 <= cols {
            let mut v = _mm512_loadu_ps(src.as_ptr().add(j));
            match bias {
                Bias::None => {}
                Bias::PerRow(b) => v = _mm512_add_ps(v, _mm512_set1_ps(b[i0 + r])),
                Bias::PerColumn(b) => v = _mm512_add_ps(v, _mm512_loadu_ps(b[j0 + j..j0 + j + 16].as_ptr())),
            }
            let rounded = _mm512_cvtneps_pbh(v);
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(j) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(rounded),
            );
            j += 16;
        }
        // The last columns (under 16) through `half`, as `to_bf16_scaled` rounds its tail.
        for (j, (d, &x)) in dst.iter_mut().zip(src).enumerate().skip(j) {
            *d = half::bf16::from_f32(x + bias_at(j)).to_bits();
        }
    }
}

/// One task's block: `rows × cols` of `c` (already offset), `b`'s columns from `j0`, `a`'s rows
/// `lda` bytes apart. Per block of [`KC`] units, each [`NR`]-column panel of `b` is a contiguous
/// `[unit][NR]` that every row tile then reads from L1: copied so from [`Rhs::Rows`] (rows of
/// `b` a power of two apart would otherwise map to the same few L1 sets), in place from
/// [`Rhs::Panels`]. `a` is read in place (each tile reads `MR` row streams).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block<const F32: bool>(
    rows: usize,
    cols: usize,
    pairs: usize,
    a: *const u8,
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
                let panel = match b {
                    Rhs::Rows { data, ld } => {
                        for p in 0..kc {
                            let src = &data[(p0 + p) * ld + j0 + j..][..width];
                            b_pack[p * NR..p * NR + width].copy_from_slice(src);
                        }
                        b_pack.as_ptr()
                    }
                    // `j0 + j` is a multiple of NR (NC is), so the tile starts a panel.
                    Rhs::Panels { data, depth } => data.as_ptr().add((j0 + j) / NR * depth * NR + p0 * NR),
                };
                for i in (0..rows).step_by(MR) {
                    let ap = a.add(i * lda + 4 * p0);
                    tile_any::<F32>(MR.min(rows - i), width, kc, ap, lda, panel, c.add(i * ldc + j), ldc, add);
                }
            }
        }
    })
}

/// A tile of `height ≤ MR` rows and `width ≤ NR` columns, through the kernel of its size.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_any<const F32: bool>(
    height: usize,
    width: usize,
    kc: usize,
    a: *const u8,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    macro_rules! by_height {
        ($nv:literal) => {
            match height {
                8 => tile::<8, $nv, F32>(kc, a, lda, b, c, ldc, width, add),
                7 => tile::<7, $nv, F32>(kc, a, lda, b, c, ldc, width, add),
                6 => tile::<6, $nv, F32>(kc, a, lda, b, c, ldc, width, add),
                5 => tile::<5, $nv, F32>(kc, a, lda, b, c, ldc, width, add),
                4 => tile::<4, $nv, F32>(kc, a, lda, b, c, ldc, width, add),
                3 => tile::<3, $nv, F32>(kc, a, lda, b, c, ldc, width, add),
                2 => tile::<2, $nv, F32>(kc, a, lda, b, c, ldc, width, add),
                _ => tile::<1, $nv, F32>(kc, a, lda, b, c, ldc, width, add),
            }
        };
    }
    match width.div_ceil(16) {
        3 => by_height!(3),
        2 => by_height!(2),
        _ => by_height!(1),
    }
}

/// The register tile: `R` rows × `V` vectors of `c`, over `kc` units of `a` (rows `lda` bytes
/// apart) and the packed `b` (`[unit][NR]`); columns from `width` on are neither read nor
/// written. A unit is a bf16 pair (one `vdpbf16ps`), or one f32 when `F32` (one FMA).
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const R: usize, const V: usize, const F32: bool>(
    kc: usize,
    a: *const u8,
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
        for (v, vector) in bv.iter_mut().enumerate() {
            *vector = _mm512_loadu_si512(bp.add(16 * v) as *const __m512i);
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let unit = (a.add(i * lda + 4 * p) as *const u32).read_unaligned();
            if F32 {
                let ai = _mm512_set1_ps(f32::from_bits(unit));
                for v in 0..V {
                    row[v] = _mm512_fmadd_ps(ai, _mm512_castsi512_ps(bv[v]), row[v]);
                }
            } else {
                let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(unit as i32));
                for v in 0..V {
                    row[v] = _mm512_dpbf16_ps(row[v], ai, std::mem::transmute::<__m512i, __m512bh>(bv[v]));
                }
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

/// `src[i] · scale` rounded to bf16 (nearest even) into `dst`, 16 at a time with
/// `vcvtneps2bf16`, which flushes subnormal values (below 1.2e-38) to zero as oneDNN's conversion
/// does; a short tail through `half`. Panics without AVX512-BF16 (callers check [`supported`]).
pub(crate) fn to_bf16_scaled(src: &[f32], scale: f32, dst: &mut [u16]) {
    assert!(supported() && dst.len() >= src.len(), "bf16 conversion without AVX512-BF16 or room");
    // SAFETY: the processor has AVX512-BF16 and `dst` holds `src.len()` values (checked above).
    unsafe { to_bf16_avx512(src, scale, dst) }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn to_bf16_avx512(src: &[f32], scale: f32, dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let scales = _mm512_set1_ps(scale);
    let mut chunks = src.chunks_exact(16);
    for (i, chunk) in chunks.by_ref().enumerate() {
        let rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(chunk.as_ptr()), scales));
        _mm256_storeu_si256(
            dst.as_mut_ptr().add(16 * i) as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(rounded),
        );
    }
    let done = src.len() - chunks.remainder().len();
    for (d, &x) in dst[done..].iter_mut().zip(chunks.remainder()) {
        *d = half::bf16::from_f32(x * scale).to_bits();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// Values in [−0.5, 0.5) rounded to bf16, from a xorshift (reproducible, no RNG crate).
    fn values(n: usize, seed: u64) -> Vec<bf16> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                bf16::from_f32((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            })
            .collect()
    }

    /// The product against f64 sums of the same bf16 values, over every edge the blocking has:
    /// partial row and column tiles, a reduction past one 128-pair block and not a multiple of
    /// it, `a` read at an odd offset with padded rows, `b` interleaved from row-major and from
    /// transposed storage into rows wider than `n`, `c` rows wider than `n` (untouched past
    /// `n`), writing or adding, serial and threaded: within 1e-4·√k (f32 sums of k products
    /// of magnitude ≤ 1/4).
    #[test]
    fn the_product_equals_f64_sums_on_every_edge() {
        if !supported() {
            return;
        }
        for (m, n, k) in [(1, 1, 2), (7, 17, 6), (9, 49, 258), (100, 500, 300), (200, 33, 4098), (13, 5, 10)] {
            for (accumulate, parallel, transposed) in
                [(false, true, false), (true, false, false), (false, false, true), (true, true, true)]
            {
                let (a, b) = (values(m * k + 3, 1), values(k * n, 2));
                let (a_bits, b_bits): (Vec<u16>, Vec<u16>) =
                    (a.iter().map(|v| v.to_bits()).collect(), b.iter().map(|v| v.to_bits()).collect());
                let (pairs, ldb) = (k / 2, n + 5);
                let mut packed = vec![0u32; pairs * ldb];
                if transposed {
                    let bt: Vec<u16> =
                        (0..n).flat_map(|j| (0..k).map(move |r| (j, r))).map(|(j, r)| b_bits[r * n + j]).collect();
                    interleave_cols(&bt, n, pairs, k, &mut packed, ldb);
                } else {
                    let mut rows = vec![0u32; pairs * n];
                    interleave_rows(&b_bits, k, n, n, &mut rows);
                    for p in 0..pairs {
                        packed[p * ldb..p * ldb + n].copy_from_slice(&rows[p * n..(p + 1) * n]);
                    }
                }
                let ldc = n + 3;
                let init: Vec<f32> = (0..m * ldc).map(|i| (i % 7) as f32 * 0.25).collect();
                let mut c = init.clone();
                gemm(
                    m,
                    n,
                    pairs,
                    Lhs { data: &a_bits[1..], ld: k },
                    Rhs::Rows { data: &packed, ld: ldb },
                    &mut c,
                    ldc,
                    accumulate,
                    parallel,
                );
                for i in 0..m {
                    for j in 0..ldc {
                        let want = if j < n {
                            let sum: f64 = (0..k).map(|r| a[1 + i * k + r].to_f64() * b[r * n + j].to_f64()).sum();
                            sum as f32 + if accumulate { init[i * ldc + j] } else { 0.0 }
                        } else {
                            init[i * ldc + j]
                        };
                        let got = c[i * ldc + j];
                        assert!(
                            (got - want).abs() <= 1e-4 * (k as f32).sqrt(),
                            "{m}×{n}×{k} at ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The rounded product with its bias (per row, per column, none) against f64 sums of the
    /// same values plus the bias, rounded to bf16: within one bf16 step (the f32 sum may land
    /// on the other side of a rounding boundary) and the f32 sum's error, on partial tiles, several tasks, a reduction
    /// past one pair block, output rows wider than `n` (untouched past `n`), serial and threaded.
    #[test]
    fn the_rounded_product_adds_the_bias_once() {
        if !supported() {
            return;
        }
        for (m, n, k) in [(1, 1, 2), (9, 49, 258), (100, 500, 300), (200, 33, 64), (5, 7, 0)] {
            for (kind, parallel) in [(0, true), (1, false), (2, true)] {
                let (a, b) = (values(m * k, 3), values(k * n, 4));
                let (a_bits, b_bits): (Vec<u16>, Vec<u16>) =
                    (a.iter().map(|v| v.to_bits()).collect(), b.iter().map(|v| v.to_bits()).collect());
                let mut packed = vec![0u32; k / 2 * n];
                interleave_rows(&b_bits, k, n, n, &mut packed);
                let rows: Vec<f32> = (0..m).map(|i| i as f32 * 0.125 - 3.0).collect();
                let cols: Vec<f32> = (0..n).map(|j| 2.0 - j as f32 * 0.0625).collect();
                let (bias, bias_at): (Bias, Box<dyn Fn(usize, usize) -> f64>) = match kind {
                    0 => (Bias::None, Box::new(|_, _| 0.0)),
                    1 => (Bias::PerRow(&rows), Box::new(|i, _| rows[i] as f64)),
                    _ => (Bias::PerColumn(&cols), Box::new(|_, j| cols[j] as f64)),
                };
                let ldo = n + 2;
                let mut out = vec![0x7fc1u16; m * ldo];
                let (lhs, rhs) = (Lhs { data: &a_bits, ld: k }, Rhs::Rows { data: &packed, ld: n });
                gemm_to_bf16(m, n, k / 2, lhs, rhs, &mut out, ldo, bias, parallel);
                for i in 0..m {
                    for j in n..ldo {
                        assert_eq!(out[i * ldo + j], 0x7fc1, "{m}×{n}×{k}: ({i}, {j}) past n was written");
                    }
                    for j in 0..n {
                        let sum: f64 = (0..k).map(|r| a[i * k + r].to_f64() * b[r * n + j].to_f64()).sum();
                        let want = bf16::from_f64(sum + bias_at(i, j));
                        let got = bf16::from_bits(out[i * ldo + j]);
                        // One bf16 step (2^-7 relative), plus the f32 sum's own error where the
                        // bias cancels the sum to near zero.
                        let step = want.to_f32().abs() / 128.0 + 1e-4 * (k as f32).sqrt();
                        assert!(
                            (got.to_f32() - want.to_f32()).abs() <= step,
                            "{m}×{n}×{k}, bias {kind}, at ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The f32 product against f64 sums on the same edges: partial tiles, a reduction past one
    /// 128-unit block, padded rows of `a`, `b` and `c` (untouched past `n`), writing or adding,
    /// serial and threaded: within f32 rounding of the sums (k products of magnitude ≤ 1/4).
    #[test]
    fn the_f32_product_equals_f64_sums_on_every_edge() {
        if !supported() {
            return;
        }
        for (m, n, k) in [(1, 1, 1), (7, 17, 3), (9, 49, 129), (100, 500, 300), (200, 33, 2049), (13, 5, 0)] {
            for (accumulate, parallel) in [(false, true), (true, false), (true, true)] {
                let (lda, ldb, ldc) = (k + 3, n + 5, n + 2);
                let a: Vec<f32> = values(m * lda + 1, 5).iter().map(|v| v.to_f32()).collect();
                let b: Vec<f32> = values(k * ldb + 1, 6).iter().map(|v| v.to_f32()).collect();
                let init: Vec<f32> = (0..m * ldc).map(|i| (i % 5) as f32 * 0.5).collect();
                let mut c = init.clone();
                // `b` as rows, and packed into panels (every third case).
                let rows = Rhs::Rows { data: f32_bits(&b[1..]), ld: ldb };
                let mut panels = vec![0u32; panels_len(n, k)];
                pack_panels(n, k, &mut panels, |j, p| b[1 + p * ldb + j].to_bits());
                let rhs = if accumulate && parallel { Rhs::Panels { data: &panels, depth: k } } else { rows };
                gemm_f32(m, n, k, (&a[1..], lda), rhs, &mut c, ldc, accumulate, parallel);
                for i in 0..m {
                    for j in 0..ldc {
                        let want = if j < n {
                            let sum: f64 = (0..k).map(|r| a[1 + i * lda + r] as f64 * b[1 + r * ldb + j] as f64).sum();
                            sum as f32 + if accumulate { init[i * ldc + j] } else { 0.0 }
                        } else {
                            init[i * ldc + j]
                        };
                        let got = c[i * ldc + j];
                        assert!(
                            (got - want).abs() <= 2e-7 * (k as f32 + 8.0),
                            "{m}×{n}×{k} at ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// An odd number of rows leaves the last pair's second half zero.
    #[test]
    fn odd_rows_pad_the_last_pair_with_zero() {
        let src: Vec<u16> = (0..15).collect();
        let mut dst = vec![7u32; 2 * 5];
        interleave_rows(&src, 3, 5, 5, &mut dst);
        assert_eq!(dst[..5], [5 << 16, 1 | 6 << 16, 2 | 7 << 16, 3 | 8 << 16, 4 | 9 << 16]);
        assert_eq!(dst[5..], [10, 11, 12, 13, 14]);
    }
}
