//! Runs the real `generate` binary on the tiny SD 1.5 model in a temporary folder.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    assert_png_close, assert_refused, decode_png, files_in, generate, run_json, sidecar, stderr, testdata, tiny_model,
};

#[test]
fn generates_the_reference_image_with_metadata_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o =
        generate(&["a lighthouse at dusk", "--model", &tiny_model(), "--seed", "42", "--steps", "10", "--json"], &out);
    assert!(o.status.success(), "{}", stderr(&o));

    // stdout is exactly one JSON document.
    let stdout = String::from_utf8(o.stdout.clone()).unwrap();
    let mut docs = serde_json::Deserializer::from_str(&stdout).into_iter::<serde_json::Value>();
    let result = docs.next().expect("one document").expect("valid JSON");
    assert!(docs.next().is_none(), "more than one JSON document on stdout: {stdout}");
    let png_path = PathBuf::from(result["images"][0]["png"].as_str().unwrap());
    let json_path = PathBuf::from(result["images"][0]["metadata"].as_str().unwrap());
    assert_eq!(files_in(&out), {
        let mut v = vec![png_path.clone(), json_path.clone()];
        v.sort();
        v
    });

    // The pixels are diffusers' image for the same seed (99.5% within 1/255, none over 8/255).
    let (_, w, h) = decode_png(&png_path);
    assert_eq!((w, h), (64, 64));
    assert_png_close(&png_path, &testdata().join("reference/sd15/png/pndm_basic_0.png"));

    // The A1111 parameters chunk.
    let text = sdgen::output::read_png_text(&png_path).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").expect("parameters chunk").1;
    assert!(params.starts_with("a lighthouse at dusk\n"), "{params}");
    for needle in ["Steps: 10", "Seed: 42", "Size: 64x64", "CFG scale: 7.5"] {
        assert!(params.contains(needle), "{needle} missing from {params}");
    }

    // The sidecar.
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    for key in ["model", "pipeline_type", "memory_optimizations", "warnings", "failures", "timings_ms", "version"] {
        assert!(meta.get(key).is_some(), "sidecar lacks {key}: {meta}");
    }
    assert_eq!(meta["prompt"], "a lighthouse at dusk");
    assert_eq!(meta["seed"], 42);
    assert_eq!(meta["steps"], 10);
    assert_eq!(meta["scheduler"], "pndm");
    assert_eq!(meta["width"], 64);
    assert_eq!(meta["failures"], serde_json::json!([]));

    // Logs went to stderr.
    assert!(stderr(&o).contains("Saved"), "{}", stderr(&o));
}

#[test]
fn n_images_get_consecutive_seeds_and_a_long_prompt_warns() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let long = "a very detailed painting of a lighthouse on a rocky coast at dusk ".repeat(8);
    let o = generate(
        &[
            &long,
            "--model",
            &tiny_model(),
            "--seed",
            "7",
            "--steps",
            "2",
            "--n",
            "2",
            "--scheduler",
            "euler",
            "--prompt-style",
            "diffusers",
            "--json",
        ],
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let seeds: Vec<u64> = result["images"].as_array().unwrap().iter().map(|i| i["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, vec![7, 8]);
    assert_eq!(files_in(&out).len(), 4);
    // diffusers' cut names where the dropped words begin.
    assert!(stderr(&o).contains("tokens were dropped (from about \""), "{}", stderr(&o));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(result["images"][1]["metadata"].as_str().unwrap()).unwrap())
            .unwrap();
    assert_eq!(meta["seed"], 8);
    assert_eq!(meta["scheduler"], "euler");
    assert!(meta["warnings"][0].as_str().unwrap().contains("tokens were dropped"));
}

/// `generate ""` is a prompt, as diffusers reads one: an image of no prompt (its pixels against
/// diffusers' are the engine's parity test, `the_empty_prompt_image_matches_diffusers`), its
/// sidecar's prompt empty.
#[test]
fn an_empty_prompt_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("empty.png");
    let o = generate(&["", "--model", &tiny_model(), "--seed", "7", "--steps", "2", "-W", "64", "-H", "64"], &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap()).unwrap();
    assert_eq!(meta["prompt"], "", "{meta}");
}

/// A1111's reading, the default: a long weighted prompt is encoded whole (no warning); the clip
/// skip runs on SD 1.5.
#[test]
fn long_weighted_prompts_are_chunked_and_clip_skip_runs() {
    let dir = tempfile::tempdir().unwrap();
    let long = "a very detailed (painting:1.2) of a lighthouse on a [rocky] coast at dusk ".repeat(8) + "BREAK a dog";
    let o = generate(
        &[&long, "--model", &tiny_model(), "--seed", "7", "--steps", "2", "--clip-skip", "2"],
        &dir.path().join("out"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("dropped"), "{}", stderr(&o));
}

#[test]
fn bad_input_is_refused_clearly() {
    let model = tiny_model();
    assert_refused(&["x", "--model", "/no/such/model/dir"], &["/no/such/model/dir", "does not exist"]);
    let not_model = testdata().join("reference");
    assert_refused(&["x", "--model", not_model.to_str().unwrap()], &["model_index.json"]);
    assert_refused(&["x", "--model", &model, "--width", "100"], &["--width 100", "multiple of 8"]);
    assert_refused(&["x", "--model", &model, "--steps", "0"], &["--steps"]);
    assert_refused(&["x", "--model", &model, "--n", "0"], &["--n"]);
    assert_refused(&["x", "--model", &model, "--scheduler", "dpm9000"], &["dpm9000", "pndm", "ddim", "euler"]);
    assert_refused(&["x", "--model", &model, "--device", "tpu"], &["--device tpu"]);
    // No prompt at all is a forgotten one ("" is a prompt: see `an_empty_prompt_runs`).
    assert_refused(&["--model", &model], &["no prompt", "or pass \"\" for an image of no prompt"]);
    assert_refused(&["x", "--model", &model, "--prompt-style", "compel"], &["compel", "a1111", "diffusers"]);
    assert_refused(&["x", "--model", &model, "--clip-skip", "0"], &["--clip-skip"]);
    assert_refused(&["x", "--model", "sd15", "--offline"], &["stable-diffusion-v1-5/stable-diffusion-v1-5", "offline"]);
}

#[test]
fn unwritable_output_folder_is_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("sub");
    let o = generate(&["x", "--model", &tiny_model()], &out);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--output"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("text_encoder"), "a model was loaded: {}", stderr(&o));
}

/// Copies the tiny model into `dir` and replaces its UNet file by `bytes`.
fn tiny_copy_with_unet(dir: &Path, bytes: &[u8]) -> PathBuf {
    let src = testdata().join("tiny-sd15");
    let dst = dir.join("model");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(entry.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        } else {
            std::fs::create_dir_all(&dst).unwrap();
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    std::fs::write(dst.join("unet/diffusion_pytorch_model.safetensors"), bytes).unwrap();
    dst
}

#[test]
fn corrupt_safetensors_files_are_refused_naming_the_file() {
    let good = std::fs::read(testdata().join("tiny-sd15/unet/diffusion_pytorch_model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut bad_length = good.clone();
    bad_length[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let mut bad_json = good.clone();
    bad_json[8] = b'[';
    bad_json[9] = b'x';
    let truncated = good[..8 + header_len + 100].to_vec();
    for (what, bytes) in
        [("bad header length", bad_length), ("bad header JSON", bad_json), ("data cut short", truncated)]
    {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_copy_with_unet(dir.path(), &bytes);
        let out = dir.path().join("out");
        let o = generate(&["x", "--model", model.to_str().unwrap(), "--steps", "1"], &out);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains("diffusion_pytorch_model.safetensors") && err.contains("truncated or corrupt"),
            "{what}: {err}"
        );
        assert!(files_in(&out).iter().all(|p| p.ends_with("hf-home-that-does-not-exist")), "{what}: files written");
    }
}

/// The seed's memory lines, in its format, at its points and in order, on stderr.
#[test]
fn memory_lines_follow_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let o = generate(&["a lighthouse at dusk", "--model", &tiny_model(), "--steps", "2"], &dir.path().join("out"));
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let labels: Vec<String> = err.lines().filter_map(memory_line_label).collect();
    let want = [
        "Startup",
        "Before model load",
        "Before text encoder load",
        "After text encoder load",
        "After text encoder",
        "Before UNet load",
        "After UNet load",
        "After model load",
        "Before generation",
        "After generation",
        "After UNet",
        "Before VAE load",
        "After VAE load",
        "After VAE",
        "Complete",
    ];
    assert_eq!(labels, want, "{err}");
    // The plan is printed before anything loads.
    let plan_at = err.find("Memory plan:").expect("plan table");
    assert!(plan_at < err.find("Before text encoder load").unwrap());
}

/// The label of `l` when it is a memory line in the seed's format:
/// `💾 Memory [LABEL]: Process=X.XGB, System=X.XGB/X.XGB (X.X%)` (two decimals below 0.1 GB).
fn memory_line_label(l: &str) -> Option<String> {
    {
        let rest = l.strip_prefix("💾 Memory [")?;
        let (label, tail) = rest.split_once("]: Process=")?;
        let (process, tail) = tail.split_once("GB, System=")?;
        let (used_total, pct) = tail.split_once("GB (")?;
        let (used, total) = used_total.split_once("GB/")?;
        let pct = pct.strip_suffix("%)")?;
        let one_decimal = |s: &str| s.split_once('.').is_some_and(|(a, b)| !a.is_empty() && b.len() == 1);
        let small = |s: &str| s.strip_prefix("0.0").is_some_and(|d| d.len() == 1);
        let well_formed = (one_decimal(process) || small(process)) && [used, total, pct].iter().all(|s| one_decimal(s));
        well_formed.then(|| label.to_string())
    }
}

/// Out-of-memory recovery, through the test-only hook that makes a stage's first attempt fail as
/// a CUDA allocation failure would: the stage is retried leaner, the image is still produced
/// (and still diffusers' image: the leaner options do not change the result), and the metadata
/// records the failure and the fallback.
#[test]
fn a_stage_that_runs_out_of_memory_is_retried_leaner() {
    for (stage, fallback) in [("unet", "attention slicing"), ("vae", "VAE slicing"), ("text_encoder", "on the CPU")] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let o = Command::new(env!("CARGO_BIN_EXE_generate"))
            .args(["a lighthouse at dusk", "--model", &tiny_model(), "--seed", "42", "--steps", "10", "--json"])
            .arg("--output")
            .arg(&out)
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env(sdgen::pipeline::INJECT_OOM_VAR, stage)
            .output()
            .unwrap();
        assert!(o.status.success(), "{stage}: {}", stderr(&o));
        assert!(stderr(&o).contains("recovered from running out of memory"), "{stage}: {}", stderr(&o));
        let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(result["images"][0]["metadata"].as_str().unwrap()).unwrap())
                .unwrap();
        let failure = meta["failures"][0].as_str().unwrap_or_default();
        assert!(
            failure.starts_with(stage) && failure.contains("OUT_OF_MEMORY") && failure.contains(fallback),
            "{meta}"
        );
        let (pixels, _, _) = decode_png(&PathBuf::from(result["images"][0]["png"].as_str().unwrap()));
        let (want, _, _) = decode_png(&testdata().join("reference/sd15/png/pndm_basic_0.png"));
        let close = pixels.iter().zip(&want).all(|(a, b)| (*a as i32 - *b as i32).abs() <= 1);
        assert!(close, "{stage}: the recovered image differs from diffusers'");
    }
}

/// `--no-fast-kernels` runs the stock kernels, and the sidecar and `--json` say which kernels made
/// the image; both images are diffusers' image within the pipeline tolerance.
#[test]
fn the_sidecar_records_the_kernels_and_the_switch_turns_them_off() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["a lighthouse at dusk", "--model", &tiny_model(), "--seed", "42", "--steps", "10", "--json"];
    for (i, (switch, kernels)) in [
        (None, "fast (CPU: direct and banded convolutions, fused GroupNorm, blocked attention)"),
        (Some("--no-fast-kernels"), "stock (fast kernels turned off)"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("out{i}"));
        let mut a: Vec<&str> = args.to_vec();
        a.extend(switch);
        let o = generate(&a, &out);
        assert!(o.status.success(), "{}", stderr(&o));
        let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(result["kernels"], kernels, "{result}");
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(result["images"][0]["metadata"].as_str().unwrap()).unwrap())
                .unwrap();
        assert_eq!(meta["extra"]["kernels"], kernels);
        let png = Path::new(result["images"][0]["png"].as_str().unwrap());
        assert_png_close(png, &testdata().join("reference/sd15/png/pndm_basic_0.png"));
    }
}

/// `--threads N` sizes the CPU's pool (the sidecar records it) without changing a pixel (every
/// CPU kernel splits its work across threads without splitting a sum); 0 threads is refused
/// naming the flag.
#[test]
fn threads_set_the_cpu_pool_and_keep_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let mut images = Vec::new();
    for threads in ["1", "3"] {
        let args = [
            "a lighthouse at dusk",
            "--model",
            &model,
            "--seed",
            "42",
            "--steps",
            "10",
            "--threads",
            threads,
            "--json",
        ];
        let (result, log) = run_json(&args, &dir.path().join(threads));
        assert_eq!(sidecar(&result)["extra"]["cpu_threads"].to_string(), threads, "{log}");
        let png = PathBuf::from(result["images"][0]["png"].as_str().unwrap());
        assert_png_close(&png, &testdata().join("reference/sd15/png/pndm_basic_0.png"));
        images.push(decode_png(&png).0);
    }
    assert!(images[0] == images[1], "the image changed with the thread count");
    assert_refused(&["a lighthouse", "--model", &model, "--threads", "0"], &["--threads", "0"]);
}

/// `--memory-mode low` takes the leanest plan, which streams the denoiser's blocks: the plan
/// table, the seed's `→ Enabled` line, the run's expected cost and the sidecar say so, and the
/// image is the resident run's, bit for bit.
#[test]
fn low_memory_mode_streams_the_denoiser_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let args = |mode: &'static str| -> Vec<&str> {
        vec!["a lighthouse at dusk", "--model", &model, "--seed", "42", "--steps", "3", "--memory-mode", mode, "--json"]
    };
    let (low, log) = common::run_json(&args("low"), &dir.path().join("low"));
    for needle in ["block streaming (0 of ", "→ Enabled block streaming", "Block streaming: denoise keeps 0 of "] {
        assert!(log.contains(needle), "{needle} missing from {log}");
    }
    let meta = common::sidecar(&low);
    assert!(meta["memory_optimizations"].as_str().unwrap().contains("block_streaming"), "{meta}");
    let denoise =
        meta["extra"]["plan"]["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "denoise").unwrap().clone();
    let streaming = &denoise["options"]["streaming"];
    assert_eq!(streaming["resident_blocks"], 0, "{denoise}");
    assert!(streaming["blocks"].as_u64().unwrap() > 2 && streaming["streamed_bytes"].as_u64().unwrap() > 0);

    let (auto, log) = common::run_json(&args("auto"), &dir.path().join("auto"));
    assert!(!log.contains("block streaming"), "{log}");
    let png = |r: &serde_json::Value| decode_png(Path::new(r["images"][0]["png"].as_str().unwrap())).0;
    assert!(png(&low) == png(&auto), "the streamed run's image differs");
}
