//! What would help: the refusal's suggestions and the slower-options warning, each checked by
//! planning the changed request (a suggestion is made only when it makes the plan fit).

use super::error::{Fix, PlanError, Suggestion};
use super::manifest::Precision;
use super::planner::{Ctx, Ladder, Plan, Verdict};
use super::request::{Budget, BudgetSource, DeviceKind, MemoryMode, PlanRequest};
use super::table::format_bytes;
use crate::console::BYTES_PER_GB;

/// Whether `req` has a plan under its mode (low fits exactly when balanced does: same options).
fn feasible(req: &PlanRequest) -> bool {
    Ctx::new(req).ok().and_then(|c| c.best(req.mode)).is_some()
}

/// Whether `req` fits at full speed: no slower option, all images in one batch.
fn fits_full_speed(req: &PlanRequest) -> bool {
    Ctx::new(req).ok().and_then(|c| c.search(Ladder::Free)).is_some_and(|p| p.slower_options().is_empty())
}

/// The largest size of the same aspect ratio (sides multiples of the family's, at least 8 of
/// them) for which `ok` holds, searched by bisection (memory grows with size).
fn largest_size(req: &PlanRequest, ok: impl Fn(&PlanRequest) -> bool) -> Option<(usize, usize)> {
    let m = req.profile.size_multiple.max(1);
    let size_at = |j: usize| {
        let w = j * m;
        let h = ((w as f64 * req.height as f64 / req.width as f64 / m as f64).round() as usize).max(1) * m;
        (w, h)
    };
    let ok_at = |j: usize| {
        let (width, height) = size_at(j);
        ok(&PlanRequest { width, height, ..req.clone() })
    };
    // Sides below 8 multiples are no use to suggest; from there on, fitting is monotone (true,
    // then false as the size grows): find the last true by bisection.
    let first = (1..req.width / m).find(|&j| size_at(j).0.min(size_at(j).1) >= 8 * m)?;
    if !ok_at(first) {
        return None;
    }
    let (mut lo, mut hi) = (first, req.width / m); // ok_at(lo) holds; sizes from hi on are not tried
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if ok_at(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(size_at(lo))
}

/// `bytes` rounded up to 0.1 GB (GiB), as a `--max-memory` value.
fn max_memory_value(bytes: f64) -> String {
    let tenths = (bytes / BYTES_PER_GB as f64 * 10.0).ceil().max(1.0);
    format!("{:.1}GB", tenths / 10.0)
}

/// The refusal for a request with no plan under its mode.
pub(crate) fn does_not_fit(ctx: &Ctx, balanced: Option<&Plan>) -> PlanError {
    let req = ctx.req;
    let mut plan = ctx.leanest(Ladder::of(req.mode));
    plan.verdict = Verdict::DoesNotFit;
    let failing = plan.stages.iter().find(|s| !s.fits).unwrap_or(&plan.stages[0]);
    let (stage, need_bytes) = (failing.stage.clone(), failing.peak_bytes);

    let mut suggestions = Vec::new();
    if let Some(balanced) = balanced.filter(|_| req.mode == MemoryMode::Fast) {
        suggestions.push(Suggestion {
            fixes: vec![Fix::new("memory_mode", "balanced")],
            detail: format!("fits with {}", balanced.slower_options().join(", ")),
        });
    }
    if let Some((w, h)) = largest_size(req, feasible) {
        let fixes = vec![Fix::new("width", w.to_string()), Fix::new("height", h.to_string())];
        suggestions.push(Suggestion { fixes, detail: "fits".into() });
    }
    if req.precision == Precision::F32 && feasible(&PlanRequest { precision: Precision::Bf16, ..req.clone() }) {
        suggestions
            .push(Suggestion { fixes: vec![Fix::new("dtype", "bf16")], detail: "half the weight memory".into() });
    }
    let need_all = plan.peak_bytes.max(need_bytes) as f64 / (1.0 - req.safety_margin);
    match req.budget.source {
        BudgetSource::MaxMemory => suggestions.push(Suggestion {
            fixes: vec![Fix::new("max_memory", max_memory_value(need_all))],
            detail: "if the machine has it".into(),
        }),
        BudgetSource::ProcessLimit => suggestions.push(Suggestion {
            fixes: Vec::new(),
            detail: format!(
                "raise this process's memory limit (ulimit -v, or the container's or service's memory limit) so \
                 that {} are free under it",
                format_bytes(need_all.ceil() as u64)
            ),
        }),
        BudgetSource::GpuFree | BudgetSource::SystemAvailable => match req.budget.machine_bytes {
            // Freeing memory cannot reach more than the machine has.
            Some(machine) if need_all > machine as f64 => suggestions.push(Suggestion {
                fixes: Vec::new(),
                detail: format!(
                    "this machine has {} in all, less than the {} this needs: a machine with more memory",
                    format_bytes(machine),
                    format_bytes(need_all.ceil() as u64)
                ),
            }),
            _ => suggestions.push(Suggestion {
                fixes: Vec::new(),
                detail: format!(
                    "free memory: close other programs until {} is available",
                    format_bytes(need_all.ceil() as u64)
                ),
            }),
        },
    }
    if req.device == DeviceKind::DiscreteGpu {
        if let Some(host) = req.budget.host_available_bytes {
            let cpu = PlanRequest {
                device: DeviceKind::Cpu,
                precision: Precision::F32,
                budget: Budget::new(host, BudgetSource::SystemAvailable),
                mode: MemoryMode::Balanced,
                ..req.clone()
            };
            if feasible(&cpu) {
                suggestions.push(Suggestion {
                    fixes: vec![Fix::new("device", "cpu")],
                    detail: format!("fits in {} of RAM, much slower", format_bytes(host)),
                });
            }
        }
    }
    if let Some(model) = req.profile.smaller_model {
        suggestions.push(Suggestion { fixes: vec![Fix::new("model", model)], detail: "a smaller model".into() });
    }
    PlanError::DoesNotFit {
        stage,
        need_bytes,
        budget_bytes: req.budget.bytes,
        usable_bytes: req.usable_bytes(),
        suggestions,
        plan: Box::new(plan),
    }
}

/// The seed-style warning for a plan that fits only with slower options (none in low mode,
/// which asks for them):
///
/// ```text
/// ⚠️  WARNING: Memory is tight for SD 1.5 at 768×768 (7.2GB usable)
///    At full speed it needs 12.3GB; it runs with attention slicing (4), which is slower.
///    Consider using --width 416 --height 416 or --max-memory 13.7GB instead for better performance.
/// ```
pub(crate) fn warning(ctx: &Ctx, plan: &Plan) -> Option<String> {
    let req = ctx.req;
    if plan.verdict != Verdict::FitsWithSlowerOptions || req.mode == MemoryMode::Low {
        return None;
    }
    let full_speed = ctx.fastest_peak_bytes();
    let mut text = format!(
        "⚠️  WARNING: Memory is tight for {} at {}×{} ({} usable)\n   At full speed it needs {}; it runs with {}, \
         which is slower.",
        plan.family,
        plan.width,
        plan.height,
        format_bytes(plan.usable_bytes),
        format_bytes(full_speed),
        plan.slower_options().join(", "),
    );
    let mut fixes = Vec::new();
    if let Some((w, h)) = largest_size(req, fits_full_speed) {
        fixes.push(vec![Fix::new("width", w.to_string()), Fix::new("height", h.to_string())]);
    }
    if req.budget.source == BudgetSource::MaxMemory {
        let value = max_memory_value(full_speed as f64 / (1.0 - req.safety_margin));
        fixes.push(vec![Fix::new("max_memory", value)]);
    }
    // The fields named as the request says: flags for the command line, references for others.
    let fixes: Vec<String> =
        fixes.into_iter().map(|fixes| Suggestion { fixes, detail: String::new() }.describe(&req.field_name)).collect();
    if !fixes.is_empty() {
        text.push_str(&format!("\n   Consider using {} instead for better performance.", fixes.join(" or ")));
    }
    Some(text)
}
