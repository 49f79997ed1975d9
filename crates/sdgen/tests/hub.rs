//! Hub downloads against a local server that speaks the hub's URLs (`hub-test-server`), never the
//! internet: `testdata/tiny-sd15` served as a repo (plus decoys a run must not fetch), the
//! standard cache layout, resume after a cut connection, cache reuse without requests, offline
//! mode, gated repos and tokens, and the disk-space refusal. Every test has its own server and
//! temporary `HF_HOME`, passed through `HubOptions::from_vars`, so none touches the process
//! environment.

use std::collections::BTreeSet;
use std::path::PathBuf;

mod common;

use common::hub::{downloaded, message, options};
use hub_test_server::{FakeRepo, HubServer};
use sdgen::hub::{fetch_pipeline, find_cached, DownloadProgress, HubOptions};
use sdgen::loading::{ModelFolder, ModelSource};

const REPO: &str = "org/tiny-sd15";
const UNET: &str = "unet/diffusion_pytorch_model.safetensors";
const VAE: &str = "vae/diffusion_pytorch_model.safetensors";

fn tiny() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sd15"))
}

/// Every file of the tiny model: exactly what a run needs.
fn needed() -> BTreeSet<String> {
    FakeRepo::from_dir(REPO, &tiny()).unwrap().files.into_keys().collect()
}

/// The tiny model plus files a run must never fetch.
fn repo_with_decoys(id: &str) -> FakeRepo {
    let unet = std::fs::read(tiny().join(UNET)).unwrap();
    FakeRepo::from_dir(id, &tiny())
        .unwrap()
        .with_file("unet/diffusion_pytorch_model.bin", b"pickle: never fetched".to_vec())
        // A valid copy, so the fp16 test can open what it fetched.
        .with_file("unet/diffusion_pytorch_model.fp16.safetensors", unet.clone())
        .with_file("unet/diffusion_flax_model.msgpack", b"flax".to_vec())
        .with_file("text_encoder/model.onnx", b"onnx".to_vec())
        .with_file("text_encoder/pytorch_model.bin", b"pickle".to_vec())
        .with_file("v1-5-pruned-emaonly.safetensors", unet)
        .with_file("safety_checker/config.json", b"{}".to_vec())
        .with_file("safety_checker/model.safetensors", b"unused component".to_vec())
        .with_file("README.md", b"# tiny".to_vec())
}

fn fetch(hub: &HubOptions, repo: &str) -> sdgen::Result<PathBuf> {
    fetch_pipeline(hub, repo, "main", &mut |_| {})
}

#[test]
fn downloads_only_what_a_run_needs_into_the_standard_layout() {
    let server = HubServer::start(vec![repo_with_decoys(REPO)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let hub = options(&server, home.path());
    let mut events: Vec<(String, u64, u64, u64, u64)> = Vec::new();
    let snapshot = fetch_pipeline(&hub, REPO, "main", &mut |p: &DownloadProgress| {
        events.push((p.file.to_string(), p.file_done_bytes, p.file_total_bytes, p.done_bytes, p.total_bytes))
    })
    .unwrap();

    // Exactly the tiny model's files, each once: no .bin/.onnx/flax/fp16/root checkpoint/unused
    // component.
    assert_eq!(downloaded(&server), needed());
    assert_eq!(server.downloaded_files().len(), needed().len());
    let folder = ModelFolder::open(&snapshot).unwrap();
    assert_eq!(folder.pipeline_class(), "StableDiffusionPipeline");

    // models--org--name/{blobs,refs,snapshots}, relative links, byte-identical files.
    let root = home.path().join("hub").join("models--org--tiny-sd15");
    let sha = FakeRepo::new(REPO).sha;
    assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap(), sha);
    assert_eq!(snapshot, root.join("snapshots").join(&sha));
    for file in needed() {
        let link = snapshot.join(&file);
        let target = std::fs::read_link(&link).unwrap();
        assert!(target.starts_with(".."), "{file} links to {}", target.display());
        assert_eq!(std::fs::read(&link).unwrap(), std::fs::read(tiny().join(&file)).unwrap(), "{file}");
    }

    // Progress: every downloaded file ends complete, and the totals add up.
    let weights_bytes = std::fs::metadata(tiny().join(UNET)).unwrap().len();
    let last_unet = events.iter().rev().find(|e| e.0 == UNET).unwrap();
    assert_eq!((last_unet.1, last_unet.2), (weights_bytes, weights_bytes));
    let last = events.last().unwrap();
    assert_eq!(last.3, last.4);
    let planned: u64 = needed()
        .iter()
        .filter(|f| *f != "model_index.json")
        .map(|f| std::fs::metadata(tiny().join(f)).unwrap().len())
        .sum();
    assert_eq!(last.4, planned);
}

#[test]
fn prefers_the_requested_variant_and_falls_back_to_plain_weights() {
    let server = HubServer::start(vec![repo_with_decoys(REPO)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut hub = options(&server, home.path());
    hub.variant = Some("fp16".into());
    let snapshot = fetch(&hub, REPO).unwrap();
    let got = downloaded(&server);
    assert!(got.contains("unet/diffusion_pytorch_model.fp16.safetensors"));
    assert!(!got.contains(UNET), "plain unet fetched too: {got:?}");
    // No fp16 files for these: the plain ones.
    assert!(got.contains("text_encoder/model.safetensors") && got.contains(VAE));
    ModelFolder::open(&snapshot).unwrap();
}

#[test]
fn a_complete_cache_is_used_without_any_request() {
    let server = HubServer::start(vec![repo_with_decoys(REPO)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let hub = options(&server, home.path());
    let first = fetch(&hub, REPO).unwrap();
    server.clear_requests();

    assert_eq!(fetch(&hub, REPO).unwrap(), first);
    let folder =
        ModelSource::parse(REPO).open_with(&hub, &Default::default(), &mut |_| panic!("no download expected")).unwrap();
    assert_eq!(folder.root(), first);
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

#[test]
fn a_cut_download_resumes_with_a_range_request_on_the_next_run() {
    let server = HubServer::start(vec![repo_with_decoys(REPO)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut hub = options(&server, home.path());
    hub.retries = 0;
    let cut_bytes = 1000;
    server.cut_first_download(UNET, cut_bytes);

    let err = fetch(&hub, REPO).unwrap_err().to_string();
    assert!(err.contains(UNET) && err.contains("run again to resume"), "{err}");
    let blobs = home.path().join("hub/models--org--tiny-sd15/blobs");
    let parts: Vec<u64> = std::fs::read_dir(&blobs)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .map(|e| e.metadata().unwrap().len())
        .collect();
    assert_eq!(parts, [cut_bytes as u64]);
    // Weights come last: the snapshot is not taken as complete.
    assert!(find_cached(&hub, REPO, "main").is_err());

    server.clear_requests();
    let snapshot = fetch(&hub, REPO).unwrap();
    let unet_requests: Vec<_> =
        server.requests().into_iter().filter(|r| r.is_download() && r.resolved_file() == Some(UNET)).collect();
    assert_eq!(unet_requests.len(), 1);
    assert_eq!(unet_requests[0].header("range"), Some(format!("bytes={cut_bytes}-").as_str()));
    // Only what the cut run had not finished: the unet and the weights queued after it.
    assert_eq!(downloaded(&server), BTreeSet::from([UNET.to_string(), VAE.to_string()]));
    assert_eq!(std::fs::read(snapshot.join(UNET)).unwrap(), std::fs::read(tiny().join(UNET)).unwrap());
    ModelFolder::open(&snapshot).unwrap();
}

#[test]
fn a_cut_download_through_the_cdn_redirect_resumes_within_the_call() {
    let server = HubServer::start(vec![repo_with_decoys(REPO)]).unwrap();
    server.redirect_lfs(true);
    let home = tempfile::tempdir().unwrap();
    let hub = options(&server, home.path());
    server.cut_first_download(VAE, 777);
    let snapshot = fetch(&hub, REPO).unwrap();
    assert_eq!(std::fs::read(snapshot.join(VAE)).unwrap(), std::fs::read(tiny().join(VAE)).unwrap());
    let vae_sha = hub_test_server::etag(VAE, &std::fs::read(tiny().join(VAE)).unwrap());
    let ranges: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_download() && r.path == format!("/cdn/{vae_sha}"))
        .map(|r| r.header("range").unwrap_or("none").to_string())
        .collect();
    assert_eq!(ranges, ["bytes=0-", "bytes=777-"]);
}

#[test]
fn offline_uses_only_the_cache_and_names_what_is_missing() {
    let server = HubServer::start(vec![repo_with_decoys(REPO)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut hub = options(&server, home.path());
    hub.offline = true;

    let err = message(fetch(&hub, REPO).unwrap_err());
    assert!(err.contains(REPO) && err.contains("model_index.json") && err.contains("without --offline"), "{err}");

    hub.offline = false;
    let snapshot = fetch(&hub, REPO).unwrap();
    hub.offline = true;
    server.clear_requests();
    assert_eq!(fetch(&hub, REPO).unwrap(), snapshot);

    std::fs::remove_file(snapshot.join(UNET)).unwrap();
    let err = message(fetch(&hub, REPO).unwrap_err());
    assert!(err.contains("`unet/*.safetensors` is missing"), "{err}");
    std::fs::remove_file(snapshot.join("tokenizer/merges.txt")).unwrap();
    let err = message(fetch(&hub, REPO).unwrap_err());
    assert!(err.contains("`tokenizer/merges.txt` is missing"), "{err}");
    assert!(server.requests().is_empty(), "offline made requests: {:?}", server.requests());

    // Back online, the two files come back from their blobs, still cached: linked, not fetched.
    hub.offline = false;
    let again = fetch(&hub, REPO).unwrap();
    assert!(downloaded(&server).is_empty(), "{:?}", downloaded(&server));
    assert!(again.join(UNET).is_file() && again.join("tokenizer/merges.txt").is_file());
}

#[test]
fn gated_repos_need_a_token_and_say_how_to_get_one() {
    let gated = |status| HubServer::start(vec![repo_with_decoys("org/gated").gated("hf_secret", status)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    for status in [401, 403] {
        let server = gated(status);
        let err = message(fetch(&options(&server, home.path()), "org/gated").unwrap_err());
        for part in ["org/gated", "https://huggingface.co/org/gated", "HF_TOKEN", &status.to_string()] {
            assert!(err.contains(part), "no `{part}` in: {err}");
        }
    }

    let server = gated(401);
    let mut hub = options(&server, home.path());
    (hub.token, hub.token_source) = (Some("wrong".into()), "HF_TOKEN".into());
    let err = message(fetch(&hub, "org/gated").unwrap_err());
    assert!(
        err.contains("refused the token from HF_TOKEN") && err.contains("https://huggingface.co/org/gated"),
        "{err}"
    );

    hub.token = Some("hf_secret".into());
    ModelFolder::open(&fetch(&hub, "org/gated").unwrap()).unwrap();
    let files: Vec<_> = server.requests().into_iter().filter(|r| r.resolved_file().is_some()).collect();
    assert!(files.iter().filter(|r| r.header("authorization") == Some("Bearer hf_secret")).count() >= needed().len());
}

#[test]
fn the_token_comes_from_hf_token_or_the_token_file() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("token"), "hf_from_file\n").unwrap();
    let home_s = home.path().display().to_string();
    let hub = HubOptions::from_vars(|k| (k == "HF_HOME").then(|| home_s.clone()));
    assert_eq!(hub.token.as_deref(), Some("hf_from_file"));
    assert!(hub.token_source.contains("token"));
    assert_eq!(hub.cache_dir, home.path().join("hub"));
    assert_eq!(hub.endpoint, "https://huggingface.co");
    assert!(!hub.offline && hub.free_bytes_override.is_none());

    let hub = HubOptions::from_vars(|k| match k {
        "HF_HOME" => Some(home_s.clone()),
        "HF_TOKEN" => Some("hf_env".into()),
        "HF_HUB_CACHE" => Some("/elsewhere/hub".into()),
        "HF_HUB_OFFLINE" => Some("1".into()),
        "HF_ENDPOINT" => Some("http://127.0.0.1:9/".into()),
        "SDGEN_TEST_FREE_BYTES" => Some("1234".into()),
        _ => None,
    });
    assert_eq!((hub.token.as_deref(), hub.token_source.as_str()), (Some("hf_env"), "HF_TOKEN"));
    assert_eq!(hub.cache_dir, PathBuf::from("/elsewhere/hub"));
    assert!(hub.offline);
    assert_eq!(hub.endpoint, "http://127.0.0.1:9");
    assert_eq!(hub.free_bytes_override, Some(1234));
    assert!(!format!("{hub:?}").contains("hf_env"), "Debug shows the token");
}

#[test]
fn not_enough_disk_space_is_refused_before_any_file_request() {
    let server = HubServer::start(vec![repo_with_decoys(REPO)]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut hub = options(&server, home.path());
    hub.free_bytes_override = Some(1000);
    let err = message(fetch(&hub, REPO).unwrap_err());
    let needed_bytes: u64 = needed().iter().map(|f| std::fs::metadata(tiny().join(f)).unwrap().len()).sum();
    for part in ["not enough disk space", REPO, "1000 bytes", &format!("{needed_bytes} bytes")] {
        assert!(err.contains(part), "no `{part}` in: {err}");
    }
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.path.starts_with("/api/")), "{requests:?}");

    hub.free_bytes_override = Some(needed_bytes);
    fetch(&hub, REPO).unwrap();
}

#[test]
fn unknown_repos_and_non_pipelines_are_named() {
    let pickles = FakeRepo::from_dir("org/pickles", &tiny())
        .unwrap()
        .with_file("unet/diffusion_pytorch_model.bin", b"pickle".to_vec());
    let mut pickles = pickles;
    pickles.files.remove(UNET);
    let single = FakeRepo::new("org/single").with_file("model.safetensors", b"x".to_vec());
    let server = HubServer::start(vec![pickles, single]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let hub = options(&server, home.path());

    let err = message(fetch(&hub, "org/missing").unwrap_err());
    assert!(err.contains("org/missing") && err.contains("not found"), "{err}");
    let err = fetch(&hub, "org/single").unwrap_err().to_string();
    assert!(err.contains("org/single") && err.contains("model_index.json"), "{err}");
    let err = fetch(&hub, "org/pickles").unwrap_err().to_string();
    assert!(err.contains("org/pickles") && err.contains("unet") && err.contains("safetensors"), "{err}");
    assert!(server.downloaded_files().is_empty());
}

#[test]
fn sharded_weights_are_fetched_with_their_index() {
    use sdgen::candle::{safetensors, Device};
    let tensors = safetensors::load(tiny().join(UNET), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let dir = tempfile::tempdir().unwrap();
    let mut repo = FakeRepo::from_dir(REPO, &tiny()).unwrap();
    repo.files.remove(UNET);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let shard = format!("diffusion_pytorch_model-{:05}-of-00002.safetensors", i + 1);
        let part: std::collections::HashMap<String, _> =
            chunk.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        let path = dir.path().join(&shard);
        safetensors::save(&part, &path).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), serde_json::json!(shard));
        }
        let bytes = std::fs::read(&path).unwrap();
        repo = repo
            .with_file(&format!("unet/{shard}"), bytes.clone())
            .with_file(&format!("unet/diffusion_pytorch_model.fp16-{:05}-of-00002.safetensors", i + 1), bytes);
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string();
    repo = repo
        .with_file("unet/diffusion_pytorch_model.safetensors.index.json", index.clone())
        .with_file("unet/diffusion_pytorch_model.safetensors.index.fp16.json", index);
    let server = HubServer::start(vec![repo]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let snapshot = fetch(&options(&server, home.path()), REPO).unwrap();
    let unet: BTreeSet<String> = downloaded(&server).into_iter().filter(|f| f.starts_with("unet/")).collect();
    assert_eq!(
        unet,
        BTreeSet::from(
            [
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors.index.json",
                "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                "unet/diffusion_pytorch_model-00002-of-00002.safetensors"
            ]
            .map(String::from)
        )
    );
    let folder = ModelFolder::open(&snapshot).unwrap();
    assert_eq!(folder.weights("unet").unwrap().files.len(), 2);
}

/// SD 3.5 in the hub's layout (sharded transformer and T5, the T5 tokenizer) comes down whole,
/// and a distilled model named by its repository keeps its own defaults (Large Turbo: 4 steps,
/// no guidance), where the same folder under another name takes the family's.
#[test]
fn sd35_repos_download_whole_and_turbo_keeps_its_defaults() {
    let folder = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sd35-large"));
    let turbo = "stabilityai/stable-diffusion-3.5-large-turbo";
    let repos =
        vec![FakeRepo::from_dir(turbo, &folder).unwrap(), FakeRepo::from_dir("org/tiny-sd35", &folder).unwrap()];
    let every_file: BTreeSet<String> = repos[0].files.keys().cloned().collect();
    let server = HubServer::start(repos).unwrap();
    let home = tempfile::tempdir().unwrap();
    let hub = options(&server, home.path());
    let open = |repo: &str| ModelSource::parse(repo).open_with(&hub, &Default::default(), &mut |_| {}).unwrap();
    let model = open(turbo);
    assert_eq!(model.family().name, "sd35-large");
    // Every file is in the snapshot (shards, index files, tokenizer_3); tokenizer_2's vocab and
    // merges are tokenizer's bytes, fetched once.
    let snapshot = find_cached(&hub, turbo, "main").unwrap();
    let missing: Vec<&String> = every_file.iter().filter(|f| !snapshot.join(f).is_file()).collect();
    assert!(missing.is_empty(), "not in the snapshot: {missing:?}");
    assert!(downloaded(&server).is_subset(&every_file));
    let d = model.run_defaults();
    assert_eq!((d.steps, d.guidance), (4, 0.0));
    let plain = open("org/tiny-sd35").run_defaults();
    assert_eq!((plain.steps, plain.guidance), (28, 3.5));
}
