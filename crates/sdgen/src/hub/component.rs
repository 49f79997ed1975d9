//! Single-model repos: one diffusers model with `config.json` and its weights at the repo root,
//! no `model_index.json` (a VAE such as `madebyollin/sdxl-vae-fp16-fix`, for `--vae`).
//!
//! [`fetch_component`] works like [`fetch_pipeline`](super::fetch_pipeline) on one folder: the
//! same cache (shared with Python), the same no-request fast path ([`find_cached_component`]),
//! offline refusal, disk-space check, resume and token handling. It fetches `config.json` and
//! exactly one safetensors weight set, chosen by [`choose_weights`] (the requested variant, else
//! the plain `diffusion_pytorch_model.safetensors` before other names): such repos often also
//! carry pickles (`.bin`) and copies under other names (`sdxl_vae.safetensors`) that a run never
//! reads.

use std::path::{Path, PathBuf};

use super::cache::{index_shards, RepoCache};
use super::remote::Remote;
use super::select::{choose_weights, RemoteFile};
use super::{check_space, offline_refusal, DownloadProgress, Fetcher, HubOptions};
use crate::{Error, Result};

/// The one file a single-model repo must have at its root.
const CONFIG: &str = "config.json";

/// Checks that a snapshot of a single-model repo holds `config.json` and a complete safetensors
/// weight set at its root (every shard of a sharded index), without the network. Weights are
/// fetched last, so an interrupted download never passes. The error names the first missing file.
pub fn check_component_complete(snapshot: &Path, variant: Option<&str>) -> std::result::Result<(), String> {
    if !snapshot.join(CONFIG).is_file() {
        return Err(CONFIG.to_string());
    }
    let mut names: Vec<String> = std::fs::read_dir(snapshot)
        .map_err(|_| CONFIG.to_string())?
        .filter_map(|e| e.ok())
        // Dangling links (a blob deleted by hand) do not count.
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let weights = choose_weights(&refs, variant).map_err(|e| format!("*.safetensors ({e})"))?;
    let Some(first) = weights.first() else {
        return Err("*.safetensors".to_string());
    };
    if first.ends_with(".json") {
        for shard in index_shards(&snapshot.join(first))? {
            if !snapshot.join(&shard).is_file() {
                return Err(shard);
            }
        }
    }
    Ok(())
}

/// The snapshot of single-model `repo` at `revision` in the cache, if it is complete (see
/// [`check_component_complete`]); else the missing file (`config.json` when nothing is cached).
pub fn find_cached_component(hub: &HubOptions, repo: &str, revision: &str) -> std::result::Result<PathBuf, String> {
    let cache = RepoCache::new(&hub.cache_dir, repo);
    let commit = cache.commit(revision).ok_or_else(|| CONFIG.to_string())?;
    let snapshot = cache.snapshot(&commit);
    check_component_complete(&snapshot, hub.variant.as_deref())?;
    Ok(snapshot)
}

/// The root files of a single-model repo's listing a run needs: `config.json`, then one weight
/// set (a sharded set's index before its shards).
fn plan(listing: &[RemoteFile], repo: &str, variant: Option<&str>) -> Result<Vec<RemoteFile>> {
    // Only the root: subfolders of such repos hold other things (Flax copies, docs, samples).
    let root: Vec<&RemoteFile> = listing.iter().filter(|f| !f.path.contains('/')).collect();
    let Some(config) = root.iter().find(|f| f.path == CONFIG) else {
        let what = if root.iter().any(|f| f.path == "model_index.json") {
            "it holds a diffusers pipeline (model_index.json), not one model"
        } else {
            "a single model repo has config.json and .safetensors weights at its root"
        };
        return Err(Error::InvalidInput(format!(
            "not a single model repo: `{repo}` has no config.json at its root ({what})"
        )));
    };
    let names: Vec<&str> = root.iter().map(|f| f.path.as_str()).collect();
    let weights = choose_weights(&names, variant).map_err(|e| Error::BadModel(format!("model repo `{repo}`: {e}")))?;
    if weights.is_empty() {
        return Err(Error::BadModel(format!(
            "model repo `{repo}` has a config.json but no .safetensors weights at its root (it has {})",
            names.join(", ")
        )));
    }
    let mut out = vec![(*config).clone()];
    out.extend(
        weights.iter().map(|w| root.iter().find(|f| f.path == *w).map(|f| (*f).clone()).expect("chosen from names")),
    );
    Ok(out)
}

/// The snapshot folder of single-model `repo` (`config.json` and weights at its root) at
/// `revision`, downloading what is missing (see the module docs). Progress goes to `progress`.
pub fn fetch_component(
    hub: &HubOptions,
    repo: &str,
    revision: &str,
    progress: &mut dyn FnMut(&DownloadProgress),
) -> Result<PathBuf> {
    let cache = RepoCache::new(&hub.cache_dir, repo);
    let missing = match find_cached_component(hub, repo, revision) {
        Ok(snapshot) => return Ok(snapshot),
        Err(missing) => missing,
    };
    if hub.offline {
        return Err(offline_refusal(&cache, repo, &missing));
    }
    let remote = Remote::new(hub, repo, revision)?;
    let (commit, listing) = remote.list()?;
    let variant = hub.variant.as_deref();
    let plan = plan(&listing, repo, variant)?;
    check_space(hub, &cache, &commit, &plan, repo)?;

    let fetcher = Fetcher { remote: &remote, cache: &cache, commit: &commit, repo };
    // `plan` has config.json first and the weights last: an interrupted run never leaves a
    // snapshot that `check_component_complete` accepts.
    fetcher.fetch_all(&plan, progress)?;
    cache.set_ref(revision, &commit)?;
    let snapshot = cache.snapshot(&commit);
    check_component_complete(&snapshot, variant).map_err(|missing| {
        Error::BadModel(format!(
            "model repo `{repo}`: after downloading, `{missing}` is still missing from {}: the repo lacks it",
            snapshot.display()
        ))
    })?;
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(paths: &[&str]) -> Vec<RemoteFile> {
        paths.iter().map(|p| RemoteFile { path: p.to_string(), size_bytes: 1, blob: None }).collect()
    }

    fn planned(paths: &[&str], variant: Option<&str>) -> Result<Vec<String>> {
        Ok(plan(&listing(paths), "org/vae", variant)?.into_iter().map(|f| f.path).collect())
    }

    #[test]
    fn plans_config_and_one_weight_set() {
        let repo = [
            "README.md",
            "config.json",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors",
            "sdxl_vae.safetensors",
            "sdxl.vae.safetensors",
            "images/sample.png",
            "flax/diffusion_flax_model.safetensors",
        ];
        assert_eq!(planned(&repo, None).unwrap(), ["config.json", "diffusion_pytorch_model.safetensors"]);
        assert_eq!(planned(&repo, Some("fp16")).unwrap(), ["config.json", "diffusion_pytorch_model.safetensors"]);
        let with_fp16 =
            ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"];
        assert_eq!(
            planned(&with_fp16, Some("fp16")).unwrap(),
            ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
        );
        // Another name is taken only when it is all there is.
        assert_eq!(
            planned(&["config.json", "sdxl_vae.safetensors"], None).unwrap(),
            ["config.json", "sdxl_vae.safetensors"]
        );
    }

    #[test]
    fn refuses_repos_without_a_root_config_or_safetensors() {
        let err = planned(&["vae/config.json", "model.safetensors"], None).unwrap_err().to_string();
        assert!(
            err.contains("not a single model repo") && err.contains("org/vae") && err.contains("config.json"),
            "{err}"
        );
        let err = planned(&["model_index.json", "vae/config.json"], None).unwrap_err().to_string();
        assert!(err.contains("diffusers pipeline"), "{err}");
        let err = planned(&["config.json", "diffusion_pytorch_model.bin"], None).unwrap_err().to_string();
        assert!(err.contains("org/vae") && err.contains("diffusion_pytorch_model.bin"), "{err}");
        let err = planned(&["config.json", "README.md"], None).unwrap_err().to_string();
        assert!(err.contains("no .safetensors"), "{err}");
    }

    #[test]
    fn checks_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path();
        assert_eq!(check_component_complete(snap, None).unwrap_err(), "config.json");
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(snap.join("diffusion_pytorch_model.bin"), "pickle").unwrap();
        assert!(check_component_complete(snap, None).unwrap_err().starts_with("*.safetensors"));
        let index = r#"{"weight_map": {"a": "m-00001-of-00002.safetensors", "b": "m-00002-of-00002.safetensors"}}"#;
        std::fs::write(snap.join("m.safetensors.index.json"), index).unwrap();
        std::fs::write(snap.join("m-00001-of-00002.safetensors"), "x").unwrap();
        assert_eq!(check_component_complete(snap, None).unwrap_err(), "m-00002-of-00002.safetensors");
        std::fs::write(snap.join("m-00002-of-00002.safetensors"), "x").unwrap();
        check_component_complete(snap, None).unwrap();
    }
}
