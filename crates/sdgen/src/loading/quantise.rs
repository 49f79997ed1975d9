//! `--weights q8|q4`: a denoiser's 16/32-bit linear weights quantised to GGML blocks as they
//! load, so they stay quantised in memory as a GGUF's would ([`sdgen_models::ops::quantised`]).
//!
//! Which weights: those city96's GGUF conversions quantise (his llama.cpp patches, `lcpp.patch`
//! and `lcpp_sd3.patch`, `llama_model_quantize_internal`): 2-D `.weight`s whose rows are whole
//! blocks, except the embeddings and the first and last layers, which they keep in 16 bits —
//! [`QUANTISE_RULES`], in diffusers' names. One difference: his converter also keeps tensors of at
//! most 1024 elements in F32, a rule that touches no layer of a real model and would keep the tiny
//! test models' fused-then-split projections apart from their GGUFs'; it is left out. `q8` is
//! Q8_0; `q4` is Q4_K, and Q4_0 for a matrix whose rows are not whole 256-element K-blocks (SD 3.5
//! Large's width is 2432): the same 4.5 bits a weight (llama.cpp would fall back to Q5_0, city96's
//! files to F16).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use sdgen_models::ops::quantised::{self, GgmlType};

use super::family::DenoiserArch;
use super::TensorInfo;

/// What `--weights` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantise {
    /// 8-bit blocks (Q8_0: 8.5 bits a weight, near-lossless).
    Q8,
    /// 4-bit blocks (Q4_K, else Q4_0: 4.5 bits a weight).
    Q4,
}

impl Quantise {
    /// The name `--weights` takes.
    pub fn name(self) -> &'static str {
        match self {
            Quantise::Q8 => "q8",
            Quantise::Q4 => "q4",
        }
    }

    /// The block types it quantises to, preferred first: the first whose blocks fit a row.
    fn types(self) -> &'static [GgmlDType] {
        match self {
            Quantise::Q8 => &[GgmlDType::Q8_0],
            Quantise::Q4 => &[GgmlDType::Q4K, GgmlDType::Q4_0],
        }
    }

    /// The block type a `[rows, cols]` matrix is quantised to, if any fits its rows.
    pub fn type_for(self, cols: usize) -> Option<GgmlDType> {
        self.types().iter().copied().find(|t| quantised::row_bytes(*t, cols).is_some())
    }
}

impl std::str::FromStr for Quantise {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8" => Ok(Quantise::Q8),
            "q4" => Ok(Quantise::Q4),
            other => Err(format!("`{other}` is not a weight format: q8 (8-bit blocks, Q8_0) or q4 (4-bit, Q4_K)")),
        }
    }
}

/// Which of a denoiser's weights quantising leaves dense, by name prefix (diffusers' names).
#[derive(Debug)]
pub struct QuantiseRule {
    /// The denoiser it is for.
    pub arch: DenoiserArch,
    /// Modules kept in the run's dtype: city96's exclusions, renamed.
    pub keep_dense: &'static [&'static str],
}

/// The rules, one per denoiser architecture (see the module doc for their source).
pub const QUANTISE_RULES: &[QuantiseRule] = &[
    QuantiseRule {
        // SD3's `t_embedder.`, `y_embedder.` (diffusers' `time_text_embed.`), `context_embedder.`,
        // `x_embedder.` and `pos_embed` (`pos_embed.`), `final_layer.` (`norm_out.`, `proj_out.`).
        arch: DenoiserArch::SD3Transformer2D,
        keep_dense: &["time_text_embed.", "context_embedder.", "pos_embed.", "norm_out.", "proj_out."],
    },
    QuantiseRule {
        // `time_embed.`/`time_embedding.`, `label_emb.`/`add_embedding.`, `class_embedding.`, and
        // the first and last convolutions (`input_blocks.0.0`, `out.2`).
        arch: DenoiserArch::UNet2DCondition,
        keep_dense: &["time_embedding.", "add_embedding.", "class_embedding.", "conv_in.", "conv_out."],
    },
];

/// The block type `name` (a tensor as `info` describes it) is quantised to under `quantise`, by
/// the rule for `arch`; `None` to leave it as stored.
pub fn quantised_type(arch: DenoiserArch, quantise: Quantise, name: &str, info: &TensorInfo) -> Option<GgmlDType> {
    let rule = QUANTISE_RULES.iter().find(|r| r.arch == arch)?;
    let float = matches!(info.dtype.as_str(), "F32" | "F16" | "BF16");
    if !float || info.shape.len() != 2 || !name.ends_with(".weight") {
        return None;
    }
    if rule.keep_dense.iter().any(|p| name.starts_with(p)) {
        return None;
    }
    quantise.type_for(info.shape[1])
}

/// Which tensors of a component are quantised as they load, and to what.
#[derive(Debug, Default)]
pub struct QuantisePlan {
    types: HashMap<String, GgmlDType>,
}

impl QuantisePlan {
    /// The plan for a component whose tensors are `tensors`.
    pub fn new<'a>(
        arch: DenoiserArch,
        quantise: Quantise,
        tensors: impl IntoIterator<Item = (&'a String, &'a TensorInfo)>,
    ) -> Self {
        let types =
            tensors.into_iter().filter_map(|(n, i)| Some((n.clone(), quantised_type(arch, quantise, n, i)?))).collect();
        Self { types }
    }

    /// The block type `name` is quantised to, if it is.
    pub fn get(&self, name: &str) -> Option<GgmlDType> {
        self.types.get(name).copied()
    }

    /// How many tensors it quantises.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// Whether it quantises nothing.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }
}

/// A backend that serves the planned weights quantised, under their companion names: each read
/// dense (in f32) from the backend below, quantised on the host, and handed over as blocks.
pub struct QuantisingBackend {
    base: Box<dyn SimpleBackend>,
    plan: Arc<QuantisePlan>,
}

impl QuantisingBackend {
    /// `base` with `plan`'s weights quantised.
    pub fn new(base: Box<dyn SimpleBackend>, plan: Arc<QuantisePlan>) -> Self {
        Self { base, plan }
    }

    fn blocks(&self, name: &str, dtype: GgmlDType, dev: &Device) -> candle_core::Result<Tensor> {
        let dense = self.base.get_unchecked(name, DType::F32, &Device::Cpu)?;
        let q = QTensor::quantize(&dense, dtype)?;
        quantised::blocks_tensor(&q.data()?, dense.dim(0)?, dev)
    }

    /// The planned type of a companion name's tensor, when it asks for that type.
    fn planned<'a>(&self, name: &'a str) -> Option<(&'a str, GgmlDType)> {
        let (base, ty) = quantised::split_companion(name)?;
        self.plan.get(base).filter(|d| GgmlType::of(*d).name == ty.name).map(|d| (base, d))
    }
}

impl SimpleBackend for QuantisingBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.planned(name) {
            Some((base, d)) => self.blocks(base, d, dev),
            None => self.base.get(s, name, h, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.planned(name) {
            Some((base, d)) => self.blocks(base, d, dev),
            None => self.base.get_unchecked(name, dtype, dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.planned(name).is_some() || self.base.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(dtype: &str, shape: &[usize]) -> TensorInfo {
        TensorInfo { dtype: dtype.into(), shape: shape.to_vec(), data_offsets: (0, 0) }
    }

    #[test]
    fn the_rule_quantises_linear_weights_and_keeps_embeddings_and_the_ends_dense() {
        let mmdit = DenoiserArch::SD3Transformer2D;
        let q = |name: &str, i: &TensorInfo| quantised_type(mmdit, Quantise::Q8, name, i);
        let w = info("BF16", &[1536, 1536]);
        assert_eq!(q("transformer_blocks.0.attn.to_q.weight", &w), Some(GgmlDType::Q8_0));
        assert_eq!(q("transformer_blocks.0.attn.to_q.bias", &info("BF16", &[1536])), None);
        for dense in ["context_embedder.weight", "proj_out.weight", "norm_out.linear.weight", "pos_embed.proj.weight"] {
            assert_eq!(q(dense, &w), None, "{dense}");
        }
        assert_eq!(q("transformer_blocks.0.attn.to_q.weight", &info("Q8_0", &[1536, 1536])), None, "already quantised");
        assert_eq!(q("transformer_blocks.0.attn.to_q.weight", &info("F32", &[64, 40])), None, "rows of 40");
        // q4: K-blocks where rows are whole 256s, else 32-element blocks (SD 3.5 Large's 2432).
        let q4 = |cols| {
            quantised_type(mmdit, Quantise::Q4, "transformer_blocks.0.ff.net.2.weight", &info("BF16", &[8, cols]))
        };
        assert_eq!((q4(1536), q4(2432), q4(40)), (Some(GgmlDType::Q4K), Some(GgmlDType::Q4_0), None));
        let unet = |name: &str| quantised_type(DenoiserArch::UNet2DCondition, Quantise::Q8, name, &w);
        assert_eq!(unet("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"), Some(GgmlDType::Q8_0));
        assert_eq!(unet("time_embedding.linear_1.weight"), None);
        assert_eq!(unet("add_embedding.linear_2.weight"), None);
        assert!("q5".parse::<Quantise>().is_err() && "Q8".parse::<Quantise>() == Ok(Quantise::Q8));
    }
}
