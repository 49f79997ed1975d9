//! Reading an image's settings back (`generate --from-png`): the A1111 `parameters` text as A1111
//! itself parses it (`parse_generation_parameters` in `modules/infotext_utils.py`, the reader of
//! what [`super::a1111_parameters`] writes), and our JSON sidecar beside the PNG where there is
//! one, whose values are exact (the model as named, LoRA sources, the preset) and win.
//!
//! Which A1111 key sets which setting is one table, [`FIELDS`]; keys it does not list (`Model
//! hash`, `Version`, `Hires steps`, A1111's many others) are read and ignored.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;

use super::{ImageMetadata, PARAMETERS_KEYWORD};
use crate::{Error, Result};

/// A1111's `re_param`: `Key: value` pairs, a value JSON-quoted when it holds `,` or `:`.
static PARAM: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#).expect("valid regex"));

/// A1111's extra-network prompt tags (`re_extra_net` in `modules/extra_networks.py`).
static EXTRA_NET: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"<(\w+):([^>]+)>").expect("valid regex"));

/// The settings an image was made with, as far as its metadata says (every field optional: an
/// A1111 string from another tool may lack any of them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recalled {
    /// The prompt, without A1111's `<lora:…>` tags (which A1111 removes before encoding too).
    pub prompt: String,
    /// The negative prompt, if there was one.
    pub negative_prompt: Option<String>,
    /// The image's own seed.
    pub seed: Option<u64>,
    /// Denoising steps.
    pub steps: Option<usize>,
    /// Guidance scale.
    pub guidance: Option<f64>,
    /// The first pass's size.
    pub width: Option<usize>,
    /// The first pass's size.
    pub height: Option<usize>,
    /// The sampler (A1111's name, or ours from a sidecar).
    pub scheduler: Option<String>,
    /// The model as written (a named model, a hub repository, a path; A1111's checkpoint name).
    pub model: Option<String>,
    /// The VAE as written.
    pub vae: Option<String>,
    /// LoRAs: the sidecar's sources, else A1111's tag names, with their scales.
    pub loras: Vec<(String, f64)>,
    /// Whether [`Recalled::loras`] are names from A1111 tags (to be found), not sources.
    pub loras_by_name: bool,
    /// The upscale factor (hires fix or a plain upscale).
    pub upscale: Option<f64>,
    /// The hires pass's strength.
    pub hires_strength: Option<f64>,
    /// A1111's clip skip.
    pub clip_skip: Option<usize>,
    /// The refiner and its handoff point.
    pub refiner: Option<String>,
    /// The refiner's handoff point.
    pub refiner_start: Option<f64>,
    /// The quality preset (sidecar only).
    pub preset: Option<String>,
    /// `diffusers` when the prompt was read diffusers' way (sidecar only).
    pub prompt_style: Option<String>,
    /// Image-to-image strength, which cannot be re-run without its init image: reported.
    pub img2img_strength: Option<f64>,
    /// The sidecar read, if any.
    pub sidecar: Option<PathBuf>,
}

/// How one A1111 key's value is read into [`Recalled`].
type Setter = fn(&mut Recalled, &str) -> std::result::Result<(), String>;

fn parse<T: std::str::FromStr>(v: &str) -> std::result::Result<T, String> {
    v.trim().parse().map_err(|_| format!("`{v}` is not a number"))
}

/// The A1111 keys this tool re-runs, and how each is read (the same keys the writer writes).
pub const FIELDS: &[(&str, Setter)] = &[
    ("Steps", |r, v| {
        r.steps = Some(parse(v)?);
        Ok(())
    }),
    ("Sampler", |r, v| {
        r.scheduler = Some(v.to_string());
        Ok(())
    }),
    ("CFG scale", |r, v| {
        r.guidance = Some(parse(v)?);
        Ok(())
    }),
    ("Seed", |r, v| {
        r.seed = Some(parse(v)?);
        Ok(())
    }),
    ("Size", |r, v| {
        let (w, h) = v.split_once('x').ok_or_else(|| format!("`{v}` is not WIDTHxHEIGHT"))?;
        r.width = Some(parse(w)?);
        r.height = Some(parse(h)?);
        Ok(())
    }),
    ("Model", |r, v| {
        r.model = Some(v.to_string());
        Ok(())
    }),
    ("VAE", |r, v| {
        r.vae = Some(v.to_string());
        Ok(())
    }),
    ("Denoising strength", |r, v| {
        r.img2img_strength = Some(parse(v)?);
        Ok(())
    }),
    ("Clip skip", |r, v| {
        r.clip_skip = Some(parse(v)?);
        Ok(())
    }),
    ("Refiner", |r, v| {
        r.refiner = Some(v.to_string());
        Ok(())
    }),
    ("Refiner switch at", |r, v| {
        r.refiner_start = Some(parse(v)?);
        Ok(())
    }),
    ("Hires upscale", |r, v| {
        r.upscale = Some(parse(v)?);
        Ok(())
    }),
    ("Postprocess upscale by", |r, v| {
        r.upscale = Some(parse(v)?);
        Ok(())
    }),
    // A1111 ≥ 1.9 writes the Karras schedule apart: "Sampler: DPM++ 2M, Schedule type: Karras".
    ("Schedule type", |r, v| {
        if let Some(s) = r.scheduler.as_mut().filter(|_| v.eq_ignore_ascii_case("karras")) {
            if !s.to_ascii_lowercase().ends_with("karras") {
                s.push_str(" Karras");
            }
        }
        Ok(())
    }),
];

/// Parses an A1111 `parameters` text as `parse_generation_parameters` does: the last line is the
/// `Key: value` line when it has at least 3 pairs, the lines before it the prompt and, from
/// `Negative prompt:` on, the negative prompt. `<lora:name:scale>` tags leave the prompt and
/// become [`Recalled::loras`] (by name).
pub fn parse_parameters(text: &str) -> Result<Recalled> {
    let mut lines: Vec<&str> = text.trim().split('\n').collect();
    let last = lines.pop().unwrap_or_default();
    let (lines, params) = if PARAM.captures_iter(last).count() >= 3 {
        (lines, last)
    } else {
        lines.push(last);
        (lines, "")
    };
    let (mut prompt, mut negative, mut in_negative) = (Vec::new(), Vec::new(), false);
    for line in lines {
        let mut line = line.trim();
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            line = rest.trim();
        }
        if in_negative { &mut negative } else { &mut prompt }.push(line);
    }
    let mut r = Recalled { negative_prompt: in_negative.then(|| negative.join("\n")), ..Default::default() };
    let prompt = prompt.join("\n");
    for tag in EXTRA_NET.captures_iter(&prompt).filter(|c| &c[1] == "lora") {
        // `<lora:name:scale>`; A1111's default multiplier is 1 (and further `:`s are its text
        // encoder's own multiplier, which one scale here cannot express).
        let mut parts = tag[2].split(':');
        let name = parts.next().unwrap_or_default().to_string();
        let scale = match parts.next() {
            Some(s) => parse(s).map_err(|e| Error::invalid("from_png", format!("<lora:{}>: {e}", &tag[2])))?,
            None => 1.0,
        };
        r.loras.push((name, scale));
    }
    r.loras_by_name = !r.loras.is_empty();
    let untagged =
        EXTRA_NET.replace_all(&prompt, |c: &regex::Captures| (if &c[1] == "lora" { "" } else { &c[0] }).to_string());
    r.prompt = untagged.trim().to_string();
    for pair in PARAM.captures_iter(params) {
        let (key, raw) = (pair[1].trim(), &pair[2]);
        let value = if raw.len() >= 2 && raw.starts_with('"') && raw.ends_with('"') {
            serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.to_string())
        } else {
            raw.trim().to_string()
        };
        if let Some((_, set)) = FIELDS.iter().find(|(k, _)| *k == key) {
            set(&mut r, &value).map_err(|e| Error::invalid("from_png", format!("`{key}: {value}`: {e}")))?;
        }
    }
    // A hires fix's strength is its second pass's, not an init image's.
    if r.upscale.is_some() && params.contains("Hires upscale") {
        r.hires_strength = r.img2img_strength.take();
    }
    Ok(r)
}

/// The settings of the image at `path`: its `parameters` chunk read by [`parse_parameters`], then
/// the sidecar (`<stem>.json` beside it), where present, for the values it holds exactly.
/// A file that is no PNG, or a PNG without a `parameters` chunk, is an `Invalid` about
/// `from_png` naming the file.
pub fn recall_png(path: &Path) -> Result<Recalled> {
    let bad = |m: String| Error::invalid("from_png", format!("{}: {m}", path.display()));
    let chunks = super::read_png_text(path).map_err(|e| match e {
        Error::Io { .. } => e,
        other => bad(format!("not a PNG this tool can read ({other})")),
    })?;
    let text = chunks.iter().find(|(k, _)| k == PARAMETERS_KEYWORD).map(|(_, t)| t).ok_or_else(|| {
        bad(format!(
            "the PNG has no `{PARAMETERS_KEYWORD}` text chunk (the settings A1111 and this tool write): nothing to re-run"
        ))
    })?;
    let mut r = parse_parameters(text)?;
    let sidecar = path.with_extension("json");
    if let Ok(json) = std::fs::read_to_string(&sidecar) {
        let meta: ImageMetadata = serde_json::from_str(&json)
            .map_err(|e| bad(format!("its sidecar {} is not ours: {e}", sidecar.display())))?;
        apply_sidecar(&mut r, &meta);
        r.sidecar = Some(sidecar);
    }
    Ok(r)
}

/// The sidecar's exact values over the text's: the prompts as given, the model as named, our
/// scheduler name, the guidance unrounded, LoRA sources, the preset and how the prompt was read.
fn apply_sidecar(r: &mut Recalled, meta: &ImageMetadata) {
    let extra = |key: &str| meta.extra.get(key);
    let text = |key: &str| extra(key).and_then(|v| v.as_str()).map(str::to_string);
    r.prompt = meta.prompt.clone();
    r.negative_prompt = (!meta.negative_prompt.is_empty()).then(|| meta.negative_prompt.clone());
    r.seed = Some(meta.seed);
    r.steps = Some(meta.steps);
    r.guidance = Some(meta.guidance);
    r.scheduler = Some(meta.scheduler.clone());
    r.model = Some(meta.model.clone());
    r.vae = text("vae").or(r.vae.take());
    if let Some(loras) = extra("loras").and_then(|v| v.as_array()) {
        r.loras = loras
            .iter()
            .filter_map(|l| Some((l.get("source")?.as_str()?.to_string(), l.get("scale")?.as_f64()?)))
            .collect();
        r.loras_by_name = false;
    }
    r.preset = text("preset");
    r.prompt_style = text("prompt_style");
    r.clip_skip = extra("clip_skip").and_then(|v| v.as_u64()).map(|v| v as usize).or(r.clip_skip);
    if let Some(refiner) = extra("refiner") {
        r.refiner = refiner.get("model").and_then(|v| v.as_str()).map(str::to_string).or(r.refiner.take());
        r.refiner_start = refiner.get("high_noise_fraction").and_then(|v| v.as_f64()).or(r.refiner_start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A realistic A1111 1.10 infotext (hires fix, LoRA, Karras schedule, quoted values, a
    /// two-line prompt).
    const A1111: &str =
        "masterpiece, (a lighthouse:1.2) at dusk, <lora:detail_tweaker:0.6>\nvolumetric light, BREAK waves\n\
Negative prompt: (worst quality:1.4), lowres\nblurry\n\
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 832x1216, \
Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 235745af8d, VAE: sdxl_vae.safetensors, \
Denoising strength: 0.35, Clip skip: 2, Hires upscale: 2, Hires steps: 10, Hires upscaler: Lanczos, \
Lora hashes: \"detail_tweaker: 7c6b3ef0b2\", TI hashes: \"bad-hands: 1e1c7d6b\", Version: v1.10.1";

    #[test]
    fn reads_an_a1111_infotext() {
        let r = parse_parameters(A1111).unwrap();
        assert_eq!(r.prompt, "masterpiece, (a lighthouse:1.2) at dusk, \nvolumetric light, BREAK waves");
        assert_eq!(r.negative_prompt.as_deref(), Some("(worst quality:1.4), lowres\nblurry"));
        assert_eq!((r.steps, r.guidance, r.seed), (Some(28), Some(6.5), Some(3141592653)));
        assert_eq!((r.width, r.height), (Some(832), Some(1216)));
        assert_eq!(r.scheduler.as_deref(), Some("DPM++ 2M Karras"));
        assert_eq!(r.model.as_deref(), Some("sd_xl_base_1.0"));
        assert_eq!(r.vae.as_deref(), Some("sdxl_vae.safetensors"));
        assert_eq!((r.upscale, r.hires_strength, r.img2img_strength), (Some(2.0), Some(0.35), None));
        assert_eq!(r.clip_skip, Some(2));
        assert_eq!((r.loras.clone(), r.loras_by_name), (vec![("detail_tweaker".to_string(), 0.6)], true));
    }

    #[test]
    fn reads_what_the_writer_writes() {
        let mut meta = ImageMetadata {
            prompt: "a cat, \"quoted\"".into(),
            negative_prompt: "blurry".into(),
            seed: 7,
            steps: 4,
            guidance: 1.0,
            scheduler: "lcm".into(),
            width: 64,
            height: 96,
            model: r#"C:\models\my "best", v2"#.into(),
            version: "0.1.0".into(),
            ..Default::default()
        };
        meta.extra.insert("loras".into(), serde_json::json!([{"name": "lcm-lora-sdxl", "scale": 1.0}]));
        meta.extra.insert("refiner".into(), serde_json::json!({"model": "org/refiner", "high_noise_fraction": 0.8}));
        let r = parse_parameters(&super::super::a1111_parameters(&meta)).unwrap();
        assert_eq!((r.prompt.as_str(), r.negative_prompt.as_deref()), ("a cat, \"quoted\"", Some("blurry")));
        assert_eq!((r.seed, r.steps, r.guidance), (Some(7), Some(4), Some(1.0)));
        assert_eq!((r.width, r.height, r.scheduler.as_deref()), (Some(64), Some(96), Some("LCM")));
        assert_eq!(r.model.as_deref(), Some(meta.model.as_str()));
        assert_eq!(r.loras, [("lcm-lora-sdxl".to_string(), 1.0)]);
        assert_eq!((r.refiner.as_deref(), r.refiner_start), (Some("org/refiner"), Some(0.8)));
        // A plain upscale is no hires pass; an img2img strength stays one.
        let text = "a cat\nSteps: 20, Seed: 1, Size: 64x64, Denoising strength: 0.5, Postprocess upscale by: 3";
        let r = parse_parameters(text).unwrap();
        assert_eq!((r.upscale, r.hires_strength, r.img2img_strength), (Some(3.0), None, Some(0.5)));
    }

    #[test]
    fn a_text_without_a_parameter_line_is_all_prompt() {
        let r = parse_parameters("just a prompt\nNegative prompt: ugly").unwrap();
        assert_eq!((r.prompt.as_str(), r.negative_prompt.as_deref(), r.steps), ("just a prompt", Some("ugly"), None));
        let err = parse_parameters("p\nSteps: many, Seed: 1, Size: 8x8").unwrap_err().to_string();
        assert!(err.contains("Steps: many") && err.contains("not a number"), "{err}");
    }

    #[test]
    fn files_without_parameters_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("bare.png");
        std::fs::write(&bare, super::super::encode_png(&[0; 12], 2, 2, &[("Software", "x")]).unwrap()).unwrap();
        let err = recall_png(&bare).unwrap_err().to_string();
        assert!(err.contains("bare.png") && err.contains("no `parameters` text chunk"), "{err}");
        let text = dir.path().join("notes.png");
        std::fs::write(&text, "not a png").unwrap();
        let err = recall_png(&text).unwrap_err().to_string();
        assert!(err.contains("notes.png") && err.contains("not a PNG"), "{err}");
    }
}
