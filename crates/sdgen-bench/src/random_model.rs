//! A model folder at a family's real size with seeded random weights: the family's bundled
//! configs and tokenizer (the same bytes the engine uses for single-file checkpoints, so there is
//! one copy of each hub config), and each component's tensors exactly as its model code asks for
//! them (names, shapes), drawn per the layers' own init hints and stored in the run dtype. Speed
//! and memory do not depend on the weight values, so this benchmarks real sizes with no download.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use sdgen::loading::family::{DenoiserArch, FamilySpec, TextEncoderArch, FAMILIES};
use sdgen::loading::single_file::defaults::BundledFile;
use sdgen_models::clip::{ClipTextConfig, ClipTextModel};
use sdgen_models::mmdit::{MMDiTConfig, SD3Transformer2DModel};
use sdgen_models::t5::{T5Config, T5EncoderModel};
use sdgen_models::unet::{UNet2DConditionModel, UNetConfig};
use sdgen_models::vae::{AutoencoderKL, VaeConfig};

/// The name `ClipTextModel::new` probes to choose the hub's `text_model.`-prefixed names over
/// transformers 5's bare ones; answering yes makes the random folder look like the hub's.
const CLIP_HUB_PROBE: &str = "text_model.embeddings.token_embedding.weight";

/// Hands out a fresh random tensor for every name the model asks for, and remembers it.
struct RandomBackend {
    tensors: Mutex<HashMap<String, Tensor>>,
}

impl SimpleBackend for RandomBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = match h {
            Init::Const(v) => (Tensor::ones(s, DType::F32, dev)? * v)?,
            Init::Randn { mean, stdev } => Tensor::randn(mean as f32, stdev as f32, s, dev)?,
            Init::Uniform { lo, up } => Tensor::rand(lo as f32, up as f32, s, dev)?,
            Init::Kaiming { .. } => {
                // Kaiming-normal with gain 1 over the fan-in, as the layers' default init.
                let dims = s.dims();
                let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
                Tensor::randn(0f32, (1.0 / fan_in as f64).sqrt() as f32, s, dev)?
            }
        }
        .to_dtype(dtype)?;
        self.tensors.lock().expect("not poisoned").insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // Every other probe (the VAE's legacy attention names, ...) must answer no, so the model
        // asks for its current diffusers names, with shapes.
        name == CLIP_HUB_PROBE
    }
}

/// A borrowed backend, so the tensors can be taken back after the model is built.
struct RefBackend<'a>(&'a RandomBackend);

impl SimpleBackend for RefBackend<'_> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Saves the tensors to `path` through a side file renamed into place, so an interrupted write
/// never leaves a file that a later run would take for a finished one. Returns the bytes.
fn save(backend: RandomBackend, path: &Path) -> anyhow::Result<u64> {
    let tensors = backend.tensors.into_inner().expect("not poisoned");
    let tensors: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?))).collect::<candle_core::Result<_>>()?;
    let bytes = tensors.values().map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum();
    let partial = path.with_extension("safetensors.partial");
    candle_core::safetensors::save(&tensors, &partial).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming {} into place", partial.display()))?;
    Ok(bytes)
}

/// Which model code a component's tensors come from.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// CLIP text encoder; `projection` for `CLIPTextModelWithProjection` (SDXL's bigG).
    Clip {
        projection: bool,
    },
    /// T5 encoder (SD 3's `text_encoder_3`).
    T5,
    UNet,
    /// SD 3's MMDiT.
    MMDiT,
    /// Encoder and decoder both: image-to-image and the refiner encode with the VAE.
    Vae,
}

/// One component with weights: its folder, its weights file (the hub's name) and its model.
struct Component {
    name: &'static str,
    file: &'static str,
    kind: Kind,
}

const VAE: Component = Component { name: "vae", file: DIFFUSERS_WEIGHTS, kind: Kind::Vae };

/// diffusers' weights file name (transformers' models use `model.safetensors`).
const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// The components with weights of `family`'s folder, in load order as the row lists them: its
/// text encoders, its denoiser, the VAE.
fn components(family: &FamilySpec) -> Vec<Component> {
    let encoders = family.encoders.iter().map(|e| match e.arch {
        TextEncoderArch::Clip => {
            Component { name: e.component, file: "model.safetensors", kind: Kind::Clip { projection: e.projection } }
        }
        TextEncoderArch::T5 => Component { name: e.component, file: "model.safetensors", kind: Kind::T5 },
    });
    let denoiser = match family.denoiser.arch {
        DenoiserArch::UNet2DCondition => {
            Component { name: family.denoiser.component, file: DIFFUSERS_WEIGHTS, kind: Kind::UNet }
        }
        DenoiserArch::SD3Transformer2D => {
            Component { name: family.denoiser.component, file: DIFFUSERS_WEIGHTS, kind: Kind::MMDiT }
        }
    };
    encoders.chain([denoiser, VAE]).collect()
}

/// The bench's own folders for the rows without single-file checkpoints (and so no bundled files).
const OWN_FILES: &[(&str, &[BundledFile])] =
    &[("sd35-large", &crate::sd35_files::SD35_LARGE), ("sd35-medium", &crate::sd35_files::SD35_MEDIUM)];

/// The row of `family` and its non-weight files: the bench's own where it has them (SD 3.5's:
/// the engine's single-file defaults leave out the T5 tokenizer, which a folder needs), else
/// those of its single-file checkpoints.
fn layout(family: &str) -> Option<(&'static FamilySpec, &'static [BundledFile])> {
    let row = FamilySpec::by_name(family)?;
    let own = OWN_FILES.iter().find(|(name, _)| *name == family).map(|(_, files)| *files);
    Some((row, own.or_else(|| row.single_file.map(|s| s.defaults))?))
}

/// The families [`write_model`] knows: every row with bundled files or files of the bench's own.
pub fn families() -> Vec<&'static str> {
    FAMILIES.iter().filter(|f| layout(f.name).is_some()).map(|f| f.name).collect()
}

/// The components with weights that `family`'s folder holds (empty for an unknown family).
pub fn weighted_components(family: &str) -> Vec<&'static str> {
    layout(family).map_or_else(Vec::new, |(row, _)| components(row).iter().map(|c| c.name).collect())
}

fn build(component: &Component, dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<RandomBackend> {
    let config_path = dir.join(component.name).join("config.json");
    let config = std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let parse_error = || format!("parsing {}", config_path.display());
    let b = RandomBackend { tensors: Mutex::new(HashMap::new()) };
    {
        let vb = VarBuilder::from_backend(Box::new(RefBackend(&b)), dtype, device.clone());
        match component.kind {
            Kind::Clip { projection } => {
                let cfg: ClipTextConfig = serde_json::from_str(&config).with_context(parse_error)?;
                drop(ClipTextModel::new(&cfg, projection, vb)?);
            }
            Kind::T5 => {
                let cfg: T5Config = serde_json::from_str(&config).with_context(parse_error)?;
                drop(T5EncoderModel::new(&cfg, vb)?);
                // transformers saves the tied token embedding as `shared.weight`.
                let mut tensors = b.tensors.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(table) = tensors.remove("encoder.embed_tokens.weight") {
                    tensors.insert("shared.weight".into(), table);
                }
            }
            Kind::UNet => {
                let cfg: UNetConfig = serde_json::from_str(&config).with_context(parse_error)?;
                drop(UNet2DConditionModel::new(&cfg, vb)?);
            }
            Kind::MMDiT => {
                let cfg: MMDiTConfig = serde_json::from_str(&config).with_context(parse_error)?;
                drop(SD3Transformer2DModel::new(&cfg, vb)?);
                // diffusers saves the position table (a persistent buffer), which the model only
                // computes when it is absent: write it, so the folder is diffusers' layout and
                // what is exported from it is too (SAI's and city96's files hold `pos_embed`).
                let (dim, max) = (cfg.inner_dim(), cfg.pos_embed_max_size);
                let table = sdgen_models::mmdit::sincos_pos_table(dim, max, cfg.sample_size / cfg.patch_size, device)?;
                let table = table.unsqueeze(0)?.to_dtype(dtype)?;
                b.tensors.lock().unwrap_or_else(|e| e.into_inner()).insert("pos_embed.pos_embed".into(), table);
            }
            Kind::Vae => {
                let cfg: VaeConfig = serde_json::from_str(&config).with_context(parse_error)?;
                drop(AutoencoderKL::new(&cfg, true, true, vb)?);
            }
        }
    }
    Ok(b)
}

/// Writes `family` (`sd15`, `sdxl`, `sdxl-refiner`) at its real size into `dir`: the bundled
/// configs and tokenizer files (a few MB), and each component's weights unless its file is
/// already there. A folder that is already a whole model (its `model_index.json` written last,
/// by this or by diffusers) is left exactly as it is: a model of another layout (sharded weights,
/// its own tokenizers) must not be overwritten or mixed with ours. Returns the bytes of weights
/// written (0 when nothing was).
pub fn write_model(family: &str, dir: &Path, dtype: DType, device: &Device, seed: u64) -> anyhow::Result<u64> {
    let Some((row, files)) = layout(family) else {
        bail!("--family {family}: sdgen-bench can write {}", families().join(", "));
    };
    const INDEX: &str = "model_index.json";
    if dir.join(INDEX).is_file() {
        return Ok(0);
    }
    // The index last, so an interrupted write is completed by the next run.
    let (index, files): (Vec<_>, Vec<_>) = files.iter().partition(|(name, _)| *name == INDEX);
    for (name, bytes) in files {
        let path = dir.join(name);
        let parent = path.parent().expect("a component folder");
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    // CUDA seeds its generator; candle cannot seed the CPU one (the CPU weights vary run to run,
    // which does not change a benchmark).
    let _ = device.set_seed(seed);
    let mut total = 0;
    for component in &components(row) {
        let path = dir.join(component.name).join(component.file);
        if path.is_file() {
            continue;
        }
        let b =
            build(component, dir, dtype, device).with_context(|| format!("building {family}'s {}", component.name))?;
        total += save(b, &path)?;
    }
    for (name, bytes) in index {
        std::fs::write(dir.join(name), bytes).with_context(|| format!("writing {}", dir.join(name).display()))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family the bench writes gets each tokenizer folder its `model_index.json` names and
    /// each weighted component's config (SD 3.5's `tokenizer_3/` went missing once, and only a
    /// GPU run found out).
    #[test]
    fn every_tokenizer_and_config_the_index_needs_is_written() {
        for family in families() {
            let (_, files) = layout(family).unwrap();
            let has = |name: &str| files.iter().any(|(file, _)| file.starts_with(name));
            let index = files.iter().find(|(name, _)| *name == "model_index.json").expect("an index");
            let index: serde_json::Value = serde_json::from_slice(index.1).unwrap();
            for (component, value) in index.as_object().unwrap() {
                if component.starts_with("tokenizer") && !value[0].is_null() {
                    assert!(has(&format!("{component}/")), "{family}: nothing in {component}/");
                }
            }
            for component in weighted_components(family) {
                assert!(has(&format!("{component}/config.json")), "{family}: no {component}/config.json");
            }
        }
    }

    /// The MMDiT and T5 are written with the names diffusers and transformers save: the MMDiT's
    /// position table (the sincos table the model computes without it) and T5's `shared.weight`,
    /// so what is exported from the folder reads in diffusers (which requires `pos_embed`).
    #[test]
    fn mmdit_and_t5_are_written_as_diffusers_saves_them() {
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-sd35-large");
        let (row, _) = layout("sd35-large").unwrap();
        for component in components(row).iter().filter(|c| matches!(c.kind, Kind::MMDiT | Kind::T5)) {
            let b = build(component, &tiny, DType::F32, &Device::Cpu).unwrap();
            let tensors = b.tensors.into_inner().unwrap();
            let written = |name: &str| tensors.get(name).map(|t| t.dims().to_vec());
            match component.kind {
                Kind::MMDiT => {
                    let cfg: MMDiTConfig =
                        serde_json::from_str(&std::fs::read_to_string(tiny.join("transformer/config.json")).unwrap())
                            .unwrap();
                    let side = cfg.pos_embed_max_size;
                    assert_eq!(written("pos_embed.pos_embed"), Some(vec![1, side * side, cfg.inner_dim()]));
                }
                _ => {
                    assert!(written("shared.weight").is_some() && written("encoder.embed_tokens.weight").is_none());
                }
            }
        }
    }
}
