//! Direct 3×3 convolutions (stride 1, padding 1) on the CPU, f32 and bf16: the register tiles of
//! `bf16_gemm` (one FMA per f32 value, one `vdpbf16ps` per bf16 channel pair) fed from the input
//! itself instead of an unfolded column. The VAE decoder is almost all such convolutions at large
//! sizes (512 channels at 64²–256², 256 and 128 at 512²), where the column is 9× the input and
//! unfolding it cost as much memory traffic as the product's own.
//!
//! The product for one output row `oy` is `y[o, oy, ox] = b[o] + Σ_{c, ky, kx} w[o, c, ky, kx] ·
//! x[c, oy + ky − 1, ox + kx − 1]`. A register tile holds [`R`] output channels × 64 pixels of one
//! output row (4 vectors of 16) and steps over (input unit, ky, kx): the 4 vectors of input are
//! one row of the input read at a shift of `kx − 1` pixels, the [`R`] weights are broadcast. One
//! task computes [`G`] tiles of channels (48) for a band of output rows, in blocks of [`KC`] input
//! units; per block, the input rows the band reads are first copied into a task-local buffer with
//! a zero border (so the tiles need no edge masks, and the rows of consecutive channels, a power
//! of two apart in the image, do not fall into the same few L1 sets), and its 48 channels' weights
//! (packed once per call, [`R`] at a time per tap) stay in L1 while every tile of the band passes.
//! The sums stay in a task-local f32 block (the bias first) until the last input block, then each
//! output row is written once: copied (f32), or rounded to bf16.
//!
//! A unit is one channel (f32) or a pair of channels (bf16, interleaved as `vdpbf16ps` reads
//! them: `(x[2u], x[2u + 1])` per pixel, the weights likewise; an odd last channel is paired with
//! zero), so the bf16 sums are those of the unfolded path: exact products, f32 sums.

use rayon::prelude::*;

use super::bf16_gemm;
use super::cpu::ConvGeometry;

/// Output channels per register tile.
const R: usize = 6;
/// 16-lane vectors per register tile: 64 pixels of one output row. `R · V` = 24 accumulators,
/// plus the 4 input vectors and a broadcast weight: 29 of the 32 vector registers.
const V: usize = 4;
/// Pixels per register tile.
const TW: usize = 16 * V;
/// Register tiles of output channels per task (48 channels): their weights for one block of
/// [`KC`] units (48 · 16 · 9 words, 27 KiB) stay in L1 beside the input rows one tile reads
/// (16 · 3 · 66 words, 13 KiB).
const G: usize = 8;
/// Input units (channels, or bf16 channel pairs) per block.
const KC: usize = 16;
/// Zero words before column 0 of a buffered input row: column −1 is the padding, and column 0
/// starts a 64-byte line so the `kx = 1` loads are aligned.
const LEAD: usize = 16;
/// Output rows per task.
const BAND: usize = 2;

/// Whether a convolution of this geometry runs here: 3×3, stride 1, padding 1, at least one
/// input channel, on a processor with the kernels of `bf16_gemm`.
pub(super) fn applies(geometry: &ConvGeometry) -> bool {
    let ConvGeometry { c, kh, kw, padding, stride, .. } = *geometry;
    (kh, kw, padding, stride) == (3, 3, 1, 1) && c > 0 && bf16_gemm::supported()
}

/// The sizes of one call: `b` images of `c × h × w` into `o` channels, the input in `units`.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
}

/// `y = conv3x3(x, weight) + bias` for f32 `x: [b, c, h, w]` (contiguous), `weight: [o, c, 3, 3]`,
/// into `y: [b, o, h, w]`.
pub(super) fn conv3x3_f32(shape: Shape, x: &[f32], weight: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    let Shape { c, h, w, .. } = shape;
    assert!(x.len() >= shape.b * c * h * w && weight.len() >= shape.o * c * 9 && y.len() >= shape.b * shape.o * h * w);
    let weights = pack_weights(shape.o, c, |oc, unit, tap| weight[(oc * c + unit) * 9 + tap].to_bits());
    let out = Rows { at: y.as_mut_ptr() as usize, h, w, o: shape.o };
    run::<true>(
        shape,
        c,
        &weights,
        bias,
        |img, unit, iy, dst| {
            let src = &x[((img * c + unit) * h + iy) * w..][..w];
            dst.copy_from_slice(bf16_gemm::f32_bits(src));
        },
        // SAFETY: each (image, channel, row) is stored by one task only (see `run`).
        |img, oc, oy, sums| unsafe { out.row::<f32>(img, oc, oy).copy_from_slice(sums) },
    );
}

/// `y = conv3x3(x, weight) + bias` for bf16 `x: [b, c, h, w]` and `weight: [o, c, 3, 3]` (their
/// bits), `y: [b, o, h, w]` rounded once (nearest even) from f32 sums with the bias added.
pub(super) fn conv3x3_bf16(shape: Shape, x: &[u16], weight: &[u16], bias: Option<&[f32]>, y: &mut [u16]) {
    let Shape { c, h, w, .. } = shape;
    assert!(x.len() >= shape.b * c * h * w && weight.len() >= shape.o * c * 9 && y.len() >= shape.b * shape.o * h * w);
    let units = c.div_ceil(2);
    let weights = pack_weights(shape.o, units, |oc, unit, tap| {
        let at = |ch: usize| if ch < c { weight[(oc * c + ch) * 9 + tap] as u32 } else { 0 };
        at(2 * unit) | at(2 * unit + 1) << 16
    });
    let out = Rows { at: y.as_mut_ptr() as usize, h, w, o: shape.o };
    run::<false>(
        shape,
        units,
        &weights,
        bias,
        |img, unit, iy, dst| {
            let row = |ch: usize| &x[((img * c + ch) * h + iy) * w..][..w];
            let lo = row(2 * unit);
            if 2 * unit + 1 < c {
                let hi = row(2 * unit + 1);
                dst.iter_mut().zip(lo.iter().zip(hi)).for_each(|(d, (&l, &h))| *d = l as u32 | (h as u32) << 16);
            } else {
                dst.iter_mut().zip(lo).for_each(|(d, &l)| *d = l as u32);
            }
        },
        // SAFETY: each (image, channel, row) is stored by one task only (see `run`).
        |img, oc, oy, sums| unsafe { bf16_gemm::to_bf16_scaled(sums, 1.0, out.row::<u16>(img, oc, oy)) },
    );
}

/// The weights as the tiles read them: per block of [`R`] output channels, per input unit and
/// tap (`ky·3 + kx`), the [`R`] words `word(oc, unit, tap)` (zero past the last channel).
fn pack_weights(o: usize, units: usize, word: impl Fn(usize, usize, usize) -> u32 + Sync) -> Vec<u32> {
    let mut packed = vec![0u32; o.div_ceil(R) * units * 9 * R];
    packed.par_chunks_mut(units * 9 * R).enumerate().for_each(|(block, dst)| {
        for i in 0..R.min(o - block * R) {
            for unit in 0..units {
                for tap in 0..9 {
                    dst[(unit * 9 + tap) * R + i] = word(block * R + i, unit, tap);
                }
            }
        }
    });
    packed
}

/// The output `[b, o, h, w]` written row by row from several tasks.
struct Rows {
    at: usize,
    h: usize,
    w: usize,
    o: usize,
}

impl Rows {
    /// Row `oy` of channel `oc` of image `img`.
    ///
    /// # Safety
    /// The output is an allocation of `b · o · h · w` elements of `T` that outlives the call; no
    /// two calls for one row may overlap in time.
    #[allow(clippy::mut_from_ref)] // rows of one output handed to the tasks that own them
    unsafe fn row<T>(&self, img: usize, oc: usize, oy: usize) -> &mut [T] {
        let at = ((img * self.o + oc) * self.h + oy) * self.w;
        std::slice::from_raw_parts_mut((self.at as *mut T).add(at), self.w)
    }
}

thread_local! {
    /// A task's buffered input rows and its f32 sums.
    static SCRATCH: std::cell::RefCell<(Vec<u32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The convolution over `units` input units, one task per (image, [`G`] tiles of output
/// channels, [`BAND`] output rows) on all cores: `pack_row(img, unit, iy, dst)` writes input row
/// `iy`'s `w` words, `store(img, oc, oy, sums)` writes a finished output row.
fn run<const F32: bool>(
    shape: Shape,
    units: usize,
    weights: &[u32],
    bias: Option<&[f32]>,
    pack_row: impl Fn(usize, usize, usize, &mut [u32]) + Sync,
    store: impl Fn(usize, usize, usize, &[f32]) + Sync,
) {
    let Shape { b, h, w, o, .. } = shape;
    let blocks = o.div_ceil(R);
    let groups = blocks.div_ceil(G);
    let bands = h.div_ceil(BAND);
    let tiles = w.div_ceil(TW);
    // A buffered row: LEAD words (column −1 the last of them), the tiles' columns, and a
    // vector's worth past them (column w and the last tile's `kx = 2` reads): zeros but the image.
    let row_words = LEAD + tiles * TW + 16;
    let unit_words = (BAND + 2) * row_words;
    // Sums: per output channel of the task, BAND rows of `tiles · TW`.
    let sums_row = tiles * TW;
    let channel_sums = BAND * sums_row;
    let bias: Vec<f32> = (0..blocks * R).map(|oc| bias.and_then(|b| b.get(oc)).copied().unwrap_or(0.0)).collect();
    let task = |task: usize| {
        let (img, rest) = (task / (groups * bands), task % (groups * bands));
        let (group, band) = (rest / bands, rest % bands);
        let (oy0, rows) = (band * BAND, BAND.min(h - band * BAND));
        let first_block = group * G;
        let task_blocks = G.min(blocks - first_block);
        SCRATCH.with_borrow_mut(|(input, sums)| {
            // One spare line, so the buffer can start on a 64-byte boundary.
            input.resize(KC * unit_words + 16, 0);
            sums.resize(G * R * channel_sums, 0.0);
            let skip = input.as_ptr().align_offset(64).min(15);
            let input = &mut input[skip..skip + KC * unit_words];
            for u0 in (0..units).step_by(KC) {
                let block_units = KC.min(units - u0);
                for (u, unit_rows) in input.chunks_mut(unit_words).take(block_units).enumerate() {
                    for (r, row) in unit_rows.chunks_mut(row_words).enumerate() {
                        let iy = (oy0 + r).wrapping_sub(1);
                        if r >= rows + 2 || iy >= h {
                            row.fill(0);
                            continue;
                        }
                        row[..LEAD].fill(0);
                        pack_row(img, u0 + u, iy, &mut row[LEAD..LEAD + w]);
                        row[LEAD + w..].fill(0);
                    }
                }
                for t in 0..task_blocks {
                    let block = first_block + t;
                    let w_at = &weights[(block * units + u0) * 9 * R..];
                    let init = (u0 == 0).then(|| &bias[block * R..block * R + R]);
                    for r in 0..rows {
                        for tile in 0..tiles {
                            let x_at = &input[r * row_words + LEAD - 1 + tile * TW..];
                            let c_at = &mut sums[t * R * channel_sums + r * sums_row + tile * TW..];
                            // SAFETY: the tile reads `block_units` units of 3 buffered rows from
                            // `x_at` (the rows `r..r + 3` of this band, each TW + 2 words from the
                            // tile's column −1: inside `row_words`), 9·R words per unit from
                            // `w_at` (the block's packed weights) and R rows of TW sums
                            // `channel_sums` apart from `c_at`; the processor was checked by
                            // `applies`.
                            unsafe {
                                tile_sums::<F32>(
                                    block_units,
                                    x_at.as_ptr(),
                                    unit_words,
                                    row_words,
                                    w_at.as_ptr(),
                                    c_at.as_mut_ptr(),
                                    channel_sums,
                                    init,
                                )
                            };
                        }
                    }
                }
            }
            for t in 0..task_blocks {
                for i in 0..R.min(o - (first_block + t) * R) {
                    let oc = (first_block + t) * R + i;
                    for r in 0..rows {
                        let at = (t * R + i) * channel_sums + r * sums_row;
                        store(img, oc, oy0 + r, &sums[at..at + w]);
                    }
                }
            }
        });
    };
    (0..b * groups * bands).into_par_iter().for_each(task);
}

/// One register tile: [`R`] output channels × [`TW`] pixels of `c` (rows `ldc` apart), over
/// `units` input units of buffered input rows (`x`: the tile's column −1 in the first of the 3
/// rows it reads, rows `row_words` apart, units `unit_words` apart) and the packed weights `w`
/// (`[unit][tap][R]`). Starts from `init` (the bias) when given, else from what `c` holds.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_sums<const F32: bool>(
    units: usize,
    x: *const u32,
    unit_words: usize,
    row_words: usize,
    w: *const u32,
    c: *mut f32,
    ldc: usize,
    init: Option<&[f32]>,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for (i, row) in acc.iter_mut().enumerate() {
        for (v, sum) in row.iter_mut().enumerate() {
            *sum = match init {
                Some(bias) => _mm512_set1_ps(bias[i]),
                None => _mm512_loadu_ps(c.add(i * ldc + 16 * v)),
            };
        }
    }
    for unit in 0..units {
        for ky in 0..3 {
            let row = x.add(unit * unit_words + ky * row_words);
            let taps = w.add((unit * 9 + ky * 3) * R);
            for kx in 0..3 {
                let mut bv = [_mm512_setzero_si512(); V];
                for (v, vector) in bv.iter_mut().enumerate() {
                    *vector = _mm512_loadu_si512(row.add(kx + 16 * v) as *const __m512i);
                }
                for (i, sums) in acc.iter_mut().enumerate() {
                    let word = *taps.add(kx * R + i);
                    if F32 {
                        let a = _mm512_set1_ps(f32::from_bits(word));
                        for v in 0..V {
                            sums[v] = _mm512_fmadd_ps(a, _mm512_castsi512_ps(bv[v]), sums[v]);
                        }
                    } else {
                        let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(word as i32));
                        for v in 0..V {
                            sums[v] = _mm512_dpbf16_ps(sums[v], a, std::mem::transmute::<__m512i, __m512bh>(bv[v]));
                        }
                    }
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, sum) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(i * ldc + 16 * v), *sum);
        }
    }
}
