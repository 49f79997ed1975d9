//! MultiDiffusion: denoising a latent larger than the model's native size in overlapping tiles of
//! that size (Bar-Tal, Yariv, Lipman, Dekel 2023, "MultiDiffusion: Fusing Diffusion Paths for
//! Controlled Image Generation", ICML; eq. 5 and Algorithm 1), the `4k-ultra` preset's hires
//! passes.
//!
//! Per step, every tile of the latent is denoised on its own (classifier-free guidance applied
//! per tile, as a whole-latent run applies it to the whole), and the tiles' noise predictions are
//! blended into one whole-latent prediction: `ε(x) = Σ_t W_t · ε_t(x|_t) / Σ_t W_t`, each tile's
//! window `W_t` a raised cosine over its overlaps with its neighbours (1 elsewhere, and along the
//! image's borders). The scheduler then steps the whole latent once, as without tiles, so its
//! noise (ancestral samplers) is drawn once for the whole latent from the run's generators.
//! Blending the predictions rather than each tile's stepped latent (the paper's Φ) is the same for
//! the deterministic schedulers, whose step is affine in the prediction, and needs one step and
//! one noise draw per step for the others.
//!
//! No model ever attends over more than one tile's tokens (SDXL at 4096² would otherwise attend
//! over 65,536 at its first attention level), and the tiles run one after another, so the
//! denoiser's activations are one tile's (the planner counts them so:
//! `sdgen_memory::plan::PlanRequest::denoise_tiling`).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::loading::ModelFolder;
use crate::{Error, Result};

/// Overlap between neighbouring tiles, as a fraction of the tile side. A quarter (32 latents,
/// 256 px for SDXL) gives the raised-cosine window room to hide the seams (the seam test in
/// this module measures it) at 5 × 5 = 25 tiles for SDXL at 4096²; half (the A1111 Tiled
/// Diffusion extension's default ratio) would take 8 × 8 = 64, 2.6 times the denoising time; the
/// paper's stride of 8 over 64-latent windows, 7/8, several hundred.
pub const TILE_OVERLAP: f64 = 0.25;

/// A pass's tiles, in latent cells: the side of a tile and the overlap between neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenoiseTiles {
    /// Tile side (a tile is smaller where the latent is).
    pub tile: usize,
    /// Least overlap between neighbouring tiles.
    pub overlap: usize,
    /// Pixels per latent cell along a side (the VAE's factor), for sizes in pixels.
    pub scale: usize,
}

impl DenoiseTiles {
    /// Tiles of `model`'s native size, the denoiser's `sample_size` (SDXL's 128 latents: the
    /// 1024² it was trained at), overlapping by [`TILE_OVERLAP`].
    pub fn native(model: &ModelFolder) -> Result<Self> {
        let tile = model.denoiser_geometry()?.sample_size.ok_or_else(|| {
            Error::BadModel(format!(
                "{}: the denoiser's config has no sample_size, the native size MultiDiffusion's tiles take",
                model.root().display()
            ))
        })?;
        let scale = model.config::<sdgen_models::vae::VaeConfig>("vae", "config.json")?.scale_factor();
        Ok(Self { tile, overlap: (tile as f64 * TILE_OVERLAP).round() as usize, scale })
    }

    /// The tiles of a `height × width` latent.
    pub fn layout(&self, height: usize, width: usize) -> TileLayout {
        TileLayout::new(height, width, *self)
    }

    /// The tiles of the latent of a `width × height` pixel image.
    pub fn layout_px(&self, width: usize, height: usize) -> TileLayout {
        self.layout(height / self.scale, width / self.scale)
    }
}

/// One tile: its place in the latent and its extent, in latent cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    /// First row.
    pub y: usize,
    /// First column.
    pub x: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// The tiles covering a latent, with their blending windows.
#[derive(Debug, Clone)]
pub struct TileLayout {
    /// What it was laid out from.
    pub spec: DenoiseTiles,
    /// The latent's height.
    pub height: usize,
    /// The latent's width.
    pub width: usize,
    /// Row by row.
    pub tiles: Vec<Tile>,
    /// Per tile, its window `[tile.height × tile.width]`, row-major.
    pub weights: Vec<Vec<f32>>,
    /// The windows' sum over the whole latent `[height × width]`, row-major: every cell's is
    /// positive, since every cell is covered and a window is positive everywhere.
    pub weight_sum: Vec<f32>,
}

/// Where the tiles along one axis of `len` cells start: one tile when it fits, else as few as
/// overlap by at least `overlap`, spread evenly with the first and the last flush with the ends
/// (neighbours overlap by more than asked where the latent leaves room: a 130-cell side takes two
/// 128-cell tiles).
pub fn tile_starts(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let stride = tile.saturating_sub(overlap).max(1);
    let n = (len - overlap).div_ceil(stride).max(2);
    (0..n).map(|i| ((i * (len - tile)) as f64 / (n - 1) as f64).round() as usize).collect()
}

/// One axis of a tile's window: a raised cosine `sin²(π/2 · (i + ½)/o)` over its overlap `o`
/// with the previous tile, its mirror over the overlap with the next, 1 elsewhere. Where two
/// neighbours' ramps span the same cells they sum to 1 (sin² + cos²); a cell is never 0.
fn axis_window(size: usize, before: usize, after: usize) -> Vec<f32> {
    let ramp = |i: usize, o: usize| (std::f64::consts::FRAC_PI_2 * (i as f64 + 0.5) / o as f64).sin().powi(2);
    (0..size)
        .map(|i| {
            let mut w = 1.0;
            if i < before {
                w *= ramp(i, before);
            }
            let from_end = size - 1 - i;
            if from_end < after {
                w *= ramp(from_end, after);
            }
            w as f32
        })
        .collect()
}

/// Per tile along one axis: (start, size, overlap with the previous tile, with the next).
fn axis_tiles(len: usize, spec: DenoiseTiles) -> Vec<(usize, usize, usize, usize)> {
    let size = spec.tile.min(len);
    let starts = tile_starts(len, spec.tile, spec.overlap);
    (0..starts.len())
        .map(|i| {
            let before = if i > 0 { starts[i - 1] + size - starts[i] } else { 0 };
            let after = starts.get(i + 1).map_or(0, |&next| starts[i] + size - next);
            (starts[i], size, before, after)
        })
        .collect()
}

impl TileLayout {
    /// The tiles of `spec` over a `height × width` latent and their windows.
    pub fn new(height: usize, width: usize, spec: DenoiseTiles) -> Self {
        let (rows, cols) = (axis_tiles(height, spec), axis_tiles(width, spec));
        let mut tiles = Vec::new();
        let mut weights = Vec::new();
        let mut weight_sum = vec![0f32; height * width];
        for &(y, h, top, bottom) in &rows {
            let wy = axis_window(h, top, bottom);
            for &(x, w, left, right) in &cols {
                let wx = axis_window(w, left, right);
                let window: Vec<f32> = wy.iter().flat_map(|a| wx.iter().map(move |b| a * b)).collect();
                for (r, row) in window.chunks(w).enumerate() {
                    let sum = &mut weight_sum[(y + r) * width + x..][..w];
                    sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                }
                tiles.push(Tile { y, x, height: h, width: w });
                weights.push(window);
            }
        }
        Self { spec, height, width, tiles, weights, weight_sum }
    }

    /// One line for the log: `25 tiles of 128×128 latents (1024×1024 px), overlap ≥ 32`.
    pub fn describe(&self) -> String {
        let (t, vae_factor) = (self.tiles[0], self.spec.scale);
        format!(
            "{} of {}×{} latents ({}×{} px), overlapping by at least {}",
            crate::engine::plural(self.tiles.len(), "tile"),
            t.width,
            t.height,
            t.width * vae_factor,
            t.height * vae_factor,
            self.min_overlap()
        )
    }

    /// The least overlap between neighbouring tiles (0 with a single tile along both axes).
    pub fn min_overlap(&self) -> usize {
        let overlaps = |a: &dyn Fn(&Tile) -> (usize, usize)| {
            let mut starts: Vec<(usize, usize)> = self.tiles.iter().map(a).collect();
            starts.sort_unstable();
            starts.dedup();
            starts.windows(2).map(|p| p[0].0 + p[0].1 - p[1].0).min()
        };
        [overlaps(&|t| (t.y, t.height)), overlaps(&|t| (t.x, t.width))].into_iter().flatten().min().unwrap_or(0)
    }

    /// The whole latent's prediction from `predict` run on each tile of `latents`
    /// (`[n, c, height, width]`): the tiles' predictions weighted by their windows, summed in
    /// f32, divided by the windows' sum, in the predictions' dtype.
    pub fn blend(&self, latents: &Tensor, mut predict: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (n, _, height, width) = latents.dims4()?;
        if (height, width) != (self.height, self.width) {
            return Err(Error::InvalidInput(format!(
                "a {}×{} latent given to tiles laid out for {}×{}",
                height, width, self.height, self.width
            )));
        }
        let device = latents.device();
        let window = |v: &[f32], h: usize, w: usize| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, (1, 1, h, w), &Device::Cpu)?.to_device(device)?)
        };
        let mut sum: Option<Tensor> = None;
        let mut dtype = DType::F32;
        for (t, weights) in self.tiles.iter().zip(&self.weights) {
            let x = latents.narrow(2, t.y, t.height)?.narrow(3, t.x, t.width)?.contiguous()?;
            let pred = predict(&x)?;
            dtype = pred.dtype();
            let channels = pred.dim(1)?;
            let weighted = pred.to_dtype(DType::F32)?.broadcast_mul(&window(weights, t.height, t.width)?)?;
            let acc = match sum.take() {
                Some(acc) => acc,
                None => Tensor::zeros((n, channels, height, width), DType::F32, device)?,
            };
            let region = acc.narrow(2, t.y, t.height)?.narrow(3, t.x, t.width)?;
            let ranges = [0..n, 0..channels, t.y..t.y + t.height, t.x..t.x + t.width];
            sum = Some(acc.slice_assign(&ranges, &(region + weighted)?)?);
        }
        let sum = sum.ok_or_else(|| Error::InvalidInput("a tile layout without tiles".into()))?;
        Ok(sum.broadcast_div(&window(&self.weight_sum, height, width)?)?.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of SDXL at 2048² and 4096² (latents 256², 512²), and of the tiny SDXL's
    /// scaled-down sizes: every latent cell covered, neighbours overlapping by at least the
    /// overlap asked for, the edge tiles flush with the borders, no tile past them.
    #[test]
    fn tiles_cover_the_latent_overlap_as_asked_and_sit_flush_with_the_borders() {
        for (height, width, spec, per_side) in [
            (512, 512, DenoiseTiles { tile: 128, overlap: 32, scale: 8 }, (5, 5)),
            (256, 256, DenoiseTiles { tile: 128, overlap: 32, scale: 8 }, (3, 3)),
            (256, 512, DenoiseTiles { tile: 128, overlap: 32, scale: 8 }, (3, 5)),
            (32, 32, DenoiseTiles { tile: 8, overlap: 2, scale: 8 }, (5, 5)),
            (16, 24, DenoiseTiles { tile: 8, overlap: 2, scale: 8 }, (3, 4)),
            (8, 8, DenoiseTiles { tile: 8, overlap: 2, scale: 8 }, (1, 1)),
            (6, 20, DenoiseTiles { tile: 8, overlap: 2, scale: 8 }, (1, 3)),
            (130, 128, DenoiseTiles { tile: 128, overlap: 32, scale: 8 }, (2, 1)),
        ] {
            let layout = spec.layout(height, width);
            let case = format!("{height}×{width} in {spec:?}");
            assert_eq!(layout.tiles.len(), per_side.0 * per_side.1, "{case}");
            let mut covered = vec![0usize; height * width];
            for t in &layout.tiles {
                assert!(t.y + t.height <= height && t.x + t.width <= width, "{case}: {t:?} past the border");
                assert_eq!((t.height, t.width), (spec.tile.min(height), spec.tile.min(width)), "{case}");
                for y in t.y..t.y + t.height {
                    for x in t.x..t.x + t.width {
                        covered[y * width + x] += 1;
                    }
                }
            }
            assert!(covered.iter().all(|&c| c > 0), "{case}: a cell no tile covers");
            let starts = |f: fn(&Tile) -> usize| {
                let mut v: Vec<usize> = layout.tiles.iter().map(f).collect();
                v.sort_unstable();
                v.dedup();
                v
            };
            for (starts, len) in [(starts(|t| t.y), height), (starts(|t| t.x), width)] {
                let size = spec.tile.min(len);
                assert_eq!(starts[0], 0, "{case}: the first tile flush with the border");
                assert_eq!(starts.last().unwrap() + size, len, "{case}: the last tile flush with the border");
                for pair in starts.windows(2) {
                    let overlap = pair[0] + size - pair[1];
                    assert!(overlap >= spec.overlap, "{case}: overlap {overlap}");
                }
            }
            assert!(layout.weight_sum.iter().all(|&w| w > 0.0), "{case}");
            if layout.tiles.len() > 1 {
                assert!(layout.min_overlap() >= spec.overlap, "{case}");
            }
        }
        // SDXL at 4096²: evenly, 96 latents apart.
        assert_eq!(tile_starts(512, 128, 32), [0, 96, 192, 288, 384]);
    }

    /// Raised-cosine ramps of neighbours sum to 1 over an overlap of the same length, and a
    /// window is 1 along the image's borders.
    #[test]
    fn the_windows_are_a_partition_of_unity_where_ramps_meet() {
        let layout = DenoiseTiles { tile: 128, overlap: 32, scale: 8 }.layout(512, 512);
        // 96 apart, every overlap exactly 32: the windows sum to 1 everywhere.
        assert!(layout.weight_sum.iter().all(|&w| (w - 1.0).abs() < 1e-6), "{:?}", &layout.weight_sum[..40]);
        // The corner tile: 1 along the image's borders, ramping down towards its neighbours.
        let corner = &layout.weights[0];
        assert_eq!((corner[0], corner[64], corner[64 * 128]), (1.0, 1.0, 1.0));
        for towards_neighbour in [corner[127], corner[127 * 128]] {
            assert!(towards_neighbour < 0.01 && towards_neighbour > 0.0, "{towards_neighbour}");
        }
    }

    /// The blend is exact: with a "denoiser" whose prediction is a known function of the
    /// position (read from the input, which carries each cell's coordinates), the blended
    /// prediction is that function over the whole latent, to f32 rounding, for layouts whose
    /// overlaps are equal, uneven (flush edge tiles) and a single tile.
    #[test]
    fn a_denoiser_that_predicts_a_function_of_position_is_given_back_exactly() {
        for (h, w, spec) in [
            (32, 32, DenoiseTiles { tile: 8, overlap: 2, scale: 8 }),
            (21, 37, DenoiseTiles { tile: 8, overlap: 3, scale: 8 }),
            (64, 40, DenoiseTiles { tile: 16, overlap: 4, scale: 8 }),
            (8, 8, DenoiseTiles { tile: 8, overlap: 2, scale: 8 }),
        ] {
            let layout = spec.layout(h, w);
            // Channel 0 holds y, channel 1 x; two images.
            let coords: Vec<f32> = (0..2)
                .flat_map(|_| (0..2).flat_map(|c| (0..h * w).map(move |i| if c == 0 { i / w } else { i % w } as f32)))
                .collect();
            let latents = Tensor::from_vec(coords, (2, 2, h, w), &Device::Cpu).unwrap();
            let f = |y: f32, x: f32, c: usize| if c == 0 { (0.3 * y).sin() * 7.0 + x } else { y * x - 3.0 };
            let mut calls = 0;
            let blended = layout
                .blend(&latents, |tile| {
                    calls += 1;
                    let v: Vec<f32> = tile.flatten_all()?.to_vec1()?;
                    let (n, _, th, tw) = tile.dims4()?;
                    let per = th * tw;
                    let mut out = Vec::with_capacity(n * 3 * per);
                    for img in 0..n {
                        let (ys, xs) = (&v[img * 2 * per..][..per], &v[(img * 2 + 1) * per..][..per]);
                        for c in 0..3 {
                            out.extend(ys.iter().zip(xs).map(|(&y, &x)| f(y, x, c % 2)));
                        }
                    }
                    Ok(Tensor::from_vec(out, (n, 3, th, tw), &Device::Cpu)?)
                })
                .unwrap();
            assert_eq!(calls, layout.tiles.len());
            assert_eq!(blended.dims(), &[2, 3, h, w]);
            let got: Vec<f32> = blended.flatten_all().unwrap().to_vec1().unwrap();
            let mut worst = 0f32;
            for (i, g) in got.iter().enumerate() {
                let (c, cell) = ((i / (h * w)) % 3, i % (h * w));
                let want = f((cell / w) as f32, (cell % w) as f32, c % 2);
                worst = worst.max((g - want).abs() / want.abs().max(1.0));
            }
            assert!(worst <= 8.0 * f32::EPSILON, "{h}×{w} {spec:?}: relative error {worst:e}");
            if layout.tiles.len() == 1 {
                // One tile: its window is 1 everywhere, the blend the identity, bit for bit.
                let direct: Vec<f32> = (0..2 * 3 * h * w)
                    .map(|i| f(((i % (h * w)) / w) as f32, (i % w) as f32, (i / (h * w)) % 3 % 2))
                    .collect();
                assert_eq!(got, direct);
            }
        }
    }
}

#[cfg(test)]
#[path = "tiles_pass_tests.rs"]
mod pass_tests;
