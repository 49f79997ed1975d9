//! The standard Hugging Face cache layout, shared with the Python tools:
//! `{cache}/models--{org}--{name}/refs/{revision}` holds a commit, `snapshots/{commit}/{path}`
//! are relative symlinks into `blobs/{etag}`, and `blobs/{etag}.part` is a download in progress
//! (hf-hub's name; Python uses `.incomplete`).

use std::path::{Path, PathBuf};

use super::select::{choose_weights, UNUSED_COMPONENTS};
use crate::{Error, Result};

/// One repository's folder in the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    root: PathBuf,
}

impl RepoCache {
    /// The folder of model repo `repo` (`org/name`) under the hub cache `cache_dir`.
    pub fn new(cache_dir: &Path, repo: &str) -> Self {
        Self { root: cache_dir.join(format!("models--{}", repo.replace('/', "--"))) }
    }

    /// `models--org--name`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The commit `revision` points to: itself when it is a commit hash, else what
    /// `refs/{revision}` says.
    pub fn commit(&self, revision: &str) -> Option<String> {
        if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        Some(text.trim().to_string()).filter(|c| !c.is_empty())
    }

    /// Points `refs/{revision}` at `commit` (not for commit-hash revisions, which need no ref).
    pub fn set_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.root.join("refs").join(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, commit).map_err(|e| Error::io(&path, e))
    }

    /// `snapshots/{commit}`.
    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    /// `blobs/{etag}`.
    pub fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    /// `blobs/{etag}.part`: the partial download hf-hub resumes.
    pub fn partial(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.part"))
    }

    /// Makes `snapshots/{commit}/{path}` a relative symlink to `blobs/{etag}`, as downloads do,
    /// so a blob already fetched for another commit is not fetched again.
    pub fn link(&self, commit: &str, path: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.snapshot(commit).join(path);
        let parent = pointer.parent().expect("a file below the snapshot");
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        // From snapshots/{commit}/a/b up to the repo folder, then into blobs/.
        let depth = path.split('/').count() + 1;
        let target: PathBuf = std::iter::repeat_n("..", depth).collect::<PathBuf>().join("blobs").join(etag);
        let _ = std::fs::remove_file(&pointer);
        symlink(&target, &pointer).map_err(|e| Error::io(&pointer, e))?;
        Ok(pointer)
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    // Windows may refuse symlinks without developer mode; a copy keeps the layout usable.
    let resolved = link.parent().unwrap_or(Path::new(".")).join(target);
    std::fs::copy(resolved, link).map(|_| ())
}

/// Whether a component class carries no weights (schedulers, tokenizers, image processors).
pub fn is_weightless_class(class: &str) -> bool {
    ["Scheduler", "Tokenizer", "ImageProcessor", "FeatureExtractor"].iter().any(|k| class.contains(k))
}

/// The files a tokenizer class cannot do without (each entry: one of these), so a snapshot
/// missing one is not taken as complete.
fn tokenizer_files(class: &str) -> Option<&'static [&'static [&'static str]]> {
    if class.starts_with("CLIPTokenizer") {
        Some(&[&["vocab.json"], &["merges.txt"]])
    } else if class.starts_with("T5Tokenizer") {
        Some(&[&["spiece.model", "tokenizer.json"]])
    } else {
        None
    }
}

/// The components a run loads, from `model_index.json`'s text: every `name: [library, class]`
/// entry whose class is set, minus [`UNUSED_COMPONENTS`]; with each one's class.
pub fn pipeline_components(model_index: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let v: serde_json::Value = serde_json::from_str(model_index).map_err(|e| format!("not valid JSON: {e}"))?;
    let map = v.as_object().ok_or("not a JSON object")?;
    let mut out = Vec::new();
    for (name, entry) in map {
        if name.starts_with('_') || UNUSED_COMPONENTS.contains(&name.as_str()) {
            continue;
        }
        let Some([_, class]) = entry.as_array().map(Vec::as_slice) else { continue };
        if let Some(class) = class.as_str() {
            out.push((name.clone(), class.to_string()));
        }
    }
    Ok(out)
}

/// Checks that a snapshot holds everything a run loads, without the network: `model_index.json`,
/// each component's folder with its files, and for components with weights a complete
/// safetensors set (every shard of a sharded index). Downloads fetch weights last, so an
/// interrupted download never passes. The error names the first missing file.
pub fn check_complete(snapshot: &Path, variant: Option<&str>) -> std::result::Result<(), String> {
    let index_path = snapshot.join("model_index.json");
    let index = std::fs::read_to_string(&index_path).map_err(|_| "model_index.json".to_string())?;
    let components = pipeline_components(&index).map_err(|e| format!("a valid model_index.json ({e})"))?;
    for (component, class) in components {
        let dir = snapshot.join(&component);
        let mut names: Vec<String> = match std::fs::read_dir(&dir) {
            // Dangling links (a blob deleted by hand) do not count.
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => return Err(format!("{component}/")),
        };
        names.sort();
        if !names.iter().any(|n| n.ends_with(".json")) {
            return Err(format!("{component}/*.json"));
        }
        if let Some(need) = tokenizer_files(&class) {
            if let Some(absent) = need.iter().find(|alts| !alts.iter().any(|f| names.iter().any(|n| n == f))) {
                return Err(format!("{component}/{}", absent.join(" or ")));
            }
        }
        if is_weightless_class(&class) {
            continue;
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let weights = choose_weights(&refs, variant).map_err(|e| format!("{component}/*.safetensors ({e})"))?;
        let Some(first) = weights.first() else {
            return Err(format!("{component}/*.safetensors"));
        };
        if first.ends_with(".json") {
            for shard in index_shards(&dir.join(first))? {
                if !dir.join(&shard).is_file() {
                    return Err(format!("{component}/{shard}"));
                }
            }
        }
    }
    Ok(())
}

/// The shard files a safetensors index names.
pub fn index_shards(index: &Path) -> std::result::Result<Vec<String>, String> {
    let name = index.display().to_string();
    let text = std::fs::read_to_string(index).map_err(|_| name.clone())?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("a valid {name} ({e})"))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| format!("a `weight_map` in {name}"))?;
    let mut shards: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_components() {
        let index = r#"{"_class_name": "StableDiffusionPipeline", "requires_safety_checker": false,
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "feature_extractor": [null, null], "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", "PNDMScheduler"]}"#;
        let c = pipeline_components(index).unwrap();
        assert_eq!(c, [("scheduler".into(), "PNDMScheduler".into()), ("unet".into(), "UNet2DConditionModel".into())]);
        assert!(is_weightless_class("PNDMScheduler") && is_weightless_class("T5TokenizerFast"));
        assert!(!is_weightless_class("CLIPTextModel"));
    }

    #[test]
    fn links_are_relative_to_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(dir.path(), "org/name");
        std::fs::create_dir_all(cache.root().join("blobs")).unwrap();
        std::fs::write(cache.blob("abc"), b"hello").unwrap();
        let p = cache.link("c0ffee", "unet/config.json", "abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        assert_eq!(cache.commit("main"), None);
        cache.set_ref("main", "c0ffee").unwrap();
        assert_eq!(cache.commit("main").as_deref(), Some("c0ffee"));
    }
}
