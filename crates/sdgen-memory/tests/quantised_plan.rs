//! The quantised rung at SD 3.5 Large's and SDXL's real sizes (their released checkpoints' tensor
//! lists, no weights): taken only when nothing fits at full precision, best image first (q8,
//! fp8, q4), the leanest in low mode, with the CPU's dequantisation transient counted, and a
//! budget too small even for quantised and streamed weights refused naming the smallest that
//! works. Where it matters: a GPU whose host memory cannot hold the streamed blocks (an 8 GB card
//! with 8 GB of RAM free); on the CPU, streaming everything at full precision is about as lean.

mod common;

use common::{quantised, sd35_large_real, sdxl_real};
use sdgen_memory::plan::{
    plan, Budget, BudgetSource, DeviceKind, FamilyProfile, MemoryMode, ModelManifest, Plan, PlanError, PlanRequest,
    Precision, QuantisedWeights, StreamableBlocks, QUANTISED_KINDS,
};

const GIB: u64 = 1 << 30;

/// What the engine offers for a model with no `--weights`: every kind, best image first.
fn offers(m: &ModelManifest, component: &str) -> Vec<QuantisedWeights> {
    QUANTISED_KINDS.iter().map(|kind| QuantisedWeights { kind, manifest: quantised(m, component, kind.name) }).collect()
}

/// A bf16 run at 1024² on `device` under `--max-memory budget`, with `host` bytes of RAM free.
fn request<'a>(
    (m, p, s): (&'a ModelManifest, &'a FamilyProfile, &[StreamableBlocks]),
    device: DeviceKind,
    budget: u64,
    host: u64,
) -> PlanRequest<'a> {
    let mut b = Budget::new(budget, BudgetSource::MaxMemory);
    b.host_available_bytes = Some(host);
    PlanRequest { device, precision: Precision::Bf16, streamable: s.to_vec(), ..PlanRequest::new(p, m, 1024, 1024, b) }
}

fn weights(p: &Plan) -> Option<&str> {
    p.quantised.as_ref().map(|q| q.weights.as_str())
}

/// The smallest budget a request's leanest plan fits (to the byte, before rounding).
fn smallest_budget(r: &PlanRequest) -> u64 {
    let low = plan(&PlanRequest { mode: MemoryMode::Low, budget: Budget { bytes: 1 << 40, ..r.budget }, ..r.clone() });
    (low.unwrap().peak_bytes as f64 / (1.0 - r.safety_margin)).ceil() as u64
}

/// An 8 GB GPU with 8 GB of RAM free: SD 3.5 Large's MMDiT (16 GB in bf16) cannot stream (its
/// streamed blocks would not fit in host memory), so the planner runs it on Q8_0 weights (8.7 GB,
/// streamed), says so and what it costs; with 64 GB of RAM it streams in bf16 instead. Low mode
/// takes the leanest weights, Q4; fast mode refuses.
#[test]
fn sd35_large_on_an_8gb_gpu_with_8gb_of_ram_runs_on_q8_weights() {
    let (m, s) = sd35_large_real();
    let p = FamilyProfile::sd35_large();
    let base = request((&m, &p, &s), DeviceKind::DiscreteGpu, 8 * GIB, 8 * GIB);
    assert!(matches!(plan(&base), Err(PlanError::DoesNotFit { .. })), "bf16 does not fit");
    let offered = PlanRequest { quantised: offers(&m, "transformer"), ..base.clone() };
    let chosen = plan(&offered).unwrap();
    assert_eq!(weights(&chosen), Some("q8"), "{chosen}");
    assert!(chosen.stages.iter().all(|s| s.fits && s.device_bytes() <= chosen.usable_bytes), "{chosen}");
    // The GPU dequantises at memory bandwidth: ~60 ms more per evaluation for 8 G weights.
    let ms = chosen.quantised.as_ref().unwrap().expected_ms_per_forward;
    assert!((40..=80).contains(&ms), "{ms} ms");
    assert!(chosen.memory_optimizations().contains(&"quantised_weights"));
    assert!(chosen.to_string().contains("Weights: weights quantised to q8 (Q8_0, near-lossless"), "{chosen}");
    let warning = chosen.warning.as_deref().unwrap();
    assert!(warning.contains("pass --weights to choose, or more --max-memory"), "{warning}");
    // A caller that names fields its own way gets its names in the warning.
    let json = plan(&PlanRequest { field_name: |f| format!("`{f}`"), ..offered.clone() }).unwrap();
    let warning = json.warning.as_deref().unwrap();
    assert!(warning.contains("pass `weights` to choose, or more `max_memory`"), "{warning}");

    let low = plan(&PlanRequest { mode: MemoryMode::Low, ..offered.clone() }).unwrap();
    assert_eq!(weights(&low), Some("q4"), "{low}");
    assert!(plan(&PlanRequest { mode: MemoryMode::Fast, ..offered.clone() }).is_err(), "fast mode never quantises");
    let roomy =
        plan(&PlanRequest { budget: Budget { host_available_bytes: Some(64 * GIB), ..offered.budget }, ..offered })
            .unwrap();
    assert_eq!(weights(&roomy), None, "with room for the streamed blocks it streams in bf16: {roomy}");
    assert!(roomy.stage("denoise").unwrap().options.streaming.is_some(), "{roomy}");
}

/// Below even Q4's leanest plan (host memory plentiful): refused before loading, naming the
/// smallest budget that works (with Q4 weights), which then plans.
#[test]
fn a_budget_below_quantised_and_streamed_is_refused_naming_the_smallest_that_works() {
    let (m, s) = sd35_large_real();
    let p = FamilyProfile::sd35_large();
    let at = |gb: f64| {
        let r = request((&m, &p, &s), DeviceKind::DiscreteGpu, (gb * GIB as f64) as u64, 64 * GIB);
        plan(&PlanRequest { quantised: offers(&m, "transformer"), ..r })
    };
    let err = at(1.0).unwrap_err();
    let PlanError::DoesNotFit { plan: leanest, suggestions, .. } = &err else { panic!("{err}") };
    assert_eq!(weights(leanest), Some("q4"), "{leanest}");
    assert!(err.to_string().contains("weights quantised to q4"), "{err}");
    let flag = suggestions.iter().filter_map(|s| s.flags()).find(|f| f.starts_with("--max-memory")).unwrap();
    let gb: f64 = flag.trim_start_matches("--max-memory ").trim_end_matches("GB").parse().unwrap();
    assert!(gb > 1.0 && gb < 3.0, "{flag}");
    assert_eq!(weights(&at(gb).unwrap()), Some("q4"));
    assert!(at(gb - 0.1).is_err(), "{gb} GB is the smallest (to 0.1 GB)");
}

/// On the CPU the streamed blocks are read from the file, so bf16 streams down to ~1.7 GB; below
/// that, Q8_0 does not help (its dequantisation transient, the largest layer in f32 and bf16 at
/// once, outweighs the block it saves) but fp8 (dequantised straight to bf16) does: the planner
/// takes fp8, the first kind that fits.
#[test]
fn on_the_cpu_the_dequantisation_transient_decides() {
    let (m, s) = sd35_large_real();
    let p = FamilyProfile::sd35_large();
    let base = request((&m, &p, &s), DeviceKind::Cpu, 64 * GIB, 64 * GIB);
    let smallest = |kind: Option<&str>| {
        let manifest = kind.map(|k| quantised(&m, "transformer", k));
        smallest_budget(&PlanRequest { manifest: manifest.as_ref().unwrap_or(&m), ..base.clone() })
    };
    let (bf16, q8, fp8) = (smallest(None), smallest(Some("q8")), smallest(Some("fp8")));
    assert!(fp8 < bf16 && bf16 < q8, "fp8 {fp8}, bf16 {bf16}, q8 {q8}");
    let between = PlanRequest {
        budget: Budget { bytes: (fp8 + bf16) / 2, ..base.budget },
        quantised: offers(&m, "transformer"),
        ..base.clone()
    };
    let chosen = plan(&between).unwrap();
    assert_eq!(weights(&chosen), Some("fp8"), "{chosen}");
    // Dequantising on the CPU costs time: stated per evaluation.
    assert!(chosen.quantised.as_ref().unwrap().expected_ms_per_forward > 0, "{chosen}");
    // With room, nothing is quantised.
    let roomy = plan(&PlanRequest { quantised: offers(&m, "transformer"), ..base }).unwrap();
    assert_eq!(weights(&roomy), None);
}

/// SDXL at `--max-memory 3GB` on a GPU with 2 GB of RAM free: its UNet (4.8 GB in bf16) cannot stream
/// (no host room for the blocks) but fits on Q8_0 weights; with 64 GB of RAM it streams in bf16.
/// With the weights chosen (no offers: `--weights`, or a quantised file) the rung is not tried.
#[test]
fn sdxl_at_3gb_on_a_gpu_with_2gb_of_ram_runs_on_q8_weights() {
    let (m, s) = sdxl_real();
    let p = FamilyProfile::sdxl();
    let base = request((&m, &p, &s), DeviceKind::DiscreteGpu, 3 * GIB, 2 * GIB);
    assert!(plan(&base).is_err(), "bf16 does not fit");
    let chosen = plan(&PlanRequest { quantised: offers(&m, "unet"), ..base.clone() }).unwrap();
    assert_eq!(weights(&chosen), Some("q8"), "{chosen}");
    assert!(chosen.stages.iter().all(|s| s.fits), "{chosen}");
    let roomy = PlanRequest { budget: Budget { host_available_bytes: Some(64 * GIB), ..base.budget }, ..base };
    let roomy = plan(&PlanRequest { quantised: offers(&m, "unet"), ..roomy }).unwrap();
    assert_eq!(weights(&roomy), None, "{roomy}");
    assert!(roomy.stage("denoise").unwrap().options.streaming.is_some(), "{roomy}");
}
