//! How a diffusers-named tensor is read from a single-file checkpoint. The component headers
//! built from the rules name every tensor as diffusers does, with the diffusers shape and the byte
//! range it occupies in the checkpoint, so the engine's one tensor reader
//! (`loading::read_backend`) serves them: a 1×1 convolution served as its linear layer is the same
//! bytes under another shape, and a piece of a fused tensor (OpenCLIP's q/k/v) is a contiguous
//! run of its rows. Only a transposed tensor (OpenCLIP's `text_projection`) and one with its
//! halves swapped (SD 3's `AdaLayerNormContinuous` modulation) need more than a byte range;
//! [`SingleFileBackend`] reads them as stored and rearranges them, still one tensor at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use sdgen_models::ops::{fp8, quantised};

use super::rules::Take;
use crate::loading::read_backend::ReadBackend;
use crate::loading::{SafetensorsHeader, TensorInfo};

/// Where a diffusers-named tensor lives in the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// The checkpoint's key.
    pub original: String,
    /// The shape to serve it as, where it differs from the stored one (1×1 conv → linear).
    pub reshape: Option<Vec<usize>>,
    /// Which part of the stored tensor it is, and how it is laid out.
    pub take: Take,
}

/// A `VarBuilder` backend over one component of a single-file checkpoint, by diffusers name.
pub struct SingleFileBackend {
    reader: ReadBackend,
    /// Names whose bytes are the transpose of the tensor served.
    transposed: HashSet<String>,
    /// Names whose bytes hold the tensor served with the halves of dimension 0 swapped.
    swapped: HashSet<String>,
    /// Names served as the identity matrix of this size, read from nowhere.
    identity: HashMap<String, usize>,
}

impl SingleFileBackend {
    /// Opens `path` for the component whose diffusers-named header is `tensors` (shapes as
    /// diffusers holds them) and whose origins are `sources`.
    pub fn new(
        path: PathBuf,
        tensors: &BTreeMap<String, TensorInfo>,
        sources: &BTreeMap<String, Source>,
    ) -> std::io::Result<Self> {
        let taken = |take: Take| -> HashSet<String> {
            sources.iter().filter(|(_, s)| s.take == take).map(|(n, _)| n.clone()).collect()
        };
        let (transposed, swapped) = (taken(Take::Transposed), taken(Take::SwapHalves));
        let identity: HashMap<String, usize> = taken(Take::Identity)
            .into_iter()
            .filter_map(|n| Some((n.clone(), *tensors.get(&n)?.shape.first()?)))
            .collect();
        // The reader reads bytes under the shape they are stored in.
        let mut stored = tensors.clone();
        stored.retain(|n, _| !identity.contains_key(n));
        for name in &transposed {
            if let Some(info) = stored.get_mut(name) {
                info.shape.reverse();
            }
        }
        let header = SafetensorsHeader { tensors: stored, metadata: BTreeMap::new(), file_bytes: 0 };
        Ok(Self { reader: ReadBackend::new(&[path], &[header])?, transposed, swapped, identity })
    }

    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(&n) = self.identity.get(name) {
            return Tensor::eye(n, dtype, dev);
        }
        let t = self.reader.get_unchecked(name, dtype, dev)?;
        // A quantised matrix's raw blocks (a companion name) are served only untransposed; their
        // rows swap like the dequantised tensor's.
        let base = quantised::split_companion(name)
            .map(|(base, _)| base)
            .or_else(|| fp8::split_companion(name).filter(|(_, scale)| !scale).map(|(base, _)| base))
            .unwrap_or(name);
        if self.transposed.contains(name) {
            t.t()?.contiguous()
        } else if self.swapped.contains(base) {
            // The shape was checked to split in two when the view was built.
            let half = t.dim(0)? / 2;
            Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)
        } else {
            Ok(t)
        }
    }
}

impl SimpleBackend for SingleFileBackend {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        crate::loading::read_backend::expect_shape(self.read(name, dtype, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if let Some(base) = quantised::companion_base(name) {
            return !self.transposed.contains(base) && self.reader.contains_tensor(name);
        }
        self.identity.contains_key(name) || self.reader.contains_tensor(name)
    }
}
