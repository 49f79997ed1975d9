//! The check before a job is queued: its model opened (configs and safetensors headers only,
//! from disk or the local hub cache — nothing is downloaded here), its settings resolved against
//! the model, and the memory planner asked whether it fits the budget. A job that cannot fit is
//! refused at once with the planner's numbers (507), never queued to fail or run out of memory
//! later; a setting the model cannot take gets 422 naming the field.
//!
//! The engine plans every job again before it loads a weight (the budget may have changed by
//! then); this check is the early answer a client waits for, as `generate --check` is the CLI's.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::StatusCode;
use sdgen::engine::{EngineConfig, GenerateRequest};
use sdgen::hub::HubOptions;
use sdgen::loading::{ModelFolder, ModelSource};
use sdgen::pipeline::Img2ImgRequest;

use crate::error::ApiError;

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

    /// Checks `req` (blocking: run it off the async threads). `name` maps the engine's field
    /// names to the API's.
    pub fn check(
        &self,
        req: &GenerateRequest,
        name: &dyn Fn(&'static str) -> Option<&'static str>,
        model_field: &str,
    ) -> Result<Verdict, ApiError> {
        let engine_error = |e: sdgen::Error| ApiError::from_engine(&e, name);
        req.validate().map_err(engine_error)?;
        let model = match self.open(&req.model) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(Verdict::NotLocal),
            Err(e) => {
                return Err(ApiError::invalid(
                    model_field,
                    format!("{model_field} `{}` cannot be opened: {e}", req.model.label()),
                ))
            }
        };
        let settings = match &req.img2img {
            Some(i) => {
                let r =
                    Img2ImgRequest { request: req.params.clone(), init_image: i.image.clone(), strength: i.strength };
                sdgen::pipeline::resolve_img2img(&model, &r).map_err(engine_error)?.settings
            }
            None => sdgen::pipeline::resolve(&model, &req.params).map_err(engine_error)?,
        };
        let rt = &self.config.runtime;
        let plan = sdgen::planning::plan_run(
            &model,
            &settings,
            req.params.n,
            req.img2img.is_some(),
            &rt.device,
            rt.dtype,
            req.memory,
        );
        match plan {
            Ok(_) => Ok(Verdict::Fits),
            Err(e) => Err(ApiError {
                field: None,
                ..ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "does_not_fit",
                    format!("the job does not fit this server's memory: {e}"),
                )
            }),
        }
    }
}
