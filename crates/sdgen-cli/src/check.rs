//! `generate --check`: this machine's memory, what each model family needs (the seed's table),
//! and for the chosen model — when it is already here, nothing is downloaded — the plan the
//! planner would run at its default size, or why it cannot run.

use std::process::ExitCode;

use sdgen::hub::HubOptions;
use sdgen_memory::{format_gb, memory_info, MemoryVerdict, MODEL_REQUIREMENTS};

use crate::args::Resolved;

pub fn run(resolved: &Resolved) -> anyhow::Result<ExitCode> {
    let info = memory_info();
    let (what, available) = match &info.gpu {
        Some(g) if !resolved.runtime.device.is_cpu() => {
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
    let budget = resolved.memory.max_memory_bytes.map_or(available, |m| m.min(available));
    println!("Device {}: {what}; budget {}", resolved.device_label, format_gb(budget));
    println!("{:<14} {:>9} {:>12}  here", "model", "minimum", "recommended");
    for r in MODEL_REQUIREMENTS {
        let verdict = match r.verdict(budget) {
            MemoryVerdict::Comfortable => "✅ runs comfortably",
            MemoryVerdict::BelowRecommended => "⚠️  runs, maybe with slower memory options",
            MemoryVerdict::BelowMinimum => "❌ below the minimum",
        };
        println!(
            "{:<14} {:>9} {:>12}  {verdict}",
            r.display_name,
            format_gb(r.minimum_bytes),
            format_gb(r.recommended_bytes)
        );
    }
    // The chosen model, only from what is already on this machine.
    let hub = HubOptions { offline: true, ..resolved.hub.clone() };
    match resolved.model.open_with(&hub, &resolved.open, &mut |_| {}) {
        Ok(model) => {
            let settings = sdgen::pipeline::resolve(&model, &resolved.request)?;
            println!(
                "\n{} ({}) at {}x{}, {}:",
                model.family().display,
                resolved.model.label(),
                settings.width,
                settings.height,
                crate::plural(resolved.request.n, "image")
            );
            match sdgen::planning::plan_run(
                &model,
                &settings,
                resolved.request.n,
                false,
                &resolved.runtime.device,
                resolved.runtime.dtype,
                resolved.memory,
            ) {
                Ok(plan) => {
                    println!("{plan}");
                    if let Some(w) = &plan.warning {
                        println!("{w}");
                    }
                }
                Err(e) => println!("❌ {e}"),
            }
        }
        Err(e) => println!("\n{} is not on this machine ({e}); its plan is shown once it is.", resolved.model.label()),
    }
    Ok(ExitCode::SUCCESS)
}
