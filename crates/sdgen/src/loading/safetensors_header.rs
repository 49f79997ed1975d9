//! Reads and validates a safetensors file's header without touching its data: the tensor
//! manifest (names, dtypes, shapes, byte ranges) that family detection and, later, the memory
//! planner work from. A truncated or corrupt file is refused here with a message naming it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// Headers larger than this are refused as corrupt (the format's reference implementation uses
/// the same 100 MB bound).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor's entry in the header.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TensorInfo {
    /// The stored dtype, as safetensors spells it (`F32`, `F16`, `BF16`, ...).
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Bytes the tensor occupies in the file.
    pub fn byte_len(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A validated header.
#[derive(Debug, Clone)]
pub struct SafetensorsHeader {
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// The `__metadata__` strings, if any.
    pub metadata: BTreeMap<String, String>,
    /// Size of the whole file.
    pub file_bytes: u64,
}

fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// What a file that starts with `magic` is, when it is a well-known format other than safetensors
/// (whose first 8 bytes are a little-endian header length): so a picture or a pickle passed as
/// `--model` is named for what it is, not called a corrupt checkpoint.
fn other_format(magic: &[u8; 8]) -> Option<&'static str> {
    const KINDS: [(&[u8], &str); 7] = [
        (b"\x89PNG", "a PNG image"),
        (b"\xFF\xD8\xFF", "a JPEG image"),
        (b"GIF8", "a GIF image"),
        (
            b"GGUF",
            concat!(
                "a GGUF file (a quantised denoiser: pass it to ",
                crate::field_ref!("model"),
                ", with ",
                crate::field_ref!("config_from"),
                " DIR)"
            ),
        ),
        (b"PK\x03\x04", "a zip archive (a PyTorch .ckpt/.pt pickle?)"),
        (b"version ", "a Git LFS pointer (the weights were not fetched: `git lfs pull`)"),
        (b"<!DOCTYPE", "an HTML page (a download that returned a web page?)"),
    ];
    if magic.starts_with(b"RIFF") {
        return Some("a RIFF file (a WebP image?)");
    }
    // A pickle's protocol mark is followed by an opcode; a safetensors header of 640 + 256·k bytes
    // starts with the same two bytes but then zeros.
    if magic[0] == 0x80 && (2..=5).contains(&magic[1]) && magic[2] != 0 {
        return Some("a Python pickle (a PyTorch .ckpt/.pt?)");
    }
    KINDS.iter().find(|(m, _)| magic.starts_with(m)).map(|(_, kind)| *kind)
}

impl SafetensorsHeader {
    /// Reads and validates the header of `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let corrupt = |why: String| {
            Error::BadModel(format!(
                "{} is not a valid safetensors file ({why}): it may be truncated or corrupt (if it was downloaded, \
                 download it again)",
                path.display()
            ))
        };
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let file_bytes = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes).map_err(|_| corrupt(format!("only {file_bytes} bytes long")))?;
        if let Some(kind) = other_format(&len_bytes) {
            return Err(Error::InvalidInput(format!(
                "{} is {kind}, not a model file: pass a .safetensors checkpoint or a diffusers model folder",
                path.display()
            )));
        }
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > file_bytes {
            return Err(corrupt(format!("header length {header_len} does not fit a {file_bytes}-byte file")));
        }
        let mut raw = vec![0u8; header_len as usize];
        file.read_exact(&mut raw).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&raw).map_err(|e| corrupt(format!("header is not valid JSON: {e}")))?;
        let data_bytes = file_bytes - 8 - header_len;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, value) in json {
            if name == "__metadata__" {
                metadata = serde_json::from_value(value).map_err(|e| corrupt(format!("bad __metadata__: {e}")))?;
                continue;
            }
            let info: TensorInfo =
                serde_json::from_value(value).map_err(|e| corrupt(format!("bad entry for tensor `{name}`: {e}")))?;
            let (start, end) = info.data_offsets;
            let elem = dtype_bytes(&info.dtype)
                .ok_or_else(|| corrupt(format!("tensor `{name}` has unknown dtype {}", info.dtype)))?;
            let numel: u64 = info.shape.iter().map(|&d| d as u64).product();
            if end < start || end > data_bytes {
                return Err(corrupt(format!(
                    "tensor `{name}` spans bytes {start}..{end} but the data section has {data_bytes}"
                )));
            }
            if end - start != numel * elem {
                return Err(corrupt(format!(
                    "tensor `{name}` has {} bytes for shape {:?} of {}",
                    end - start,
                    info.shape,
                    info.dtype
                )));
            }
            tensors.insert(name, info);
        }
        Ok(Self { tensors, metadata, file_bytes })
    }

    /// Total bytes of all tensors.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors.values().map(TensorInfo::byte_len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_formats_are_named_for_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&[u8], &str); 5] = [
            (b"\x89PNG\r\n\x1a\n rest of a picture", "a PNG image"),
            (b"\xFF\xD8\xFF\xE0 jpeg bytes", "a JPEG image"),
            (b"GGUF\x03\x00\x00\x00 tensors", "a GGUF file"),
            (b"version https://git-lfs.github.com/spec/v1\n", "Git LFS pointer"),
            (b"\x80\x02}q\x00(X pickle", "a Python pickle"),
        ];
        for (bytes, kind) in cases {
            let p = dir.path().join("model.safetensors");
            std::fs::write(&p, bytes).unwrap();
            let msg = SafetensorsHeader::read(&p).unwrap_err().to_string();
            assert!(msg.contains(kind) && msg.contains("not a model file"), "{msg}");
            assert!(!msg.contains("delete"), "never advise deleting the user's file: {msg}");
        }
        // A header of 640 bytes starts like a pickle's mark, then zeros: still read as safetensors.
        assert_eq!(other_format(&[0x80, 0x02, 0, 0, 0, 0, 0, 0]), None);
    }

    fn write(dir: &Path, name: &str, header: &str, data: &[u8], claimed_len: Option<u64>) -> std::path::PathBuf {
        let p = dir.join(name);
        let mut bytes = claimed_len.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_a_valid_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "ok.safetensors",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 8],
            None,
        );
        let h = SafetensorsHeader::read(&p).unwrap();
        assert_eq!(h.tensors["a"].shape, vec![2]);
        assert_eq!(h.weight_bytes(), 8);
    }

    #[test]
    fn refuses_corrupt_files_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            write(dir.path(), "len.safetensors", "{}", &[], Some(1 << 40)),
            write(dir.path(), "json.safetensors", "{not json", &[], None),
            write(
                dir.path(),
                "past.safetensors",
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                &[0; 8],
                None,
            ),
            write(
                dir.path(),
                "shape.safetensors",
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0; 8],
                None,
            ),
        ];
        for p in cases {
            let err = SafetensorsHeader::read(&p).unwrap_err().to_string();
            assert!(err.contains(&p.display().to_string()), "{err}");
            assert!(err.contains("not a valid safetensors file"), "{err}");
        }
        let short = dir.path().join("short.safetensors");
        std::fs::write(&short, [1u8, 2]).unwrap();
        assert!(SafetensorsHeader::read(&short).is_err());
    }
}
