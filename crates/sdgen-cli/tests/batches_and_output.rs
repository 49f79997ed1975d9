//! The command line's batches and outputs as A1111 and stable-diffusion.cpp users expect them:
//! `--n` batches of `--batch-size` images each saved as it finishes, `--output` naming a file,
//! seeds that never wrap, counts that refuse negative numbers clearly, and nothing written by a
//! refused run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_refused, decode_png, files_in, generate, run_json, sidecar, stderr, testdata, tiny_model};

/// The `(png, json)` pairs in `dir`, by stem, and anything that is not part of a pair.
fn pairs(dir: &Path) -> (Vec<String>, Vec<PathBuf>) {
    let files = files_in(dir);
    let stems: Vec<String> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|s| dir.join(format!("{s}.json")).exists())
        .collect();
    let strays =
        files.into_iter().filter(|p| !stems.iter().any(|s| p.file_stem().unwrap().to_string_lossy() == *s)).collect();
    (stems, strays)
}

#[test]
fn a_killed_run_keeps_the_batches_it_finished() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(["a lighthouse", "--model", &tiny_model(), "--seed", "3", "--steps", "250", "--n", "6"])
        .arg("--output")
        .arg(&out)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while pairs(&out).0.is_empty() {
        assert!(Instant::now() < deadline, "no image after 120 s");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its first image was seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (stems, strays) = pairs(&out);
    assert!(!stems.is_empty() && stems.len() < 6, "killed after the first batch: {stems:?}");
    // Hidden temporaries of the batch in progress may remain; no half-written file has a final name.
    assert!(strays.iter().all(|p| p.file_name().unwrap().to_string_lossy().starts_with('.')), "{strays:?}");
    for stem in &stems {
        let (_, w, h) = decode_png(&out.join(format!("{stem}.png")));
        assert_eq!((w, h), (64, 64));
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(format!("{stem}.json"))).unwrap()).unwrap();
        assert_eq!(meta["seed"], 3 + meta["batch_index"].as_u64().unwrap());
    }
}

#[test]
fn n_batches_of_batch_size_images_with_consecutive_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args =
        ["x", "--model", &tiny_model(), "--seed", "5", "--steps", "2", "--n", "2", "--batch-size", "2", "--json"];
    let o = generate(&args, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let seeds: Vec<u64> = result["images"].as_array().unwrap().iter().map(|i| i["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, vec![5, 6, 7, 8]);
    assert!(stderr(&o).contains("4 images in 2 batches of 2"), "{}", stderr(&o));
    assert!(stderr(&o).contains("Generating 4 images"), "{}", stderr(&o));
    assert_eq!(files_in(&out).len(), 8);
}

/// `--keep-warm`: the second batch takes the first's weights (its sidecar says so) and the
/// images are byte for byte those of a run that reads them for every batch.
#[test]
fn keep_warm_reuses_the_weights_across_batches_with_the_same_images() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["x", "--model", &tiny_model(), "--seed", "5", "--steps", "2", "--n", "2", "--json"];
    let (cold, _) = run_json(&args, &dir.path().join("cold"));
    let (warm, _) = run_json(&[&args[..], &["--keep-warm"]].concat(), &dir.path().join("warm"));
    let weights = |result: &serde_json::Value, i: usize| {
        let path = PathBuf::from(result["images"][i]["metadata"].as_str().unwrap());
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        meta["extra"]["weight_use"].clone()
    };
    let uses = |u: &str| serde_json::json!({"text_encoder": u, "unet": u, "vae": u});
    assert_eq!((weights(&warm, 0), weights(&warm, 1)), (uses("loaded_kept"), uses("reused")));
    assert_eq!(weights(&cold, 1), serde_json::Value::Null, "one-shot runs drop every stage's weights");
    for i in 0..2 {
        let png = |r: &serde_json::Value| std::fs::read(r["images"][i]["png"].as_str().unwrap()).unwrap();
        assert!(png(&warm) == png(&cold), "image {i} differs with --keep-warm");
    }
}

#[test]
fn output_may_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("shots/result.png");
    let o = generate(&["x", "--model", &tiny_model(), "--steps", "2"], &one);
    assert!(o.status.success(), "{}", stderr(&o));
    let shots = dir.path().join("shots");
    assert_eq!(files_in(&shots), vec![shots.join("result.json"), shots.join("result.png")]);
    let before = std::fs::read(&one).unwrap();
    // Never overwritten: a second run is refused before loading anything, and changes nothing.
    let o = generate(&["x", "--model", &tiny_model(), "--steps", "2"], &one);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("result.png") && stderr(&o).contains("never overwritten"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&one).unwrap(), before);
    assert_eq!(files_in(&shots).len(), 2);

    let many = dir.path().join("many/set.png");
    let o = generate(&["x", "--model", &tiny_model(), "--steps", "2", "--n", "2"], &many);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = dir.path().join("many");
    let names: Vec<String> =
        files_in(&d).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["set-1.json", "set-1.png", "set-2.json", "set-2.png"]);

    // Only PNG is written: another image extension is refused, not taken for a folder name.
    let jpg = dir.path().join("x.jpg");
    let o = generate(&["x", "--model", &tiny_model()], &jpg);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("x.jpg") && stderr(&o).contains(".png"), "{}", stderr(&o));
    assert!(!jpg.exists());
}

/// The engine's messages that name a setting name it as the flag that sets it: an output that
/// cannot be written, a batch the memory does not hold at once.
#[test]
fn messages_name_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    // A path through a regular file stops everyone, root included.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let o = generate(&["x", "--model", &tiny_model(), "--steps", "1"], &file.join("sub"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("pass a writable --output folder"), "{}", stderr(&o));
    // `--memory-mode low` takes one image at a time, whatever the batch size.
    let args = ["x", "--model", &tiny_model(), "--steps", "1", "-W", "64", "-H", "64", "--batch-size", "2"];
    let o = generate(&[&args[..], &["--memory-mode", "low"]].concat(), &dir.path().join("o"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--batch-size 2 does not fit in the memory available: 1 image at a time"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn refusals_write_nothing() {
    let model = tiny_model();
    let png = testdata().join("reference/sd15/png/pndm_basic_0.png");
    assert_refused(&["x", "--model", &model, "--width", "63"], &["--width 63"]);
    assert_refused(&["x", "--model", &model, "--steps", "0"], &["--steps", "out of range"]);
    assert_refused(&["x", "--model", png.to_str().unwrap()], &["pndm_basic_0.png", "a PNG image, not a model file"]);
    assert_refused(&["x", "--model", "sd15", "--offline"], &["offline"]);
    // A single-file SDXL of another size than the standard one (the tiny one) without its
    // configs: what does not match and the fix, not "cannot run … it runs SDXL".
    let sdxl = testdata().join("tiny-sdxl-single/tiny-sdxl-base.safetensors");
    assert_refused(
        &["x", "--model", sdxl.to_str().unwrap()],
        &["but not the text encoders of the standard SDXL base or refiner", "--config-from DIR"],
    );
    // Every scheduler's step limit before any model loads (SD's steps_offset 1 puts PNDM's and
    // DDIM's 1000th step past the training schedule).
    for scheduler in ["pndm", "ddim"] {
        assert_refused(
            &["x", "--model", &model, "--steps", "1000", "--scheduler", scheduler],
            &[scheduler, "--steps 1000", "at most 999 steps"],
        );
    }
}

#[test]
fn counts_seeds_and_sizes_are_checked_up_front() {
    let model = tiny_model();
    assert_refused(&["x", "--model", &model, "--n", "10001"], &["10000 images"]);
    assert_refused(&["x", "--model", &model, "--n", "5000", "--batch-size", "3"], &["--batch-size 3", "10000"]);
    assert_refused(&["x", "--model", &model, "--seed", "18446744073709551615", "--n", "2"], &["largest seed"]);
    assert_refused(&["x", "--model", &model, "--seed", "-7"], &["-7", "-1 for a random one"]);
    for flag in ["--steps", "--n", "--width", "--batch-size"] {
        let dir = tempfile::tempdir().unwrap();
        let o = generate(&["x", "--model", &model, flag, "-5"], &dir.path().join("out"));
        assert_eq!(o.status.code(), Some(2));
        let err = stderr(&o);
        assert!(err.contains("-5 is out of range"), "{flag}: {err}");
        assert!(!err.contains("-- -5"), "{flag}: clap's misleading tip: {err}");
    }
}

#[test]
fn seed_minus_one_is_random() {
    let dir = tempfile::tempdir().unwrap();
    let o = generate(&["x", "--model", &tiny_model(), "--steps", "1", "--seed", "-1", "--json"], &dir.path().join("o"));
    assert!(o.status.success(), "{}", stderr(&o));
    let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(result["images"][0]["seed"].as_u64().is_some());
}

/// A process memory limit is part of the CPU budget: a run it cannot hold is refused (exit 2,
/// nothing written) instead of planned as fitting and aborted by the allocator.
#[test]
fn a_process_memory_limit_is_part_of_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 70000 && exec \"$0\" x --model \"$1\" --steps 2 -W 2048 -H 2048 --output \"$2\"")
        .arg(env!("CARGO_BIN_EXE_generate"))
        .arg(tiny_model())
        .arg(&out)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("the process's memory limit") && err.contains("ulimit -v"), "{err}");
    assert!(!out.exists());
}

#[test]
fn max_memory_above_the_machines_warns() {
    let dir = tempfile::tempdir().unwrap();
    let o =
        generate(&["x", "--model", &tiny_model(), "--steps", "1", "--max-memory", "100000GB"], &dir.path().join("o"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("is more than this machine's"), "{}", stderr(&o));
}

/// stable-diffusion.cpp's and A1111's spellings: short options, `--cfg-scale`, `--sampler` with
/// A1111's sampler names (any case), and the PNG's `Sampler:` written so it parses back.
#[test]
fn the_ecosystems_option_names_and_sampler_names_work() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.png");
    let args = ["-p", "a cat", "-m", &tiny_model(), "-s", "9", "-n", "1", "-W", "64", "-H", "64", "--steps", "2"];
    let o = Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(args)
        .args(["--cfg-scale", "5", "--sampler", "euler A", "-o"])
        .arg(&file)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = sdgen::output::read_png_text(&file).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    for needle in ["Sampler: Euler a", "CFG scale: 5", "Seed: 9", "Size: 64x64"] {
        assert!(params.contains(needle), "{needle}: {params}");
    }
    // The parameters' sampler is accepted as it is written.
    let sampler = params.split("Sampler: ").nth(1).unwrap().split(',').next().unwrap();
    let again = dir.path().join("b.png");
    let o = Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(args)
        .args(["--sampling-method", sampler, "--output"])
        .arg(&again)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("b.json")).unwrap()).unwrap();
    assert_eq!(meta["scheduler"], "euler-a");
    for (name, ours) in [("DPM++ 2M Karras", "dpm++2m-karras"), ("plms", "pndm"), ("DDIM", "ddim")] {
        let out = dir.path().join(format!("{ours}.png"));
        let o = Command::new(env!("CARGO_BIN_EXE_generate"))
            .args(args)
            .args(["--sampler", name, "-o"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let text = sdgen::output::read_png_text(&out).unwrap();
        let expect = name.parse::<sdgen::schedulers::SchedulerKind>().unwrap().a1111_name();
        assert!(text[0].1.contains(&format!("Sampler: {expect}")), "{ours}: {}", text[0].1);
    }
    assert_refused(&["-p", "x", "y"], &["--prompt"]);
}

/// `--help` wraps to the terminal (`COLUMNS` where there is none), and a bad `--max-memory` names
/// the flag once.
#[test]
fn help_wraps_and_messages_name_the_flag_once() {
    let o = Command::new(env!("CARGO_BIN_EXE_generate")).arg("--help").env("COLUMNS", "60").output().unwrap();
    assert!(o.status.success());
    let help = String::from_utf8(o.stdout).unwrap();
    assert!(help.contains("--batch-size"), "{help}");
    let widest = help.lines().map(|l| l.chars().count()).max().unwrap();
    assert!(widest <= 60, "a help line of {widest} characters:\n{help}");
    assert_refused(&["x", "--model", &tiny_model(), "--max-memory", "0"], &["--max-memory `0`: must be more than 0"]);
    let dir = tempfile::tempdir().unwrap();
    let o = generate(&["x", "--model", &tiny_model(), "--max-memory", "0"], &dir.path().join("o"));
    assert_eq!(stderr(&o).matches("--max-memory").count(), 1, "{}", stderr(&o));
}

/// Named models: listed with `--list-models`, matched in any case, and named in the message that
/// rejects an unknown one.
#[test]
fn named_models_are_listed_and_matched_in_any_case() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_generate"))
        .arg("--list-models")
        .env("HF_HOME", dir.path())
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8(o.stdout).unwrap();
    for needle in ["sdxl ", "sdxl-refiner", "sd15", "stabilityai/stable-diffusion-xl-base-1.0", "not downloaded"] {
        assert!(table.contains(needle), "{needle}: {table}");
    }
    assert!(!dir.path().join("hub").exists(), "listing downloads nothing");
    assert_refused(&["x", "--model", "SD15", "--offline"], &["stable-diffusion-v1-5/stable-diffusion-v1-5"]);
    assert_refused(&["x", "--model", "sdxxl"], &["sdxxl", "sdxl, sdxl-refiner, sd15"]);
}

/// An image never depends on the run it was made in: seed 8 as the third of `--n 3 --seed 6`
/// (batches of one, the default) is `--seed 8` alone, bit for bit; in a batch of three
/// (`--batch-size 3`) the batched products sum in another order, within 1/255.
#[test]
fn an_image_does_not_depend_on_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_model();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["a lighthouse", "--model", tiny.as_str(), "--steps", "3"];
        args.extend_from_slice(extra);
        let o = generate(&args, &out);
        assert!(o.status.success(), "{}", stderr(&o));
        let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let png = result["images"].as_array().unwrap().last().unwrap()["png"].as_str().unwrap().to_string();
        decode_png(Path::new(&png)).0
    };
    let alone = run("alone", &["--seed", "8", "--json"]);
    let third = run("third", &["--seed", "6", "--n", "3", "--json"]);
    assert_eq!(alone, third, "bit for bit in batches of one");
    let batched = run("batched", &["--seed", "6", "--batch-size", "3", "--json"]);
    let worst = alone.iter().zip(&batched).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    assert!(worst <= 1, "within 1/255 in a batch of three: {worst}");
}

/// The seed's console output, line for line and in its order, with the finer per-stage lines
/// between: startup, before loading, one line per optimisation the plan enables (VAE slicing
/// here: a budget too small for two 384² decodes at once), after loading, the cleanup before
/// generation, before and after generation, complete. No large-model preparation for a tiny model,
/// and a small process's memory printed with two decimals.
#[test]
fn the_seeds_console_lines_come_in_its_order() {
    let dir = tempfile::tempdir().unwrap();
    let o = generate(
        &[
            "x",
            "--model",
            &tiny_model(),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "-W",
            "512",
            "-H",
            "512",
            "--max-memory",
            "50MB",
        ],
        &dir.path().join("o"),
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let seed = [
        "💾 Memory [Startup]: Process=",
        "💾 Memory [Before model load]: ",
        "  → Enabled VAE slicing",
        "💾 Memory [After model load]: ",
        "🧹 Cleaning memory before generation...",
        "💾 Memory [Before generation]: ",
        "💾 Memory [After generation]: ",
        "💾 Memory [Complete]: ",
    ];
    let mut lines = err.lines();
    for want in seed {
        assert!(lines.any(|l| l.starts_with(want)), "`{want}` missing or out of order in:\n{err}");
    }
    assert!(!err.contains("Preparing memory for large model"), "{err}");
    let startup = err.lines().find(|l| l.starts_with("💾 Memory [Startup]")).unwrap();
    let process = startup.split("Process=").nth(1).unwrap().split("GB").next().unwrap();
    assert!(process.starts_with("0.") && process.len() == 4, "two decimals below 0.1 GB: {startup}");
}

/// `--check`: only the families this build runs, `--json` honoured, exit 2 when the run cannot
/// fit, and no claim that downloads are off when they are not.
#[test]
fn check_tells_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let check = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_generate"))
            .arg("--check")
            .args(args)
            .env("HF_HOME", dir.path())
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap()
    };
    let o = check(&["--model", &tiny_model()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("SD 1.5") && text.contains("Verdict: fits"), "{text}");
    // Every family this build runs, SD 3.5 included, and only those.
    assert!(text.contains("SD 3.5 Large") && text.contains("SD 3.5 Medium"), "{text}");
    let o = check(&["--model", &tiny_model(), "--max-memory", "10MB"]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stdout));
    let o = check(&["--model", &tiny_model(), "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(doc["model"]["fits"], true);
    assert!(doc["models"].as_array().unwrap().iter().any(|m| m["model"] == "SD 3.5 Large"), "{doc}");
    let o = check(&["--model", "sd15"]);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success());
    assert!(text.contains("is not downloaded") && !text.contains("downloads are off"), "{text}");
}

/// The planner's estimates hold for a model of its family's architecture at another width: the
/// tiny models' stages are planned within a factor of what they measure (their activation
/// coefficients, fitted on the real models, scale with the width; a fixed floor covers what any
/// stage allocates), not at 15 times it.
#[test]
fn tiny_models_are_planned_near_their_measured_peaks() {
    let dir = tempfile::tempdir().unwrap();
    for model in ["tiny-sd15", "tiny-sdxl", "tiny-sd35-medium"] {
        let path = testdata().join(model).display().to_string();
        let out = dir.path().join(model);
        let (result, _) = run_json(&["x", "--model", &path, "--steps", "2", "--seed", "1", "--json"], &out);
        let meta = sidecar(&result);
        let measured: Vec<f64> =
            meta["extra"]["memory"].as_array().unwrap().iter().map(|m| m["peak_rss_bytes"].as_f64().unwrap()).collect();
        let planned: Vec<f64> = meta["extra"]["plan"]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["peak_bytes"].as_f64().unwrap())
            .collect();
        assert_eq!(measured.len(), planned.len(), "{model}: a measurement per planned stage");
        for (i, (p, m)) in planned.iter().zip(&measured).enumerate() {
            let ratio = p / m;
            assert!((0.7..=1.6).contains(&ratio), "{model} stage {i}: planned {p} B, measured {m} B ({ratio:.2}×)");
        }
    }
}

/// `--prompt-file FILE` and `-` (standard input): one job per non-blank line, every other setting
/// shared, the seeds continuing from job to job.
#[test]
fn prompts_from_a_file_or_standard_input_are_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.txt");
    std::fs::write(&file, "a red apple\n\n  a green pear  \n").unwrap();
    let read_meta = |o: &std::process::Output| -> Vec<(String, u64)> {
        let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        result["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let meta: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(i["metadata"].as_str().unwrap()).unwrap()).unwrap();
                (meta["prompt"].as_str().unwrap().to_string(), meta["seed"].as_u64().unwrap())
            })
            .collect()
    };
    let args = ["--model", &tiny_model(), "--steps", "1", "--seed", "4", "--json"];
    let o = Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(args)
        .arg("--prompt-file")
        .arg(&file)
        .arg("-o")
        .arg(dir.path().join("set.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_meta(&o), [("a red apple".to_string(), 4), ("a green pear".to_string(), 5)]);
    assert!(dir.path().join("set-2.png").exists());

    let mut child = Command::new(env!("CARGO_BIN_EXE_generate"))
        .arg("-")
        .args(args)
        .arg("-o")
        .arg(dir.path().join("stdin"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"one\ntwo\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_meta(&o), [("one".to_string(), 4), ("two".to_string(), 5)]);

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    assert_refused(&["--model", &tiny_model(), "--prompt-file", empty.to_str().unwrap()], &["no prompts"]);
}

/// `--quiet`: nothing on stderr but warnings (and errors).
#[test]
fn quiet_prints_only_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let o = generate(&["a cat", "-q", "--model", &tiny_model(), "--steps", "1"], &dir.path().join("o"));
    assert!(o.status.success());
    assert_eq!(stderr(&o), "", "quiet");
    let long = "a very detailed painting of a lighthouse on a rocky coast at dusk ".repeat(8);
    // diffusers' reading cuts it, and says so even when quiet.
    let o = generate(
        &[&long, "--quiet", "--model", &tiny_model(), "--steps", "1", "--prompt-style", "diffusers"],
        &dir.path().join("p"),
    );
    assert!(o.status.success());
    let err = stderr(&o);
    assert!(err.contains("WARNING") && err.contains("tokens were dropped") && !err.contains("💾"), "{err}");
}

/// Progress counts the steps asked for: PNDM's doubled first evaluation is not a step of its own
/// (diffusers' bar shows 20/20 for 20 steps too).
#[test]
fn progress_counts_steps_not_evaluations() {
    let dir = tempfile::tempdir().unwrap();
    let o = generate(&["x", "--model", &tiny_model(), "--steps", "20", "--scheduler", "pndm"], &dir.path().join("o"));
    assert!(o.status.success());
    let err = stderr(&o);
    assert!(err.contains("step 20/20") && !err.contains("/21"), "{err}");
}

/// A checkpoint file's A1111 `Model hash` (its SHA-256's first 10 digits) is in the PNG's
/// parameters, before `Model`, as A1111 writes it.
#[test]
fn a_checkpoint_files_model_hash_is_written() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let ckpt = testdata().join("tiny-sd15-single/tiny-sd15.safetensors");
    let digest = sha2::Sha256::digest(std::fs::read(&ckpt).unwrap());
    let want: String = digest.iter().map(|b| format!("{b:02x}")).collect::<String>()[..10].to_string();
    let png = dir.path().join("a.png");
    let o = Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(["x", "--model", ckpt.to_str().unwrap(), "--config-from", &tiny_model(), "--steps", "1", "-o"])
        .arg(&png)
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .env("HF_HOME", dir.path().join("hf"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = sdgen::output::read_png_text(&png).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains(&format!("Model hash: {want}, Model: ")), "{params}");
    assert!(dir.path().join("cache/sdgen/model-hashes.json").exists());
}

/// `--verbose`: every step on its own line, and the kernels and memory options that run.
#[test]
fn verbose_says_what_runs() {
    let dir = tempfile::tempdir().unwrap();
    let o = generate(&["x", "-v", "--model", &tiny_model(), "--steps", "3"], &dir.path().join("o"));
    assert!(o.status.success());
    let err = stderr(&o);
    for needle in ["Kernels: ", "Memory options: ", "step 1/3", "step 2/3", "step 3/3"] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
}
