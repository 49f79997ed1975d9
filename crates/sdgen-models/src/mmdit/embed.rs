//! The MMDiT's inputs as tokens: diffusers' `PatchEmbed` (a patch convolution plus the centre
//! crop of a 2-D sin-cos position table) and `CombinedTimestepTextProjEmbeddings` (the timestep's
//! sinusoid and the pooled text, each through a two-layer MLP, summed).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::conv::Conv2d;
use crate::ops::linear::{linear, Linear};

/// diffusers' `get_2d_sincos_pos_embed(dim, grid, base_size)` (`embeddings.py`), `[grid², dim]`
/// in f32: token `i·grid + j` (row `i`, column `j`) is `[sin(j·ω), cos(j·ω), sin(i·ω), cos(i·ω)]`
/// with `ω_k = 10000^(−k/(dim/4))` and positions scaled by `base_size / grid` (in f32, as
/// diffusers' grid is), the sines and cosines in f64. Note the column index comes first: diffusers'
/// `meshgrid(grid_w, grid_h, indexing="xy")` puts the width coordinate in `grid[0]`.
pub fn sincos_pos_table(dim: usize, grid: usize, base_size: usize, device: &Device) -> Result<Tensor> {
    if !dim.is_multiple_of(4) {
        candle_core::bail!("2-D sin-cos position table of width {dim}: not a multiple of 4");
    }
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let step = grid as f32 / base_size as f32;
    let pos: Vec<f64> = (0..grid).map(|i| (i as f32 / step) as f64).collect();
    let mut data = Vec::with_capacity(grid * grid * dim);
    for &row in &pos {
        for &col in &pos {
            for p in [col, row] {
                data.extend(omega.iter().map(|w| (p * w).sin() as f32));
                data.extend(omega.iter().map(|w| (p * w).cos() as f32));
            }
        }
    }
    Tensor::from_vec(data, (grid * grid, dim), device)
}

/// `pos_embed`: the patch convolution and the position table.
#[derive(Debug)]
pub(crate) struct PatchEmbed {
    proj: Conv2d,
    /// `[max, max, dim]` in the model's dtype.
    table: Tensor,
    patch: usize,
    max: usize,
}

impl PatchEmbed {
    /// The table is the checkpoint's `pos_embed.pos_embed` `[1, max², dim]` (a persistent buffer,
    /// so diffusers uses the stored values, in the stored precision); computed as diffusers'
    /// `__init__` does when a file lacks it.
    pub(crate) fn new(
        in_channels: usize,
        dim: usize,
        patch: usize,
        max: usize,
        sample_size: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let proj = Conv2d::load(in_channels, dim, patch, 0, patch, false, vb.pp("proj"))?;
        let table = if vb.contains_tensor("pos_embed") {
            vb.get((1, max * max, dim), "pos_embed")?
        } else {
            sincos_pos_table(dim, max, sample_size / patch, vb.device())?.to_dtype(vb.dtype())?
        };
        Ok(Self { proj, table: table.reshape((max, max, dim))?, patch, max })
    }

    /// `[b, c, h, w]` → `[b, (h/p)·(w/p), dim]` tokens, row-major over the patches.
    pub(crate) fn forward(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        let (ph, pw) = (h / self.patch, w / self.patch);
        if ph > self.max || pw > self.max {
            candle_core::bail!(
                "latents of {h}×{w} make {ph}×{pw} patches of {p}: more than the model's position table of \
                 {max}×{max} (pos_embed_max_size); the largest latent is {side}×{side} ({px}×{px} pixels with \
                 the VAE's factor 8)",
                p = self.patch,
                max = self.max,
                side = self.max * self.patch,
                px = self.max * self.patch * 8,
            );
        }
        // diffusers' `cropped_pos_embed`: the centre of the table.
        let (top, left) = ((self.max - ph) / 2, (self.max - pw) / 2);
        let pos = self.table.narrow(0, top, ph)?.narrow(1, left, pw)?.reshape((1, ph * pw, ()))?;
        let x = self.proj.forward(latents)?;
        let (b, d, _, _) = x.dims4()?;
        let tokens = x.reshape((b, d, ph * pw))?.transpose(1, 2)?;
        tokens.broadcast_add(&pos.to_dtype(tokens.dtype())?)?.contiguous()
    }
}

/// A two-layer MLP with SiLU between (`TimestepEmbedding`, `PixArtAlphaTextProjection` with
/// `act_fn="silu"`).
#[derive(Debug)]
struct Mlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp {
    fn new(inputs: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { linear_1: linear(inputs, dim, vb.pp("linear_1"))?, linear_2: linear(dim, dim, vb.pp("linear_2"))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// Width of the timestep's sinusoid (`Timesteps(num_channels=256)`).
const TIME_PROJ_DIM: usize = 256;

/// `time_text_embed`: the conditioning vector every block modulates with.
#[derive(Debug)]
pub(crate) struct TimeTextEmbed {
    timestep_embedder: Mlp,
    text_embedder: Mlp,
}

impl TimeTextEmbed {
    pub(crate) fn new(dim: usize, pooled_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            timestep_embedder: Mlp::new(TIME_PROJ_DIM, dim, vb.pp("timestep_embedder"))?,
            text_embedder: Mlp::new(pooled_dim, dim, vb.pp("text_embedder"))?,
        })
    }

    /// `timesteps` (one value per image, as f32 like diffusers' `.float()`) and `pooled: [b, d]`
    /// in the model's dtype → `[b, dim]`.
    pub(crate) fn forward(&self, timesteps: &[f32], pooled: &Tensor) -> Result<Tensor> {
        let values: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        // flip_sin_to_cos=True, downscale_freq_shift=0; computed in f32, then the pooled dtype.
        let proj = crate::unet::timestep_embedding(&values, TIME_PROJ_DIM, true, 0.0, pooled.device())?
            .to_dtype(pooled.dtype())?;
        self.timestep_embedder.forward(&proj)? + self.text_embedder.forward(pooled)?
    }
}

/// The model's dtype of a tensor given in any: what diffusers' pipelines hand the transformer.
pub(crate) fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        Ok(x.clone())
    } else {
        x.to_dtype(dtype)
    }
}
