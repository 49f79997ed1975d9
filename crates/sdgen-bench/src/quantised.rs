//! `--component quantised`: one linear layer at SD 3.5 Medium's shapes (4096 image tokens of
//! 1536 channels: the fused q/k/v 1536 → 4608, the MLP 1536 → 6144, and a 1024-token one) with
//! its weight dense in f32 and bf16, in GGML blocks (Q8_0, Q4_K) multiplied both ways
//! (`sdgen_models::ops::linear::QuantisedPath`: candle's kernels, or dequantised for each
//! product), and in fp8 (E4M3 with a per-tensor scale, dequantised for each product), on the CPU: the time, the weight's bytes in memory and the error against the f32
//! layer of the same (dequantised) weight. What `QUANTISED_PATH` was chosen from.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use sdgen_models::ops::fp8::{self, Fp8Weight};
use sdgen_models::ops::linear::{Linear, QuantisedPath};

use crate::components::relative_l2;

/// Median milliseconds of `iterations` runs after `warmup`.
fn time(warmup: usize, iterations: usize, op: impl Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    let mut times = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let start = Instant::now();
        drop(op()?);
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Runs every variant at every shape.
pub fn run(warmup: usize, iterations: usize) -> anyhow::Result<serde_json::Value> {
    let dev = Device::Cpu;
    let mut results = Vec::new();
    let mut kept_after_first_use = Vec::new();
    for (tokens, k, n) in [(4096, 1536, 4608), (4096, 1536, 6144), (1024, 1536, 1536)] {
        let w = (Tensor::randn(0f32, 1., (n, k), &dev)? * (k as f64).powf(-0.5))?;
        let bias = Tensor::randn(0f32, 1., n, &dev)?;
        let x = Tensor::randn(0f32, 1., (1, tokens, k), &dev)?;
        let shape = format!("{k}→{n} × {tokens} tokens");
        let mut record = |variant: &str, bytes: usize, ms: f64, err: f64| {
            results.push(serde_json::json!({
                "shape": shape, "variant": variant, "weight_bytes": bytes, "median_ms": ms,
                "gflops": 2.0 * (tokens * k * n) as f64 / ms / 1e6, "rel_l2": err,
            }));
        };
        let rss = || sdgen_memory::memory_info().process_rss_bytes as i64;
        let dense = Linear::new(w.clone(), Some(bias.clone()));
        let reference = dense.forward(&x)?;
        record("f32 dense", n * k * 4, time(warmup, iterations, || dense.forward(&x))?, 0.0);
        if sdgen_models::ops::cpu_bf16_supported() {
            let half = Linear::new(w.to_dtype(DType::BF16)?, Some(bias.to_dtype(DType::BF16)?));
            let xb = x.to_dtype(DType::BF16)?;
            let err = relative_l2(&half.forward(&xb)?, &reference)?;
            record("bf16 dense", n * k * 2, time(warmup, iterations, || half.forward(&xb))?, err);
        }
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let q = QTensor::quantize(&w, dtype)?;
            let bytes = q.storage_size_in_bytes();
            // The error of the blocks themselves is the dequantised layer's; the kernels add the
            // activations' 8-bit blocks.
            let exact = Linear::new(q.dequantize(&dev)?, Some(bias.clone())).forward(&x)?;
            // What a first product leaves resident beyond its output (candle's x86 kernels keep a
            // repacked copy of the blocks for the next one).
            let kept = {
                let layer = Linear::quantised(QTensor::quantize(&w, dtype)?, Some(bias.clone()));
                let before = rss();
                drop(layer.forward_via(&x, QuantisedPath::Kernel)?);
                rss() - before
            };
            kept_after_first_use
                .push(serde_json::json!({ "shape": shape, "type": format!("{dtype:?}"), "bytes": kept }));
            let layer = Linear::quantised(q, Some(bias.clone()));
            for (activations, xa) in [("f32", x.clone()), ("bf16", x.to_dtype(DType::BF16)?)] {
                if activations == "bf16" && !sdgen_models::ops::cpu_bf16_supported() {
                    continue;
                }
                for path in [QuantisedPath::Kernel, QuantisedPath::Dequantise] {
                    let out = layer.forward_via(&xa, path)?;
                    let err = relative_l2(&out, &reference)?;
                    let ms = time(warmup, iterations, || layer.forward_via(&xa, path))?;
                    let name = format!("{dtype:?} {path:?}, {activations} activations");
                    record(&name, bytes, ms, err);
                }
            }
            let ms = time(warmup, iterations, || layer.quantised_weight().expect("quantised").dequantize(&dev))?;
            record(
                &format!("{dtype:?} dequantising alone (the error: the blocks')"),
                bytes,
                ms,
                relative_l2(&exact, &reference)?,
            );
        }
        let (bytes, scale) = fp8::quantise(&w)?;
        let weight = Fp8Weight::new(fp8::bytes_tensor(&bytes, &[n, k], &dev)?, scale)?;
        let exact = Linear::new(weight.dequantise(DType::F32)?, Some(bias.clone())).forward(&x)?;
        let layer = Linear::fp8(weight.clone(), Some(bias.clone()));
        for (activations, xa) in [("f32", x.clone()), ("bf16", x.to_dtype(DType::BF16)?)] {
            if activations == "bf16" && !sdgen_models::ops::cpu_bf16_supported() {
                continue;
            }
            let err = relative_l2(&layer.forward(&xa)?, &reference)?;
            record(
                &format!("fp8, {activations} activations"),
                n * k,
                time(warmup, iterations, || layer.forward(&xa))?,
                err,
            );
            let dtype = xa.dtype();
            let ms = time(warmup, iterations, || weight.dequantise(dtype))?;
            record(
                &format!("fp8 dequantising alone to {activations} (the error: the bytes')"),
                n * k,
                ms,
                relative_l2(&exact, &reference)?,
            );
        }
    }
    Ok(serde_json::json!({
        "component": "quantised",
        "results": results,
        "kernel_kept_after_first_use": kept_after_first_use,
    }))
}
