//! The copy side of block streaming on CUDA: streamed weights wait in pinned (page-locked) host
//! memory and are copied to the device on a second stream, so a copy runs at the link's full rate
//! while the main stream computes (see the module docs of [`super`] for the order of events).
//!
//! # Ordering, by hand
//!
//! cudarc can order work across streams by itself (an event per buffer, recorded and waited on
//! every kernel argument), but that costs two driver calls per argument of every launch once a
//! second stream exists, and our own kernels take their pointers without holding cudarc's guards
//! (`ops::cuda::storage_ptr`), so its events would not cover them. The copy stream is made with
//! that tracking off and ordered here instead, by three rules:
//!
//! 1. every copy is followed by an event the main stream waits on ([`Pinned::upload`]): nothing
//!    the main stream enqueues after an upload (the block's constructor, its forward) can read
//!    the weights before they have arrived, while what it enqueued before (the previous block's
//!    forward) runs alongside the copy;
//! 2. uploaded buffers belong to the copy stream, so their frees are ordered on it; before a
//!    streamed block's weights drop, [`release_after_compute`] makes the copy stream wait for
//!    everything the main stream has enqueued so far (the block's forward): a free, and the next
//!    copy into the freed memory, come after the last read;
//! 3. the device's memory pool may not reuse memory across streams by inserting waits of its own
//!    (`CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES` off): such a wait could hold a copy
//!    behind compute it has nothing to do with, serialising the two. Memory is still reused
//!    where the order above already guarantees it (within the copy stream, and after the events
//!    each side waits on).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Device, Result, Shape, Storage, Tensor};
use cudarc::driver::{self, result, sys, CudaStream, DevicePtrMut, PinnedHostSlice};

/// The streams of one device: candle's (every kernel) and the copy stream, and the uploads
/// waiting for the next [`release_after_compute`] ([`release_with_block`]).
struct Streams {
    main: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    pending: Mutex<Vec<Tensor>>,
}

fn driver_err(what: &str, e: driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA {what} for block streaming failed: {e}"))
}

type ByDevice = Mutex<HashMap<usize, Arc<Streams>>>;

fn by_device() -> std::sync::MutexGuard<'static, HashMap<usize, Arc<Streams>>> {
    static BY_DEVICE: OnceLock<ByDevice> = OnceLock::new();
    BY_DEVICE.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner())
}

/// The copy stream of `dev`, made on first use (see the module docs for what making it changes).
fn streams(dev: &CudaDevice) -> Result<Arc<Streams>> {
    let main = dev.cuda_stream();
    let ordinal = main.context().ordinal();
    let mut map = by_device();
    if let Some(s) = map.get(&ordinal) {
        return Ok(s.clone());
    }
    let ctx = main.context();
    // Safety: from here on no buffer tracks cross-stream events; every cross-stream use is
    // ordered by the rules in the module docs (the only second stream in the process is this one).
    unsafe { ctx.disable_event_tracking() };
    let copy = ctx.new_stream().map_err(|e| driver_err("creating the copy stream", e))?;
    forbid_cross_stream_waits(ctx.cu_device()).map_err(|e| driver_err("configuring the memory pool", e))?;
    let s = Arc::new(Streams { main, copy, pending: Mutex::default() });
    map.insert(ordinal, s.clone());
    Ok(s)
}

/// The streams of `dev` if its copy stream has been made (`None` on the CPU, or before anything
/// was pinned): what the releases order, without making a copy stream where none is needed.
fn made_streams(dev: &Device) -> Option<Arc<Streams>> {
    let Device::Cuda(dev) = dev else { return None };
    by_device().get(&dev.cuda_stream().context().ordinal()).cloned()
}

/// Rule 3 of the module docs, on the device's default pool (the one candle allocates from).
fn forbid_cross_stream_waits(device: sys::CUdevice) -> std::result::Result<(), driver::DriverError> {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut off: i32 = 0;
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, device).result()?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES,
            (&mut off as *mut i32).cast(),
        )
    }
}

fn cuda(dev: &Device) -> Result<&CudaDevice> {
    match dev {
        Device::Cuda(d) => Ok(d),
        _ => bail!("block streaming's pinned copies need a CUDA device, not {dev:?}"),
    }
}

/// A tensor's bytes in pinned host memory, uploaded on the copy stream on every use.
pub struct Pinned {
    bytes: PinnedHostSlice<u8>,
    dtype: DType,
    shape: Shape,
    streams: Arc<Streams>,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pinned({:?}, {:?})", self.dtype, self.shape)
    }
}

/// Calls `$f::<T>` with `T` the element type of `$dtype`, or evaluates `$other` for a dtype no
/// pinned copy is made for.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* ), $other:expr) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::U8 => $f::<u8>($($arg),*),
            DType::U32 => $f::<u32>($($arg),*),
            DType::F8E4M3 => $f::<float8::F8E4M3>($($arg),*),
            _ => $other,
        }
    };
}

impl Pinned {
    /// `host` (a CPU tensor) copied into pinned memory of `dev`'s context, or `None` for a dtype
    /// this path does not cover (the caller keeps a pageable copy and uploads it synchronously).
    pub fn new(host: &Tensor, dev: &Device) -> Result<Option<Self>> {
        let streams = streams(cuda(dev)?)?;
        let host = host.contiguous()?;
        let (storage, layout) = host.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else { bail!("a pinned copy is made from a CPU tensor") };
        fn bytes_of<T: candle_core::WithDType>(cpu: &candle_core::CpuStorage, start: usize, n: usize) -> Result<&[u8]> {
            let s = &cpu.as_slice::<T>()?[start..start + n];
            // Safety: plain-old-data elements viewed as their bytes, for the slice's lifetime.
            Ok(unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) })
        }
        let (start, n) = (layout.start_offset(), host.elem_count());
        let src: &[u8] = by_dtype!(host.dtype(), bytes_of(cpu, start, n), return Ok(None))?;
        let ctx = streams.main.context();
        // Safety: every byte is written just below before any read.
        let mut bytes = unsafe { ctx.alloc_pinned::<u8>(src.len().max(1)) }
            .map_err(|e| driver_err(&format!("pinning {} MB of host memory", src.len() >> 20), e))?;
        bytes.as_mut_slice().map_err(|e| driver_err("writing pinned memory", e))?[..src.len()].copy_from_slice(src);
        Ok(Some(Self { bytes, dtype: host.dtype(), shape: host.shape().clone(), streams }))
    }

    /// The tensor on `dev`: a buffer of the copy stream filled from the pinned bytes
    /// asynchronously, the main stream waiting for the copy before its next work (rule 1).
    pub fn upload(&self, dev: &Device) -> Result<Tensor> {
        let dev = cuda(dev)?;
        fn copy<T: CudaDType + driver::DeviceRepr>(p: &Pinned, dev: &CudaDevice) -> Result<CudaStorage> {
            let n = p.shape.elem_count();
            let s = &p.streams;
            let src = &p.bytes.as_slice().map_err(|e| driver_err("reading pinned memory", e))?
                [..n * std::mem::size_of::<T>()];
            // Safety: the buffer is filled by the copy below before any use (the main stream
            // waits for it); the pinned source outlives the copy (it is freed only after the
            // copy stream has drained: `Drop for Pinned`).
            let mut slice = unsafe { s.copy.alloc::<T>(n) }.map_err(|e| driver_err("allocating", e))?;
            let (dst, _) = slice.device_ptr_mut(&s.copy);
            unsafe { result::memcpy_htod_async(dst, src, s.copy.cu_stream()) }.map_err(|e| driver_err("copying", e))?;
            let arrived = s.copy.record_event(None).map_err(|e| driver_err("recording the copy", e))?;
            s.main.wait(&arrived).map_err(|e| driver_err("waiting for the copy", e))?;
            Ok(CudaStorage::wrap_cuda_slice(slice, dev.clone()))
        }
        let storage = by_dtype!(self.dtype, copy(self, dev), bail!("no pinned upload for {:?}", self.dtype))?;
        debug_assert_eq!(storage.dtype(), self.dtype);
        Ok(Tensor::from_storage(Storage::Cuda(storage), self.shape.clone(), BackpropOp::none(), false))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // A copy from these bytes may still be in flight (a block fetched ahead and never used).
        let _ = self.streams.copy.synchronize();
    }
}

/// Rule 2 of the module docs: call after a streamed block's work is enqueued and before its
/// weights drop. Nothing to do where no copy stream exists (the CPU, or nothing pinned yet).
/// The uploads kept by [`release_with_block`] are dropped here, their frees ordered by the same
/// wait.
pub fn release_after_compute(dev: &Device) -> Result<()> {
    let Some(s) = made_streams(dev) else { return Ok(()) };
    s.copy.join(&s.main).map_err(|e| driver_err("ordering the frees", e))?;
    let pending = std::mem::take(&mut *s.pending.lock().unwrap_or_else(|e| e.into_inner()));
    drop(pending);
    Ok(())
}

/// Rule 2 for an upload whose last read is a copy the main stream makes out of it while a block
/// is built (into candle's block storage for GGML weights, into a `U8` buffer for fp8 ones).
/// Dropped at once, its free would need a wait on the main stream first, which would hold every
/// later copy behind the compute already enqueued there (the block before, which the copies
/// are meant to overlap); it is kept instead until the block's [`release_after_compute`]. A
/// buffer the copy stream does not own (a resident load's, on the main stream) drops at once:
/// its free is ordered after the copy by its own stream.
pub fn release_with_block(t: Tensor) -> Result<()> {
    let Some(s) = made_streams(t.device()) else { return Ok(()) };
    let (_, owner) = crate::ops::cuda::one_byte_buffer(&t, &s.main)?;
    if Arc::ptr_eq(&owner, &s.copy) {
        s.pending.lock().unwrap_or_else(|e| e.into_inner()).push(t);
    }
    Ok(())
}
