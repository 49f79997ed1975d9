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
use sdgen::loading::lora::LoraFile;
use sdgen::loading::{ModelFolder, ModelSource};
use sdgen::pipeline::{resolve_hires, resolve_image_refiner, Img2ImgRequest, RefinerRun, Settings};

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

    /// Checks `req` (blocking: run it off the async threads) as the engine will run it: the
    /// model with its local VAE and LoRAs, the first pass, the refiner and the hires pass at the
    /// upscaled size (within `limits`), each planned on its own as the engine plans them. `name`
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
        // Quantised as the engine quantises it (a GGUF is refused here, naming the field), so the
        // plan counts the denoiser's quantised bytes.
        let model = match req.open.weights {
            Some(q) => model.with_quantise(Some(q)).map_err(engine_error)?,
            None => model,
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
        let settings = match &req.img2img {
            Some(i) => {
                let r =
                    Img2ImgRequest { request: req.params.clone(), init_image: i.image.clone(), strength: i.strength };
                sdgen::pipeline::resolve_img2img(&model, &r).map_err(engine_error)?.settings
            }
            None => sdgen::pipeline::resolve(&model, &req.params).map_err(engine_error)?,
        };
        let rt = &self.config.runtime;
        // Planned as the engine plans it: the warm weights count as free (evicted if need be).
        let warm_bytes = self.config.warm.as_ref().map_or(0, |w| w.bytes());
        let memory = sdgen::planning::MemoryRequest { warm_bytes, ..req.memory };
        let plan = |m: &ModelFolder, s: &Settings, img2img: bool, pass: &str| {
            sdgen::planning::plan_run(m, s, req.params.n, img2img, &rt.device, rt.dtype, memory)
                .map(|_| ())
                .map_err(|e| does_not_fit(pass, &e, name))
        };
        plan(&model, &settings, req.img2img.is_some(), "")?;
        // The refiner runs after the base is unloaded: planned on its own, as the engine does.
        if let Some(r) = &req.refiner {
            let refiner = match self.open(&r.source) {
                Ok(Some(m)) => Some(m),
                Ok(None) => None,
                Err(e) => return Err(engine_error(about("refiner", e))),
            };
            if let Some(refiner) = &refiner {
                let run = RefinerRun::choose(&model, refiner, r.start, r.strength)
                    .map_err(|e| about("refiner", e))
                    .map_err(engine_error)?;
                match run {
                    RefinerRun::Latents(l) => plan(l.model, &settings, false, "the refiner: ")?,
                    RefinerRun::Image(i) => {
                        let s = resolve_image_refiner(&model, &i, &req.params).map_err(engine_error)?;
                        plan(i.model, &s.settings, true, "the refiner: ")?
                    }
                }
            }
        }
        // The upscaled size within the caps (the model's default size is known only now), then
        // the hires pass planned at it.
        if !req.upscale.is_empty() {
            let field = name("upscale").unwrap_or("upscale");
            check_output_size(upscale_factor(req), (settings.width, settings.height), limits, field)?;
        }
        let (mut w, mut h) = (settings.width, settings.height);
        for u in &req.upscale {
            (w, h) = (w * u.factor as usize, h * u.factor as usize);
            if let Some(strength) = u.hires_strength {
                let s = resolve_hires(&model, &req.params, w, h, strength, u.tiled).map_err(engine_error)?;
                plan(&model, &s.settings, true, "the hires pass: ")?;
            }
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

/// The planner's refusal of a pass (`pass` names it, empty for the first): 507 with its numbers,
/// the fields its advice would change named as the API (`name`) names them.
fn does_not_fit(pass: &str, e: &sdgen::Error, name: &dyn Fn(&'static str) -> Option<&'static str>) -> ApiError {
    let engine = ApiError::from_engine(e, name);
    let lead = "the job does not fit this server's memory: ";
    ApiError {
        field: None,
        template: engine.template.map(|t| format!("{lead}{pass}{t}")),
        ..ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "does_not_fit", format!("{lead}{pass}{}", engine.message))
    }
}
