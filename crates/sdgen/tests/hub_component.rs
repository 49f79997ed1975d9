//! Single-model repo downloads (`--vae org/name`) against the local fake hub (`hub-test-server`),
//! never the internet: `testdata/tiny-sdxl/vae` served as a repo root, with the extras such repos
//! carry (pickles, a copy under another name) that must not be fetched; the standard cache
//! layout, the no-request fast path, offline mode, the weight choice, resume, tokens, the
//! disk-space refusal, and repos that are not single models. Every test has its own server and
//! temporary `HF_HOME`, passed through `HubOptions::from_vars`.

use std::collections::BTreeSet;
use std::path::PathBuf;

mod common;

use common::hub::{downloaded, message, options};
use hub_test_server::{FakeRepo, HubServer};
use sdgen::hub::{fetch_component, find_cached_component, DownloadProgress, HubOptions};
use sdgen::loading::ModelFolder;

const REPO: &str = "org/tiny-vae";
const CONFIG: &str = "config.json";
const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

fn tiny_sdxl() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sdxl"))
}

fn vae_dir() -> PathBuf {
    tiny_sdxl().join("vae")
}

fn bytes(file: &str) -> Vec<u8> {
    std::fs::read(vae_dir().join(file)).unwrap()
}

/// The tiny VAE at the repo root, laid out like `madebyollin/sdxl-vae-fp16-fix`: besides the
/// diffusers files, pickles and the same weights under another name, none of which a run reads.
fn vae_repo(id: &str) -> FakeRepo {
    FakeRepo::from_dir(id, &vae_dir())
        .unwrap()
        .with_file("diffusion_pytorch_model.bin", b"pickle: never fetched".to_vec())
        .with_file("sdxl_vae.bin", b"pickle: never fetched".to_vec())
        .with_file("sdxl_vae.safetensors", bytes(WEIGHTS))
        .with_file("README.md", b"# tiny vae".to_vec())
        .with_file("images/sample.png", b"png".to_vec())
}

fn fetch(hub: &HubOptions, repo: &str) -> sdgen::Result<PathBuf> {
    fetch_component(hub, repo, "main", &mut |_| {})
}

fn set(files: &[&str]) -> BTreeSet<String> {
    files.iter().map(|f| f.to_string()).collect()
}

#[test]
fn downloads_the_config_and_one_weight_set_into_the_standard_layout() {
    let server = HubServer::start(vec![vae_repo(REPO)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let hub = options(&server, home.path());
    let mut events: Vec<(String, usize, usize, u64, u64, u64, u64)> = Vec::new();
    let snapshot = fetch_component(&hub, REPO, "main", &mut |p: &DownloadProgress| {
        assert_eq!(p.repo, REPO);
        events.push((
            p.file.to_string(),
            p.file_index,
            p.file_count,
            p.file_done_bytes,
            p.file_total_bytes,
            p.done_bytes,
            p.total_bytes,
        ))
    })
    .unwrap();

    // config.json and the plain weights, each once: no .bin, no `sdxl_vae.safetensors`, nothing
    // outside the root.
    assert_eq!(downloaded(&server), set(&[CONFIG, WEIGHTS]));
    assert_eq!(server.downloaded_files().len(), 2);

    let root = home.path().join("hub").join("models--org--tiny-vae");
    let sha = FakeRepo::new(REPO).sha;
    assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap(), sha);
    assert_eq!(snapshot, root.join("snapshots").join(&sha));
    for file in [CONFIG, WEIGHTS] {
        let target = std::fs::read_link(snapshot.join(file)).unwrap();
        assert!(target.starts_with(".."), "{file} links to {}", target.display());
        assert_eq!(std::fs::read(snapshot.join(file)).unwrap(), bytes(file), "{file}");
    }
    let names: BTreeSet<String> =
        std::fs::read_dir(&snapshot).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, set(&[CONFIG, WEIGHTS]));

    // Progress: config first, weights last, totals add up.
    let (config_bytes, weights_bytes) = (bytes(CONFIG).len() as u64, bytes(WEIGHTS).len() as u64);
    let last = events.last().unwrap();
    assert_eq!(
        last,
        &(
            WEIGHTS.to_string(),
            1,
            2,
            weights_bytes,
            weights_bytes,
            config_bytes + weights_bytes,
            config_bytes + weights_bytes
        )
    );
    assert!(events.iter().take_while(|e| e.0 == CONFIG).count() >= 1);

    // What the loader's `--vae` side takes.
    let folder = ModelFolder::open(&tiny_sdxl()).unwrap().with_vae(&snapshot).unwrap();
    assert_eq!(folder.component_override("vae"), Some(snapshot.as_path()));

    // Cached: no request at all, from either entry point.
    server.clear_requests();
    assert_eq!(find_cached_component(&hub, REPO, "main").unwrap(), snapshot);
    assert_eq!(fetch_component(&hub, REPO, "main", &mut |_| panic!("no download expected")).unwrap(), snapshot);
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

#[test]
fn prefers_the_requested_variant_and_falls_back_to_plain_weights() {
    let with_fp16 = vae_repo(REPO).with_file("diffusion_pytorch_model.fp16.safetensors", bytes(WEIGHTS));
    let server = HubServer::start(vec![with_fp16, vae_repo("org/plain-vae")]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut hub = options(&server, home.path());
    hub.variant = Some("fp16".into());

    fetch(&hub, REPO).unwrap();
    assert_eq!(downloaded(&server), set(&[CONFIG, "diffusion_pytorch_model.fp16.safetensors"]));

    server.clear_requests();
    fetch(&hub, "org/plain-vae").unwrap();
    assert_eq!(downloaded(&server), set(&[CONFIG, WEIGHTS]));
}

#[test]
fn another_name_is_fetched_only_when_it_is_the_only_safetensors() {
    let mut repo = vae_repo(REPO);
    repo.files.remove(WEIGHTS);
    let server = HubServer::start(vec![repo]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let snapshot = fetch(&options(&server, home.path()), REPO).unwrap();
    assert_eq!(downloaded(&server), set(&[CONFIG, "sdxl_vae.safetensors"]));
    ModelFolder::open(&tiny_sdxl()).unwrap().with_vae(&snapshot).unwrap();
}

#[test]
fn offline_uses_only_the_cache_and_names_what_is_missing() {
    let server = HubServer::start(vec![vae_repo(REPO)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut hub = options(&server, home.path());
    hub.offline = true;

    // Before any download.
    let err = message(fetch(&hub, REPO).unwrap_err());
    assert!(
        err.contains(REPO) && err.contains("`config.json` is missing") && err.contains("without --offline"),
        "{err}"
    );
    assert!(server.requests().is_empty(), "offline made requests: {:?}", server.requests());

    hub.offline = false;
    let snapshot = fetch(&hub, REPO).unwrap();
    hub.offline = true;
    server.clear_requests();
    assert_eq!(fetch(&hub, REPO).unwrap(), snapshot);

    std::fs::remove_file(snapshot.join(WEIGHTS)).unwrap();
    let err = message(fetch(&hub, REPO).unwrap_err());
    assert!(err.contains("not fully") && err.contains("`*.safetensors` is missing"), "{err}");
    std::fs::remove_file(snapshot.join(CONFIG)).unwrap();
    let err = message(fetch(&hub, REPO).unwrap_err());
    assert!(err.contains("`config.json` is missing"), "{err}");
    assert!(server.requests().is_empty(), "offline made requests: {:?}", server.requests());

    // Back online, both come back from their blobs, still cached: linked, not fetched.
    hub.offline = false;
    let again = fetch(&hub, REPO).unwrap();
    assert!(downloaded(&server).is_empty(), "{:?}", downloaded(&server));
    assert!(again.join(WEIGHTS).is_file() && again.join(CONFIG).is_file());
}

#[test]
fn repos_that_are_not_single_models_are_refused_by_name() {
    let no_config = FakeRepo::new("org/no-config").with_file(WEIGHTS, bytes(WEIGHTS));
    let nested = FakeRepo::new("org/nested")
        .with_file("vae/config.json", bytes(CONFIG))
        .with_file("vae/diffusion_pytorch_model.safetensors", bytes(WEIGHTS));
    let pipeline = FakeRepo::from_dir("org/pipeline", &tiny_sdxl()).unwrap();
    let pickles = FakeRepo::new("org/pickles")
        .with_file(CONFIG, bytes(CONFIG))
        .with_file("diffusion_pytorch_model.bin", b"pickle".to_vec());
    let server = HubServer::start(vec![no_config, nested, pipeline, pickles]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let hub = options(&server, home.path());

    for repo in ["org/no-config", "org/nested", "org/pipeline"] {
        let err = message(fetch(&hub, repo).unwrap_err());
        assert!(err.contains("not a single model repo") && err.contains(repo) && err.contains("config.json"), "{err}");
    }
    let err = message(fetch(&hub, "org/pipeline").unwrap_err());
    assert!(err.contains("model_index.json"), "{err}");
    let err = fetch(&hub, "org/pickles").unwrap_err().to_string();
    assert!(
        err.contains("org/pickles") && err.contains("diffusion_pytorch_model.bin") && err.contains("safetensors"),
        "{err}"
    );
    let err = message(fetch(&hub, "org/missing").unwrap_err());
    assert!(err.contains("org/missing") && err.contains("not found"), "{err}");
    assert!(server.downloaded_files().is_empty(), "{:?}", server.downloaded_files());
}

#[test]
fn a_cut_download_resumes_with_a_range_request_on_the_next_run() {
    let server = HubServer::start(vec![vae_repo(REPO)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut hub = options(&server, home.path());
    hub.retries = 0;
    let cut_bytes = 1000;
    server.cut_first_download(WEIGHTS, cut_bytes);

    let err = fetch(&hub, REPO).unwrap_err().to_string();
    assert!(err.contains(WEIGHTS) && err.contains("run again to resume"), "{err}");
    // The config is there, the weights are not: not taken as complete.
    assert_eq!(find_cached_component(&hub, REPO, "main").unwrap_err(), "*.safetensors");

    server.clear_requests();
    let snapshot = fetch(&hub, REPO).unwrap();
    let weight_requests: Vec<_> =
        server.requests().into_iter().filter(|r| r.is_download() && r.resolved_file() == Some(WEIGHTS)).collect();
    assert_eq!(weight_requests.len(), 1);
    assert_eq!(weight_requests[0].header("range"), Some(format!("bytes={cut_bytes}-").as_str()));
    assert_eq!(downloaded(&server), set(&[WEIGHTS]));
    assert_eq!(std::fs::read(snapshot.join(WEIGHTS)).unwrap(), bytes(WEIGHTS));
}

#[test]
fn not_enough_disk_space_is_refused_before_any_file_request() {
    let server = HubServer::start(vec![vae_repo(REPO)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut hub = options(&server, home.path());
    hub.free_bytes_override = Some(1000);
    let err = message(fetch(&hub, REPO).unwrap_err());
    // Only what a run needs counts, not the extras.
    let needed_bytes = (bytes(CONFIG).len() + bytes(WEIGHTS).len()) as u64;
    for part in ["not enough disk space", REPO, "1000 bytes", &format!("{needed_bytes} bytes")] {
        assert!(err.contains(part), "no `{part}` in: {err}");
    }
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.path.starts_with("/api/")), "{requests:?}");

    hub.free_bytes_override = Some(needed_bytes);
    fetch(&hub, REPO).unwrap();
}

#[test]
fn gated_repos_need_a_token() {
    let server = HubServer::start(vec![vae_repo("org/gated").gated("hf_secret", 401)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut hub = options(&server, home.path());
    let err = message(fetch(&hub, "org/gated").unwrap_err());
    for part in ["org/gated", "https://huggingface.co/org/gated", "HF_TOKEN", "401"] {
        assert!(err.contains(part), "no `{part}` in: {err}");
    }
    (hub.token, hub.token_source) = (Some("wrong".into()), "HF_TOKEN".into());
    let err = message(fetch(&hub, "org/gated").unwrap_err());
    assert!(err.contains("refused the token from HF_TOKEN"), "{err}");

    hub.token = Some("hf_secret".into());
    let snapshot = fetch(&hub, "org/gated").unwrap();
    assert_eq!(std::fs::read(snapshot.join(WEIGHTS)).unwrap(), bytes(WEIGHTS));
}
