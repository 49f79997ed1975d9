//! The streaming rung on the real SD 1.5 manifest (`tests/data/sd15_manifest.jsonl`): chosen only
//! when no resident plan fits, with as many blocks resident as the budget allows; the leanest in
//! low mode; never in fast mode; refused below its minimum with the smallest budget that works;
//! on a GPU only when host memory holds the streamed blocks.

mod common;

use common::{sd35_large, unet_blocks};
use sdgen_memory::plan::{
    plan, Budget, BudgetSource, ComponentManifest, DeviceKind, FamilyProfile, MemoryMode, ModelManifest, Plan,
    PlanError, PlanRequest, Precision, StoredDType, StreamableBlocks, TensorEntry,
};

const GIB: u64 = 1 << 30;

fn manifest() -> ModelManifest {
    #[derive(serde::Deserialize)]
    struct Line {
        component: String,
        tensors: Vec<(String, Vec<usize>)>,
    }
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/sd15_manifest.jsonl")).unwrap();
    let components = text
        .lines()
        .map(|l| {
            let line: Line = serde_json::from_str(l).unwrap();
            let tensors = line.tensors.into_iter().map(|(n, s)| TensorEntry::new(n, s, StoredDType::F32)).collect();
            ComponentManifest::new(line.component, tensors)
        })
        .collect();
    ModelManifest::new(components)
}

fn request<'a>(m: &'a ModelManifest, p: &'a FamilyProfile, budget_bytes: u64, mode: MemoryMode) -> PlanRequest<'a> {
    let mut budget = Budget::new(budget_bytes, BudgetSource::MaxMemory);
    budget.host_available_bytes = Some(64 * GIB);
    PlanRequest {
        mode,
        streamable: vec![StreamableBlocks { component: "unet".into(), blocks: unet_blocks(m) }],
        ..PlanRequest::new(p, m, 512, 512, budget)
    }
}

/// The leanest resident plan (low mode without the rung).
fn leanest_resident(m: &ModelManifest, p: &FamilyProfile) -> Plan {
    plan(&PlanRequest { streamable: Vec::new(), ..request(m, p, 64 * GIB, MemoryMode::Low) }).unwrap()
}

#[test]
fn streaming_is_chosen_only_when_nothing_resident_fits() {
    let (m, p) = (manifest(), FamilyProfile::sd15());
    assert!(unet_blocks(&m).len() > 40, "{:?}", unet_blocks(&m));
    let lean = leanest_resident(&m, &p);
    let denoise = lean.stage("denoise").unwrap().peak_bytes;
    let others = lean.stages.iter().filter(|s| s.stage != "denoise").map(|s| s.peak_bytes).max().unwrap();
    // 1 GB below the leanest resident denoiser (3.2 GB of f32 weights), above the other stages.
    let usable = denoise - GIB;
    assert!(others < usable, "the other stages fit: {others} < {usable}");
    let budget = (usable as f64 / 0.9).ceil() as u64;

    let refused = plan(&PlanRequest { streamable: Vec::new(), ..request(&m, &p, budget, MemoryMode::Auto) });
    assert!(matches!(refused, Err(PlanError::DoesNotFit { .. })), "no resident plan fits");
    let streamed = plan(&request(&m, &p, budget, MemoryMode::Auto)).unwrap();
    let s = streamed.stage("denoise").unwrap();
    let st = s.options.streaming.expect("the denoiser streams");
    assert!(s.fits && s.peak_bytes <= streamed.usable_bytes, "{streamed}");
    assert!(st.resident_blocks > 0 && st.resident_blocks < st.blocks, "{st:?}");
    assert!(st.streamed_bytes > 0 && st.expected_ms_per_forward > 0, "{st:?}");
    assert_eq!(streamed.memory_optimizations().last(), Some(&"block_streaming"));
    assert!(streamed
        .to_string()
        .contains(&format!("block streaming ({} of {} blocks resident", st.resident_blocks, st.blocks)));
    assert!(streamed.slower_options().iter().any(|o| o.starts_with("denoise streamed")), "{streamed}");

    // With room for the resident model, nothing streams; fast mode never does.
    let roomy = plan(&request(&m, &p, 64 * GIB, MemoryMode::Auto)).unwrap();
    assert!(roomy.stages.iter().all(|s| s.options.streaming.is_none()));
    assert!(plan(&request(&m, &p, budget, MemoryMode::Fast)).is_err());
}

#[test]
fn the_most_blocks_that_fit_stay_resident() {
    let (m, p) = (manifest(), FamilyProfile::sd15());
    let lean = leanest_resident(&m, &p);
    let denoise = lean.stage("denoise").unwrap().peak_bytes;
    let mut last = 0;
    // A larger budget keeps more blocks resident.
    for gb_below in [2.0, 1.5, 1.0, 0.5] {
        let usable = denoise - (gb_below * GIB as f64) as u64;
        let chosen = plan(&request(&m, &p, (usable as f64 / 0.9).ceil() as u64, MemoryMode::Auto)).unwrap();
        let k = chosen.stage("denoise").unwrap().options.streaming.unwrap().resident_blocks;
        assert!(k >= last, "{k} after {last}");
        last = k;
    }
}

/// A LoRA fused as a weight loads holds a transient; resident, it is gone before the first
/// activation, but a streamed block is loaded (and fused) on every use, beside the activations.
#[test]
fn a_streamed_blocks_lora_transient_is_counted_beside_the_activations() {
    let (m, p) = (manifest(), FamilyProfile::sd15());
    let transient = 100 << 20;
    let with_lora = |r: PlanRequest<'_>| -> Plan {
        plan(&PlanRequest { load_transient_bytes: vec![("unet".into(), transient)], ..r }).unwrap()
    };
    let resident = request(&m, &p, 64 * GIB, MemoryMode::Auto);
    let (bare, fused) = (plan(&resident).unwrap(), with_lora(resident.clone()));
    let peak = |p: &Plan| p.stage("denoise").unwrap().peak_bytes;
    // Resident: within the activations' room (they are larger than 100 MB here).
    assert_eq!(peak(&fused), peak(&bare));
    let low = request(&m, &p, 64 * GIB, MemoryMode::Low);
    let (bare, fused) = (plan(&low).unwrap(), with_lora(low.clone()));
    assert!(bare.stage("denoise").unwrap().options.streaming.is_some());
    assert_eq!(peak(&fused), peak(&bare) + transient);
}

#[test]
fn low_mode_streams_every_block() {
    let (m, p) = (manifest(), FamilyProfile::sd15());
    let low = plan(&request(&m, &p, 64 * GIB, MemoryMode::Low)).unwrap();
    let s = low.stage("denoise").unwrap();
    let st = s.options.streaming.unwrap();
    assert_eq!(st.resident_blocks, 0);
    // Its weights at the peak: the resident parts and one block with its read.
    let resident = leanest_resident(&m, &p).stage("denoise").unwrap().weight_bytes;
    // (The largest block, an up-block resnet of 190 MB in f32, with its 118 MB convolution read
    // and copied, and the transformers' projections: 0.5 of 3.4 GB.)
    assert!(s.weight_bytes < resident / 5, "{} of {resident}", s.weight_bytes);
    // The block in flight is counted on top of what stays resident.
    assert!(s.weight_bytes + st.streamed_bytes > resident, "{} + {} vs {resident}", s.weight_bytes, st.streamed_bytes);
    assert!(low.memory_optimizations().contains(&"block_streaming"));
}

#[test]
fn a_budget_below_streaming_is_refused_naming_the_smallest_that_works() {
    let (m, p) = (manifest(), FamilyProfile::sd15());
    // Between the other stages' leanest peaks and the streamed denoiser's.
    let low = plan(&request(&m, &p, 64 * GIB, MemoryMode::Low)).unwrap();
    let streamed = low.stage("denoise").unwrap().peak_bytes;
    let others = low.stages.iter().filter(|s| s.stage != "denoise").map(|s| s.peak_bytes).max().unwrap();
    assert!(others < streamed, "{low}");
    let budget = ((others + streamed) as f64 / 2.0 / 0.9) as u64;
    let err = plan(&request(&m, &p, budget, MemoryMode::Auto)).unwrap_err();
    let PlanError::DoesNotFit { plan: leanest, suggestions, stage, need_bytes, .. } = &err else { panic!("{err}") };
    assert_eq!((stage.as_str(), *need_bytes), ("denoise", streamed), "{err}");
    // The leanest plan it reports streams the denoiser.
    assert_eq!(leanest.stage("denoise").unwrap().options.streaming.unwrap().resident_blocks, 0, "{leanest}");
    let flag = suggestions.iter().filter_map(|s| s.flags()).find(|f| f.starts_with("--max-memory")).unwrap();
    let gb: f64 = flag.trim_start_matches("--max-memory ").trim_end_matches("GB").parse().unwrap();
    let at = |gb: f64| plan(&request(&m, &p, (gb * GIB as f64) as u64, MemoryMode::Auto));
    let fits = at(gb).unwrap();
    assert!(fits.stages.iter().any(|s| s.options.streaming.is_some()), "{fits}");
    assert!(at(gb - 0.1).is_err(), "{gb} GB is the smallest (to 0.1 GB)");
    assert!(err.to_string().contains("block streaming (0 of"), "{err}");
}

#[test]
fn a_gpu_streams_only_what_host_memory_holds() {
    let (m, p) = (manifest(), FamilyProfile::sd15());
    let gpu = |host: u64| {
        let mut r = request(&m, &p, 4 * GIB, MemoryMode::Low);
        r.device = DeviceKind::DiscreteGpu;
        r.precision = Precision::F16;
        r.budget.host_available_bytes = Some(host);
        plan(&r)
    };
    let roomy = gpu(16 * GIB).unwrap();
    assert!(roomy.stage("denoise").unwrap().options.streaming.is_some(), "{roomy}");
    // The streamed UNet (1.6 GB in f16) does not fit 1 GB of host memory.
    let tight = gpu(GIB).unwrap();
    assert!(tight.stage("denoise").unwrap().options.streaming.is_none(), "{tight}");
}

/// SD 3.5 Large at 1024² (16 GB of MMDiT, 9.5 GB of T5 in bf16): under 8 and 4 GB both stream,
/// on the CPU and on a GPU (where T5 streams on the device before it would go to the CPU).
#[test]
fn sd35_large_streams_its_mmdit_and_t5_to_fit_small_budgets() {
    let (m, streamable) = sd35_large();
    let p = FamilyProfile::sd35_large();
    for (device, gb) in
        [(DeviceKind::Cpu, 8), (DeviceKind::Cpu, 4), (DeviceKind::DiscreteGpu, 8), (DeviceKind::DiscreteGpu, 4)]
    {
        let mut budget = Budget::new(gb * GIB, BudgetSource::MaxMemory);
        budget.host_available_bytes = Some(48 * GIB);
        let req = PlanRequest {
            device,
            precision: Precision::Bf16,
            streamable: streamable.clone(),
            ..PlanRequest::new(&p, &m, 1024, 1024, budget)
        };
        let chosen = plan(&req).unwrap_or_else(|e| panic!("{device:?} {gb} GB: {e}"));
        assert!(chosen.stages.iter().all(|s| s.fits && s.device_bytes() <= chosen.usable_bytes), "{chosen}");
        let streams = |stage: &str| chosen.stage(stage).unwrap().options.streaming.is_some();
        assert!(streams("denoise"), "{chosen}");
        let t5 = chosen.stage("text_encoder_3").unwrap();
        assert!(streams("text_encoder_3") && !t5.options.on_host, "{chosen}");
    }
}

/// The run has one host switch for its text encoders, which moves every encoder it does not
/// stream: on a small GPU (SD 3.5 Large at 512², budgets of 1.2–2 GB) a plan that puts one
/// encoder on the host puts every other one there too unless it streams on the device, and some
/// of these plans do stream T5 beside a CLIP on the host.
#[test]
fn encoders_share_the_host_unless_they_stream() {
    let (m, streamable) = sd35_large();
    let p = FamilyProfile::sd35_large();
    let encoders = ["text_encoder", "text_encoder_2", "text_encoder_3"];
    let mut mixed = 0;
    for step in 0..=16 {
        let mut budget = Budget::new(GIB + GIB / 5 + step * GIB / 20, BudgetSource::MaxMemory);
        budget.host_available_bytes = Some(48 * GIB);
        let req = PlanRequest {
            device: DeviceKind::DiscreteGpu,
            precision: Precision::Bf16,
            streamable: streamable.clone(),
            ..PlanRequest::new(&p, &m, 512, 512, budget)
        };
        let Ok(chosen) = plan(&req) else { continue };
        let options = encoders.map(|e| chosen.stage(e).unwrap().options);
        if options.iter().any(|o| o.on_host) {
            assert!(options.iter().all(|o| o.on_host || o.streaming.is_some()), "{chosen}");
            mixed += usize::from(options.iter().any(|o| o.streaming.is_some()));
        }
    }
    assert!(mixed > 0, "no plan streamed T5 beside an encoder on the host");
}
