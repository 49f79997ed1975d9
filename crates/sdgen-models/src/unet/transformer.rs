//! diffusers' `Transformer2DModel` with `BasicTransformerBlock`s: self-attention, cross-attention
//! to the text, and a GEGLU feed-forward, between a 2-D input projection and its inverse.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::attention::{attention_with, merge_heads, split_heads, AttentionOptions, AttentionOptionsCell};
use crate::ops::conv::{conv1x1, Conv2d};
use crate::ops::linear::{linear, linear_no_bias, Linear};
use crate::ops::norm::{GroupNorm, LayerNorm};
use crate::stream::{Block, BlockWeights, StreamBlock};

/// diffusers' `Attention` as used in UNets: bias-free q/k/v, an output projection with bias.
#[derive(Debug)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    options: AttentionOptionsCell,
}

impl CrossAttention {
    /// `context_dim` is `None` for self-attention.
    pub fn new(dim: usize, context_dim: Option<usize>, heads: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = heads * head_dim;
        let ctx = context_dim.unwrap_or(dim);
        Ok(Self {
            to_q: linear_no_bias(dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(ctx, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(ctx, inner, vb.pp("to_v"))?,
            to_out: linear(inner, dim, vb.pp("to_out.0"))?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
            options: AttentionOptionsCell::default(),
        })
    }

    /// Sets how this layer's attention bounds its score memory, from the next call on.
    pub fn set_attention_options(&self, options: AttentionOptions) {
        self.options.set(options);
    }

    /// Attends from `x: [b, n, dim]` to `context` (or to itself).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(ctx)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(ctx)?, self.heads)?;
        let o = attention_with(&q, &k, &v, self.scale, None, self.options.get())?;
        self.to_out.forward(&merge_heads(&o)?)
    }
}

/// The GEGLU feed-forward: `Linear(dim → 2·inner)`, `a · gelu(b)`, `Linear(inner → dim)`.
#[derive(Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out.forward(&crate::ops::geglu(&self.proj_in.forward(x)?)?)
    }
}

#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(dim: usize, context_dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, None, heads, head_dim, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(dim, Some(context_dim), heads, head_dim, vb.pp("attn2"))?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

impl StreamBlock for BasicTransformerBlock {
    fn set_attention_options(&self, options: AttentionOptions) {
        self.attn1.set_attention_options(options);
        self.attn2.set_attention_options(options);
    }
}

/// The input/output projection: a 1×1 convolution (SD 1.5) or a linear layer on the flattened
/// tokens (`use_linear_projection`, SD 2 and SDXL).
#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` for a `[b, c, h, w]` feature map.
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    /// Streamable one by one (at SDXL's deepest levels ten of them hold ~0.7 GB in bf16); the
    /// norm and projections around them are small and stay resident.
    blocks: Vec<Block<BasicTransformerBlock>>,
    proj_out: Projection,
}

/// The shape parameters of one [`Transformer2D`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    /// Channels of the feature map.
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of the text conditioning.
    pub context_dim: usize,
    /// Number of `BasicTransformerBlock`s.
    pub layers: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Linear instead of 1×1 convolution projections.
    pub linear_projection: bool,
}

impl Transformer2D {
    /// The block prefixes of a transformer of `layers` blocks at `prefix`, in forward order.
    pub fn stream_blocks(layers: usize, prefix: &str) -> Vec<String> {
        (0..layers).map(|i| format!("{prefix}.transformer_blocks.{i}")).collect()
    }

    /// Loads the module, its transformer blocks as `weights` holds blocks.
    pub fn new(spec: TransformerSpec, weights: &BlockWeights) -> Result<Self> {
        let vb = weights.vb();
        let c = spec.channels;
        let proj = |name: &str| -> Result<Projection> {
            Ok(if spec.linear_projection {
                Projection::Linear(linear(c, c, vb.pp(name))?)
            } else {
                Projection::Conv(conv1x1(c, c, vb.pp(name))?)
            })
        };
        let head_dim = c / spec.heads;
        let (context_dim, heads) = (spec.context_dim, spec.heads);
        let blocks = (0..spec.layers)
            .map(|i| {
                weights.block(format!("transformer_blocks.{i}"), move |vb| {
                    BasicTransformerBlock::new(c, context_dim, heads, head_dim, vb)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(spec.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    /// Sets the attention options of every self- and cross-attention inside, from the next call on.
    pub fn set_attention_options(&self, options: AttentionOptions) {
        for block in &self.blocks {
            block.set_attention_options(options);
        }
    }

    /// Applies the transformer with `context: [b, tokens, context_dim]`; residual included.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, h * w, c)) };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&x)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&x)?)?,
        };
        for block in &self.blocks {
            tokens = block.with(|b| b.forward(&tokens, context))?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> { t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous() };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?)?,
        };
        out + residual
    }
}

// Lives here rather than in `unet/mod.rs` (a child module may read its parent's private fields)
// only to keep the memory-option plumbing in one file; it is an ordinary inherent method.
impl super::UNet2DConditionModel {
    /// Sets how every attention of the UNet bounds its f32 score matrix (see
    /// [`AttentionOptions`]); takes effect from the next `forward`, no reload needed.
    ///
    /// The self-attention of the highest-resolution level dominates: its scores are
    /// `attention_scores_bytes(b, heads, h·w, h·w, slice)` for latents `h × w`.
    pub fn set_attention_options(&self, options: AttentionOptions) {
        let down = self.down.iter().flat_map(|b| &b.attentions);
        let up = self.up.iter().flat_map(|b| &b.attentions);
        for t in down.chain(&self.mid.attentions).chain(up) {
            t.set_attention_options(options);
        }
    }
}
