//! `--from-png FILE`: the settings an image was made with ([`sdgen::output::recall_png`]) fill in
//! every flag the command line left open, so the run reproduces the image (the same bytes for an
//! image this tool wrote, on the same device and dtype) while any flag given still wins.

use std::path::Path;

use sdgen::loading::ModelSource;
use sdgen::output::Recalled;

use crate::args::{Args, Seed};

/// Fills `args` from the image at `png`; returns warnings about what the image holds but the
/// run cannot take (an init image's strength, an A1111 VAE that is not here).
pub fn apply(args: &mut Args, png: &Path) -> anyhow::Result<Vec<String>> {
    let r = sdgen::output::recall_png(png)?;
    let mut warnings = Vec::new();
    if args.prompt.is_none() && args.prompt_flag.is_none() && args.prompt_file.is_none() {
        args.prompt = Some(r.prompt.clone());
    }
    args.negative = args.negative.take().or(r.negative_prompt.clone());
    args.seed = args.seed.or(r.seed.map(Seed::Fixed));
    args.steps = args.steps.or(r.steps);
    args.guidance = args.guidance.or(r.guidance);
    args.width = args.width.or(r.width);
    args.height = args.height.or(r.height);
    args.scheduler = args.scheduler.take().or(r.scheduler.clone());
    args.clip_skip = args.clip_skip.or(r.clip_skip);
    args.quality = args.quality.take().or(r.preset.clone());
    if r.prompt_style.as_deref() == Some("diffusers") {
        args.prompt_style = "diffusers".into();
    }
    if args.model.is_none() && !args.pro {
        args.model = r.model.as_deref().map(|m| found(m, "model", png)).transpose()?;
    }
    if args.vae.is_none() {
        match r.vae.as_deref().map(|v| found(v, "vae", png)) {
            Some(Ok(v)) => args.vae = Some(v),
            Some(Err(e)) => warnings.push(format!("{e}; the model's own VAE is used")),
            None => {}
        }
    }
    if args.lora.is_empty() {
        args.lora = loras(&r, png)?;
    }
    if args.refiner.is_none() {
        args.refiner = r.refiner.clone();
        args.refiner_start = args.refiner_start.or(r.refiner_start);
    }
    if args.upscale.is_none() {
        args.upscale = r.upscale.map(|f| upscale_factor(f, png)).transpose()?;
        args.hires_strength = args.hires_strength.or(r.hires_strength);
    }
    if let (Some(s), None) = (r.img2img_strength, &args.init_image) {
        warnings.push(format!(
            "{} was made by image-to-image (denoising strength {s}) from an image it does not hold: this run \
             draws from noise (pass --init-image PATH to rework one)",
            png.display()
        ));
    }
    Ok(warnings)
}

/// A model or VAE as the image names it, if this machine can find it: a named model, a hub
/// repository id, or a file or folder that exists (relative to here). A1111 writes checkpoint
/// names (`sd_xl_base_1.0`) that only its own folders resolve: those are refused, naming the flag.
fn found(value: &str, what: &str, png: &Path) -> anyhow::Result<String> {
    match ModelSource::parse(value) {
        ModelSource::Path(p) if !p.exists() => Err(sdgen::Error::InvalidInput(format!(
            "--from-png {}: its {what} `{value}` is not a named model, hub repository or file here: pass --{what}",
            png.display()
        ))
        .into()),
        _ => Ok(value.to_string()),
    }
}

/// The `--lora` values of the image: the sidecar's sources, or for A1111's `<lora:name:scale>`
/// tags a `name.safetensors` beside the PNG (A1111 keeps LoRAs in its own folder: one not found
/// is refused, naming the tag).
fn loras(r: &Recalled, png: &Path) -> anyhow::Result<Vec<String>> {
    let beside = png.parent().unwrap_or(Path::new("."));
    r.loras
        .iter()
        .map(|(source, scale)| {
            if !r.loras_by_name {
                return Ok(format!("{source}:{scale}"));
            }
            let file = beside.join(format!("{source}.safetensors"));
            if file.is_file() {
                Ok(format!("{}:{scale}", file.display()))
            } else {
                Err(sdgen::Error::InvalidInput(format!(
                    "--from-png {}: its prompt uses <lora:{source}:{scale}>, and no {} is here: pass --lora PATH:{scale}",
                    png.display(),
                    file.display()
                ))
                .into())
            }
        })
        .collect()
}

/// An A1111 upscale factor as `--upscale` takes it (2, 3 or 4; A1111 also writes fractions).
fn upscale_factor(factor: f64, png: &Path) -> anyhow::Result<u32> {
    if factor.fract() == 0.0 && (2.0..=4.0).contains(&factor) {
        return Ok(factor as u32);
    }
    Err(sdgen::Error::InvalidInput(format!(
        "--from-png {}: its upscale factor {factor} is not one --upscale takes (2, 3 or 4): pass --upscale N",
        png.display()
    ))
    .into())
}
