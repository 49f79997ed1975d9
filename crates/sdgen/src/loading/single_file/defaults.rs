//! The configuration folder a single-file checkpoint runs with when none is given: the family's
//! real hub files, compiled into the binary and written out once to a content-addressed folder in
//! the user's cache (`$XDG_CACHE_HOME/sdgen/`, else `~/.cache/sdgen/`, else the temp dir), so the
//! rest of the engine reads them like any diffusers folder.
//!
//! SD 1.5's are stable-diffusion-v1-5/stable-diffusion-v1-5's `unet/`, `vae/`, `text_encoder/`
//! configs, `scheduler/scheduler_config.json`, and the CLIP tokenizer (`tokenizer/`). SDXL's are
//! stabilityai/stable-diffusion-xl-base-1.0's (`sdxl/`) and -refiner-1.0's (`sdxl-refiner/`,
//! only the files that differ from the base's: `model_index.json` and the UNet; the refiner's
//! second text encoder, VAE, scheduler and `tokenizer_2` are the base's). Every CLIP tokenizer
//! of these repositories has the same vocab.json and merges.txt (1.5 MB): the committed copy the
//! tokenizer tests use (`testdata/clip-tokenizer/`). SDXL's `tokenizer_2` differs only in its
//! two config files, which pad with `!` (`testdata/clip-tokenizer/variants/sdxl2/`). Bundled
//! rather than fetched because a single-file checkpoint is usually all a user has (A1111 and
//! ComfyUI ship these files for the same reason), they cost 0.04% of the 4 GB they come with,
//! and they keep single files working offline.
//!
//! SD 3.5's are stabilityai/stable-diffusion-3.5-large's and -medium's (`sd35/`: the shared
//! encoder, VAE and scheduler configs, and each size's `model_index.json` and transformer
//! config), with SDXL's two CLIP tokenizers (SD 3.5's are the same files). Its T5 tokenizer
//! (`tokenizer_3/`, a 2.4 MB sentencepiece model) is not bundled: this build has no copy of it,
//! so a single-file SD 3.5 runs T5 with a config folder that has one (`--config-from`), or
//! without T5 (`--no-t5`), and says so.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One bundled file: its path in the folder and its bytes.
pub type BundledFile = (&'static str, &'static [u8]);

macro_rules! here {
    ($path:literal) => {
        include_bytes!(concat!("sd15/", $path))
    };
}
macro_rules! clip_tokenizer {
    ($file:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/clip-tokenizer/", $file))
    };
}
macro_rules! sdxl {
    ($path:literal) => {
        include_bytes!(concat!("sdxl/", $path))
    };
}

/// SD 1.5's folder, less the weights.
pub const SD15: &[BundledFile] = &[
    ("model_index.json", here!("model_index.json")),
    ("scheduler/scheduler_config.json", here!("scheduler/scheduler_config.json")),
    ("text_encoder/config.json", here!("text_encoder/config.json")),
    ("tokenizer/merges.txt", clip_tokenizer!("merges.txt")),
    ("tokenizer/special_tokens_map.json", here!("tokenizer/special_tokens_map.json")),
    ("tokenizer/tokenizer_config.json", here!("tokenizer/tokenizer_config.json")),
    ("tokenizer/vocab.json", clip_tokenizer!("vocab.json")),
    ("unet/config.json", here!("unet/config.json")),
    ("vae/config.json", here!("vae/config.json")),
];

/// SDXL base's folder (stabilityai/stable-diffusion-xl-base-1.0), less the weights.
pub const SDXL: &[BundledFile] = &[
    ("model_index.json", sdxl!("model_index.json")),
    ("scheduler/scheduler_config.json", sdxl!("scheduler/scheduler_config.json")),
    ("text_encoder/config.json", sdxl!("text_encoder/config.json")),
    ("text_encoder_2/config.json", sdxl!("text_encoder_2/config.json")),
    ("tokenizer/merges.txt", clip_tokenizer!("merges.txt")),
    ("tokenizer/special_tokens_map.json", sdxl!("tokenizer/special_tokens_map.json")),
    ("tokenizer/tokenizer_config.json", sdxl!("tokenizer/tokenizer_config.json")),
    ("tokenizer/vocab.json", clip_tokenizer!("vocab.json")),
    ("tokenizer_2/merges.txt", clip_tokenizer!("merges.txt")),
    ("tokenizer_2/special_tokens_map.json", sdxl!("tokenizer_2/special_tokens_map.json")),
    ("tokenizer_2/tokenizer_config.json", sdxl!("tokenizer_2/tokenizer_config.json")),
    ("tokenizer_2/vocab.json", clip_tokenizer!("vocab.json")),
    ("unet/config.json", sdxl!("unet/config.json")),
    ("vae/config.json", sdxl!("vae/config.json")),
];

/// SDXL refiner's folder (stabilityai/stable-diffusion-xl-refiner-1.0), less the weights.
pub const SDXL_REFINER: &[BundledFile] = &[
    ("model_index.json", include_bytes!("sdxl-refiner/model_index.json")),
    ("scheduler/scheduler_config.json", sdxl!("scheduler/scheduler_config.json")),
    ("text_encoder_2/config.json", sdxl!("text_encoder_2/config.json")),
    ("tokenizer_2/merges.txt", clip_tokenizer!("merges.txt")),
    ("tokenizer_2/special_tokens_map.json", sdxl!("tokenizer_2/special_tokens_map.json")),
    ("tokenizer_2/tokenizer_config.json", sdxl!("tokenizer_2/tokenizer_config.json")),
    ("tokenizer_2/vocab.json", clip_tokenizer!("vocab.json")),
    ("unet/config.json", include_bytes!("sdxl-refiner/unet/config.json")),
    ("vae/config.json", sdxl!("vae/config.json")),
];

macro_rules! sd35 {
    ($path:expr) => {
        include_bytes!(concat!("sd35/", $path))
    };
}

/// An SD 3.5 folder less the weights and the T5 tokenizer: `$size`'s own `model_index.json` and
/// transformer config, then what both sizes share.
macro_rules! sd35_folder {
    ($size:literal) => {
        &[
            ("model_index.json", sd35!(concat!($size, "/model_index.json"))),
            ("scheduler/scheduler_config.json", sd35!("scheduler/scheduler_config.json")),
            ("text_encoder/config.json", sd35!("text_encoder/config.json")),
            ("text_encoder_2/config.json", sd35!("text_encoder_2/config.json")),
            ("text_encoder_3/config.json", sd35!("text_encoder_3/config.json")),
            ("tokenizer/merges.txt", clip_tokenizer!("merges.txt")),
            ("tokenizer/special_tokens_map.json", sdxl!("tokenizer/special_tokens_map.json")),
            ("tokenizer/tokenizer_config.json", sdxl!("tokenizer/tokenizer_config.json")),
            ("tokenizer/vocab.json", clip_tokenizer!("vocab.json")),
            ("tokenizer_2/merges.txt", clip_tokenizer!("merges.txt")),
            ("tokenizer_2/special_tokens_map.json", sdxl!("tokenizer_2/special_tokens_map.json")),
            ("tokenizer_2/tokenizer_config.json", sdxl!("tokenizer_2/tokenizer_config.json")),
            ("tokenizer_2/vocab.json", clip_tokenizer!("vocab.json")),
            ("transformer/config.json", sd35!(concat!($size, "/transformer/config.json"))),
            ("vae/config.json", sd35!("vae/config.json")),
        ]
    };
}

/// SD 3.5 Large's folder (stabilityai/stable-diffusion-3.5-large), less the weights and T5's
/// tokenizer.
pub const SD35_LARGE: &[BundledFile] = sd35_folder!("large");

/// SD 3.5 Medium's folder (stabilityai/stable-diffusion-3.5-medium), less the weights and T5's
/// tokenizer.
pub const SD35_MEDIUM: &[BundledFile] = sd35_folder!("medium");

/// FNV-1a over names and contents: names the folder after what it holds, so a folder written by
/// another build (or another version of the files) is never mistaken for this one.
fn fingerprint(files: &[BundledFile]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in files {
        for b in name.bytes().chain([0]).chain(bytes.iter().copied()).chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn holds(dir: &Path, files: &[BundledFile]) -> bool {
    files.iter().all(|(name, bytes)| std::fs::read(dir.join(name)).is_ok_and(|b| b == *bytes))
}

fn write_all(dir: &Path, files: &[BundledFile]) -> Result<()> {
    for (name, bytes) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Where the folders go: `sdgen/` in the per-user cache rather than the shared temp dir where
/// possible.
fn cache_base() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")));
    let base = cache.unwrap_or_else(std::env::temp_dir).join("sdgen");
    if std::fs::create_dir_all(&base).is_ok() {
        base
    } else {
        std::env::temp_dir()
    }
}

/// The folder holding `files` for `family`, written if needed. Its contents are checked byte for
/// byte on every call (1.5 MB, well under a millisecond of I/O), so a stale or tampered folder is
/// never used: a fresh private one is written instead.
pub fn materialize(family: &str, files: &[BundledFile]) -> Result<PathBuf> {
    let base = cache_base();
    let dir = base.join(format!("{family}-defaults-{:016x}", fingerprint(files)));
    if holds(&dir, files) {
        return Ok(dir);
    }
    // Written aside and renamed into place, so a concurrent process never sees half a folder.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let fresh = base.join(format!(
        "{}.{}-{nanos}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("defaults"),
        std::process::id()
    ));
    write_all(&fresh, files).map_err(|e| {
        Error::BadModel(format!("cannot write {family}'s default configs for a single-file checkpoint: {e}"))
    })?;
    if std::fs::rename(&fresh, &dir).is_ok() && holds(&dir, files) {
        return Ok(dir);
    }
    if holds(&dir, files) {
        // Another process won the race with the same contents.
        let _ = std::fs::remove_dir_all(&fresh);
        return Ok(dir);
    }
    // `dir` exists with other contents (not ours to delete): use the private copy.
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_defaults_parse_and_are_written_once() {
        for (name, bytes) in SD15.iter().chain(SDXL).chain(SDXL_REFINER).chain(SD35_LARGE).chain(SD35_MEDIUM) {
            if name.ends_with(".json") {
                serde_json::from_slice::<serde_json::Value>(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        let a = materialize("sd15", SD15).unwrap();
        let b = materialize("sd15", SD15).unwrap();
        assert_eq!(a, b);
        assert!(holds(&a, SD15));
        assert_ne!(fingerprint(SD15), fingerprint(&SD15[1..]));
    }
}
