//! Diffusion schedulers, numerically equal to diffusers': PNDM (PLMS, and the PRK warm-up), DDIM,
//! Euler (`EulerDiscreteScheduler`), Euler ancestral (`EulerAncestralDiscreteScheduler`),
//! DPM-Solver++ 2M (`DPMSolverMultistepScheduler`, optionally with Karras sigmas), latent
//! consistency sampling (`LCMScheduler`) and, for flow matching models (SD 3 / 3.5), Euler on the
//! flow (`FlowMatchEulerDiscreteScheduler`), one algorithm per file.
//!
//! A scheduler is built from a model's `scheduler/scheduler_config.json` ([`SchedulerConfig`]) for
//! a fixed number of inference steps, and the pipeline loops over [`Scheduler::timesteps`]:
//!
//! ```no_run
//! # fn unet(x: &candle_core::Tensor, t: f64) -> candle_core::Result<candle_core::Tensor> { Ok(x.clone()) }
//! # fn main() -> sdgen::Result<()> {
//! use sdgen::rng::batch::BatchNoise;
//! use sdgen::schedulers::{build, SchedulerConfig, SchedulerKind};
//! let config = SchedulerConfig::from_file("sd15/scheduler/scheduler_config.json")?;
//! let mut scheduler = build(SchedulerKind::EulerAncestral, &config, 25)?;
//! // One generator per image; the initial latents and every ancestral step draw from them.
//! let mut generators = BatchNoise::for_batch(42, 1);
//! let noise = generators.randn(&[1, 4, 64, 64], candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let mut latents = (noise * scheduler.init_noise_sigma())?;
//! for (i, &t) in scheduler.timesteps().to_vec().iter().enumerate() {
//!     let input = scheduler.scale_model_input(&latents, i)?;
//!     let noise_pred = unet(&input, t)?;
//!     latents = scheduler.step(&noise_pred, i, &latents, &mut generators)?;
//! }
//! # Ok(()) }
//! ```
//!
//! Like diffusers, coefficients come from the float32 training schedule and are applied to tensors
//! of any dtype and device with tensor ops; a scalar times an f16/bf16 tensor is computed in f32
//! and rounded back, which is what torch does for a tensor times a 0-d float32 tensor.

#[cfg(test)]
mod add_noise_tests;
mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod flow_match;
mod lcm;
mod noise;
mod pndm;
#[cfg(test)]
mod testutil;

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};

pub use config::SchedulerConfig;
pub use ddim::DdimScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerScheduler;
pub use euler_ancestral::EulerAncestralScheduler;
pub use flow_match::{calculate_shift, dynamic_shift_mu, img2img_start_step, FlowMatchEulerScheduler};
pub use lcm::LcmScheduler;
pub use pndm::PndmScheduler;

use crate::error::field::STEPS;
use crate::rng::batch::BatchNoise;
use crate::{Error, Result};

/// The kind of noise schedule a model was trained with; a scheduler samples one kind only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// Discrete-time diffusion over `num_train_timesteps` (ε- or v-prediction), as SD 1.x and
    /// SDXL are trained.
    Discrete,
    /// Rectified flow (SD 3): `x_t = (1 − σ)·x₀ + σ·ε`, the model predicting the velocity.
    FlowMatching,
}

impl ScheduleKind {
    /// How messages name the schedule.
    pub fn describe(self) -> &'static str {
        match self {
            ScheduleKind::Discrete => "a discrete-time diffusion schedule (SD 1.x, SDXL)",
            ScheduleKind::FlowMatching => "a flow-matching schedule (SD 3 / 3.5)",
        }
    }
}

/// The scheduler algorithms sdgen implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SchedulerKind {
    /// diffusers' `PNDMScheduler` (Stable Diffusion 1.x's default, run as PLMS).
    Pndm,
    /// diffusers' `DDIMScheduler` (deterministic, eta = 0).
    Ddim,
    /// diffusers' `EulerDiscreteScheduler` (SDXL's default).
    Euler,
    /// diffusers' `EulerAncestralDiscreteScheduler` ("Euler a"): adds fresh noise every step,
    /// drawn from the per-image generators.
    EulerAncestral,
    /// diffusers' `DPMSolverMultistepScheduler` (DPM-Solver++ 2M with its default config).
    DpmPp2m,
    /// `DPMSolverMultistepScheduler` with `use_karras_sigmas=True` set on top of the model's
    /// config ("DPM++ 2M Karras").
    DpmPp2mKarras,
    /// diffusers' `LCMScheduler` (A1111's "LCM"): for latent consistency models (LCM UNets, an
    /// LCM-LoRA fused into SD 1.5 or SDXL) in a few steps; re-noises between steps from the
    /// per-image generators.
    Lcm,
    /// diffusers' `FlowMatchEulerDiscreteScheduler`: Euler on a rectified flow, the only sampler
    /// of flow-matching models (SD 3 / 3.5's default).
    FlowMatchEuler,
}

impl SchedulerKind {
    /// Every kind, in the order they are listed to users.
    pub const ALL: [SchedulerKind; 8] = [
        SchedulerKind::Pndm,
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::Lcm,
        SchedulerKind::FlowMatchEuler,
    ];

    /// The short name used on the command line (`pndm`, `ddim`, `euler`, `euler-a`, `dpm++2m`,
    /// `dpm++2m-karras`, `lcm`, `flow-euler`).
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPp2m => "dpm++2m",
            SchedulerKind::DpmPp2mKarras => "dpm++2m-karras",
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::FlowMatchEuler => "flow-euler",
        }
    }

    /// AUTOMATIC1111's name for this sampler, as its `parameters` text writes it (and as its
    /// users type it: [`FromStr`] takes it too, so a `parameters` string round-trips). Flow
    /// Euler is "Euler" there as well (A1111 and Forge name SD 3's sampler so): the name parses
    /// as [`SchedulerKind::Euler`], which [`SchedulerKind::for_schedule`] maps back on a
    /// flow-matching model.
    pub fn a1111_name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "PLMS",
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::DpmPp2m => "DPM++ 2M",
            SchedulerKind::DpmPp2mKarras => "DPM++ 2M Karras",
            SchedulerKind::Lcm => "LCM",
            SchedulerKind::FlowMatchEuler => "Euler",
        }
    }

    /// Other spellings [`FromStr`] accepts for this kind (`+` is awkward in some shells and file
    /// names, hence the `dpmpp` forms).
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            SchedulerKind::Pndm | SchedulerKind::Ddim | SchedulerKind::Euler | SchedulerKind::Lcm => &[],
            SchedulerKind::EulerAncestral => &["euler_a", "euler-ancestral"],
            SchedulerKind::DpmPp2m => &["dpmpp-2m", "dpmpp_2m"],
            SchedulerKind::DpmPp2mKarras => &["dpmpp-2m-karras", "dpmpp_2m_karras"],
            SchedulerKind::FlowMatchEuler => &["flow_euler", "flow-match-euler", "flowmatch-euler"],
        }
    }

    /// The diffusers class this kind reproduces, as written in `_class_name` (both DPM++ 2M
    /// kinds are `DPMSolverMultistepScheduler`).
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => "DPMSolverMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::FlowMatchEuler => "FlowMatchEulerDiscreteScheduler",
        }
    }

    /// The kind of schedule this scheduler samples; a model trained with another is refused.
    pub fn schedule(self) -> ScheduleKind {
        match self {
            SchedulerKind::Pndm
            | SchedulerKind::Ddim
            | SchedulerKind::Euler
            | SchedulerKind::EulerAncestral
            | SchedulerKind::DpmPp2m
            | SchedulerKind::DpmPp2mKarras
            | SchedulerKind::Lcm => ScheduleKind::Discrete,
            SchedulerKind::FlowMatchEuler => ScheduleKind::FlowMatching,
        }
    }

    /// The kind to run on a model trained with `schedule` when the user asked for `kind`: `kind`
    /// itself when it samples that schedule; `euler` (or A1111's "Euler") on a flow-matching
    /// model is flow Euler, the same method on the flow. Any other mismatch is an
    /// `InvalidInput` naming both (DDIM, PNDM and DPM-Solver step a discrete noise schedule, which
    /// a flow-matching model does not have; flow Euler needs one).
    pub fn for_schedule(kind: SchedulerKind, schedule: ScheduleKind) -> Result<SchedulerKind> {
        match (kind, schedule) {
            (k, s) if k.schedule() == s => Ok(k),
            (SchedulerKind::Euler, ScheduleKind::FlowMatching) => Ok(SchedulerKind::FlowMatchEuler),
            (k, s) => {
                let fitting: Vec<&str> = Self::ALL.iter().filter(|o| o.schedule() == s).map(|o| o.name()).collect();
                let also_euler = if s == ScheduleKind::FlowMatching { ", or euler" } else { "" };
                Err(Error::InvalidInput(format!(
                    "scheduler {k} ({}) samples {}, but the model is trained with {}: use {}{also_euler}",
                    k.class_name(),
                    k.schedule().describe(),
                    s.describe(),
                    fitting.join(", ")
                )))
            }
        }
    }

    /// The kind for a diffusers class name (`"PNDMScheduler"` → `Pndm`); `None` for classes sdgen
    /// does not implement. `DPMSolverMultistepScheduler` gives `DpmPp2m`, which takes the config
    /// as it is (Karras sigmas included if the config asks for them), as diffusers would.
    pub fn from_class_name(class_name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == class_name)
    }

    /// Whether steps draw random noise (from the [`BatchNoise`] passed to [`Scheduler::step`]).
    pub fn is_stochastic(self) -> bool {
        matches!(self, SchedulerKind::EulerAncestral | SchedulerKind::Lcm)
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Parses a short name, one of its [`SchedulerKind::aliases`] or its A1111 name, ignoring ASCII
    /// case.
    fn from_str(s: &str) -> Result<Self> {
        let s_trimmed = s.trim();
        Self::ALL
            .into_iter()
            .find(|k| {
                [k.name(), k.a1111_name()]
                    .into_iter()
                    .chain(k.aliases().iter().copied())
                    .any(|n| n.eq_ignore_ascii_case(s_trimmed))
            })
            .ok_or_else(|| {
                let valid: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                let a1111: Vec<&str> = Self::ALL.iter().map(|k| k.a1111_name()).collect();
                Error::InvalidInput(format!(
                    "unknown scheduler \"{s}\" (valid: {}; or A1111's names: {})",
                    valid.join(", "),
                    a1111.join(", ")
                ))
            })
    }
}

/// A scheduler set up for one denoising run (diffusers' scheduler after `set_timesteps`).
pub trait Scheduler: Send {
    /// The timesteps the pipeline loops over, in order; the UNet is called with these values
    /// (fractional for Euler's `linspace` spacing). PNDM has more than N, as in diffusers: N + 1 in
    /// PLMS mode for N > 1 (its second model call re-evaluates the first interval), N + 9 with
    /// the Runge-Kutta warm-up (`skip_prk_steps: false`).
    fn timesteps(&self) -> &[f64];

    /// Standard deviation of the initial noise: the pipeline multiplies its N(0, 1) latents by it
    /// (1 unless the schedule's sigmas say otherwise, as Euler's do).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The UNet input for `sample` at `timesteps()[step_index]` (the sample itself unless the
    /// scheduler scales it, as Euler's `1 / sqrt(σ² + 1)` does).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }

    /// One denoising step at `timesteps()[step_index]`: returns the previous (less noisy) sample,
    /// in `model_output`'s dtype (PNDM and DDIM need `sample` in that dtype too; Euler, Euler
    /// ancestral and DPM-Solver upcast it to f32 internally). Steps must be taken in order; a run
    /// may start at a later index (img2img), as in diffusers.
    ///
    /// `noise` holds the run's per-image generators, the ones the initial latents were drawn
    /// from: ancestral schedulers draw their per-step noise from them exactly as diffusers'
    /// `randn_tensor` does (image `i` from generator `i`, on the CPU, in `model_output`'s dtype);
    /// the others leave them untouched (diffusers 0.42's Euler draws only with `s_churn > 0`).
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut BatchNoise,
    ) -> candle_core::Result<Tensor>;

    /// Model evaluations per step (1 for every algorithm here, as diffusers declares them; the
    /// multistep DPM-Solver reuses earlier evaluations instead of making more).
    fn order(&self) -> usize;

    /// Evaluations at the start of `timesteps()` that are not steps of their own (PNDM's PLMS mode
    /// evaluates its first timestep twice: 51 timesteps for 50 steps); progress counts steps
    /// after them, as diffusers' progress bar does (`num_warmup_steps`).
    fn warmup_evaluations(&self) -> usize {
        0
    }

    /// `original` (clean latents) noised to the level of `timesteps()[step_index]`, where a run
    /// that starts at `step_index` begins (img2img): diffusers' `add_noise` after
    /// `set_begin_index(step_index)`. `sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε` for PNDM and DDIM, `x + σ·ε`
    /// for Euler and Euler ancestral, `α_t·x + σ_t·ε` for DPM-Solver. As in diffusers, the
    /// float32 schedule values are first cast to `original`'s dtype and the coefficients are
    /// computed in that dtype.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> candle_core::Result<Tensor>;
}

/// What a run passes to `set_timesteps` besides the step count (diffusers' keyword arguments).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunInputs {
    /// Flow matching with `use_dynamic_shifting`: the shift for this image size
    /// ([`dynamic_shift_mu`]). Required by such configs, ignored by every other scheduler and
    /// config (as diffusers' `set_timesteps(mu=..)` ignores it without dynamic shifting).
    pub mu: Option<f64>,
}

/// Builds a `kind` scheduler from a model's scheduler config for `num_inference_steps` steps.
/// Fields the kind's diffusers class doesn't take are ignored; missing ones take that class's
/// defaults. Errors: `InvalidInput` for a step count of 0 or above the training timesteps (or
/// below 4 for PNDM's Runge-Kutta mode), `BadModel` for config values sdgen doesn't support.
/// A flow-matching config with dynamic shifting needs [`build_with`] and its `mu`.
pub fn build(kind: SchedulerKind, config: &SchedulerConfig, num_inference_steps: usize) -> Result<Box<dyn Scheduler>> {
    build_with(kind, config, num_inference_steps, &RunInputs::default())
}

/// [`build`] with the run's [`RunInputs`].
pub fn build_with(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    inputs: &RunInputs,
) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Pndm => Box::new(PndmScheduler::new(config, num_inference_steps)?),
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(EulerScheduler::new(config, num_inference_steps)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralScheduler::new(config, num_inference_steps)?),
        SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistepScheduler::new(config, num_inference_steps)?),
        SchedulerKind::DpmPp2mKarras => {
            // `DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)`.
            let karras = SchedulerConfig { use_karras_sigmas: Some(true), ..config.clone() };
            Box::new(DpmSolverMultistepScheduler::new_as(kind, &karras, num_inference_steps)?)
        }
        SchedulerKind::Lcm => Box::new(LcmScheduler::new(config, num_inference_steps)?),
        SchedulerKind::FlowMatchEuler => {
            Box::new(FlowMatchEulerScheduler::new(config, num_inference_steps, inputs.mu)?)
        }
    })
}

/// Checks a step count against the training schedule. diffusers only refuses N > T in DDIM; the
/// others then silently produce a degenerate schedule (a step ratio of 0), so all refuse here.
fn check_steps(kind: SchedulerKind, num_inference_steps: usize, num_train_timesteps: usize) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::InvalidInput(format!("{kind}: the number of steps must be at least 1")));
    }
    if num_inference_steps > num_train_timesteps {
        return Err(Error::InvalidInput(format!(
            "{kind}: {num_inference_steps} steps is more than the model's {num_train_timesteps} training timesteps"
        )));
    }
    Ok(())
}

/// Refuses a step count whose leading-spaced timesteps, shifted by the config's `steps_offset`,
/// pass the last training timestep: SD's configs have offset 1, so 1000 steps of 1000 timesteps
/// reach timestep 1000, which DDIM and PNDM would index out of range only in the middle of the
/// run (diffusers fails there too). Names the most steps that fit.
fn check_offset_schedule(kind: SchedulerKind, n: usize, params: &config::CommonParams) -> Result<()> {
    let t_train = params.num_train_timesteps;
    if params.timestep_spacing != config::TimestepSpacing::Leading {
        return Ok(());
    }
    let last = |n: usize| (n as i64 - 1) * (t_train / n) as i64 + params.steps_offset;
    if last(n) < t_train as i64 {
        return Ok(());
    }
    let max = (1..n).rev().find(|&m| last(m) < t_train as i64).unwrap_or(0);
    Err(Error::InvalidInput(format!(
        "{kind}: {STEPS} {n} reaches timestep {}, past the model's {t_train} training timesteps (its scheduler's \
         steps_offset is {}): use at most {max} steps",
        last(n),
        params.steps_offset
    )))
}

/// Looks up `values[step_index]`, with an error naming the scheduler if the index is past the end.
fn at<T: Copy>(values: &[T], step_index: usize, what: &str) -> candle_core::Result<T> {
    values.get(step_index).copied().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{what}: step index {step_index} is past the last of {} timesteps",
            values.len()
        ))
    })
}

/// `x * c` as torch computes a tensor times a 0-d float32 tensor (or a Python float): in f32 for
/// f16/bf16 tensors (ATen's "opmath"), rounded back to the tensor's dtype once — candle's own
/// `affine` would round `c` to the half type first (1/0.13025 is 7.6875 in bf16, not 7.677).
/// Shared with the pipelines (latent scaling, initial noise).
pub(crate) fn mul_scalar(x: &Tensor, c: f32) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?.affine(c as f64, 0.0)?.to_dtype(x.dtype()),
        _ => x.affine(c as f64, 0.0),
    }
}

/// Rounds `v` to `dtype`'s precision: a schedule value after `.to(dtype)`, or the result of one
/// torch op on such values (computed here in f64, which rounds to f32, f16 or bf16 exactly as
/// the op in that dtype would for +, −, ×, ÷ and sqrt).
fn round_to(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        DType::F64 => v,
        _ => v as f32 as f64,
    }
}

/// `x * c` for a coefficient `c` already in `x`'s dtype, as torch multiplies two tensors of that
/// dtype (in f32 for f16/bf16, rounded back).
fn mul_coef(x: &Tensor, c: f64) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F64 => x.affine(c, 0.0),
        _ => mul_scalar(x, c as f32),
    }
}

/// diffusers' DDPM-style `add_noise` (PNDM, DDIM): `sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε`, with ᾱ_t cast
/// to `original`'s dtype first.
fn ddpm_add_noise(alpha_cumprod: f32, original: &Tensor, noise: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = original.dtype();
    let a = round_to(alpha_cumprod as f64, dtype);
    let sqrt_alpha = round_to(a.sqrt(), dtype);
    let sqrt_one_minus_alpha = round_to(round_to(1.0 - a, dtype).sqrt(), dtype);
    mul_coef(original, sqrt_alpha)? + mul_coef(&noise.to_dtype(dtype)?, sqrt_one_minus_alpha)?
}

/// `x / d` for a 0-d float32 `d`: torch on CUDA multiplies by the f32 reciprocal of a CPU scalar
/// divisor (diffusers keeps its schedules on the CPU); on CPU it divides, which is at most an ulp
/// away.
pub(crate) fn div_scalar(x: &Tensor, d: f32) -> candle_core::Result<Tensor> {
    mul_scalar(x, 1.0 / d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_names_round_trip() {
        for kind in SchedulerKind::ALL {
            // Flow Euler's "Euler" reads as Euler, mapped back per model by `for_schedule`.
            let back = SchedulerKind::for_schedule(kind.a1111_name().parse().unwrap(), kind.schedule()).unwrap();
            assert_eq!(back, kind);
            assert_eq!(
                kind.a1111_name().to_lowercase().parse::<SchedulerKind>().unwrap().a1111_name(),
                kind.a1111_name()
            );
            assert_eq!(crate::output::a1111_sampler_name(kind.name()), kind.a1111_name());
        }
        assert_eq!("Euler A".parse::<SchedulerKind>().unwrap(), SchedulerKind::EulerAncestral);
        let err = "dpm9000".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(err.contains("DPM++ 2M Karras") && err.contains("dpm++2m-karras"), "{err}");
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.to_string().parse::<SchedulerKind>().unwrap(), kind);
            let from_class = SchedulerKind::from_class_name(kind.class_name()).unwrap();
            assert_eq!(from_class.class_name(), kind.class_name());
        }
        assert_eq!("Euler".parse::<SchedulerKind>().unwrap(), SchedulerKind::Euler);
        assert_eq!(SchedulerKind::from_class_name("LMSDiscreteScheduler"), None);
        let err = "dpm++".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(
            err.contains("\"dpm++\"")
                && err.contains("pndm, ddim, euler, euler-a, dpm++2m, dpm++2m-karras, lcm, flow-euler"),
            "{err}"
        );
    }

    #[test]
    fn new_kinds_parse_with_their_aliases() {
        use SchedulerKind::*;
        for (s, kind) in [
            ("euler-a", EulerAncestral),
            ("euler_a", EulerAncestral),
            ("Euler-Ancestral", EulerAncestral),
            ("dpm++2m", DpmPp2m),
            ("dpmpp-2m", DpmPp2m),
            (" DPMPP_2M ", DpmPp2m),
            ("dpm++2m-karras", DpmPp2mKarras),
            ("dpmpp-2m-karras", DpmPp2mKarras),
            ("dpmpp_2m_karras", DpmPp2mKarras),
        ] {
            assert_eq!(s.parse::<SchedulerKind>().unwrap(), kind, "{s}");
        }
        assert_eq!(SchedulerKind::from_class_name("EulerAncestralDiscreteScheduler"), Some(EulerAncestral));
        assert_eq!(SchedulerKind::from_class_name("DPMSolverMultistepScheduler"), Some(DpmPp2m));
        assert_eq!(DpmPp2mKarras.class_name(), "DPMSolverMultistepScheduler");
        assert!(EulerAncestral.is_stochastic() && !DpmPp2m.is_stochastic() && !Euler.is_stochastic());
        assert_eq!(("LCM".parse::<SchedulerKind>().unwrap(), Lcm.class_name()), (Lcm, "LCMScheduler"));
        assert!(Lcm.is_stochastic());
    }

    /// bf16 has no reference run; check it keeps its dtype and tracks the f32 result.
    #[test]
    fn bf16_runs_track_f32() {
        let config = SchedulerConfig::from_json_str(
            r#"{"beta_schedule":"scaled_linear","beta_start":0.00085,"beta_end":0.012,
                "steps_offset":1,"skip_prk_steps":true}"#,
        )
        .unwrap();
        let dev = candle_core::Device::Cpu;
        let x0 = Tensor::arange(0f32, 64.0, &dev).unwrap().affine(0.05, -1.6).unwrap().reshape((1, 4, 4, 4)).unwrap();
        for kind in SchedulerKind::ALL {
            let mut results = Vec::new();
            for dtype in [DType::F32, DType::BF16] {
                let mut s = build(kind, &config, 8).unwrap();
                // Ancestral noise: with 64 values (a multiple of 16) torch's bf16 draw is its f32
                // draw rounded, so the two runs stay comparable.
                let mut generators = BatchNoise::new(&[11]);
                let mut x = mul_scalar(&x0.to_dtype(dtype).unwrap(), s.init_noise_sigma() as f32).unwrap();
                for i in 0..s.timesteps().len() {
                    let input = s.scale_model_input(&x, i).unwrap();
                    let eps = (mul_scalar(&input, 0.3).unwrap() + 0.1).unwrap();
                    x = s.step(&eps, i, &x, &mut generators).unwrap();
                    assert_eq!(x.dtype(), dtype, "{kind}");
                }
                results.push(x.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            let scale = results[0].iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = results[0].iter().zip(&results[1]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 0.05 * scale, "{kind}: bf16 off by {diff} (scale {scale})");
        }
    }

    #[test]
    fn flow_models_take_euler_and_refuse_discrete_schedulers() {
        use SchedulerKind::*;
        let flow = ScheduleKind::FlowMatching;
        assert_eq!(SchedulerKind::for_schedule(Euler, flow).unwrap(), FlowMatchEuler);
        assert_eq!(SchedulerKind::for_schedule(FlowMatchEuler, flow).unwrap(), FlowMatchEuler);
        assert_eq!("flow-euler".parse::<SchedulerKind>().unwrap(), FlowMatchEuler);
        assert_eq!(SchedulerKind::from_class_name("FlowMatchEulerDiscreteScheduler"), Some(FlowMatchEuler));
        for kind in [Pndm, Ddim, EulerAncestral, DpmPp2m, DpmPp2mKarras, Lcm] {
            let err = SchedulerKind::for_schedule(kind, flow).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::InvalidInput(_)), "{text}");
            assert!(
                text.contains(kind.name()) && text.contains("flow-matching") && text.contains("discrete"),
                "{text}"
            );
            assert!(text.contains("use flow-euler, or euler"), "{text}");
        }
        for kind in [Pndm, Ddim, Euler, EulerAncestral, DpmPp2m, DpmPp2mKarras, Lcm] {
            assert_eq!(SchedulerKind::for_schedule(kind, ScheduleKind::Discrete).unwrap(), kind);
        }
        let err = SchedulerKind::for_schedule(FlowMatchEuler, ScheduleKind::Discrete).unwrap_err().to_string();
        assert!(err.contains("flow-euler") && err.contains("use pndm, ddim, euler"), "{err}");
    }

    #[test]
    fn zero_or_too_many_steps_are_invalid_input() {
        let config = SchedulerConfig::default();
        for kind in SchedulerKind::ALL {
            for steps in [0, 1001] {
                let err = build(kind, &config, steps).err().expect("should refuse");
                assert!(matches!(err, Error::InvalidInput(_)), "{kind} {steps}: {err}");
            }
        }
    }
}
