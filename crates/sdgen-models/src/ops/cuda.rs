//! Our CUDA kernels (`kernels/sdgen_ops.cu`, compiled by `build.rs` into a fatbin embedded here)
//! and the cuBLAS attention, launched on the candle device's own stream so they order with
//! candle's kernels without any synchronisation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Layout, Result, Storage, Tensor};

use super::norm::GroupNorm;
use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sdgen_ops.fatbin"));

fn wrap<E: std::error::Error + Send + Sync + 'static>(e: E) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The kernel `name` on `device`: its module loaded once per device, the function looked up and
/// `setup` run on it once (`false` from `setup`: the kernel cannot run on this device, `None`).
fn function_with(
    device: &CudaDevice,
    name: &str,
    setup: impl FnOnce(&CudaFunction) -> bool,
) -> Result<Option<CudaFunction>> {
    type Modules = Mutex<HashMap<DeviceId, Arc<CudaModule>>>;
    type Functions = Mutex<HashMap<(DeviceId, String), Option<CudaFunction>>>;
    static MODULES: OnceLock<Modules> = OnceLock::new();
    static FUNCTIONS: OnceLock<Functions> = OnceLock::new();
    let key = (device.id(), name.to_string());
    if let Some(f) = FUNCTIONS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(f.clone());
    }
    let module = {
        let mut modules = MODULES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        match modules.get(&device.id()) {
            Some(m) => m.clone(),
            None => {
                let ptx = cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec());
                let m = device.cuda_stream().context().load_module(ptx).map_err(wrap)?;
                modules.insert(device.id(), m.clone());
                m
            }
        }
    };
    let func = module.load_function(name).map_err(wrap)?;
    let func = setup(&func).then_some(func);
    FUNCTIONS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner()).insert(key, func.clone());
    Ok(func)
}

/// The kernel `name` on `device` (see [`function_with`]).
fn function(device: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(function_with(device, name, |_| true)?.expect("a kernel without setup always runs"))
}

/// The kernel name suffix of a dtype our kernels exist for.
fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("no sdgen CUDA kernel for {d:?}"),
    })
}

/// A tensor's CUDA storage, read-locked for the duration of a launch.
pub(crate) struct Input<'a> {
    guard: candle_core::StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Input<'a> {
    pub(crate) fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        if !matches!(&*guard, Storage::Cuda(_)) {
            bail!("sdgen CUDA kernel given a tensor on {:?}", t.device().location());
        }
        Ok(Self { guard, layout })
    }

    fn storage(&self) -> &CudaStorage {
        match &*self.guard {
            Storage::Cuda(s) => s,
            _ => unreachable!("checked in Input::new"),
        }
    }

    /// The device address of element `offset` past the layout's start (in elements of `dtype`).
    pub(crate) fn ptr(&self, stream: &CudaStream, offset: usize) -> Result<u64> {
        storage_ptr(self.storage(), stream, self.layout.start_offset() + offset)
    }
}

/// The device address of element `offset` (in elements of its dtype) of a CUDA storage. Every
/// launch here goes to the device's one stream, the stream every tensor was written on, so the
/// read needs no cross-stream event (the guard `device_ptr` returns is dropped).
pub(crate) fn storage_ptr(s: &CudaStorage, stream: &CudaStream, offset: usize) -> Result<u64> {
    fn at<T: CudaDType + DeviceRepr>(s: &CudaStorage, stream: &CudaStream, offset: usize) -> Result<u64> {
        let (ptr, _) = s.as_cuda_slice::<T>()?.device_ptr(stream);
        Ok(ptr + (offset * std::mem::size_of::<T>()) as u64)
    }
    match s.dtype() {
        DType::F32 => at::<f32>(s, stream, offset),
        DType::F16 => at::<half::f16>(s, stream, offset),
        DType::BF16 => at::<half::bf16>(s, stream, offset),
        d => bail!("no sdgen CUDA kernel for {d:?}"),
    }
}

/// An uninitialised device buffer of `len` elements of `dtype` on `device`'s stream.
pub(crate) fn alloc(device: &CudaDevice, dtype: DType, len: usize) -> Result<CudaStorage> {
    macro_rules! make {
        ($t:ty) => {{
            // SAFETY: every element is written by the kernel that fills the buffer before any read.
            let s: CudaSlice<$t> = unsafe { device.alloc::<$t>(len.max(1))? };
            CudaStorage::wrap_cuda_slice(s, device.clone())
        }};
    }
    Ok(match dtype {
        DType::F32 => make!(f32),
        DType::F16 => make!(half::f16),
        DType::BF16 => make!(half::bf16),
        d => bail!("no sdgen CUDA kernel for {d:?}"),
    })
}

/// The first `len` elements of an input from its layout's start, typed.
fn typed_view<'a, T: CudaDType + DeviceRepr>(
    input: &'a Input<'_>,
    len: usize,
) -> Result<cudarc::driver::CudaView<'a, T>> {
    let start = input.layout.start_offset();
    Ok(input.storage().as_cuda_slice::<T>()?.slice(start..start + len))
}

fn into_tensor(storage: CudaStorage, shape: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

pub(crate) fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        d => bail!("sdgen CUDA kernel given a tensor on {:?}", d.location()),
    }
}

/// `t` contiguous, in `dtype`.
pub(crate) fn prepared(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let t = if t.dtype() == dtype { t.clone() } else { t.to_dtype(dtype)? };
    t.contiguous()
}

fn launch_1d(n: usize, threads: u32, max_blocks: usize) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).clamp(1, max_blocks) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// A group norm's per-channel operands in `dtype`, contiguous: the add term (when given), the
/// weight and the bias.
fn norm_operands(norm: &GroupNorm, add: Option<&Tensor>, dtype: DType) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    Ok((add.map(|a| prepared(a, dtype)).transpose()?, prepared(&norm.weight, dtype)?, prepared(&norm.bias, dtype)?))
}

/// The device addresses of a group norm's input, add term (0 when none), weight and bias.
fn norm_pointers(
    stream: &CudaStream,
    x: &Tensor,
    add: Option<&Tensor>,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<[u64; 4]> {
    let ptr = |t: &Tensor| Input::new(t)?.ptr(stream, 0);
    Ok([ptr(x)?, add.map(ptr).transpose()?.unwrap_or(0), ptr(weight)?, ptr(bias)?])
}

/// GroupNorm of `x: [b, c, ...]` over `groups` groups, of `x + add` (`add: [b, c]`) when given,
/// then SiLU when `silu` (see `kernels/sdgen_ops.cu`). `None` where the kernels do not apply
/// (more than 65 535 channel planes, planes over 2^31 elements): the caller takes the reference
/// path.
pub(crate) fn group_norm(norm: &GroupNorm, x: &Tensor, add: Option<&Tensor>, silu: bool) -> Result<Option<Tensor>> {
    let device = cuda_device(x)?;
    let dtype = x.dtype();
    let sfx = suffix(dtype)?;
    let dims = x.dims().to_vec();
    let (b, c, groups, eps) = (dims[0], dims[1], norm.groups, norm.eps);
    let hw: usize = dims[2..].iter().product();
    if hw > i32::MAX as usize || b * c > 65_535 || b * groups > 65_535 {
        return Ok(None);
    }
    let cpg = c / groups;
    let x = prepared(x, dtype)?;
    let (add, weight, bias) = norm_operands(norm, add, dtype)?;
    let stream = device.cuda_stream();

    // Enough blocks to fill the GPU, each reducing at least 1024 elements.
    let group_len = cpg * hw;
    let splits = (1024usize.div_ceil(b * groups)).clamp(1, 256).min(group_len.div_ceil(1024).max(1));
    let partial: CudaSlice<f32> = unsafe { device.alloc::<f32>(b * groups * splits * 3)? };
    let out = alloc(&device, dtype, x.elem_count())?;

    let [xp, ap, wp, bp] = norm_pointers(&stream, &x, add.as_ref(), &weight, &bias)?;
    let (pp, _) = partial.device_ptr(&stream);
    let yp = storage_ptr(&out, &stream, 0)?;
    let (ci, hwi, cpgi, gi, si) = (c as i32, hw as i32, cpg as i32, groups as i32, splits as i32);

    // 16-byte loads where every plane starts 16-byte aligned (the buffers are).
    let vec_width = 16 / dtype.size_in_bytes();
    let offsets_aligned = [&x, &weight, &bias].iter().all(|t| t.layout().start_offset() % vec_width == 0);
    let vec = hw.is_multiple_of(vec_width) && offsets_aligned;
    let kind = if vec { "_vec" } else { "" };
    let stats = function(&device, &format!("gn_stats{kind}_{sfx}"))?;
    let cfg =
        LaunchConfig { grid_dim: (splits as u32, (b * groups) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut l = stream.launch_builder(&stats);
    l.arg(&xp).arg(&ap).arg(&ci).arg(&hwi).arg(&cpgi).arg(&gi).arg(&si).arg(&pp);
    unsafe { l.launch(cfg) }.map_err(wrap)?;

    let apply = function(&device, &format!("gn_apply{kind}_{sfx}"))?;
    let per_block = 256 * if vec { vec_width } else { 4 };
    let cfg = LaunchConfig {
        grid_dim: (hw.div_ceil(per_block) as u32, (b * c) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (epsf, siluf) = (eps as f32, silu as i32);
    let mut l = stream.launch_builder(&apply);
    l.arg(&xp).arg(&ap).arg(&wp).arg(&bp).arg(&yp).arg(&ci).arg(&hwi).arg(&cpgi).arg(&gi).arg(&si).arg(&pp);
    l.arg(&epsf).arg(&siluf);
    unsafe { l.launch(cfg) }.map_err(wrap)?;
    drop(partial);
    Ok(Some(into_tensor(out, &dims)))
}

/// GroupNorm of channels-last `x: [b, h, w, c]` (see [`group_norm`] and `gnl_*` in
/// `kernels/sdgen_ops.cu`). `None` where the kernels do not apply (channels not a whole number of
/// 16-byte vectors, more than 256 vectors per pixel, an unaligned view): the caller transposes.
pub(crate) fn group_norm_nhwc(
    norm: &GroupNorm,
    x: &Tensor,
    add: Option<&Tensor>,
    silu: bool,
) -> Result<Option<Tensor>> {
    const THREADS: usize = 256;
    let device = cuda_device(x)?;
    let dtype = x.dtype();
    let sfx = suffix(dtype)?;
    let dims = x.dims().to_vec();
    let (b, c, groups) = (dims[0], dims[dims.len() - 1], norm.groups);
    let hw: usize = dims[1..dims.len() - 1].iter().product();
    let n = 16 / dtype.size_in_bytes();
    let x = prepared(x, dtype)?;
    if !c.is_multiple_of(n)
        || c / n > THREADS
        || hw > i32::MAX as usize
        || b > 65_535
        || x.layout().start_offset() % n != 0
    {
        return Ok(None);
    }
    let (add, weight, bias) = norm_operands(norm, add, dtype)?;
    let stream = device.cuda_stream();
    // Enough blocks to fill the GPU, each reading at least 64 pixel rows.
    let splits = 1024usize.div_ceil(b).clamp(1, 1024).min(hw.div_ceil(64).max(1));
    let partial: CudaSlice<f32> = unsafe { device.alloc::<f32>(b * splits * c * 3)? };
    let stats: CudaSlice<f32> = unsafe { device.alloc::<f32>(b * groups * 2)? };
    let out = alloc(&device, dtype, x.elem_count())?;

    let [xp, ap, wp, bp] = norm_pointers(&stream, &x, add.as_ref(), &weight, &bias)?;
    let (pp, _) = partial.device_ptr(&stream);
    let (sp, _) = stats.device_ptr(&stream);
    let yp = storage_ptr(&out, &stream, 0)?;
    let (ci, hwi, cpgi, gi, si) = (c as i32, hw as i32, (c / groups) as i32, groups as i32, splits as i32);

    let f = function(&device, &format!("gnl_stats_{sfx}"))?;
    let smem = (THREADS * n * 3 * 4) as u32;
    let cfg = LaunchConfig {
        grid_dim: (splits as u32, b as u32, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: smem,
    };
    let mut l = stream.launch_builder(&f);
    l.arg(&xp).arg(&ap).arg(&ci).arg(&hwi).arg(&si).arg(&pp);
    unsafe { l.launch(cfg) }.map_err(wrap)?;

    let f = function(&device, "gnl_finalize")?;
    let cfg = LaunchConfig { grid_dim: ((b * groups) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    let epsf = norm.eps as f32;
    let mut l = stream.launch_builder(&f);
    l.arg(&pp).arg(&ci).arg(&cpgi).arg(&gi).arg(&si).arg(&epsf).arg(&sp);
    unsafe { l.launch(cfg) }.map_err(wrap)?;

    let f = function(&device, &format!("gnl_apply_{sfx}"))?;
    let vectors = hw * (c / n);
    let cfg = LaunchConfig {
        grid_dim: (vectors.div_ceil(THREADS).min(4096) as u32, b as u32, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (hwl, siluf) = (hw as i64, silu as i32);
    let mut l = stream.launch_builder(&f);
    l.arg(&xp).arg(&ap).arg(&wp).arg(&bp).arg(&yp).arg(&ci).arg(&hwl).arg(&cpgi).arg(&gi).arg(&sp).arg(&siluf);
    unsafe { l.launch(cfg) }.map_err(wrap)?;
    drop((partial, stats));
    Ok(Some(into_tensor(out, &dims)))
}

/// GEGLU of `x: [.., 2·inner]` (see [`super::geglu`]).
pub(crate) fn geglu(x: &Tensor) -> Result<Tensor> {
    let device = cuda_device(x)?;
    let dtype = x.dtype();
    let x = x.contiguous()?;
    let mut dims = x.dims().to_vec();
    let last = dims.pop().unwrap_or(0);
    if last % 2 != 0 {
        bail!("GEGLU of an odd last dimension {last}");
    }
    let inner = last / 2;
    dims.push(inner);
    let n = x.elem_count() / 2;
    let out = alloc(&device, dtype, n)?;
    let stream = device.cuda_stream();
    let xi = Input::new(&x)?;
    let xp = xi.ptr(&stream, 0)?;
    let yp = storage_ptr(&out, &stream, 0)?;
    let f = function(&device, &format!("geglu_{}", suffix(dtype)?))?;
    let (inner_i, n_i) = (inner as i32, n as i64);
    let mut l = stream.launch_builder(&f);
    l.arg(&xp).arg(&yp).arg(&inner_i).arg(&n_i);
    unsafe { l.launch(launch_1d(n, 256, 1 << 20)) }.map_err(wrap)?;
    Ok(into_tensor(out, &dims))
}

/// A one-byte tensor's buffer (`U8`, or fp8's `F8E4M3`): the device address of its first
/// element.
fn one_byte_buffer(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else { bail!("not a CUDA tensor") };
    fn at<T: CudaDType + DeviceRepr>(s: &CudaStorage, stream: &CudaStream) -> Result<u64> {
        Ok(s.as_cuda_slice::<T>()?.device_ptr(stream).0)
    }
    let ptr = match s.dtype() {
        DType::U8 => at::<u8>(s, stream)?,
        DType::F8E4M3 => at::<float8::F8E4M3>(s, stream)?,
        d => bail!("{d:?} is not a one-byte dtype"),
    };
    Ok(ptr + layout.start_offset() as u64)
}

/// Copies the bytes of `t` (a one-byte tensor on `device`, perhaps a streamed upload the copy
/// stream owns) to `dst` on the device's stream, then hands `t` to its block's release
/// (`stream::copy::release_with_block`), which orders its free after this copy.
///
/// Safety: `dst` must hold `t.elem_count()` bytes that nothing reads before this copy in stream
/// order.
unsafe fn copy_out_of_upload(t: &Tensor, dst: u64, device: &CudaDevice) -> Result<()> {
    let t = t.contiguous()?;
    let stream = device.cuda_stream();
    let src = one_byte_buffer(&t, &stream)?;
    unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, t.elem_count(), stream.cu_stream()) }.map_err(wrap)?;
    crate::stream::copy::release_with_block(t)
}

/// The bytes of a one-byte tensor (fp8 weights) as a `U8` tensor of its shape, by a device copy:
/// candle 0.11.1 cannot cast `F8E4M3` on CUDA (it asks for `cast_f8e4m3_*`, its kernels are named
/// `cast_f8_e4m3_*`), so fp8 weights are looked up by byte instead (`ops::fp8`).
pub(crate) fn bytes_as_u8(t: &Tensor) -> Result<Tensor> {
    let device = cuda_device(t)?;
    let stream = device.cuda_stream();
    let mut dst = unsafe { stream.alloc::<u8>(t.elem_count()) }.map_err(wrap)?;
    let (dp, _) = dst.device_ptr_mut(&stream);
    // Safety: `dst` is new, of the tensor's size, and first read after this copy in stream order.
    unsafe { copy_out_of_upload(t, dp, &device)? };
    Ok(into_tensor(CudaStorage::wrap_cuda_slice(dst, device.clone()), t.dims()))
}

/// A `QTensor` `[rows, cols]` of `dtype` from its raw blocks already on the device (`raw`, `U8`),
/// by a device copy into candle's (zero-padded) block storage, in stream order.
pub(crate) fn qtensor_from_device(
    raw: &Tensor,
    dtype: candle_core::quantized::GgmlDType,
    (rows, cols): (usize, usize),
    device: &CudaDevice,
) -> Result<candle_core::quantized::QTensor> {
    use candle_core::quantized::{cuda::QCudaStorage, QStorage, QTensor};
    let blocks = QCudaStorage::zeros(device, rows * cols, dtype)?;
    if blocks.storage_size_in_bytes() != raw.elem_count() {
        bail!("{} bytes are not a [{rows}, {cols}] matrix of {dtype:?} blocks", raw.elem_count())
    }
    // Safety: `blocks` holds the raw bytes (checked above) and nothing reads it before this copy,
    // enqueued on the stream every later use runs on.
    unsafe { copy_out_of_upload(raw, blocks.device_ptr()? as u64, device)? };
    QTensor::new(QStorage::Cuda(blocks), (rows, cols))
}

/// [`super::gelu_in_place`]: candle's `ugelu_*` kernel with no input, which its kernels read as
/// "in place" (`x = inp ? inp[i] : out[i]`), so the numbers are `gelu`'s to the bit.
pub(crate) fn gelu_in_place(x: Tensor) -> Result<Tensor> {
    let device = cuda_device(&x)?;
    let name = format!("ugelu_{}", x.dtype().as_str());
    let f = device.get_or_load_func(&name, &candle_core::cuda_backend::kernels::UNARY)?;
    let stream = device.cuda_stream();
    let n = x.elem_count();
    let out = Input::new(&x)?.ptr(&stream, 0)?;
    let (numel, dims, info, inp) = (n, 0usize, 0u64, 0u64);
    let mut l = f.builder();
    l.arg(&numel).arg(&dims).arg(&info).arg(&inp).arg(&out);
    // Safety: `x` is contiguous and solely ours (the caller's contract); every element is read
    // and written by the same thread.
    unsafe { l.launch(launch_1d(n, 256, 1 << 20)) }.map_err(wrap)?;
    Ok(x)
}

/// `(cudaDataType, element bytes)` of a dtype for cuBLAS.
fn cublas_type(dtype: DType) -> Result<(cublas_sys::cudaDataType, usize)> {
    Ok(match dtype {
        DType::F32 => (cublas_sys::cudaDataType::CUDA_R_32F, 4),
        DType::F16 => (cublas_sys::cudaDataType::CUDA_R_16F, 2),
        DType::BF16 => (cublas_sys::cudaDataType::CUDA_R_16BF, 2),
        d => bail!("no cuBLAS attention for {d:?}"),
    })
}

/// A row-major matrix operand for [`gemm`]: base address, row stride and batch (head) stride, in
/// elements.
#[derive(Clone, Copy)]
struct Operand {
    ptr: u64,
    ld: usize,
    batch_stride: usize,
}

/// `C[h] = alpha · A[h] · op(B[h])` for `h` in `0..batch`, all row-major: `A: [m, k]`, `B: [k, n]`
/// (or `[n, k]` when `b_transposed`), `C: [m, n]`. (cuBLAS is column-major: it computes the
/// transposed product `Cᵀ = op(B)ᵀ · Aᵀ` on the same memory.)
#[allow(clippy::too_many_arguments)]
fn gemm(
    device: &CudaDevice,
    dtype: DType,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    b_transposed: bool,
    c: Operand,
    batch: usize,
    alpha: f32,
) -> Result<()> {
    let (ty, _) = cublas_type(dtype)?;
    let blas = device.cublas_handle();
    let beta = 0f32;
    let trans_b = if b_transposed {
        cublas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        cublas_sys::cublasOperation_t::CUBLAS_OP_N
    };
    let int = |v: usize| -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("GEMM size {v} too large")))
    };
    // SAFETY: the operands are live device buffers on the handle's stream, sized by the caller for
    // these shapes and strides.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *blas.handle(),
            trans_b,
            cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            int(n)?,
            int(m)?,
            int(k)?,
            (&alpha) as *const f32 as *const _,
            b.ptr as *const _,
            ty,
            int(b.ld)?,
            b.batch_stride as i64,
            a.ptr as *const _,
            ty,
            int(a.ld)?,
            a.batch_stride as i64,
            (&beta) as *const f32 as *const _,
            c.ptr as *mut _,
            ty,
            int(c.ld)?,
            c.batch_stride as i64,
            int(batch)?,
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(wrap)
}

/// `softmax(q·kᵀ·scale)·v` for `q: [b, heads, q_len, d]`, `k`, `v: [b, heads, kv_len, d]` in any
/// layout whose last axis is contiguous (the heads' transposed views of `[b, seq, heads·d]` need no
/// copy), `rows` query rows of one batch entry at a time. The scores are held in the input's dtype
/// (scaled in the GEMM, in f32, before rounding), the softmax runs in f32 in place. Returns
/// `[b, heads, q_len, d]` as a view of a `[b, q_len, heads, d]` buffer, which `merge_heads` turns
/// into `[b, q_len, heads·d]` without a copy.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, rows: usize) -> Result<Tensor> {
    let device = cuda_device(q)?;
    let dtype = q.dtype();
    let (b, heads, q_len, d) = q.dims4()?;
    let kv_len = k.dim(2)?;
    let ready = |t: &Tensor| -> Result<Tensor> {
        let t = if t.dtype() == dtype { t.clone() } else { t.to_dtype(dtype)? };
        if t.stride()[3] == 1 {
            Ok(t)
        } else {
            t.contiguous()
        }
    };
    let (q, k, v) = (ready(q)?, ready(k)?, ready(v)?);
    let (_, esize) = cublas_type(dtype)?;
    let stream = device.cuda_stream();
    let out = alloc(&device, dtype, b * q_len * heads * d)?;
    let op = storage_ptr(&out, &stream, 0)?;
    // Equal chunks, so each chunk's freed scores fit the next.
    let rows = rows.clamp(1, q_len.max(1));
    let rows = q_len.div_ceil(q_len.div_ceil(rows).max(1)).max(1);
    let scores = alloc(&device, dtype, heads * rows * kv_len)?;
    let sp = storage_ptr(&scores, &stream, 0)?;
    let softmax = function(&device, &format!("softmax_rows_{}", suffix(dtype)?))?;
    let threads = (kv_len.div_ceil(4)).next_power_of_two().clamp(32, 256) as u32;
    let (qi, ki, vi) = (Input::new(&q)?, Input::new(&k)?, Input::new(&v)?);
    let (qs, ks, vs) = (q.stride().to_vec(), k.stride().to_vec(), v.stride().to_vec());
    let bytes = |p: u64, elems: usize| p + (elems * esize) as u64;
    for bi in 0..b {
        let (qb, kb, vb) = (qi.ptr(&stream, bi * qs[0])?, ki.ptr(&stream, bi * ks[0])?, vi.ptr(&stream, bi * vs[0])?);
        for start in (0..q_len).step_by(rows) {
            let len = rows.min(q_len - start);
            let qa = Operand { ptr: bytes(qb, start * qs[2]), ld: qs[2], batch_stride: qs[1] };
            let ka = Operand { ptr: kb, ld: ks[2], batch_stride: ks[1] };
            let sa = Operand { ptr: sp, ld: kv_len, batch_stride: rows * kv_len };
            // scores[h] = scale · q[h] · k[h]ᵀ: [len, kv_len]
            gemm(&device, dtype, (len, kv_len, d), qa, ka, true, sa, heads, scale as f32)?;
            let cfg = LaunchConfig {
                grid_dim: ((heads * len) as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            if len < rows {
                // The last, shorter chunk: its heads' rows are `rows · kv_len` apart; softmax each
                // head's rows separately.
                for h in 0..heads {
                    let hp = bytes(sp, h * rows * kv_len);
                    let kv = kv_len as i32;
                    let mut l = stream.launch_builder(&softmax);
                    l.arg(&hp).arg(&kv);
                    let one = LaunchConfig { grid_dim: (len as u32, 1, 1), ..cfg };
                    unsafe { l.launch(one) }.map_err(wrap)?;
                }
            } else {
                let kv = kv_len as i32;
                let mut l = stream.launch_builder(&softmax);
                l.arg(&sp).arg(&kv);
                unsafe { l.launch(cfg) }.map_err(wrap)?;
            }
            // out[bi, start.., h, :] = probs[h] · v[h]: [len, d], rows heads·d apart.
            let pa = Operand { ptr: sp, ld: kv_len, batch_stride: rows * kv_len };
            let va = Operand { ptr: vb, ld: vs[2], batch_stride: vs[1] };
            let oa = Operand { ptr: bytes(op, (bi * q_len + start) * heads * d), ld: heads * d, batch_stride: d };
            gemm(&device, dtype, (len, d, kv_len), pa, va, false, oa, heads, 1.0)?;
        }
    }
    drop(scores);
    into_tensor(out, &[b, q_len, heads, d]).transpose(1, 2)
}

/// `y = x·Wᵀ + b` for half-precision `x: [.., k]`, `W: [n, k]`, `b: [n]` through cuBLASLt with the
/// bias in the GEMM's epilogue: one kernel, the bias added in f32 before the one rounding (as
/// PyTorch's `addmm` does), instead of candle's matmul then a separate add over the output.
/// `None` where an operand is not 16-byte aligned (cuBLASLt's kernels assume it): the caller takes
/// candle's path.
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
    // One handle (and workspace) per device per thread: candle gives each thread its own stream,
    // and two streams must not share a workspace.
    thread_local! {
        static HANDLES: std::cell::RefCell<HashMap<DeviceId, Arc<CudaBlasLT>>> = Default::default();
    }
    let device = cuda_device(x)?;
    let dtype = x.dtype();
    let x = x.contiguous()?;
    let weight = prepared(weight, dtype)?;
    let bias = bias.map(|b| prepared(b, dtype)).transpose()?;
    let (n, k) = weight.dims2()?;
    let mut dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        bail!("linear layer for {k} inputs given {:?}", x.dims());
    }
    let m = x.elem_count() / k.max(1);
    *dims.last_mut().expect("checked above") = n;
    let elems_16 = 16 / dtype.size_in_bytes();
    let aligned = [Some(&x), Some(&weight), bias.as_ref()]
        .into_iter()
        .flatten()
        .all(|t| t.layout().start_offset() % elems_16 == 0);
    if !aligned || k % elems_16 != 0 || n % elems_16 != 0 {
        return Ok(None);
    }
    let blas = HANDLES.with(|handles| -> Result<Arc<CudaBlasLT>> {
        let mut handles = handles.borrow_mut();
        if let Some(h) = handles.get(&device.id()) {
            return Ok(h.clone());
        }
        let h = Arc::new(CudaBlasLT::new(device.cuda_stream()).map_err(wrap)?);
        handles.insert(device.id(), h.clone());
        Ok(h)
    })?;
    // Column-major view: yᵀ [n × m] = W [n × k] · xᵀ [k × m]; the bias is added along n.
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: k as i64,
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let out = alloc(&device, dtype, m * n)?;
    let (xi, wi) = (Input::new(&x)?, Input::new(&weight)?);
    let bi = bias.as_ref().map(Input::new).transpose()?;
    macro_rules! run {
        ($t:ty) => {{
            let (xv, wv) = (typed_view::<$t>(&xi, m * k)?, typed_view::<$t>(&wi, n * k)?);
            let bv = bi.as_ref().map(|b| typed_view::<$t>(b, n)).transpose()?;
            let mut out = out;
            let slice = out.as_cuda_slice_mut::<$t>()?;
            // SAFETY: the views and the output are sized for these dimensions, on the handle's stream.
            unsafe { blas.matmul(cfg, &wv, &xv, slice, bv.as_ref(), None) }.map_err(wrap)?;
            out
        }};
    }
    let out = match dtype {
        DType::F16 => run!(half::f16),
        DType::BF16 => run!(half::bf16),
        d => bail!("no cuBLASLt linear for {d:?}"),
    };
    Ok(Some(into_tensor(out, &dims)))
}

/// The flash kernel's arguments, laid out as `AttnArgs` in `kernels/sdgen_ops.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct AttnArgs {
    q_len: i32,
    kv_len: i32,
    d: i32,
    heads: i32,
    strides: [i64; 12],
    scale: f32,
}

// SAFETY: plain old data, passed by value as the kernel's struct parameter.
unsafe impl DeviceRepr for AttnArgs {}

/// The largest head dim the flash kernel takes (its tiles live in shared memory).
pub(crate) const FLASH_MAX_HEAD_DIM: usize = 128;

/// Shared memory of one flash block for head dim `d` padded to `padded` (see the kernel).
fn flash_smem_bytes(padded: usize) -> usize {
    3 * 64 * (padded + 8) * 2
}

/// `SDGEN_ATTENTION=cublas` keeps half-precision attention on the cuBLAS path (to compare).
fn flash_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("SDGEN_ATTENTION").map_or(true, |v| v != "cublas"))
}

/// Flash attention for half-precision `q: [b, heads, q_len, d]`, `k`, `v: [b, heads, kv_len, d]`
/// (no mask): no score matrix in device memory at all. `None` where the kernel does not apply
/// (f32, a head dim over [`FLASH_MAX_HEAD_DIM`] or not a multiple of 8, layouts not 16-byte
/// aligned): the caller takes the cuBLAS path.
pub(crate) fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let dtype = q.dtype();
    let (b, heads, q_len, d) = q.dims4()?;
    let kv_len = k.dim(2)?;
    if !flash_allowed()
        || !matches!(dtype, DType::F16 | DType::BF16)
        || k.dtype() != dtype
        || v.dtype() != dtype
        || d > FLASH_MAX_HEAD_DIM
        || d % 8 != 0
        || kv_len == 0
        || q_len == 0
        || b * heads > 65_535
    {
        return Ok(None);
    }
    let aligned = |t: &Tensor| {
        let s = t.stride();
        s[3] == 1 && s[..3].iter().all(|x| x % 8 == 0) && t.layout().start_offset().is_multiple_of(8)
    };
    let usable = |t: &Tensor| if aligned(t) { Ok(t.clone()) } else { t.contiguous() };
    let (q, k, v) = (usable(q)?, usable(k)?, usable(v)?);
    // `contiguous` keeps a contiguous view as it is, offset included.
    if !(aligned(&q) && aligned(&k) && aligned(&v)) {
        return Ok(None);
    }
    let device = cuda_device(&q)?;
    let padded = d.div_ceil(16) * 16;
    let smem = flash_smem_bytes(padded);
    // Cards with less shared memory per block than the tile needs (99 KB on sm_86/89/120 against
    // 105 KB for head dim 128) take the cuBLAS path; decided once per device and kernel.
    let Some(func) = function_with(&device, &format!("flash_attn_{}_{padded}", suffix(dtype)?), |f| {
        use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
        let ctx = device.cuda_stream().context().clone();
        let optin = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN);
        optin.is_ok_and(|o| smem <= o.max(0) as usize)
            && f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .is_ok()
    })?
    else {
        return Ok(None);
    };
    let out = alloc(&device, dtype, b * q_len * heads * d)?;
    let stream = device.cuda_stream();
    let (qi, ki, vi) = (Input::new(&q)?, Input::new(&k)?, Input::new(&v)?);
    let (qp, kp, vp) = (qi.ptr(&stream, 0)?, ki.ptr(&stream, 0)?, vi.ptr(&stream, 0)?);
    let op = storage_ptr(&out, &stream, 0)?;
    let (qs, ks, vs) = (q.stride(), k.stride(), v.stride());
    let o = [q_len * heads * d, d, heads * d];
    let st = |x: usize| x as i64;
    let args = AttnArgs {
        q_len: q_len as i32,
        kv_len: kv_len as i32,
        d: d as i32,
        heads: heads as i32,
        strides: [
            st(qs[0]),
            st(qs[1]),
            st(qs[2]),
            st(ks[0]),
            st(ks[1]),
            st(ks[2]),
            st(vs[0]),
            st(vs[1]),
            st(vs[2]),
            st(o[0]),
            st(o[1]),
            st(o[2]),
        ],
        scale: scale as f32,
    };
    let cfg = LaunchConfig {
        grid_dim: (q_len.div_ceil(64) as u32, (b * heads) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut l = stream.launch_builder(&func);
    l.arg(&qp).arg(&kp).arg(&vp).arg(&op).arg(&args);
    unsafe { l.launch(cfg) }.map_err(wrap)?;
    Ok(Some(into_tensor(out, &[b, q_len, heads, d]).transpose(1, 2)?))
}

/// `(pointer, row stride)` of a `[items, d]` modulation chunk whose rows are contiguous (a
/// `chunk` of the modulation vector), or `None` for another layout.
fn rows_view(t: &Tensor, input: &Input, stream: &CudaStream, d: usize) -> Result<Option<(u64, i64)>> {
    if t.rank() != 2 || t.dim(1)? != d || t.stride()[1] != 1 {
        return Ok(None);
    }
    Ok(Some((input.ptr(stream, 0)?, t.stride()[0] as i64)))
}

/// The widest row [`ln_modulate`] keeps in registers (`LN_MAXV` elements × 256 threads).
const LN_MAX_DIM: usize = 16 * 256;

/// `LN(x) · (1 + scale) + shift` for `x: [b, n, d]`, `shift`, `scale: [b, d]` (see
/// `kernels/sdgen_ops.cu`); `None` where the kernel does not apply.
pub(crate) fn ln_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let (b, n, d) = x.dims3()?;
    let dtype = x.dtype();
    if d > LN_MAX_DIM || b * n > i32::MAX as usize || shift.dtype() != dtype || scale.dtype() != dtype {
        return Ok(None);
    }
    let device = cuda_device(x)?;
    let stream = device.cuda_stream();
    let x = x.contiguous()?;
    let (xi, shi, sci) = (Input::new(&x)?, Input::new(shift)?, Input::new(scale)?);
    let (Some((shp, sh_ld)), Some((scp, sc_ld))) =
        (rows_view(shift, &shi, &stream, d)?, rows_view(scale, &sci, &stream, d)?)
    else {
        return Ok(None);
    };
    if sh_ld != sc_ld {
        return Ok(None);
    }
    let out = alloc(&device, dtype, x.elem_count())?;
    let (xp, yp) = (xi.ptr(&stream, 0)?, storage_ptr(&out, &stream, 0)?);
    let f = function(&device, &format!("ln_modulate_{}", suffix(dtype)?))?;
    let (di, rows, epsf) = (d as i32, n as i32, eps as f32);
    let cfg = LaunchConfig { grid_dim: ((b * n) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut l = stream.launch_builder(&f);
    l.arg(&xp).arg(&shp).arg(&scp).arg(&yp).arg(&di).arg(&rows).arg(&sh_ld).arg(&epsf);
    unsafe { l.launch(cfg) }.map_err(wrap)?;
    Ok(Some(into_tensor(out, &[b, n, d])))
}

/// `x + y · gate` for `x`, `y: [b, n, d]` and `gate: [b, d]` (see `kernels/sdgen_ops.cu`); `None`
/// where the kernel does not apply (unaligned, `d` not a multiple of the vector width).
pub(crate) fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Option<Tensor>> {
    let (b, n, d) = x.dims3()?;
    let dtype = x.dtype();
    let width = 16 / dtype.size_in_bytes();
    if y.dims() != [b, n, d] || y.dtype() != dtype || gate.dtype() != dtype || !d.is_multiple_of(width) {
        return Ok(None);
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    if [&x, &y].iter().any(|t| !t.layout().start_offset().is_multiple_of(width)) {
        return Ok(None);
    }
    let device = cuda_device(&x)?;
    let stream = device.cuda_stream();
    let (xi, yi, gi) = (Input::new(&x)?, Input::new(&y)?, Input::new(gate)?);
    let Some((gp, g_ld)) = rows_view(gate, &gi, &stream, d)? else { return Ok(None) };
    let len = x.elem_count();
    let out = alloc(&device, dtype, len)?;
    let (xp, yp, op) = (xi.ptr(&stream, 0)?, yi.ptr(&stream, 0)?, storage_ptr(&out, &stream, 0)?);
    let f = function(&device, &format!("gated_add_{}", suffix(dtype)?))?;
    let (di, rows, total) = (d as i32, n as i64, len as i64);
    let mut l = stream.launch_builder(&f);
    l.arg(&xp).arg(&yp).arg(&gp).arg(&op).arg(&di).arg(&rows).arg(&g_ld).arg(&total);
    unsafe { l.launch(launch_1d(len / width, 256, 1 << 20)) }.map_err(wrap)?;
    Ok(Some(into_tensor(out, &[b, n, d])))
}

/// One source of [`pack_heads`]: `x: [b, rows, heads · d]` (rows contiguous) and the RMS norm
/// (weight `[d]`, epsilon) its heads get, if any.
pub(crate) struct HeadsSource<'a> {
    pub x: &'a Tensor,
    pub norm: Option<(&'a Tensor, f64)>,
}

/// The sources' heads written one after another along the token axis of one `[b, Σ rows, heads,
/// d]` tensor, each RMS-normalised as its source says (see `kernels/sdgen_ops.cu`); `None` where
/// the kernel does not apply.
pub(crate) fn pack_heads(sources: &[HeadsSource], heads: usize) -> Result<Option<Tensor>> {
    let Some(first) = sources.first() else { return Ok(None) };
    let (b, _, width) = first.x.dims3()?;
    let dtype = first.x.dtype();
    if heads == 0 || !width.is_multiple_of(heads) {
        return Ok(None);
    }
    let d = width / heads;
    let mut rows = Vec::with_capacity(sources.len());
    for s in sources {
        let (sb, r, w) = s.x.dims3()?;
        if sb != b || w != width || s.x.dtype() != dtype || s.x.stride()[2] != 1 {
            return Ok(None);
        }
        if s.norm.is_some_and(|(weight, _)| weight.dims() != [d]) {
            return Ok(None);
        }
        rows.push(r);
    }
    let total: usize = rows.iter().sum();
    if b * total * heads > i32::MAX as usize {
        return Ok(None);
    }
    let device = cuda_device(first.x)?;
    let stream = device.cuda_stream();
    let out = alloc(&device, dtype, b * total * heads * d)?;
    let op = storage_ptr(&out, &stream, 0)?;
    let f = function(&device, &format!("rms_pack_{}", suffix(dtype)?))?;
    let mut row0 = 0usize;
    for (s, &r) in sources.iter().zip(&rows) {
        let xi = Input::new(s.x)?;
        let xp = xi.ptr(&stream, 0)?;
        let weight = s.norm.map(|(w, _)| prepared(w, dtype)).transpose()?;
        let wi = weight.as_ref().map(Input::new).transpose()?;
        let wp = match &wi {
            Some(w) => w.ptr(&stream, 0)?,
            None => 0u64,
        };
        let eps = s.norm.map_or(0.0, |(_, e)| e) as f32;
        let (item_stride, row_stride) = (s.x.stride()[0] as i64, s.x.stride()[1] as i64);
        let (bi, ri, hi, di, ti, r0) = (b as i32, r as i32, heads as i32, d as i32, total as i32, row0 as i32);
        let mut l = stream.launch_builder(&f);
        l.arg(&xp).arg(&item_stride).arg(&row_stride).arg(&wp).arg(&op);
        l.arg(&bi).arg(&ri).arg(&hi).arg(&di).arg(&ti).arg(&r0).arg(&eps);
        // Eight warps (one per head row) a block.
        unsafe { l.launch(launch_1d(b * r * heads * 32, 256, 1 << 20)) }.map_err(wrap)?;
        row0 += r;
    }
    Ok(Some(into_tensor(out, &[b, total, heads, d])))
}
