//! Where streamed blocks' weights come from on each device (`sdgen_models::stream` holds the
//! mechanism and the GPU design: page-locked host copies, a copy stream with prefetch).
//!
//! - CPU and unified memory: the component's ordinary reader, which reads every tensor from the
//!   file with positioned reads on each use (`read_backend`): nothing of a streamed block stays in
//!   the process between uses.
//! - CUDA: [`HostCopies`], which reads each streamed block from the file once, when the model
//!   loads and validates it, gathers its tensors into one piece of page-locked host memory
//!   (`sdgen_models::stream::copy::HostBlock`) and uploads that on each later build of the block
//!   with one copy per dtype on a second stream, so the model can build the next block while this
//!   one computes. A tensor read outside a block's build is held on its own the same way; a dtype
//!   the page-locked path does not cover is held in ordinary memory and copied synchronously
//!   ([`upload`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;

/// Copies a host tensor held in ordinary memory to `device`, synchronously.
pub fn upload(host: &Tensor, device: &Device) -> candle_core::Result<Tensor> {
    host.to_device(device)
}

/// A streamed tensor held on its own between uses.
#[derive(Clone)]
enum Held {
    /// In ordinary memory (the CPU tests, a dtype without a page-locked path).
    Host(Tensor),
    /// In page-locked memory, copied on the device's copy stream.
    #[cfg(feature = "cuda")]
    Pinned(Arc<sdgen_models::stream::copy::HostBlock>),
}

impl Held {
    /// `host`, read for `name` in `dtype`.
    fn new(name: &str, dtype: DType, host: Tensor, device: &Device) -> candle_core::Result<Self> {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            use sdgen_models::stream::copy::HostBlock;
            if let Some(p) = HostBlock::new(&[((name.to_string(), dtype), host.clone())], device)? {
                return Ok(Self::Pinned(Arc::new(p)));
            }
        }
        let _ = (name, dtype, device);
        Ok(Self::Host(host))
    }

    fn upload(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let _ = (name, dtype);
        match self {
            Self::Host(t) => upload(t, device),
            #[cfg(feature = "cuda")]
            Self::Pinned(p) => {
                let up = p.upload(device)?;
                let t = up.get(name, dtype)?;
                up.release()?;
                t.ok_or_else(|| candle_core::Error::Msg(format!("internal error: {name} is not in its host copy")))
            }
        }
    }
}

/// Whether streamed weights are held in host memory and uploaded per use (a discrete GPU), rather
/// than read from the file per use (the CPU and unified memory, where host memory is the budget).
pub fn holds_host_copies(device: &Device) -> bool {
    device.is_cuda()
}

/// A backend that serves `inner`'s tensors from host copies, each read once (in the dtype asked
/// for, converted on the host: the same rounding as on the device) and uploaded on every use: a
/// streamed block's together (see the module docs), any other on its own.
pub struct HostCopies {
    inner: Box<dyn SimpleBackend>,
    state: Arc<Mutex<State>>,
}

/// What [`HostCopies`] holds; shared with the work it asks to run at a build's end.
#[derive(Default)]
struct State {
    /// Tensors held on their own, by name and dtype.
    held: HashMap<(String, DType), Held>,
    /// Streamed blocks gathered into page-locked memory, by prefix.
    #[cfg(feature = "cuda")]
    blocks: HashMap<Arc<str>, Arc<sdgen_models::stream::copy::HostBlock>>,
    /// The block read for the first time by the current build: its tensors as read.
    #[cfg(feature = "cuda")]
    gathering: Option<(u64, Vec<((String, DType), Tensor)>)>,
    /// The block uploaded for the current build.
    #[cfg(feature = "cuda")]
    uploaded: Option<(u64, sdgen_models::stream::copy::UploadedBlock)>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

type Read<'a> = &'a dyn Fn(&dyn SimpleBackend) -> candle_core::Result<Tensor>;

impl HostCopies {
    /// Wraps `inner`, holding nothing yet.
    pub fn new(inner: Box<dyn SimpleBackend>) -> Self {
        Self { inner, state: Arc::default() }
    }

    /// `name` in `dtype` on `dev`, read (by `read`, on the CPU) and held first if this is its
    /// first use.
    fn serve(&self, name: &str, dtype: DType, dev: &Device, read: Read<'_>) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if dev.is_cuda() {
            if let Some(build) = sdgen_models::stream::current_build() {
                if let Some(t) = self.serve_in_block(&build, name, dtype, dev, read)? {
                    return Ok(t);
                }
            }
        }
        self.serve_alone(name, dtype, dev, read)
    }

    /// A tensor held on its own.
    fn serve_alone(&self, name: &str, dtype: DType, dev: &Device, read: Read<'_>) -> candle_core::Result<Tensor> {
        let key = (name.to_string(), dtype);
        let held = lock(&self.state).held.get(&key).cloned();
        let held = match held {
            Some(h) => h,
            None => {
                let h = Held::new(name, dtype, read(self.inner.as_ref())?, dev)?;
                lock(&self.state).held.insert(key, h.clone());
                h
            }
        };
        held.upload(name, dtype, dev)
    }

    /// A tensor of the block `build` is building: on the block's first build, read and gathered
    /// (uploaded synchronously: the load validates the block), the block held page-locked when the
    /// build ends; on later builds, a view of the block uploaded once for the build. `None` for a
    /// tensor the block's first build did not read (held on its own) or a block the page-locked
    /// path does not cover.
    #[cfg(feature = "cuda")]
    fn serve_in_block(
        &self,
        build: &sdgen_models::stream::BlockBuild,
        name: &str,
        dtype: DType,
        dev: &Device,
        read: Read<'_>,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut state = lock(&self.state);
        if let Some(block) = state.blocks.get(&build.prefix).cloned() {
            if state.uploaded.as_ref().is_none_or(|(id, _)| *id != build.id) {
                // Another build's upload left here (its end never ran: a panic) is released, not
                // dropped, so its frees stay ordered after the work reading it.
                if let Some((_, stale)) = state.uploaded.replace((build.id, block.upload(dev)?)) {
                    stale.release()?;
                }
                let (shared, id) = (self.state.clone(), build.id);
                // What the constructor keeps is freed with the block; the rest after the work
                // enqueued so far (`release_with_block`).
                sdgen_models::stream::at_build_end(move || {
                    let mut state = lock(&shared);
                    match state.uploaded.take_if(|(uploaded, _)| *uploaded == id) {
                        Some((_, up)) => {
                            drop(state);
                            up.release()
                        }
                        None => Ok(()),
                    }
                });
            }
            return state.uploaded.as_ref().map_or(Ok(None), |(_, up)| up.get(name, dtype));
        }
        if state.held.contains_key(&(name.to_string(), dtype)) {
            return Ok(None);
        }
        let gathered = |(key, _): &&((String, DType), Tensor)| key.0 == name && key.1 == dtype;
        if let Some((_, host)) = state.gathering.as_ref().and_then(|(_, ts)| ts.iter().find(gathered)) {
            return Ok(Some(upload(host, dev)?));
        }
        let host = read(self.inner.as_ref())?;
        let on_device = upload(&host, dev)?;
        match &mut state.gathering {
            Some((id, tensors)) if *id == build.id => tensors.push(((name.to_string(), dtype), host)),
            _ => {
                state.gathering = Some((build.id, vec![((name.to_string(), dtype), host)]));
                let (shared, prefix, dev) = (self.state.clone(), build.prefix.clone(), dev.clone());
                let id = build.id;
                sdgen_models::stream::at_build_end(move || gather(&shared, id, prefix, &dev));
            }
        }
        Ok(Some(on_device))
    }
}

/// Ends a block's first build (build `id`): its tensors as read go into one page-locked piece;
/// one of a dtype that path does not cover is held on its own in ordinary memory.
#[cfg(feature = "cuda")]
fn gather(state: &Mutex<State>, id: u64, prefix: Arc<str>, dev: &Device) -> candle_core::Result<()> {
    use sdgen_models::stream::copy::{has_pinned_path, HostBlock};
    let Some((_, tensors)) = lock(state).gathering.take_if(|(gathering, _)| *gathering == id) else {
        return Ok(());
    };
    let (covered, other): (Vec<_>, Vec<_>) = tensors.into_iter().partition(|(_, t)| has_pinned_path(t.dtype()));
    let block = match covered.is_empty() {
        true => None,
        false => HostBlock::new(&covered, dev)?,
    };
    let mut state = lock(state);
    for (key, host) in other {
        state.held.insert(key, Held::Host(host));
    }
    if let Some(block) = block {
        state.blocks.insert(prefix, Arc::new(block));
    }
    Ok(())
}

impl SimpleBackend for HostCopies {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.serve(name, dtype, dev, &|b| b.get(s.clone(), name, h, dtype, &Device::Cpu))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.serve(name, dtype, dev, &|b| b.get_unchecked(name, dtype, &Device::Cpu))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Counts the reads that reach the file.
    struct Counting(Arc<AtomicUsize>);
    impl SimpleBackend for Counting {
        fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.fetch_add(1, Ordering::Relaxed);
            assert_eq!(name, "w");
            Tensor::ones(s, dtype, dev)
        }
        fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.get(Shape::from(2), name, Init::Const(0.0), dtype, dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            name == "w"
        }
    }

    #[test]
    fn host_copies_read_each_tensor_once_per_dtype() -> candle_core::Result<()> {
        let reads = Arc::new(AtomicUsize::new(0));
        let b = HostCopies::new(Box::new(Counting(reads.clone())));
        for _ in 0..3 {
            let t = b.get(Shape::from(2), "w", Init::Const(0.0), DType::F32, &Device::Cpu)?;
            assert_eq!(t.to_vec1::<f32>()?, [1.0, 1.0]);
        }
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        b.get_unchecked("w", DType::BF16, &Device::Cpu)?;
        assert_eq!(reads.load(Ordering::Relaxed), 2);
        assert!(b.contains_tensor("w") && !b.contains_tensor("v"));
        Ok(())
    }
}
