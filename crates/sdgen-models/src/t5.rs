//! The T5 encoder (transformers' `T5EncoderModel`), SD 3 / 3.5's third text encoder
//! (`text_encoder_3`, T5 v1.1 XXL), keys as in transformers' checkpoints.
//!
//! Pre-norm blocks of self-attention and a feed-forward layer over an RMS-normed residual stream
//! (no biases anywhere). Attention is unscaled (T5 folds `1/√d` into its initialisation) and its
//! only position information is a learned bias per head and relative-position bucket, computed by
//! the first block and shared by all (transformers' `compute_bias`).
//!
//! Half precision follows transformers exactly where it differs from a plain cast:
//!
//! - [`T5LayerNorm`] takes its statistics in f32 and rounds the normalised value to the weight's
//!   dtype before the scale;
//! - with f16 weights the feed-forward output projections (`wo`) stay in f32
//!   (`_keep_in_fp32_modules = ["wo"]`, applied by `from_pretrained` for f16 only, see
//!   <https://github.com/huggingface/transformers/issues/20287>): their input is cast up, and the
//!   residual stream is f32 from the first feed-forward on (torch promotes f16 + f32);
//! - a f16 residual stream holding ±inf is clamped to ±64512 (`T5Block`'s `clamp_value`:
//!   f16 max − 1000, rounded to f16).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::attention::{attention, merge_heads, split_heads};
use crate::ops::linear::{linear_no_bias, Linear};
use crate::stream::{Block, BlockWeights, StreamBlock, StreamableModel};

/// The feed-forward layer's form (`feed_forward_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FeedForwardProj {
    /// T5 1.0: `wo(relu(wi(x)))`.
    #[serde(rename = "relu")]
    Relu,
    /// T5 1.1 (SD 3's XXL): `wo(gelu_new(wi_0(x)) · wi_1(x))`, `gelu_new` being the tanh
    /// approximation.
    #[serde(rename = "gated-gelu")]
    GatedGelu,
}

/// `text_encoder_3/config.json`, the fields the encoder needs (others ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T5Config {
    /// Token vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    /// Width of the feed-forward layer.
    pub d_ff: usize,
    /// Encoder blocks.
    pub num_layers: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Relative-position buckets (both directions together).
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Offsets at or beyond this share the last bucket of their direction.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// RMS norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// The feed-forward form.
    #[serde(default = "default_ff")]
    pub feed_forward_proj: FeedForwardProj,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> FeedForwardProj {
    FeedForwardProj::Relu
}

impl T5Config {
    /// T5 v1.1 XXL's encoder, SD 3 / 3.5's `text_encoder_3`.
    pub fn t5_xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: FeedForwardProj::GatedGelu,
        }
    }
}

/// transformers' bidirectional `_relative_position_bucket` for `relative_position = key −
/// query`: half the buckets per direction (positive offsets in the upper half); within one,
/// offsets below a quarter of the buckets get their own, larger ones share logarithmically wider
/// buckets up to `max_distance`. The logarithm is taken in f32 as torch does (offsets such as 64
/// land exactly on a bucket boundary, where f64 would round differently).
pub fn relative_position_bucket(relative_position: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative_position > 0 { half } else { 0 };
    let n = relative_position.abs();
    let max_exact = half / 2;
    if n < max_exact {
        return (bucket + n) as usize;
    }
    let log_ratio = ((n as f32) / (max_exact as f32)).ln();
    let scale = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (log_ratio / scale * (half - max_exact) as f32) as i64;
    bucket += large.min(half - 1);
    bucket as usize
}

/// T5's RMS norm (transformers' `T5LayerNorm`): no mean, no bias; statistics in f32; the
/// normalised value rounded to the weight's dtype when that is half precision, then scaled.
#[derive(Debug, Clone)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?;
        let y = match self.weight.dtype() {
            DType::F16 | DType::BF16 => y.to_dtype(self.weight.dtype())?,
            _ => y,
        };
        y.broadcast_mul(&self.weight.to_dtype(y.dtype())?)
    }
}

/// `a + b` with torch's promotion of two floating dtypes (f16 + f32 = f32).
fn add_promoted(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == b.dtype() {
        return a + b;
    }
    let wide = if a.dtype() == DType::F64 || b.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    a.to_dtype(wide)? + b.to_dtype(wide)?
}

/// `T5Block`'s f16 guard: where the residual stream holds ±inf, clamp it to ±(f16 max − 1000)
/// (64504, which the f16 clamp rounds to 64512); otherwise a no-op.
fn clamp_f16_inf(x: Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F16 {
        return Ok(x);
    }
    let max = x.abs()?.to_dtype(DType::F32)?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    if max.is_infinite() {
        let bound = half::f16::from_f64(f64::from(half::f16::MAX) - 1000.0).to_f64();
        x.clamp(-bound, bound)
    } else {
        Ok(x)
    }
}

#[derive(Debug)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
}

/// transformers' `compute_bias`: the relative-position bias `[1, heads, seq, seq]` from the
/// table `[buckets, heads]` (block 0's `relative_attention_bias`, shared by every block), in the
/// table's dtype.
fn compute_bias(table: &Embedding, cfg: &T5Config, seq: usize, device: &Device) -> Result<Tensor> {
    let (nb, md) = (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance);
    let buckets: Vec<u32> = (0..seq as i64)
        .flat_map(|q| (0..seq as i64).map(move |k| relative_position_bucket(k - q, nb, md) as u32))
        .collect();
    let buckets = Tensor::from_vec(buckets, (seq, seq), device)?;
    // [seq, seq, heads] → [1, heads, seq, seq]
    table.forward(&buckets)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()
}

impl SelfAttention {
    fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            q: linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            heads: cfg.num_heads,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let q = split_heads(&self.q.forward(x)?, self.heads)?;
        let k = split_heads(&self.k.forward(x)?, self.heads)?;
        let v = split_heads(&self.v.forward(x)?, self.heads)?;
        // torch's SDPA keeps half-precision scores in f32 (the CPU flash kernel accumulates them
        // in f32 and adds the bias there); ours would round them to the input dtype first, which
        // at T5's unscaled logits (tens) costs a tenth of a logit in bf16. Sequences are short
        // (≤ 512), so the f32 scores are small.
        let dtype = q.dtype();
        let o = match dtype {
            DType::F16 | DType::BF16 => {
                let f32 = |t: &Tensor| t.to_dtype(DType::F32);
                attention(&f32(&q)?, &f32(&k)?, &f32(&v)?, 1.0, Some(&f32(bias)?))?.to_dtype(dtype)?
            }
            _ => attention(&q, &k, &v, 1.0, Some(bias))?,
        };
        self.o.forward(&merge_heads(&o)?)
    }
}

#[derive(Debug)]
enum FeedForward {
    Relu { wi: Linear, wo: Linear },
    GatedGelu { wi_0: Linear, wi_1: Linear, wo: Linear },
}

impl FeedForward {
    fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        // `_keep_in_fp32_modules = ["wo"]`: transformers loads `wo` in f32 when the model is f16.
        let wo = {
            let vb = vb.pp("wo");
            let dtype = if vb.dtype() == DType::F16 { DType::F32 } else { vb.dtype() };
            let weight =
                vb.get_with_hints_dtype((cfg.d_model, cfg.d_ff), "weight", candle_nn::Init::Const(0.0), dtype)?;
            Linear::new(weight, None)
        };
        Ok(match cfg.feed_forward_proj {
            FeedForwardProj::Relu => FeedForward::Relu { wi: linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi"))?, wo },
            FeedForwardProj::GatedGelu => FeedForward::GatedGelu {
                wi_0: linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_0"))?,
                wi_1: linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_1"))?,
                wo,
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (h, wo) = match self {
            FeedForward::Relu { wi, wo } => (wi.forward(x)?.relu()?, wo),
            FeedForward::GatedGelu { wi_0, wi_1, wo } => ((gelu_new(&wi_0.forward(x)?)? * wi_1.forward(x)?)?, wo),
        };
        // transformers casts the input to `wo`'s dtype when they differ (the f32 `wo` of f16 models).
        wo.forward(&h.to_dtype(wo.weight().map_or(h.dtype(), Tensor::dtype))?)
    }
}

/// transformers' `gelu_new` (`NewGELUActivation`): `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
/// In f32 candle's `gelu` (the same tanh approximation); in half precision written out op by op
/// as torch evaluates that Python expression, each op in f32 and rounded to the dtype.
fn gelu_new(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return x.gelu();
    }
    let round = |t: Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
    let xf = x.to_dtype(DType::F32)?;
    let half_x = round(xf.affine(0.5, 0.0)?)?;
    let cube = round(xf.powf(3.0)?)?;
    let inner = round((&xf + round(cube.affine(0.044715, 0.0)?)?)?)?;
    let tanh = round(round(inner.affine((2.0 / std::f64::consts::PI).sqrt(), 0.0)?)?.tanh()?)?;
    let one_plus = round(tanh.affine(1.0, 1.0)?)?;
    (half_x * one_plus)?.to_dtype(dtype)
}

#[derive(Debug)]
struct T5Block {
    attn_norm: T5LayerNorm,
    attn: SelfAttention,
    ff_norm: T5LayerNorm,
    ff: FeedForward,
}

impl StreamBlock for T5Block {}

impl T5Block {
    /// A block's weights; block 0's relative-position table is read by the model (it is shared).
    fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let (attn_vb, ff_vb) = (vb.pp("layer.0"), vb.pp("layer.1"));
        Ok(Self {
            attn_norm: T5LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, attn_vb.pp("layer_norm"))?,
            attn: SelfAttention::new(cfg, attn_vb.pp("SelfAttention"))?,
            ff_norm: T5LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, ff_vb.pp("layer_norm"))?,
            ff: FeedForward::new(cfg, ff_vb.pp("DenseReluDense"))?,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let h = add_promoted(x, &self.attn.forward(&self.attn_norm.forward(x)?, bias)?)?;
        let h = clamp_f16_inf(h)?;
        let h = add_promoted(&h, &self.ff.forward(&self.ff_norm.forward(&h)?)?)?;
        clamp_f16_inf(h)
    }
}

/// The T5 encoder stack: token embedding, blocks, final norm.
#[derive(Debug)]
pub struct T5EncoderModel {
    embed_tokens: Embedding,
    /// Block 0's relative-position table `[buckets, heads]`, resident: every block uses its bias.
    relative_attention_bias: Embedding,
    blocks: Vec<Block<T5Block>>,
    final_layer_norm: T5LayerNorm,
    cfg: T5Config,
}

impl T5EncoderModel {
    /// Loads the encoder from `vb` rooted at the checkpoint's top level: the embedding as
    /// `shared.weight` (transformers' save) or `encoder.embed_tokens.weight`, the rest under
    /// `encoder.` (`block.N.layer.0.SelfAttention.{q,k,v,o}`, block 0's
    /// `relative_attention_bias`, `block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}` or `{wi,wo}`,
    /// the `layer_norm`s and `final_layer_norm`). With an f16 `vb`, `wo` is loaded in f32 (see
    /// the module docs).
    pub fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        Self::load(cfg, BlockWeights::resident(vb))
    }
}

impl StreamableModel for T5EncoderModel {
    type Config = T5Config;

    /// The encoder's blocks (layers).
    fn stream_blocks(cfg: &T5Config) -> Vec<String> {
        (0..cfg.num_layers).map(|i| format!("encoder.block.{i}")).collect()
    }

    fn build(cfg: &T5Config, weights: BlockWeights) -> Result<Self> {
        if cfg.num_layers == 0 {
            candle_core::bail!("T5 encoder without blocks (num_layers 0)");
        }
        let vb = weights.vb().clone();
        let enc = weights.pp("encoder");
        let embed_vb =
            if vb.contains_tensor("shared.weight") { vb.pp("shared") } else { vb.pp("encoder.embed_tokens") };
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let cfg = cfg.clone();
                enc.block(format!("block.{i}"), move |vb| T5Block::new(&cfg, vb))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: candle_nn::embedding(cfg.vocab_size, cfg.d_model, embed_vb)?,
            relative_attention_bias: candle_nn::embedding(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                vb.pp("encoder.block.0.layer.0.SelfAttention.relative_attention_bias"),
            )?,
            blocks,
            final_layer_norm: T5LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, vb.pp("encoder.final_layer_norm"))?,
            cfg: cfg.clone(),
        })
    }
}

impl T5EncoderModel {
    /// The configuration the model was built with.
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The last hidden state `[b, seq, d_model]` of `input_ids: [b, seq]` (u32 or i64), every
    /// token attending to every other (what SD 3's pipeline runs: no attention mask).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with_mask(input_ids, None)
    }

    /// [`Self::forward`] with an optional `attention_mask: [b, seq]` (1 keep, 0 ignore, any
    /// numeric dtype): masked keys get the dtype's lowest value instead of the position bias, as
    /// transformers' SDPA path builds its mask.
    pub fn forward_with_mask(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, seq) = input_ids.dims2()?;
        let device = input_ids.device();
        let mut x = self.embed_tokens.forward(&input_ids.to_dtype(DType::U32)?)?;
        let bias = compute_bias(&self.relative_attention_bias, &self.cfg, seq, device)?;
        let bias = match attention_mask {
            None => bias,
            Some(mask) => {
                if mask.dims() != [b, seq] {
                    candle_core::bail!("T5 attention mask {:?} for input ids [{b}, {seq}]", mask.dims());
                }
                let keep = mask.to_dtype(DType::F32)?.ne(0f32)?.reshape((b, 1, 1, seq))?.broadcast_as((
                    b,
                    self.cfg.num_heads,
                    seq,
                    seq,
                ))?;
                let lowest = match bias.dtype() {
                    DType::F16 => f64::from(half::f16::MIN),
                    DType::BF16 => f64::from(half::bf16::MIN),
                    DType::F64 => f64::MIN,
                    _ => f64::from(f32::MIN),
                };
                let lowest = Tensor::full(lowest, (), device)?.to_dtype(bias.dtype())?.broadcast_as(keep.shape())?;
                keep.where_cond(&bias.broadcast_as(keep.shape())?, &lowest)?
            }
        };
        for block in &self.blocks {
            x = block.with(|b| b.forward(&x, &bias))?;
        }
        self.final_layer_norm.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_transformers_json_and_ignores_unknown_keys() {
        let cfg: T5Config = serde_json::from_str(
            r#"{"architectures":["T5EncoderModel"],"d_ff":10240,"d_kv":64,"d_model":4096,
                "dense_act_fn":"gelu_new","feed_forward_proj":"gated-gelu","is_gated_act":true,
                "layer_norm_epsilon":1e-06,"model_type":"t5","num_decoder_layers":24,"num_heads":64,
                "num_layers":24,"relative_attention_max_distance":128,"relative_attention_num_buckets":32,
                "tie_word_embeddings":false,"torch_dtype":"float16","vocab_size":32128}"#,
        )
        .unwrap();
        assert_eq!(cfg, T5Config::t5_xxl());
        let err = serde_json::from_str::<T5Config>(
            r#"{"vocab_size":8,"d_model":4,"d_kv":2,"d_ff":8,"num_layers":1,"num_heads":2,"feed_forward_proj":"gated-silu"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("gated-silu"), "{err}");
    }

    #[test]
    fn f16_infinities_are_clamped_as_transformers_does() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[1f32, f32::INFINITY, -f32::INFINITY, 60000.0], &dev)?.to_dtype(DType::F16)?;
        let y: Vec<f32> = clamp_f16_inf(x)?.to_dtype(DType::F32)?.to_vec1()?;
        assert_eq!(y, [1.0, 64512.0, -64512.0, 60000.0]);
        // Without an infinity nothing changes; other dtypes are never touched.
        let x = Tensor::new(&[65504f32, -65504.0], &dev)?.to_dtype(DType::F16)?;
        assert_eq!(clamp_f16_inf(x)?.to_dtype(DType::F32)?.to_vec1::<f32>()?, [65504.0, -65504.0]);
        let x = Tensor::new(&[f32::INFINITY], &dev)?;
        assert_eq!(clamp_f16_inf(x)?.to_vec1::<f32>()?, [f32::INFINITY]);
        Ok(())
    }

    #[test]
    fn buckets_split_directions_and_saturate() {
        // 32 buckets: 16 per direction, 8 exact offsets, offset 0 and negatives below 16.
        assert_eq!(relative_position_bucket(0, 32, 128), 0);
        assert_eq!(relative_position_bucket(-7, 32, 128), 7);
        assert_eq!(relative_position_bucket(7, 32, 128), 23);
        assert_eq!(relative_position_bucket(-1000, 32, 128), 15);
        assert_eq!(relative_position_bucket(1000, 32, 128), 31);
    }
}
