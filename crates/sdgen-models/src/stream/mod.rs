//! Block streaming: a model whose large repeated blocks (an MMDiT's joint blocks, a UNet's
//! resnets and transformer blocks, T5's layers) are not all held in memory. The small parts every
//! forward uses (embeddings, the output norm and projection, a UNet's in/out convolutions and its
//! transformers' projections) are resident; of the blocks, `resident_blocks` spread through the
//! forward order are resident too (`sdgen_memory::plan::is_resident_block`, the planner's rule)
//! and every other one is *materialised* from its weight source just before it runs and dropped
//! right after, so a forward holds the resident parts, the resident blocks, one streamed block and
//! the activations.
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
//! - on CUDA, a reader that gathers each streamed block into one piece of page-locked host memory
//!   on its first build (at load) and copies it to the device on every later one, one copy per
//!   dtype, on a second stream ([`copy`]). It tells a block's weights from another's by the build
//!   they are asked for in ([`current_build`]).
//!
//! # On the GPU: copies overlapping compute
//!
//! A block's constructor run over the CUDA reader only *enqueues* copies, so the next streamed
//! block in forward order is built while this one computes: [`Block::with`] runs the block, then
//! builds the next one (its copies start on the copy stream once the streamed block before this
//! one has run, and go on beside the resident blocks since then and this block's kernels, the
//! main stream waiting for them right after this block: why the resident blocks are spread), then
//! releases this block's weights behind its work ([`copy`]'s ordering rules). A
//! forward holds the resident parts, at most two streamed blocks (the one computing, the one
//! arriving: the planner's "two streamed blocks with prefetch") and the activations. The order is
//! static (a forward visits blocks in the same order every time, skipping only skip-layer
//! guidance's blocks), so the next block needs no prediction; after the last one the first is
//! fetched, for the next forward. A block fetched for nothing (a skipped one) is dropped and the
//! block wanted is built then, so the order only ever costs time, never a wrong weight.
//!
//! Elsewhere (the CPU, unified memory) building a block reads the file then and there, so nothing
//! is fetched ahead: it would hold a second block without hiding anything.

#[cfg(feature = "cuda")]
pub mod copy;

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Result};
use candle_nn::VarBuilder;
use sdgen_memory::plan::is_resident_block;

use crate::attention::{AttentionOptions, AttentionOptionsCell};

/// How a model holds its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residency {
    /// Every block resident (the fastest; the whole model in memory).
    #[default]
    Resident,
    /// `resident_blocks` of the blocks resident, spread through the forward order
    /// (`sdgen_memory::plan::is_resident_block`), the others streamed.
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

type Build<M> = Arc<dyn Fn(VarBuilder<'static>) -> Result<M> + Send + Sync>;

/// A streamed block of some type, built.
type Built = Box<dyn Any + Send>;

/// Builds one streamed block from its weights.
type Builder = Arc<dyn Fn() -> Result<Built> + Send + Sync>;

enum Slot<M> {
    Resident(M),
    Streamed {
        vb: VarBuilder<'static>,
        build: Build<M>,
        /// The options to give each materialised copy.
        options: AttentionOptionsCell,
        /// Its place among the model's streamed blocks, in forward order.
        index: usize,
        ahead: Arc<Ahead>,
    },
}

/// One model's streamed blocks in forward order, and the next one, built ahead of its use.
#[derive(Default)]
struct Ahead {
    /// Each streamed block's constructor over its weights, by index.
    builders: Mutex<Vec<Builder>>,
    /// The block built ahead, with its index.
    next: Mutex<Option<(usize, Built)>>,
    /// Whether blocks are built ahead (where building one only enqueues copies).
    enabled: AtomicBool,
}

impl Ahead {
    fn register(&self, builder: Builder) -> usize {
        let mut builders = self.builders.lock().unwrap_or_else(|e| e.into_inner());
        builders.push(builder);
        builders.len() - 1
    }

    /// The block built ahead if it is block `index`; one built for another index is dropped
    /// (after any work reading it, on `device`).
    fn take(&self, index: usize, device: &Device) -> Result<Option<Built>> {
        match self.next.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some((i, block)) if i == index => Ok(Some(block)),
            Some((_, stale)) => {
                release_after_compute(device)?;
                drop(stale);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Builds the streamed block after `index` (the first after the last), if building ahead.
    fn build_after(&self, index: usize) -> Result<()> {
        if !self.enabled.load(Ordering::Relaxed) {
            return Ok(());
        }
        let builder = {
            let builders = self.builders.lock().unwrap_or_else(|e| e.into_inner());
            let next = (index + 1) % builders.len().max(1);
            builders.get(next).map(|b| (next, b.clone()))
        };
        if let Some((next, build)) = builder {
            let block = build()?;
            *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some((next, block));
        }
        Ok(())
    }
}

/// Orders the drop of a streamed block's weights after the work enqueued on them (CUDA's copy
/// stream, [`copy::release_after_compute`]); nothing to order elsewhere.
fn release_after_compute(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    copy::release_after_compute(device)?;
    let _ = device;
    Ok(())
}

/// One build of a streamed block on this thread: which block (its prefix in the streamed
/// weights) and a number no other build has. A weight source can serve the block's weights
/// together: CUDA's host copies gather a block's tensors into one page-locked piece on its first
/// build and upload it with one copy per dtype on every later one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockBuild {
    /// The block's prefix in the streamed weights.
    pub prefix: Arc<str>,
    /// Unique to this build.
    pub id: u64,
}

type AtBuildEnd = Box<dyn FnOnce() -> Result<()>>;

thread_local! {
    /// The builds running on this thread, innermost last, each with what runs when it ends.
    static BUILDS: RefCell<Vec<(BlockBuild, Vec<AtBuildEnd>)>> = const { RefCell::new(Vec::new()) };
}

/// The streamed block being built on this thread, if any.
pub fn current_build() -> Option<BlockBuild> {
    BUILDS.with_borrow(|b| b.last().map(|(build, _)| build.clone()))
}

/// Runs `f` when the current build ends (after the block's constructor, whether it succeeded or
/// not; an error from `f` fails the build). `false`, and `f` dropped, outside a build.
pub fn at_build_end(f: impl FnOnce() -> Result<()> + 'static) -> bool {
    BUILDS.with_borrow_mut(|b| b.last_mut().map(|(_, ends)| ends.push(Box::new(f))).is_some())
}

/// Builds the streamed block whose weights `vb` serves, as a build of its own ([`current_build`]),
/// then runs what was asked to run at the build's end.
fn build_streamed<M>(vb: &VarBuilder<'static>, build: &Build<M>) -> Result<M> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    /// Ends the build if the constructor panics (what was to run at its end is dropped unrun), so
    /// no later build is taken for this one.
    struct PopOnUnwind;
    impl Drop for PopOnUnwind {
        fn drop(&mut self) {
            BUILDS.with_borrow_mut(|b| b.pop());
        }
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    BUILDS.with_borrow_mut(|b| b.push((BlockBuild { prefix: vb.prefix().into(), id }, Vec::new())));
    let unwinding = PopOnUnwind;
    let out = build(vb.clone());
    std::mem::forget(unwinding);
    let ends = BUILDS.with_borrow_mut(|b| b.pop()).map(|(_, ends)| ends).unwrap_or_default();
    ends.into_iter().fold(out, |out, end| {
        let ended = end();
        out.and_then(|o| ended.map(|()| o))
    })
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

impl<M: StreamBlock + Send + 'static> Block<M> {
    /// Runs `f` on the block: the resident one, or a copy materialised from its weights for the
    /// call (or built ahead while the previous block ran) and dropped after it, once the next
    /// streamed block has been built ahead where that pays (see the module docs).
    pub fn with<R>(&self, f: impl FnOnce(&M) -> Result<R>) -> Result<R> {
        match &self.slot {
            Slot::Resident(m) => f(m),
            Slot::Streamed { vb, build, options, index, ahead } => {
                let m = match ahead.take(*index, vb.device())? {
                    Some(built) => *built.downcast::<M>().map_err(|_| {
                        candle_core::Error::Msg(format!("internal error: streamed block {index} changed type"))
                    })?,
                    None => build_streamed(vb, build)?,
                };
                m.set_attention_options(options.get());
                let out = f(&m);
                let next = ahead.build_after(*index);
                release_after_compute(vb.device())?;
                drop(m);
                next?;
                out
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
    ahead: Arc<Ahead>,
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
            Residency::Streamed { resident_blocks } => {
                let ahead = Ahead::default();
                ahead.enabled.store(streamed.device().is_cuda(), Ordering::Relaxed);
                Some(Streaming {
                    vb: streamed,
                    resident: Arc::new(
                        (blocks.iter().enumerate())
                            .filter(|&(i, _)| is_resident_block(i, blocks.len(), resident_blocks))
                            .map(|(_, b)| b.clone())
                            .collect(),
                    ),
                    ahead: Arc::new(ahead),
                })
            }
        };
        let root = vb.prefix().into();
        Self { vb, streaming, built: Arc::default(), root }
    }

    /// The weights under `s` (as `VarBuilder::pp`).
    pub fn pp<S: ToString>(&self, s: S) -> Self {
        let s = s.to_string();
        Self {
            vb: self.vb.pp(&s),
            streaming: self.streaming.as_ref().map(|st| Streaming {
                vb: st.vb.pp(&s),
                resident: st.resident.clone(),
                ahead: st.ahead.clone(),
            }),
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
        M: StreamBlock + Send + 'static,
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
                let build: Build<M> = Arc::new(build);
                let validated = build_streamed(&st.vb, &build)?;
                release_after_compute(st.vb.device())?;
                drop(validated);
                let index = st.ahead.register({
                    let (vb, build) = (st.vb.clone(), build.clone());
                    Arc::new(move || Ok(Box::new(build_streamed(&vb, &build)?) as Built))
                });
                Ok(Block {
                    slot: Slot::Streamed {
                        vb: st.vb,
                        build,
                        options: AttentionOptionsCell::default(),
                        index,
                        ahead: st.ahead,
                    },
                })
            }
            _ => Ok(Block { slot: Slot::Resident(build(at.vb)?) }),
        }
    }

    /// Builds each streamed block ahead of its use (the default where the streamed weights are on
    /// a CUDA device, whose reader only enqueues copies), or not. For tests elsewhere.
    pub fn building_ahead(self, on: bool) -> Self {
        if let Some(st) = &self.streaming {
            st.ahead.enabled.store(on, Ordering::Relaxed);
        }
        self
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

    type Probes = (Vec<Block<Probe>>, Vec<Arc<AtomicUsize>>);

    /// Blocks `b.0`..`b.{n-1}`, each a probe of its weight `w` counting its builds.
    fn probes(bw: &BlockWeights, n: usize) -> Result<Probes> {
        let counts: Vec<_> = (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let blocks = (0..n)
            .map(|i| {
                let count = counts[i].clone();
                bw.pp("b").block(i, move |vb| {
                    count.fetch_add(1, Ordering::Relaxed);
                    Ok(Probe(vb.get(1, "w")?, count.clone()))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((blocks, counts))
    }

    #[test]
    fn streamed_blocks_are_built_per_use_and_resident_ones_once() -> Result<()> {
        let names = vec!["b.0".to_string(), "b.1".to_string()];
        let bw = BlockWeights::new(weights(), weights(), Residency::Streamed { resident_blocks: 1 }, &names);
        let (blocks, counts) = probes(&bw, 2)?;
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
    fn blocks_built_ahead_are_the_ones_used_next() -> Result<()> {
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        let map: HashMap<String, Tensor> = (0..3).map(|i| (format!("b.{i}.w"), t(i as f32))).collect();
        let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        let names: Vec<String> = (0..3).map(|i| format!("b.{i}")).collect();
        let bw =
            BlockWeights::new(vb.clone(), vb, Residency::Streamed { resident_blocks: 0 }, &names).building_ahead(true);
        let (blocks, counts) = probes(&bw, 3)?;
        let built = || counts.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>();
        let run = |order: &[usize]| -> Result<()> {
            for &i in order {
                assert_eq!(blocks[i].with(|p| p.0.to_vec1::<f32>())?, [i as f32], "block {i}");
            }
            Ok(())
        };
        assert_eq!(built(), [1, 1, 1]); // validated at load
                                        // The first use builds on demand; every use then builds the next (the first after the last).
        run(&[0, 1, 2])?;
        assert_eq!(built(), [3, 2, 2]);
        run(&[0, 1, 2])?;
        assert_eq!(built(), [4, 3, 3]);
        // A skipped block's early build is dropped and the block wanted built then: right weights.
        run(&[0, 2])?;
        assert_eq!(built(), [5, 4, 4]);
        run(&[0])?;
        assert_eq!(built(), [5, 5, 4]);
        Ok(())
    }

    #[test]
    fn each_streamed_build_is_a_build_of_its_block_with_its_own_id_and_end() -> Result<()> {
        use std::sync::Mutex as M;
        let names = vec!["b.0".to_string(), "b.1".to_string()];
        let bw = BlockWeights::new(weights(), weights(), Residency::Streamed { resident_blocks: 0 }, &names)
            .building_ahead(true);
        let log: Arc<M<Vec<String>>> = Arc::default();
        let blocks = (0..2)
            .map(|i| {
                let log = log.clone();
                bw.pp("b").block(i, move |vb| {
                    let build = current_build().expect("a streamed block is built inside a build");
                    assert_eq!(&*build.prefix, vb.prefix());
                    let ended = log.clone();
                    let id = build.id;
                    assert!(at_build_end(move || {
                        // The build is over when its ends run.
                        assert_eq!(current_build(), None);
                        ended.lock().unwrap().push(format!("end {id}"));
                        Ok(())
                    }));
                    log.lock().unwrap().push(format!("{} {id}", build.prefix));
                    Ok(Probe(vb.get(1, "w")?, Arc::default()))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for b in &blocks {
            b.with(|p| p.0.to_vec1::<f32>())?;
        }
        let log = log.lock().unwrap().clone();
        // Validation of each block, then b.0 on demand, b.1 ahead, b.0 ahead: each build's end
        // right after it, every id different.
        let parse = |l: &String| l.rsplit_once(' ').map(|(a, b)| (a.to_string(), b.parse::<u64>().unwrap())).unwrap();
        let entries: Vec<(String, u64)> = log.iter().map(parse).collect();
        let prefixes: Vec<&str> = entries.iter().step_by(2).map(|(p, _)| p.as_str()).collect();
        assert_eq!(prefixes, ["b.0", "b.1", "b.0", "b.1", "b.0"], "{log:?}");
        for pair in entries.chunks(2) {
            assert_eq!((pair[1].0.as_str(), pair[1].1), ("end", pair[0].1), "{log:?}");
        }
        let mut ids: Vec<u64> = entries.iter().step_by(2).map(|e| e.1).collect();
        ids.dedup();
        assert_eq!(ids.len(), 5, "{log:?}");
        assert_eq!(current_build(), None);
        assert!(!at_build_end(|| Ok(())));
        Ok(())
    }

    #[test]
    fn an_error_at_a_builds_end_fails_the_build() {
        let names = vec!["b.0".to_string()];
        let bw = BlockWeights::new(weights(), weights(), Residency::Streamed { resident_blocks: 0 }, &names);
        let err = bw
            .pp("b")
            .block(0, |vb| {
                at_build_end(|| candle_core::bail!("gathering failed"));
                Ok(Probe(vb.get(1, "w")?, Arc::default()))
            })
            .unwrap_err();
        assert!(err.to_string().contains("gathering failed"), "{err}");
        assert_eq!(current_build(), None);
    }

    #[test]
    fn a_streamed_block_with_a_missing_tensor_is_refused_at_load() {
        let names = vec!["b.2".to_string()];
        let bw = BlockWeights::new(weights(), weights(), Residency::Streamed { resident_blocks: 0 }, &names);
        let err = bw.pp("b").block(2, |vb| Ok(Probe(vb.get(1, "w")?, Arc::default()))).unwrap_err().to_string();
        assert!(err.contains("b.2.w"), "{err}");
    }
}
