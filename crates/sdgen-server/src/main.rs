//! `sdgen-server`: the SD-Generate engine behind HTTP (SPEC §4). Models stay open between jobs
//! on one worker thread that runs one job at a time; requests are checked (fields, caps, the
//! memory plan) before they are queued in a bounded queue; the A1111-compatible subset and the
//! server's own job API (progress events, cancellation) share that queue.

mod a1111;
mod error;
mod jobs;
mod metrics;
mod preflight;
mod request;
mod routes;
mod worker;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context};
use clap::Parser;
use sdgen::candle::DType;
use sdgen::engine::EngineConfig;
use sdgen::pipeline::Runtime;

use jobs::Queue;
use request::{Limits, ModelPolicy};
use routes::AppState;

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
    if dtype != DType::F32 && engine.hub.variant.is_none() {
        engine.hub.variant = Some("fp16".to_string());
    }
    let mut paths = args.extra_model.clone();
    if std::path::Path::new(&args.model).exists() {
        paths.insert(0, args.model.clone());
    }
    let queue = Arc::new(Queue::new(args.queue_size.max(1), args.keep_jobs.max(1)));
    let metrics = Arc::new(metrics::Metrics::default());
    let state = Arc::new(AppState {
        queue: queue.clone(),
        metrics: metrics.clone(),
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
        max_body_bytes: args.max_body_bytes,
        device_label,
    });
    let worker = worker::spawn(engine, queue.clone(), metrics);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        // The tests read the address (with the port chosen) from this line.
        eprintln!("sdgen-server listening on http://{}", listener.local_addr()?);
        let app = routes::router(state);
        let shutdown_queue = queue.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("sdgen-server: shutting down: refusing new jobs, cancelling the queued and running ones");
                // Every job ends now (the running one at its next step), so every open event
                // stream and waiting A1111 request finishes and the server can stop.
                shutdown_queue.close();
            })
            .await
            .context("serving")
    })?;
    queue.close();
    worker.join().map_err(|_| anyhow::anyhow!("the worker thread panicked"))?;
    eprintln!("sdgen-server: stopped");
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
