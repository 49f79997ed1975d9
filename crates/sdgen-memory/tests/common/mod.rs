//! Real-size manifests the planner tests share (no weights: names, shapes and dtypes).
#![allow(dead_code)]

use sdgen_memory::plan::{Blocks, ComponentManifest, ModelManifest, StoredDType, StreamableBlocks, TensorEntry};

/// The UNet's blocks as the model lists them (resnets, transformer blocks, samplers), taken from
/// the tensor names in the order they first appear.
pub fn unet_blocks(m: &ModelManifest) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    for t in &m.component("unet").unwrap().tensors {
        let parts: Vec<&str> = t.name.split('.').collect();
        let end = ["resnets", "transformer_blocks", "downsamplers", "upsamplers"]
            .iter()
            .filter_map(|k| parts.iter().position(|p| p == k))
            .max();
        if let Some(i) = end {
            let prefix = parts[..=i + 1].join(".");
            if !blocks.contains(&prefix) {
                blocks.push(prefix);
            }
        }
    }
    blocks
}

/// SD 3.5 Large's shapes (bf16): CLIP-L, bigG, T5-XXL's 24 layers, the MMDiT's 38 joint blocks,
/// the VAE, each block one tensor of its real size.
pub fn sd35_large() -> (ModelManifest, Vec<StreamableBlocks>) {
    let t = |name: String, shape: Vec<usize>| TensorEntry::new(name, shape, StoredDType::BF16);
    let blocks = |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}.{i}")).collect::<Vec<_>>();
    let (t5, mmdit) = (blocks("encoder.block", 24), blocks("transformer_blocks", 38));
    let with_blocks = |first: Vec<TensorEntry>, blocks: &[String], params: usize| {
        first.into_iter().chain(blocks.iter().map(|b| t(format!("{b}.w"), vec![params]))).collect::<Vec<_>>()
    };
    let manifest = ModelManifest::new(vec![
        ComponentManifest::new(
            "text_encoder",
            vec![
                t("text_model.embeddings.token_embedding.weight".into(), vec![49408, 768]),
                t("w".into(), vec![85_000_000]),
            ],
        ),
        ComponentManifest::new(
            "text_encoder_2",
            vec![
                t("text_model.embeddings.token_embedding.weight".into(), vec![49408, 1280]),
                t("w".into(), vec![630_000_000]),
            ],
        ),
        ComponentManifest::new(
            "text_encoder_3",
            with_blocks(vec![t("shared.weight".into(), vec![32128, 4096])], &t5, 197_000_000),
        ),
        ComponentManifest::new(
            "transformer",
            with_blocks(vec![t("pos_embed.proj.weight".into(), vec![2432, 16, 2, 2])], &mmdit, 212_000_000),
        ),
        ComponentManifest::new(
            "vae",
            vec![
                t("encoder.conv_in.weight".into(), vec![128, 3, 3, 3]),
                t("encoder.w".into(), vec![34_000_000]),
                t("decoder.conv_in.weight".into(), vec![512, 16, 3, 3]),
                t("decoder.w".into(), vec![49_000_000]),
            ],
        ),
    ]);
    let streamable = vec![
        StreamableBlocks { component: "text_encoder_3".into(), blocks: t5 },
        StreamableBlocks { component: "transformer".into(), blocks: mmdit },
    ];
    (manifest, streamable)
}

/// `testdata/<rel>`, read as JSON.
fn testdata_json(rel: &str) -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/").to_string() + rel;
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))).unwrap()
}

fn shape(v: &serde_json::Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

/// SD 3.5 Large with its real MMDiT (the released `sd3.5_large.safetensors`' 923 tensors under
/// diffusers' names and shapes, bf16: `testdata/tiny-sd35-single/sd35-large-real-keys.json`) and
/// [`sd35_large`]'s encoders and VAE.
pub fn sd35_large_real() -> (ModelManifest, Vec<StreamableBlocks>) {
    let (mut m, streamable) = sd35_large();
    let keys = testdata_json("tiny-sd35-single/sd35-large-real-keys.json");
    let mut tensors = Vec::new();
    for v in keys.as_object().unwrap().values() {
        let v = v.as_array().unwrap();
        // A fused q/k/v is three diffusers tensors of the shape given after the names.
        let served = v.get(3).map(shape).unwrap_or_else(|| shape(&v[1]));
        let names: Vec<&str> = match &v[2] {
            serde_json::Value::Array(names) => names.iter().map(|n| n.as_str().unwrap()).collect(),
            name => vec![name.as_str().unwrap()],
        };
        tensors.extend(names.into_iter().map(|n| TensorEntry::new(n, served.clone(), StoredDType::BF16)));
    }
    let transformer = m.components.iter_mut().find(|c| c.name == "transformer").unwrap();
    *transformer = ComponentManifest::new("transformer", tensors);
    (m, streamable)
}

/// SDXL base at its real size (the released `sd_xl_base_1.0.safetensors`' tensors under their
/// diffusers components and names, f16: `testdata/tiny-sdxl-single/sdxl-base-real-keys.json`),
/// with its UNet's blocks.
pub fn sdxl_real() -> (ModelManifest, Vec<StreamableBlocks>) {
    let keys = testdata_json("tiny-sdxl-single/sdxl-base-real-keys.json");
    let mut components: Vec<ComponentManifest> = Vec::new();
    for v in keys.as_object().unwrap().values() {
        let v = v.as_array().unwrap();
        let (Some(component), Some(name)) = (v.get(2).and_then(|c| c.as_str()), v.get(3).and_then(|n| n.as_str()))
        else {
            continue;
        };
        let dtype = StoredDType::from_safetensors(v[0].as_str().unwrap()).unwrap();
        let entry = TensorEntry::new(name, shape(&v[1]), dtype);
        match components.iter_mut().find(|c| c.name == component) {
            Some(c) => c.tensors.push(entry),
            None => components.push(ComponentManifest::new(component, vec![entry])),
        }
    }
    let m = ModelManifest::new(components);
    let streamable = vec![StreamableBlocks { component: "unet".into(), blocks: unet_blocks(&m) }];
    (m, streamable)
}

/// `m` with `component`'s linear weights inside its blocks held as `--weights kind` holds them
/// (the engine's rule, `loading/quantise.rs`, leaves the embeddings and the first and last layers
/// dense, all outside the blocks): Q8_0, fp8, or Q4_K (Q4_0 for rows not whole 256s).
pub fn quantised(m: &ModelManifest, component: &str, kind: &str) -> ModelManifest {
    let mut m = m.clone();
    let blocks = ["transformer_blocks.", "down_blocks.", "mid_block.", "up_blocks."];
    let c = m.components.iter_mut().find(|c| c.name == component).unwrap();
    for t in c.tensors.iter_mut() {
        if t.shape.len() != 2 || !t.name.ends_with(".weight") || !blocks.iter().any(|b| t.name.starts_with(b)) {
            continue;
        }
        t.held = Some(match kind {
            "q8" => Blocks { elements: 32, bytes: 34 },
            "fp8" => Blocks { elements: 1, bytes: 1 },
            "q4" if t.shape[1] % 256 == 0 => Blocks { elements: 256, bytes: 144 },
            "q4" => Blocks { elements: 32, bytes: 18 },
            other => panic!("no kind {other}"),
        });
    }
    m
}
