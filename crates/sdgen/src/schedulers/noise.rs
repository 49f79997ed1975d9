//! The training noise schedule (betas → cumulative alpha products) and the few numpy routines the
//! diffusers schedulers build their timesteps with, reproduced operation for operation.
//!
//! diffusers computes betas and `alphas_cumprod` as float32 torch tensors, and timesteps with
//! float64 numpy; we keep the same precisions (f32 for the schedule, f64 for numpy) so timesteps
//! come out identical and coefficients agree to the last bit or two.

use super::config::{BetaSchedule, CommonParams};

/// `torch.linspace(start, end, steps, dtype=torch.float32)` as ATen's CPU kernel computes it: the
/// first half counts up from `start`, the second half down from `end`. (Its SIMD path rounds
/// differently by an ulp here and there; that is far below any tolerance we test at.)
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (the Glide schedule), computed in
/// f64 and stored as f32 like `torch.tensor(betas, dtype=torch.float32)`.
fn cosine_betas(num_train_timesteps: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..num_train_timesteps)
        .map(|i| {
            let t1 = i as f64 / num_train_timesteps as f64;
            let t2 = (i + 1) as f64 / num_train_timesteps as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` of a float32 tensor on CPU: accumulated in f64, each output rounded to f32.
pub(crate) fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr` (Algorithm 1 of <https://huggingface.co/papers/2305.08891>), in f32
/// like diffusers: shifts and scales `sqrt(alphas_cumprod)` so the last one is exactly zero.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for v in sqrt_bar.iter_mut() {
        *v -= last;
        *v *= scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// The training betas for `params`, optionally rescaled to zero terminal SNR.
pub(crate) fn betas(params: &CommonParams, rescale_zero_snr: bool) -> Vec<f32> {
    let t = params.num_train_timesteps;
    let betas = match (&params.trained_betas, params.beta_schedule) {
        (Some(trained), _) => trained.iter().map(|&b| b as f32).collect(),
        (None, Some(BetaSchedule::Linear)) | (None, None) => torch_linspace_f32(params.beta_start, params.beta_end, t),
        (None, Some(BetaSchedule::ScaledLinear)) => {
            torch_linspace_f32(params.beta_start.sqrt(), params.beta_end.sqrt(), t).into_iter().map(|b| b * b).collect()
        }
        (None, Some(BetaSchedule::SquaredCosCapV2)) => cosine_betas(t),
    };
    if rescale_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    }
}

/// `alphas_cumprod = cumprod(1 - betas)` in f32.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    cumprod_f32(&alphas)
}

/// `np.linspace(start, stop, num)` in f64: `i * step + start`, the last value exactly `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    out[num - 1] = stop;
    out
}

/// `np.arange(start, stop, step)` for floats: `ceil((stop - start) / step)` values, the second one
/// `start + step`, the rest `start + i * ((start + step) - start)` (numpy's `DOUBLE_fill`).
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let next = start + step;
    let delta = next - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => next,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// The integer "leading" timesteps `round(arange(N) * (T // N))`, ascending, before `steps_offset`.
pub(crate) fn leading_base(num_train_timesteps: usize, num_inference_steps: usize) -> Vec<i64> {
    let ratio = (num_train_timesteps / num_inference_steps) as i64;
    (0..num_inference_steps as i64).map(|i| i * ratio).collect()
}

/// The "trailing" timesteps `round(arange(T, 0, -T / N)) - 1`, descending, as numpy gives them.
pub(crate) fn trailing_desc(num_train_timesteps: usize, num_inference_steps: usize) -> Vec<f64> {
    let ratio = num_train_timesteps as f64 / num_inference_steps as f64;
    np_arange(num_train_timesteps as f64, 0.0, -ratio).into_iter().map(|t| t.round_ties_even() - 1.0).collect()
}

/// The "linspace" timesteps `linspace(0, T - 1, N)`, ascending and unrounded.
pub(crate) fn linspace_asc(num_train_timesteps: usize, num_inference_steps: usize) -> Vec<f64> {
    np_linspace(0.0, (num_train_timesteps - 1) as f64, num_inference_steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers_match_numpy() {
        // np.linspace(0, 999, 4) == [0, 333, 666, 999]; np.linspace(0, 999, 1) == [0]
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        // np.round(np.arange(1000, 0, -1000 / 3)) - 1 == [999, 666, 332]
        assert_eq!(trailing_desc(1000, 3), vec![999.0, 666.0, 332.0]);
        assert_eq!(trailing_desc(1000, 1), vec![999.0]);
        assert_eq!(leading_base(1000, 3), vec![0, 333, 666]);
    }

    #[test]
    fn zero_snr_ends_at_zero() {
        let params = CommonParams {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: Some(BetaSchedule::ScaledLinear),
            trained_betas: None,
            prediction_type: super::super::config::PredictionType::VPrediction,
            timestep_spacing: super::super::config::TimestepSpacing::Trailing,
            steps_offset: 1,
        };
        let ac = alphas_cumprod(&betas(&params, true));
        assert!(ac[999].abs() < 1e-9, "{}", ac[999]);
        let plain = alphas_cumprod(&betas(&params, false));
        assert!((ac[0] - plain[0]).abs() < 1e-6);
    }
}
