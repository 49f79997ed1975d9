//! `generate --model FILE.gguf --config-from DIR` and `--weights q8|q4` end to end
//! (`testdata/gguf/`, `tools/reference/make_gguf.py`): a GGUF run and a `--weights q8` run of the
//! same weights write the same image, each recording its weights in the sidecar; bad GGUFs and
//! bad uses are refused as bad input (exit 2, the file and what is wrong named, nothing written).

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
