//! The engine's side of the memory planner (`sdgen_memory::plan`, a pure function): the model's
//! tensor manifest from its validated safetensors headers, the budget from the device or
//! `--max-memory`, and the chosen plan turned into the options each stage runs with. Planning
//! happens before any weight is read, so a run that cannot fit is refused at no cost.

use candle_core::{DType, Device};
use sdgen_memory::plan::{
    plan, Blocks, Budget, BudgetSource, ComponentManifest, DeviceKind, MemoryMode, ModelManifest, Plan, PlanRequest,
    Precision, QuantisedWeights, StoredDType, StreamableBlocks, TensorEntry, Tiling, QUANTISED_KINDS,
};
use sdgen_models::stream::StreamableModel;
use sdgen_models::t5::{T5Config, T5EncoderModel};

use crate::loading::family::TextEncoderArch;
use crate::loading::ModelFolder;
use crate::pipeline::{Settings, StageOptions};
use crate::{Error, Result};
use sdgen_models::ops::quantised::GgmlType;

/// Weights (at the run's precision) from which a model counts as large — SDXL's 5–14 GB, SD 3.5's,
/// not SD 1.5's 2–4 GB: the seed prepares memory aggressively before loading one.
pub const LARGE_MODEL_BYTES: u64 = 4 << 30;

/// What the user said about memory.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct MemoryRequest {
    /// `--max-memory` in bytes (device memory on a GPU, process memory on the CPU).
    pub max_memory_bytes: Option<u64>,
    /// `--memory-mode`.
    pub mode: MemoryMode,
    /// `--batch-size`: the most images one batch may hold (lowered by the plan where it does not
    /// fit); `None` = all of them.
    pub max_images_per_batch: Option<usize>,
    /// Set by the engine, not the user: bytes of the weights it keeps loaded from earlier jobs
    /// ("warm") in the budget's pool. The budget counts them as free, so the plan is the one
    /// without them; the engine then evicts what the plan's stages need room for
    /// (`sdgen_memory::plan::evictions`).
    #[serde(skip)]
    pub warm_bytes: u64,
}

/// The model's tensors, per component its family's profile names, from the headers read when it
/// was opened.
pub fn manifest(model: &ModelFolder) -> Result<ModelManifest> {
    let profile = model.family().memory_profile();
    // An optional encoder the folder was saved without has no weights to read.
    let absent = crate::pipeline::skipped_encoders(model, &Default::default());
    let mut sources: Vec<&str> = profile.components.iter().map(|c| c.source).filter(|s| !absent.contains(s)).collect();
    sources.sort_unstable();
    sources.dedup();
    let mut components = Vec::new();
    for name in sources {
        let weights = model.weights(name)?;
        let tensors = weights
            .headers
            .iter()
            .flat_map(|h| h.tensors.iter())
            // An fp8 weight's scale (one f32, `name@scale`) is no model tensor.
            .filter(|(n, _)| sdgen_models::ops::quantised::companion_base(n).is_none())
            .filter_map(|(n, t)| {
                // A GGUF's GGML blocks dequantise to f32 (and on to the run's precision) unless a
                // linear layer keeps them: then they count at their block size.
                let dtype = StoredDType::from_safetensors(&t.dtype)
                    .or_else(|| GgmlType::by_name(&t.dtype).map(|_| StoredDType::F32))?;
                let held = weights.held_quantised(n, t).map(|h| {
                    let (elements, bytes) = h.block();
                    Blocks { elements, bytes }
                });
                Some(TensorEntry::new(n.clone(), t.shape.clone(), dtype).held_in(held))
            })
            .collect();
        components.push(ComponentManifest::new(name, tensors));
    }
    Ok(ModelManifest::new(components))
}

fn precision(dtype: DType) -> Precision {
    match dtype {
        DType::F16 => Precision::F16,
        DType::BF16 => Precision::Bf16,
        _ => Precision::F32,
    }
}

/// The dtype a stage planned at `precision` loads its weights in.
pub(crate) fn dtype(precision: Precision) -> DType {
    match precision {
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
        Precision::F32 => DType::F32,
    }
}

fn device_kind(device: &Device) -> DeviceKind {
    match device {
        Device::Cpu => DeviceKind::Cpu,
        Device::Cuda(_) => DeviceKind::DiscreteGpu,
        Device::Metal(_) => DeviceKind::UnifiedGpu,
    }
}

/// Device memory a fresh process's CUDA runtime takes during its first generation beyond the
/// context it starts with: kernel modules loaded on first use, cuBLAS handles and workspaces.
/// Measured on an H100 (2026-11-27): 0.13 GB by the end of the first stage, 0.45 GB at the
/// UNet's peak above a warmed-up process's.
pub const CUDA_RUNTIME_BYTES: u64 = 512 << 20;

/// The memory the run may use: `--max-memory`, else free GPU memory on a discrete GPU, else
/// available system memory; on the CPU the process's current size counts against it. `warm_bytes`
/// of weights kept loaded from earlier jobs count as free: they are evicted when a stage needs
/// their room ([`MemoryRequest::warm_bytes`]).
pub fn budget(device: &Device, max_memory_bytes: Option<u64>, warm_bytes: u64) -> Budget {
    let info = sdgen_memory::memory_info();
    let discrete = device_kind(device) == DeviceKind::DiscreteGpu;
    // Warm weights are free memory to be: on a GPU, its memory; elsewhere the process's, which
    // less them is the baseline (the budget, what the process may grow to, stays).
    let gpu = sdgen_memory::gpu_probe().and_then(|p| p.memory()).map(|mut g| {
        if discrete {
            g.free_bytes += warm_bytes;
        }
        g
    });
    let baseline = info.process_rss_bytes.saturating_sub(if discrete { 0 } else { warm_bytes });
    let mut b = match (device_kind(device), gpu, max_memory_bytes) {
        (DeviceKind::DiscreteGpu, Some(g), Some(max)) => {
            let mut b = Budget::new(max.min(g.total_bytes), BudgetSource::MaxMemory);
            b.baseline_bytes = CUDA_RUNTIME_BYTES;
            b
        }
        (DeviceKind::DiscreteGpu, Some(g), None) => {
            let mut b = Budget::new(g.free_bytes, BudgetSource::GpuFree);
            b.baseline_bytes = CUDA_RUNTIME_BYTES;
            b
        }
        (_, _, Some(max)) => {
            let mut b = Budget::new(max, BudgetSource::MaxMemory);
            b.baseline_bytes = baseline;
            b
        }
        (_, _, None) => {
            let mut b =
                Budget::new(info.system_available_bytes + info.process_rss_bytes, BudgetSource::SystemAvailable);
            b.baseline_bytes = baseline;
            b
        }
    };
    // A process memory limit (ulimit -v, a container's cgroup) caps what the host side may use:
    // past it an allocation aborts the process instead of failing cleanly.
    let mut host = info.system_available_bytes;
    if let Some(limit) = sdgen_memory::process_memory_limit() {
        host = host.min(limit.room_bytes);
        let cap = info.process_rss_bytes + limit.room_bytes;
        if !discrete && cap < b.bytes {
            b.bytes = cap;
            b.source = BudgetSource::ProcessLimit;
        }
    }
    b.host_available_bytes = Some(host);
    b.machine_bytes = Some(match (device_kind(device), gpu) {
        (DeviceKind::DiscreteGpu, Some(g)) => g.total_bytes,
        _ => info.system_total_bytes,
    });
    b
}

/// Plans a run of `n` images; `Err(DoesNotFit)` with the planner's numbers and suggestions when
/// nothing fits.
pub fn plan_run(
    model: &ModelFolder,
    settings: &Settings,
    n: usize,
    img2img: bool,
    device: &Device,
    dtype: DType,
    memory: MemoryRequest,
) -> Result<Plan> {
    let profile = model.family().memory_profile();
    let manifest = manifest(model)?;
    // SDXL's pipelines (families that honour `force_upcast`) run an upcast VAE in f32: encoding
    // under any half precision, decoding under f16 (see `pipeline::stages::decode_dtype`).
    let mut component_precision = Vec::new();
    if model.family().vae.honours_force_upcast && precision(dtype).is_half() {
        let vae: sdgen_models::vae::VaeConfig = model.config("vae", "config.json")?;
        if vae.force_upcast.unwrap_or(true) {
            component_precision.push(("vae_encoder".to_string(), Precision::F32));
            if dtype == DType::F16 {
                component_precision.push(("vae_decoder".to_string(), Precision::F32));
            }
        }
    }
    let request = PlanRequest {
        component_precision,
        n_images: n,
        max_images_per_batch: memory.max_images_per_batch,
        guidance: crate::pipeline::classifier_free(model, settings.guidance)?,
        img2img,
        precision: precision(dtype),
        device: device_kind(device),
        mode: memory.mode,
        // The planner's fast columns describe the whole fast set (attention without score
        // matrices, fused norms, cuDNN convolutions); a CUDA build without cuDNN convolves by
        // im2col, so it is planned with the stock figures.
        fast_kernels: sdgen_models::ops::fast_cpu(device) || sdgen_models::ops::fast_conv(device),
        // The encoders' stages are named after their components.
        skipped_stages: settings.skipped_encoders.iter().map(|c| c.to_string()).collect(),
        // LoRAs fused as their components load.
        load_transient_bytes: manifest
            .components
            .iter()
            .map(|c| (c.name.clone(), model.loras().load_transient_bytes(&c.name)))
            .filter(|(_, b)| *b > 0)
            .collect(),
        // A MultiDiffusion pass's denoiser sees one tile at a time.
        denoise_tiling: settings
            .denoise_tiles
            .map(|t| Tiling { tile_px: t.tile * t.scale, overlap_px: t.overlap * t.scale }),
        streamable: streamable(model, settings)?,
        quantised: quantised_options(model)?,
        // The warnings' advice names fields as references, which each reader of the plan spells
        // its own way ([`named`]; the engine's lines as its caller names fields).
        field_name: crate::error::field_ref_named,
        ..PlanRequest::new(
            &profile,
            &manifest,
            settings.width,
            settings.height,
            budget(device, memory.max_memory_bytes, memory.warm_bytes),
        )
    };
    let mut plan = plan(&request).map_err(|e| {
        let text = e.describe(&crate::error::field_ref_named);
        match e {
            sdgen_memory::plan::PlanError::DoesNotFit { .. } => Error::DoesNotFit(text),
            _ => Error::InvalidInput(text),
        }
    })?;
    if let Some(w) = requirement_warning(&profile, &plan, device, memory.max_memory_bytes) {
        plan.warning = Some(match plan.warning.take() {
            Some(other) => format!("{w}\n{other}"),
            None => w,
        });
    }
    if let Some(w) = max_memory_warning(device, memory.max_memory_bytes) {
        plan.warning = Some(match plan.warning.take() {
            Some(tight) => format!("{w}\n{tight}"),
            None => w,
        });
    }
    Ok(plan)
}

/// `plan` with the fields its warning names spelled as `name` says (the CLI's flags, a server's
/// JSON fields): how a plan from [`plan_run`] is shown or recorded outside the engine's lines.
pub fn named(mut plan: Plan, name: &dyn Fn(&'static str) -> Option<&'static str>) -> Plan {
    plan.warning = plan.warning.map(|w| crate::error::render(&w, name));
    plan
}

/// The ways the planner may hold the model's weights quantised when nothing fits at full
/// precision (its last rung), best image first: none when the user chose the weights
/// (`--weights`) or the file is quantised already (a GGUF, an fp8 checkpoint).
fn quantised_options(model: &ModelFolder) -> Result<Vec<QuantisedWeights>> {
    if model.quantise().is_some() || model.checkpoint().is_some_and(|c| c.quantised_kind().is_some()) {
        return Ok(Vec::new());
    }
    QUANTISED_KINDS
        .iter()
        .map(|kind| {
            // The table's names are `--weights`'s.
            let weights: crate::loading::quantise::Quantise = kind.name.parse().map_err(Error::InvalidInput)?;
            Ok(QuantisedWeights { kind, manifest: manifest(&model.clone().with_quantise(Some(weights))?)? })
        })
        .collect()
}

/// The model's components whose blocks the planner may stream: the denoiser's, and T5's where it
/// runs (the family's T5 encoder not skipped).
fn streamable(model: &ModelFolder, settings: &Settings) -> Result<Vec<StreamableBlocks>> {
    let mut out = vec![StreamableBlocks {
        component: model.denoiser_component().into(),
        blocks: model.denoiser_stream_blocks()?,
    }];
    let t5 = t5_encoder(model).filter(|c| !settings.skipped_encoders.contains(c));
    if let Some(component) = t5 {
        let cfg: T5Config = model.config(component, "config.json")?;
        out.push(StreamableBlocks { component: component.into(), blocks: T5EncoderModel::stream_blocks(&cfg) });
    }
    Ok(out)
}

/// The family's T5 encoder component (its stage has the same name), if it has one.
fn t5_encoder(model: &ModelFolder) -> Option<&'static str> {
    model.family().encoders.iter().find(|e| e.arch == TextEncoderArch::T5).map(|e| e.component)
}

/// The seed's low-memory warning (`⚠️  WARNING: Low memory detected …`, from the requirement
/// table) for a real-size model (weights of [`LARGE_MODEL_BYTES`] or more: the table describes
/// the published models, not tiny test folders) on a machine whose RAM is below the family's
/// minimum: on the CPU and on unified-memory GPUs, where the table's figures apply.
fn requirement_warning(
    profile: &sdgen_memory::plan::FamilyProfile,
    plan: &Plan,
    device: &Device,
    max_memory_bytes: Option<u64>,
) -> Option<String> {
    let available = sdgen_memory::memory_info().system_available_bytes;
    requirement_warning_for(profile, plan, device, max_memory_bytes.map_or(available, |m| m.min(available)))
}

/// [`requirement_warning`] with `available` bytes of memory for the run.
fn requirement_warning_for(
    profile: &sdgen_memory::plan::FamilyProfile,
    plan: &Plan,
    device: &Device,
    available: u64,
) -> Option<String> {
    let weights: u64 = plan.stages.iter().map(|s| s.weight_bytes).sum();
    if weights < LARGE_MODEL_BYTES || device_kind(device) == DeviceKind::DiscreteGpu {
        return None;
    }
    profile.requirement.requirement().low_memory_warning(available)
}

/// `--max-memory` above what the machine has (RAM on the CPU and unified-memory GPUs, the card's
/// memory on a discrete GPU): the plan may then "fit" what can never be had.
fn max_memory_warning(device: &Device, max_memory_bytes: Option<u64>) -> Option<String> {
    let max = max_memory_bytes?;
    let (have, what) = match device_kind(device) {
        DeviceKind::DiscreteGpu => (sdgen_memory::gpu_probe().and_then(|p| p.memory())?.total_bytes, "GPU memory"),
        _ => (sdgen_memory::memory_info().system_total_bytes, "RAM"),
    };
    // `--max-memory` is the process's own flag here (the CLI's, or the server's applied to every
    // job), not a request field: the text stays as it is.
    (max > have).then(|| {
        format!(
            "⚠️  WARNING: --max-memory {} is more than this machine's {} of {what}: the plan is made for memory \
             that is not there",
            sdgen_memory::plan::format_bytes(max),
            sdgen_memory::plan::format_bytes(have)
        )
    })
}

/// The engine options that realise `plan`. The planner counts attention slicing in whole
/// (batch × head) score matrices; the engine slices query rows, so the count becomes the rows
/// that hold the same bytes in the largest attention layer (every other layer then holds less).
pub fn stage_options(model: &ModelFolder, plan: &Plan, settings: &Settings, aggressive: bool) -> Result<StageOptions> {
    let profile = model.family().memory_profile();
    // Query rows of the stage's largest attention that hold `matrices` of its score matrices
    // (over one tile's pixels for a MultiDiffusion denoiser).
    let rows = |stage: &str, matrices: usize, items: usize| -> usize {
        let tile = settings.denoise_tiles.filter(|_| stage == "denoise").map(|t| t.tile * t.scale);
        let pixels = tile.map_or(settings.width, |t| t.min(settings.width))
            * tile.map_or(settings.height, |t| t.min(settings.height));
        let shape = profile.stage(stage).and_then(|s| s.activation.attention);
        let (heads, tokens) = shape.map_or((1, pixels / 64), |a| (a.heads, pixels / a.pixels_per_token.max(1)));
        (matrices * tokens).div_ceil((items * heads).max(1)).clamp(1, tokens.max(1))
    };
    let mut options = StageOptions {
        aggressive_cleanup: aggressive || plan.mode == MemoryMode::Low,
        prepare_large_model: plan.stages.iter().map(|s| s.weight_bytes).sum::<u64>() >= LARGE_MODEL_BYTES,
        ..Default::default()
    };
    if let Some(s) = plan.stage("denoise") {
        options.attention_slice = s.options.attention_slice.map(|k| rows("denoise", k, s.items_per_forward));
    }
    // One set of VAE options serves its encoder and decoder (`pipeline::stages::vae_options`):
    // the planner gives both stages that one set (`sdgen_memory::plan::StageOptions::vae_shared`,
    // the leaner of their choices) and estimates both with it, so the decode's plan is the run's.
    if let Some(s) = plan.stage("decode") {
        options.vae_slicing = s.options.image_slicing;
        options.vae_tile_px = s.options.tiling.map(|t| t.tile_px);
        options.vae_attention_slice = s.options.attention_slice.map(|k| rows("decode", k, s.items_per_forward));
    }
    // Block streaming: the resident blocks the plan chose for the denoiser and for T5.
    let resident_blocks = |stage: Option<&str>| plan.stage(stage?)?.options.streaming.map(|s| s.resident_blocks);
    options.denoiser_resident_blocks = resident_blocks(Some("denoise"));
    options.t5_resident_blocks = resident_blocks(t5_encoder(model));
    // Text encoders share one switch: on the host if the plan puts any there.
    let mut encoders = model.family().encoders.iter().map(|e| e.component);
    options.text_encoder_on_host = encoders.any(|name| plan.stage(name).is_some_and(|s| s.options.on_host));
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdgen_memory::plan::{
        plan, Budget, BudgetSource, ComponentManifest, FamilyProfile, ModelManifest, PlanRequest, StoredDType,
        TensorEntry,
    };

    /// SD 3.5 Large's components, each one tensor of `elements` bf16 values.
    fn manifest(elements: usize) -> ModelManifest {
        let one = |c: &str, name: &str| {
            ComponentManifest::new(c, vec![TensorEntry::new(name, vec![elements], StoredDType::F16)])
        };
        let vae = ComponentManifest::new(
            "vae",
            vec![
                TensorEntry::new("encoder.w", vec![elements], StoredDType::F16),
                TensorEntry::new("decoder.w", vec![elements], StoredDType::F16),
            ],
        );
        ModelManifest::new(vec![
            one("text_encoder", "w"),
            one("text_encoder_2", "w"),
            one("text_encoder_3", "w"),
            one("transformer", "w"),
            vae,
        ])
    }

    /// The seed's warning for a real-size SD 3.5 Large on a machine below 36 GB, and none for a
    /// tiny folder.
    #[test]
    fn the_requirement_warning_is_for_real_sizes_below_the_minimum() {
        let profile = FamilyProfile::sd35_large();
        let budget = Budget::new(1 << 50, BudgetSource::MaxMemory);
        // The memory available is given, not read: the machine's own may be anything.
        let warn = |elements: usize, available: u64| {
            let m = manifest(elements);
            let p =
                plan(&PlanRequest { guidance: true, ..PlanRequest::new(&profile, &m, 1024, 1024, budget) }).unwrap();
            requirement_warning_for(&profile, &p, &Device::Cpu, available)
        };
        let w = warn(2_000_000_000, 20 << 30).expect("4 × 4 GB of weights on 20 GB");
        assert!(w.starts_with("⚠️  WARNING: Low memory detected (20.0GB available)"), "{w}");
        assert!(w.contains("SD 3.5 Large requires 36GB+ RAM"), "{w}");
        assert_eq!(warn(1000, 20 << 30), None, "a tiny folder");
    }

    /// An image-to-image plan whose VAE encoder alone needs tiling (SDXL's, upcast to f32, at
    /// 2048² on 8 GiB: `--quality 4k`'s hires pass) runs its VAE tiled: encoder and decoder share
    /// one set of options, the leaner of both stages', and the plan shows it on both.
    #[test]
    fn the_vae_runs_with_the_leaner_of_its_encoder_and_decoder_plans() {
        use sdgen_memory::plan::{DeviceKind, Precision};
        // SDXL's bf16 bytes (sdgen-memory's tests/data/sdxl_gpu_fast_peaks.jsonl), in elements.
        let one = |c: &str, name: &str, bytes: usize| {
            ComponentManifest::new(c, vec![TensorEntry::new(name, vec![bytes / 2], StoredDType::BF16)])
        };
        let vae = ComponentManifest::new(
            "vae",
            vec![
                TensorEntry::new("encoder.w", vec![98_980_398 / 2], StoredDType::BF16),
                TensorEntry::new("decoder.w", vec![98_980_398 / 2], StoredDType::BF16),
            ],
        );
        let m = ModelManifest::new(vec![
            one("text_encoder", "w", 246_120_960),
            one("text_encoder_2", "w", 1_389_319_680),
            one("unet", "w", 5_134_927_368),
            vae,
        ]);
        let profile = FamilyProfile::sdxl();
        let mut budget = Budget::new(8 << 30, BudgetSource::MaxMemory);
        budget.host_available_bytes = Some(64 << 30);
        let p = plan(&PlanRequest {
            img2img: true,
            guidance: true,
            device: DeviceKind::DiscreteGpu,
            precision: Precision::Bf16,
            fast_kernels: true,
            component_precision: vec![("vae_encoder".to_string(), Precision::F32)],
            ..PlanRequest::new(&profile, &m, 2048, 2048, budget)
        })
        .unwrap();
        let tile = |stage: &str| p.stage(stage).unwrap().options.tiling.map(|t| t.tile_px);
        assert_eq!((tile("encode_image"), tile("decode")), (Some(512), Some(512)), "{p}");
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sdxl"));
        let model = ModelFolder::open(dir).unwrap();
        let settings = Settings {
            steps: 30,
            guidance: 5.0,
            width: 2048,
            height: 2048,
            scheduler: crate::schedulers::SchedulerKind::Euler,
            skipped_encoders: Vec::new(),
            denoise_tiles: None,
        };
        let options = stage_options(&model, &p, &settings, false).unwrap();
        assert_eq!(options.vae_tile_px, Some(512));
    }
}
