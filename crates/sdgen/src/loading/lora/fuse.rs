//! LoRA deltas fused into weights as they are read: `W' = W + Σ scale · (alpha / rank) · up · down`
//! per LoRA, in f32 and then cast to the run's dtype, as diffusers' `fuse_lora` does (PEFT's
//! `LoraLayer.merge`: `get_delta_weight` is `B @ A · scaling`, a convolution's with its kernel
//! dimensions flattened into A's columns and B's 1×1 kernel dropped).
//!
//! Fusing at load leaves nothing to unfuse: the base files are never written, and a model
//! unloaded (a stage dropped) is read again from them, with whatever LoRAs the next job asks for.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;

use crate::loading::read_backend::{expect_shape, ReadBackend};

/// One LoRA's delta for one weight.
#[derive(Debug, Clone)]
pub struct Patch {
    /// Which of the backend's LoRA files holds it.
    pub file: usize,
    /// Its down matrix's key in that file.
    pub down: String,
    /// Its up matrix's key.
    pub up: String,
    /// `scale · alpha / rank`.
    pub factor: f64,
}

/// The deltas of one component: the LoRA files and, per weight (diffusers name), its patches in
/// the order the LoRAs were given.
#[derive(Debug, Default)]
pub struct ComponentPatches {
    /// The LoRA files, with their validated headers.
    pub files: Vec<(std::path::PathBuf, crate::loading::SafetensorsHeader)>,
    /// Weight name → its patches.
    pub patches: HashMap<String, Vec<Patch>>,
    /// The most memory fusing one of its weights holds beyond the loaded weights
    /// ([`fuse_transient_bytes`]), for the planner.
    pub transient_bytes: u64,
}

/// Bytes fusing a weight of `elements` with a LoRA of `lora_elements` (up and down) holds at
/// once: the weight, the scaled delta and their sum in f32 (the product before scaling is freed
/// first), and the two matrices in f32.
pub fn fuse_transient_bytes(elements: usize, lora_elements: usize) -> u64 {
    4 * (3 * elements as u64 + lora_elements as u64)
}

/// A `VarBuilder` backend serving `base`'s tensors with the patches of `patches` fused in.
pub struct FusingBackend {
    base: Box<dyn SimpleBackend>,
    files: Vec<ReadBackend>,
    patches: Arc<ComponentPatches>,
}

impl FusingBackend {
    /// Wraps `base`, opening the LoRA files for positioned reads.
    pub fn new(base: Box<dyn SimpleBackend>, patches: Arc<ComponentPatches>) -> std::io::Result<Self> {
        let files = patches
            .files
            .iter()
            .map(|(path, header)| ReadBackend::new(std::slice::from_ref(path), std::slice::from_ref(header)))
            .collect::<std::io::Result<_>>()?;
        Ok(Self { base, files, patches })
    }

    /// `w` (f32) with `patches` added.
    fn fuse(&self, mut w: Tensor, patches: &[Patch], dev: &Device) -> candle_core::Result<Tensor> {
        for p in patches {
            let file = &self.files[p.file];
            let up = file.get_unchecked(&p.up, DType::F32, dev)?;
            let down = file.get_unchecked(&p.down, DType::F32, dev)?;
            let (out, rank) = (up.dim(0)?, up.dim(1)?);
            // One statement, so the unscaled product is freed before the sum: at most the
            // weight, the scaled delta and their sum live at once ([`fuse_transient_bytes`]).
            let delta = (up.reshape((out, rank))?.matmul(&down.reshape((rank, ()))?)?.reshape(w.shape())? * p.factor)?;
            w = (w + delta)?;
        }
        Ok(w)
    }

    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.patches.patches.get(name) {
            None => self.base.get_unchecked(name, dtype, dev),
            Some(patches) => {
                let w = self.base.get_unchecked(name, DType::F32, dev)?;
                self.fuse(w, patches, dev)?.to_dtype(dtype)
            }
        }
    }
}

impl SimpleBackend for FusingBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if !self.patches.patches.contains_key(name) {
            return self.base.get(s, name, h, dtype, dev);
        }
        expect_shape(self.read(name, dtype, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // A patched weight is fused dense: its quantised blocks or fp8 bytes (a companion name)
        // are not served.
        match sdgen_models::ops::quantised::companion_base(name) {
            Some(base) if self.patches.patches.contains_key(base) => false,
            _ => self.base.contains_tensor(name),
        }
    }
}
