//! `sdgen-server`: the SD-Generate engine behind HTTP (SPEC §4). Models stay open between jobs
//! on one worker thread that runs one job at a time; requests are checked (fields, caps, the
//! memory plan) before they are queued in a bounded queue; the A1111-compatible subset and the
//! server's own job API (progress events, cancellation) share that queue. With `--broker` the
//! queue is a Redis Stream and the jobs run in `sdgen-server --worker` processes.

mod a1111;
#[cfg(test)]
mod decode_fuzz;
mod error;
mod fields;
mod jobs;
mod metrics;
mod preflight;
mod queue;
mod redis_broker;
mod request;
mod routes;
mod web;
mod worker;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use sdgen::candle::DType;
use sdgen::engine::EngineConfig;
use sdgen::pipeline::Runtime;

use jobs::Broker;
use queue::Queue;
use redis_broker::{redacted, Heartbeat, RedisBroker, RedisSource, WorkerStats};
use request::{Limits, ModelPolicy};
use routes::AppState;

/// `--job-timeout`'s default, in seconds: SDXL at 1024² takes seconds a job on a GPU and tens of
/// minutes on a CPU; an hour stops only what is stuck or far too big.
const DEFAULT_JOB_TIMEOUT_S: f64 = 3600.0;

/// Serve Stable Diffusion over HTTP: an A1111-compatible API and a job API with progress events.
#[derive(Debug, Parser)]
#[command(name = "sdgen-server", version, about)]
struct Args {
    /// Address to listen on (127.0.0.1 only, unless this says otherwise; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7860")]
    listen: SocketAddr,
    /// The default model: a named model (sdxl, sd15, …), a hub repo id or a local folder or
    /// checkpoint (which requests may then name).
    #[arg(short = 'm', long, default_value = sdgen::loading::DEFAULT_MODEL)]
    model: String,
    /// More local models requests may name (folders or checkpoints); hub models need no listing.
    #[arg(long, value_name = "PATH")]
    extra_model: Vec<String>,
    /// Local VAE folders requests may name as `vae` (hub repositories need no listing).
    #[arg(long, value_name = "PATH")]
    extra_vae: Vec<String>,
    /// Local LoRA files requests may name in `loras` (hub repositories need no listing).
    #[arg(long, value_name = "PATH")]
    extra_lora: Vec<String>,
    /// Bearer token every request but /healthz must carry (also: SDGEN_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, f16 or bf16 (f32 on the CPU, bf16 on GPUs by default).
    #[arg(long)]
    dtype: Option<String>,
    /// Memory jobs may use, e.g. 8GB (default: what is free).
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<String>,
    /// Use only the local Hugging Face cache.
    #[arg(long)]
    offline: bool,
    /// Threads for the work done on the CPU (default: every core, or RAYON_NUM_THREADS).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Jobs that may wait for the worker; more get 503.
    #[arg(long, default_value_t = 16)]
    queue_size: usize,
    /// Finished jobs kept for GET /v1/jobs/{id}, with their PNGs in memory (the oldest are
    /// forgotten first).
    #[arg(long, default_value_t = 32)]
    keep_jobs: usize,
    /// Largest request body in bytes (base64 init images count).
    #[arg(long, default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Widest image a request may ask for.
    #[arg(long, default_value_t = 2048)]
    max_width: usize,
    /// Tallest image a request may ask for.
    #[arg(long, default_value_t = 2048)]
    max_height: usize,
    /// Most denoising steps a request may ask for.
    #[arg(long, default_value_t = 150)]
    max_steps: usize,
    /// Most images one request may ask for.
    #[arg(long, default_value_t = 16)]
    max_images: usize,
    /// The longest a job may run on a worker, in seconds (default 3600; 0: no limit): past it,
    /// the job is stopped and reported failed (its finished images stay). Set on the server; a
    /// broker's workers keep the limit the job carries.
    #[arg(long, value_name = "SECS", conflicts_with = "worker")]
    job_timeout: Option<f64>,
    /// Queue jobs on this Redis (redis://HOST:PORT[/DB]) for `--worker` processes to run,
    /// instead of in this process.
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Run the --broker's jobs (no HTTP: the flags about requests do not apply; --device,
    /// --dtype, --offline and --max-memory do): any number of workers, on any machines that see
    /// the same model paths (or hub cache).
    #[arg(long, requires = "broker")]
    worker: bool,
    /// A worker's name in the broker's consumer group (default: host-pid).
    #[arg(long, value_name = "NAME", requires = "worker")]
    worker_name: Option<String>,
    /// Seconds a running job's worker may go silent (its keep-alive comes every quarter of
    /// this) before another worker takes the job over and runs it again.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, requires = "worker")]
    claim_idle: f64,
    /// Drop each stage's weights when it ends instead of keeping them loaded for the next jobs
    /// (by default they stay while the memory plan of each job has room for them, and the least
    /// recently used are evicted when a job needs it); the loads are still counted.
    #[arg(long)]
    no_keep_warm: bool,
}

/// `value` seconds as a duration: finite and not negative, or an error naming `flag`.
fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| anyhow::anyhow!("{flag} {value} is not a number of seconds"))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", err.chain().map(|e| e.to_string()).collect::<Vec<_>>().join(": "));
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(threads) = args.threads {
        sdgen::kernels::set_cpu_threads(threads).map_err(|e| anyhow::anyhow!("--threads {threads}: {e}"))?;
    }
    let (device, device_label) = sdgen::engine::open_device(&args.device)
        .map_err(|e| anyhow::anyhow!(e.describe(&|f| (f == "device").then_some("--device"))))?;
    let dtype = match args.dtype.as_deref() {
        None if device.is_cpu() => DType::F32,
        None => DType::BF16,
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some(other) => bail!("--dtype {other} is not one of f32, f16, bf16"),
    };
    sdgen::engine::check_dtype(&device, dtype)
        .map_err(|e| anyhow::anyhow!(e.describe(&|f| (f == "dtype").then_some("--dtype"))))?;
    let max_memory_bytes = args
        .max_memory
        .as_deref()
        .map(sdgen_memory::plan::parse_memory_size)
        .transpose()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut engine = EngineConfig::new(Runtime::new(device, dtype), device_label.clone());
    engine.hub.offline |= args.offline;
    engine.warm = Some(match args.no_keep_warm {
        false => sdgen::engine::WarmWeights::new(),
        true => sdgen::engine::WarmWeights::counting_only(),
    });
    if dtype != DType::F32 && engine.hub.variant.is_none() {
        engine.hub.variant = Some("fp16".to_string());
    }
    if args.worker {
        return run_worker(&args, engine, &device_label, max_memory_bytes);
    }
    let timeout = seconds(args.job_timeout.unwrap_or(DEFAULT_JOB_TIMEOUT_S), "--job-timeout")?;
    let mut paths = args.extra_model.clone();
    if std::path::Path::new(&args.model).exists() {
        paths.insert(0, args.model.clone());
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let (capacity, keep) = (args.queue_size.max(1), args.keep_jobs.max(1));
    let (queue, worker): (Arc<dyn Broker>, _) = match &args.broker {
        // The jobs and their warm weights are the workers'.
        Some(url) => {
            engine.warm = None;
            (RedisBroker::connect(url, capacity, keep, metrics.clone())?, None)
        }
        None => {
            let queue = Arc::new(Queue::new(capacity, keep, metrics.clone()));
            (queue.clone(), Some(worker::spawn(engine.clone(), queue)))
        }
    };
    let state = Arc::new(AppState {
        queue: queue.clone(),
        metrics: metrics.clone(),
        warm: engine.warm.clone(),
        preflight: Arc::new(preflight::Preflight::new(engine.clone())),
        limits: Limits {
            max_width: args.max_width,
            max_height: args.max_height,
            max_steps: args.max_steps,
            max_images: args.max_images,
        },
        models: ModelPolicy { paths, vaes: args.extra_vae.clone(), loras: args.extra_lora.clone() },
        default_model: RwLock::new(args.model.clone()),
        api_key: args.api_key.clone().or_else(|| std::env::var("SDGEN_API_KEY").ok()).filter(|k| !k.is_empty()),
        max_memory_bytes,
        job_timeout_ms: (!timeout.is_zero()).then_some(timeout.as_millis() as u64),
        max_body_bytes: args.max_body_bytes,
        device_label,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        // The tests read the address (with the port chosen) from this line.
        eprintln!("sdgen-server listening on http://{}", listener.local_addr()?);
        if let Some(url) = &args.broker {
            eprintln!("sdgen-server: jobs go to the broker at {} (run them with sdgen-server --worker)", redacted(url));
        }
        let app = routes::router(state);
        let shutdown_queue = queue.clone();
        let broker = args.broker.is_some();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                let jobs = if broker {
                    "leaving the queued and running ones to the broker's workers"
                } else {
                    "cancelling the queued and running ones"
                };
                eprintln!("sdgen-server: shutting down: refusing new jobs, {jobs}");
                // Every job ends now (the running one at its next step) — or, with a broker, is
                // left to its workers — so every open event stream and waiting A1111 request
                // finishes and the server can stop.
                shutdown_queue.close();
            })
            .await
            .context("serving")
    })?;
    queue.close();
    if let Some(worker) = worker {
        worker.join().map_err(|_| anyhow::anyhow!("the worker thread panicked"))?;
    }
    eprintln!("sdgen-server: stopped");
    Ok(())
}

/// `--worker`: runs the broker's jobs until SIGINT/SIGTERM, which lets the running job finish (a
/// second one stops at once; the job is then taken over by another worker).
fn run_worker(args: &Args, engine: EngineConfig, device: &str, max_memory_bytes: Option<u64>) -> anyhow::Result<()> {
    let url = args.broker.as_deref().context("--worker needs --broker redis://HOST:PORT[/DB]")?;
    let claim_idle = seconds(args.claim_idle, "--claim-idle")?;
    if claim_idle < Duration::from_millis(400) {
        bail!(
            "--claim-idle {} is too short: a worker refreshes its claim every quarter of it (give 1 or more)",
            args.claim_idle
        );
    }
    let name = args.worker_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "worker".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(WorkerStats::new(&name, device, max_memory_bytes, engine.warm.clone()));
    let source = RedisSource::connect(url, name.clone(), claim_idle, max_memory_bytes, stop.clone(), stats.clone())?;
    // Its counts and memory for the servers' /metrics, alive as long as a job's claim.
    let heartbeat = Heartbeat::start(source.client().clone(), stats, claim_idle)?;
    // The tests wait for this line.
    eprintln!("sdgen-server worker {name} taking jobs from {}", redacted(url));
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a signal runtime");
        runtime.block_on(shutdown_signal());
        eprintln!("sdgen-server worker: stopping after the running job (again to stop now)");
        stop.store(true, Ordering::Relaxed);
        runtime.block_on(shutdown_signal());
        std::process::exit(130);
    });
    worker::serve(engine, &source);
    heartbeat.retire();
    eprintln!("sdgen-server worker {name}: stopped");
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
