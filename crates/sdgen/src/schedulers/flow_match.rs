//! Euler's method on a rectified flow (SD 3 / 3.5: <https://huggingface.co/papers/2403.03206>), as
//! diffusers 0.42.1's `FlowMatchEulerDiscreteScheduler`: the model predicts the velocity
//! `v = ε − x₀` of the straight path `x_σ = (1 − σ)·x₀ + σ·ε`, and each step moves the sample
//! along it from this sigma to the next, `x + (σ_next − σ)·v`, in f32.
//!
//! The sigmas: `n` timesteps spaced linearly from the largest to the smallest *training* sigma
//! (the latter already shifted at construction, as diffusers does, then shifted again), divided
//! by the training timesteps, then shifted: by `shift` (SD 3.5: 3.0, `σ' = s·σ / (1 + (s − 1)·σ)`)
//! or, with `use_dynamic_shifting`, by the image-size-dependent `mu` of [`calculate_shift`]
//! (`exponential`: `e^μ / (e^μ + 1/σ − 1)`, `linear`: `μ / (μ + 1/σ − 1)`). Then the options SD 3.5
//! leaves off: `shift_terminal` (stretch so the last sigma is that value), Karras or exponential
//! spacing between the ends, `invert_sigmas`. The final sigma is 0 (1 when inverted). Timesteps
//! are `σ · num_train_timesteps`. Refused: `use_beta_sigmas` (needs scipy's beta quantiles) and
//! `stochastic_sampling`.
//!
//! Arithmetic follows diffusers': the training sigmas in float32 torch ops, the schedule in
//! float64 numpy, cast to float32 once.

use candle_core::{DType, Tensor};

use super::config::SchedulerConfig;
use super::euler::karras_sigmas;
use super::noise::np_linspace;
use super::{at, check_steps, mul_coef, round_to, Scheduler, SchedulerKind};
use crate::rng::batch::BatchNoise;
use crate::{Error, Result};

/// How `use_dynamic_shifting` maps `mu` and a sigma to the shifted sigma (`time_shift_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeShift {
    Exponential,
    Linear,
}

/// Where the sigmas between the ends come from after shifting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spacing {
    Shifted,
    Karras,
    Exponential,
}

/// The flow-matching fields of a scheduler config, resolved with the class's defaults.
#[derive(Debug, Clone)]
struct FlowParams {
    num_train_timesteps: usize,
    shift: f64,
    /// `Some` with `use_dynamic_shifting`.
    dynamic: Option<TimeShift>,
    invert_sigmas: bool,
    shift_terminal: Option<f64>,
    spacing: Spacing,
}

fn bad(what: String) -> Error {
    Error::BadModel(format!("scheduler config: {what} (FlowMatchEulerDiscreteScheduler)"))
}

impl FlowParams {
    fn resolve(config: &SchedulerConfig) -> Result<Self> {
        let num_train_timesteps = config.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps < 1 {
            return Err(bad("num_train_timesteps 0".into()));
        }
        let shift = config.shift.unwrap_or(1.0);
        if !(shift.is_finite() && shift > 0.0) {
            return Err(bad(format!("shift {shift} is not a positive number")));
        }
        let time_shift = match config.time_shift_type.as_deref().unwrap_or("exponential") {
            "exponential" => TimeShift::Exponential,
            "linear" => TimeShift::Linear,
            other => {
                return Err(bad(format!("time_shift_type \"{other}\" is not supported (valid: exponential, linear)")))
            }
        };
        let flags = [
            (config.use_karras_sigmas, "use_karras_sigmas"),
            (config.use_exponential_sigmas, "use_exponential_sigmas"),
            (config.use_beta_sigmas, "use_beta_sigmas"),
        ];
        let set: Vec<&str> = flags.iter().filter(|(v, _)| v.unwrap_or(false)).map(|(_, n)| *n).collect();
        let spacing = match set.as_slice() {
            [] => Spacing::Shifted,
            ["use_karras_sigmas"] => Spacing::Karras,
            ["use_exponential_sigmas"] => Spacing::Exponential,
            ["use_beta_sigmas"] => {
                return Err(bad(
                    "use_beta_sigmas=true is not supported by sdgen (it needs scipy's beta quantiles)".into()
                ))
            }
            _ => return Err(bad(format!("only one of {} can be set", set.join(", ")))),
        };
        if config.stochastic_sampling.unwrap_or(false) {
            return Err(bad("stochastic_sampling=true is not supported by sdgen".into()));
        }
        Ok(Self {
            num_train_timesteps,
            shift,
            dynamic: config.use_dynamic_shifting.unwrap_or(false).then_some(time_shift),
            invert_sigmas: config.invert_sigmas.unwrap_or(false),
            // diffusers tests `if self.config.shift_terminal:`, so 0 is off too.
            shift_terminal: config.shift_terminal.filter(|&v| v != 0.0),
            spacing,
        })
    }

    /// The largest and smallest training sigmas (`sigma_max`, `sigma_min` of `__init__`): the
    /// float32 `linspace(1, T, T) / T`, shifted by `shift` in float32 unless shifting is dynamic.
    fn training_sigma_range(&self) -> (f64, f64) {
        let t = self.num_train_timesteps as f32;
        let shifted = |s: f32| match self.dynamic {
            Some(_) => s,
            None => {
                let shift = self.shift as f32;
                (shift * s) / (1.0 + (self.shift - 1.0) as f32 * s)
            }
        };
        // The first training timestep is T itself (T / T = 1 exactly), the last 1.
        (shifted(1.0) as f64, shifted(1.0 / t) as f64)
    }
}

/// SD 3's `calculate_shift`: `mu` linear in the image's token count, `base_shift` at
/// `base_seq_len` tokens and `max_shift` at `max_seq_len`.
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: usize,
    max_seq_len: usize,
    base_shift: f64,
    max_shift: f64,
) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// The `mu` SD 3's pipelines pass to a scheduler whose config sets `use_dynamic_shifting`, for an
/// image of `image_seq_len` tokens (latent height / patch × latent width / patch), from the
/// config's `base_image_seq_len`, `max_image_seq_len`, `base_shift` and `max_shift` (defaults 256,
/// 4096, 0.5, 1.15); `None` when the config shifts statically (SD 3.5).
pub fn dynamic_shift_mu(config: &SchedulerConfig, image_seq_len: usize) -> Option<f64> {
    config.use_dynamic_shifting.unwrap_or(false).then(|| {
        calculate_shift(
            image_seq_len,
            config.base_image_seq_len.unwrap_or(256),
            config.max_image_seq_len.unwrap_or(4096),
            config.base_shift.unwrap_or(0.5),
            config.max_shift.unwrap_or(1.15),
        )
    })
}

/// The first step an image-to-image run of `num_inference_steps` at `strength` takes (SD 3's
/// `get_timesteps`): `int(max(n − min(n·strength, n), 0))`, the product not truncated first (10
/// steps at 0.75 start at step 2, where SD 1.5's rule skips 3).
pub fn img2img_start_step(num_inference_steps: usize, strength: f64) -> usize {
    let n = num_inference_steps as f64;
    let init_timestep = (n * strength).min(n);
    (n - init_timestep).max(0.0) as usize
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` after `set_timesteps(num_inference_steps, mu=..)`.
#[derive(Debug)]
pub struct FlowMatchEulerScheduler {
    /// One per timestep, plus the final sigma (0, or 1 when inverted).
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
}

impl FlowMatchEulerScheduler {
    /// Builds the scheduler with `FlowMatchEulerDiscreteScheduler`'s defaults for fields `config`
    /// lacks. `mu` is required when the config sets `use_dynamic_shifting` (see
    /// [`dynamic_shift_mu`]) and ignored otherwise, as in diffusers.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize, mu: Option<f64>) -> Result<Self> {
        let params = FlowParams::resolve(config)?;
        let t_train = params.num_train_timesteps;
        check_steps(SchedulerKind::FlowMatchEuler, num_inference_steps, t_train)?;
        let n = num_inference_steps;
        let (sigma_max, sigma_min) = params.training_sigma_range();
        let t = t_train as f64;
        let mut sigmas: Vec<f64> = np_linspace(sigma_max * t, sigma_min * t, n).into_iter().map(|ts| ts / t).collect();
        match params.dynamic {
            Some(shift) => {
                let mu = mu.ok_or_else(|| {
                    Error::InvalidInput(
                        "the scheduler config sets use_dynamic_shifting: the run must give mu (from the image size, \
                         see schedulers::dynamic_shift_mu)"
                            .into(),
                    )
                })?;
                let e_mu = mu.exp();
                for s in &mut sigmas {
                    *s = match shift {
                        TimeShift::Exponential => e_mu / (e_mu + (1.0 / *s - 1.0)),
                        TimeShift::Linear => mu / (mu + (1.0 / *s - 1.0)),
                    };
                }
            }
            None => {
                let shift = params.shift;
                for s in &mut sigmas {
                    *s = shift * *s / (1.0 + (shift - 1.0) * *s);
                }
            }
        }
        if let Some(terminal) = params.shift_terminal {
            // LTX-Video's stretch so the last sigma is `terminal`.
            let last = 1.0 - sigmas[n - 1];
            if last == 0.0 {
                return Err(Error::InvalidInput(format!(
                    "the scheduler config's shift_terminal {terminal} needs at least 2 steps (with 1 the only sigma is 1, \
                     and diffusers divides by 1 − 1)"
                )));
            }
            let scale = last / (1.0 - terminal);
            for s in &mut sigmas {
                *s = 1.0 - (1.0 - *s) / scale;
            }
        }
        let (first, last) = (sigmas[0], sigmas[n - 1]);
        match params.spacing {
            Spacing::Shifted => {}
            Spacing::Karras => sigmas = karras_sigmas(last, first, n),
            Spacing::Exponential => sigmas = np_linspace(first.ln(), last.ln(), n).iter().map(|x| x.exp()).collect(),
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        if params.invert_sigmas {
            sigmas.iter_mut().for_each(|s| *s = 1.0 - *s);
        }
        let timesteps = sigmas.iter().map(|&s| (s * t_train as f32) as f64).collect();
        sigmas.push(if params.invert_sigmas { 1.0 } else { 0.0 });
        Ok(Self { sigmas, timesteps })
    }

    /// The sigmas of the run: one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `sample` (clean latents) moved to the noise level of `timesteps()[step_index]`:
    /// `σ·noise + (1 − σ)·sample` (diffusers' `scale_noise` after `set_begin_index`), σ rounded to
    /// the sample's dtype first and each product in that dtype, as diffusers computes it.
    pub fn scale_noise(&self, sample: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "flow-euler")?;
        let dtype = sample.dtype();
        let sigma = round_to(sigma as f64, dtype);
        let one_minus = round_to(1.0 - sigma, dtype);
        mul_coef(&noise.to_dtype(dtype)?, sigma)? + mul_coef(sample, one_minus)?
    }
}

impl Scheduler for FlowMatchEulerScheduler {
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
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, "flow-euler")?;
        let dt = self.sigmas[step_index + 1] - sigma;
        // diffusers upcasts the sample. `dt * model_output` is in the output's dtype, and with the
        // 0-d float32 `dt` as the *first* operand torch casts it to that dtype before multiplying
        // (only a second operand keeps its f32 value: `model_output * dt` would not round it).
        // The sum is f32, then cast back.
        let dtype = model_output.dtype();
        let scaled = mul_coef(model_output, round_to(dt as f64, dtype))?;
        let prev = (sample.to_dtype(DType::F32)? + scaled.to_dtype(DType::F32)?)?;
        prev.to_dtype(dtype)
    }

    fn order(&self) -> usize {
        1
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        self.scale_noise(original, noise, step_index)
    }
}

#[cfg(test)]
#[path = "flow_match_tests.rs"]
mod tests;
