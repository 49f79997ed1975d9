//! A local HTTP server that speaks the Hugging Face hub's URLs, so download code can be tested
//! without the internet: point `HF_ENDPOINT` at [`HubServer::endpoint`].
//!
//! It serves, for each [`FakeRepo`]:
//! - `GET /api/models/{org}/{name}/revision/{rev}[?blobs=true]`: the repo info, with `siblings`
//!   (and, with `blobs=true`, their `size`, `blobId` and `lfs`), as the hub does;
//! - `GET /api/models/{org}/{name}/tree/{rev}?recursive=true`: the file tree, as the Python
//!   client's `snapshot_download` reads it;
//! - `GET|HEAD /{org}/{name}/resolve/{rev}/{file}`: the file, with the hub's headers
//!   (`X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`) and `Range` requests (206);
//!   LFS files (weights) may be redirected to `/cdn/{sha256}` like the hub's CDN.
//!
//! Gated repos answer 401 (no token) or 403 (wrong token) with `X-Error-Code: GatedRepo`; unknown
//! repos and files answer 404 with `RepoNotFound` / `EntryNotFound`. Every request is recorded
//! ([`HubServer::requests`]). Faults, each armed for the first matching request: a download cut
//! mid-body ([`HubServer::cut_first_download`]) to test resuming; a download that stops sending
//! mid-body but keeps the connection open ([`HubServer::stall_first_download`]); a request never
//! answered at all ([`HubServer::hang_first_request`]). Stalled and hung connections are held
//! until [`HubServer::release_stalls`] (or the server is dropped), then closed. One thread per
//! connection, and every response closes its connection: simple, and enough for tests.
//!
//! Etags: LFS files get their SHA-256, as on the hub; regular files get a 40-hex id derived from
//! a SHA-256 of git's blob header and content (the hub uses git's SHA-1 there; only the shape
//! matters to clients).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// A repository served by the fake hub.
#[derive(Debug, Clone)]
pub struct FakeRepo {
    /// `org/name`.
    pub id: String,
    /// The commit every revision of it resolves to (40 hex).
    pub sha: String,
    /// Files by repo path (`unet/config.json`).
    pub files: BTreeMap<String, Vec<u8>>,
    /// When set, file downloads need `Authorization: Bearer {token}`.
    pub token: Option<String>,
    /// What a gated repo answers without any token: 401 (the hub, to anonymous users) or 403.
    pub status_without_token: u16,
}

impl FakeRepo {
    /// An empty repo.
    pub fn new(id: &str) -> Self {
        let sha = hex(&Sha256::digest(id.as_bytes()))[..40].to_string();
        Self { id: id.to_string(), sha, files: BTreeMap::new(), token: None, status_without_token: 401 }
    }

    /// A repo holding every file under `dir` (recursively), with paths relative to it.
    pub fn from_dir(id: &str, dir: &Path) -> std::io::Result<Self> {
        let mut repo = Self::new(id);
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(dir).expect("walked below dir");
                    let rel = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
                    repo.files.insert(rel, std::fs::read(&path)?);
                }
            }
        }
        Ok(repo)
    }

    /// Adds (or replaces) a file.
    pub fn with_file(mut self, path: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.files.insert(path.to_string(), bytes.into());
        self
    }

    /// Makes file downloads need `token`, answering `status_without_token` (401 or 403) without
    /// one and 403 with a wrong one.
    pub fn gated(mut self, token: &str, status_without_token: u16) -> Self {
        self.token = Some(token.to_string());
        self.status_without_token = status_without_token;
        self
    }
}

/// Whether the hub would store a file in LFS: by extension, like the `.gitattributes` of
/// diffusers repos (weights and other binaries).
pub fn is_lfs(path: &str) -> bool {
    const LFS: &[&str] =
        &[".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".onnx_data", ".msgpack", ".h5", ".pb", ".model"];
    LFS.iter().any(|ext| path.ends_with(ext))
}

/// The etag the hub gives a file (and the name of its blob in the cache): SHA-256 for LFS files,
/// a 40-hex id for the others.
pub fn etag(path: &str, bytes: &[u8]) -> String {
    if is_lfs(path) {
        hex(&Sha256::digest(bytes))
    } else {
        let mut h = Sha256::new();
        h.update(format!("blob {}\0", bytes.len()).as_bytes());
        h.update(bytes);
        hex(&h.finalize())[..40].to_string()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET` or `HEAD`.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string (empty when none).
    pub query: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// A header's value (`name` lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// For `/{org}/{name}/resolve/{rev}/{file}`: the file's repo path.
    pub fn resolved_file(&self) -> Option<&str> {
        let mut parts = self.path.trim_start_matches('/').splitn(5, '/');
        let (_org, _name, kind, _rev) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        (kind == "resolve").then_some(())?;
        parts.next()
    }

    /// Whether this asked for file bytes beyond the 1-byte metadata probe clients send first
    /// (`Range: bytes=0-0`).
    pub fn is_download(&self) -> bool {
        self.method == "GET" && self.header("range") != Some("bytes=0-0")
    }
}

#[derive(Default)]
struct State {
    repos: Vec<FakeRepo>,
    requests: Mutex<Vec<Request>>,
    /// file path → cut after this many body bytes, armed until its first download.
    cuts: Mutex<BTreeMap<String, usize>>,
    /// file path → stop sending after this many body bytes, armed until its first download.
    stalls: Mutex<BTreeMap<String, usize>>,
    /// request paths left unanswered, each armed until its first request.
    hangs: Mutex<BTreeSet<String>>,
    /// Bumped by `release_stalls` (and on drop): held connections close when it changes.
    releases: AtomicU64,
    lfs_redirect: AtomicBool,
    endpoint: String,
}

/// The running server; stops when dropped.
pub struct HubServer {
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    /// Starts serving `repos` on a free loopback port.
    pub fn start(repos: Vec<FakeRepo>) -> std::io::Result<Self> {
        Self::start_on(repos, 0)
    }

    /// Starts serving `repos` on `127.0.0.1:port` (0: any free port).
    pub fn start_on(repos: Vec<FakeRepo>, port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State { repos, endpoint: format!("http://{addr}"), ..State::default() });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || {
                        let _ = serve(&state, stream);
                    });
                }
            })
        };
        Ok(Self { state, stop, addr, thread: Some(thread) })
    }

    /// `http://127.0.0.1:PORT`, the value for `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        self.state.endpoint.clone()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.state.requests.lock().unwrap().clear();
    }

    /// The repo paths of the files whose bytes were downloaded (metadata probes excluded).
    pub fn downloaded_files(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter(|r| r.is_download())
            .filter_map(|r| r.resolved_file().map(str::to_string))
            .collect()
    }

    /// Cuts the connection of the next download of `file` (a repo path) after `after_bytes` bytes
    /// of its body, having announced the full length.
    pub fn cut_first_download(&self, file: &str, after_bytes: usize) {
        self.state.cuts.lock().unwrap().insert(file.to_string(), after_bytes);
    }

    /// Stalls the next download of `file` (a repo path): announces the full length, sends
    /// `after_bytes` bytes of the body, then sends nothing more while keeping the connection open,
    /// until [`release_stalls`](Self::release_stalls) or the server is dropped (then closes it).
    pub fn stall_first_download(&self, file: &str, after_bytes: usize) {
        self.state.stalls.lock().unwrap().insert(file.to_string(), after_bytes);
    }

    /// Leaves the next request for URL path `path` (without the query, e.g.
    /// `/api/models/org/name/revision/main` or `/org/name/resolve/main/config.json`, which the
    /// metadata probe asks for too) without any answer, not even a status line, until
    /// [`release_stalls`](Self::release_stalls) or the server is dropped (then closes it).
    pub fn hang_first_request(&self, path: &str) {
        self.state.hangs.lock().unwrap().insert(path.to_string());
    }

    /// Closes the connections held by [`stall_first_download`](Self::stall_first_download) and
    /// [`hang_first_request`](Self::hang_first_request) so far, without sending more.
    pub fn release_stalls(&self) {
        self.state.releases.fetch_add(1, Ordering::SeqCst);
    }

    /// Answers LFS file requests with a 302 to `/cdn/{sha256}`, as the hub does.
    pub fn redirect_lfs(&self, on: bool) {
        self.state.lfs_redirect.store(on, Ordering::SeqCst);
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.release_stalls();
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, value: serde_json::Value) -> Self {
        Self {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
        }
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        let mut r = Self::json(status, serde_json::json!({ "error": message }));
        r.headers.push(("X-Error-Code".into(), code.into()));
        r
    }
}

fn serve(state: &State, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let Some(request) = read_request(&mut BufReader::new(stream.try_clone()?))? else { return Ok(()) };
    // Read before recording, so a release that follows a recorded request is seen.
    let generation = state.releases.load(Ordering::SeqCst);
    state.requests.lock().unwrap().push(request.clone());
    if state.hangs.lock().unwrap().remove(&request.path) {
        hold(state, generation);
        return stream.shutdown(Shutdown::Both);
    }
    let response = route(state, &request);
    let file = if request.is_download() && response.status / 100 == 2 {
        match request.resolved_file() {
            Some(f) => Some(f.to_string()),
            None => request.path.strip_prefix("/cdn/").and_then(|sha| cdn_file(state, sha)),
        }
    } else {
        None
    };
    let cut = file.as_ref().and_then(|f| state.cuts.lock().unwrap().remove(f));
    let stall = file.as_ref().and_then(|f| state.stalls.lock().unwrap().remove(f));
    let reason = match response.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", response.status);
    for (k, v) in &response.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", response.body.len()));
    stream.write_all(head.as_bytes())?;
    if request.method != "HEAD" {
        let body = match cut.or(stall) {
            Some(n) => &response.body[..n.min(response.body.len())],
            None => &response.body[..],
        };
        stream.write_all(body)?;
    }
    stream.flush()?;
    if stall.is_some() {
        hold(state, generation);
    }
    stream.shutdown(Shutdown::Both)
}

/// Waits (holding the connection open, silent) until `release_stalls` moves past `generation`.
fn hold(state: &State, generation: u64) {
    while state.releases.load(Ordering::SeqCst) == generation {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// For `/cdn/{sha256}`: the repo path of the file with that content.
fn cdn_file(state: &State, sha: &str) -> Option<String> {
    state.repos.iter().flat_map(|r| r.files.iter()).find(|(p, b)| etag(p, b) == sha).map(|(p, _)| p.clone())
}

fn read_request(reader: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else { return Ok(None) };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok(Some(Request { method: method.to_string(), path: percent_decode(path), query: query.to_string(), headers }))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(state: &State, req: &Request) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::error(405, "MethodNotAllowed", "only GET and HEAD");
    }
    if let Some(sha) = req.path.strip_prefix("/cdn/") {
        let found = state.repos.iter().flat_map(|r| r.files.iter()).find(|(p, b)| etag(p, b) == sha);
        return match found {
            Some((path, bytes)) => file_response(None, path, bytes, req),
            None => Response::error(404, "EntryNotFound", "no such blob"),
        };
    }
    if let Some(rest) = req.path.strip_prefix("/api/models/") {
        // {org}/{name}/revision/{rev}
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        if parts.len() == 4 && parts[2] == "revision" {
            return info(state, &format!("{}/{}", parts[0], parts[1]), parts[3], req.query.contains("blobs=true"));
        }
        if parts.len() == 4 && parts[2] == "tree" {
            return tree(state, &format!("{}/{}", parts[0], parts[1]), parts[3]);
        }
        return Response::error(404, "NotFound", "unknown API route");
    }
    let parts: Vec<&str> = req.path.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() == 5 && parts[2] == "resolve" {
        let id = format!("{}/{}", parts[0], parts[1]);
        let Some(repo) = state.repos.iter().find(|r| r.id == id) else {
            return Response::error(404, "RepoNotFound", &format!("Repository Not Found for url: {}", req.path));
        };
        if parts[3] != "main" && parts[3] != repo.sha {
            return Response::error(404, "RevisionNotFound", &format!("Invalid rev id: {}", parts[3]));
        }
        if let Some(token) = &repo.token {
            match req.header("authorization") {
                None => {
                    return Response::error(
                        repo.status_without_token,
                        "GatedRepo",
                        &format!("Access to model {id} is restricted. You must be authenticated to access it."),
                    )
                }
                Some(v) if v != format!("Bearer {token}") => {
                    return Response::error(403, "GatedRepo", &format!("Access to model {id} is restricted."))
                }
                Some(_) => {}
            }
        }
        let Some(bytes) = repo.files.get(parts[4]) else {
            return Response::error(404, "EntryNotFound", &format!("Entry not found: {}", parts[4]));
        };
        if is_lfs(parts[4]) && state.lfs_redirect.load(Ordering::SeqCst) {
            let sha = etag(parts[4], bytes);
            return Response {
                status: 302,
                headers: vec![
                    ("Location".into(), format!("{}/cdn/{sha}", state.endpoint)),
                    ("X-Repo-Commit".into(), repo.sha.clone()),
                    ("X-Linked-Etag".into(), format!("\"{sha}\"")),
                    ("X-Linked-Size".into(), bytes.len().to_string()),
                    ("ETag".into(), format!("\"{}\"", &sha[..40])),
                ],
                body: Vec::new(),
            };
        }
        return file_response(Some(repo), parts[4], bytes, req);
    }
    Response::error(404, "NotFound", &format!("no route for {}", req.path))
}

fn info(state: &State, id: &str, rev: &str, blobs: bool) -> Response {
    let Some(repo) = state.repos.iter().find(|r| r.id == id) else {
        return Response::error(404, "RepoNotFound", &format!("Repository Not Found for url: /api/models/{id}"));
    };
    if rev != "main" && rev != repo.sha {
        return Response::error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
    }
    let siblings: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|(path, bytes)| {
            if !blobs {
                return serde_json::json!({ "rfilename": path });
            }
            let mut s = serde_json::json!({ "rfilename": path, "size": bytes.len() });
            if is_lfs(path) {
                let sha = etag(path, bytes);
                s["blobId"] = serde_json::json!(&sha[..40]);
                s["lfs"] = serde_json::json!({ "sha256": sha, "size": bytes.len(), "pointerSize": 134 });
            } else {
                s["blobId"] = serde_json::json!(etag(path, bytes));
            }
            s
        })
        .collect();
    Response::json(
        200,
        serde_json::json!({
            "_id": &repo.sha[..24],
            "id": repo.id,
            "modelId": repo.id,
            "sha": repo.sha,
            "private": false,
            "gated": if repo.token.is_some() { serde_json::json!("manual") } else { serde_json::json!(false) },
            "siblings": siblings,
        }),
    )
}

/// `GET /api/models/{repo}/tree/{rev}[/{folder}]?recursive=true`: every file (and folder) below
/// `folder`, as the Python client's `snapshot_download` lists a repo (always recursive, one page).
fn tree(state: &State, id: &str, rev_and_folder: &str) -> Response {
    let Some(repo) = state.repos.iter().find(|r| r.id == id) else {
        return Response::error(404, "RepoNotFound", &format!("Repository Not Found for url: /api/models/{id}"));
    };
    let (rev, folder) = rev_and_folder.split_once('/').unwrap_or((rev_and_folder, ""));
    if rev != "main" && rev != repo.sha {
        return Response::error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
    }
    let prefix = if folder.is_empty() { String::new() } else { format!("{folder}/") };
    let mut dirs = std::collections::BTreeSet::new();
    let mut entries = Vec::new();
    for (path, bytes) in repo.files.iter().filter(|(p, _)| p.starts_with(&prefix)) {
        let mut parent = path.as_str();
        while let Some((dir, _)) = parent.rsplit_once('/') {
            if dir.len() >= prefix.len() && dirs.insert(dir.to_string()) {
                let oid = etag(dir, dir.as_bytes());
                entries.push(serde_json::json!({ "type": "directory", "oid": oid, "size": 0, "path": dir }));
            }
            parent = dir;
        }
        let mut e = serde_json::json!({ "type": "file", "size": bytes.len(), "path": path });
        if is_lfs(path) {
            let sha = etag(path, bytes);
            e["oid"] = serde_json::json!(&sha[..40]);
            e["lfs"] = serde_json::json!({ "oid": sha, "size": bytes.len(), "pointerSize": 134 });
        } else {
            e["oid"] = serde_json::json!(etag(path, bytes));
        }
        entries.push(e);
    }
    Response::json(200, serde_json::Value::Array(entries))
}

/// The file's bytes (or the requested range) with the hub's headers.
fn file_response(repo: Option<&FakeRepo>, path: &str, bytes: &[u8], req: &Request) -> Response {
    let tag = etag(path, bytes);
    let mut headers = vec![("Accept-Ranges".to_string(), "bytes".to_string())];
    if let Some(repo) = repo {
        headers.push(("X-Repo-Commit".into(), repo.sha.clone()));
    }
    if is_lfs(path) {
        headers.push(("X-Linked-Etag".into(), format!("\"{tag}\"")));
        headers.push(("X-Linked-Size".into(), bytes.len().to_string()));
    }
    headers.push(("ETag".into(), format!("\"{tag}\"")));
    let total = bytes.len();
    let Some(range) = req.header("range") else {
        return Response { status: 200, headers, body: bytes.to_vec() };
    };
    let parsed = range.strip_prefix("bytes=").and_then(|r| r.split_once('-')).and_then(|(a, b)| {
        let start: usize = a.parse().ok()?;
        let end: usize = if b.is_empty() { total.saturating_sub(1) } else { b.parse::<usize>().ok()?.min(total - 1) };
        Some((start, end))
    });
    match parsed {
        Some((start, end)) if start < total && start <= end => {
            headers.push(("Content-Range".into(), format!("bytes {start}-{end}/{total}")));
            Response { status: 206, headers, body: bytes[start..=end].to_vec() }
        }
        _ => {
            headers.push(("Content-Range".into(), format!("bytes */{total}")));
            Response { status: 416, headers, body: Vec::new() }
        }
    }
}

#[cfg(test)]
mod tests;
