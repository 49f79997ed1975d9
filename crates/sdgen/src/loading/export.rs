//! Writing a 16/32-bit model's denoiser as the quantised files ComfyUI users run, made by the
//! product's own readers and quantisers — for benchmarks of those formats on a machine that can
//! download nothing (`sdgen-bench --export`: the files are made from a folder of random weights):
//!
//! - `q8_0`: a Q8_0 GGUF in city96's layout (the MMDiT alone, under the original checkpoint's
//!   names without `model.diffusion_model.`, `general.architecture` `sd3`; what `gguf.rs` reads,
//!   with `--config-from` the folder for the rest of the pipeline);
//! - `fp8-scaled`: a single-file checkpoint in Stability's / ComfyUI's fp8-scaled layout (the
//!   MMDiT's linear weights in E4M3 with an f32 `scale_weight` each and the `scaled_fp8` marker,
//!   the VAE under `first_stage_model.`; what `single_file/fp8.rs` reads), its text encoders in
//!   `text_encoders/` beside it as Stability publishes them (hard links to the folder's files
//!   where those are the same tensors under the same names).
//!
//! Which layers are quantised, and to what bytes, is `--weights q8|fp8`'s rule
//! ([`quantise::quantised_type`], city96's), applied to the tensors as the original layout
//! stores them: a fused q/k/v is one stored tensor (one fp8 scale: its largest magnitude ÷ 448),
//! the halves of an `adaLN_modulation` swapped back. So the files are those the reference scripts
//! make from the same weights (`tools/reference/make_gguf.py`, `make_fp8.py`): candle's Q8_0
//! blocks equal the `gguf` package's, and the fp8 rule is torch's.
//!
//! Only SD 3.5's MMDiT is written: the UNets' GGUFs reshape tensors (`comfy.gguf.orig_shape`) and
//! their single files hold their text encoders inside, neither of which is built here.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use sdgen_models::ops::fp8;
use sdgen_models::ops::quantised::GgmlType;

use super::family::DenoiserArch;
use super::quantise::{self, HeldAs, Quantise};
use super::single_file::rules::{self, Ctx, Take, Target};
use super::single_file::{model_config, ComponentLayout};
use super::{gguf, ModelFolder};
use crate::output::atomic::TempFile;
use crate::{Error, Result};

/// The file formats [`export`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A Q8_0 GGUF of the denoiser (city96's layout).
    GgufQ8_0,
    /// An fp8-scaled single-file checkpoint (Stability's / ComfyUI's layout).
    Fp8Scaled,
}

impl ExportFormat {
    /// Every format, for messages.
    pub const ALL: [ExportFormat; 2] = [ExportFormat::GgufQ8_0, ExportFormat::Fp8Scaled];

    /// The name the bench's flag takes.
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::GgufQ8_0 => "q8_0",
            ExportFormat::Fp8Scaled => "fp8-scaled",
        }
    }

    /// What the layers are quantised to (the `--weights` rule of the same bytes).
    fn quantise(self) -> Quantise {
        match self {
            ExportFormat::GgufQ8_0 => Quantise::Q8,
            ExportFormat::Fp8Scaled => Quantise::Fp8,
        }
    }
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|f| f.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            format!(
                "`{s}` is not an export format: q8_0 (a Q8_0 GGUF of the denoiser) or fp8-scaled (an fp8-scaled \
                 single-file checkpoint)"
            )
        })
    }
}

/// What [`export`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    /// The file (a GGUF, or the checkpoint).
    pub path: PathBuf,
    /// Its bytes.
    pub file_bytes: u64,
    /// Tensors written by stored type (`{"F16": 11, "F32": 535, "Q8_0": 377}`), the denoiser's.
    pub types: BTreeMap<String, usize>,
    /// Files written or linked beside it (the fp8 checkpoint's text encoders).
    pub beside: Vec<PathBuf>,
}

/// Writes `model`'s denoiser as `format` to `out` (and, for a checkpoint, what it needs beside
/// it). Refused, by name, for a model whose weights are quantised already and for a family other
/// than SD 3.5.
pub fn export(model: &ModelFolder, format: ExportFormat, out: &Path) -> Result<Exported> {
    let refuse =
        |why: String| Err(Error::InvalidInput(format!("cannot write {} as {}: {why}", out.display(), format.name())));
    if let Some((c, kind)) = model.checkpoint().and_then(|c| c.quantised_kind().map(|k| (c, k))) {
        return refuse(format!("{} is {kind}, quantised already; give the model's 16-bit weights", c.path.display()));
    }
    if let Some(q) = model.quantise() {
        return refuse(format!(
            "the model quantises as it loads (weights {}); the files are made from its stored weights",
            q.name()
        ));
    }
    let family = model.family();
    let layout = family.single_file.filter(|_| family.denoiser.arch == DenoiserArch::SD3Transformer2D);
    let Some(layout) = layout else {
        return refuse(format!(
            "{} is not supported: only SD 3.5's MMDiT is written (Large or Medium)",
            family.display
        ));
    };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    match format {
        ExportFormat::GgufQ8_0 => {
            let denoiser = component_layout(layout.components, family.denoiser.component);
            let tensors: Vec<OriginalTensor> = original_tensors(model, denoiser, Some(format.quantise()))?
                .into_par_iter()
                .map(OriginalTensor::into_published_gguf)
                .collect::<Result<_>>()?;
            let types = count_types(&tensors);
            write_gguf(out, layout.gguf_architecture, &tensors)?;
            Ok(Exported { path: out.to_path_buf(), file_bytes: file_bytes(out)?, types, beside: Vec::new() })
        }
        ExportFormat::Fp8Scaled => write_fp8_checkpoint(model, layout.components, format.quantise(), out),
    }
}

/// The fp8-scaled checkpoint: the models the layout keeps in the file under their prefixes (the
/// denoiser quantised, with the `scaled_fp8` marker), those it keeps beside it in their files.
fn write_fp8_checkpoint(
    model: &ModelFolder,
    components: &'static [ComponentLayout],
    quantise: Quantise,
    out: &Path,
) -> Result<Exported> {
    let denoiser = model.family().denoiser.component;
    let (mut file, mut types, mut beside) = (HashMap::new(), BTreeMap::new(), Vec::new());
    for c in components {
        if let Some(b) = &c.beside {
            // A folder without an optional encoder (T5) is written without it.
            if model.has_component(c.component) && model.unavailable(c.component).is_none() {
                let dest = out.parent().unwrap_or(Path::new(".")).join(b.folder).join(b.files[0]);
                write_beside(model, c, &dest)?;
                beside.push(dest);
            }
            continue;
        }
        let quantise = (c.component == denoiser).then_some(quantise);
        let tensors = original_tensors(model, c, quantise)?;
        if quantise.is_some() {
            types = count_types(&tensors);
            file.insert(format!("{}scaled_fp8", c.prefix), fp8::bytes_tensor(&[0, 0], &[2], &Device::Cpu)?);
        }
        for t in tensors {
            t.insert_into(&mut file, c.prefix)?;
        }
    }
    save_safetensors(&file, out)?;
    Ok(Exported { path: out.to_path_buf(), file_bytes: file_bytes(out)?, types, beside })
}

fn component_layout(components: &'static [ComponentLayout], component: &str) -> &'static ComponentLayout {
    components.iter().find(|c| c.component == component).expect("a family's layout holds its components")
}

fn file_bytes(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len())
}

fn count_types(tensors: &[OriginalTensor]) -> BTreeMap<String, usize> {
    let mut types = BTreeMap::new();
    for t in tensors {
        *types.entry(t.data.type_name().to_string()).or_default() += 1;
    }
    types
}

/// One tensor as the original layout stores it: its key (without the component's prefix), its
/// shape, and its data.
struct OriginalTensor {
    key: String,
    shape: Vec<usize>,
    data: Stored,
}

/// A stored tensor's data.
enum Stored {
    /// 16/32-bit values as read.
    Dense(Tensor),
    /// GGML blocks.
    Blocks(GgmlDType, Vec<u8>),
    /// E4M3 bytes and their scale.
    Fp8(Vec<u8>, f32),
}

impl Stored {
    fn type_name(&self) -> &'static str {
        match self {
            Stored::Dense(t) => dense_type(t.dtype()).name,
            Stored::Blocks(d, _) => GgmlType::of(*d).name,
            Stored::Fp8(..) => fp8::STORED,
        }
    }
}

impl OriginalTensor {
    /// A dense tensor in the type city96's published SD 3.5 conversions store it in: they were
    /// quantised from a 16-bit base (`sd3.5_large-F16.gguf`) that his `convert.py` writes with
    /// one-dimensional and very small tensors in F32 and the rest in F16. Both are types every
    /// reader passes through as plain tensors; BF16 ones would not load in diffusers' GGUF reader
    /// (it keeps them as quantised parameters, which a convolution or a norm cannot take). A
    /// 32-bit source keeps F32 (lossless, as the reference script writes the tiny models), and so
    /// does a tensor with a value beyond F16's range, which F16 would turn into infinity.
    fn into_published_gguf(self) -> Result<OriginalTensor> {
        let Stored::Dense(t) = &self.data else { return Ok(self) };
        let small = self.shape.len() == 1 || t.elem_count() <= CITY96_F32_MAX_ELEMENTS;
        let beyond_f16 = || -> Result<bool> {
            let largest = t.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            Ok(largest > half::f16::MAX.to_f32())
        };
        let dtype = if small || t.dtype() == DType::F32 || beyond_f16()? { DType::F32 } else { DType::F16 };
        Ok(OriginalTensor { data: Stored::Dense(t.to_dtype(dtype)?), ..self })
    }

    /// Adds the tensor to a safetensors file's map under `prefix` (an fp8 weight with its
    /// `scale_weight` beside it).
    fn insert_into(self, file: &mut HashMap<String, Tensor>, prefix: &str) -> Result<()> {
        let key = format!("{prefix}{}", self.key);
        let tensor = match self.data {
            Stored::Dense(t) => t,
            Stored::Fp8(bytes, scale) => {
                let layer = key.strip_suffix("weight").expect("fp8 weights are `.weight`s");
                file.insert(format!("{layer}scale_weight"), Tensor::new(scale, &Device::Cpu)?);
                fp8::bytes_tensor(&bytes, &self.shape, &Device::Cpu)?
            }
            Stored::Blocks(..) => unreachable!("GGML blocks are written to GGUFs only"),
        };
        file.insert(key, tensor);
        Ok(())
    }
}

/// city96's `convert.py` keeps tensors of at most this many elements in F32 (its
/// `QUANTIZATION_THRESHOLD`), as it does every one-dimensional tensor.
const CITY96_F32_MAX_ELEMENTS: usize = 1024;

/// The GGUF type of a dense tensor's dtype (F32, F16 or BF16).
fn dense_type(dtype: DType) -> &'static GgmlType {
    let name = match dtype {
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        _ => "F32",
    };
    GgmlType::by_name(name).expect("the float types are GGML types")
}

/// `layout`'s component of `model` under the original names, each stored tensor rebuilt from the
/// diffusers tensors it is made of and, when `quantise` is given, quantised by its rule. Built in
/// parallel (one stored tensor a task), in key order.
fn original_tensors(
    model: &ModelFolder,
    layout: &ComponentLayout,
    quantise: Option<Quantise>,
) -> Result<Vec<OriginalTensor>> {
    let weights = model.weights(layout.component)?;
    let infos: BTreeMap<&String, &super::TensorInfo> = weights.headers.iter().flat_map(|h| h.tensors.iter()).collect();
    let ctx = model_config(model.root(), layout)?
        .ctx()
        .map_err(|e| Error::BadModel(format!("{}/{}/config.json: {e}", model.root().display(), layout.component)))?;
    let stored = stored_keys(layout.rules, &ctx, infos.keys().map(|n| n.as_str()))
        .map_err(|e| Error::BadModel(format!("{}: {e}", weights.describe())))?;
    let backend = weights.backend(false)?;
    let arch = model.family().denoiser.arch;
    stored
        .into_par_iter()
        .map(|(key, pieces)| {
            let info = infos[&pieces[0].name];
            let dtype = super::read_backend::candle_dtype(&info.dtype)
                .filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16))
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "{}: `{}` is stored as {}, not 16/32-bit floats: the files are made from unquantised weights",
                        weights.describe(),
                        pieces[0].name,
                        info.dtype
                    ))
                })?;
            let tensor = assemble(&pieces, |name| backend.get_unchecked(name, dtype, &Device::Cpu))?;
            let shape = tensor.dims().to_vec();
            let as_stored = super::TensorInfo { dtype: info.dtype.clone(), shape: shape.clone(), data_offsets: (0, 0) };
            let held = quantise.and_then(|q| quantise::quantised_type(arch, q, &pieces[0].name, &as_stored));
            let data = match held {
                None => Stored::Dense(tensor),
                Some(HeldAs::Blocks(d)) => {
                    Stored::Blocks(d, QTensor::quantize(&tensor.to_dtype(DType::F32)?, d)?.data()?.into_owned())
                }
                Some(HeldAs::Fp8) => {
                    let (bytes, scale) = fp8::quantise(&tensor)?;
                    Stored::Fp8(bytes, scale)
                }
            };
            Ok(OriginalTensor { key, shape, data })
        })
        .collect()
}

/// The original keys of the diffusers tensors `names` (by `rules`), each with the diffusers
/// tensors it is made of, in the order the forward rules take them. A name no rule writes, or a
/// stored tensor missing one of its pieces, is an error naming it.
fn stored_keys<'a>(
    rules: &[rules::Rule],
    ctx: &Ctx,
    names: impl Iterator<Item = &'a str>,
) -> std::result::Result<BTreeMap<String, Vec<Target>>, String> {
    let names: Vec<&str> = names.collect();
    let mut out = BTreeMap::new();
    for name in &names {
        let key = rules::to_original(rules, ctx, name)
            .ok_or_else(|| format!("`{name}` has no name in the original layout"))?;
        if out.contains_key(&key) {
            continue;
        }
        let pieces = rules::to_diffusers(rules, ctx, &key);
        if let Some(missing) = pieces.iter().find(|p| !names.contains(&p.name.as_str())) {
            return Err(format!("`{key}` is made of `{}` too, which is missing", missing.name));
        }
        out.insert(key, pieces);
    }
    Ok(out)
}

/// The stored tensor made of `pieces` (read by diffusers name): the inverse of each [`Take`].
fn assemble(pieces: &[Target], read: impl Fn(&str) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
    if let [one] = pieces {
        let t = read(&one.name)?;
        return match one.take {
            // An attention projection the original stores as a 1×1 convolution.
            Take::Whole if one.conv_to_linear && t.rank() == 2 => {
                let (rows, cols) = t.dims2()?;
                t.reshape((rows, cols, 1, 1))
            }
            Take::Whole => Ok(t),
            Take::Transposed => t.t()?.contiguous(),
            Take::SwapHalves => {
                let half = t.dim(0)? / 2;
                Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)
            }
            Take::Chunk { .. } | Take::Identity => candle_core::bail!("`{}` is a piece without its siblings", one.name),
        };
    }
    let mut ordered: Vec<(usize, &Target)> = pieces
        .iter()
        .map(|p| match p.take {
            Take::Chunk { index, of } if of == pieces.len() => Ok((index, p)),
            _ => candle_core::bail!("`{}` is not one of {} equal pieces", p.name, pieces.len()),
        })
        .collect::<candle_core::Result<_>>()?;
    ordered.sort_by_key(|(i, _)| *i);
    let parts = ordered.iter().map(|(_, p)| read(&p.name)).collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// A text encoder beside the checkpoint, under its own names: the folder's file linked when it
/// holds exactly those tensors under those names (no copy of T5's 9.5 GB), else written.
fn write_beside(model: &ModelFolder, layout: &ComponentLayout, dest: &Path) -> Result<()> {
    let weights = model.weights(layout.component)?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let ctx = Ctx::default();
    let same_names = weights
        .headers
        .iter()
        .flat_map(|h| h.tensors.keys())
        .all(|n| rules::to_original(layout.rules, &ctx, n).as_deref() == Some(n.as_str()));
    if let ([file], None, true) = (&weights.files[..], weights.single_file_view(), same_names) {
        let _ = std::fs::remove_file(dest);
        if std::fs::hard_link(file, dest).is_ok() {
            return Ok(());
        }
    }
    let mut out = HashMap::new();
    for t in original_tensors(model, layout, None)? {
        t.insert_into(&mut out, "")?;
    }
    save_safetensors(&out, dest)
}

/// Saves `tensors` to `path`. The safetensors writer itself writes a temporary beside `path` and
/// renames it into place: an interrupted or failed write leaves neither a file that looks finished
/// nor the temporary.
fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::BadModel(format!("writing {}: {e}", path.display())))
}

/// The folder `path` is written in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// The data section's alignment (the format's default; `general.alignment` is not written).
const ALIGNMENT: usize = 32;
/// `general.file_type` of a mostly-Q8_0 file (llama.cpp's `LLAMA_FTYPE_MOSTLY_Q8_0`).
const FILE_TYPE_MOSTLY_Q8_0: u32 = 7;
/// `general.quantization_version` (ggml's `GGML_QNT_VERSION`).
const QUANTIZATION_VERSION: u32 = 2;

/// Writes a GGUF (version 3, little-endian) of `tensors` in the order given, as the `gguf`
/// package's `GGUFWriter` lays one out: the architecture, quantisation version and file type,
/// the tensor directory (dimensions innermost first), then each tensor's data padded to 32 bytes.
fn write_gguf(path: &Path, architecture: &str, tensors: &[OriginalTensor]) -> Result<()> {
    let (temp, file) = TempFile::create(parent_dir(path), "gguf")?;
    let io = |e| Error::io(temp.path(), e);
    let mut w = std::io::BufWriter::with_capacity(1 << 24, file);
    let mut header = Vec::new();
    header.extend_from_slice(gguf::MAGIC);
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&3u64.to_le_bytes());
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    // Metadata value types: 8 a string, 4 a u32.
    string(&mut header, gguf::ARCHITECTURE_KEY);
    header.extend_from_slice(&8u32.to_le_bytes());
    string(&mut header, architecture);
    for (key, value) in
        [("general.quantization_version", QUANTIZATION_VERSION), ("general.file_type", FILE_TYPE_MOSTLY_Q8_0)]
    {
        string(&mut header, key);
        header.extend_from_slice(&4u32.to_le_bytes());
        header.extend_from_slice(&value.to_le_bytes());
    }
    let data: Vec<(&OriginalTensor, std::borrow::Cow<[u8]>, u32)> = tensors
        .par_iter()
        .map(|t| {
            Ok(match &t.data {
                Stored::Dense(d) => (t, dense_bytes(d)?.into(), dense_type(d.dtype()).id),
                Stored::Blocks(d, bytes) => (t, bytes.as_slice().into(), GgmlType::of(*d).id),
                Stored::Fp8(..) => unreachable!("fp8 is written to safetensors only"),
            })
        })
        .collect::<Result<_>>()?;
    let mut offset = 0u64;
    for (t, bytes, type_id) in &data {
        string(&mut header, &t.key);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        header.extend_from_slice(&type_id.to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset += bytes.len().next_multiple_of(ALIGNMENT) as u64;
    }
    header.resize(header.len().next_multiple_of(ALIGNMENT), 0);
    w.write_all(&header).map_err(io)?;
    let zeros = [0u8; ALIGNMENT];
    for (_, bytes, _) in &data {
        w.write_all(bytes).map_err(io)?;
        w.write_all(&zeros[..bytes.len().next_multiple_of(ALIGNMENT) - bytes.len()]).map_err(io)?;
    }
    // No fsync: the rename below is what keeps an interrupted write from looking finished.
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(temp.path(), path).map_err(|e| Error::io(path, e))
}

/// A dense tensor's little-endian bytes in its own dtype.
fn dense_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        _ => t.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_named_and_others_refused() {
        assert_eq!("Q8_0".parse::<ExportFormat>(), Ok(ExportFormat::GgufQ8_0));
        assert_eq!("fp8-scaled".parse::<ExportFormat>(), Ok(ExportFormat::Fp8Scaled));
        let e = "q4_k".parse::<ExportFormat>().unwrap_err();
        assert!(e.contains("`q4_k`") && e.contains("q8_0") && e.contains("fp8-scaled"), "{e}");
    }

    /// At SD 3.5 Large's real size (the released `sd3.5_large.safetensors`' 923 MMDiT tensors,
    /// `testdata/tiny-sd35-single/sd35-large-real-keys.json`): diffusers' tensors give back exactly
    /// the released file's keys, each fused q/k/v from its three pieces in order; and the rule
    /// quantises exactly the stored tensors city96's converter does (the 2-D weights but the
    /// embeddings and the final layer; `make_gguf.py`'s list, in the original names).
    #[test]
    fn the_released_large_layout_is_written_back_whole() {
        use serde_json::Value;
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-sd35-single/sd35-large-real-keys.json");
        let real: BTreeMap<String, Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let pieces_of = |v: &Value| -> Vec<String> {
            match &v[2] {
                Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
                x => vec![x.as_str().unwrap().to_string()],
            }
        };
        let names: Vec<String> = real.values().flat_map(pieces_of).collect();
        let ctx = Ctx { blocks: 38, ..Ctx::default() };
        let stored = stored_keys(rules::MMDIT, &ctx, names.iter().map(String::as_str)).unwrap();
        let prefix = "model.diffusion_model.";
        let keys: Vec<String> = real.keys().map(|k| k.strip_prefix(prefix).unwrap().to_string()).collect();
        assert_eq!(stored.keys().cloned().collect::<Vec<_>>(), keys);
        const CITY96_KEEPS: [&str; 6] =
            ["t_embedder.", "y_embedder.", "context_embedder.", "x_embedder.", "pos_embed", "final_layer."];
        let mut quantised = 0;
        for (key, pieces) in &stored {
            let v = &real[&format!("{prefix}{key}")];
            assert_eq!(pieces.iter().map(|p| p.name.clone()).collect::<Vec<_>>(), pieces_of(v), "{key}");
            let shape: Vec<usize> = v[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let info = super::super::TensorInfo { dtype: v[0].as_str().unwrap().into(), shape, data_offsets: (0, 0) };
            let q = quantise::quantised_type(DenoiserArch::SD3Transformer2D, Quantise::Q8, &pieces[0].name, &info);
            let city96 =
                info.shape.len() == 2 && key.ends_with("weight") && !CITY96_KEEPS.iter().any(|p| key.starts_with(p));
            assert_eq!(q.is_some(), city96, "{key}");
            quantised += usize::from(city96);
        }
        // 38 blocks × (x and context: qkv, proj, fc1, fc2, adaLN), but the last context block
        // (qkv and adaLN only).
        assert_eq!(quantised, 38 * 10 - 3);
    }

    /// A 16-bit source's dense tensors are written as the published conversions hold them:
    /// one-dimensional and tiny ones in F32, the rest in F16 with the source's values (bf16 values
    /// in F16's range are exact in it), unless a value is beyond F16's range; an f32 source's stay
    /// F32; GGML blocks are untouched.
    #[test]
    fn dense_tensors_take_the_published_files_types() {
        let dense = |shape: &[usize], dtype, scale: f64| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.37).sin() * 1e-3) + 2e-5).collect();
            let t = (Tensor::from_vec(values, shape, &Device::Cpu).unwrap() * scale).unwrap().to_dtype(dtype).unwrap();
            OriginalTensor { key: "k".into(), shape: shape.to_vec(), data: Stored::Dense(t) }
        };
        let written = |t: OriginalTensor| {
            let values = |d: &Stored| match d {
                Stored::Dense(t) => t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                _ => Vec::new(),
            };
            let before = values(&t.data);
            let out = t.into_published_gguf().unwrap();
            let after = values(&out.data);
            assert_eq!(before.len(), after.len());
            let exact = before.iter().zip(&after).all(|(b, a)| a == b || (a - b).abs() <= 6e-8);
            assert!(exact, "values changed beyond F16 subnormal rounding");
            out.data.type_name()
        };
        assert_eq!(written(dense(&[2432], DType::BF16, 1.0)), "F32");
        assert_eq!(written(dense(&[16, 64], DType::BF16, 1.0)), "F32");
        assert_eq!(written(dense(&[1, 1025], DType::BF16, 1.0)), "F16");
        assert_eq!(written(dense(&[64, 2432], DType::BF16, 1.0)), "F16");
        assert_eq!(written(dense(&[2432, 16, 2, 2], DType::F16, 1.0)), "F16");
        assert_eq!(written(dense(&[64, 2432], DType::BF16, 1e8)), "F32", "beyond F16's range");
        assert_eq!(written(dense(&[64, 2432], DType::F32, 1.0)), "F32");
        let blocks =
            OriginalTensor { key: "k".into(), shape: vec![1, 32], data: Stored::Blocks(GgmlDType::Q8_0, vec![0; 34]) };
        assert_eq!(written(blocks), "Q8_0");
    }

    /// Each take's inverse gives back the stored tensor the forward rules read.
    #[test]
    fn assembling_inverts_each_take() {
        let dev = &Device::Cpu;
        let stored = Tensor::arange(0f32, 24., dev).unwrap().reshape((6, 4)).unwrap();
        let target = |name: &str, take| Target { name: name.into(), take, conv_to_linear: false };
        let pieces: Vec<Target> =
            (0..3).rev().map(|i| target(&format!("p{i}"), Take::Chunk { index: i, of: 3 })).collect();
        let chunk = |name: &str| {
            let i: usize = name[1..].parse().unwrap();
            stored.narrow(0, 2 * i, 2)
        };
        let back = assemble(&pieces, chunk).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), stored.to_vec2::<f32>().unwrap());
        let swapped = Tensor::cat(&[stored.narrow(0, 3, 3).unwrap(), stored.narrow(0, 0, 3).unwrap()], 0).unwrap();
        let back = assemble(&[target("s", Take::SwapHalves)], |_| Ok(swapped.clone())).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), stored.to_vec2::<f32>().unwrap());
        let back = assemble(&[target("t", Take::Transposed)], |_| stored.t()).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), stored.to_vec2::<f32>().unwrap());
        let conv = Target { conv_to_linear: true, ..target("c", Take::Whole) };
        assert_eq!(assemble(&[conv], |_| Ok(stored.clone())).unwrap().dims(), &[6, 4, 1, 1]);
        assert!(assemble(&pieces[..2], chunk).is_err(), "two of three pieces");
    }
}
