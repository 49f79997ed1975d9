//! The device a process generates on, from its name: `cpu`, `cuda`, `cuda:N` or `metal` (the
//! CLI's and the server's `--device`), and whether it computes in a dtype (`--dtype`).

use candle_core::{DType, Device};

use crate::{Error, Result};

const CHOICES: &str = "is not one of cpu, cuda, cuda:N, metal";

/// Opens the device `name` says: the device and its label for the metadata (`cuda:0`). Errors
/// are about the request field `device`.
pub fn open_device(name: &str) -> Result<(Device, String)> {
    let value = name.trim().to_ascii_lowercase();
    let invalid = |message: String| Error::invalid("device", message);
    if value == "cpu" {
        return Ok((Device::Cpu, "cpu".into()));
    }
    if let Some(rest) = value.strip_prefix("cuda") {
        let ordinal = match rest.strip_prefix(':') {
            Some(n) => n.parse::<usize>().map_err(|_| invalid(format!("{value}: `{n}` is not a GPU number")))?,
            None if rest.is_empty() => 0,
            None => return Err(invalid(format!("{value} {CHOICES}"))),
        };
        if !candle_core::utils::cuda_is_available() {
            // How to build, not a request field: the text stays as it is for every caller.
            return Err(invalid(format!(
                "{value}: this build has no CUDA support; rebuild with `cargo build --release --features cuda`"
            )));
        }
        let device = Device::new_cuda(ordinal)
            .map_err(|e| invalid(format!("{value}: cannot open CUDA device {ordinal} ({e})")))?;
        return Ok((device, format!("cuda:{ordinal}")));
    }
    if value == "metal" {
        if !candle_core::utils::metal_is_available() {
            // How to build, not a request field.
            return Err(invalid(format!(
                "{value}: this build has no Metal support (macOS builds with --features metal)"
            )));
        }
        let device = Device::new_metal(0).map_err(|e| invalid(format!("{value}: cannot open it ({e})")))?;
        return Ok((device, "metal".into()));
    }
    Err(invalid(format!("{value} {CHOICES}")))
}

/// Checks that `device` runs `dtype` at that dtype's speed: bf16 on the CPU needs a processor
/// that multiplies bf16 itself (AVX512-BF16; without it every product would run in f32, slower
/// than f32 itself). Errors are about the request field `dtype`.
pub fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    if device.is_cpu() && dtype == DType::BF16 && !sdgen_models::ops::cpu_bf16_supported() {
        return Err(Error::invalid(
            "dtype",
            format!(
                "bf16 on the CPU needs a processor with AVX512-BF16 (the `{}` flag in /proc/cpuinfo), which this \
                 one lacks: use f32, the CPU's default",
                sdgen_models::ops::CPU_BF16_FEATURE
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_and_bad_ones_refused_about_the_field() {
        assert!(matches!(open_device(" CPU ").unwrap(), (Device::Cpu, label) if label == "cpu"));
        for bad in ["gpu", "cuda:x", "cudax"] {
            let err = open_device(bad).unwrap_err();
            assert_eq!(err.field(), Some("device"), "{bad}: {err}");
        }
    }

    #[test]
    fn bf16_on_the_cpu_is_refused_only_without_avx512_bf16() {
        assert!(check_dtype(&Device::Cpu, DType::F32).is_ok());
        match check_dtype(&Device::Cpu, DType::BF16) {
            Ok(()) => assert!(sdgen_models::ops::cpu_bf16_supported()),
            Err(err) => {
                assert!(!sdgen_models::ops::cpu_bf16_supported());
                assert_eq!(err.field(), Some("dtype"));
                assert!(err.to_string().contains("avx512_bf16"), "{err}");
            }
        }
    }
}
