//! Measures the activation peaks of the real-size SD 1.5 models on the CPU, for fitting the memory
//! planner's CPU coefficients (`sdgen_memory::plan`). Random weights (the architecture's shapes,
//! values do not change memory), f32, full size: ~25 minutes on two cores and ~8 GB of RAM, hence
//! `#[ignore]`:
//!
//! ```text
//! cargo test -p sdgen --test activation_peaks -- --ignored --nocapture --test-threads 1
//! ```
//!
//! `SDGEN_PEAKS_DTYPE=bf16` runs the models in bf16 (the planner's `cpu_half` columns); f32 is the
//! default.
//!
//! Each case prints one JSON line `{"stage", "width", "height", "batch", "activation_bytes", ...}`:
//! the process's peak RSS during the forward minus its RSS just before (weights and inputs
//! resident, the heap trimmed), from the kernel's resettable high-water mark. `SDGEN_PEAKS_OUT`
//! names a file to write them to as well; `SDGEN_MANIFEST_OUT` a file for the tensor shapes the
//! models asked for (the planner's SD 1.5 manifest fixture).
//!
//! sdgen does not depend on `sdgen-memory`, so the high-water mark is read here directly
//! (`/proc/self/clear_refs`, `VmHWM`), as `sdgen_memory::StagePeak` does.
#![cfg(target_os = "linux")]

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sdgen_models::clip::{ClipTextConfig, ClipTextModel};
use sdgen_models::unet::{UNet2DConditionModel, UNetConfig};
use sdgen_models::vae::{AutoencoderKL, VaeConfig};

/// Serves every tensor a model asks for as small random values, recording the shapes.
struct RandomWeights {
    shapes: Mutex<BTreeMap<String, Vec<usize>>>,
    /// Shape for `get_unchecked` (the VAE mid-attention's 1×1 weights are fetched unchecked).
    unchecked: Vec<usize>,
}

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.shapes.lock().unwrap().insert(name.to_string(), s.dims().to_vec());
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.shapes.lock().unwrap().insert(name.to_string(), self.unchecked.clone());
        Tensor::randn(0f32, 0.02, self.unchecked.as_slice(), dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // The current key names (`text_model.` prefixed CLIP, `to_q` VAE attention), none of the
        // quantised variants (`…weight@Q4_0`): every weight is dense.
        !name.contains('@')
    }
}

fn random_vb(unchecked: Vec<usize>) -> (VarBuilder<'static>, &'static RandomWeights) {
    let backend: &'static RandomWeights =
        Box::leak(Box::new(RandomWeights { shapes: Mutex::new(BTreeMap::new()), unchecked }));
    struct Shared(&'static RandomWeights);
    impl SimpleBackend for Shared {
        fn get(&self, s: Shape, n: &str, h: candle_nn::Init, d: DType, dev: &Device) -> Result<Tensor> {
            self.0.get(s, n, h, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    (VarBuilder::from_backend(Box::new(Shared(backend)), dtype(), Device::Cpu), backend)
}

/// The dtype the models run in: `SDGEN_PEAKS_DTYPE` (`f32`, the default, or `bf16`).
fn dtype() -> DType {
    match std::env::var("SDGEN_PEAKS_DTYPE").as_deref() {
        Ok("bf16") => DType::BF16,
        Ok("f32") | Err(_) => DType::F32,
        Ok(other) => panic!("SDGEN_PEAKS_DTYPE: f32 or bf16, not {other}"),
    }
}

/// Standard-normal values of the models' dtype.
fn randn(shape: impl Into<Shape>) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap().to_dtype(dtype()).unwrap()
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Runs `f` and returns (activation bytes above the trimmed starting RSS, elapsed ms).
fn measure<T>(f: impl FnOnce() -> Result<T>) -> (u64, f64) {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
    let rss0 = status_kib("VmRSS:") * 1024;
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let t0 = Instant::now();
    let out = f().unwrap();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let hwm = status_kib("VmHWM:") * 1024;
    drop(out);
    (hwm.saturating_sub(rss0), ms)
}

struct Report {
    lines: Vec<String>,
}

impl Report {
    fn push(&mut self, stage: &str, width: usize, height: usize, batch: usize, bytes: u64, ms: f64) {
        let line = format!(
            "{{\"stage\":\"{stage}\",\"width\":{width},\"height\":{height},\"batch\":{batch},\"activation_bytes\":{bytes},\"elapsed_ms\":{ms:.0},\"dtype\":\"{:?}\"}}",
            dtype()
        );
        println!("{line}");
        self.lines.push(line);
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Ok(path) = std::env::var("SDGEN_PEAKS_OUT") {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            for l in &self.lines {
                writeln!(f, "{l}").unwrap();
            }
        }
    }
}

fn dump_shapes(component: &str, backend: &RandomWeights) {
    if let Ok(path) = std::env::var("SDGEN_MANIFEST_OUT") {
        let shapes = backend.shapes.lock().unwrap();
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        let entries: Vec<String> = shapes.iter().map(|(n, s)| format!("[\"{n}\",{s:?}]")).collect();
        writeln!(f, "{{\"component\":\"{component}\",\"tensors\":[{}]}}", entries.join(",")).unwrap();
    }
}

const SD15_UNET: &str = include_str!("../src/loading/single_file/sd15/unet/config.json");
const SD15_VAE: &str = include_str!("../src/loading/single_file/sd15/vae/config.json");

fn sizes(var: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(var)
        .map(|v| v.split(',').map(|s| s.trim().parse().unwrap()).collect())
        .unwrap_or_else(|_| default.to_vec())
}

#[test]
#[ignore = "full-size SD 1.5 on the CPU: minutes, ~8 GB RAM"]
fn sd15_text_encoder_peak() {
    let mut report = Report { lines: Vec::new() };
    let (vb, backend) = random_vb(vec![]);
    let model = ClipTextModel::new(&ClipTextConfig::vit_l(), false, vb).unwrap();
    dump_shapes("text_encoder", backend);
    let ids = Tensor::from_vec((0..77u32).collect::<Vec<_>>(), (1, 77), &Device::Cpu).unwrap();
    let _ = model.forward(&ids).unwrap();
    for _ in 0..2 {
        let (bytes, ms) = measure(|| model.forward(&ids));
        report.push("text_encoder", 0, 0, 1, bytes, ms);
    }
}

#[test]
#[ignore = "full-size SD 1.5 on the CPU: minutes, ~8 GB RAM"]
fn sd15_unet_peaks() {
    let mut report = Report { lines: Vec::new() };
    let cfg: UNetConfig = serde_json::from_str(SD15_UNET).unwrap();
    let (vb, backend) = random_vb(vec![]);
    let unet = UNet2DConditionModel::new(&cfg, vb).unwrap();
    dump_shapes("unet", backend);
    let dev = Device::Cpu;
    // Warm-up: the first forward sets up the thread pool and gemm's buffers.
    let warm = Tensor::zeros((1, 4, 8, 8), dtype(), &dev).unwrap();
    let ctx1 = Tensor::zeros((1, 77, 768), dtype(), &dev).unwrap();
    let _ = unet.forward(&warm, 999.0, &ctx1).unwrap();
    for px in sizes("SDGEN_UNET_SIZES", &[256, 384, 512]) {
        for batch in [1usize, 2] {
            let sample = randn((batch, 4, px / 8, px / 8));
            let context = randn((batch, 77, 768));
            let (bytes, ms) = measure(|| unet.forward(&sample, 999.0, &context));
            report.push("denoise", px, px, batch, bytes, ms);
        }
    }
}

#[test]
#[ignore = "full-size SD 1.5 on the CPU: minutes, ~8 GB RAM"]
fn sd15_vae_peaks() {
    let mut report = Report { lines: Vec::new() };
    let cfg: VaeConfig = serde_json::from_str(SD15_VAE).unwrap();
    let (vb, backend) = random_vb(vec![512, 512]);
    let vae = AutoencoderKL::new(&cfg, true, true, vb).unwrap();
    dump_shapes("vae", backend);
    let dev = Device::Cpu;
    let _ = vae.decode(&Tensor::zeros((1, 4, 8, 8), dtype(), &dev).unwrap()).unwrap();
    for px in sizes("SDGEN_VAE_SIZES", &[256, 512, 768]) {
        for batch in [1usize, 2] {
            if batch == 2 && px > 512 {
                continue;
            }
            let z = randn((batch, 4, px / 8, px / 8));
            let (bytes, ms) = measure(|| vae.decode(&z));
            report.push("decode", px, px, batch, bytes, ms);
        }
    }
    for px in sizes("SDGEN_VAE_ENCODE_SIZES", &[256, 512]) {
        let image = randn((1, 3, px, px));
        let (bytes, ms) = measure(|| vae.encode(&image).map(|d| d.mean));
        report.push("encode_image", px, px, 1, bytes, ms);
    }
}

/// The transient a quantised linear layer holds while it dequantises its weight for a product
/// (the planner's `sdgen_memory::plan` quantised rung counts it): SD 3.5 Large's largest layer
/// (the adaLN modulation, 2432 → 14592, 35.5 M weights) on one token per image, so the peak above
/// the resident weight is the dequantised copy, against the dense layer's own peak. Prints
/// `{"layer", "dtype", "bytes", "per_weight"}` lines; seconds, ~1 GB:
///
/// ```text
/// cargo test -p sdgen --test activation_peaks quantised -- --ignored --nocapture
/// ```
#[test]
#[ignore = "a measurement, printed"]
fn quantised_product_transients() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use sdgen_models::ops::fp8::{self, Fp8Weight};
    use sdgen_models::ops::linear::{Linear, QuantisedPath};
    let (n, k) = (14592, 2432);
    let w = (Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap() / (k as f64).sqrt()).unwrap();
    let q8 = Linear::quantised(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap(), None);
    let (bytes, scale) = fp8::quantise(&w).unwrap();
    let fp8 =
        Linear::fp8(Fp8Weight::new(fp8::bytes_tensor(&bytes, &[n, k], &Device::Cpu).unwrap(), scale).unwrap(), None);
    for dtype in [DType::F32, DType::BF16] {
        let dense = Linear::new(w.to_dtype(dtype).unwrap(), None);
        let x = Tensor::randn(0f32, 1.0, (2, 1, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        for (layer, name) in [(&dense, "dense"), (&q8, "Q8_0"), (&fp8, "fp8")] {
            let _ = layer.forward_via(&x, QuantisedPath::Dequantise).unwrap();
            let (bytes, _) = measure(|| layer.forward_via(&x, QuantisedPath::Dequantise));
            let line = serde_json::json!({
                "layer": name, "dtype": format!("{dtype:?}"), "bytes": bytes,
                "per_weight": bytes as f64 / (n * k) as f64,
            });
            println!("{line}");
        }
    }
}
