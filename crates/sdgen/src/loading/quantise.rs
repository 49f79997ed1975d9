//! `--weights q8|q4|fp8`: a denoiser's 16/32-bit linear weights quantised to GGML blocks or to
//! fp8 as they load, so they stay quantised in memory as a GGUF's or an fp8-scaled file's would
//! ([`sdgen_models::ops::quantised`], [`sdgen_models::ops::fp8`]).
//!
//! Which weights: those city96's GGUF conversions quantise (his llama.cpp patches, `lcpp.patch`
//! and `lcpp_sd3.patch`, `llama_model_quantize_internal`): 2-D `.weight`s whose rows are whole
//! blocks, except the embeddings and the first and last layers, which they keep in 16 bits —
//! [`QUANTISE_RULES`], in diffusers' names. One difference: his converter also keeps tensors of at
//! most 1024 elements in F32, a rule that touches no layer of a real model and would keep the tiny
//! test models' fused-then-split projections apart from their GGUFs'; it is left out. `q8` is
//! Q8_0; `q4` is Q4_K, and Q4_0 for a matrix whose rows are not whole 256-element K-blocks (SD 3.5
//! Large's width is 2432): the same 4.5 bits a weight (llama.cpp would fall back to Q5_0, city96's
//! files to F16). `fp8` is E4M3 with one scale per tensor (its largest magnitude ÷ 448, the rule
//! of the fp8-scaled files' converters), for the same layers: so `--weights fp8` gives the bytes
//! of an fp8-scaled file made from the same weights by that rule (`tools/reference/make_fp8.py`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use sdgen_models::ops::fp8;
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
    /// 8-bit floats (E4M3) with a scale per tensor: 8 bits a weight.
    Fp8,
}

/// What a weight is held as once loaded, when it is not converted to the run's dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldAs {
    /// GGML blocks of this type.
    Blocks(GgmlDType),
    /// fp8 (E4M3) bytes with a scale.
    Fp8,
}

impl HeldAs {
    /// `(elements, bytes)` of one unit of storage (Q8_0: 32 in 34 bytes; fp8: 1 in 1).
    pub fn block(self) -> (u64, u64) {
        match self {
            HeldAs::Blocks(d) => (d.block_size() as u64, d.type_size() as u64),
            HeldAs::Fp8 => (1, 1),
        }
    }
}

impl Quantise {
    /// The name `--weights` takes.
    pub fn name(self) -> &'static str {
        match self {
            Quantise::Q8 => "q8",
            Quantise::Q4 => "q4",
            Quantise::Fp8 => "fp8",
        }
    }

    /// The block types it quantises to, preferred first: the first whose blocks fit a row
    /// (none for fp8, which has no blocks).
    fn types(self) -> &'static [GgmlDType] {
        match self {
            Quantise::Q8 => &[GgmlDType::Q8_0],
            Quantise::Q4 => &[GgmlDType::Q4K, GgmlDType::Q4_0],
            Quantise::Fp8 => &[],
        }
    }

    /// What a `[rows, cols]` matrix is quantised to, if anything fits its rows.
    pub fn type_for(self, cols: usize) -> Option<HeldAs> {
        if self == Quantise::Fp8 {
            return Some(HeldAs::Fp8);
        }
        self.types().iter().copied().find(|t| quantised::row_bytes(*t, cols).is_some()).map(HeldAs::Blocks)
    }
}

impl std::str::FromStr for Quantise {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8" => Ok(Quantise::Q8),
            "q4" => Ok(Quantise::Q4),
            "fp8" => Ok(Quantise::Fp8),
            other => Err(format!(
                "`{other}` is not a weight format: q8 (8-bit blocks, Q8_0), q4 (4-bit, Q4_K) or fp8 (E4M3, a scale per \
                 tensor)"
            )),
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

/// What `name` (a tensor as `info` describes it) is quantised to under `quantise`, by the rule
/// for `arch`; `None` to leave it as stored.
pub fn quantised_type(arch: DenoiserArch, quantise: Quantise, name: &str, info: &TensorInfo) -> Option<HeldAs> {
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
    types: HashMap<String, HeldAs>,
    /// fp8 weights that share one scale: the pieces of one stored tensor (a single file's fused
    /// q/k/v), as the fp8-scaled file of the same checkpoint scales them, by each piece's name.
    scale_groups: HashMap<String, Arc<[String]>>,
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
        Self { types, scale_groups: HashMap::new() }
    }

    /// The plan with the fp8 weights that `stored_as` maps to one stored tensor sharing its scale.
    pub fn with_shared_scales(mut self, stored_as: impl Fn(&str) -> Option<String>) -> Self {
        let mut groups: HashMap<String, Vec<String>> = HashMap::new();
        for (name, _) in self.types.iter().filter(|(_, h)| **h == HeldAs::Fp8) {
            if let Some(stored) = stored_as(name) {
                groups.entry(stored).or_default().push(name.clone());
            }
        }
        for mut names in groups.into_values().filter(|g| g.len() > 1) {
            names.sort();
            let names: Arc<[String]> = names.into();
            for n in names.iter() {
                self.scale_groups.insert(n.clone(), names.clone());
            }
        }
        self
    }

    /// The weights sharing `name`'s fp8 scale, itself included (in a fixed order).
    fn scale_group(&self, name: &str) -> Option<&Arc<[String]>> {
        self.scale_groups.get(name)
    }

    /// What `name` is quantised to, if it is.
    pub fn get(&self, name: &str) -> Option<HeldAs> {
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
/// dense (in f32) from the backend below, quantised on the host, and handed over as blocks or as
/// fp8 bytes and scale.
pub struct QuantisingBackend {
    base: Box<dyn SimpleBackend>,
    plan: Arc<QuantisePlan>,
    /// fp8 scales by weight, kept for the layer's request for its scale and for the other pieces
    /// of a shared scale (one f32 a layer).
    scales: Mutex<HashMap<String, f32>>,
}

/// A companion name the plan serves: the tensor, and what of it.
enum Planned<'a> {
    Blocks(&'a str, GgmlDType),
    Fp8Bytes(&'a str),
    Fp8Scale(&'a str),
}

impl QuantisingBackend {
    /// `base` with `plan`'s weights quantised.
    pub fn new(base: Box<dyn SimpleBackend>, plan: Arc<QuantisePlan>) -> Self {
        Self { base, plan, scales: Mutex::default() }
    }

    fn dense(&self, name: &str) -> candle_core::Result<Tensor> {
        self.base.get_unchecked(name, DType::F32, &Device::Cpu)
    }

    fn serve(&self, planned: Planned, dev: &Device) -> candle_core::Result<Tensor> {
        match planned {
            Planned::Blocks(name, dtype) => {
                let dense = self.dense(name)?;
                let q = QTensor::quantize(&dense, dtype)?;
                quantised::blocks_tensor(&q.data()?, dense.dim(0)?, dev)
            }
            Planned::Fp8Bytes(name) => {
                let dense = self.dense(name)?;
                let scale = self.fp8_scale(name, Some(&dense))?;
                fp8::bytes_tensor(&fp8::quantise_with(&dense, scale)?, dense.dims(), dev)
            }
            Planned::Fp8Scale(name) => Tensor::new(self.fp8_scale(name, None)?, dev),
        }
    }

    /// `name`'s fp8 scale: its largest magnitude's, or its group's (`dense` is `name`'s weight,
    /// when read already).
    fn fp8_scale(&self, name: &str, dense: Option<&Tensor>) -> candle_core::Result<f32> {
        if let Some(s) = self.scales.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(*s);
        }
        let group = self.plan.scale_group(name).map_or_else(|| vec![name.to_string()], |g| g.to_vec());
        let mut absmax = 0f32;
        for member in &group {
            let m = match dense.filter(|_| member == name) {
                Some(d) => fp8::absmax(d)?,
                None => fp8::absmax(&self.dense(member)?)?,
            };
            absmax = absmax.max(m);
        }
        let scale = fp8::scale_for(absmax)?;
        let mut scales = self.scales.lock().unwrap_or_else(|e| e.into_inner());
        for member in group {
            scales.insert(member, scale);
        }
        Ok(scale)
    }

    /// What a companion name asks for, when the plan quantises its tensor that way.
    fn planned<'a>(&self, name: &'a str) -> Option<Planned<'a>> {
        if let Some((base, ty)) = quantised::split_companion(name) {
            return match self.plan.get(base)? {
                HeldAs::Blocks(d) if GgmlType::of(d).name == ty.name => Some(Planned::Blocks(base, d)),
                _ => None,
            };
        }
        let (base, scale) = fp8::split_companion(name)?;
        match (self.plan.get(base)?, scale) {
            (HeldAs::Fp8, false) => Some(Planned::Fp8Bytes(base)),
            (HeldAs::Fp8, true) => Some(Planned::Fp8Scale(base)),
            _ => None,
        }
    }
}

impl SimpleBackend for QuantisingBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.planned(name) {
            Some(p) => self.serve(p, dev),
            None => self.base.get(s, name, h, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.planned(name) {
            Some(p) => self.serve(p, dev),
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
        assert_eq!(q("transformer_blocks.0.attn.to_q.weight", &w), Some(HeldAs::Blocks(GgmlDType::Q8_0)));
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
        let blocks = |d| Some(HeldAs::Blocks(d));
        assert_eq!((q4(1536), q4(2432), q4(40)), (blocks(GgmlDType::Q4K), blocks(GgmlDType::Q4_0), None));
        // fp8: every such weight, whatever its width; the same layers kept dense.
        let fp8 = |name: &str, cols| quantised_type(mmdit, Quantise::Fp8, name, &info("BF16", &[8, cols]));
        assert_eq!(fp8("transformer_blocks.0.ff.net.2.weight", 40), Some(HeldAs::Fp8));
        assert_eq!(fp8("context_embedder.weight", 64), None);
        assert_eq!(fp8("transformer_blocks.0.attn.to_q.bias", 64), None);
        let unet = |name: &str| quantised_type(DenoiserArch::UNet2DCondition, Quantise::Q8, name, &w);
        assert_eq!(unet("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"), blocks(GgmlDType::Q8_0));
        assert_eq!(unet("time_embedding.linear_1.weight"), None);
        assert_eq!(unet("add_embedding.linear_2.weight"), None);
        assert!("q5".parse::<Quantise>().is_err() && "Q8".parse::<Quantise>() == Ok(Quantise::Q8));
        assert_eq!("FP8".parse::<Quantise>(), Ok(Quantise::Fp8));
    }
}
