//! `--upscale`, `--quality` and `--list-presets` through the real `generate` binary on the tiny
//! models in a temporary folder.

mod common;

use std::path::PathBuf;

use common::tiny_model;
use common::{assert_in_order, assert_refused, decode_png, files_in, generate, run_json, sidecar, stderr, testdata};

fn tiny_sdxl() -> String {
    testdata().join("tiny-sdxl").display().to_string()
}

/// The text of the PNG's A1111 `parameters` chunk.
fn parameters(png: &std::path::Path) -> String {
    let text = sdgen::output::read_png_text(png).unwrap();
    text.into_iter().find(|(k, _)| k == "parameters").expect("parameters chunk").1
}

/// diffusers' SD 1.5 reference image (`pndm_basic`: seed 42, 10 steps) upscaled ×2: the same as
/// PIL's Lanczos of diffusers' image (make_resize.py) to the image tolerance, with the seed's
/// lines around the stage, the pass in the sidecar and A1111's extras-tab fields.
#[test]
fn upscale_2_is_pils_lanczos_of_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = ["a lighthouse at dusk", "--model", &tiny_model(), "--seed", "42", "--steps", "10", "--upscale", "2"];
    let (result, log) = run_json(&[&args[..], &["--json"]].concat(), &out);
    let png = PathBuf::from(result["images"][0]["png"].as_str().unwrap());
    let (pixels, w, h) = decode_png(&png);
    assert_eq!((w, h), (128, 128));
    let refs = sdgen::candle::safetensors::load(
        testdata().join("image_io/upscale_pil.safetensors"),
        &sdgen::candle::Device::Cpu,
    )
    .unwrap();
    let want: Vec<u8> = refs["out.sd15.x2"].flatten_all().unwrap().to_vec1().unwrap();
    let diffs: Vec<u8> = pixels.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).collect();
    let within = diffs.iter().filter(|d| **d <= 1).count() as f64 / diffs.len() as f64;
    assert!(within >= 0.99 && diffs.iter().all(|d| *d <= 8), "within 1/255: {within}");

    assert_in_order(
        &log,
        &[
            "Then upscaling ×2 with Lanczos to 128x128",
            "→ vae…",
            "→ upscale…",
            "🧹 Cleaning memory before upscaling...",
            "💾 Memory [Before upscaling]",
            "🧹 Cleaning memory after upscaling...",
            "✓ upscale done",
            "💾 Memory [After upscaling]",
            "Saved",
        ],
    );
    let meta = sidecar(&result);
    assert_eq!((meta["width"].as_u64(), meta["height"].as_u64()), (Some(128), Some(128)));
    assert_eq!(
        meta["extra"]["passes"][1],
        serde_json::json!({"pass": "upscale", "factor": 2, "filter": "lanczos", "width": 128, "height": 128})
    );
    assert!(meta["timings_ms"].get("upscale").is_some(), "{meta}");
    let params = parameters(&png);
    assert!(
        params.contains("Size: 64x64") && params.contains("Postprocess upscale by: 2, Postprocess upscaler: Lanczos"),
        "{params}"
    );
}

/// `--quality 4k` on the tiny SDXL, its first pass scaled down by explicit sizes and steps (the
/// flags win over the preset's): first pass, upscale ×2, hires pass, in that order, at the right
/// sizes, recorded in the sidecar and the A1111 string.
#[test]
fn quality_4k_runs_its_passes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = [
        "x",
        "--model",
        &tiny_sdxl(),
        "--quality",
        "4k",
        "--width",
        "64",
        "--height",
        "80",
        "--steps",
        "4",
        "--seed",
        "5",
        "--json",
    ];
    let (result, log) = run_json(&args, &out);
    assert_in_order(
        &log,
        &[
            "at 64x80, 4 steps",
            "Then upscaling ×2 with Lanczos to 128x160",
            "Then a hires image-to-image pass at 128x160: strength 0.3 (the last 1 of 4 steps)",
            "→ unet…",
            "→ vae…",
            "→ upscale…",
            "→ hires_vae_encoder…",
            "→ hires_unet…",
            "→ hires_vae…",
            "Saved",
        ],
    );
    let png = PathBuf::from(result["images"][0]["png"].as_str().unwrap());
    let (_, w, h) = decode_png(&png);
    assert_eq!((w, h), (128, 160));
    assert_eq!(
        (result["width"].as_u64(), result["height"].as_u64(), result["preset"].as_str()),
        (Some(128), Some(160), Some("4k"))
    );
    let meta = sidecar(&result);
    assert_eq!(meta["extra"]["preset"], "4k");
    let passes: Vec<&str> =
        meta["extra"]["passes"].as_array().unwrap().iter().map(|p| p["pass"].as_str().unwrap()).collect();
    assert_eq!(passes, ["generate", "upscale", "hires"]);
    assert_eq!(meta["extra"]["passes"][2]["strength"], 0.3);
    assert_eq!(
        (meta["width"].as_u64(), meta["height"].as_u64(), meta["steps"].as_u64()),
        (Some(128), Some(160), Some(4))
    );
    assert!(meta["extra"].get("hires_plan").is_some() && meta["timings_ms"].get("hires_unet").is_some(), "{meta}");
    let params = parameters(&png);
    assert!(
        params.contains("Size: 64x80")
            && params.contains("Denoising strength: 0.3, Hires upscale: 2, Hires steps: 4, Hires upscaler: Lanczos"),
        "{params}"
    );

    // --hires-strength overrides the preset's.
    let out2 = dir.path().join("out2");
    let (result, _) = run_json(&[&args[..], &["--hires-strength", "0.5"]].concat(), &out2);
    assert_eq!(sidecar(&result)["extra"]["passes"][2]["denoising_steps"], 2);
}

/// `--quality 4k-ultra` on the tiny SDXL (native size 64², 8 latent cells), its first pass scaled
/// down to 64²: ×2 and a hires pass in MultiDiffusion's tiles at 128² (3 × 3 tiles of 64²), ×2
/// and a second at 256² (5 × 5), in that order, each step's stages named apart, the tiles in the
/// log, the sidecar, the A1111 string and `--check`'s plans.
#[test]
fn quality_4k_ultra_runs_two_tiled_hires_passes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_sdxl();
    let size = ["--model", &model, "--quality", "4k-ultra", "--width", "64", "--height", "64", "--steps", "4"];
    let args = [&["x"][..], &size, &["--seed", "5", "--json"]].concat();
    let (result, log) = run_json(&args, &dir.path().join("out"));
    assert_in_order(
        &log,
        &[
            "at 64x64, 4 steps",
            "Then upscaling ×2 with Lanczos to 128x128",
            "Then a hires image-to-image pass at 128x128: strength 0.3 (the last 1 of 4 steps), denoised in 9 tiles \
             of 8×8 latents (64×64 px), overlapping by at least 4 (MultiDiffusion)",
            "Then upscaling ×2 with Lanczos to 256x256",
            "Then a hires image-to-image pass at 256x256: strength 0.3 (the last 1 of 4 steps), denoised in 25 tiles",
            "→ unet…",
            "→ upscale…",
            "→ hires_unet…",
            "MultiDiffusion: 9 tiles of 8×8 latents",
            "→ hires_vae…",
            "→ upscale_2…",
            "→ hires2_vae_encoder…",
            "→ hires2_unet…",
            "MultiDiffusion: 25 tiles of 8×8 latents",
            "→ hires2_vae…",
            "Saved",
        ],
    );
    let png = PathBuf::from(result["images"][0]["png"].as_str().unwrap());
    assert_eq!(decode_png(&png).1, 256);
    let meta = sidecar(&result);
    assert_eq!((meta["width"].as_u64(), meta["extra"]["preset"].as_str()), (Some(256), Some("4k-ultra")));
    let passes = meta["extra"]["passes"].as_array().unwrap();
    let names: Vec<&str> = passes.iter().map(|p| p["pass"].as_str().unwrap()).collect();
    assert_eq!(names, ["generate", "upscale", "hires", "upscale", "hires"]);
    let tiles = serde_json::json!({"method": "MultiDiffusion", "count": 25, "tile_latents": 8, "overlap_latents": 2,
        "tile_px": 64, "overlap_px": 16});
    assert_eq!((passes[2]["tiles"]["count"].as_u64(), &passes[4]["tiles"]), (Some(9), &tiles));
    let plans = meta["extra"]["hires_plans"].as_array().unwrap();
    assert_eq!(plans.len(), 2);
    let denoise = plans[1]["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "denoise").unwrap();
    assert_eq!(denoise["denoise_tiles"], serde_json::json!({"tile_px": 64, "overlap_px": 16}));
    for stage in ["upscale", "upscale_2", "hires_unet", "hires2_unet", "hires2_vae"] {
        assert!(meta["timings_ms"].get(stage).is_some(), "{stage}: {meta}");
    }
    let params = parameters(&png);
    assert!(
        params.contains("Size: 64x64")
            && params.contains("Hires upscale: 4, Hires steps: 4, Hires upscaler: Lanczos, Tiled Diffusion method: \
                 MultiDiffusion, Tiled Diffusion tile width: 8, Tiled Diffusion tile height: 8, Tiled Diffusion overlap: 2"),
        "{params}"
    );

    // --check plans both passes, each denoiser at its tile's size.
    let o = generate(&[&["--check"][..], &size].concat(), &dir.path().join("check"));
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(o.status.success(), "{text}");
    assert_in_order(
        &text,
        &[
            "Then the hires pass at 128x128 (upscaled ×2, strength 0.3, denoised in 9 tiles",
            "MultiDiffusion tiles (64px, overlap 16px)",
            "Then the hires pass at 256x256 (upscaled ×2, strength 0.3, denoised in 25 tiles",
            "MultiDiffusion tiles (64px, overlap 16px)",
        ],
    );
}

#[test]
fn list_presets_prints_the_table_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = generate(&["--list-presets"], &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8(o.stdout).unwrap();
    assert!(table.starts_with("preset"), "{table}");
    for row in [
        "default ",
        "4k ",
        "4k-ultra ",
        "lcm ",
        "→ upscale ×2 (Lanczos) → hires img2img (strength 0.3)",
        "2048x2048",
        "→ hires img2img in MultiDiffusion tiles (strength 0.3)",
        "4096x4096",
    ] {
        assert!(table.contains(row), "`{row}` not in\n{table}");
    }
    assert!(files_in(&out).is_empty() && !out.exists());
}

/// Unknown and unbuilt presets, upscale factors out of range, a hires strength without upscaling
/// or out of range: exit 2 naming the flag, nothing written, before any model loads.
#[test]
fn bad_presets_and_upscales_are_refused() {
    let sdxl = tiny_sdxl();
    let m = ["x", "--model", sdxl.as_str()];
    let with = |extra: &[&'static str]| -> Vec<&str> { m.iter().copied().chain(extra.iter().copied()).collect() };
    assert_refused(&with(&["--quality", "8k"]), &["--quality 8k is not a preset: one of default, 4k, 4k-ultra, lcm"]);
    for factor in ["0", "1", "9"] {
        let args = with(&["--upscale", factor]);
        assert_refused(&args, &[&format!("--upscale {factor} is not one of 2, 3, 4")]);
    }
    assert_refused(&with(&["--hires-strength", "0.3"]), &["--hires-strength needs --upscale"]);
    assert_refused(&with(&["--upscale", "2", "--hires-strength", "1.5"]), &["--hires-strength 1.5 is outside [0, 1]"]);
    // A strength that leaves the hires pass no step, found when the model is open, before loading.
    assert_refused(
        &with(&["--upscale", "2", "--hires-strength", "0.1", "--steps", "4", "-W", "64", "-H", "64"]),
        &["--hires-strength", "leaves the hires pass no step"],
    );
}

/// After SD 3.5 (another latent space, flow matching): the finished image upscaled ×3, and a
/// hires pass through SD 3's image-to-image, at the output size.
#[test]
fn upscale_and_hires_follow_sd35() {
    let dir = tempfile::tempdir().unwrap();
    let model = testdata().join("tiny-sd35-medium").display().to_string();
    let args = ["x", "--model", &model, "--steps", "4", "--guidance", "5", "--upscale", "3", "--json"];
    let (result, log) = run_json(&args, &dir.path().join("a"));
    let (_, w, h) = decode_png(&PathBuf::from(result["images"][0]["png"].as_str().unwrap()));
    assert_eq!((w, h), (192, 192), "the folder's 64² ×3");
    assert!(log.contains("→ upscale…") && !log.contains("hires_"), "{log}");
    let (result, log) = run_json(&[&args[..], &["--hires-strength", "0.5"]].concat(), &dir.path().join("b"));
    assert_eq!(sidecar(&result)["extra"]["passes"][2]["width"], 192);
    assert_in_order(&log, &["→ upscale…", "→ hires_vae_encoder…", "→ hires_transformer…", "→ hires_vae…"]);
}

/// `--check --quality 4k` plans the hires pass too, at the upscaled size, as the run does.
#[test]
fn check_plans_the_hires_pass() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args =
        ["--check", "--json", "--model", &tiny_sdxl(), "--quality", "4k", "-W", "64", "-H", "80", "--steps", "4"];
    let o = generate(&args, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let model = &doc["model"];
    assert_eq!((model["fits"].as_bool(), model["hires"]["fits"].as_bool()), (Some(true), Some(true)), "{model}");
    let stages = |p: &serde_json::Value| -> Vec<String> {
        p["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap().to_string()).collect()
    };
    assert!(!stages(&model["plan"]).contains(&"encode_image".to_string()), "{model}");
    assert!(stages(&model["hires"]["plan"]).contains(&"encode_image".to_string()), "{model}");
    assert_eq!(
        (model["hires"]["plan"]["width"].as_u64(), model["hires"]["plan"]["height"].as_u64()),
        (Some(128), Some(160))
    );
    assert!(!out.exists(), "--check writes nothing");
}
