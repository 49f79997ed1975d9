//! Weights read tensor by tensor with positioned reads instead of a memory map.
//!
//! A memory-mapped file keeps every page it has served resident in the process (they count in
//! its RSS) until it is unmapped, so loading from a map holds the file *and* the converted copies
//! at once: 2.0× the file at peak, measured on SD 1.5's UNet. Reading each tensor into a
//! short-lived buffer leaves the file in the page cache (which the kernel can drop) and bounds the
//! process's peak to the converted weights plus one tensor in flight — and to one tensor in flight
//! when the weights go to a GPU.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;

use super::safetensors_header::{SafetensorsHeader, TensorInfo};

/// Where one tensor lives.
struct Location {
    file: usize,
    offset: u64,
    info: TensorInfo,
}

/// A `VarBuilder` backend over validated safetensors files.
pub struct ReadBackend {
    files: Vec<(PathBuf, File)>,
    tensors: HashMap<String, Location>,
}

fn candle_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

impl ReadBackend {
    /// Opens `files`, whose headers were read (and validated) as `headers`.
    pub fn new(files: &[PathBuf], headers: &[SafetensorsHeader]) -> std::io::Result<Self> {
        let mut opened = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (i, (path, header)) in files.iter().zip(headers).enumerate() {
            let file = File::open(path)?;
            let mut len = [0u8; 8];
            file.read_exact_at(&mut len, 0)?;
            let data_start = 8 + u64::from_le_bytes(len);
            for (name, info) in &header.tensors {
                tensors.insert(
                    name.clone(),
                    Location { file: i, offset: data_start + info.data_offsets.0, info: info.clone() },
                );
            }
            opened.push((path.clone(), file));
        }
        Ok(Self { files: opened, tensors })
    }

    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let loc = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let stored = candle_dtype(&loc.info.dtype).ok_or_else(|| {
            candle_core::Error::Msg(format!("tensor `{name}` has unsupported dtype {}", loc.info.dtype))
        })?;
        let (path, file) = &self.files[loc.file];
        let mut buf = vec![0u8; loc.info.byte_len() as usize];
        file.read_exact_at(&mut buf, loc.offset)
            .map_err(|e| candle_core::Error::Msg(format!("{}: reading `{name}`: {e}", path.display())))?;
        let tensor = Tensor::from_raw_buffer(&buf, stored, &loc.info.shape, dev)?;
        drop(buf);
        tensor.to_dtype(dtype)
    }
}

/// `t` if it has the shape the model asked for, else candle's shape-mismatch error naming the
/// tensor (what `VarBuilder` reports for a wrong checkpoint).
pub(crate) fn expect_shape(t: Tensor, s: Shape, name: &str) -> candle_core::Result<Tensor> {
    if t.shape() != &s {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected: s,
            got: t.shape().clone(),
        }
        .bt());
    }
    Ok(t)
}

impl SimpleBackend for ReadBackend {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        expect_shape(self.read(name, dtype, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
