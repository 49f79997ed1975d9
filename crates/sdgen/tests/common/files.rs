//! Writing altered copies of safetensors files, for the loaders' refusal and precision tests.

use std::path::{Path, PathBuf};

use sdgen::loading::SafetensorsHeader;

/// Writes `dir/name`: the tensors of `src` that `keep` accepts (bytes copied as they are, whatever
/// their dtype; the F32 ones converted to F16 when `half`), plus zero-filled F16 tensors `extra`.
pub fn rewrite_safetensors(
    src: &Path,
    dir: &Path,
    name: &str,
    keep: impl Fn(&str) -> bool,
    extra: &[(&str, &[usize])],
    half: bool,
) -> PathBuf {
    let header = SafetensorsHeader::read(src).unwrap();
    let bytes = std::fs::read(src).unwrap();
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut json = serde_json::Map::new();
    let mut data = Vec::new();
    for (key, info) in header.tensors.iter().filter(|(k, _)| keep(k)) {
        let (a, b) = info.data_offsets;
        let raw = &bytes[data_start + a as usize..data_start + b as usize];
        let start = data.len();
        let dtype = if half && info.dtype == "F32" {
            for v in raw.chunks_exact(4) {
                data.extend_from_slice(&half::f16::from_f32(f32::from_le_bytes(v.try_into().unwrap())).to_le_bytes());
            }
            "F16"
        } else {
            data.extend_from_slice(raw);
            info.dtype.as_str()
        };
        json.insert(
            key.clone(),
            serde_json::json!({"dtype": dtype, "shape": info.shape, "data_offsets": [start, data.len()]}),
        );
    }
    for (key, shape) in extra {
        let start = data.len();
        data.resize(start + 2 * shape.iter().product::<usize>(), 0);
        json.insert(
            key.to_string(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let head = serde_json::to_vec(&json).unwrap();
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.extend_from_slice(&data);
    let path = dir.join(name);
    std::fs::write(&path, out).unwrap();
    path
}

/// Copies the folder `from` (recursively) to `to`.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}
