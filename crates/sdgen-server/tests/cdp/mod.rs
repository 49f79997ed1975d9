//! A small Chrome DevTools Protocol client for the web page test: Debian's `chromium` started
//! headless with a throw-away profile, one page driven over the browser's websocket (flattened
//! sessions: one connection, each command tagged with its page's session id). Only what the
//! test needs: navigate, evaluate, real mouse clicks and typing, screenshots.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// The browser binary: `SDGEN_CHROMIUM`, else the first of Debian's and Google's names on PATH.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("SDGEN_CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"] {
        if let Some(found) = std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()) {
            return found;
        }
    }
    panic!(
        "no Chromium found for the web page test: install Debian's `chromium` (`apt-get install -y chromium`; \
         .ci/run does it when missing) or set SDGEN_CHROMIUM to a Chromium or Chrome binary"
    );
}

/// A headless Chromium, killed when dropped.
pub struct Browser {
    child: Child,
    ws: WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium and connects to its DevTools websocket.
    pub fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(chromium())
            .args([
                "--headless=new",
                // Root in a container has no user namespaces for the sandbox; the browser only
                // ever loads the test's own server on 127.0.0.1.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--disable-background-networking",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium().display()));
        let (port, path) = active_port(profile.path());
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // Nothing the test waits for takes a minute: a stuck browser fails the test, not CI.
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let (ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), stream).unwrap();
        Browser { child, ws, next_id: 0, _profile: profile }
    }

    /// Sends `method` (to the page `session`, or the browser) and returns its result, skipping
    /// the events that arrive meanwhile.
    pub fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let reply = match self.ws.read().unwrap_or_else(|e| panic!("DevTools connection ({method}): {e}")) {
                Message::Text(t) => serde_json::from_str::<Value>(&t).unwrap(),
                _ => continue,
            };
            if reply["id"] != id {
                continue;
            }
            if let Some(e) = reply.get("error") {
                panic!("{method} failed: {e}");
            }
            return reply["result"].clone();
        }
    }

    /// A new page (tab) of `width × height` CSS pixels.
    pub fn page(&mut self, width: u32, height: u32) -> Page<'_> {
        let target = self.call(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let attached =
            self.call(None, "Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true }));
        let session = attached["sessionId"].as_str().unwrap().to_string();
        let mut page = Page { browser: self, session };
        page.call("Page.enable", json!({}));
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port and websocket path Chromium writes into its profile once it listens.
fn active_port(profile: &Path) -> (u16, String) {
    let file = profile.join("DevToolsActivePort");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(text) = std::fs::read_to_string(&file) {
            let mut lines = text.lines();
            if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                return (port.parse().unwrap(), path.to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("Chromium did not open its DevTools port within 30 s ({} never appeared)", file.display());
}

/// One page of the browser.
pub struct Page<'a> {
    browser: &'a mut Browser,
    session: String,
}

impl Page<'_> {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params)
    }

    /// Loads `url` and waits for its document to be complete.
    pub fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({ "url": url }));
        assert!(r.get("errorText").is_none(), "cannot load {url}: {r}");
        self.wait_for("document.readyState === 'complete'", "the page to load");
    }

    /// The value of the JavaScript expression `expr` (a promise is awaited); an exception
    /// fails the test with its text.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r =
            self.call("Runtime.evaluate", json!({ "expression": expr, "awaitPromise": true, "returnByValue": true }));
        if let Some(e) = r.get("exceptionDetails") {
            panic!("`{expr}` threw: {}", e["exception"]["description"].as_str().unwrap_or(&e.to_string()));
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is true (at most a minute); `what` says what was awaited.
    pub fn wait_for(&mut self, expr: &str, what: &str) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if self.eval(expr) == Value::Bool(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = self.eval("document.body.innerText");
        panic!("timed out waiting for {what} (`{expr}`); the page shows:\n{}", text.as_str().unwrap_or_default());
    }

    /// Clicks the middle of the element `selector` with the mouse, as a user does.
    pub fn click(&mut self, selector: &str) {
        let rect = self.eval(&format!(
            "(() => {{ const e = document.querySelector({s}); e.scrollIntoView({{block: 'center'}}); \
             const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            s = json!(selector)
        ));
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
    }

    /// Replaces the text of the input `selector` by typing `text` into it.
    pub fn type_into(&mut self, selector: &str, text: &str) {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); e.focus(); e.value = ''; }})()",
            json!(selector)
        ));
        if !text.is_empty() {
            self.call("Input.insertText", json!({ "text": text }));
        }
    }

    /// A PNG screenshot of the viewport.
    pub fn screenshot(&mut self) -> Vec<u8> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap()
    }
}
