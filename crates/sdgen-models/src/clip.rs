//! The CLIP text transformer (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`), keys
//! as in the hub's `text_encoder/model.safetensors`.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::ops::linear::{linear, linear_no_bias, Linear};
use serde::Deserialize;

use crate::attention::{attention, causal_mask, merge_heads, split_heads};
use crate::norm::LayerNorm;

/// The activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x·σ(1.702x)` (OpenAI CLIP ViT-L, SD 1.5).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP bigG, SDXL's second encoder).
    Gelu,
}

/// `text_encoder/config.json`, the fields the model needs.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Maximum sequence length (77).
    pub max_position_embeddings: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// End-of-text token id; `2` is transformers' legacy marker meaning "pool at the highest id".
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// Width of the text projection (`CLIPTextModelWithProjection`).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn default_ln_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}

impl ClipTextConfig {
    /// OpenAI CLIP ViT-L/14's text tower, SD 1.5's encoder.
    pub fn vit_l() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
            projection_dim: Some(768),
        }
    }
}

#[derive(Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q: linear(d, d, vb.pp("q_proj"))?,
            k: linear(d, d, vb.pp("k_proj"))?,
            v: linear(d, d, vb.pp("v_proj"))?,
            out: linear(d, d, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            scale: ((d / cfg.num_attention_heads) as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q = split_heads(&self.q.forward(x)?, self.heads)?;
        let k = split_heads(&self.k.forward(x)?, self.heads)?;
        let v = split_heads(&self.v.forward(x)?, self.heads)?;
        let o = attention(&q, &k, &v, self.scale, Some(mask))?;
        self.out.forward(&merge_heads(&o)?)
    }
}

#[derive(Debug)]
struct Layer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Layer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            ln1: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(cfg, vb.pp("self_attn"))?,
            ln2: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp.fc2"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        let m = self.fc1.forward(&self.ln2.forward(&h)?)?;
        let m = match self.act {
            Activation::QuickGelu => (&m * candle_nn::ops::sigmoid(&(&m * 1.702)?)?)?,
            Activation::Gelu => m.gelu_erf()?,
        };
        h + self.fc2.forward(&m)?
    }
}

/// What the encoder returns.
#[derive(Debug)]
pub struct ClipTextOutput {
    /// Output of the last layer after the final LayerNorm, `[b, seq, hidden]`.
    pub last_hidden_state: Tensor,
    /// Raw output of the second-to-last layer (no final LayerNorm), `[b, seq, hidden]`: SDXL's
    /// conditioning, and SD 1.5's with `clip_skip = 1`.
    pub penultimate_hidden_state: Tensor,
    /// The final-normed state at each sequence's end-of-text token, `[b, hidden]`.
    pub pooled: Tensor,
    /// `pooled` through the text projection when the model has one, `[b, projection_dim]`.
    pub text_embeds: Option<Tensor>,
}

/// The CLIP text transformer, with its text projection when the checkpoint has one.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    projection: Option<Linear>,
    cfg: ClipTextConfig,
}

impl ClipTextModel {
    /// Loads the model from `vb` rooted at the checkpoint's top level (keys `text_model.*`, and
    /// `text_projection.weight` when `with_projection`).
    pub fn new(cfg: &ClipTextConfig, with_projection: bool, vb: VarBuilder) -> Result<Self> {
        // transformers ≤ 4 (and every SD checkpoint on the hub) prefix the keys with
        // `text_model.`; transformers 5 saves `CLIPTextModel` without it.
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let emb = tm.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, tm.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let projection = if with_projection {
            let dim = cfg.projection_dim.unwrap_or(cfg.hidden_size);
            Some(linear_no_bias(cfg.hidden_size, dim, vb.pp("text_projection"))?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: candle_nn::embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_ln: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?,
            projection,
            cfg: cfg.clone(),
        })
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// Encodes `input_ids: [b, seq]` (u32 or i64).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, seq) = input_ids.dims2()?;
        let device = input_ids.device();
        let ids = input_ids.to_dtype(DType::U32)?;
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let x = self.token_embedding.forward(&ids)?.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, device)?.to_dtype(x.dtype())?;
        let mut x = x;
        let mut penultimate = None;
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == n {
                penultimate = Some(x.clone());
            }
            x = layer.forward(&x, &mask)?;
        }
        let penultimate_hidden_state = penultimate.unwrap_or_else(|| x.clone());
        let last_hidden_state = self.final_ln.forward(&x)?;
        let eos = self.eos_positions(input_ids)?;
        let pooled = Tensor::cat(
            &(0..b).map(|i| last_hidden_state.i((i, eos[i]))?.unsqueeze(0)).collect::<Result<Vec<_>>>()?,
            0,
        )?;
        let text_embeds = match &self.projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput { last_hidden_state, penultimate_hidden_state, pooled, text_embeds })
    }

    /// A1111's "Clip skip" `skip` (1 = the last layer): the hidden state `skip` layers from the end
    /// (transformers' `hidden_states[-skip]`, the output of the first `layers + 1 - skip` layers),
    /// then the final LayerNorm (`encode_with_transformers` in A1111's `modules/sd_hijack_clip.py`).
    pub fn forward_clip_skip(&self, input_ids: &Tensor, skip: usize) -> Result<Tensor> {
        let n = self.layers.len();
        if skip == 0 || skip > n {
            candle_core::bail!("clip skip {skip} is outside 1..={n} (the encoder's layers)")
        }
        let (_, seq) = input_ids.dims2()?;
        let device = input_ids.device();
        let ids = input_ids.to_dtype(DType::U32)?;
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let mut x = self.token_embedding.forward(&ids)?.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, device)?.to_dtype(x.dtype())?;
        for layer in &self.layers[..n + 1 - skip] {
            x = layer.forward(&x, &mask)?;
        }
        self.final_ln.forward(&x)
    }

    /// The pooling position per sequence, as transformers picks it: with the legacy
    /// `eos_token_id == 2` the position of the highest id (the end-of-text token has the highest
    /// id in CLIP's vocabulary), otherwise the first occurrence of `eos_token_id`.
    fn eos_positions(&self, input_ids: &Tensor) -> Result<Vec<usize>> {
        let ids: Vec<Vec<i64>> = input_ids.to_dtype(DType::I64)?.to_device(&Device::Cpu)?.to_vec2()?;
        Ok(ids
            .iter()
            .map(|row| {
                if self.cfg.eos_token_id == 2 {
                    // torch.argmax returns the first maximal index.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max).unwrap_or(0)
                } else {
                    row.iter().position(|&t| t == self.cfg.eos_token_id as i64).unwrap_or(0)
                }
            })
            .collect())
    }
}
