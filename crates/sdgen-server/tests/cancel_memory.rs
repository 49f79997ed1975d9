//! Cancelling a running job returns its memory and leaves no files: on the real server, a job
//! large enough that its working memory stands far above the noise is cancelled mid-batch; the
//! process's resident memory (`/v1/memory`) comes back near its level before the job, and
//! nothing is left in the server's working directory, its temporary directory or its hub home.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{wait_for, Server};

/// How far above the pre-job level the resident memory may stay after the cancel: the
/// allocator's retained free lists and the job's own record (its events; it has no images), a
/// few MB — against the ≥ 4× this the job is checked to hold while it runs.
const TOLERANCE_BYTES: u64 = 16 << 20;

/// 256² in batches of 4 on the tiny SD 1.5 with candle's stock kernels (below), whose attention
/// builds whole score matrices: ~300 MB above the floor while the UNet runs, and 150 steps of
/// seconds each — long enough to be caught running.
const BIG: &str =
    r#"{"prompt": "a cat", "seed": 1, "steps": 150, "n": 8, "batch_size": 4, "width": 256, "height": 256}"#;

fn rss(server: &Server) -> u64 {
    server.get("/v1/memory").json()["memory"]["process_rss_bytes"].as_u64().unwrap()
}

/// Every file under `dir`, relative.
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                found.insert(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    found
}

fn submit(server: &Server, body: &str) -> String {
    let r = server.post("/v1/jobs", body);
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

#[test]
fn cancelling_a_running_job_returns_its_memory_and_leaves_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let (tmp, hf) = (dir.path().join("tmp"), dir.path().join("hf-home"));
    std::fs::create_dir_all(&tmp).unwrap();
    let env = [("TMPDIR", tmp.to_str().unwrap()), ("HF_HOME", hf.to_str().unwrap())];
    // Our CPU kernels never hold much (blocked attention): the tiny model's job would hold too
    // little for its return to be told from the noise.
    let env = [env[0], env[1], ("SDGEN_NO_FAST_KERNELS", "1")];
    // One malloc arena: with the model's weights kept warm (the server's default) in the
    // worker's thread arena, glibc cannot shrink that arena's heap below them, and in about
    // two runs of five it kept 13–19 MB of the job's freed pages mapped after the cancel (the
    // same with the warm weights dropped afterwards; never with --no-keep-warm, nor with one
    // arena, where the memory comes back to within 0.3 MB). This test is about what the job
    // frees, not about glibc's arenas.
    let env = [env[0], env[1], env[2], ("MALLOC_ARENA_MAX", "1")];
    let server = Server::start_in(Some(dir.path()), &[], &env);

    // The pre-job level: after one short job, so the model is open and the allocator and
    // thread pools are as a served job leaves them.
    let warm = submit(
        &server,
        r#"{"prompt": "a cat", "seed": 1, "steps": 1, "n": 4, "batch_size": 4, "width": 64, "height": 64}"#,
    );
    assert_eq!(wait_for(&server, &warm, |j| j["state"] != "queued" && j["state"] != "running")["state"], "done");
    let files_before = files(dir.path());
    let before = rss(&server);

    let id = submit(&server, BIG);
    wait_for(&server, &id, |j| j["progress"]["step"].as_u64().unwrap_or(0) >= 1);
    // Sampled through a step: its attention's score matrices come and go.
    let during = (0..40)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            rss(&server)
        })
        .max()
        .unwrap();
    let r = server.call("DELETE", &format!("/v1/jobs/{id}"), None);
    assert_eq!(r.status, 202, "{}", r.text());
    let job = wait_for(&server, &id, |j| j["state"] != "running");
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(job["images"].as_array().unwrap().len(), 0, "cancelled in its first batch: {job}");
    // Read until it is back, for up to 3 s: on a loaded machine the allocator's trim and the
    // threads' exit can trail the cancelled state by a moment; memory that stays is a leak.
    let mut after = rss(&server);
    for _ in 0..30 {
        if after <= before + TOLERANCE_BYTES {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        after = after.min(rss(&server));
    }

    let mb = |b: u64| b as f64 / 1e6;
    eprintln!(
        "RSS before the job {:.1} MB, while it ran {:.1} MB, after the cancel {:.1} MB (tolerance {:.1} MB)",
        mb(before),
        mb(during),
        mb(after),
        mb(TOLERANCE_BYTES)
    );
    // The job held memory the check could see kept…
    assert!(during > before + 4 * TOLERANCE_BYTES, "the job never held much: {:.1} → {:.1} MB", mb(before), mb(during));
    // …and it was returned.
    assert!(
        after <= before + TOLERANCE_BYTES,
        "RSS {:.1} MB after the cancel, {:.1} MB before the job (tolerance {:.1} MB)",
        mb(after),
        mb(before),
        mb(TOLERANCE_BYTES)
    );
    assert_eq!(files(dir.path()), files_before, "the cancelled job left files");
    assert_eq!(server.get(&format!("/v1/jobs/{id}/images/0")).status, 404);
    // The worker is free: the next job runs.
    let next = submit(&server, r#"{"prompt": "a dog", "seed": 2, "steps": 1, "width": 64, "height": 64}"#);
    assert_eq!(wait_for(&server, &next, |j| j["state"] != "queued" && j["state"] != "running")["state"], "done");
}
