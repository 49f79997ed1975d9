//! The passes after an image is made (issue #14): Lanczos upscaling (`--upscale N`) and the
//! "hires" pass, an image-to-image run of the same model over the upscaled images (A1111's hires
//! fix; the `4k` preset's second pass).
//!
//! - Upscaling is PIL's `Image.resize((N·W, N·H), Image.LANCZOS)` of the finished 8-bit image,
//!   byte for byte ([`resize_lanczos`]; `tools/resize-compare/README.md` says why this port and
//!   not fast_image_resize's or image's filter). It is a stage of its own with the seed's points
//!   around it: "🧹 Cleaning memory before upscaling...", the snapshot before, the resize, the
//!   cleanup after and the snapshot after (`MEMORY_MANAGEMENT.md`, "SD 3.5 with Upscaling").
//! - The hires pass is what diffusers' `StableDiffusionXLImg2ImgPipeline(image=upscaled,
//!   strength=s)` does with the upscaled PIL images: each image is `2·(x/255) − 1`, encoded,
//!   re-noised to the level of `strength` and denoised over the last `int(steps × strength)` steps
//!   with the same prompts and seeds (image `i`'s generator seeded `seed + i`), its stages named
//!   `hires_*`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use sdgen_memory::StagePeak;

use super::img2img::{img2img_stages, skipped_steps_for};
use super::stages::{before_models, into_images, memory_point, StageLog};
use super::tiles::DenoiseTiles;
use super::{resolve, FamilyOptions, GeneratedImage, Generation, Img2ImgSettings, Progress, Request, Runtime};
use crate::error::field::STEPS;
use crate::image_io::{resize_lanczos, RgbImage};
use crate::loading::ModelFolder;
use crate::{Error, Result};

/// The upscale factors `--upscale` takes (each side multiplied by it).
pub const UPSCALE_FACTORS: [u32; 3] = [2, 3, 4];

/// The upscale stage's name in timings, memory records and progress.
pub const UPSCALE_STAGE: &str = "upscale";

/// The names of each step of an upscaling chain (`4k-ultra` has two): its upscale stage and the
/// prefix of its hires pass's stages, so that each step keeps its own timings and memory records.
pub const UPSCALE_STEPS: [(&str, &str); 2] = [(UPSCALE_STAGE, "hires_"), ("upscale_2", "hires2_")];

/// Errors (`Invalid` about `upscale`) unless `factor` is one of [`UPSCALE_FACTORS`].
pub fn check_upscale(factor: u32) -> Result<()> {
    if !UPSCALE_FACTORS.contains(&factor) {
        return Err(Error::invalid(
            "upscale",
            format!("{factor} is not one of 2, 3, 4 (the factor each side of the finished image is multiplied by)"),
        ));
    }
    Ok(())
}

/// Upscales every image of `generation`, `width × height` each, by `factor`, as the stage
/// `stage` ([`UPSCALE_STEPS`]): its time and memory go into the generation's records.
pub fn upscale(
    generation: &mut Generation,
    (width, height): (usize, usize),
    factor: u32,
    stage: &str,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    check_upscale(factor)?;
    rt.cancel.check()?;
    let (to_width, to_height) = (width * factor as usize, height * factor as usize);
    progress(Progress::StageStart(stage));
    progress(Progress::Note("🧹 Cleaning memory before upscaling..."));
    sdgen_memory::cleanup_memory(rt.options.aggressive_cleanup);
    memory_point(progress, "Before upscaling");
    let peak = StagePeak::start(stage);
    let start = Instant::now();
    for image in &mut generation.images {
        let source = RgbImage::new(width, height, std::mem::take(&mut image.rgb8))?;
        let upscaled = resize_lanczos(&source, to_width, to_height)?;
        image.pixels = upscaled.data.iter().map(|&v| v as f32 / 255.0).collect();
        image.rgb8 = upscaled.data;
    }
    let elapsed_ms = start.elapsed().as_secs_f64() * 1000.0;
    progress(Progress::Note("🧹 Cleaning memory after upscaling..."));
    sdgen_memory::cleanup_memory(rt.options.aggressive_cleanup);
    generation.memory.push(peak.finish());
    generation.timings_ms.insert(stage.to_string(), elapsed_ms);
    progress(Progress::StageEnd { stage, elapsed_ms });
    memory_point(progress, "After upscaling");
    Ok(())
}

/// The hires pass's request: `req`'s prompts, seeds, steps, guidance and scheduler at the
/// upscaled size, without skip-layer guidance (diffusers' SD 3 image-to-image has none).
fn hires_request(req: &Request, width: usize, height: usize) -> Request {
    let family_options = FamilyOptions { skip_layer_guidance: None, ..req.family_options.clone() };
    Request { width: Some(width), height: Some(height), family_options, ..req.clone() }
}

/// Resolves the hires pass of `req` at `width × height` and `strength`, denoised in
/// MultiDiffusion's tiles of the model's native size when `tiled`, before anything loads.
/// Errors name `hires_strength` for a strength outside [0, 1] or one that leaves no step.
pub fn resolve_hires(
    model: &ModelFolder,
    req: &Request,
    width: usize,
    height: usize,
    strength: f64,
    tiled: bool,
) -> Result<Img2ImgSettings> {
    let bad_strength = |m: String| Error::invalid("hires_strength", m);
    if !(0.0..=1.0).contains(&strength) {
        return Err(bad_strength(format!(
            "{strength} is outside [0, 1] (0 keeps the upscaled image, 1 replaces it entirely)"
        )));
    }
    let mut settings = resolve(model, &hires_request(req, width, height))?;
    settings.denoise_tiles = if tiled { Some(DenoiseTiles::native(model)?) } else { None };
    let skipped = skipped_steps_for(model.family().schedule, settings.steps, strength).map_err(|_| {
        bad_strength(format!(
            "{strength} with {} steps leaves the hires pass no step to run: raise it or {STEPS}",
            settings.steps
        ))
    })?;
    Ok(Img2ImgSettings { denoising_steps: settings.steps - skipped, settings, strength, skipped_steps: skipped })
}

/// Runs the hires pass `plan` (from [`resolve_hires`]) of `model` over `images` (upscaled to
/// `plan.settings`' size, image `i` of the batch seeded `req.seed + i`), its stages named with
/// `prefix` ([`UPSCALE_STEPS`]).
pub fn hires_pass(
    model: &ModelFolder,
    req: &Request,
    plan: &Img2ImgSettings,
    images: &[GeneratedImage],
    prefix: &str,
    rt: &Runtime,
    progress: &mut dyn FnMut(Progress),
) -> Result<Generation> {
    let s = &plan.settings;
    let per_image = s.width * s.height * 3;
    if let Some(i) = images.iter().find(|i| i.rgb8.len() != per_image) {
        return Err(Error::InvalidInput(format!(
            "the hires pass at {}x{} was given image {} of {} bytes",
            s.width,
            s.height,
            i.index,
            i.rgb8.len()
        )));
    }
    // `VaeImageProcessor.preprocess` of a PIL image at its own size: x / 255 in f32, then 2x − 1.
    let values: Vec<f32> = images.iter().flat_map(|i| i.rgb8.iter().map(|&v| 2.0 * (v as f32 / 255.0) - 1.0)).collect();
    let image = Tensor::from_vec(values, (images.len(), s.height, s.width, 3), &Device::Cpu)?
        .permute((0, 3, 1, 2))?
        .contiguous()?;
    let req = Request { n: images.len(), ..hires_request(req, s.width, s.height) };
    // A pipeline run of its own: the seed's lines before its first model loads, with the memory
    // options of its plan (`  → Enabled VAE tiling`).
    before_models(rt, progress);
    let mut log = StageLog::default();
    let mut warnings = Vec::new();
    let pixels = img2img_stages(model, &req, plan, &image, prefix, rt, &mut log, &mut warnings, progress)?;
    memory_point(progress, "After hires pass");
    let images = into_images(&pixels, &req, s)?;
    Ok(log.into_generation(images, s.clone(), warnings))
}

impl Generation {
    /// This generation finished by `next`, a pass over its images: `next`'s images; both passes'
    /// timings, memory records, warnings and failures; the options either ran with. The settings
    /// and refinement stay this one's (the first pass's).
    pub fn followed_by(mut self, next: Generation) -> Generation {
        self.images = next.images;
        self.timings_ms.extend(next.timings_ms);
        self.memory.extend(next.memory);
        for w in next.warnings {
            if !self.warnings.contains(&w) {
                self.warnings.push(w);
            }
        }
        self.failures.extend(next.failures);
        self.weights.extend(next.weights);
        self.options_used = self.options_used.merged(next.options_used);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::pipeline::Settings;
    use crate::schedulers::SchedulerKind;

    fn testdata() -> std::path::PathBuf {
        std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata"))
    }

    fn generation(images: Vec<GeneratedImage>, width: usize, height: usize) -> Generation {
        let settings = Settings {
            steps: 1,
            guidance: 1.0,
            width,
            height,
            scheduler: SchedulerKind::Euler,
            skipped_encoders: Vec::new(),
            denoise_tiles: None,
        };
        StageLog::default().into_generation(images, settings, Vec::new())
    }

    /// `tools/reference/make_resize.py`: PIL's `resize((N·W, N·H), LANCZOS)` of the tiny models'
    /// finished images (SD 1.5, SDXL, SDXL + refiner, a non-square SDXL image), N = 2, 3, 4. The
    /// issue's bar is ≤ 1/255 on ≥ 99% of the channels; the stage meets it exactly.
    #[test]
    fn the_upscale_stage_is_pils_lanczos_on_the_tiny_models_images() {
        let path = testdata().join("image_io/upscale_pil.safetensors");
        let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let bytes = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let mut checked = 0;
        for (key, want) in tensors.iter().filter(|(k, _)| k.starts_with("out.")) {
            let (name, factor) = key["out.".len()..].split_once(".x").unwrap();
            let src = &tensors[&format!("src.{name}")];
            let (h, w, _) = src.dims3().unwrap();
            let image = GeneratedImage { index: 0, seed: 0, rgb8: bytes(src), pixels: Vec::new() };
            let mut g = generation(vec![image], w, h);
            let mut lines = Vec::new();
            let mut progress = |p: Progress| match p {
                Progress::Note(l) => lines.push(l.to_string()),
                Progress::Memory { label, .. } => lines.push(format!("[{label}]")),
                _ => {}
            };
            upscale(&mut g, (w, h), factor.parse().unwrap(), UPSCALE_STAGE, &Runtime::cpu(), &mut progress).unwrap();
            let (got, want) = (&g.images[0].rgb8, bytes(want));
            assert_eq!(got.len(), want.len(), "{key}");
            let within = got.iter().zip(&want).filter(|(a, b)| a.abs_diff(**b) <= 1).count();
            assert!(within * 100 >= want.len() * 99, "{key}: {within} of {} channels within 1/255", want.len());
            assert_eq!(got, &want, "{key}: PIL's bytes exactly");
            assert_eq!(g.images[0].pixels[7], want[7] as f32 / 255.0);
            assert_eq!(
                lines,
                [
                    "🧹 Cleaning memory before upscaling...",
                    "[Before upscaling]",
                    "🧹 Cleaning memory after upscaling...",
                    "[After upscaling]"
                ]
            );
            assert!(g.timings_ms.contains_key(UPSCALE_STAGE) && g.memory.len() == 1);
            checked += 1;
        }
        assert_eq!(checked, 12);
    }

    #[test]
    fn only_2_3_and_4_are_upscale_factors() {
        for f in [2, 3, 4] {
            check_upscale(f).unwrap();
        }
        for f in [0, 1, 5, 9] {
            let err = check_upscale(f).unwrap_err();
            assert!(matches!(err, Error::Invalid { field: "upscale", .. }), "{err}");
            assert!(err.to_string().contains(&format!("{f} is not one of 2, 3, 4")), "{err}");
        }
    }

    #[test]
    fn a_hires_strength_that_runs_no_step_is_refused_before_loading() {
        let model = ModelFolder::open(&testdata().join("tiny-sdxl")).unwrap();
        let req = Request { prompt: "a lighthouse".into(), n: 1, steps: Some(4), ..Default::default() };
        let plan = resolve_hires(&model, &req, 128, 128, 0.5, false).unwrap();
        assert_eq!((plan.settings.width, plan.settings.height, plan.denoising_steps), (128, 128, 2));
        for (strength, needle) in [(0.1, "no step"), (1.5, "outside [0, 1]")] {
            let err = resolve_hires(&model, &req, 128, 128, strength, false).unwrap_err();
            assert!(matches!(err, Error::Invalid { field: "hires_strength", .. }), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
    }
}
