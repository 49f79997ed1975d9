//! Saving finished images: a PNG that carries the AUTOMATIC1111 `parameters` text, and a JSON
//! sidecar with the full metadata (SPEC §3.7), both written so that nothing is ever half-written
//! or overwritten.
//!
//! Files are named `<YYYYMMDD-HHMMSS>_<seed>_<prompt slug>.png` (UTC) with a `-1`, `-2`, …
//! suffix when the name is taken, and the sidecar is the same stem with `.json`. Each file is
//! encoded in memory, written to a hidden temporary in the destination folder, fsynced, and then
//! published under a name that is claimed atomically (see `atomic.rs`); `save_image` returns an
//! error only after removing whatever it had published, so an error means no new files.
//!
//! `--output` names a folder (the names above) or, ending in `.png`, the file itself
//! ([`OutputTarget`]). [`OutputTarget::check`] proves it usable up front, before any model is
//! loaded and without creating anything, so a bad `--output` fails in a second instead of after a
//! long generation and a refused run leaves no empty folder behind; the folder is created when the
//! first image is saved.

mod a1111;
mod a1111_read;
pub(crate) mod atomic;
mod model_hash;
mod naming;
mod png_io;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use a1111::{a1111_parameters, a1111_sampler_name};
pub use a1111_read::{parse_parameters, recall_png, Recalled};
pub use model_hash::model_hash;
pub use png_io::{encode_png, read_png_text};

use crate::error::field::OUTPUT;
use crate::{Error, Result};
use atomic::{publish, unpublish, TempFile};

/// The PNG text keyword A1111 stores its settings under.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// How many `-N` suffixes are tried before giving up (a folder with this many images of one
/// second, seed and prompt is a bug, not a busy user).
const MAX_NAME_ATTEMPTS: usize = 10_000;

/// Everything recorded about one image, written as its JSON sidecar.
///
/// The first five fields are the seed product's metadata, kept under the same names so its
/// readers keep working; the rest describe the generation. Later additions (the memory plan,
/// per-stage memory) go in `extra` until they get fields of their own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageMetadata {
    /// The model as the user named it: a preset name (`sd15`), a hub repo id or a path.
    pub model: String,
    /// The pipeline that made the image, e.g. `StableDiffusionXLPipeline (SDXL)`.
    pub pipeline_type: String,
    /// The memory optimisations in effect, comma-separated with no spaces, as the seed wrote them
    /// (`attention_slicing,vae_slicing,aggressive_cleanup`).
    pub memory_optimizations: String,
    /// Warnings raised while generating (low memory, adjusted settings...).
    pub warnings: Vec<String>,
    /// Failures that were recovered from, e.g. an out-of-memory error and the plan that followed.
    pub failures: Vec<String>,
    /// The prompt.
    pub prompt: String,
    /// The negative prompt; empty when none was given.
    pub negative_prompt: String,
    /// This image's own seed (`--seed` + `batch_index`): `--n 1 --seed <this>` makes it again.
    pub seed: u64,
    /// The image's position in its `--n` batch, from 0.
    pub batch_index: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// The scheduler, by our name for it (`euler`, `ddim`, `pndm`, ...).
    pub scheduler: String,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// The device it ran on (`cpu`, `cuda:0`, `metal`).
    pub device: String,
    /// The compute dtype (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// Wall time per stage in milliseconds (`text_encode`, `denoise`, `vae_decode`, `total`...).
    pub timings_ms: BTreeMap<String, f64>,
    /// The sdgen version, e.g. `0.1.0` (`env!("CARGO_PKG_VERSION")`).
    pub version: String,
    /// Room for fields added later (the memory plan, per-stage memory and peaks).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Where [`save_image`] put an image and its sidecar (same stem).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedImage {
    /// The PNG.
    pub png_path: PathBuf,
    /// The JSON sidecar.
    pub json_path: PathBuf,
}

/// Saves `rgb` (8-bit RGB, row-major, `meta.width * meta.height * 3` bytes) as a PNG with the A1111
/// `parameters` text, plus a pretty-printed JSON sidecar of `meta`, in `dir` (created if missing).
///
/// Never overwrites: a taken name (PNG or sidecar) moves both to the next `-N` suffix. On error
/// nothing new is left in `dir`, neither under a final name nor as a temporary.
pub fn save_image(dir: &Path, meta: &ImageMetadata, rgb: &[u8]) -> Result<SavedImage> {
    save_png_at(dir, None, meta, &image_png(meta, rgb)?, SystemTime::now(), &mut |_| Ok(()))
}

/// Saves an image where `target` says: [`save_image`]'s names in a folder, or the file name the
/// user gave (`stem.png` for a single image, `stem-<i+1>.png` for image `index` of `total`), which
/// is never overwritten: a taken name is an error (and nothing is left behind).
pub fn save_image_to(
    target: &OutputTarget,
    index: usize,
    total: usize,
    meta: &ImageMetadata,
    rgb: &[u8],
) -> Result<SavedImage> {
    save_png_to(target, index, total, meta, &image_png(meta, rgb)?)
}

/// [`save_image_to`] for a PNG already encoded (by [`image_png`], here or on a server): written
/// as it is, named and published exactly as [`save_image_to`] would, with `meta`'s sidecar.
pub fn save_png_to(
    target: &OutputTarget,
    index: usize,
    total: usize,
    meta: &ImageMetadata,
    png: &[u8],
) -> Result<SavedImage> {
    let stem = target.file_stem(index, total);
    save_png_at(target.dir(), stem.as_deref(), meta, png, SystemTime::now(), &mut |_| Ok(()))
}

/// The PNG file [`save_image`] writes for `rgb` (8-bit RGB, `meta.width * meta.height * 3`
/// bytes), in memory: the pixels with `meta`'s A1111 `parameters` text. A server sends these
/// bytes, so its images equal the command line's, byte for byte.
pub fn image_png(meta: &ImageMetadata, rgb: &[u8]) -> Result<Vec<u8>> {
    let (width, height) = (pixel_dim(meta.width, "width")?, pixel_dim(meta.height, "height")?);
    let parameters = a1111_parameters(meta);
    encode_png(rgb, width, height, &[(PARAMETERS_KEYWORD, &parameters)])
}

/// Image file extensions `--output` might end in; only PNG is written (A1111's metadata lives in
/// its text chunk), the others are refused rather than taken for a folder name.
const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// What `--output` names: a folder for the images, or (a path ending in `.png`, as
/// stable-diffusion.cpp's `-o`) the image file itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    /// Images are named from the time, seed and prompt inside this folder.
    Folder(PathBuf),
    /// `dir/stem.png` (with `-1`, `-2`, … before the extension for several images).
    File {
        /// The folder the file goes in.
        dir: PathBuf,
        /// The file name without `.png`.
        stem: String,
    },
}

impl OutputTarget {
    /// Reads `--output`: a path whose extension is `.png` (any case) names the file; `.jpg`,
    /// `.jpeg` and `.webp` are refused with what to do; anything else is a folder.
    pub fn parse(path: &Path) -> Result<Self> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_ascii_lowercase();
        // `.png` alone is a file with an empty stem to a user, a hidden folder to `Path`.
        let bare_extension = IMAGE_EXTENSIONS.iter().any(|e| name.strip_prefix('.') == Some(e));
        let ext = if bare_extension {
            Some("png".to_string())
        } else {
            path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase)
        };
        match ext.as_deref() {
            Some("png") => {
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .filter(|s| !bare_extension && !s.is_empty() && !s.starts_with('.'));
                let Some(stem) = stem else {
                    return Err(Error::InvalidInput(format!(
                        "{OUTPUT} {}: not a usable file name; name a file like `result.png` or a folder",
                        path.display()
                    )));
                };
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                Ok(Self::File { dir, stem: stem.to_string() })
            }
            Some(e) if IMAGE_EXTENSIONS.contains(&e) => Err(Error::InvalidInput(format!(
                "{OUTPUT} {}: only PNG files are written (the generation settings live in the PNG's text \
                 chunk); name a `.png` file or a folder",
                path.display()
            ))),
            _ => Ok(Self::Folder(path.to_path_buf())),
        }
    }

    /// The folder the images go in.
    pub fn dir(&self) -> &Path {
        match self {
            Self::Folder(dir) | Self::File { dir, .. } => non_empty(dir),
        }
    }

    /// The file stem for image `index` of `total` (`None`: a folder's generated names).
    pub fn file_stem(&self, index: usize, total: usize) -> Option<String> {
        match self {
            Self::Folder(_) => None,
            Self::File { stem, .. } if total == 1 => Some(stem.clone()),
            Self::File { stem, .. } => Some(format!("{stem}-{}", index + 1)),
        }
    }

    /// Checks, before any work is done and without creating anything, that `total` images can be
    /// saved here: the folder (or the nearest existing folder above it, where it will be created)
    /// is a writable folder, and no file the run would write exists yet.
    pub fn check(&self, total: usize) -> Result<()> {
        check_output_dir(self.dir())?;
        for index in 0..total {
            let Some(stem) = self.file_stem(index, total) else { break };
            for ext in ["png", "json"] {
                let path = self.dir().join(format!("{stem}.{ext}"));
                if path.symlink_metadata().is_ok() {
                    return Err(Error::InvalidInput(format!(
                        "`{}` already exists and is never overwritten: pass another {OUTPUT}, or move it away",
                        path.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Checks that images can be saved in `dir` without creating it: it is a writable folder, or it
/// does not exist yet and the nearest existing folder above it is writable (where saving will
/// create it). Proves writability by creating and removing a temporary file, so nothing is left.
/// Also clears temporaries that killed runs left in `dir` more than an hour ago.
///
/// Fails with [`Error::InvalidInput`] naming the folder and asking for a writable `--output`.
pub fn check_output_dir(dir: &Path) -> Result<()> {
    let dir = non_empty(dir);
    let unusable = |what: &str, why: &dyn std::fmt::Display| {
        Error::InvalidInput(format!(
            "output folder `{}` {what} ({why}): pass a writable {OUTPUT} folder",
            dir.display()
        ))
    };
    let mut existing = dir;
    loop {
        match fs::metadata(existing) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(unusable("cannot be created", &format!("`{}` is a file", existing.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                existing = match existing.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
            }
            Err(e) => return Err(unusable("cannot be checked", &e)),
        }
    }
    let (probe, file) = TempFile::create(existing, "write-check").map_err(|e| unusable("is not writable", &e))?;
    drop(file);
    // Saving removes temporaries too, so that must work here as well.
    fs::remove_file(probe.path()).map_err(|e| unusable("does not let files be removed", &e))?;
    if existing == dir {
        atomic::remove_stale_temps(dir);
    }
    Ok(())
}

/// Points in [`save_png_at`] where tests inject failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SaveStep {
    /// Both temporaries are written and synced; nothing is published yet.
    TempsWritten,
    /// The PNG has its final name; the sidecar does not yet.
    PngPublished,
}

/// [`save_image`] of an encoded `png`, with the clock and a failure hook supplied by the caller
/// (tests); `exact` is a file stem to take as it is (an error when taken) instead of the
/// generated names.
fn save_png_at(
    dir: &Path,
    exact: Option<&str>,
    meta: &ImageMetadata,
    png: &[u8],
    now: SystemTime,
    hook: &mut dyn FnMut(SaveStep) -> io::Result<()>,
) -> Result<SavedImage> {
    let dir = non_empty(dir);
    let mut json = serde_json::to_vec_pretty(meta)
        .map_err(|e| Error::InvalidInput(format!("image metadata cannot be written as JSON: {e}")))?;
    json.push(b'\n');

    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let png_temp = TempFile::write(dir, "png", png)?;
    let json_temp = TempFile::write(dir, "json", &json)?;
    hook(SaveStep::TempsWritten).map_err(|e| Error::io(dir, e))?;

    let base = exact.map_or_else(|| naming::base_stem(now, meta.seed, &meta.prompt), str::to_string);
    let attempts = if exact.is_some() { 1 } else { MAX_NAME_ATTEMPTS };
    for attempt in 0..attempts {
        let stem = if attempt == 0 { base.clone() } else { format!("{base}-{attempt}") };
        let png_path = dir.join(format!("{stem}.png"));
        let json_path = dir.join(format!("{stem}.json"));
        // A leftover sidecar without its PNG still takes the stem: the pair must match.
        if json_path.symlink_metadata().is_ok() {
            continue;
        }
        let Some(png_how) = publish(&png_temp, &png_path, true)? else {
            continue;
        };
        let json_result = hook(SaveStep::PngPublished)
            .map_err(|e| Error::io(dir, e))
            .and_then(|()| publish(&json_temp, &json_path, true));
        match json_result {
            Ok(Some(_)) => {
                atomic::sync_dir(dir);
                return Ok(SavedImage { png_path, json_path });
            }
            // Another writer took the sidecar name in the meantime: move both to the next stem.
            Ok(None) => unpublish(&png_temp, &png_path, png_how)?,
            Err(e) => {
                // Keep the promise that an error leaves nothing behind; the first error is the
                // one worth reporting.
                let _ = unpublish(&png_temp, &png_path, png_how);
                return Err(e);
            }
        }
    }
    // (The temporaries are removed as they drop.)
    if exact.is_some() {
        return Err(Error::InvalidInput(format!(
            "`{}` already exists and is never overwritten: pass another {OUTPUT}, or move it away",
            dir.join(format!("{base}.png")).display()
        )));
    }
    Err(Error::InvalidInput(format!(
        "no free file name for `{base}.png` in `{}` after {MAX_NAME_ATTEMPTS} tries",
        dir.display()
    )))
}

/// A metadata dimension as the PNG's `u32`, refusing zero and overflow.
fn pixel_dim(value: usize, what: &str) -> Result<u32> {
    u32::try_from(value)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::InvalidInput(format!("image {what} {value} is not a valid PNG size")))
}

/// `dir`, or the current folder for an empty path (which the file system calls would reject).
fn non_empty(dir: &Path) -> &Path {
    if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }
}

#[cfg(test)]
mod tests;
