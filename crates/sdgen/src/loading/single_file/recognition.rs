//! Which family a single file is, and why, in words for messages.
//!
//! The tensors decide ([`super::super::family::SIGNATURES`], diffusers'
//! `infer_diffusers_model_type` as a table). Those markers are the real models' keys (SDXL's is
//! bigG's 10th layer), so a checkpoint of a non-standard size may match none; with a config folder
//! given (`--config-from`, diffusers' `from_single_file(config=...)`), the folder's family is
//! taken instead, as diffusers does, provided the file holds every model of that family's layout.
//! Its tensors are then checked against the folder's configs like any other.

use std::collections::BTreeMap;
use std::path::Path;

use super::super::family::{detect, recognise, FamilySpec, Recognised, FAMILIES, SIGNATURES};
use super::super::{read_json, TensorInfo};
use super::{model_config, supported};
use crate::error::field::CONFIG_FROM;
use crate::{Error, Result};

/// A recognised checkpoint: its family, and the clause that says why ("x.safetensors looks like
/// an SDXL base checkpoint (it has `…`)"), which messages about the file continue.
pub(super) struct Recognition {
    pub family: &'static FamilySpec,
    pub why: String,
}

/// Whether some tensor's name starts with `prefix`.
pub(super) fn has_prefix(tensors: &BTreeMap<String, TensorInfo>, prefix: &str) -> bool {
    tensors.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix))
}

/// Recognises the checkpoint at `path` from its tensors, else from the config folder.
pub(super) fn recognition(
    path: &Path,
    tensors: &BTreeMap<String, TensorInfo>,
    config_from: Option<&Path>,
) -> Result<Recognition> {
    let refusal = match recognise(tensors) {
        Recognised::Family(family) => {
            // The signature `recognise` stopped at: the first that holds.
            let why = SIGNATURES.iter().find(|s| s.markers.iter().all(|m| m.holds(tensors))).map_or_else(
                || format!("{} is a {} checkpoint", path.display(), family.display),
                |s| {
                    let evidence: Vec<String> = s.markers.iter().map(|m| m.describe(tensors)).collect();
                    format!("{} looks like {} (it has {})", path.display(), s.display, evidence.join(" and "))
                },
            );
            return Ok(Recognition { family, why });
        }
        Recognised::Unsupported { display, evidence, advice: Some(advice) } if config_from.is_none() => {
            return Err(Error::BadModel(format!(
                "{} looks like {display} (it has {evidence}) {advice}",
                path.display()
            )));
        }
        Recognised::Unsupported { display, evidence, .. } => {
            format!("looks like {display} (it has {evidence}), which this build cannot run")
        }
        Recognised::Unknown => {
            let first: Vec<String> = tensors.keys().take(3).map(|k| format!("`{k}`")).collect();
            format!(
                "is not a checkpoint this build recognises (its {} tensors begin {})",
                tensors.len(),
                if first.is_empty() { "with nothing".to_string() } else { first.join(", ") }
            )
        }
    };
    let Some((dir, family)) = config_from.and_then(|dir| Some((dir, family_of_folder(dir)?))) else {
        let hint = if config_from.is_none() {
            format!(
                " (one of another size than its family's standard is recognised by its configs: {CONFIG_FROM} DIR, \
                 diffusers' `config=`)"
            )
        } else {
            String::new()
        };
        return Err(Error::BadModel(format!(
            "{} {refusal}; single-file checkpoints it runs: {}{hint}",
            path.display(),
            supported()
        )));
    };
    let layout = family.single_file.expect("family_of_folder only returns families with a single-file layout");
    if let Some(c) = layout.components.iter().find(|c| !has_prefix(tensors, c.prefix)) {
        return Err(Error::BadModel(format!(
            "{} is not the {} checkpoint config folder {} is for: it has no {} (no `{}*` tensors); going by its \
             tensors, it {refusal}",
            path.display(),
            family.display,
            dir.display(),
            c.what,
            c.prefix
        )));
    }
    let why =
        format!("{} is, as config folder {} says, a {} checkpoint", path.display(), dir.display(), family.display);
    Ok(Recognition { family, why })
}

/// The family a config folder is for, judged as a diffusers folder is ([`detect`]): its
/// pipeline class, the components its `model_index.json` names, and the family's denoiser markers
/// among the tensors its denoiser's config implies (the manifest in place of the weights). This
/// tells SD 3.5 Large's configs from Medium's, which share a pipeline class. `None` when no
/// family fits, or the denoiser's config does not parse.
pub(super) fn config_family(dir: &Path) -> Option<&'static FamilySpec> {
    let index: serde_json::Value = read_json(&dir.join("model_index.json")).ok()?;
    let class = index.get("_class_name")?.as_str()?;
    FAMILIES.iter().find(|f| {
        let Some(layout) = f.single_file else { return false };
        let Some(denoiser) = layout.components.iter().find(|c| c.component == f.denoiser.component) else {
            return false;
        };
        let Some(expected) = model_config(dir, denoiser).ok().and_then(|c| c.expected().ok()) else {
            return false;
        };
        detect(class, |c| names(&index, c), |k| expected.iter().any(|e| e == k)).is_some_and(|d| d.name == f.name)
    })
}

/// The family a diffusers folder's `model_index.json` describes (pipeline class and components),
/// among those with single files.
pub(super) fn family_of_folder(dir: &Path) -> Option<&'static FamilySpec> {
    let index: serde_json::Value = read_json(&dir.join("model_index.json")).ok()?;
    let class = index.get("_class_name")?.as_str()?;
    FAMILIES.iter().find(|f| {
        f.single_file.is_some() && f.pipeline_classes.contains(&class) && component_mismatch(&index, f).is_none()
    })
}

/// Whether a `model_index.json` names `component` (maps it to a (library, class) pair, not null).
fn names(index: &serde_json::Value, component: &str) -> bool {
    index.get(component).and_then(|v| v.as_array()).is_some_and(|a| a.iter().all(|x| !x.is_null()))
}

/// What in a `model_index.json` contradicts `family`: a component it lacks or one it must not have.
pub(super) fn component_mismatch(index: &serde_json::Value, family: &FamilySpec) -> Option<String> {
    if let Some(c) = family.components.iter().find(|c| !names(index, c)) {
        return Some(format!("names no `{c}` (a {} pipeline has one)", family.display));
    }
    family
        .absent_components
        .iter()
        .find(|c| names(index, c))
        .map(|c| format!("names a `{c}` (a {} pipeline has none)", family.display))
}
