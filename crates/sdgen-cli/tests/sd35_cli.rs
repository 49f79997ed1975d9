//! SD 3.5 through the real `generate` binary on the tiny Large- and Medium-style folders
//! (`testdata/tiny-sd35-*`, `tools/reference/make_sd3.py`): diffusers' image, `--no-t5`,
//! `--max-sequence-length`, `--slg` recorded in the sidecar, `--pro` naming its model, and the
//! options refused where they do not apply. `--pro` itself (alone, with `--no-t5`, and
//! `--refiner` after it, `tools/reference/make_sd3_refiner.py`) runs against a local hub server
//! that serves the tiny folders under the real repositories' ids, with the seed's log lines in
//! order and the sidecar recording stages, peaks, plans and the unload. Single-file SD 3.5
//! (`testdata/tiny-sd35-single`) runs from Stability's layout.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_in_order, assert_refused, decode_png, files_in, generate_from_hub, hub_server, run_json, sidecar, stderr,
    testdata,
};
use sdgen::loading::{NAMED_MODELS, PRO_MODEL};

/// What `--pro` downloads, and the refiner of the seed's `--pro --refiner` command.
const PRO_REPO: &str = "stabilityai/stable-diffusion-3.5-large";
const REFINER_REPO: &str = "stabilityai/stable-diffusion-xl-refiner-1.0";

fn large() -> String {
    testdata().join("tiny-sd35-large").display().to_string()
}

fn medium() -> String {
    testdata().join("tiny-sd35-medium").display().to_string()
}

/// `generate`'s arguments for a reference case (`make_sd3.py`'s prompt, seed 42, guidance 5):
/// the model's, the steps and `extra` flags, with `--json`.
fn reference_run(model: &[&str], steps: &str, extra: &[&str]) -> Vec<String> {
    let common = ["--seed", "42", "--steps", steps, "--guidance", "5"];
    std::iter::once("a lighthouse at dusk")
        .chain(model.iter().copied())
        .chain(common)
        .chain(extra.iter().copied())
        .chain(["--json"])
        .map(String::from)
        .collect()
}

/// The PNG against diffusers' float image of case `key` (`reference/sd3/pipeline.safetensors`),
/// to the pipeline tolerance (99.5% of channels within 1/255 after rounding, none over 8).
fn assert_matches_case(png: &Path, key: &str) {
    assert_matches_in(png, "pipeline.safetensors", key)
}

/// [`assert_matches_case`] for image 0 of `key` in `reference/sd3/<file>`.
fn assert_matches_in(png: &Path, file: &str, key: &str) {
    let path = testdata().join("reference/sd3").join(file);
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
    assert_matches_case(&png(&result), "large");
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
    let args = reference_run(&["--model", &large()], "6", &["--no-t5"]);
    let (result, log) = run_json(&args.iter().map(String::as_str).collect::<Vec<_>>(), &out);
    assert_matches_case(&png(&result), "large_no_t5");
    let meta = sidecar(&result);
    assert_eq!(meta["extra"]["skipped_encoders"], serde_json::json!(["text_encoder_3"]));
    assert!(meta["timings_ms"].get("text_encoder_3").is_none(), "{meta}");
    assert!(!log.contains("text encoder 3"), "{log}");
    // The plan does not count the encoder that never loads.
    let plan = meta["extra"]["plan"].to_string();
    assert!(!plan.contains("text_encoder_3"), "{plan}");
}

/// A folder without T5 runs on the CLIP encoders, and the warning names the flag that says so.
#[test]
fn a_folder_without_t5_warns_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = testdata().join("tiny-sd35-medium-no-t5").display().to_string();
    let (result, log) =
        run_json(&["x", "--model", &model, "--steps", "1", "-W", "64", "-H", "64", "--json"], &dir.path().join("o"));
    let warning = "has no text encoder 3: the prompt is read by the other encoders only (as --no-t5)";
    assert!(log.contains(warning), "{log}");
    let meta = sidecar(&result);
    assert!(meta["warnings"].to_string().contains(warning), "{meta}");
}

#[test]
fn skip_layer_guidance_and_sequence_length_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = reference_run(&["--model", &medium()], "10", &["--slg", "1"]);
    let (result, _) = run_json(&args.iter().map(String::as_str).collect::<Vec<_>>(), &out);
    assert_matches_case(&png(&result), "medium_slg");
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
    assert_matches_case(&png(&result), "large_t5_77");
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
    let args = reference_run(&["--model", &file, "--config-from", &medium()], "6", &[]);
    let (result, log) = run_json(&args.iter().map(String::as_str).collect::<Vec<_>>(), &out);
    assert_matches_case(&png(&result), "medium");
    let meta = sidecar(&result);
    assert_eq!(meta["pipeline_type"], "StableDiffusion3Pipeline (SD 3.5)");
    assert!(meta["model"].as_str().unwrap().ends_with("tiny-sd35-medium.safetensors"), "{meta}");
    assert!(log.contains("Before text encoder 3 load"), "{log}");

    let file = single.join("tiny-sd35-large.safetensors").display().to_string();
    let out = dir.path().join("out-large");
    let args = reference_run(&["--model", &file, "--config-from", &large()], "6", &["--no-t5"]);
    let (result, _) = run_json(&args.iter().map(String::as_str).collect::<Vec<_>>(), &out);
    assert_matches_case(&png(&result), "large_no_t5");
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

/// A hub with the tiny SD 3.5 Large as `--pro`'s repository and the tiny SDXL refiner as the
/// real refiner's; a temporary folder for the cache and the output.
struct Hub {
    server: hub_test_server::HubServer,
    dir: tempfile::TempDir,
}

impl Hub {
    fn start() -> Self {
        // --pro is the named model sd35-large, whose repository this is.
        let pro = NAMED_MODELS.iter().find(|m| m.name == PRO_MODEL).unwrap();
        assert_eq!(pro.repo, PRO_REPO);
        let server = hub_server(&[(PRO_REPO, "tiny-sd35-large"), (REFINER_REPO, "tiny-sdxl-refiner")]);
        Self { server, dir: tempfile::tempdir().unwrap() }
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str], out: &Path) -> std::process::Output {
        generate_from_hub(args, out, &self.server.endpoint(), &self.dir.path().join("hf"))
    }

    /// A run that must succeed: its `--json` document and its stderr.
    fn run_json(&self, args: &[&str], out: &Path) -> (serde_json::Value, String) {
        let o = self.run(args, out);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        (serde_json::from_slice(&o.stdout).expect("one JSON document"), stderr(&o))
    }

    /// A run refused as bad input: exit 2, `needles` in the message, nothing written.
    fn assert_refused(&self, args: &[&str], needles: &[&str]) {
        let out = self.out("refused");
        let o = self.run(args, &out);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: `{n}` not in: {err}");
        }
        assert!(o.stdout.is_empty() && !out.exists(), "{args:?}: {:?}", files_in(&out));
    }
}

fn png(result: &serde_json::Value) -> PathBuf {
    PathBuf::from(result["images"][0]["png"].as_str().unwrap())
}

/// The labels of the sidecar's per-stage memory, each with a measured peak.
fn stages_with_peaks(meta: &serde_json::Value) -> Vec<String> {
    let stages = meta["extra"]["memory"].as_array().expect("per-stage memory");
    for s in stages {
        assert!(s["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0), "{s}");
        assert!(s["before"]["process_rss_bytes"].as_u64().is_some() && s["after"].is_object(), "{s}");
    }
    stages.iter().map(|s| s["label"].as_str().unwrap().to_string()).collect()
}

/// The seed's lines of a base run up to its decode. `🧹 Preparing memory for large model...` and
/// the low-memory warning of the requirement table come only for real sizes (4 GB of weights
/// and more: `sdgen::planning`'s tests), never for the tiny folders.
const BASE_LINES: [&str; 10] = [
    "💾 Memory [Startup]",
    "💾 Memory [Before model load]",
    "💾 Memory [Before text encoder load]",
    "💾 Memory [Before MMDiT load]",
    "💾 Memory [After model load]",
    "🧹 Cleaning memory before generation...",
    "💾 Memory [Before generation]",
    "💾 Memory [After generation]",
    "💾 Memory [After MMDiT]",
    "💾 Memory [After VAE]",
];

/// `generate "…" --pro`: SD 3.5 Large from the hub at its defaults (28 steps, guidance 3.5),
/// diffusers' image for them (the base of `reference/sd3/refiner.*`'s `pro_defaults`).
#[test]
fn pro_runs_sd35_large_at_its_defaults() {
    let hub = Hub::start();
    let out = hub.out("out");
    let (result, log) = hub.run_json(&["a lighthouse at dusk", "--pro", "--seed", "42", "--json"], &out);
    assert_matches_in(&png(&result), "refiner.safetensors", "pro_defaults_base");
    assert_in_order(&log, &BASE_LINES);
    assert_in_order(&log, &["💾 Memory [After VAE]", "💾 Memory [Complete]"]);
    // A tiny folder is no large model and sets off no low-memory warning (real sizes do).
    assert!(!log.contains("Preparing memory for large model") && !log.contains("Low memory detected"), "{log}");
    assert!(!log.contains("main pipeline unload"), "{log}");
    let meta = sidecar(&result);
    assert_eq!(meta["model"], PRO_REPO);
    assert_eq!(meta["pipeline_type"], "StableDiffusion3Pipeline (SD 3.5)");
    assert_eq!((meta["steps"].as_u64(), meta["guidance"].as_f64()), (Some(28), Some(3.5)));
    assert_eq!(meta["scheduler"], "flow-euler");
    let stages = ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"];
    assert_eq!(stages_with_peaks(&meta), stages);
    for stage in stages {
        assert!(meta["timings_ms"].get(stage).is_some(), "{stage}: {meta}");
    }
    let planned: Vec<&str> =
        meta["extra"]["plan"]["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(planned, ["text_encoder", "text_encoder_2", "text_encoder_3", "denoise", "decode"]);
    assert!(meta["extra"].get("refiner").is_none() && meta["extra"].get("refiner_plan").is_none(), "{meta}");
}

/// `generate "…" --pro --refiner stabilityai/stable-diffusion-xl-refiner-1.0`, the seed's
/// command: SD 3.5 runs all its steps and decodes, the whole SD 3.5 pipeline is unloaded, and
/// the refiner reworks the image by image-to-image at its strength (0.3: the last 15 of its 50
/// steps); the image is diffusers' for the same two calls.
#[test]
fn pro_refiner_reworks_the_decoded_image() {
    let hub = Hub::start();
    let out = hub.out("out");
    let args = ["a lighthouse at dusk", "--pro", "--refiner", REFINER_REPO, "--seed", "42", "--json"];
    let (result, log) = hub.run_json(&args, &out);
    assert_matches_in(&png(&result), "refiner.safetensors", "pro_defaults");
    assert_in_order(&log, &BASE_LINES);
    assert_in_order(
        &log,
        &[
            "Then refining with Stable Diffusion XL refiner (stabilityai/stable-diffusion-xl-refiner-1.0) from the \
             decoded images: strength 0.3 (the last 15 of 50 steps), euler scheduler, guidance 5",
            "💾 Memory [After VAE]",
            // The whole SD 3.5 pipeline is gone before the refiner's first model loads.
            "💾 Memory [After main pipeline unload]",
            "💾 Memory [Before refiner text encoder 2 load]",
            "💾 Memory [Before refiner VAE encoder load]",
            "💾 Memory [Before refiner UNet load]",
            "🧹 Cleaning memory before generation...",
            "💾 Memory [After refiner UNet]",
            "💾 Memory [Before refiner VAE load]",
            "💾 Memory [After refiner VAE]",
            "💾 Memory [After refiner]",
            "💾 Memory [Complete]",
        ],
    );
    let meta = sidecar(&result);
    assert_eq!(meta["model"], PRO_REPO);
    assert_eq!(meta["pipeline_type"], "StableDiffusion3Pipeline (SD 3.5)");
    assert_eq!((meta["steps"].as_u64(), meta["guidance"].as_f64()), (Some(28), Some(3.5)));
    let r = &meta["extra"]["refiner"];
    assert_eq!(r["model"], REFINER_REPO);
    assert_eq!(r["pipeline_type"], "StableDiffusionXLImg2ImgPipeline (SDXL refiner)");
    assert_eq!(r["handoff"], "image");
    assert_eq!(r["strength"], 0.3);
    assert!(r.get("high_noise_fraction").is_none(), "{r}");
    // The refiner at its own defaults, not SD 3.5's.
    assert_eq!(
        (r["steps"].as_u64(), r["guidance"].as_f64(), r["scheduler"].as_str()),
        (Some(50), Some(5.0), Some("euler"))
    );
    assert_eq!((r["base_steps"].as_u64(), r["refiner_steps"].as_u64()), (Some(28), Some(15)));
    assert_eq!(r["handoff_timestep"], 281.0);
    // Measured: what the base left in use after its unload, well under its denoiser's weights
    // and the allocator's slack.
    assert_eq!(r["base_unloaded"], true);
    assert!(r["base_resident_bytes"].as_u64().is_some_and(|b| b < 64 << 20), "{r}");
    // Both halves' stages, apart, each with its peak; the unload's snapshot below the base's peaks.
    let stages = stages_with_peaks(&meta);
    let want = [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "transformer",
        "vae",
        "refiner_text_encoder_2",
        "refiner_vae_encoder",
        "refiner_unet",
        "refiner_vae",
    ];
    assert_eq!(stages, want);
    for stage in want {
        assert!(meta["timings_ms"].get(stage).is_some(), "{stage}: {meta}");
    }
    let transformer_peak = meta["extra"]["memory"][3]["peak_rss_bytes"].as_u64().unwrap();
    let after_unload = r["memory_after_unload"]["process_rss_bytes"].as_u64().expect("the unload's snapshot");
    assert!(
        after_unload <= transformer_peak,
        "{after_unload} after the unload > the transformer's peak {transformer_peak}"
    );
    // Both halves planned: the refiner's on its own, with its VAE encoder.
    let planned = |key: &str| -> Vec<String> {
        let stages = meta["extra"][key]["stages"].as_array().unwrap();
        stages.iter().map(|s| s["stage"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(planned("plan"), ["text_encoder", "text_encoder_2", "text_encoder_3", "denoise", "decode"]);
    assert_eq!(planned("refiner_plan"), ["text_encoder_2", "encode_image", "denoise", "decode"]);
    assert!(meta["memory_optimizations"].as_str().unwrap().contains("pipeline_unloading"), "{meta}");
}

/// `--pro --no-t5`: T5 never runs nor is planned; diffusers' image without it.
#[test]
fn pro_without_t5() {
    let hub = Hub::start();
    let out = hub.out("out");
    let args =
        ["a lighthouse at dusk", "--pro", "--no-t5", "--seed", "42", "--steps", "6", "--guidance", "5", "--json"];
    let (result, log) = hub.run_json(&args, &out);
    assert_matches_case(&png(&result), "large_no_t5");
    let mut lines: Vec<&str> = BASE_LINES.to_vec();
    lines.insert(3, "💾 Memory [Before text encoder 2 load]");
    assert_in_order(&log, &lines);
    assert_in_order(&log, &["💾 Memory [After VAE]", "💾 Memory [Complete]"]);
    assert!(!log.contains("text encoder 3"), "{log}");
    let meta = sidecar(&result);
    assert_eq!(meta["pipeline_type"], "StableDiffusion3Pipeline (SD 3.5)");
    assert_eq!(meta["extra"]["skipped_encoders"], serde_json::json!(["text_encoder_3"]));
    assert_eq!(stages_with_peaks(&meta), ["text_encoder", "text_encoder_2", "transformer", "vae"]);
    assert!(!meta["extra"]["plan"].to_string().contains("text_encoder_3"), "{meta}");
}

/// What `--pro --refiner` refuses before any weight loads, with nothing written: a refiner that
/// cannot take images (an SD 3.5 model), the latent handoff's knob, strengths out of range.
#[test]
fn pro_refiner_refusals() {
    let hub = Hub::start();
    let medium = testdata().join("tiny-sd35-medium").display().to_string();
    hub.assert_refused(
        &["x", "--pro", "--refiner", &medium],
        &["--refiner", &medium, "Stable Diffusion 3.5 Medium", "not an SDXL refiner"],
    );
    hub.assert_refused(
        &["x", "--pro", "--refiner", REFINER_REPO, "--refiner-start", "0.8"],
        &["--refiner-start 0.8", "decoded images", "--refiner-strength"],
    );
    hub.assert_refused(
        &["x", "--pro", "--refiner", REFINER_REPO, "--steps", "10", "--refiner-strength", "0.05"],
        &["--refiner-strength 0.05 with 10 steps leaves the refiner no step"],
    );
    hub.assert_refused(
        &["x", "--pro", "--refiner", REFINER_REPO, "--refiner-strength", "1.5"],
        &["--refiner-strength 1.5", "[0, 1]"],
    );
    hub.assert_refused(&["x", "--pro", "--refiner-strength", "0.3"], &["--refiner-strength needs --refiner"]);
    // The latent handoff (SDXL) has no image to rework.
    let (sdxl, refiner) = (testdata().join("tiny-sdxl"), testdata().join("tiny-sdxl-refiner"));
    let (sdxl, refiner) = (sdxl.display().to_string(), refiner.display().to_string());
    assert_refused(
        &["x", "--model", &sdxl, "--refiner", &refiner, "--refiner-strength", "0.3"],
        &["--refiner-strength", "--refiner-start"],
    );
}

/// `--vae` with a refiner after SD 3.5 replaces the base's VAE only: the refiner, in another
/// latent space, keeps its own (the same VAE from its own folder gives diffusers' image).
#[test]
fn vae_replaces_only_the_base_s_before_an_image_handoff() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let vae = testdata().join("tiny-sd35-large/vae").display().to_string();
    let refiner = testdata().join("tiny-sdxl-refiner").display().to_string();
    let args =
        ["a lighthouse at dusk", "--model", &large(), "--vae", &vae, "--refiner", &refiner, "--seed", "42", "--json"];
    let (result, _) = run_json(&args, &out);
    assert_matches_in(&png(&result), "refiner.safetensors", "pro_defaults");
    let meta = sidecar(&result);
    assert_eq!(meta["extra"]["vae"], vae.as_str());
    assert_eq!(meta["extra"]["refiner"]["model"], refiner.as_str());
}

/// Stability's SD 3.5 repositories are gated: `--pro` without a token is refused naming the
/// repository, where to accept its licence and the token to set — before anything is written.
#[test]
fn pro_on_a_gated_repo_without_a_token_says_what_to_do() {
    let repo = hub_test_server::FakeRepo::from_dir(PRO_REPO, &testdata().join("tiny-sd35-large"))
        .unwrap()
        .gated("hf_secret", 401);
    let server = hub_test_server::HubServer::start(vec![repo]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = generate_from_hub(&["x", "--pro", "--steps", "1"], &out, &server.endpoint(), &dir.path().join("hf"));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for part in [PRO_REPO, &format!("https://huggingface.co/{PRO_REPO}"), "HF_TOKEN"] {
        assert!(err.contains(part), "`{part}` not in: {err}");
    }
    assert!(o.stdout.is_empty() && !out.exists(), "{:?}", files_in(&out));
}
