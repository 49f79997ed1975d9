//! The A1111-compatible routes against the real server on the tiny SD 1.5: the images equal the
//! command line's byte for byte, and every route answers in A1111's shape.

mod common;

use std::path::Path;

use common::{base64, testdata, tiny_model, unbase64, Server};
use sdgen::candle::{DType, Device};
use sdgen::engine::{CancelToken, Engine, EngineConfig, GenerateRequest};
use sdgen::loading::ModelSource;
use sdgen::output::{save_image_to, OutputTarget};
use sdgen::pipeline::Runtime;

/// The PNG `generate "a red cube" --seed 7 --steps 4 --guidance 6 --scheduler Euler -W 64 -H 64
/// --model <tiny>` writes, made by the command line's own path: the engine, then
/// `save_image_to`.
fn cli_path_png(out: &Path) -> Vec<u8> {
    let mut config = EngineConfig::new(Runtime::new(Device::Cpu, DType::F32), "cpu");
    config.hub.offline = true;
    let mut engine = Engine::new(config);
    let mut req = GenerateRequest::new(ModelSource::parse(&tiny_model()), "a red cube");
    req.params.negative_prompt = Some("blurry".into());
    req.params.seed = 7;
    req.params.steps = Some(4);
    req.params.guidance = Some(6.0);
    req.params.scheduler = Some("Euler".parse().unwrap());
    (req.params.width, req.params.height) = (Some(64), Some(64));
    req.memory.max_images_per_batch = Some(1);
    let target = OutputTarget::parse(out).unwrap();
    engine
        .generate_each(&req, &mut |_| {}, &CancelToken::new(), &mut |b| {
            for i in &b.images {
                save_image_to(&target, i.index, b.job_images, &i.metadata, &i.image.rgb8)?;
            }
            Ok::<_, sdgen::Error>(())
        })
        .unwrap();
    std::fs::read(out).unwrap()
}

const TXT2IMG: &str = r#"{"prompt": "a red cube", "negative_prompt": "blurry", "seed": 7, "steps": 4,
    "cfg_scale": 6, "sampler_name": "Euler", "scheduler": "Automatic", "width": 64, "height": 64,
    "batch_size": 1, "n_iter": 1, "styles": [], "restore_faces": false, "send_images": true,
    "save_images": false, "alwayson_scripts": {}}"#;

#[test]
fn txt2img_png_equals_the_command_lines_byte_for_byte() {
    let server = Server::start(&[]);
    let r = server.post("/sdapi/v1/txt2img", TXT2IMG);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    let png = unbase64(images[0].as_str().unwrap());

    let dir = tempfile::tempdir().unwrap();
    let cli = cli_path_png(&dir.path().join("cli.png"));
    assert!(png == cli, "the server's PNG differs from the command line's");

    // The `generate` binary itself, where this build made it (the workspace's tests do).
    let generate = Path::new(env!("CARGO_BIN_EXE_sdgen-server")).with_file_name("generate");
    if generate.exists() {
        let out = dir.path().join("bin.png");
        let o = std::process::Command::new(&generate)
            .args(["a red cube", "--negative", "blurry", "--model", &tiny_model(), "--seed", "7", "--steps", "4"])
            .args(["--guidance", "6", "--scheduler", "Euler", "-W", "64", "-H", "64", "-q", "--output"])
            .arg(&out)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_HOME", dir.path().join("hf"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(std::fs::read(&out).unwrap() == png, "the server's PNG differs from `generate`'s");
    }

    // `info` is a JSON string whose infotexts are the PNG's `parameters`; `parameters` echoes
    // the request.
    let info: serde_json::Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    let text = info["infotexts"][0].as_str().unwrap();
    assert!(text.starts_with("a red cube\nNegative prompt: blurry\nSteps: 4, Sampler: Euler, CFG scale: 6.0, Seed: 7"));
    let png_path = dir.path().join("cli.png");
    let chunks = sdgen::output::read_png_text(&png_path).unwrap();
    assert_eq!(chunks, vec![("parameters".to_string(), text.to_string())]);
    assert_eq!((info["seed"].as_u64(), info["all_seeds"][0].as_u64()), (Some(7), Some(7)));
    assert_eq!((info["width"].as_u64(), info["steps"].as_u64()), (Some(64), Some(4)));
    assert_eq!(info["sampler_name"], "Euler");
    assert_eq!(v["parameters"]["prompt"], "a red cube");
    assert_eq!(v["parameters"]["alwayson_scripts"], serde_json::json!({}));
}

#[test]
fn img2img_batches_samplers_models_options_progress_memory() {
    let server = Server::start(&[]);
    // img2img from a PNG, two images (seeds 3 and 4), denoising strength recorded.
    let init = common::test_png(64, 64);
    let body = serde_json::json!({
        "prompt": "a cat", "seed": 3, "steps": 4, "batch_size": 1, "n_iter": 2,
        "denoising_strength": 0.5, "width": 64, "height": 64,
        "init_images": [format!("data:image/png;base64,{}", base64(&init))],
    });
    let r = server.post("/sdapi/v1/img2img", &body.to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["images"].as_array().unwrap().len(), 2);
    assert!(v["parameters"]["init_images"].is_null());
    let info: serde_json::Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], serde_json::json!([3, 4]));
    assert!(info["infotexts"][1].as_str().unwrap().contains("Denoising strength: 0.5"), "{info}");

    // Samplers: A1111's names, ours as aliases.
    let samplers = server.get("/sdapi/v1/samplers").json();
    let names: Vec<&str> = samplers.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"Euler a") && names.contains(&"DPM++ 2M Karras"), "{names:?}");
    assert_eq!(names.iter().filter(|n| **n == "Euler").count(), 1);

    // Models: the server's own; the options name it and switch it.
    let models = server.get("/sdapi/v1/sd-models").json();
    assert_eq!(models[0]["title"], tiny_model().as_str());
    assert_eq!(server.get("/sdapi/v1/options").json()["sd_model_checkpoint"], tiny_model().as_str());
    let r =
        server.post("/sdapi/v1/options", r#"{"sd_model_checkpoint": "no-such-model", "CLIP_stop_at_last_layers": 2}"#);
    r.assert_refused(422, Some("sd_model_checkpoint"), "no-such-model");
    assert_eq!(server.get("/sdapi/v1/options").json()["sd_model_checkpoint"], tiny_model().as_str());

    // Idle progress, then memory in A1111's shape.
    let p = server.get("/sdapi/v1/progress").json();
    assert_eq!((p["progress"].as_f64(), p["state"]["job_count"].as_u64()), (Some(0.0), Some(0)));
    let m = server.get("/sdapi/v1/memory").json();
    assert!(m["ram"]["total"].as_u64().unwrap() > 0, "{m}");
}

#[test]
fn options_switch_the_default_model() {
    let sdxl = testdata().join("tiny-sdxl").display().to_string();
    let server = Server::start(&["--extra-model", &sdxl]);
    let r = server.post("/sdapi/v1/options", &serde_json::json!({ "sd_model_checkpoint": sdxl }).to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server.get("/sdapi/v1/options").json()["sd_model_checkpoint"], sdxl.as_str());
    let r = server.post("/sdapi/v1/txt2img", r#"{"prompt": "a cat", "seed": 1, "steps": 2}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let info: serde_json::Value = serde_json::from_str(r.json()["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sd_model_name"], sdxl.as_str());
    // A request's override_settings pick a model for that request only.
    let body = serde_json::json!({"prompt": "a cat", "seed": 1, "steps": 2,
        "override_settings": {"sd_model_checkpoint": tiny_model()}});
    let info: serde_json::Value =
        serde_json::from_str(server.post("/sdapi/v1/txt2img", &body.to_string()).json()["info"].as_str().unwrap())
            .unwrap();
    assert_eq!(info["sd_model_name"], tiny_model().as_str());
    assert_eq!(server.get("/sdapi/v1/options").json()["sd_model_checkpoint"], sdxl.as_str());
}

#[test]
fn interrupt_stops_the_running_request_and_progress_shows_it_running() {
    let server = Server::start(&["--max-steps", "1000"]);
    let addr = server.addr.clone();
    let long = std::thread::spawn(move || {
        common::request(
            &addr,
            "POST",
            "/sdapi/v1/txt2img",
            &[],
            Some(br#"{"prompt": "a cat", "seed": 1, "steps": 500, "n_iter": 10, "width": 64, "height": 64}"#),
        )
    });
    // Wait until it is sampling.
    let mut seen = serde_json::Value::Null;
    for _ in 0..600 {
        seen = server.get("/sdapi/v1/progress").json();
        if seen["state"]["sampling_step"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(seen["state"]["sampling_steps"].as_u64(), Some(500), "{seen}");
    // In process one job runs, on no broker's worker.
    assert_eq!(seen["running"][0]["job"], seen["state"]["job"], "{seen}");
    assert_eq!(
        (seen["running"].as_array().unwrap().len(), &seen["running"][0]["worker"]),
        (1, &serde_json::Value::Null)
    );
    assert!(seen["progress"].as_f64().unwrap() > 0.0);
    assert_eq!(server.post("/sdapi/v1/interrupt", "").status, 200);
    let r = long.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["images"].as_array().unwrap().len() < 10);
    let info: serde_json::Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    server.assert_alive();
}

/// A1111's default prompt is "", and a body without one takes it: an image of no prompt, as
/// diffusers and `generate ""` make it (the engine's parity test), on both APIs alike.
#[test]
fn an_empty_or_missing_prompt_makes_an_image_on_both_apis() {
    let server = Server::start(&[]);
    let settings = r#""seed": 3, "steps": 2, "width": 64, "height": 64"#;
    let a1111 = |body: String| {
        let r = server.post("/sdapi/v1/txt2img", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let info: serde_json::Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
        assert_eq!(info["prompt"], "", "{info}");
        unbase64(v["images"][0].as_str().unwrap())
    };
    let empty = a1111(format!(r#"{{"prompt": "", {settings}}}"#));
    assert!(a1111(format!("{{{settings}}}")) == empty, "a missing prompt is not the empty one");
    let job = |body: String| {
        let r = server.post("/v1/jobs", &body);
        assert_eq!(r.status, 202, "{}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_string();
        let job = common::wait_for(&server, &id, |j| j["state"] != "queued" && j["state"] != "running");
        assert_eq!(job["state"], "done", "{job}");
        assert_eq!(job["images"][0]["metadata"]["prompt"], "", "{job}");
        server.get(job["images"][0]["url"].as_str().unwrap()).body
    };
    let job_empty = job(format!(r#"{{"prompt": "", {settings}}}"#));
    assert!(job(format!("{{{settings}}}")) == job_empty, "a missing prompt is not the empty one");
    assert!(job_empty == empty, "the job API's image of no prompt differs from A1111's");
    // Not the image of a prompt.
    let cat = server.post("/sdapi/v1/txt2img", &format!(r#"{{"prompt": "a cat", {settings}}}"#)).json();
    assert!(unbase64(cat["images"][0].as_str().unwrap()) != empty);
}
