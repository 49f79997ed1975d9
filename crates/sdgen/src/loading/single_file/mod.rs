//! Single-file checkpoints: one `.safetensors` holding a whole pipeline under the original
//! CompVis names, as A1111 and ComfyUI use them (`model.diffusion_model.*`, `first_stage_model.*`,
//! `cond_stage_model.transformer.text_model.*`).
//!
//! Opening one reads only its header: the family comes from its tensors' names and shapes
//! ([`super::family::SIGNATURES`]), each model's tensors are renamed to diffusers' names by the
//! family's tables ([`rules`]), and everything the models will ask for is checked to be there
//! ([`manifest`]) before any weight is read. The configs and tokenizer come from a folder: the
//! family's own files, bundled ([`defaults`]), or any diffusers folder given in their place
//! (diffusers' `from_single_file(config=...)`). Weights are then read one tensor at a time,
//! renamed on the fly ([`backend`]).

pub mod backend;
pub mod defaults;
pub mod manifest;
pub mod rules;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

pub use backend::Source;
use manifest::ModelConfig;

use super::family::{recognise, FamilySpec, Recognised, FAMILIES};
use super::{read_json, SafetensorsHeader, TensorInfo};
use crate::{Error, Result};

/// Which kind of model a component is (selects its config type and its manifest).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelKind {
    /// diffusers' `UNet2DConditionModel` (SD 1.x layout).
    Unet,
    /// diffusers' `AutoencoderKL`.
    Vae,
    /// transformers' `CLIPTextModel`.
    ClipText,
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
}

/// SD 1.x: CLIP ViT-L/14, the ldm UNet and the KL-f8 autoencoder.
pub const SD15: SingleFileLayout = SingleFileLayout {
    components: &[
        ComponentLayout {
            component: "text_encoder",
            what: "CLIP text encoder",
            prefix: "cond_stage_model.transformer.",
            rules: rules::CLIP_TEXT,
            kind: ModelKind::ClipText,
        },
        ComponentLayout {
            component: "unet",
            what: "UNet",
            prefix: "model.diffusion_model.",
            rules: rules::LDM_UNET,
            kind: ModelKind::Unet,
        },
        ComponentLayout {
            component: "vae",
            what: "VAE",
            prefix: "first_stage_model.",
            rules: rules::LDM_VAE,
            kind: ModelKind::Vae,
        },
    ],
    defaults: defaults::SD15,
    required_configs: &[
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
    ],
};

/// One model of a checkpoint, under diffusers names.
#[derive(Debug, Clone)]
pub struct ComponentView {
    /// The diffusers component (`unet`).
    pub component: &'static str,
    /// For messages ("UNet").
    pub what: &'static str,
    /// The prefix of its keys in the checkpoint.
    pub prefix: &'static str,
    /// Its tensors by diffusers name, with the shape diffusers holds (data offsets are the
    /// checkpoint's): what a planner needs to size the component.
    pub tensors: BTreeMap<String, TensorInfo>,
    pub(crate) sources: Arc<BTreeMap<String, Source>>,
}

impl ComponentView {
    /// The checkpoint key behind a diffusers name.
    pub fn original_name(&self, name: &str) -> Option<&str> {
        self.sources.get(name).map(|s| s.original.as_str())
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
        let header = SafetensorsHeader::read(path)?;
        Self::from_header(path, header, config_from)
    }

    /// Everything [`Checkpoint::open`] does after reading the header: recognition, configs,
    /// renaming and the completeness checks. `path` is only used in messages and for loading.
    pub fn from_header(path: &Path, header: SafetensorsHeader, config_from: Option<&Path>) -> Result<Self> {
        let family = match recognise(&header.tensors) {
            Recognised::Family(f) => f,
            Recognised::Unsupported { display, evidence } => {
                return Err(Error::BadModel(format!(
                    "{} looks like {display} (it has {evidence}), which this build cannot run; single-file checkpoints it runs: {}",
                    path.display(),
                    supported()
                )))
            }
            Recognised::Unknown => {
                let first: Vec<String> = header.tensors.keys().take(3).map(|k| format!("`{k}`")).collect();
                return Err(Error::BadModel(format!(
                    "{} is not a checkpoint this build recognises (its {} tensors begin {}): single-file checkpoints it runs: {}",
                    path.display(),
                    header.tensors.len(),
                    if first.is_empty() { "with nothing".to_string() } else { first.join(", ") },
                    supported()
                )))
            }
        };
        let layout = family.single_file.expect("recognise only returns families with a single-file layout");
        let config_dir = match config_from {
            Some(dir) => check_config_dir(dir, family, layout)?,
            None => defaults::materialize(family.name, layout.defaults)?,
        };
        let pipeline_class = pipeline_class(&config_dir, family, path)?;
        let components = layout
            .components
            .iter()
            .map(|c| view(path, &header.tensors, &config_dir, family, c).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { path: path.to_path_buf(), family, config_dir, pipeline_class, header, components })
    }

    /// A model's view, if the family's files hold that component.
    pub fn component(&self, component: &str) -> Option<&Arc<ComponentView>> {
        self.components.iter().find(|c| c.component == component)
    }

    /// The components, in load order.
    pub fn components(&self) -> impl Iterator<Item = &Arc<ComponentView>> {
        self.components.iter()
    }
}

fn supported() -> String {
    let names: Vec<&str> = FAMILIES.iter().filter(|f| f.single_file.is_some()).map(|f| f.display).collect();
    format!(
        "{} in the original layout (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`)",
        names.join(", ")
    )
}

fn check_config_dir(dir: &Path, family: &FamilySpec, layout: &SingleFileLayout) -> Result<PathBuf> {
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
    Ok(dir.to_path_buf())
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
            "config folder {} is for a `{class}`, but {} is {} checkpoint ({})",
            config_dir.display(),
            path.display(),
            family.display,
            family.pipeline_classes.join("/")
        )));
    }
    Ok(class.to_string())
}

fn config<T: DeserializeOwned>(config_dir: &Path, component: &str) -> Result<T> {
    read_json(&config_dir.join(component).join("config.json"))
}

/// Renames one model's tensors and checks them against its config.
fn view(
    path: &Path,
    tensors: &BTreeMap<String, TensorInfo>,
    config_dir: &Path,
    family: &FamilySpec,
    layout: &ComponentLayout,
) -> Result<ComponentView> {
    let config_path = config_dir.join(layout.component).join("config.json");
    let cfg = match layout.kind {
        ModelKind::Unet => ModelConfig::Unet(config(config_dir, layout.component)?),
        ModelKind::Vae => ModelConfig::Vae(config(config_dir, layout.component)?),
        ModelKind::ClipText => ModelConfig::ClipText(config(config_dir, layout.component)?),
    };
    let unusable = |why: String| Error::BadModel(format!("{}: {why}", config_path.display()));
    let ctx = cfg.ctx().map_err(unusable)?;
    let expected = cfg.expected().map_err(unusable)?;

    let prefix = layout.prefix;
    let mut renamed = BTreeMap::new();
    let mut sources = BTreeMap::new();
    for (key, info) in tensors.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)) {
        let Some((name, conv_to_linear)) = rules::to_diffusers(layout.rules, &ctx, &key[prefix.len()..]) else {
            continue;
        };
        let mut info = info.clone();
        let mut reshape = None;
        if conv_to_linear && matches!(info.shape.len(), 3 | 4) && info.shape[2..].iter().all(|&d| d == 1) {
            info.shape.truncate(2);
            reshape = Some(info.shape.clone());
        }
        if let Some(other) = sources.insert(name.clone(), Source { original: key.clone(), reshape }) {
            return Err(Error::BadModel(format!(
                "{}: `{}` and `{key}` are both the {}'s `{name}`",
                path.display(),
                other.original,
                layout.what
            )));
        }
        renamed.insert(name, info);
    }
    if renamed.is_empty() {
        return Err(Error::BadModel(format!(
            "{} has no {} (no `{prefix}*` tensors): a single-file {} checkpoint holds the text encoder, UNet and VAE",
            path.display(),
            layout.what,
            family.display
        )));
    }
    // Shapes first: a config of the wrong size is the likelier story than a missing tensor.
    for (name, want) in cfg.spot_shapes() {
        // A tensor that is missing entirely is reported by name below.
        let Some(got) = renamed.get(&name).map(|t| &t.shape) else { continue };
        if *got != want {
            return Err(Error::BadModel(format!(
                "{}: `{}` has shape {got:?}, but {} makes it {want:?}: the checkpoint is not the architecture of these \
                 configs: give a folder of configs that fits it (--config-from DIR, diffusers' `config=`)",
                path.display(),
                sources[&name].original,
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
    Ok(ComponentView {
        component: layout.component,
        what: layout.what,
        prefix,
        tensors: renamed,
        sources: Arc::new(sources),
    })
}
