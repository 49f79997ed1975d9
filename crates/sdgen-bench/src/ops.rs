//! `--component ops`: the kernel seam's matrix-heavy operations alone, at SD 1.5's shapes at
//! 512² with the CFG batch (2 rows), on random inputs in the run's dtype and device: each timed
//! as the models call it (`sdgen_models::ops`: conversions and operand layouts included), so the
//! figures compare with `tools/cpu/peer_ops.py` (PyTorch's `F.linear`, `F.conv2d` and
//! `scaled_dot_product_attention` on the same shapes). No model folder is needed.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdgen_models::ops::attention::{attention, split_heads};
use sdgen_models::ops::conv::Conv2d;
use sdgen_models::ops::linear::Linear;

/// One operation at one shape: its name (the peer script prints the same names) and a closure
/// that runs it once.
type Op<'a> = (String, f64, Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>);

/// Times each operation: `warmup` untimed runs, then the median of `iterations`, with the
/// multiply-adds per second it reached.
pub fn run(device: &Device, dtype: DType, warmup: usize, iterations: usize) -> anyhow::Result<serde_json::Value> {
    let randn = |shape: &[usize], std: f32| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, std, shape, device)?.to_dtype(dtype)
    };
    let mut ops: Vec<Op> = Vec::new();
    // The UNet's first level: 2 × 4096 tokens of 320 channels (64×64 latents).
    for (tokens, k, n) in [(8192, 320, 1280), (8192, 320, 320), (8192, 1280, 320), (8192, 320, 2560)] {
        let layer = Linear::new(randn(&[n, k], (k as f32).powf(-0.5))?, Some(randn(&[n], 1.0)?));
        let x = randn(&[2, tokens / 2, k], 1.0)?;
        let name = format!("linear {k}→{n} × {tokens} tokens");
        ops.push((name, (tokens * k * n) as f64, Box::new(move || layer.forward(&x))));
    }
    for (b, c, o, size, k, stride) in [
        (2, 320, 320, 64, 3, 1),
        (2, 640, 640, 32, 3, 1),
        (2, 1280, 1280, 16, 3, 1),
        (1, 512, 512, 64, 3, 1),
        (2, 320, 320, 64, 3, 2),
    ] {
        let padding = k / 2;
        let vb = VarBuilder::from_tensors(
            HashMap::from([
                ("weight".to_string(), randn(&[o, c, k, k], ((c * k * k) as f32).powf(-0.5))?),
                ("bias".to_string(), randn(&[o], 1.0)?),
            ]),
            dtype,
            device,
        );
        let conv = Conv2d::load(c, o, k, padding, stride, false, vb)?;
        let x = randn(&[b, c, size, size], 1.0)?;
        let out = (size + 2 * padding - k) / stride + 1;
        let name = format!("conv {c}→{o} {k}×{k}/{stride} at {size}² × {b}");
        ops.push((name, (b * o * out * out * c * k * k) as f64, Box::new(move || conv.forward(&x))));
    }
    for (b, heads, q_len, kv_len, d) in
        [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (1, 1, 4096, 4096, 512)]
    {
        let q = split_heads(&randn(&[b, q_len, heads * d], 1.0)?, heads)?;
        let k = split_heads(&randn(&[b, kv_len, heads * d], 1.0)?, heads)?;
        let v = split_heads(&randn(&[b, kv_len, heads * d], 1.0)?, heads)?;
        let scale = (d as f64).powf(-0.5);
        let name = format!("attention {b}×{heads} heads × {d}, {q_len}×{kv_len} tokens");
        let macs = (2 * b * heads * q_len * kv_len * d) as f64;
        ops.push((name, macs, Box::new(move || attention(&q, &k, &v, scale, None))));
    }
    let mut results = Vec::new();
    for (name, macs, op) in &ops {
        let mut times = Vec::with_capacity(iterations);
        for i in 0..warmup + iterations {
            device.synchronize()?;
            let start = Instant::now();
            let out = op()?;
            device.synchronize()?;
            drop(out);
            if i >= warmup {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        results.push(serde_json::json!({
            "op": name,
            "median_ms": median,
            "all_ms": times,
            "gflops": 2.0 * macs / median / 1e6,
        }));
    }
    Ok(serde_json::json!({ "component": "ops", "ops": results }))
}
