//! `generate --check`: this machine's memory, what each model family this build runs needs (the
//! seed's table), and for the chosen model — when it is already here; nothing is downloaded — the
//! plan the planner would run, or why it cannot run (then the exit code is 2). `--json` prints the
//! same as one JSON document.

use std::process::ExitCode;

use sdgen::hub::HubOptions;
use sdgen_memory::{format_gb, memory_info, MemoryVerdict, MODEL_REQUIREMENTS};
use serde_json::json;

use crate::args::Resolved;

pub fn run(resolved: &Resolved, as_json: bool) -> anyhow::Result<ExitCode> {
    let info = memory_info();
    let (what, available) = match &info.gpu {
        Some(g) if !resolved.engine.runtime.device.is_cpu() => {
            (format!("GPU {} free of {}", format_gb(g.free_bytes), format_gb(g.total_bytes)), g.free_bytes)
        }
        _ => (
            format!(
                "system memory {} available of {}",
                format_gb(info.system_available_bytes),
                format_gb(info.system_total_bytes)
            ),
            info.system_available_bytes + info.process_rss_bytes,
        ),
    };
    let budget = resolved.request.memory.max_memory_bytes.map_or(available, |m| m.min(available));
    let mut out = Report { json: as_json, lines: Vec::new() };
    out.line(format!("Device {}: {what}; budget {}", resolved.engine.device_label, format_gb(budget)));
    let models = requirement_rows(budget, &mut out);
    let (model, fits) = chosen_model(resolved, &mut out)?;
    if as_json {
        let doc = json!({
            "device": resolved.engine.device_label,
            "budget_bytes": budget,
            "memory": info,
            "models": models,
            "model": model,
        });
        println!("{doc}");
    } else {
        out.lines.iter().for_each(|l| println!("{l}"));
    }
    Ok(if fits == Some(false) { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

/// The text lines (printed at the end unless `--json`).
struct Report {
    json: bool,
    lines: Vec<String>,
}

impl Report {
    fn line(&mut self, l: String) {
        if !self.json {
            self.lines.push(l);
        }
    }
}

/// The seed's requirement table, for the families this build runs only.
fn requirement_rows(budget: u64, out: &mut Report) -> Vec<serde_json::Value> {
    let runnable: Vec<_> = sdgen::loading::FAMILIES.iter().map(|f| (f.memory_profile)().requirement).collect();
    out.line(format!("{:<14} {:>9} {:>12}  here", "model", "minimum", "recommended"));
    let mut rows = Vec::new();
    for r in MODEL_REQUIREMENTS.iter().filter(|r| runnable.contains(&r.class)) {
        let verdict = match r.verdict(budget) {
            MemoryVerdict::Comfortable => "✅ runs comfortably",
            MemoryVerdict::BelowRecommended => "⚠️  runs, maybe with slower memory options",
            MemoryVerdict::BelowMinimum => "❌ below the minimum",
        };
        out.line(format!(
            "{:<14} {:>9} {:>12}  {verdict}",
            r.display_name,
            format_gb(r.minimum_bytes),
            format_gb(r.recommended_bytes)
        ));
        rows.push(json!({
            "model": r.display_name,
            "minimum_bytes": r.minimum_bytes,
            "recommended_bytes": r.recommended_bytes,
            "verdict": r.verdict(budget),
        }));
    }
    rows
}

/// The chosen model's plan when it is on this machine: `(its JSON, whether it fits)`, the latter
/// `None` when it is not here to plan.
fn chosen_model(resolved: &Resolved, out: &mut Report) -> anyhow::Result<(serde_json::Value, Option<bool>)> {
    let label = resolved.request.model.label();
    let hub = HubOptions { offline: true, ..resolved.engine.hub.clone() };
    let model = match resolved.request.model.open_with(&hub, &resolved.request.open, &mut |_| {}) {
        Ok(model) => model,
        Err(e) => {
            // Only the cache was asked (--check downloads nothing): say that, not the offline
            // error's advice, unless the user did ask for offline.
            let why = match resolved.engine.hub.offline {
                true => format!(" ({})", e.describe(&crate::args::flag)),
                false => String::new(),
            };
            out.line(format!("\n{label} is not downloaded{why}; a run downloads it, and --check then shows its plan."));
            return Ok((json!({ "name": label, "downloaded": false }), None));
        }
    };
    // `--weights` quantises the denoiser as a run would (the engine applies it per job).
    let model = model.with_quantise(resolved.request.open.weights)?;
    let settings = sdgen::pipeline::resolve(&model, &resolved.request.params)?;
    out.line(format!(
        "\n{} ({label}) at {}x{}, {}:",
        model.family().display,
        settings.width,
        settings.height,
        crate::plural(resolved.request.params.n, "image")
    ));
    let (device, dtype) = (&resolved.engine.runtime.device, resolved.engine.runtime.dtype);
    let plan = |settings: &sdgen::pipeline::Settings, img2img: bool, out: &mut Report| {
        let n = resolved.request.params.n;
        match sdgen::planning::plan_run(&model, settings, n, img2img, device, dtype, resolved.request.memory) {
            Ok(plan) => {
                let plan = sdgen::planning::named(plan, &crate::args::flag);
                out.line(plan.to_string());
                if let Some(w) = &plan.warning {
                    out.line(w.clone());
                }
                json!({ "fits": true, "plan": plan })
            }
            Err(e) => {
                let e = e.describe(&crate::args::flag);
                out.line(format!("❌ {e}"));
                json!({ "fits": false, "error": e })
            }
        }
    };
    let mut doc = json!({ "name": label, "downloaded": true });
    let first = plan(&settings, false, out);
    let mut fits = first["fits"] == true;
    doc.as_object_mut().unwrap().extend(first.as_object().unwrap().clone());
    // Each hires pass (--quality 4k and 4k-ultra, --hires-strength) is planned on its own at its
    // upscaled size, as the run plans it; unlike the run, every pass is shown, fitting or not.
    let first_size = (settings.width, settings.height);
    let mut hires_plans = Vec::new();
    let upscale = &resolved.request.upscale;
    for step in sdgen::engine::upscale_steps(&model, &resolved.request.params, first_size, upscale)? {
        let Some(hires) = step.hires else { continue };
        let ((w, h), f) = (step.size, step.factor);
        out.line(format!(
            "\nThen the hires pass at {w}x{h} (upscaled ×{f}, strength {}{}):",
            hires.strength, step.tiles
        ));
        let next = plan(&hires.settings, true, out);
        fits &= next["fits"] == true;
        hires_plans.push(next);
    }
    doc["fits"] = fits.into();
    // One pass as `hires`; a chain's (4k-ultra) as `hires_passes`, in order.
    match hires_plans.len() {
        0 => {}
        1 => doc["hires"] = hires_plans.remove(0),
        _ => doc["hires_passes"] = hires_plans.into(),
    }
    Ok((doc, Some(fits)))
}
