//! SD 3.5 through the real `generate` binary on the tiny Large- and Medium-style folders
//! (`testdata/tiny-sd35-*`, `tools/reference/make_sd3.py`): diffusers' image, `--no-t5`,
//! `--max-sequence-length`, `--slg` recorded in the sidecar, `--pro` naming its model, and the
//! options refused where they do not apply.

mod common;

use std::path::Path;

use common::{assert_refused, decode_png, run_json, sidecar, testdata};

fn large() -> String {
    testdata().join("tiny-sd35-large").display().to_string()
}

fn medium() -> String {
    testdata().join("tiny-sd35-medium").display().to_string()
}

/// The PNG against diffusers' float image of case `key` (`reference/sd3/pipeline.safetensors`),
/// to the pipeline tolerance (99.5% of channels within 1/255 after rounding, none over 8).
fn assert_matches_case(png: &Path, key: &str) {
    let path = testdata().join("reference/sd3/pipeline.safetensors");
    let r = sdgen::candle::safetensors::load(&path, &sdgen::candle::Device::Cpu).unwrap();
    let want: Vec<f32> = r[key].get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let (pixels, _, _) = decode_png(png);
    assert_eq!(pixels.len(), want.len(), "{key}: size");
    let diffs: Vec<f32> = pixels.iter().zip(&want).map(|(a, b)| (*a as f32 - b * 255.0).abs()).collect();
    let within = diffs.iter().filter(|d| **d <= 1.5).count() as f64 / diffs.len() as f64;
    assert!(within >= 0.995 && diffs.iter().all(|d| *d <= 8.5), "{key}: {within} within");
}

#[test]
fn sd35_large_writes_diffusers_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args =
        ["a lighthouse at dusk", "--model", &large(), "--seed", "42", "--steps", "6", "--guidance", "5", "--json"];
    let (result, log) = run_json(&args, &out);
    // The folder's own size: sample_size 8 × the VAE's 8.
    assert_eq!((result["width"].as_u64(), result["height"].as_u64()), (Some(64), Some(64)));
    assert_matches_case(Path::new(result["images"][0]["png"].as_str().unwrap()), "large");
    let meta = sidecar(&result);
    assert_eq!(meta["pipeline_type"], "StableDiffusion3Pipeline (SD 3.5)");
    assert_eq!(meta["scheduler"], "flow-euler");
    for stage in ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"] {
        assert!(meta["timings_ms"].get(stage).is_some(), "{stage}: {meta}");
    }
    assert!(log.contains("Before text encoder 3 load") && log.contains("After MMDiT load"), "{log}");
    assert!(meta["extra"].get("skipped_encoders").is_none(), "{meta}");
}

#[test]
fn no_t5_skips_the_encoder_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = [
        "a lighthouse at dusk",
        "--model",
        &large(),
        "--seed",
        "42",
        "--steps",
        "6",
        "--guidance",
        "5",
        "--no-t5",
        "--json",
    ];
    let (result, log) = run_json(&args, &out);
    assert_matches_case(Path::new(result["images"][0]["png"].as_str().unwrap()), "large_no_t5");
    let meta = sidecar(&result);
    assert_eq!(meta["extra"]["skipped_encoders"], serde_json::json!(["text_encoder_3"]));
    assert!(meta["timings_ms"].get("text_encoder_3").is_none(), "{meta}");
    assert!(!log.contains("text encoder 3"), "{log}");
    // The plan does not count the encoder that never loads.
    let plan = meta["extra"]["plan"].to_string();
    assert!(!plan.contains("text_encoder_3"), "{plan}");
}

#[test]
fn skip_layer_guidance_and_sequence_length_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = [
        "a lighthouse at dusk",
        "--model",
        &medium(),
        "--seed",
        "42",
        "--steps",
        "10",
        "--guidance",
        "5",
        "--slg",
        "1",
        "--json",
    ];
    let (result, _) = run_json(&args, &out);
    assert_matches_case(Path::new(result["images"][0]["png"].as_str().unwrap()), "medium_slg");
    let meta = sidecar(&result);
    assert_eq!(meta["extra"]["skip_layer_guidance"]["layers"], serde_json::json!([1]));
    assert_eq!(meta["extra"]["skip_layer_guidance"]["scale"], 2.8);

    let out = dir.path().join("out77");
    let args = [
        "a lighthouse at dusk",
        "--model",
        &large(),
        "--seed",
        "5",
        "--steps",
        "4",
        "--guidance",
        "3.5",
        "--negative",
        "blurry, low quality",
        "--max-sequence-length",
        "77",
        "--json",
    ];
    let (result, _) = run_json(&args, &out);
    assert_matches_case(Path::new(result["images"][0]["png"].as_str().unwrap()), "large_t5_77");
    assert_eq!(sidecar(&result)["extra"]["max_sequence_length"], 77);
}

#[test]
fn sd35_options_are_refused_where_they_do_not_apply() {
    let sd15 = common::tiny_model();
    assert_refused(&["x", "--model", &sd15, "--no-t5"], &["--no-t5", "T5"]);
    assert_refused(&["x", "--model", &sd15, "--slg", "7,8,9"], &["--slg"]);
    assert_refused(&["x", "--model", &large(), "--max-sequence-length", "600"], &["--max-sequence-length", "512"]);
    assert_refused(&["x", "--model", &medium(), "--slg", "7"], &["--slg", "layer 7"]);
    assert_refused(&["x", "--model", &medium(), "--slg", "1", "--guidance", "1"], &["--slg", "--guidance"]);
    assert_refused(&["x", "--model", &large(), "--scheduler", "ddim"], &["ddim"]);
    assert_refused(&["x", "--pro", "--model", &large()], &["--pro", "--model"]);
    // --pro is SD 3.5 Large from the hub: offline with an empty cache, the repository is named.
    assert_refused(&["x", "--pro", "--offline"], &["stabilityai/stable-diffusion-3.5-large"]);
}

/// A single-file SD 3.5 Medium (`testdata/tiny-sd35-single`, Stability's layout, its encoders in
/// `text_encoders/` beside it) with its folder's configs: diffusers' image, the sidecar naming
/// the file; the Large file (encoders inside) without T5.
#[test]
fn sd35_single_file_writes_diffusers_image() {
    let dir = tempfile::tempdir().unwrap();
    let single = testdata().join("tiny-sd35-single");
    let file = single.join("tiny-sd35-medium.safetensors").display().to_string();
    let out = dir.path().join("out");
    let args = [
        "a lighthouse at dusk",
        "--model",
        &file,
        "--config-from",
        &medium(),
        "--seed",
        "42",
        "--steps",
        "6",
        "--guidance",
        "5",
        "--json",
    ];
    let (result, log) = run_json(&args, &out);
    assert_matches_case(Path::new(result["images"][0]["png"].as_str().unwrap()), "medium");
    let meta = sidecar(&result);
    assert_eq!(meta["pipeline_type"], "StableDiffusion3Pipeline (SD 3.5)");
    assert!(meta["model"].as_str().unwrap().ends_with("tiny-sd35-medium.safetensors"), "{meta}");
    assert!(log.contains("Before text encoder 3 load"), "{log}");

    let file = single.join("tiny-sd35-large.safetensors").display().to_string();
    let out = dir.path().join("out-large");
    let args = [
        "a lighthouse at dusk",
        "--model",
        &file,
        "--config-from",
        &large(),
        "--seed",
        "42",
        "--steps",
        "6",
        "--guidance",
        "5",
        "--no-t5",
        "--json",
    ];
    let (result, _) = run_json(&args, &out);
    assert_matches_case(Path::new(result["images"][0]["png"].as_str().unwrap()), "large_no_t5");
}

/// A Medium file given Large's configs, and a file whose `text_encoders/` lacks CLIP-G: refused
/// as bad input, naming both sizes, and the missing file with the folder it was looked for in.
#[test]
fn sd35_single_file_mismatches_are_refused() {
    let single = testdata().join("tiny-sd35-single");
    let file = single.join("tiny-sd35-medium.safetensors").display().to_string();
    assert_refused(
        &["x", "--model", &file, "--config-from", &large()],
        &["SD 3.5 Medium checkpoint", "attn2", "Stable Diffusion 3.5 Large's"],
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sd3.5_medium.safetensors");
    std::fs::copy(&file, &copy).unwrap();
    std::fs::create_dir(dir.path().join("text_encoders")).unwrap();
    for f in ["clip_l.safetensors", "t5xxl_fp16.safetensors"] {
        std::fs::copy(single.join("text_encoders").join(f), dir.path().join("text_encoders").join(f)).unwrap();
    }
    let folder = dir.path().join("text_encoders").display().to_string();
    assert_refused(
        &["x", "--model", copy.to_str().unwrap(), "--config-from", &medium()],
        &["clip_g.safetensors", &folder, "text_encoders.clip_g.transformer.*"],
    );
}
