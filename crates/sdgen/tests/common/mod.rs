//! Shared helpers of the parity tests: reference files and the stated tolerances.
#![allow(dead_code)]

pub mod files;
pub mod hub;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// `testdata/` at the workspace root, or `$SDGEN_TESTDATA` (test binaries built here and run on
/// the GPU machine find the data there, in another folder).
pub fn testdata() -> PathBuf {
    match std::env::var_os("SDGEN_TESTDATA") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata")),
    }
}

/// Opens `file` (a single file or a GGUF) with the configs of the folder `configs`, as
/// `generate --model FILE --config-from FOLDER` does.
pub fn open_configured(file: &Path, configs: &Path) -> sdgen::Result<sdgen::loading::ModelFolder> {
    let options = sdgen::loading::OpenOptions { config_from: Some(configs.to_path_buf()), ..Default::default() };
    sdgen::loading::ModelFolder::open_with(file, &options)
}

/// Loads a reference safetensors file into f32 CPU tensors.
pub fn load(rel: &str) -> std::collections::HashMap<String, Tensor> {
    let path = testdata().join(rel);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The component tolerance of the project: `|a − b| ≤ 1e-4 · max|b|` element-wise.
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor) {
    assert_close_rel(name, actual, expected, 1e-4)
}

/// `|a − b| ≤ rel · max|b|` element-wise.
pub fn assert_close_rel(name: &str, actual: &Tensor, expected: &Tensor, rel: f32) {
    assert_eq!(actual.dims(), expected.dims(), "{name}: shape");
    let a: Vec<f32> = actual.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = expected.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= rel * scale, "{name}: max |diff| {worst:e} > {rel:e} · max|ref| {scale:e}");
}

/// Fraction of channels within 1/255 and the worst difference in 1/255 units.
pub fn image_diff(actual: &[f32], expected: &[f32]) -> (f64, f32) {
    let diffs: Vec<f32> = actual.iter().zip(expected).map(|(a, b)| (a - b).abs() * 255.0).collect();
    let within = diffs.iter().filter(|d| **d <= 1.0).count() as f64 / diffs.len() as f64;
    (within, diffs.iter().fold(0f32, |m, d| m.max(*d)))
}

/// The pipeline tolerance: at least 99.5% of channel values within 1/255 and none over 8/255.
pub fn assert_image_close(name: &str, actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{name}: size");
    let (within, worst) = image_diff(actual, expected);
    assert!(within >= 0.995, "{name}: only {:.3}% of channels within 1/255 (worst {worst:.2}/255)", within * 100.0);
    assert!(worst <= 8.0, "{name}: a channel differs by {worst:.2}/255");
}

/// A generation's images are `seeds`' (in order) and each is `reference`'s image `i` (`[n, h, w,
/// 3]`, diffusers' `output_type="np"`) to the pipeline tolerance; prints each image's figures.
pub fn assert_generation_matches(name: &str, seeds: &[u64], gen: &sdgen::pipeline::Generation, reference: &Tensor) {
    assert_eq!(gen.images.len(), seeds.len(), "{name}");
    for (i, image) in gen.images.iter().enumerate() {
        assert_eq!(image.seed, seeds[i], "{name}");
        let want: Vec<f32> = reference.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let (within, worst) = image_diff(&image.pixels, &want);
        eprintln!("{name} image {i}: {:.3}% within 1/255, worst {worst:.3}/255", within * 100.0);
        assert_image_close(&format!("{name} image {i}"), &image.pixels, &want);
    }
}

/// One whole-pipeline case of `reference/sd15/pipeline.json` (`tools/reference/make_sd15.py`).
#[derive(serde::Deserialize)]
pub struct Case {
    /// The case's name.
    pub name: String,
    /// Prompt.
    pub prompt: String,
    /// Negative prompt, if any.
    pub negative_prompt: Option<String>,
    /// One seed per image.
    pub seeds: Vec<u64>,
    /// Steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// sdgen's `--scheduler` name.
    pub scheduler: String,
    /// The key of its images in `pipeline.safetensors`.
    pub key: String,
}

impl Case {
    /// The engine request for this case (all its images in one batch).
    pub fn request(&self) -> sdgen::pipeline::Request {
        sdgen::pipeline::Request {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            n: self.seeds.len(),
            seed: self.seeds[0],
            steps: Some(self.steps),
            guidance: Some(self.guidance),
            width: Some(self.width),
            height: Some(self.height),
            scheduler: Some(self.scheduler.parse().unwrap()),
            ..Default::default()
        }
    }
}

/// Every case of `reference/sd15/pipeline.json`.
pub fn pipeline_cases() -> Vec<Case> {
    let text = std::fs::read_to_string(testdata().join("reference/sd15/pipeline.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `‖a − b‖ / ‖b‖`, in f64.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    (num / den).sqrt()
}

/// One tiny text-to-image run: 64², 3 steps, guidance 4, seed 7 (the quantised-weights tests).
pub fn tiny_request() -> sdgen::pipeline::Request {
    sdgen::pipeline::Request {
        prompt: "a lighthouse at dusk".into(),
        n: 1,
        seed: 7,
        steps: Some(3),
        guidance: Some(4.0),
        width: Some(64),
        height: Some(64),
        ..Default::default()
    }
}
