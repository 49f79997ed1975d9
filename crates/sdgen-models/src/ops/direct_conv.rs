//! Direct 3×3 convolutions (stride 1, padding 1) on the CPU, f32 and bf16: the register tiles of
//! `bf16_gemm` (one FMA per f32 value, one `vdpbf16ps` per bf16 channel pair) fed from the input
//! itself instead of an unfolded column. The VAE decoder is almost all such convolutions at large
//! sizes (512 channels at 64²–256², 256 and 128 at 512²), where the column is 9× the input and
//! unfolding it cost as much memory traffic as the product's own.
//!
//! The product for one output row `oy` is `y[o, oy, ox] = b[o] + Σ_{c, ky, kx} w[o, c, ky, kx] ·
//! x[c, oy + ky − 1, ox + kx − 1]`. A register tile holds [`R`] output channels × 64 pixels of one
//! output row (4 vectors of 16) and steps over (input unit, ky, kx): the 4 vectors of input are
//! one row of the input read at a shift of `kx − 1` pixels, the [`R`] weights are broadcast.
//! Per image, bands of output rows: the rows a band reads are first copied once, on all cores,
//! into a buffer with a zero border (so the tiles need no edge masks) whose units lie an odd
//! number of cache lines apart (rows of consecutive channels, a power of two apart in the image,
//! would fall into the same few L1 sets). Then one task per [`G`] tiles of channels (48) and
//! [`ROWS`] output rows, in blocks of [`KC`] input units: per block and tile of pixels, its 48
//! channels pass over the same buffered input (in L1 after the first) with their weights (packed
//! once per call, [`R`] at a time per tap: 27 KiB per block, also in L1). The sums stay in a
//! task-local f32 block (the bias first) until the last input block, then each output row is
//! written once: copied (f32), or rounded to bf16, a ResNet block's residual added when given.
//! The same tiles convolve a 2× nearest-upsampled input without upsampling it
//! ([`upsample_conv3x3_f32`]: 2×2 kernels of summed weights, 4/9 of the work).
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
const ROWS: usize = 2;

/// Whether a convolution of this geometry runs here, its output rows `row_len` pixels long: 3×3,
/// stride 1, padding 1, at least one input channel, rows that fill their 64-pixel tiles to 8/9
/// or more (a UNet's 32-, 16- and 8-pixel rows would leave half to seven eighths of every tile
/// idle: its evaluation took 12.0–13.2 s against the unfolded path's 7.7–8.0), on a processor
/// with the kernels of `bf16_gemm`.
pub(super) fn applies(geometry: &ConvGeometry, row_len: usize) -> bool {
    let ConvGeometry { c, kh, kw, padding, stride, .. } = *geometry;
    let fills_tiles = row_len.div_ceil(TW) * TW * 8 <= row_len * 9;
    (kh, kw, padding, stride) == (3, 3, 1, 1) && c > 0 && fills_tiles && bf16_gemm::supported()
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

impl Shape {
    /// Panics unless the slices (their lengths in elements) hold a same-size 3×3 convolution's
    /// input, weight, output and residual: the kernels index them unchecked.
    fn check(&self, x: usize, weight: usize, y: usize, residual: Option<usize>) {
        let Self { b, c, h, w, o } = *self;
        assert!(x >= b * c * h * w && weight >= o * c * 9 && y >= b * o * h * w);
        assert!(residual.is_none_or(|r| r >= b * o * h * w), "the residual is smaller than the output");
    }
}

/// `y = conv3x3(x, weight) + bias (+ residual)` for f32 `x: [b, c, h, w]` (contiguous), `weight:
/// [o, c, 3, 3]`, into `y: [b, o, h, w]`; the residual `[b, o, h, w]` (a ResNet block's input) is
/// added as each output row is written.
pub(super) fn conv3x3_f32(
    shape: Shape,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    let Shape { c, h, w, .. } = shape;
    shape.check(x.len(), weight.len(), y.len(), residual.map(<[_]>::len));
    let weights = pack_weights(shape.o, c, 9, 1, |oc, unit, tap, _| weight[(oc * c + unit) * 9 + tap].to_bits());
    let out = Rows { at: y.as_mut_ptr() as usize, h, w, o: shape.o };
    run::<true, false>(
        shape,
        c,
        &weights,
        bias,
        |img, unit, iy, dst| {
            let src = &x[((img * c + unit) * h + iy) * w..][..w];
            dst.copy_from_slice(bf16_gemm::f32_bits(src));
        },
        |img, oc, oy, sums| {
            // SAFETY: each (image, channel, row) is stored by one task only (see `run`).
            let row = unsafe { out.row::<f32>(img, oc, oy) };
            match residual {
                // `input + hidden`, diffusers' order (the same sum either way in f32).
                Some(r) => {
                    row.iter_mut().zip(&r[out.at_row(img, oc, oy)..]).zip(sums).for_each(|((y, &r), &s)| *y = r + s)
                }
                None => row.copy_from_slice(sums),
            }
        },
    );
}

/// `y = conv3x3(x, weight) + bias` for bf16 `x: [b, c, h, w]` and `weight: [o, c, 3, 3]` (their
/// bits), `y: [b, o, h, w]` rounded once (nearest even) from f32 sums with the bias added; then
/// plus the bf16 `residual` when given, rounded again, as PyTorch adds two bf16 tensors.
pub(super) fn conv3x3_bf16(
    shape: Shape,
    x: &[u16],
    weight: &[u16],
    bias: Option<&[f32]>,
    residual: Option<&[u16]>,
    y: &mut [u16],
) {
    let Shape { c, h, w, .. } = shape;
    shape.check(x.len(), weight.len(), y.len(), residual.map(<[_]>::len));
    let units = c.div_ceil(2);
    let weights = pack_weights(shape.o, units, 9, 1, |oc, unit, tap, _| {
        let at = |ch: usize| if ch < c { weight[(oc * c + ch) * 9 + tap] as u32 } else { 0 };
        at(2 * unit) | at(2 * unit + 1) << 16
    });
    let out = Rows { at: y.as_mut_ptr() as usize, h, w, o: shape.o };
    run::<false, false>(
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
        |img, oc, oy, sums| {
            // SAFETY: each (image, channel, row) is stored by one task only (see `run`).
            let row = unsafe { out.row::<u16>(img, oc, oy) };
            bf16_gemm::to_bf16_scaled(sums, 1.0, row);
            if let Some(r) = residual {
                let value = |bits: u16| half::bf16::from_bits(bits).to_f32();
                for (y, &r) in row.iter_mut().zip(&r[out.at_row(img, oc, oy)..]) {
                    *y = half::bf16::from_f32(value(r) + value(*y)).to_bits();
                }
            }
        },
    );
}

/// `y = conv3x3(upsample2x(x)) + bias` for f32 `x: [b, c, h, w]` and `weight: [o, c, 3, 3]`,
/// into `y: [b, o, 2h, 2w]`, where `upsample2x` repeats each pixel over a 2×2 block (diffusers'
/// `Upsample2D`: nearest neighbour, then a 3×3 "same" convolution), without the upsampled input.
/// Output row `2i + a` reads the upsampled rows `2i + a − 1 ..= 2i + a + 1`, which are input rows
/// `i − 1, i, i` (a = 0) or `i, i, i + 1` (a = 1): two distinct rows, the kernel rows that meet the
/// same input row summed; columns likewise, by the parity `b` of the output column. So each
/// output pixel is a 2×2 convolution of the input with weights summed per (a, b): 4 taps where the
/// upsampled input took 9 (4/9 of the multiply-adds). The tiles read the input rows with each
/// pixel written twice (`U[q] = x[q / 2]`): output column `X` takes `U[X − 1]` and `U[X + 1]`
/// (whatever its parity), the two parities' weights alternating across the lanes (one 64-bit
/// broadcast of the pair). The summed weights are f32 sums of f32 weights (one rounding each):
/// the result is the upsampled convolution's to f32 rounding. (Not for bf16: a sum of bf16
/// weights rounded to bf16 would not be the weights PyTorch multiplies by.)
pub(super) fn upsample_conv3x3_f32(shape: Shape, x: &[f32], weight: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    let Shape { c, h, w, o, .. } = shape;
    assert!(x.len() >= shape.b * c * h * w && weight.len() >= o * c * 9 && y.len() >= shape.b * o * 4 * h * w);
    // Kernel rows (or columns) that land on the first and second input row (column) a phase reads.
    let span = |phase: usize, tap: usize| if tap == 0 { 0..1 + phase } else { 1 + phase..3 };
    let phase_weights = |a: usize| {
        pack_weights(o, c, 4, 2, move |oc, unit, tap, b| {
            let (s, t) = (tap / 2, tap % 2);
            let kernel = &weight[(oc * c + unit) * 9..][..9];
            let sum: f64 = span(a, s).flat_map(|ky| span(b, t).map(move |kx| kernel[ky * 3 + kx] as f64)).sum();
            (sum as f32).to_bits()
        })
    };
    let weights = [phase_weights(0), phase_weights(1)].concat();
    let out = Rows { at: y.as_mut_ptr() as usize, h: 2 * h, w: 2 * w, o };
    run::<true, true>(
        shape,
        c,
        &weights,
        bias,
        |img, unit, iy, dst| {
            let src = &x[((img * c + unit) * h + iy) * w..][..w];
            for (pair, &v) in dst.chunks_exact_mut(2).zip(src) {
                pair.fill(v.to_bits());
            }
        },
        // SAFETY: each (image, channel, row) is stored by one task only (see `run`).
        |img, oc, oy, sums| unsafe { out.row::<f32>(img, oc, oy).copy_from_slice(sums) },
    );
}

/// The weights as the tiles read them: per block of [`R`] output channels, per input unit and
/// tap (`ky·3 + kx`; the upsampling kernel's `(s, t)` as `2s + t`), the [`R`] output channels'
/// `lanes` words `word(oc, unit, tap, lane)` (zero past the last channel).
fn pack_weights(
    o: usize,
    units: usize,
    taps: usize,
    lanes: usize,
    word: impl Fn(usize, usize, usize, usize) -> u32 + Sync,
) -> Vec<u32> {
    let mut packed = vec![0u32; o.div_ceil(R) * units * taps * R * lanes];
    packed.par_chunks_mut(units * taps * R * lanes).enumerate().for_each(|(block, dst)| {
        for i in 0..R.min(o - block * R) {
            for unit in 0..units {
                for tap in 0..taps {
                    for lane in 0..lanes {
                        dst[((unit * taps + tap) * R + i) * lanes + lane] = word(block * R + i, unit, tap, lane);
                    }
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
        std::slice::from_raw_parts_mut((self.at as *mut T).add(self.at_row(img, oc, oy)), self.w)
    }

    /// Where row `oy` of channel `oc` of image `img` starts, in elements.
    fn at_row(&self, img: usize, oc: usize, oy: usize) -> usize {
        ((img * self.o + oc) * self.h + oy) * self.w
    }
}

thread_local! {
    /// A task's f32 sums.
    static SUMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most bytes of input one band buffers (rows of every input unit, with their zero border):
/// a band is copied once and then read by every task's 48 channels, so it should stay in the
/// L3 cache; the unfolded path's column band took twice this ([`super::cpu::CONV_BAND_BYTES`]).
const BAND_BYTES: usize = 8 << 20;

/// The convolution over `units` input units on all cores (of the input upsampled 2× when `UP`:
/// [`upsample_conv3x3_f32`]), per image in bands of input rows: the band's rows (and the one
/// above and below) buffered once with a zero border (`pack_row(img, unit, iy, dst)` writes input
/// row `iy`'s words: `w`, or `2w` when `UP`), then one task per ([`G`] tiles of output channels,
/// [`ROWS`] input rows of the band: as many output rows, or twice as many when `UP`);
/// `store(img, oc, oy, sums)` writes a finished output row.
fn run<const F32: bool, const UP: bool>(
    shape: Shape,
    units: usize,
    weights: &[u32],
    bias: Option<&[f32]>,
    pack_row: impl Fn(usize, usize, usize, &mut [u32]) + Sync,
    store: impl Fn(usize, usize, usize, &[f32]) + Sync,
) {
    let Shape { b, h, w, o, .. } = shape;
    // Output rows per input row, and buffered (and output) words per input row.
    let (phases, row_len) = if UP { (2, 2 * w) } else { (1, w) };
    let blocks = o.div_ceil(R);
    let groups = blocks.div_ceil(G);
    let tiles = row_len.div_ceil(TW);
    // A buffered row: LEAD words (column −1 the last of them), the tiles' columns, and a
    // vector's worth past them (column `row_len` and the last tile's last taps): zeros but the
    // image.
    let row_words = LEAD + tiles * TW + 16;
    let band_rows = (BAND_BYTES / 4 / (units * row_words)).saturating_sub(2).clamp(1, h);
    let unit_words = odd_lines((band_rows + 2) * row_words);
    // One spare line, so the buffer can start on a 64-byte boundary.
    let mut buffer = vec![0u32; units * unit_words + 16];
    let skip = buffer.as_ptr().align_offset(64).min(15);
    let buffer = &mut buffer[skip..skip + units * unit_words];
    // Sums: per output channel of a task, ROWS · phases output rows of `tiles · TW`.
    let sums_row = tiles * TW;
    let channel_sums = ROWS * phases * sums_row;
    // Packed words per (block of R channels, unit), and per phase.
    let block_words = taps::<UP>() * R * lanes::<UP>();
    let phase_words = blocks * units * block_words;
    let bias: Vec<f32> = (0..blocks * R).map(|oc| bias.and_then(|b| b.get(oc)).copied().unwrap_or(0.0)).collect();
    for img in 0..b {
        for y0 in (0..h).step_by(band_rows) {
            let rows = band_rows.min(h - y0);
            buffer.par_chunks_mut(unit_words).enumerate().for_each(|(unit, unit_rows)| {
                for (r, row) in unit_rows.chunks_exact_mut(row_words).take(rows + 2).enumerate() {
                    let iy = (y0 + r).wrapping_sub(1);
                    if iy >= h {
                        row.fill(0);
                        continue;
                    }
                    row[..LEAD].fill(0);
                    pack_row(img, unit, iy, &mut row[LEAD..LEAD + row_len]);
                    row[LEAD + row_len..].fill(0);
                }
            });
            let buffer = &*buffer;
            let subs = rows.div_ceil(ROWS);
            (0..groups * subs).into_par_iter().for_each(|task| {
                let (group, sub) = (task / subs, task % subs);
                let (r0, task_rows) = (sub * ROWS, ROWS.min(rows - sub * ROWS));
                let first_block = group * G;
                let task_blocks = G.min(blocks - first_block);
                SUMS.with_borrow_mut(|sums| {
                    sums.resize(G * R * channel_sums, 0.0);
                    for u0 in (0..units).step_by(KC) {
                        let block_units = KC.min(units - u0);
                        for (r, phase) in (0..task_rows).flat_map(|r| (0..phases).map(move |a| (r, a))) {
                            // The first of the rows this output row reads: input row
                            // `y0 + r0 + r − 1` (buffered row `r0 + r`), one lower for phase 1.
                            let x_row = u0 * unit_words + (r0 + r + phase) * row_words + LEAD - 1;
                            let out_row = r * phases + phase;
                            for tile in 0..tiles {
                                let x_at = &buffer[x_row + tile * TW..];
                                for t in 0..task_blocks {
                                    let block = first_block + t;
                                    let w_at = &weights[phase * phase_words + (block * units + u0) * block_words..];
                                    let init = (u0 == 0).then(|| &bias[block * R..block * R + R]);
                                    let c_at = &mut sums[t * R * channel_sums + out_row * sums_row + tile * TW..];
                                    // SAFETY: the tile reads `block_units` units of 3 (2 when `UP`)
                                    // buffered rows from `x_at` (rows `r0 + r + phase..` of the
                                    // band, which holds `rows + 2`, each TW + 2 words from the
                                    // tile's column −1: inside `row_words`), `block_words` words per
                                    // unit from `w_at` (the block's packed weights) and R rows of TW
                                    // sums `channel_sums` apart from `c_at`; the processor was
                                    // checked by `applies`.
                                    unsafe {
                                        tile_sums::<F32, UP>(
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
                            for out_row in 0..task_rows * phases {
                                let at = (t * R + i) * channel_sums + out_row * sums_row;
                                let oy = (y0 + r0) * phases + out_row;
                                store(img, oc, oy, &sums[at..at + row_len]);
                            }
                        }
                    }
                });
            });
        }
    }
}

/// Taps per input unit: 3×3, or the upsampling kernel's 2×2.
const fn taps<const UP: bool>() -> usize {
    if UP {
        4
    } else {
        9
    }
}

/// Words per tap and output channel: one, or the two column parities' weights when `UP`.
const fn lanes<const UP: bool>() -> usize {
    if UP {
        2
    } else {
        1
    }
}

/// `words` rounded up to an odd number of 64-byte lines: consecutive units' rows then fall into
/// different L1 sets (a power-of-two distance would put all of a tile's units into the same few).
fn odd_lines(words: usize) -> usize {
    let lines = words.div_ceil(16);
    16 * (lines | 1)
}

/// One register tile: [`R`] output channels × [`TW`] pixels of `c` (rows `ldc` apart), over
/// `units` input units of buffered input rows (`x`: the tile's column −1 in the first of the rows
/// it reads, rows `row_words` apart, units `unit_words` apart) and the packed weights `w`
/// (`[unit][tap][R][lanes]`). Starts from `init` (the bias) when given, else from what `c`
/// holds. 3×3 taps, shifts of one word; or when `UP` 2×2 taps two words apart, each weight a
/// pair of words broadcast across the lanes alternately (even and odd output columns).
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_sums<const F32: bool, const UP: bool>(
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
    let (side, step) = if UP { (2, 2) } else { (3, 1) };
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
        for ky in 0..side {
            let row = x.add(unit * unit_words + ky * row_words);
            let taps = w.add((unit * side + ky) * side * R * lanes::<UP>());
            for kx in 0..side {
                let mut bv = [_mm512_setzero_si512(); V];
                for (v, vector) in bv.iter_mut().enumerate() {
                    *vector = _mm512_loadu_si512(row.add(kx * step + 16 * v) as *const __m512i);
                }
                for (i, sums) in acc.iter_mut().enumerate() {
                    let at = taps.add((kx * R + i) * lanes::<UP>());
                    let a = if UP {
                        _mm512_set1_epi64((at as *const u64).read_unaligned() as i64)
                    } else {
                        _mm512_set1_epi32(*at as i32)
                    };
                    for v in 0..V {
                        sums[v] = if F32 {
                            _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(bv[v]), sums[v])
                        } else {
                            let pairs = std::mem::transmute::<__m512i, __m512bh>(bv[v]);
                            _mm512_dpbf16_ps(sums[v], std::mem::transmute::<__m512i, __m512bh>(a), pairs)
                        };
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
