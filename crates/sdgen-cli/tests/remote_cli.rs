//! `generate --remote`: the real `generate` against the real `sdgen-server` on the tiny SD 1.5
//! model — the same files as a local run, the server's refusals as the command line's exit codes.
//!
//! The server binary is the one `cargo test --workspace` (the README's and CI's command) builds
//! beside `generate` in the same target folder: `CARGO_BIN_EXE_*` names only this package's
//! binaries, and a binary-only package cannot be a dependency. Run alone
//! (`cargo test -p sdgen-cli --test remote_cli`), build it first: `cargo build -p sdgen-server`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{files_in, stderr, testdata, tiny_model};

/// `sdgen-server` beside `generate`.
fn server_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_generate"))
        .with_file_name(format!("sdgen-server{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: `cargo test --workspace` builds it, or `cargo build -p sdgen-server`",
        path.display()
    );
    path
}

/// A running `sdgen-server --model <tiny SD 1.5> ARGS` on a free port, killed when dropped.
struct Server {
    child: Child,
    url: String,
    _home: tempfile::TempDir,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let home = tempfile::tempdir().unwrap();
        let mut child = Command::new(server_binary())
            .args(["--listen", "127.0.0.1:0", "--model", &tiny_model()])
            .args(args)
            .env("HF_HOME", home.path().join("hf-home"))
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_HUB_CACHE")
            .env_remove("SDGEN_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sdgen-server starts");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("sdgen-server listening on ").unwrap_or_else(|| panic!("{line}"));
        let url = addr.to_string();
        // Drain stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || stderr.lines().map_while(Result::ok).for_each(drop));
        Server { child, url, _home: home }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `generate ARGS --output OUT`, the hub never reached, no API key from the environment unless
/// `env` sets one.
fn generate(args: &[&str], out: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_generate"));
    cmd.args(args)
        .arg("--output")
        .arg(out)
        .env("HF_HOME", out.with_extension("hf-home"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_HUB_CACHE")
        .env_remove("SDGEN_API_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("generate runs")
}

fn sidecar(png: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(png.with_extension("json")).unwrap()).unwrap()
}

/// The exit code, a message with each of `needles`, and no file written.
fn assert_fails(o: &Output, code: i32, out: &Path, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(o.stdout.is_empty(), "stdout must stay empty on errors");
    assert!(!out.exists(), "files written: {:?}", files_in(out));
}

#[test]
fn a_remote_run_writes_the_local_runs_png_with_a_sidecar_saying_where_it_ran() {
    let server = Server::start(&[]);
    let tiny = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let args =
        ["a red cube", "--model", &tiny, "--seed", "7", "--steps", "3", "-W", "64", "-H", "64", "--scheduler", "euler"];
    let (local, remote) = (dir.path().join("local"), dir.path().join("remote"));
    let o = generate(&args, &local, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = generate(&[&args[..], &["--remote", &server.url, "--json"]].concat(), &remote, &[]);
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    // Progress as a local run shows it.
    common::assert_in_order(&log, &["sent to", "→ unet", "step 3/3", "✓ unet done", "Saved "]);

    let png = |dir: &Path| files_in(dir).into_iter().find(|p| p.extension().is_some_and(|e| e == "png")).unwrap();
    let (local_png, remote_png) = (&png(&local), &png(&remote));
    assert!(std::fs::read(local_png).unwrap() == std::fs::read(remote_png).unwrap(), "the PNGs differ");
    // Named as a local run names it: <time>_<seed>_<prompt>.png.
    let name = remote_png.file_name().unwrap().to_str().unwrap();
    assert!(name.ends_with("_7_a-red-cube.png"), "{name}");
    let (l, r) = (sidecar(local_png), sidecar(remote_png));
    for field in ["model", "pipeline_type", "prompt", "seed", "steps", "guidance", "scheduler", "width", "height"] {
        assert_eq!(l[field], r[field], "{field}");
    }
    assert_eq!(r["extra"]["remote"]["url"], server.url.as_str());
    assert!(r["extra"]["remote"]["job"].as_str().unwrap().starts_with("job-"), "{r}");
    assert!(l["extra"].get("remote").is_none());
    let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(result["images"][0]["png"], remote_png.to_str().unwrap());
    assert_eq!((result["steps"].as_u64(), result["width"].as_u64()), (Some(3), Some(64)));

    // Several images, batched, to a file name: the same files as a local run, image by image.
    let args = ["a cat", "--model", &tiny, "--seed", "3", "--steps", "2", "-W", "64", "-H", "64", "-n", "2"];
    let (local, remote) = (dir.path().join("l2/cat.png"), dir.path().join("r2/cat.png"));
    assert!(generate(&[&args[..], &["--batch-size", "2"]].concat(), &local, &[]).status.success());
    let o = generate(&[&args[..], &["--batch-size", "2", "--remote", &server.url]].concat(), &remote, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for i in 1..=4 {
        let name = format!("cat-{i}.png");
        let (l, r) = (local.with_file_name(&name), remote.with_file_name(&name));
        assert!(std::fs::read(&l).unwrap() == std::fs::read(&r).unwrap(), "{name} differs");
        assert_eq!(sidecar(&r)["seed"], 2 + i);
    }
}

/// `--upscale 2` with a LoRA, and a prompt file: the server (started allowing the LoRA) makes
/// the same PNGs, byte for byte, as a local run.
#[test]
fn upscaling_a_lora_quantised_weights_and_a_prompt_file_travel() {
    let lora = testdata().join("lora/sd15_kohya.safetensors").display().to_string();
    let server = Server::start(&["--extra-lora", &lora]);
    let tiny = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a cat\n\na dog\n").unwrap();
    let lora_arg = format!("{lora}:0.8");
    let args = [
        "--prompt-file",
        prompts.to_str().unwrap(),
        "--model",
        &tiny,
        "--seed",
        "4",
        "--steps",
        "2",
        "-W",
        "64",
        "-H",
        "64",
        "--upscale",
        "2",
        "--hires-strength",
        "0.5",
        "--lora",
        &lora_arg,
        "--weights",
        "q8",
    ];
    let (local, remote) = (dir.path().join("local"), dir.path().join("remote"));
    let o = generate(&args, &local, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = generate(&[&args[..], &["--remote", &server.url]].concat(), &remote, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pngs = |dir: &Path| {
        let mut all: Vec<PathBuf> =
            files_in(dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "png")).collect();
        all.sort_by_key(|p| sidecar(p)["seed"].as_u64());
        all
    };
    let (l, r) = (pngs(&local), pngs(&remote));
    assert_eq!((l.len(), r.len()), (2, 2), "{l:?} {r:?}");
    for (l, r) in l.iter().zip(&r) {
        assert!(std::fs::read(l).unwrap() == std::fs::read(r).unwrap(), "{} differs", r.display());
        let meta = sidecar(r);
        assert_eq!((meta["width"].as_u64(), meta["height"].as_u64()), (Some(128), Some(128)));
        assert_eq!(meta["extra"]["loras"][0]["scale"], 0.8);
        assert_eq!(meta["extra"]["weights"], "q8");
    }
    assert_eq!([sidecar(&r[0])["prompt"].as_str(), sidecar(&r[1])["prompt"].as_str()], [Some("a cat"), Some("a dog")]);
}

#[test]
fn bad_flags_exit_2_with_nothing_sent_or_written() {
    let server = Server::start(&[]);
    let tiny = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run_model = |model: &str, extra: &[&str]| {
        let base = ["a cat", "--model", model, "--steps", "2", "--remote", &server.url];
        generate(&[&base[..], extra].concat(), &out, &[])
    };
    let run = |extra: &[&str]| run_model(&tiny, extra);
    // Refused here, as locally.
    assert_fails(&run(&["--strength", "0.5"]), 2, &out, &["--strength needs --init-image"]);
    assert_fails(&run(&["--steps", "0"]), 2, &out, &["--steps"]);
    assert_fails(&run(&["--check"]), 2, &out, &["--check does not apply with --remote"]);
    // A VAE or LoRA path the server was not started with is never opened there.
    assert_fails(&run(&["--vae", "/somewhere/vae"]), 2, &out, &["--vae `/somewhere/vae` is not a VAE this server"]);
    let lora = ["--lora", "/somewhere/lora.safetensors"];
    assert_fails(&run(&lora), 2, &out, &["--lora `/somewhere/lora.safetensors` is not a LoRA this server"]);
    // Refused by the server, named as the flag.
    assert_fails(&run(&["-W", "100", "-H", "64"]), 2, &out, &["refused the job", "--width 100"]);
    // Every field the server's message names (the engine's references) as the flag.
    let init = testdata().join("reference/sd15/img2img_init.png");
    let strength = ["--init-image", init.to_str().unwrap(), "--strength", "0.1"];
    assert_fails(&run(&strength), 2, &out, &["refused the job", "--strength 0.1", "raise --strength or --steps"]);
    let o = run_model("/somewhere/else", &[]);
    assert_fails(&o, 2, &out, &["--model `/somewhere/else` is not a model this server serves"]);
    let init = testdata().join("does-not-exist.png");
    assert_fails(&run(&["--init-image", init.to_str().unwrap()]), 2, &out, &["--init-image"]);
}

#[test]
fn a_missing_or_wrong_api_key_exits_2_and_the_right_one_runs() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let tiny = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args = ["a cat", "--model", &tiny, "--steps", "2", "-W", "64", "-H", "64", "--remote", &server.url];
    assert_fails(&generate(&args, &out, &[]), 2, &out, &["needs an API key", "--api-key"]);
    let wrong = [&args[..], &["--api-key", "guess"]].concat();
    assert_fails(&generate(&wrong, &out, &[]), 2, &out, &["refused the API key"]);
    let o = generate(&args, &out, &[("SDGEN_API_KEY", "s3cret")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files_in(&out).len(), 2);
}

#[test]
fn an_unreachable_server_exits_1_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = generate(&["a cat", "--steps", "2", "--remote", "http://127.0.0.1:9"], &out, &[]);
    assert_fails(&o, 1, &out, &["cannot reach the server at http://127.0.0.1:9"]);
}

#[test]
fn a_job_too_big_for_the_servers_memory_exits_2_with_the_planners_numbers() {
    let server = Server::start(&["--max-memory", "1MB"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = generate(&["a cat", "--steps", "2", "--remote", &server.url], &out, &[]);
    assert_fails(&o, 2, &out, &["refused the job", "does not fit this server's memory", "MB"]);
}

/// `generate --remote URL` of a long job (150 steps × 16 images) in the background, its stderr
/// read until a line has `until`: the child, and a thread collecting the rest of its stderr.
fn long_remote_job(url: &str, out: &Path, until: &str) -> (Child, std::thread::JoinHandle<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(["a cat", "--model", &tiny_model(), "--steps", "150", "-n", "16", "-W", "64", "-H", "64"])
        .args(["--remote", url, "--output"])
        .arg(out)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("SDGEN_API_KEY")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok);
    let mut log = String::new();
    for line in lines.by_ref() {
        log += &(line.clone() + "\n");
        if line.contains(until) {
            // The rest is read on, so the child never blocks on a full pipe.
            return (child, std::thread::spawn(move || log + &lines.map(|l| l + "\n").collect::<String>()));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("`{until}` never came: {log}");
}

#[test]
fn a_full_queue_is_waited_out_a_few_times_then_exits_1() {
    let server = Server::start(&["--queue-size", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let (mut running, _) = long_remote_job(&server.url, &dir.path().join("a"), "step 10/150");
    let (mut queued, _) = long_remote_job(&server.url, &dir.path().join("b"), "Queued behind 1 job");
    let out = dir.path().join("out");
    let o = generate(&["a cat", "--model", &tiny_model(), "--steps", "2", "--remote", &server.url], &out, &[]);
    // Three waits of the server's Retry-After (5 s), then the fourth refusal ends it.
    assert_fails(&o, 1, &out, &["busy (the queue is full", "trying again in 5s", "tried 4 times"]);
    assert_eq!(stderr(&o).matches("trying again").count(), 3);
    for child in [&mut running, &mut queued] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(unix)]
#[test]
fn ctrl_c_cancels_the_job_on_the_server_and_exits_130() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (mut child, log) = long_remote_job(&server.url, &dir.path().join("out"), "step 10/150");
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let log = log.join().unwrap();
    assert_eq!(status.code(), Some(130), "{log}");
    common::assert_in_order(&log, &["step 10/150", "Cancelling job job-", "Interrupted: job job-"]);
}

/// The server's warnings (the engine's, naming fields) show with the flags, as a local run's.
#[test]
fn a_servers_warnings_name_the_flags() {
    let model = testdata().join("tiny-sd35-medium-no-t5").display().to_string();
    let server = Server::start(&["--extra-model", &model]);
    let dir = tempfile::tempdir().unwrap();
    let args = ["a cat", "--model", &model, "--steps", "1", "-W", "64", "-H", "64", "--remote", &server.url];
    let o = generate(&args, &dir.path().join("out"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("the prompt is read by the other encoders only (as --no-t5)"), "{}", stderr(&o));
}
