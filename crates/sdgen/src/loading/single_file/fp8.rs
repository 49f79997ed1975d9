//! fp8 denoisers in single files: Stability's `sd3.5_large_fp8_scaled.safetensors`, ComfyUI's
//! `*_fp8_scaled` checkpoints and plain fp8 ones (see [`sdgen_models::ops::fp8`] for the format).
//!
//! The file's extra tensors are ComfyUI's (`comfy/model_detection.py`, `comfy/ops.py`): the marker
//! `<prefix>scaled_fp8` (its dtype the weights' fp8 type, f32 meaning E4M3), and beside a linear
//! layer's fp8 `<layer>.weight` its f32 scalar `<layer>.scale_weight` (and maybe
//! `<layer>.scale_input`). They are not renamed with the model's tensors: each scale is served
//! beside the weight it scales, under the weight's diffusers name (`<name>@scale`), so the pieces
//! of a fused weight (SD 3's `attn.qkv` → `to_q`, `to_k`, `to_v`) each get the fused tensor's
//! scale.
//!
//! What is refused, naming the tensor: fp8 outside the denoiser (the text encoders' fp8 files:
//! use their 16-bit ones), E5M2 weights or an E5M2 marker (decided: the published scaled files
//! are E4M3, which has a mantissa bit more; candle has no E5M2 type, so no CUDA cast either),
//! an fp8 weight of a scaled file without its scale, a scale that is not one float, and a scale
//! beside a weight that is not an fp8 matrix (ComfyUI scales linear layers only: anything else
//! would be read differently from how ComfyUI reads it).

use std::collections::BTreeMap;
use std::path::Path;

use sdgen_models::ops::fp8;

use super::Source;
use crate::loading::TensorInfo;
use crate::{Error, Result};

/// The marker's name under the model's prefix.
const MARKER: &str = "scaled_fp8";
/// Suffixes of a layer's scales.
const SCALE_WEIGHT: &str = "scale_weight";
const SCALE_INPUT: &str = "scale_input";

/// Whether `key` (under the model's prefix) is one of the format's extra tensors, which the
/// renaming rules do not see.
pub(super) fn is_extra(key: &str) -> bool {
    key == MARKER || [SCALE_WEIGHT, SCALE_INPUT].iter().any(|s| key.strip_suffix(s).is_some_and(|l| l.ends_with('.')))
}

/// Whether a header dtype is an 8-bit float.
pub(crate) fn is_fp8(dtype: &str) -> bool {
    dtype.starts_with("F8_")
}

/// Name endings (diffusers' names) of the matrices read as embedding tables, not linear layers:
/// dequantised once as they load, so never held in fp8 (ComfyUI's plain fp8 T5 stores its token
/// and relative-position tables in fp8 too).
const EMBEDDING_TABLES: &[&str] = &["shared.weight", "embed_tokens.weight", "relative_attention_bias.weight"];

/// Whether a tensor stored as `info` under the diffusers name `name` is held as fp8 bytes once
/// loaded: an E4M3 matrix that is a linear layer's weight (what `linear()` keeps).
pub(crate) fn held_in_fp8(name: &str, info: &TensorInfo) -> bool {
    info.dtype == fp8::STORED
        && info.shape.len() == 2
        && name.ends_with(".weight")
        && !EMBEDDING_TABLES.iter().any(|table| name.ends_with(table))
}

/// Checks a denoiser's fp8 tensors against the format and returns the scale entries to serve
/// beside them (`<name>@scale`). `tensors` are the file's (original names), `renamed` and
/// `sources` the denoiser's by diffusers name.
pub(super) fn scales(
    path: &Path,
    tensors: &BTreeMap<String, TensorInfo>,
    prefix: &str,
    renamed: &BTreeMap<String, TensorInfo>,
    sources: &BTreeMap<String, Source>,
) -> Result<BTreeMap<String, TensorInfo>> {
    let bad = |what: String| Error::BadModel(format!("{}: {what}", path.display()));
    let marker = tensors.get(&format!("{prefix}{MARKER}"));
    if let Some(m) = marker.filter(|m| m.dtype != "F32" && m.dtype != fp8::STORED) {
        return Err(bad(format!(
            "its `{prefix}{MARKER}` marks its weights as {}, which this build does not read: it reads fp8 weights as \
             E4M3 (`F8_E4M3`, Stability's and ComfyUI's fp8_scaled files); use the model's e4m3fn or 16-bit file",
            m.dtype
        )));
    }
    if let Some((name, t)) = renamed.iter().find(|(_, t)| is_fp8(&t.dtype) && t.dtype != fp8::STORED) {
        return Err(bad(format!(
            "`{}` is stored as {}, which this build does not read: it reads fp8 weights as E4M3 (`F8_E4M3`, \
             Stability's and ComfyUI's fp8_scaled files); use the model's e4m3fn or 16-bit file",
            sources.get(name).map_or(name.as_str(), |s| s.original.as_str()),
            t.dtype
        )));
    }
    let mut out = BTreeMap::new();
    for (name, info) in renamed.iter().filter(|(_, t)| t.dtype == fp8::STORED) {
        let original = sources.get(name).map_or(name.as_str(), |s| s.original.as_str());
        let key = original.strip_suffix("weight").map(|layer| format!("{layer}{SCALE_WEIGHT}"));
        let scale = key.as_ref().and_then(|k| tensors.get(k).map(|t| (k, t)));
        match scale {
            Some((key, t)) if held_in_fp8(name, info) => {
                check_scalar(key, t).map_err(bad)?;
                out.insert(fp8::scale_name(name), t.clone());
            }
            Some((key, _)) => {
                return Err(bad(format!(
                    "`{key}` scales `{original}`, which is not a linear layer's fp8 matrix (shape {:?}): scaled fp8 \
                     files scale linear weights only",
                    info.shape
                )))
            }
            None if marker.is_some() && held_in_fp8(name, info) => {
                return Err(bad(format!(
                    "`{original}` is fp8 in a scaled file (it has `{prefix}{MARKER}`), but its scale `{}` is missing: \
                     the file is incomplete or not a ComfyUI/Stability fp8_scaled checkpoint",
                    key.as_deref().unwrap_or(SCALE_WEIGHT)
                )))
            }
            // Plain fp8: scale 1.
            None => {}
        }
    }
    // Every scale in the file belongs to an fp8 weight; `scale_input` must at least be a number.
    for (key, t) in tensors.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)) {
        if let Some(layer) = key.strip_suffix(SCALE_WEIGHT) {
            let weight = format!("{layer}weight");
            let stored = tensors.get(&weight).map(|w| w.dtype.as_str());
            if stored != Some(fp8::STORED) {
                return Err(bad(format!(
                    "`{key}` scales `{weight}`, which is {}, not fp8: a scale belongs beside an fp8 weight only",
                    stored.map_or("missing".to_string(), |d| format!("stored as {d}"))
                )));
            }
        } else if key.ends_with(SCALE_INPUT) {
            check_scalar(key, t).map_err(bad)?;
        }
    }
    Ok(out)
}

fn check_scalar(key: &str, t: &TensorInfo) -> std::result::Result<(), String> {
    let one = t.shape.iter().product::<usize>() == 1;
    if one && matches!(t.dtype.as_str(), "F32" | "F16" | "BF16") {
        return Ok(());
    }
    Err(format!("`{key}` is {} of shape {:?}, where a scale is one float (F32)", t.dtype, t.shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extra_tensors_are_told_from_the_models() {
        assert!(is_extra("scaled_fp8"));
        assert!(is_extra("joint_blocks.0.x_block.attn.qkv.scale_weight"));
        assert!(is_extra("joint_blocks.0.x_block.attn.qkv.scale_input"));
        assert!(!is_extra("joint_blocks.0.x_block.attn.qkv.weight"));
        assert!(!is_extra("final_layer.adaLN_modulation.1.scale_weights"));
        let w = |dtype: &str, shape: &[usize]| TensorInfo {
            dtype: dtype.into(),
            shape: shape.to_vec(),
            data_offsets: (0, 0),
        };
        assert!(held_in_fp8("a.to_q.weight", &w("F8_E4M3", &[8, 8])));
        assert!(!held_in_fp8("a.conv.weight", &w("F8_E4M3", &[8, 8, 3, 3])));
        assert!(!held_in_fp8("a.to_q.weight", &w("BF16", &[8, 8])));
        // T5's embedding tables are dequantised as they load.
        assert!(!held_in_fp8("shared.weight", &w("F8_E4M3", &[8, 8])));
        assert!(!held_in_fp8(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &w("F8_E4M3", &[8, 8])
        ));
        assert!(check_scalar("s", &w("F32", &[])).is_ok() && check_scalar("s", &w("F32", &[1])).is_ok());
        assert!(check_scalar("s", &w("F32", &[2])).is_err() && check_scalar("s", &w("I64", &[])).is_err());
    }
}
