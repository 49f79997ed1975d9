//! fp8 weights (`tools/reference/make_fp8.py`, `testdata/fp8/`, and the fp8-scaled single files
//! beside the tiny 16-bit ones): our dequantisation equals torch's exactly, in f32, bf16 and f16,
//! for every E4M3 byte and for a fused q/k/v served as three matrices; our quantisation equals
//! torch's byte for byte; the tiny MMDiT's forward on the fp8 file equals torch's forward of the
//! same weights, and its distance from the 16-bit weights' forward is stated and bounded; `--weights
//! fp8` equals loading the fp8-scaled file bit for bit; streaming changes no number on fp8
//! weights; the planner counts one byte a weight;
//! whole pipelines run from the files; and bad files are refused by name.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{load, rel_l2, testdata, tiny_request};
use sdgen::loading::quantise::Quantise;
use sdgen::loading::read_backend::ReadBackend;
use sdgen::loading::{ModelFolder, SafetensorsHeader};
use sdgen::pipeline::{txt2img, Runtime};
use sdgen_models::denoiser::Conditioning;
use sdgen_models::ops::fp8;

fn sd35(fp8: bool) -> PathBuf {
    let name = if fp8 { "tiny-sd35-large-fp8-scaled.safetensors" } else { "tiny-sd35-large.safetensors" };
    testdata().join("tiny-sd35-single").join(name)
}

fn sd15(fp8: bool) -> PathBuf {
    let name = if fp8 { "tiny-sd15-fp8-scaled.safetensors" } else { "tiny-sd15.safetensors" };
    testdata().join("tiny-sd15-single").join(name)
}

fn open(file: &Path, configs: &str) -> sdgen::Result<ModelFolder> {
    common::open_configured(file, &testdata().join(configs))
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    load("fp8/reference.safetensors")
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    // Every NaN is the same NaN (E4M3's two NaN bytes).
    v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect()
}

/// Every E4M3 byte times a scale, as the loader serves a weight by name and as a linear layer
/// dequantises it for a product, equals torch's `weight.to(dtype) * scale.to(dtype)` bit for bit.
#[test]
fn dequantisation_equals_torch_exactly() {
    let reference = reference();
    let path = testdata().join("fp8/reference.safetensors");
    let mut header = SafetensorsHeader::read(&path).unwrap();
    // The reference file keeps the scale under ComfyUI's name; a single file's view serves it so.
    let scale = header.tensors.remove("bytes.scale_weight").unwrap();
    header.tensors.insert(fp8::scale_name("bytes.weight"), scale);
    let backend = ReadBackend::new(&[path], &[header]).unwrap();
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    let layer = fp8::load(16, 16, &vb.pp("bytes")).unwrap().expect("served as fp8 bytes");
    for (dtype, name) in [(DType::F32, "bytes.f32"), (DType::BF16, "bytes.bf16"), (DType::F16, "bytes.f16")] {
        let want = bits(&reference[name]);
        assert_eq!(bits(&vb.get_unchecked_dtype("bytes.weight", dtype).unwrap()), want, "{name} by name");
        assert_eq!(bits(&layer.dequantise(dtype).unwrap()), want, "{name} in a layer");
    }
    // The fused q/k/v of the SD 3.5 file, served as the three matrices diffusers holds.
    let model = open(&sd35(true), "tiny-sd35-large").unwrap();
    let vb = model.weights("transformer").unwrap().var_builder(DType::F32, &Device::Cpu).unwrap();
    for (dtype, name) in [(DType::F32, "qkv.f32"), (DType::BF16, "qkv.bf16")] {
        let parts: Vec<Tensor> = ["to_q", "to_k", "to_v"]
            .iter()
            .map(|p| {
                let layer = fp8::load(32, 32, &vb.pp(format!("transformer_blocks.0.attn.{p}"))).unwrap().unwrap();
                layer.dequantise(dtype).unwrap()
            })
            .collect();
        assert_eq!(bits(&Tensor::cat(&parts, 0).unwrap()), bits(&reference[name]), "{name}");
    }
}

/// `--weights fp8`'s quantisation (largest magnitude ÷ 448, clamped, nearest E4M3) gives torch's
/// bytes and scale.
#[test]
fn quantisation_equals_torch() {
    let reference = reference();
    let (bytes, scale) = fp8::quantise(&reference["quantise.source"]).unwrap();
    // Distinct E4M3 bytes are distinct f32 values (±0 by their sign bit; no NaN is made), so
    // comparing the values' bits compares the bytes.
    let ours = fp8::bytes_tensor(&bytes, &[64, 48], &Device::Cpu).unwrap();
    assert_eq!(bits(&ours), bits(&reference["quantise.weight"]), "the quantised bytes");
    assert_eq!(scale, reference["quantise.scale_weight"].to_scalar::<f32>().unwrap(), "the scale");
}

fn mmdit_forward(model: &ModelFolder, dtype: DType) -> Tensor {
    let r = reference();
    let cond = Conditioning {
        context: r["mmdit.context"].to_dtype(dtype).unwrap(),
        pooled: Some(r["mmdit.pooled"].to_dtype(dtype).unwrap()),
        time_ids: None,
        timestep_cond: None,
    };
    let denoiser = model.load_denoiser(dtype, &Device::Cpu).unwrap();
    let latents = r["mmdit.latents"].to_dtype(dtype).unwrap();
    denoiser.forward(&latents, &r["mmdit.timesteps"], &cond).unwrap().to_dtype(DType::F32).unwrap()
}

/// The tiny MMDiT on the fp8 file equals torch's forward of the same (dequantised) weights to f32
/// rounding, as the 16-bit file's equals torch's; fp8 against 16-bit weights is measured 2.9e-2
/// relative L2 (f32 compute; torch's own figure the same) — on a model 32 wide, whose per-tensor
/// scale covers few values; bf16 compute adds its own rounding on both sides.
#[test]
fn the_mmdit_on_fp8_weights_equals_torch_and_is_near_16_bit() {
    let r = reference();
    let fp8 = mmdit_forward(&open(&sd35(true), "tiny-sd35-large").unwrap(), DType::F32);
    let full = mmdit_forward(&open(&sd35(false), "tiny-sd35-large").unwrap(), DType::F32);
    let (to_torch, full_to_torch) = (rel_l2(&fp8, &r["mmdit.fp8_out"]), rel_l2(&full, &r["mmdit.f32_out"]));
    assert!(to_torch < 1e-5 && full_to_torch < 1e-5, "against torch: fp8 {to_torch:e}, 16-bit {full_to_torch:e}");
    let err = rel_l2(&fp8, &full);
    println!("MMDiT forward, fp8 against f32 weights: relative L2 {err:.3e} (torch: {:.3e})", {
        rel_l2(&r["mmdit.fp8_out"], &r["mmdit.f32_out"])
    });
    assert!(err > 1e-3 && err < 5e-2, "{err:e}");
    let (fp8_bf16, full_bf16) = (
        mmdit_forward(&open(&sd35(true), "tiny-sd35-large").unwrap(), DType::BF16),
        mmdit_forward(&open(&sd35(false), "tiny-sd35-large").unwrap(), DType::BF16),
    );
    let err_bf16 = rel_l2(&fp8_bf16, &full_bf16);
    println!("MMDiT forward in bf16, fp8 against bf16 weights: relative L2 {err_bf16:.3e}");
    assert!(err_bf16 < 6e-2, "{err_bf16:e}");
}

/// `--weights fp8` on the 16-bit file quantises the same layers to the same bytes and scales as
/// the fp8-scaled file: the forwards are equal bit for bit. A file in fp8 already is refused.
#[test]
fn weights_fp8_equals_the_fp8_scaled_file_bit_for_bit() {
    let file = open(&sd35(true), "tiny-sd35-large").unwrap();
    let quantised = open(&sd35(false), "tiny-sd35-large").unwrap().with_quantise(Some(Quantise::Fp8)).unwrap();
    let a = bits(&mmdit_forward(&quantised, DType::F32));
    assert!(a == bits(&mmdit_forward(&file, DType::F32)), "--weights fp8 and the fp8-scaled file differ");
    // A diffusers folder holds q, k and v apart: each gets its own scale, so it differs a little.
    let folder = ModelFolder::open(&testdata().join("tiny-sd35-large")).unwrap().with_quantise(Some(Quantise::Fp8));
    let folder = mmdit_forward(&folder.unwrap(), DType::F32);
    assert!(rel_l2(&folder, &mmdit_forward(&file, DType::F32)) < 2e-2);
    for q in [Quantise::Fp8, Quantise::Q8] {
        let e = file.clone().with_quantise(Some(q)).unwrap_err();
        assert_eq!(e.field(), Some("weights"), "{e}");
        assert!(e.to_string().contains("an fp8 checkpoint, quantised already"), "{e}");
    }
}

/// Streaming changes no number on fp8 weights either: the fp8 file's MMDiT and `--weights fp8`'s,
/// with every block streamed (re-read per use) or one resident, give the resident forward's bits.
#[test]
fn streamed_fp8_weights_match_the_resident_ones() {
    use sdgen_models::stream::Residency;
    let r = reference();
    let cond = Conditioning {
        context: r["mmdit.context"].clone(),
        pooled: Some(r["mmdit.pooled"].clone()),
        time_ids: None,
        timestep_cond: None,
    };
    let quantised = open(&sd35(false), "tiny-sd35-large").unwrap().with_quantise(Some(Quantise::Fp8)).unwrap();
    for model in [open(&sd35(true), "tiny-sd35-large").unwrap(), quantised] {
        let expected = bits(&mmdit_forward(&model, DType::F32));
        for resident_blocks in [0, 1] {
            let streamed = model.load_denoiser_with(DType::F32, &Device::Cpu, Residency::Streamed { resident_blocks });
            let out = streamed.unwrap().forward(&r["mmdit.latents"], &r["mmdit.timesteps"], &cond).unwrap();
            assert!(bits(&out) == expected, "{resident_blocks} blocks resident: the outputs differ");
        }
    }
}

/// The planner counts an fp8 file's matrices at one byte a weight, and `--weights fp8` the same.
#[test]
fn the_planner_counts_one_byte_a_weight() {
    let bytes = |m: &ModelFolder| {
        let manifest = sdgen::planning::manifest(m).unwrap();
        let t = manifest.component("transformer").unwrap();
        (t.bytes_at(&[], sdgen_memory::plan::Precision::Bf16), t.tensors.iter().filter(|e| e.held.is_some()).count())
    };
    let (dense, none) = bytes(&open(&sd35(false), "tiny-sd35-large").unwrap());
    let (file, held) = bytes(&open(&sd35(true), "tiny-sd35-large").unwrap());
    let quantised = open(&sd35(false), "tiny-sd35-large").unwrap().with_quantise(Some(Quantise::Fp8)).unwrap();
    assert_eq!(none, 0);
    // 27 fp8 tensors in the file; each fused q/k/v is three matrices.
    assert!(held > 27, "{held}");
    assert_eq!(bytes(&quantised), (file, held));
    assert!(file < dense, "fp8 {file} vs bf16 {dense}");
}

/// Whole text-to-image runs from the fp8 files (SD 3.5 with its text encoders inside, SD 1.5 with
/// its UNet's linears in fp8) near the 16-bit files' images (measured 3.2/255 on average for both,
/// against 0.4/255 for Q8_0: E4M3 keeps 3 mantissa bits); the engine records `weights: "fp8"`.
#[test]
fn pipelines_run_from_fp8_files() {
    for (fp8, full, configs) in [(sd35(true), sd35(false), "tiny-sd35-large"), (sd15(true), sd15(false), "tiny-sd15")] {
        let model = open(&fp8, configs).unwrap();
        assert!(model.checkpoint().unwrap().fp8_tensors() > 0);
        let got = txt2img(&model, &tiny_request(), &Runtime::cpu(), &mut |_| {}).unwrap();
        let want = txt2img(&open(&full, configs).unwrap(), &tiny_request(), &Runtime::cpu(), &mut |_| {}).unwrap();
        let (a, b) = (&got.images[0].pixels, &want.images[0].pixels);
        let mean = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / a.len() as f64;
        println!("{}: image mean |Δ| = {:.3}/255 from the 16-bit file's", fp8.display(), mean * 255.0);
        assert!(mean > 0.0 && mean * 255.0 < 5.0, "{}: {:.3}/255", fp8.display(), mean * 255.0);
    }
    use sdgen::engine::{CancelToken, Engine, EngineConfig, GenerateRequest};
    let mut config = EngineConfig::new(Runtime::cpu(), "cpu");
    config.hub.offline = true;
    let mut engine = Engine::new(config);
    let mut req = GenerateRequest::new(sdgen::loading::ModelSource::Path(sd15(true)), "a lighthouse");
    req.params.steps = Some(2);
    req.params.width = Some(64);
    req.params.height = Some(64);
    req.open.config_from = Some(testdata().join("tiny-sd15"));
    let batches = engine.generate(&req, &mut |_| {}, &CancelToken::default()).unwrap();
    assert_eq!(batches[0].job_metadata.get("weights"), Some(&serde_json::json!("fp8")));
}

/// A copy of the fp8 SD 3.5 file with its header changed by `edit` (the data kept).
fn edited(edit: impl FnOnce(&mut BTreeMap<String, serde_json::Value>)) -> (tempfile::TempDir, PathBuf) {
    let bytes = std::fs::read(sd35(true)).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    edit(&mut header);
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edited-fp8.safetensors");
    std::fs::write(&path, out).unwrap();
    (dir, path)
}

type Edit = Box<dyn FnOnce(&mut BTreeMap<String, serde_json::Value>)>;

#[test]
fn bad_fp8_files_are_refused_by_name() {
    const QKV: &str = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.";
    let set_dtype = |key: String, dtype: &'static str| -> Edit {
        Box::new(move |h| h.get_mut(&key).unwrap()["dtype"] = dtype.into())
    };
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "scale missing",
            Box::new(|h| drop(h.remove(&format!("{QKV}scale_weight")))),
            "`model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight` is fp8 in a scaled file",
        ),
        ("scale not a float", set_dtype(format!("{QKV}scale_weight"), "I32"), "where a scale is one float"),
        ("E5M2 weight", set_dtype(format!("{QKV}weight"), "F8_E5M2"), "is stored as F8_E5M2"),
        ("E5M2 marker", set_dtype("model.diffusion_model.scaled_fp8".into(), "F8_E5M2"), "marks its weights as F8_E5M2"),
        (
            "scale beside a dense weight",
            Box::new(|h| {
                let s = h.remove(&format!("{QKV}scale_weight")).unwrap();
                h.insert("model.diffusion_model.context_embedder.scale_weight".into(), s);
                h.remove("model.diffusion_model.scaled_fp8");
            }),
            "`model.diffusion_model.context_embedder.scale_weight` scales `model.diffusion_model.context_embedder.weight`, which is stored as F32, not fp8",
        ),
    ];
    for (what, edit, want) in cases {
        let (_dir, path) = edited(edit);
        let e = open(&path, "tiny-sd35-large").map(|_| ()).expect_err(what).to_string();
        assert!(e.contains(want) && e.contains("edited-fp8.safetensors"), "{what}: {e}");
    }
    // Without the marker, a weight without its scale is plain fp8 (scale 1): it opens.
    let (_dir, path) = edited(|h| {
        h.remove("model.diffusion_model.scaled_fp8");
        h.remove(&format!("{QKV}scale_weight"));
    });
    assert!(open(&path, "tiny-sd35-large").is_ok());
}
