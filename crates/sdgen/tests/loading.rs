//! Loading: half-precision files are converted tensor by tensor to the target dtype, and a
//! folder's components are found and validated before any weight is read.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::testdata;
use sdgen::loading::ModelFolder;

/// Copies the tiny model with the UNet stored as `dtype`.
fn copy_with_unet_as(dtype: DType) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = testdata().join("tiny-sd15");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let to = dir.path().join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir(&to).unwrap();
            for f in std::fs::read_dir(entry.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    let unet = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&unet, &Device::Cpu).unwrap();
    let converted: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (k, v.to_dtype(dtype).unwrap())).collect();
    candle_core::safetensors::save(&converted, &unet).unwrap();
    dir
}

#[test]
fn half_precision_files_load_into_any_dtype() {
    let original = ModelFolder::open(&testdata().join("tiny-sd15")).unwrap().weights("unet").unwrap();
    let names: Vec<String> = original.headers[0].tensors.keys().cloned().collect();
    let reference = original.var_builder(DType::F32, &Device::Cpu).unwrap();
    for stored in [DType::F16, DType::BF16] {
        let dir = copy_with_unet_as(stored);
        let folder = ModelFolder::open(dir.path()).unwrap();
        let weights = folder.weights("unet").unwrap();
        let want_dtype = match stored {
            DType::F16 => "F16",
            _ => "BF16",
        };
        assert!(weights.headers[0].tensors.values().all(|t| t.dtype == want_dtype));
        for target in [DType::F32, stored] {
            let vb = weights.var_builder(target, &Device::Cpu).unwrap();
            for name in &names {
                let got = vb.get_unchecked(name).unwrap();
                assert_eq!(got.dtype(), target, "{name}");
                // Exactly the original values rounded once to the stored precision.
                let want =
                    reference.get_unchecked(name).unwrap().to_dtype(stored).unwrap().to_dtype(DType::F32).unwrap();
                let diff = (got.to_dtype(DType::F32).unwrap() - want).unwrap().abs().unwrap();
                let worst = diff.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(worst, 0.0, "{name} stored as {stored:?}, loaded as {target:?}");
            }
        }
    }
}

#[test]
fn components_are_validated_before_loading() {
    let dir = copy_with_unet_as(DType::F32);
    // A truncated UNet file is refused when the folder is opened, naming the file.
    let unet = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();
    let err = ModelFolder::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors") && err.contains("truncated or corrupt"), "{err}");
    // No weights at all.
    std::fs::remove_file(&unet).unwrap();
    let err = ModelFolder::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no .safetensors weights"), "{err}");
}
