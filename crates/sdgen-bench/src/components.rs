//! `--component unet|transformer|vae`: one model loaded once (its load timed on its own), then its forward
//! pass timed alone on fixed random inputs, the device synchronised around each evaluation: the
//! figures `peer_diffusers.py` reports for diffusers (a UNet evaluation with the CFG batch, a VAE
//! decode), so the two compare directly. No scheduler, no text encoder, no file written.

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use sdgen::loading::ModelFolder;
use sdgen_models::mmdit::{MMDiTConfig, SD3Transformer2DModel};
use sdgen_models::stream::{Residency, StreamableModel};
use sdgen_models::unet::{AddedConditioning, UNet2DConditionModel, UNetConfig};
use sdgen_models::vae::{AutoencoderKL, VaeConfig, VaeOptions};

/// The pooled text embedding's width in SDXL's additional conditioning (bigG's projection).
const SDXL_TEXT_EMBEDS_DIM: usize = 1280;

/// Text tokens an SD 3.5 transformer attends over with its default prompt: CLIP's 77 and T5's 256.
const SD3_CONTEXT_TOKENS: usize = 77 + 256;

/// What to time and how.
pub struct ComponentRun<'a> {
    /// `unet` or `transformer` (one evaluation of the CFG batch) or `vae` (one decode).
    pub component: &'a str,
    /// Image width and height in pixels.
    pub size: (usize, usize),
    /// Images per prompt: the UNet sees `2·n` rows (classifier-free guidance), the VAE `n`.
    pub n: usize,
    /// Timed evaluations after the warm-up ones.
    pub iterations: usize,
    /// Untimed evaluations first (kernel loading, algorithm choice, pool growth).
    pub warmup: usize,
    /// The transformer's inputs from a file (a parity check against another framework's forward).
    pub inputs: Option<&'a std::path::Path>,
    /// Where the transformer's last output goes (f32 safetensors, tensor `output`).
    pub dump: Option<&'a std::path::Path>,
    /// How the UNet or transformer holds its blocks (resident, or streamed).
    pub residency: Residency,
    /// The transformer's unquantised model, when the one timed is quantised: its forward on the
    /// same inputs is what the timed one's output is compared with (relative L2).
    pub reference: Option<&'a ModelFolder>,
}

/// Median, fastest and slowest of `times_ms`.
fn spread(mut times_ms: Vec<f64>) -> serde_json::Value {
    times_ms.sort_by(f64::total_cmp);
    let median = times_ms.get(times_ms.len() / 2).copied();
    serde_json::json!({
        "median_ms": median,
        "min_ms": times_ms.first(),
        "max_ms": times_ms.last(),
        "all_ms": times_ms,
    })
}

/// Times `f` `warmup + iterations` times with the device synchronised around each call, under a
/// stage peak measurement; returns the timings and the peak as JSON.
fn time_it(
    device: &Device,
    run: &ComponentRun,
    label: &str,
    mut f: impl FnMut() -> anyhow::Result<Tensor>,
) -> anyhow::Result<serde_json::Value> {
    let peak = sdgen_memory::StagePeak::start(label);
    let mut times = Vec::with_capacity(run.iterations);
    let total = run.warmup + run.iterations;
    // `SDGEN_PROFILE_LAST=1`: the CUDA profiler captures the last evaluation only (for
    // `ncu --profile-from-start off`).
    let profile = std::env::var("SDGEN_PROFILE_LAST").is_ok_and(|v| v == "1");
    for i in 0..total {
        device.synchronize()?;
        let last = i + 1 == total;
        if profile && last {
            sdgen_models::ops::cuda_profiler(true);
        }
        let start = Instant::now();
        let out = f()?;
        device.synchronize()?;
        if profile && last {
            sdgen_models::ops::cuda_profiler(false);
        }
        let ms = start.elapsed().as_secs_f64() * 1e3;
        drop(out);
        if i >= run.warmup {
            times.push(ms);
        }
    }
    let memory = peak.finish();
    Ok(serde_json::json!({ "eval": spread(times), "memory": memory }))
}

/// `load()` on `device`, synchronised: the loaded model and the milliseconds it took.
fn load_timed<M>(device: &Device, load: impl FnOnce() -> anyhow::Result<M>) -> anyhow::Result<(M, f64)> {
    let start = Instant::now();
    let model = load()?;
    device.synchronize()?;
    Ok((model, start.elapsed().as_secs_f64() * 1e3))
}

/// Loads `component`'s model with its blocks as `run.residency` says, timed.
fn load_model<M: StreamableModel>(
    model: &ModelFolder,
    component: &str,
    cfg: &M::Config,
    run: &ComponentRun,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<(M, f64)> {
    let weights = model.weights(component)?;
    load_timed(device, || {
        let streamed = weights.streamed_var_builder(dtype, device)?;
        Ok(M::new_streamed(cfg, weights.var_builder(dtype, device)?, streamed, run.residency)?)
    })
}

/// Normal values of `shape` in `dtype` on `device` (the components' random inputs).
fn randn(shape: &[usize], dtype: DType, device: &Device) -> anyhow::Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)
}

/// `‖a − b‖ / ‖b‖` in f64 (a quantised output `a` against the unquantised `b`).
pub(crate) fn relative_l2(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((diff / norm).sqrt())
}

/// Loads the component and times it.
pub fn run(
    model: &ModelFolder,
    run: &ComponentRun,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<serde_json::Value> {
    let (w, h) = run.size;
    let (lh, lw) = (h / 8, w / 8);
    let result: anyhow::Result<serde_json::Value> = match run.component {
        "unet" => {
            let cfg: UNetConfig = model.config("unet", "config.json")?;
            let (unet, load_ms) = load_model::<UNet2DConditionModel>(model, "unet", &cfg, run, device, dtype)?;
            let rows = 2 * run.n;
            let randn = |shape: &[usize]| randn(shape, dtype, device);
            let latents = randn(&[rows, cfg.in_channels, lh, lw])?;
            let context = randn(&[rows, 77, cfg.cross_attention_dim])?;
            let added = match cfg.time_ids_len(SDXL_TEXT_EMBEDS_DIM) {
                Some(ids) => Some((randn(&[rows, SDXL_TEXT_EMBEDS_DIM])?, randn(&[rows, ids])?)),
                None => None,
            };
            let added = added.as_ref().map(|(text_embeds, time_ids)| AddedConditioning { text_embeds, time_ids });
            let timed = time_it(device, run, "unet evaluation", || {
                Ok(unet.forward_with(&latents, 500.0, &context, added.as_ref())?)
            })?;
            Ok(
                serde_json::json!({ "component": "unet", "batch": rows, "load_ms": load_ms, "residency": format!("{:?}", run.residency), "timed": timed }),
            )
        }
        "transformer" => {
            let cfg: MMDiTConfig = model.config("transformer", "config.json")?;
            let rows = 2 * run.n;
            let randn = |shape: &[usize]| randn(shape, dtype, device);
            let (latents, t, context, pooled) = match run.inputs {
                Some(path) => {
                    let file = candle_core::safetensors::load(path, device)
                        .with_context(|| format!("--inputs {}", path.display()))?;
                    let get = |name: &str| -> anyhow::Result<Tensor> {
                        Ok(file.get(name).with_context(|| format!("--inputs has no `{name}`"))?.to_dtype(dtype)?)
                    };
                    let t = file.get("timesteps").context("--inputs has no `timesteps`")?.to_dtype(DType::F32)?;
                    (get("latents")?, t, get("context")?, get("pooled")?)
                }
                None => (
                    randn(&[rows, cfg.in_channels, lh, lw])?,
                    Tensor::full(500f32, rows, device)?,
                    randn(&[rows, SD3_CONTEXT_TOKENS, cfg.joint_attention_dim])?,
                    randn(&[rows, cfg.pooled_projection_dim])?,
                ),
            };
            // The unquantised forward first, its model dropped before the timed one loads.
            let reference = match run.reference {
                Some(reference) => {
                    let (mmdit, load_ms) =
                        load_model::<SD3Transformer2DModel>(reference, "transformer", &cfg, run, device, dtype)?;
                    let start = Instant::now();
                    let out = mmdit.forward(&latents, &t, &context, &pooled)?.to_device(&Device::Cpu)?;
                    Some((out, load_ms, start.elapsed().as_secs_f64() * 1e3))
                }
                None => None,
            };
            let (mmdit, load_ms) = load_model::<SD3Transformer2DModel>(model, "transformer", &cfg, run, device, dtype)?;
            let mut last = None;
            let keep = run.dump.is_some() || reference.is_some();
            let timed = time_it(device, run, "transformer evaluation", || {
                let out = mmdit.forward(&latents, &t, &context, &pooled)?;
                // Kept only to be written or compared: an output held into the next evaluation
                // would count in its peak.
                if keep {
                    last = Some(out.clone());
                }
                Ok(out)
            })?;
            let last = last.map(|out| out.to_dtype(DType::F32)?.to_device(&Device::Cpu)).transpose()?;
            if let (Some(path), Some(out)) = (run.dump, &last) {
                candle_core::safetensors::save(&std::collections::HashMap::from([("output", out.clone())]), path)?;
            }
            let compared = match (reference, &last) {
                (Some((want, load_ms, eval_ms)), Some(got)) => serde_json::json!({
                    "relative_l2": relative_l2(got, &want)?,
                    "reference_load_ms": load_ms,
                    "reference_eval_ms": eval_ms,
                }),
                _ => serde_json::Value::Null,
            };
            Ok(serde_json::json!({
                "component": "transformer",
                "batch": rows,
                "load_ms": load_ms,
                "timed": timed,
                "against_unquantised": compared,
            }))
        }
        "vae" => {
            let cfg: VaeConfig = model.config("vae", "config.json")?;
            let weights = model.weights("vae")?;
            let (vae, load_ms) =
                load_timed(device, || Ok(AutoencoderKL::new(&cfg, false, true, weights.var_builder(dtype, device)?)?))?;
            let z = randn(&[run.n, cfg.latent_channels, lh, lw], dtype, device)?;
            let timed = time_it(device, run, "vae decode", || Ok(vae.decode_with(&z, &VaeOptions::default())?))?;
            Ok(serde_json::json!({ "component": "vae", "batch": run.n, "load_ms": load_ms, "timed": timed }))
        }
        other => anyhow::bail!("--component {other}: unet, transformer or vae"),
    };
    result.context("component benchmark")
}
