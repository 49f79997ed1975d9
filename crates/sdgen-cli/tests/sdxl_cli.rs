//! SDXL through the real `generate` binary: the tiny base and refiner (`testdata/tiny-sdxl*`)
//! against diffusers' images (`testdata/reference/sdxl/png`, `tools/reference/make_sdxl.py`),
//! `--refiner` with its metadata and the seed's log lines, `--vae`, and refusals of the wrong
//! models.

mod common;

use std::path::Path;

use common::{assert_png_close, assert_refused, files_in, run_json, sidecar, stderr, testdata};

fn base() -> String {
    testdata().join("tiny-sdxl").display().to_string()
}

fn refiner() -> String {
    testdata().join("tiny-sdxl-refiner").display().to_string()
}

/// diffusers' image `reference` of `testdata/reference/sdxl/png`, to the pipeline tolerance.
fn assert_png_matches(png: &Path, reference: &str) {
    assert_png_close(png, &testdata().join("reference/sdxl/png").join(reference));
}

#[test]
fn sdxl_base_writes_diffusers_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // The folder's defaults: 64² (sample_size 8 × 8), its Euler scheduler; guidance 5 as SDXL's.
    let (result, log) =
        run_json(&["a lighthouse at dusk", "--model", &base(), "--seed", "42", "--steps", "8", "--json"], &out);
    assert_eq!((result["width"].as_u64(), result["height"].as_u64()), (Some(64), Some(64)));
    assert_eq!(result["guidance"], 5.0);
    assert_png_matches(Path::new(result["images"][0]["png"].as_str().unwrap()), "base_0.png");
    let meta = sidecar(&result);
    assert_eq!(meta["pipeline_type"], "StableDiffusionXLPipeline (SDXL)");
    assert!(meta["timings_ms"].get("text_encoder_2").is_some(), "{meta}");
    assert!(log.contains("Before text encoder 2 load"), "{log}");
}

/// A1111's chunks through both SDXL encoders (side by side per chunk, the pooled text from the
/// first chunk) against a shorter negative: runs whole, nothing dropped.
#[test]
fn sdxl_reads_long_weighted_prompts_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let long = "a (lighthouse:1.3) on a rocky coast at dusk, [fog], ".repeat(10);
    let (_, log) = run_json(
        &[&long, "--model", &base(), "--negative", "blurry", "--seed", "1", "--steps", "2", "--json"],
        &dir.path().join("out"),
    );
    assert!(!log.contains("dropped"), "{log}");
}

#[test]
fn refiner_finishes_the_base_run_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = [
        "a lighthouse at dusk",
        "--model",
        &base(),
        "--refiner",
        &refiner(),
        "--seed",
        "42",
        "--steps",
        "10",
        "--json",
    ];
    let (result, log) = run_json(&args, &out);
    assert_png_matches(Path::new(result["images"][0]["png"].as_str().unwrap()), "ensemble_0.png");
    let meta = sidecar(&result);
    let r = &meta["extra"]["refiner"];
    assert_eq!(r["model"], refiner().as_str(), "{meta}");
    assert_eq!(r["high_noise_fraction"], 0.8);
    assert_eq!((r["base_steps"].as_u64(), r["refiner_steps"].as_u64()), (Some(8), Some(2)));
    assert_eq!(r["handoff_timestep"], 101.0);
    // Measured: what the base left in use after its unload, well under its denoiser's weights
    // and the allocator's slack.
    assert_eq!(r["base_unloaded"], true);
    assert!(r["base_resident_bytes"].as_u64().is_some_and(|b| b < 64 << 20), "{r}");
    assert!(meta["extra"]["refiner_plan"]["stages"].is_array(), "{meta}");
    // Both halves' stages are kept apart in the timings.
    for stage in ["text_encoder", "text_encoder_2", "unet", "refiner_text_encoder_2", "refiner_unet", "vae"] {
        assert!(meta["timings_ms"].get(stage).is_some(), "{stage}: {meta}");
    }
    // The seed's order: the base's stages, the main pipeline unloaded, the refiner loaded, used
    // and unloaded, then completion.
    let order = [
        "Before UNet load",
        "After UNet",
        "After main pipeline unload",
        "Before refiner text encoder 2 load",
        "Before refiner UNet load",
        "After refiner UNet",
        "After refiner",
        "Complete",
    ];
    let mut at = 0;
    for label in order {
        let needle = format!("Memory [{label}]");
        let pos = log[at..].find(&needle).unwrap_or_else(|| panic!("`{needle}` missing or out of order in:\n{log}"));
        at += pos + needle.len();
    }
}

#[test]
fn vae_replaces_the_models_own() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // The same VAE from its own folder gives the same image; the sidecar names it.
    let vae = testdata().join("tiny-sdxl/vae").display().to_string();
    let args = ["a lighthouse at dusk", "--model", &base(), "--vae", &vae, "--seed", "42", "--steps", "8", "--json"];
    let (result, _) = run_json(&args, &out);
    assert_png_matches(Path::new(result["images"][0]["png"].as_str().unwrap()), "base_0.png");
    assert_eq!(sidecar(&result)["extra"]["vae"], vae.as_str());

    // A VAE with other latents (16 channels, as SD 3's) is refused before anything loads.
    let other = dir.path().join("vae16");
    std::fs::create_dir_all(&other).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(testdata().join("tiny-sdxl/vae/config.json")).unwrap()).unwrap();
    config["latent_channels"] = 16.into();
    std::fs::write(other.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        testdata().join("tiny-sdxl/vae/diffusion_pytorch_model.safetensors"),
        other.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let other = other.display().to_string();
    assert_refused(&["x", "--model", &base(), "--vae", &other], &["--vae", &other, "16 channels"]);
    // Not a VAE at all: a UNet folder.
    let unet = testdata().join("tiny-sdxl/unet").display().to_string();
    assert_refused(&["x", "--model", &base(), "--vae", &unet], &["--vae", "not an AutoencoderKL"]);
    // Clip skip is SD 1.5's setting (SDXL already reads the penultimate layers).
    assert_refused(&["x", "--model", &base(), "--clip-skip", "2", "--steps", "1"], &["--clip-skip", "SD 1.5"]);
    let missing = dir.path().join("no-such-vae").display().to_string();
    assert_refused(&["x", "--model", &base(), "--vae", &missing], &["--vae", "no config.json"]);
}

/// `--vae ORG/REPO`: a single-model hub repo (config.json and weights at its root, as
/// madebyollin/sdxl-vae-fp16-fix) is downloaded into the cache and used.
#[test]
fn vae_from_the_hub() {
    use hub_test_server::{FakeRepo, HubServer};
    let repo = "madebyollin/sdxl-vae-fp16-fix";
    let server = HubServer::start(vec![FakeRepo::from_dir(repo, &testdata().join("tiny-sdxl/vae")).unwrap()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(["a lighthouse at dusk", "--model", &base(), "--vae", repo, "--seed", "42", "--steps", "8", "--json"])
        .arg("--output")
        .arg(dir.path().join("out"))
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_HOME", dir.path().join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_png_matches(Path::new(result["images"][0]["png"].as_str().unwrap()), "base_0.png");
    assert_eq!(sidecar(&result)["extra"]["vae"], repo);
    assert!(dir.path().join("hf/hub/models--madebyollin--sdxl-vae-fp16-fix").is_dir());
}

#[test]
fn refiner_refines_a_finished_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let init = testdata().join("reference/sdxl/refiner_init.png").display().to_string();
    let args = [
        "a lighthouse at dusk",
        "--model",
        &refiner(),
        "--init-image",
        &init,
        // No --strength: SDXL's img2img default, 0.3 (SD 1.5's is 0.8), as the reference used.
        "--seed",
        "51",
        "--steps",
        "10",
        "--json",
    ];
    let (result, log) = run_json(&args, &out);
    assert!(log.contains("strength 0.3: the last 3 of 10 steps"), "{log}");
    assert_png_matches(Path::new(result["images"][0]["png"].as_str().unwrap()), "refiner_img2img_0.png");
    assert_eq!(sidecar(&result)["pipeline_type"], "StableDiffusionXLImg2ImgPipeline (SDXL refiner)");
    assert_eq!(files_in(&out).len(), 2);
}

#[test]
fn wrong_refiners_are_refused_by_name() {
    let sd15 = testdata().join("tiny-sd15").display().to_string();
    assert_refused(&["x", "--model", &base(), "--refiner", &sd15], &["--refiner", &sd15, "not an SDXL refiner"]);
    // A base checkpoint given as the refiner.
    assert_refused(
        &["x", "--model", &base(), "--refiner", &base()],
        &["--refiner", "Stable Diffusion XL", "not an SDXL refiner"],
    );
    // The refiner refines SDXL runs only.
    assert_refused(&["x", "--model", &sd15, "--refiner", &refiner()], &["--refiner", "refines SDXL"]);
    assert_refused(&["x", "--model", &base(), "--refiner-start", "0.8"], &["--refiner-start needs --refiner"]);
    assert_refused(
        &["x", "--model", &base(), "--refiner", &refiner(), "--refiner-start", "1.5"],
        &["--refiner-start 1.5", "between 0 and 1"],
    );
}
