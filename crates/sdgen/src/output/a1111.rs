//! The AUTOMATIC1111 "infotext": the `parameters` text that A1111 stores in every PNG and that
//! the ecosystem (A1111's PNG Info tab, ComfyUI loaders, Civitai, image browsers) parses.
//!
//! The layout follows `create_infotext` in A1111's `modules/processing.py`: the prompt, an optional
//! `Negative prompt: …` line, then one line of `Key: value` pairs joined by `", "`, with a value
//! JSON-quoted when it contains `,`, `:` or a newline (`quote` in `modules/infotext_utils.py`), and
//! the whole text stripped of surrounding whitespace.

use super::ImageMetadata;

/// The A1111 `parameters` text for an image, e.g.
///
/// ```text
/// a cat
/// Negative prompt: blurry
/// Steps: 30, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15, Version: sdgen 0.1.0
/// ```
///
/// The negative-prompt line is left out when there is none, as A1111 does. The sampler is named as
/// A1111 names it (see [`a1111_sampler_name`]).
pub fn a1111_parameters(meta: &ImageMetadata) -> String {
    let version =
        if meta.version.starts_with("sdgen") { meta.version.clone() } else { format!("sdgen {}", meta.version) };
    let mut fields = vec![
        ("Steps", meta.steps.to_string()),
        ("Sampler", a1111_sampler_name(&meta.scheduler)),
        ("CFG scale", python_float(meta.guidance)),
        ("Seed", meta.seed.to_string()),
        // A1111's Size is the first pass's: a hires or upscaled image records the factor apart.
        ("Size", format!("{}x{}", first_size(meta).0, first_size(meta).1)),
    ];
    // A1111's order: the model's hash before its name, the VAE after it.
    let extra = |key: &str| meta.extra.get(key).and_then(|v| v.as_str()).map(str::to_string);
    if let Some(hash) = extra("model_hash") {
        fields.push(("Model hash", hash));
    }
    fields.push(("Model", meta.model.clone()));
    if let Some(vae) = extra("vae") {
        fields.push(("VAE", vae));
    }
    // img2img and the refiner, with A1111's keys, where the metadata has them.
    if let Some(strength) = meta.extra.get("strength").and_then(|v| v.as_f64()) {
        fields.push(("Denoising strength", python_float(strength)));
    }
    // A1111 writes its clip skip only above 1 (`create_infotext`), after the denoising strength.
    if let Some(skip) = meta.extra.get("clip_skip").and_then(|v| v.as_u64()).filter(|&s| s > 1) {
        fields.push(("Clip skip", skip.to_string()));
    }
    if let Some(refiner) = meta.extra.get("refiner") {
        if let Some(model) = refiner.get("model").and_then(|v| v.as_str()) {
            fields.push(("Refiner", model.to_string()));
        }
        if let Some(at) = refiner.get("high_noise_fraction").and_then(|v| v.as_f64()) {
            fields.push(("Refiner switch at", python_float(at)));
        }
    }
    // The passes after the first: A1111's hires fix (`create_infotext` in modules/processing.py:
    // "Hires upscale", "Hires steps", "Hires upscaler", with its "Denoising strength"), or a plain
    // upscale as A1111's extras tab records one (scripts/postprocessing_upscale.py: "Postprocess
    // upscale by", "Postprocess upscaler"), so a reader does not re-run a hires pass that never ran.
    // A chain of steps (`4k-ultra`: ×2, hires, ×2, hires) is recorded as its whole factor with
    // its last hires pass; tiled passes add the Tiled Diffusion extension's fields
    // (multidiffusion-upscaler-for-automatic1111, scripts/tilediffusion.py: method, tile
    // width/height and overlap in latent cells).
    let passes = meta.extra.get("passes").and_then(|v| v.as_array()).map(Vec::as_slice).unwrap_or_default();
    let named =
        |name: &'static str| passes.iter().filter(move |p| p.get("pass").and_then(|v| v.as_str()) == Some(name));
    let factors: Vec<u64> = named("upscale").filter_map(|p| p.get("factor").and_then(|v| v.as_u64())).collect();
    let factor = (!factors.is_empty()).then(|| factors.iter().product::<u64>());
    let last_hires = named("hires").next_back();
    match (factor, last_hires) {
        (Some(factor), Some(hires)) => {
            if !meta.extra.contains_key("strength") {
                if let Some(strength) = hires.get("strength").and_then(|v| v.as_f64()) {
                    fields.push(("Denoising strength", python_float(strength)));
                }
            }
            fields.push(("Hires upscale", factor.to_string()));
            if let Some(steps) = hires.get("steps").and_then(|v| v.as_u64()) {
                fields.push(("Hires steps", steps.to_string()));
            }
            fields.push(("Hires upscaler", "Lanczos".into()));
            if let Some(tiles) = hires.get("tiles") {
                let cells = |key: &str| tiles.get(key).and_then(|v| v.as_u64()).unwrap_or_default().to_string();
                fields.push(("Tiled Diffusion method", "MultiDiffusion".into()));
                fields.push(("Tiled Diffusion tile width", cells("tile_latents")));
                fields.push(("Tiled Diffusion tile height", cells("tile_latents")));
                fields.push(("Tiled Diffusion overlap", cells("overlap_latents")));
            }
        }
        (Some(factor), None) => {
            fields.push(("Postprocess upscale by", factor.to_string()));
            fields.push(("Postprocess upscaler", "Lanczos".into()));
        }
        _ => {}
    }
    fields.push(("Version", version));
    let params: Vec<String> = fields.iter().map(|(key, value)| format!("{key}: {}", quote(value))).collect();
    let negative = if meta.negative_prompt.is_empty() {
        String::new()
    } else {
        format!("\nNegative prompt: {}", meta.negative_prompt)
    };
    format!("{}{}{negative}\n{}", meta.prompt, lora_tags(meta), params.join(", ")).trim().to_string()
}

/// The first pass's size: the `generate` pass of the metadata's `passes`, else the image's.
fn first_size(meta: &ImageMetadata) -> (u64, u64) {
    let first = meta.extra.get("passes").and_then(|v| v.as_array()).and_then(|p| p.first());
    let side = |key: &str| first.and_then(|p| p.get(key)).and_then(|v| v.as_u64());
    match (side("width"), side("height")) {
        (Some(w), Some(h)) => (w, h),
        _ => (meta.width as u64, meta.height as u64),
    }
}

/// A1111's prompt tags for the LoRAs the image was made with, ` <lora:name:scale>` each (A1111
/// reads LoRAs from the prompt: `extra_networks.parse_prompt`), from the metadata's `loras`.
fn lora_tags(meta: &ImageMetadata) -> String {
    let loras = meta.extra.get("loras").and_then(|v| v.as_array()).map(Vec::as_slice).unwrap_or_default();
    loras
        .iter()
        .filter_map(|l| {
            let name = l.get("name")?.as_str()?;
            let scale = l.get("scale")?.as_f64()?;
            Some(format!(" <lora:{name}:{scale}>"))
        })
        .collect()
}

/// A1111's sampler name for one of our scheduler names (either our short names like `euler` or
/// diffusers class names like `EulerDiscreteScheduler`, in any case). Unknown names pass through.
///
/// The pairs are diffusers' own table of A1111 equivalents
/// (<https://huggingface.co/docs/diffusers/api/schedulers/overview>). diffusers' PNDM runs with
/// `skip_prk_steps` for Stable Diffusion, i.e. pure PLMS, which A1111 calls `PLMS`; SD 3.5's
/// flow-matching Euler is written `Euler`, as A1111 and Forge write it for SD3.
pub fn a1111_sampler_name(scheduler: &str) -> String {
    // Our own kinds first (one table: `SchedulerKind::a1111_name`), then diffusers' class names.
    if let Ok(kind) = scheduler.parse::<crate::schedulers::SchedulerKind>() {
        return kind.a1111_name().to_string();
    }
    let key: String = scheduler.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect();
    let key = key.strip_suffix("scheduler").unwrap_or(&key);
    let key = key.strip_suffix("discrete").unwrap_or(key);
    let name = match key {
        "euler" | "flowmatcheuler" | "flowmatch" => "Euler",
        "eulera" | "eulerancestral" => "Euler a",
        "ddim" => "DDIM",
        "pndm" | "plms" => "PLMS",
        "lcm" => "LCM",
        "ddpm" => "DDPM",
        "heun" => "Heun",
        "lms" => "LMS",
        "unipc" | "unipcmultistep" => "UniPC",
        "dpmsolvermultistep" | "dpmpp2m" | "dpm2m" => "DPM++ 2M",
        "kdpm2" | "dpm2" => "DPM2",
        "kdpm2ancestral" | "dpm2a" => "DPM2 a",
        _ => return scheduler.to_string(),
    };
    name.to_string()
}

/// A1111's `quote`: values with `,`, `:` or a newline are written as JSON strings (Python's
/// `json.dumps(ensure_ascii=False)`, which serde_json matches) so the line still splits cleanly.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::to_string(value).expect("a string always serialises")
    } else {
        value.to_string()
    }
}

/// A float as Python's `str(float)` writes it in the usual range, so `7.0` stays `7.0` as in A1111
/// (Rust's `Display` would write `7`).
fn python_float(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e16 {
        format!("{value:.1}")
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_hash_and_vae_in_a1111s_order() {
        let mut meta = ImageMetadata { prompt: "a cat".into(), model: "sdxl.safetensors".into(), ..Default::default() };
        meta.extra.insert("model_hash".into(), "31e35c80fc".into());
        meta.extra.insert("vae".into(), "madebyollin/sdxl-vae-fp16-fix".into());
        let p = a1111_parameters(&meta);
        assert!(
            p.contains("Model hash: 31e35c80fc, Model: sdxl.safetensors, VAE: madebyollin/sdxl-vae-fp16-fix"),
            "{p}"
        );
    }

    /// A hires pass as A1111's hires fix writes it (first-pass Size, the factor, the second
    /// pass's steps and strength); a plain upscale as its extras tab does.
    #[test]
    fn upscaled_images_record_the_first_size_and_the_passes() {
        let mut meta =
            ImageMetadata { prompt: "a cat".into(), model: "sdxl".into(), width: 128, height: 160, ..meta() };
        meta.negative_prompt.clear();
        let passes = serde_json::json!([
            {"pass": "generate", "width": 64, "height": 80},
            {"pass": "upscale", "factor": 2, "filter": "lanczos", "width": 128, "height": 160},
            {"pass": "hires", "strength": 0.3, "steps": 10, "denoising_steps": 3, "width": 128, "height": 160},
        ]);
        meta.extra.insert("passes".into(), passes.clone());
        let p = a1111_parameters(&meta);
        assert!(p.contains("Size: 64x80, Model: sdxl, Denoising strength: 0.3, Hires upscale: 2, Hires steps: 10, Hires upscaler: Lanczos, Version"), "{p}");
        meta.extra.insert("passes".into(), serde_json::json!(passes.as_array().unwrap()[..2]));
        let p = a1111_parameters(&meta);
        assert!(
            p.contains("Size: 64x80, Model: sdxl, Postprocess upscale by: 2, Postprocess upscaler: Lanczos, Version"),
            "{p}"
        );
        assert!(!p.contains("Hires") && !p.contains("Denoising"), "{p}");
    }

    /// `4k-ultra`'s chain: the whole factor, the last hires pass, its MultiDiffusion tiles in the
    /// Tiled Diffusion extension's fields.
    #[test]
    fn a_chain_of_tiled_hires_passes_records_its_whole_factor_and_its_tiles() {
        let mut meta =
            ImageMetadata { prompt: "a cat".into(), model: "sdxl".into(), width: 256, height: 256, ..meta() };
        meta.negative_prompt.clear();
        let tiles =
            serde_json::json!({"method": "MultiDiffusion", "count": 9, "tile_latents": 8, "overlap_latents": 2});
        let passes = serde_json::json!([
            {"pass": "generate", "width": 64, "height": 64},
            {"pass": "upscale", "factor": 2, "width": 128, "height": 128},
            {"pass": "hires", "strength": 0.3, "steps": 10, "width": 128, "height": 128, "tiles": tiles},
            {"pass": "upscale", "factor": 2, "width": 256, "height": 256},
            {"pass": "hires", "strength": 0.4, "steps": 10, "width": 256, "height": 256, "tiles": tiles},
        ]);
        meta.extra.insert("passes".into(), passes);
        let p = a1111_parameters(&meta);
        assert!(
            p.contains(
                "Size: 64x64, Model: sdxl, Denoising strength: 0.4, Hires upscale: 4, Hires steps: 10, Hires upscaler: \
                 Lanczos, Tiled Diffusion method: MultiDiffusion, Tiled Diffusion tile width: 8, Tiled Diffusion tile \
                 height: 8, Tiled Diffusion overlap: 2, Version"
            ),
            "{p}"
        );
    }

    fn meta() -> ImageMetadata {
        ImageMetadata {
            model: "sd15".into(),
            prompt: "a cat".into(),
            negative_prompt: "blurry".into(),
            seed: 42,
            steps: 30,
            guidance: 7.5,
            scheduler: "euler".into(),
            width: 512,
            height: 512,
            version: "0.1.0".into(),
            ..Default::default()
        }
    }

    #[test]
    fn matches_the_a1111_layout() {
        assert_eq!(
            a1111_parameters(&meta()),
            "a cat\nNegative prompt: blurry\nSteps: 30, Sampler: Euler, CFG scale: 7.5, Seed: 42, \
             Size: 512x512, Model: sd15, Version: sdgen 0.1.0"
        );
    }

    #[test]
    fn img2img_and_refiner_fields_use_a1111_keys() {
        let mut m = meta();
        m.extra.insert("strength".into(), 0.3.into());
        m.extra.insert("refiner".into(), serde_json::json!({"model": "org/refiner", "high_noise_fraction": 0.8}));
        let text = a1111_parameters(&m);
        assert!(
            text.ends_with(
                "Denoising strength: 0.3, Refiner: org/refiner, Refiner switch at: 0.8, Version: sdgen 0.1.0"
            ),
            "{text}"
        );
    }

    #[test]
    fn clip_skip_above_one_is_recorded() {
        let mut m = meta();
        m.extra.insert("clip_skip".into(), 2.into());
        assert!(a1111_parameters(&m).contains(", Clip skip: 2, Version: "), "{}", a1111_parameters(&m));
        m.extra.insert("clip_skip".into(), 1.into());
        assert!(!a1111_parameters(&m).contains("Clip skip"));
    }

    #[test]
    fn empty_negative_prompt_has_no_line() {
        let m = ImageMetadata { negative_prompt: String::new(), guidance: 7.0, ..meta() };
        assert_eq!(
            a1111_parameters(&m),
            "a cat\nSteps: 30, Sampler: Euler, CFG scale: 7.0, Seed: 42, Size: 512x512, \
             Model: sd15, Version: sdgen 0.1.0"
        );
    }

    #[test]
    fn awkward_values_are_quoted_like_a1111() {
        let m = ImageMetadata {
            model: r#"C:\models\my "best", v2"#.into(),
            version: "sdgen 0.1.0".into(),
            scheduler: "MyOwnScheduler".into(),
            ..meta()
        };
        let text = a1111_parameters(&m);
        // python: json.dumps('C:\\models\\my "best", v2', ensure_ascii=False)
        assert!(text.ends_with(
            r#"Sampler: MyOwnScheduler, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: "C:\\models\\my \"best\", v2", Version: sdgen 0.1.0"#
        ), "{text}");
    }

    #[test]
    fn sampler_names() {
        for (ours, a1111) in [
            ("euler", "Euler"),
            ("EulerDiscreteScheduler", "Euler"),
            ("FlowMatchEulerDiscreteScheduler", "Euler"),
            ("flow-match-euler", "Euler"),
            ("euler_a", "Euler a"),
            ("EulerAncestralDiscreteScheduler", "Euler a"),
            ("ddim", "DDIM"),
            ("DDIMScheduler", "DDIM"),
            ("pndm", "PLMS"),
            ("PNDMScheduler", "PLMS"),
            ("lcm", "LCM"),
            ("LCMScheduler", "LCM"),
            ("DPMSolverMultistepScheduler", "DPM++ 2M"),
            ("something-else", "something-else"),
        ] {
            assert_eq!(a1111_sampler_name(ours), a1111, "{ours}");
        }
    }

    #[test]
    fn floats_print_like_python() {
        assert_eq!(python_float(7.0), "7.0");
        assert_eq!(python_float(7.5), "7.5");
        assert_eq!(python_float(0.0), "0.0");
        assert_eq!(python_float(3.5), "3.5");
        assert_eq!(python_float(1.1), "1.1");
    }
}
