//! Latent consistency sampling ("Latent Consistency Models", <https://arxiv.org/abs/2310.04378>),
//! as diffusers' `LCMScheduler`: each step maps the sample straight to its consistency estimate
//! of x0, `denoised = c_out · x̂0 + c_skip · x_t` (the boundary condition of consistency models,
//! with the timestep scaled by `timestep_scaling`), and, except at the last step, re-noises it to
//! the next timestep with fresh noise from the run's generators.
//!
//! The timesteps are not spaced over the training schedule but picked from the distillation
//! schedule the model was trained on: the `original_inference_steps` (50) timesteps
//! `T / 50 · k − 1`, of which N are taken evenly by index from the top. `timestep_spacing` and
//! `steps_offset` are accepted and ignored, as diffusers ignores them.

use candle_core::Tensor;

use super::config::{CommonParams, PredictionType, SchedulerConfig, TimestepSpacing};
use super::noise::{alphas_cumprod, betas};
use super::{at, check_steps, ddpm_add_noise, div_scalar, mul_scalar, Scheduler, SchedulerKind};
use crate::rng::batch::BatchNoise;
use crate::{Error, Result};

/// The consistency models' data standard deviation (`sigma_data` in diffusers, 0.5 always).
const SIGMA_DATA: f32 = 0.5;

/// diffusers' `LCMScheduler` after `set_timesteps(num_inference_steps)`.
#[derive(Debug)]
pub struct LcmScheduler {
    alphas_cumprod: Vec<f32>,
    prediction_type: PredictionType,
    /// `Some(range)` to clamp the predicted x0 to `[-range, range]` (`clip_sample`).
    clip_sample_range: Option<f32>,
    timestep_scaling: f32,
    timesteps: Vec<f64>,
    timesteps_int: Vec<usize>,
}

impl LcmScheduler {
    /// Builds the scheduler with `LCMScheduler`'s defaults for fields `config` lacks (unlike the
    /// other classes, a scaled-linear schedule from 0.00085 to 0.012, and no clipping). Refused:
    /// N above `original_inference_steps` (the schedule N is picked from) or the training
    /// timesteps, an original schedule longer than the training one, and dynamic thresholding.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let own = SchedulerConfig {
            beta_start: config.beta_start.or(Some(0.00085)),
            beta_end: config.beta_end.or(Some(0.012)),
            beta_schedule: config.beta_schedule.clone().or_else(|| Some("scaled_linear".into())),
            ..config.clone()
        };
        let params = CommonParams::resolve(&own, TimestepSpacing::Leading)?;
        let t_train = params.num_train_timesteps;
        let n = num_inference_steps;
        check_steps(SchedulerKind::Lcm, n, t_train)?;
        if config.thresholding.unwrap_or(false) {
            return Err(Error::BadModel(
                "scheduler config: thresholding=true (dynamic thresholding) is not supported by sdgen's LCM".into(),
            ));
        }
        let original = config.original_inference_steps.unwrap_or(50);
        if original == 0 || original > t_train {
            return Err(Error::BadModel(format!(
                "scheduler config: original_inference_steps {original} is not within 1..={t_train} (the training timesteps)"
            )));
        }
        if n > original {
            return Err(Error::InvalidInput(format!(
                "lcm: {n} steps is more than the {original} of the distillation schedule it picks from \
                 (original_inference_steps): use at most {original} steps"
            )));
        }
        // lcm_origin_timesteps = arange(1, original + 1) · (T // original) − 1, from the top.
        let k = t_train / original;
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        // inference_indices = floor(linspace(0, len, N, endpoint=False)).
        let step = origin.len() as f64 / n as f64;
        let timesteps_int: Vec<usize> = (0..n).map(|i| origin[(i as f64 * step).floor() as usize]).collect();
        let alphas_cumprod = alphas_cumprod(&betas(&params, config.rescale_betas_zero_snr.unwrap_or(false)));
        Ok(Self {
            alphas_cumprod,
            prediction_type: params.prediction_type,
            clip_sample_range: config
                .clip_sample
                .unwrap_or(false)
                .then(|| config.clip_sample_range.unwrap_or(1.0) as f32),
            timestep_scaling: config.timestep_scaling.unwrap_or(10.0) as f32,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
        })
    }

    /// `(c_skip, c_out)` at timestep `t`, in f32 as diffusers computes them from the int64
    /// timestep tensor (`t · timestep_scaling` is a float32 tensor).
    fn boundary_scalings(&self, t: usize) -> (f32, f32) {
        let scaled = t as f32 * self.timestep_scaling;
        let d2 = SIGMA_DATA * SIGMA_DATA;
        let denom = scaled * scaled + d2;
        (d2 / denom, scaled / denom.sqrt())
    }
}

impl Scheduler for LcmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        let t = at(&self.timesteps_int, step_index, "lcm")?;
        // The last step re-noises to its own timestep, which it never does (see below).
        let prev_t = self.timesteps_int.get(step_index + 1).copied().unwrap_or(t);
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = self.alphas_cumprod[prev_t];
        let beta_t = 1.0 - alpha_t;
        let (c_skip, c_out) = self.boundary_scalings(t);
        // 1. The model's estimate of x0.
        let pred_original = match self.prediction_type {
            PredictionType::Epsilon => {
                div_scalar(&(sample - mul_scalar(model_output, beta_t.sqrt())?)?, alpha_t.sqrt())?
            }
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                (mul_scalar(sample, alpha_t.sqrt())? - mul_scalar(model_output, beta_t.sqrt())?)?
            }
        };
        let pred_original = match self.clip_sample_range {
            Some(r) => pred_original.clamp(-r, r)?,
            None => pred_original,
        };
        // 2. The consistency function's boundary condition.
        let denoised = (mul_scalar(&pred_original, c_out)? + mul_scalar(sample, c_skip)?)?;
        // 3. Multistep sampling: re-noise to the next timestep, except after the last one (no
        //    draw then, as diffusers' generators advance only in the other steps).
        if step_index + 1 == self.timesteps_int.len() {
            return Ok(denoised);
        }
        let eps = noise.randn(model_output.dims(), denoised.dtype(), model_output.device())?;
        mul_scalar(&denoised, alpha_prev.sqrt())? + mul_scalar(&eps, (1.0 - alpha_prev).sqrt())?
    }

    fn order(&self) -> usize {
        1
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let t = at(&self.timesteps_int, step_index, "lcm")?;
        ddpm_add_noise(self.alphas_cumprod[t], original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{check_reference, Reference};
    use super::super::{build, SchedulerConfig, SchedulerKind};
    use super::*;

    /// `tools/reference/make_lcm_scheduler.py`: timesteps for 1–50 steps (and diffusers'
    /// refusals), then 10-step runs in f32, f16 and a batch of 2 with per-image generators, on the
    /// LCM Dreamshaper v7 config, SDXL's (as LCM-LoRA users swap it in), v-prediction with
    /// clipping and zero-SNR betas, and x0-prediction on trained betas.
    #[test]
    fn matches_diffusers_lcm() {
        check_reference(&Reference::load_from("lcm"), SchedulerKind::Lcm);
    }

    #[test]
    fn timesteps_come_from_the_distillation_schedule() {
        let s = LcmScheduler::new(&SchedulerConfig::default(), 4).unwrap();
        // diffusers: LCMScheduler().set_timesteps(4) → [999, 759, 499, 259].
        assert_eq!(s.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
        let one = LcmScheduler::new(&SchedulerConfig::default(), 1).unwrap();
        assert_eq!(one.timesteps(), &[999.0]);
        let err = build(SchedulerKind::Lcm, &SchedulerConfig::default(), 51).err().unwrap().to_string();
        assert!(err.contains("original_inference_steps") && err.contains("at most 50"), "{err}");
    }

    #[test]
    fn boundary_condition_tends_to_the_estimate() {
        let s = LcmScheduler::new(&SchedulerConfig::default(), 4).unwrap();
        let (skip, out) = s.boundary_scalings(999);
        assert!(skip < 1e-7 && (out - 1.0).abs() < 1e-7, "{skip} {out}");
        let (skip, out) = s.boundary_scalings(0);
        assert_eq!((skip, out), (1.0, 0.0));
    }

    #[test]
    fn only_the_steps_before_the_last_draw_noise() {
        let mut s = build(SchedulerKind::Lcm, &SchedulerConfig::default(), 3).unwrap();
        let dev = candle_core::Device::Cpu;
        let x = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let mut noise = BatchNoise::new(&[3]);
        for i in 0..3 {
            s.step(&x, i, &x, &mut noise).unwrap();
        }
        let mut fresh = BatchNoise::new(&[3]);
        for _ in 0..2 {
            fresh.randn(&[1, 4, 2, 2], candle_core::DType::F32, &dev).unwrap();
        }
        let a = noise.randn(&[1, 16], candle_core::DType::F32, &dev).unwrap();
        let b = fresh.randn(&[1, 16], candle_core::DType::F32, &dev).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn thresholding_and_bad_original_steps_are_clear_errors() {
        let cfg = SchedulerConfig::from_json_str(r#"{"thresholding": true}"#).unwrap();
        let err = build(SchedulerKind::Lcm, &cfg, 4).err().unwrap().to_string();
        assert!(err.contains("thresholding"), "{err}");
        let cfg = SchedulerConfig::from_json_str(r#"{"original_inference_steps": 2000}"#).unwrap();
        let err = build(SchedulerKind::Lcm, &cfg, 4).err().unwrap().to_string();
        assert!(err.contains("original_inference_steps 2000"), "{err}");
    }
}
