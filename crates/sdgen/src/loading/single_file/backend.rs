//! A `VarBuilder` backend that serves a memory-mapped single-file checkpoint under diffusers
//! names: each fetch looks the name up, reads that one tensor from the map, reshapes it where the
//! original stores a linear layer as a 1×1 convolution, and converts it to the target dtype on the
//! target device. Nothing is copied ahead: the checkpoint is never held in memory as a whole.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// Where a diffusers-named tensor lives in the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// The checkpoint's key.
    pub original: String,
    /// The shape to serve it as, where it differs from the stored one (1×1 conv → linear).
    pub reshape: Option<Vec<usize>>,
}

/// The backend; built per component by `ComponentWeights::var_builder`.
pub(crate) struct RenamedSafetensors {
    file: PathBuf,
    tensors: MmapedSafetensors,
    sources: Arc<BTreeMap<String, Source>>,
}

impl RenamedSafetensors {
    /// Maps `file`.
    ///
    /// # Safety
    /// As every mmap: the file must not be truncated or rewritten while the backend lives.
    pub(crate) unsafe fn new(file: PathBuf, sources: Arc<BTreeMap<String, Source>>) -> candle_core::Result<Self> {
        let tensors = MmapedSafetensors::new(&file)?;
        Ok(Self { file, tensors, sources })
    }

    fn source(&self, name: &str) -> candle_core::Result<&Source> {
        self.sources
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("{} has no tensor for `{name}`", self.file.display())).bt())
    }
}

impl SimpleBackend for RenamedSafetensors {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!(
                    "shape mismatch for {name} (`{}` in {})",
                    self.source(name)?.original,
                    self.file.display()
                ),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let source = self.source(name)?;
        let tensor = self.tensors.load(&source.original, dev)?;
        let tensor = match &source.reshape {
            Some(shape) => tensor.reshape(shape.as_slice())?,
            None => tensor,
        };
        tensor.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.sources.contains_key(name)
    }
}
