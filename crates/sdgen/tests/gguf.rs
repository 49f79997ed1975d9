//! GGUF files and quantised weights (`tools/reference/make_gguf.py`, `testdata/gguf/`): our
//! dequantisation of every type equals the `gguf` package's (llama.cpp's Python reader); a
//! quantised matrix reaches a linear layer as its blocks and multiplies as its dequantisation; the
//! tiny SD 3.5 MMDiT on Q8_0 weights is near its f32 forward (relative L2 stated below); `--weights
//! q8` on the safetensors equals the Q8_0 GGUF bit for bit; a whole pipeline runs from a GGUF (SD
//! 3.5 and SDXL); the planner counts the blocks; and bad files are refused by name.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{load, rel_l2, testdata, tiny_request};
use sdgen::loading::quantise::Quantise;
use sdgen::loading::read_backend::ReadBackend;
use sdgen::loading::{gguf, ModelFolder};
use sdgen::pipeline::{txt2img, Runtime};
use sdgen_models::denoiser::Conditioning;
use sdgen_models::ops::linear::{linear_no_bias, set_quantised_path, QuantisedPath};

fn gguf_file(name: &str) -> PathBuf {
    testdata().join("gguf").join(name)
}

fn open(file: &Path, configs: &str) -> sdgen::Result<ModelFolder> {
    common::open_configured(file, &testdata().join(configs))
}

/// A `VarBuilder` over a GGUF file's tensors, by their names in the file.
fn file_var_builder(file: &Path) -> VarBuilder<'static> {
    let header = gguf::read(file).unwrap();
    let backend = ReadBackend::new(&[file.to_path_buf()], &[header]).unwrap();
    VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu)
}

/// Every type of `quants.gguf` read as a tensor equals `gguf.quants.dequantize`: exactly, where
/// both compute `d · q` in f32 the same way, else to f32 rounding (the K types' `d · scale · q −
/// dmin · min` is rounded in another order): at most 2 ulp of the block's largest value.
#[test]
fn dequantisation_equals_the_gguf_package() {
    let reference = load("gguf/quants-dequantised.safetensors");
    let vb = file_var_builder(&gguf_file("quants.gguf"));
    assert_eq!(reference.len(), 13);
    for (name, want) in &reference {
        let got = vb.get_unchecked(name).unwrap();
        assert_eq!(got.dims(), want.dims(), "{name}");
        let (g, w): (Vec<f32>, Vec<f32>) =
            (got.flatten_all().unwrap().to_vec1().unwrap(), want.flatten_all().unwrap().to_vec1().unwrap());
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 2.0 * f32::EPSILON * scale, "{name}: {worst:e} off (scale {scale})");
    }
}

/// A layer's `VarBuilder` whose `weight` is the file's tensor `name`.
fn matrix(vb: &VarBuilder<'static>, name: &'static str) -> VarBuilder<'static> {
    vb.clone().rename_f(move |n: &str| n.replacen("layer.weight", name, 1)).pp("layer")
}

/// A Q8_0/Q4_0/Q4_K/Q5_K matrix reaches `linear()` as its blocks (not dequantised), and the layer
/// multiplies as a dense layer of its dequantised weight: exactly so by dequantising first (to the
/// summation order of the GEMM), within the 8-bit activation blocks' error through candle's
/// quantised kernels (relative L2 below 1%).
#[test]
fn a_quantised_matrix_multiplies_as_its_dequantisation() {
    let reference = load("gguf/quants-dequantised.safetensors");
    let vb = file_var_builder(&gguf_file("quants.gguf"));
    let x = fixed(&[2, 40, 512], 3.0);
    for name in ["Q8_0", "Q4_0", "Q4_K", "Q5_K"] {
        let layer = linear_no_bias(512, 6, matrix(&vb, name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(layer.quantised_weight().is_some(), "{name} stays quantised");
        let dense = x.broadcast_matmul(&reference[name].t().unwrap()).unwrap();
        let via_dense = layer.forward_via(&x, QuantisedPath::Dequantise).unwrap();
        assert!(rel_l2(&via_dense, &dense) < 1e-6, "{name} dequantised: {:e}", rel_l2(&via_dense, &dense));
        let via_kernel = layer.forward_via(&x, QuantisedPath::Kernel).unwrap();
        assert!(rel_l2(&via_kernel, &dense) < 1e-2, "{name} kernel: {:e}", rel_l2(&via_kernel, &dense));
    }
    // A float tensor has no blocks to give: the layer is dense.
    assert!(linear_no_bias(512, 6, matrix(&vb, "F16")).unwrap().quantised_weight().is_none());
}

/// Values in [-2, 2] that look random enough and are the same in every call.
fn fixed(shape: &[usize], phase: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (2.0 * ((i as f64 * 0.618 + phase).sin() * 1e3).sin()) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn mmdit_inputs() -> (Tensor, Tensor, Conditioning) {
    let timesteps = Tensor::new(&[500f32, 20.], &Device::Cpu).unwrap();
    let cond = Conditioning {
        context: fixed(&[2, 7, 64], 1.0),
        pooled: Some(fixed(&[2, 40], 2.0)),
        time_ids: None,
        timestep_cond: None,
    };
    (fixed(&[2, 16, 8, 8], 0.0), timesteps, cond)
}

fn mmdit_forward(model: &ModelFolder) -> Tensor {
    let (latents, timesteps, cond) = mmdit_inputs();
    model.load_denoiser(DType::F32, &Device::Cpu).unwrap().forward(&latents, &timesteps, &cond).unwrap()
}

fn single_file_large() -> ModelFolder {
    open(&testdata().join("tiny-sd35-single/tiny-sd35-large.safetensors"), "tiny-sd35-large").unwrap()
}

/// The tiny MMDiT on Q8_0 weights against its f32 forward: Q8_0 is near-lossless (the published
/// expectation for SD 3.5's conversions: ~1e-3–1e-2), Q4_0 an order coarser; through candle's
/// kernels the activations are quantised to 8 bits per block as well. Measured (relative L2,
/// dequantised / kernels): Q8_0 8.0e-3 / 1.3e-2, Q4_0 1.16e-1 / 1.16e-1 (`--nocapture` prints
/// them) — on a model 32 wide, one block per row, which a real model's rows of 48–76 blocks
/// average better.
#[test]
fn the_mmdit_on_q8_0_weights_is_near_its_f32_forward() {
    let reference = mmdit_forward(&single_file_large());
    for (file, path, bound) in [
        ("tiny-sd35-large-Q8_0.gguf", QuantisedPath::Dequantise, 1e-2),
        ("tiny-sd35-large-Q8_0.gguf", QuantisedPath::Kernel, 2e-2),
        ("tiny-sd35-large-Q4_0.gguf", QuantisedPath::Dequantise, 2e-1),
        ("tiny-sd35-large-Q4_0.gguf", QuantisedPath::Kernel, 2e-1),
    ] {
        let model = open(&gguf_file(file), "tiny-sd35-large").unwrap();
        assert_eq!(model.family().name, "sd35-large");
        set_quantised_path(Some(path));
        let err = rel_l2(&mmdit_forward(&model), &reference);
        set_quantised_path(None);
        println!("{file} ({path:?}): MMDiT forward relative L2 against f32 = {err:.3e}");
        assert!(err > 0.0 && err < bound, "{file} {path:?}: {err:e}");
    }
}

/// `--weights q8` quantises the same weights to the same blocks as the Q8_0 conversion: the
/// forwards are equal bit for bit.
#[test]
fn weights_q8_equals_the_q8_0_gguf_bit_for_bit() {
    let quantised = single_file_large().with_quantise(Some(Quantise::Q8)).unwrap();
    let gguf = open(&gguf_file("tiny-sd35-large-Q8_0.gguf"), "tiny-sd35-large").unwrap();
    let (a, b) = (mmdit_forward(&quantised), mmdit_forward(&gguf));
    let (a, b): (Vec<f32>, Vec<f32>) =
        (a.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
    assert!(a == b, "--weights q8 and the Q8_0 GGUF differ");
    assert!(
        mmdit_forward(&single_file_large()).flatten_all().unwrap().to_vec1::<f32>().unwrap() != a,
        "quantising changed nothing"
    );
    // The folder quantises the same way as the single file.
    let folder =
        ModelFolder::open(&testdata().join("tiny-sd35-large")).unwrap().with_quantise(Some(Quantise::Q8)).unwrap();
    assert!(mmdit_forward(&folder).flatten_all().unwrap().to_vec1::<f32>().unwrap() == a);
    // A GGUF is quantised already.
    let e = gguf.with_quantise(Some(Quantise::Q4)).unwrap_err();
    assert_eq!(e.field(), Some("weights"), "{e}");
    assert!(e.to_string().contains("quantised already"), "{e}");
}

/// The planner counts a GGUF's quantised matrices at their block size, and `--weights q8` the
/// same; the rest at the run's precision.
#[test]
fn the_planner_counts_the_blocks() {
    let bytes = |m: &ModelFolder| {
        let manifest = sdgen::planning::manifest(m).unwrap();
        let t = manifest.component("transformer").unwrap();
        (t.bytes_at(&[], sdgen_memory::plan::Precision::F32), t.tensors.iter().filter(|e| e.held.is_some()).count())
    };
    let (dense, none) = bytes(&single_file_large());
    let (gguf, held) = bytes(&open(&gguf_file("tiny-sd35-large-Q8_0.gguf"), "tiny-sd35-large").unwrap());
    let (q8, held_q8) = bytes(&single_file_large().with_quantise(Some(Quantise::Q8)).unwrap());
    assert_eq!(none, 0);
    // 27 quantised tensors in the file; the fused q/k/v are three matrices each.
    assert!(held > 27, "{held}");
    assert_eq!((q8, held_q8), (gguf, held));
    assert!(gguf * 2 < dense, "Q8_0 {gguf} vs f32 {dense}");
}

/// A whole text-to-image run from a GGUF denoiser, the rest of the pipeline from the config
/// folder: SD 3.5 near the f32 single file's image, and SDXL's UNet conversion (convolutions
/// stored reshaped, `comfy.gguf.orig_shape`) near the folder's.
#[test]
fn pipelines_run_from_gguf_files() {
    for (file, folder, reference) in [
        ("tiny-sd35-large-Q8_0.gguf", "tiny-sd35-large", single_file_large()),
        ("tiny-sdxl-Q8_0.gguf", "tiny-sdxl", ModelFolder::open(&testdata().join("tiny-sdxl")).unwrap()),
    ] {
        let model = open(&gguf_file(file), folder).unwrap();
        assert!(model.checkpoint().unwrap().is_gguf());
        let held: Vec<&str> = model.checkpoint().unwrap().from_config_dir().to_vec();
        assert!(held.contains(&"vae") && !held.iter().any(|c| *c == model.family().denoiser.component), "{held:?}");
        let got = txt2img(&model, &tiny_request(), &Runtime::cpu(), &mut |_| {}).unwrap();
        let want = txt2img(&reference, &tiny_request(), &Runtime::cpu(), &mut |_| {}).unwrap();
        let (a, b) = (&got.images[0].pixels, &want.images[0].pixels);
        let mean = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / a.len() as f64;
        println!("{file}: image mean |Δ| = {:.3}/255", mean * 255.0);
        assert!(mean * 255.0 < 2.0, "{file}: {:.3}/255", mean * 255.0);
    }
}

/// A copy of `name` changed by `edit`, in a temporary folder.
fn edited(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(gguf_file(name)).unwrap();
    edit(&mut bytes);
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// A change to a file's bytes.
type Edit = Box<dyn FnOnce(&mut Vec<u8>)>;

/// The byte offset of tensor `name`'s GGML type number in a GGUF header.
fn type_offset(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes.windows(key.len()).position(|w| w == key).expect("the tensor's entry") + key.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * dims
}

fn refusal(file: &Path, configs: &str) -> String {
    open(file, configs).map(|_| ()).expect_err("refused").to_string()
}

#[test]
fn bad_files_are_refused_by_name() {
    let large = "tiny-sd35-large-Q8_0.gguf";
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("truncated", Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2)), "is truncated"),
        ("header cut", Box::new(|b: &mut Vec<u8>| b.truncate(200)), "is truncated"),
        ("version 7", Box::new(|b: &mut Vec<u8>| b[4..8].copy_from_slice(&7u32.to_le_bytes())), "version 7"),
        ("version 1", Box::new(|b: &mut Vec<u8>| b[4..8].copy_from_slice(&1u32.to_le_bytes())), "version 1"),
        ("big-endian", Box::new(|b: &mut Vec<u8>| b[4..8].copy_from_slice(&3u32.to_be_bytes())), "big-endian"),
        (
            "IQ4_XS",
            Box::new(|b: &mut Vec<u8>| {
                let at = type_offset(b, "joint_blocks.0.x_block.attn.qkv.weight");
                b[at..at + 4].copy_from_slice(&23u32.to_le_bytes());
            }),
            "`joint_blocks.0.x_block.attn.qkv.weight` is quantised as IQ4_XS, which this build does not read",
        ),
        (
            "type 99",
            Box::new(|b: &mut Vec<u8>| {
                let at = type_offset(b, "joint_blocks.0.x_block.attn.qkv.weight");
                b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
            }),
            "GGML type 99",
        ),
    ];
    for (what, edit, want) in cases {
        let (_dir, path) = edited(large, edit);
        let e = refusal(&path, "tiny-sd35-large");
        assert!(e.contains(want) && e.contains(large), "{what}: {e}");
    }
    // Not a GGUF at all (its magic changed): read as what it then claims to be, and refused.
    let (_dir, path) = edited(large, |b| b[..4].copy_from_slice(b"GGUX"));
    let e = refusal(&path, "tiny-sd35-large");
    assert!(e.contains(large), "{e}");
}

#[test]
fn a_gguf_of_another_model_is_refused_naming_what_it_is() {
    let e = refusal(&gguf_file("llm.gguf"), "tiny-sd35-large");
    assert!(e.contains("a GGUF of a `llama` model") && e.contains("not an image denoiser"), "{e}");
    let e = refusal(&gguf_file("tiny-sdxl-Q8_0.gguf"), "tiny-sd35-large");
    assert!(e.contains("(`sdxl`)") && e.contains("Stable Diffusion 3.5 Large"), "{e}");
    let e = refusal(&gguf_file("tiny-sd35-medium-Q8_0.gguf"), "tiny-sd35-large");
    assert!(e.contains("Medium") && e.contains("Large"), "{e}");
    // Without a folder for the rest of the pipeline.
    let e = ModelFolder::open(&gguf_file("tiny-sd35-large-Q8_0.gguf")).unwrap_err().to_string();
    assert!(e.contains("holds only the denoiser") && e.contains("config_from"), "{e}");
    // Medium with its own folder opens.
    assert_eq!(
        open(&gguf_file("tiny-sd35-medium-Q8_0.gguf"), "tiny-sd35-medium").unwrap().family().name,
        "sd35-medium"
    );
}

/// Through the engine (what the CLI and the server run): `weights` in the request quantises the
/// job's model, not the cached one, and the metadata records it; a GGUF job records its types.
#[test]
fn the_engine_quantises_per_job_and_records_it() {
    use sdgen::engine::{CancelToken, Engine, EngineConfig, GenerateRequest};
    use sdgen::loading::ModelSource;
    let mut config = EngineConfig::new(Runtime::cpu(), "cpu");
    config.hub.offline = true;
    let mut engine = Engine::new(config);
    let mut run = |model: PathBuf, configs: Option<&str>, weights: Option<Quantise>| {
        let mut req = GenerateRequest::new(ModelSource::Path(model), "a lighthouse");
        req.params.steps = Some(2);
        req.params.width = Some(64);
        req.params.height = Some(64);
        req.open.config_from = configs.map(|c| testdata().join(c));
        req.open.weights = weights;
        let batches = engine.generate(&req, &mut |_| {}, &CancelToken::default()).unwrap();
        (batches[0].images[0].image.rgb8.clone(), batches[0].job_metadata.get("weights").cloned())
    };
    let single = testdata().join("tiny-sd35-single/tiny-sd35-large.safetensors");
    let (q8, recorded) = run(single.clone(), Some("tiny-sd35-large"), Some(Quantise::Q8));
    assert_eq!(recorded, Some(serde_json::json!("q8")));
    let (plain, recorded) = run(single, Some("tiny-sd35-large"), None);
    assert_eq!(recorded, None, "the cached model stays unquantised");
    assert_ne!(q8, plain);
    let (gguf, recorded) = run(gguf_file("tiny-sd35-large-Q8_0.gguf"), Some("tiny-sd35-large"), None);
    assert_eq!(recorded, Some(serde_json::json!({ "gguf": { "F32": 56, "Q8_0": 27 } })));
    assert_eq!(gguf, q8, "--weights q8 and the Q8_0 GGUF make the same image");
}
