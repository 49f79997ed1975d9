//! From a JSON body to the engine's [`GenerateRequest`]: the body parsed with the field of any
//! wrong value named, the server's caps applied (size, steps, images), the model resolved among
//! those the server may open, the init image decoded — all before a job is queued, so a bad
//! request costs nothing and gets a 4xx naming the field.

use base64::Engine as _;
use sdgen::engine::{GenerateRequest, Img2ImgInput, LoraRequest, RefinerRequest, UpscaleRequest};
use sdgen::loading::quantise::Quantise;
use sdgen::loading::{ModelSource, OpenOptions};
use sdgen::pipeline::{FamilyOptions, InitImage, Request};
use sdgen::planning::MemoryRequest;
use sdgen::schedulers::SchedulerKind;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::jobs::{random_u64, Api};

/// The per-request caps (`--max-width`, …): what one request may ask of this server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Widest image, in pixels.
    pub max_width: usize,
    /// Tallest image, in pixels.
    pub max_height: usize,
    /// Most denoising steps.
    pub max_steps: usize,
    /// Most images one request makes.
    pub max_images: usize,
}

/// The models, VAEs and LoRAs requests may name: the hub's (named models and repositories,
/// fetched as the engine's hub options allow) and, on disk, only those the server was started
/// with — a request must not make the server read any path it names.
#[derive(Debug, Clone, Default)]
pub struct ModelPolicy {
    /// The folders and files given with `--model`/`--extra-model`, as given.
    pub paths: Vec<String>,
    /// The VAE folders given with `--extra-vae`, as given.
    pub vaes: Vec<String>,
    /// The LoRA files given with `--extra-lora`, as given.
    pub loras: Vec<String>,
}

impl ModelPolicy {
    /// The model a request names (`field` for messages).
    pub fn resolve(&self, name: &str, field: &str) -> Result<ModelSource, ApiError> {
        let what = "a model this server serves: name one of /sdapi/v1/sd-models, a named model (sdxl, sd15, …) or \
                    a hub repository (org/name)";
        allowed(&self.paths, name, field, "a model (see /sdapi/v1/sd-models)", what)
    }

    /// The VAE a request names.
    pub fn vae(&self, name: &str, field: &str) -> Result<ModelSource, ApiError> {
        let what = "a VAE this server may open: name a hub repository (org/name) or a folder the server was \
                    started with (--extra-vae)";
        allowed(&self.vaes, name, field, "a VAE", what)
    }

    /// A LoRA a request names.
    pub fn lora(&self, name: &str, scale: Option<f64>, field: &str) -> Result<LoraRequest, ApiError> {
        let what = "a LoRA this server may open: name a hub repository (org/name) holding one, or a file the \
                    server was started with (--extra-lora)";
        let source = allowed(&self.loras, name, field, "a LoRA", what)?;
        let scale = scale.unwrap_or(sdgen::loading::lora::DEFAULT_SCALE);
        if !scale.is_finite() {
            return Err(ApiError::invalid(field, format!("{field}: the scale {scale} is not a number")));
        }
        Ok(LoraRequest { source, scale })
    }
}

/// `name` as a source: one of `paths` (as the server was started with them) or a hub repository,
/// never another path; `kind` and `what` word the refusals.
fn allowed(paths: &[String], name: &str, field: &str, kind: &str, what: &str) -> Result<ModelSource, ApiError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ApiError::invalid(field, format!("{field} is empty: name {kind}")));
    }
    if let Some(p) = paths.iter().find(|p| p.as_str() == name) {
        return Ok(ModelSource::parse(p));
    }
    match ModelSource::parse(name) {
        source @ ModelSource::Repo { .. } => Ok(source),
        ModelSource::Path(_) => Err(ApiError::invalid(field, format!("{field} `{name}` is not {what}"))),
    }
}

/// Parses a JSON object body into `T`: 400 for what is not JSON, 422 naming the field whose
/// value has the wrong type (`rename` maps a serde path to the API's name for it).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<(T, serde_json::Value), ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    }
    let parsed = serde_path_to_error::deserialize(&value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // A missing field is reported at the object that lacks it: name the field.
        let missing = inner.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
        match missing {
            Some(name) => {
                let field = if path == "." { name.to_string() } else { format!("{path}.{name}") };
                ApiError::invalid(field, inner)
            }
            None if inner.starts_with("unknown field") => ApiError::invalid(path, inner),
            None => ApiError::invalid(path.clone(), format!("{path}: {inner}")),
        }
    })?;
    Ok((parsed, value))
}

pub use sdgen::engine::wire::Seed;

/// The seed, drawn now when random (recorded in every image's metadata).
pub fn seed_value(seed: Seed) -> u64 {
    // As the CLI: a random seed stays below 2^32 so A1111's UI can type it back in.
    seed.0.unwrap_or_else(|| random_u64() >> 32)
}

/// Everything a request asks for, in the engine's terms with the API's field names for errors.
#[derive(Debug)]
pub struct Settings {
    /// One job of `images` images each.
    pub prompts: Vec<String>,
    pub negative_prompt: Option<String>,
    pub model: ModelSource,
    pub images: usize,
    pub batch_size: usize,
    pub seed: Seed,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub scheduler: Option<SchedulerKind>,
    pub init_image: Option<InitImage>,
    pub strength: Option<f64>,
    pub family_options: FamilyOptions,
    pub refiner: Option<RefinerRequest>,
    pub vae: Option<ModelSource>,
    pub loras: Vec<LoraRequest>,
    pub upscale: Vec<UpscaleRequest>,
    /// A quality preset's name.
    pub quality: Option<String>,
    /// The denoiser's weights quantised as they load.
    pub weights: Option<Quantise>,
}

impl Settings {
    /// Fills in the preset, checks the server's caps (on the upscaled size too), and makes the
    /// request; the engine's own checks run in the pre-queue check.
    pub fn into_request(self, limits: &Limits, api: Api) -> Result<GenerateRequest, ApiError> {
        let preset = self
            .quality
            .as_deref()
            .map(sdgen::presets::find)
            .transpose()
            .map_err(|e| ApiError::from_engine(&e, &api.field_names()))?;
        let prompt = self.prompts.first().cloned().unwrap_or_default();
        let mut request = GenerateRequest {
            model: self.model,
            open: OpenOptions { weights: self.weights, ..Default::default() },
            vae: self.vae,
            refiner: self.refiner,
            prompts: self.prompts,
            params: Request {
                prompt,
                negative_prompt: self.negative_prompt.filter(|n| !n.is_empty()),
                n: self.images,
                seed: seed_value(self.seed),
                steps: self.steps,
                guidance: self.guidance,
                width: self.width,
                height: self.height,
                scheduler: self.scheduler,
                family_options: self.family_options,
                // Prompts are read A1111's way, the engine's default (the job API has no field for
                // the style or the clip skip yet).
                prompt_options: Default::default(),
            },
            img2img: self.init_image.map(|image| Img2ImgInput { image, strength: self.strength }),
            memory: MemoryRequest { max_images_per_batch: Some(self.batch_size.max(1)), ..Default::default() },
            loras: self.loras,
            upscale: self.upscale,
            preset: None,
        };
        if let Some(p) = preset {
            p.apply(&mut request).map_err(|e| ApiError::from_engine(&e, &api.field_names()))?;
        }
        check_caps(&request, limits, api)?;
        Ok(request)
    }
}

/// The server's caps on what `req` asks for: size (the first pass's and, upscaled, the output's),
/// steps, images in all; errors name the fields as `api` does.
fn check_caps(req: &GenerateRequest, limits: &Limits, api: Api) -> Result<(), ApiError> {
    let cap = |field: &str, value: usize, max: usize, what: &str| {
        if value == 0 {
            Err(ApiError::invalid(field, format!("{field} must be at least 1")))
        } else if value > max {
            Err(ApiError::invalid(field, format!("{field} {value} is more than this server's limit of {max} {what}")))
        } else {
            Ok(())
        }
    };
    let p = &req.params;
    if let Some(w) = p.width {
        cap(api.field("width"), w, limits.max_width, "pixels")?;
    }
    if let Some(h) = p.height {
        cap(api.field("height"), h, limits.max_height, "pixels")?;
    }
    if let Some(s) = p.steps {
        cap(api.field("steps"), s, limits.max_steps, "steps")?;
    }
    cap(api.field("n"), req.image_count(), limits.max_images, "images per request")?;
    if let Some(init) = req.img2img.as_ref().map(|i| &i.image) {
        // Without a size the output takes the init image's (rounded down to a multiple of 8).
        let (w, h) = (init.image.width, init.image.height);
        if (p.width.is_none() && w > limits.max_width) || (p.height.is_none() && h > limits.max_height) {
            return Err(ApiError::invalid(
                api.field("init_image"),
                format!(
                    "{} is {w}x{h}, more than this server's limit of {}x{}: pass a smaller image or a width and \
                     height to resize it to",
                    api.field("init_image"),
                    limits.max_width,
                    limits.max_height
                ),
            ));
        }
    }
    // The output's size where the request says it; a model's default size is checked once the
    // model is open (the pre-queue check, [`check_output_size`]).
    if let (false, Some(w), Some(h)) = (req.upscale.is_empty(), p.width, p.height) {
        check_output_size(upscale_factor(req), (w, h), limits, api.field("upscale"))?;
    }
    Ok(())
}

/// The factor all of `req`'s upscaling steps multiply each side by (1 without any).
pub fn upscale_factor(req: &GenerateRequest) -> u32 {
    req.upscale.iter().map(|u| u.factor).product()
}

/// The upscaled size `size × factor` within the caps, or 422 naming `field` (the factor's).
pub fn check_output_size(factor: u32, size: (usize, usize), limits: &Limits, field: &str) -> Result<(), ApiError> {
    let f = factor as usize;
    let (w, h) = (size.0.saturating_mul(f), size.1.saturating_mul(f));
    if w > limits.max_width || h > limits.max_height {
        return Err(ApiError::invalid(
            field,
            format!(
                "{field} {factor} makes {}x{} into {w}x{h}, more than this server's limit of {}x{} pixels",
                size.0, size.1, limits.max_width, limits.max_height
            ),
        ));
    }
    Ok(())
}

/// A quantisation by its name (`q8`, `q4`), or 422 naming `field`.
pub fn weights(name: &str, field: &str) -> Result<Quantise, ApiError> {
    name.parse().map_err(|e: String| ApiError::invalid(field, format!("{field}: {e}")))
}

/// A scheduler by any of its names (ours or A1111's), or 422 naming `field`.
pub fn scheduler(name: &str, field: &str) -> Result<SchedulerKind, ApiError> {
    name.parse().map_err(|e: sdgen::Error| ApiError::invalid(field, format!("{field}: {e}")))
}

/// A base64 image (optionally a `data:image/…;base64,` URL, as A1111 accepts), decoded as
/// `--init-image` would read the file; `field` names it in errors.
pub fn init_image(data: &str, field: &str) -> Result<InitImage, ApiError> {
    let payload = match data.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => data,
    };
    let cleaned: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(cleaned.as_bytes())
        .map_err(|e| ApiError::invalid(field, format!("{field} is not valid base64: {e}")))?;
    let image = sdgen::image_io::decode_rgb(&bytes, field).map_err(|e| ApiError::invalid(field, e.to_string()))?;
    Ok(InitImage { name: field.to_string(), image })
}
