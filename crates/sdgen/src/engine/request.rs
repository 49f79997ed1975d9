//! What a job asks for: the engine's request, as the CLI's flags or a server's JSON say it.

use std::path::PathBuf;

use crate::error::field::{INIT_IMAGE, MODEL};
use crate::loading::lora::LoraRequest;
use crate::loading::{ModelSource, OpenOptions};
use crate::pipeline::{check_strength, check_upscale, InitImage, Request, UPSCALE_STEPS};
use crate::planning::MemoryRequest;
use crate::{Error, Result};

/// The most images one job makes: more is a mistake or several jobs.
pub const MAX_IMAGES: usize = 10_000;

/// The fields [`Error::Invalid`] and [`Error::About`] name, and those messages refer to
/// ([`crate::error::field`]): the request's, as a server's JSON spells them (`params.width` is
/// `width`, `refiner.start` is `refiner_start`).
pub const FIELDS: &[&str] = crate::error::field::ALL;

/// One generation job: the model and what to make with it. Output naming is the caller's.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenerateRequest {
    /// The model: a named model, a hub repository, a diffusers folder or a single-file checkpoint.
    pub model: ModelSource,
    /// How to open it (a single file's config folder).
    pub open: OpenOptions,
    /// A VAE replacing the model's own (a hub repository or a diffusers VAE folder).
    pub vae: Option<ModelSource>,
    /// A refiner finishing text-to-image runs.
    pub refiner: Option<RefinerRequest>,
    /// LoRAs fused into the model's UNet and text encoders (not the refiner's), in this order.
    pub loras: Vec<LoraRequest>,
    /// The prompts, each a job of `params.n` images; image `g` of the whole run takes
    /// `params.seed + g`, so the seeds continue from one prompt's images to the next.
    pub prompts: Vec<String>,
    /// Everything else, as for one prompt: negative prompt, images per prompt (`n`), seed, steps,
    /// guidance, size, scheduler, family options. Its `prompt` is not read: each of `prompts`
    /// takes its place in turn.
    pub params: Request,
    /// Image-to-image: the picture every image starts from, and how much to change it.
    pub img2img: Option<Img2ImgInput>,
    /// The memory the job may use, how to trade speed for it, and the images per batch asked for.
    pub memory: MemoryRequest,
    /// The passes after each batch is made (after the refiner, if any), in order: each a Lanczos
    /// upscale, then optionally a hires image-to-image pass at the upscaled size (`--upscale`
    /// makes one step; the `4k-ultra` preset two).
    pub upscale: Vec<UpscaleRequest>,
    /// The quality preset the request was filled in from (see [`crate::presets`]), for the
    /// metadata: the preset's values are already in the fields above.
    pub preset: Option<String>,
}

/// Upscaling the finished images, and the hires pass after it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpscaleRequest {
    /// Each side is multiplied by this (2, 3 or 4), with PIL's Lanczos.
    pub factor: u32,
    /// Then an image-to-image pass of the same model over the upscaled images, re-noised to this
    /// strength in [0, 1] (A1111's hires fix); `None`: no such pass.
    pub hires_strength: Option<f64>,
    /// The hires pass denoises in MultiDiffusion's overlapping tiles of the model's native size
    /// ([`crate::pipeline::DenoiseTiles::native`]) rather than the whole latent at once.
    pub tiled: bool,
}

/// The starting picture of an image-to-image job.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Img2ImgInput {
    /// The decoded picture.
    pub image: InitImage,
    /// How much to change it, in [0, 1]; `None` is the family's default.
    pub strength: Option<f64>,
}

/// A refiner and its knobs; which knob applies depends on the models (see
/// [`RefinerRun::choose`](crate::pipeline::RefinerRun::choose)).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RefinerRequest {
    /// The refiner model.
    pub source: ModelSource,
    /// The handoff point of a latent handoff (SDXL), a fraction of the steps in (0, 1).
    pub start: Option<f64>,
    /// The strength of an image handoff (SD 3.5), in [0, 1].
    pub strength: Option<f64>,
}

impl GenerateRequest {
    /// A text-to-image request for `prompt` on `model`, every other setting the model's default.
    pub fn new(model: ModelSource, prompt: impl Into<String>) -> Self {
        let prompt = prompt.into();
        Self {
            model,
            open: OpenOptions::default(),
            vae: None,
            refiner: None,
            loras: Vec::new(),
            prompts: vec![prompt.clone()],
            params: Request { prompt, n: 1, ..Default::default() },
            img2img: None,
            memory: MemoryRequest::default(),
            upscale: Vec::new(),
            preset: None,
        }
    }

    /// Images the whole job makes: `params.n` per prompt.
    pub fn image_count(&self) -> usize {
        self.params.n.saturating_mul(self.prompts.len())
    }

    /// The checks that need no model: prompts, counts, the seed range, the refiner's and the
    /// init image's knobs. What depends on the model (sizes, steps, schedulers) is checked when
    /// it is open, still before any weight loads.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidInput(m));
        let invalid = |field, m: String| Err(Error::invalid(field, m));
        if self.prompts.is_empty() {
            return bad("no prompts: the file or standard input has no non-blank line".into());
        }
        if self.params.n == 0 {
            return invalid("n", "must be at least 1".into());
        }
        let all = self.image_count();
        if all > MAX_IMAGES {
            let prompts = super::plural(self.prompts.len(), "prompt");
            return invalid(
                "n",
                format!(
                    "{} × {prompts} is {all} images, more than the {MAX_IMAGES} one run makes: split it into \
                     several runs (each with its own seed)",
                    self.params.n
                ),
            );
        }
        // Image g takes seed + g: the last must not wrap around to seed 0.
        let seed = self.params.seed;
        if seed.checked_add(all as u64 - 1).is_none() {
            return invalid(
                "seed",
                format!(
                    "{seed} with {all} images would run past the largest seed ({}): use a seed up to {}",
                    u64::MAX,
                    u64::MAX - (all as u64 - 1)
                ),
            );
        }
        if let Some(s) = self.img2img.as_ref().and_then(|i| i.strength) {
            check_strength(s)?;
        }
        if self.upscale.len() > UPSCALE_STEPS.len() {
            return invalid(
                "upscale",
                format!("{} upscaling steps asked for; a job runs at most {}", self.upscale.len(), UPSCALE_STEPS.len()),
            );
        }
        for u in &self.upscale {
            check_upscale(u.factor)?;
            if let Some(s) = u.hires_strength.filter(|s| !(0.0..=1.0).contains(s)) {
                return invalid(
                    "hires_strength",
                    format!("{s} is outside [0, 1] (0 keeps the upscaled image, 1 replaces it entirely)"),
                );
            }
        }
        if let Some(r) = &self.refiner {
            if self.img2img.is_some() {
                return invalid(
                    "refiner",
                    format!(
                        "finishes text-to-image runs; to refine a finished image, pass the refiner as {MODEL} \
                         with {INIT_IMAGE}"
                    ),
                );
            }
            if let Some(f) = r.start.filter(|f| !(*f > 0.0 && *f < 1.0)) {
                return invalid(
                    "refiner_start",
                    format!("{f} is not strictly between 0 and 1 (the fraction of the steps the base runs)"),
                );
            }
            if let Some(s) = r.strength.filter(|s| !(0.0..=1.0).contains(s)) {
                return invalid(
                    "refiner_strength",
                    format!("{s} is outside [0, 1] (0 keeps the base's image, 1 replaces it entirely)"),
                );
            }
        }
        Ok(())
    }
}

/// Which opened model a cache entry holds: the source as asked for, its VAE and its config folder.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ModelKey {
    pub source: ModelSource,
    pub vae: Option<ModelSource>,
    pub config_from: Option<PathBuf>,
}
