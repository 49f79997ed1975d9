//! GGUF files (llama.cpp's format, as city96's SD 3.5 / SDXL / SD 1.5 denoiser conversions ship
//! them): the header — metadata and the tensor directory — read and validated without touching
//! the data, and turned into the [`SafetensorsHeader`] the rest of the loader works from (names,
//! shapes in PyTorch's order, byte ranges), the dtype being the GGML type's name (`Q8_0`).
//!
//! Our own reader rather than candle's `gguf_file::Content`: a file is refused here with what is
//! wrong with it, by name — a truncated download, another format, a version, a quantisation type
//! this build does not read (candle's reader stops at the first unknown type number, naming
//! neither the type nor the tensor) — and a tensor's bytes are read later by the same positioned
//! reader as a safetensors file's (`read_backend`), one at a time.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use sdgen_models::ops::quantised::{GgmlType, Storage};

use super::{SafetensorsHeader, TensorInfo};
use crate::{Error, Result};

/// The first four bytes of a GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// The data section's alignment when `general.alignment` does not say (the format's default).
const DEFAULT_ALIGNMENT: u64 = 32;

/// The metadata key of the architecture a GGUF declares (`sd3`, `sdxl`, `sd1`, `flux`, `llama`…).
pub const ARCHITECTURE_KEY: &str = "general.architecture";

/// city96's converter stores a tensor whose last dimension is not a multiple of 256 reshaped to
/// `[n/256, 256]`, with its real shape under this key + the tensor's name.
const ORIG_SHAPE_PREFIX: &str = "comfy.gguf.orig_shape.";

/// A metadata value (the scalars as the widest type of their kind).
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Text(String),
    Array(Vec<Value>),
}

/// Whether the file at `path` begins as a GGUF does.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == MAGIC
}

/// Reads the header of the GGUF at `path`, checking that every tensor's type is one this build
/// reads and that its bytes lie inside the file. Tensor offsets in the result are absolute (from
/// the file's start: `read_backend` reads a GGUF's tensors at their offsets as they stand).
pub fn read(path: &Path) -> Result<SafetensorsHeader> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_bytes = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = Reader { inner: BufReader::new(file), pos: 0, file_bytes, path };
    let magic = r.bytes(4)?;
    if magic != MAGIC {
        return Err(r.bad(format!("is not a GGUF file (it begins with {magic:02x?}, not `GGUF`)")));
    }
    let version = r.u32()?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(r.bad(
                "is a GGUF of version 1 (2023's first draft), which this build does not read: \
                               convert the model again with a current `gguf` package"
                    .into(),
            ))
        }
        v if v.swap_bytes() <= 3 => {
            return Err(r.bad(
                "is a big-endian GGUF, which this build does not read: use the \
                                                       little-endian file (the one published for PCs)"
                    .into(),
            ))
        }
        v => return Err(r.bad(format!("is a GGUF of version {v}; this build reads versions 2 and 3"))),
    }
    let tensor_count = r.u64()?;
    let kv_count = r.u64()?;
    // Each entry takes at least 8 bytes of name length plus its fields: more than fit is corrupt.
    if tensor_count.saturating_add(kv_count).saturating_mul(8) > file_bytes {
        return Err(r.bad(format!(
            "is truncated: it declares {tensor_count} tensors and {kv_count} metadata entries, more than its \
             {file_bytes} bytes hold (an interrupted download? fetch it again)"
        )));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty, 0)?;
        metadata.insert(key, value);
    }
    let mut entries = Vec::new();
    for _ in 0..tensor_count {
        let name = r.string()?;
        let dims = r.u32()?;
        if dims == 0 || dims > 4 {
            return Err(
                r.bad(format!("says tensor `{name}` has {dims} dimensions (GGUF holds 1 to 4): the file is corrupt"))
            );
        }
        // GGUF lists dimensions innermost first; PyTorch's order is the reverse.
        let mut shape = (0..dims).map(|_| r.u64().map(|d| d as usize)).collect::<Result<Vec<_>>>()?;
        shape.reverse();
        let type_id = r.u32()?;
        let offset = r.u64()?;
        entries.push((name, shape, type_id, offset));
    }
    let alignment = match metadata.get("general.alignment") {
        Some(Value::Int(a)) if *a > 0 && (*a as u64).is_power_of_two() => *a as u64,
        Some(other) => return Err(r.bad(format!("has `general.alignment` {other:?}, not a power of two"))),
        None => DEFAULT_ALIGNMENT,
    };
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let mut tensors = BTreeMap::new();
    for (name, mut shape, type_id, offset) in entries {
        let ty = tensor_type(&r, &name, type_id)?;
        let (block_elements, block_bytes) = ty.block().expect("tensor_type returns readable types");
        let elements: usize = shape.iter().product();
        if !elements.is_multiple_of(block_elements) {
            return Err(r.bad(format!("says tensor `{name}` ({shape:?}) is {}, whose blocks of {block_elements} do not divide it: the file is corrupt", ty.name)));
        }
        let bytes = (elements / block_elements * block_bytes) as u64;
        let start = data_start.saturating_add(offset);
        if start.saturating_add(bytes) > file_bytes {
            return Err(r.bad(format!(
                "is truncated: tensor `{name}` ends at byte {} but the file has {file_bytes} bytes (an interrupted \
                 download? fetch it again)",
                start.saturating_add(bytes)
            )));
        }
        if let Some(Value::Array(dims)) = metadata.get(&format!("{ORIG_SHAPE_PREFIX}{name}")) {
            let orig: Vec<usize> = dims
                .iter()
                .filter_map(|d| match d {
                    Value::Int(d) if *d >= 0 => Some(*d as usize),
                    _ => None,
                })
                .collect();
            if orig.len() != dims.len() || orig.iter().product::<usize>() != elements {
                return Err(r.bad(format!(
                    "gives tensor `{name}` ({shape:?}) the original shape {dims:?}, which does not hold its elements"
                )));
            }
            shape = orig;
        }
        tensors.insert(name, TensorInfo { dtype: ty.name.to_string(), shape, data_offsets: (start, start + bytes) });
    }
    let metadata = metadata
        .into_iter()
        .filter_map(|(k, v)| match v {
            Value::Text(s) => Some((k, s)),
            Value::Int(i) => Some((k, i.to_string())),
            _ => None,
        })
        .collect();
    Ok(SafetensorsHeader { tensors, metadata, file_bytes })
}

/// The type numbered `id`, if this build reads it; else the refusal, naming the type.
fn tensor_type(r: &Reader, name: &str, id: u32) -> Result<&'static GgmlType> {
    match GgmlType::by_id(id) {
        Some(t) if t.storage != Storage::Unsupported => Ok(t),
        Some(t) => Err(Error::InvalidInput(format!(
            "{}: tensor `{name}` is quantised as {}, which this build does not read (it reads {}): use a \
             conversion of the model to one of those (Q8_0, Q5_K, Q4_K, Q4_0, …)",
            r.path.display(),
            t.name,
            GgmlType::readable()
        ))),
        None => Err(r.bad(format!(
            "says tensor `{name}` has GGML type {id}, which no GGML this build knows (it reads {}): a newer \
             quantisation, or a corrupt file",
            GgmlType::readable()
        ))),
    }
}

/// A counting reader over the header that names the file and calls a short read truncation.
struct Reader<'a> {
    inner: BufReader<File>,
    pos: u64,
    file_bytes: u64,
    path: &'a Path,
}

impl Reader<'_> {
    fn bad(&self, why: String) -> Error {
        Error::BadModel(format!("{} {why}", self.path.display()))
    }

    fn bytes(&mut self, n: u64) -> Result<Vec<u8>> {
        if n > self.file_bytes.saturating_sub(self.pos) {
            return Err(self.bad(format!(
                "is truncated: its header runs past the end of its {} bytes (an interrupted download? fetch it again)",
                self.file_bytes
            )));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.bytes(N as u64)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let bytes = self.bytes(len)?;
        String::from_utf8(bytes).map_err(|_| self.bad("holds a name that is not UTF-8: the file is corrupt".into()))
    }

    /// A metadata value of GGUF value type `ty` (`gguf_type`); arrays nest at most a few deep.
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::Int(self.array::<1>()?[0] as i128),
            1 => Value::Int(i8::from_le_bytes(self.array()?) as i128),
            2 => Value::Int(u16::from_le_bytes(self.array()?) as i128),
            3 => Value::Int(i16::from_le_bytes(self.array()?) as i128),
            4 => Value::Int(self.u32()? as i128),
            5 => Value::Int(i32::from_le_bytes(self.array()?) as i128),
            6 => Value::Float(f32::from_le_bytes(self.array()?) as f64),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Text(self.string()?),
            9 if depth < 4 => {
                let inner = self.u32()?;
                let len = self.u64()?;
                if len > self.file_bytes.saturating_sub(self.pos) {
                    return Err(self.bad(format!(
                        "holds an array of {len} values, more than the file has bytes: the file is corrupt"
                    )));
                }
                Value::Array((0..len).map(|_| self.value(inner, depth + 1)).collect::<Result<_>>()?)
            }
            10 => Value::Int(self.u64()? as i128),
            11 => Value::Int(i64::from_le_bytes(self.array()?) as i128),
            12 => Value::Float(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(self.bad(format!("holds a metadata value of unknown type {other}: the file is corrupt")))
            }
        })
    }
}
