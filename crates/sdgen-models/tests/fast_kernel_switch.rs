//! The process-wide fast-kernel switch, in a test binary of its own: flipping it inside the
//! library's unit tests would change which path their concurrent tests take.

use sdgen_models::candle::Device;
use sdgen_models::ops::{fast_cpu, fast_cuda, fast_kernels_enabled, kernel_summary, set_fast_kernels};

#[test]
fn the_switch_turns_fast_paths_off_and_on() {
    let cpu = Device::Cpu;
    assert!(!fast_cuda(&cpu), "the CPU runs no CUDA kernels");
    // Unless the environment says otherwise, the CPU's fast paths are on by default.
    if std::env::var_os(sdgen_models::ops::NO_FAST_KERNELS_ENV).is_none() {
        assert!(fast_cpu(&cpu));
    }
    set_fast_kernels(false);
    assert!(!fast_kernels_enabled() && !fast_cpu(&cpu));
    assert_eq!(kernel_summary(&cpu), "stock (fast kernels turned off)");
    set_fast_kernels(true);
    assert!(fast_kernels_enabled() && fast_cpu(&cpu));
    assert_eq!(kernel_summary(&cpu), "fast (CPU: direct and banded convolutions, fused GroupNorm, blocked attention)");
}
