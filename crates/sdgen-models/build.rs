//! With the `cuda` feature, compiles `kernels/sdgen_ops.cu` into a fatbin that `ops::cuda` embeds:
//! machine code for the build's compute capability (`CUDA_COMPUTE_CAP`, as candle's kernels use;
//! 90 = Hopper by default) plus sm_80 PTX, so any Ampere-or-newer card runs it (the driver
//! compiles the PTX once on cards other than the build's). Without the feature nothing is built
//! and no CUDA tool is needed.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/sdgen_ops.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("sdgen_ops.fatbin");
    let nvcc = std::env::var("NVCC").ok().or_else(|| {
        ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .map(|root| format!("{root}/bin/nvcc"))
            .find(|p| std::path::Path::new(p).exists())
    });
    let nvcc = nvcc.unwrap_or_else(|| "nvcc".to_string());
    let cap: u32 =
        std::env::var("CUDA_COMPUTE_CAP").ok().and_then(|c| c.trim().trim_end_matches('a').parse().ok()).unwrap_or(90);
    let status = Command::new(&nvcc)
        .args(["--fatbin", "-O3", "-std=c++17"])
        .arg(format!("-gencode=arch=compute_{cap},code=sm_{cap}"))
        .arg("-gencode=arch=compute_80,code=compute_80")
        .arg("-o")
        .arg(&out)
        .arg("kernels/sdgen_ops.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed ({s}) compiling kernels/sdgen_ops.cu"),
        Err(e) => panic!(
            "the `cuda` feature needs nvcc to compile kernels/sdgen_ops.cu, and `{nvcc}` could not run ({e}): \
             put CUDA's bin folder on PATH, or set NVCC or CUDA_ROOT (see the README's CUDA section)"
        ),
    }
}
