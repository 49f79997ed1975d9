//! LoRAs (low-rank adapters, <https://arxiv.org/abs/2106.09685>) for SD 1.5 and SDXL, fused into
//! the UNet's and the text encoders' weights as they load ([`fuse`]), in the kohya / A1111 and the
//! diffusers / PEFT key formats ([`keys`]).
//!
//! A LoRA is checked against the model when it is attached ([`LoraSet::resolve`]), before any
//! weight is read: every key must be a down, up or alpha of a known format, every module it
//! names must be one of the model's with the shape the matrices imply, and the components it
//! adapts must be the model's. A LoRA for another family fails those checks and is refused
//! naming both families (the LoRA's guessed from its keys: a second text encoder is SDXL's, a
//! cross-attention width of 768 is SD 1.5's); a LoRA whose keys match nothing is an error, never
//! a silent no-op.

pub mod fuse;
pub mod keys;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;

use super::family::{DenoiserArch, FamilySpec, SD15, SDXL, SDXL_REFINER};
use super::read_backend::ReadBackend;
use super::single_file::manifest::ModelConfig;
use super::{ModelFolder, SafetensorsHeader};
use crate::{Error, Result};
pub use fuse::{fuse_transient_bytes, ComponentPatches, FusingBackend, Patch};
use keys::{Aliases, ModuleIndex, ParsedKey, Role};

/// A LoRA as a request names it: `PATH|REPO[:SCALE]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraRequest {
    /// The `.safetensors` file, or a hub repository holding one.
    pub source: super::ModelSource,
    /// How much of it to apply (A1111's `<lora:name:scale>`; 1 is the LoRA as trained).
    pub scale: f64,
}

/// The scale a LoRA takes when none is given.
pub const DEFAULT_SCALE: f64 = 1.0;

impl LoraRequest {
    /// Parses `PATH|REPO[:SCALE]`. A value that exists as a path is taken whole (a file name may
    /// hold a colon); else what follows the last colon is the scale and must be a finite number.
    pub fn parse(value: &str) -> Result<Self> {
        let invalid = |m: String| Err(Error::invalid("lora", m));
        if value.trim().is_empty() {
            return invalid("is empty: pass PATH[:SCALE] or REPO[:SCALE] (a LoRA .safetensors file)".into());
        }
        if Path::new(value).exists() {
            return Ok(Self { source: super::ModelSource::Path(value.into()), scale: DEFAULT_SCALE });
        }
        let (source, scale) = match value.rsplit_once(':') {
            None => (value, DEFAULT_SCALE),
            Some((source, scale)) => match scale.trim().parse::<f64>() {
                Ok(s) if s.is_finite() => (source, s),
                _ => {
                    return invalid(format!(
                        "`{value}`: the scale `{scale}` is not a number (write PATH:0.8 for 80% of the LoRA)"
                    ))
                }
            },
        };
        if source.is_empty() {
            return invalid(format!("`{value}` names no file before its scale"));
        }
        Ok(Self { source: super::ModelSource::parse(source), scale })
    }
}

/// A LoRA file to attach, with its scale and the name A1111's `<lora:name:scale>` gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFile {
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// Its scale.
    pub scale: f64,
    /// Its name: the file's without `.safetensors`, as A1111 names LoRAs, or a hub repo's.
    pub name: String,
}

impl LoraFile {
    /// `path` at `scale`, named after the file.
    pub fn new(path: impl Into<PathBuf>, scale: f64) -> Self {
        let path = path.into();
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Self { path, scale, name }
    }
}

/// A LoRA attached to a model: what it is and what it changes (for logs and metadata).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppliedLora {
    /// Its name ([`LoraFile::name`]): A1111's `<lora:name:scale>` name.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Its scale.
    pub scale: f64,
    /// Its key format ([`keys::FORMATS`]).
    pub format: &'static str,
    /// Bytes of the file (read while the components it adapts load).
    pub file_bytes: u64,
    /// Modules it adapts, per component.
    pub modules: BTreeMap<&'static str, usize>,
}

/// The LoRAs of a model and their deltas per component.
#[derive(Debug, Default)]
pub struct LoraSet {
    /// The LoRAs, in the order given (their deltas add in this order).
    pub applied: Vec<AppliedLora>,
    components: HashMap<&'static str, Arc<ComponentPatches>>,
}

/// A module a LoRA file adapts, as its keys say.
struct FileModule<'k> {
    key: ParsedKey<'k>,
    down: Option<&'k str>,
    up: Option<&'k str>,
}

/// `cross_attention_dim` of each family's UNet: a LoRA's `attn2.to_k` reads that many features,
/// which says which family it was trained for.
const CONTEXT_WIDTHS: &[(usize, &FamilySpec)] = &[(768, &SD15), (2048, &SDXL), (1280, &SDXL_REFINER)];

impl LoraSet {
    /// Checks each of `loras` against `model` and collects their deltas.
    pub fn resolve(model: &ModelFolder, loras: &[LoraFile]) -> Result<Self> {
        let mut set = Self::default();
        let mut indexes: HashMap<&'static str, ModuleIndex> = HashMap::new();
        let mut patches: HashMap<&'static str, ComponentPatches> = HashMap::new();
        for lora in loras {
            let mut applied = resolve_one(model, &lora.path, lora.scale, &mut indexes, &mut patches)?;
            applied.name = lora.name.clone();
            set.applied.push(applied);
        }
        set.components = patches.into_iter().map(|(c, p)| (c, Arc::new(p))).collect();
        Ok(set)
    }

    /// The deltas for `component`, if any LoRA adapts it.
    pub fn component(&self, component: &str) -> Option<Arc<ComponentPatches>> {
        self.components.get(component).cloned()
    }

    /// Bytes of all the LoRA files.
    pub fn file_bytes(&self) -> u64 {
        self.applied.iter().map(|l| l.file_bytes).sum()
    }

    /// The most memory fusing `component`'s LoRAs holds at once beyond its loaded weights
    /// (one weight at a time, the LoRA files read tensor by tensor, never whole): the planner's
    /// load transient for it.
    pub fn load_transient_bytes(&self, component: &str) -> u64 {
        self.components.get(component).map_or(0, |p| p.transient_bytes)
    }

    /// Whether no LoRA is attached.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
    }
}

/// `keys`, at most `n` of them in backticks, for messages.
fn some_keys<'a>(keys: impl IntoIterator<Item = &'a str>, n: usize) -> String {
    let all: Vec<&str> = keys.into_iter().collect();
    let mut shown: Vec<String> = all.iter().take(n).map(|k| format!("`{k}`")).collect();
    if all.len() > n {
        shown.push(format!("… ({} in all)", all.len()));
    }
    shown.join(", ")
}

/// The family a LoRA was made for, as far as its keys say.
fn guess_family(modules: &[FileModule], header: &SafetensorsHeader) -> Option<&'static FamilySpec> {
    let has = |c: &str| modules.iter().any(|m| m.key.component == c);
    // A second text encoder, or kohya's numbering of two (`lora_te1_`), is SDXL's.
    if has("text_encoder_2") || modules.iter().any(|m| m.key.stem.starts_with("lora_te1_")) {
        return Some(&SDXL);
    }
    let context = modules.iter().find_map(|m| {
        let down = m.down?;
        let cross = ["attn2.to_k", "attn2_to_k"].iter().any(|s| m.key.module.ends_with(s));
        cross.then(|| header.tensors.get(down).and_then(|t| t.shape.get(1).copied())).flatten()
    });
    if let Some(f) = context.and_then(|w| CONTEXT_WIDTHS.iter().find(|(cw, _)| *cw == w)) {
        return Some(f.1);
    }
    // One text encoder (`lora_te_`, or diffusers' `text_encoder` without a second): SD 1.x.
    has("text_encoder").then_some(&SD15)
}

fn model_name(model: &ModelFolder) -> String {
    match model.checkpoint() {
        Some(c) => c.path.display().to_string(),
        None => model.root().display().to_string(),
    }
}

fn resolve_one(
    model: &ModelFolder,
    path: &Path,
    scale: f64,
    indexes: &mut HashMap<&'static str, ModuleIndex>,
    patches: &mut HashMap<&'static str, ComponentPatches>,
) -> Result<AppliedLora> {
    let file = path.display();
    let header = SafetensorsHeader::read(path).map_err(|e| Error::about("lora", e))?;
    let family = model.family();
    let refuse = |m: String| Err(Error::invalid("lora", m));
    if family.denoiser.arch != DenoiserArch::UNet2DCondition {
        return refuse(format!(
            "{file}: LoRAs apply to SD 1.5 and SDXL models; {} is {}",
            model_name(model),
            family.display
        ));
    }
    // The file's keys: a down or up matrix of a module, an alpha, or nothing sdgen reads.
    let mut modules: BTreeMap<&str, FileModule> = BTreeMap::new();
    let mut unknown = Vec::new();
    for key in header.tensors.keys() {
        if key.ends_with(keys::ALPHA) {
            continue;
        }
        let Some(parsed) = keys::parse(key) else {
            unknown.push(key.as_str());
            continue;
        };
        let m = modules.entry(parsed.stem).or_insert(FileModule { key: parsed.clone(), down: None, up: None });
        match parsed.role {
            Role::Down => m.down = Some(key),
            Role::Up => m.up = Some(key),
        }
    }
    if !unknown.is_empty() {
        return refuse(format!(
            "{file}: {} is not a LoRA sdgen reads (kohya `lora_unet_….lora_down.weight` / `lora_te_…`, or diffusers/PEFT \
             `unet.….lora_A.weight` / `text_encoder.…`); LoHa, LoKr, DoRA and SD 3 LoRAs are not supported",
            some_keys(unknown.iter().copied(), 3)
        ));
    }
    let modules: Vec<FileModule> = modules.into_values().collect();
    if modules.is_empty() {
        return refuse(format!("{file} has no LoRA tensors"));
    }
    let guessed = guess_family(&modules, &header).filter(|g| g.name != family.name);
    // Names both families where the keys say which the LoRA is for.
    let both = |why: String| match guessed {
        Some(g) => {
            format!("{file} is a LoRA for {}, not for {} ({}): {why}", g.display, model_name(model), family.display)
        }
        None => format!("{file} does not fit {} ({}): {why}", model_name(model), family.display),
    };

    // Components the model lacks (SDXL's second text encoder in an SD 1.5).
    if let Some(m) = modules.iter().find(|m| !model.has_component(m.key.component)) {
        return refuse(both(format!(
            "its `{}` adapts a `{}`, which this model has none of",
            m.key.stem, m.key.component
        )));
    }

    let mut unmatched = Vec::new();
    let mut misfit = Vec::new();
    let mut targets = Vec::new();
    let mut format = None;
    for m in &modules {
        let component = m.key.component;
        let (Some(down), Some(up)) = (m.down, m.up) else {
            return refuse(format!(
                "{file}: `{}` has a {} matrix but no {}: a damaged LoRA?",
                m.key.stem,
                if m.down.is_some() { "down" } else { "up" },
                if m.down.is_some() { "up" } else { "down" }
            ));
        };
        let weights = model.weights(component)?;
        let index = match indexes.entry(component) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let aliases = if component == family.denoiser.component {
                    let cfg = ModelConfig::Unet(model.config(component, "config.json")?);
                    Aliases::Unet(cfg.ctx().map_err(|e| Error::BadModel(format!("{component}/config.json: {e}")))?)
                } else {
                    Aliases::TextEncoder
                };
                e.insert(ModuleIndex::new(weights.headers.iter().flat_map(|h| h.tensors.iter()), &aliases))
            }
        };
        let Some(target) = index.find(&m.key) else {
            unmatched.push(m.key.stem);
            continue;
        };
        let target_shape =
            weights.headers.iter().find_map(|h| h.tensors.get(target)).map(|t| t.shape.clone()).unwrap_or_default();
        let (ds, us) = (&header.tensors[down].shape, &header.tensors[up].shape);
        let rank = ds.first().copied().unwrap_or(0);
        let fits = us.len() >= 2
            && ds.len() >= 2
            && rank > 0
            && us[1] == rank
            && us[2..].iter().all(|&d| d == 1)
            && us[0] == target_shape[0]
            && ds[1..].iter().product::<usize>() == target_shape[1..].iter().product::<usize>();
        if !fits {
            misfit.push(format!("`{down}` {ds:?} / `{up}` {us:?} do not fit `{target}` {target_shape:?}"));
            continue;
        }
        format.get_or_insert(m.key.format.name);
        let lora_elements = ds.iter().product::<usize>() + us.iter().product::<usize>();
        let transient = fuse_transient_bytes(target_shape.iter().product(), lora_elements);
        targets.push((component, target.to_string(), m.key.stem, down, up, rank, transient));
    }
    if targets.is_empty() {
        return refuse(both(format!(
            "none of its {} modules is one of this model's (e.g. {})",
            modules.len(),
            some_keys(modules.iter().map(|m| m.key.stem), 3)
        )));
    }
    if !unmatched.is_empty() {
        return refuse(both(format!(
            "{} of its {} modules are none of this model's: {}",
            unmatched.len(),
            modules.len(),
            some_keys(unmatched.iter().copied(), 3)
        )));
    }
    if !misfit.is_empty() {
        return refuse(both(format!(
            "{}{}",
            misfit[0],
            if misfit.len() > 1 { format!(" (and {} more)", misfit.len() - 1) } else { String::new() }
        )));
    }

    // Alphas: a scalar per module, `rank` where absent (diffusers' and PEFT's default).
    let reader =
        ReadBackend::new(&[path.to_path_buf()], std::slice::from_ref(&header)).map_err(|e| Error::io(path, e))?;
    let mut counts = BTreeMap::new();
    for (component, target, stem, down, up, rank, transient) in targets {
        let alpha_key = format!("{stem}{}", keys::ALPHA);
        let alpha = if header.tensors.contains_key(&alpha_key) {
            reader
                .get_unchecked(&alpha_key, DType::F64, &Device::Cpu)
                .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
                .map_err(|e| Error::BadModel(format!("{file}: `{alpha_key}`: {e}")))?
                .first()
                .copied()
                .unwrap_or(rank as f64)
        } else {
            rank as f64
        };
        let entry = patches.entry(component).or_default();
        entry.transient_bytes = entry.transient_bytes.max(transient);
        let file_index = match entry.files.iter().position(|(p, _)| p == path) {
            Some(i) => i,
            None => {
                entry.files.push((path.to_path_buf(), header.clone()));
                entry.files.len() - 1
            }
        };
        entry.patches.entry(target).or_default().push(Patch {
            file: file_index,
            down: down.to_string(),
            up: up.to_string(),
            factor: scale * alpha / rank as f64,
        });
        *counts.entry(component).or_insert(0) += 1;
    }
    Ok(AppliedLora {
        name: String::new(),
        path: path.to_path_buf(),
        scale,
        format: format.unwrap_or("kohya"),
        file_bytes: header.file_bytes,
        modules: counts,
    })
}
