//! Hugging Face hub downloads into the standard cache (`$HF_HOME/hub`, shared with the Python
//! tools), fetching only what a run loads.
//!
//! [`fetch_pipeline`] returns a snapshot folder for [`ModelFolder::open`](crate::loading::ModelFolder::open):
//! 1. A cached snapshot that already holds everything a run loads is used as is, with no request
//!    at all ([`find_cached`]); offline (`--offline`, `HF_HUB_OFFLINE=1`) nothing else is tried,
//!    and the error names the missing file.
//! 2. Otherwise the revision's file list (with sizes) picks the files ([`select`]):
//!    `model_index.json`, each used component's configs and tokenizer files, and one set of
//!    safetensors weights per component, in [`HubOptions::variant`] (`fp16`) when the repo has it.
//! 3. Free disk space is checked against the bytes still to fetch before any file is requested.
//! 4. Files are fetched by the official `hf-hub` crate (resumable, `HF_TOKEN` for gated repos),
//!    configs first and weights last, so an interrupted download never looks complete; blobs the
//!    cache already has (another revision) are linked, not fetched again.
//!
//! Progress goes to a callback ([`DownloadProgress`]): the engine draws nothing.
//!
//! A request that goes [`HubOptions::stall_timeout`] (60 s unless `SDGEN_HUB_STALL_SECS` says
//! otherwise) without a byte fails with an error naming the repo, the file and the bytes
//! received, instead of hanging: hf-hub sets no read timeout, so each request runs on a worker
//! thread under a watchdog (`stall.rs`). The partial file stays a `.part` that the next run
//! resumes.
//!
//! Environment ([`HubOptions::from_env`]): `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`,
//! `XDG_CACHE_HOME`, `HF_TOKEN` (else `HF_TOKEN_PATH`, else `$HF_HOME/token`), `HF_HUB_OFFLINE`,
//! `SDGEN_HUB_STALL_SECS` (seconds without a byte before a download gives up, fractions allowed;
//! anything but a positive number keeps the default of 60), and for tests
//! `SDGEN_TEST_FREE_BYTES`, which replaces the measured free disk space.

pub mod cache;
pub mod component;
pub mod disk;
pub mod lora;
pub mod remote;
pub mod select;
mod stall;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cache::{check_complete, pipeline_components, RepoCache};
use remote::Remote;
use select::{RemoteFile, UNUSED_COMPONENTS};

use crate::{Error, Result};

pub use component::{fetch_component, find_cached_component};
pub use lora::fetch_lora;

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How long a request may go without a byte before it fails, unless `SDGEN_HUB_STALL_SECS`
/// says otherwise: long enough for a slow link or a busy hub, short enough not to look hung.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach the hub and where its cache is. `Debug` hides the token.
#[derive(Clone)]
pub struct HubOptions {
    /// The hub's base URL, without a trailing `/` (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The hub cache folder holding `models--org--name/` (`HF_HUB_CACHE`, else `$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// The access token for gated and private repos.
    pub token: Option<String>,
    /// Where the token came from, for messages (`HF_TOKEN`, or the token file's path).
    pub token_source: String,
    /// Use only the cache; never touch the network.
    pub offline: bool,
    /// The precision variant of weights to prefer (`fp16`), falling back to the plain weights.
    pub variant: Option<String>,
    /// How many times a cut download is resumed within one call.
    pub retries: usize,
    /// Replaces the measured free disk space (`SDGEN_TEST_FREE_BYTES`), so tests can provoke the
    /// "not enough space" refusal.
    pub free_bytes_override: Option<u64>,
    /// How long a request (the file list, a file's probe, a file's bytes) may go without
    /// receiving anything before it fails (`SDGEN_HUB_STALL_SECS`, else
    /// [`DEFAULT_STALL_TIMEOUT`]). Each byte restarts the clock, so large files are fine. hf-hub's
    /// own silent waits count too (up to 5 s for another download's file lock, under a second
    /// of back-off between retries), so values of a few seconds suit only tests.
    pub stall_timeout: Duration,
}

impl HubOptions {
    /// Options from the process environment, as the Python tools read it.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Options from the variables `var` returns, which lets tests avoid the process environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |k: &str| var(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let xdg = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(var("HOME").unwrap_or_else(|| ".".into())).join(".cache"));
            xdg.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let token_path = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
        let (token, token_source) = if let Some(t) = var("HF_TOKEN") {
            (Some(t), "HF_TOKEN".to_string())
        } else if let Some(t) = var("HUGGING_FACE_HUB_TOKEN") {
            (Some(t), "HUGGING_FACE_HUB_TOKEN".to_string())
        } else {
            let t = std::fs::read_to_string(&token_path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
            (t, format!("the token file {}", token_path.display()))
        };
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"));
        Self {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.into()).trim_end_matches('/').to_string(),
            cache_dir,
            token,
            token_source,
            offline,
            variant: None,
            retries: 3,
            free_bytes_override: var("SDGEN_TEST_FREE_BYTES").and_then(|v| v.parse().ok()),
            stall_timeout: var("SDGEN_HUB_STALL_SECS")
                .and_then(|v| v.parse::<f64>().ok())
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_STALL_TIMEOUT),
        }
    }
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("token_source", &self.token_source)
            .field("offline", &self.offline)
            .field("variant", &self.variant)
            .field("retries", &self.retries)
            .field("free_bytes_override", &self.free_bytes_override)
            .field("stall_timeout", &self.stall_timeout)
            .finish()
    }
}

/// Where a download stands, reported while bytes arrive (at most every 100 ms per file, plus the
/// start and end of each file).
#[derive(Debug, Clone)]
pub struct DownloadProgress<'a> {
    /// `org/name`.
    pub repo: &'a str,
    /// The file's path in the repo (`unet/diffusion_pytorch_model.safetensors`).
    pub file: &'a str,
    /// Which file this is, from 0.
    pub file_index: usize,
    /// How many files this call downloads.
    pub file_count: usize,
    /// Bytes of this file on disk so far (a resumed download starts where it stopped).
    pub file_done_bytes: u64,
    /// This file's size.
    pub file_total_bytes: u64,
    /// Bytes of all files of this call so far.
    pub done_bytes: u64,
    /// Bytes of all files of this call.
    pub total_bytes: u64,
}

/// The snapshot of `repo` at `revision` in the cache, if it holds everything a run loads (see
/// [`cache::check_complete`]); else what is missing (a repo path, or `model_index.json` when
/// nothing is cached).
pub fn find_cached(hub: &HubOptions, repo: &str, revision: &str) -> std::result::Result<PathBuf, String> {
    let cache = RepoCache::new(&hub.cache_dir, repo);
    let commit = cache.commit(revision).ok_or_else(|| "model_index.json".to_string())?;
    let snapshot = cache.snapshot(&commit);
    check_complete(&snapshot, hub.variant.as_deref())?;
    Ok(snapshot)
}

/// The snapshot folder of diffusers pipeline `repo` at `revision`, downloading what is missing
/// (see the module docs). Progress goes to `progress`.
pub fn fetch_pipeline(
    hub: &HubOptions,
    repo: &str,
    revision: &str,
    progress: &mut dyn FnMut(&DownloadProgress),
) -> Result<PathBuf> {
    let cache = RepoCache::new(&hub.cache_dir, repo);
    let missing = match find_cached(hub, repo, revision) {
        Ok(snapshot) => return Ok(snapshot),
        Err(missing) => missing,
    };
    if hub.offline {
        return Err(offline_refusal(&cache, repo, &missing));
    }
    let remote = Remote::new(hub, repo, revision)?;
    let (commit, listing) = remote.list()?;
    let Some(index) = listing.iter().find(|f| f.path == "model_index.json").cloned() else {
        return Err(Error::BadModel(format!(
            "model repo `{repo}` has no model_index.json: it is not a diffusers pipeline, \
             the only layout hub downloads fetch"
        )));
    };
    let variant = hub.variant.as_deref();
    let bad = |e: String| Error::BadModel(format!("model repo `{repo}`: {e}"));

    // Before any file request: every component folder the repo has bounds what the run needs
    // (model_index.json, not read yet, can only drop some).
    let folders: Vec<String> =
        select::folders(&listing).into_iter().filter(|f| !UNUSED_COMPONENTS.contains(&f.as_str())).collect();
    let mut upper = vec![index.clone()];
    upper.extend(select::select_files(&listing, &folders, variant).map_err(bad)?);
    check_space(hub, &cache, &commit, &upper, repo)?;

    let fetcher = Fetcher { remote: &remote, cache: &cache, commit: &commit, repo };
    let index_path = fetcher.fetch(&index, &mut |_, _| {})?;
    let index_text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
    let components = pipeline_components(&index_text).map_err(|e| bad(format!("model_index.json is {e}")))?;
    let names: Vec<String> = components.iter().map(|(n, _)| n.clone()).collect();
    if let Some(absent) = names.iter().find(|n| !folders.contains(n)) {
        return Err(bad(format!(
            "model_index.json names component `{absent}`, but the repo has no `{absent}/` folder"
        )));
    }
    let mut plan = select::select_files(&listing, &names, variant).map_err(bad)?;
    // Configs and tokenizers first, weights last: an interrupted run never leaves a snapshot that
    // `check_complete` accepts.
    plan.sort_by_key(|f| f.path.ends_with(".safetensors"));
    fetcher.fetch_all(&plan, progress)?;
    cache.set_ref(revision, &commit)?;
    let snapshot = cache.snapshot(&commit);
    check_complete(&snapshot, variant).map_err(|missing| {
        bad(format!("after downloading, `{missing}` is still missing from {}: the repo lacks it", snapshot.display()))
    })?;
    Ok(snapshot)
}

/// The error for a repo not (fully) in the cache while downloads are off, naming the missing file.
fn offline_refusal(cache: &RepoCache, repo: &str, missing: &str) -> Error {
    let state = if cache.root().exists() { "not fully" } else { "not" };
    // Downloads are the process's setting (`--offline` of the CLI or the server, the environment),
    // never a request field: the text stays as it is.
    Error::InvalidInput(format!(
        "model `{repo}` is {state} in the Hugging Face cache ({}): `{missing}` is missing, and downloads are off \
         (--offline or HF_HUB_OFFLINE): run once without --offline and with HF_HUB_OFFLINE unset to download it",
        cache.root().display()
    ))
}

/// Refuses, before any file is requested, a download that cannot fit.
fn check_space(hub: &HubOptions, cache: &RepoCache, commit: &str, plan: &[RemoteFile], repo: &str) -> Result<()> {
    let needed_bytes: u64 = plan
        .iter()
        .filter(|f| !cache.snapshot(commit).join(&f.path).is_file() && !blob_complete(cache, f))
        .map(|f| {
            let partial = f.blob.as_ref().and_then(|b| cache.partial(b).metadata().ok()).map_or(0, |m| m.len());
            f.size_bytes.saturating_sub(partial)
        })
        .sum();
    let Some(free_bytes) = hub.free_bytes_override.or_else(|| disk::free_bytes(&hub.cache_dir)) else {
        return Ok(());
    };
    if needed_bytes > free_bytes {
        return Err(Error::InvalidInput(format!(
            "not enough disk space to download `{repo}` into {}: it needs {needed_bytes} bytes ({}) \
             but only {free_bytes} bytes ({}) are free; \
             free some space or point HF_HOME (or HF_HUB_CACHE) at a larger disk",
            hub.cache_dir.display(),
            disk::human_bytes(needed_bytes),
            disk::human_bytes(free_bytes),
        )));
    }
    Ok(())
}

fn blob_complete(cache: &RepoCache, file: &RemoteFile) -> bool {
    file.blob.as_ref().and_then(|b| cache.blob(b).metadata().ok()).is_some_and(|m| m.len() == file.size_bytes)
}

/// Puts one file of the listed commit into the snapshot.
struct Fetcher<'a> {
    remote: &'a Remote,
    cache: &'a RepoCache,
    commit: &'a str,
    repo: &'a str,
}

impl Fetcher<'_> {
    fn pointer(&self, file: &RemoteFile) -> PathBuf {
        self.cache.snapshot(self.commit).join(&file.path)
    }

    /// Whether the file needs no download: in the snapshot, or its blob in the cache.
    /// Fetches every file of `plan` in order, reporting progress over the files still missing
    /// (those already in the cache are linked, not counted).
    fn fetch_all(&self, plan: &[RemoteFile], progress: &mut dyn FnMut(&DownloadProgress)) -> Result<()> {
        let todo: Vec<&RemoteFile> = plan.iter().filter(|f| !self.present(f)).collect();
        let total_bytes: u64 = todo.iter().map(|f| f.size_bytes).sum();
        let mut done_bytes = 0;
        for (file_index, file) in plan.iter().enumerate() {
            let slot = todo.iter().position(|t| t.path == file.path);
            let mut report = |file_done_bytes: u64, file_total_bytes: u64| {
                progress(&DownloadProgress {
                    repo: self.repo,
                    file: &file.path,
                    file_index: slot.unwrap_or(file_index),
                    file_count: todo.len(),
                    file_done_bytes,
                    file_total_bytes,
                    done_bytes: done_bytes + file_done_bytes,
                    total_bytes,
                })
            };
            self.fetch(file, &mut report)?;
            if slot.is_some() {
                done_bytes += file.size_bytes;
            }
        }
        Ok(())
    }

    fn present(&self, file: &RemoteFile) -> bool {
        self.pointer(file).is_file() || blob_complete(self.cache, file)
    }

    fn fetch(&self, file: &RemoteFile, report: &mut dyn FnMut(u64, u64)) -> Result<PathBuf> {
        let pointer = self.pointer(file);
        if pointer.is_file() {
            return Ok(pointer);
        }
        if let Some(blob) = &file.blob {
            if blob_complete(self.cache, file) {
                return self.cache.link(self.commit, &file.path, blob);
            }
            // A partial file at least as long as the file would make hf-hub ask for a range past
            // the end (416) or refuse; start over.
            let partial = self.cache.partial(blob);
            if partial.metadata().is_ok_and(|m| m.len() >= file.size_bytes) {
                let _ = std::fs::remove_file(&partial);
            }
        }
        let mut reporter = Reporter { report, size_bytes: file.size_bytes, last: None };
        let written = self
            .remote
            .download(&file.path, &mut |done_bytes, size_bytes, end| reporter.emit(done_bytes, size_bytes, end))?;
        let size = std::fs::metadata(&written).map_err(|e| Error::io(&written, e))?.len();
        if file.size_bytes > 0 && size != file.size_bytes {
            // Drop the bad blob so the next run fetches it again.
            if let Ok(blob) = std::fs::canonicalize(&written) {
                let _ = std::fs::remove_file(blob);
            }
            let _ = std::fs::remove_file(&written);
            return Err(Error::BadModel(format!(
                "downloaded {} of `{}` has {size} bytes but the hub listed {}: run again",
                file.path, self.repo, file.size_bytes
            )));
        }
        if !pointer.is_file() {
            // The file came from another commit (the branch moved since the listing): link it
            // into the listed one, which the rest of this download fills.
            link_same(&written, &pointer).map_err(|e| Error::io(&pointer, e))?;
        }
        Ok(pointer)
    }
}

fn link_same(existing: &Path, pointer: &Path) -> std::io::Result<()> {
    let blob = std::fs::canonicalize(existing)?;
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent)?;
    }
    #[cfg(unix)]
    return std::os::unix::fs::symlink(blob, pointer);
    #[cfg(not(unix))]
    return std::fs::copy(blob, pointer).map(|_| ());
}

/// A file's byte counts, throttled, for the caller's progress callback.
struct Reporter<'a> {
    report: &'a mut dyn FnMut(u64, u64),
    /// The listed size; hf-hub's own is used when the listing had none.
    size_bytes: u64,
    last: Option<Instant>,
}

impl Reporter<'_> {
    fn emit(&mut self, done_bytes: u64, size_bytes: u64, force: bool) {
        if self.size_bytes == 0 {
            self.size_bytes = size_bytes;
        }
        let due = self.last.is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
        if force || due {
            (self.report)(done_bytes, self.size_bytes);
            self.last = Some(Instant::now());
        }
    }
}
