//! `--quality lcm`, `--scheduler lcm` and the named models `sd15-lcm` and `sdxl-turbo` through the
//! real binary, from a local hub serving the tiny models under the real repository ids, against
//! diffusers' images (`testdata/reference/lcm/png`, `tools/reference/make_lcm.py`); `--list-models`
//! and `--list-presets`; and the refusals.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_png_close, assert_refused, generate, generate_from_hub, hub_server, run_json, sidecar, stderr, testdata,
};

fn reference(name: &str) -> PathBuf {
    testdata().join("reference/lcm/png").join(format!("{name}.png"))
}

fn parameters(png: &Path) -> String {
    let text = sdgen::output::read_png_text(png).unwrap();
    text.into_iter().find(|(k, _)| k == "parameters").expect("parameters chunk").1
}

/// Runs `args` against a hub serving `repos`; the `--json` document.
fn run_from_hub(repos: &[(&str, &str)], args: &[&str], dir: &Path) -> serde_json::Value {
    let server = hub_server(repos);
    let o = generate_from_hub(args, &dir.join("out"), &server.endpoint(), &dir.join("hf"));
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("one JSON document")
}

fn png_of(result: &serde_json::Value) -> PathBuf {
    result["images"][0]["png"].as_str().unwrap().into()
}

#[test]
fn the_lcm_preset_fuses_the_lcm_lora_from_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    // latent-consistency/lcm-lora-sdxl as published: one pytorch_lora_weights.safetensors.
    let repo = dir.path().join("lcm-lora-sdxl");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::copy(testdata().join("lora/sdxl_lcm.safetensors"), repo.join("pytorch_lora_weights.safetensors")).unwrap();
    let result = run_from_hub(
        &[
            ("stabilityai/stable-diffusion-xl-base-1.0", "tiny-sdxl"),
            ("latent-consistency/lcm-lora-sdxl", repo.to_str().unwrap()),
        ],
        &["a lighthouse at dusk", "--quality", "lcm", "--seed", "21", "-W", "64", "-H", "64", "--json"],
        dir.path(),
    );
    let png = png_of(&result);
    assert_png_close(&png, &reference("sdxl_lcm_lora_0"));
    let meta = sidecar(&result);
    assert_eq!((meta["steps"].as_u64(), meta["guidance"].as_f64()), (Some(4), Some(1.0)), "{meta}");
    assert_eq!((meta["scheduler"].as_str(), meta["extra"]["preset"].as_str()), (Some("lcm"), Some("lcm")));
    assert_eq!(meta["extra"]["loras"][0]["source"], "latent-consistency/lcm-lora-sdxl");
    let params = parameters(&png);
    assert!(params.starts_with("a lighthouse at dusk <lora:lcm-lora-sdxl:1>\n"), "{params}");
    assert!(params.contains("Steps: 4, Sampler: LCM, CFG scale: 1.0, Seed: 21"), "{params}");
}

/// The same run spelled out: the LoRA file, A1111's sampler name, 4 steps at guidance 1.
#[test]
fn the_lcm_scheduler_by_flag_makes_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let lora = testdata().join("lora/sdxl_lcm.safetensors").display().to_string();
    let sdxl = testdata().join("tiny-sdxl").display().to_string();
    let (result, _) = run_json(
        &[
            "a lighthouse at dusk",
            "--model",
            &sdxl,
            "--lora",
            &lora,
            "--sampler",
            "LCM",
            "--steps",
            "4",
            "--guidance",
            "1",
            "--seed",
            "22",
            "-W",
            "64",
            "-H",
            "64",
            "--json",
        ],
        &dir.path().join("out"),
    );
    assert_png_close(&png_of(&result), &reference("sdxl_lcm_lora_1"));
}

#[test]
fn sd15_lcm_runs_with_its_own_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let result = run_from_hub(
        &[("SimianLuo/LCM_Dreamshaper_v7", "tiny-sd15-lcm")],
        &["a lighthouse at dusk", "--model", "sd15-lcm", "--seed", "11", "--json"],
        dir.path(),
    );
    assert_png_close(&png_of(&result), &reference("sd15_lcm_0"));
    let meta = sidecar(&result);
    assert_eq!((meta["steps"].as_u64(), meta["guidance"].as_f64()), (Some(4), Some(8.0)), "{meta}");
    assert_eq!((meta["scheduler"].as_str(), meta["width"].as_u64()), (Some("lcm"), Some(64)));
}

#[test]
fn sdxl_turbo_runs_one_step_without_guidance_at_512() {
    let dir = tempfile::tempdir().unwrap();
    let repos = [("stabilityai/sdxl-turbo", "tiny-sdxl-turbo")];
    let result = run_from_hub(
        &repos,
        &["a lighthouse at dusk", "--model", "sdxl-turbo", "--seed", "31", "-W", "64", "-H", "64", "--json"],
        dir.path(),
    );
    assert_png_close(&png_of(&result), &reference("sdxl_turbo_0"));
    let meta = sidecar(&result);
    assert_eq!((meta["steps"].as_u64(), meta["guidance"].as_f64()), (Some(1), Some(0.0)), "{meta}");
    assert_eq!(meta["scheduler"], "euler-a");
    // Without a size: SDXL-Turbo's 512², not the UNet config's 1024².
    let dir = tempfile::tempdir().unwrap();
    let result = run_from_hub(
        &repos,
        &["a lighthouse", "--model", "stabilityai/sdxl-turbo", "--seed", "1", "--json"],
        dir.path(),
    );
    let meta = sidecar(&result);
    assert_eq!((meta["width"].as_u64(), meta["height"].as_u64()), (Some(512), Some(512)), "{meta}");
}

/// More steps than SDXL-Turbo is made for (1–4) run, with a warning on the console and in the
/// sidecar; its own 4 steps run without one.
#[test]
fn sdxl_turbo_past_four_steps_warns() {
    let repos = [("stabilityai/sdxl-turbo", "tiny-sdxl-turbo")];
    for (steps, warns) in [("6", true), ("4", false)] {
        let dir = tempfile::tempdir().unwrap();
        let server = hub_server(&repos);
        let args = ["a lighthouse", "--model", "sdxl-turbo", "--steps", steps, "-W", "64", "-H", "64", "--json"];
        let o = generate_from_hub(&args, &dir.path().join("out"), &server.endpoint(), &dir.path().join("hf"));
        assert!(o.status.success(), "{}", stderr(&o));
        let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let warning = "sdxl-turbo is distilled for at most 4 steps";
        assert_eq!(stderr(&o).contains(warning), warns, "--steps {steps}: {}", stderr(&o));
        let recorded = sidecar(&result)["warnings"].to_string();
        assert_eq!(recorded.contains(warning), warns, "--steps {steps}: {recorded}");
    }
}

#[test]
fn lists_show_the_new_models_and_the_lcm_preset() {
    let dir = tempfile::tempdir().unwrap();
    let o = generate(&["--list-models"], &dir.path().join("out"));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("sdxl-turbo") && text.contains("stabilityai/sdxl-turbo"), "{text}");
    assert!(text.contains("1 step, guidance 0, 512², euler-a"), "{text}");
    assert!(text.contains("sd15-lcm") && text.contains("SimianLuo/LCM_Dreamshaper_v7"), "{text}");
    assert!(text.contains("4 steps, guidance 8, lcm"), "{text}");
    let o = generate(&["--list-presets"], &dir.path().join("out"));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("with LoRA latent-consistency/lcm-lora-sdxl") && !text.contains("lcm (not yet)"), "{text}");
}

#[test]
fn the_lcm_preset_refuses_a_model_of_another_family() {
    let sd15 = testdata().join("tiny-sd15").display().to_string();
    assert_refused(
        &["a lighthouse", "--quality", "lcm", "--model", &sd15],
        &["--quality lcm fuses latent-consistency/lcm-lora-sdxl, made for Stable Diffusion XL", "Stable Diffusion 1.5"],
    );
    // More steps than LCM's distillation schedule.
    assert_refused(
        &["a lighthouse", "--model", &sd15, "--scheduler", "lcm", "--steps", "60"],
        &["60 steps is more than the 50", "original_inference_steps"],
    );
}
