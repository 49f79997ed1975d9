//! Weights kept loaded between jobs ("warm"), for a long-lived engine (a server, a run of many
//! batches): a stage takes its model from here when an earlier one loaded it, and a model it
//! loads is kept when the running job's plan still fits with it resident.
//!
//! The rules (issue #13): an entry is one component's loaded model, keyed by everything that
//! makes its tensors what they are ([`WeightKey`]: the files, the configs' folder, the
//! component, dtype, device and the LoRAs fused into it — a LoRA'd UNet is never served to a job
//! without it). Before a job runs, the engine plans it as if nothing were kept (warm bytes count
//! as free, `MemoryRequest::warm_bytes`) and hands the plan's stages to [`WarmWeights::begin_job`],
//! which evicts, least recently used first, until every stage fits beside what stays
//! (`sdgen_memory::plan::evictions`). A model loaded during the job is kept only if every stage
//! of the job still fits with it; nothing is kept outside a planned job, and without a store
//! (`Runtime::warm` is `None`: the command line's one-shot runs) every stage drops its model
//! when it ends, as the plan assumes.

use std::any::Any;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, DeviceLocation};
use sdgen_memory::plan::{evictions, fits_with, StageResidency};
use serde::{Deserialize, Serialize};

use crate::loading::ModelFolder;
use crate::{Error, Result};

/// What makes a loaded component's tensors what they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightKey {
    /// The model as named in logs: its folder, or its single-file checkpoint.
    model: String,
    /// The folder its configs come from (a single file's `--config-from` changes the network).
    root: PathBuf,
    /// The weight files (a `--vae` folder's for a replaced VAE).
    files: Vec<PathBuf>,
    /// The planner's component (`unet`, `text_encoder_2`, `vae_decoder`, `vae_encoder`).
    component: String,
    dtype: DType,
    device: DeviceLocation,
    /// The LoRAs fused into it, in order: file and scale (as bits: any finite scale).
    loras: Vec<(PathBuf, u64)>,
    /// The denoiser's `--weights` quantisation (a q8 UNet never serves a full-precision job).
    quantise: Option<crate::loading::quantise::Quantise>,
}

impl WeightKey {
    /// `model`'s planner component `component` (its family's memory profile names it and the
    /// folder component it is read from), loaded in `dtype` on `device`.
    pub fn new(model: &ModelFolder, component: &str, dtype: DType, device: &Device) -> Result<Self> {
        let profile = model.family().memory_profile();
        let source = profile.component(component).map(|c| c.source).ok_or_else(|| {
            Error::BadModel(format!("{}'s memory profile has no component `{component}`", model.family().display))
        })?;
        let files = model.weights(source)?.files;
        let loras = model
            .loras()
            .applied
            .iter()
            .filter(|l| l.modules.contains_key(source))
            .map(|l| (l.path.clone(), l.scale.to_bits()))
            .collect();
        let name = match model.checkpoint() {
            Some(c) => c.path.display().to_string(),
            None => model.root().display().to_string(),
        };
        Ok(Self {
            model: name,
            root: model.root().to_path_buf(),
            files,
            component: component.to_string(),
            dtype,
            device: device.location(),
            loras,
            quantise: model.quantise().filter(|_| component == model.denoiser_component()),
        })
    }

    /// `unet of testdata/tiny-sd15 (f32 on cpu, with LoRA x.safetensors at 0.8)`.
    pub fn describe(&self) -> String {
        let entry = self.entry(0);
        let loras = match entry.loras.as_slice() {
            [] => String::new(),
            l => format!(", with LoRA {}", l.join(", ")),
        };
        format!("{} of {} ({} on {}{loras})", entry.component, entry.model, entry.dtype, entry.device)
    }

    fn entry(&self, bytes: u64) -> WarmEntry {
        WarmEntry {
            model: self.model.clone(),
            component: self.component.clone(),
            dtype: format!("{:?}", self.dtype).to_lowercase(),
            device: match self.device {
                DeviceLocation::Cpu => "cpu".to_string(),
                DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
            },
            loras: self.loras.iter().map(|(p, s)| format!("{} at {}", p.display(), f64::from_bits(*s))).collect(),
            bytes,
        }
    }
}

/// One stage of a job as the store sees it: its plan's peak and what it loads.
#[derive(Debug, Clone)]
pub struct JobStage {
    /// The stage, as the plan names it (`denoise`, the refiner's `refiner denoise`).
    pub name: String,
    /// Its peak and limit; [`StageResidency::reuses`] is the store's to fill.
    pub peak_bytes: u64,
    /// What every stage's peak must stay within.
    pub usable_bytes: u64,
    /// The weights it loads on the budget's device, each with its bytes (the plan's): only
    /// these are ever kept.
    pub loads: Vec<(WeightKey, u64)>,
}

/// How a stage came by its weights, as a job's metadata records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightUse {
    /// Read from the files and dropped after the stage.
    Loaded,
    /// Read from the files and kept warm for later stages and jobs.
    LoadedKept,
    /// Taken warm: nothing read.
    Reused,
}

/// Loads, reuses and evictions of one component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightCounts {
    /// Times its weights were read from the files.
    pub loads: u64,
    /// Times a stage took them warm.
    pub reuses: u64,
    /// Times warm ones were dropped to make room (or on request).
    pub evictions: u64,
}

/// A warm entry, for reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WarmEntry {
    /// The model (folder or checkpoint).
    pub model: String,
    /// The planner's component (`unet`, `vae_decoder`…).
    pub component: String,
    /// Its dtype.
    pub dtype: String,
    /// Its device.
    pub device: String,
    /// The LoRAs fused into it (`file at scale`).
    pub loras: Vec<String>,
    /// Its weights' bytes (the plan's figure).
    pub bytes: u64,
}

/// What the store holds and has done, for `/v1/memory` and `/metrics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WarmReport {
    /// Bytes of all warm weights.
    pub bytes: u64,
    /// The warm weights, most recently used first.
    pub entries: Vec<WarmEntry>,
    /// Per component since the engine started.
    pub counts: BTreeMap<String, WeightCounts>,
}

/// Weights dropped from the store at once, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Eviction {
    /// Why they went.
    pub reason: String,
    /// What went, with the bytes each held.
    pub evicted: Vec<(String, u64)>,
    /// In-use memory (the device's on a GPU, the process's resident set on the CPU) given back,
    /// measured across the drop and the allocator's trim.
    pub freed_bytes: u64,
}

impl std::fmt::Display for Eviction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what: Vec<String> = self.evicted.iter().map(|(w, b)| format!("{w}, {}", format_bytes(*b))).collect();
        write!(
            f,
            "🧊 Evicted warm weights ({}): {}; {} given back",
            self.reason,
            what.join("; "),
            format_bytes(self.freed_bytes)
        )
    }
}

struct Entry {
    key: WeightKey,
    bytes: u64,
    model: Arc<dyn Any + Send + Sync>,
}

#[derive(Default)]
struct Store {
    /// Whether anything is kept (a store that keeps nothing counts the loads).
    keeps: bool,
    /// Least recently used first.
    entries: Vec<Entry>,
    /// The running job's stages; `None` between jobs (nothing is kept then).
    job: Option<Vec<JobStage>>,
    /// How each stage since the last [`WarmWeights::take_uses`] came by its weights.
    uses: Vec<(String, WeightUse)>,
    counts: BTreeMap<String, WeightCounts>,
}

impl Store {
    fn residency(&self, stages: &[JobStage], extra: Option<&WeightKey>) -> (Vec<StageResidency>, Vec<u64>) {
        let keys: Vec<&WeightKey> = self.entries.iter().map(|e| &e.key).chain(extra).collect();
        let mut bytes: Vec<u64> = self.entries.iter().map(|e| e.bytes).collect();
        if let Some(k) = extra {
            bytes.push(job_bytes(stages, k).unwrap_or(0));
        }
        let stages = stages
            .iter()
            .map(|s| StageResidency {
                peak_bytes: s.peak_bytes,
                usable_bytes: s.usable_bytes,
                reuses: (0..keys.len()).filter(|&i| s.loads.iter().any(|(k, _)| k == keys[i])).collect(),
            })
            .collect();
        (stages, bytes)
    }

    fn count(&mut self, key: &WeightKey) -> &mut WeightCounts {
        self.counts.entry(key.component.clone()).or_default()
    }
}

/// The bytes the job's plan gives `key`, if a stage of it loads it.
fn job_bytes(stages: &[JobStage], key: &WeightKey) -> Option<u64> {
    stages.iter().flat_map(|s| &s.loads).find(|(k, _)| k == key).map(|(_, b)| *b)
}

/// The engine's warm weights: a handle the engine, its pipelines and a server's routes share.
/// `Default` is [`WarmWeights::counting_only`].
#[derive(Clone, Default)]
pub struct WarmWeights(Arc<Mutex<Store>>);

impl std::fmt::Debug for WarmWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let store = self.lock();
        write!(f, "WarmWeights({} entries)", store.entries.len())
    }
}

/// Bytes as the plan's table prints them, with a decimal for the small weights of small models.
fn format_bytes(bytes: u64) -> String {
    match bytes as f64 / (1u64 << 20) as f64 {
        mib if mib < 10.0 => format!("{mib:.1}MB"),
        _ => sdgen_memory::plan::format_bytes(bytes),
    }
}

/// In-use memory of the pool the weights live in: the GPU's for weights on one (when it can be
/// read), else the process's.
fn in_use_bytes(on_gpu: bool) -> u64 {
    let info = sdgen_memory::memory_info();
    match info.gpu {
        Some(g) if on_gpu => g.used_bytes,
        _ => info.process_rss_bytes,
    }
}

impl WarmWeights {
    /// An empty store that keeps what jobs load while their plans have room.
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(Store { keeps: true, ..Store::default() })))
    }

    /// A store that keeps nothing (every stage drops its model when it ends, as without one)
    /// but counts the loads and records them in the jobs' metadata: a server's `--no-keep-warm`.
    pub fn counting_only() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of all warm weights (the plan's figures).
    pub fn bytes(&self) -> u64 {
        self.lock().entries.iter().map(|e| e.bytes).sum()
    }

    /// What is warm (most recently used first) and the counts so far.
    pub fn report(&self) -> WarmReport {
        let store = self.lock();
        WarmReport {
            bytes: store.entries.iter().map(|e| e.bytes).sum(),
            entries: store.entries.iter().rev().map(|e| e.key.entry(e.bytes)).collect(),
            counts: store.counts.clone(),
        }
    }

    /// A job with these stages is about to run: evicts, least recently used first (those it does
    /// not run with before those it does), until every stage fits beside what stays, and keeps
    /// the stages for deciding what the job may keep. `None` when nothing had to go.
    pub fn begin_job(&self, stages: Vec<JobStage>) -> Option<Eviction> {
        let mut store = self.lock();
        store.uses.clear();
        let (residency, bytes) = store.residency(&stages, None);
        let order = evictions(&residency, &bytes);
        let reason = (!order.is_empty()).then(|| over_budget(&stages, &residency, &bytes));
        // Taken out in eviction order; the rest keep theirs.
        let mut slots: Vec<Option<Entry>> = store.entries.drain(..).map(Some).collect();
        let dropped: Vec<Entry> = order.iter().filter_map(|&i| slots[i].take()).collect();
        store.entries = slots.into_iter().flatten().collect();
        store.job = Some(stages);
        drop(store);
        reason.map(|r| self.drop_entries(dropped, r))
    }

    /// The job ended (done, failed or cancelled): nothing more is kept until the next begins.
    pub fn end_job(&self) {
        self.lock().job = None;
    }

    /// Drops every warm weight (a model switch, a stage that ran out of memory), measured.
    /// `None` when nothing was warm.
    pub fn clear(&self, reason: &str) -> Option<Eviction> {
        let entries = std::mem::take(&mut self.lock().entries);
        (!entries.is_empty()).then(|| self.drop_entries(entries, reason.to_string()))
    }

    /// Drops `entries` (they are out of the store already), returns their memory and measures it.
    fn drop_entries(&self, entries: Vec<Entry>, reason: String) -> Eviction {
        let on_gpu = entries.iter().any(|e| e.key.device != DeviceLocation::Cpu);
        let before = in_use_bytes(on_gpu);
        let mut evicted = Vec::new();
        {
            let mut store = self.lock();
            for e in &entries {
                store.count(&e.key).evictions += 1;
                evicted.push((e.key.describe(), e.bytes));
            }
        }
        drop(entries);
        sdgen_memory::cleanup_memory(false);
        Eviction { reason, evicted, freed_bytes: before.saturating_sub(in_use_bytes(on_gpu)) }
    }

    /// How each stage since the last call came by its weights, in order.
    pub fn take_uses(&self) -> Vec<(String, WeightUse)> {
        std::mem::take(&mut self.lock().uses)
    }

    /// The model `key` names: warm when a stage loaded it before, else made by `load` (and kept
    /// when the running job's stages all fit with it beside them). `stage` names the stage for
    /// its metadata.
    pub(crate) fn get_or_load<T: Any + Send + Sync>(
        &self,
        stage: &str,
        key: WeightKey,
        load: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        {
            let mut store = self.lock();
            if let Some(i) = store.entries.iter().position(|e| e.key == key) {
                let entry = store.entries.remove(i);
                let model = entry.model.clone().downcast::<T>().ok();
                store.entries.push(entry);
                if let Some(model) = model {
                    store.count(&key).reuses += 1;
                    store.uses.push((stage.to_string(), WeightUse::Reused));
                    return Ok(model);
                }
            }
        }
        // Loaded without the lock: reports stay answerable while gigabytes are read.
        let model = Arc::new(load()?);
        let mut store = self.lock();
        store.count(&key).loads += 1;
        let keep = match store.job.as_deref().filter(|_| store.keeps) {
            Some(stages) => job_bytes(stages, &key).filter(|_| {
                let (residency, bytes) = store.residency(stages, Some(&key));
                fits_with(&residency, &bytes, &vec![true; bytes.len()])
            }),
            None => None,
        };
        let used = match keep {
            Some(bytes) => {
                store.entries.push(Entry { key, bytes, model: model.clone() });
                WeightUse::LoadedKept
            }
            None => WeightUse::Loaded,
        };
        store.uses.push((stage.to_string(), used));
        Ok(model)
    }

    /// Records a load of `key` for `stage` that is never kept (a streamed model holds only part
    /// of its weights): counted, and recorded as loaded in the job's metadata.
    pub(crate) fn record_unkept_load(&self, stage: &str, key: &WeightKey) {
        let mut store = self.lock();
        store.count(key).loads += 1;
        store.uses.push((stage.to_string(), WeightUse::Loaded));
    }
}

/// Why warm weights must go: the stage furthest over its limit with them beside it.
fn over_budget(stages: &[JobStage], residency: &[StageResidency], bytes: &[u64]) -> String {
    let beside =
        |r: &StageResidency| -> u64 { (0..bytes.len()).filter(|i| !r.reuses.contains(i)).map(|i| bytes[i]).sum() };
    let worst =
        stages.iter().zip(residency).max_by_key(|(_, r)| (r.peak_bytes + beside(r)).saturating_sub(r.usable_bytes));
    match worst {
        Some((s, r)) => format!(
            "the job's {} stage plans a peak of {} and would have {} of other warm weights beside it, over the {} \
             it may use",
            s.name,
            format_bytes(s.peak_bytes),
            format_bytes(beside(r)),
            format_bytes(s.usable_bytes)
        ),
        None => "the job needs the room".to_string(),
    }
}

impl super::Runtime {
    /// The model of `key` for the stage `stage`: from the engine's warm weights when it keeps
    /// them, else `load`ed for this stage alone.
    pub(super) fn load_weights<T: Any + Send + Sync>(
        &self,
        stage: &str,
        key: impl FnOnce() -> Result<WeightKey>,
        load: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        match &self.warm {
            Some(warm) => warm.get_or_load(stage, key()?, load),
            None => Ok(Arc::new(load()?)),
        }
    }

    /// The model of `key` for the stage `stage`, held as `residency` says: a resident one as
    /// [`Self::load_weights`] gives it; a streamed one (it holds only part of its weights) loaded
    /// afresh and never kept warm, its load still counted and recorded by the engine's store.
    pub(super) fn load_weights_as<T: Any + Send + Sync>(
        &self,
        stage: &str,
        residency: sdgen_models::stream::Residency,
        key: impl FnOnce() -> Result<WeightKey>,
        load: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        if residency == sdgen_models::stream::Residency::Resident {
            return self.load_weights(stage, key, load);
        }
        let model = Arc::new(load()?);
        if let Some(warm) = &self.warm {
            warm.record_unkept_load(stage, &key()?);
        }
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loading::lora::LoraFile;

    const MB: u64 = 1 << 20;

    fn testdata(name: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata")).join(name)
    }

    fn key(model: &ModelFolder, component: &str) -> WeightKey {
        WeightKey::new(model, component, DType::F32, &Device::Cpu).unwrap()
    }

    /// Stages of `peak` MB each loading one weight of its bytes, within 100 MB.
    fn job(stages: &[(&str, u64, &WeightKey, u64)]) -> Vec<JobStage> {
        stages
            .iter()
            .map(|(name, peak, key, bytes)| JobStage {
                name: name.to_string(),
                peak_bytes: peak * MB,
                usable_bytes: 100 * MB,
                loads: vec![((*key).clone(), bytes * MB)],
            })
            .collect()
    }

    /// A "model" of `n` bytes, counting the loads.
    fn load(loads: &mut usize) -> impl FnOnce() -> Result<Vec<u8>> + '_ {
        move || {
            *loads += 1;
            Ok(vec![0u8; 16])
        }
    }

    #[test]
    fn what_a_job_loads_is_kept_while_its_stages_fit_and_reused_by_the_next() {
        let model = ModelFolder::open(&testdata("tiny-sd15")).unwrap();
        let (te, unet) = (key(&model, "text_encoder"), key(&model, "unet"));
        let warm = WarmWeights::new();
        let mut loads = 0;
        // Outside a job nothing is kept.
        warm.get_or_load("unet", unet.clone(), load(&mut loads)).unwrap();
        assert_eq!((warm.bytes(), warm.take_uses()), (0, vec![("unet".to_string(), WeightUse::Loaded)]));
        // The encoder (10 MB) fits beside the UNet's 80 MB peak, and the UNet (60) beside the encoder's 30.
        let stages = job(&[("text_encoder", 30, &te, 10), ("denoise", 80, &unet, 60)]);
        assert_eq!(warm.begin_job(stages.clone()), None);
        warm.get_or_load("text_encoder", te.clone(), load(&mut loads)).unwrap();
        warm.get_or_load("unet", unet.clone(), load(&mut loads)).unwrap();
        warm.end_job();
        assert_eq!(warm.bytes(), 70 * MB);
        assert!(warm.begin_job(stages).is_none());
        let model_then = warm.get_or_load("text_encoder", te.clone(), load(&mut loads)).unwrap();
        warm.get_or_load("unet", unet.clone(), load(&mut loads)).unwrap();
        warm.end_job();
        assert_eq!(loads, 3, "the second job loaded nothing");
        assert_eq!(model_then.len(), 16);
        let uses: Vec<WeightUse> = warm.take_uses().into_iter().map(|(_, u)| u).collect();
        assert_eq!(uses, [WeightUse::Reused, WeightUse::Reused]);
        let report = warm.report();
        assert_eq!(report.entries.iter().map(|e| e.component.as_str()).collect::<Vec<_>>(), ["unet", "text_encoder"]);
        assert_eq!(report.counts["unet"], WeightCounts { loads: 2, reuses: 1, evictions: 0 });
    }

    #[test]
    fn a_budget_with_no_room_beside_the_stages_keeps_nothing() {
        let model = ModelFolder::open(&testdata("tiny-sd15")).unwrap();
        let (te, unet) = (key(&model, "text_encoder"), key(&model, "unet"));
        let warm = WarmWeights::new();
        let mut loads = 0;
        // The UNet's stage peaks at 95 of 100: the encoder's 10 cannot stay beside it, and the
        // UNet's 60 cannot stay beside the encoder's 50 (nor the next job's denoise, its own).
        let stages = job(&[("text_encoder", 50, &te, 10), ("denoise", 95, &unet, 60)]);
        for _ in 0..2 {
            assert!(warm.begin_job(stages.clone()).is_none());
            warm.get_or_load("text_encoder", te.clone(), load(&mut loads)).unwrap();
            warm.get_or_load("unet", unet.clone(), load(&mut loads)).unwrap();
            warm.end_job();
            let uses: Vec<WeightUse> = warm.take_uses().into_iter().map(|(_, u)| u).collect();
            assert_eq!(uses, [WeightUse::Loaded, WeightUse::Loaded], "as cold");
            assert_eq!(warm.bytes(), 0);
        }
        assert_eq!(loads, 4);
    }

    #[test]
    fn another_models_job_evicts_the_least_recently_used_and_says_why() {
        let a = ModelFolder::open(&testdata("tiny-sd15")).unwrap();
        let b = ModelFolder::open(&testdata("tiny-sd15-lcm")).unwrap();
        let (a_te, a_unet, b_unet) = (key(&a, "text_encoder"), key(&a, "unet"), key(&b, "unet"));
        let warm = WarmWeights::new();
        let mut loads = 0;
        warm.begin_job(job(&[("text_encoder", 20, &a_te, 5), ("denoise", 50, &a_unet, 40)]));
        warm.get_or_load("text_encoder", a_te.clone(), load(&mut loads)).unwrap();
        warm.get_or_load("unet", a_unet.clone(), load(&mut loads)).unwrap();
        warm.end_job();
        assert_eq!(warm.bytes(), 45 * MB);
        // B's UNet stage peaks at 70: A's 45 MB cannot all stay; its encoder (least recently
        // used) goes first, then its UNet.
        let eviction = warm.begin_job(job(&[("denoise", 70, &b_unet, 40)])).expect("room is made");
        assert_eq!(eviction.evicted.len(), 2, "{eviction}");
        assert!(eviction.evicted[0].0.starts_with("text_encoder of ") && eviction.evicted[1].0.starts_with("unet of "));
        assert!(eviction.reason.contains("denoise stage plans a peak of 70MB"), "{}", eviction.reason);
        assert_eq!(warm.bytes(), 0);
        warm.get_or_load("unet", b_unet.clone(), load(&mut loads)).unwrap();
        warm.end_job();
        let report = warm.report();
        assert_eq!(
            (report.bytes, report.counts["unet"].evictions, report.counts["text_encoder"].evictions),
            (40 * MB, 1, 1)
        );
        // A model switch drops the rest.
        let cleared = warm.clear("a model switch").unwrap();
        assert_eq!(cleared.evicted.len(), 1);
        assert!(warm.clear("again").is_none() && warm.bytes() == 0);
    }

    #[test]
    fn the_key_tells_loras_dtypes_and_components_apart() {
        let model = ModelFolder::open(&testdata("tiny-sd15")).unwrap();
        let lora = LoraFile::new(testdata("lora/sd15_kohya.safetensors"), 0.8);
        let with_lora = model.clone().with_loras(std::slice::from_ref(&lora)).unwrap();
        let stronger = model.clone().with_loras(&[LoraFile { scale: 1.0, ..lora }]).unwrap();
        assert_ne!(key(&model, "unet"), key(&with_lora, "unet"), "a LoRA'd UNet is another model");
        assert_ne!(key(&with_lora, "unet"), key(&stronger, "unet"), "so is one at another scale");
        assert_eq!(key(&model, "vae_decoder"), key(&with_lora, "vae_decoder"), "the LoRA adapts no VAE");
        assert!(key(&with_lora, "unet").describe().contains("with LoRA"));
        assert_ne!(key(&model, "vae_decoder"), key(&model, "vae_encoder"));
        let f16 = WeightKey::new(&model, "unet", DType::F16, &Device::Cpu).unwrap();
        assert_ne!(key(&model, "unet"), f16);
        assert!(WeightKey::new(&model, "transformer", DType::F32, &Device::Cpu).is_err());
    }

    /// `--weights q8` makes another denoiser (its linears are Q8_0 blocks), never served to a
    /// full-precision job or the reverse; the components it does not quantise stay shared.
    #[test]
    fn quantised_weights_are_another_denoiser() {
        use crate::loading::quantise::Quantise;
        let model = ModelFolder::open(&testdata("tiny-sd15")).unwrap();
        let q8 = model.clone().with_quantise(Some(Quantise::Q8)).unwrap();
        let q4 = model.clone().with_quantise(Some(Quantise::Q4)).unwrap();
        assert_ne!(key(&model, "unet"), key(&q8, "unet"));
        assert_ne!(key(&q8, "unet"), key(&q4, "unet"));
        assert_eq!(key(&model, "text_encoder"), key(&q8, "text_encoder"));
        assert_eq!(key(&model, "vae_decoder"), key(&q8, "vae_decoder"));
    }
}
