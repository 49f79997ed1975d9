//! `--broker`: the server queues on a real Redis (Debian's `redis-server`, started by each test
//! on a free port in a temporary folder) and `sdgen-server --worker` processes run the jobs. The
//! HTTP API answers as with the in-process queue: the same PNG bytes and the same events; a
//! killed worker's job is finished by another, a restarted server loses no job, cancellation and
//! time limits work through Redis. The in-process time limit is tested here too.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{first_line_then_drain, sdgen_server, sse, test_png, wait_for, Server};
use serde_json::{json, Value};

/// A Redis server of its own, stopped when dropped.
struct Redis {
    child: Child,
    /// `redis://127.0.0.1:PORT`.
    url: String,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// `redis-server` on a free port, nothing saved to disk; fails saying how to install it.
    fn start() -> Redis {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            // A port the OS says is free now (another process may take it first: then retry).
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start redis-server ({e}): the broker tests need a real Redis. Install it \
                         (Debian/Ubuntu: `sudo apt-get install -y redis-server`; .ci/run does it) or put \
                         redis-server on PATH"
                    )
                });
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                if ping(port) {
                    return Redis { child, url: format!("redis://127.0.0.1:{port}"), _dir: dir };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start on a free port in 5 tries");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a Redis answers PING on `port`.
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}

/// A `sdgen-server --worker` process, killed (SIGKILL) when dropped.
struct Worker {
    child: Child,
    log: Arc<Mutex<String>>,
    _home: tempfile::TempDir,
}

impl Worker {
    /// A worker named `name` on `redis`, taking over dead workers' jobs after 1 s.
    fn start(redis: &Redis, name: &str) -> Worker {
        Self::start_with(redis, name, &[])
    }

    /// As [`Worker::start`], with more flags.
    fn start_with(redis: &Redis, name: &str, args: &[&str]) -> Worker {
        let home = tempfile::tempdir().unwrap();
        let mut cmd = sdgen_server(home.path());
        cmd.args(["--worker", "--broker", &redis.url, "--worker-name", name, "--claim-idle", "1"]).args(args);
        let mut child = cmd.spawn().expect("sdgen-server --worker starts");
        let (line, log) = first_line_then_drain(&mut child);
        assert!(line.starts_with(&format!("sdgen-server worker {name} taking jobs from redis://")), "{line}");
        Worker { child, log, _home: home }
    }

    /// kill -9: it dies mid-job, as a crashed machine would.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, then waits for it to exit: its exit status and log.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        (status, self.log())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server of `redis`'s jobs (`args` more flags).
fn broker_server(redis: &Redis, args: &[&str]) -> Server {
    let mut all = vec!["--broker", redis.url.as_str()];
    all.extend_from_slice(args);
    Server::start(&all)
}

/// `POST /v1/jobs` → the job's id.
fn submit(server: &Server, body: &str) -> String {
    let r = server.post("/v1/jobs", body);
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// Waits for the job to end: its JSON.
fn ended(server: &Server, id: &str) -> Value {
    wait_for(server, id, |j| ["done", "failed", "cancelled"].contains(&j["state"].as_str().unwrap_or("")))
}

/// The PNG files of an ended job, by index.
fn pngs(server: &Server, job: &Value) -> Vec<Vec<u8>> {
    let images = job["images"].as_array().unwrap();
    images.iter().map(|i| server.get(i["url"].as_str().unwrap()).body).collect()
}

/// The names of a job's events but its log lines, as its event stream sends them.
fn milestones(server: &Server, id: &str) -> Vec<String> {
    let events = sse(&server.addr, &format!("/v1/jobs/{id}/events"));
    events.into_iter().map(|(name, _)| name).filter(|n| n != "log" && n != "warning").collect()
}

/// Runs `body` on an in-process server: its images and its event names.
fn in_process(body: &str) -> (Vec<Vec<u8>>, Vec<String>) {
    let server = Server::start(&[]);
    let id = submit(&server, body);
    let job = ended(&server, &id);
    assert_eq!(job["state"], "done", "{job}");
    (pngs(&server, &job), milestones(&server, &id))
}

/// A job of several batches, long enough on the tiny model to be caught running.
const BATCHES: &str = r#"{"prompt": "a lighthouse", "seed": 11, "steps": 40, "n": 6, "width": 64, "height": 64}"#;

/// A job that runs until it is cancelled or times out.
const LONG: &str = r#"{"prompt": "a cat", "seed": 1, "steps": 150, "n": 16, "width": 64, "height": 64}"#;

#[test]
fn a_job_through_the_broker_gives_the_in_process_servers_bytes_and_events() {
    let redis = Redis::start();
    let server = broker_server(&redis, &[]);
    let _worker = Worker::start(&redis, "w1");
    let body = r#"{"prompt": "a cat", "seed": 5, "steps": 3, "n": 2, "batch_size": 2}"#;
    let id = submit(&server, body);
    let job = ended(&server, &id);
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["progress"]["fraction"], 1.0);
    let (want_pngs, want_events) = in_process(body);
    assert_eq!(pngs(&server, &job), want_pngs, "the broker's PNGs differ from the in-process server's");
    assert_eq!(milestones(&server, &id), want_events);
    assert_eq!(want_events.first().map(String::as_str), Some("queued"));

    // Image-to-image (the init image travels in the job) and A1111's route.
    let init = common::base64(&test_png(64, 48));
    let body = json!({"prompt": "a cat", "seed": 3, "steps": 2, "init_image": init, "strength": 0.5}).to_string();
    let id = submit(&server, &body);
    let job = ended(&server, &id);
    assert_eq!(pngs(&server, &job), in_process(&body).0);
    let a1111 = r#"{"prompt": "a dog", "seed": 9, "steps": 2, "batch_size": 2}"#;
    let r = server.post("/sdapi/v1/txt2img", a1111);
    assert_eq!(r.status, 200, "{}", r.text());
    let local = Server::start(&[]);
    let want = local.post("/sdapi/v1/txt2img", a1111);
    assert_eq!(r.json()["images"], want.json()["images"]);

    let metrics = server.get("/metrics").text();
    for line in ["sdgen_queue_depth 0", "sdgen_jobs_total{outcome=\"done\"} 3", "sdgen_images_total 5"] {
        assert!(metrics.contains(line), "`{line}` not in:\n{metrics}");
    }
    assert_eq!(server.get("/sdapi/v1/progress").json()["state"]["job_count"], 0);
}

#[test]
fn a_killed_workers_job_is_finished_by_another_worker_without_duplicates() {
    let redis = Redis::start();
    let server = broker_server(&redis, &[]);
    let first = Worker::start(&redis, "doomed");
    let id = submit(&server, BATCHES);
    // Killed mid-job: after its first image, before its last.
    wait_for(&server, &id, |j| j["images"].as_array().is_some_and(|i| !i.is_empty()));
    first.kill();
    let during = server.get(&format!("/v1/jobs/{id}")).json();
    assert_eq!(during["state"], "running", "{during}");
    assert!(during["images"].as_array().unwrap().len() < 6, "the job ended before the kill: {during}");

    let second = Worker::start(&redis, "rescuer");
    let job = ended(&server, &id);
    assert_eq!(job["state"], "done", "{job}");
    let log = second.log();
    assert!(log.contains("taking over entry") && log.contains(&format!("running {id}")), "{log}");
    let indexes: Vec<u64> = job["images"].as_array().unwrap().iter().map(|i| i["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, [0, 1, 2, 3, 4, 5]);
    // The same images and the same events as one run in-process: nothing lost, nothing twice.
    let (want_pngs, want_events) = in_process(BATCHES);
    assert_eq!(pngs(&server, &job), want_pngs);
    assert_eq!(milestones(&server, &id), want_events);
}

#[test]
fn a_worker_stopped_by_sigterm_finishes_its_job_first() {
    let redis = Redis::start();
    let server = broker_server(&redis, &[]);
    let worker = Worker::start(&redis, "w1");
    let id = submit(&server, BATCHES);
    wait_for(&server, &id, |j| j["progress"]["step"].as_u64().unwrap_or(0) > 0);
    let next = submit(&server, r#"{"prompt": "a dog", "seed": 1, "steps": 2}"#);
    let (status, log) = worker.terminate();
    assert!(status.success() && log.contains("stopped"), "{log}");
    assert_eq!(ended(&server, &id)["state"], "done");
    // The job after it stays queued for the next worker.
    assert_eq!(server.get(&format!("/v1/jobs/{next}")).json()["state"], "queued");
    let _worker = Worker::start(&redis, "w2");
    assert_eq!(ended(&server, &next)["state"], "done");
}

#[test]
fn a_restarted_server_loses_no_job_that_was_in_redis() {
    let redis = Redis::start();
    let server = broker_server(&redis, &[]);
    let bodies: Vec<String> =
        (0..3).map(|seed| format!(r#"{{"prompt": "a boat", "seed": {seed}, "steps": 2}}"#)).collect();
    let ids: Vec<String> = bodies.iter().map(|b| submit(&server, b)).collect();
    assert!(server.get("/metrics").text().contains("sdgen_queue_depth 3"));
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");

    // Another server process on the same Redis, then a worker: every job runs and is served.
    let server = broker_server(&redis, &["--keep-jobs", "1"]);
    assert!(server.get("/metrics").text().contains("sdgen_queue_depth 3"));
    assert_eq!(server.get(&format!("/v1/jobs/{}", ids[0])).json()["state"], "queued");
    let _worker = Worker::start(&redis, "w1");
    for (id, body) in ids.iter().zip(&bodies) {
        let job = ended(&server, id);
        assert_eq!(job["state"], "done", "{job}");
        assert_eq!(pngs(&server, &job), in_process(body).0);
        let events = milestones(&server, id);
        assert_eq!((events.first().unwrap().as_str(), events.last().unwrap().as_str()), ("queued", "done"));
    }
    assert!(server.get("/metrics").text().contains("sdgen_queue_depth 0"));
    assert_eq!(server.get("/v1/jobs/job-1-0000000000000000").status, 404);

    // A job this server forgot (--keep-jobs 1) is read again from Redis, its past not counted twice.
    let counted = |text: String| {
        text.lines()
            .filter(|l| l.starts_with("sdgen_jobs_total") || l.starts_with("sdgen_images_total"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = counted(server.get("/metrics").text());
    assert_eq!(server.get(&format!("/v1/jobs/{}", ids[0])).json()["state"], "done");
    assert_eq!(counted(server.get("/metrics").text()), before);

    // A job running while its server restarts goes on on its worker; the new server reports it
    // whole: every image and every event, as one run in process.
    let running = submit(&server, BATCHES);
    wait_for(&server, &running, |j| j["progress"]["step"].as_u64().unwrap_or(0) > 0);
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");
    let server = broker_server(&redis, &["--keep-jobs", "1"]);
    let job = ended(&server, &running);
    assert_eq!(job["state"], "done", "{job}");
    let (want_pngs, want_events) = in_process(BATCHES);
    assert_eq!(pngs(&server, &job), want_pngs);
    assert_eq!(milestones(&server, &running), want_events);
}

#[test]
fn cancelling_a_queued_and_a_running_job_through_redis() {
    let redis = Redis::start();
    let server = broker_server(&redis, &[]);
    let _worker = Worker::start(&redis, "w1");
    let running = submit(&server, LONG);
    let queued = submit(&server, LONG);
    wait_for(&server, &running, |j| j["progress"]["step"].as_u64().unwrap_or(0) > 0);
    assert_eq!(server.get(&format!("/v1/jobs/{queued}")).json()["state"], "queued");
    assert!(server.get("/metrics").text().contains("sdgen_queue_depth 1"));

    let r = server.call("DELETE", &format!("/v1/jobs/{queued}"), None);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["state"], "cancelled");
    let r = server.call("DELETE", &format!("/v1/jobs/{running}"), None);
    assert_eq!(r.status, 202, "{}", r.text());
    let job = wait_for(&server, &running, |j| j["state"] != "running");
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(milestones(&server, &running).last().unwrap(), "cancelled");
    assert_eq!(milestones(&server, &queued), ["queued", "cancelled"]);
    assert_eq!(server.call("DELETE", &format!("/v1/jobs/{queued}"), None).status, 409);

    // The worker skips the cancelled entry and is free: a new job runs.
    let id = submit(&server, r#"{"prompt": "a dog", "seed": 1, "steps": 2}"#);
    assert_eq!(ended(&server, &id)["state"], "done");
    let metrics = server.get("/metrics").text();
    assert!(metrics.contains("sdgen_jobs_total{outcome=\"cancelled\"} 2"), "{metrics}");
}

/// Checks a timed-out job: failed with 504 and the limit named, its worker free after.
fn times_out(server: &Server) {
    let id = submit(server, LONG);
    let job = ended(server, &id);
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["status"], 504, "{job}");
    assert_eq!(job["error"]["error"], "timed_out", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("time limit of 1 s (--job-timeout)"), "{message}");
    assert_eq!(milestones(server, &id).last().unwrap(), "failed");
    let r = server
        .post("/sdapi/v1/txt2img", r#"{"prompt": "a cat", "steps": 150, "n_iter": 16, "width": 64, "height": 64}"#);
    assert_eq!(r.status, 504, "{}", r.text());
    let id = submit(server, r#"{"prompt": "a dog", "seed": 1, "steps": 2}"#);
    assert_eq!(ended(server, &id)["state"], "done");
}

#[test]
fn a_job_past_its_time_limit_fails_in_process_and_through_redis() {
    times_out(&Server::start(&["--job-timeout", "1"]));
    let redis = Redis::start();
    let server = broker_server(&redis, &["--job-timeout", "1"]);
    let _worker = Worker::start(&redis, "w1");
    times_out(&server);
}

#[test]
fn a_workers_max_memory_bounds_the_jobs_it_runs() {
    let redis = Redis::start();
    let server = broker_server(&redis, &[]);
    let _worker = Worker::start_with(&redis, "small", &["--max-memory", "1MB"]);
    // The server's own check passes (no limit there); the worker plans within its 1 MB and refuses.
    let id = submit(&server, r#"{"prompt": "a cat", "seed": 1, "steps": 2}"#);
    let job = ended(&server, &id);
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"]["message"].as_str().unwrap().contains("MB"), "{job}");
}

#[test]
fn a_job_whose_workers_keep_dying_fails_after_three_runs() {
    let redis = Redis::start();
    let server = broker_server(&redis, &[]);
    let id = submit(&server, LONG);
    for run in 1..=3 {
        let worker = Worker::start(&redis, &format!("doomed-{run}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !worker.log().contains(&format!("running {id}")) {
            assert!(Instant::now() < deadline, "run {run} never started: {}", worker.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        worker.kill();
    }
    // The fourth worker does not run it again: the job fails, saying why.
    let _worker = Worker::start(&redis, "last");
    let job = ended(&server, &id);
    assert_eq!(job["state"], "failed", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("stopped 3 times while running it"), "{message}");
}

/// A worker's sample of `family` in `/metrics` text (`labels` after its `worker` label).
fn worker_sample(metrics: &str, family: &str, worker: &str, labels: &str) -> Option<u64> {
    let prefix = format!("{family}{{worker=\"{worker}\"{labels}}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.parse().unwrap())
}

/// `/metrics` once `ready` accepts it (at most 10 s: a worker publishes as each job ends).
fn metrics_when(server: &Server, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = server.get("/metrics").text();
        if ready(&text) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_servers_metrics_and_memory_show_each_live_workers() {
    let redis = Redis::start();
    let server = broker_server(&redis, &[]);
    let (w1, w2) = (Worker::start(&redis, "w1"), Worker::start(&redis, "w2"));
    // Queued at once: each worker takes one at a time, so both run some.
    let jobs = 6;
    let ids: Vec<String> = (0..jobs)
        .map(|seed| {
            submit(
                &server,
                &format!(r#"{{"prompt": "a boat", "seed": {seed}, "steps": 20, "width": 64, "height": 64}}"#),
            )
        })
        .collect();
    for id in &ids {
        assert_eq!(ended(&server, id)["state"], "done");
    }
    let done = |text: &str, w: &str| worker_sample(text, "sdgen_jobs_total", w, ",outcome=\"done\"").unwrap_or(0);
    let metrics = metrics_when(&server, |m| done(m, "w1") + done(m, "w2") == jobs);
    assert_eq!(done(&metrics, "w1") + done(&metrics, "w2"), jobs, "{metrics}");
    assert!(done(&metrics, "w1") > 0 && done(&metrics, "w2") > 0, "both workers ran jobs:\n{metrics}");
    let sum = |family: &str| {
        worker_sample(&metrics, family, "w1", "").unwrap() + worker_sample(&metrics, family, "w2", "").unwrap()
    };
    assert_eq!(sum("sdgen_images_total"), jobs);
    assert_eq!(sum("sdgen_step_seconds_count"), jobs * 20);
    for line in ["sdgen_workers 2", "sdgen_jobs_running{worker=\"w1\"} 0"] {
        assert!(metrics.lines().any(|l| l == line), "`{line}` not in:\n{metrics}");
    }
    for w in ["w1", "w2"] {
        assert!(worker_sample(&metrics, "sdgen_process_rss_peak_bytes", w, "").unwrap() > 0, "{metrics}");
        assert!(
            worker_sample(&metrics, "sdgen_weight_loads_total", w, ",component=\"unet\"").unwrap() >= 1,
            "{metrics}"
        );
    }
    let memory = server.get("/v1/memory").json();
    let workers = memory["workers"].as_array().unwrap();
    assert_eq!(workers.iter().map(|w| w["name"].as_str().unwrap()).collect::<Vec<_>>(), ["w1", "w2"], "{memory}");
    assert!(workers.iter().all(|w| w["memory"]["process_rss_bytes"].as_u64().unwrap() > 0), "{memory}");
    assert!(workers.iter().all(|w| w["warm"]["bytes"].as_u64().is_some()), "{memory}");

    // A killed worker drops out once its heartbeat expires (its --claim-idle, 1 s).
    w1.kill();
    let metrics = metrics_when(&server, |m| m.lines().any(|l| l == "sdgen_workers 1"));
    assert!(metrics.lines().any(|l| l == "sdgen_workers 1"), "{metrics}");
    assert!(!metrics.contains("worker=\"w1\""), "{metrics}");
    assert!(done(&metrics, "w2") > 0, "{metrics}");
    // One stopped cleanly leaves at once.
    let (status, log) = w2.terminate();
    assert!(status.success(), "{log}");
    let metrics = server.get("/metrics").text();
    assert!(metrics.lines().any(|l| l == "sdgen_workers 0") && !metrics.contains("worker=\""), "{metrics}");
    assert_eq!(server.get("/v1/memory").json()["workers"], json!([]));
}

/// A1111's `/progress` with two workers running a job each and one queued: its one current job
/// is the longest-running, `job_count` counts all three, and `running` lists both running jobs
/// with their workers and their own progress; `interrupt` stops the current one only.
#[test]
fn a1111_progress_reports_every_workers_job() {
    let redis = Redis::start();
    let server = broker_server(&redis, &[]);
    let (_w1, _w2) = (Worker::start(&redis, "w1"), Worker::start(&redis, "w2"));
    let ids: Vec<String> = (0..3).map(|_| submit(&server, LONG)).collect();
    for id in &ids[..2] {
        wait_for(&server, id, |j| j["progress"]["step"].as_u64().unwrap_or(0) > 0);
    }
    assert_eq!(server.get(&format!("/v1/jobs/{}", ids[2])).json()["state"], "queued");
    let p = server.get("/sdapi/v1/progress").json();
    assert_eq!(p["state"]["job_count"], 3, "{p}");
    let running = p["running"].as_array().unwrap();
    let mut jobs: Vec<&str> = running.iter().map(|r| r["job"].as_str().unwrap()).collect();
    let mut workers: Vec<&str> = running.iter().map(|r| r["worker"].as_str().unwrap()).collect();
    jobs.sort();
    workers.sort();
    assert_eq!((jobs, workers), (vec![ids[0].as_str(), ids[1].as_str()], vec!["w1", "w2"]), "{p}");
    assert!(running.iter().all(|r| r["sampling_step"].as_u64().unwrap() > 0 && r["sampling_steps"] == 150), "{p}");
    // The current job is the first listed, the one started first.
    let current = p["state"]["job"].as_str().unwrap().to_string();
    assert_eq!(running[0]["job"], current.as_str(), "{p}");
    let other = if current == ids[0] { &ids[1] } else { &ids[0] };

    // Interrupt stops the current job; the other worker's goes on, and the queued one takes the
    // freed worker.
    assert_eq!(server.post("/sdapi/v1/interrupt", "").status, 200);
    assert_eq!(ended(&server, &current)["state"], "cancelled");
    wait_for(&server, &ids[2], |j| j["progress"]["step"].as_u64().unwrap_or(0) > 0);
    assert_eq!(server.get(&format!("/v1/jobs/{other}")).json()["state"], "running");
    let p = server.get("/sdapi/v1/progress").json();
    assert_eq!(p["state"]["job_count"], 2, "{p}");
    assert_eq!(p["state"]["job"], other.as_str(), "the longest-running is current now: {p}");
    for id in [other, &ids[2]] {
        server.call("DELETE", &format!("/v1/jobs/{id}"), None);
        assert_eq!(ended(&server, id)["state"], "cancelled");
    }
    let p = server.get("/sdapi/v1/progress").json();
    assert_eq!((p["state"]["job_count"].as_u64(), p["running"].as_array().map(Vec::len)), (Some(0), Some(0)), "{p}");
}
