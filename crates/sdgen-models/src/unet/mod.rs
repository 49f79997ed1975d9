//! diffusers' `UNet2DConditionModel` in the configurations of SD 1.x/2.x, SDXL and the SDXL
//! refiner (SDXL's additional embedding: [`AddedConditioning`]), keys as in the hub's
//! `unet/diffusion_pytorch_model.safetensors`.

mod config;
mod transformer;

pub use config::{IntOrList, UNetConfig};
pub use transformer::{CrossAttention, Transformer2D, TransformerSpec};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::attention::AttentionOptions;
use crate::denoiser::{Conditioning, Denoiser};
use crate::ops::conv::{conv3x3, Conv2d};
use crate::ops::linear::{linear, linear_no_bias, Linear};
use crate::ops::norm::GroupNorm;
use crate::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::stream::{Block, BlockWeights, StreamableModel};

/// diffusers' `get_guidance_scale_embedding` (the LCM pipelines' `w_embedding`, from VDM's
/// `get_timestep_embedding`): the guidance `w` (the pipelines pass `guidance_scale − 1`) times
/// 1000, embedded as `[sin, cos]` of `w·1000 · exp(−ln(10⁴)/(half − 1) · i)`, in f32 as the
/// pipelines compute it: `[n, dim]` for `n` images, odd widths padded with a zero.
pub fn guidance_scale_embedding(w: f64, n: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let w = w as f32 * 1000.0;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let mut row: Vec<f32> = args.iter().map(|a| a.sin()).chain(args.iter().map(|a| a.cos())).collect();
    row.resize(dim, 0.0);
    Tensor::from_vec(row.repeat(n), (n, dim), device)
}

/// diffusers' `get_timestep_embedding`, computed in f32 as diffusers does: `[n, dim]`.
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = -(10000f32.ln()) * i as f32;
            (exponent / (half as f32 - downscale_freq_shift as f32)).exp()
        })
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t as f32 * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        if flip_sin_to_cos {
            data.extend(cos);
            data.extend(sin);
        } else {
            data.extend(sin);
            data.extend(cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (timesteps.len(), dim), device)
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<Block<ResnetBlock2D>>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Block<Downsample2D>>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<Block<ResnetBlock2D>>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Block<Upsample2D>>,
}

#[derive(Debug)]
struct MidBlock {
    resnets: Vec<Block<ResnetBlock2D>>,
    attentions: Vec<Transformer2D>,
}

/// SDXL's additional conditioning of one forward (`added_cond_kwargs` in diffusers).
#[derive(Debug, Clone, Copy)]
pub struct AddedConditioning<'a> {
    /// The second text encoder's projected pooled output, `[b, text_embeds_dim]`.
    pub text_embeds: &'a Tensor,
    /// The micro-conditioning numbers, `[b, k]` (base: original height and width, crop top and
    /// left, target height and width; refiner: original size, crop, aesthetic score). Read as
    /// values: their embedding is computed in f32 like the timestep's.
    pub time_ids: &'a Tensor,
}

/// SDXL's `add_time_proj` (sinusoidal, no weights) and `add_embedding` (two linears).
#[derive(Debug)]
struct AddEmbedding {
    time_dim: usize,
    linear_1: Linear,
    linear_2: Linear,
}

/// The conditional UNet.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// LCM's guidance embedding into the time embedding (`time_embedding.cond_proj`, no bias),
    /// for UNets with `time_cond_proj_dim`.
    time_cond_proj: Option<Linear>,
    add_embedding: Option<AddEmbedding>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    cfg: UNetConfig,
}

impl UNet2DConditionModel {
    /// Loads the model; `cfg` is usually `unet/config.json`.
    pub fn new(cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        Self::load(cfg, BlockWeights::resident(vb))
    }
}

impl StreamableModel for UNet2DConditionModel {
    type Config = UNetConfig;

    /// Every resnet, every transformer block inside the attentions (SDXL's deepest attentions
    /// hold ten each), every down/up sampler. What stays resident: the time and added
    /// embeddings, `conv_in`, `conv_norm_out`, `conv_out` and the attentions' norms and
    /// projections.
    fn stream_blocks(cfg: &UNetConfig) -> Vec<String> {
        let n = cfg.block_out_channels.len();
        let layers = cfg.layers_per_block.expand(n);
        let tlayers = cfg.transformer_layers_per_block.expand(n);
        let attention = |prefix: String, level: usize| Transformer2D::stream_blocks(tlayers[level], &prefix);
        let mut out = Vec::new();
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            for j in 0..layers[i] {
                out.push(format!("down_blocks.{i}.resnets.{j}"));
                if kind.starts_with("CrossAttn") {
                    out.extend(attention(format!("down_blocks.{i}.attentions.{j}"), i));
                }
            }
            if i + 1 < n {
                out.push(format!("down_blocks.{i}.downsamplers.0"));
            }
        }
        out.push("mid_block.resnets.0".into());
        out.extend(attention("mid_block.attentions.0".into(), n - 1));
        out.push("mid_block.resnets.1".into());
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let level = n - 1 - i;
            for j in 0..layers[level] + 1 {
                out.push(format!("up_blocks.{i}.resnets.{j}"));
                if kind.starts_with("CrossAttn") {
                    out.extend(attention(format!("up_blocks.{i}.attentions.{j}"), level));
                }
            }
            if i + 1 < n {
                out.push(format!("up_blocks.{i}.upsamplers.0"));
            }
        }
        out
    }

    fn build(cfg: &UNetConfig, weights: BlockWeights) -> Result<Self> {
        cfg.validate()?;
        let vb = weights.vb().clone();
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let temb = boc[0] * 4;
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;
        let heads = cfg.heads_per_block();
        let tlayers = cfg.transformer_layers_per_block.expand(n);
        let layers = cfg.layers_per_block.expand(n);
        let ctx = cfg.cross_attention_dim;
        let spec = |channels: usize, i: usize| TransformerSpec {
            channels,
            heads: heads[i],
            context_dim: ctx,
            layers: tlayers[i],
            groups,
            linear_projection: cfg.use_linear_projection,
        };

        let mut down = Vec::with_capacity(n);
        let resnet = |w: &BlockWeights, name: String, cin: usize, cout: usize| {
            w.block(name, move |vb| ResnetBlock2D::new(cin, cout, Some(temb), groups, eps, vb))
        };
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let w = weights.pp(format!("down_blocks.{i}"));
            let cout = boc[i];
            let cin = if i == 0 { boc[0] } else { boc[i - 1] };
            let cross = kind.starts_with("CrossAttn");
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers[i] {
                let c = if j == 0 { cin } else { cout };
                resnets.push(resnet(&w, format!("resnets.{j}"), c, cout)?);
                if cross {
                    attentions.push(Transformer2D::new(spec(cout, i), &w.pp(format!("attentions.{j}")))?);
                }
            }
            let padding = cfg.downsample_padding;
            let downsampler = if i + 1 < n {
                Some(w.block("downsamplers.0", move |vb| Downsample2D::new(cout, padding, vb))?)
            } else {
                None
            };
            down.push(DownBlock { resnets, attentions, downsampler });
        }

        // Built in forward order: resnet, attention, resnet.
        let c = boc[n - 1];
        let mw = weights.pp("mid_block");
        let resnet_0 = resnet(&mw, "resnets.0".into(), c, c)?;
        let attention = Transformer2D::new(spec(c, n - 1), &mw.pp("attentions.0"))?;
        let mid =
            MidBlock { resnets: vec![resnet_0, resnet(&mw, "resnets.1".into(), c, c)?], attentions: vec![attention] };

        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let w = weights.pp(format!("up_blocks.{i}"));
            let prev_out = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let level = n - 1 - i;
            let cross = kind.starts_with("CrossAttn");
            let num = layers[level] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num {
                let skip = if j + 1 == num { in_c } else { out_c };
                let rin = if j == 0 { prev_out } else { out_c };
                resnets.push(resnet(&w, format!("resnets.{j}"), rin + skip, out_c)?);
                if cross {
                    attentions.push(Transformer2D::new(spec(out_c, level), &w.pp(format!("attentions.{j}")))?);
                }
            }
            let upsampler =
                if i + 1 < n { Some(w.block("upsamplers.0", move |vb| Upsample2D::new(out_c, vb))?) } else { None };
            up.push(UpBlock { resnets, attentions, upsampler });
        }

        let add_embedding = match (cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) {
            (Some(time_dim), Some(input_dim)) if cfg.addition_embed_type.as_deref() == Some("text_time") => {
                Some(AddEmbedding {
                    time_dim,
                    linear_1: linear(input_dim, temb, vb.pp("add_embedding.linear_1"))?,
                    linear_2: linear(temb, temb, vb.pp("add_embedding.linear_2"))?,
                })
            }
            _ => None,
        };

        Ok(Self {
            conv_in: conv3x3(cfg.in_channels, boc[0], vb.pp("conv_in"))?,
            time_linear_1: linear(boc[0], temb, vb.pp("time_embedding.linear_1"))?,
            time_linear_2: linear(temb, temb, vb.pp("time_embedding.linear_2"))?,
            time_cond_proj: cfg
                .time_cond_proj_dim
                .map(|dim| linear_no_bias(dim, boc[0], vb.pp("time_embedding.cond_proj")))
                .transpose()?,
            add_embedding,
            down,
            mid,
            up,
            norm_out: GroupNorm::new(groups, boc[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(boc[0], cfg.out_channels, vb.pp("conv_out"))?,
            cfg: cfg.clone(),
        })
    }
}

impl UNet2DConditionModel {
    /// The configuration the model was built with.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Whether the model takes SDXL's additional conditioning (then every forward needs it).
    pub fn takes_added_conditioning(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// The additional embedding `add_embedding(cat(text_embeds, add_time_proj(time_ids)))`,
    /// `[b, time_embed_dim]` in `dtype`.
    fn added_embedding(&self, add: &AddEmbedding, added: &AddedConditioning, b: usize, dtype: DType) -> Result<Tensor> {
        let (tb, k) = added.time_ids.dims2()?;
        let text_embeds = added.text_embeds;
        if tb != b || text_embeds.dim(0)? != b {
            candle_core::bail!("added conditioning for {} / {} images, the sample has {b}", text_embeds.dim(0)?, tb);
        }
        // diffusers hands the ids over in the pipeline's dtype and embeds them in f32.
        let values: Vec<f64> =
            added.time_ids.to_dtype(dtype)?.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let time = timestep_embedding(
            &values,
            add.time_dim,
            self.cfg.flip_sin_to_cos,
            self.cfg.freq_shift,
            text_embeds.device(),
        )?
        .reshape((b, k * add.time_dim))?;
        let input = Tensor::cat(&[&text_embeds.to_dtype(DType::F32)?, &time], 1)?.to_dtype(dtype)?;
        add.linear_2.forward(&add.linear_1.forward(&input)?.silu()?)
    }

    /// Predicts the noise (or v, per the scheduler config) for `sample: [b, c, h, w]` at
    /// `timestep`, conditioned on `context: [b, tokens, cross_attention_dim]`, for models without
    /// additional conditioning (SD 1.x/2.x); see [`Self::forward_with`].
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        self.forward_at(sample, &vec![timestep; sample.dim(0)?], context, None, None)
    }

    /// [`Self::forward`] with SDXL's additional conditioning, which models that take it
    /// ([`Self::takes_added_conditioning`]) require and others refuse.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        self.forward_at(sample, &vec![timestep; sample.dim(0)?], context, added, None)
    }

    /// [`Self::forward_with`] with one timestep per batch entry and, for an LCM UNet, the
    /// guidance embedding `timestep_cond: [b, time_cond_proj_dim]` added to the timestep's
    /// before the time MLP (diffusers' `TimestepEmbedding(sample, condition)`).
    fn forward_at(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        added: Option<&AddedConditioning>,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        if timesteps.len() != b {
            candle_core::bail!("{} timesteps for a batch of {b}", timesteps.len());
        }
        let dtype = sample.dtype();
        let boc0 = self.cfg.block_out_channels[0];
        let t = timestep_embedding(timesteps, boc0, self.cfg.flip_sin_to_cos, self.cfg.freq_shift, sample.device())?
            .to_dtype(dtype)?;
        let t = match (&self.time_cond_proj, timestep_cond) {
            (Some(proj), Some(cond)) => (t + proj.forward(&cond.to_dtype(dtype)?)?)?,
            (None, None) => t,
            (Some(_), None) => {
                candle_core::bail!("this UNet (LCM) needs its guidance embedding (timestep_cond)")
            }
            (None, Some(_)) => candle_core::bail!("this UNet takes no guidance embedding (timestep_cond)"),
        };
        let mut emb = self.time_linear_2.forward(&self.time_linear_1.forward(&t)?.silu()?)?;
        match (&self.add_embedding, added) {
            (Some(add), Some(added)) => emb = (emb + self.added_embedding(add, added, b, dtype)?)?,
            (None, None) => {}
            (Some(_), None) => {
                candle_core::bail!("this UNet (SDXL-type) needs its added conditioning: text_embeds and time_ids")
            }
            (None, Some(_)) => candle_core::bail!("this UNet takes no added conditioning (text_embeds, time_ids)"),
        }
        let context = context.to_dtype(dtype)?;

        // diffusers forwards explicit upsample sizes when the latent is not a multiple of the
        // overall downscale factor, so skip connections line up (e.g. 520-pixel images).
        let num_up = self.up.iter().filter(|u| u.upsampler.is_some()).count();
        let factor = 1usize << num_up;
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.with(|r| r.forward(&x, Some(&emb)))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, &context)?;
                }
                skips.push(x.clone());
            }
            if let Some(ds) = &block.downsampler {
                x = ds.with(|d| d.forward(&x))?;
                skips.push(x.clone());
            }
        }

        x = self.mid.resnets[0].with(|r| r.forward(&x, Some(&emb)))?;
        x = self.mid.attentions[0].forward(&x, &context)?;
        x = self.mid.resnets[1].with(|r| r.forward(&x, Some(&emb)))?;

        for block in &self.up {
            let res = skips.split_off(skips.len() - block.resnets.len());
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = &res[res.len() - 1 - j];
                x = Tensor::cat(&[&x, skip], 1)?;
                x = resnet.with(|r| r.forward(&x, Some(&emb)))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, &context)?;
                }
            }
            if let Some(us) = &block.upsampler {
                let size = match skips.last() {
                    Some(s) if forward_upsample_size => {
                        let (_, _, sh, sw) = s.dims4()?;
                        Some((sh, sw))
                    }
                    _ => None,
                };
                x = us.with(|u| u.forward(&x, size))?;
            }
        }
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

impl Denoiser for UNet2DConditionModel {
    /// SDXL's added conditioning is the pooled text with the time ids; a model that takes it
    /// needs both (see [`Self::forward_with`]).
    fn forward(&self, latents: &Tensor, timesteps: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let t: Vec<f64> = timesteps.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let added = match (&cond.pooled, &cond.time_ids) {
            (Some(text_embeds), Some(time_ids)) => Some(AddedConditioning { text_embeds, time_ids }),
            (None, None) => None,
            _ => candle_core::bail!("a UNet's added conditioning is the pooled text and the time ids together"),
        };
        self.forward_at(latents, &t, &cond.context, added.as_ref(), cond.timestep_cond.as_ref())
    }

    fn set_attention_options(&self, options: AttentionOptions) {
        UNet2DConditionModel::set_attention_options(self, options)
    }
}
