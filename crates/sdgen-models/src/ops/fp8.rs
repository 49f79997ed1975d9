//! fp8 weights: 8-bit floats (E4M3, "e4m3fn": 4 exponent bits, 3 mantissa bits, ±448 at most, no
//! infinities) with one f32 scale per tensor, as Stability's `sd3.5_large_fp8_scaled.safetensors`
//! and ComfyUI's `*_fp8_scaled` checkpoints store a denoiser's linear weights, and as
//! `--weights fp8` makes them.
//!
//! The convention (ComfyUI's `comfy/ops.py` `scaled_fp8_ops`, `comfy/model_detection.py`): a
//! linear layer's `<layer>.weight` is `F8_E4M3`, its f32 scalar `<layer>.scale_weight` beside it,
//! and a marker tensor `scaled_fp8` under the model's prefix says the file is scaled (its dtype is
//! the fp8 type; f32 means E4M3). The weight the layer multiplies is `weight.to(dtype) *
//! scale_weight.to(dtype)` in the compute dtype — [`Fp8Weight::dequantise`], bit for bit.
//! `<layer>.scale_input` scales the activations only for fp8×fp8 GEMMs (`torch._scaled_mm`),
//! which this build does not run: ComfyUI's dequantising path ignores it too. A checkpoint of plain
//! fp8 weights has no scales: scale 1.
//!
//! The seam is [`super::quantised`]'s: a backend that holds a weight in fp8 serves its bytes under
//! the companion name `<name>@F8_E4M3` (an `F8E4M3` tensor `[rows, cols]`) and its scale under
//! `<name>@scale` (an f32 scalar); [`load`], which `linear()` calls, asks for them, so the layer
//! keeps one byte a weight and dequantises it for each product (a 256-entry table on the CPU,
//! candle's fp8 cast then the scale on CUDA). Every other reader asks for the plain name and gets
//! the weight dequantised once.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use float8::F8E4M3;
use half::{bf16, f16};
use rayon::prelude::*;

/// The safetensors dtype of fp8 weights this build reads (E5M2 is refused: see the loader).
pub const STORED: &str = "F8_E4M3";

/// E4M3's largest finite value: `--weights fp8` scales each tensor's largest magnitude to it.
pub const E4M3_MAX: f32 = 448.0;

/// The companion name under which a backend serves `name`'s fp8 bytes.
pub fn companion(name: &str) -> String {
    format!("{name}@{STORED}")
}

/// The companion name under which a backend serves `name`'s scale (an f32 scalar).
pub fn scale_name(name: &str) -> String {
    format!("{name}@scale")
}

/// The tensor a companion name of this module stands for, and whether it asks for the scale.
pub fn split_companion(name: &str) -> Option<(&str, bool)> {
    let (base, what) = name.rsplit_once('@')?;
    match what {
        STORED => Some((base, false)),
        "scale" => Some((base, true)),
        _ => None,
    }
}

/// A matrix held as fp8 bytes with its per-tensor scale.
#[derive(Debug, Clone)]
pub struct Fp8Weight {
    /// `F8E4M3`; on CUDA the same bytes as `U8` (see [`Self::dequantise`]).
    bytes: Tensor,
    scale: f32,
    /// On CUDA, the dequantisation table in each dtype asked for (256 values, made once).
    tables: Arc<Mutex<Vec<Tensor>>>,
}

impl Fp8Weight {
    /// `bytes` (an `F8E4M3` tensor) times `scale`.
    pub fn new(bytes: Tensor, scale: f32) -> Result<Self> {
        if bytes.dtype() != DType::F8E4M3 {
            candle_core::bail!("fp8 weights must be F8E4M3, not {:?}", bytes.dtype())
        }
        if !scale.is_finite() {
            candle_core::bail!("an fp8 weight's scale must be finite, not {scale}")
        }
        #[cfg(feature = "cuda")]
        let bytes = if bytes.device().is_cuda() { super::cuda::bytes_as_u8(&bytes)? } else { bytes };
        Ok(Self { bytes, scale, tables: Arc::default() })
    }

    /// The stored bytes (`F8E4M3`; `U8` on CUDA).
    pub fn bytes(&self) -> &Tensor {
        &self.bytes
    }

    /// The per-tensor scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The weight in `dtype` on its device: `bytes.to(dtype) * scale.to(dtype)`, each product
    /// rounded to `dtype` once, as ComfyUI computes it.
    pub fn dequantise(&self, dtype: DType) -> Result<Tensor> {
        match self.bytes.device() {
            Device::Cpu => self.dequantise_cpu(dtype),
            // Each byte looked up in the CPU's table, uploaded once: the same values bit for bit.
            dev @ Device::Cuda(_) => {
                let table = self.table_on(dtype, dev)?;
                table.index_select(&self.bytes.flatten_all()?, 0)?.reshape(self.bytes.shape())
            }
            dev => {
                let scale = Tensor::new(self.scale, dev)?.to_dtype(dtype)?;
                self.bytes.to_dtype(dtype)?.broadcast_mul(&scale)
            }
        }
    }

    fn dequantise_cpu(&self, dtype: DType) -> Result<Tensor> {
        let bytes = self.bytes.flatten_all()?;
        let (storage, layout) = bytes.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("not on the CPU") };
        let all = cpu.as_slice::<F8E4M3>()?;
        let src = &all[layout.start_offset()..layout.start_offset() + bytes.elem_count()];
        let shape = self.bytes.shape();
        match scaled_table(self.scale, dtype)? {
            Scaled::F32(t) => Tensor::from_vec(map(src, &t), shape, &Device::Cpu),
            Scaled::BF16(t) => Tensor::from_vec(map(src, &t), shape, &Device::Cpu),
            Scaled::F16(t) => Tensor::from_vec(map(src, &t), shape, &Device::Cpu),
        }
    }

    /// The 256-value table of this weight in `dtype`, on `dev` (kept after the first use).
    fn table_on(&self, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = tables.iter().find(|t| t.dtype() == dtype) {
            return Ok(t.clone());
        }
        let host = match scaled_table(self.scale, dtype)? {
            Scaled::F32(t) => Tensor::new(&t, &Device::Cpu)?,
            Scaled::BF16(t) => Tensor::new(&t, &Device::Cpu)?,
            Scaled::F16(t) => Tensor::new(&t, &Device::Cpu)?,
        };
        let t = host.to_device(dev)?;
        tables.push(t.clone());
        Ok(t)
    }
}

/// Every E4M3 byte's value times a scale, in one dtype (a short-lived value: its size is the point).
#[allow(clippy::large_enum_variant)]
enum Scaled {
    F32([f32; 256]),
    BF16([bf16; 256]),
    F16([f16; 256]),
}

/// `byte.to(dtype) * scale.to(dtype)` for every byte, each product rounded to `dtype` once: the
/// one table the CPU maps through and CUDA looks bytes up in.
fn scaled_table(scale: f32, dtype: DType) -> Result<Scaled> {
    Ok(match dtype {
        DType::F32 => Scaled::F32(table(|v| v * scale)),
        DType::BF16 => {
            let s = bf16::from_f32(scale).to_f32();
            Scaled::BF16(table(|v| bf16::from_f32(v * s)))
        }
        DType::F16 => {
            let s = f16::from_f32(scale).to_f32();
            Scaled::F16(table(|v| f16::from_f32(v * s)))
        }
        other => candle_core::bail!("fp8 weights dequantise to f32, f16 or bf16, not {other:?}"),
    })
}

/// `f` of every E4M3 value, indexed by its byte. The product of an E4M3 value (4 significant
/// bits) and a 16-bit or 32-bit scale is exact in f32 for the 16-bit dtypes, so rounding it once
/// to the dtype is the dtype's own multiplication.
fn table<T: Copy + Default>(f: impl Fn(f32) -> T) -> [T; 256] {
    let mut t = [T::default(); 256];
    for (b, v) in t.iter_mut().enumerate() {
        *v = f(F8E4M3::from_bits(b as u8).to_f32());
    }
    t
}

/// Each byte of `src` looked up in `table`, on all cores for a large matrix.
fn map<T: Copy + Send + Sync>(src: &[F8E4M3], table: &[T; 256]) -> Vec<T> {
    const CHUNK: usize = 1 << 16;
    let mut out = Vec::with_capacity(src.len());
    // SAFETY: every element is written below before the vector is read; T is Copy.
    #[allow(clippy::uninit_vec)]
    unsafe {
        out.set_len(src.len())
    };
    out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, s)| {
        for (o, s) in o.iter_mut().zip(s) {
            *o = table[s.to_bits() as usize];
        }
    });
    out
}

/// `w` (any float tensor) as fp8 bytes and their scale by the scaled checkpoints' rule: the
/// scale is the tensor's largest magnitude ÷ 448 (in f32), each value divided by it, clamped to
/// ±448 and rounded to the nearest E4M3 (ties to even), as `(w / scale).clamp(-448,
/// 448).to(torch.float8_e4m3fn)`. An all-zero tensor gets scale 1.
pub fn quantise(w: &Tensor) -> Result<(Vec<u8>, f32)> {
    let scale = scale_for(absmax(w)?)?;
    Ok((quantise_with(w, scale)?, scale))
}

/// The largest magnitude in `w`.
pub fn absmax(w: &Tensor) -> Result<f32> {
    w.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// The scale of a tensor (or of the tensors sharing one) whose largest magnitude is `absmax`.
pub fn scale_for(absmax: f32) -> Result<f32> {
    if !absmax.is_finite() {
        candle_core::bail!("cannot quantise a tensor holding {absmax} to fp8")
    }
    Ok(if absmax == 0.0 { 1.0 } else { absmax / E4M3_MAX })
}

/// `w`'s fp8 bytes under `scale` (see [`quantise`]).
pub fn quantise_with(w: &Tensor, scale: f32) -> Result<Vec<u8>> {
    let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.par_iter().map(|v| F8E4M3::from_f32((v / scale).clamp(-E4M3_MAX, E4M3_MAX)).to_bits()).collect())
}

/// Raw fp8 bytes as the `F8E4M3` tensor of `shape` a backend serves under a companion name.
pub fn bytes_tensor(bytes: &[u8], shape: &[usize], device: &Device) -> Result<Tensor> {
    Tensor::from_raw_buffer(bytes, DType::F8E4M3, shape, device)
}

/// The weight `[outputs, inputs]` at `vb` (`<vb>.weight`) as the backend holds it in fp8, if it
/// does.
pub fn load(outputs: usize, inputs: usize, vb: &VarBuilder) -> Result<Option<Fp8Weight>> {
    let name = companion("weight");
    if !vb.contains_tensor(&name) {
        return Ok(None);
    }
    let bytes = vb.get_unchecked_dtype(&name, DType::F8E4M3)?;
    if bytes.dims() != [outputs, inputs] || bytes.dtype() != DType::F8E4M3 {
        candle_core::bail!(
            "{}.weight is {:?} {:?}, not a [{outputs}, {inputs}] fp8 matrix",
            vb.prefix(),
            bytes.dtype(),
            bytes.dims()
        )
    }
    // Read on the host: on a GPU, reading it back from the device would wait for all the work
    // queued there (a streamed block is built while the one before it computes).
    let scale = vb.clone().set_device(Device::Cpu).get_unchecked_dtype(&scale_name("weight"), DType::F32)?;
    let scale = scale.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let [scale] = scale[..] else {
        candle_core::bail!("{}.weight's fp8 scale holds {} values, not one", vb.prefix(), scale.len())
    };
    Fp8Weight::new(bytes, scale).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_dequantises_as_its_value_times_the_scale() {
        let bytes: Vec<u8> = (0..=255).collect();
        let w = Fp8Weight::new(bytes_tensor(&bytes, &[16, 16], &Device::Cpu).unwrap(), 0.01).unwrap();
        let f32s = w.dequantise(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = Tensor::new(0.01f32, &Device::Cpu).unwrap();
        let stock = w.bytes().to_dtype(DType::F32).unwrap().broadcast_mul(&scale).unwrap();
        let stock = stock.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (b, (a, s)) in f32s.iter().zip(&stock).enumerate() {
            // 0x7f and 0xff are E4M3's NaNs.
            assert!(a.to_bits() == s.to_bits() || (a.is_nan() && s.is_nan()), "byte {b:#x}: {a} vs {s}");
        }
        assert_eq!(f32s[0x7e], 448.0 * 0.01, "the largest finite value");
        let b = w.dequantise(DType::BF16).unwrap().flatten_all().unwrap().to_vec1::<bf16>().unwrap();
        let s = bf16::from_f32(0.01);
        assert_eq!(b[0x38], s, "1.0 times the bf16 scale");
        assert_eq!(b[0x40], bf16::from_f32(2.0 * s.to_f32()));
    }

    #[test]
    fn quantising_scales_the_largest_value_to_448() {
        let w = Tensor::new(&[[0.5f32, -2.0], [0.25, 1e-6]], &Device::Cpu).unwrap();
        let (bytes, scale) = quantise(&w).unwrap();
        assert_eq!(scale, 2.0 / 448.0);
        let back = Fp8Weight::new(bytes_tensor(&bytes, &[2, 2], &Device::Cpu).unwrap(), scale).unwrap();
        let back = back.dequantise(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(back[0][1], -2.0);
        assert!((back[0][0] - 0.5).abs() <= 0.5 / 16.0, "{back:?}");
        assert_eq!(quantise(&Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()).unwrap(), (vec![0; 4], 1.0));
        assert_eq!(split_companion("a.weight@F8_E4M3"), Some(("a.weight", false)));
        assert_eq!(split_companion("a.weight@scale"), Some(("a.weight", true)));
        assert_eq!(split_companion("a.weight@Q8_0"), None);
    }

    /// A loader rearranges fp8 bytes as it does any tensor (SD 3's swapped modulation halves).
    #[test]
    fn fp8_bytes_narrow_and_concatenate() {
        let bytes: Vec<u8> = (0..16).collect();
        let t = bytes_tensor(&bytes, &[4, 4], &Device::Cpu).unwrap();
        let swapped = Tensor::cat(&[t.narrow(0, 2, 2).unwrap(), t.narrow(0, 0, 2).unwrap()], 0).unwrap();
        let w = Fp8Weight::new(swapped, 1.0).unwrap().dequantise(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let want = |b: u8| F8E4M3::from_bits(b).to_f32();
        assert_eq!((w[0][0], w[3][3]), (want(8), want(7)));
    }
}
