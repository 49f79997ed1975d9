//! Helpers of the server tests: the real `sdgen-server` binary on 127.0.0.1 with a port the OS
//! picks, the tiny models from testdata/, the hub offline; and a small HTTP/1.1 client on a bare
//! socket, so a test can send exactly the bytes it means (bad JSON, huge bodies, no key).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `testdata/` at the workspace root.
pub fn testdata() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata"))
}

/// The tiny SD 1.5 folder, as the server and the CLI are given it.
pub fn tiny_model() -> String {
    testdata().join("tiny-sd15").display().to_string()
}

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    _home: tempfile::TempDir,
    /// What it printed on stderr, as it prints it.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// `sdgen-server --model <tiny SD 1.5> ARGS` on a free port, the hub never reached.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    /// As [`Server::start`], with more environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_in(None, args, env)
    }

    /// As [`Server::start_with_env`], in the working directory `dir` when given.
    pub fn start_in(dir: Option<&std::path::Path>, args: &[&str], env: &[(&str, &str)]) -> Server {
        let home = tempfile::tempdir().unwrap();
        let mut cmd = sdgen_server(home.path());
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        cmd.args(["--listen", "127.0.0.1:0", "--model", &tiny_model()]).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("sdgen-server starts");
        let (line, log) = first_line_then_drain(&mut child);
        let addr = line
            .trim()
            .strip_prefix("sdgen-server listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
        Server { child, addr, _home: home, log }
    }

    /// `METHOD path` with a JSON body (or none).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        request(&self.addr, method, path, &[], body.map(str::as_bytes))
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Response {
        self.call("GET", path, None)
    }

    /// `POST path` with `body`.
    pub fn post(&self, path: &str, body: &str) -> Response {
        self.call("POST", path, Some(body))
    }

    /// What it has printed on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether the server's log shows `needle` within 5 s: a line it printed before answering a
    /// request reaches our reader thread through a pipe, so it may land just after the answer.
    pub fn log_shows(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !self.log().contains(needle) {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Sends SIGTERM and waits for the process to exit: its exit status and log.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log.lock().unwrap().clone();
        (status, log)
    }

    /// The server is up and answering.
    pub fn assert_alive(&self) {
        let r = self.get("/healthz");
        assert_eq!(r.status, 200, "the server stopped answering: {}", r.text());
    }
}

/// `sdgen-server` with the hub out of reach: its cache in `home`, offline, no API key from the
/// environment; stderr piped.
pub fn sdgen_server(home: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdgen-server"));
    cmd.env("HF_HOME", home.join("hf-home"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .env_remove("SDGEN_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// The first line `child` printed on stderr, and everything it prints, as it prints it (stderr
/// is drained so the child never blocks on a full pipe).
pub fn first_line_then_drain(child: &mut Child) -> (String, std::sync::Arc<std::sync::Mutex<String>>) {
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(line.clone()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            sink.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    (line, log)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// A 4xx whose JSON names `field` and whose message contains `needle` — and, as every
    /// refusal the server tests check, names no `generate` flag ([`assert_names_no_cli_flag`]).
    pub fn assert_refused(&self, status: u16, field: Option<&str>, needle: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        let v = self.json();
        assert_eq!(v["field"].as_str(), field, "{v}");
        assert!(v["message"].as_str().unwrap().contains(needle), "`{needle}` not in {v}");
        assert_names_no_cli_flag(&self.text());
    }
}

/// The server's own flags, which an answer may name (what to ask the server's operator for).
const SERVER_FLAGS: &[&str] = &[
    "--extra-model",
    "--extra-vae",
    "--extra-lora",
    "--job-timeout",
    "--max-memory",
    "--offline",
    "--dtype",
    "--device",
];

/// `text` (a server's answer) names no `--flag` but the server's own: a client of the server
/// sends JSON fields, and the engine's messages refer to fields, which the server names as its
/// API does.
pub fn assert_names_no_cli_flag(text: &str) {
    for (at, _) in text.match_indices("--") {
        // Inside a word (a hub cache folder, `models--org--name`) it is no flag.
        if text[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '-') {
            continue;
        }
        let name: String = text[at + 2..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '-').collect();
        let flag = format!("--{name}");
        assert!(
            name.is_empty() || SERVER_FLAGS.contains(&flag.as_str()),
            "`{flag}` named in a server's answer: {text}"
        );
    }
}

/// One request on a fresh connection (`Connection: close`), read to its end.
pub fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        // The server may answer (413) and close before reading it all.
        let _ = s.write_all(b);
    }
    read_response(&mut BufReader::new(s))
}

/// Reads one response: status line, headers, and a body by Content-Length, chunks or EOF.
pub fn read_response(r: &mut impl BufRead) -> Response {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 =
        line.split_whitespace().nth(1).unwrap_or_else(|| panic!("status line: {line:?}")).parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let find = |name: &str| headers.iter().find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name));
    let mut body = Vec::new();
    if let Some((_, len)) = find("content-length") {
        body.resize(len.parse().unwrap(), 0);
        r.read_exact(&mut body).unwrap();
    } else if find("transfer-encoding").is_some_and(|(_, v)| v.contains("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        let _ = r.read_to_end(&mut body);
    }
    Response { status, headers, body }
}

/// The server-sent events of `path`, read until the server ends the stream: `(event, data)`.
pub fn sse(addr: &str, path: &str) -> Vec<(String, serde_json::Value)> {
    let r = request(addr, "GET", path, &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    let mut events = Vec::new();
    for block in r.text().split("\n\n") {
        let mut name = None;
        let mut data = None;
        for l in block.lines() {
            if let Some(v) = l.strip_prefix("event: ") {
                name = Some(v.to_string());
            } else if let Some(v) = l.strip_prefix("data: ") {
                data = Some(serde_json::from_str(v).unwrap());
            }
        }
        if let (Some(n), Some(d)) = (name, data) {
            events.push((n, d));
        }
    }
    events
}

/// Polls `GET /v1/jobs/{id}` until `done(state)` says so (at most a minute).
pub fn wait_for(server: &Server, id: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    for _ in 0..1200 {
        let v = server.get(&format!("/v1/jobs/{id}")).json();
        if done(&v) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("job {id} never got there");
}

/// Standard base64.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes standard base64 (the server's answers).
pub fn unbase64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// A `width × height` RGB gradient as a PNG file's bytes (an init image).
pub fn test_png(width: u32, height: u32) -> Vec<u8> {
    let rgb: Vec<u8> = (0..width * height)
        .flat_map(|i| [(i % width * 255 / width) as u8, (i / width * 255 / height) as u8, 128])
        .collect();
    sdgen::output::encode_png(&rgb, width, height, &[]).unwrap()
}
