//! diffusers' `JointTransformerBlock` (`attention.py`) with `JointAttnProcessor2_0`
//! (`attention_processor.py`) and the adaptive layer norms of `normalization.py`: the image and
//! context streams each modulated by the conditioning vector, attending jointly (their tokens
//! concatenated), each with its own feed-forward.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::attention::{attention_with, pack_heads, AttentionOptions, AttentionOptionsCell};
use crate::ops::linear::{linear, Linear};
use crate::ops::norm::{gated_add, LayerNorm, RmsNorm};

/// Epsilon of every norm inside the blocks (`eps=1e-6` throughout diffusers' SD 3 code).
const EPS: f64 = 1e-6;

/// `emb: [b, n·dim]` → its `n` chunks `[b, dim]`, in diffusers' `emb.chunk(n, dim=1)` order.
fn chunks(emb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    emb.chunk(n, 1)
}

/// The projection `linear(silu(temb))` of an adaptive norm (`norm1.linear`, …).
#[derive(Debug)]
struct AdaProjection(Linear);

impl AdaProjection {
    fn new(dim: usize, n: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self(linear(dim, n * dim, vb.pp("linear"))?))
    }

    fn forward(&self, temb: &Tensor) -> Result<Tensor> {
        self.0.forward(&temb.silu()?)
    }
}

/// The adaptive norm of the image stream: `AdaLayerNormZero` (6 chunks) or, in SD 3.5 Medium's
/// dual-attention blocks, `SD35AdaLayerNormZeroX` (9: a second shift/scale/gate for `attn2`).
#[derive(Debug)]
struct AdaNormZero {
    proj: AdaProjection,
    norm: LayerNorm,
    chunks: usize,
}

/// What [`AdaNormZero`] hands the block: the modulated input(s) and the gates and MLP modulation.
struct Modulated {
    x: Tensor,
    gate_msa: Tensor,
    shift_mlp: Tensor,
    scale_mlp: Tensor,
    gate_mlp: Tensor,
    /// `attn2`'s input and gate (dual attention only).
    x2: Option<(Tensor, Tensor)>,
}

impl AdaNormZero {
    fn new(dim: usize, dual: bool, vb: VarBuilder) -> Result<Self> {
        let chunks = if dual { 9 } else { 6 };
        Ok(Self { proj: AdaProjection::new(dim, chunks, vb)?, norm: LayerNorm::no_affine(dim, EPS), chunks })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Modulated> {
        let c = chunks(&self.proj.forward(temb)?, self.chunks)?;
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2, gate_msa2]
        let x2 =
            if self.chunks == 9 { Some((self.norm.forward_modulated(x, &c[6], &c[7])?, c[8].clone())) } else { None };
        Ok(Modulated {
            x: self.norm.forward_modulated(x, &c[0], &c[1])?,
            gate_msa: c[2].clone(),
            shift_mlp: c[3].clone(),
            scale_mlp: c[4].clone(),
            gate_mlp: c[5].clone(),
            x2,
        })
    }
}

/// `AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)`: the last block's
/// context norm and the model's `norm_out`. Its chunks are **scale, then shift** (the reverse of
/// the zero norms').
#[derive(Debug)]
pub(crate) struct AdaNormContinuous {
    proj: AdaProjection,
    norm: LayerNorm,
}

impl AdaNormContinuous {
    pub(crate) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { proj: AdaProjection::new(dim, 2, vb)?, norm: LayerNorm::no_affine(dim, EPS) })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let c = chunks(&self.proj.forward(temb)?, 2)?;
        self.norm.forward_modulated(x, &c[1], &c[0])
    }
}

/// `FeedForward(dim, activation_fn="gelu-approximate")`: `Linear(dim → 4·dim)`, tanh GELU,
/// `Linear(4·dim → dim)`.
#[derive(Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj_in: linear(dim, 4 * dim, vb.pp("net.0.proj"))?,
            proj_out: linear(4 * dim, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation (PyTorch's `approximate="tanh"`); in place, so
        // the 4×-wide hidden activation is held once.
        self.proj_out.forward(&crate::ops::gelu_in_place(self.proj_in.forward(x)?)?)
    }
}

/// q, k, v projections of one stream, with the optional per-head RMS norms of q and k.
#[derive(Debug)]
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
}

impl Qkv {
    /// `names`: the projections' and norms' key names (`to_q`…`norm_k`, or the context's
    /// `add_q_proj`…`norm_added_k`).
    fn new(
        dim: usize,
        inner: usize,
        head_dim: usize,
        qk_norm: bool,
        names: [&str; 5],
        vb: &VarBuilder,
    ) -> Result<Self> {
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            if qk_norm {
                Ok(Some(RmsNorm::new(head_dim, EPS, vb.pp(name))?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            q: linear(dim, inner, vb.pp(names[0]))?,
            k: linear(dim, inner, vb.pp(names[1]))?,
            v: linear(dim, inner, vb.pp(names[2]))?,
            norm_q: norm(names[3])?,
            norm_k: norm(names[4])?,
        })
    }

    /// `x: [b, n, dim]` → the projections q, k, v `[b, n, inner]` (not yet split into heads or
    /// normalised: [`pack_heads`] does both).
    fn forward(&self, x: &Tensor) -> Result<[Tensor; 3]> {
        Ok([self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?])
    }
}

/// diffusers' `Attention` under `JointAttnProcessor2_0`: the image stream's q/k/v (`to_q`…) and,
/// for the joint attention, the context's (`add_q_proj`…) concatenated after the image tokens;
/// outputs through `to_out.0` and (unless the block is `context_pre_only`) `to_add_out`.
#[derive(Debug)]
struct JointAttention {
    image: Qkv,
    context: Option<Qkv>,
    to_out: Linear,
    to_add_out: Option<Linear>,
    heads: usize,
    scale: f64,
    options: AttentionOptionsCell,
}

impl JointAttention {
    /// `joint`: whether the context takes part; `context_out`: whether its output is projected
    /// back (not in the last block).
    fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        joint: bool,
        context_out: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let image = Qkv::new(dim, inner, head_dim, qk_norm, ["to_q", "to_k", "to_v", "norm_q", "norm_k"], &vb)?;
        let context = if joint {
            let names = ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"];
            Some(Qkv::new(dim, inner, head_dim, qk_norm, names, &vb)?)
        } else {
            None
        };
        let to_add_out = if joint && context_out { Some(linear(inner, dim, vb.pp("to_add_out"))?) } else { None };
        Ok(Self {
            image,
            context,
            to_out: linear(inner, dim, vb.pp("to_out.0"))?,
            to_add_out,
            heads,
            scale: (head_dim as f64).powf(-0.5),
            options: AttentionOptionsCell::default(),
        })
    }

    /// Attends over the image tokens `x: [b, n, dim]` and, when given (joint attention), the
    /// context tokens `c: [b, t, dim]`: `(image output, context output if projected back)`.
    fn forward(&self, x: &Tensor, c: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let n = x.dim(1)?;
        let image = self.image.forward(x)?;
        let context = match (&self.context, c) {
            (Some(context), Some(c)) => Some(context.forward(c)?),
            _ => None,
        };
        // The image tokens first, then the context's, each stream with its own QK-norms.
        let pack = |i: usize, norms: [Option<&RmsNorm>; 2]| -> Result<Tensor> {
            let mut parts = vec![(&image[i], norms[0])];
            if let Some(c) = &context {
                parts.push((&c[i], norms[1]));
            }
            pack_heads(&parts, self.heads)?.transpose(1, 2)
        };
        let context_norms = self.context.as_ref();
        let q = pack(0, [self.image.norm_q.as_ref(), context_norms.and_then(|c| c.norm_q.as_ref())])?;
        let k = pack(1, [self.image.norm_k.as_ref(), context_norms.and_then(|c| c.norm_k.as_ref())])?;
        let v = pack(2, [None, None])?;
        let o = attention_with(&q, &k, &v, self.scale, None, self.options.get())?;
        let (b, heads, len, d) = o.dims4()?;
        let o = o.transpose(1, 2)?.reshape((b, len, heads * d))?;
        let image = self.to_out.forward(&o.narrow(1, 0, n)?)?;
        let context = match &self.to_add_out {
            Some(out) if len > n => Some(out.forward(&o.narrow(1, n, len - n)?)?),
            _ => None,
        };
        Ok((image, context))
    }
}

/// What one block's context stream holds: modulated by `AdaLayerNormZero` with a feed-forward,
/// or (the last block, `context_pre_only`) only normalised for the attention and then dropped.
#[derive(Debug)]
enum ContextStream {
    Full { norm1: AdaNormZero, norm2: LayerNorm, ff: FeedForward },
    PreOnly { norm1: AdaNormContinuous },
}

/// One `JointTransformerBlock`.
#[derive(Debug)]
pub(crate) struct JointBlock {
    norm1: AdaNormZero,
    context: ContextStream,
    attn: JointAttention,
    /// SD 3.5 Medium's image-only second attention (`use_dual_attention`).
    attn2: Option<JointAttention>,
    norm2: LayerNorm,
    ff: FeedForward,
}

impl crate::stream::StreamBlock for JointBlock {
    fn set_attention_options(&self, options: AttentionOptions) {
        self.attn.options.set(options);
        if let Some(attn2) = &self.attn2 {
            attn2.options.set(options);
        }
    }
}

impl JointBlock {
    pub(crate) fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        context_pre_only: bool,
        dual: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let context = if context_pre_only {
            ContextStream::PreOnly { norm1: AdaNormContinuous::new(dim, vb.pp("norm1_context"))? }
        } else {
            ContextStream::Full {
                norm1: AdaNormZero::new(dim, false, vb.pp("norm1_context"))?,
                norm2: LayerNorm::no_affine(dim, EPS),
                ff: FeedForward::new(dim, vb.pp("ff_context"))?,
            }
        };
        let attn2 = if dual {
            Some(JointAttention::new(dim, heads, head_dim, qk_norm, false, false, vb.pp("attn2"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: AdaNormZero::new(dim, dual, vb.pp("norm1"))?,
            context,
            attn: JointAttention::new(dim, heads, head_dim, qk_norm, true, !context_pre_only, vb.pp("attn"))?,
            attn2,
            norm2: LayerNorm::no_affine(dim, EPS),
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    /// `(context, image)` → the updated `(context, image)`; the context is `None` after the last
    /// block (`context_pre_only`), as in diffusers.
    pub(crate) fn forward(&self, x: &Tensor, c: &Tensor, temb: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        let m = self.norm1.forward(x, temb)?;
        let (c_normed, c_mod) = match &self.context {
            ContextStream::Full { norm1, .. } => {
                let cm = norm1.forward(c, temb)?;
                (cm.x.clone(), Some(cm))
            }
            ContextStream::PreOnly { norm1 } => (norm1.forward(c, temb)?, None),
        };
        let (attn_out, c_attn_out) = self.attn.forward(&m.x, Some(&c_normed))?;
        let mut x = gated_add(x, &m.gate_msa, &attn_out)?;
        if let (Some(attn2), Some((x2, gate2))) = (&self.attn2, &m.x2) {
            x = gated_add(&x, gate2, &attn2.forward(x2, None)?.0)?;
        }
        let ff_in = self.norm2.forward_modulated(&x, &m.shift_mlp, &m.scale_mlp)?;
        let x = gated_add(&x, &m.gate_mlp, &self.ff.forward(&ff_in)?)?;

        let c = match (&self.context, c_mod, c_attn_out) {
            (ContextStream::Full { norm2, ff, .. }, Some(cm), Some(c_attn_out)) => {
                let c = gated_add(c, &cm.gate_msa, &c_attn_out)?;
                let ff_in = norm2.forward_modulated(&c, &cm.shift_mlp, &cm.scale_mlp)?;
                Some(gated_add(&c, &cm.gate_mlp, &ff.forward(&ff_in)?)?)
            }
            _ => None,
        };
        Ok((c, x))
    }
}
