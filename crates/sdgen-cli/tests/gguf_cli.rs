//! `generate --model FILE.gguf --config-from DIR` and `--weights q8|q4` end to end
//! (`testdata/gguf/`, `tools/reference/make_gguf.py`): a GGUF run and a `--weights q8` run of the
//! same weights write the same image, each recording its weights in the sidecar; bad GGUFs and
//! bad uses are refused as bad input (exit 2, the file and what is wrong named, nothing written);
//! with no `--weights`, the planner quantises to q8 by itself where nothing else fits.

mod common;

use std::path::PathBuf;

use common::{assert_refused, decode_png, run_json, sidecar, testdata};

fn path(rel: &str) -> String {
    testdata().join(rel).display().to_string()
}

fn png(result: &serde_json::Value) -> PathBuf {
    PathBuf::from(result["images"][0]["png"].as_str().unwrap())
}

fn tiny_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args =
        vec!["a lighthouse", "--model", model, "--steps", "2", "-W", "64", "-H", "64", "--seed", "3", "--json"];
    args.extend_from_slice(extra);
    args
}

#[test]
fn a_gguf_and_weights_q8_write_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let (configs, gguf) = (path("tiny-sd35-large"), path("gguf/tiny-sd35-large-Q8_0.gguf"));
    let (result, _) = run_json(&tiny_args(&gguf, &["--config-from", &configs]), &dir.path().join("gguf"));
    assert_eq!(sidecar(&result)["extra"]["weights"], serde_json::json!({ "gguf": { "F32": 56, "Q8_0": 27 } }));
    let single = path("tiny-sd35-single/tiny-sd35-large.safetensors");
    let (q8, _) =
        run_json(&tiny_args(&single, &["--config-from", &configs, "--weights", "q8"]), &dir.path().join("q8"));
    assert_eq!(sidecar(&q8)["extra"]["weights"], "q8");
    assert_eq!(decode_png(&png(&result)).0, decode_png(&png(&q8)).0, "the same pixels");
}

#[test]
fn bad_ggufs_and_uses_are_refused() {
    let configs = path("tiny-sd35-large");
    let gguf = path("gguf/tiny-sd35-large-Q8_0.gguf");
    // A download cut short.
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let cut = cut.display().to_string();
    assert_refused(&tiny_args(&cut, &["--config-from", &configs]), &["cut.gguf is truncated", "fetch it again"]);
    // An LLM's GGUF.
    let llm = path("gguf/llm.gguf");
    assert_refused(&tiny_args(&llm, &["--config-from", &configs]), &["`llama` model", "not an image denoiser"]);
    // No folder for the rest of the pipeline.
    assert_refused(&tiny_args(&gguf, &[]), &["holds only the denoiser", "--config-from"]);
    // --weights on a GGUF, and an unknown format.
    assert_refused(&tiny_args(&gguf, &["--config-from", &configs, "--weights", "q8"]), &["quantised already"]);
    let single = path("tiny-sd35-single/tiny-sd35-large.safetensors");
    assert_refused(&tiny_args(&single, &["--weights", "q5"]), &["--weights", "`q5` is not a weight format"]);
}

/// The tiny SD 3.5 Large folder with a wider MMDiT (2 joint blocks of 1024 channels, 151 MB of
/// f32 each, random weights from the model's own constructor): wide enough that holding its
/// blocks in Q8_0 saves more than the process's size moves between runs.
fn wide_sd35(dir: &std::path::Path) -> String {
    let src = testdata().join("tiny-sd35-large");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let to = dir.join(entry.file_name());
        if entry.file_name() == "transformer" {
            continue;
        }
        std::fs::create_dir_all(&to).unwrap();
        match entry.file_type().unwrap().is_dir() {
            true => {
                for f in std::fs::read_dir(entry.path()).unwrap() {
                    let f = f.unwrap();
                    std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
                }
            }
            false => {
                std::fs::remove_dir(&to).unwrap();
                std::fs::copy(entry.path(), &to).unwrap();
            }
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("transformer/config.json")).unwrap()).unwrap();
    for (key, value) in [("num_layers", 2), ("num_attention_heads", 16), ("attention_head_dim", 64)] {
        cfg[key] = value.into();
    }
    cfg["caption_projection_dim"] = 1024.into();
    let transformer = dir.join("transformer");
    std::fs::create_dir_all(&transformer).unwrap();
    std::fs::write(transformer.join("config.json"), cfg.to_string()).unwrap();
    let vars = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vars, candle_core::DType::F32, &candle_core::Device::Cpu);
    let mmdit_cfg: sdgen_models::mmdit::MMDiTConfig = serde_json::from_value(cfg).unwrap();
    sdgen_models::mmdit::SD3Transformer2DModel::new(&mmdit_cfg, vb).unwrap();
    vars.save(transformer.join("diffusion_pytorch_model.safetensors")).unwrap();
    dir.display().to_string()
}

/// A plan's bytes from `generate --check --json`: its peak above what the process held already.
fn check_need(model: &str, extra: &[&str], out: &std::path::Path) -> (u64, u64) {
    let mut args = vec!["--check", "--json", "--model", model, "-W", "64", "-H", "64", "--max-memory", "64GB"];
    args.extend_from_slice(extra);
    let (doc, _) = run_json(&args, out);
    let plan = &doc["model"]["plan"];
    let (peak, baseline) = (plan["peak_bytes"].as_u64().unwrap(), plan["baseline_bytes"].as_u64().unwrap());
    (peak - baseline, baseline)
}

/// With no `--weights`, a budget below the leanest full-precision plan (every block streamed) but
/// above the Q8_0 one makes the planner quantise to q8 by itself: the plan, the warning and the
/// sidecar say so, and the image is `--weights q8`'s.
#[test]
fn the_planner_quantises_to_q8_when_nothing_else_fits() {
    let dir = tempfile::tempdir().unwrap();
    let model = wide_sd35(&dir.path().join("model"));
    let low = ["--memory-mode", "low"];
    let (full, baseline) = check_need(&model, &low, &dir.path().join("c1"));
    let (q8, _) = check_need(&model, &[&low[..], &["--weights", "q8"]].concat(), &dir.path().join("c2"));
    assert!(q8 + (40 << 20) < full, "Q8_0 needs {q8} bytes, bf16 {full}: no room between them");
    // Midway, as a --max-memory with the 10% margin (in MB, the flag's unit).
    let budget_mb = ((baseline + (full + q8) / 2) as f64 / 0.9 / (1 << 20) as f64).round() as u64;
    let budget = format!("{budget_mb}MB");
    let (auto, log) = run_json(&tiny_args(&model, &["--max-memory", &budget]), &dir.path().join("auto"));
    let meta = sidecar(&auto);
    assert_eq!(meta["extra"]["weights"], "q8", "{log}");
    assert_eq!(meta["extra"]["plan"]["quantised"]["weights"], "q8", "{log}");
    for needle in ["Weights: weights quantised to q8", "its weights are quantised to q8", "Quantised weights: "] {
        assert!(log.contains(needle), "{needle} missing from {log}");
    }
    let (chosen, _) = run_json(&tiny_args(&model, &["--weights", "q8"]), &dir.path().join("q8"));
    assert_eq!(decode_png(&png(&auto)).0, decode_png(&png(&chosen)).0, "the image of --weights q8");
}
