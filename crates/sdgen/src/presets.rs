//! The quality presets (`generate --quality NAME`, `--list-presets`): one table, each row a
//! model, a first-pass size, steps, guidance, a scheduler and the passes that follow.
//!
//! A preset fills in only what the request leaves open: an explicit `--model`, `--steps`,
//! `--width`, `--upscale`, … wins over the preset's value, flag by flag (so `--quality 4k --width
//! 512 --height 512` runs the 4k passes from 512²). Values a row leaves `None` are the model's
//! own defaults (SDXL: 50 steps, guidance 5, its Euler config), as a run without a preset has.
//!
//! Rows the engine cannot run yet are kept in the table, marked [`Status::NotYet`], and refused by
//! name with the reason ([`find`]) rather than run half-way (none today).

use crate::engine::{GenerateRequest, UpscaleRequest};
use crate::error::field::MODEL;
use crate::loading::lora::LoraRequest;
use crate::loading::{FamilySpec, DEFAULT_MODEL, NAMED_MODELS};
use crate::{Error, Result};

/// One quality preset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    /// What `--quality` takes.
    pub name: &'static str,
    /// One line on what it is for.
    pub summary: &'static str,
    /// The model (a named model, see `--list-models`).
    pub model: &'static str,
    /// LoRAs fused into it at load (hub repositories or files, `PATH|REPO[:SCALE]` as `--lora`
    /// takes them), before any `--lora` of the request; they are the model family's, so another
    /// family's model is refused ([`check_model`]).
    pub loras: &'static [&'static str],
    /// The first pass's size in pixels (width, height).
    pub size: (usize, usize),
    /// Denoising steps; `None`: the model's default.
    pub steps: Option<usize>,
    /// Guidance scale; `None`: the model's default.
    pub guidance: Option<f64>,
    /// The scheduler (as `--scheduler` spells it); `None`: the model's own.
    pub scheduler: Option<&'static str>,
    /// What runs after the first pass, in order.
    pub passes: &'static [Pass],
    /// Whether the engine can run it.
    pub status: Status,
}

/// A pass after the first (text-to-image) one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pass {
    /// Lanczos upscaling of the finished images by this factor (`--upscale`).
    Upscale(u32),
    /// An image-to-image pass of the same model over the upscaled images at this strength, the VAE
    /// tiled where the planner says so (A1111's hires fix).
    Hires {
        /// How much of each upscaled image it reworks (`--hires-strength`).
        strength: f64,
        /// Denoised in MultiDiffusion's overlapping tiles of the model's native size
        /// ([`crate::pipeline::DenoiseTiles::native`], overlap [`crate::pipeline::TILE_OVERLAP`])
        /// rather than over the whole latent.
        tiled: bool,
    },
}

/// Whether a preset runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// It runs.
    Ready,
    /// It is refused with this reason.
    NotYet(&'static str),
}

/// The presets, in the order `--list-presets` prints them.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "default",
        // The summaries are `generate --list-presets`' text (the CLI's only): flags, not field
        // references.
        summary: "SDXL base at 1024², as without --quality",
        model: DEFAULT_MODEL,
        loras: &[],
        size: (1024, 1024),
        steps: None,
        guidance: None,
        scheduler: None,
        passes: &[],
        status: Status::Ready,
    },
    Preset {
        name: "4k",
        summary:
            "SDXL at 1024², upscaled ×2 (Lanczos), then a hires image-to-image pass at 2048² (VAE tiled as planned)",
        model: DEFAULT_MODEL,
        loras: &[],
        size: (1024, 1024),
        steps: None,
        guidance: None,
        scheduler: None,
        // Strength 0.3: diffusers' StableDiffusionXLImg2ImgPipeline default, enough to redraw the
        // detail the upscale blurred without changing the composition.
        passes: &[Pass::Upscale(2), Pass::Hires { strength: 0.3, tiled: false }],
        status: Status::Ready,
    },
    Preset {
        name: "4k-ultra",
        summary: "SDXL at 1024², then twice: upscaled ×2 (Lanczos) and a hires pass denoised in overlapping \
                  1024² tiles (MultiDiffusion): 2048², then 4096²",
        model: DEFAULT_MODEL,
        loras: &[],
        size: (1024, 1024),
        steps: None,
        guidance: None,
        scheduler: None,
        // Two ×2 steps rather than one ×4: each hires pass then reworks an image only twice as
        // soft as its tiles' detail, which strength 0.3 can redraw (a ×4 Lanczos image is four
        // times as soft, and 0.3 leaves most of that blur), as `4k` does for 2048². Both passes
        // are tiled, so no model attends over more than a 1024² tile's tokens (4096² untiled
        // would be 65,536 at SDXL's first attention level, out of its training range); the
        // cost is 9 + 25 tiles of 15 steps (50 × 0.3) at SDXL's 1024² each, within the seed's
        // "4k-ultra: 3 minutes" on a GPU (tools/gpu/presets_4k.sh measures it).
        passes: &[
            Pass::Upscale(2),
            Pass::Hires { strength: 0.3, tiled: true },
            Pass::Upscale(2),
            Pass::Hires { strength: 0.3, tiled: true },
        ],
        status: Status::Ready,
    },
    Preset {
        name: "lcm",
        summary: "SDXL with the LCM-LoRA fused and the LCM scheduler: 4 steps, guidance 1",
        model: DEFAULT_MODEL,
        // The LCM-LoRA of SDXL base (latent-consistency/lcm-lora-sdxl: `pytorch_lora_weights.
        // safetensors`, kohya-style `lora_unet_…` keys with diffusers' module names) at scale 1,
        // as its model card runs it: fused, LCMScheduler, 4 steps, guidance 1 (no CFG).
        loras: &["latent-consistency/lcm-lora-sdxl"],
        size: (1024, 1024),
        steps: Some(4),
        guidance: Some(1.0),
        scheduler: Some("lcm"),
        passes: &[],
        status: Status::Ready,
    },
];

/// The preset named `name` (any case), refused when unknown (the message lists the presets) or
/// not runnable yet (with the reason): `Invalid` about `quality` either way.
pub fn find(name: &str) -> Result<&'static Preset> {
    let preset = PRESETS.iter().find(|p| p.name.eq_ignore_ascii_case(name.trim())).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        Error::invalid("quality", format!("{name} is not a preset: one of {}", names.join(", ")))
    })?;
    match preset.status {
        Status::Ready => Ok(preset),
        Status::NotYet(why) => {
            Err(Error::invalid("quality", format!("{} is not available yet: it {why}", preset.name)))
        }
    }
}

impl Preset {
    /// The output size: the first pass's multiplied by the upscale factors.
    pub fn output_size(&self) -> (usize, usize) {
        let factor: usize =
            self.passes.iter().map(|p| if let Pass::Upscale(f) = p { *f as usize } else { 1 }).product();
        (self.size.0 * factor, self.size.1 * factor)
    }

    /// Fills in what `req` leaves open with this preset's values (the model is the caller's to
    /// choose: see [`Preset::model`]) and records the preset's name. Without upscaling in `req`,
    /// the preset's steps are taken in order; an explicit one (`--upscale 3`) stays the only
    /// step and gets the preset's first hires pass (tiled as the preset's is). An explicit hires
    /// strength wins over the preset's.
    pub fn apply(&self, req: &mut GenerateRequest) -> Result<()> {
        let p = &mut req.params;
        p.width.get_or_insert(self.size.0);
        p.height.get_or_insert(self.size.1);
        p.steps = p.steps.or(self.steps);
        p.guidance = p.guidance.or(self.guidance);
        if let (None, Some(s)) = (p.scheduler, self.scheduler) {
            p.scheduler = Some(s.parse()?);
        }
        let explicit = !req.upscale.is_empty();
        let mut step = 0;
        for pass in self.passes {
            match *pass {
                Pass::Upscale(factor) if !explicit => {
                    req.upscale.push(UpscaleRequest { factor, hires_strength: None, tiled: false });
                    step = req.upscale.len() - 1;
                }
                Pass::Upscale(_) => {}
                Pass::Hires { strength, tiled } => {
                    if let Some(u) = req.upscale.get_mut(step) {
                        u.hires_strength.get_or_insert(strength);
                        u.tiled |= tiled;
                    }
                    if explicit {
                        break;
                    }
                }
            }
        }
        // The preset's LoRAs first (their deltas add in order), then the request's; one the
        // request names too is not fused twice.
        let mut loras = Vec::with_capacity(self.loras.len() + req.loras.len());
        for value in self.loras {
            let lora = LoraRequest::parse(value)?;
            if !req.loras.iter().any(|l| l.source == lora.source) {
                loras.push(lora);
            }
        }
        loras.append(&mut req.loras);
        req.loras = loras;
        req.preset = Some(self.name.to_string());
        Ok(())
    }

    /// The family the preset is made for: its model's.
    fn family(&self) -> Option<&'static FamilySpec> {
        NAMED_MODELS.iter().find(|m| m.name == self.model).map(|m| m.family)
    }
}

/// Refuses a model the preset `name` cannot run on: one of another family than the preset's
/// model when the preset fuses LoRAs (they are that family's: `--quality lcm --model sd15`),
/// before any LoRA is fetched.
pub fn check_model(name: &str, family: &FamilySpec) -> Result<()> {
    let Some(preset) = PRESETS.iter().find(|p| p.name == name) else { return Ok(()) };
    match preset.family() {
        Some(own) if !preset.loras.is_empty() && own.name != family.name => Err(Error::invalid(
            "quality",
            format!(
                "{} fuses {}, made for {}; the model is {}: leave out {MODEL} (or give an SDXL model) to run it",
                preset.name,
                preset.loras.join(", "),
                own.display,
                family.display
            ),
        )),
        _ => Ok(()),
    }
}

impl Preset {}

/// The table `--list-presets` prints.
pub fn table() -> String {
    let or_model = |v: Option<String>| v.unwrap_or_else(|| "model's".into());
    let mut rows = vec![[
        "preset".to_string(),
        "model".into(),
        "size".into(),
        "steps".into(),
        "guidance".into(),
        "scheduler".into(),
        "passes".into(),
        "output".into(),
    ]];
    for p in PRESETS {
        let mut passes = vec![format!("generate {}x{}", p.size.0, p.size.1)];
        if !p.loras.is_empty() {
            passes[0] = format!("{} with LoRA {}", passes[0], p.loras.join(" + "));
        }
        passes.extend(p.passes.iter().map(|pass| match pass {
            Pass::Upscale(f) => format!("upscale ×{f} (Lanczos)"),
            Pass::Hires { strength, tiled: false } => format!("hires img2img (strength {strength})"),
            Pass::Hires { strength, tiled: true } => {
                format!("hires img2img in MultiDiffusion tiles (strength {strength})")
            }
        }));
        let (w, h) = p.output_size();
        let status = match p.status {
            Status::Ready => String::new(),
            Status::NotYet(_) => " (not yet)".into(),
        };
        rows.push([
            format!("{}{status}", p.name),
            p.model.into(),
            format!("{}x{}", p.size.0, p.size.1),
            or_model(p.steps.map(|s| s.to_string())),
            or_model(p.guidance.map(|g| g.to_string())),
            or_model(p.scheduler.map(str::to_string)),
            passes.join(" → "),
            format!("{w}x{h}"),
        ]);
    }
    let widths: Vec<usize> = (0..8).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for p in PRESETS {
        out.push_str(&format!("\n{}: {}", p.name, p.summary));
        if let Status::NotYet(why) = p.status {
            out.push_str(&format!(" — not yet: it {why}"));
        }
    }
    out.push_str("\n\nEvery value is overridable flag by flag (--model, --width, --steps, --upscale, …); \"model's\" is the model's own default.\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loading::ModelSource;

    fn request() -> GenerateRequest {
        GenerateRequest::new(ModelSource::parse("sdxl"), "a lighthouse")
    }

    #[test]
    fn the_4k_preset_fills_what_is_open_and_explicit_values_win() {
        let mut req = request();
        find("4k").unwrap().apply(&mut req).unwrap();
        assert_eq!((req.params.width, req.params.height, req.params.steps), (Some(1024), Some(1024), None));
        assert_eq!(req.upscale, [UpscaleRequest { factor: 2, hires_strength: Some(0.3), tiled: false }]);
        assert_eq!(req.preset.as_deref(), Some("4k"));
        assert_eq!(find("4k").unwrap().output_size(), (2048, 2048));

        let mut req = request();
        req.params.steps = Some(7);
        req.params.width = Some(64);
        req.upscale = vec![UpscaleRequest { factor: 3, hires_strength: None, tiled: false }];
        find("4K").unwrap().apply(&mut req).unwrap();
        assert_eq!((req.params.width, req.params.height, req.params.steps), (Some(64), Some(1024), Some(7)));
        assert_eq!(req.upscale, [UpscaleRequest { factor: 3, hires_strength: Some(0.3), tiled: false }], "×3 wins");

        let mut req = request();
        find("default").unwrap().apply(&mut req).unwrap();
        assert_eq!((req.upscale, req.params.width), (vec![], Some(1024)));
    }

    /// `4k-ultra`: 1024², then ×2 and a tiled hires pass twice, to 4096²; an explicit `--upscale`
    /// is the only step and keeps the preset's tiled pass; an explicit size runs the same chain
    /// from it (the tests' scaled-down runs).
    #[test]
    fn the_4k_ultra_preset_runs_two_tiled_hires_passes_to_4096() {
        let ultra = find("4k-ultra").unwrap();
        assert_eq!(ultra.output_size(), (4096, 4096));
        let tiled = |factor| UpscaleRequest { factor, hires_strength: Some(0.3), tiled: true };
        let mut req = request();
        ultra.apply(&mut req).unwrap();
        assert_eq!(req.upscale, [tiled(2), tiled(2)]);
        assert_eq!(
            (req.params.width, req.params.height, req.preset.as_deref()),
            (Some(1024), Some(1024), Some("4k-ultra"))
        );

        let mut req = request();
        req.params.width = Some(64);
        req.params.height = Some(64);
        ultra.apply(&mut req).unwrap();
        assert_eq!((req.upscale.len(), req.params.width), (2, Some(64)));

        let mut req = request();
        req.upscale = vec![UpscaleRequest { factor: 3, hires_strength: None, tiled: false }];
        ultra.apply(&mut req).unwrap();
        assert_eq!(req.upscale, [tiled(3)]);
    }

    #[test]
    fn unknown_and_unbuilt_presets_are_refused_by_name() {
        let err = find("8k").unwrap_err();
        assert!(matches!(err, Error::Invalid { field: "quality", .. }), "{err}");
        assert!(err.to_string().contains("8k is not a preset: one of default, 4k, 4k-ultra, lcm"), "{err}");
    }

    #[test]
    fn the_lcm_preset_fuses_its_lora_first_and_refuses_other_families() {
        let mut req = request();
        req.loras.push(LoraRequest::parse("style.safetensors:0.5").unwrap());
        find("lcm").unwrap().apply(&mut req).unwrap();
        let sources: Vec<String> = req.loras.iter().map(|l| l.source.label()).collect();
        assert_eq!(sources, ["latent-consistency/lcm-lora-sdxl", "style.safetensors"]);
        assert_eq!((req.params.steps, req.params.guidance), (Some(4), Some(1.0)));
        assert_eq!(req.params.scheduler, Some(crate::schedulers::SchedulerKind::Lcm));
        // Named by the user too (at another scale): theirs, once.
        let mut req = request();
        req.loras.push(LoraRequest::parse("latent-consistency/lcm-lora-sdxl:0.7").unwrap());
        find("lcm").unwrap().apply(&mut req).unwrap();
        assert_eq!((req.loras.len(), req.loras[0].scale), (1, 0.7));

        use crate::loading::family::{SD15, SDXL};
        check_model("lcm", &SDXL).unwrap();
        check_model("4k", &SD15).unwrap();
        let err = check_model("lcm", &SD15).unwrap_err().to_string();
        assert!(
            err.contains("lcm fuses latent-consistency/lcm-lora-sdxl, made for Stable Diffusion XL")
                && err.contains("the model is Stable Diffusion 1.5"),
            "{err}"
        );
    }

    #[test]
    fn the_table_lists_every_preset_with_its_passes() {
        let t = table();
        for p in PRESETS {
            assert!(t.contains(p.name) && t.contains(p.summary), "{t}");
        }
        assert!(t.contains("generate 1024x1024 → upscale ×2 (Lanczos) → hires img2img (strength 0.3)"), "{t}");
        assert!(!t.contains("(not yet)"), "{t}");
        assert!(t.contains("generate 1024x1024 with LoRA latent-consistency/lcm-lora-sdxl"), "{t}");
        assert!(
            t.contains(
                "upscale ×2 (Lanczos) → hires img2img in MultiDiffusion tiles (strength 0.3) → upscale ×2 (Lanczos) → \
                 hires img2img in MultiDiffusion tiles (strength 0.3)  4096x4096"
            ),
            "{t}"
        );
        assert!(t.lines().next().unwrap().starts_with("preset"), "{t}");
    }
}
