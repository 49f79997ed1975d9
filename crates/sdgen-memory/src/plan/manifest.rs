//! The planner's view of a model: per component (as the model folder names it: `text_encoder`,
//! `unet`, `vae`), its tensors' names, shapes and stored dtypes, read from the safetensors
//! headers by the engine. No tensor data: the weight bytes follow from the shapes and the dtype
//! the run converts them to.

use serde::{Deserialize, Serialize};

/// Precision a run converts floating-point weights to (and computes activations in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit float (the CPU default).
    F32,
    /// IEEE half.
    F16,
    /// bfloat16 (the GPU default).
    Bf16,
}

impl Precision {
    /// Bytes per element.
    pub fn size_bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::F16 | Precision::Bf16 => 2,
        }
    }

    /// Whether this is a 16-bit precision (which share one set of activation coefficients).
    pub fn is_half(self) -> bool {
        self != Precision::F32
    }

    /// The name `--dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor's dtype as stored in the file (safetensors' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)] // the variants are safetensors' dtype names
pub enum StoredDType {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl StoredDType {
    /// Parses a safetensors header's `dtype` (`"F16"`, `"BF16"`, `"F8_E4M3"`, ...).
    pub fn from_safetensors(name: &str) -> Option<Self> {
        Some(match name {
            "BOOL" => Self::Bool,
            "U8" => Self::U8,
            "I8" => Self::I8,
            "F8_E4M3" => Self::F8E4M3,
            "F8_E5M2" => Self::F8E5M2,
            "I16" => Self::I16,
            "U16" => Self::U16,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "I32" => Self::I32,
            "U32" => Self::U32,
            "F32" => Self::F32,
            "I64" => Self::I64,
            "U64" => Self::U64,
            "F64" => Self::F64,
            _ => return None,
        })
    }

    /// Bytes per element in the file.
    pub fn size_bytes(self) -> u64 {
        match self {
            Self::Bool | Self::U8 | Self::I8 | Self::F8E4M3 | Self::F8E5M2 => 1,
            Self::I16 | Self::U16 | Self::F16 | Self::BF16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    /// Whether loading converts it to the run's precision (floats do; integer tensors such as
    /// CLIP's `position_ids` keep their type).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F8E4M3 | Self::F8E5M2 | Self::F16 | Self::BF16 | Self::F32 | Self::F64)
    }
}

/// GGML blocks a quantised weight is held in: `bytes` for every `elements` (Q8_0: 34 per 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocks {
    /// Elements per block.
    pub elements: u64,
    /// Bytes per block.
    pub bytes: u64,
}

/// One tensor of a component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// The name in the file (diffusers naming for the engine's folders and views).
    pub name: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// The dtype in the file; for a GGUF tensor in GGML blocks, `F32`, what it dequantises to.
    pub dtype: StoredDType,
    /// The blocks it stays in once loaded (a linear layer's quantised weight: a GGUF's, or one
    /// `--weights` quantises); `None`: converted to the run's precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Blocks>,
}

impl TensorEntry {
    /// A tensor entry.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, dtype: StoredDType) -> Self {
        Self { name: name.into(), shape, dtype, held: None }
    }

    /// The entry of a tensor held in `blocks` once loaded.
    pub fn held_in(self, blocks: Option<Blocks>) -> Self {
        Self { held: blocks, ..self }
    }

    /// Number of elements.
    pub fn element_count(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Bytes in the file.
    pub fn stored_bytes(&self) -> u64 {
        self.element_count() * self.dtype.size_bytes()
    }

    /// Bytes once loaded at `precision`: quantised weights their blocks' size, floats are
    /// converted (an fp32 file run in bf16 counts half), other tensors keep their size.
    pub fn bytes_at(&self, precision: Precision) -> u64 {
        if let Some(b) = self.held {
            self.element_count().div_ceil(b.elements) * b.bytes
        } else if self.dtype.is_float() {
            self.element_count() * precision.size_bytes()
        } else {
            self.stored_bytes()
        }
    }
}

/// The tensors of one component of the model folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentManifest {
    /// The model folder's name for it (`text_encoder`, `unet`, `vae`, `transformer`, ...).
    pub name: String,
    /// Its tensors (all files of a sharded component together).
    pub tensors: Vec<TensorEntry>,
    /// Precision the engine runs this component in when it is not the run's (the SDXL VAE in
    /// f32 under a half-precision run, diffusers' `force_upcast`); `None` = the run's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

impl ComponentManifest {
    /// A component running at the run's precision.
    pub fn new(name: impl Into<String>, tensors: Vec<TensorEntry>) -> Self {
        Self { name: name.into(), tensors, precision: None }
    }

    /// Tensors whose name starts with one of `prefixes` (all of them when `prefixes` is empty).
    pub fn select<'a>(&'a self, prefixes: &'a [&'a str]) -> impl Iterator<Item = &'a TensorEntry> + 'a {
        self.tensors.iter().filter(move |t| prefixes.is_empty() || prefixes.iter().any(|p| t.name.starts_with(p)))
    }

    /// Bytes of the selected tensors once loaded at `precision` (or the component's own).
    pub fn bytes_at(&self, prefixes: &[&str], precision: Precision) -> u64 {
        let precision = self.precision.unwrap_or(precision);
        self.select(prefixes).map(|t| t.bytes_at(precision)).sum()
    }
}

/// Every component of a model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// The components, in any order.
    pub components: Vec<ComponentManifest>,
}

impl ModelManifest {
    /// A manifest of these components.
    pub fn new(components: Vec<ComponentManifest>) -> Self {
        Self { components }
    }

    /// The component the model folder calls `name`.
    pub fn component(&self, name: &str) -> Option<&ComponentManifest> {
        self.components.iter().find(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp32_files_run_in_bf16_count_half() {
        let t = TensorEntry::new("w", vec![320, 4, 3, 3], StoredDType::F32);
        assert_eq!(t.stored_bytes(), 320 * 4 * 9 * 4);
        assert_eq!(t.bytes_at(Precision::Bf16), 320 * 4 * 9 * 2);
        assert_eq!(t.bytes_at(Precision::F32), t.stored_bytes());
        let ids = TensorEntry::new("position_ids", vec![1, 77], StoredDType::I64);
        assert_eq!(ids.bytes_at(Precision::Bf16), 77 * 8);
        // Q8_0: 34 bytes per 32 weights, whatever the run's precision.
        let q8 = TensorEntry::new("w", vec![1536, 1536], StoredDType::BF16)
            .held_in(Some(Blocks { elements: 32, bytes: 34 }));
        assert_eq!(q8.bytes_at(Precision::Bf16), 1536 * 1536 / 32 * 34);
        assert_eq!(q8.bytes_at(Precision::F32), q8.bytes_at(Precision::Bf16));
    }

    #[test]
    fn prefixes_select_part_of_a_component() {
        let vae = ComponentManifest::new(
            "vae",
            vec![
                TensorEntry::new("decoder.conv_in.weight", vec![512, 4, 3, 3], StoredDType::F16),
                TensorEntry::new("encoder.conv_in.weight", vec![128, 3, 3, 3], StoredDType::F16),
                TensorEntry::new("post_quant_conv.weight", vec![4, 4, 1, 1], StoredDType::F16),
            ],
        );
        assert_eq!(vae.bytes_at(&["decoder.", "post_quant_conv."], Precision::F32), (512 * 4 * 9 + 16) * 4);
        assert_eq!(vae.bytes_at(&[], Precision::F16), (512 * 4 * 9 + 128 * 27 + 16) * 2);
        let upcast = ComponentManifest { precision: Some(Precision::F32), ..vae };
        assert_eq!(upcast.bytes_at(&["encoder."], Precision::Bf16), 128 * 27 * 4);
        assert_eq!(StoredDType::from_safetensors("F8_E4M3"), Some(StoredDType::F8E4M3));
        assert_eq!(StoredDType::from_safetensors("Q4"), None);
    }
}
