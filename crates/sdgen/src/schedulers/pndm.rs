//! PNDM, "Pseudo Numerical Methods for Diffusion Models" (<https://huggingface.co/papers/2202.09778>),
//! as diffusers' `PNDMScheduler`: an optional Runge-Kutta warm-up (PRK, three 4-evaluation steps)
//! followed by linear multistep (PLMS) steps. With `skip_prk_steps` (what Stable Diffusion ships)
//! it is crowsonkb's PLMS sampler, whose second model call re-evaluates the first interval to
//! bootstrap the multistep history: N steps take N + 1 model calls.

use candle_core::Tensor;

use super::config::{CommonParams, PredictionType, SchedulerConfig, TimestepSpacing};
use super::noise::{alphas_cumprod, betas, leading_base, linspace_asc, trailing_desc};
use super::{at, check_steps, ddpm_add_noise, div_scalar, mul_scalar, Scheduler, SchedulerKind};
use crate::rng::batch::BatchNoise;
use crate::{Error, Result};

/// The PRK warm-up runs over the last `PNDM_ORDER` leading timesteps (F-PNDM is 4th order).
const PNDM_ORDER: usize = 4;

/// diffusers' `PNDMScheduler` after `set_timesteps(num_inference_steps)`.
#[derive(Debug)]
pub struct PndmScheduler {
    alphas_cumprod: Vec<f32>,
    /// The alpha product "before" timestep 0: 1 with `set_alpha_to_one`, else `alphas_cumprod[0]`.
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    skip_prk_steps: bool,
    /// `T // N`, the distance between consecutive PLMS timesteps.
    step_ratio: i64,
    /// How many of `timesteps` are PRK steps (12, or 0 with `skip_prk_steps`).
    num_prk_steps: usize,
    /// `timesteps.len()` less the steps asked for (diffusers' `num_warmup_steps`).
    warmup: usize,
    timesteps: Vec<f64>,
    timesteps_int: Vec<i64>,
    // Running state, as in diffusers: `counter` counts steps taken, `ets` holds past model outputs.
    counter: usize,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl PndmScheduler {
    /// Builds the scheduler with `PNDMScheduler`'s defaults for fields `config` lacks.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let params = CommonParams::resolve(config, TimestepSpacing::Leading)?;
        let t_train = params.num_train_timesteps;
        check_steps(SchedulerKind::Pndm, num_inference_steps, t_train)?;
        super::check_offset_schedule(SchedulerKind::Pndm, num_inference_steps, &params)?;
        if params.prediction_type == PredictionType::Sample {
            return Err(Error::BadModel(
                "scheduler config: PNDM supports prediction_type epsilon or v_prediction, not \"sample\"".into(),
            ));
        }
        let skip_prk_steps = config.skip_prk_steps.unwrap_or(false);
        if !skip_prk_steps && num_inference_steps < PNDM_ORDER {
            return Err(Error::InvalidInput(format!(
                "pndm: {num_inference_steps} steps is too few for its Runge-Kutta warm-up \
                 (skip_prk_steps is false): use at least {PNDM_ORDER}"
            )));
        }
        // PNDM takes no `rescale_betas_zero_snr`: diffusers' `from_config` drops it.
        let alphas_cumprod = alphas_cumprod(&betas(&params, false));
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) { 1.0 } else { alphas_cumprod[0] };

        let n = num_inference_steps;
        // diffusers' `_timesteps`, ascending.
        let base: Vec<i64> = match params.timestep_spacing {
            TimestepSpacing::Linspace => linspace_asc(t_train, n).iter().map(|t| t.round_ties_even() as i64).collect(),
            TimestepSpacing::Leading => leading_base(t_train, n).iter().map(|t| t + params.steps_offset).collect(),
            TimestepSpacing::Trailing => trailing_desc(t_train, n).iter().rev().map(|&t| t as i64).collect(),
        };
        let step_ratio = (t_train / n) as i64;
        let (prk, plms): (Vec<i64>, Vec<i64>) = if skip_prk_steps {
            // concat(_timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:])[::-1]: the
            // second-to-last (in ascending order) timestep is visited twice.
            let len = base.len();
            let mut plms: Vec<i64> = base[..len - 1].to_vec();
            plms.extend_from_slice(&base[len.saturating_sub(2)..len - 1]);
            plms.push(base[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            // Each of the last 4 timesteps t gives (t, t + T//N//2), then the RK stages:
            // repeat(2) of all but the last, dropping the first and last, reversed.
            let half = step_ratio / 2;
            let pairs: Vec<i64> = base[base.len() - PNDM_ORDER..].iter().flat_map(|&t| [t, t + half]).collect();
            let repeated: Vec<i64> = pairs[..pairs.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            let mut prk = repeated[1..repeated.len() - 1].to_vec();
            prk.reverse();
            let plms: Vec<i64> = base[..base.len() - 3].iter().rev().copied().collect();
            (prk, plms)
        };
        let num_prk_steps = prk.len();
        let timesteps_int: Vec<i64> = prk.into_iter().chain(plms).collect();
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction_type: params.prediction_type,
            skip_prk_steps,
            step_ratio,
            num_prk_steps,
            warmup: timesteps_int.len().saturating_sub(num_inference_steps),
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    fn alpha_at(&self, timestep: i64) -> candle_core::Result<f32> {
        if timestep < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod.get(timestep as usize).copied().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "pndm: timestep {timestep} is outside the {} training timesteps",
                self.alphas_cumprod.len()
            ))
        })
    }

    /// Runge-Kutta step `counter` (of 12): stages 1-3 step from the stage's start sample with the
    /// current model output, stage 4 with the RK4 combination (1/6, 1/3, 1/3, 1/6).
    fn step_prk(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> candle_core::Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { self.step_ratio / 2 };
        let prev_timestep = timestep - diff_to_prev;
        let timestep = self.timesteps_int[self.counter / 4 * 4];
        let accumulate = |acc: &Option<Tensor>, weight: f32| -> candle_core::Result<Tensor> {
            let term = mul_scalar(model_output, weight)?;
            match acc {
                Some(acc) => acc + term,
                None => Ok(term),
            }
        };
        let mut model_output = model_output.clone();
        match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(accumulate(&self.cur_model_output, 1.0 / 6.0)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => self.cur_model_output = Some(accumulate(&self.cur_model_output, 1.0 / 3.0)?),
            _ => {
                model_output = accumulate(&self.cur_model_output, 1.0 / 6.0)?;
                self.cur_model_output = None;
            }
        }
        let cur_sample = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur_sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// Linear multistep step: Adams-Bashforth of order up to 4 over the stored model outputs.
    fn step_plms(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> candle_core::Result<Tensor> {
        let mut timestep = timestep;
        let mut prev_timestep = timestep - self.step_ratio;
        if self.counter != 1 {
            let keep_from = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep_from);
            self.ets.push(model_output.clone());
        } else {
            // The re-evaluation call: same interval as the first step, seen from its end.
            prev_timestep = timestep;
            timestep += self.step_ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let mut sample = sample.clone();
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if n == 1 && self.counter == 1 {
            // (model_output + ets[-1]) / 2, from the sample the first step started at.
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            mul_scalar(&(model_output + &e[0])?, 0.5)?
        } else if n == 2 {
            // (3 * ets[-1] - ets[-2]) / 2
            mul_scalar(&(mul_scalar(&e[1], 3.0)? - &e[0])?, 0.5)?
        } else if n == 3 {
            // (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            let x = ((mul_scalar(&e[2], 23.0)? - mul_scalar(&e[1], 16.0)?)? + mul_scalar(&e[0], 5.0)?)?;
            div_scalar(&x, 12.0)?
        } else if n == 4 {
            // (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
            let x = (((mul_scalar(&e[n - 1], 55.0)? - mul_scalar(&e[n - 2], 59.0)?)? + mul_scalar(&e[n - 3], 37.0)?)?
                - mul_scalar(&e[n - 4], 9.0)?)?;
            mul_scalar(&x, 1.0 / 24.0)?
        } else {
            candle_core::bail!("pndm: step {} taken out of order (history of {n} outputs)", self.counter)
        };
        let prev = self.prev_sample(&sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// Formula (9) of the PNDM paper: x_{t-δ} from x_t and the (combined) noise estimate.
    fn prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let alpha_t = self.alpha_at(timestep)?;
        let alpha_prev = self.alpha_at(prev_timestep)?;
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let model_output = match self.prediction_type {
            PredictionType::VPrediction => {
                (mul_scalar(model_output, alpha_t.sqrt())? + mul_scalar(sample, beta_t.sqrt())?)?
            }
            _ => model_output.clone(),
        };
        // (α_{t-δ} - α_t) / (sqrt(α_t) (sqrt(α_{t-δ}) + sqrt(α_t))) + 1 = sqrt(α_{t-δ} / α_t)
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        let noise_term = div_scalar(&mul_scalar(&model_output, alpha_prev - alpha_t)?, denom)?;
        mul_scalar(sample, sample_coeff)? - noise_term
    }
}

impl Scheduler for PndmScheduler {
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
        let timestep = at(&self.timesteps_int, step_index, "pndm")?;
        // Like diffusers, the PRK/PLMS choice follows the number of steps taken, not the index.
        if self.counter < self.num_prk_steps && !self.skip_prk_steps {
            self.step_prk(model_output, timestep, sample)
        } else {
            if !self.skip_prk_steps && self.ets.len() < 3 {
                candle_core::bail!("pndm: PLMS steps need the 12 Runge-Kutta steps to have run first");
            }
            self.step_plms(model_output, timestep, sample)
        }
    }

    fn order(&self) -> usize {
        1
    }

    fn warmup_evaluations(&self) -> usize {
        self.warmup
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let timestep = at(&self.timesteps_int, step_index, "pndm")?;
        ddpm_add_noise(self.alpha_at(timestep)?, original, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{check_reference, Reference};
    use super::super::SchedulerKind;

    #[test]
    fn matches_diffusers_pndm() {
        check_reference(&Reference::load(), SchedulerKind::Pndm);
    }
}
