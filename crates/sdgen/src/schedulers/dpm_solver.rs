//! DPM-Solver++ (<https://huggingface.co/papers/2211.01095>), the multistep solver of the
//! diffusion ODE in the data-prediction (x0) parameterisation, as diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`: "DPM++ 2M" with its default
//! `solver_order=2` (orders 1 and 3 work too), and "DPM++ 2M Karras" with `use_karras_sigmas`.
//!
//! Each step converts the model output to a predicted x0, keeps the last `solver_order` of them,
//! and extrapolates in log-SNR `lambda = ln(alpha / sigma)`: first order (the DDIM-like step)
//! while the history is short and, as diffusers' `lower_order_final` wants, for the last steps of
//! short runs. Timesteps are integers (unlike Euler's); with Karras sigmas the UNet still sees
//! the rounded timestep nearest each sigma, as in diffusers. All scalar coefficients are
//! computed in f32, as diffusers computes them with 0-d float32 tensors.

use candle_core::{DType, Tensor};

use super::config::{CommonParams, PredictionType, SchedulerConfig, TimestepSpacing};
use super::euler::{karras_sigmas, np_interp_index, sigma_to_t};
use super::noise::{alphas_cumprod, betas, np_arange, np_linspace};
use super::{at, check_steps, div_scalar, mul_coef, mul_scalar, round_to, Scheduler, SchedulerKind};
use crate::rng::batch::BatchNoise;
use crate::{Error, Result};

/// Where the sigmas of the run come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigmaSchedule {
    /// Training sigmas at the spaced integer timesteps.
    Interpolated,
    /// Karras et al.'s rho = 7 schedule, timesteps rounded to the nearest training step.
    Karras,
    /// Uniform in lambda (Lu et al.'s "logSNR" spacing), timesteps rounded.
    LuLambdas,
    /// Log-linear in sigma, timesteps truncated.
    Exponential,
}

/// diffusers' `DPMSolverMultistepScheduler` (DPM-Solver++) after `set_timesteps(num_inference_steps)`.
#[derive(Debug)]
pub struct DpmSolverMultistepScheduler {
    kind: SchedulerKind,
    prediction_type: PredictionType,
    solver_order: usize,
    /// `solver_type="heun"` (else midpoint) for the second-order step.
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    /// `final_sigmas_type="zero"`: the run ends at sigma 0, reached with a first-order step.
    final_sigma_zero: bool,
    /// One per timestep, plus the final one.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    /// The last `solver_order` predicted x0, oldest first (diffusers' `model_outputs`).
    model_outputs: Vec<Option<Tensor>>,
    /// How many steps have filled the history, capped at `solver_order`.
    lower_order_nums: usize,
}

impl DpmSolverMultistepScheduler {
    /// Builds the scheduler with `DPMSolverMultistepScheduler`'s defaults for fields `config`
    /// lacks (`timestep_spacing` defaults to `linspace`, `solver_order` to 2).
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        Self::new_as(SchedulerKind::DpmPp2m, config, num_inference_steps)
    }

    /// [`DpmSolverMultistepScheduler::new`], with errors naming `kind`.
    pub(crate) fn new_as(kind: SchedulerKind, config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let params = CommonParams::resolve(config, TimestepSpacing::Linspace)?;
        let t_train = params.num_train_timesteps;
        check_steps(kind, num_inference_steps, t_train)?;
        let opts = DpmOptions::resolve(kind, config)?;

        let rescale = config.rescale_betas_zero_snr.unwrap_or(false);
        let mut alphas_cumprod = alphas_cumprod(&betas(&params, rescale));
        if rescale {
            // Close to 0 without being 0 so the first sigma is finite (fp16's smallest subnormal).
            alphas_cumprod[t_train - 1] = 2f32.powi(-24);
        }
        // Training sigmas, ascending in t: sqrt((1 - a) / a), in f32.
        let train_sigmas: Vec<f32> = alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();

        // Timesteps whose lambda is below lambda_min_clipped are cut off the top of the range
        // (`searchsorted(flip(lambda_t), lambda_min_clipped)`, compared in f64).
        let clipped = match opts.lambda_min_clipped {
            Some(min) => alphas_cumprod
                .iter()
                .rev()
                .map(|a| (a.sqrt().ln() - (1.0 - a).sqrt().ln()) as f64)
                .collect::<Vec<f64>>()
                .partition_point(|&lambda| lambda < min),
            None => 0,
        };
        let last_timestep = t_train - clipped;
        let n = num_inference_steps;
        let spaced: Vec<i64> = match params.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut t: Vec<i64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .iter()
                    .rev()
                    .map(|t| t.round_ties_even() as i64)
                    .collect();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = (last_timestep / (n + 1)) as i64;
                (1..=n as i64).rev().map(|i| i * ratio + params.steps_offset).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = t_train as f64 / n as f64;
                np_arange(last_timestep as f64, 0.0, -ratio).iter().map(|t| t.round_ties_even() as i64 - 1).collect()
            }
        };

        let in_sigma_min = train_sigmas[0] as f64;
        let in_sigma_max = train_sigmas[t_train - 1] as f64;
        // Config values of Euler's sigma_min/sigma_max reach this class too: from_config keeps
        // a compatible class's fields, and `_convert_to_karras` reads them with hasattr.
        let sigma_min = config.sigma_min.unwrap_or(in_sigma_min);
        let sigma_max = config.sigma_max.unwrap_or(in_sigma_max);
        // Fractional timesteps from sigma_to_t are rounded, except for the cosine schedule; the
        // int64 cast then truncates.
        let round = config.beta_schedule.as_deref().unwrap_or("linear") != "squaredcos_cap_v2";
        let from_sigmas = |sigmas: &[f64], round: bool| -> Vec<i64> {
            sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    (if round { t.round_ties_even() } else { t }) as i64
                })
                .collect()
        };
        let (mut sigmas, timesteps): (Vec<f64>, Vec<i64>) = match opts.schedule {
            SigmaSchedule::Interpolated => {
                (spaced.iter().map(|&t| np_interp_index(t as f64, &train_sigmas)).collect(), spaced)
            }
            SigmaSchedule::Karras => {
                let sigmas = karras_sigmas(sigma_min, sigma_max, n);
                let t = from_sigmas(&sigmas, round);
                (sigmas, t)
            }
            SigmaSchedule::LuLambdas => {
                // `_convert_to_lu` with rho = 1: linear from the largest log-sigma to the smallest.
                let (lambda_max, lambda_min) = (log_sigmas[t_train - 1] as f64, log_sigmas[0] as f64);
                let sigmas: Vec<f64> = np_linspace(0.0, 1.0, n)
                    .iter()
                    .map(|ramp| (lambda_max + ramp * (lambda_min - lambda_max)).exp())
                    .collect();
                let t = from_sigmas(&sigmas, round);
                (sigmas, t)
            }
            SigmaSchedule::Exponential => {
                let sigmas: Vec<f64> = np_linspace(sigma_max.ln(), sigma_min.ln(), n).iter().map(|x| x.exp()).collect();
                let t = from_sigmas(&sigmas, false);
                (sigmas, t)
            }
        };
        sigmas.push(if opts.final_sigma_zero { 0.0 } else { train_sigmas[0] as f64 });
        // diffusers finds the first step's index by value and takes the *second* match if the
        // first timestep repeats (meant for img2img), so the run starts one sigma late and fails
        // with an IndexError at its last step. Karras sigmas beyond the training range do that
        // (e.g. with the cosine schedule: 998 four times for 10 steps); refuse such runs here.
        if let Some(&first) = timesteps.first() {
            let repeats = timesteps.iter().filter(|&&t| t == first).count();
            if repeats > 1 {
                return Err(Error::InvalidInput(format!(
                    "{kind}: with this scheduler config, {n} steps repeat the first timestep {first} \
                     {repeats} times, which diffusers cannot run (it would start at the repeat and step past \
                     the last sigma); choose another step count or scheduler"
                )));
            }
        }

        Ok(Self {
            kind,
            prediction_type: params.prediction_type,
            solver_order: opts.solver_order,
            heun: opts.heun,
            lower_order_final: opts.lower_order_final,
            euler_at_final: opts.euler_at_final,
            final_sigma_zero: opts.final_sigma_zero,
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            timesteps: timesteps.into_iter().map(|t| t as f64).collect(),
            model_outputs: vec![None; opts.solver_order],
            lower_order_nums: 0,
        })
    }

    /// The sigmas of the run: one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `sigmas[index]` as `(alpha_t, sigma_t, lambda_t)`: `alpha = 1 / sqrt(sigma^2 + 1)`,
    /// `sigma_t = sigma * alpha`, `lambda = ln(alpha) - ln(sigma_t)` (+inf at sigma 0).
    fn alpha_sigma_lambda(&self, index: Option<usize>) -> candle_core::Result<(f32, f32, f32)> {
        let sigma = index.and_then(|i| self.sigmas.get(i).copied()).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: no sigma at step {index:?} (steps taken out of order?)", self.kind))
        })?;
        let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
        let sigma_t = sigma * alpha_t;
        Ok((alpha_t, sigma_t, alpha_t.ln() - sigma_t.ln()))
    }

    /// diffusers' `convert_model_output` for DPM-Solver++: the predicted x0, in the dtype of
    /// `model_output` (computed before `sample` is upcast).
    fn predicted_x0(&self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t, _) = self.alpha_sigma_lambda(Some(step_index))?;
        match self.prediction_type {
            PredictionType::Epsilon => div_scalar(&(sample - mul_scalar(model_output, sigma_t)?)?, alpha_t),
            PredictionType::Sample => Ok(model_output.clone()),
            PredictionType::VPrediction => mul_scalar(sample, alpha_t)? - mul_scalar(model_output, sigma_t)?,
        }
    }

    /// `coef * x`, with `x` in the model dtype, promoted to f32 as torch promotes it when adding
    /// to the f32 sample.
    fn term(x: &Tensor, coef: f32) -> candle_core::Result<Tensor> {
        mul_scalar(x, coef)?.to_dtype(DType::F32)
    }

    /// `dpm_solver_first_order_update` (DPM-Solver++ 1, i.e. DDIM in x0 form).
    fn first_order(&self, x0: &Tensor, i: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(Some(i + 1))?;
        let (_, sigma_s, lambda_s) = self.alpha_sigma_lambda(Some(i))?;
        let h = lambda_t - lambda_s;
        mul_scalar(sample, sigma_t / sigma_s)? - Self::term(x0, alpha_t * ((-h).exp() - 1.0))?
    }

    /// `multistep_dpm_solver_second_order_update` with the last two x0 predictions.
    fn second_order(&self, m0: &Tensor, m1: &Tensor, i: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(Some(i + 1))?;
        let (_, sigma_s0, lambda_s0) = self.alpha_sigma_lambda(Some(i))?;
        let (_, _, lambda_s1) = self.alpha_sigma_lambda(i.checked_sub(1))?;
        let h = lambda_t - lambda_s0;
        let r0 = (lambda_s0 - lambda_s1) / h;
        let d1 = mul_scalar(&(m0 - m1)?, 1.0 / r0)?;
        let exp_m1 = (-h).exp() - 1.0;
        let x = (mul_scalar(sample, sigma_t / sigma_s0)? - Self::term(m0, alpha_t * exp_m1)?)?;
        if self.heun {
            x + Self::term(&d1, alpha_t * (exp_m1 / h + 1.0))?
        } else {
            x - Self::term(&d1, 0.5 * (alpha_t * exp_m1))?
        }
    }

    /// `multistep_dpm_solver_third_order_update` with the last three x0 predictions.
    fn third_order(&self, m: [&Tensor; 3], i: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let [m0, m1, m2] = m;
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(Some(i + 1))?;
        let (_, sigma_s0, lambda_s0) = self.alpha_sigma_lambda(Some(i))?;
        let (_, _, lambda_s1) = self.alpha_sigma_lambda(i.checked_sub(1))?;
        let (_, _, lambda_s2) = self.alpha_sigma_lambda(i.checked_sub(2))?;
        let h = lambda_t - lambda_s0;
        let (r0, r1) = ((lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h);
        let d1_0 = mul_scalar(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul_scalar(&(m1 - m2)?, 1.0 / r1)?;
        let d1_diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul_scalar(&d1_diff, r0 / (r0 + r1))?)?;
        let d2 = mul_scalar(&d1_diff, 1.0 / (r0 + r1))?;
        let exp_m1 = (-h).exp() - 1.0;
        let x = (mul_scalar(sample, sigma_t / sigma_s0)? - Self::term(m0, alpha_t * exp_m1)?)?;
        let x = (x + Self::term(&d1, alpha_t * (exp_m1 / h + 1.0))?)?;
        x - Self::term(&d2, alpha_t * ((exp_m1 + h) / (h * h) - 0.5))?
    }
}

/// The DPM-Solver-only config fields, resolved with `DPMSolverMultistepScheduler`'s defaults.
struct DpmOptions {
    schedule: SigmaSchedule,
    solver_order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// `None` for the default -inf (nothing clipped).
    lambda_min_clipped: Option<f64>,
}

impl DpmOptions {
    fn resolve(kind: SchedulerKind, config: &SchedulerConfig) -> Result<Self> {
        let unsupported =
            |what: String| Err(Error::BadModel(format!("scheduler config: {what} is not supported by sdgen's {kind}")));
        match config.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            // diffusers maps "deis" to dpmsolver++ (DEIS configs shared with this class).
            "dpmsolver++" | "deis" => {}
            other => return unsupported(format!("algorithm_type \"{other}\" (only dpmsolver++ is)")),
        }
        let heun = match config.solver_type.as_deref().unwrap_or("midpoint") {
            // diffusers maps UniPC's/DEIS's solver types to midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => {
                return Err(Error::BadModel(format!(
                    "scheduler config: solver_type \"{other}\" is not supported (valid: midpoint, heun)"
                )))
            }
        };
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return unsupported(format!("solver_order {solver_order} (valid: 1, 2, 3)"));
        }
        if config.thresholding.unwrap_or(false) {
            return unsupported("thresholding=true (dynamic thresholding)".into());
        }
        if let Some(v @ ("learned" | "learned_range")) = config.variance_type.as_deref() {
            return unsupported(format!("variance_type \"{v}\""));
        }
        if config.use_beta_sigmas.unwrap_or(false) {
            return unsupported("use_beta_sigmas=true".into());
        }
        if config.use_flow_sigmas.unwrap_or(false) {
            return unsupported("use_flow_sigmas=true".into());
        }
        let karras = config.use_karras_sigmas.unwrap_or(false);
        let exponential = config.use_exponential_sigmas.unwrap_or(false);
        if karras && exponential {
            return Err(Error::BadModel(
                "scheduler config: only one of use_karras_sigmas and use_exponential_sigmas can be set".into(),
            ));
        }
        // diffusers' precedence: Karras, then lu_lambdas, then exponential.
        let schedule = if karras {
            SigmaSchedule::Karras
        } else if config.use_lu_lambdas.unwrap_or(false) {
            SigmaSchedule::LuLambdas
        } else if exponential {
            SigmaSchedule::Exponential
        } else {
            SigmaSchedule::Interpolated
        };
        let final_sigma_zero = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => true,
            "sigma_min" => false,
            other => {
                return Err(Error::BadModel(format!(
                    "scheduler config: final_sigmas_type \"{other}\" is not supported (valid: zero, sigma_min)"
                )))
            }
        };
        Ok(Self {
            schedule,
            solver_order,
            heun,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_zero,
            lambda_min_clipped: config.lambda_min_clipped.filter(|v| *v != f64::NEG_INFINITY),
        })
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        at(&self.timesteps, step_index, self.kind.name())?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        at(&self.timesteps, step_index, self.kind.name())?;
        let len = self.timesteps.len();
        // Lower orders at the end improve stability for short runs (and the step to sigma 0
        // must be first order: lambda is infinite there).
        let lower_order_final = step_index == len - 1
            && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_sigma_zero);
        let lower_order_second = len >= 2 && step_index == len - 2 && self.lower_order_final && len < 15;

        let x0 = self.predicted_x0(model_output, step_index, sample)?;
        self.model_outputs.rotate_left(1);
        *self.model_outputs.last_mut().expect("solver_order >= 1") = Some(x0.clone());

        let sample = sample.to_dtype(DType::F32)?;
        let history = |back: usize| -> candle_core::Result<&Tensor> {
            self.model_outputs[self.solver_order - 1 - back].as_ref().ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: model output history is missing step -{back}", self.kind))
            })
        };
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&x0, step_index, &sample)?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(&x0, history(1)?, step_index, &sample)?
        } else {
            self.third_order([&x0, history(1)?, history(2)?], step_index, &sample)?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        prev.to_dtype(x0.dtype())
    }

    fn order(&self) -> usize {
        1
    }

    /// `α_t·x + σ_t·ε` with `α_t = 1 / sqrt(σ² + 1)`, `σ_t = σ·α_t`: diffusers'
    /// `_sigma_to_alpha_sigma_t`, evaluated in `original`'s dtype as its tensor ops are.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let sigma = at(&self.sigmas[..self.timesteps.len()], step_index, self.kind.name())?;
        let dtype = original.dtype();
        let r = |v: f64| round_to(v, dtype);
        let sigma = r(sigma as f64);
        let alpha_t = r(1.0 / r(r(r(sigma * sigma) + 1.0).sqrt()));
        let sigma_t = r(sigma * alpha_t);
        mul_coef(original, alpha_t)? + mul_coef(&noise.to_dtype(dtype)?, sigma_t)?
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, check_reference, Reference};
    use super::super::{build, SchedulerConfig, SchedulerKind};
    use super::*;

    #[test]
    fn matches_diffusers_dpmpp_2m() {
        check_reference(&Reference::load(), SchedulerKind::DpmPp2m);
    }

    #[test]
    fn matches_diffusers_dpmpp_2m_karras() {
        check_reference(&Reference::load(), SchedulerKind::DpmPp2mKarras);
    }

    #[test]
    fn sigmas_match_diffusers() {
        let reference = Reference::load();
        let mut checked = 0;
        for kind in [SchedulerKind::DpmPp2m, SchedulerKind::DpmPp2mKarras] {
            for (name, config) in &reference.configs {
                for &n in &reference.step_counts {
                    let key = format!("{name}.{kind}.sigmas.{n}");
                    let Some(expected) = reference.vec_f64(&key) else {
                        continue;
                    };
                    let config = SchedulerConfig {
                        use_karras_sigmas: (kind == SchedulerKind::DpmPp2mKarras)
                            .then_some(true)
                            .or(config.use_karras_sigmas),
                        ..config.clone()
                    };
                    let Ok(s) = DpmSolverMultistepScheduler::new_as(kind, &config, n) else {
                        // Refused where diffusers sets the timesteps but cannot step (checked by
                        // check_reference).
                        assert!(reference.errors.contains_key(&format!("{name}.{kind}.run.{n}")), "{key}");
                        continue;
                    };
                    let got: Vec<f64> = s.sigmas().iter().map(|&s| s as f64).collect();
                    assert_close(&got, &expected, 1e-6, &key);
                    checked += 1;
                }
            }
        }
        assert!(checked >= 20, "only {checked} sigma schedules checked");
    }

    #[test]
    fn unsupported_options_are_clear_errors() {
        for (json, needle) in [
            (r#"{"algorithm_type":"sde-dpmsolver++"}"#, "algorithm_type \"sde-dpmsolver++\""),
            (r#"{"algorithm_type":"dpmsolver"}"#, "algorithm_type"),
            (r#"{"solver_order":4}"#, "solver_order 4"),
            (r#"{"solver_type":"rk4"}"#, "solver_type"),
            (r#"{"thresholding":true}"#, "thresholding"),
            (r#"{"variance_type":"learned_range"}"#, "variance_type"),
            (r#"{"use_flow_sigmas":true}"#, "use_flow_sigmas"),
            (r#"{"use_beta_sigmas":true}"#, "use_beta_sigmas"),
            (r#"{"final_sigmas_type":"one"}"#, "final_sigmas_type"),
            (r#"{"use_exponential_sigmas":true,"use_karras_sigmas":true}"#, "only one of"),
        ] {
            let cfg = SchedulerConfig::from_json_str(json).unwrap();
            let err = build(SchedulerKind::DpmPp2m, &cfg, 10).err().expect(json).to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
        // The Karras kind names itself, and a config asking for exponential sigmas conflicts.
        let cfg = SchedulerConfig::from_json_str(r#"{"use_exponential_sigmas":true}"#).unwrap();
        assert!(build(SchedulerKind::DpmPp2m, &cfg, 10).is_ok());
        assert!(build(SchedulerKind::DpmPp2mKarras, &cfg, 10).is_err());
        let cfg = SchedulerConfig::from_json_str(r#"{"solver_order":0}"#).unwrap();
        let err = build(SchedulerKind::DpmPp2mKarras, &cfg, 10).err().unwrap().to_string();
        assert!(err.contains("dpm++2m-karras"), "{err}");
    }

    #[test]
    fn karras_kind_is_karras_on_top_of_the_config() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"beta_schedule":"scaled_linear","beta_start":0.00085,"beta_end":0.012,"steps_offset":1}"#,
        )
        .unwrap();
        let karras_cfg = SchedulerConfig { use_karras_sigmas: Some(true), ..cfg.clone() };
        let a = build(SchedulerKind::DpmPp2mKarras, &cfg, 10).unwrap();
        let b = build(SchedulerKind::DpmPp2m, &karras_cfg, 10).unwrap();
        assert_eq!(a.timesteps(), b.timesteps());
        // diffusers 0.42.1, DPMSolverMultistepScheduler.from_config(sd15, use_karras_sigmas=True)
        assert_eq!(a.timesteps(), &[999.0, 916.0, 815.0, 687.0, 523.0, 327.0, 146.0, 41.0, 7.0, 0.0]);
        let plain = build(SchedulerKind::DpmPp2m, &cfg, 10).unwrap();
        assert_eq!(plain.timesteps(), &[999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0]);
    }
}
