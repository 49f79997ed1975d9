//! Where a `--model` value points: a folder on disk, a named model or a hub repository id, and
//! the one table that maps names to repositories.

use std::path::{Path, PathBuf};

use super::family::{FamilySpec, SD15, SD35_LARGE, SD35_MEDIUM, SDXL, SDXL_REFINER};
use super::{ModelFolder, OpenOptions};
use crate::hub::{fetch_pipeline, find_cached, DownloadProgress, HubOptions};
use crate::schedulers::SchedulerKind;
use crate::Result;

/// Run defaults that differ from the family's: a distilled model of the same architecture
/// (SD 3.5 Large Turbo is SD 3.5 Large's network, sampled in 4 steps without guidance).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunDefaults {
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// The most steps a distilled model is made for, where it has such a limit (SDXL-Turbo's 4,
    /// LCM's 8): past it a run takes longer and the image gets worse, not better, so the run
    /// warns.
    pub max_steps: Option<usize>,
    /// The image side in pixels, where the model was trained at another size than its
    /// denoiser's `sample_size` says (SDXL-Turbo: 512², in SDXL's 1024² UNet config); `None`:
    /// the config's.
    pub side: Option<usize>,
}

/// A named model: the name `--model` takes, the hub repository it stands for, its family, and
/// its own run defaults where they are not the family's.
#[derive(Debug, Clone, Copy)]
pub struct NamedModel {
    /// The name (`sdxl`, `sd35-large-turbo`).
    pub name: &'static str,
    /// `org/name` on the hub.
    pub repo: &'static str,
    /// The family its folder is.
    pub family: &'static FamilySpec,
    /// Defaults of its own, else the family's.
    pub defaults: Option<RunDefaults>,
    /// The scheduler its folder ships with, where not the family's, for `--list-models` (the run
    /// reads the folder's `scheduler_config.json` as always).
    pub scheduler: Option<SchedulerKind>,
}

impl NamedModel {
    /// A family row by its own name and repository.
    const fn row(family: &'static FamilySpec) -> Self {
        Self { name: family.name, repo: family.hub_repo, family, defaults: None, scheduler: None }
    }

    /// Its own defaults for `--list-models` (`1 step, guidance 0, 512², euler-a`), or "" where
    /// they are its family's.
    pub fn defaults_summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(d) = self.defaults {
            parts.push(format!("{} step{}, guidance {}", d.steps, if d.steps == 1 { "" } else { "s" }, d.guidance));
            parts.extend(d.side.map(|s| format!("{s}²")));
        }
        parts.extend(self.scheduler.map(|k| k.name().to_string()));
        parts.join(", ")
    }

    /// The named model whose repository is `repo` (any case), if any.
    pub fn by_repo(repo: &str) -> Option<&'static NamedModel> {
        NAMED_MODELS.iter().find(|m| m.repo.eq_ignore_ascii_case(repo))
    }
}

/// Named models: each family row by its name, and the distilled models of a row's architecture.
pub static NAMED_MODELS: &[NamedModel] = &[
    NamedModel::row(&SDXL),
    NamedModel::row(&SDXL_REFINER),
    NamedModel::row(&SD15),
    NamedModel::row(&SD35_LARGE),
    NamedModel {
        name: "sd35-large-turbo",
        repo: "stabilityai/stable-diffusion-3.5-large-turbo",
        family: &SD35_LARGE,
        // Stability's model card: 4 steps, guidance 0.
        defaults: Some(RunDefaults { steps: 4, guidance: 0.0, side: None, max_steps: None }),
        scheduler: None,
    },
    NamedModel::row(&SD35_MEDIUM),
    NamedModel {
        name: "sdxl-turbo",
        repo: "stabilityai/sdxl-turbo",
        family: &SDXL,
        // Stability's model card and diffusers' SDXL-Turbo guide: trained at 512² by adversarial
        // diffusion distillation, 1 step (up to 4) with guidance 0 (`guidance_scale=0.0`, no
        // CFG). Its folder is a StableDiffusionXLPipeline whose scheduler_config.json (as
        // published) is EulerAncestralDiscreteScheduler with `timestep_spacing: "trailing"`
        // (SDXL's other values: scaled_linear 0.00085–0.012, steps_offset 1, epsilon), so one
        // step starts at timestep 999. Assumed, not downloaded here: that its UNet config keeps
        // SDXL base's `sample_size` 128, hence the explicit 512².
        defaults: Some(RunDefaults { steps: 1, guidance: 0.0, side: Some(512), max_steps: Some(4) }),
        scheduler: Some(SchedulerKind::EulerAncestral),
    },
    NamedModel {
        name: "sd15-lcm",
        repo: "SimianLuo/LCM_Dreamshaper_v7",
        family: &SD15,
        // The LCM paper's model (Dreamshaper v7 distilled; its model card and diffusers' LCM
        // guide): 4 steps (1–8) at guidance 8, embedded into the UNet (`time_cond_proj_dim`
        // 256), not classifier-free. Its folder is a LatentConsistencyModelPipeline
        // (text_encoder, tokenizer, unet, vae, scheduler, safety_checker, feature_extractor) with
        // an LCMScheduler config: original_inference_steps 50, timestep_scaling 10,
        // scaled_linear 0.00085–0.012, set_alpha_to_one true, epsilon (as recalled from the hub;
        // LCMScheduler's defaults besides steps_offset 1).
        defaults: Some(RunDefaults { steps: 4, guidance: 8.0, side: None, max_steps: Some(8) }),
        scheduler: Some(SchedulerKind::Lcm),
    },
];

/// The named models, for messages: `sdxl, sdxl-refiner, sd15, …`.
pub fn named_model_list() -> String {
    NAMED_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// The model used when none is given: SDXL base, the everyday model.
pub const DEFAULT_MODEL: &str = SDXL.name;

/// The model of `--pro`: SD 3.5 Large, the seed's professional quality.
pub const PRO_MODEL: &str = SD35_LARGE.name;

/// A `--model` value, classified.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
        if let Some(m) = NAMED_MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(value.trim())) {
            return ModelSource::Repo { repo: m.repo.to_string(), name: Some(m.name.to_string()) };
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
                let folder = ModelFolder::open_with(&fetch_pipeline(hub, repo, "main", progress)?, options)?;
                // A distilled model's own defaults, however it was named (table name or repo id).
                Ok(match NamedModel::by_repo(repo).and_then(|m| m.defaults) {
                    Some(d) => folder.with_run_defaults(d),
                    None => folder,
                })
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
