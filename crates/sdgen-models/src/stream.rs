//! Block streaming: a model whose large repeated blocks (an MMDiT's joint blocks, a UNet's
//! resnets and transformer blocks, T5's layers) are not all held in memory. The small parts every
//! forward uses (embeddings, the output norm and projection, a UNet's in/out convolutions and its
//! transformers' projections) are resident; of the blocks, the first `resident_blocks` in forward
//! order are resident too and every other one is *materialised* from its weight source just
//! before it runs and dropped right after, so a forward holds the resident parts, the resident
//! blocks, one streamed block and the activations.
//!
//! One mechanism serves every model: a model builds its blocks through [`BlockWeights::block`],
//! naming each by its checkpoint prefix and giving the constructor to run, and runs them through
//! [`Block::with`]. A streamed block is built once at load (so a missing or misshapen tensor is
//! refused when the model loads, as a resident model's is) and then on every use. Streaming
//! changes no number: a block is built by the same constructor from the same bytes, whichever
//! way it is held.
//!
//! # The weight source per device
//!
//! The streamed blocks' [`VarBuilder`] is the caller's (the engine's loader), so this module
//! never sees files. The loader gives:
//!
//! - on the CPU and unified-memory GPUs, a reader that reads each tensor from the file with
//!   positioned reads on every use: the file stays in the page cache (which the kernel can
//!   drop), not in the process's memory, and the peak is the resident parts, one block and the
//!   activations;
//! - on CUDA, a reader that keeps each streamed tensor in host memory after its first read and
//!   copies it to the device on every use, through the loader's one upload function
//!   (`sdgen::loading::stream::upload`), synchronously for now.
//!
//! # Design for the GPU: copies overlapping compute
//!
//! A synchronous upload leaves the GPU idle while a block crosses PCIe. The plan for the GPU
//! machine, which changes only the upload function and [`Block::with`]'s streamed arm:
//!
//! 1. host copies in pinned (page-locked) memory (`cudaHostAlloc`), filled once at load, so a
//!    copy runs at the link's full rate and can be asynchronous;
//! 2. a fixed ring of two device buffers, each the size of the largest streamed block, into
//!    which blocks are copied (no allocation per use, so the device peak is exactly resident +
//!    two blocks + activations: the planner's "two streamed blocks with prefetch");
//! 3. a second CUDA stream for the copies: while block `i` computes on the main stream, block
//!    `i + 1` is copied into the other ring slot; an event recorded after the copy is waited on
//!    by the main stream before block `i + 1` runs, and an event after block `i`'s last kernel
//!    releases its slot for block `i + 2`.
//!
//! The block order is static (a forward visits blocks in the same order every time, skipping
//! only skip-layer guidance's blocks), so the prefetch needs no prediction: the next streamed
//! block in forward order.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use candle_core::Result;
use candle_nn::VarBuilder;

use crate::attention::{AttentionOptions, AttentionOptionsCell};

/// How a model holds its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residency {
    /// Every block resident (the fastest; the whole model in memory).
    #[default]
    Resident,
    /// The first `resident_blocks` blocks in forward order resident, the others streamed.
    Streamed {
        /// Blocks kept resident (0: every block streamed; at least the model's count: none).
        resident_blocks: usize,
    },
}

/// A block that can be streamed: what [`Block`] must reach inside it.
pub trait StreamBlock {
    /// Bounds its attention's score matrices (see [`AttentionOptions`]); a block without
    /// attention ignores it.
    fn set_attention_options(&self, options: AttentionOptions) {
        let _ = options;
    }
}

type Build<M> = Box<dyn Fn(VarBuilder<'static>) -> Result<M> + Send + Sync>;

enum Slot<M> {
    Resident(M),
    Streamed {
        vb: VarBuilder<'static>,
        build: Build<M>,
        /// The options to give each materialised copy.
        options: AttentionOptionsCell,
    },
}

/// One block of a model, resident or streamed.
pub struct Block<M> {
    slot: Slot<M>,
}

impl<M: std::fmt::Debug> std::fmt::Debug for Block<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.slot {
            Slot::Resident(m) => f.debug_tuple("Resident").field(m).finish(),
            Slot::Streamed { vb, .. } => write!(f, "Streamed({})", vb.prefix()),
        }
    }
}

impl<M: StreamBlock> Block<M> {
    /// Runs `f` on the block: the resident one, or a copy materialised from its weights for the
    /// call and dropped after it.
    pub fn with<R>(&self, f: impl FnOnce(&M) -> Result<R>) -> Result<R> {
        match &self.slot {
            Slot::Resident(m) => f(m),
            Slot::Streamed { vb, build, options } => {
                let m = build(vb.clone())?;
                m.set_attention_options(options.get());
                f(&m)
            }
        }
    }

    /// Whether the block is streamed.
    pub fn is_streamed(&self) -> bool {
        matches!(self.slot, Slot::Streamed { .. })
    }

    /// Sets the attention options of the block (of every copy of a streamed one).
    pub fn set_attention_options(&self, options: AttentionOptions) {
        match &self.slot {
            Slot::Resident(m) => m.set_attention_options(options),
            Slot::Streamed { options: cell, .. } => cell.set(options),
        }
    }
}

/// A model whose blocks can be streamed: its block list and its constructor over
/// [`BlockWeights`]; loading either way is provided.
pub trait StreamableModel: Sized {
    /// Its configuration.
    type Config;

    /// The blocks that can be streamed, by checkpoint prefix (relative to the model's own), in
    /// forward order: what [`Residency::Streamed`] counts and the planner sizes from the headers.
    fn stream_blocks(cfg: &Self::Config) -> Vec<String>;

    /// Builds the model, its blocks through `weights` ([`BlockWeights::block`]) in forward order.
    fn build(cfg: &Self::Config, weights: BlockWeights) -> Result<Self>;

    /// [`Self::build`], checking that the blocks built are [`Self::stream_blocks`].
    fn load(cfg: &Self::Config, weights: BlockWeights) -> Result<Self> {
        let model = Self::build(cfg, weights.clone())?;
        weights.check_built(&Self::stream_blocks(cfg))?;
        Ok(model)
    }

    /// The model with its blocks held as `residency` says: resident parts from `vb`, streamed
    /// blocks from `streamed` on every use (see the module docs for what each device gives).
    fn new_streamed(
        cfg: &Self::Config,
        vb: VarBuilder,
        streamed: VarBuilder<'static>,
        residency: Residency,
    ) -> Result<Self> {
        Self::load(cfg, BlockWeights::new(vb, streamed, residency, &Self::stream_blocks(cfg)))
    }
}

/// The streamed side of [`BlockWeights`].
#[derive(Clone)]
struct Streaming {
    vb: VarBuilder<'static>,
    /// Prefixes of the blocks kept resident.
    resident: Arc<HashSet<String>>,
}

/// The weights a streamable model is built from: the resident parts' [`VarBuilder`] and, when
/// streaming, the streamed blocks' one (with the same prefixes), plus which blocks stay resident.
/// Mirrors `VarBuilder::pp` so constructors read as before.
#[derive(Clone)]
pub struct BlockWeights<'a> {
    vb: VarBuilder<'a>,
    streaming: Option<Streaming>,
    /// Every block built, by prefix, in construction order (checked against the model's list).
    built: Arc<Mutex<Vec<String>>>,
    /// The model's own prefix in `vb` (block names are relative to it).
    root: Arc<str>,
}

impl<'a> BlockWeights<'a> {
    /// Every block resident, read from `vb`.
    pub fn resident(vb: VarBuilder<'a>) -> Self {
        let root = vb.prefix().into();
        Self { vb, streaming: None, built: Arc::default(), root }
    }

    /// `residency` over `blocks` (the model's block prefixes in forward order): resident parts
    /// from `vb`, streamed blocks from `streamed` (see the module docs for what each device's
    /// loader gives).
    pub fn new(vb: VarBuilder<'a>, streamed: VarBuilder<'static>, residency: Residency, blocks: &[String]) -> Self {
        let streaming = match residency {
            Residency::Resident => None,
            Residency::Streamed { resident_blocks } => Some(Streaming {
                vb: streamed,
                resident: Arc::new(blocks.iter().take(resident_blocks).cloned().collect()),
            }),
        };
        let root = vb.prefix().into();
        Self { vb, streaming, built: Arc::default(), root }
    }

    /// The weights under `s` (as `VarBuilder::pp`).
    pub fn pp<S: ToString>(&self, s: S) -> Self {
        let s = s.to_string();
        Self {
            vb: self.vb.pp(&s),
            streaming: self.streaming.as_ref().map(|st| Streaming { vb: st.vb.pp(&s), resident: st.resident.clone() }),
            built: self.built.clone(),
            root: self.root.clone(),
        }
    }

    /// The resident parts' builder at this prefix.
    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }

    /// The block at `self.pp(name)`, built by `build`: resident unless streaming and not among the
    /// resident blocks. A streamed block is built once here (validating its weights) and dropped.
    pub fn block<M, F>(&self, name: impl ToString, build: F) -> Result<Block<M>>
    where
        M: StreamBlock,
        F: for<'v> Fn(VarBuilder<'v>) -> Result<M> + Send + Sync + 'static,
    {
        let at = self.pp(name);
        let full = at.vb.prefix();
        let prefix = match full.strip_prefix(&*self.root).and_then(|p| p.strip_prefix('.')) {
            Some(relative) if !self.root.is_empty() => relative.to_string(),
            _ => full,
        };
        self.built.lock().unwrap_or_else(|e| e.into_inner()).push(prefix.clone());
        match at.streaming {
            Some(st) if !st.resident.contains(&prefix) => {
                drop(build(st.vb.clone())?);
                Ok(Block {
                    slot: Slot::Streamed {
                        vb: st.vb,
                        build: Box::new(build),
                        options: AttentionOptionsCell::default(),
                    },
                })
            }
            _ => Ok(Block { slot: Slot::Resident(build(at.vb)?) }),
        }
    }

    /// Checks that the blocks built are `blocks`, in order: the list the planner and the
    /// residency were given is the model's (a broken invariant otherwise, reported as an error).
    pub fn check_built(&self, blocks: &[String]) -> Result<()> {
        let built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if built.as_slice() != blocks {
            candle_core::bail!(
                "internal error: the model built the blocks {:?} but lists {:?} for streaming",
                built.as_slice(),
                blocks
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use candle_core::{DType, Device, Tensor};

    use super::*;

    #[derive(Debug)]
    struct Probe(Tensor, Arc<AtomicUsize>);
    impl StreamBlock for Probe {}

    fn weights() -> VarBuilder<'static> {
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        let map = HashMap::from([("b.0.w".to_string(), t(1.0)), ("b.1.w".to_string(), t(2.0))]);
        VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
    }

    #[test]
    fn streamed_blocks_are_built_per_use_and_resident_ones_once() -> Result<()> {
        let names = vec!["b.0".to_string(), "b.1".to_string()];
        let bw = BlockWeights::new(weights(), weights(), Residency::Streamed { resident_blocks: 1 }, &names);
        let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
        let blocks = (0..2)
            .map(|i| {
                let count = counts[i].clone();
                bw.pp("b").block(i, move |vb| {
                    count.fetch_add(1, Ordering::Relaxed);
                    Ok(Probe(vb.get(1, "w")?, count.clone()))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        bw.check_built(&names)?;
        // Built once each at load (the streamed one to validate it).
        assert_eq!([counts[0].load(Ordering::Relaxed), counts[1].load(Ordering::Relaxed)], [1, 1]);
        for _ in 0..3 {
            for (b, want) in blocks.iter().zip([1f32, 2.0]) {
                assert_eq!(b.with(|p| p.0.to_vec1::<f32>())?, [want]);
            }
        }
        assert!(!blocks[0].is_streamed() && blocks[1].is_streamed());
        assert_eq!([counts[0].load(Ordering::Relaxed), counts[1].load(Ordering::Relaxed)], [1, 4]);
        assert_eq!(blocks[1].with(|p| Ok(p.1.load(Ordering::Relaxed)))?, 5);
        // A list that is not what was built is refused.
        assert!(bw.check_built(&names[..1]).is_err());
        Ok(())
    }

    #[test]
    fn a_streamed_block_with_a_missing_tensor_is_refused_at_load() {
        let names = vec!["b.2".to_string()];
        let bw = BlockWeights::new(weights(), weights(), Residency::Streamed { resident_blocks: 0 }, &names);
        let err = bw.pp("b").block(2, |vb| Ok(Probe(vb.get(1, "w")?, Arc::default()))).unwrap_err().to_string();
        assert!(err.contains("b.2.w"), "{err}");
    }
}
