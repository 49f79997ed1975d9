//! From a JSON body to the engine's [`GenerateRequest`]: the body parsed with the field of any
//! wrong value named, the server's caps applied (size, steps, images), the model resolved among
//! those the server may open, the init image decoded — all before a job is queued, so a bad
//! request costs nothing and gets a 4xx naming the field.

use base64::Engine as _;
use sdgen::engine::{GenerateRequest, Img2ImgInput, RefinerRequest};
use sdgen::loading::ModelSource;
use sdgen::pipeline::{FamilyOptions, InitImage, Request};
use sdgen::planning::MemoryRequest;
use sdgen::schedulers::SchedulerKind;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::jobs::random_u64;

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

/// The models requests may name: the hub's (named models and repositories, fetched as the
/// engine's hub options allow) and, on disk, only those the server was started with — a request
/// must not make the server read any path it names.
#[derive(Debug, Clone)]
pub struct ModelPolicy {
    /// The folders and files given with `--model`/`--extra-model`, as given.
    pub paths: Vec<String>,
}

impl ModelPolicy {
    /// The model a request names (`field` for messages).
    pub fn resolve(&self, name: &str, field: &str) -> Result<ModelSource, ApiError> {
        let name = name.trim();
        if name.is_empty() {
            return Err(ApiError::invalid(field, format!("{field} is empty: name a model (see /sdapi/v1/sd-models)")));
        }
        if let Some(p) = self.paths.iter().find(|p| p.as_str() == name) {
            return Ok(ModelSource::parse(p));
        }
        match ModelSource::parse(name) {
            source @ ModelSource::Repo { .. } => Ok(source),
            ModelSource::Path(_) => Err(ApiError::invalid(
                field,
                format!(
                    "{field} `{name}` is not a model this server serves: name one of /sdapi/v1/sd-models, a named \
                     model (sdxl, sd15, …) or a hub repository (org/name)"
                ),
            )),
        }
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
    pub prompt: String,
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
}

/// The API's names of the fields the caps and checks are about.
pub struct Names {
    pub width: &'static str,
    pub height: &'static str,
    pub steps: &'static str,
    pub images: &'static str,
    pub init_image: &'static str,
}

impl Settings {
    /// Checks the server's caps, then the engine's own model-free checks, and makes the request.
    pub fn into_request(self, limits: &Limits, names: &Names) -> Result<GenerateRequest, ApiError> {
        let cap = |field: &str, value: usize, max: usize, what: &str| {
            if value == 0 {
                Err(ApiError::invalid(field, format!("{field} must be at least 1")))
            } else if value > max {
                Err(ApiError::invalid(
                    field,
                    format!("{field} {value} is more than this server's limit of {max} {what}"),
                ))
            } else {
                Ok(())
            }
        };
        if let Some(w) = self.width {
            cap(names.width, w, limits.max_width, "pixels")?;
        }
        if let Some(h) = self.height {
            cap(names.height, h, limits.max_height, "pixels")?;
        }
        if let Some(s) = self.steps {
            cap(names.steps, s, limits.max_steps, "steps")?;
        }
        cap(names.images, self.images, limits.max_images, "images per request")?;
        if let Some(init) = &self.init_image {
            // Without a size the output takes the init image's (rounded down to a multiple of 8).
            let (w, h) = (init.image.width, init.image.height);
            if (self.width.is_none() && w > limits.max_width) || (self.height.is_none() && h > limits.max_height) {
                return Err(ApiError::invalid(
                    names.init_image,
                    format!(
                        "{} is {w}x{h}, more than this server's limit of {}x{}: pass a smaller image or a width and \
                         height to resize it to",
                        names.init_image, limits.max_width, limits.max_height
                    ),
                ));
            }
        }
        let prompt = self.prompt;
        let request = GenerateRequest {
            model: self.model,
            open: Default::default(),
            vae: None,
            refiner: self.refiner,
            prompts: vec![prompt.clone()],
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
            // The server takes no LoRA yet (A1111 names them as `<lora:…>` prompt tags).
            loras: Vec::new(),
            // Nor upscaling or presets yet: its size caps would need to bound the upscaled size.
            upscale: None,
            preset: None,
        };
        Ok(request)
    }
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
