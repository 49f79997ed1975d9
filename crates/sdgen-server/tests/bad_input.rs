//! Bad input on the real server: each a clear 4xx naming what is wrong, and the server keeps
//! serving.

mod common;

use common::{base64, request, Server};

#[test]
fn malformed_and_mistyped_bodies_name_the_field() {
    let server = Server::start(&[]);
    for path in ["/v1/jobs", "/sdapi/v1/txt2img"] {
        server.post(path, r#"{"prompt": "a cat", "#).assert_refused(400, None, "not valid JSON");
        server.post(path, r#"["a cat"]"#).assert_refused(422, Some("body"), "JSON object");
        server.post(path, r#"{"prompt": "a cat", "width": "wide"}"#).assert_refused(422, Some("width"), "invalid type");
        server.post(path, r#"{"prompt": "a cat", "steps": 2.5}"#).assert_refused(422, Some("steps"), "invalid type");
        server.post(path, r#"{"prompt": "a cat", "height": -64}"#).assert_refused(422, Some("height"), "-64");
        server.post(path, r#"{"prompt": "a cat", "width": 100000}"#).assert_refused(
            422,
            Some("width"),
            "limit of 2048",
        );
        server.post(path, r#"{"prompt": "a cat", "width": 0}"#).assert_refused(422, Some("width"), "at least 1");
        server.post(path, r#"{"prompt": "a cat", "steps": 100000}"#).assert_refused(422, Some("steps"), "limit of 150");
        server.post(path, r#"{"prompt": "a cat", "seed": -7}"#).assert_refused(422, Some("seed"), "not a seed");
        server.post(path, r#"{"prompt": "a cat", "seed": 1e30}"#).assert_refused(422, Some("seed"), "not a seed");
        // A size the model cannot take (not a multiple of 8) is the engine's refusal, named.
        server.post(path, r#"{"prompt": "a cat", "width": 100}"#).assert_refused(422, Some("width"), "100");
        server.assert_alive();
    }
    // The job API knows its fields; A1111's ignores what it does not know, as A1111 does.
    server.post("/v1/jobs", r#"{"prompt": "a cat", "widht": 64}"#).assert_refused(422, Some("widht"), "unknown field");
    server.post("/v1/jobs", r#"{"prompt": 7}"#).assert_refused(422, Some("prompt"), "invalid type");
    server.post("/v1/jobs", r#"{"prompt": "a cat", "n": 17}"#).assert_refused(422, Some("n"), "limit of 16");
    server.post("/v1/jobs", r#"{"prompt": "a cat", "scheduler": "dpm9000"}"#).assert_refused(
        422,
        Some("scheduler"),
        "unknown scheduler",
    );
    let a1111 = "/sdapi/v1/txt2img";
    server.post(a1111, r#"{"prompt": "a cat", "batch_size": 4, "n_iter": 5}"#).assert_refused(
        422,
        Some("n_iter"),
        "limit of 16",
    );
    server.post(a1111, r#"{"prompt": "a cat", "sampler_name": "Heun"}"#).assert_refused(
        422,
        Some("sampler_name"),
        "Heun",
    );
    server.post(a1111, r#"{"prompt": "a cat", "scheduler": "Exponential"}"#).assert_refused(
        422,
        Some("scheduler"),
        "Exponential",
    );
    server.post(a1111, r#"{"prompt": "a cat", "cfg_scale": "high"}"#).assert_refused(422, Some("cfg_scale"), "");
    let latent = r#"{"prompt": "a cat", "enable_hr": true, "hr_upscaler": "Latent"}"#;
    server.post(a1111, latent).assert_refused(422, Some("hr_upscaler"), "only Lanczos");
    server.assert_alive();
}

#[test]
fn bad_init_images_and_unknown_models() {
    let server = Server::start(&[]);
    let img2img = "/sdapi/v1/img2img";
    server.post(img2img, r#"{"prompt": "a cat"}"#).assert_refused(422, Some("init_images"), "needs one");
    server.post(img2img, r#"{"prompt": "a cat", "init_images": ["!!not base64!!"]}"#).assert_refused(
        422,
        Some("init_images"),
        "not valid base64",
    );
    let text = base64(b"just some text, not a picture");
    server.post(img2img, &format!(r#"{{"prompt": "a cat", "init_images": ["{text}"]}}"#)).assert_refused(
        422,
        Some("init_images"),
        "not a PNG, JPEG or WebP",
    );
    // A PNG cut short.
    let png = common::test_png(64, 64);
    let cut = base64(&png[..png.len() / 2]);
    server.post(img2img, &format!(r#"{{"prompt": "a cat", "init_images": ["{cut}"]}}"#)).assert_refused(
        422,
        Some("init_images"),
        "init_images",
    );
    let ok = base64(&png);
    let body = format!(r#"{{"prompt": "a cat", "init_images": ["{ok}"], "denoising_strength": 1.5}}"#);
    server.post(img2img, &body).assert_refused(422, Some("denoising_strength"), "1.5");
    server.post("/v1/jobs", r#"{"prompt": "a cat", "init_image": "AAAA"}"#).assert_refused(
        422,
        Some("init_image"),
        "init_image",
    );
    server.post("/v1/jobs", r#"{"prompt": "a cat", "strength": 0.5}"#).assert_refused(
        422,
        Some("strength"),
        "needs init_image",
    );

    // Models: a path the server was not started with is never opened; a hub model not here
    // (the server is offline) is refused before queueing.
    server.post("/v1/jobs", r#"{"prompt": "a cat", "model": "/etc"}"#).assert_refused(
        422,
        Some("model"),
        "not a model this server serves",
    );
    server.post("/v1/jobs", r#"{"prompt": "a cat", "model": "nobody/no-such-model"}"#).assert_refused(
        422,
        Some("model"),
        "nobody/no-such-model",
    );
    let body = r#"{"prompt": "a cat", "override_settings": {"sd_model_checkpoint": "nobody/none"}}"#;
    server.post("/sdapi/v1/txt2img", body).assert_refused(
        422,
        Some("override_settings.sd_model_checkpoint"),
        "nobody/none",
    );
    server.assert_alive();
}

#[test]
fn oversize_bodies_get_413() {
    let server = Server::start(&["--max-body-bytes", "100000"]);
    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(200_000));
    server.post("/v1/jobs", &big).assert_refused(413, None, "limit of 100000 bytes");
    server.post("/sdapi/v1/img2img", &big).assert_refused(413, None, "limit");
    // 100 MB announced and sent: refused without reading it all.
    let addr = server.addr.clone();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::Write;
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        100 << 20
    );
    s.write_all(head.as_bytes()).unwrap();
    let writer = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut w = writer;
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..100 {
            if w.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let r = common::read_response(&mut std::io::BufReader::new(s));
    assert_eq!(r.status, 413, "{}", r.text());
    server.assert_alive();
}

#[test]
fn the_api_key_guards_everything_but_healthz() {
    let server = Server::start_with_env(&[], &[("SDGEN_API_KEY", "s3cret")]);
    let addr = &server.addr;
    for (method, path) in
        [("GET", "/v1/memory"), ("GET", "/metrics"), ("GET", "/sdapi/v1/sd-models"), ("POST", "/v1/jobs")]
    {
        let r = request(addr, method, path, &[], Some(b"{}"));
        r.assert_refused(401, None, "needs an API key");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = request(addr, method, path, &[("Authorization", "Bearer wrong")], Some(b"{}"));
        r.assert_refused(401, None, "wrong");
    }
    assert_eq!(request(addr, "GET", "/healthz", &[], None).status, 200);
    let ok = request(addr, "GET", "/v1/memory", &[("Authorization", "Bearer s3cret")], None);
    assert_eq!(ok.status, 200, "{}", ok.text());
    // Unknown paths behind the key are 404 once authenticated.
    assert_eq!(request(addr, "GET", "/nope", &[("Authorization", "Bearer s3cret")], None).status, 404);
    // --api-key on the command line works too.
    let server = Server::start(&["--api-key", "k2"]);
    assert_eq!(server.get("/v1/memory").status, 401);
    assert_eq!(request(&server.addr, "GET", "/v1/memory", &[("Authorization", "Bearer k2")], None).status, 200);
}

/// The engine's refusals name the fields as the API called does — in `field` and inside the
/// message — never as `generate`'s flags.
#[test]
fn engine_refusals_name_the_apis_fields() {
    let (sd35, refiner) = (common::testdata().join("tiny-sd35-medium"), common::testdata().join("tiny-sdxl-refiner"));
    let (sd35, refiner) = (sd35.display().to_string(), refiner.display().to_string());
    let server = Server::start(&["--extra-model", &sd35, "--extra-model", &refiner]);
    // A strength that leaves no step to run.
    let png = base64(&common::test_png(64, 64));
    let body = format!(r#"{{"prompt": "a cat", "init_image": "{png}", "strength": 0.1, "steps": 2}}"#);
    let r = server.post("/v1/jobs", &body);
    r.assert_refused(422, Some("strength"), "raise strength or steps");
    // Beside it, the message with the fields it names left for the client to word.
    let template = "{strength} 0.1 with 2 steps leaves no step to run (int(2 × 0.1) = 0): raise {strength} or {steps}";
    assert_eq!(r.json()["template"], template);
    let body = format!(r#"{{"prompt": "a cat", "init_images": ["{png}"], "denoising_strength": 0.1, "steps": 4}}"#);
    server.post("/sdapi/v1/img2img", &body).assert_refused(
        422,
        Some("denoising_strength"),
        "denoising_strength 0.1 with 4 steps leaves no step to run (int(4 × 0.1) = 0): raise denoising_strength or steps",
    );
    // A handoff point for a refiner that reworks the decoded image instead.
    let body = format!(r#"{{"prompt": "a cat", "model": "{sd35}", "refiner": "{refiner}", "refiner_start": 0.8}}"#);
    server.post("/v1/jobs", &body).assert_refused(422, Some("refiner_start"), "reworks them with refiner_strength");
    let body = format!(
        r#"{{"prompt": "a cat", "override_settings": {{"sd_model_checkpoint": "{sd35}"}},
            "refiner_checkpoint": "{refiner}", "refiner_switch_at": 0.8}}"#
    );
    server.post("/sdapi/v1/txt2img", &body).assert_refused(422, Some("refiner_switch_at"), "refiner_switch_at 0.8: ");
    server.assert_alive();
}
