//! The web page at `/`, driven in headless Chromium over the DevTools protocol against the real
//! server (with an API key) on the tiny SD 1.5: the key typed in, an API error shown, the form
//! filled and Generate clicked, the progress bar moved by the event stream, and the image shown
//! the PNG the job API gives for the same settings; then a running job cancelled from the page.
//! The screenshot after the generation is written to `$CARGO_TARGET_TMPDIR/web-page.png` (and to
//! `SDGEN_WEB_SCREENSHOT` when set: that is how docs/web-page.png is made).

mod cdp;
mod common;

use common::{request, unbase64, Server};
use serde_json::{json, Value};

const KEY: &str = "page-test-key";

/// `GET`/`POST` with the key.
fn api(server: &Server, method: &str, path: &str, body: Option<&Value>) -> common::Response {
    let auth = format!("Bearer {KEY}");
    let body = body.map(|b| b.to_string());
    request(&server.addr, method, path, &[("Authorization", &auth)], body.as_deref().map(str::as_bytes))
}

/// The PNG `POST /v1/jobs` makes for `body`.
fn api_png(server: &Server, body: &Value) -> Vec<u8> {
    let r = api(server, "POST", "/v1/jobs", Some(body));
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    for _ in 0..1200 {
        let job = api(server, "GET", &format!("/v1/jobs/{id}?images=base64"), None).json();
        match job["state"].as_str().unwrap() {
            "done" => return unbase64(job["images"][0]["png_base64"].as_str().unwrap()),
            "queued" | "running" => std::thread::sleep(std::time::Duration::from_millis(50)),
            other => panic!("the API's job ended {other}: {job}"),
        }
    }
    panic!("the API's job did not finish");
}

/// `document.getElementById(id)` in page JavaScript.
fn el(id: &str) -> String {
    format!("document.getElementById({})", json!(id))
}

#[test]
fn an_image_generated_through_the_page_in_headless_chromium() {
    let server = Server::start(&["--api-key", KEY]);
    // The page itself needs no key: it is where the key is typed.
    let r = server.get("/");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert_eq!(server.get("/v1/memory").status, 401);

    let mut browser = cdp::Browser::launch();
    let mut page = browser.page(1280, 860);
    page.navigate(&format!("http://{}/", server.addr));

    // Without the key every call is refused, and the page says so.
    page.wait_for(&format!("{}.textContent.startsWith('401')", el("error")), "the 401 to show");
    let error = page.eval(&format!("{}.textContent", el("error")));
    assert!(error.as_str().unwrap().contains("API key"), "{error}");

    // With it, the models (the server's list) and the memory figures load.
    page.type_into("#api-key", KEY);
    page.click("#use-key");
    page.wait_for(&format!("{}.options.length > 0", el("model")), "the model list");
    let listed: Vec<Value> = api(&server, "GET", "/sdapi/v1/sd-models", None).json().as_array().unwrap().clone();
    let options = page.eval(&format!("[...{}.options].map(o => o.value)", el("model")));
    let titles: Vec<Value> = listed.iter().map(|m| m["title"].clone()).collect();
    assert_eq!(options.as_array().unwrap(), &titles);
    page.wait_for(
        "document.querySelector('#memory-figures dd[data-field=\"Process (RSS)\"]')?.textContent.endsWith('MB')",
        "the memory figures",
    );
    assert_eq!(page.eval(&format!("{}.classList.contains('shown')", el("error"))), json!(false));
    // The key stays for the tab only, unless "remember" is ticked.
    assert_eq!(page.eval("sessionStorage.getItem('sdgen.apiKey')"), json!(KEY));
    assert_eq!(page.eval("localStorage.getItem('sdgen.apiKey')"), Value::Null);

    // An API error is shown, its field marked: a size the model cannot take.
    page.type_into("#prompt", "a lighthouse at dusk");
    page.type_into("#negative", "blurry");
    page.type_into("#width", "100");
    page.type_into("#height", "128");
    page.type_into("#steps", "4");
    page.type_into("#seed", "42");
    page.click("#generate");
    page.wait_for(&format!("{}.textContent.startsWith('422')", el("error")), "the 422 to show");
    assert_eq!(page.eval(&format!("{}.classList.contains('invalid')", el("width"))), json!(true));

    // Corrected, the image is made and shown with its settings.
    page.type_into("#width", "128");
    page.click("#generate");
    page.wait_for("document.querySelector('#images figure[data-ready]') !== null", "the image");
    page.wait_for(&format!("{}.textContent.startsWith('Done')", el("progress-text")), "the job to end");
    assert_eq!(page.eval(&format!("{}.classList.contains('shown')", el("error"))), json!(false));
    assert_eq!(page.eval(&format!("{}.value", el("progress"))), json!(1));
    // The bar moved with each of the 4 steps the event stream reported, then ended full.
    let seen: Vec<f64> =
        page.eval("window.progressSeen").as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    for step in [0.25, 0.5, 0.75, 1.0] {
        assert!(seen.contains(&step), "step fraction {step} not in {seen:?}");
    }
    let caption = page.eval("document.querySelector('#images figcaption').textContent");
    for text in ["a lighthouse at dusk", "blurry", "128×128", "Steps4", "Seed42"] {
        assert!(caption.as_str().unwrap().contains(text), "`{text}` not in the caption {caption}");
    }

    // The image shown is the PNG the API gives for the same settings, byte for byte.
    let shown = page.eval(
        "(async () => { const img = document.querySelector('#images img'); \
         const b = new Uint8Array(await (await fetch(img.src)).arrayBuffer()); \
         let s = ''; for (const x of b) s += String.fromCharCode(x); return btoa(s); })()",
    );
    let shown = unbase64(shown.as_str().unwrap());
    let model = page.eval(&format!("{}.value", el("model")));
    let body = json!({"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "model": model,
        "width": 128, "height": 128, "steps": 4, "seed": 42});
    assert!(shown == api_png(&server, &body), "the page's image differs from the API's for the same settings");

    let screenshot = page.screenshot();
    assert!(screenshot.starts_with(b"\x89PNG"));
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-page.png");
    std::fs::write(&out, &screenshot).unwrap();
    if let Some(path) = std::env::var_os("SDGEN_WEB_SCREENSHOT") {
        std::fs::write(path, &screenshot).unwrap();
    }

    // Cancel stops a running job (seconds a step at 256²): the page says so, no image is added.
    page.type_into("#width", "256");
    page.type_into("#height", "256");
    page.type_into("#steps", "150");
    page.click("#generate");
    page.wait_for(&format!("{}.textContent.startsWith('Step ')", el("progress-text")), "the first step");
    page.click("#cancel");
    page.wait_for(&format!("{}.textContent === 'Cancelled'", el("progress-text")), "the cancel");
    assert_eq!(page.eval("document.querySelectorAll('#images figure').length"), json!(1));
    // The worker counts the job's end just after its last event.
    let cancelled = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        api(&server, "GET", "/metrics", None).text().contains("sdgen_jobs_total{outcome=\"cancelled\"} 1")
    });
    assert!(cancelled, "the server never counted the job cancelled");
    server.assert_alive();
}
