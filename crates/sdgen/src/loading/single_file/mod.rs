//! Single-file checkpoints: one `.safetensors` holding a whole pipeline under the original
//! names, as A1111 and ComfyUI use them: CompVis' for SD 1.x (`model.diffusion_model.*`,
//! `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`), Stability's `sgm` for
//! SDXL (the same UNet and VAE prefixes, the text encoders as `conditioner.embedders.N.*`),
//! SAI's for SD 3.5 (the MMDiT and VAE under the same prefixes, the text encoders as
//! `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`, or in a `text_encoders/` folder beside
//! the file, as Stability publishes them).
//!
//! Opening one reads only its header: the family comes from its tensors' names and shapes
//! ([`super::family::SIGNATURES`], see `recognition.rs`), each model's tensors are renamed to
//! diffusers' names by the family's tables ([`rules`], laid out per family in [`layouts`]), and
//! everything the models will ask for is checked to be there ([`manifest`]) before any weight is
//! read. The configs and tokenizer come from a folder: the family's own files, bundled
//! ([`defaults`]), or any diffusers folder given in their place (diffusers'
//! `from_single_file(config=...)`). Weights are then read one tensor at a time, renamed on the fly
//! ([`backend`]).

pub mod backend;
pub mod defaults;
pub(crate) mod fp8;
mod gguf_denoiser;
pub mod layouts;
pub mod manifest;
mod recognition;
pub mod rules;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

pub use backend::{SingleFileBackend, Source};
pub use layouts::{SD15, SD35_LARGE, SD35_MEDIUM, SDXL, SDXL_REFINER};
use manifest::ModelConfig;
use rules::{Take, Target};

use super::family::{FamilySpec, FAMILIES};
use super::{read_json, SafetensorsHeader, TensorInfo};
use crate::error::field::{CONFIG_FROM, NO_T5};
use crate::{Error, Result};

/// Which kind of model a component is (selects its config type and its manifest).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelKind {
    /// diffusers' `UNet2DConditionModel` (SD 1.x and SDXL layouts).
    Unet,
    /// diffusers' `AutoencoderKL`.
    Vae,
    /// transformers' `CLIPTextModel`.
    ClipText,
    /// transformers' `CLIPTextModelWithProjection` (SDXL's second text encoder, SD 3's CLIPs).
    ClipTextWithProjection,
    /// diffusers' `SD3Transformer2DModel` (SD 3 / 3.5's MMDiT).
    MMDiT,
    /// transformers' `T5EncoderModel` (SD 3's third text encoder).
    T5,
}

impl ModelKind {
    /// Whether its fp8 weights are read (held one byte a weight, each linear layer's dequantised
    /// for its own product; `fp8.rs` checks the format): the denoisers' (Stability's and
    /// ComfyUI's fp8 checkpoints) and T5's (ComfyUI's `t5xxl_fp8_e4m3fn.safetensors` and
    /// `t5xxl_fp8_e4m3fn_scaled.safetensors`). CLIP and VAE weights in fp8 are refused by name.
    fn reads_fp8(self) -> bool {
        matches!(self, ModelKind::Unet | ModelKind::MMDiT | ModelKind::T5)
    }
}

/// A file beside the checkpoint that holds one of its models when the checkpoint does not, under
/// the model's own names (SD 3.5's `text_encoders/clip_l.safetensors`).
#[derive(Debug)]
pub struct BesideFile {
    /// The folder, next to the checkpoint.
    pub folder: &'static str,
    /// The file names it may have, in order of preference.
    pub files: &'static [&'static str],
}

/// Where one model sits in a family's single files.
#[derive(Debug)]
pub struct ComponentLayout {
    /// The diffusers component (`unet`), as the pipeline asks for it.
    pub component: &'static str,
    /// For messages ("UNet").
    pub what: &'static str,
    /// The prefix of its keys in the checkpoint.
    pub prefix: &'static str,
    /// Its renaming table.
    pub rules: &'static [rules::Rule],
    /// Its kind.
    pub kind: ModelKind,
    /// Where it is looked for when the checkpoint has no `prefix*` tensors.
    pub beside: Option<BesideFile>,
    /// What stands in for a tensor the file lacks (diffusers names).
    pub if_absent: &'static [(&'static str, Absent)],
}

/// What stands in for a tensor a single file does not store.
#[derive(Debug, Clone, Copy)]
pub enum Absent {
    /// The identity (a square matrix).
    Identity,
    /// The tensor it is tied to, stored under this (diffusers) name instead.
    TiedTo(&'static str),
}

/// How a family's single-file checkpoints are laid out.
#[derive(Debug)]
pub struct SingleFileLayout {
    /// The models in the file, in the order the pipeline loads them.
    pub components: &'static [ComponentLayout],
    /// The configuration folder used when none is given: the family's hub files.
    pub defaults: &'static [defaults::BundledFile],
    /// What a configuration folder given instead must hold.
    pub required_configs: &'static [&'static str],
    /// The `general.architecture` of its denoiser's GGUF conversions (city96's converter:
    /// `sd1`, `sdxl`, `sd3`).
    pub gguf_architecture: &'static str,
}

/// One model of a checkpoint, under diffusers names.
#[derive(Debug, Clone)]
pub struct ComponentView {
    /// The checkpoint file (or the file beside it that holds this model).
    pub path: PathBuf,
    /// The diffusers component (`unet`).
    pub component: &'static str,
    /// For messages ("UNet").
    pub what: &'static str,
    /// The prefix of its keys in `path` (empty in a file of its own).
    pub prefix: &'static str,
    /// Its tensors by diffusers name, with the shape diffusers holds and the byte range they are
    /// read from in the checkpoint (a piece of a fused tensor: the piece's rows): what a planner
    /// needs to size the component.
    pub tensors: BTreeMap<String, TensorInfo>,
    pub(crate) sources: Arc<BTreeMap<String, Source>>,
}

impl ComponentView {
    /// The checkpoint key behind a diffusers name.
    pub fn original_name(&self, name: &str) -> Option<&str> {
        self.sources.get(name).map(|s| s.original.as_str())
    }

    /// Where a diffusers-named tensor comes from, and how.
    pub fn source(&self, name: &str) -> Option<&Source> {
        self.sources.get(name)
    }

    /// A `VarBuilder` serving the component by diffusers name, each tensor read when it is
    /// fetched and converted to `dtype` on `device` ([`SingleFileBackend`]).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        Ok(VarBuilder::from_backend(Box::new(self.backend()?), dtype, device.clone()))
    }

    /// The backend [`ComponentView::var_builder`] reads through.
    pub fn backend(&self) -> Result<SingleFileBackend> {
        SingleFileBackend::new(self.path.clone(), &self.tensors, &self.sources).map_err(|e| {
            Error::BadModel(format!("cannot open {} (its {}, `{}*`): {e}", self.path.display(), self.what, self.prefix))
        })
    }
}

/// An opened single-file checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The file.
    pub path: PathBuf,
    /// Its family.
    pub family: &'static FamilySpec,
    /// Where its configs and tokenizer come from (a diffusers-layout folder without weights).
    pub config_dir: PathBuf,
    /// The pipeline class: the config folder's `model_index.json`, else the family's.
    pub pipeline_class: String,
    /// The file's validated header (original names).
    pub header: SafetensorsHeader,
    components: Vec<Arc<ComponentView>>,
    /// Optional models of the family (SD 3's T5) that cannot be loaded, and why, in a sentence
    /// that says what to do: a run that needs one is refused before anything loads.
    unavailable: Vec<(&'static str, String)>,
    /// Models read from the config folder's own weights: a GGUF holds only the denoiser
    /// ([`Checkpoint::open_gguf`]); empty for a whole checkpoint.
    from_config_dir: Vec<&'static str>,
}

impl Checkpoint {
    /// Opens `path`, taking configs and tokenizer from `config_from` (a diffusers folder) or, when
    /// `None`, from the family's bundled defaults.
    pub fn open(path: &Path, config_from: Option<&Path>) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
            return Err(Error::InvalidInput(format!(
                "{} is a pickle checkpoint (.{ext}), which can run arbitrary code when read and is not supported: \
                 use the model's .safetensors file",
                path.display()
            )));
        }
        if super::gguf::is_gguf(path) {
            return Self::open_gguf(path, config_from);
        }
        let header = SafetensorsHeader::read(path)?;
        Self::from_header(path, header, config_from)
    }

    /// Everything [`Checkpoint::open`] does after reading the header: recognition, configs,
    /// renaming and the completeness checks. `path` is only used in messages and for loading.
    pub fn from_header(path: &Path, header: SafetensorsHeader, config_from: Option<&Path>) -> Result<Self> {
        let recognition::Recognition { family, why } = recognition::recognition(path, &header.tensors, config_from)?;
        let layout = family.single_file.expect("recognition only returns families with a single-file layout");
        let config_dir = match config_from {
            Some(dir) => dir.to_path_buf(),
            None => defaults::materialize(family.name, layout.defaults)?,
        };
        // What the folder is for first (its pipeline and components), then what it holds.
        let pipeline_class = pipeline_class(&config_dir, family, path)?;
        if config_from.is_some() {
            check_config_dir(&config_dir, family, layout)?;
            // SD 3.5 Large and Medium share a pipeline class: their denoisers' configs differ.
            if let Some(other) = recognition::config_family(&config_dir).filter(|f| f.name != family.name) {
                return Err(Error::InvalidInput(format!(
                    "{why}, but config folder {} is {}'s (by its {}/config.json): give {}'s configs to {CONFIG_FROM}, \
                     or leave it out to use the bundled ones",
                    config_dir.display(),
                    other.display,
                    other.denoiser.component,
                    family.display
                )));
            }
        }
        let mut components = Vec::new();
        let mut unavailable = Vec::new();
        for c in layout.components {
            let encoder = family.encoders.iter().find(|e| e.component == c.component);
            let optional = encoder.is_some_and(|e| e.optional);
            match locate(path, &header, &config_dir, family, c, &why) {
                Ok(v) => components.push(Arc::new(v)),
                Err(e) if optional => unavailable.push((c.component, format!("{e} (or run without it: {NO_T5})"))),
                Err(e) => return Err(e),
            }
            // An optional encoder's tokenizer may be missing from the configs too (SD 3.5's T5
            // tokenizer is not bundled); a required one's are `required_configs`.
            let tokenizer = encoder.filter(|e| e.optional).map(|e| e.tokenizer);
            if let Some(tokenizer) = tokenizer.filter(|t| !config_dir.join(t).is_dir()) {
                if components.last().is_some_and(|v| v.component == c.component) {
                    components.pop();
                    unavailable.push((
                        c.component,
                        format!(
                            "config folder {} has no `{tokenizer}/`, the {}'s tokenizer (this build does not bundle \
                             {}'s): pass a folder of {} configs that has it to {CONFIG_FROM} (the hub's {} without \
                             its weights is enough), or run without the {}: {NO_T5}",
                            config_dir.display(),
                            c.what,
                            family.display,
                            family.display,
                            family.hub_repo,
                            c.what
                        ),
                    ));
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            family,
            config_dir,
            pipeline_class,
            header,
            components,
            unavailable,
            from_config_dir: Vec::new(),
        })
    }

    /// Why an optional model of the family (SD 3's T5) cannot be loaded, if it cannot.
    pub fn unavailable(&self, component: &str) -> Option<&str> {
        self.unavailable.iter().find(|(c, _)| *c == component).map(|(_, why)| why.as_str())
    }

    /// A model's view, if the family's files hold that component.
    pub fn component(&self, component: &str) -> Option<&Arc<ComponentView>> {
        self.components.iter().find(|c| c.component == component)
    }

    /// The models the config folder's weights provide (all but the denoiser, for a GGUF).
    pub fn from_config_dir(&self) -> &[&'static str] {
        &self.from_config_dir
    }

    /// Whether the file is a GGUF denoiser (the only kind whose other models are the folder's).
    pub fn is_gguf(&self) -> bool {
        !self.from_config_dir.is_empty()
    }

    /// How many of the denoiser's tensors are stored in fp8 (an fp8-scaled or plain fp8 file).
    pub fn fp8_tensors(&self) -> usize {
        let denoiser = self.component(self.family.denoiser.component);
        denoiser.map_or(0, |v| v.tensors.values().filter(|t| fp8::is_fp8(&t.dtype)).count())
    }

    /// What kind of quantised file this is ("a GGUF", "an fp8 checkpoint"), if it is one.
    pub fn quantised_kind(&self) -> Option<&'static str> {
        if self.is_gguf() {
            Some("a GGUF")
        } else if self.fp8_tensors() > 0 {
            Some("an fp8 checkpoint")
        } else {
            None
        }
    }

    /// The components, in load order.
    pub fn components(&self) -> impl Iterator<Item = &Arc<ComponentView>> {
        self.components.iter()
    }
}

fn supported() -> String {
    let names: Vec<&str> = FAMILIES.iter().filter(|f| f.single_file.is_some()).map(|f| f.display).collect();
    format!(
        "{} in the original layout (`model.diffusion_model.*`, `first_stage_model.*`, and `cond_stage_model.*`, \
         `conditioner.embedders.*` or `text_encoders.*`)",
        names.join(", ")
    )
}

fn check_config_dir(dir: &Path, family: &FamilySpec, layout: &SingleFileLayout) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::InvalidInput(format!(
            "config folder {} does not exist: pass a diffusers model folder whose configs and tokenizer fit the checkpoint",
            dir.display()
        )));
    }
    let missing: Vec<&str> = layout.required_configs.iter().copied().filter(|f| !dir.join(f).is_file()).collect();
    if !missing.is_empty() {
        return Err(Error::InvalidInput(format!(
            "config folder {} lacks {}, which a single-file {} checkpoint takes from it",
            dir.display(),
            missing.join(", "),
            family.display
        )));
    }
    Ok(())
}

fn pipeline_class(config_dir: &Path, family: &FamilySpec, path: &Path) -> Result<String> {
    let index = config_dir.join("model_index.json");
    if !index.is_file() {
        return Ok(family.pipeline_classes[0].to_string());
    }
    let v: serde_json::Value = read_json(&index)?;
    let class = v.get("_class_name").and_then(|c| c.as_str()).unwrap_or(family.pipeline_classes[0]);
    if !family.pipeline_classes.contains(&class) {
        return Err(Error::InvalidInput(format!(
            "config folder {} is for a `{class}`, but {} is a {} checkpoint ({})",
            config_dir.display(),
            path.display(),
            family.display,
            family.pipeline_classes.join("/")
        )));
    }
    // SDXL's base and refiner share pipeline classes; their components tell them apart.
    if let Some(mismatch) = recognition::component_mismatch(&v, family) {
        return Err(Error::InvalidInput(format!(
            "config folder {}: its model_index.json {mismatch}, but {} is a {} checkpoint",
            config_dir.display(),
            path.display(),
            family.display
        )));
    }
    Ok(class.to_string())
}

fn config<T: DeserializeOwned>(config_dir: &Path, component: &str) -> Result<T> {
    read_json(&config_dir.join(component).join("config.json"))
}

/// A model's config from the config folder, as its kind reads it.
pub(crate) fn model_config(config_dir: &Path, layout: &ComponentLayout) -> Result<ModelConfig> {
    let c = layout.component;
    Ok(match layout.kind {
        ModelKind::Unet => ModelConfig::Unet(config(config_dir, c)?),
        ModelKind::Vae => ModelConfig::Vae(config(config_dir, c)?),
        ModelKind::ClipText => ModelConfig::ClipText(config(config_dir, c)?),
        ModelKind::ClipTextWithProjection => ModelConfig::ClipTextWithProjection(config(config_dir, c)?),
        ModelKind::MMDiT => ModelConfig::MMDiT(config(config_dir, c)?),
        ModelKind::T5 => ModelConfig::T5(config(config_dir, c)?),
    })
}

/// Finds one model: in the checkpoint under its prefix, else in the file beside it that the
/// layout names. A model in neither is refused, naming the file and the folder it was looked
/// for in.
fn locate(
    path: &Path,
    header: &SafetensorsHeader,
    config_dir: &Path,
    family: &FamilySpec,
    layout: &ComponentLayout,
    why: &str,
) -> Result<ComponentView> {
    let Some(beside) = layout.beside.as_ref().filter(|_| !recognition::has_prefix(&header.tensors, layout.prefix))
    else {
        let v = view(path, &header.tensors, layout.prefix, config_dir, family, layout, why)?;
        check_dtypes(&v, layout, "a checkpoint without 8-bit weights")?;
        return Ok(v);
    };
    let dir = path.parent().unwrap_or(Path::new(".")).join(beside.folder);
    let Some(file) = beside.files.iter().map(|f| dir.join(f)).find(|f| f.is_file()) else {
        return Err(Error::InvalidInput(format!(
            "{} holds no {} (no `{}*` tensors), and {} has no {}, where it is looked for beside the checkpoint: put \
             the model's `{}/{}` there (from its repository, e.g. {}), or use a checkpoint that includes its text \
             encoders",
            path.display(),
            layout.what,
            layout.prefix,
            dir.display(),
            beside.files.join(" or "),
            beside.folder,
            beside.files[0],
            family.hub_repo
        )));
    };
    let own = SafetensorsHeader::read(&file)?;
    let why = format!("{why}; {} beside it is taken for its {}", file.display(), layout.what);
    let v = view(&file, &own.tensors, "", config_dir, family, layout, &why)?;
    check_dtypes(&v, layout, &format!("a 16-bit {} in {}", beside.files[0], dir.display()))?;
    Ok(v)
}

/// Refuses a model stored in 8-bit floats whose fp8 weights this build does not read
/// ([`ModelKind::reads_fp8`]: a CLIP text encoder or a VAE, e.g. a T5 fp8 file put where a CLIP
/// file is looked for), naming what to use instead.
fn check_dtypes(v: &ComponentView, layout: &ComponentLayout, instead: &str) -> Result<()> {
    if layout.kind.reads_fp8() {
        return Ok(());
    }
    match v.tensors.iter().find(|(_, t)| fp8::is_fp8(&t.dtype)) {
        Some((name, t)) => Err(Error::InvalidInput(format!(
            "{}: its {} is stored as {} (`{}`, and others), which this build does not read: use {instead}",
            v.path.display(),
            layout.what,
            t.dtype,
            v.original_name(name).unwrap_or(name)
        ))),
        None => Ok(()),
    }
}

/// The tensor a [`Target`] describes, as the view's header holds it (diffusers shape, the byte
/// range it is read from), and the shape it is served as when that differs from the stored one.
fn derive(info: &TensorInfo, target: &Target) -> std::result::Result<(TensorInfo, Option<Vec<usize>>), String> {
    let mut info = info.clone();
    match target.take {
        Take::Whole => {
            let squeeze =
                target.conv_to_linear && matches!(info.shape.len(), 3 | 4) && info.shape[2..].iter().all(|&d| d == 1);
            if squeeze {
                info.shape.truncate(2);
                return Ok((info.clone(), Some(info.shape)));
            }
        }
        Take::Chunk { index, of } => {
            let rows = info.shape.first().copied().unwrap_or(0);
            if rows == 0 || rows % of != 0 {
                return Err(format!("has shape {:?}, which does not split into {of} equal parts", info.shape));
            }
            // Rows of a row-major tensor: piece `index` is a contiguous run of bytes.
            let bytes = info.byte_len() / of as u64;
            let start = info.data_offsets.0 + index as u64 * bytes;
            info.shape[0] = rows / of;
            info.data_offsets = (start, start + bytes);
        }
        Take::Transposed => {
            if info.shape.len() != 2 {
                return Err(format!("has shape {:?}, where a matrix belongs", info.shape));
            }
            info.shape.reverse();
        }
        Take::Identity => {}
        Take::SwapHalves => {
            if info.shape.first().is_none_or(|&rows| rows == 0 || rows % 2 != 0) {
                return Err(format!("has shape {:?}, which does not split into a shift and a scale", info.shape));
            }
        }
    }
    Ok((info, None))
}

/// Renames one model's tensors and checks them against its config. `why` says what the file was
/// taken for ("x.safetensors looks like …"), for the messages that mean it may not be that.
fn view(
    path: &Path,
    tensors: &BTreeMap<String, TensorInfo>,
    prefix: &'static str,
    config_dir: &Path,
    family: &FamilySpec,
    layout: &ComponentLayout,
    why: &str,
) -> Result<ComponentView> {
    let config_path = config_dir.join(layout.component).join("config.json");
    let cfg = model_config(config_dir, layout)?;
    let unusable = |why: String| Error::BadModel(format!("{}: {why}", config_path.display()));
    let ctx = cfg.ctx().map_err(unusable)?;
    let expected = cfg.expected().map_err(unusable)?;

    let mut renamed = BTreeMap::new();
    let mut sources = BTreeMap::new();
    for (key, info) in tensors.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)) {
        if fp8::is_extra(&key[prefix.len()..]) {
            continue;
        }
        for target in rules::to_diffusers(layout.rules, &ctx, &key[prefix.len()..]) {
            let (info, reshape) = derive(info, &target).map_err(|e| {
                Error::BadModel(format!(
                    "{}: `{key}` {e}: it is not the {}'s `{}`",
                    path.display(),
                    layout.what,
                    target.name
                ))
            })?;
            let source = Source { original: key.clone(), reshape, take: target.take };
            if let Some(other) = sources.insert(target.name.clone(), source) {
                return Err(Error::BadModel(format!(
                    "{}: `{}` and `{key}` are both the {}'s `{}`",
                    path.display(),
                    other.original,
                    layout.what,
                    target.name
                )));
            }
            renamed.insert(target.name, info);
        }
    }
    for &(name, absent) in layout.if_absent {
        if renamed.contains_key(name) {
            continue;
        }
        if let Absent::TiedTo(copy) = absent {
            if let (Some(info), Some(source)) = (renamed.remove(copy), sources.remove(copy)) {
                renamed.insert(name.to_string(), info);
                sources.insert(name.to_string(), source);
            }
            continue;
        }
        let square = cfg.spot_shapes().into_iter().find(|(n, s)| n == name && s.len() == 2 && s[0] == s[1]);
        if let Some((_, shape)) = square {
            let source = Source {
                original: format!("(the identity: `{prefix}{name}` is not stored)"),
                reshape: None,
                take: Take::Identity,
            };
            sources.insert(name.to_string(), source);
            renamed.insert(name.to_string(), TensorInfo { dtype: "F32".into(), shape, data_offsets: (0, 0) });
        }
    }
    if renamed.is_empty() {
        let whats: Vec<&str> = family.single_file.map_or(&[][..], |l| l.components).iter().map(|c| c.what).collect();
        return Err(Error::BadModel(format!(
            "{why}, but has no {} (no `{prefix}*` tensors): a single-file {} checkpoint holds the {}",
            layout.what,
            family.display,
            whats.join(", ")
        )));
    }
    // Shapes first: a config of the wrong size is the likelier story than a missing tensor.
    for (name, want) in cfg.spot_shapes() {
        // A tensor that is missing entirely is reported by name below.
        let Some(got) = renamed.get(&name).map(|t| &t.shape) else { continue };
        if *got != want {
            let source = &sources[&name];
            // A piece or a transpose of the stored tensor: say which.
            let as_named = if source.take == Take::Whole {
                String::new()
            } else {
                format!(" (as the {}'s `{name}`)", layout.what)
            };
            return Err(Error::BadModel(format!(
                "{why}, but `{}`{as_named} has shape {got:?} where {} makes it {want:?}: the checkpoint is not the \
                 architecture of these configs: give a folder of configs that fits it ({CONFIG_FROM} DIR, diffusers' \
                 `config=`)",
                source.original,
                config_path.display()
            )));
        }
    }
    if let Some(name) = expected.iter().find(|n| !renamed.contains_key(*n)) {
        let original = rules::to_original(layout.rules, &ctx, name)
            .map_or_else(|| format!("the {}'s `{name}`", layout.what), |k| format!("`{prefix}{k}`"));
        return Err(Error::BadModel(format!(
            "{} lacks {original} (the {} tensor diffusers calls `{name}`): the checkpoint is incomplete, or not the \
             architecture of {}",
            path.display(),
            layout.what,
            config_path.display()
        )));
    }
    // A tensor the config has no place for, where that means another architecture (an MMDiT
    // deeper than its config, or with `attn2` where its config has none).
    let expected: std::collections::BTreeSet<&String> = expected.iter().collect();
    let mut extra = renamed.keys().filter(|n| cfg.refuses_extra(n) && !expected.contains(n));
    if let Some(name) = extra.next() {
        return Err(Error::BadModel(format!(
            "{why}, but `{}` (the {}'s `{name}`) has no place in the architecture of {}: the checkpoint is not the \
             model these configs describe: give a folder of configs that fits it ({CONFIG_FROM} DIR, diffusers' \
             `config=`)",
            sources[name].original,
            layout.what,
            config_path.display()
        )));
    }
    // A denoiser's or T5's fp8 weights get their scales beside them (checked against the format).
    if layout.kind.reads_fp8() {
        renamed.extend(fp8::scales(path, tensors, prefix, &renamed, &sources)?);
    }
    Ok(ComponentView {
        path: path.to_path_buf(),
        component: layout.component,
        what: layout.what,
        prefix,
        tensors: renamed,
        sources: Arc::new(sources),
    })
}
