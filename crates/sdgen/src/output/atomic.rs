//! Crash-safe, no-clobber file publishing.
//!
//! A file is written in full to a hidden temporary (`.sdgen-….tmp`) in the destination folder,
//! fsynced, and only then given its final name. The final name is claimed with
//! `hard_link(tmp, final)`, which fails with `AlreadyExists` atomically when the name is taken, so
//! an existing file is never overwritten (a plain `rename` would silently replace it). Where the
//! filesystem has no hard links (FAT, some network shares), the name is claimed with a
//! `create_new` placeholder that the temporary is then renamed over. Either way a final name only
//! ever shows complete contents; an interrupted save leaves at most a hidden temporary, which
//! [`remove_stale_temps`] clears later.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::{Error, Result};

/// Every temporary this module makes starts with this...
pub(crate) const TEMP_PREFIX: &str = ".sdgen-";
/// ...and ends with this, so they are hidden and recognisable.
pub(crate) const TEMP_SUFFIX: &str = ".tmp";

/// A temporary older than this is an orphan: writing one takes milliseconds, so only a killed
/// process (Ctrl-C, power loss) leaves one this old behind.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// Makes temporary names unique within the process (the pid makes them unique across processes).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary file that is deleted when dropped (on success, on error and on unwinding alike).
#[derive(Debug)]
pub(crate) struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Creates a fresh, empty temporary in `dir`; `label` (e.g. "png") only makes it readable.
    pub(crate) fn create(dir: &Path, label: &str) -> Result<(TempFile, File)> {
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{TEMP_PREFIX}{}-{n}.{label}{TEMP_SUFFIX}", std::process::id());
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok((TempFile { path }, file)),
                // Left by an earlier process that had our pid: take the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(path, e)),
            }
        }
    }

    /// Writes `bytes` to a new temporary in `dir` and fsyncs it, so that once it is published its
    /// contents are on disk before its name is.
    pub(crate) fn write(dir: &Path, label: &str, bytes: &[u8]) -> Result<TempFile> {
        let (temp, mut file) = Self::create(dir, label)?;
        file.write_all(bytes).map_err(|e| Error::io(&temp.path, e))?;
        file.sync_all().map_err(|e| Error::io(&temp.path, e))?;
        Ok(temp)
    }

    /// Where the temporary is.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Already gone after a rename-publish; any other failure leaves a hidden orphan that
        // `remove_stale_temps` collects, which beats panicking in a destructor.
        let _ = fs::remove_file(&self.path);
    }
}

/// How a name was claimed, which decides how to give it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Published {
    /// The final name is a second hard link to the temporary.
    Linked,
    /// The temporary was renamed to the final name (filesystems without hard links).
    Renamed,
}

/// Gives `temp`'s contents the name `target` unless that name already exists.
///
/// Returns `Ok(None)` when `target` is taken (nothing changed), `Ok(Some(_))` once published.
/// `use_links` is false only in tests of the fallback path.
pub(crate) fn publish(temp: &TempFile, target: &Path, use_links: bool) -> Result<Option<Published>> {
    if use_links {
        match fs::hard_link(temp.path(), target) {
            Ok(()) => return Ok(Some(Published::Linked)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
            // Any other failure may be "no hard links here" (EPERM on vfat, EOPNOTSUPP on some
            // FUSE and SMB mounts, ERROR_INVALID_FUNCTION on Windows FAT), and these are not
            // reported consistently, so every one falls back; a real problem (no space, no
            // permission) fails the fallback too and is reported from there.
            Err(_) => {}
        }
    }
    // Claim the name first so a concurrent writer cannot be overwritten by the rename below.
    match OpenOptions::new().write(true).create_new(true).open(target) {
        Ok(placeholder) => drop(placeholder),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(Error::io(target, e)),
    }
    if let Err(e) = fs::rename(temp.path(), target) {
        let _ = fs::remove_file(target);
        return Err(Error::io(target, e));
    }
    Ok(Some(Published::Renamed))
}

/// Undoes a [`publish`] of `temp` to `target` (used when the image's sidecar could not take the
/// matching name), leaving `temp` as it was so it can be published again under another name.
pub(crate) fn unpublish(temp: &TempFile, target: &Path, how: Published) -> Result<()> {
    match how {
        // `rename` between two links of one file is a no-op (POSIX), so the extra link is removed.
        Published::Linked => fs::remove_file(target).map_err(|e| Error::io(target, e)),
        Published::Renamed => fs::rename(target, temp.path()).map_err(|e| Error::io(target, e)),
    }
}

/// Makes the new names in `dir` durable (the files' contents already are). Best effort: some
/// platforms and filesystems cannot open or sync a directory, and the data is safe either way.
pub(crate) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Deletes this module's temporaries in `dir` that are older than an hour (orphans of killed
/// processes); younger ones may belong to a save in progress and are left alone. Best effort.
pub(crate) fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let age = meta.modified().ok().and_then(|t| now.duration_since(t).ok());
        if meta.is_file() && age.is_some_and(|age| age > STALE_TEMP_AGE) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// All names in `dir`, sorted.
    pub(crate) fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    fn publish_never_overwrites(use_links: bool) {
        let dir = tempfile::tempdir().unwrap();
        let taken = dir.path().join("taken.png");
        fs::write(&taken, b"precious").unwrap();
        let temp = TempFile::write(dir.path(), "png", b"new contents").unwrap();
        assert_eq!(publish(&temp, &taken, use_links).unwrap(), None);
        assert_eq!(fs::read(&taken).unwrap(), b"precious");

        let free = dir.path().join("free.png");
        let how = publish(&temp, &free, use_links).unwrap().expect("free name");
        assert_eq!(how, if use_links { Published::Linked } else { Published::Renamed });
        assert_eq!(fs::read(&free).unwrap(), b"new contents");

        // Unpublishing restores the temporary, which can then be published elsewhere.
        unpublish(&temp, &free, how).unwrap();
        assert!(!free.exists());
        let other = dir.path().join("other.png");
        publish(&temp, &other, use_links).unwrap().expect("free name");
        drop(temp);
        assert_eq!(names(dir.path()), ["other.png", "taken.png"]);
        assert_eq!(fs::read(&other).unwrap(), b"new contents");
    }

    #[test]
    fn hard_link_publish_never_overwrites() {
        publish_never_overwrites(true);
    }

    #[test]
    fn rename_fallback_never_overwrites() {
        publish_never_overwrites(false);
    }

    #[test]
    fn temps_are_hidden_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let temp = TempFile::write(dir.path(), "json", b"{}").unwrap();
        let name = temp.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with('.') && name.ends_with(".tmp"), "{name}");
        drop(temp);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn only_old_temps_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(format!("{TEMP_PREFIX}1-0.png{TEMP_SUFFIX}"));
        let young = dir.path().join(format!("{TEMP_PREFIX}1-1.png{TEMP_SUFFIX}"));
        let foreign = dir.path().join(".someone-else.tmp");
        for p in [&old, &young, &foreign] {
            fs::write(p, b"x").unwrap();
        }
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for p in [&old, &foreign] {
            File::options().write(true).open(p).unwrap().set_modified(two_hours_ago).unwrap();
        }
        remove_stale_temps(dir.path());
        assert!(!old.exists());
        assert!(young.exists() && foreign.exists());
    }
}
