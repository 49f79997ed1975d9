//! The copy side of block streaming on CUDA: streamed weights wait in page-locked host memory,
//! one piece per block ([`HostBlock`]), and are copied to the device on a second stream, one copy
//! per dtype of the block, so a copy runs at the link's full rate while the main stream computes
//! (see the module docs of [`super`] for the order of events).
//!
//! # Ordering, by hand
//!
//! cudarc can order work across streams by itself (an event per buffer, recorded and waited on
//! every kernel argument), but that costs two driver calls per argument of every launch once a
//! second stream exists, and our own kernels take their pointers without holding cudarc's guards
//! (`ops::cuda::storage_ptr`), so its events would not cover them. The copy stream is made with
//! that tracking off and ordered here instead, by three rules:
//!
//! 1. every upload is followed by an event the main stream waits on ([`HostBlock::upload`]):
//!    nothing the main stream enqueues after an upload (the block's constructor, its forward) can
//!    read the weights before they have arrived, while what it enqueued before (the previous
//!    block's forward) runs alongside the copy;
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
use cudarc::driver::{self, result, sys, CudaContext, CudaStream, DevicePtrMut, PinnedHostSlice};

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

/// Host memory the driver has page-locked, in one piece: an anonymous mapping of our own
/// (page-aligned, so no other allocation shares its pages), written, then registered in place.
/// Registering written memory runs at ~25 GB/s on an H100 host where `cuMemHostAlloc` runs at
/// ~2.5 GB/s whatever the piece size, and one piece per block frees ~8× faster than one per
/// tensor (BENCHMARKS.md "Page-locking rates"). Where the driver refuses to register memory it
/// did not allocate, the bytes are copied into memory it allocates page-locked instead: slower to
/// load, the same to copy from.
enum HostBytes {
    Registered(Registration),
    Allocated(PinnedHostSlice<u8>),
}

/// A private anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// Safety: the mapping is owned (no other handle to it exists).
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `len` bytes, a whole number of pages, zero-filled by the kernel.
    fn new(len: usize) -> Result<Self> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // Safety: a fresh private anonymous mapping; checked below.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if ptr == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            bail!("cannot map {} MB of host memory for a streamed block: {e}", len >> 20);
        }
        // Huge pages where the kernel offers them on request: fewer faults while the block is
        // written, fewer pages to lock. Only advice; nothing changes if it is not taken.
        // Safety: advice on the mapping just made.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>()).expect("mmap returns a non-null address on success");
        Ok(Self { ptr, len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // Safety: `len` bytes, initialised (zero-filled), ours alone while `self` is borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn as_slice(&self) -> &[u8] {
        // Safety: as above, shared.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Safety: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A mapping registered with the driver; unregistered on drop, before it is unmapped.
struct Registration {
    map: Mapping,
    ctx: Arc<CudaContext>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Nothing to report to: a failure leaves the pages locked until the process exits.
        let _ = self.ctx.bind_to_thread();
        // Safety: registered in `HostBytes::new`; no copy reads it any more (its owner
        // synchronised the copy stream first: `Drop for HostBlock`).
        let _ = unsafe { sys::cuMemHostUnregister(self.map.ptr.as_ptr().cast()) };
    }
}

impl HostBytes {
    /// `len` bytes (rounded up to whole pages), zeroed, written by `fill`, then page-locked in
    /// `ctx`.
    fn new(ctx: &Arc<CudaContext>, len: usize, fill: impl FnOnce(&mut [u8]) -> Result<()>) -> Result<Self> {
        let mut map = Mapping::new(len.max(1).next_multiple_of(4096))?;
        fill(map.as_mut_slice())?;
        ctx.bind_to_thread().map_err(|e| driver_err("binding the context", e))?;
        // Safety: the whole mapping, registered once (unregistered by `Drop for Registration`).
        let registered = unsafe { sys::cuMemHostRegister_v2(map.ptr.as_ptr().cast(), map.len, 0).result() };
        if registered.is_ok() {
            return Ok(Self::Registered(Registration { map, ctx: ctx.clone() }));
        }
        // Safety: every byte is written just below before any read.
        let mut bytes = unsafe { ctx.alloc_pinned::<u8>(map.len) }
            .map_err(|e| driver_err(&format!("page-locking {} MB of host memory", map.len >> 20), e))?;
        bytes.as_mut_slice().map_err(|e| driver_err("writing page-locked memory", e))?.copy_from_slice(map.as_slice());
        Ok(Self::Allocated(bytes))
    }

    fn as_slice(&self) -> Result<&[u8]> {
        match self {
            Self::Registered(r) => Ok(r.map.as_slice()),
            Self::Allocated(bytes) => bytes.as_slice().map_err(|e| driver_err("reading page-locked memory", e)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Registered(r) => r.map.len,
            Self::Allocated(bytes) => bytes.len(),
        }
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

/// Whether [`HostBlock`] can hold tensors of `dtype`.
pub fn has_pinned_path(dtype: DType) -> bool {
    fn yes<T>() -> bool {
        true
    }
    by_dtype!(dtype, yes(), false)
}

/// Where each tensor of a block starts in its dtype's buffer: a multiple of this many bytes, the
/// alignment `cudaMalloc` gives (vectorised kernels and cuBLAS's fast paths check for less).
const TENSOR_ALIGN: usize = 256;

/// One dtype's share of a [`HostBlock`]: a byte range, copied to one device buffer.
#[derive(Debug)]
struct Region {
    dtype: DType,
    start: usize,
    len: usize,
}

/// Where a tensor lies in its block: its region, its first element there, its shape.
#[derive(Debug)]
struct Placed {
    region: usize,
    offset: usize,
    shape: Shape,
}

/// A streamed block's weights (or a lone tensor) in one piece of page-locked host memory,
/// uploaded on every use with one copy per dtype on the copy stream and one event the main stream
/// waits on (rule 1) — not one copy, buffer and event per tensor.
pub struct HostBlock {
    host: HostBytes,
    regions: Vec<Region>,
    placed: HashMap<(String, DType), Placed>,
    streams: Arc<Streams>,
}

impl std::fmt::Debug for HostBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostBlock({} tensors, {} bytes, {:?})", self.placed.len(), self.host.len(), self.regions)
    }
}

impl HostBlock {
    /// `tensors` (CPU tensors, each with the name and dtype it is asked for by) gathered into
    /// page-locked memory of `dev`'s context, or `None` if one has a dtype this path does not
    /// cover (the caller keeps pageable copies and uploads them synchronously).
    pub fn new(tensors: &[((String, DType), Tensor)], dev: &Device) -> Result<Option<Self>> {
        if tensors.iter().any(|(_, t)| !has_pinned_path(t.dtype())) {
            return Ok(None);
        }
        let streams = streams(cuda(dev)?)?;
        let mut dtypes: Vec<DType> = Vec::new();
        for (_, t) in tensors {
            if !dtypes.contains(&t.dtype()) {
                dtypes.push(t.dtype());
            }
        }
        // Each dtype's tensors one after another, each at a multiple of TENSOR_ALIGN bytes.
        let (mut regions, mut placed, mut sources) = (Vec::new(), HashMap::new(), Vec::new());
        let mut at: usize = 0;
        for dtype in dtypes {
            let start = at.next_multiple_of(TENSOR_ALIGN);
            at = start;
            for (key, t) in tensors.iter().filter(|(_, t)| t.dtype() == dtype) {
                at = at.next_multiple_of(TENSOR_ALIGN);
                let offset = (at - start) / dtype.size_in_bytes();
                placed.insert(key.clone(), Placed { region: regions.len(), offset, shape: t.shape().clone() });
                sources.push((at, t.contiguous()?));
                at += t.elem_count() * dtype.size_in_bytes();
            }
            regions.push(Region { dtype, start, len: at - start });
        }
        let host = HostBytes::new(streams.main.context(), at, |bytes| {
            for (at, t) in &sources {
                let (storage, layout) = t.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else { bail!("a streamed block is gathered from CPU tensors") };
                fn bytes_of<T: candle_core::WithDType>(
                    c: &candle_core::CpuStorage,
                    s: usize,
                    n: usize,
                ) -> Result<&[u8]> {
                    let s = &c.as_slice::<T>()?[s..s + n];
                    // Safety: plain-old-data elements viewed as their bytes, for the slice's lifetime.
                    Ok(unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) })
                }
                let (start, n) = (layout.start_offset(), t.elem_count());
                let src = by_dtype!(t.dtype(), bytes_of(cpu, start, n), bail!("no pinned copy for {:?}", t.dtype()))?;
                bytes[*at..*at + src.len()].copy_from_slice(src);
            }
            Ok(())
        })?;
        Ok(Some(Self { host, regions, placed, streams }))
    }

    /// The block on `dev`: one buffer of the copy stream per dtype, filled asynchronously, the
    /// main stream waiting for the copies before its next work (rule 1).
    pub fn upload(self: &Arc<Self>, dev: &Device) -> Result<UploadedBlock> {
        let dev = cuda(dev)?;
        let s = &self.streams;
        fn copy<T: CudaDType + driver::DeviceRepr>(src: &[u8], s: &Streams, dev: &CudaDevice) -> Result<CudaStorage> {
            let n = src.len() / std::mem::size_of::<T>();
            // Safety: the buffer is filled by the copy below before any use (the main stream
            // waits for it); the page-locked source outlives the copy (`Drop for HostBlock`).
            let mut slice = unsafe { s.copy.alloc::<T>(n.max(1)) }.map_err(|e| driver_err("allocating", e))?;
            let (dst, _) = slice.device_ptr_mut(&s.copy);
            unsafe { result::memcpy_htod_async(dst, src, s.copy.cu_stream()) }.map_err(|e| driver_err("copying", e))?;
            Ok(CudaStorage::wrap_cuda_slice(slice, dev.clone()))
        }
        let host = self.host.as_slice()?;
        let regions = (self.regions.iter())
            .map(|r| {
                let src = &host[r.start..r.start + r.len];
                let storage = by_dtype!(r.dtype, copy(src, s, dev), bail!("no pinned upload for {:?}", r.dtype))?;
                let n = r.len / r.dtype.size_in_bytes();
                Ok(Tensor::from_storage(Storage::Cuda(storage), n, BackpropOp::none(), false))
            })
            .collect::<Result<Vec<_>>>()?;
        let arrived = s.copy.record_event(None).map_err(|e| driver_err("recording the copy", e))?;
        s.main.wait(&arrived).map_err(|e| driver_err("waiting for the copy", e))?;
        Ok(UploadedBlock { host: self.clone(), regions })
    }
}

impl Drop for HostBlock {
    fn drop(&mut self) {
        // A copy from these bytes may still be in flight (a block fetched ahead and never used).
        let _ = self.streams.copy.synchronize();
    }
}

/// A [`HostBlock`] on the device: its tensors are views of one buffer per dtype, which lives as
/// long as any of them.
pub struct UploadedBlock {
    host: Arc<HostBlock>,
    regions: Vec<Tensor>,
}

impl UploadedBlock {
    /// The tensor asked for by `name` in `dtype`, if the block holds it.
    pub fn get(&self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        let Some(p) = self.host.placed.get(&(name.to_string(), dtype)) else { return Ok(None) };
        let flat = self.regions[p.region].narrow(0, p.offset, p.shape.elem_count())?;
        Ok(Some(flat.reshape(p.shape.clone())?))
    }

    /// Hands the block's buffers to [`release_with_block`]: what no tensor of the block still
    /// uses is freed after the work enqueued so far (a constructor's copies out of it included).
    pub fn release(self) -> Result<()> {
        // Every region handed over, the first error reported after.
        self.regions.into_iter().map(release_with_block).fold(Ok(()), |all, one| all.and(one))
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
    if owner_stream(&t)?.is_some_and(|owner| Arc::ptr_eq(&owner, &s.copy)) {
        s.pending.lock().unwrap_or_else(|e| e.into_inner()).push(t);
    }
    Ok(())
}

/// The stream whose buffer holds `t` (a CUDA tensor): its frees are ordered on it. `None` for a
/// dtype no upload is made in (not the copy stream's).
fn owner_stream(t: &Tensor) -> Result<Option<Arc<CudaStream>>> {
    let (storage, _) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else { bail!("not a CUDA tensor") };
    fn of<T: CudaDType>(s: &CudaStorage) -> Result<Arc<CudaStream>> {
        Ok(s.as_cuda_slice::<T>()?.stream().clone())
    }
    by_dtype!(s.dtype(), of(s), return Ok(None)).map(Some)
}
