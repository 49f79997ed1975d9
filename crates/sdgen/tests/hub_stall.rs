//! A hub that stops sending, or never answers, fails the download within
//! `HubOptions::stall_timeout` instead of hanging, with an error naming the repo, the file and the
//! bytes received; the partial file stays a `.part` that a later run resumes, even though the
//! given-up worker thread lives on. Against the local fake hub (`hub-test-server`), every test
//! with its own server and `HF_HOME`, and the timeout set in `HubOptions` (not the process
//! environment, which parallel tests share).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use hub_test_server::{FakeRepo, HubServer};
use sdgen::hub::{fetch_component, fetch_pipeline, find_cached, HubOptions, DEFAULT_STALL_TIMEOUT};
use sdgen::loading::ModelFolder;
use sdgen::Error;

const REPO: &str = "org/tiny-sd15";
const UNET: &str = "unet/diffusion_pytorch_model.safetensors";
const STALL: Duration = Duration::from_secs(1);
/// How long a stalled call may take: the timeout, plus ample slack for a loaded test machine.
const WITHIN: Duration = Duration::from_secs(8);

fn tiny() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sd15"))
}

fn options(server: &HubServer, home: &Path) -> HubOptions {
    HubOptions { stall_timeout: STALL, ..common::hub::options(server, home) }
}

/// The same options with a long timeout, for the run after a stall: it waits (silently, no
/// bytes flowing) for hf-hub's file lock until the given-up worker lets go of it, with 1 s
/// sleeps between tries.
fn patient(hub: &HubOptions) -> HubOptions {
    HubOptions { stall_timeout: Duration::from_secs(30), ..hub.clone() }
}

fn fetch(hub: &HubOptions) -> sdgen::Result<PathBuf> {
    fetch_pipeline(hub, REPO, "main", &mut |_| {})
}

/// Runs `f`, checks it failed as a stall (a timed-out I/O error) between the timeout and
/// [`WITHIN`], and returns the message.
fn stalled<T: std::fmt::Debug>(f: impl FnOnce() -> sdgen::Result<T>) -> String {
    let start = Instant::now();
    let err = f().unwrap_err();
    let took = start.elapsed();
    assert!(took >= STALL && took < WITHIN, "gave up after {took:?}: {err}");
    match &err {
        Error::Io { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::TimedOut, "{err}"),
        other => panic!("not an I/O error: {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("no data for 1 s") && text.contains("SDGEN_HUB_STALL_SECS"), "{text}");
    text
}

/// The `.part` files under `blobs` and their sizes, and the number of complete blobs.
fn blobs(home: &Path, repo_folder: &str) -> (Vec<u64>, usize) {
    let dir = home.join("hub").join(repo_folder).join("blobs");
    let (mut parts, mut complete) = (Vec::new(), 0);
    for entry in std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".part") {
            parts.push(entry.metadata().unwrap().len());
        } else if !name.ends_with(".lock") {
            complete += 1;
        }
    }
    (parts, complete)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_download_that_stops_mid_file_fails_and_the_next_run_resumes_it() {
    let server = HubServer::start(vec![FakeRepo::from_dir(REPO, &tiny()).unwrap()]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let hub = options(&server, home.path());
    let unet_bytes = std::fs::metadata(tiny().join(UNET)).unwrap().len();
    let sent_bytes = 1000;
    server.stall_first_download(UNET, sent_bytes);

    let text = stalled(|| fetch(&hub));
    assert!(text.contains(UNET) && text.contains(REPO), "{text}");
    assert!(text.contains(&format!("after {sent_bytes} of {unet_bytes} bytes")), "{text}");
    assert!(text.contains("run again, which resumes the download"), "{text}");
    assert!(find_cached(&hub, REPO, "main").is_err());
    let complete_before = blobs(home.path(), "models--org--tiny-sd15").1;

    // The server goes on: the given-up worker's connection closes, hf-hub retries (the default
    // 3 retries) and gets the rest of the file. The worker must stop at that answer, before
    // writing a byte of it: the partial file stays partial, and no new blob appears.
    let resumed = || {
        server.requests().iter().any(|r| r.resolved_file() == Some(UNET) && r.header("range") == Some("bytes=1000-"))
    };
    server.release_stalls();
    wait_for("the abandoned worker's retry", resumed);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(blobs(home.path(), "models--org--tiny-sd15"), (vec![sent_bytes as u64], complete_before));

    server.clear_requests();
    let snapshot = fetch(&patient(&hub)).unwrap();
    let unet_requests: Vec<_> =
        server.requests().into_iter().filter(|r| r.is_download() && r.resolved_file() == Some(UNET)).collect();
    assert_eq!(unet_requests.len(), 1);
    assert_eq!(unet_requests[0].header("range"), Some(format!("bytes={sent_bytes}-").as_str()));
    assert_eq!(std::fs::read(snapshot.join(UNET)).unwrap(), std::fs::read(tiny().join(UNET)).unwrap());
    ModelFolder::open(&snapshot).unwrap();
}

#[test]
fn a_hub_that_never_answers_the_file_list_fails() {
    let server = HubServer::start(vec![FakeRepo::from_dir(REPO, &tiny()).unwrap()]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let hub = options(&server, home.path());
    server.hang_first_request(&format!("/api/models/{REPO}/revision/main"));

    let text = stalled(|| fetch(&hub));
    assert!(text.contains("the file list") && text.contains(REPO), "{text}");
    assert!(text.contains("before the first byte"), "{text}");
    assert!(server.downloaded_files().is_empty());

    server.release_stalls();
    fetch(&patient(&hub)).unwrap();
}

#[test]
fn a_hub_that_never_answers_for_a_file_fails() {
    let server = HubServer::start(vec![FakeRepo::from_dir(REPO, &tiny()).unwrap()]).unwrap();
    let home = tempfile::tempdir().unwrap();
    let hub = options(&server, home.path());
    // The first request for the file is hf-hub's metadata probe (`Range: bytes=0-0`).
    server.hang_first_request(&format!("/{REPO}/resolve/main/{UNET}"));

    let text = stalled(|| fetch(&hub));
    assert!(text.contains(UNET) && text.contains(REPO) && text.contains("before the first byte"), "{text}");

    server.release_stalls();
    let snapshot = fetch(&patient(&hub)).unwrap();
    assert_eq!(std::fs::read(snapshot.join(UNET)).unwrap(), std::fs::read(tiny().join(UNET)).unwrap());
}

#[test]
fn a_single_model_download_through_the_cdn_that_stops_fails_and_resumes() {
    const VAE_REPO: &str = "org/tiny-vae";
    const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
    let vae = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sdxl/vae"));
    let server = HubServer::start(vec![FakeRepo::from_dir(VAE_REPO, &vae).unwrap()]).unwrap();
    server.redirect_lfs(true);
    let home = tempfile::tempdir().unwrap();
    let mut hub = options(&server, home.path());
    // No retries: the released worker ends at once, on the closed connection.
    hub.retries = 0;
    server.stall_first_download(WEIGHTS, 500);

    let text = stalled(|| fetch_component(&hub, VAE_REPO, "main", &mut |_| {}));
    assert!(text.contains(WEIGHTS) && text.contains(VAE_REPO) && text.contains("after 500 of"), "{text}");
    assert_eq!(blobs(home.path(), "models--org--tiny-vae").0, [500]);

    server.release_stalls();
    server.clear_requests();
    let snapshot = fetch_component(&patient(&hub), VAE_REPO, "main", &mut |_| {}).unwrap();
    let ranges: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_download() && r.path.starts_with("/cdn/"))
        .map(|r| r.header("range").unwrap_or("none").to_string())
        .collect();
    assert_eq!(ranges, ["bytes=500-"]);
    assert_eq!(std::fs::read(snapshot.join(WEIGHTS)).unwrap(), std::fs::read(vae.join(WEIGHTS)).unwrap());
}

#[test]
fn the_timeout_comes_from_sdgen_hub_stall_secs() {
    let with =
        |value: &'static str| HubOptions::from_vars(move |k| (k == "SDGEN_HUB_STALL_SECS").then(|| value.into()));
    assert_eq!(with("5").stall_timeout, Duration::from_secs(5));
    assert_eq!(with(" 1.5 ").stall_timeout, Duration::from_millis(1500));
    assert_eq!(DEFAULT_STALL_TIMEOUT, Duration::from_secs(60));
    for ignored in ["", "0", "-3", "soon", "inf"] {
        assert_eq!(with(ignored).stall_timeout, DEFAULT_STALL_TIMEOUT, "{ignored:?}");
    }
    assert_eq!(HubOptions::from_vars(|_| None).stall_timeout, DEFAULT_STALL_TIMEOUT);
}
