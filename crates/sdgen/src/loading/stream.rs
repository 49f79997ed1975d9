//! Where streamed blocks' weights come from on each device (`sdgen_models::stream` holds the
//! mechanism and the GPU design: pinned host copies, a ring of two device buffers, a copy stream
//! with prefetch).
//!
//! - CPU and unified memory: the component's ordinary reader, which reads every tensor from the
//!   file with positioned reads on each use (`read_backend`): nothing of a streamed block stays in
//!   the process between uses.
//! - CUDA: [`HostCopies`], which keeps each tensor it has served in pinned host memory (read from
//!   the file once, when the model loads and validates its streamed blocks) and copies it to the
//!   device on every use on a second stream (`sdgen_models::stream::copy`), so the model can build
//!   the next block while this one computes. A dtype the pinned path does not cover is held in
//!   ordinary memory and copied synchronously ([`upload`]).

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;

/// Copies a host tensor held in ordinary memory to `device`, synchronously.
pub fn upload(host: &Tensor, device: &Device) -> candle_core::Result<Tensor> {
    host.to_device(device)
}

/// A streamed tensor as held between uses.
#[derive(Clone)]
enum Held {
    /// In ordinary memory (the CPU tests, a dtype without a pinned path).
    Host(Tensor),
    /// In pinned memory, copied on the device's copy stream.
    #[cfg(feature = "cuda")]
    Pinned(std::sync::Arc<sdgen_models::stream::copy::Pinned>),
}

impl Held {
    fn new(host: Tensor, device: &Device) -> candle_core::Result<Self> {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            if let Some(p) = sdgen_models::stream::copy::Pinned::new(&host, device)? {
                return Ok(Self::Pinned(std::sync::Arc::new(p)));
            }
        }
        let _ = device;
        Ok(Self::Host(host))
    }

    fn upload(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Host(t) => upload(t, device),
            #[cfg(feature = "cuda")]
            Self::Pinned(p) => p.upload(device),
        }
    }
}

/// Whether streamed weights are held in host memory and uploaded per use (a discrete GPU), rather
/// than read from the file per use (the CPU and unified memory, where host memory is the budget).
pub fn holds_host_copies(device: &Device) -> bool {
    device.is_cuda()
}

/// A backend that serves `inner`'s tensors from host copies, each read once (in the dtype asked
/// for, converted on the host: the same rounding as on the device) and uploaded on every use.
pub struct HostCopies {
    inner: Box<dyn SimpleBackend>,
    held: Mutex<HashMap<(String, DType), Held>>,
}

impl HostCopies {
    /// Wraps `inner`, holding nothing yet.
    pub fn new(inner: Box<dyn SimpleBackend>) -> Self {
        Self { inner, held: Mutex::default() }
    }

    /// `name` in `dtype` on `dev`: its held copy uploaded, read (by `read`, on the CPU) and held
    /// first if this is its first use.
    fn upload(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
        read: impl FnOnce(&dyn SimpleBackend) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let key = (name.to_string(), dtype);
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        let held = match held {
            Some(h) => h,
            None => {
                let h = Held::new(read(self.inner.as_ref())?, dev)?;
                self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(key, h.clone());
                h
            }
        };
        held.upload(dev)
    }
}

impl SimpleBackend for HostCopies {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.upload(name, dtype, dev, |b| b.get(s, name, h, dtype, &Device::Cpu))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.upload(name, dtype, dev, |b| b.get_unchecked(name, dtype, &Device::Cpu))
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
