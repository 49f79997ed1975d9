//! Which files of a diffusers repo a run needs: `model_index.json`, each used component's config
//! and tokenizer files, and per component exactly one set of safetensors weights (a single file,
//! or a sharded index with its shards), in the requested precision variant when the repo has it.
//! Pure functions over file names, so the same rules pick files from a hub listing and check a
//! cached snapshot.

use std::collections::BTreeMap;

/// Components the engine never loads, so never downloaded: SD 1.5's safety checker alone is
/// 1.2 GB.
pub const UNUSED_COMPONENTS: &[&str] = &["safety_checker", "feature_extractor", "image_encoder"];

/// Weight formats other than safetensors: never fetched (pickles can run code; the rest are other
/// frameworks' copies of the same weights).
const OTHER_WEIGHTS: &[&str] =
    &[".bin", ".ckpt", ".pt", ".pth", ".onnx", ".onnx_data", ".msgpack", ".h5", ".pb", ".tflite", ".gguf", ".pkl"];

/// Non-weight files a component may need: configs (`config.json`, `scheduler_config.json`,
/// `tokenizer_config.json`...) and tokenizer data (`vocab.json`, `merges.txt`, `spiece.model`).
const SUPPORT_EXTENSIONS: &[&str] = &[".json", ".txt", ".model"];

/// Weight base names in the order diffusers and transformers look for them.
const PREFERRED_BASES: &[&str] = &["diffusion_pytorch_model", "model"];

/// A file of a repo, as the hub lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteFile {
    /// Path in the repo (`unet/config.json`).
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Its blob name in the cache (the etag: LFS SHA-256, else the git blob id), when listed.
    pub blob: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WeightKind {
    Single,
    Shard,
    Index,
}

/// A safetensors weight file name taken apart: `diffusion_pytorch_model.fp16.safetensors`,
/// `model.fp16-00001-of-00002.safetensors`, `model.safetensors.index.fp16.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WeightName {
    base: String,
    variant: Option<String>,
    kind: WeightKind,
}

fn shard_marker() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"-\d+-of-\d+").expect("valid regex"))
}

fn parse_weight(name: &str) -> Option<WeightName> {
    let (stem, kind) = if name.ends_with(".json") && name.contains(".safetensors.index") {
        (name.to_string(), WeightKind::Index)
    } else if let Some(stem) = name.strip_suffix(".safetensors") {
        // Both diffusers' `model.fp16-00001-of-00002` and the older `model-00001-of-00002.fp16`.
        match shard_marker().find(stem) {
            Some(m) => (format!("{}{}", &stem[..m.start()], &stem[m.end()..]), WeightKind::Shard),
            None => (stem.to_string(), WeightKind::Single),
        }
    } else {
        return None;
    };
    let mut tokens = stem.split('.').filter(|t| !matches!(*t, "safetensors" | "index" | "json"));
    let base = tokens.next()?.to_string();
    let rest: Vec<&str> = tokens.collect();
    let variant = (!rest.is_empty()).then(|| rest.join("."));
    Some(WeightName { base, variant, kind })
}

fn is_other_weight(name: &str) -> bool {
    OTHER_WEIGHTS.iter().any(|ext| name.ends_with(ext)) || (name.contains(".index.") && name.ends_with(".json"))
}

fn is_support(name: &str) -> bool {
    SUPPORT_EXTENSIONS.iter().any(|ext| name.ends_with(ext)) && !is_other_weight(name) && parse_weight(name).is_none()
}

/// The top-level folders of a listing: the candidate components.
pub fn folders(files: &[RemoteFile]) -> Vec<String> {
    let mut out: Vec<String> =
        files.iter().filter_map(|f| f.path.split_once('/').map(|(d, _)| d.to_string())).collect();
    out.sort();
    out.dedup();
    out
}

/// The files of `components` that a run needs, from a repo's file list: per component its
/// support files and one weight set (see [`choose_weights`]). Components absent from the list
/// are skipped here (the caller decides whether that is an error).
pub fn select_files(
    files: &[RemoteFile],
    components: &[String],
    variant: Option<&str>,
) -> Result<Vec<RemoteFile>, String> {
    let mut out = Vec::new();
    for component in components {
        let prefix = format!("{component}/");
        // Only the component folder's own files: diffusers never reads deeper.
        let own: Vec<&RemoteFile> =
            files.iter().filter(|f| f.path.strip_prefix(&prefix).is_some_and(|n| !n.contains('/'))).collect();
        let names: Vec<&str> = own.iter().map(|f| &f.path[prefix.len()..]).collect();
        out.extend(own.iter().filter(|f| is_support(&f.path[prefix.len()..])).map(|f| (*f).clone()));
        let weights = choose_weights(&names, variant).map_err(|e| format!("component `{component}`: {e}"))?;
        for w in weights {
            out.push(
                own.iter().find(|f| f.path[prefix.len()..] == *w).map(|f| (*f).clone()).expect("chosen from names"),
            );
        }
    }
    Ok(out)
}

/// One component's weight files among `names` (file names in its folder): the requested variant
/// if present, else the plain weights, else another variant (fp16 first) since the engine converts
/// every tensor to the run's dtype anyway. A single file wins over a sharded set of the same
/// variant, as in the loader. Empty when the folder has no weights at all (schedulers,
/// tokenizers); an error when it only has non-safetensors weights.
pub fn choose_weights<'a>(names: &[&'a str], variant: Option<&str>) -> Result<Vec<&'a str>, String> {
    // (variant, base) → (single, index, shards)
    type Set<'a> = (Option<&'a str>, Option<&'a str>, Vec<&'a str>);
    let mut sets: BTreeMap<(Option<String>, String), Set<'a>> = BTreeMap::new();
    for name in names {
        let Some(w) = parse_weight(name) else { continue };
        let set = sets.entry((w.variant, w.base)).or_default();
        match w.kind {
            WeightKind::Single => set.0 = Some(name),
            WeightKind::Index => set.1 = Some(name),
            WeightKind::Shard => set.2.push(name),
        }
    }
    if sets.is_empty() {
        let others: Vec<&str> = names.iter().copied().filter(|n| is_other_weight(n)).collect();
        if others.iter().any(|n| !n.ends_with(".json")) {
            return Err(format!("no .safetensors weights, only {}: only safetensors are supported", others.join(", ")));
        }
        return Ok(Vec::new());
    }
    let mut variants: Vec<Option<String>> = Vec::new();
    if let Some(v) = variant {
        variants.push(Some(v.to_string()));
    }
    variants.push(None);
    variants.push(Some("fp16".to_string()));
    variants.extend(sets.keys().map(|(v, _)| v.clone()));
    for v in &variants {
        let mut bases: Vec<&String> = sets.keys().filter(|(sv, _)| sv == v).map(|(_, b)| b).collect();
        bases.sort_by_key(|b| {
            (PREFERRED_BASES.iter().position(|p| p == b).unwrap_or(PREFERRED_BASES.len()), (*b).clone())
        });
        for base in bases {
            let (single, index, shards) = &sets[&(v.clone(), base.clone())];
            if let Some(single) = single {
                return Ok(vec![single]);
            }
            if let (Some(index), false) = (index, shards.is_empty()) {
                let mut files = vec![*index];
                let mut shards = shards.clone();
                shards.sort();
                files.extend(shards);
                return Ok(files);
            }
        }
    }
    Err(format!("no usable safetensors weights among {}", names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(base: &str, variant: Option<&str>, kind: WeightKind) -> Option<WeightName> {
        Some(WeightName { base: base.into(), variant: variant.map(Into::into), kind })
    }

    #[test]
    fn parses_weight_names() {
        use WeightKind::*;
        assert_eq!(parse_weight("diffusion_pytorch_model.safetensors"), w("diffusion_pytorch_model", None, Single));
        assert_eq!(parse_weight("model.fp16.safetensors"), w("model", Some("fp16"), Single));
        assert_eq!(
            parse_weight("diffusion_pytorch_model.non_ema.safetensors"),
            w("diffusion_pytorch_model", Some("non_ema"), Single)
        );
        assert_eq!(parse_weight("model-00001-of-00002.safetensors"), w("model", None, Shard));
        assert_eq!(parse_weight("model.fp16-00002-of-00002.safetensors"), w("model", Some("fp16"), Shard));
        assert_eq!(parse_weight("model-00001-of-00002.fp16.safetensors"), w("model", Some("fp16"), Shard));
        assert_eq!(parse_weight("model.safetensors.index.json"), w("model", None, Index));
        assert_eq!(parse_weight("model.safetensors.index.fp16.json"), w("model", Some("fp16"), Index));
        assert_eq!(parse_weight("model.fp16.safetensors.index.json"), w("model", Some("fp16"), Index));
        assert_eq!(parse_weight("pytorch_model.bin"), None);
        assert_eq!(parse_weight("config.json"), None);
    }

    #[test]
    fn picks_one_weight_set() {
        let unet = [
            "config.json",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.bin",
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.non_ema.safetensors",
            "diffusion_pytorch_model.safetensors",
            "diffusion_flax_model.msgpack",
            "model.onnx",
        ];
        assert_eq!(choose_weights(&unet, None).unwrap(), ["diffusion_pytorch_model.safetensors"]);
        assert_eq!(choose_weights(&unet, Some("fp16")).unwrap(), ["diffusion_pytorch_model.fp16.safetensors"]);
        // No bf16 in the repo: the plain weights.
        assert_eq!(choose_weights(&unet, Some("bf16")).unwrap(), ["diffusion_pytorch_model.safetensors"]);
        // Only a variant: taken even when none was asked for.
        assert_eq!(choose_weights(&["model.fp16.safetensors"], None).unwrap(), ["model.fp16.safetensors"]);
        assert_eq!(choose_weights(&["scheduler_config.json"], None).unwrap(), Vec::<&str>::new());
        let err = choose_weights(&["config.json", "pytorch_model.bin"], None).unwrap_err();
        assert!(err.contains("pytorch_model.bin") && err.contains("safetensors"), "{err}");
    }

    #[test]
    fn picks_sharded_sets() {
        let t5 = [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.fp16-00001-of-00002.safetensors",
            "model.fp16-00002-of-00002.safetensors",
            "model.safetensors.index.fp16.json",
            "model.safetensors.index.json",
            "pytorch_model.bin.index.json",
        ];
        assert_eq!(
            choose_weights(&t5, None).unwrap(),
            ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        );
        assert_eq!(
            choose_weights(&t5, Some("fp16")).unwrap(),
            [
                "model.safetensors.index.fp16.json",
                "model.fp16-00001-of-00002.safetensors",
                "model.fp16-00002-of-00002.safetensors"
            ]
        );
    }

    #[test]
    fn selects_support_files_and_skips_other_folders() {
        let f = |p: &str| RemoteFile { path: p.into(), size_bytes: 1, blob: None };
        let listing: Vec<RemoteFile> = [
            "model_index.json",
            "v1-5-pruned.safetensors",
            "tokenizer/merges.txt",
            "tokenizer/vocab.json",
            "tokenizer/tokenizer_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder/pytorch_model.bin",
            "text_encoder/flax_model.msgpack",
            "text_encoder/README.md",
            "unet/nested/extra.safetensors",
            "safety_checker/model.safetensors",
        ]
        .into_iter()
        .map(f)
        .collect();
        assert_eq!(folders(&listing), ["safety_checker", "text_encoder", "tokenizer", "unet"]);
        let picked = select_files(&listing, &["tokenizer".into(), "text_encoder".into()], None).unwrap();
        let paths: Vec<&str> = picked.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "tokenizer/merges.txt",
                "tokenizer/vocab.json",
                "tokenizer/tokenizer_config.json",
                "text_encoder/config.json",
                "text_encoder/model.safetensors"
            ]
        );
    }
}
