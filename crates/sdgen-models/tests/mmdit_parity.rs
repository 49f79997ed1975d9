//! SD 3's MMDiT (`sdgen_models::mmdit`) against diffusers' `SD3Transformer2DModel` on the tiny
//! random models of `tools/reference/make_mmdit.py` (`testdata/tiny-sd3-mmdit/`, references in
//! `testdata/reference/sd3/mmdit.safetensors`, described in `testdata/reference/README.md`).
//!
//! Tolerances, as `max|a − b| ≤ rel · max|ref|` over the output:
//! - f32: [`F32_REL`]. Both sides compute in f32 from the same (half-stored) weights; what is left
//!   is summation order (GEMM blocking, the attention's softmax, the layer norms' one-pass
//!   variance) through 3 blocks.
//! - bf16 / f16 against diffusers' own bf16 / f16 run: [`BF16_REL`], [`F16_REL`]. Both round after
//!   every operation, but not always at the same places (PyTorch's CPU attention rounds its
//!   unnormalised probabilities to the dtype before the P·V product; candle's elementwise kernels
//!   and PyTorch's vectorised ones round differently inside GELU and SiLU), so two correct
//!   half-precision runs differ by about as much as each differs from f32: measured 0.8% / 1.5%
//!   (bf16, large / medium) and 0.15% / 0.16% (f16), while diffusers' own runs are 0.76% / 0.99%
//!   (bf16) and 0.10% / 0.11% (f16) from its f32 one. So each half-precision run is also held to
//!   the f32 reference: no more than [`HALF_VS_F32`] times diffusers' own distance from it
//!   (measured 0.99–1.14×), i.e. as accurate as diffusers in that dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use sdgen_models::attention::AttentionOptions;
use sdgen_models::denoiser::{Conditioning, Denoiser};
use sdgen_models::mmdit::{sincos_pos_table, MMDiTConfig, SD3Transformer2DModel};

/// f32 against diffusers' f32.
const F32_REL: f32 = 1e-5;
/// bf16 against diffusers' bf16 (a bf16 rounding is 2⁻⁹ ≈ 2e-3 relative).
const BF16_REL: f32 = 2.5e-2;
/// f16 against diffusers' f16 (a f16 rounding is 2⁻¹¹ ≈ 4.9e-4 relative).
const F16_REL: f32 = 3e-3;
/// A half-precision run's distance from diffusers' f32 output, at most this many times diffusers'
/// own half-precision run's.
const HALF_VS_F32: f32 = 1.5;

/// `testdata/` at the workspace root, or `$SDGEN_TESTDATA` (test binaries built here and run on
/// the GPU machine find the data there).
fn testdata() -> PathBuf {
    match std::env::var_os("SDGEN_TESTDATA") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata")),
    }
}

fn model_dir(name: &str) -> PathBuf {
    testdata().join("tiny-sd3-mmdit").join(name)
}

/// The reference tensors, f32 on the CPU.
fn reference() -> HashMap<String, Tensor> {
    let path = testdata().join("reference/sd3/mmdit.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A diffusers model folder's weight files: the shards its index names, or the single file.
fn weight_files(dir: &Path) -> Vec<PathBuf> {
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
    if index.exists() {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
        let mut files: Vec<String> =
            json["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap().to_string()).collect();
        files.sort();
        files.dedup();
        files.into_iter().map(|f| dir.join(f)).collect()
    } else {
        vec![dir.join("diffusion_pytorch_model.safetensors")]
    }
}

fn config(name: &str) -> MMDiTConfig {
    serde_json::from_str(&std::fs::read_to_string(model_dir(name).join("config.json")).unwrap()).unwrap()
}

/// Loads `testdata/tiny-sd3-mmdit/{name}` in `dtype` on `device`, as a user's files would be.
fn load_model(name: &str, dtype: DType, device: &Device) -> Result<SD3Transformer2DModel> {
    // SAFETY: the test data is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weight_files(&model_dir(name)), dtype, device)? };
    SD3Transformer2DModel::new(&config(name), vb)
}

/// The shared inputs on `device`.
struct Inputs {
    latents: Tensor,
    timesteps: Tensor,
    context: Tensor,
    pooled: Tensor,
}

fn inputs(refs: &HashMap<String, Tensor>, device: &Device) -> Inputs {
    let get = |k: &str| refs[k].to_device(device).unwrap();
    Inputs { latents: get("latents"), timesteps: get("timesteps"), context: get("context"), pooled: get("pooled") }
}

fn run(model: &SD3Transformer2DModel, x: &Inputs, skip: &[usize]) -> Result<Tensor> {
    model.forward_skipping(&x.latents, &x.timesteps, &x.context, &x.pooled, skip)
}

/// `max|a − b| / max|b|`.
fn rel_err(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims(), "shape");
    let a = actual.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let diff = (a - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, rel: f32) {
    let err = rel_err(actual, expected);
    println!("{what}: max |diff| / max |ref| = {err:.2e} (bound {rel:.1e})");
    assert!(err <= rel, "{what}: max |diff| / max |ref| = {err:e} > {rel:e}");
}

fn check(name: &str, dtype: DType, key: &str, rel: f32, skip: &[usize]) -> Result<()> {
    let refs = reference();
    let model = load_model(name, dtype, &Device::Cpu)?;
    let out = run(&model, &inputs(&refs, &Device::Cpu), skip)?;
    assert_eq!(out.dtype(), dtype);
    assert_close(key, &out, &refs[key], rel);
    if dtype != DType::F32 {
        let f32_key = format!("{name}_f32");
        let ours = rel_err(&out, &refs[&f32_key]);
        let theirs = rel_err(&refs[key], &refs[&f32_key]);
        println!("{key}: from f32, ours {ours:.2e}, diffusers' {theirs:.2e}");
        assert!(ours <= HALF_VS_F32 * theirs, "{key}: {ours:e} from f32, diffusers' own run {theirs:e}");
    }
    Ok(())
}

#[test]
fn large_f32_matches_diffusers() -> Result<()> {
    check("large", DType::F32, "large_f32", F32_REL, &[])
}

#[test]
fn skipped_layers_pass_through() -> Result<()> {
    check("large", DType::F32, "large_skip1_f32", F32_REL, &[1])?;
    let refs = reference();
    let model = load_model("large", DType::F32, &Device::Cpu)?;
    let err = run(&model, &inputs(&refs, &Device::Cpu), &[3]).unwrap_err().to_string();
    assert!(err.contains("skip_layers names block 3; the model has 3"), "{err}");
    Ok(())
}

#[test]
fn medium_dual_attention_f32_matches_diffusers() -> Result<()> {
    check("medium", DType::F32, "medium_f32", F32_REL, &[])
}

#[test]
fn sd3_without_qk_norm_f32_matches_diffusers() -> Result<()> {
    check("sd3", DType::F32, "sd3_f32", F32_REL, &[])
}

#[test]
fn large_bf16_matches_diffusers_bf16() -> Result<()> {
    check("large", DType::BF16, "large_bf16", BF16_REL, &[])
}

#[test]
fn medium_bf16_matches_diffusers_bf16() -> Result<()> {
    check("medium", DType::BF16, "medium_bf16", BF16_REL, &[])
}

#[test]
fn large_f16_matches_diffusers_f16() -> Result<()> {
    check("large", DType::F16, "large_f16", F16_REL, &[])
}

#[test]
fn medium_f16_matches_diffusers_f16() -> Result<()> {
    check("medium", DType::F16, "medium_f16", F16_REL, &[])
}

#[test]
fn the_denoiser_seam_takes_context_and_pooled_and_requires_pooled() -> Result<()> {
    let refs = reference();
    let x = inputs(&refs, &Device::Cpu);
    let model = load_model("large", DType::F32, &Device::Cpu)?;
    let denoiser: &dyn Denoiser = &model;
    let cond = Conditioning {
        context: x.context.clone(),
        pooled: Some(x.pooled.clone()),
        time_ids: None,
        timestep_cond: None,
    };
    let out = denoiser.forward(&x.latents, &x.timesteps, &cond)?;
    assert_close("denoiser large_f32", &out, &refs["large_f32"], F32_REL);

    let no_pooled = Conditioning { pooled: None, ..cond };
    let err = denoiser.forward(&x.latents, &x.timesteps, &no_pooled).unwrap_err().to_string();
    assert!(err.contains("pooled text embeddings"), "{err}");
    Ok(())
}

#[test]
fn sliced_attention_gives_the_same_output() -> Result<()> {
    let refs = reference();
    let model = load_model("medium", DType::F32, &Device::Cpu)?;
    // 24 image + 7 context tokens in chunks of 5 query rows (the last one partial).
    model.set_attention_options(AttentionOptions::sliced(5));
    let out = run(&model, &inputs(&refs, &Device::Cpu), &[])?;
    assert_close("medium_f32 sliced", &out, &refs["medium_f32"], F32_REL);
    Ok(())
}

#[test]
fn a_latent_beyond_the_position_table_is_refused_naming_its_size() -> Result<()> {
    let refs = reference();
    let x = inputs(&refs, &Device::Cpu);
    let model = load_model("sd3", DType::F32, &Device::Cpu)?;
    // pos_embed_max_size 12 patches of 2: 24 latent pixels at most; 26 makes 13 patches.
    let latents = Tensor::zeros((2, 16, 8, 26), DType::F32, &Device::Cpu)?;
    let err = model.forward(&latents, &x.timesteps, &x.context, &x.pooled).unwrap_err().to_string();
    assert!(err.contains("8×26") && err.contains("4×13 patches") && err.contains("pos_embed_max_size"), "{err}");
    assert!(err.contains("24×24"), "{err}");
    Ok(())
}

#[test]
fn a_missing_tensor_is_refused_naming_its_key() -> Result<()> {
    let dir = model_dir("large");
    let mut tensors = HashMap::new();
    for file in weight_files(&dir) {
        tensors.extend(candle_core::safetensors::load(&file, &Device::Cpu)?);
    }
    let key = "transformer_blocks.1.attn.norm_added_k.weight";
    assert!(tensors.remove(key).is_some(), "the large model has {key}");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let err = SD3Transformer2DModel::new(&config("large"), vb).unwrap_err().to_string();
    assert!(err.contains(key), "{err}");
    Ok(())
}

#[test]
fn the_computed_position_table_is_diffusers() -> Result<()> {
    let refs = reference();
    let table = sincos_pos_table(32, 12, 4, &Device::Cpu)?;
    assert_close("pos_embed_table", &table, &refs["pos_embed_table"], 1e-6);
    Ok(())
}

/// The tiny models on a CUDA device against the same references (run on the GPU machine:
/// `cargo test -p sdgen-models --features cuda --test mmdit_parity -- cuda`).
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    fn gpu_check(name: &str, dtype: DType, key: &str, rel: f32) -> Result<()> {
        let dev = Device::new_cuda(0)?;
        let refs = reference();
        let model = load_model(name, dtype, &dev)?;
        let out = run(&model, &inputs(&refs, &dev), &[])?;
        assert_close(&format!("cuda {key}"), &out, &refs[key], rel);
        Ok(())
    }

    // On the GPU the f32 GEMMs may run on TF32 tensor cores (candle's default is off; the bound
    // allows cuBLAS' different blocking, not TF32).
    #[test]
    fn cuda_large_f32() -> Result<()> {
        gpu_check("large", DType::F32, "large_f32", 1e-4)
    }

    #[test]
    fn cuda_medium_f32() -> Result<()> {
        gpu_check("medium", DType::F32, "medium_f32", 1e-4)
    }

    #[test]
    fn cuda_large_bf16() -> Result<()> {
        gpu_check("large", DType::BF16, "large_bf16", BF16_REL)
    }

    #[test]
    fn cuda_medium_bf16() -> Result<()> {
        gpu_check("medium", DType::BF16, "medium_bf16", BF16_REL)
    }

    #[test]
    fn cuda_large_f16() -> Result<()> {
        gpu_check("large", DType::F16, "large_f16", F16_REL)
    }
}
