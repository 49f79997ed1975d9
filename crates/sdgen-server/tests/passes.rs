//! The job API's VAE, LoRAs, presets, upscaling and several prompts, A1111's hires fix, and the
//! pre-queue check of the refiner and the hires pass, on the real server with the tiny SD 1.5:
//! each accepted as the CLI runs it, each refusal a 422 naming the JSON field, before queueing.

mod common;

use common::{testdata, wait_for, Server};
use serde_json::Value;

fn path(rel: &str) -> String {
    testdata().join(rel).display().to_string()
}

/// Submits `body` and waits for the job to end: its `GET /v1/jobs/{id}`.
fn run(server: &Server, body: &str) -> Value {
    let r = server.post("/v1/jobs", body);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let job = wait_for(server, &id, |j| j["state"] != "queued" && j["state"] != "running");
    assert_eq!(job["state"], "done", "{job}");
    job
}

fn size(image: &Value) -> (u64, u64) {
    (image["metadata"]["width"].as_u64().unwrap(), image["metadata"]["height"].as_u64().unwrap())
}

#[test]
fn vae_and_loras_only_from_the_servers_own_set() {
    let (vae, lora) = (path("tiny-sd15/vae"), path("lora/sd15_kohya.safetensors"));
    let server = Server::start(&[
        "--extra-vae",
        &vae,
        "--extra-lora",
        &lora,
        "--extra-lora",
        &path("lora/sdxl_kohya.safetensors"),
    ]);
    let base = r#""prompt": "a cat", "seed": 1, "steps": 2, "width": 64, "height": 64"#;
    let job = run(&server, &format!(r#"{{{base}, "vae": "{vae}", "loras": [{{"source": "{lora}", "scale": 0.8}}]}}"#));
    let meta = &job["images"][0]["metadata"];
    assert_eq!(meta["extra"]["loras"][0]["scale"], 0.8, "{meta}");
    assert!(meta["extra"]["loras"][0]["source"].as_str().unwrap().ends_with("sd15_kohya.safetensors"));

    // Paths the server was not started with are never opened.
    let other = path("tiny-sdxl/vae");
    server.post("/v1/jobs", &format!(r#"{{{base}, "vae": "{other}"}}"#)).assert_refused(
        422,
        Some("vae"),
        "is not a VAE this server may open",
    );
    server
        .post("/v1/jobs", &format!(r#"{{{base}, "loras": [{{"source": "{lora}"}}, {{"source": "/etc/passwd"}}]}}"#))
        .assert_refused(422, Some("loras[1]"), "is not a LoRA this server may open");
    server.post("/v1/jobs", &format!(r#"{{{base}, "loras": [{{"scale": 1}}]}}"#)).assert_refused(
        422,
        Some("loras[0].source"),
        "missing field",
    );
    // An allowed LoRA of another family is refused by the check, before it is queued.
    let sdxl = path("lora/sdxl_kohya.safetensors");
    server.post("/v1/jobs", &format!(r#"{{{base}, "loras": [{{"source": "{sdxl}"}}]}}"#)).assert_refused(
        422,
        Some("loras"),
        "",
    );
    server.assert_alive();
}

#[test]
fn upscale_presets_and_several_prompts() {
    let server = Server::start(&["--max-width", "200", "--max-height", "200"]);
    let base = r#""seed": 5, "steps": 2, "width": 64, "height": 64"#;
    // Upscaled ×2, then the hires pass: 128² images.
    let job =
        run(&server, &format!(r#"{{"prompt": "a cat", {base}, "upscale": {{"factor": 2, "hires_strength": 0.5}}}}"#));
    assert_eq!(size(&job["images"][0]), (128, 128));
    // The 4k preset with the size given: its passes, its name in the metadata; its hires pass
    // (strength 0.3) checked before queueing, with too few steps to run.
    refused_steps(&server);
    let job = run(
        &server,
        &format!(r#"{{"prompt": "a cat", {}, "quality": "4k"}}"#, base.replace(r#""steps": 2"#, r#""steps": 4"#)),
    );
    assert_eq!(size(&job["images"][0]), (128, 128));
    assert_eq!(job["images"][0]["metadata"]["extra"]["preset"], "4k", "{job}");
    // 4k-ultra from 32²: ×2 and a tiled hires pass twice, to 128²; and its chain as a list of steps,
    // as `generate --remote` sends it.
    let ultra = base.replace(r#""steps": 2, "width": 64, "height": 64"#, r#""steps": 4, "width": 32, "height": 32"#);
    let job = run(&server, &format!(r#"{{"prompt": "a cat", {ultra}, "quality": "4k-ultra"}}"#));
    assert_eq!(size(&job["images"][0]), (128, 128));
    let passes = &job["images"][0]["metadata"]["extra"]["passes"];
    assert!(passes[2]["tiles"].is_object() && passes[4]["tiles"].is_object(), "{passes}");
    let step = r#"{"factor": 2, "hires_strength": 0.3, "tiled": true}"#;
    let job = run(&server, &format!(r#"{{"prompt": "a cat", {ultra}, "upscale": [{step}, {step}]}}"#));
    assert_eq!(&job["images"][0]["metadata"]["extra"]["passes"], passes);
    // Two prompts, one image each, the seeds continuing.
    let job = run(&server, &format!(r#"{{"prompts": ["a cat", "", "a dog"], {base}}}"#));
    let images = job["images"].as_array().unwrap();
    let got: Vec<(&str, u64)> =
        images.iter().map(|i| (i["metadata"]["prompt"].as_str().unwrap(), i["seed"].as_u64().unwrap())).collect();
    assert_eq!(got, [("a cat", 5), ("a dog", 6)]);

    let refused = |body: String, field: &str, needle: &str| {
        server.post("/v1/jobs", &body).assert_refused(422, Some(field), needle);
    };
    refused(format!(r#"{{"prompt": "a cat", {base}, "upscale": {{"factor": 5}}}}"#), "upscale.factor", "5");
    refused(
        format!(r#"{{"prompt": "a cat", {base}, "upscale": {{"factor": 2, "hires_strength": 1.5}}}}"#),
        "upscale.hires_strength",
        "outside [0, 1]",
    );
    // The caps bound the upscaled size: 64 × 4 = 256 > 200.
    refused(
        format!(r#"{{"prompt": "a cat", {base}, "upscale": {{"factor": 4}}}}"#),
        "upscale.factor",
        "limit of 200x200",
    );
    // The 4k presets' own 1024² is past the caps; an unknown preset is named.
    refused(r#"{"prompt": "a cat", "quality": "4k"}"#.into(), "width", "limit of 200");
    refused(r#"{"prompt": "a cat", "quality": "8k"}"#.into(), "quality", "not a preset");
    refused(r#"{"prompt": "a cat", "quality": "4k-ultra"}"#.into(), "width", "limit of 200");
    refused(format!(r#"{{"prompt": "a cat", "prompts": ["a dog"], {base}}}"#), "prompts", "one or the other");
    refused(format!(r#"{{"prompts": [" "], {base}}}"#), "prompts", "no prompt");
    refused(format!(r#"{{"prompts": ["a", "b", "c"], {base}, "n": 6}}"#), "n", "limit of 16 images");
    server.assert_alive();
}

fn refused_steps(server: &Server) {
    let body = r#"{"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "quality": "4k"}"#;
    server.post("/v1/jobs", body).assert_refused(422, Some("upscale.hires_strength"), "no step to run");
}

#[test]
fn a1111_hires_fix_runs_the_hires_pass() {
    let server = Server::start(&["--max-width", "200", "--max-height", "200"]);
    let base = r#""prompt": "a cat", "seed": 3, "steps": 2, "width": 64, "height": 64, "enable_hr": true"#;
    let r = server.post(
        "/sdapi/v1/txt2img",
        &format!(r#"{{{base}, "hr_scale": 2, "denoising_strength": 0.5, "hr_upscaler": "Lanczos"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let info: Value = serde_json::from_str(r.json()["info"].as_str().unwrap()).unwrap();
    assert_eq!((info["width"].as_u64(), info["height"].as_u64()), (Some(128), Some(128)), "{info}");
    let png = common::unbase64(r.json()["images"][0].as_str().unwrap());
    assert_eq!(&png[16..24], &[0, 0, 0, 128, 0, 0, 0, 128], "the PNG is 128×128");

    let refused = |extra: &str, field: &str, needle: &str| {
        server.post("/sdapi/v1/txt2img", &format!("{{{base}{extra}}}")).assert_refused(422, Some(field), needle);
    };
    refused(r#", "hr_upscaler": "Latent""#, "hr_upscaler", "only Lanczos");
    refused(r#", "hr_scale": 2.5"#, "hr_scale", "not 2, 3 or 4");
    refused(r#", "hr_scale": 4"#, "hr_scale", "limit of 200x200");
    refused(r#", "denoising_strength": 2"#, "denoising_strength", "outside [0, 1]");
    // A1111's own number of hires steps: only the first pass's (or 0, its default) runs here.
    refused(r#", "hr_second_pass_steps": 5"#, "hr_second_pass_steps", "runs the first pass's steps (steps, 2)");
    for same in [0, 2] {
        let r = server.post("/sdapi/v1/txt2img", &format!(r#"{{{base}, "hr_second_pass_steps": {same}}}"#));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    server.assert_alive();
}

/// The check before queueing is the engine's own plan: what a run would refuse is refused before
/// the job is queued — the refiner's handoff, and a preset made for another family (a check the
/// server's own copy of the planning once missed: such a job was queued, then failed) — and the
/// budget applies to every pass.
#[test]
fn the_check_refuses_what_the_engine_would_before_queueing() {
    // SD 1.5 cannot hand over to the SDXL refiner.
    let refiner = path("tiny-sdxl-refiner");
    let server = Server::start(&["--extra-model", &refiner]);
    let r = server.post("/v1/jobs", &format!(r#"{{"prompt": "a cat", "steps": 2, "refiner": "{refiner}"}}"#));
    r.assert_refused(422, Some("refiner"), "base runs; ");
    // The lcm preset fuses an SDXL LoRA: not on the server's SD 1.5 (its LoRA, a hub one, is
    // never fetched for the check).
    let lcm = r#"{"prompt": "a cat", "quality": "lcm", "width": 64, "height": 64}"#;
    server.post("/v1/jobs", lcm).assert_refused(422, Some("quality"), "made for Stable Diffusion XL");
    let metrics = server.get("/metrics").text();
    for line in ["sdgen_requests_refused_total{reason=\"invalid\"} 2", "sdgen_jobs_total{outcome=\"failed\"} 0"] {
        assert!(metrics.lines().any(|l| l == line), "`{line}` not in:\n{metrics}");
    }
    server.assert_alive();

    // An SDXL job with its refiner and a hires pass in a budget where none fits: refused whole,
    // with the planner's numbers, as the engine refuses it.
    let sdxl = path("tiny-sdxl");
    let server = Server::start(&["--extra-model", &sdxl, "--extra-model", &refiner, "--max-memory", "1MB"]);
    let body = format!(
        r#"{{"prompt": "a cat", "model": "{sdxl}", "refiner": "{refiner}", "width": 64, "height": 64,
            "upscale": {{"factor": 2, "hires_strength": 0.5}}}}"#
    );
    let r = server.post("/v1/jobs", &body);
    r.assert_refused(507, None, "the job does not fit this server's memory: SDXL at 64×64 does not fit in 1MB");
    assert_eq!(r.json()["error"], "does_not_fit");
}
