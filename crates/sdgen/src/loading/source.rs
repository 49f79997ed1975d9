//! Where a `--model` value points: a folder on disk, a named model or a hub repository id, and
//! the one table that maps names to repositories.

use std::path::{Path, PathBuf};

use super::family::{SD15, SDXL, SDXL_REFINER};
use super::{ModelFolder, OpenOptions};
use crate::hub::{fetch_pipeline, find_cached, DownloadProgress, HubOptions};
use crate::Result;

/// Named models and the hub repositories they stand for: each family row by its name.
pub const NAMED_MODELS: &[(&str, &str)] =
    &[(SDXL.name, SDXL.hub_repo), (SDXL_REFINER.name, SDXL_REFINER.hub_repo), (SD15.name, SD15.hub_repo)];

/// The named models, for messages: `sdxl, sdxl-refiner, sd15`.
pub fn named_model_list() -> String {
    NAMED_MODELS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// The model used when none is given: SDXL base, the everyday model.
pub const DEFAULT_MODEL: &str = SDXL.name;

/// A `--model` value, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A folder on disk.
    Path(PathBuf),
    /// A hub repository, with the name it was given by when it came from the table.
    Repo {
        /// `org/name`.
        repo: String,
        /// The table name (`sd15`), if any.
        name: Option<String>,
    },
}

impl ModelSource {
    /// Classifies a `--model` value: an existing path wins, then a table name, then anything
    /// shaped like `org/name`; everything else is a path that does not exist.
    pub fn parse(value: &str) -> Self {
        let path = Path::new(value);
        if path.exists() {
            return ModelSource::Path(path.to_path_buf());
        }
        if let Some((name, repo)) = NAMED_MODELS.iter().find(|(n, _)| n.eq_ignore_ascii_case(value.trim())) {
            return ModelSource::Repo { repo: repo.to_string(), name: Some(name.to_string()) };
        }
        let parts: Vec<&str> = value.split('/').collect();
        let looks_like_repo = parts.len() == 2
            && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
            && !value.starts_with('.');
        if looks_like_repo {
            ModelSource::Repo { repo: value.to_string(), name: None }
        } else {
            ModelSource::Path(path.to_path_buf())
        }
    }

    /// How the model is named in logs and metadata.
    pub fn label(&self) -> String {
        match self {
            ModelSource::Path(p) => p.display().to_string(),
            ModelSource::Repo { repo, .. } => repo.clone(),
        }
    }

    /// Opens the model: a folder directly, a repository from the Hugging Face cache, downloading
    /// what is missing, with the options from the environment ([`HubOptions::from_env`]) and no
    /// progress reports.
    pub fn open(&self) -> Result<ModelFolder> {
        self.open_with(&HubOptions::from_env(), &OpenOptions::default(), &mut |_| {})
    }

    /// Opens the model: a folder directly, a repository through [`fetch_pipeline`] (the `main`
    /// revision; only the cache when `hub.offline`), reporting download progress to `progress`.
    /// `options` apply to what is opened (e.g. the config folder of a single-file checkpoint).
    pub fn open_with(
        &self,
        hub: &HubOptions,
        options: &OpenOptions,
        progress: &mut dyn FnMut(&DownloadProgress),
    ) -> Result<ModelFolder> {
        match self {
            ModelSource::Path(p) => ModelFolder::open_with(p, options),
            ModelSource::Repo { repo, .. } => {
                ModelFolder::open_with(&fetch_pipeline(hub, repo, "main", progress)?, options)
            }
        }
    }
}

/// The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    HubOptions::from_env().cache_dir
}

/// The snapshot folder of `repo` at the `main` ref in the standard cache layout, if it holds
/// everything a run loads.
pub fn cached_snapshot(repo: &str) -> Option<PathBuf> {
    find_cached(&HubOptions::from_env(), repo, "main").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_values() {
        assert_eq!(
            ModelSource::parse("sd15"),
            ModelSource::Repo { repo: "stable-diffusion-v1-5/stable-diffusion-v1-5".into(), name: Some("sd15".into()) }
        );
        assert_eq!(
            ModelSource::parse(DEFAULT_MODEL),
            ModelSource::Repo { repo: "stabilityai/stable-diffusion-xl-base-1.0".into(), name: Some("sdxl".into()) }
        );
        assert_eq!(ModelSource::parse("org/model-x"), ModelSource::Repo { repo: "org/model-x".into(), name: None });
        assert_eq!(ModelSource::parse("./nope/x"), ModelSource::Path("./nope/x".into()));
        assert_eq!(ModelSource::parse("/abs/missing/dir"), ModelSource::Path("/abs/missing/dir".into()));
    }
}
