//! LoRA repos: one or more `.safetensors` LoRAs at the repo root, no config (a LoRA is deltas
//! for another model's weights). [`fetch_lora`] takes diffusers' `save_lora_weights` name,
//! `pytorch_lora_weights.safetensors`, when the repo has it, else its only `.safetensors`; a repo
//! with several and none of that name is refused with the list (pass the file itself instead).
//! The same cache, offline refusal, disk-space check and resume as the other fetches.

use std::path::PathBuf;

use super::cache::RepoCache;
use super::remote::Remote;
use super::select::RemoteFile;
use super::{check_space, offline_refusal, DownloadProgress, Fetcher, HubOptions};
use crate::{Error, Result};

/// diffusers' LoRA file name (`LORA_WEIGHT_NAME_SAFE` in `loaders/lora_base.py`).
pub const LORA_WEIGHT_NAME: &str = "pytorch_lora_weights.safetensors";

/// The LoRA file among a repo root's file names.
fn choose<'a>(names: &[&'a str], repo: &str) -> Result<&'a str> {
    if let Some(n) = names.iter().find(|n| **n == LORA_WEIGHT_NAME) {
        return Ok(n);
    }
    let files: Vec<&str> = names.iter().copied().filter(|n| n.ends_with(".safetensors")).collect();
    match files[..] {
        [one] => Ok(one),
        [] => Err(Error::invalid(
            "lora",
            format!("`{repo}` has no .safetensors file at its root (it has {})", names.join(", ")),
        )),
        _ => Err(Error::invalid(
            "lora",
            format!(
                "`{repo}` has several LoRA files ({}) and no {LORA_WEIGHT_NAME}: download the one you mean and pass its path",
                files.join(", ")
            ),
        )),
    }
}

/// The LoRA file of `repo` at `revision`, from the cache or downloaded (see the module docs).
pub fn fetch_lora(
    hub: &HubOptions,
    repo: &str,
    revision: &str,
    progress: &mut dyn FnMut(&DownloadProgress),
) -> Result<PathBuf> {
    let cache = RepoCache::new(&hub.cache_dir, repo);
    if let Some(commit) = cache.commit(revision) {
        let snapshot = cache.snapshot(&commit);
        let names: Vec<String> = std::fs::read_dir(&snapshot)
            .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.path().is_file()))
            .into_iter()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        if let Ok(file) = choose(&refs, repo) {
            return Ok(snapshot.join(file));
        }
    }
    if hub.offline {
        return Err(offline_refusal(&cache, repo, "*.safetensors"));
    }
    let remote = Remote::new(hub, repo, revision)?;
    let (commit, listing) = remote.list()?;
    let root: Vec<&RemoteFile> = listing.iter().filter(|f| !f.path.contains('/')).collect();
    let names: Vec<&str> = root.iter().map(|f| f.path.as_str()).collect();
    let file = choose(&names, repo)?;
    let plan: Vec<RemoteFile> = root.iter().filter(|f| f.path == file).map(|f| (*f).clone()).collect();
    check_space(hub, &cache, &commit, &plan, repo)?;
    let fetcher = Fetcher { remote: &remote, cache: &cache, commit: &commit, repo };
    fetcher.fetch_all(&plan, progress)?;
    cache.set_ref(revision, &commit)?;
    Ok(cache.snapshot(&commit).join(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diffusers_name_wins_else_the_only_file() {
        assert_eq!(choose(&["a.safetensors", LORA_WEIGHT_NAME, "README.md"], "o/r").unwrap(), LORA_WEIGHT_NAME);
        assert_eq!(choose(&["style.safetensors", "README.md"], "o/r").unwrap(), "style.safetensors");
        let e = choose(&["a.safetensors", "b.safetensors"], "o/r").unwrap_err().to_string();
        assert!(e.contains("a.safetensors, b.safetensors"), "{e}");
        let e = choose(&["README.md"], "o/r").unwrap_err().to_string();
        assert!(e.contains("no .safetensors"), "{e}");
    }
}
