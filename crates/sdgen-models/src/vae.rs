//! diffusers' `AutoencoderKL` (the SD 1.5 / SDXL VAE), keys as in the hub's
//! `vae/diffusion_pytorch_model.safetensors`.
//!
//! Besides the plain [`AutoencoderKL::encode`] / [`AutoencoderKL::decode`], the memory-saving
//! modes of diffusers are here, numerically as diffusers computes them: slicing (one image of a
//! batch at a time), tiling ([`VaeTiling`], `tiling.rs`) and attention slicing of the mid block
//! ([`AutoencoderKL::set_attention_options`]). Peak activation memory per decode mode, f32, for
//! SD 1.5's VAE (channels 128/256/512/512) and `b` images of `H × W` pixels:
//! - plain: the largest tensor is `up_blocks.2`'s upsampled output `[b, 256, H, W]`
//!   (b·1 GiB at 1024²), a few of that size alive at once inside the next resnet, plus the
//!   mid-block attention's scores `[b, 1, HW/64, HW/64]` (b·1 GiB at 1024², b·16 GiB at 2048²);
//! - sliced: the same with `b = 1`;
//! - tiled: the same per tile with `H = W = tile_sample_min_size`, plus two rows of decoded
//!   tiles `[b, 3, T, T]` and the output image `[b, 3, H, W]`;
//! - attention slicing replaces the scores' `HW/64` query rows by the slice.
//!
//! The encoder's largest tensors are its full-resolution `[b, 128, H, W]` activations and the
//! same mid-block scores; the modes bound them the same way.

mod tiling;

pub use tiling::VaeTiling;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::attention::{attention_with, AttentionOptions, AttentionOptionsCell};
use crate::norm::GroupNorm;
use crate::ops::conv::{conv1x1, conv3x3, Conv2d};
use crate::ops::linear::Linear;
use crate::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

fn groups() -> usize {
    32
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn sf() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

/// `vae/config.json`, the fields this implementation reads.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Channels per level; the spatial factor is `2^(levels − 1)`.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    /// Latents are divided by this before decoding (0.18215 for SD 1.5, 0.13025 for SDXL).
    #[serde(default = "sf")]
    pub scaling_factor: f64,
    /// Latents are shifted by this before scaling (SD 3).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether the 1×1 quant convolutions exist.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether the 1×1 post-quant convolution exists.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// diffusers runs this VAE in f32 even in half-precision pipelines (SDXL's VAE overflows f16).
    #[serde(default)]
    pub force_upcast: Option<bool>,
    /// Image size the VAE was trained at.
    #[serde(default)]
    pub sample_size: Option<usize>,
}

impl VaeConfig {
    /// Pixels per latent cell along each side.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}

/// The single-head self-attention of the VAE's mid block, with its GroupNorm and residual.
#[derive(Debug)]
struct MidAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    options: AttentionOptionsCell,
    channels_last: bool,
}

impl MidAttention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        // Older diffusers files (among them SD 1.5's hub VAE) name these `query`, `key`, `value`
        // and `proj_attn`; diffusers renames them on load (`_convert_deprecated_attention_blocks`).
        let names = if vb.contains_tensor("to_q.weight") || !vb.contains_tensor("query.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let lin = |name: &str| linear_1x1(c, vb.pp(name));
        Ok(Self {
            norm: GroupNorm::new(groups, c, 1e-6, vb.pp("group_norm"))?,
            q: lin(names[0])?,
            k: lin(names[1])?,
            v: lin(names[2])?,
            out: lin(names[3])?,
            options: AttentionOptionsCell::default(),
            channels_last: false,
        })
    }

    fn into_channels_last(self) -> Self {
        Self { norm: self.norm.into_channels_last(), channels_last: true, ..self }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.channels_last {
            // `[b, h, w, c]` is already the sequence layout `[b, hw, c]`: no transposes.
            let (b, h, w, c) = x.dims4()?;
            let t = self.norm.forward(x)?.reshape((b, h * w, c))?;
            let o = self.attend(&t, c)?;
            return self.out.forward(&o)?.reshape((b, h, w, c))? + x;
        }
        let (b, c, h, w) = x.dims4()?;
        let t = self.norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let o = self.attend(&t, c)?;
        let o = self.out.forward(&o)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }

    /// Single-head attention of the normalised sequence `t: [b, hw, c]`, before `out`.
    fn attend(&self, t: &Tensor, c: usize) -> Result<Tensor> {
        let q = self.q.forward(t)?.unsqueeze(1)?;
        let k = self.k.forward(t)?.unsqueeze(1)?;
        let v = self.v.forward(t)?.unsqueeze(1)?;
        attention_with(&q, &k, &v, (c as f64).powf(-0.5), None, self.options.get())?.squeeze(1)
    }
}

/// A `c → c` linear layer whose weight may be stored as a 1×1 convolution `[c, c, 1, 1]`.
fn linear_1x1(c: usize, vb: VarBuilder) -> Result<Linear> {
    // Stored weights may be [c, c] or [c, c, 1, 1]; a builder with no stored tensors (random
    // weights for benchmarks) is asked for the linear shape.
    let w = if vb.contains_tensor("weight") { vb.get_unchecked("weight")? } else { vb.get((c, c), "weight")? };
    let w = if w.rank() == 4 { w.squeeze(3)?.squeeze(2)? } else { w };
    if w.dims() != [c, c] {
        candle_core::bail!("{}.weight has shape {:?}, expected [{c}, {c}]", vb.prefix(), w.dims());
    }
    Ok(Linear::new(w, Some(vb.get(c, "bias")?)))
}

#[derive(Debug)]
struct Mid {
    resnet0: ResnetBlock2D,
    attn: MidAttention,
    resnet1: ResnetBlock2D,
}

impl Mid {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock2D::new(c, c, None, groups, 1e-6, vb.pp("resnets.0"))?,
            attn: MidAttention::new(c, groups, vb.pp("attentions.0"))?,
            resnet1: ResnetBlock2D::new(c, c, None, groups, 1e-6, vb.pp("resnets.1"))?,
        })
    }

    fn into_channels_last(self) -> Result<Self> {
        Ok(Self {
            resnet0: self.resnet0.into_channels_last()?,
            attn: self.attn.into_channels_last(),
            resnet1: self.resnet1.into_channels_last()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.resnet0.forward(x, None)?;
        let x = self.attn.forward(&x)?;
        self.resnet1.forward(&x, None)
    }
}

/// The encoder half: image `[b, 3, H, W]` → moments `[b, 2·latent, H/f, W/f]`.
#[derive(Debug)]
pub struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl Encoder {
    /// Loads `encoder.*` and `quant_conv` from the VAE's root.
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let evb = vb.pp("encoder");
        let mut blocks = Vec::new();
        for (i, &cout) in boc.iter().enumerate() {
            let cin = if i == 0 { boc[0] } else { boc[i - 1] };
            let bvb = evb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        if j == 0 { cin } else { cout },
                        cout,
                        None,
                        g,
                        1e-6,
                        bvb.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let down =
                if i + 1 < boc.len() { Some(Downsample2D::new(cout, 0, bvb.pp("downsamplers.0"))?) } else { None };
            blocks.push((resnets, down));
        }
        let last = *boc.last().unwrap_or(&0);
        let moments = 2 * cfg.latent_channels;
        Ok(Self {
            conv_in: conv3x3(cfg.in_channels, boc[0], evb.pp("conv_in"))?,
            blocks,
            mid: Mid::new(last, g, evb.pp("mid_block"))?,
            norm_out: GroupNorm::new(g, last, 1e-6, evb.pp("conv_norm_out"))?,
            conv_out: conv3x3(last, moments, evb.pp("conv_out"))?,
            quant_conv: if cfg.use_quant_conv { Some(conv1x1(moments, moments, vb.pp("quant_conv"))?) } else { None },
        })
    }

    /// Returns the moments (mean and log-variance concatenated on the channel axis).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, down) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        let h = self.conv_out.forward(&self.norm_out.forward_silu(&h)?)?;
        match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => Ok(h),
        }
    }
}

/// The decoder half: latents `[b, latent, h, w]` → image `[b, 3, h·f, w·f]` in about [−1, 1].
#[derive(Debug)]
pub struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: Mid,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Activations `[b, h, w, c]` between the latent and the image ([`Self::into_channels_last`]).
    channels_last: bool,
}

impl Decoder {
    /// Loads `decoder.*` and `post_quant_conv` from the VAE's root.
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let lc = cfg.latent_channels;
        let dvb = vb.pp("decoder");
        let mut blocks = Vec::new();
        let mut cout = rev[0];
        for i in 0..rev.len() {
            let cin = cout;
            cout = rev[i];
            let bvb = dvb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(
                        if j == 0 { cin } else { cout },
                        cout,
                        None,
                        g,
                        1e-6,
                        bvb.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < rev.len() { Some(Upsample2D::new(cout, bvb.pp("upsamplers.0"))?) } else { None };
            blocks.push((resnets, up));
        }
        Ok(Self {
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(conv1x1(lc, lc, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            conv_in: conv3x3(lc, rev[0], dvb.pp("conv_in"))?,
            mid: Mid::new(rev[0], g, dvb.pp("mid_block"))?,
            blocks,
            norm_out: GroupNorm::new(g, cout, 1e-6, dvb.pp("conv_norm_out"))?,
            conv_out: conv3x3(cout, cfg.out_channels, dvb.pp("conv_out"))?,
            channels_last: false,
        })
    }

    /// The same decoder running channels-last inside (latents in and image out stay
    /// `[b, c, h, w]`): cuDNN's tensor-core kernels then read and write the activations as they
    /// are, where channels-first data costs them transposed copies of the full-resolution
    /// tensors in their workspace (1 GiB for SDXL at 1024²).
    pub fn into_channels_last(self) -> Result<Self> {
        let blocks = self
            .blocks
            .into_iter()
            .map(|(resnets, up)| {
                let resnets = resnets.into_iter().map(ResnetBlock2D::into_channels_last).collect::<Result<Vec<_>>>()?;
                Ok((resnets, up.map(Upsample2D::into_channels_last).transpose()?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            post_quant_conv: self.post_quant_conv.map(Conv2d::into_channels_last).transpose()?,
            conv_in: self.conv_in.into_channels_last()?,
            mid: self.mid.into_channels_last()?,
            blocks,
            norm_out: self.norm_out.into_channels_last(),
            conv_out: self.conv_out.into_channels_last()?,
            channels_last: true,
        })
    }

    /// Decodes already-unscaled latents.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        if self.channels_last {
            let image = self.layers(&z.permute((0, 2, 3, 1))?.contiguous()?)?;
            return image.permute((0, 3, 1, 2))?.contiguous();
        }
        self.layers(z)
    }

    /// The decoder's layers in its own activation layout.
    fn layers(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        let mut h = self.conv_in.forward(&z)?;
        h = self.mid.forward(&h)?;
        for (resnets, up) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = up {
                h = u.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// The diagonal Gaussian the encoder predicts.
#[derive(Debug)]
pub struct LatentDistribution {
    /// Mean, `[b, latent, h, w]`.
    pub mean: Tensor,
    /// Log-variance clamped to [−30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// Splits the encoder's moments `[b, 2·latent, h, w]` as diffusers'
    /// `DiagonalGaussianDistribution` does.
    fn from_moments(moments: &Tensor) -> Result<Self> {
        let parts = moments.chunk(2, 1)?;
        Ok(Self { mean: parts[0].clone(), logvar: parts[1].clamp(-30f32, 20f32)? })
    }
}

/// diffusers' `enable_slicing` / `enable_tiling` switches, for [`AutoencoderKL::decode_with`]
/// and [`AutoencoderKL::encode_with`]. The default is neither (plain decode).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct VaeOptions {
    /// Encode / decode a batch one image at a time (`use_slicing`).
    pub slicing: bool,
    /// Tile inputs larger than one tile (`use_tiling`).
    pub tiling: Option<VaeTiling>,
}

/// The whole autoencoder; either half may be loaded alone (a txt2img run needs only the decoder).
#[derive(Debug)]
pub struct AutoencoderKL {
    /// The encoder, if loaded.
    pub encoder: Option<Encoder>,
    /// The decoder, if loaded.
    pub decoder: Option<Decoder>,
    cfg: VaeConfig,
}

impl AutoencoderKL {
    /// Loads the halves asked for.
    pub fn new(cfg: &VaeConfig, encoder: bool, decoder: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            encoder: if encoder { Some(Encoder::new(cfg, vb.clone())?) } else { None },
            decoder: if decoder {
                let d = Decoder::new(cfg, vb.clone())?;
                Some(if crate::ops::prefers_channels_last(vb.device(), vb.dtype()) {
                    d.into_channels_last()?
                } else {
                    d
                })
            } else {
                None
            },
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Sets how the mid-block attentions (encoder and decoder) bound their score matrix
    /// `[b, 1, hw, hw]` (`hw` = latent cells), from the next call on; no reload needed.
    pub fn set_attention_options(&self, options: AttentionOptions) {
        if let Some(e) = &self.encoder {
            e.mid.attn.options.set(options);
        }
        if let Some(d) = &self.decoder {
            d.mid.attn.options.set(options);
        }
    }

    fn encoder(&self) -> Result<&Encoder> {
        self.encoder.as_ref().ok_or_else(|| candle_core::Error::Msg("VAE encoder not loaded".into()))
    }

    fn decoder(&self) -> Result<&Decoder> {
        self.decoder.as_ref().ok_or_else(|| candle_core::Error::Msg("VAE decoder not loaded".into()))
    }

    /// Encodes an image in [−1, 1] to its latent distribution (unscaled).
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        LatentDistribution::from_moments(&self.encoder()?.forward(image)?)
    }

    /// Decodes unscaled latents to an image in about [−1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder()?.forward(z)
    }

    /// diffusers' `decode` with `use_slicing` / `use_tiling` as in `options`: with slicing, a
    /// batch is decoded one image at a time; with tiling, an image whose latent is wider or
    /// taller than `tile_latent_min_size` goes through [`Self::tiled_decode`].
    pub fn decode_with(&self, z: &Tensor, options: &VaeOptions) -> Result<Tensor> {
        let decode_one = |z: &Tensor| -> Result<Tensor> {
            let (_, _, h, w) = z.dims4()?;
            match &options.tiling {
                Some(t) if h > t.tile_latent_min_size || w > t.tile_latent_min_size => self.tiled_decode(z, t),
                _ => self.decode(z),
            }
        };
        if options.slicing && z.dim(0)? > 1 {
            per_image(z, decode_one)
        } else {
            decode_one(z)
        }
    }

    /// diffusers' `encode` with `use_slicing` / `use_tiling` as in `options` (an image wider or
    /// taller than `tile_sample_min_size` is tiled).
    pub fn encode_with(&self, image: &Tensor, options: &VaeOptions) -> Result<LatentDistribution> {
        let enc = self.encoder()?;
        let encode_one = |x: &Tensor| -> Result<Tensor> {
            let (_, _, h, w) = x.dims4()?;
            match &options.tiling {
                Some(t) if h > t.tile_sample_min_size || w > t.tile_sample_min_size => {
                    t.run_encode(x, self.cfg.scale_factor(), |tile| enc.forward(tile))
                }
                _ => enc.forward(x),
            }
        };
        let moments =
            if options.slicing && image.dim(0)? > 1 { per_image(image, encode_one)? } else { encode_one(image)? };
        LatentDistribution::from_moments(&moments)
    }

    /// Decodes a batch one image at a time (diffusers' `enable_slicing`): the activations of one
    /// image are alive at once instead of the whole batch's.
    pub fn decode_sliced(&self, z: &Tensor) -> Result<Tensor> {
        per_image(z, |z| self.decode(z))
    }

    /// diffusers' `tiled_decode`, whatever the latent's size: overlapping tiles of
    /// `tile_latent_min_size` latent cells decoded separately, blended linearly over
    /// `tile_sample_min_size · overlap` pixels and cropped (see [`VaeTiling`]).
    pub fn tiled_decode(&self, z: &Tensor, tiling: &VaeTiling) -> Result<Tensor> {
        let dec = self.decoder()?;
        tiling.run_decode(z, self.cfg.scale_factor(), |tile| dec.forward(tile))
    }

    /// diffusers' `tiled_encode` (its `_tiled_encode`), whatever the image's size.
    pub fn tiled_encode(&self, image: &Tensor, tiling: &VaeTiling) -> Result<LatentDistribution> {
        let enc = self.encoder()?;
        LatentDistribution::from_moments(&tiling.run_encode(image, self.cfg.scale_factor(), |tile| enc.forward(tile))?)
    }
}

/// Applies `f` to each image of the batch `x` separately and concatenates the results.
fn per_image(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let outs = (0..x.dim(0)?).map(|i| f(&x.narrow(0, i, 1)?)).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// The channels-last decoder (every convolution, norm, upsampler and the mid attention
    /// reordered) decodes exactly what the channels-first one does: a small random decoder with
    /// the real structure (two levels, shortcut convolutions, mid attention, post-quant conv).
    /// On the CPU each channels-last op runs the channels-first one between transposes, so the
    /// two must agree to the bit; the GPU test binary checks cuDNN's NHWC kernels.
    #[test]
    fn channels_last_decoder_equals_channels_first() -> Result<()> {
        let dev = Device::Cpu;
        let cfg: VaeConfig = serde_json::from_value(serde_json::json!({
            "block_out_channels": [16, 32], "norm_num_groups": 8, "layers_per_block": 1, "latent_channels": 4
        }))
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let varmap = VarMap::new();
        let first = Decoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
        for var in varmap.all_vars() {
            var.set(&Tensor::randn(0f32, 0.3, var.shape(), &dev)?)?;
        }
        let z = Tensor::randn(0f32, 1.0, (2, 4, 6, 5), &dev)?;
        let want = first.forward(&z)?;
        let last = first.into_channels_last()?;
        let got = last.forward(&z)?;
        assert_eq!(got.dims(), [2, 3, 12, 10]);
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
