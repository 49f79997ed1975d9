//! The server's own job API on the real server: jobs, their event streams, cancellation, the
//! bounded queue, the plan check, memory, metrics and shutdown.

mod common;

use common::{sse, unbase64, wait_for, Server};
use serde_json::json;

/// A job that runs long enough to be caught running or queued (150 steps × 16 images), cancelled
/// by the test.
const LONG: &str = r#"{"prompt": "a cat", "seed": 1, "steps": 150, "n": 16, "width": 64, "height": 64}"#;

fn submit(server: &Server, body: &str) -> String {
    let r = server.post("/v1/jobs", body);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(r.header("location"), Some(format!("/v1/jobs/{id}").as_str()));
    id
}

#[test]
fn a_job_runs_with_its_events_in_order_and_its_images_served() {
    let server = Server::start(&[]);
    let id = submit(&server, r#"{"prompt": "a cat", "seed": 5, "steps": 3, "n": 2, "batch_size": 2}"#);
    let events = sse(&server.addr, &format!("/v1/jobs/{id}/events"));
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).filter(|n| *n != "log").collect();
    // queued → started → the stages, each step, the images, done.
    let want = [
        "queued",
        "started",
        "stage_start",
        "stage_end",
        "stage_start",
        "step",
        "step",
        "step",
        "stage_end",
        "stage_start",
        "stage_end",
        "image",
        "image",
        "done",
    ];
    assert_eq!(names, want, "{events:?}");
    let steps: Vec<u64> =
        events.iter().filter(|(n, _)| n == "step").map(|(_, d)| d["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3]);
    assert_eq!(events.last().unwrap().1, json!({"type": "done", "images": 2}));
    // A late subscriber replays the whole log.
    assert_eq!(sse(&server.addr, &format!("/v1/jobs/{id}/events")).len(), events.len());

    let job = server.get(&format!("/v1/jobs/{id}")).json();
    assert_eq!(job["state"], "done");
    assert_eq!(job["progress"]["fraction"], 1.0);
    let images = job["images"].as_array().unwrap();
    assert_eq!(images.iter().map(|i| i["seed"].as_u64().unwrap()).collect::<Vec<_>>(), [5, 6]);
    let png = server.get(images[1]["url"].as_str().unwrap());
    assert_eq!((png.status, png.header("content-type")), (200, Some("image/png")));
    let inline = server.get(&format!("/v1/jobs/{id}?images=base64")).json();
    assert_eq!(unbase64(inline["images"][1]["png_base64"].as_str().unwrap()), png.body);
    assert!(images[1]["parameters"].as_str().unwrap().contains("Seed: 6"));
    assert_eq!(server.get(&format!("/v1/jobs/{id}/images/7")).status, 404);
    assert_eq!(server.get("/v1/jobs/job-0-none").status, 404);
    // An ended job cannot be cancelled.
    assert_eq!(server.call("DELETE", &format!("/v1/jobs/{id}"), None).status, 409);
}

#[test]
fn cancelling_a_queued_and_a_running_job() {
    let server = Server::start(&[]);
    let running = submit(&server, LONG);
    let queued = submit(&server, LONG);
    wait_for(&server, &running, |j| j["progress"]["step"].as_u64().unwrap_or(0) > 0);
    assert_eq!(server.get(&format!("/v1/jobs/{queued}")).json()["state"], "queued");

    // The queued one ends at once; the running one at its next step.
    let r = server.call("DELETE", &format!("/v1/jobs/{queued}"), None);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["state"], "cancelled");
    let r = server.call("DELETE", &format!("/v1/jobs/{running}"), None);
    assert_eq!(r.status, 202, "{}", r.text());
    let job = wait_for(&server, &running, |j| j["state"] != "running");
    assert_eq!(job["state"], "cancelled");
    let events = sse(&server.addr, &format!("/v1/jobs/{running}/events"));
    assert_eq!(events.last().unwrap().0, "cancelled");
    let events = sse(&server.addr, &format!("/v1/jobs/{queued}/events"));
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["queued", "cancelled"]);

    // The worker is free again: a new job runs.
    let id = submit(&server, r#"{"prompt": "a dog", "seed": 1, "steps": 2}"#);
    assert_eq!(wait_for(&server, &id, |j| j["state"] != "queued" && j["state"] != "running")["state"], "done");
    let metrics = server.get("/metrics").text();
    assert!(metrics.contains("sdgen_jobs_total{outcome=\"cancelled\"} 2"), "{metrics}");
    assert!(metrics.contains("sdgen_jobs_total{outcome=\"done\"} 1"), "{metrics}");
}

#[test]
fn a_full_queue_answers_503_and_later_requests_succeed() {
    let server = Server::start(&["--queue-size", "1"]);
    let running = submit(&server, LONG);
    wait_for(&server, &running, |j| j["state"] == "running");
    let queued = submit(&server, LONG);
    let r = server.post("/v1/jobs", LONG);
    r.assert_refused(503, None, "queue is full");
    assert_eq!(r.header("retry-after"), Some("5"));
    // A1111's routes share the queue.
    assert_eq!(server.post("/sdapi/v1/txt2img", r#"{"prompt": "a cat"}"#).status, 503);
    for id in [&queued, &running] {
        server.call("DELETE", &format!("/v1/jobs/{id}"), None);
    }
    wait_for(&server, &running, |j| j["state"] == "cancelled");
    let id = submit(&server, r#"{"prompt": "a dog", "seed": 1, "steps": 2}"#);
    assert_eq!(wait_for(&server, &id, |j| j["state"] == "done" || j["state"] == "failed")["state"], "done");
    assert!(server.get("/metrics").text().contains("sdgen_requests_refused_total{reason=\"queue_full\"} 2"));
}

#[test]
fn a_job_too_big_for_the_budget_is_refused_before_it_is_queued() {
    let server = Server::start(&["--max-memory", "1MB"]);
    let r = server.post("/v1/jobs", r#"{"prompt": "a cat", "steps": 2}"#);
    assert_eq!(r.status, 507, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"], "does_not_fit");
    // The planner's numbers, and its advice naming the server's own setting (no generate flag).
    let message = v["message"].as_str().unwrap();
    assert!(message.contains("MB") && message.contains("the server's --max-memory "), "{v}");
    common::assert_names_no_cli_flag(&r.text());
    let a1111 = server.post("/sdapi/v1/txt2img", r#"{"prompt": "a cat", "steps": 2}"#);
    assert_eq!(a1111.status, 507);
    common::assert_names_no_cli_flag(&a1111.text());
    let metrics = server.get("/metrics").text();
    assert!(metrics.contains("sdgen_queue_depth 0") && metrics.contains("reason=\"does_not_fit\"} 2"), "{metrics}");
}

#[test]
fn memory_metrics_and_health() {
    let server = Server::start(&[]);
    let m = server.get("/v1/memory").json();
    assert_eq!(m["device"], "cpu");
    assert!(m["memory"]["process_rss_bytes"].as_u64().unwrap() > 0, "{m}");
    assert!(m["memory"]["system_total_bytes"].as_u64().unwrap() > 0, "{m}");
    let id = submit(&server, r#"{"prompt": "a cat", "seed": 1, "steps": 2}"#);
    wait_for(&server, &id, |j| j["state"] == "done");
    let r = server.get("/metrics");
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = r.text();
    for line in [
        "sdgen_queue_depth 0",
        "sdgen_jobs_total{outcome=\"done\"} 1",
        "sdgen_step_seconds_count 2",
        "sdgen_model_opens_total 1",
        "sdgen_stage_loads_total{stage=\"unet\"} 1",
        "sdgen_images_total 1",
    ] {
        assert!(text.contains(line), "`{line}` not in:\n{text}");
    }
    assert!(text.contains("sdgen_process_rss_bytes "));
    assert_eq!(server.get("/healthz").json()["status"], "ok");
}

#[test]
fn sigterm_cancels_the_running_job_and_stops_cleanly() {
    let server = Server::start(&[]);
    let running = submit(&server, LONG);
    wait_for(&server, &running, |j| j["progress"]["step"].as_u64().unwrap_or(0) > 0);
    let addr = server.addr.clone();
    let stream = std::thread::spawn(move || sse(&addr, &format!("/v1/jobs/{running}/events")));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("shutting down") && log.contains("stopped"), "{log}");
    // The open event stream ended with the job's cancellation.
    let events = stream.join().unwrap();
    assert_eq!(events.last().unwrap().0, "cancelled");
}

/// A job's warnings refer to fields as the job API names them, in its events and in its images'
/// metadata: a model folder without T5 runs on the CLIP encoders "as `no_t5`", never `--no-t5`.
#[test]
fn warnings_name_the_job_apis_fields() {
    let model = common::testdata().join("tiny-sd35-medium-no-t5").display().to_string();
    let server = Server::start(&["--extra-model", &model]);
    let body = json!({"prompt": "a cat", "model": model, "steps": 1, "width": 64, "height": 64}).to_string();
    let id = submit(&server, &body);
    let events = sse(&server.addr, &format!("/v1/jobs/{id}/events"));
    let warning = "has no text encoder 3: the prompt is read by the other encoders only (as no_t5)";
    let warned =
        events.iter().filter(|(n, _)| n == "warning").any(|(_, d)| d["message"].as_str().unwrap().contains(warning));
    assert!(warned, "{events:?}");
    // Beside each line, its template: the fields it names left for the client to word.
    let templated = events.iter().any(|(_, d)| d["template"].as_str().is_some_and(|t| t.contains("(as {no_t5})")));
    assert!(templated, "{events:?}");
    let job = server.get(&format!("/v1/jobs/{id}")).json();
    assert_eq!(job["state"], "done", "{job}");
    assert!(job["images"][0]["metadata"]["warnings"].to_string().contains(warning), "{job}");
    common::assert_names_no_cli_flag(&serde_json::to_string(&events).unwrap());
}

/// The memory planner's own warning names fields as the job API does: 4 images at 768² that fit
/// the server's budget only in smaller batches, VAE-tiled, are told which `width` and `height`, or
/// which of the server's `--max-memory`, would run them at full speed — never `generate`'s flags
/// — and its template leaves the fields for the client to word.
#[test]
fn the_planners_warning_names_the_job_apis_fields() {
    // 58 MB usable: a batch of 4 plans ~65 MB in the denoiser and ~230 MB in an untiled decode
    // (fast kernels), one image ~30 MB beside the server's own ~15 MB.
    let server = Server::start(&["--max-memory", "64MB"]);
    let body = r#"{"prompt": "a cat", "seed": 1, "steps": 150, "n": 4, "batch_size": 4, "width": 768, "height": 768}"#;
    let id = submit(&server, body);
    // Its warning comes with its plan, before the first stage; the rest need not run (the cancel
    // lands at the next stage or step).
    wait_for(&server, &id, |j| j["progress"]["stage"].is_string());
    assert_eq!(server.call("DELETE", &format!("/v1/jobs/{id}"), None).status, 202);
    let events = sse(&server.addr, &format!("/v1/jobs/{id}/events"));
    let (_, warning) = events
        .iter()
        .find(|(n, d)| n == "warning" && d["message"].as_str().unwrap().contains("Memory is tight"))
        .unwrap_or_else(|| panic!("no memory warning in {events:?}"));
    let message = warning["message"].as_str().unwrap();
    let template = warning["template"].as_str().unwrap();
    assert!(
        message.contains("Consider using width ") && message.contains(" or the server's --max-memory "),
        "{message}"
    );
    assert!(template.contains("Consider using {width} ") && template.contains(" or {max_memory} "), "{template}");
    common::assert_names_no_cli_flag(message);
}
