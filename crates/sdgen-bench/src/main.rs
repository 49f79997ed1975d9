//! `sdgen-bench`: runs a family at its real size with seeded random weights (written once into a
//! model folder, with the tensor manifest the planner reads) on a device and dtype, and prints
//! per-stage time and memory as one JSON document on stdout. Separate from `generate`, so no
//! prompt is ever mistaken for a command.

mod random_model;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Parser;
use sdgen::device_memory::DeviceMemory;
use sdgen::loading::ModelFolder;
use sdgen::pipeline::{txt2img, Request, Runtime};

/// Benchmark a model family at full size with random weights.
#[derive(Debug, Parser)]
#[command(name = "sdgen-bench", version, about)]
struct Args {
    /// Model family (sd15).
    #[arg(long, default_value = "sd15")]
    family: String,
    /// Folder for the random-weight model (reused when it exists).
    #[arg(long, default_value = "bench-models/sd15")]
    model_dir: PathBuf,
    /// Image width.
    #[arg(long, default_value_t = 512)]
    width: usize,
    /// Image height.
    #[arg(long, default_value_t = 512)]
    height: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Images per run.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed runs after one warm-up run (2 steps).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seed of the weights and the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn request_for(args: &Args, steps: usize) -> Request {
    Request {
        prompt: "a lighthouse at dusk".into(),
        n: args.n,
        seed: args.seed,
        steps: Some(steps),
        width: Some(args.width),
        height: Some(args.height),
        ..Default::default()
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.family != "sd15" {
        bail!("--family {}: only sd15 is implemented", args.family);
    }
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        d if d.starts_with("cuda") => {
            Device::new_cuda(d.strip_prefix("cuda:").map(str::parse).transpose()?.unwrap_or(0))
                .context("CUDA device")?
        }
        d => bail!("--device {d}: cpu or cuda[:N]"),
    };
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        d => bail!("--dtype {d}: f32, f16 or bf16"),
    };
    let _memory = DeviceMemory::install(&device);
    let t0 = Instant::now();
    let written = random_model::write_sd15(&args.model_dir, dtype, &device, args.seed)?;
    let write_ms = t0.elapsed().as_secs_f64() * 1e3;
    // The writer's buffers are freed: give them back so the runs start from a clean baseline.
    sdgen_memory::cleanup_memory(false);
    let model = ModelFolder::open(&args.model_dir)?;
    let weights: serde_json::Map<String, serde_json::Value> = ["text_encoder", "unet", "vae"]
        .iter()
        .map(|c| Ok((c.to_string(), serde_json::json!(model.weights(c)?.weight_bytes()))))
        .collect::<anyhow::Result<_>>()?;
    // The planner's estimate for the same run, with all the memory there is (so it chooses no
    // options and its per-stage figures are the plain run's): measured peaks go beside it.
    let settings = sdgen::pipeline::resolve(&model, &request_for(&args, args.steps))?;
    let estimate = sdgen::planning::plan_run(
        &model,
        &settings,
        args.n,
        false,
        &device,
        dtype,
        sdgen::planning::MemoryRequest { max_memory_bytes: Some(1 << 50), ..Default::default() },
    )?;
    let rt = Runtime::new(device, dtype);
    let request = |steps: usize| request_for(&args, steps);
    let warm = Instant::now();
    txt2img(&model, &request(2), &rt, &mut |_| {})?;
    let warmup_ms = warm.elapsed().as_secs_f64() * 1e3;
    let mut runs = Vec::new();
    for _ in 0..args.runs {
        let start = Instant::now();
        let gen = txt2img(&model, &request(args.steps), &rt, &mut |_| {})?;
        let total_ms = start.elapsed().as_secs_f64() * 1e3;
        runs.push(serde_json::json!({
            "total_ms": total_ms,
            "timings_ms": gen.timings_ms,
            "denoise_ms_per_step": gen.timings_ms.get("unet").map(|ms| ms / gen.settings.steps.max(1) as f64),
            "memory": gen.memory,
        }));
    }
    let report = serde_json::json!({
        "family": args.family,
        "device": args.device,
        "dtype": args.dtype,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "n": args.n,
        "weights_bytes": weights,
        "weights_written_bytes": written,
        "model_write_ms": write_ms,
        "warmup_ms": warmup_ms,
        "runs": runs,
        "plan_estimate": estimate,
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
