//! The README's main command (`generate "a lighthouse at dusk"` with the default model) against a
//! local server speaking the hub's file URLs, serving the tiny SDXL as the default model's repo:
//! the first run downloads into a fresh HF cache, the second (offline) reuses it.

use std::path::PathBuf;
use std::process::Command;

use hub_test_server::{FakeRepo, HubServer};
use sdgen::loading::{DEFAULT_MODEL, NAMED_MODELS};

#[test]
fn default_model_downloads_once_then_runs_offline() {
    let repo = NAMED_MODELS.iter().find(|m| m.name == DEFAULT_MODEL).unwrap().repo;
    let tiny = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sdxl"));
    let server = HubServer::start(vec![FakeRepo::from_dir(repo, &tiny).unwrap()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_generate"))
            .args(["a lighthouse at dusk", "--seed", "42", "--steps", "2", "--json"])
            .args(extra)
            .current_dir(dir.path())
            .env("HF_ENDPOINT", server.endpoint())
            .env("HF_HOME", dir.path().join("hf"))
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .output()
            .unwrap()
    };
    let first = run(&[]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(!server.downloaded_files().is_empty());
    let result: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    // The default model is SDXL base: the sidecar says which pipeline ran.
    assert_eq!(DEFAULT_MODEL, "sdxl");
    let sidecar = PathBuf::from(result["images"][0]["metadata"].as_str().unwrap());
    let sidecar = if sidecar.is_relative() { dir.path().join(sidecar) } else { sidecar };
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sidecar).unwrap()).unwrap();
    assert!(meta["pipeline_type"].as_str().unwrap().starts_with("StableDiffusionXLPipeline"), "{meta}");
    let png = PathBuf::from(result["images"][0]["png"].as_str().unwrap());
    assert!(png.starts_with(dir.path().join("outputs")) || png.is_relative(), "{}", png.display());
    assert!(dir.path().join("hf/hub").join(format!("models--{}", repo.replace('/', "--"))).is_dir());

    server.clear_requests();
    let second = run(&["--offline"]);
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert!(server.requests().is_empty(), "the cached model was fetched again: {:?}", server.requests().len());
}
