//! Opening models: diffusers-layout folders (`model_index.json`, per-component configs) and
//! single-file checkpoints (one `.safetensors` in the original layout, see [`single_file`]) behind
//! one [`ModelFolder`]; weights memory-mapped and converted tensor by tensor straight to the target
//! dtype and device (never a whole-model f32 copy).

pub mod denoiser;
pub mod export;
pub mod family;
pub mod gguf;
pub mod lora;
pub mod quantise;
pub mod read_backend;
pub mod safetensors_header;
pub mod single_file;
pub mod source;
pub mod stream;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

pub use denoiser::DenoiserGeometry;
pub use family::{FamilySpec, FAMILIES};
pub use safetensors_header::{SafetensorsHeader, TensorInfo};
pub use single_file::{Checkpoint, ComponentView};
pub use source::{ModelSource, NamedModel, RunDefaults, DEFAULT_MODEL, NAMED_MODELS, PRO_MODEL};

use crate::error::field::{MODEL, WEIGHTS};
use crate::{Error, Result};

/// A model whose family has been recognised: a diffusers pipeline folder, or a single-file
/// checkpoint together with the folder its configs and tokenizer come from.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
    family: &'static FamilySpec,
    pipeline_class: String,
    checkpoint: Option<Arc<Checkpoint>>,
    /// Components taken from other folders (`--vae`): component → folder with its
    /// `config.json` and weights.
    overrides: Vec<(String, PathBuf)>,
    /// Run defaults of a named model that are not its family's (SD 3.5 Large Turbo).
    run_defaults: Option<RunDefaults>,
    /// The components `model_index.json` names (not null), read once when the folder opens.
    components: Vec<String>,
    /// What the open model has parsed, shared by its clones.
    parsed: Arc<Parsed>,
    /// LoRAs fused into its components as they load.
    loras: Arc<lora::LoraSet>,
    /// `--weights`: the denoiser's linear weights quantised as they load.
    quantise: Option<quantise::Quantise>,
}

/// The files an opened model has parsed, each once: configs by path and type, weight headers by
/// component (and the folder replacing it). Runs ask for a config many times (the VAE's is read
/// by the planner, the scheduler, each stage), and a server keeps the model open across jobs.
#[derive(Debug, Default)]
struct Parsed {
    values: Mutex<HashMap<(PathBuf, TypeId), Arc<dyn Any + Send + Sync>>>,
    weights: Mutex<HashMap<(String, Option<PathBuf>), ComponentWeights>>,
    /// Files parsed (configs and headers), for tests and stats.
    files: AtomicUsize,
}

/// How to open a model.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct OpenOptions {
    /// For a single-file checkpoint: a diffusers folder to take the configs, scheduler and
    /// tokenizer from instead of the family's bundled ones (for checkpoints whose architecture
    /// differs from the family's standard size; diffusers' `from_single_file(config=...)`). Its
    /// weights, if any, are not used. Refused for a diffusers folder, which has its own.
    pub config_from: Option<PathBuf>,
    /// `--weights q8|q4|fp8`: the denoiser's linear weights quantised as they load (`None`: as
    /// stored). Applied to each job's model, not the cached one ([`ModelFolder::with_quantise`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<quantise::Quantise>,
}

/// The weights of one component: its files (several when sharded), or its share of a single-file
/// checkpoint.
#[derive(Debug, Clone)]
pub struct ComponentWeights {
    /// The files.
    pub files: Vec<PathBuf>,
    /// Their validated headers, in the same order. For a single-file checkpoint: one header
    /// holding only this component's tensors, under their diffusers names.
    pub headers: Vec<SafetensorsHeader>,
    /// Set for a share of a single-file checkpoint: how diffusers names map to its keys.
    view: Option<Arc<ComponentView>>,
    /// LoRA deltas fused into its tensors as they are read.
    lora: Option<Arc<lora::ComponentPatches>>,
    /// Its weights quantised as they are read (`--weights`).
    quantise: Option<Arc<quantise::QuantisePlan>>,
}

impl ComponentWeights {
    /// Whether any file has the tensor.
    pub fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|h| h.tensors.contains_key(name))
    }

    /// Total bytes of all tensors.
    pub fn weight_bytes(&self) -> u64 {
        self.headers.iter().map(SafetensorsHeader::weight_bytes).sum()
    }

    /// The file names, for messages.
    pub fn describe(&self) -> String {
        let files = self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
        match &self.view {
            Some(v) if v.prefix.is_empty() => format!("{files} (its {})", v.what),
            Some(v) => format!("{files} (its {}, `{}*`)", v.what, v.prefix),
            None => files,
        }
    }

    /// The single-file view, if these weights are a share of a checkpoint.
    pub fn single_file_view(&self) -> Option<&ComponentView> {
        self.view.as_deref()
    }

    /// A `VarBuilder` that reads each tensor when it is fetched and converts it to `dtype` on
    /// `device` (for a single-file checkpoint, by its diffusers name). Files are read with
    /// positioned reads rather than mapped, so the process never holds the file's pages and the
    /// converted weights at once (see `read_backend`).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        Ok(VarBuilder::from_backend(self.backend(false)?, dtype, device.clone()))
    }

    /// The `VarBuilder` streamed blocks are read from on `device` (see [`stream`]): the file on
    /// every use on the CPU and unified memory, host copies uploaded on every use on CUDA.
    pub fn streamed_var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        Ok(VarBuilder::from_backend(self.backend(stream::holds_host_copies(device))?, dtype, device.clone()))
    }

    /// The reader of these weights, with the LoRAs fused over it (over the host copies, if held,
    /// so a fused weight is made on the device as a resident load makes it).
    fn backend(&self, host_copies: bool) -> Result<Box<dyn SimpleBackend>> {
        // A single file's share: its view serves the tensors by diffusers name, through the same
        // reader (a tensor stored transposed, OpenCLIP's `text_projection`, is transposed back).
        let cannot_open = |e: std::io::Error| Error::BadModel(format!("cannot open {}: {e}", self.describe()));
        let backend: Box<dyn SimpleBackend> = match &self.view {
            Some(view) => Box::new(view.backend()?),
            None => Box::new(read_backend::ReadBackend::new(&self.files, &self.headers).map_err(cannot_open)?),
        };
        let backend: Box<dyn SimpleBackend> = match &self.quantise {
            Some(plan) => Box::new(quantise::QuantisingBackend::new(backend, plan.clone())),
            None => backend,
        };
        let backend: Box<dyn SimpleBackend> =
            if host_copies { Box::new(stream::HostCopies::new(backend)) } else { backend };
        Ok(match &self.lora {
            Some(patches) => Box::new(
                lora::FusingBackend::new(backend, patches.clone())
                    .map_err(|e| Error::BadModel(format!("cannot open the LoRAs of {}: {e}", self.describe())))?,
            ),
            None => backend,
        })
    }

    /// Whether LoRA deltas are fused into these weights as they load.
    pub fn has_lora(&self) -> bool {
        self.lora.is_some()
    }

    /// What `name` (whose entry is `info`) is held as once loaded, if it stays quantised: a GGUF's
    /// matrix of whole-block rows or an fp8 file's matrix (what a linear layer keeps), or a weight
    /// `--weights` quantises. The planner counts those at their stored size.
    pub fn held_quantised(&self, name: &str, info: &TensorInfo) -> Option<quantise::HeldAs> {
        use sdgen_models::ops::quantised::{row_bytes, GgmlType, Storage};
        // A patched (LoRA) weight is fused dense.
        if self.lora.as_ref().is_some_and(|p| p.patches.contains_key(name)) {
            return None;
        }
        if let Some(d) = self.quantise.as_ref().and_then(|p| p.get(name)) {
            return Some(d);
        }
        if single_file::fp8::held_in_fp8(name, info) {
            return Some(quantise::HeldAs::Fp8);
        }
        let Storage::Blocks(d) = GgmlType::by_name(&info.dtype)?.storage else { return None };
        (info.shape.len() == 2 && row_bytes(d, info.shape[1]).is_some()).then_some(quantise::HeldAs::Blocks(d))
    }
}

impl ModelFolder {
    /// Opens and recognises a diffusers folder or a single-file checkpoint (a file), validating
    /// everything that can be checked before any weight is read.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with(root, &OpenOptions::default())
    }

    /// [`ModelFolder::open`] with options.
    pub fn open_with(root: &Path, options: &OpenOptions) -> Result<Self> {
        if !root.exists() {
            return Err(Error::InvalidInput(format!(
                "model path {} does not exist: pass a named model ({}), a hub repository id (org/name), a diffusers \
                 model folder (with model_index.json) or a single-file .safetensors checkpoint to {MODEL}",
                root.display(),
                source::named_model_list()
            )));
        }
        if !root.is_dir() {
            let checkpoint = Checkpoint::open(root, options.config_from.as_deref())?;
            // A GGUF's other models are the config folder's, served as `--vae` serves its VAE.
            let overrides =
                checkpoint.from_config_dir().iter().map(|c| (c.to_string(), checkpoint.config_dir.join(c))).collect();
            return Ok(Self {
                root: checkpoint.config_dir.clone(),
                family: checkpoint.family,
                pipeline_class: checkpoint.pipeline_class.clone(),
                checkpoint: Some(Arc::new(checkpoint)),
                overrides,
                run_defaults: None,
                components: Vec::new(),
                parsed: Arc::default(),
                loras: Arc::default(),
                quantise: None,
            });
        }
        if let Some(dir) = &options.config_from {
            return Err(Error::InvalidInput(format!(
                "{} is a diffusers folder with its own configs; a config folder ({}) applies to single-file checkpoints only",
                root.display(),
                dir.display()
            )));
        }
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            return Err(Error::InvalidInput(format!(
                "{} is not a diffusers model folder: it has no model_index.json",
                root.display()
            )));
        }
        let index: serde_json::Value = read_json(&index_path)?;
        let pipeline_class = index
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::BadModel(format!("{} has no `_class_name`", index_path.display())))?
            .to_string();
        // A component is named when `model_index.json` maps it to a (library, class) pair, not null.
        let components = index
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| v.as_array().is_some_and(|a| a.iter().all(|x| !x.is_null())))
            .map(|(k, _)| k.clone())
            .collect();
        let mut folder = Self {
            root: root.to_path_buf(),
            family: &FAMILIES[0],
            pipeline_class,
            checkpoint: None,
            overrides: Vec::new(),
            run_defaults: None,
            components,
            parsed: Arc::default(),
            loras: Arc::default(),
            quantise: None,
        };
        let named: Vec<String> = folder.components.clone();
        let has_component = |c: &str| named.iter().any(|n| n == c);
        // The markers are read from the first denoiser folder of the families the index names
        // (the first family's when it names none, which then reports that folder missing).
        let denoiser_dir = FAMILIES
            .iter()
            .map(|f| f.denoiser.component)
            .find(|c| has_component(c))
            .unwrap_or(FAMILIES[0].denoiser.component);
        let denoiser = folder.weights(denoiser_dir)?;
        folder.family =
            family::detect(&folder.pipeline_class, has_component, |k| denoiser.has(k)).ok_or_else(|| {
                let known: Vec<_> =
                    FAMILIES.iter().map(|f| format!("{} ({})", f.display, f.pipeline_classes.join("/"))).collect();
                Error::BadModel(format!(
                    "{} is a `{}` whose {denoiser_dir} ({}) matches no supported family; supported: {}",
                    root.display(),
                    folder.pipeline_class,
                    denoiser.describe(),
                    known.join(", ")
                ))
            })?;
        Ok(folder)
    }

    /// The folder; for a single-file checkpoint, the folder its configs and tokenizer come from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The single-file checkpoint, when the model is one.
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoint.as_deref()
    }

    /// The recognised family.
    pub fn family(&self) -> &'static FamilySpec {
        self.family
    }

    /// The steps and guidance a run takes when the request gives none: a named model's own
    /// (SD 3.5 Large Turbo's 4 steps without guidance), else the family's.
    pub fn run_defaults(&self) -> RunDefaults {
        let family = RunDefaults {
            steps: self.family.default_steps,
            guidance: self.family.default_guidance,
            side: None,
            max_steps: None,
        };
        self.run_defaults.unwrap_or(family)
    }

    /// The model with `defaults` in place of its family's.
    pub fn with_run_defaults(mut self, defaults: RunDefaults) -> Self {
        self.run_defaults = Some(defaults);
        self
    }

    /// `_class_name` of `model_index.json`.
    pub fn pipeline_class(&self) -> &str {
        &self.pipeline_class
    }

    /// The model with its VAE taken from `dir`, a diffusers `AutoencoderKL` folder (`config.json`
    /// and its weights, as the hub's `madebyollin/sdxl-vae-fp16-fix`, or a pipeline's `vae/`).
    /// Refused, naming the folder, when it is not a VAE or its latents are not the denoiser's.
    pub fn with_vae(mut self, dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::invalid(
                "vae",
                format!(
                    "{}: no config.json there; pass a diffusers VAE folder (config.json + \
                 diffusion_pytorch_model.safetensors) or a hub repo id such as madebyollin/sdxl-vae-fp16-fix",
                    dir.display()
                ),
            ));
        }
        let raw: serde_json::Value = read_json(&config_path)?;
        let class = raw.get("_class_name").and_then(|v| v.as_str()).unwrap_or("AutoencoderKL");
        if class != "AutoencoderKL" {
            return Err(Error::invalid(
                "vae",
                format!("{}: its config.json describes a `{class}`, not an AutoencoderKL VAE", dir.display()),
            ));
        }
        let vae: sdgen_models::vae::VaeConfig = read_json(&config_path)?;
        let own: sdgen_models::vae::VaeConfig = self.config("vae", "config.json")?;
        let unet = self.denoiser_geometry()?;
        if vae.latent_channels != unet.in_channels || vae.scale_factor() != own.scale_factor() {
            return Err(Error::invalid(
                "vae",
                format!(
                    "{}: its latents have {} channels at 1/{} scale, but {}'s UNet works on {} channels at 1/{} \
                 (a VAE of another model family?)",
                    dir.display(),
                    vae.latent_channels,
                    vae.scale_factor(),
                    self.family.display,
                    unet.in_channels,
                    own.scale_factor()
                ),
            ));
        }
        self.overrides.retain(|(c, _)| c != "vae");
        self.overrides.push(("vae".to_string(), dir.to_path_buf()));
        self.weights("vae")?;
        Ok(self)
    }

    /// The model with `loras` fused into its components as they load, each
    /// checked against it first ([`lora::LoraSet::resolve`]): a LoRA for another family, or
    /// whose keys match none of its modules, is refused naming both. Replaces any LoRAs it had.
    pub fn with_loras(mut self, loras: &[lora::LoraFile]) -> Result<Self> {
        self.loras = Arc::default();
        self.loras = Arc::new(lora::LoraSet::resolve(&self, loras)?);
        Ok(self)
    }

    /// The LoRAs fused into the model's components.
    pub fn loras(&self) -> &lora::LoraSet {
        &self.loras
    }

    /// The model with its denoiser's linear weights quantised as they load (`--weights
    /// q8|q4|fp8`; `None`: as stored). Refused for a GGUF or an fp8 file, whose weights are
    /// quantised already.
    pub fn with_quantise(mut self, quantise: Option<quantise::Quantise>) -> Result<Self> {
        let quantised = self.checkpoint.as_ref().and_then(|c| c.quantised_kind().map(|k| (c, k)));
        if let (Some(q), Some((c, kind))) = (quantise, quantised) {
            return Err(Error::invalid(
                "weights",
                format!(
                    "{} is {kind}, quantised already: {WEIGHTS} {} quantises 16/32-bit weights as they load; leave it \
                     out (or give the model's 16-bit safetensors)",
                    c.path.display(),
                    q.name()
                ),
            ));
        }
        self.quantise = quantise;
        Ok(self)
    }

    /// `--weights`, if the model quantises its denoiser as it loads.
    pub fn quantise(&self) -> Option<quantise::Quantise> {
        self.quantise
    }

    /// The folder a component was taken from when it replaces the model's own (`--vae`).
    pub fn component_override(&self, component: &str) -> Option<&Path> {
        self.overrides.iter().find(|(c, _)| c == component).map(|(_, d)| d.as_path())
    }

    /// Whether the model has `component`: a single-file checkpoint holds it (or should, and
    /// [`ModelFolder::unavailable`] says why it cannot be loaded), or the folder's
    /// `model_index.json` names it (not null, as diffusers saves a pipeline built without it).
    pub fn has_component(&self, component: &str) -> bool {
        match &self.checkpoint {
            Some(c) => {
                c.component(component).is_some()
                    || c.unavailable(component).is_some()
                    || self.component_override(component).is_some()
            }
            None => self.components.iter().any(|n| n == component),
        }
    }

    /// Why a component the model has cannot be loaded (a single-file SD 3.5 whose T5 file or
    /// tokenizer is missing), as the error a run that needs it is refused with.
    pub fn unavailable(&self, component: &str) -> Option<Error> {
        let why = self.checkpoint.as_ref()?.unavailable(component)?;
        Some(Error::InvalidInput(why.to_string()))
    }

    /// A component's sub-folder, checked to exist.
    pub fn component_dir(&self, component: &str) -> Result<PathBuf> {
        if let Some(dir) = self.component_override(component) {
            return Ok(dir.to_path_buf());
        }
        let dir = self.root.join(component);
        if dir.is_dir() {
            Ok(dir)
        } else if let Some(c) = &self.checkpoint {
            Err(Error::BadModel(format!(
                "config folder {} (of {}) has no `{component}/` folder",
                self.root.display(),
                c.path.display()
            )))
        } else {
            Err(Error::BadModel(format!("model folder {} has no `{component}/` folder", self.root.display())))
        }
    }

    /// Parses `<component>/<file>`, once per open model: later calls get the parsed value.
    pub fn config<T: DeserializeOwned + Clone + Send + Sync + 'static>(
        &self,
        component: &str,
        file: &str,
    ) -> Result<T> {
        let path = self.component_dir(component)?.join(file);
        self.parse_once(&path, read_json)
    }

    /// `parse(path)`, once per open model and type: later calls get a clone of what it gave.
    /// For the model's files that are not plain JSON configs (the scheduler's, with Python's
    /// `Infinity`).
    pub fn parse_once<T: Clone + Send + Sync + 'static>(
        &self,
        path: &Path,
        parse: impl FnOnce(&Path) -> Result<T>,
    ) -> Result<T> {
        let key = (path.to_path_buf(), TypeId::of::<T>());
        if let Some(v) = self.parsed.values.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(v.downcast_ref::<T>().expect("keyed by its type").clone());
        }
        let value = parse(path)?;
        self.parsed.files.fetch_add(1, Ordering::Relaxed);
        self.parsed.values.lock().unwrap_or_else(|e| e.into_inner()).insert(key, Arc::new(value.clone()));
        Ok(value)
    }

    /// Files this open model (with its clones) has parsed: configs and weight headers, each
    /// counted once however often it is asked for.
    pub fn files_parsed(&self) -> usize {
        self.parsed.files.load(Ordering::Relaxed)
    }

    /// Finds and validates a component's weight files: the plain `*.safetensors` file, else a
    /// sharded index, else a precision variant (`*.fp16.safetensors`); for a single-file
    /// checkpoint, the component's share of it.
    pub fn weights(&self, component: &str) -> Result<ComponentWeights> {
        let key = (component.to_string(), self.component_override(component).map(Path::to_path_buf));
        let cached = self.parsed.weights.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        let mut weights = match cached {
            Some(w) => w,
            None => {
                let weights = self.read_weights(component)?;
                self.parsed.files.fetch_add(1, Ordering::Relaxed);
                self.parsed.weights.lock().unwrap_or_else(|e| e.into_inner()).insert(key, weights.clone());
                weights
            }
        };
        // The LoRAs are this model's, not the files': clones without them share the headers.
        weights.lora = self.loras.component(component);
        weights.quantise = match self.quantise {
            Some(q) if component == self.family.denoiser.component => {
                let plan = quantise::QuantisePlan::new(
                    self.family.denoiser.arch,
                    q,
                    weights.headers.iter().flat_map(|h| h.tensors.iter()),
                );
                // A single file's fused q/k/v is one stored tensor: one fp8 scale for its pieces.
                let view = weights.view.clone();
                let stored_as = |name: &str| {
                    let source = view.as_ref()?.source(name)?;
                    matches!(source.take, single_file::rules::Take::Chunk { .. }).then(|| source.original.clone())
                };
                Some(Arc::new(plan.with_shared_scales(stored_as)))
            }
            _ => None,
        };
        Ok(weights)
    }

    /// [`ModelFolder::weights`], read from the files.
    fn read_weights(&self, component: &str) -> Result<ComponentWeights> {
        if let Some(c) = self.checkpoint.as_ref().filter(|_| self.component_override(component).is_none()) {
            if let Some(e) = self.unavailable(component) {
                return Err(e);
            }
            let view = c.component(component).ok_or_else(|| {
                let held: Vec<&str> = c.components().map(|v| v.component).collect();
                Error::BadModel(format!(
                    "{} is a single-file {} checkpoint, which holds no `{component}` (it holds {})",
                    c.path.display(),
                    c.family.display,
                    held.join(", ")
                ))
            })?;
            // A model beside the checkpoint (SD 3.5's `text_encoders/`) is its own file.
            let (metadata, file_bytes) = if view.path == c.path {
                (c.header.metadata.clone(), c.header.file_bytes)
            } else {
                (Default::default(), std::fs::metadata(&view.path).map_err(|e| Error::io(&view.path, e))?.len())
            };
            let header = SafetensorsHeader { tensors: view.tensors.clone(), metadata, file_bytes };
            return Ok(ComponentWeights {
                files: vec![view.path.clone()],
                headers: vec![header],
                view: Some(view.clone()),
                lora: None,
                quantise: None,
            });
        }
        let dir = self.component_dir(component)?;
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        let plain = ["diffusion_pytorch_model.safetensors", "model.safetensors"];
        let files: Vec<PathBuf> = if let Some(n) = plain.iter().find(|n| names.iter().any(|x| x == *n)) {
            vec![dir.join(n)]
        } else if let Some(index) =
            names.iter().find(|n| n.ends_with(".safetensors.index.json") && !n.contains(".fp16."))
        {
            shard_files(&dir, &dir.join(index))?
        } else if let Some(n) = names.iter().find(|n| n.ends_with(".safetensors") && !n.starts_with('.')) {
            vec![dir.join(n)]
        } else {
            return Err(Error::BadModel(format!(
                "{} has no .safetensors weights (found: {}); only safetensors files are supported",
                dir.display(),
                if names.is_empty() { "nothing".to_string() } else { names.join(", ") }
            )));
        };
        let headers = files.iter().map(|f| SafetensorsHeader::read(f)).collect::<Result<Vec<_>>>()?;
        Ok(ComponentWeights { files, headers, view: None, lora: None, quantise: None })
    }
}

fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let v: serde_json::Value = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::BadModel(format!("{} has no `weight_map`", index.display())))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Reads a JSON file, naming it in any error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadModel(format!("{} is not valid: {e}", path.display())))
}

/// Turns a model-construction error (usually a missing tensor) into one naming the files and the
/// component it should have been.
pub fn model_error(weights: &ComponentWeights, what: &str, e: candle_core::Error) -> Error {
    Error::BadModel(format!("{}: {e}: not {what}?", weights.describe()))
}
