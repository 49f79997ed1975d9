//! The network side, on the official `hf-hub` crate's blocking API (ureq + rustls): the file list
//! with sizes, single-file downloads into the cache (resumable: hf-hub keeps `blobs/{etag}.part`
//! and continues it with a `Range` request, on a cut connection within the call and on the next
//! run), and the hub's HTTP errors turned into messages that say what to do.
//!
//! Every request runs under the stall watchdog (`stall.rs`): hf-hub sets no read timeout,
//! so without it a server that stops sending would hang the run.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};
use serde::Deserialize;

use super::select::RemoteFile;
use super::stall::{seconds, watch, Beat, BeatReader};
use super::HubOptions;
use crate::{Error, Result};

/// Where users accept a gated model's licence; always the real hub, whatever the endpoint,
/// since licences are accepted with a huggingface.co account.
const LICENCE_HOST: &str = "https://huggingface.co";

/// One repository at one revision on the hub.
pub struct Remote {
    api: Api,
    repo: String,
    revision: String,
    endpoint: String,
    token_source: Option<String>,
    cache_root: PathBuf,
    stall: Duration,
}

/// What errors call the listing request.
const LIST: &str = "the file list";

#[derive(Deserialize)]
struct Info {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: Option<u64>,
}

impl Remote {
    /// A client for `repo` at `revision`, with the options' endpoint, cache and token.
    pub fn new(hub: &HubOptions, repo: &str, revision: &str) -> Result<Self> {
        let api = ApiBuilder::from_cache(hf_hub::Cache::new(hub.cache_dir.clone()))
            .with_endpoint(hub.endpoint.clone())
            .with_token(hub.token.clone())
            .with_progress(false)
            .with_retries(hub.retries)
            .with_user_agent("sdgen", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| Error::InvalidInput(format!("cannot set up the hub client: {e}")))?;
        Ok(Self {
            api,
            repo: repo.to_string(),
            revision: revision.to_string(),
            endpoint: hub.endpoint.clone(),
            token_source: hub.token.as_ref().map(|_| hub.token_source.clone()),
            cache_root: super::cache::RepoCache::new(&hub.cache_dir, repo).root().to_path_buf(),
            stall: hub.stall_timeout,
        })
    }

    fn api_repo(&self) -> ApiRepo {
        self.api.repo(Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone()))
    }

    /// The revision's commit and its files with sizes and etags
    /// (`GET {endpoint}/api/models/{repo}/revision/{rev}?blobs=true`; hf-hub's own `info()`
    /// drops the sizes, which the disk-space check needs).
    pub fn list(&self) -> Result<(String, Vec<RemoteFile>)> {
        let what = LIST;
        let request = self.api_repo().info_request().query("blobs", "true");
        let mut received_bytes = 0;
        let outcome = watch(
            self.stall,
            &mut |beat| {
                if let Beat::Bytes(n) = beat {
                    received_bytes += n;
                }
            },
            move |beats| -> std::result::Result<String, ApiError> {
                let response = request.call().map_err(|e| ApiError::RequestError(Box::new(e)))?;
                beats.send(Beat::Start(0));
                let mut text = String::new();
                BeatReader { inner: response.into_reader(), beats }.read_to_string(&mut text)?;
                Ok(text)
            },
        )
        .map_err(|e| Error::io(&self.cache_root, e))?;
        let Some(outcome) = outcome else {
            return Err(self.stalled(what, None, received_bytes, 0));
        };
        let text = outcome.map_err(|e| self.error(what, e))?;
        let info: Info = serde_json::from_str(&text).map_err(|e| {
            Error::BadModel(format!(
                "the hub's file list for `{}` is not what a hub sends ({e}): is HF_ENDPOINT ({}) a Hugging Face hub?",
                self.repo, self.endpoint
            ))
        })?;
        let files = info
            .siblings
            .into_iter()
            .map(|s| {
                let size_bytes = s.size.or(s.lfs.as_ref().and_then(|l| l.size)).unwrap_or(0);
                // The blob name downloads use: the LFS SHA-256, else the git blob id.
                let blob = s.lfs.map(|l| l.sha256).or(s.blob_id);
                RemoteFile { path: s.rfilename, size_bytes, blob }
            })
            .collect();
        Ok((info.sha, files))
    }

    /// Downloads `path` into the cache (blob + snapshot link + ref) and returns the snapshot path.
    /// `progress` gets the bytes of the file on disk so far and its size, after each chunk and
    /// (with `true`) at the end; a resumed transfer starts from the bytes already there.
    pub fn download(&self, path: &str, progress: &mut dyn FnMut(u64, u64, bool)) -> Result<PathBuf> {
        let (mut done_bytes, mut size_bytes) = (0, 0);
        let api_repo = self.api_repo();
        let file = path.to_string();
        let outcome = watch(
            self.stall,
            &mut |beat| match beat {
                // Again on each resume within the call; the resumed offset follows as bytes.
                Beat::Start(size) => (size_bytes, done_bytes) = (size, 0),
                Beat::Bytes(n) => {
                    done_bytes += n;
                    progress(done_bytes, size_bytes, false);
                }
                Beat::End => progress(done_bytes, size_bytes, true),
            },
            move |beats| api_repo.download_with_progress(&file, beats),
        )
        .map_err(|e| Error::io(&self.cache_root, e))?;
        match outcome {
            Some(result) => result.map_err(|e| self.error(path, e)),
            None => Err(self.stalled(path, Some(path), done_bytes, size_bytes)),
        }
    }

    /// The error for a request about `what` that went `self.stall` without a byte, after
    /// `done_bytes` (of `size_bytes`, when known) of `file` (none for the file list).
    fn stalled(&self, what: &str, file: Option<&str>, done_bytes: u64, size_bytes: u64) -> Error {
        let (repo, rev, wait) = (&self.repo, &self.revision, seconds(self.stall));
        let got = match (done_bytes, size_bytes) {
            (0, 0) => "before the first byte".to_string(),
            (done, 0) => format!("after {done} bytes"),
            (done, size) => format!("after {done} of {size} bytes"),
        };
        let (url, then) = match file {
            Some(file) => (
                format!("{}/{repo}/resolve/{rev}/{file}", self.endpoint),
                format!(
                    ", which resumes the download (the partial file stays in {})",
                    self.cache_root.join("blobs").display()
                ),
            ),
            None => (format!("{}/api/models/{repo}/revision/{rev}", self.endpoint), String::new()),
        };
        Error::io(
            url,
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the hub stopped answering: no data for {wait} while fetching {what} of `{repo}` ({got}); \
                     check the network (and HF_ENDPOINT, {}) and run again{then}; \
                     SDGEN_HUB_STALL_SECS sets how many seconds to wait",
                    self.endpoint
                ),
            ),
        )
    }

    /// Turns an hf-hub error about `what` (a file, or the file list) into one that names the repo
    /// and says what to do.
    pub fn error(&self, what: &str, e: ApiError) -> Error {
        let repo = &self.repo;
        let url = PathBuf::from(format!("{}/{repo}", self.endpoint));
        match e {
            ApiError::RequestError(inner) => {
                let text = inner.to_string();
                let Some(response) = inner.into_response() else {
                    // `--offline` is the process's (the CLI's or the server's own flag), never a
                    // request field: the text stays as it is.
                    return Error::io(
                        url,
                        std::io::Error::other(format!(
                            "cannot reach the hub for `{repo}` ({text}): check the network, \
                             or use --offline (HF_HUB_OFFLINE=1) if the model is cached"
                        )),
                    );
                };
                let status = response.status();
                let code = response.header("x-error-code").unwrap_or("").to_string();
                self.status_error(what, status, &code, &url)
            }
            ApiError::TooManyRetries(inner) => self.error(what, *inner),
            // A cut connection, or a full disk: hf-hub keeps the partial file for the next run.
            ApiError::IoError(io) => Error::io(
                self.cache_root.clone(),
                std::io::Error::new(
                    io.kind(),
                    format!("while downloading {what} of `{repo}`: {io} (run again to resume)"),
                ),
            ),
            ApiError::LockAcquisition(path) => Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!("another process is downloading {what} of `{repo}`: wait for it to finish"),
                ),
            ),
            ApiError::InvalidResume => Error::BadModel(format!(
                "the partial download of {what} of `{repo}` is larger than the file: delete the .part files in {}",
                self.cache_root.join("blobs").display()
            )),
            other => Error::io(
                url,
                std::io::Error::other(format!(
                    "unexpected answer for {what} of `{repo}` ({other}): is HF_ENDPOINT ({}) a Hugging Face hub?",
                    self.endpoint
                )),
            ),
        }
    }

    fn status_error(&self, what: &str, status: u16, code: &str, url: &std::path::Path) -> Error {
        let (repo, rev) = (&self.repo, &self.revision);
        // The hub answers 401 for repos it does not have to anonymous users, so as not to tell
        // private repos from missing ones; the error code tells them apart.
        if code == "RepoNotFound" || (status == 404 && code.is_empty() && what == LIST) {
            return Error::InvalidInput(format!(
                "model repo `{repo}` was not found on {} ({status}): check the id (private repos also need HF_TOKEN)",
                self.endpoint
            ));
        }
        match (status, code) {
            (404, "RevisionNotFound") => {
                Error::InvalidInput(format!("revision `{rev}` of model repo `{repo}` was not found ({status})"))
            }
            (404, _) => Error::InvalidInput(format!(
                "{what} was not found in model repo `{repo}` at revision `{rev}` ({status}): \
                 the repo may have changed; try again"
            )),
            (401 | 403, _) => match &self.token_source {
                None => Error::InvalidInput(format!(
                    "model `{repo}` is gated or private: the hub answered {status} for {what} without a token. \
                     Accept its licence at {LICENCE_HOST}/{repo} (logged in), create a read token at \
                     {LICENCE_HOST}/settings/tokens and set HF_TOKEN to it \
                     (or log in with `hf auth login`, which writes the token file)"
                )),
                Some(source) => Error::InvalidInput(format!(
                    "the hub refused the token from {source} for model `{repo}` ({status} for {what}): \
                     accept the licence at \
                     {LICENCE_HOST}/{repo} with the account that owns the token, or set HF_TOKEN to a token with access"
                )),
            },
            _ => Error::io(
                url,
                std::io::Error::other(format!("the hub answered {status} for {what} of `{repo}`; try again later")),
            ),
        }
    }
}
