//! The engine's side of memory management for the device it runs on: a GPU probe for
//! `sdgen-memory` (CUDA: `cuMemGetInfo`, and the stream-ordered memory pool's own reserved-memory
//! high-water mark for exact per-stage peaks) and the cleanup hook that gives the pool's cached memory back
//! (stream synchronise, then `cuMemPoolTrimTo`). On the CPU there is nothing to install: process
//! memory is measured by `sdgen-memory` itself and returned by its `malloc_trim`.

use candle_core::Device;

/// What was installed for a device; dropping it unregisters the probe and the hook.
pub struct DeviceMemory {
    hook: Option<sdgen_memory::CleanupHookId>,
    probe_installed: bool,
}

impl DeviceMemory {
    /// Installs the probe and cleanup hook for `device` (nothing for the CPU). Failing to
    /// install is not an error: the figures are then simply left out of the metadata.
    pub fn install(device: &Device) -> Self {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => match cuda::CudaProbe::new(dev) {
                Ok(probe) => {
                    let probe = std::sync::Arc::new(probe);
                    sdgen_memory::set_gpu_probe(Some(probe.clone()));
                    let hook = sdgen_memory::register_cleanup_hook("cuda pool trim", move || probe.trim());
                    Self { hook: Some(hook), probe_installed: true }
                }
                Err(e) => {
                    eprintln!("⚠️  WARNING: GPU memory cannot be measured ({e}); it is left out of the metadata");
                    Self { hook: None, probe_installed: false }
                }
            },
            _ => Self { hook: None, probe_installed: false },
        }
    }

    /// Whether a GPU probe is active.
    pub fn has_gpu_probe(&self) -> bool {
        self.probe_installed
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        if let Some(id) = self.hook.take() {
            sdgen_memory::unregister_cleanup_hook(id);
        }
        if self.probe_installed {
            sdgen_memory::set_gpu_probe(None);
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext};
    use candle_core::CudaDevice;
    use sdgen_memory::{GpuMemory, GpuProbe};

    /// CUDA memory through the driver API. candle allocates with `cuMemAllocAsync` from the
    /// device's default memory pool, whose `RESERVED_MEM_HIGH` attribute is an exact, resettable peak of what it holds.
    pub struct CudaProbe {
        ctx: Arc<CudaContext>,
        pool: PoolHandle,
        /// Device memory in use outside the pool (context, library workspaces, other processes)
        /// when the peak was last reset: the pool's peak plus this is the device-wide peak.
        outside_pool_bytes: AtomicU64,
    }

    /// The pool handle is an opaque driver pointer, valid for the context's lifetime.
    struct PoolHandle(sys::CUmemoryPool);
    // SAFETY: a CUmemoryPool handle may be used from any thread with the context bound.
    unsafe impl Send for PoolHandle {}
    unsafe impl Sync for PoolHandle {}

    impl CudaProbe {
        pub fn new(dev: &CudaDevice) -> Result<Self, String> {
            let ctx = dev.cuda_stream().context().clone();
            ctx.bind_to_thread().map_err(|e| e.to_string())?;
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            // SAFETY: plain driver calls on a bound context with valid out-pointers.
            unsafe {
                sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result().map_err(|e| e.to_string())?;
                // Keep freed blocks cached between synchronisations (as PyTorch's caching
                // allocator does) instead of unmapping them at every sync; `trim` returns them
                // at stage boundaries, where the memory manager decides.
                let mut threshold: u64 = u64::MAX;
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut _,
                )
                .result()
                .map_err(|e| e.to_string())?;
            }
            let probe = Self { ctx, pool: PoolHandle(pool), outside_pool_bytes: AtomicU64::new(0) };
            probe.reset_peak();
            Ok(probe)
        }

        fn pool_attr(&self, attr: sys::CUmemPool_attribute) -> Option<u64> {
            self.ctx.bind_to_thread().ok()?;
            let mut value: u64 = 0;
            // SAFETY: the attribute is a 64-bit counter; the out-pointer is valid.
            unsafe { sys::cuMemPoolGetAttribute(self.pool.0, attr, &mut value as *mut u64 as *mut _) }.result().ok()?;
            Some(value)
        }

        /// Waits for the work queued on every stream of the context, then returns every cached,
        /// unused pool block to the device. Every stream, not just the main one: block streaming's
        /// copy stream owns the uploaded weights and frees them in its own order, and a free still
        /// queued there when the pool is trimmed would stay reserved (≈ 0.7 GB through SD 3.5's
        /// decode after a streamed denoise).
        pub fn trim(&self) {
            if self.ctx.synchronize().is_ok() {
                // SAFETY: trimming a valid pool to 0 bytes frees only unused reserved memory.
                let _ = unsafe { sys::cuMemPoolTrimTo(self.pool.0, 0) }.result();
            }
        }
    }

    impl GpuProbe for CudaProbe {
        fn memory(&self) -> Option<GpuMemory> {
            let (free, total) = self.ctx.mem_get_info().ok()?;
            Some(GpuMemory { used_bytes: (total - free) as u64, free_bytes: free as u64, total_bytes: total as u64 })
        }

        fn reset_peak(&self) {
            let mut zero: u64 = 0;
            if self.ctx.bind_to_thread().is_err() {
                return;
            }
            // The pool's high-water marks may only be reset to 0. Both are reset; the peak read
            // back is the *reserved* one: memory the pool holds from the device, used or cached
            // (fragmentation within a stage), which is what another allocation can run out of.
            for attr in [
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ] {
                // SAFETY: a valid pool, a valid pointer to a zero 64-bit counter.
                let _ =
                    unsafe { sys::cuMemPoolSetAttribute(self.pool.0, attr, &mut zero as *mut u64 as *mut _) }.result();
            }
            let used = self.memory().map(|m| m.used_bytes).unwrap_or(0);
            let reserved = self.pool_attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT).unwrap_or(0);
            self.outside_pool_bytes.store(used.saturating_sub(reserved), Ordering::Relaxed);
        }

        fn peak_used_bytes(&self) -> Option<u64> {
            let high = self.pool_attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?;
            Some(self.outside_pool_bytes.load(Ordering::Relaxed) + high)
        }

        fn peak_allocated_bytes(&self) -> Option<u64> {
            self.pool_attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
        }
    }
}
