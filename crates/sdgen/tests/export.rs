//! `loading::export` (what `sdgen-bench --export` writes): the Q8_0 GGUF and the fp8-scaled
//! checkpoint made from the tiny SD 3.5 Large — from its single file and from its diffusers
//! folder — are the reference scripts' files of the same weights (`tools/reference/make_gguf.py`:
//! the `gguf` package's Q8_0; `make_fp8.py`: torch's fp8 rule), byte for byte or tensor for
//! tensor, and load back through the product's own loaders to the same MMDiT forward as those
//! files. Models that cannot be written are refused by name.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{load, testdata};
use sdgen::loading::export::{export, ExportFormat};
use sdgen::loading::quantise::Quantise;
use sdgen::loading::{gguf, ModelFolder};
use sdgen_models::denoiser::Conditioning;

fn open(file: &Path, configs: &str) -> ModelFolder {
    common::open_configured(file, &testdata().join(configs)).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// The tiny Large as its single file and as its folder (the same weights).
fn sources() -> Vec<(&'static str, ModelFolder)> {
    vec![
        ("single file", open(&testdata().join("tiny-sd35-single/tiny-sd35-large.safetensors"), "tiny-sd35-large")),
        ("folder", ModelFolder::open(&testdata().join("tiny-sd35-large")).unwrap()),
    ]
}

fn forward(model: &ModelFolder) -> Vec<f32> {
    let dev = &Device::Cpu;
    let ramp = |shape: &[usize], k: f32| {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|i| (i as f32 * 0.37 + k).sin()).collect::<Vec<_>>(), shape, dev).unwrap()
    };
    let cond = Conditioning {
        context: ramp(&[2, 7, 64], 1.0),
        pooled: Some(ramp(&[2, 40], 2.0)),
        time_ids: None,
        timestep_cond: None,
    };
    let t = Tensor::new(&[500f32, 20.], dev).unwrap();
    let out = model.load_denoiser(DType::F32, dev).unwrap().forward(&ramp(&[2, 16, 8, 8], 0.0), &t, &cond).unwrap();
    out.flatten_all().unwrap().to_vec1().unwrap()
}

/// The GGUF written from either source is the reference conversion's file byte for byte (the
/// same metadata, directory and Q8_0 blocks), and runs as it does.
#[test]
fn the_q8_0_gguf_is_the_reference_conversion() {
    let reference = testdata().join("gguf/tiny-sd35-large-Q8_0.gguf");
    let want = std::fs::read(&reference).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (what, model) in sources() {
        let out = tmp.path().join(format!("{}.gguf", what.replace(' ', "-")));
        let written = export(&model, ExportFormat::GgufQ8_0, &out).unwrap();
        assert_eq!(written.types, [("F32".to_string(), 56), ("Q8_0".to_string(), 27)].into(), "{what}");
        let got = std::fs::read(&out).unwrap();
        if got != want {
            let (g, w) = (gguf::read(&out).unwrap(), gguf::read(&reference).unwrap());
            assert_eq!(g.tensors.keys().collect::<Vec<_>>(), w.tensors.keys().collect::<Vec<_>>(), "{what}");
            for (name, t) in &w.tensors {
                let mine = &g.tensors[name];
                assert_eq!((&mine.dtype, &mine.shape), (&t.dtype, &t.shape), "{what}: {name}");
                let range = |b: &[u8], r: (u64, u64)| b[r.0 as usize..r.1 as usize].to_vec();
                assert!(range(&got, mine.data_offsets) == range(&want, t.data_offsets), "{what}: {name}'s bytes");
            }
            panic!("{what}: every tensor equal, but the files differ ({} vs {} bytes)", got.len(), want.len());
        }
        assert_eq!(forward(&open(&out, "tiny-sd35-large")), forward(&open(&reference, "tiny-sd35-large")), "{what}");
    }
}

/// The tiny Large as a bf16 folder in `dir`: its own folder's entries linked, but a transformer
/// whose weights are rounded to bf16 (one file).
fn bf16_folder(dir: &Path) -> ModelFolder {
    let source = testdata().join("tiny-sd35-large");
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "transformer" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let transformer = dir.join("transformer");
    std::fs::create_dir(&transformer).unwrap();
    std::fs::copy(source.join("transformer/config.json"), transformer.join("config.json")).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for shard in std::fs::read_dir(source.join("transformer")).unwrap() {
        let path = shard.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            for (name, t) in candle_core::safetensors::load(&path, &Device::Cpu).unwrap() {
                tensors.insert(name, t.to_dtype(DType::BF16).unwrap());
            }
        }
    }
    candle_core::safetensors::save(&tensors, transformer.join("diffusion_pytorch_model.safetensors")).unwrap();
    ModelFolder::open(dir).unwrap()
}

/// From 16-bit weights the GGUF holds the dense tensors as the published conversions do (the
/// one-dimensional ones F32, the larger ones F16) with the weights' values: the model it loads
/// runs as the bf16 folder quantised by `--weights q8` (the same Q8_0 rule), to within F16's
/// rounding of the few values too small for its normal range.
#[test]
fn a_bf16_folder_is_written_with_f32_and_f16_dense_tensors_of_its_values() {
    let tmp = tempfile::tempdir().unwrap();
    let folder_dir = tmp.path().join("bf16");
    std::fs::create_dir(&folder_dir).unwrap();
    let folder = bf16_folder(&folder_dir);
    let out = tmp.path().join("sd3.5_large-Q8_0.gguf");
    let written = export(&folder, ExportFormat::GgufQ8_0, &out).unwrap();
    let (f32s, f16s) = (written.types.get("F32").copied(), written.types.get("F16").copied());
    assert!(f32s > Some(0) && f16s > Some(0), "{:?}", written.types);
    assert_eq!(written.types.get("Q8_0"), Some(&27), "{:?}", written.types);
    assert!(!written.types.contains_key("BF16"), "{:?}", written.types);
    let gguf = common::open_configured(&out, &folder_dir).unwrap();
    let quantised = folder.with_quantise(Some(Quantise::Q8)).unwrap();
    let to_tensor = |v: Vec<f32>| Tensor::new(v, &Device::Cpu).unwrap();
    let (got, want) = (to_tensor(forward(&gguf)), to_tensor(forward(&quantised)));
    common::assert_close_rel("bf16 folder's GGUF vs --weights q8", &got, &want, 1e-5);
}

/// The fp8-scaled checkpoint holds the reference file's tensors exactly (each fp8 weight's
/// bytes and scale, a fused q/k/v under one scale, the marker, the VAE), its text encoders beside
/// it; it opens as an fp8 checkpoint and runs as the reference file does.
#[test]
fn the_fp8_scaled_checkpoint_is_the_reference_file() {
    let reference_path = testdata().join("tiny-sd35-single/tiny-sd35-large-fp8-scaled.safetensors");
    let reference = load("tiny-sd35-single/tiny-sd35-large-fp8-scaled.safetensors");
    let reference_out = forward(&open(&reference_path, "tiny-sd35-large"));
    let tmp = tempfile::tempdir().unwrap();
    for (what, model) in sources() {
        let dir = tmp.path().join(what.replace(' ', "-"));
        let out = dir.join("sd3.5_large_fp8_scaled.safetensors");
        let written = export(&model, ExportFormat::Fp8Scaled, &out).unwrap();
        // The reference holds its text encoders inside (`text_encoders.<name>.transformer.*`);
        // ours are beside it, under their own names.
        let mut got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        for (name, file) in [("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5xxl_fp16")] {
            let beside = dir.join("text_encoders").join(format!("{file}.safetensors"));
            let tensors = candle_core::safetensors::load(&beside, &Device::Cpu).unwrap();
            got.extend(tensors.into_iter().map(|(k, v)| (format!("text_encoders.{name}.transformer.{k}"), v)));
        }
        let mut keys: Vec<&String> = got.keys().collect();
        keys.sort();
        let mut want: Vec<&String> = reference.keys().collect();
        want.sort();
        assert!(keys == want, "{what}: {} tensors vs the reference's {}", keys.len(), want.len());
        for (name, t) in &reference {
            let mine = &got[name];
            assert_eq!((mine.dtype(), mine.dims()), (t.dtype(), t.dims()), "{what}: {name}");
            let values = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            assert!(values(mine) == values(t), "{what}: {name} differs");
        }
        assert_eq!(written.types.get("F8_E4M3"), Some(&27), "{what}: {:?}", written.types);
        let beside: Vec<PathBuf> = ["clip_l", "clip_g", "t5xxl_fp16"]
            .iter()
            .map(|f| dir.join("text_encoders").join(format!("{f}.safetensors")))
            .collect();
        assert_eq!(written.beside, beside, "{what}");
        let opened = open(&out, "tiny-sd35-large");
        assert_eq!(opened.checkpoint().unwrap().quantised_kind(), Some("an fp8 checkpoint"));
        assert!(opened.unavailable("text_encoder_3").is_none(), "{what}: T5 beside it");
        assert_eq!(forward(&opened), reference_out, "{what}");
    }
}

/// What cannot be written is refused naming why: a quantised file, a model quantising as it
/// loads, a family other than SD 3.5.
#[test]
fn models_that_cannot_be_written_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let gguf = open(&testdata().join("gguf/tiny-sd35-large-Q8_0.gguf"), "tiny-sd35-large");
    let e = export(&gguf, ExportFormat::Fp8Scaled, &out).unwrap_err().to_string();
    assert!(e.contains("is a GGUF, quantised already") && e.contains("fp8-scaled"), "{e}");
    let q8 = ModelFolder::open(&testdata().join("tiny-sd35-large")).unwrap().with_quantise(Some(Quantise::Q8)).unwrap();
    let e = export(&q8, ExportFormat::GgufQ8_0, &out).unwrap_err().to_string();
    assert!(e.contains("quantises as it loads (weights q8)"), "{e}");
    let sdxl = ModelFolder::open(&testdata().join("tiny-sdxl")).unwrap();
    let e = export(&sdxl, ExportFormat::GgufQ8_0, &out).unwrap_err().to_string();
    assert!(e.contains("is not supported: only SD 3.5's MMDiT"), "{e}");
    assert!(!out.exists());
}

/// A folder saved without T5 (SD 3.5 Medium here) gives a checkpoint with the two CLIPs beside it
/// and no T5 file, which opens as that folder does (T5 unavailable, `--no-t5`) and runs.
#[test]
fn a_folder_without_t5_is_written_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = ModelFolder::open(&testdata().join("tiny-sd35-medium-no-t5")).unwrap();
    let out = tmp.path().join("sd3.5_medium_fp8_scaled.safetensors");
    let written = export(&model, ExportFormat::Fp8Scaled, &out).unwrap();
    let names: Vec<String> =
        written.beside.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["clip_l.safetensors", "clip_g.safetensors"]);
    let opened = open(&out, "tiny-sd35-medium");
    assert_eq!(opened.family().name, "sd35-medium");
    assert!(opened.unavailable("text_encoder_3").is_some());
    assert!(forward(&opened).iter().all(|v| v.is_finite()));
}
