//! A model's `scheduler/scheduler_config.json`, read the way diffusers' `from_config` reads it.
//!
//! Every field is optional: the file is shared by whichever scheduler class the user picks, and
//! diffusers builds `Cls.from_config(cfg)` by passing only the fields `Cls.__init__` takes and
//! letting the others fall back to *that class's* defaults. SD 1.5's PNDM config, for example, has
//! no `timestep_spacing`, so PNDM and DDIM get `"leading"` while Euler gets `"linspace"`. Hence the
//! config stays raw here, and each scheduler resolves the fields it takes with its own defaults
//! (see `pndm.rs`, `ddim.rs`, `euler.rs`, `euler_ancestral.rs`, `dpm_solver.rs`, `flow_match.rs`, `lcm.rs`). Fields no class
//! we implement takes are ignored.
//!
//! diffusers writes its configs with Python's `json.dumps`, which spells non-finite floats as the
//! non-JSON tokens `Infinity`, `-Infinity` and `NaN`: every `DPMSolverMultistepScheduler` config
//! saved with the default `lambda_min_clipped` holds `-Infinity`. Those tokens are read as absent
//! (null), which for `lambda_min_clipped` is its default, -inf.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The raw contents of a `scheduler_config.json`; `None` means "absent (or null) in the file".
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    /// The diffusers class the model ships with, e.g. `"PNDMScheduler"`.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Number of diffusion steps the model was trained with (all classes default to 1000).
    pub num_train_timesteps: Option<usize>,
    /// First beta of the `linear` / `scaled_linear` schedules.
    pub beta_start: Option<f64>,
    /// Last beta of the `linear` / `scaled_linear` schedules.
    pub beta_end: Option<f64>,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: Option<String>,
    /// Explicit betas, overriding `beta_schedule`/`beta_start`/`beta_end`.
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample` (Euler also accepts the legacy `original_sample`).
    pub prediction_type: Option<String>,
    /// `linspace`, `leading` or `trailing` (Table 2 of <https://huggingface.co/papers/2305.08891>).
    pub timestep_spacing: Option<String>,
    /// Offset added to `leading` timesteps (SD 1.x/SDXL use 1).
    pub steps_offset: Option<i64>,
    /// PNDM/DDIM: whether the alpha product "before" step 0 is 1 instead of `alphas_cumprod[0]`.
    pub set_alpha_to_one: Option<bool>,
    /// PNDM: skip the Runge-Kutta warm-up and run pure PLMS (what Stable Diffusion ships with).
    pub skip_prk_steps: Option<bool>,
    /// DDIM: clip the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: Option<bool>,
    /// DDIM: the clipping range (default 1.0).
    pub clip_sample_range: Option<f64>,
    /// DDIM: Imagen's dynamic thresholding (not implemented: building with it set is an error).
    pub thresholding: Option<bool>,
    /// DDIM/Euler: rescale betas to zero terminal SNR (Algorithm 1 of 2305.08891).
    pub rescale_betas_zero_snr: Option<bool>,
    /// Euler: how sigmas are interpolated between training timesteps (only `linear` is supported).
    pub interpolation_type: Option<String>,
    /// Euler: use the Karras et al. (2022) sigma schedule.
    pub use_karras_sigmas: Option<bool>,
    /// Euler: use an exponential (log-linear in sigma) schedule.
    pub use_exponential_sigmas: Option<bool>,
    /// Euler: use the "beta sampling" schedule (not implemented: needs scipy's beta quantiles).
    pub use_beta_sigmas: Option<bool>,
    /// Euler: lower end of the Karras/exponential schedule (default: the smallest training sigma).
    pub sigma_min: Option<f64>,
    /// Euler: upper end of the Karras/exponential schedule (default: the largest training sigma).
    pub sigma_max: Option<f64>,
    /// Euler: `discrete` (the UNet sees timesteps) or `continuous` (v-prediction models that take
    /// `0.25 * ln(sigma)`).
    pub timestep_type: Option<String>,
    /// Euler/DPM-Solver: the sigma after the last step, `zero` or `sigma_min`.
    pub final_sigmas_type: Option<String>,
    /// DPM-Solver: the multistep order (1, 2 or 3; default 2).
    pub solver_order: Option<usize>,
    /// DPM-Solver: `dpmsolver++` (the default and the only one supported), `dpmsolver`,
    /// `sde-dpmsolver`, `sde-dpmsolver++`.
    pub algorithm_type: Option<String>,
    /// DPM-Solver: the second-order formula, `midpoint` (default) or `heun`.
    pub solver_type: Option<String>,
    /// DPM-Solver: use lower orders for the last steps of runs under 15 steps (default true).
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: use a first-order (Euler) last step (default false).
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: space the steps uniformly in log-SNR (lambda) (default false).
    pub use_lu_lambdas: Option<bool>,
    /// DPM-Solver: flow-matching sigmas (not implemented: building with it set is an error).
    pub use_flow_sigmas: Option<bool>,
    /// DPM-Solver: timesteps whose lambda is below this are not used (default -inf; the cosine
    /// schedule's configs set it, e.g. -5.1).
    pub lambda_min_clipped: Option<f64>,
    /// DPM-Solver: `learned`/`learned_range` models output a variance too (not implemented).
    pub variance_type: Option<String>,
    /// Flow matching: the static sigma shift `σ' = s·σ / (1 + (s − 1)·σ)` (SD 3 / 3.5: 3.0;
    /// default 1, no shift).
    pub shift: Option<f64>,
    /// Flow matching: shift by an image-size-dependent `mu` instead of `shift` (default false).
    pub use_dynamic_shifting: Option<bool>,
    /// Flow matching, dynamic shifting: `mu` at `base_image_seq_len` tokens (default 0.5).
    pub base_shift: Option<f64>,
    /// Flow matching, dynamic shifting: `mu` at `max_image_seq_len` tokens (default 1.15).
    pub max_shift: Option<f64>,
    /// Flow matching, dynamic shifting: the token count of `base_shift` (default 256).
    pub base_image_seq_len: Option<usize>,
    /// Flow matching, dynamic shifting: the token count of `max_shift` (default 4096).
    pub max_image_seq_len: Option<usize>,
    /// Flow matching, dynamic shifting: `exponential` (default) or `linear`.
    pub time_shift_type: Option<String>,
    /// Flow matching: use `1 − σ` (default false).
    pub invert_sigmas: Option<bool>,
    /// Flow matching: stretch the schedule so its last sigma is this value (LTX-Video).
    pub shift_terminal: Option<f64>,
    /// Flow matching: re-noise every step (not implemented: building with it set is an error).
    pub stochastic_sampling: Option<bool>,
    /// LCM: the length of the distillation schedule the inference timesteps are taken from
    /// (default 50: `T / 50 · k − 1` for k = 1..=50).
    pub original_inference_steps: Option<usize>,
    /// LCM: the factor on the timestep in the consistency boundary condition `c_skip`, `c_out`
    /// (default 10).
    pub timestep_scaling: Option<f64>,
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| Error::BadModel(format!("{}: {e}", path.display())))
    }

    /// Parses the JSON text of a `scheduler_config.json` (Python's `Infinity`, `-Infinity` and
    /// `NaN` read as null, see the module docs).
    pub fn from_json_str(json: &str) -> Result<Self> {
        serde_json::from_str(&non_finite_to_null(json))
            .map_err(|e| Error::BadModel(format!("invalid scheduler config JSON: {e}")))
    }

    /// The diffusers class named in the file (`_class_name`), if any.
    pub fn class_name(&self) -> Option<&str> {
        self.class_name.as_deref()
    }
}

/// Replaces the bare tokens `Infinity`, `-Infinity` and `NaN` (outside strings) by `null`.
fn non_finite_to_null(json: &str) -> std::borrow::Cow<'_, str> {
    if !["Infinity", "NaN"].iter().any(|t| json.contains(t)) {
        return std::borrow::Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = json;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

/// How betas are laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BetaSchedule {
    /// `linspace(beta_start, beta_end)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end)) ** 2`, the latent-diffusion schedule.
    ScaledLinear,
    /// The Glide cosine schedule, betas capped at 0.999.
    SquaredCosCapV2,
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PredictionType {
    /// The noise.
    Epsilon,
    /// The velocity `sqrt(a) * noise - sqrt(1 - a) * x0` (section 2.4 of Imagen Video).
    VPrediction,
    /// The denoised sample x0 itself.
    Sample,
}

/// How inference timesteps are picked from the training ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimestepSpacing {
    /// Evenly spread over `[0, T - 1]`, rounded (PNDM/DDIM) or fractional (Euler).
    Linspace,
    /// Multiples of `T / N` from 0, plus `steps_offset`.
    Leading,
    /// Multiples of `T / N` counted down from `T`, minus 1.
    Trailing,
}

/// Parses a string-valued config field against its valid names; the error names the field, the
/// value and the valid values.
fn parse_choice<T: Copy>(field: &str, value: &str, choices: &[(&str, T)]) -> Result<T> {
    choices.iter().find(|(name, _)| *name == value).map(|(_, v)| *v).ok_or_else(|| {
        let valid: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        Error::BadModel(format!("scheduler config: {field} \"{value}\" is not supported (valid: {})", valid.join(", ")))
    })
}

impl BetaSchedule {
    /// Parses `beta_schedule`.
    pub(crate) fn parse(value: &str) -> Result<Self> {
        parse_choice(
            "beta_schedule",
            value,
            &[
                ("linear", Self::Linear),
                ("scaled_linear", Self::ScaledLinear),
                ("squaredcos_cap_v2", Self::SquaredCosCapV2),
            ],
        )
    }
}

impl PredictionType {
    /// Parses `prediction_type`.
    pub(crate) fn parse(value: &str) -> Result<Self> {
        parse_choice(
            "prediction_type",
            value,
            &[("epsilon", Self::Epsilon), ("v_prediction", Self::VPrediction), ("sample", Self::Sample)],
        )
    }
}

impl TimestepSpacing {
    /// Parses `timestep_spacing`.
    pub(crate) fn parse(value: &str) -> Result<Self> {
        parse_choice(
            "timestep_spacing",
            value,
            &[("linspace", Self::Linspace), ("leading", Self::Leading), ("trailing", Self::Trailing)],
        )
    }
}

/// The fields every implemented class takes, resolved with one class's defaults.
#[derive(Debug, Clone)]
pub(crate) struct CommonParams {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `None` when `trained_betas` is given: diffusers never looks at `beta_schedule` then.
    pub beta_schedule: Option<BetaSchedule>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl CommonParams {
    /// Resolves the shared fields; `default_spacing` is the one default that differs by class
    /// (`leading` for PNDM and DDIM, `linspace` for Euler).
    pub(crate) fn resolve(config: &SchedulerConfig, default_spacing: TimestepSpacing) -> Result<Self> {
        let num_train_timesteps = config.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps < 2 {
            return Err(Error::BadModel(format!(
                "scheduler config: num_train_timesteps {num_train_timesteps} is too small (need at least 2)"
            )));
        }
        let trained_betas = config.trained_betas.clone();
        if let Some(betas) = &trained_betas {
            if betas.len() != num_train_timesteps {
                return Err(Error::BadModel(format!(
                    "scheduler config: trained_betas has {} entries but num_train_timesteps is {num_train_timesteps}",
                    betas.len()
                )));
            }
        }
        let beta_schedule = match trained_betas {
            Some(_) => None,
            None => Some(BetaSchedule::parse(config.beta_schedule.as_deref().unwrap_or("linear"))?),
        };
        Ok(Self {
            num_train_timesteps,
            beta_start: config.beta_start.unwrap_or(0.0001),
            beta_end: config.beta_end.unwrap_or(0.02),
            beta_schedule,
            trained_betas,
            prediction_type: PredictionType::parse(config.prediction_type.as_deref().unwrap_or("epsilon"))?,
            timestep_spacing: match config.timestep_spacing.as_deref() {
                Some(s) => TimestepSpacing::parse(s)?,
                None => default_spacing,
            },
            steps_offset: config.steps_offset.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sd15_config_and_ignores_unknown_fields() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"_class_name":"PNDMScheduler","_diffusers_version":"0.6.0","beta_end":0.012,
                "beta_schedule":"scaled_linear","beta_start":0.00085,"num_train_timesteps":1000,
                "set_alpha_to_one":false,"skip_prk_steps":true,"steps_offset":1,"trained_betas":null,
                "clip_sample":false,"something_new":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(cfg.class_name(), Some("PNDMScheduler"));
        assert_eq!(cfg.trained_betas, None);
        assert_eq!(cfg.timestep_spacing, None);
        let pndm = CommonParams::resolve(&cfg, TimestepSpacing::Leading).unwrap();
        assert_eq!(pndm.timestep_spacing, TimestepSpacing::Leading);
        assert_eq!(pndm.beta_schedule, Some(BetaSchedule::ScaledLinear));
        assert_eq!(pndm.steps_offset, 1);
        let euler = CommonParams::resolve(&cfg, TimestepSpacing::Linspace).unwrap();
        assert_eq!(euler.timestep_spacing, TimestepSpacing::Linspace);
    }

    #[test]
    fn python_non_finite_floats_read_as_absent() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"_class_name":"DPMSolverMultistepScheduler","lambda_min_clipped": -Infinity,
                "algorithm_type":"dpmsolver++ \"-Infinity\" NaN","sigma_max":Infinity,"sigma_min":NaN}"#,
        )
        .unwrap();
        assert_eq!(cfg.lambda_min_clipped, None);
        assert_eq!(cfg.sigma_max, None);
        assert_eq!(cfg.sigma_min, None);
        // Inside strings the tokens stay.
        assert_eq!(cfg.algorithm_type.as_deref(), Some("dpmsolver++ \"-Infinity\" NaN"));
    }

    #[test]
    fn bad_values_name_the_field() {
        let cfg = SchedulerConfig::from_json_str(r#"{"timestep_spacing":"sideways"}"#).unwrap();
        let err = CommonParams::resolve(&cfg, TimestepSpacing::Leading).unwrap_err().to_string();
        assert!(err.contains("timestep_spacing \"sideways\""), "{err}");
        assert!(err.contains("linspace, leading, trailing"), "{err}");
        let err = SchedulerConfig::from_json_str("{not json").unwrap_err().to_string();
        assert!(err.contains("scheduler config"), "{err}");
    }

    /// SD 3.5's `scheduler/scheduler_config.json` (stabilityai/stable-diffusion-3.5-large, verbatim;
    /// Medium's and Large Turbo's are the same).
    #[test]
    fn parses_sd35_flow_matching_config() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/scheduler-configs/sd35.json");
        let cfg = SchedulerConfig::from_file(path).unwrap();
        assert_eq!(cfg.class_name(), Some("FlowMatchEulerDiscreteScheduler"));
        assert_eq!((cfg.num_train_timesteps, cfg.shift), (Some(1000), Some(3.0)));
        assert_eq!((cfg.use_dynamic_shifting, cfg.shift_terminal), (None, None));
    }

    #[test]
    fn from_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("scheduler_config.json");
        let err = SchedulerConfig::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("scheduler_config.json"), "{err}");
        std::fs::write(&missing, r#"{"_class_name":"EulerDiscreteScheduler","steps_offset":1}"#).unwrap();
        let cfg = SchedulerConfig::from_file(&missing).unwrap();
        assert_eq!(cfg.class_name(), Some("EulerDiscreteScheduler"));
        assert_eq!(cfg.steps_offset, Some(1));
    }
}
