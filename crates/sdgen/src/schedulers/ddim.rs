//! DDIM, "Denoising Diffusion Implicit Models" (<https://huggingface.co/papers/2010.02502>), as
//! diffusers' `DDIMScheduler` with eta = 0 (the deterministic sampler every pipeline uses by
//! default): predict x0, then move along the predicted noise direction to the previous timestep.

use candle_core::Tensor;

use super::config::{CommonParams, PredictionType, SchedulerConfig, TimestepSpacing};
use super::noise::{alphas_cumprod, betas, leading_base, linspace_asc, trailing_desc};
use super::{at, check_steps, ddpm_add_noise, div_scalar, mul_scalar, Scheduler, SchedulerKind};
use crate::rng::batch::BatchNoise;
use crate::{Error, Result};

/// diffusers' `DDIMScheduler` after `set_timesteps(num_inference_steps)`.
#[derive(Debug)]
pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    /// The alpha product "before" timestep 0: 1 with `set_alpha_to_one` (the default), else
    /// `alphas_cumprod[0]`.
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    /// `Some(range)` to clamp the predicted x0 to `[-range, range]`.
    clip_sample_range: Option<f32>,
    /// `T // N`: diffusers steps back by this whatever the spacing.
    step_ratio: i64,
    timesteps: Vec<f64>,
    timesteps_int: Vec<i64>,
}

impl DdimScheduler {
    /// Builds the scheduler with `DDIMScheduler`'s defaults for fields `config` lacks (note
    /// `clip_sample` and `set_alpha_to_one` default to true).
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let params = CommonParams::resolve(config, TimestepSpacing::Leading)?;
        let t_train = params.num_train_timesteps;
        check_steps(SchedulerKind::Ddim, num_inference_steps, t_train)?;
        super::check_offset_schedule(SchedulerKind::Ddim, num_inference_steps, &params)?;
        if config.thresholding.unwrap_or(false) {
            // Imagen's dynamic thresholding is for pixel-space models; no latent model uses it.
            return Err(Error::BadModel(
                "scheduler config: thresholding=true (dynamic thresholding) is not supported by sdgen's DDIM".into(),
            ));
        }
        let rescale = config.rescale_betas_zero_snr.unwrap_or(false);
        let alphas_cumprod = alphas_cumprod(&betas(&params, rescale));
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] };
        let clip_sample_range =
            config.clip_sample.unwrap_or(true).then(|| config.clip_sample_range.unwrap_or(1.0) as f32);

        let n = num_inference_steps;
        let timesteps_int: Vec<i64> = match params.timestep_spacing {
            TimestepSpacing::Linspace => {
                linspace_asc(t_train, n).iter().rev().map(|t| t.round_ties_even() as i64).collect()
            }
            TimestepSpacing::Leading => {
                leading_base(t_train, n).iter().rev().map(|t| t + params.steps_offset).collect()
            }
            TimestepSpacing::Trailing => trailing_desc(t_train, n).iter().map(|&t| t as i64).collect(),
        };
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction_type: params.prediction_type,
            clip_sample_range,
            step_ratio: (t_train / n) as i64,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
        })
    }

    fn alpha_at(&self, timestep: i64) -> candle_core::Result<f32> {
        if timestep < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod.get(timestep as usize).copied().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "ddim: timestep {timestep} is outside the {} training timesteps",
                self.alphas_cumprod.len()
            ))
        })
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        let timestep = at(&self.timesteps_int, step_index, "ddim")?;
        let prev_timestep = timestep - self.step_ratio;
        let alpha_t = self.alpha_at(timestep)?;
        let alpha_prev = self.alpha_at(prev_timestep)?;
        let beta_t = 1.0 - alpha_t;

        // 1. x0 and the noise it implies, from what the model predicts.
        let (pred_original, pred_epsilon) = match self.prediction_type {
            PredictionType::Epsilon => {
                let x0 = div_scalar(&(sample - mul_scalar(model_output, beta_t.sqrt())?)?, alpha_t.sqrt())?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = div_scalar(&(sample - mul_scalar(model_output, alpha_t.sqrt())?)?, beta_t.sqrt())?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = (mul_scalar(sample, alpha_t.sqrt())? - mul_scalar(model_output, beta_t.sqrt())?)?;
                let eps = (mul_scalar(model_output, alpha_t.sqrt())? + mul_scalar(sample, beta_t.sqrt())?)?;
                (x0, eps)
            }
        };
        // 2. Optional clipping of x0 (the predicted noise is deliberately left as it was, as with
        //    diffusers' default `use_clipped_model_output=False`).
        let pred_original = match self.clip_sample_range {
            Some(r) => pred_original.clamp(-r, r)?,
            None => pred_original,
        };
        // 3. eta = 0, so std_dev_t = 0 and the direction coefficient is sqrt(1 - alpha_prev).
        let direction = mul_scalar(&pred_epsilon, (1.0 - alpha_prev).sqrt())?;
        mul_scalar(&pred_original, alpha_prev.sqrt())? + direction
    }

    fn order(&self) -> usize {
        1
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let timestep = at(&self.timesteps_int, step_index, "ddim")?;
        ddpm_add_noise(self.alpha_at(timestep)?, original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{check_reference, Reference};
    use super::super::{build, SchedulerConfig, SchedulerKind};

    #[test]
    fn matches_diffusers_ddim() {
        check_reference(&Reference::load(), SchedulerKind::Ddim);
    }

    #[test]
    fn thresholding_is_a_clear_error() {
        let cfg = SchedulerConfig::from_json_str(r#"{"thresholding": true}"#).unwrap();
        let err = build(SchedulerKind::Ddim, &cfg, 10).err().unwrap().to_string();
        assert!(err.contains("thresholding"), "{err}");
        // Classes that don't take the field ignore it, as diffusers' from_config does.
        assert!(build(SchedulerKind::Euler, &cfg, 10).is_ok());
    }
}
