//! Helpers of the CLI tests: the real `generate` binary in a temporary folder, never the internet.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `testdata/` at the workspace root.
pub fn testdata() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata"))
}

/// The tiny SD 1.5 folder.
pub fn tiny_model() -> String {
    testdata().join("tiny-sd15").display().to_string()
}

/// Runs `generate ARGS --output OUT` with a fresh HF home and the hub pointed at a closed port.
pub fn generate(args: &[&str], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(args)
        .arg("--output")
        .arg(out)
        .env("HF_HOME", out.join("hf-home-that-does-not-exist"))
        // Never the internet: any hub request goes to a closed local port.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_HUB_CACHE")
        .output()
        .expect("generate runs")
}

/// The files in `dir`, sorted (none if it does not exist).
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// An 8-bit PNG's pixels, width and height.
pub fn decode_png(path: &Path) -> (Vec<u8>, u32, u32) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (buf, info.width, info.height)
}

/// The pipeline tolerance on 8-bit pixels: `png` is `reference`'s image (same size) with 99.5% of
/// channels within 1 and none over 8.
pub fn assert_png_close(png: &Path, reference: &Path) {
    let (pixels, w, h) = decode_png(png);
    let (want, rw, rh) = decode_png(reference);
    assert_eq!((w, h), (rw, rh), "{}: size", reference.display());
    let diffs: Vec<i32> = pixels.iter().zip(&want).map(|(a, b)| (*a as i32 - *b as i32).abs()).collect();
    let within = diffs.iter().filter(|d| **d <= 1).count() as f64 / diffs.len() as f64;
    assert!(within >= 0.995 && diffs.iter().all(|d| *d <= 8), "{}: within {within}", reference.display());
}

/// The process's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Bad input: exit code 2, a message naming the thing, and nothing written.
pub fn assert_refused(args: &[&str], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = generate(args, &out);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "args {args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "args {args:?}: `{n}` not in: {err}");
    }
    assert!(o.stdout.is_empty(), "stdout must stay empty on errors");
    let written: Vec<PathBuf> =
        files_in(&out).into_iter().filter(|p| !p.ends_with("hf-home-that-does-not-exist")).collect();
    assert!(written.is_empty(), "files written: {written:?}");
    // Not even an empty output folder (unless the hub made its cache home inside it).
    if !out.join("hf-home-that-does-not-exist").exists() {
        assert!(!out.exists(), "args {args:?}: a refused run created the output folder");
    }
}

/// Runs `generate ARGS --output OUT`, which must succeed: its `--json` document and its stderr.
pub fn run_json(args: &[&str], out: &Path) -> (serde_json::Value, String) {
    let o = generate(args, out);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    (serde_json::from_slice(&o.stdout).expect("one JSON document"), stderr(&o))
}

/// The JSON sidecar of a `--json` result's first image.
pub fn sidecar(result: &serde_json::Value) -> serde_json::Value {
    let path = PathBuf::from(result["images"][0]["metadata"].as_str().unwrap());
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A local server speaking the hub's file URLs, serving each `(repo id, testdata folder)`.
pub fn hub_server(repos: &[(&str, &str)]) -> hub_test_server::HubServer {
    let repos = repos.iter().map(|(id, dir)| hub_test_server::FakeRepo::from_dir(id, &testdata().join(dir)).unwrap());
    hub_test_server::HubServer::start(repos.collect()).unwrap()
}

/// Runs `generate ARGS --output OUT` against the hub at `endpoint`, its cache in `hf_home`.
pub fn generate_from_hub(args: &[&str], out: &Path, endpoint: &str, hf_home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(args)
        .arg("--output")
        .arg(out)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .output()
        .expect("generate runs")
}

/// Each of `needles` in `log`, in this order.
pub fn assert_in_order(log: &str, needles: &[&str]) {
    let mut at = 0;
    for needle in needles {
        let pos = log[at..].find(needle).unwrap_or_else(|| panic!("`{needle}` missing or out of order in:\n{log}"));
        at += pos + needle.len();
    }
}
