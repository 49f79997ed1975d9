//! Euler's method on the probability-flow ODE in the sigma parameterisation of Karras et al.
//! (<https://huggingface.co/papers/2206.00364>, Algorithm 2 without churn), as diffusers'
//! `EulerDiscreteScheduler`: the model input is scaled by `1 / sqrt(sigma^2 + 1)`, and each step
//! moves the sample along `(x - x0) / sigma` from this sigma to the next.

use candle_core::{DType, Tensor};

use super::config::{CommonParams, PredictionType, SchedulerConfig, TimestepSpacing};
use super::noise::{alphas_cumprod, betas, leading_base, linspace_asc, np_linspace, trailing_desc};
use super::{at, check_steps, div_scalar, mul_coef, mul_scalar, round_to, Scheduler, SchedulerKind};
use crate::rng::batch::BatchNoise;
use crate::{Error, Result};

/// Where the sigmas of the run come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigmaSchedule {
    /// Training sigmas interpolated at the spaced timesteps.
    Interpolated,
    /// Karras et al.'s rho = 7 schedule between sigma_max and sigma_min.
    Karras,
    /// Log-linear between sigma_max and sigma_min.
    Exponential,
}

/// diffusers' `EulerDiscreteScheduler` after `set_timesteps(num_inference_steps)`.
#[derive(Debug)]
pub struct EulerScheduler {
    prediction_type: PredictionType,
    /// One per timestep, plus the final sigma (0 or the smallest training sigma).
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
}

impl EulerScheduler {
    /// Builds the scheduler with `EulerDiscreteScheduler`'s defaults for fields `config` lacks
    /// (note `timestep_spacing` defaults to `linspace` here).
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        // "original_sample" is an older spelling of "sample" that only this class still accepts.
        let mut config = config.clone();
        if config.prediction_type.as_deref() == Some("original_sample") {
            config.prediction_type = Some("sample".into());
        }
        let params = CommonParams::resolve(&config, TimestepSpacing::Linspace)?;
        let t_train = params.num_train_timesteps;
        check_steps(SchedulerKind::Euler, num_inference_steps, t_train)?;
        let EulerOptions { schedule, continuous, final_sigma_min } = EulerOptions::resolve(&config)?;

        let rescale = config.rescale_betas_zero_snr.unwrap_or(false);
        let mut alphas_cumprod = alphas_cumprod(&betas(&params, rescale));
        if rescale {
            // Close to 0 without being 0 so the first sigma is finite (fp16's smallest subnormal).
            alphas_cumprod[t_train - 1] = 2f32.powi(-24);
        }
        // Training sigmas, ascending in t: sqrt((1 - a) / a), in f32.
        let train_sigmas: Vec<f32> = alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();

        let n = num_inference_steps;
        // Timesteps as numpy computes them, in float32.
        let spaced: Vec<f32> = match params.timestep_spacing {
            TimestepSpacing::Linspace => linspace_asc(t_train, n).iter().rev().map(|&t| t as f32).collect(),
            TimestepSpacing::Leading => {
                leading_base(t_train, n).iter().rev().map(|&t| t as f32 + params.steps_offset as f32).collect()
            }
            TimestepSpacing::Trailing => trailing_desc(t_train, n).iter().map(|&t| t as f32).collect(),
        };
        let interpolated: Vec<f64> = spaced.iter().map(|&t| np_interp_index(t as f64, &train_sigmas)).collect();

        let (mut sigmas, mut timesteps): (Vec<f64>, Vec<f32>) = match schedule {
            SigmaSchedule::Interpolated => (interpolated, spaced),
            SigmaSchedule::Karras | SigmaSchedule::Exponential => {
                let sigma_min = config.sigma_min.unwrap_or(interpolated[interpolated.len() - 1]);
                let sigma_max = config.sigma_max.unwrap_or(interpolated[0]);
                let sigmas = if schedule == SigmaSchedule::Karras {
                    karras_sigmas(sigma_min, sigma_max, n)
                } else {
                    np_linspace(sigma_max.ln(), sigma_min.ln(), n).iter().map(|x| x.exp()).collect()
                };
                let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
                let timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32).collect();
                (sigmas, timesteps)
            }
        };
        let sigma_last = if final_sigma_min { train_sigmas[0] as f64 } else { 0.0 };
        sigmas.push(sigma_last);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        if continuous && params.prediction_type == PredictionType::VPrediction {
            // EDM-style conditioning: the UNet takes c_noise = ln(sigma) / 4 instead of t.
            timesteps = sigmas[..sigmas.len() - 1].iter().map(|s| 0.25 * s.ln()).collect();
        }

        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match params.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            prediction_type: params.prediction_type,
            sigmas,
            timesteps: timesteps.into_iter().map(|t| t as f64).collect(),
            init_noise_sigma,
        })
    }

    /// The sigmas of the run: one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

/// The Euler-only config fields, resolved with `EulerDiscreteScheduler`'s defaults.
struct EulerOptions {
    schedule: SigmaSchedule,
    /// `timestep_type: continuous`.
    continuous: bool,
    /// `final_sigmas_type: sigma_min` (else zero).
    final_sigma_min: bool,
}

impl EulerOptions {
    fn resolve(config: &SchedulerConfig) -> Result<Self> {
        let unsupported =
            |what: &str| Err(Error::BadModel(format!("scheduler config: {what} is not supported by sdgen's Euler")));
        match config.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => {}
            // log_linear (N + 1 log-spaced sigmas plus the final one, so the run ends at the
            // smallest training sigma, never at the final one) is rare; not implemented yet.
            other => return unsupported(&format!("interpolation_type \"{other}\"")),
        }
        if config.use_beta_sigmas.unwrap_or(false) {
            return unsupported("use_beta_sigmas=true");
        }
        let karras = config.use_karras_sigmas.unwrap_or(false);
        let exponential = config.use_exponential_sigmas.unwrap_or(false);
        let schedule = match (karras, exponential) {
            (false, false) => SigmaSchedule::Interpolated,
            (true, false) => SigmaSchedule::Karras,
            (false, true) => SigmaSchedule::Exponential,
            (true, true) => {
                return Err(Error::BadModel(
                    "scheduler config: only one of use_karras_sigmas and use_exponential_sigmas can be set".into(),
                ))
            }
        };
        let continuous = match config.timestep_type.as_deref().unwrap_or("discrete") {
            "discrete" => false,
            "continuous" => true,
            other => {
                return Err(Error::BadModel(format!(
                    "scheduler config: timestep_type \"{other}\" is not supported (valid: discrete, continuous)"
                )))
            }
        };
        let final_sigma_min = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => false,
            "sigma_min" => true,
            other => {
                return Err(Error::BadModel(format!(
                    "scheduler config: final_sigmas_type \"{other}\" is not supported (valid: zero, sigma_min)"
                )))
            }
        };
        Ok(Self { schedule, continuous, final_sigma_min })
    }
}

/// `np.interp(x, arange(len(fp)), fp)` in f64: exact at the sample points, linear between them,
/// clamped at the ends.
pub(super) fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j] as f64;
    }
    // The x spacing is 1, so the slope is the difference of neighbours.
    let slope = fp[j + 1] as f64 - fp[j] as f64;
    slope * (x - j as f64) + fp[j] as f64
}

/// Karras et al.'s schedule: `(max^(1/rho) + ramp * (min^(1/rho) - max^(1/rho)))^rho`, rho = 7.
pub(super) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n).iter().map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho)).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma interpolates to
/// `ln(sigma)`, from the last training index at or below it.
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let low_idx =
        log_sigmas.iter().rposition(|&ls| log_sigma - ls as f64 >= 0.0).unwrap_or(0).min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    // low - log_sigma is f64 (f32 promoted), low - high stays f32, as in numpy.
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

impl Scheduler for EulerScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "euler")?;
        div_scalar(sample, (sigma * sigma + 1.0).sqrt())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "euler")?;
        let sigma_next = self.sigmas[step_index + 1];
        // No churn (s_churn = 0): sigma_hat = sigma.
        let sigma_hat = sigma;
        // Upcast to avoid precision issues, as diffusers does; products with model_output stay in
        // its dtype (torch keeps a tensor's dtype when multiplying by a 0-d float32 tensor).
        let sample = sample.to_dtype(DType::F32)?;
        let pred_original = match self.prediction_type {
            PredictionType::Epsilon => (&sample - mul_scalar(model_output, sigma_hat)?.to_dtype(DType::F32)?)?,
            PredictionType::Sample => model_output.to_dtype(DType::F32)?,
            PredictionType::VPrediction => {
                // denoised = model_output * c_out + input * c_skip
                let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
                let skip = div_scalar(&sample, sigma * sigma + 1.0)?;
                (mul_scalar(model_output, c_out)?.to_dtype(DType::F32)? + skip)?
            }
        };
        let derivative = div_scalar(&(&sample - pred_original)?, sigma_hat)?;
        let dt = sigma_next - sigma_hat;
        let prev = (sample + mul_scalar(&derivative, dt)?)?;
        prev.to_dtype(model_output.dtype())
    }

    fn order(&self) -> usize {
        1
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "euler")?;
        sigma_add_noise(sigma, original, noise)
    }
}

/// diffusers' Euler `add_noise`: `x + ε·σ`, with σ cast to `original`'s dtype first.
pub(super) fn sigma_add_noise(sigma: f32, original: &Tensor, noise: &Tensor) -> candle_core::Result<Tensor> {
    let sigma = round_to(sigma as f64, original.dtype());
    original + mul_coef(&noise.to_dtype(original.dtype())?, sigma)?
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{check_reference, Reference};
    use super::super::{SchedulerConfig, SchedulerKind};
    use super::*;

    #[test]
    fn matches_diffusers_euler() {
        check_reference(&Reference::load(), SchedulerKind::Euler);
    }

    #[test]
    fn sigmas_match_diffusers() {
        let reference = Reference::load();
        for (name, config) in &reference.configs {
            for &n in &reference.step_counts {
                let key = format!("{name}.euler.sigmas.{n}");
                let Some(expected) = reference.vec_f64(&key) else {
                    continue;
                };
                let euler = EulerScheduler::new(config, n).unwrap();
                let got: Vec<f64> = euler.sigmas().iter().map(|&s| s as f64).collect();
                super::super::testutil::assert_close(&got, &expected, 1e-5, &key);
            }
        }
    }

    #[test]
    fn unsupported_options_are_clear_errors() {
        for (json, needle) in [
            (r#"{"interpolation_type":"log_linear"}"#, "interpolation_type"),
            (r#"{"use_beta_sigmas":true}"#, "use_beta_sigmas"),
            (r#"{"final_sigmas_type":"one"}"#, "final_sigmas_type"),
        ] {
            let cfg = SchedulerConfig::from_json_str(json).unwrap();
            let err = EulerScheduler::new(&cfg, 10).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
