//! Convolutions through cuDNN, as PyTorch runs them for diffusers: NCHW tensors (or channels-last
//! NHWC ones, whose tensor-core kernels need no transposed copies in their workspace), f32 compute
//! for half-precision data with tensor-op math (f32 data keeps FMA math, no TF32, so f32 runs stay
//! as exact as the CPU reference), the bias added by `cudnnAddTensor`.
//!
//! Unlike candle's `cudnn` feature (which re-runs the algorithm heuristic, re-creates every
//! descriptor and zero-fills a fresh workspace on every call), each distinct shape gets its
//! descriptors and algorithm once per device and thread: by cuDNN's heuristic by default
//! (deterministic, as PyTorch's default `cudnn.benchmark = False` is, so a seed gives the same
//! image run after run), or by timing every algorithm (`cudnnFind…`) with `SDGEN_CUDNN_FIND=1`.
//! An algorithm's workspace is capped per shape ([`workspace_cap`]); the workspace comes from the
//! stream-ordered pool for the call. `SDGEN_CUDNN_LOG=1` prints each shape's choice.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use candle_core::cuda_backend::DeviceId;
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Result, Storage, Tensor};
use cudarc::cudnn::sys;
use cudarc::driver::{CudaSlice, DevicePtr};

/// Workspace every convolution may use, whatever its size.
pub const MIN_WORKSPACE_CAP: usize = 256 << 20;

/// `SDGEN_CUDNN_WORKSPACE_MB=N`: cap every convolution's workspace at N MiB instead.
pub const WORKSPACE_ENV: &str = "SDGEN_CUDNN_WORKSPACE_MB";

/// `SDGEN_CUDNN_FIND=1`: choose each shape's algorithm by timing them all.
pub const FIND_ENV: &str = "SDGEN_CUDNN_FIND";

/// The most workspace a convolution of this shape may use: its input, weight and output together
/// plus 16 MiB (at least [`MIN_WORKSPACE_CAP`]). cuDNN's tensor-core kernels for NCHW data work
/// on NHWC copies of all three (measured: 132 MiB for a 512-channel 3×3 at 256², whose tensors
/// are 132.5 MiB), so a fixed cap shuts the largest convolutions (the VAE's at full resolution)
/// out of them; capped by the shape's own tensors, the transient at most doubles what is live.
pub fn workspace_cap(dtype: DType, x: [usize; 4], w: [usize; 4], out: [usize; 4]) -> usize {
    if let Some(mb) = std::env::var(WORKSPACE_ENV).ok().and_then(|v| v.trim().parse::<usize>().ok()) {
        return mb << 20;
    }
    let elements: usize = [x, w, out].iter().map(|d| d.iter().product::<usize>()).sum();
    (elements * dtype.size_in_bytes() + (16 << 20)).max(MIN_WORKSPACE_CAP)
}

fn check(status: sys::cudnnStatus_t, what: &str) -> Result<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        bail!("cuDNN {what}: {status:?}")
    }
}

/// Everything cuDNN needs for one convolution shape, created once.
struct Plan {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    bias: sys::cudnnTensorDescriptor_t,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace_bytes: usize,
    /// The most workspace the algorithm may need ([`workspace_cap`]).
    cap: usize,
    /// Half-precision data (tensor-core algorithms preferred).
    half: bool,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by `Plan::new` and is used by no one else.
        unsafe {
            sys::cudnnDestroyTensorDescriptor(self.x);
            sys::cudnnDestroyFilterDescriptor(self.w);
            sys::cudnnDestroyConvolutionDescriptor(self.conv);
            sys::cudnnDestroyTensorDescriptor(self.y);
            sys::cudnnDestroyTensorDescriptor(self.bias);
        }
    }
}

/// (dtype, x `[n, c, h, w]`, weight `[k, c, r, s]`, padding, stride, channels last): the
/// dimensions are the logical ones whatever the memory order.
type Key = (DType, [usize; 4], [usize; 4], usize, usize, bool);

/// The output `[n, k, h', w']` of a convolution shape.
fn out_dims(&(_, x, w, padding, stride, _): &Key) -> [usize; 4] {
    let out_len = |n: usize, k: usize| (n + 2 * padding).saturating_sub(k) / stride + 1;
    [x[0], w[0], out_len(x[2], w[2]), out_len(x[3], w[3])]
}

struct DeviceState {
    handle: sys::cudnnHandle_t,
    plans: HashMap<Key, Plan>,
}

impl Drop for DeviceState {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle was created for this state and its plans are gone.
        unsafe { sys::cudnnDestroy(self.handle) };
    }
}

// cuDNN handles may not be shared between threads: one per device per thread.
thread_local! {
    static STATES: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
}

fn data_type(dtype: DType) -> Result<sys::cudnnDataType_t> {
    Ok(match dtype {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        d => bail!("no cuDNN convolution for {d:?}"),
    })
}

fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("convolution size {v} too large for cuDNN")))
}

/// A descriptor of the logical `[n, c, h, w]` tensor, stored NCHW or (`channels_last`) NHWC.
fn tensor_desc(
    dt: sys::cudnnDataType_t,
    dims: [usize; 4],
    channels_last: bool,
) -> Result<sys::cudnnTensorDescriptor_t> {
    let mut d = std::ptr::null_mut();
    let [n, c, h, w] = dims;
    // SAFETY: plain descriptor creation and setting, checked.
    unsafe {
        check(sys::cudnnCreateTensorDescriptor(&mut d), "create tensor descriptor")?;
        let strides = if channels_last { [h * w * c, 1, w * c, c] } else { [c * h * w, h * w, w, 1] };
        check(
            sys::cudnnSetTensor4dDescriptorEx(
                d,
                dt,
                int(n)?,
                int(c)?,
                int(h)?,
                int(w)?,
                int(strides[0])?,
                int(strides[1])?,
                int(strides[2])?,
                int(strides[3])?,
            ),
            "set tensor descriptor",
        )?;
    }
    Ok(d)
}

impl Plan {
    fn new(handle: sys::cudnnHandle_t, key: &Key, ptrs: Option<(u64, u64, u64, u64)>) -> Result<Self> {
        let (dtype, x, w, padding, stride, channels_last) = *key;
        let dt = data_type(dtype)?;
        let out = out_dims(key);
        let xd = tensor_desc(dt, x, channels_last)?;
        let yd = tensor_desc(dt, out, channels_last)?;
        let bd = tensor_desc(dt, [1, w[0], 1, 1], false)?;
        let filter_format = if channels_last {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        };
        let mut wd = std::ptr::null_mut();
        let mut cd = std::ptr::null_mut();
        // SAFETY: descriptor creation and setting, checked; the plan owns them from here (Drop).
        let mut plan = unsafe {
            check(sys::cudnnCreateFilterDescriptor(&mut wd), "create filter descriptor")?;
            check(
                sys::cudnnSetFilter4dDescriptor(wd, dt, filter_format, int(w[0])?, int(w[1])?, int(w[2])?, int(w[3])?),
                "set filter descriptor",
            )?;
            check(sys::cudnnCreateConvolutionDescriptor(&mut cd), "create convolution descriptor")?;
            let (p, s) = (int(padding)?, int(stride)?);
            check(
                sys::cudnnSetConvolution2dDescriptor(
                    cd,
                    p,
                    p,
                    s,
                    s,
                    1,
                    1,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
                "set convolution descriptor",
            )?;
            let math = if dtype == DType::F32 {
                sys::cudnnMathType_t::CUDNN_FMA_MATH
            } else {
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            };
            check(sys::cudnnSetConvolutionMathType(cd, math), "set math type")?;
            Plan {
                x: xd,
                w: wd,
                conv: cd,
                y: yd,
                bias: bd,
                algo: sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                workspace_bytes: 0,
                cap: workspace_cap(dtype, x, w, out),
                half: dtype != DType::F32,
            }
        };
        let (algo, math) = match ptrs {
            Some(p) => plan.find(handle, p)?,
            None => plan.heuristic(handle)?,
        };
        // The chosen entry may come with another math type than the descriptor's (cuDNN lists
        // both): take it, except that f32 never gets TF32. Then size the workspace for exactly
        // that configuration.
        if dtype != DType::F32 {
            // SAFETY: a valid descriptor owned by the plan.
            unsafe { check(sys::cudnnSetConvolutionMathType(plan.conv, math), "set math type")? };
        }
        let mut bytes = 0usize;
        // SAFETY: valid descriptors; `bytes` is written.
        unsafe {
            check(
                sys::cudnnGetConvolutionForwardWorkspaceSize(
                    handle, plan.x, plan.w, plan.conv, plan.y, algo, &mut bytes,
                ),
                "workspace size",
            )?;
        }
        plan.algo = algo;
        plan.workspace_bytes = bytes;
        if std::env::var("SDGEN_CUDNN_LOG").is_ok_and(|v| v == "1") {
            eprintln!(
                "cudnn {dtype:?} x {x:?} w {w:?} pad {padding} stride {stride}{}: {algo:?} {math:?}, workspace {} MiB of {} MiB",
                if channels_last { " NHWC" } else { "" },
                bytes >> 20,
                plan.cap >> 20
            );
        }
        Ok(plan)
    }

    /// The first algorithm cuDNN's heuristic ranks that runs within the workspace cap.
    fn heuristic(&self, handle: sys::cudnnHandle_t) -> Result<(sys::cudnnConvolutionFwdAlgo_t, sys::cudnnMathType_t)> {
        let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; 16];
        let mut count = 0;
        // SAFETY: the descriptors are valid; `perf` holds 16 results.
        unsafe {
            check(
                sys::cudnnGetConvolutionForwardAlgorithm_v7(
                    handle,
                    self.x,
                    self.w,
                    self.conv,
                    self.y,
                    16,
                    &mut count,
                    perf.as_mut_ptr(),
                ),
                "convolution algorithm heuristic",
            )?;
        }
        self.choose(&perf[..count.max(0) as usize], self.half)
    }

    /// The fastest algorithm within the workspace cap, timed on the call's own buffers.
    fn find(
        &self,
        handle: sys::cudnnHandle_t,
        (x, w, y, ws): (u64, u64, u64, u64),
    ) -> Result<(sys::cudnnConvolutionFwdAlgo_t, sys::cudnnMathType_t)> {
        let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; 16];
        let mut count = 0;
        // SAFETY: the buffers are live and sized for these descriptors; `ws` holds
        // `self.cap` bytes; `perf` holds 16 results.
        unsafe {
            check(
                sys::cudnnFindConvolutionForwardAlgorithmEx(
                    handle,
                    self.x,
                    x as *const c_void,
                    self.w,
                    w as *const c_void,
                    self.conv,
                    self.y,
                    y as *mut c_void,
                    16,
                    &mut count,
                    perf.as_mut_ptr(),
                    ws as *mut c_void,
                    self.cap,
                ),
                "convolution algorithm search",
            )?;
        }
        self.choose(&perf[..count.max(0) as usize], false)
    }

    /// The first usable entry of cuDNN's ranking, except that half-precision data takes the
    /// first tensor-core entry where there is one: the legacy API's heuristic ranks its
    /// non-tensor-core `IMPLICIT_GEMM` first for the largest NCHW shapes (the VAE's 128–512-channel
    /// 3×3 convolutions at 512²–1024²), which then run 5–10× slower than the tensor-core kernels
    /// PyTorch's cuDNN graph API picks for the same shapes. (Timed searches rank for themselves.)
    fn choose(
        &self,
        perf: &[sys::cudnnConvolutionFwdAlgoPerf_t],
        prefer_tensor_cores: bool,
    ) -> Result<(sys::cudnnConvolutionFwdAlgo_t, sys::cudnnMathType_t)> {
        use sys::cudnnMathType_t::{CUDNN_TENSOR_OP_MATH, CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION};
        let usable = |p: &&sys::cudnnConvolutionFwdAlgoPerf_t| {
            p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= self.cap
        };
        let tensor_cores = |p: &&sys::cudnnConvolutionFwdAlgoPerf_t| {
            matches!(p.mathType, CUDNN_TENSOR_OP_MATH | CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION)
        };
        let preferred = if prefer_tensor_cores { perf.iter().filter(usable).find(tensor_cores) } else { None };
        preferred
            .or_else(|| perf.iter().find(usable))
            .map(|p| (p.algo, p.mathType))
            .ok_or_else(|| candle_core::Error::Msg("cuDNN offers no convolution algorithm for this shape".into()))
    }
}

/// `conv2d(x, weight) + bias` with zero `padding` on every side and `stride`, for
/// `x: [n, c, h, w]`, `weight: [k, c, r, s]`, or with `channels_last` for `x: [n, h, w, c]`,
/// `weight: [k, r, s, c]` (the output then `[n, h', w', k]`).
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    channels_last: bool,
) -> Result<Tensor> {
    use super::cuda::{cuda_device, prepared, storage_ptr, Input};
    let device = cuda_device(x)?;
    let stream = device.cuda_stream();
    let dtype = x.dtype();
    let (x, weight) = (x.contiguous()?, prepared(weight, dtype)?);
    let bias = bias.map(|b| prepared(b, dtype)).transpose()?;
    // Logical [n, c, h, w] / [k, c, r, s] whatever the memory order.
    let logical = |d: [usize; 4]| if channels_last { [d[0], d[3], d[1], d[2]] } else { d };
    let xd = logical(x.dims4()?.into());
    let wd = logical(weight.dims4()?.into());
    if xd[1] != wd[1] {
        bail!("convolution of {} input channels with a weight for {}", xd[1], wd[1]);
    }
    let key: Key = (dtype, xd, wd, padding, stride, channels_last);
    let find = std::env::var(FIND_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    let (x_in, w_in) = (Input::new(&x)?, Input::new(&weight)?);
    let b_in = bias.as_ref().map(Input::new).transpose()?;
    let (xp, wp) = (x_in.ptr(&stream, 0)?, w_in.ptr(&stream, 0)?);

    STATES.with(|states| -> Result<Tensor> {
        let mut states = states.borrow_mut();
        let state = match states.entry(device.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut handle = std::ptr::null_mut();
                // cuDNN creates its handle on the thread's current context: make it this device's.
                device.cuda_stream().context().bind_to_thread().map_err(candle_core::Error::wrap)?;
                // SAFETY: handle creation and binding to the device's stream, checked.
                unsafe {
                    check(sys::cudnnCreate(&mut handle), "create handle")?;
                    check(sys::cudnnSetStream(handle, device.cuda_stream().cu_stream() as _), "set stream")?;
                }
                e.insert(DeviceState { handle, plans: HashMap::new() })
            }
        };
        let handle = state.handle;
        let out_dims = out_dims(&key);
        let out = super::cuda::alloc(&device, dtype, out_dims.iter().product())?;
        let yp = storage_ptr(&out, &stream, 0)?;
        if let std::collections::hash_map::Entry::Vacant(slot) = state.plans.entry(key) {
            let plan = if find {
                let cap = workspace_cap(dtype, xd, wd, out_dims);
                let ws: CudaSlice<u8> = unsafe { device.alloc::<u8>(cap)? };
                let (wsp, _) = ws.device_ptr(&stream);
                Plan::new(handle, &key, Some((xp, wp, yp, wsp)))?
            } else {
                Plan::new(handle, &key, None)?
            };
            slot.insert(plan);
        }
        let plan = &state.plans[&key];
        let workspace: Option<CudaSlice<u8>> =
            if plan.workspace_bytes > 0 { Some(unsafe { device.alloc::<u8>(plan.workspace_bytes)? }) } else { None };
        let wsp = match &workspace {
            Some(w) => w.device_ptr(&stream).0,
            None => 0,
        };
        let (one, zero) = (1f32, 0f32);
        // SAFETY: descriptors match the buffers' shapes and dtype; all on the handle's stream.
        unsafe {
            check(
                sys::cudnnConvolutionForward(
                    handle,
                    (&one) as *const f32 as *const c_void,
                    plan.x,
                    xp as *const c_void,
                    plan.w,
                    wp as *const c_void,
                    plan.conv,
                    plan.algo,
                    wsp as *mut c_void,
                    plan.workspace_bytes,
                    (&zero) as *const f32 as *const c_void,
                    plan.y,
                    yp as *mut c_void,
                ),
                "convolution",
            )?;
            if let Some(b_in) = &b_in {
                let bp = b_in.ptr(&stream, 0)?;
                check(
                    sys::cudnnAddTensor(
                        handle,
                        (&one) as *const f32 as *const c_void,
                        plan.bias,
                        bp as *const c_void,
                        (&one) as *const f32 as *const c_void,
                        plan.y,
                        yp as *mut c_void,
                    ),
                    "bias add",
                )?;
            }
        }
        drop(workspace);
        let [n, k, h, w] = out_dims;
        let shape = if channels_last { vec![n, h, w, k] } else { out_dims.to_vec() };
        Ok(Tensor::from_storage(Storage::Cuda(out), shape, BackpropOp::none(), false))
    })
}
