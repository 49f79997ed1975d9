//! Flow Euler against diffusers 0.42.1's `FlowMatchEulerDiscreteScheduler`
//! (`tools/reference/make_flow_match.py` → `testdata/reference/flow_match.safetensors`).
//!
//! Tolerances: timesteps and sigmas within 1e-6 relative (reached: bit-equal on every config and
//! step count of the reference); f32 steps and `scale_noise` within 1e-6 of max|ref|; f16 / bf16
//! steps and `scale_noise` bit-equal.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::*;
use crate::schedulers::{build, build_with, RunInputs, SchedulerConfig, SchedulerKind};

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/reference/flow_match.safetensors");

struct Reference {
    tensors: HashMap<String, Tensor>,
    meta: Value,
}

impl Reference {
    fn load() -> Self {
        let tensors = candle_core::safetensors::load(REFERENCE, &Device::Cpu).unwrap();
        let bytes = std::fs::read(REFERENCE).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let meta = serde_json::from_str(header["__metadata__"]["reference"].as_str().unwrap()).unwrap();
        Self { tensors, meta }
    }

    fn configs(&self) -> Vec<(String, SchedulerConfig, Option<f64>)> {
        self.meta["configs"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, cfg)| {
                let config = SchedulerConfig::from_json_str(&cfg.to_string()).unwrap();
                (name.clone(), config, self.meta["mu"][name].as_f64())
            })
            .collect()
    }

    fn step_counts(&self) -> Vec<usize> {
        self.meta["step_counts"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap() as usize).collect()
    }

    fn vec(&self, key: &str) -> Option<Vec<f32>> {
        self.tensors.get(key).map(|t| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap())
    }
}

fn flow(config: &SchedulerConfig, n: usize, mu: Option<f64>) -> FlowMatchEulerScheduler {
    FlowMatchEulerScheduler::new(config, n, mu).unwrap()
}

fn assert_rel(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1e-30), "{what}[{i}]: {g} vs diffusers' {w}");
    }
}

/// Half precision: equal to diffusers' values bit for bit (the same ops, rounded at the same
/// points). f32: within `1e-6 · max|want|` (candle and torch may fuse or order the f32 ops
/// differently).
fn assert_tensor_close(got: &Tensor, want: &[f32], dtype: DType, what: &str) {
    assert_eq!(got.dtype(), dtype, "{what}");
    let got: Vec<f32> = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    if dtype != DType::F32 {
        assert_eq!(got, want, "{what}");
        return;
    }
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * scale, "{what}[{i}]: {g} vs diffusers' {w}");
    }
}

#[test]
fn schedules_match_diffusers() {
    let r = Reference::load();
    let mut checked = 0;
    for (name, config, mu) in r.configs() {
        for n in r.step_counts() {
            let key = format!("{name}.{n}");
            let Some(want_sigmas) = r.vec(&format!("{key}.sigmas")) else {
                // diffusers' shift_terminal with one step gives NaN; sdgen refuses it.
                assert_eq!((name.as_str(), n), ("terminal", 1));
                let err = FlowMatchEulerScheduler::new(&config, n, mu).unwrap_err().to_string();
                assert!(err.contains("shift_terminal") && err.contains("2 steps"), "{err}");
                continue;
            };
            let s = flow(&config, n, mu);
            assert_rel(s.sigmas(), &want_sigmas, 1e-6, &format!("{key}.sigmas"));
            let got: Vec<f32> = s.timesteps().iter().map(|&t| t as f32).collect();
            assert_rel(&got, &r.vec(&format!("{key}.timesteps")).unwrap(), 1e-6, &format!("{key}.timesteps"));
            checked += 1;
        }
    }
    assert!(checked >= 55, "{checked} schedules checked");
}

#[test]
fn steps_match_diffusers_in_every_dtype() {
    let r = Reference::load();
    for (name, config, mu) in r.configs() {
        for begin in [0, 4] {
            for (dname, dtype) in [("f32", DType::F32), ("f16", DType::F16), ("bf16", DType::BF16)] {
                let mut s = build_with(SchedulerKind::FlowMatchEuler, &config, 10, &RunInputs { mu }).unwrap();
                let mut noise = BatchNoise::new(&[0]);
                let mut x = r.tensors["x"].to_dtype(dtype).unwrap();
                for k in 0..3 {
                    let v = r.tensors[&format!("v.{k}")].to_dtype(dtype).unwrap();
                    // The transformer sees the sample as it is.
                    let input = s.scale_model_input(&x, begin + k).unwrap();
                    let flat =
                        |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(flat(&input), flat(&x));
                    x = s.step(&v, begin + k, &x, &mut noise).unwrap();
                }
                let key = format!("{name}.step.{begin}.{dname}");
                assert_tensor_close(&x, &r.vec(&key).unwrap(), dtype, &key);
            }
        }
    }
}

#[test]
fn scale_noise_matches_diffusers_in_every_dtype() {
    let r = Reference::load();
    let mut checked = 0;
    for (name, config, mu) in r.configs() {
        for n in r.step_counts() {
            for i in 0..n {
                for (dname, dtype) in [("f32", DType::F32), ("f16", DType::F16), ("bf16", DType::BF16)] {
                    let key = format!("{name}.scale_noise.{n}.{i}.{dname}");
                    let Some(want) = r.vec(&key) else { continue };
                    let s = flow(&config, n, mu);
                    let x0 = r.tensors["x0"].to_dtype(dtype).unwrap();
                    // The noise in f32: scale_noise casts it to the sample's dtype.
                    let got = s.scale_noise(&x0, &r.tensors["noise"], i).unwrap();
                    assert_tensor_close(&got, &want, dtype, &key);
                    let via_trait = s.add_noise(&x0, &r.tensors["noise"], i).unwrap();
                    assert_tensor_close(&via_trait, &want, dtype, &key);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 150, "{checked} cases checked");
}

#[test]
fn mu_and_img2img_start_match_sd3_pipelines() {
    let r = Reference::load();
    for (name, config, mu) in r.configs() {
        let seq_len = if name.ends_with("_512") { 1024 } else { 4096 };
        match (dynamic_shift_mu(&config, seq_len), mu) {
            (Some(got), Some(want)) => assert!((got - want).abs() <= 1e-12, "{name}: mu {got} vs {want}"),
            (None, None) => {}
            other => panic!("{name}: mu {other:?}"),
        }
    }
    for case in r.meta["img2img_t_start"].as_array().unwrap() {
        let (steps, strength) = (case[0].as_u64().unwrap() as usize, case[1].as_f64().unwrap());
        assert_eq!(img2img_start_step(steps, strength), case[2].as_u64().unwrap() as usize, "{case}");
    }
    assert_eq!(calculate_shift(256, 256, 4096, 0.5, 1.15), 0.5);
}

#[test]
fn dynamic_shifting_needs_mu_and_static_ignores_it() {
    let dynamic = SchedulerConfig::from_json_str(r#"{"use_dynamic_shifting": true}"#).unwrap();
    let err = FlowMatchEulerScheduler::new(&dynamic, 10, None).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)) && err.to_string().contains("mu"), "{err}");
    let err = build(SchedulerKind::FlowMatchEuler, &dynamic, 10).err().unwrap().to_string();
    assert!(err.contains("use_dynamic_shifting"), "{err}");
    let sd35 = SchedulerConfig::from_json_str(r#"{"shift": 3.0}"#).unwrap();
    assert_eq!(flow(&sd35, 10, Some(2.0)).sigmas(), flow(&sd35, 10, None).sigmas());
}

#[test]
fn unsupported_options_are_clear_errors() {
    for (json, needle) in [
        (r#"{"use_beta_sigmas": true}"#, "use_beta_sigmas"),
        (r#"{"use_karras_sigmas": true, "use_exponential_sigmas": true}"#, "only one of"),
        (r#"{"stochastic_sampling": true}"#, "stochastic_sampling"),
        (r#"{"use_dynamic_shifting": true, "time_shift_type": "cosine"}"#, "time_shift_type \"cosine\""),
        (r#"{"shift": 0.0}"#, "shift 0"),
    ] {
        let cfg = SchedulerConfig::from_json_str(json).unwrap();
        let err = FlowMatchEulerScheduler::new(&cfg, 10, Some(1.0)).unwrap_err();
        assert!(matches!(err, Error::BadModel(_)) && err.to_string().contains(needle), "{json}: {err}");
    }
}

#[test]
fn the_run_starts_at_pure_noise_and_ends_at_the_prediction() {
    // σ goes 1 → 0: one step from pure noise with v = ε − x₀ lands on x₀ exactly (n = 1).
    let sd35 = SchedulerConfig::from_json_str(r#"{"shift": 3.0}"#).unwrap();
    let mut s = build(SchedulerKind::FlowMatchEuler, &sd35, 1).unwrap();
    assert_eq!((s.timesteps(), s.init_noise_sigma()), (&[1000.0][..], 1.0));
    let dev = Device::Cpu;
    let x0 = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
    let eps = Tensor::new(&[1.0f32, 2.0], &dev).unwrap();
    let v = (&eps - &x0).unwrap();
    let out = s.step(&v, 0, &eps, &mut BatchNoise::new(&[0])).unwrap();
    assert_eq!(out.to_vec1::<f32>().unwrap(), [0.5, -1.0]);
}
