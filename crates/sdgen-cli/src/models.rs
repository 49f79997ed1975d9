//! `generate --list-models`: the named models, what they are, and whether they are downloaded.

use std::path::Path;
use std::process::ExitCode;

use sdgen::hub::HubOptions;
use sdgen::loading::NAMED_MODELS;

/// Prints the named-model table: name, hub repository, family, and its size in the local cache
/// (or that it is not downloaded yet).
pub fn list(hub: &HubOptions) -> anyhow::Result<ExitCode> {
    println!("{:<18} {:<46} {:<28} {:<34} on this machine", "name", "repository", "family", "own defaults");
    for m in NAMED_MODELS {
        let (name, repo, family, defaults) = (m.name, m.repo, m.family.display, m.defaults_summary());
        let cached = match sdgen::hub::find_cached(hub, repo, "main") {
            Ok(dir) => format!("downloaded, {}", sdgen_memory::plan::format_bytes(folder_bytes(&dir))),
            Err(_) => "not downloaded".to_string(),
        };
        println!("{name:<18} {repo:<46} {family:<28} {defaults:<34} {cached}");
    }
    println!("\nAny hub repository id (org/name), diffusers folder or .safetensors checkpoint works as --model too.");
    Ok(ExitCode::SUCCESS)
}

/// Bytes of the files under `dir`, through the cache's symlinks to its blobs.
fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => folder_bytes(&path),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        })
        .sum()
}
