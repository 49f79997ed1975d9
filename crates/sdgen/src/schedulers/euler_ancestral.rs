//! Ancestral sampling with Euler steps (k-diffusion's `sample_euler_ancestral`, "Euler a"), as
//! diffusers' `EulerAncestralDiscreteScheduler`: each step goes down from `sigma` to `sigma_down`
//! along the ODE direction `(x - x0) / sigma` and then adds fresh noise of standard deviation
//! `sigma_up`, where `sigma_down^2 + sigma_up^2 = sigma_next^2`.
//!
//! The schedule (timesteps, sigmas, `init_noise_sigma`, model-input scaling) is exactly the plain
//! Euler scheduler's without its Karras/exponential/continuous options, which this class does
//! not take; so it is built by [`EulerScheduler`] from the config with those fields removed.
//! The noise comes from the per-image generators of the run ([`BatchNoise`]), which is what makes
//! a seed reproduce diffusers' image.

use candle_core::{DType, Tensor};

use super::config::{CommonParams, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{at, check_steps, div_scalar, mul_scalar, EulerScheduler, Scheduler, SchedulerKind};
use crate::rng::batch::BatchNoise;
use crate::{Error, Result};

/// diffusers' `EulerAncestralDiscreteScheduler` after `set_timesteps(num_inference_steps)`.
#[derive(Debug)]
pub struct EulerAncestralScheduler {
    prediction_type: PredictionType,
    /// One per timestep, plus a final 0.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
}

impl EulerAncestralScheduler {
    /// Builds the scheduler with `EulerAncestralDiscreteScheduler`'s defaults for fields `config`
    /// lacks (`timestep_spacing` defaults to `linspace`). `prediction_type` "sample" is refused
    /// here: diffusers accepts the config but raises `NotImplementedError` at the first step.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let params = CommonParams::resolve(config, TimestepSpacing::Linspace)?;
        check_steps(SchedulerKind::EulerAncestral, num_inference_steps, params.num_train_timesteps)?;
        if params.prediction_type == PredictionType::Sample {
            return Err(Error::BadModel(
                "scheduler config: Euler ancestral supports prediction_type epsilon or v_prediction, not \"sample\""
                    .into(),
            ));
        }
        // Only the fields `EulerAncestralDiscreteScheduler.__init__` takes, as `from_config` passes
        // them; the Euler-only ones fall back to Euler's defaults, which are this class's behaviour
        // (linear interpolation of the training sigmas, discrete timesteps, a final sigma of 0).
        let own = SchedulerConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule.clone(),
            trained_betas: config.trained_betas.clone(),
            prediction_type: config.prediction_type.clone(),
            timestep_spacing: config.timestep_spacing.clone(),
            steps_offset: config.steps_offset,
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
            ..SchedulerConfig::default()
        };
        let euler = EulerScheduler::new(&own, num_inference_steps)?;
        Ok(Self {
            prediction_type: params.prediction_type,
            sigmas: euler.sigmas().to_vec(),
            timesteps: euler.timesteps().to_vec(),
            init_noise_sigma: euler.init_noise_sigma() as f32,
        })
    }

    /// The sigmas of the run: one per timestep plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

/// `(sigma_up, sigma_down)` for a step from `sigma_from` to `sigma_to`, in f32 as diffusers
/// computes them with 0-d float32 tensors (`x**2` is `x * x`, `x**0.5` is `sqrt(x)`).
fn ancestral_sigmas(sigma_from: f32, sigma_to: f32) -> (f32, f32) {
    let to2 = sigma_to * sigma_to;
    let from2 = sigma_from * sigma_from;
    let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
    let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
    (sigma_up, sigma_down)
}

impl Scheduler for EulerAncestralScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "euler-a")?;
        div_scalar(sample, (sigma * sigma + 1.0).sqrt())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "euler-a")?;
        let sigma_next = self.sigmas[step_index + 1];
        // Upcast as diffusers does; products with model_output stay in its dtype (torch keeps a
        // tensor's dtype when multiplying by a 0-d float32 tensor).
        let sample = sample.to_dtype(DType::F32)?;
        let pred_original = match self.prediction_type {
            PredictionType::Epsilon => (&sample - mul_scalar(model_output, sigma)?.to_dtype(DType::F32)?)?,
            PredictionType::VPrediction => {
                // denoised = model_output * c_out + input * c_skip
                let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
                let skip = div_scalar(&sample, sigma * sigma + 1.0)?;
                (mul_scalar(model_output, c_out)?.to_dtype(DType::F32)? + skip)?
            }
            PredictionType::Sample => unreachable!("refused in new()"),
        };
        let (sigma_up, sigma_down) = ancestral_sigmas(sigma, sigma_next);
        let derivative = div_scalar(&(&sample - pred_original)?, sigma)?;
        let prev = (&sample + mul_scalar(&derivative, sigma_down - sigma)?)?;
        // Drawn every step, the last one (sigma_up = 0) included, so the generators advance as
        // diffusers' do: on the CPU, in model_output's dtype, image i from generator i.
        let eps = noise.randn(model_output.dims(), model_output.dtype(), model_output.device())?;
        let prev = (prev + mul_scalar(&eps, sigma_up)?.to_dtype(DType::F32)?)?;
        prev.to_dtype(model_output.dtype())
    }

    fn order(&self) -> usize {
        1
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "euler-a")?;
        super::euler::sigma_add_noise(sigma, original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, check_reference, Reference};
    use super::super::{build, SchedulerConfig, SchedulerKind};
    use super::*;

    #[test]
    fn matches_diffusers_euler_ancestral() {
        check_reference(&Reference::load(), SchedulerKind::EulerAncestral);
    }

    #[test]
    fn sigmas_match_diffusers() {
        let reference = Reference::load();
        let mut checked = 0;
        for (name, config) in &reference.configs {
            for &n in &reference.step_counts {
                let key = format!("{name}.euler-a.sigmas.{n}");
                let Some(expected) = reference.vec_f64(&key) else {
                    continue;
                };
                let Ok(s) = EulerAncestralScheduler::new(config, n) else {
                    // Refused where diffusers sets the timesteps but cannot step (checked by
                    // check_reference).
                    assert!(reference.errors.contains_key(&format!("{name}.euler-a.run.{n}")), "{key}");
                    continue;
                };
                let got: Vec<f64> = s.sigmas().iter().map(|&s| s as f64).collect();
                assert_close(&got, &expected, 1e-6, &key);
                checked += 1;
            }
        }
        assert!(checked >= 10, "only {checked} sigma schedules checked");
    }

    #[test]
    fn last_step_adds_no_noise_but_still_draws() {
        let (up, down) = ancestral_sigmas(0.03, 0.0);
        assert_eq!((up, down), (0.0, 0.0));
        let (up, down) = ancestral_sigmas(2.0, 1.0);
        assert!((up * up + down * down - 1.0).abs() < 1e-6);
        // One step = one draw per image: after a run of N steps the generators have drawn N times.
        let cfg = SchedulerConfig::default();
        let mut s = build(SchedulerKind::EulerAncestral, &cfg, 3).unwrap();
        let x = Tensor::ones((2, 4, 2, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut noise = BatchNoise::new(&[1, 2]);
        for i in 0..3 {
            s.step(&x, i, &x, &mut noise).unwrap();
        }
        let mut fresh = BatchNoise::new(&[1, 2]);
        for _ in 0..3 {
            fresh.randn(&[2, 4, 2, 2], DType::F32, &candle_core::Device::Cpu).unwrap();
        }
        let a = noise.randn(&[2, 16], DType::F32, &candle_core::Device::Cpu).unwrap();
        let b = fresh.randn(&[2, 16], DType::F32, &candle_core::Device::Cpu).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn sample_prediction_is_a_clear_error() {
        let cfg = SchedulerConfig::from_json_str(r#"{"prediction_type":"sample"}"#).unwrap();
        let err = EulerAncestralScheduler::new(&cfg, 10).unwrap_err().to_string();
        assert!(err.contains("prediction_type") && err.contains("sample"), "{err}");
        // Euler-only options are not this class's: from_config drops them.
        let cfg =
            SchedulerConfig::from_json_str(r#"{"use_karras_sigmas":true,"interpolation_type":"log_linear"}"#).unwrap();
        let plain = EulerAncestralScheduler::new(&SchedulerConfig::default(), 10).unwrap();
        assert_eq!(EulerAncestralScheduler::new(&cfg, 10).unwrap().sigmas(), plain.sigmas());
    }
}
