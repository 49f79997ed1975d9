//! diffusers' tiled VAE decode and encode (`AutoencoderKL.tiled_decode` / `_tiled_encode`,
//! diffusers 0.42.1 `models/autoencoders/autoencoder_kl.py`), reproduced step for step.
//!
//! The input is cut into tiles of `tile` cells starting every `overlap_size = int(tile · (1 −
//! overlap))` cells (the last tiles of a row or column may be partial, even a single cell), each
//! tile goes through the encoder or decoder alone, and the outputs are stitched: each tile's first
//! `blend_extent` rows (columns) are blended linearly with the last ones of the tile above (to the
//! left), and each tile is cropped to `row_limit` rows and columns. diffusers blends *in place*, so
//! the neighbour a tile is blended with has already been blended with its own neighbours; this
//! code keeps the blended tiles of the previous row for the same effect. Unlike diffusers it does
//! not keep every tile until the end: only the previous row, the current row and the output.

use candle_core::{Result, Tensor};

use super::VaeConfig;

/// The tile geometry of diffusers' `AutoencoderKL` (its attributes of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiling {
    /// Tile side in image pixels (diffusers: `config.sample_size`).
    pub tile_sample_min_size: usize,
    /// Tile side in latent cells (diffusers: `int(sample_size / 2^(levels − 1))`).
    pub tile_latent_min_size: usize,
    /// Fraction of a tile shared with its neighbour (diffusers: 0.25).
    pub tile_overlap_factor: f64,
}

impl VaeTiling {
    /// diffusers' defaults for `cfg`: tiles of `sample_size` pixels (512 for SD 1.5's VAE, 1024
    /// for SDXL's; diffusers' own default of 32 when the config has none), overlap 0.25.
    pub fn for_config(cfg: &VaeConfig) -> Self {
        Self::with_tile_size(cfg, cfg.sample_size.unwrap_or(32))
    }

    /// Tiles of `tile_px` image pixels (`tile_px / scale_factor` latent cells), overlap 0.25.
    pub fn with_tile_size(cfg: &VaeConfig, tile_px: usize) -> Self {
        Self {
            tile_sample_min_size: tile_px,
            tile_latent_min_size: tile_px / cfg.scale_factor(),
            tile_overlap_factor: 0.25,
        }
    }

    /// Rejects geometries that diffusers would loop on forever (a tile step of 0) or stitch to
    /// an image of the wrong size: the tiles must be `scale` times larger in pixels than in
    /// latents, and the step between tiles must equal the part of a tile kept after cropping, in
    /// both directions (true for diffusers' defaults: 512/64, 1024/128, 64/8, and e.g. 32/4; not
    /// for 16/2, which steps 8 px but keeps 12).
    fn validate(&self, scale: usize) -> Result<()> {
        let (s, l, f) = (self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor);
        let fail = |why: &str| -> Result<()> {
            candle_core::bail!("VAE tiling with tile_sample_min_size {s}, tile_latent_min_size {l}, overlap {f}: {why}")
        };
        if !(0.0..1.0).contains(&f) {
            return fail("the overlap factor must be in [0, 1)");
        }
        if l == 0 || s != l * scale {
            return fail(&format!("the pixel size must be {scale} × the latent size, and not 0"));
        }
        let (step_px, step_lat) = (step(s, f), step(l, f));
        let kept_px = s - (s as f64 * f) as usize;
        let kept_lat = l - (l as f64 * f) as usize;
        if step_lat == 0 || step_px != step_lat * scale || kept_px != step_px || kept_lat != step_lat {
            return fail(&format!(
                "tiles step {step_lat} latents / {step_px} px but keep {kept_lat} latents / {kept_px} px, \
                 so the stitched output would not have the input's size"
            ));
        }
        Ok(())
    }

    /// Tiled decode of latents `[b, c, h, w]` with `decode` (post-quant conv + decoder) per tile.
    pub(super) fn run_decode(
        &self,
        z: &Tensor,
        scale: usize,
        decode: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.validate(scale)?;
        let (tile, out_tile) = (self.tile_latent_min_size, self.tile_sample_min_size);
        let blend_extent = (out_tile as f64 * self.tile_overlap_factor) as usize;
        stitch(z, tile, step(tile, self.tile_overlap_factor), blend_extent, out_tile - blend_extent, decode)
    }

    /// Tiled encode of images `[b, c, H, W]` with `encode` (encoder + quant conv) per tile;
    /// returns the moments.
    pub(super) fn run_encode(
        &self,
        x: &Tensor,
        scale: usize,
        encode: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.validate(scale)?;
        let (tile, out_tile) = (self.tile_sample_min_size, self.tile_latent_min_size);
        let blend_extent = (out_tile as f64 * self.tile_overlap_factor) as usize;
        stitch(x, tile, step(tile, self.tile_overlap_factor), blend_extent, out_tile - blend_extent, encode)
    }
}

/// `int(size · (1 − overlap))`, Python's truncation of the same double.
fn step(size: usize, overlap: f64) -> usize {
    (size as f64 * (1.0 - overlap)) as usize
}

/// Cuts `input` into `tile × tile` tiles every `step` cells, maps each with `f`, blends the
/// outputs over `blend_extent` and crops each to `row_limit` (diffusers' two loops in one).
fn stitch(
    input: &Tensor,
    tile: usize,
    step: usize,
    blend_extent: usize,
    row_limit: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = input.dims4()?;
    let mut above: Vec<Tensor> = Vec::new();
    let mut rows = Vec::new();
    for i in (0..h).step_by(step) {
        let band = input.narrow(2, i, tile.min(h - i))?;
        let mut row: Vec<Tensor> = Vec::new();
        let mut cropped = Vec::new();
        for (col, j) in (0..w).step_by(step).enumerate() {
            let mut out = f(&band.narrow(3, j, tile.min(w - j))?.contiguous()?)?;
            if let Some(a) = above.get(col) {
                out = blend(a, &out, blend_extent, 2)?;
            }
            if let Some(left) = row.last() {
                out = blend(left, &out, blend_extent, 3)?;
            }
            let (_, _, oh, ow) = out.dims4()?;
            cropped.push(out.narrow(2, 0, row_limit.min(oh))?.narrow(3, 0, row_limit.min(ow))?);
            row.push(out);
        }
        rows.push(Tensor::cat(&cropped, 3)?);
        above = row;
    }
    Tensor::cat(&rows, 2)
}

/// diffusers' `blend_v` (`dim` 2) / `blend_h` (`dim` 3): the first `e = min(extent, both
/// sizes)` rows of `b` become `a[−e + y]·(1 − y/e) + b[y]·(y/e)`; returns the new `b`.
///
/// The weights are computed in f64 and rounded to `b`'s dtype, as PyTorch rounds a Python-float
/// scalar to an f32 tensor's dtype, so f32 results are bit-identical to diffusers' loop.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let (a_len, b_len) = (a.dim(dim)?, b.dim(dim)?);
    let e = extent.min(a_len).min(b_len);
    if e == 0 {
        return Ok(b.clone());
    }
    let mut shape = vec![1usize; 4];
    shape[dim] = e;
    let weights = |g: fn(f64) -> f64| -> Result<Tensor> {
        let w: Vec<f32> = (0..e).map(|y| g(y as f64 / e as f64) as f32).collect();
        Tensor::from_vec(w, shape.as_slice(), b.device())?.to_dtype(b.dtype())
    };
    let from_a = a.narrow(dim, a_len - e, e)?.broadcast_mul(&weights(|t| 1.0 - t)?)?;
    let from_b = b.narrow(dim, 0, e)?.broadcast_mul(&weights(|t| t)?)?;
    let head = (from_a + from_b)?;
    if e == b_len {
        Ok(head)
    } else {
        Tensor::cat(&[&head, &b.narrow(dim, e, b_len - e)?], dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// diffusers' `blend_h`, written as its Python loop, element by element.
    fn blend_h_loop(a: &[Vec<f32>], b: &[Vec<f32>], extent: usize) -> Vec<Vec<f32>> {
        let e = extent.min(a[0].len()).min(b[0].len());
        let mut out = b.to_vec();
        for (r, row) in out.iter_mut().enumerate() {
            for x in 0..e {
                let t = x as f64 / e as f64;
                row[x] = a[r][a[r].len() - e + x] * (1.0 - t) as f32 + b[r][x] * t as f32;
            }
        }
        out
    }

    #[test]
    fn blend_matches_diffusers_loop() -> Result<()> {
        let dev = Device::Cpu;
        let a: Vec<Vec<f32>> = (0..3).map(|r| (0..7).map(|c| (r * 7 + c) as f32 * 0.37 - 2.0).collect()).collect();
        let b: Vec<Vec<f32>> = (0..3).map(|r| (0..5).map(|c| ((r * 5 + c) as f32).sin()).collect()).collect();
        let ta = Tensor::new(a.clone(), &dev)?.reshape((1, 1, 3, 7))?;
        let tb = Tensor::new(b.clone(), &dev)?.reshape((1, 1, 3, 5))?;
        // extent 3 (inside both), 6 (clipped to b's 5 columns) and 0 (no-op).
        for extent in [3, 6, 0] {
            let got: Vec<Vec<f32>> = blend(&ta, &tb, extent, 3)?.squeeze(0)?.squeeze(0)?.to_vec2()?;
            assert_eq!(got, blend_h_loop(&a, &b, extent), "extent {extent}");
        }
        // blend_v is blend_h on the transposes.
        let got_v = blend(&ta.transpose(2, 3)?, &tb.transpose(2, 3)?, 3, 2)?.transpose(2, 3)?;
        let got_v: Vec<Vec<f32>> = got_v.squeeze(0)?.squeeze(0)?.to_vec2()?;
        assert_eq!(got_v, blend_h_loop(&a, &b, 3));
        Ok(())
    }

    #[test]
    fn identity_tiles_reassemble_the_input() -> Result<()> {
        // With f = identity and no blending weight difference (tiles agree on their overlap),
        // stitching must give back the input exactly, partial tiles included.
        let x = Tensor::arange(0f32, 13. * 9., &Device::Cpu)?.reshape((1, 1, 13, 9))?;
        let out = stitch(&x, 4, 3, 1, 3, |t| Ok(t.clone()))?;
        let diff = (out - &x)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn unsound_geometries_are_rejected() {
        let t = |s, l, f| VaeTiling { tile_sample_min_size: s, tile_latent_min_size: l, tile_overlap_factor: f };
        for ok in [t(512, 64, 0.25), t(1024, 128, 0.25), t(64, 8, 0.25), t(32, 4, 0.25), t(32, 4, 0.0)] {
            ok.validate(8).unwrap();
        }
        for bad in [t(16, 2, 0.25), t(8, 1, 0.25), t(32, 4, 1.0), t(30, 4, 0.25), t(0, 0, 0.25)] {
            let err = bad.validate(8).unwrap_err().to_string();
            let name = format!("tile_sample_min_size {}", bad.tile_sample_min_size);
            assert!(err.contains(&name), "{err}");
        }
    }
}
