//! The check before a job is queued: its model opened (configs and safetensors headers only,
//! from disk or the local hub cache — nothing is downloaded here), its settings resolved against
//! the model, and the memory planner asked whether it fits the budget. A job that cannot fit is
//! refused at once with the planner's numbers (507), never queued to fail or run out of memory
//! later; a setting the model cannot take gets 422 naming the field.
//!
//! The check is the engine's own planning ([`sdgen::engine::plan`]), so a job is refused here
//! exactly when the engine would refuse it with the same models and memory. The engine plans
//! every job again before it loads a weight (the budget may have changed by then); this check
//! is the early answer a client waits for, as `generate --check` is the CLI's.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::StatusCode;
use sdgen::engine::{EngineConfig, GenerateRequest};
use sdgen::hub::HubOptions;
use sdgen::loading::lora::LoraFile;
use sdgen::loading::{ModelFolder, ModelSource};
use sdgen::pipeline::Runtime;

use crate::error::ApiError;
use crate::request::{check_output_size, upscale_factor, Limits};

/// Opened models (parsed once, kept while the server runs) and the device to plan for.
#[derive(Debug)]
pub struct Preflight {
    config: EngineConfig,
    models: Mutex<HashMap<String, ModelFolder>>,
}

/// What the check found.
#[derive(Debug)]
pub enum Verdict {
    /// It fits.
    Fits,
    /// The model is not here yet (a hub model the engine will download first): planned then.
    NotLocal,
}

impl Preflight {
    /// Checks on `config`'s device, models from its hub cache only.
    pub fn new(config: EngineConfig) -> Self {
        Self { config, models: Mutex::default() }
    }

    /// Where models come from.
    pub fn hub(&self) -> &HubOptions {
        &self.config.hub
    }

    /// Opens `source` from disk or the cache; `Ok(None)` for a hub model not downloaded yet
    /// (when the server may download).
    pub fn open(&self, source: &ModelSource) -> Result<Option<ModelFolder>, sdgen::Error> {
        let key = source.label();
        if let Some(m) = self.models.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(Some(m.clone()));
        }
        let hub = HubOptions { offline: true, ..self.config.hub.clone() };
        match source.open_with(&hub, &Default::default(), &mut |_| {}) {
            Ok(model) => {
                self.models.lock().unwrap_or_else(|e| e.into_inner()).insert(key, model.clone());
                Ok(Some(model))
            }
            Err(_) if matches!(source, ModelSource::Repo { .. }) && !self.config.hub.offline => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Checks `req` (blocking: run it off the async threads) with the engine's own planning
    /// ([`sdgen::engine::plan`]) on the models as they are here: the model with its local VAE and
    /// LoRAs, the refiner when it is here (a hub one not downloaded yet is planned by the worker),
    /// every pass planned as the engine plans it, then the upscaled size within `limits`. `name`
    /// maps the engine's field names to the API's.
    pub fn check(
        &self,
        req: &GenerateRequest,
        name: &dyn Fn(&'static str) -> Option<&'static str>,
        model_field: &str,
        limits: &Limits,
    ) -> Result<Verdict, ApiError> {
        let engine_error = |e: sdgen::Error| ApiError::from_engine(&e, name);
        req.validate().map_err(engine_error)?;
        let model = match self.open(&req.model) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(Verdict::NotLocal),
            Err(e) => {
                return Err(ApiError::invalid(
                    model_field,
                    format!("{model_field} `{}` cannot be opened: {}", req.model.label(), e.describe(name)),
                ))
            }
        };
        // A VAE folder of the server's own replaces the model's (and its weights are planned); a
        // hub one is fetched by the worker, planned then.
        let model = match &req.vae {
            Some(ModelSource::Path(dir)) => model.with_vae(dir).map_err(|e| about("vae", e)).map_err(engine_error)?,
            _ => model,
        };
        // Local LoRAs are checked against the model now (headers only); a hub one when fetched.
        let local_loras: Vec<LoraFile> = (req.loras.iter())
            .filter_map(|l| match &l.source {
                ModelSource::Path(p) => Some(LoraFile::new(p, l.scale)),
                ModelSource::Repo { .. } => None,
            })
            .collect();
        let model = match local_loras.is_empty() {
            true => model,
            false => model.with_loras(&local_loras).map_err(|e| about("lora", e)).map_err(engine_error)?,
        };
        // The refiner with the VAE the engine gives it (the request's local one where it decodes
        // the base's latents).
        let refiner = match &req.refiner {
            Some(r) => self.open(&r.source).map_err(|e| engine_error(about("refiner", e)))?,
            None => None,
        };
        let refiner = match refiner {
            Some(m) => match sdgen::engine::refiner_vae(&model, &m, req.vae.as_ref()) {
                Some(ModelSource::Path(dir)) => {
                    Some(m.with_vae(dir).map_err(|e| about("refiner", e)).map_err(engine_error)?)
                }
                _ => Some(m),
            },
            None => None,
        };
        // Planned as the engine plans it: the warm weights count as free (evicted if need be).
        let rt = Runtime { warm: self.config.warm.clone(), ..self.config.runtime.clone() };
        let job =
            sdgen::engine::plan(&model, refiner.as_ref(), req, &rt, &mut |_| {}).map_err(|e| refused(&e, name))?;
        // The upscaled size within the caps (the model's default size is known only now).
        if !req.upscale.is_empty() {
            let field = name("upscale").unwrap_or("upscale");
            check_output_size(upscale_factor(req), job.first_size, limits, field)?;
        }
        Ok(Verdict::Fits)
    }
}

/// `e` about `field`, unless it names a field already.
fn about(field: &'static str, e: sdgen::Error) -> sdgen::Error {
    if e.field().is_some() {
        e
    } else {
        sdgen::Error::about(field, e)
    }
}

/// The engine's refusal of the job as the API answers it; the planner's (507; a later pass's
/// about its field) says it is this server's memory.
fn refused(e: &sdgen::Error, name: &dyn Fn(&'static str) -> Option<&'static str>) -> ApiError {
    let engine = ApiError::from_engine(e, name);
    if engine.status != StatusCode::INSUFFICIENT_STORAGE {
        return engine;
    }
    let lead = "the job does not fit this server's memory: ";
    ApiError {
        message: format!("{lead}{}", engine.message),
        template: engine.template.as_ref().map(|t| format!("{lead}{t}")),
        ..engine
    }
}
