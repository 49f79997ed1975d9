//! The T5 encoder against transformers 5.25's `T5EncoderModel` on the tiny random model of
//! `tools/reference/make_t5.py` (testdata/tiny-t5/text_encoder_3: d_model 64, 4 heads of 16, d_ff
//! 96, 2 blocks, gated-GELU; and a ReLU-FF twin stored in the reference file), on the token ids of
//! eight prompts at 77 tokens and three at 256.
//!
//! Tolerances, relative to the largest |value| of the reference:
//! - f32: 1e-5 (reached: 1.6e-6 at 77 tokens, 4.2e-6 at 256; summation order);
//! - bf16 and f16 against transformers' own bf16 / f16 runs (f16 with `wo` kept in f32): 2e-2 for
//!   bf16 (reached 1.4e-2, about 4 bf16 ulps at that scale) and 3e-3 for f16 (reached 1.5e-3).
//!   For scale, transformers' bf16 run is 2.6e-2 from its own f32 run, its f16 run 2.9e-3. What is
//!   left is torch's CPU SDPA rounding the probabilities to the half type before `p·v` (ours keep
//!   them in f32) and GEMM blocking.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use sdgen_models::t5::{relative_position_bucket, FeedForwardProj, T5Config, T5EncoderModel};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(Path::new(ROOT).join("testdata/reference/sd3/t5.safetensors"), &Device::Cpu).unwrap()
}

fn config() -> T5Config {
    let text = std::fs::read_to_string(Path::new(ROOT).join("testdata/tiny-t5/text_encoder_3/config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn model(dtype: DType) -> T5EncoderModel {
    let weights = candle_core::safetensors::load(
        Path::new(ROOT).join("testdata/tiny-t5/text_encoder_3/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    T5EncoderModel::new(&config(), VarBuilder::from_tensors(weights, dtype, &Device::Cpu)).unwrap()
}

/// `max|got − want| / max|want|`, both taken in f32.
fn rel_diff(got: &Tensor, want: &Tensor) -> Result<f32> {
    assert_eq!(got.dims(), want.dims());
    let got = got.to_dtype(DType::F32)?;
    let want = want.to_dtype(DType::F32)?;
    let diff = (&got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale)
}

#[test]
fn f32_matches_transformers() -> Result<()> {
    let r = reference();
    let m = model(DType::F32);
    for len in [77, 256] {
        let out = m.forward(&r[&format!("ids.{len}")])?;
        assert_eq!(out.dtype(), DType::F32);
        let rel = rel_diff(&out, &r[&format!("out.f32.{len}")])?;
        println!("f32 at {len} tokens: {rel:e}");
        assert!(rel <= 1e-5, "f32 at {len} tokens: max rel diff {rel:e}");
    }
    let masked = m.forward_with_mask(&r["ids.77"], Some(&r["mask.77"]))?;
    let rel = rel_diff(&masked, &r["out_masked.f32.77"])?;
    assert!(rel <= 1e-5, "f32 with attention mask: max rel diff {rel:e}");
    // The mask matters (the padding positions are not attended to).
    assert!(rel_diff(&masked, &r["out.f32.77"])? > 1e-3);
    Ok(())
}

#[test]
fn relu_feed_forward_matches_transformers() -> Result<()> {
    let r = reference();
    let cfg = T5Config { feed_forward_proj: FeedForwardProj::Relu, ..config() };
    let vb = VarBuilder::from_tensors(r.clone(), DType::F32, &Device::Cpu).pp("relu");
    let m = T5EncoderModel::new(&cfg, vb)?;
    let rel = rel_diff(&m.forward(&r["ids.77"])?, &r["relu_out.77"])?;
    assert!(rel <= 1e-5, "relu: max rel diff {rel:e}");
    Ok(())
}

#[test]
fn half_precision_matches_transformers() -> Result<()> {
    let r = reference();
    for (dtype, name, bound) in [(DType::BF16, "bf16", 2e-2), (DType::F16, "f16", 3e-3)] {
        let m = model(dtype);
        let out = m.forward(&r["ids.77"])?;
        assert_eq!(out.dtype(), dtype);
        let rel = rel_diff(&out, &r[&format!("out.{name}.77")])?;
        let masked = m.forward_with_mask(&r["ids.77"], Some(&r["mask.77"]))?;
        let rel_masked = rel_diff(&masked, &r[&format!("out_masked.{name}.77")])?;
        // For scale: how far transformers' own half-precision run is from its f32 run.
        let theirs = rel_diff(&r[&format!("out.{name}.77")], &r["out.f32.77"])?;
        println!("{name}: {rel:e} (masked {rel_masked:e}); transformers' {name} vs f32: {theirs:e}");
        assert!(rel <= bound && rel_masked <= bound, "{name}: max rel diff {rel:e} / masked {rel_masked:e}");
    }
    Ok(())
}

#[test]
fn buckets_match_transformers() -> Result<()> {
    let r = reference();
    for (buckets, distance) in [(32, 128), (64, 256)] {
        let want: Vec<i64> = r[&format!("buckets.{buckets}.{distance}")].to_vec1()?;
        for (i, &w) in want.iter().enumerate() {
            let offset = i as i64 - 600;
            assert_eq!(relative_position_bucket(offset, buckets, distance) as i64, w, "offset {offset}");
        }
    }
    Ok(())
}

#[test]
fn embedding_under_either_key() -> Result<()> {
    let mut weights = candle_core::safetensors::load(
        Path::new(ROOT).join("testdata/tiny-t5/text_encoder_3/model.safetensors"),
        &Device::Cpu,
    )?;
    let shared = weights.remove("shared.weight").unwrap();
    weights.insert("encoder.embed_tokens.weight".into(), shared);
    let m = T5EncoderModel::new(&config(), VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu))?;
    let r = reference();
    assert!(rel_diff(&m.forward(&r["ids.77"])?, &r["out.f32.77"])? <= 1e-5);
    Ok(())
}
