//! Models kept warm across jobs (issue #13, point 1) on the real server: the second job on a
//! model reads no weight (the load counter stays) and its PNG equals the first's and the command
//! line's cold run; a LoRA job loads its own UNet; a model switch drops the warm weights and
//! the memory comes back; under a budget with room for one model, a job on another evicts the
//! first (counted, logged, measured); `--no-keep-warm` keeps nothing (and still counts).

mod common;

use std::path::{Path, PathBuf};

use common::{testdata, tiny_model, wait_for, Server};
use sdgen::candle::{DType, Device};
use serde_json::{json, Value};

/// How far the resident memory may stay above its level before a model's weights came and went
/// (as the cancel and load tests allow): the allocator's free lists, the jobs' records.
const TOLERANCE_BYTES: u64 = 16 << 20;

fn run_job(server: &Server, body: &Value) -> Value {
    let r = server.post("/v1/jobs", &body.to_string());
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let job = wait_for(server, &id, |j| j["state"] != "queued" && j["state"] != "running");
    assert_eq!(job["state"], "done", "{job}");
    job
}

fn png(server: &Server, job: &Value) -> Vec<u8> {
    server.get(job["images"][0]["url"].as_str().unwrap()).body
}

/// `name{component="…"} N` of `/metrics`.
fn counter(server: &Server, name: &str, component: &str) -> u64 {
    let text = server.get("/metrics").text();
    let prefix = format!("{name}{{component=\"{component}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.parse().unwrap())
}

fn memory(server: &Server) -> Value {
    server.get("/v1/memory").json()
}

fn rss(server: &Server) -> u64 {
    memory(server)["memory"]["process_rss_bytes"].as_u64().unwrap()
}

fn job(model: &str, seed: u64) -> Value {
    json!({"prompt": "a lighthouse", "model": model, "seed": seed, "steps": 2, "width": 64, "height": 64})
}

#[test]
fn the_second_job_reads_no_weight_and_makes_the_same_png_as_a_cold_run() {
    let server =
        Server::start(&["--extra-lora", &testdata().join("lora/sd15_kohya.safetensors").display().to_string()]);
    let first = run_job(&server, &job(&tiny_model(), 5));
    let loads = counter(&server, "sdgen_weight_loads_total", "unet");
    assert_eq!(loads, 1);
    let second = run_job(&server, &job(&tiny_model(), 5));
    assert_eq!(counter(&server, "sdgen_weight_loads_total", "unet"), loads, "no UNet read again");
    assert_eq!(counter(&server, "sdgen_weight_reuses_total", "unet"), 1);
    let kept = json!({"text_encoder": "loaded_kept", "unet": "loaded_kept", "vae": "loaded_kept"});
    let reused = json!({"text_encoder": "reused", "unet": "reused", "vae": "reused"});
    assert_eq!(first["images"][0]["metadata"]["extra"]["weight_use"], kept);
    assert_eq!(second["images"][0]["metadata"]["extra"]["weight_use"], reused);
    let png = png(&server, &first);
    assert!(png == self::png(&server, &second), "the warm job's PNG differs from the first's");

    // The command line's one-shot path: a cold engine, its PNG as `generate` saves it.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cli.png");
    let mut config = sdgen::engine::EngineConfig::new(sdgen::pipeline::Runtime::new(Device::Cpu, DType::F32), "cpu");
    config.hub.offline = true;
    let mut req =
        sdgen::engine::GenerateRequest::new(sdgen::loading::ModelSource::parse(&tiny_model()), "a lighthouse");
    (req.params.seed, req.params.steps, req.params.width, req.params.height) = (5, Some(2), Some(64), Some(64));
    let target = sdgen::output::OutputTarget::parse(&out).unwrap();
    sdgen::engine::Engine::new(config)
        .generate_each(&req, &mut |_| {}, &sdgen::engine::CancelToken::new(), &mut |b| {
            for i in &b.images {
                sdgen::output::save_image_to(&target, i.index, b.job_images, &i.metadata, &i.image.rgb8)?;
            }
            Ok::<_, sdgen::Error>(())
        })
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == png, "the server's warm PNG differs from the command line's");

    // What is warm, with its bytes.
    let warm = &memory(&server)["warm"];
    let components: Vec<&str> =
        warm["entries"].as_array().unwrap().iter().map(|e| e["component"].as_str().unwrap()).collect();
    assert_eq!(components.len(), 3, "{warm}");
    assert!(["text_encoder", "unet", "vae_decoder"].iter().all(|c| components.contains(c)), "{warm}");
    assert!(warm["bytes"].as_u64().unwrap() > 1 << 20, "{warm}");

    // A LoRA job reads its own UNet; the plain one stays for the plain jobs.
    let lora = testdata().join("lora/sd15_kohya.safetensors").display().to_string();
    let mut with_lora = job(&tiny_model(), 5);
    with_lora["loras"] = json!([{"source": lora, "scale": 1.0}]);
    let lora_job = run_job(&server, &with_lora);
    assert_eq!(lora_job["images"][0]["metadata"]["extra"]["weight_use"]["unet"], "loaded_kept");
    assert_eq!(counter(&server, "sdgen_weight_loads_total", "unet"), 2);
    let plain = run_job(&server, &job(&tiny_model(), 5));
    assert_eq!(plain["images"][0]["metadata"]["extra"]["weight_use"]["unet"], "reused");
    assert!(self::png(&server, &plain) == png);
}

#[test]
fn with_no_keep_warm_every_job_reads_its_weights() {
    let server = Server::start(&["--no-keep-warm"]);
    let loaded = json!({"text_encoder": "loaded", "unet": "loaded", "vae": "loaded"});
    for _ in 0..2 {
        let done = run_job(&server, &job(&tiny_model(), 1));
        assert_eq!(done["images"][0]["metadata"]["extra"]["weight_use"], loaded);
    }
    assert_eq!(counter(&server, "sdgen_weight_loads_total", "unet"), 2);
    assert_eq!(counter(&server, "sdgen_weight_reuses_total", "unet"), 0);
    let warm = &memory(&server)["warm"];
    assert_eq!((warm["bytes"].as_u64(), warm["entries"].as_array().map(Vec::len)), (Some(0), Some(0)));
}

/// The tiny SD 1.5 with its UNet ten times as wide (77 MB of random f32 weights, written with the
/// layers' own initialisation): large enough for its memory to stand far above the noise.
fn wide_model(dir: &Path) -> PathBuf {
    let model = dir.join("wide-sd15");
    copy_dir(&PathBuf::from(tiny_model()), &model);
    let config_path = model.join("unet/config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["block_out_channels"] = json!([80, 160, 240]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let cfg: sdgen_models::unet::UNetConfig = serde_json::from_value(config).unwrap();
    let weights = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&weights, DType::F32, &Device::Cpu);
    drop(sdgen_models::unet::UNet2DConditionModel::new(&cfg, vb).unwrap());
    weights.save(model.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    model
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().map(Result::unwrap) {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn plan_stage(job: &Value, stage: &str) -> Value {
    let stages = job["images"][0]["metadata"]["extra"]["plan"]["stages"].as_array().unwrap().clone();
    stages.into_iter().find(|s| s["stage"] == stage).unwrap_or_else(|| panic!("no {stage} in {job}"))
}

#[test]
fn a_model_switch_returns_the_memory_and_a_budget_for_one_model_evicts_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let a = wide_model(dir.path());
    let b = dir.path().join("wide-sd15-b");
    copy_dir(&a, &b);
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let models = ["--extra-model", a.as_str(), "--extra-model", b.as_str()];

    // No budget: the memory with the wide model warm, and after a model switch drops it (one
    // malloc arena, as `cancel_memory.rs` says why: the weights' pages, not glibc's arenas).
    let server = Server::start_with_env(&models, &[("MALLOC_ARENA_MAX", "1")]);
    run_job(&server, &job(&tiny_model(), 1));
    let baseline = rss(&server);
    let first_a = run_job(&server, &job(&a, 1));
    let unet_bytes = plan_stage(&first_a, "denoise")["weight_bytes"].as_u64().unwrap();
    assert!(unet_bytes > 64 << 20, "{unet_bytes}");
    let held = rss(&server);
    assert!(held > baseline + unet_bytes * 3 / 4, "the warm UNet is resident: {baseline} → {held}");
    let r = server.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": b}).to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(memory(&server)["warm"]["bytes"], 0);
    let after = rss(&server);
    eprintln!("resident: {baseline} before the wide model, {held} with it warm, {after} after the switch");
    assert!(after <= baseline + TOLERANCE_BYTES, "back to {after} from {held}, baseline {baseline}");
    assert!(server.log_shows("Evicted warm weights (the default model switched"), "{}", server.log());
    assert_eq!(counter(&server, "sdgen_weight_evictions_total", "unet"), 2, "the tiny UNet and A's");
    drop(server);

    // A budget with room for one wide UNet beside a job, not two: the denoise stage's planned
    // peak (which holds its own UNet) and half a UNet more.
    let peak = plan_stage(&first_a, "denoise")["peak_bytes"].as_u64().unwrap();
    let budget = ((peak + unet_bytes / 2) as f64 / 0.9) as u64;
    let max_memory = format!("{}MB", budget >> 20);
    let mut args = models.to_vec();
    args.extend(["--max-memory", &max_memory]);
    let server = Server::start(&args);
    let on_a = run_job(&server, &job(&a, 2));
    assert_eq!(on_a["images"][0]["metadata"]["extra"]["weight_use"]["unet"], "loaded_kept", "A fits warm");
    let on_b = run_job(&server, &job(&b, 2));
    assert_eq!(on_b["images"][0]["metadata"]["extra"]["weight_use"]["unet"], "loaded_kept", "{on_b}");
    assert_eq!(counter(&server, "sdgen_weight_evictions_total", "unet"), 1);
    let warm = &memory(&server)["warm"];
    let unets: Vec<&str> = (warm["entries"].as_array().unwrap().iter())
        .filter(|e| e["component"] == "unet")
        .map(|e| e["model"].as_str().unwrap())
        .collect();
    assert_eq!(unets, [b.as_str()], "{warm}");
    let log = server.log();
    let line = log.lines().find(|l| l.contains("Evicted warm weights")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&format!("unet of {a}")) && line.contains("denoise stage plans a peak"), "{line}");
    // The memory it gave back, measured: most of the UNet's bytes.
    eprintln!("{line}");
    let freed =
        line.rsplit("; ").next().and_then(|t| t.strip_suffix("MB given back")).unwrap_or_else(|| panic!("{line}"));
    let freed_bytes = (freed.parse::<f64>().unwrap() * (1 << 20) as f64) as u64;
    assert!(freed_bytes > unet_bytes / 2, "{line}");
}

/// `weights` through the job API: a bad value is a 422 naming the field; a `q8` job runs
/// quantised (its metadata, the sidecar's, says `weights: q8`), and a `q8` and a full-precision
/// job of one model are never served each other's warm UNet: each loads its own, then reuses it.
#[test]
fn quantised_weights_are_their_own_warm_entry() {
    let server = Server::start(&[]);
    server.post("/v1/jobs", r#"{"prompt": "a cat", "weights": "q3"}"#).assert_refused(
        422,
        Some("weights"),
        "weights: `q3` is not a weight format: q8",
    );
    let mut q8 = job(&tiny_model(), 5);
    q8["weights"] = "q8".into();
    let use_of = |job: &Value| job["images"][0]["metadata"]["extra"]["weight_use"]["unet"].clone();
    let first = run_job(&server, &q8);
    assert_eq!(first["images"][0]["metadata"]["extra"]["weights"], "q8", "{first}");
    assert_eq!(use_of(&first), "loaded_kept");
    let full = run_job(&server, &job(&tiny_model(), 5));
    assert_eq!(use_of(&full), "loaded_kept", "the full-precision job reads its own UNet");
    assert!(full["images"][0]["metadata"]["extra"].get("weights").is_none(), "{full}");
    let again = run_job(&server, &q8);
    assert_eq!(use_of(&again), "reused", "the q8 job takes its own warm UNet");
    assert_eq!(use_of(&run_job(&server, &job(&tiny_model(), 5))), "reused");
    assert_eq!(counter(&server, "sdgen_weight_loads_total", "unet"), 2);
    assert!(png(&server, &first) == png(&server, &again), "the warm q8 job's PNG differs from the first's");
    let warm = memory(&server)["warm"]["entries"].clone();
    let unets = warm.as_array().unwrap().iter().filter(|e| e["component"] == "unet").count();
    assert_eq!(unets, 2, "{warm}");
}
