//! Fuzzing the request decoding (proptest: 1000 cases a property in `cargo test`, about a second;
//! `SDGEN_FUZZ_CASES=N` runs more): arbitrary bytes, arbitrary JSON, and valid job-API and A1111
//! requests with fields replaced, removed or added, sent through the whole router in process —
//! the authentication, the body limit, the parsing, the caps, the model policy and the pre-queue
//! check (the tiny SD 1.5 opened, every request planned). Every one must be answered (a panic
//! fails the case, and proptest shrinks it to the smallest body), with a 2xx or a 4xx whose JSON
//! says what is wrong and, for a 422, names a field of the request.
//!
//! The jobs that pass are taken by a stand-in worker that cancels them at once: generating is
//! not what is fuzzed, and a blocking A1111 call then answers at once (with no images).

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock, RwLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sdgen::candle::{DType, Device};
use sdgen::engine::EngineConfig;
use sdgen::pipeline::Runtime;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use crate::jobs::JobState;
use crate::queue::Queue;
use crate::request::{Limits, ModelPolicy};
use crate::routes::AppState;
use crate::worker::JobSource;

/// Bodies past this are refused with 413 (small, so the fuzzer reaches it).
const MAX_BODY_BYTES: usize = 64 << 10;

/// The tiny SD 1.5 the tests use.
fn tiny_model() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sd15").to_string()
}

/// A 64×64 PNG, base64 (a valid init image).
fn init_png_base64() -> &'static str {
    static PNG: OnceLock<String> = OnceLock::new();
    PNG.get_or_init(|| {
        use base64::Engine as _;
        let rgb: Vec<u8> = (0..64 * 64 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let png = sdgen::output::encode_png(&rgb, 64, 64, &[]).unwrap();
        base64::engine::general_purpose::STANDARD.encode(png)
    })
}

/// The router over the tiny model with small caps, and the runtime it runs on (built once: the
/// pre-queue check keeps the model open between cases, as the server does).
fn server() -> &'static (tokio::runtime::Runtime, Router) {
    static SERVER: OnceLock<(tokio::runtime::Runtime, Router)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut engine = EngineConfig::new(Runtime::new(Device::Cpu, DType::F32), "cpu");
        engine.hub.offline = true;
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let queue = Arc::new(Queue::new(1 << 16, 16, metrics.clone()));
        let worker_queue = queue.clone();
        std::thread::spawn(move || {
            while let Some(task) = worker_queue.next() {
                task.reporter.finish(JobState::Cancelled, None);
            }
        });
        let state = Arc::new(AppState {
            queue,
            metrics,
            warm: None,
            preflight: Arc::new(crate::preflight::Preflight::new(engine)),
            limits: Limits { max_width: 256, max_height: 256, max_steps: 8, max_images: 4 },
            models: ModelPolicy { paths: vec![tiny_model()], ..Default::default() },
            default_model: RwLock::new(tiny_model()),
            api_key: None,
            max_memory_bytes: None,
            job_timeout_ms: None,
            max_body_bytes: MAX_BODY_BYTES,
            device_label: "cpu".into(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        (runtime, crate::routes::router(state))
    })
}

/// `POST path` with `body`: the status and the answer's JSON (`Null` when it is not JSON).
fn post(path: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let (runtime, router) = server();
    runtime.block_on(async {
        let request = Request::post(path).header("content-type", "application/json").body(Body::from(body)).unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    })
}

/// The routes that decode a body, with a valid body for each.
fn valid_requests() -> Vec<(&'static str, Value)> {
    let model = tiny_model();
    let png = init_png_base64();
    vec![
        (
            "/v1/jobs",
            json!({"prompt": "a cat", "negative_prompt": "blurry", "model": model, "seed": 1, "steps": 2,
                "guidance": 7.5, "width": 64, "height": 64, "n": 2, "batch_size": 2, "scheduler": "euler"}),
        ),
        (
            "/v1/jobs",
            json!({"prompts": ["a cat", "a dog"], "init_image": png, "strength": 0.5, "seed": 3, "steps": 4,
                "upscale": {"factor": 2, "hires_strength": 0.3}, "loras": []}),
        ),
        (
            "/sdapi/v1/txt2img",
            json!({"prompt": "a cat", "negative_prompt": "", "seed": -1, "steps": 4, "cfg_scale": 7,
                "width": 64, "height": 64, "sampler_name": "Euler a", "scheduler": "Automatic", "batch_size": 1,
                "n_iter": 2, "enable_hr": true, "hr_scale": 2, "hr_upscaler": "Lanczos", "denoising_strength": 0.4,
                "override_settings": {"sd_model_checkpoint": model}, "send_images": true}),
        ),
        (
            "/sdapi/v1/img2img",
            json!({"prompt": "a cat", "init_images": [png], "denoising_strength": 0.6, "steps": 2, "seed": 9,
                "sampler_name": "DPM++ 2M", "scheduler": "Karras", "width": 64, "height": 64}),
        ),
        ("/sdapi/v1/options", json!({"sd_model_checkpoint": model, "samples_format": "png"})),
    ]
}

/// The field names the engine's request has ([`sdgen::engine::FIELDS`]), and beside them those
/// only the job API or A1111 reads, nested ones, and a few nobody reads: the keys mutations set.
const MORE_KEYS: &[&str] = &[
    "prompt",
    "prompts",
    "negative_prompt",
    "model",
    "loras",
    "batch_size",
    "cfg_scale",
    "sampler_name",
    "sampler_index",
    "n_iter",
    "denoising_strength",
    "init_images",
    "mask",
    "enable_hr",
    "hr_scale",
    "hr_upscaler",
    "hr_resize_x",
    "hr_resize_y",
    "override_settings",
    "refiner_checkpoint",
    "refiner_switch_at",
    "send_images",
    "sd_model_checkpoint",
    "factor",
    "source",
    "scale",
    "layers",
    "styles",
    "",
    "widht",
    "__proto__",
];

fn keys() -> Vec<&'static str> {
    sdgen::engine::FIELDS.iter().chain(MORE_KEYS).copied().collect()
}

/// Strings worth trying where a field wants one.
fn strings() -> impl Strategy<Value = String> {
    let named = prop::sample::select(vec![
        "",
        " ",
        "a cat",
        "Euler",
        "Euler a",
        "euler-a",
        "DPM++ 2M Karras",
        "Karras",
        "Automatic",
        "Exponential",
        "Lanczos",
        "Latent",
        "None",
        "sd15",
        "sdxl",
        "4k",
        "4k-ultra",
        "lcm",
        "nobody/none",
        "/etc",
        "../../..",
        "org/lora:0.5",
        "AAAA",
        "!!not base64!!",
        "data:image/png;base64,",
        "data:image/png;base64,iVBORw0KGgo=",
        "(a:1.5) [b] BREAK \\( c",
        "NaN",
        "-1",
        "1e999",
        "\u{0}",
        "\u{202e}x",
        "🐈",
    ]);
    prop_oneof![
        named.prop_map(str::to_string),
        Just(tiny_model()),
        Just(init_png_base64().to_string()),
        // A valid image cut short, and long text.
        any::<prop::sample::Index>().prop_map(|at| {
            let png = init_png_base64();
            png[..at.index(png.len())].to_string()
        }),
        any::<String>(),
        (1usize..5000).prop_map(|n| "x".repeat(n)),
    ]
}

/// A JSON leaf, biased to the edges of the numeric fields.
fn leaf() -> impl Strategy<Value = Value> {
    let edge = prop::sample::select(vec![
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(7),
        json!(8),
        json!(64),
        json!(100),
        json!(257),
        json!(65536),
        json!(u32::MAX),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(0.5),
        json!(1.5),
        json!(-0.0),
        json!(2.5),
        json!(1e30),
        json!(-1e308),
        json!(f64::EPSILON),
    ]);
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        edge,
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("JSON has no NaN or infinity", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        strings().prop_map(Value::from),
    ]
}

/// Any JSON value, a few levels deep, its object keys mostly the APIs' field names.
fn any_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 32, 6, |inner| {
        let key = prop_oneof![4 => prop::sample::select(keys()).prop_map(str::to_string), 1 => any::<String>()];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A change to a valid body.
#[derive(Debug, Clone)]
enum Mutation {
    /// Sets a top-level field (one of [`keys`], or any name) to a value.
    Set(String, Value),
    /// Sets a field inside a nested object or array field (`upscale.factor`, `init_images[0]`).
    SetNested(usize, String, Value),
    /// Removes the body's `n`-th field.
    Remove(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let key = prop_oneof![6 => prop::sample::select(keys()).prop_map(str::to_string), 1 => any::<String>()];
    prop_oneof![
        3 => (key.clone(), any_json()).prop_map(|(k, v)| Mutation::Set(k, v)),
        1 => (any::<usize>(), key, leaf()).prop_map(|(i, k, v)| Mutation::SetNested(i, k, v)),
        1 => any::<usize>().prop_map(Mutation::Remove),
    ]
}

fn apply(body: &mut Map<String, Value>, m: &Mutation) {
    match m {
        Mutation::Set(k, v) => {
            body.insert(k.clone(), v.clone());
        }
        Mutation::SetNested(i, k, v) => {
            let nested: Vec<String> =
                body.iter().filter(|(_, v)| v.is_object() || v.is_array()).map(|(k, _)| k.clone()).collect();
            if nested.is_empty() {
                return;
            }
            match body.get_mut(&nested[i % nested.len()]) {
                Some(Value::Object(o)) => {
                    o.insert(k.clone(), v.clone());
                }
                Some(Value::Array(a)) if !a.is_empty() => {
                    let n = a.len();
                    a[i % n] = v.clone();
                }
                Some(Value::Array(a)) => a.push(v.clone()),
                _ => {}
            }
        }
        Mutation::Remove(i) => {
            if let Some(k) = body.keys().nth(i % body.len().max(1)).cloned() {
                body.remove(&k);
            }
        }
    }
}

/// The route's fields: every key of its valid bodies (an error may name any of them).
fn route_fields(path: &str) -> BTreeSet<String> {
    let mut fields: BTreeSet<String> = valid_requests()
        .into_iter()
        .filter(|(p, _)| *p == path)
        .flat_map(|(_, v)| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>())
        .collect();
    fields.extend(keys().into_iter().map(str::to_string));
    fields.insert("body".into());
    fields
}

/// The answer's contract: a 2xx, or a 4xx with a JSON error that says what is wrong and, for a
/// 422, names a field of the request (`sent`'s keys or the route's; its root, before any `.` or
/// `[`, as `upscale.factor` and `loras[0].scale` are named).
fn check(path: &str, sent: Option<&Map<String, Value>>, status: StatusCode, answer: &Value) -> Result<(), String> {
    let say = |what: &str| Err(format!("{path}: {status} {what}: {answer}"));
    if status.is_success() {
        return match path {
            "/v1/jobs" if answer["id"].is_string() => Ok(()),
            "/sdapi/v1/txt2img" | "/sdapi/v1/img2img" if answer["images"].is_array() => Ok(()),
            "/sdapi/v1/options" => Ok(()),
            _ => say("is not the route's answer"),
        };
    }
    if !status.is_client_error() {
        return say("is neither a 2xx nor a 4xx");
    }
    if !answer["error"].is_string() || answer["message"].as_str().is_none_or(str::is_empty) {
        return say("has no JSON error with a message");
    }
    if sent.is_some() && status == StatusCode::BAD_REQUEST {
        return say("refuses a JSON object as not JSON");
    }
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        let Some(field) = answer["field"].as_str() else { return say("names no field") };
        let root = field.split(['.', '[']).next().unwrap_or_default();
        let known = route_fields(path).contains(root) || sent.is_some_and(|s| s.contains_key(field));
        if !known {
            return say("names a field the request does not have");
        }
    }
    Ok(())
}

fn runner() -> TestRunner {
    let cases = std::env::var("SDGEN_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1000);
    // No regression files written into the source tree: a failure prints its shrunk body.
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

fn paths() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"])
}

#[test]
fn valid_requests_are_accepted() {
    for (path, body) in valid_requests() {
        let (status, answer) = post(path, body.to_string().into_bytes());
        assert!(status.is_success(), "{path}: {status} {answer}");
    }
}

#[test]
fn mutated_valid_requests_are_answered_with_a_named_field() {
    let requests = valid_requests();
    let strategy = (0..requests.len(), prop::collection::vec(mutation(), 1..4));
    runner()
        .run(&strategy, |(which, mutations)| {
            let (path, body) = &requests[which];
            let mut body = body.as_object().unwrap().clone();
            for m in &mutations {
                apply(&mut body, m);
            }
            let (status, answer) = post(path, Value::Object(body.clone()).to_string().into_bytes());
            check(path, Some(&body), status, &answer).map_err(TestCaseError::fail)
        })
        .unwrap();
}

#[test]
fn arbitrary_json_is_answered() {
    runner()
        .run(&(paths(), any_json()), |(path, value)| {
            let (status, answer) = post(path, value.to_string().into_bytes());
            check(path, value.as_object(), status, &answer).map_err(TestCaseError::fail)
        })
        .unwrap();
}

#[test]
fn arbitrary_bytes_and_cut_bodies_are_answered() {
    let requests = valid_requests();
    let cut = (0..requests.len(), any::<prop::sample::Index>()).prop_map(move |(which, at)| {
        let (path, body) = &requests[which];
        let text = body.to_string().into_bytes();
        (*path, text[..at.index(text.len())].to_vec())
    });
    let big = (paths(), Just(vec![b' '; MAX_BODY_BYTES + 1]));
    let bytes = (paths(), prop::collection::vec(any::<u8>(), 0..256));
    runner()
        .run(&prop_oneof![bytes, cut, big], |(path, body)| {
            let sent = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.as_object().cloned());
            let (status, answer) = post(path, body);
            check(path, sent.as_ref(), status, &answer).map_err(TestCaseError::fail)
        })
        .unwrap();
}
