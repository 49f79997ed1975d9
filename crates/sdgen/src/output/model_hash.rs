//! A1111's `Model hash`: the first 10 hex digits of a checkpoint file's SHA-256 (its "AutoV2"
//! hash), which A1111 writes in `parameters` and Civitai matches models by. Hashing a multi-GB
//! file takes a while, so hashes are cached by path, size and modification time, as A1111's own
//! `cache.json` does, in `$XDG_CACHE_HOME/sdgen/model-hashes.json` (or `~/.cache/sdgen/…`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// One cached hash and the file state it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    modified_ns: u128,
    sha256: String,
}

/// The cache file (`None` when there is no home to put it in).
fn cache_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("sdgen").join("model-hashes.json"))
}

/// A1111's short model hash of the file at `path` (10 lowercase hex digits).
pub fn model_hash(path: &Path) -> Result<String> {
    model_hash_cached(path, cache_path().as_deref())
}

/// [`model_hash`] with the cache file given (`None`: no cache).
fn model_hash_cached(path: &Path, cache: Option<&Path>) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let modified_ns = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string();
    let mut entries: BTreeMap<String, Entry> = cache
        .and_then(|c| std::fs::read(c).ok())
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    if let Some(e) = entries.get(&key).filter(|e| e.size == meta.len() && e.modified_ns == modified_ns) {
        return Ok(e.sha256[..10].to_string());
    }
    let sha256 = sha256_hex(path)?;
    let short = sha256[..10].to_string();
    if let Some(cache) = cache {
        entries.insert(key, Entry { size: meta.len(), modified_ns, sha256 });
        // A cache that cannot be written only costs the next run the hashing again.
        let _ = write_atomically(cache, &serde_json::to_vec_pretty(&entries).unwrap_or_default());
    }
    Ok(short)
}

fn sha256_hex(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let temp = dir.join(format!(".model-hashes.{}.tmp", std::process::id()));
    std::fs::write(&temp, bytes)?;
    std::fs::rename(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_sha256s_first_ten_digits_and_is_cached_by_file_state() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, b"abc").unwrap();
        let cache = dir.path().join("cache/model-hashes.json");
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(model_hash_cached(&file, Some(&cache)).unwrap(), "ba7816bf8f");
        // A cached entry for the same size and time is used as it is (no re-hashing) ...
        let text = std::fs::read_to_string(&cache).unwrap().replace("ba7816bf8f01", "0123456789ab");
        std::fs::write(&cache, text).unwrap();
        assert_eq!(model_hash_cached(&file, Some(&cache)).unwrap(), "0123456789");
        // ... and a changed file is hashed again.
        std::fs::write(&file, b"abcd").unwrap();
        assert_eq!(model_hash_cached(&file, Some(&cache)).unwrap(), "88d4266fd4");
        assert_eq!(model_hash_cached(&file, None).unwrap(), "88d4266fd4");
    }
}
