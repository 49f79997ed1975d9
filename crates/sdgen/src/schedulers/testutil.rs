//! Test helpers: the diffusers reference values written by `tools/reference/make_schedulers.py`,
//! and a runner that replays its denoising loop with a fake model and compares every step.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::{build, mul_scalar, SchedulerConfig, SchedulerKind};
use crate::rng::batch::BatchNoise;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/reference");

/// Relative tolerance for float32 runs: |ours - diffusers| <= TOL_F32 * max|diffusers|.
pub const TOL_F32: f64 = 1e-4;
/// Relative tolerance for float16 runs made on CUDA, whose rounding we follow (both sides round
/// every op to f16, not always on the same side when the f32 coefficients differ in a last bit).
pub const TOL_F16: f64 = 1e-3;
/// Relative tolerance for float16 runs made on torch's CPU, which rounds scalar factors to f16
/// before multiplying (CUDA does not); DDIM's division by sqrt(alpha) amplifies the difference.
pub const TOL_F16_CPU: f64 = 2e-2;

/// `schedulers.safetensors` and `schedulers.json`.
pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub configs: Vec<(String, SchedulerConfig)>,
    pub step_counts: Vec<usize>,
    pub run_steps: usize,
    pub f16_configs: Vec<String>,
    /// Where torch made the f16 runs: "cuda" or "cpu".
    pub f16_device: String,
    /// Cases diffusers refused, with its message.
    pub errors: HashMap<String, String>,
    /// Runs the script left out (`{cfg}.{kind}.{dtype}`), with the reason: f16 Euler ancestral
    /// runs made with a torch whose half-precision noise is not sdgen's (torch 2.15's).
    pub skipped: HashMap<String, String>,
    /// Seeds of the generators passed to `step` in the runs from `sample0` (one per image).
    pub run_seeds: Vec<u64>,
    /// Seeds of the generators of the batch runs from `sample0_batch` (`{prefix}.f32_batch.*`).
    pub batch_seeds: Vec<u64>,
}

impl Reference {
    pub fn load() -> Self {
        Self::load_dir(DIR)
    }

    /// The reference in `testdata/reference/<sub>/` (the same layout, from another script: e.g.
    /// `make_lcm_scheduler.py` into `lcm/`).
    pub fn load_from(sub: &str) -> Self {
        Self::load_dir(&format!("{DIR}/{sub}"))
    }

    fn load_dir(dir: &str) -> Self {
        let tensors = candle_core::safetensors::load(format!("{dir}/schedulers.safetensors"), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{dir}/schedulers.safetensors (run its tools/reference script): {e}"));
        let text = std::fs::read_to_string(format!("{dir}/schedulers.json")).expect("schedulers.json");
        let meta: serde_json::Value = serde_json::from_str(&text).expect("schedulers.json is JSON");
        let configs = meta["configs"]
            .as_object()
            .expect("configs")
            .iter()
            .map(|(name, cfg)| {
                let cfg = SchedulerConfig::from_json_str(&cfg.to_string()).expect("config parses");
                (name.clone(), cfg)
            })
            .collect();
        let usizes = |v: &serde_json::Value| -> Vec<usize> {
            v.as_array().expect("array").iter().map(|x| x.as_u64().expect("int") as usize).collect()
        };
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array().expect("array").iter().map(|x| x.as_str().expect("str").to_string()).collect()
        };
        let errors = meta["errors"]
            .as_object()
            .expect("errors")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        Self {
            tensors,
            configs,
            step_counts: usizes(&meta["step_counts"]),
            run_steps: meta["run_steps"].as_u64().expect("run_steps") as usize,
            f16_configs: strings(&meta["f16_configs"]),
            f16_device: meta["f16_device"].as_str().unwrap_or("cpu").to_string(),
            errors,
            skipped: meta["skipped"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
                .unwrap_or_default(),
            run_seeds: meta["run_seeds"].as_array().expect("run_seeds").iter().map(|x| x.as_u64().unwrap()).collect(),
            batch_seeds: meta["batch_seeds"]
                .as_array()
                .expect("batch_seeds")
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect(),
        }
    }

    pub fn tensor(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }

    pub fn vec_f64(&self, key: &str) -> Option<Vec<f64>> {
        self.tensor(key).map(flat)
    }
}

/// A tensor's values as f64, flattened.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Asserts `max |got - expected| <= rel_tol * max |expected|`, naming `what` and the worst index.
pub fn assert_close(got: &[f64], expected: &[f64], rel_tol: f64, what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: length {} vs diffusers' {}", got.len(), expected.len());
    let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs())).max(f64::MIN_POSITIVE);
    let (worst, diff) =
        got.iter().zip(expected).map(|(a, b)| (a - b).abs()).enumerate().fold((0, 0f64), |acc, (i, d)| {
            if d > acc.1 || d.is_nan() {
                (i, d)
            } else {
                acc
            }
        });
    assert!(
        diff <= rel_tol * scale,
        "{what}: |diff| {diff:e} at [{worst}] (ours {}, diffusers {}) exceeds {rel_tol:e} * max|ref| {scale:e}",
        got[worst],
        expected[worst]
    );
}

/// Checks `kind` against every config of the reference: timesteps for each step count (or that
/// both refuse), init_noise_sigma, and the step-by-step run in f32 (and f16 where recorded).
pub fn check_reference(reference: &Reference, kind: SchedulerKind) {
    assert!(!reference.configs.is_empty());
    let mut runs = 0;
    for (name, config) in &reference.configs {
        let prefix = format!("{name}.{kind}");
        let refused_run = reference.errors.contains_key(&format!("{prefix}.f32.run"));
        for &n in &reference.step_counts {
            let key = format!("{prefix}.timesteps.{n}");
            // diffusers set the timesteps but could not step through them.
            let refused_steps = reference.errors.get(&format!("{prefix}.run.{n}"));
            match (build(kind, config, n), reference.vec_f64(&key)) {
                (Ok(s), Some(expected)) => {
                    assert_close(s.timesteps(), &expected, 1e-6, &key);
                    assert!(
                        refused_steps.is_none(),
                        "{key}: diffusers fails to run them ({refused_steps:?}) but we accept"
                    );
                }
                (Err(_), None) => assert!(reference.errors.contains_key(&key), "{key}: missing from reference"),
                (Err(e), Some(_)) => {
                    assert!(refused_run || refused_steps.is_some(), "{key}: we refuse ({e}) but diffusers doesn't")
                }
                (Ok(_), None) => panic!("{key}: diffusers refused ({:?}) but we accept", reference.errors.get(&key)),
            }
        }
        let Ok(scheduler) = build(kind, config, reference.run_steps) else {
            assert!(refused_run, "{prefix}: we refuse {} steps but diffusers doesn't", reference.run_steps);
            continue;
        };
        assert!(!refused_run, "{prefix}: diffusers refused the run but we accept it");
        let init = reference.vec_f64(&format!("{prefix}.init_noise_sigma")).unwrap();
        assert_close(&[scheduler.init_noise_sigma()], &init, 1e-6, &format!("{prefix}.init_noise_sigma"));
        drop(scheduler);
        let single = RunInputs { sample0: "sample0", noise: "noise", seeds: &reference.run_seeds };
        let mut dtypes = vec![("f32", DType::F32, TOL_F32, single)];
        let f16_skipped = reference.skipped.contains_key(&format!("{prefix}.f16"));
        if f16_skipped {
            assert!(reference.tensor(&format!("{prefix}.f16.prev.0")).is_none(), "{prefix}.f16: skipped but present");
        } else if reference.f16_configs.contains(name) {
            let tol = if reference.f16_device == "cuda" { TOL_F16 } else { TOL_F16_CPU };
            dtypes.push(("f16", DType::F16, tol, single));
        }
        if reference.tensor(&format!("{prefix}.f32_batch.prev.0")).is_some() {
            let batch = RunInputs { sample0: "sample0_batch", noise: "noise_batch", seeds: &reference.batch_seeds };
            dtypes.push(("f32_batch", DType::F32, TOL_F32, batch));
        }
        for (dname, dtype, tol, inputs) in dtypes {
            run_and_compare(reference, kind, config, &format!("{prefix}.{dname}"), dtype, tol, inputs);
            runs += 1;
        }
    }
    assert!(runs >= 3, "{kind}: only {runs} reference runs were checked");
}

/// What a reference run starts from: tensor names and the step generators' seeds.
#[derive(Clone, Copy)]
struct RunInputs<'a> {
    sample0: &'a str,
    noise: &'a str,
    seeds: &'a [u64],
}

/// The pipeline's loop with the reference's fake model, compared step by step. Our own samples
/// are carried forward (not reset to diffusers'), so errors would accumulate as in real use.
/// Ancestral steps draw from fresh generators seeded `inputs.seeds`, as the script's do.
fn run_and_compare(
    reference: &Reference,
    kind: SchedulerKind,
    config: &SchedulerConfig,
    prefix: &str,
    dtype: DType,
    tol: f64,
    inputs: RunInputs,
) {
    let mut scheduler = build(kind, config, reference.run_steps).unwrap();
    let mut generators = BatchNoise::new(inputs.seeds);
    let noise = reference.tensor(inputs.noise).unwrap().to_dtype(dtype).unwrap();
    let sample0 = reference.tensor(inputs.sample0).unwrap().to_dtype(dtype).unwrap();
    let mut sample = mul_scalar(&sample0, scheduler.init_noise_sigma() as f32).unwrap();
    let timesteps = scheduler.timesteps().to_vec();
    assert!(reference.tensor(&format!("{prefix}.prev.{}", timesteps.len() - 1)).is_some(), "{prefix}: step count");
    assert!(reference.tensor(&format!("{prefix}.prev.{}", timesteps.len())).is_none(), "{prefix}: step count");
    for i in 0..timesteps.len() {
        let scaled = scheduler.scale_model_input(&sample, i).unwrap();
        assert_eq!(scaled.dtype(), dtype);
        if let Some(expected) = reference.tensor(&format!("{prefix}.scaled.{i}")) {
            assert_close(&flat(&scaled), &flat(expected), tol, &format!("{prefix}.scaled.{i}"));
        }
        // model_output = noise * (1 + 0.1 i) - 0.05 * scaled, as the script computes it.
        let model_output =
            (mul_scalar(&noise, (1.0 + 0.1 * i as f64) as f32).unwrap() - mul_scalar(&scaled, 0.05).unwrap()).unwrap();
        sample = scheduler.step(&model_output, i, &sample, &mut generators).unwrap();
        assert_eq!(sample.dtype(), dtype, "{prefix}.prev.{i}: dtype");
        let expected = reference.tensor(&format!("{prefix}.prev.{i}")).unwrap();
        assert_eq!(sample.dims(), expected.dims());
        assert_close(&flat(&sample), &flat(expected), tol, &format!("{prefix}.prev.{i} ({kind})"));
    }
}
