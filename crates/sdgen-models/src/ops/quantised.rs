//! Quantised weights (GGML blocks, as GGUF files store them and `--weights q8|q4` makes them) and
//! how a linear layer gets one.
//!
//! The seam. Model constructors take a candle `VarBuilder`, whose backend is a trait object that
//! hands out `Tensor`s and cannot be downcast, so a quantised tensor (`QTensor`) cannot come out
//! of it as itself. Rather than change every constructor to take another type, or keep a
//! process-wide store keyed by name, a backend that holds a weight quantised serves it a second
//! time under a *companion name*, `<name>@<TYPE>` (`to_q.weight@Q8_0`): its raw GGML blocks as a
//! `U8` tensor `[rows, bytes per row]`. [`load`] (which `linear()` calls) asks for the companion
//! before the plain name; every other caller (norms, embeddings, convolutions) asks for the plain
//! name and gets the weight dequantised to the run's dtype. So the backend decides which weights
//! stay quantised (the file's types, the `--weights` rule), the layer decides which can use them
//! (only a linear layer multiplies through `QMatMul`), and a backend that knows nothing of
//! quantisation (a safetensors reader, a test's `HashMap`) simply has no companion names. The
//! companion travels with the `VarBuilder` through `pp()` like any tensor: no constructor changes.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// How a GGML type's tensors are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Plain floats, converted to the run's dtype like a safetensors tensor.
    Float(DType),
    /// Blocks candle dequantises and multiplies (`QTensor`, `QMatMul`).
    Blocks(GgmlDType),
    /// A type this build does not read (the i-quants, ternary and FP4 types, integers).
    Unsupported,
}

/// One GGML tensor type, as GGUF files number and name it (ggml.h's `ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    /// Its number in a GGUF tensor entry.
    pub id: u32,
    /// Its name (`Q8_0`), as llama.cpp and the `gguf` package print it.
    pub name: &'static str,
    /// How it is read.
    pub storage: Storage,
}

const fn blocks(id: u32, name: &'static str, dtype: GgmlDType) -> GgmlType {
    GgmlType { id, name, storage: Storage::Blocks(dtype) }
}

const fn unsupported(id: u32, name: &'static str) -> GgmlType {
    GgmlType { id, name, storage: Storage::Unsupported }
}

/// Every GGML type a GGUF file may hold, by number (ggml.h): the float types and the block types
/// candle reads are read; `Q8_1` and `Q8_K` (the activations' types of llama.cpp's dot
/// products, never a stored weight's), the i-quants, ternary and FP4 types and the integers are
/// refused by name.
pub const GGML_TYPES: &[GgmlType] = &[
    GgmlType { id: 0, name: "F32", storage: Storage::Float(DType::F32) },
    GgmlType { id: 1, name: "F16", storage: Storage::Float(DType::F16) },
    blocks(2, "Q4_0", GgmlDType::Q4_0),
    blocks(3, "Q4_1", GgmlDType::Q4_1),
    blocks(6, "Q5_0", GgmlDType::Q5_0),
    blocks(7, "Q5_1", GgmlDType::Q5_1),
    blocks(8, "Q8_0", GgmlDType::Q8_0),
    unsupported(9, "Q8_1"),
    blocks(10, "Q2_K", GgmlDType::Q2K),
    blocks(11, "Q3_K", GgmlDType::Q3K),
    blocks(12, "Q4_K", GgmlDType::Q4K),
    blocks(13, "Q5_K", GgmlDType::Q5K),
    blocks(14, "Q6_K", GgmlDType::Q6K),
    unsupported(15, "Q8_K"),
    unsupported(16, "IQ2_XXS"),
    unsupported(17, "IQ2_XS"),
    unsupported(18, "IQ3_XXS"),
    unsupported(19, "IQ1_S"),
    unsupported(20, "IQ4_NL"),
    unsupported(21, "IQ3_S"),
    unsupported(22, "IQ2_S"),
    unsupported(23, "IQ4_XS"),
    unsupported(24, "I8"),
    unsupported(25, "I16"),
    unsupported(26, "I32"),
    unsupported(27, "I64"),
    GgmlType { id: 28, name: "F64", storage: Storage::Float(DType::F64) },
    unsupported(29, "IQ1_M"),
    GgmlType { id: 30, name: "BF16", storage: Storage::Float(DType::BF16) },
    unsupported(34, "TQ1_0"),
    unsupported(35, "TQ2_0"),
    unsupported(39, "MXFP4"),
];

impl GgmlType {
    /// The type numbered `id`.
    pub fn by_id(id: u32) -> Option<&'static GgmlType> {
        GGML_TYPES.iter().find(|t| t.id == id)
    }

    /// The type named `name` (`Q8_0`).
    pub fn by_name(name: &str) -> Option<&'static GgmlType> {
        GGML_TYPES.iter().find(|t| t.name == name)
    }

    /// The type of candle's `dtype`.
    pub fn of(dtype: GgmlDType) -> &'static GgmlType {
        GGML_TYPES
            .iter()
            .find(|t| t.storage == Storage::Blocks(dtype))
            .expect("every block type candle reads is listed")
    }

    /// The names of the types this build reads, for messages.
    pub fn readable() -> String {
        let names: Vec<&str> =
            GGML_TYPES.iter().filter(|t| t.storage != Storage::Unsupported).map(|t| t.name).collect();
        names.join(", ")
    }

    /// `(elements, bytes)` of one block (one element for the float types); `None` when unread.
    pub fn block(&self) -> Option<(usize, usize)> {
        match self.storage {
            Storage::Float(d) => Some((1, d.size_in_bytes())),
            Storage::Blocks(d) => Some((d.block_size(), d.type_size())),
            Storage::Unsupported => None,
        }
    }
}

/// The companion name under which a backend serves `name` as raw blocks of `ty` ([`load`]).
pub fn companion(name: &str, ty: &GgmlType) -> String {
    format!("{name}@{}", ty.name)
}

/// A companion name split into the tensor's name and the block type it asks for; `None` for a
/// plain name.
pub fn split_companion(name: &str) -> Option<(&str, &'static GgmlType)> {
    let (base, ty) = name.rsplit_once('@')?;
    let ty = GgmlType::by_name(ty).filter(|t| matches!(t.storage, Storage::Blocks(_)))?;
    Some((base, ty))
}

/// The tensor any companion name stands for (GGML blocks, or an fp8 weight's bytes or scale,
/// [`super::fp8`]); `None` for a plain name.
pub fn companion_base(name: &str) -> Option<&str> {
    split_companion(name).map(|(base, _)| base).or_else(|| super::fp8::split_companion(name).map(|(base, _)| base))
}

/// Bytes per row of a `[rows, cols]` matrix of blocks of `dtype`, when its rows are whole blocks
/// (GGML quantises row by row: a row that is not is stored some other way).
pub fn row_bytes(dtype: GgmlDType, cols: usize) -> Option<usize> {
    cols.is_multiple_of(dtype.block_size()).then(|| cols / dtype.block_size() * dtype.type_size())
}

/// Raw blocks as the `U8` tensor `[rows, bytes per row]` a backend serves under a companion name.
pub fn blocks_tensor(bytes: &[u8], rows: usize, device: &Device) -> Result<Tensor> {
    if rows == 0 || !bytes.len().is_multiple_of(rows) {
        candle_core::bail!("{} bytes of blocks do not split into {rows} rows", bytes.len())
    }
    Tensor::from_raw_buffer(bytes, DType::U8, &[rows, bytes.len() / rows], device)
}

/// A `QTensor` `[rows, cols]` of `dtype` from its raw blocks, on `device`. The blocks are copied
/// into an 8-byte-aligned buffer first: candle reinterprets them as block structs in place.
pub fn qtensor(bytes: &[u8], dtype: GgmlDType, (rows, cols): (usize, usize), device: &Device) -> Result<QTensor> {
    let want = row_bytes(dtype, cols).map(|r| r * rows);
    if want != Some(bytes.len()) {
        candle_core::bail!("{} bytes are not a [{rows}, {cols}] matrix of {dtype:?} blocks", bytes.len())
    }
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `words` owns at least `bytes.len()` initialised bytes, and u8 has no alignment.
    let aligned = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes.len()) };
    aligned.copy_from_slice(bytes);
    QTensor::new(QStorage::from_data(Cow::Borrowed(aligned), device, dtype)?, (rows, cols))
}

/// Blocks of `dtype` holding a tensor of `shape`, dequantised to f32 on `device`. GGML's blocks
/// run over the elements in order, so any shape whose size they divide reads the same.
pub fn dequantise(bytes: &[u8], dtype: GgmlDType, shape: &[usize], device: &Device) -> Result<Tensor> {
    let elements: usize = shape.iter().product();
    qtensor(bytes, dtype, (1, elements), &Device::Cpu)?.dequantize(device)?.reshape(shape)
}

/// The weight `[outputs, inputs]` at `vb` (`<vb>.weight`) as the backend holds it quantised, if it
/// does: the first block type whose companion name it serves.
pub fn load(outputs: usize, inputs: usize, vb: &VarBuilder) -> Result<Option<QTensor>> {
    let Some((name, dtype)) = GGML_TYPES.iter().find_map(|t| match t.storage {
        Storage::Blocks(d) => Some(companion("weight", t)).filter(|n| vb.contains_tensor(n)).map(|n| (n, d)),
        _ => None,
    }) else {
        return Ok(None);
    };
    let check = |raw: &Tensor| {
        if raw.dims() != [outputs, row_bytes(dtype, inputs).unwrap_or(0)] {
            candle_core::bail!(
                "{}.{name} is {:?} bytes, not a [{outputs}, {inputs}] matrix of {dtype:?} blocks",
                vb.prefix(),
                raw.dims()
            )
        }
        Ok(())
    };
    // On CUDA the blocks come to the device as bytes (a streamed block's on the copy stream,
    // overlapping compute) and are copied there into candle's block storage: a round trip
    // through the host would be a synchronous pageable copy per weight.
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = vb.device() {
        let raw = vb.get_unchecked_dtype(&name, DType::U8)?;
        check(&raw)?;
        return super::cuda::qtensor_from_device(&raw, dtype, (outputs, inputs), dev).map(Some);
    }
    // Elsewhere the blocks come to the host, where a QTensor is built, then go to the run's device.
    let raw = vb.clone().set_device(Device::Cpu).get_unchecked_dtype(&name, DType::U8)?;
    check(&raw)?;
    let bytes = raw.flatten_all()?.to_vec1::<u8>()?;
    Ok(Some(qtensor(&bytes, dtype, (outputs, inputs), vb.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_numbers_each_type_once_and_knows_candles() {
        for t in GGML_TYPES {
            assert_eq!(GGML_TYPES.iter().filter(|u| u.id == t.id || u.name == t.name).count(), 1, "{}", t.name);
        }
        for d in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            assert_eq!(GgmlType::of(d).storage, Storage::Blocks(d));
        }
        assert_eq!(GgmlType::by_id(23).map(|t| t.name), Some("IQ4_XS"));
        assert_eq!(split_companion("a.weight@Q8_0").map(|(n, t)| (n, t.name)), Some(("a.weight", "Q8_0")));
        assert!(split_companion("a.weight").is_none() && split_companion("a.weight@F16").is_none());
    }

    #[test]
    fn a_companion_weight_loads_as_its_blocks() {
        let w = Tensor::randn(0f32, 1., (8, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let bytes = q.data().unwrap().into_owned();
        let served = blocks_tensor(&bytes, 8, &Device::Cpu).unwrap();
        let map = std::collections::HashMap::from([("l.weight@Q8_0".to_string(), served)]);
        let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        let loaded = load(8, 64, &vb.pp("l")).unwrap().expect("the companion is served");
        assert_eq!(loaded.dtype(), GgmlDType::Q8_0);
        let (a, b) = (loaded.dequantize(&Device::Cpu).unwrap(), q.dequantize(&Device::Cpu).unwrap());
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        assert!(load(8, 64, &vb.pp("other")).unwrap().is_none());
        assert!(load(8, 32, &vb.pp("l")).is_err(), "a weight of another shape is refused");
    }
}
