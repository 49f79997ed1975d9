//! `sdgen-bench --export` and `--component transformer --weights-file|--weights` on the tiny SD
//! 3.5 Large (what `tools/gpu/low_memory_quantised.sh` runs at full size): the files written load
//! back through the product's loaders, and the transformer's error against the folder's own
//! forward is reported — for the Q8_0 GGUF exactly `--weights q8`'s (the same blocks), for the
//! fp8-scaled file near `--weights fp8`'s (one scale per fused q/k/v there, per piece here).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

fn tiny_large() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-sd35-large")
}

/// Runs the bench with `args` on the tiny folder: its JSON report, or its error text.
fn bench(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_sdgen-bench"))
        .args(["--family", "sd35-large", "--model-dir"])
        .arg(tiny_large())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

/// Fixed inputs at the tiny MMDiT's widths, as `--inputs` reads them.
fn inputs(dir: &Path) -> PathBuf {
    let ramp = |shape: &[usize], k: f32| {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|i| (i as f32 * 0.37 + k).sin()).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    };
    let tensors = std::collections::HashMap::from([
        ("latents".to_string(), ramp(&[2, 16, 8, 8], 0.0)),
        ("timesteps".to_string(), Tensor::new(&[500f32, 500.], &Device::Cpu).unwrap()),
        ("context".to_string(), ramp(&[2, 7, 64], 1.0)),
        ("pooled".to_string(), ramp(&[2, 40], 2.0)),
    ]);
    let path = dir.join("inputs.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

/// The transformer's relative L2 against the folder's forward, run as `weights`.
fn error_of(weights: &[&str], inputs: &Path) -> f64 {
    let mut args = vec!["--component", "transformer", "--iterations", "1", "--warmup", "0", "--inputs"];
    args.push(inputs.to_str().unwrap());
    args.extend_from_slice(weights);
    let report = bench(&args).unwrap_or_else(|e| panic!("{weights:?}: {e}"));
    report["result"]["against_unquantised"]["relative_l2"].as_f64().unwrap_or_else(|| panic!("{report}"))
}

#[test]
fn written_files_run_and_report_their_error_against_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (gguf, fp8) = (tmp.path().join("q8/tiny.gguf"), tmp.path().join("fp8/tiny_fp8_scaled.safetensors"));
    for (format, path, quantised) in [("q8_0", &gguf, "Q8_0"), ("fp8-scaled", &fp8, "F8_E4M3")] {
        let report = bench(&["--export", format, "--export-to", path.to_str().unwrap()]).unwrap();
        assert_eq!(report["exported"]["types"][quantised], 27, "{report}");
        assert_eq!(report["exported"]["file_bytes"], std::fs::metadata(path).unwrap().len(), "{report}");
    }
    let inputs = inputs(tmp.path());
    let q8_file = error_of(&["--weights-file", gguf.to_str().unwrap()], &inputs);
    let q8 = error_of(&["--weights", "q8"], &inputs);
    assert_eq!(q8_file, q8, "the Q8_0 GGUF holds --weights q8's blocks");
    assert!(q8 > 0.0 && q8 < 1e-2, "Q8_0 is near-lossless: {q8:e}");
    let fp8_file = error_of(&["--weights-file", fp8.to_str().unwrap()], &inputs);
    let fp8_load = error_of(&["--weights", "fp8"], &inputs);
    assert!(fp8_file > q8 && fp8_file < 5e-2, "fp8-scaled: {fp8_file:e} (Q8_0 {q8:e})");
    assert!((fp8_file / fp8_load - 1.0).abs() < 0.5, "fp8 file {fp8_file:e} vs --weights fp8 {fp8_load:e}");
}

#[test]
fn what_the_modes_cannot_do_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let e = bench(&["--export", "q4_k", "--export-to", tmp.path().join("x").to_str().unwrap()]).unwrap_err();
    assert!(e.contains("`q4_k` is not an export format"), "{e}");
    let e = bench(&["--export", "q8_0"]).unwrap_err();
    assert!(e.contains("--export-to"), "{e}");
    let e = bench(&["--component", "vae", "--weights", "q8"]).unwrap_err();
    assert!(e.contains("--component transformer"), "{e}");
    let e = bench(&["--component", "transformer", "--weights", "q5"]).unwrap_err();
    assert!(e.contains("`q5` is not a weight format"), "{e}");
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "nothing written");
}
