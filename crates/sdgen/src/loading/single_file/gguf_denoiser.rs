//! A GGUF denoiser as a single-file checkpoint. city96's conversions (the ones ComfyUI and
//! diffusers' `from_single_file(..., quantization_config=GGUFQuantizationConfig())` load) hold
//! the denoiser alone, under the original checkpoint's names without `model.diffusion_model.`
//! (`joint_blocks.0.x_block.attn.qkv.weight`), with `general.architecture` `sd3`, `sdxl` or `sd1`.
//! So the file is read as the denoiser's share of a single-file checkpoint — the same renaming
//! rules, shape and completeness checks, Large told from Medium by its weights — and every other
//! model of the pipeline (VAE, text encoders), with the configs and tokenizers, comes from the
//! diffusers folder given with it (`--config-from DIR`), as diffusers builds such a pipeline
//! (`from_pretrained(repo, transformer=…)`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::super::family::{recognise, FamilySpec, Recognised, FAMILIES};
use super::super::gguf;
use super::{check_config_dir, pipeline_class, recognition, view, Checkpoint, SafetensorsHeader};
use crate::error::field::{CONFIG_FROM, NO_T5};
use crate::{Error, Result};

/// The GGUF architectures this build runs, with the families they belong to, for messages.
fn architectures() -> String {
    let mut seen: Vec<String> = Vec::new();
    for f in FAMILIES {
        if let Some(l) = f.single_file {
            let entry = format!("`{}` ({})", l.gguf_architecture, f.display);
            if !seen.iter().any(|s| s.starts_with(&format!("`{}`", l.gguf_architecture))) {
                seen.push(entry);
            }
        }
    }
    seen.join(", ")
}

impl Checkpoint {
    /// Opens the GGUF denoiser at `path` with the rest of its pipeline from `config_from`.
    pub fn open_gguf(path: &Path, config_from: Option<&Path>) -> Result<Self> {
        let file = gguf::read(path)?;
        let arch = file.metadata.get(gguf::ARCHITECTURE_KEY).cloned();
        let families: Vec<&'static FamilySpec> = FAMILIES
            .iter()
            .filter(|f| f.single_file.is_some_and(|l| arch.as_deref().is_none_or(|a| a == l.gguf_architecture)))
            .collect();
        let what = match (&arch, families.first()) {
            (Some(a), None) => {
                return Err(Error::InvalidInput(format!(
                    "{} is a GGUF of a `{a}` model (its {}), not an image denoiser this build runs: the GGUF files it \
                     reads are the denoiser conversions of {}",
                    path.display(),
                    gguf::ARCHITECTURE_KEY,
                    architectures()
                )))
            }
            (Some(a), Some(f)) => {
                format!("a GGUF {} denoiser (`{a}`)", f.display.split(" (").next().unwrap_or(f.display))
            }
            (None, _) => "a GGUF without a `general.architecture`".to_string(),
        };
        let Some(config_dir) = config_from else {
            return Err(Error::InvalidInput(format!(
                "{} is {what}: a GGUF holds only the denoiser, so the rest of the pipeline (configs, tokenizers, VAE \
                 and text encoders) comes from a diffusers folder of the same model: pass one to {CONFIG_FROM} DIR \
                 (e.g. the hub's {} downloaded)",
                path.display(),
                families.first().map_or("model", |f| f.hub_repo)
            )));
        };
        let family = recognition::config_family(config_dir)
            .or_else(|| recognition::family_of_folder(config_dir))
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "config folder {} is not a diffusers folder of a model this build runs (its model_index.json and \
                     configs), which {} needs for the rest of its pipeline",
                    config_dir.display(),
                    path.display()
                ))
            })?;
        let layout = family.single_file.expect("config families have single-file layouts");
        if !families.iter().any(|f| f.name == family.name) {
            return Err(Error::InvalidInput(format!(
                "{} is {what}, but config folder {} is {}'s (`{}`): give a folder of the same model",
                path.display(),
                config_dir.display(),
                family.display,
                layout.gguf_architecture
            )));
        }
        let denoiser = layout
            .components
            .iter()
            .find(|c| c.component == family.denoiser.component)
            .expect("every layout holds its family's denoiser");
        // The names as a whole checkpoint has them, so the family's renaming rules apply.
        let tensors: BTreeMap<String, super::TensorInfo> = file
            .tensors
            .iter()
            .map(|(k, v)| {
                let name = if k.starts_with(denoiser.prefix) { k.clone() } else { format!("{}{k}", denoiser.prefix) };
                (name, v.clone())
            })
            .collect();
        // Large and Medium share `sd3`: their weights tell them apart (an MMDiT-X has `attn2`).
        match recognise(&tensors) {
            Recognised::Family(f) if f.name != family.name && f.single_file.is_some() => {
                return Err(Error::InvalidInput(format!(
                    "{} is {}'s denoiser (by its tensors), but config folder {} is {}'s: give a folder of the same \
                     model",
                    path.display(),
                    f.display,
                    config_dir.display(),
                    family.display
                )))
            }
            Recognised::Unsupported { display, evidence, advice: None } => {
                return Err(Error::InvalidInput(format!(
                    "{} looks like {display} (it has {evidence}), which this build cannot run",
                    path.display()
                )))
            }
            _ => {}
        }
        let pipeline_class = pipeline_class(config_dir, family, path)?;
        check_config_dir(config_dir, family, layout)?;
        let why = format!("{} is {what}", path.display());
        let denoiser_view = view(path, &tensors, denoiser.prefix, config_dir, family, denoiser, &why)?;
        let mut from_config_dir = Vec::new();
        let mut unavailable = Vec::new();
        for c in layout.components.iter().filter(|c| c.component != denoiser.component) {
            if config_dir.join(c.component).join("config.json").is_file() && has_weights(&config_dir.join(c.component))
            {
                from_config_dir.push(c.component);
                continue;
            }
            let why = format!(
                "config folder {} has no `{}/` weights: {} holds only the denoiser, and its {} comes from that folder",
                config_dir.display(),
                c.component,
                path.display(),
                c.what
            );
            match family.encoders.iter().find(|e| e.component == c.component) {
                Some(e) if e.optional => unavailable.push((c.component, format!("{why} (or run without it: {NO_T5})"))),
                _ => return Err(Error::InvalidInput(why)),
            }
        }
        let header = SafetensorsHeader { tensors, metadata: file.metadata, file_bytes: file.file_bytes };
        Ok(Self {
            path: path.to_path_buf(),
            family,
            config_dir: config_dir.to_path_buf(),
            pipeline_class,
            header,
            components: vec![Arc::new(denoiser_view)],
            unavailable,
            from_config_dir,
        })
    }
}

/// Whether a component folder holds safetensors weights.
fn has_weights(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".safetensors")))
        .unwrap_or(false)
}
