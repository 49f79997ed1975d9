//! `sdgen-bench`: runs a family at its real size with seeded random weights (written once into a
//! model folder, with the tensor manifest the planner reads) on a device and dtype, and prints
//! per-stage time and memory as one JSON document on stdout. Separate from `generate`, so no
//! prompt is ever mistaken for a command. `sd15` and `sdxl` run text-to-image (`sdxl --refiner`:
//! base and refiner as `generate --refiner` runs them); `sdxl-refiner` alone runs image-to-image
//! on a synthetic picture (see `sdxl.rs`).

mod components;
mod ops;
mod quantised;
mod random_model;
mod sd35_files;
mod sdxl;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Parser;
use sdgen::device_memory::DeviceMemory;
use sdgen::loading::family::Handoff;
use sdgen::loading::{FamilySpec, ModelFolder, OpenOptions, FAMILIES};
use sdgen::pipeline::{
    img2img, resolve_img2img, txt2img_refined, Generation, Progress, Refiner, Request, Runtime,
    DEFAULT_HIGH_NOISE_FRACTION,
};

/// Benchmark a model family at full size with random weights.
#[derive(Debug, Parser)]
#[command(name = "sdgen-bench", version, about)]
struct Args {
    /// Model family: sd15, sdxl, sdxl-refiner (an image-to-image run, as the refiner is used),
    /// sd35-large or sd35-medium.
    #[arg(long, default_value = "sd15")]
    family: String,
    /// Folder for the random-weight model (reused when it exists); bench-models/FAMILY by default.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Image width (the family's default when omitted: 512 for sd15, 1024 for SDXL).
    #[arg(long)]
    width: Option<usize>,
    /// Image height (the family's default when omitted).
    #[arg(long)]
    height: Option<usize>,
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
    /// Timed runs after one warm-up run (2 steps; the refiner alone: the fewest that leave one
    /// step to run at --strength).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seed of the weights and the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Score the UNet's attention this many query rows at a time (measures sliced runs).
    #[arg(long)]
    attention_slice: Option<usize>,
    /// Decode the batch's images one at a time.
    #[arg(long)]
    vae_slicing: bool,
    /// Decode in tiles of this many pixels.
    #[arg(long)]
    vae_tile: Option<usize>,
    /// sdxl-refiner: the image-to-image strength (diffusers' refiner default 0.3).
    #[arg(long, default_value_t = sdxl::REFINER_STRENGTH)]
    strength: f64,
    /// sdxl: finish each run with the SDXL refiner (base to the handoff point, refiner after it).
    #[arg(long)]
    refiner: bool,
    /// Folder for the random-weight refiner of --refiner; bench-models/sdxl-refiner by default.
    #[arg(long)]
    refiner_dir: Option<PathBuf>,
    /// With --refiner: the fraction of the schedule the base runs.
    #[arg(long, default_value_t = DEFAULT_HIGH_NOISE_FRACTION)]
    high_noise_fraction: f64,
    /// Write (or reuse) the model folder, check that it opens as the family, print its weight
    /// bytes and stop: prepares a folder without timing anything.
    #[arg(long)]
    write_only: bool,
    /// Time one component alone instead of whole runs: `unet` or `transformer` (SD 3.5's MMDiT,
    /// with 77 + 256 text tokens) (one evaluation of the CFG batch, 2·n rows) or `vae` (one decode of n latents), loaded once, inputs random, the device
    /// synchronised around each evaluation (the figures `peer_diffusers.py` reports); or `ops`:
    /// the kernel seam's linears, convolutions and attention alone at SD 1.5's shapes, no model
    /// (the figures `tools/cpu/peer_ops.py` reports); or `quantised`: one linear at SD 3.5
    /// Medium's shapes, dense and in GGML blocks, both ways of multiplying them (CPU).
    #[arg(long)]
    component: Option<String>,
    /// With --component: timed evaluations.
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// With --component transformer: the inputs from this safetensors file (`latents`,
    /// `timesteps`, `context`, `pooled`, as another framework drew them) instead of random ones.
    #[arg(long)]
    inputs: Option<std::path::PathBuf>,
    /// With --component transformer: write the last evaluation's output here (`output`, f32).
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
    /// With --component: untimed evaluations first (kernel loading, algorithm choice, pools).
    /// Whole runs: the steps of the untimed run before the timed ones (0: none, so a streamed
    /// run's weights are loaded and pinned once, not twice).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// With --component unet or transformer: stream the model's blocks, this many of them resident
    /// (the rest read per use: from the file on the CPU, from host copies on CUDA), as the
    /// planner's streaming rung runs it (`generate --check --max-memory …` prints its choice).
    #[arg(long)]
    resident_blocks: Option<usize>,
    /// Run the stock candle kernels instead of the fast ones (as `generate --no-fast-kernels`).
    #[arg(long)]
    no_fast_kernels: bool,
    /// Whole runs: plan them under this budget (as `generate --max-memory`, e.g. `4GB`) and run
    /// with the options the plan chose (block streaming, encoders on the host, slicing, tiling),
    /// so a budgeted run is timed with its loads apart.
    #[arg(long)]
    max_memory: Option<String>,
    /// Write the folder's denoiser as this quantised file and stop: `q8_0` (a Q8_0 GGUF in
    /// city96's layout, run with `generate --model FILE --config-from FOLDER`) or `fp8-scaled`
    /// (an fp8-scaled checkpoint in Stability's/ComfyUI's layout, its text encoders linked into
    /// `text_encoders/` beside it). SD 3.5 only. Needs --export-to.
    #[arg(long, requires = "export_to")]
    export: Option<String>,
    /// With --export: the file to write (its folder is created).
    #[arg(long, requires = "export")]
    export_to: Option<PathBuf>,
    /// Run this quantised file (a GGUF or an fp8 checkpoint, its configs from the folder) instead
    /// of the folder's weights: with --component transformer, also the relative L2 of its output
    /// against the folder's forward on the same inputs; whole runs, the file's model throughout.
    #[arg(long, conflicts_with = "weights")]
    weights_file: Option<PathBuf>,
    /// How quantised linear layers multiply (`kernel`: candle's MMQ/MMVQ; `dequantise`: the
    /// weight dequantised for the dense GEMM); the device's choice when absent.
    #[arg(long)]
    quantised_path: Option<String>,
    /// With --component transformer: quantise the folder's weights as they load (q8, fp8 or q4,
    /// as `generate --weights`), and report the relative L2 against the unquantised forward.
    #[arg(long)]
    weights: Option<String>,
}

/// Timestamps of one pipeline run's progress events, the device synchronised at each denoising
/// step so a step's time is its own work: each stage's weight-loading time apart from its
/// compute, and the time of every denoiser evaluation (one per reported step: PNDM's extra
/// evaluation is a step of its own).
struct RunClock {
    device: Device,
    start: Instant,
    stage: Option<(String, f64)>,
    loads_ms: serde_json::Map<String, serde_json::Value>,
    last_event_ms: f64,
    evaluations_ms: Vec<f64>,
    /// Steps seen since the current stage started.
    stage_steps: usize,
    /// Per stage with steps: from its last step to its end (dropping the model, returning memory).
    after_steps_ms: serde_json::Map<String, serde_json::Value>,
}

impl RunClock {
    fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            start: Instant::now(),
            stage: None,
            loads_ms: Default::default(),
            last_event_ms: 0.0,
            evaluations_ms: Vec::new(),
            stage_steps: 0,
            after_steps_ms: Default::default(),
        }
    }

    fn now_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    fn record(&mut self, event: &Progress) {
        match event {
            Progress::StageStart(name) => {
                self.stage = Some((name.to_string(), self.now_ms()));
                self.stage_steps = 0;
            }
            Progress::StageEnd { stage, .. } if self.stage_steps > 0 => {
                let _ = self.device.synchronize();
                self.after_steps_ms.insert(stage.to_string(), serde_json::json!(self.now_ms() - self.last_event_ms));
            }
            Progress::Memory { label, .. } if label.starts_with("After ") && label.ends_with(" load") => {
                let _ = self.device.synchronize();
                if let Some((stage, started)) = &self.stage {
                    self.loads_ms.insert(stage.clone(), serde_json::json!(self.now_ms() - started));
                }
            }
            Progress::Memory { label, .. } if *label == sdgen::pipeline::BEFORE_GENERATION => {
                let _ = self.device.synchronize();
                self.last_event_ms = self.now_ms();
            }
            Progress::Step { .. } => {
                let _ = self.device.synchronize();
                let now = self.now_ms();
                self.evaluations_ms.push(now - self.last_event_ms);
                self.last_event_ms = now;
                self.stage_steps += 1;
            }
            _ => {}
        }
    }

    /// Load times per stage, the evaluations' median (the first evaluation of a stage may carry
    /// one-time costs; the median is robust to it) and sum, and each denoising stage's time after
    /// its last step (its model's teardown): a stage's compute is its time less its load, so
    /// these say where the rest of it went.
    fn report(&self) -> serde_json::Value {
        let mut evals = self.evaluations_ms.clone();
        evals.sort_by(f64::total_cmp);
        serde_json::json!({
            "load_ms": self.loads_ms,
            "evaluations": evals.len(),
            "evaluation_median_ms": evals.get(evals.len() / 2),
            "evaluations_sum_ms": evals.iter().sum::<f64>(),
            "after_steps_ms": self.after_steps_ms,
            "evaluations_ms": self.evaluations_ms,
        })
    }
}

fn request_for(args: &Args, steps: usize) -> Request {
    Request {
        prompt: "a lighthouse at dusk".into(),
        n: args.n,
        seed: args.seed,
        steps: Some(steps),
        width: args.width,
        height: args.height,
        ..Default::default()
    }
}

/// A model folder written (or reused) and opened: the model, the weight bytes written, the
/// write's time and each component's weight bytes.
struct Prepared {
    model: ModelFolder,
    written_bytes: u64,
    write_ms: f64,
    weights: serde_json::Map<String, serde_json::Value>,
}

fn prepare(family: &str, dir: &Path, dtype: DType, device: &Device, seed: u64) -> anyhow::Result<Prepared> {
    let t0 = Instant::now();
    let written_bytes = random_model::write_model(family, dir, dtype, device, seed)?;
    let write_ms = t0.elapsed().as_secs_f64() * 1e3;
    // The writer's buffers are freed: give them back so the runs start from a clean baseline.
    sdgen_memory::cleanup_memory(false);
    let model = ModelFolder::open(dir)?;
    if model.family().name != family {
        bail!(
            "{} opens as family {}, not the {family} it was written for: a stale folder? remove it",
            dir.display(),
            model.family().name,
        );
    }
    let weights = weight_bytes(family, &model)?;
    Ok(Prepared { model, written_bytes, write_ms, weights })
}

/// Each weighted component's weight bytes as `model` holds them.
fn weight_bytes(family: &str, model: &ModelFolder) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    random_model::weighted_components(family)
        .into_iter()
        .map(|c| Ok((c.to_string(), serde_json::json!(model.weights(c)?.weight_bytes()))))
        .collect()
}

/// The planner's estimate as JSON, or why there is none (a family without a memory profile yet):
/// the benchmark's own figures stand without it.
fn estimate_json(estimate: sdgen::Result<sdgen_memory::plan::Plan>) -> anyhow::Result<serde_json::Value> {
    Ok(match estimate {
        // Its warning's fields as the engine names them (the bench has no flags for them).
        Ok(plan) => serde_json::to_value(sdgen::planning::named(plan, &|_| None))?,
        Err(e) => serde_json::json!({ "error": e.to_string(), "stages": [] }),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let families = random_model::families();
    if !families.contains(&args.family.as_str()) {
        bail!("--family {}: one of {}", args.family, families.join(", "));
    }
    // The row whose runs finish this family's from its latents, if any (SDXL's refiner for SDXL).
    let refiner_family = FAMILIES
        .iter()
        .find(|f| FamilySpec::by_name(&args.family).is_some_and(|base| f.handoff_from(base) == Some(Handoff::Latents)));
    if args.refiner && refiner_family.is_none() {
        bail!("--refiner finishes SDXL base runs; --family is {}", args.family);
    }
    // The refiner on its own runs image-to-image (`--refiner` is the base's, text-to-image).
    let refiner_alone = FamilySpec::by_name(&args.family).is_some_and(|f| !f.refines.is_empty());
    let model_dir = args.model_dir.clone().unwrap_or_else(|| PathBuf::from("bench-models").join(&args.family));
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
    if args.no_fast_kernels {
        sdgen_models::ops::set_fast_kernels(false);
    }
    if let Some(path) = &args.quantised_path {
        use sdgen_models::ops::linear::{set_quantised_path, QuantisedPath};
        set_quantised_path(Some(match path.as_str() {
            "kernel" => QuantisedPath::Kernel,
            "dequantise" => QuantisedPath::Dequantise,
            p => bail!("--quantised-path {p}: kernel or dequantise"),
        }));
    }
    let _memory = DeviceMemory::install(&device);
    if args.component.as_deref() == Some("quantised") {
        let report = serde_json::json!({
            "threads": std::thread::available_parallelism().map_or(1, usize::from),
            "result": quantised::run(args.warmup, args.iterations)?,
        });
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    if args.component.as_deref() == Some("ops") {
        let report = serde_json::json!({
            "device": args.device,
            "dtype": args.dtype,
            "kernels": sdgen_models::ops::kernel_summary(&device),
            "threads": std::thread::available_parallelism().map_or(1, usize::from),
            "result": ops::run(&device, dtype, args.warmup, args.iterations)?,
        });
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let Prepared { model, written_bytes: mut written, mut write_ms, mut weights } =
        prepare(&args.family, &model_dir, dtype, &device, args.seed)?;
    let refiner_model = if let Some(refiner) = refiner_family.filter(|_| args.refiner) {
        let dir = args.refiner_dir.clone().unwrap_or_else(|| PathBuf::from("bench-models").join(refiner.name));
        let r = prepare(refiner.name, &dir, dtype, &device, args.seed.wrapping_add(1))?;
        written += r.written_bytes;
        write_ms += r.write_ms;
        weights.extend(r.weights.into_iter().map(|(k, v)| (format!("refiner_{k}"), v)));
        Some(r.model)
    } else {
        None
    };
    if let (Some(format), Some(out)) = (&args.export, &args.export_to) {
        let format: sdgen::loading::export::ExportFormat = format.parse().map_err(anyhow::Error::msg)?;
        let start = Instant::now();
        let exported = sdgen::loading::export::export(&model, format, out)
            .with_context(|| format!("--export {} --export-to {}", format.name(), out.display()))?;
        let report = serde_json::json!({
            "family": args.family,
            "model_dir": model_dir,
            "export": format.name(),
            "exported": exported,
            "export_ms": start.elapsed().as_secs_f64() * 1e3,
            "model_write_ms": write_ms,
        });
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    if args.write_only {
        let report = serde_json::json!({
            "family": args.family,
            "model_dir": model_dir,
            "weights_bytes": weights,
            "weights_written_bytes": written,
            "model_write_ms": write_ms,
        });
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    // The quantised model a component runs, if not the folder's own weights (compared with them).
    let quantised = match (&args.weights_file, &args.weights) {
        (Some(file), _) => Some(
            ModelFolder::open_with(file, &OpenOptions { config_from: Some(model_dir.clone()), ..Default::default() })
                .with_context(|| format!("--weights-file {}", file.display()))?,
        ),
        (None, Some(q)) => Some(model.clone().with_quantise(Some(q.parse().map_err(anyhow::Error::msg)?))?),
        (None, None) => None,
    };
    if args.weights.is_some() && args.component.as_deref() != Some("transformer") {
        bail!("--weights runs with --component transformer (one MMDiT evaluation, compared with the folder's)");
    }
    if args.weights_file.is_some() && args.component.as_deref().is_some_and(|c| c != "transformer") {
        bail!("--weights-file runs whole runs, or --component transformer");
    }
    if let Some(component) = &args.component {
        let settings = sdgen::pipeline::resolve(&model, &request_for(&args, args.steps))?;
        let run = components::ComponentRun {
            component,
            size: (settings.width, settings.height),
            n: args.n,
            iterations: args.iterations,
            warmup: args.warmup,
            inputs: args.inputs.as_deref(),
            dump: args.dump.as_deref(),
            residency: sdgen::pipeline::residency(args.resident_blocks),
            reference: quantised.as_ref().map(|_| &model),
        };
        let report = serde_json::json!({
            "family": args.family,
            "device": args.device,
            "dtype": args.dtype,
            "kernels": sdgen_models::ops::kernel_summary(&device),
            "width": settings.width,
            "height": settings.height,
            "n": args.n,
            "weights_bytes": weights,
            "weights": args.weights_file.as_ref().map(|f| f.display().to_string()).or(args.weights.clone()),
            "result": components::run(quantised.as_ref().unwrap_or(&model), &run, &device, dtype)?,
        });
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    // Whole runs of a quantised file: its model (and its weights' sizes) in place of the folder's.
    let model = match quantised {
        Some(file) => {
            weights = weight_bytes(&args.family, &file)?;
            file
        }
        None => model,
    };
    // The family's default size, filled in once, so the refiner's init image has the output size.
    let settings = sdgen::pipeline::resolve(&model, &request_for(&args, args.steps))?;
    let sized = Args { width: Some(settings.width), height: Some(settings.height), ..args };
    let args = &sized;
    let init_image = sdxl::synthetic_init_image(settings.width, settings.height)?;
    // The planner's estimate for the same run, with all the memory there is (so it chooses no
    // options and its per-stage figures are the plain run's): measured peaks go beside it. With
    // --refiner it is the base's alone (the refiner's stages come after the base is unloaded).
    let plan_with = |max_memory_bytes: u64| {
        let memory = sdgen::planning::MemoryRequest { max_memory_bytes: Some(max_memory_bytes), ..Default::default() };
        sdgen::planning::plan_run(&model, &settings, args.n, refiner_alone, &device, dtype, memory)
    };
    let estimate = estimate_json(plan_with(1 << 50))?;
    let mut rt = Runtime::new(device.clone(), dtype);
    // Under a budget, the options its plan chose (the engine's own mapping); the flags below
    // still apply on top of them.
    let budget_plan = match &args.max_memory {
        Some(v) => {
            let bytes = sdgen_memory::plan::parse_memory_size(v).map_err(|e| anyhow::anyhow!("{e}"))?;
            let plan = plan_with(bytes)?;
            if plan.verdict == sdgen_memory::plan::Verdict::DoesNotFit || plan.quantised.is_some() {
                bail!(
                    "--max-memory {v}: the plan needs what the bench does not run ({:?}, quantised {:?})",
                    plan.verdict,
                    plan.quantised
                );
            }
            rt.options = sdgen::planning::stage_options(&model, &plan, &settings, false)?;
            Some(estimate_json(Ok(plan))?)
        }
        None => None,
    };
    rt.options.attention_slice = args.attention_slice.or(rt.options.attention_slice);
    rt.options.vae_slicing |= args.vae_slicing;
    rt.options.vae_tile_px = args.vae_tile.or(rt.options.vae_tile_px);
    // One run of `steps` steps, and the denoising steps it ran (the refiner runs only the last
    // int(steps · strength) of its schedule).
    let run = |steps: usize, clock: &mut RunClock| -> anyhow::Result<(Generation, usize)> {
        let mut progress = |p: Progress| clock.record(&p);
        if refiner_alone {
            let req = sdxl::refiner_request(request_for(args, steps), &init_image, args.strength);
            let denoising = resolve_img2img(&model, &req)?.denoising_steps;
            Ok((img2img(&model, &req, &rt, &mut progress)?, denoising))
        } else {
            let refiner =
                refiner_model.as_ref().map(|model| Refiner { model, high_noise_fraction: args.high_noise_fraction });
            let gen = txt2img_refined(&model, refiner, &request_for(args, steps), &rt, &mut progress)?;
            // With a refiner, the base's `unet` stage ran only the steps before the handoff.
            let steps = gen.refinement.as_ref().map_or(gen.settings.steps, |r| r.base_steps);
            Ok((gen, steps))
        }
    };
    let warm = Instant::now();
    if args.warmup > 0 {
        let steps = if refiner_alone { sdxl::warmup_steps(args.strength) } else { args.warmup };
        run(steps, &mut RunClock::new(&rt.device))?;
    }
    let warmup_ms = warm.elapsed().as_secs_f64() * 1e3;
    let mut runs = Vec::new();
    for _ in 0..args.runs {
        let start = Instant::now();
        let mut clock = RunClock::new(&rt.device);
        let (gen, denoising_steps) = run(args.steps, &mut clock)?;
        let total_ms = start.elapsed().as_secs_f64() * 1e3;
        runs.push(serde_json::json!({
            "total_ms": total_ms,
            "timings_ms": gen.timings_ms,
            "denoising_steps": denoising_steps,
            "denoise_ms_per_step": gen.timings_ms.get("unet").map(|ms| ms / denoising_steps.max(1) as f64),
            "clock": clock.report(),
            "refiner_denoise_ms_per_step": gen.refinement.as_ref().and_then(|r| {
                gen.timings_ms.get("refiner_unet").map(|ms| ms / r.refiner_steps.max(1) as f64)
            }),
            "refinement": gen.refinement,
            "memory": gen.memory,
        }));
    }
    let report = serde_json::json!({
        "family": args.family,
        "device": args.device,
        "dtype": args.dtype,
        "width": settings.width,
        "height": settings.height,
        "steps": args.steps,
        "strength": refiner_alone.then_some(args.strength),
        "high_noise_fraction": args.refiner.then_some(args.high_noise_fraction),
        "n": args.n,
        "options": rt.options,
        "weights_file": args.weights_file,
        "kernels": sdgen_models::ops::kernel_summary(&rt.device),
        "weights_bytes": weights,
        "weights_written_bytes": written,
        "model_write_ms": write_ms,
        "warmup_ms": warmup_ms,
        "runs": runs,
        "plan_estimate": estimate,
        "max_memory": args.max_memory,
        "budget_plan": budget_plan,
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
