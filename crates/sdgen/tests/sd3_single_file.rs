//! SD 3.5 single-file checkpoints in Stability's layout (`tools/reference/make_single_file_sd3.py`,
//! `testdata/tiny-sd35-single/`): the tiny Large (text encoders inside the file) and Medium
//! (text encoders in `text_encoders/` beside it) serve exactly their folders' tensors — the fused
//! q/k/v split, the final modulations' halves swapped — and give diffusers' images (the script
//! checks diffusers' `from_single_file` gives the folders' images bit for bit, so the folders'
//! references hold); the real MMDiTs' key lists rename as diffusers renames them; Large and
//! Medium are told apart by their blocks, also against a config folder of the other size; a
//! missing `text_encoders/` file, an 8-bit CLIP (a T5 fp8 file where a CLIP is looked for), T5
//! without its tokenizer and a truncated file are refused by name; ComfyUI's fp8 T5 files beside
//! the checkpoint are read (`tools/reference/make_fp8.py`: their forward equals torch's). Tolerance: tensors exactly; images the pipeline tolerance
//! (`common::assert_image_close`: ≥ 99.5% of channels within 1/255, none over 8/255).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_generation_matches, load, testdata};
use sdgen::loading::family::{recognise, Recognised};
use sdgen::loading::single_file::manifest::ModelConfig;
use sdgen::loading::single_file::rules::{self, Ctx, Take};
use sdgen::loading::{ModelFolder, OpenOptions, TensorInfo};
use sdgen::pipeline::{resolve, txt2img, FamilyOptions, Request, Runtime};

const COMPONENTS: [&str; 5] = ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Size {
    Large,
    Medium,
}

impl Size {
    fn name(self) -> &'static str {
        match self {
            Size::Large => "large",
            Size::Medium => "medium",
        }
    }
    fn file(self) -> PathBuf {
        testdata().join(format!("tiny-sd35-single/tiny-sd35-{}.safetensors", self.name()))
    }
    fn folder(self) -> PathBuf {
        testdata().join(format!("tiny-sd35-{}", self.name()))
    }
    fn family(self) -> &'static str {
        match self {
            Size::Large => "sd35-large",
            Size::Medium => "sd35-medium",
        }
    }
}

fn configs_of(dir: PathBuf) -> OpenOptions {
    OpenOptions { config_from: Some(dir), ..Default::default() }
}

fn open(file: &Path, configs: PathBuf) -> sdgen::Result<ModelFolder> {
    ModelFolder::open_with(file, &configs_of(configs))
}

fn single(size: Size) -> ModelFolder {
    open(&size.file(), size.folder()).unwrap_or_else(|e| panic!("{size:?} single file opens: {e}"))
}

fn values(t: Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn request(seed: u64, no_t5: bool) -> Request {
    Request {
        prompt: "a photograph of an astronaut riding a horse".into(),
        n: 1,
        seed,
        steps: Some(6),
        guidance: Some(5.0),
        width: Some(64),
        height: Some(64),
        family_options: FamilyOptions { no_t5, ..Default::default() },
        ..Default::default()
    }
}

/// The prompt and settings of `reference/sd3/pipeline.json`'s case `name`.
fn case_request(name: &str) -> Request {
    let text = std::fs::read_to_string(testdata().join("reference/sd3/pipeline.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let c = cases.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no case {name}"));
    let mut req = request(c["seeds"][0].as_u64().unwrap(), c["no_t5"].as_bool().unwrap_or(false));
    req.prompt = c["prompt"].as_str().unwrap().to_string();
    req.steps = Some(c["steps"].as_u64().unwrap() as usize);
    req.guidance = Some(c["guidance"].as_f64().unwrap());
    assert!(c["negative_prompt"].is_null() && c["width"] == 64 && c["height"] == 64, "{name}");
    req
}

#[test]
fn single_files_give_diffusers_images() {
    let r = load("reference/sd3/pipeline.safetensors");
    for (size, case) in [(Size::Large, "large"), (Size::Large, "large_no_t5"), (Size::Medium, "medium")] {
        let model = single(size);
        let gen = txt2img(&model, &case_request(case), &Runtime::cpu(), &mut |_| {}).unwrap();
        assert_generation_matches(&format!("single-file {case}"), &[gen.images[0].seed], &gen, &r[case]);
        assert_eq!(gen.timings_ms.contains_key("text_encoder_3"), case != "large_no_t5", "{case}");
    }
}

#[test]
fn text_encoders_come_from_the_file_or_beside_it() {
    let beside = testdata().join("tiny-sd35-single/text_encoders");
    for size in [Size::Large, Size::Medium] {
        let m = single(size);
        assert_eq!(m.family().name, size.family());
        assert_eq!(m.pipeline_class(), "StableDiffusion3Pipeline");
        let ckpt = m.checkpoint().unwrap();
        let held: Vec<&str> = ckpt.components().map(|c| c.component).collect();
        assert_eq!(held, COMPONENTS);
        for (component, file) in
            [("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl_fp16")]
        {
            let view = ckpt.component(component).unwrap();
            let want = match size {
                Size::Large => size.file(),
                Size::Medium => beside.join(format!("{file}.safetensors")),
            };
            assert_eq!(view.path, want, "{size:?} {component}");
            let described = m.weights(component).unwrap().describe();
            let want = if size == Size::Large { "tiny-sd35-large.safetensors" } else { file };
            assert!(described.contains(want), "{described}");
        }
        assert_eq!(ckpt.component("transformer").unwrap().path, size.file());
    }
}

/// Every tensor of the folders, served by the single files under the same name, shape and value,
/// through the `VarBuilder` the models are built from; and the manifests are the folders' names.
#[test]
fn components_are_the_folders_tensors() {
    for size in [Size::Large, Size::Medium] {
        let (s, f) = (single(size), ModelFolder::open(&size.folder()).unwrap());
        for component in COMPONENTS {
            let (sw, fw) = (s.weights(component).unwrap(), f.weights(component).unwrap());
            let held: BTreeMap<&String, &TensorInfo> = fw.headers.iter().flat_map(|h| &h.tensors).collect();
            let served = &sw.headers[0].tensors;
            assert_eq!(served.keys().collect::<Vec<_>>(), held.keys().copied().collect::<Vec<_>>(), "{component}");
            let (svb, fvb) =
                (sw.var_builder(DType::F32, &Device::Cpu).unwrap(), fw.var_builder(DType::F32, &Device::Cpu).unwrap());
            for (name, info) in &held {
                assert_eq!(served[*name].shape, info.shape, "{size:?} {component} {name}");
                let (a, b) = (svb.get(info.shape.clone(), name).unwrap(), fvb.get_unchecked(name).unwrap());
                assert!(values(a) == values(b), "{size:?} {component} {name}: values differ");
            }
            let text = std::fs::read_to_string(size.folder().join(component).join("config.json")).unwrap();
            let cfg = match component {
                "transformer" => ModelConfig::MMDiT(serde_json::from_str(&text).unwrap()),
                "vae" => ModelConfig::Vae(serde_json::from_str(&text).unwrap()),
                "text_encoder_3" => ModelConfig::T5(serde_json::from_str(&text).unwrap()),
                _ => ModelConfig::ClipTextWithProjection(serde_json::from_str(&text).unwrap()),
            };
            let expected: BTreeSet<String> = cfg.expected().unwrap().into_iter().collect();
            // The position table is a buffer the model can also compute: not required.
            let names: BTreeSet<String> =
                held.keys().filter(|k| k.as_str() != "pos_embed.pos_embed").map(|k| k.to_string()).collect();
            assert_eq!(expected, names, "{size:?} {component} manifest");
        }
        let mmdit = s.weights("transformer").unwrap();
        let view = mmdit.single_file_view().unwrap();
        for (i, piece) in ["add_q_proj", "add_k_proj", "add_v_proj"].into_iter().enumerate() {
            let source = view.source(&format!("transformer_blocks.1.attn.{piece}.weight")).unwrap();
            assert_eq!(source.original, "model.diffusion_model.joint_blocks.1.context_block.attn.qkv.weight");
            assert_eq!(source.take, Take::Chunk { index: i, of: 3 });
        }
        for name in ["norm_out.linear.weight", "transformer_blocks.2.norm1_context.linear.bias"] {
            assert_eq!(view.source(name).unwrap().take, Take::SwapHalves, "{name}");
        }
        assert_eq!(view.source("transformer_blocks.1.norm1_context.linear.bias").unwrap().take, Take::Whole);
    }
}

// ---------------------------------------------------------------------------------------------
// Real-shaped key lists
// ---------------------------------------------------------------------------------------------

fn bundled_transformer_config(size: Size) -> ModelConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/loading/single_file/sd35")
        .join(size.name())
        .join("transformer/config.json");
    ModelConfig::MMDiT(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
}

/// The real MMDiTs' SAI names rename exactly as diffusers renames them, with the real (bundled)
/// configs: names, shapes, which piece of a fused q/k/v, which modulations are swapped; every
/// tensor the config needs is there, none is left over; and the files are recognised as Large
/// and Medium.
#[test]
fn real_keys_map_as_diffusers_maps_them() {
    for size in [Size::Large, Size::Medium] {
        let text =
            std::fs::read_to_string(testdata().join(format!("tiny-sd35-single/sd35-{}-real-keys.json", size.name())))
                .unwrap();
        let entries: BTreeMap<String, Vec<serde_json::Value>> = serde_json::from_str(&text).unwrap();
        let cfg = bundled_transformer_config(size);
        let ctx: Ctx = cfg.ctx().unwrap();
        let prefix = "model.diffusion_model.";
        let mut renamed = BTreeSet::new();
        let mut tensors = BTreeMap::new();
        for (key, e) in &entries {
            let shape: Vec<usize> = serde_json::from_value(e[1].clone()).unwrap();
            let names: Vec<String> = match &e[2] {
                serde_json::Value::String(n) => vec![n.clone()],
                list => serde_json::from_value(list.clone()).unwrap(),
            };
            let targets = rules::to_diffusers(rules::MMDIT, &ctx, key.strip_prefix(prefix).unwrap());
            let got: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(got, names, "{key}");
            for (i, t) in targets.iter().enumerate() {
                let want = match names.len() {
                    3 => Take::Chunk { index: i, of: 3 },
                    _ if key.ends_with("final_layer.adaLN_modulation.1.weight")
                        || key.ends_with("final_layer.adaLN_modulation.1.bias") =>
                    {
                        Take::SwapHalves
                    }
                    _ if key.contains(&format!("joint_blocks.{}.context_block.adaLN", ctx.blocks - 1)) => {
                        Take::SwapHalves
                    }
                    _ => Take::Whole,
                };
                assert_eq!(t.take, want, "{key}");
                assert_eq!(rules::to_original(rules::MMDIT, &ctx, &t.name).as_deref(), key.strip_prefix(prefix));
            }
            renamed.extend(names);
            let dtype = e[0].as_str().unwrap().to_string();
            tensors.insert(key.clone(), TensorInfo { dtype, shape, data_offsets: (0, 0) });
        }
        renamed.remove("pos_embed.pos_embed");
        let expected: BTreeSet<String> = cfg.expected().unwrap().into_iter().collect();
        assert_eq!(renamed, expected, "{size:?}");
        match recognise(&tensors) {
            Recognised::Family(f) => assert_eq!(f.name, size.family()),
            other => panic!("{size:?}: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------

/// A Medium file given Large's configs, and the reverse: both sizes named, and the evidence.
#[test]
fn a_medium_file_where_large_is_named_is_refused_naming_both() {
    let err = open(&Size::Medium.file(), Size::Large.folder()).unwrap_err().to_string();
    assert!(err.contains("looks like an SD 3.5 Medium checkpoint (MMDiT-X)"), "{err}");
    assert!(err.contains("joint_blocks.0.x_block.attn2.qkv.weight"), "{err}");
    assert!(err.contains("is Stable Diffusion 3.5 Large's (by its transformer/config.json)"), "{err}");
    assert!(err.contains("give Stable Diffusion 3.5 Medium's configs"), "{err}");
    let err = open(&Size::Large.file(), Size::Medium.folder()).unwrap_err().to_string();
    assert!(err.contains("looks like an SD 3.5 Large checkpoint") && err.contains("no `"), "{err}");
    assert!(
        err.contains("is Stable Diffusion 3.5 Medium's") && err.contains("give Stable Diffusion 3.5 Large's"),
        "{err}"
    );
}

/// Without a config folder the file's own size is recognised and SD 3.5's real configs apply:
/// the tiny files are then refused for their width, naming the size they were taken for.
#[test]
fn bundled_configs_are_the_recognised_sizes() {
    for size in [Size::Large, Size::Medium] {
        let err = ModelFolder::open(&size.file()).unwrap_err().to_string();
        let display = if size == Size::Large { "SD 3.5 Large" } else { "SD 3.5 Medium" };
        assert!(err.contains(display) && err.contains("config_from"), "{err}");
        assert!(err.contains(&format!("{}-defaults", size.family())), "the bundled folder is named: {err}");
    }
}

/// The file and a copy of the `text_encoders/` folder in `dir`, less the files `drop`.
fn medium_in(dir: &Path, drop: &[&str]) -> PathBuf {
    let file = dir.join("sd3.5_medium.safetensors");
    std::fs::copy(Size::Medium.file(), &file).unwrap();
    common::files::copy_dir(&testdata().join("tiny-sd35-single/text_encoders"), &dir.join("text_encoders"));
    for f in drop {
        std::fs::remove_file(dir.join("text_encoders").join(f)).unwrap();
    }
    file
}

#[test]
fn a_missing_text_encoders_file_is_named_with_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let file = medium_in(dir.path(), &["clip_g.safetensors"]);
    let err = open(&file, Size::Medium.folder()).unwrap_err().to_string();
    let folder = dir.path().join("text_encoders");
    assert!(err.contains("holds no CLIP-G text encoder (no `text_encoders.clip_g.transformer.*` tensors)"), "{err}");
    assert!(err.contains(&format!("{} has no clip_g.safetensors", folder.display())), "{err}");
    assert!(err.contains("put the model's `text_encoders/clip_g.safetensors` there"), "{err}");

    // T5 is optional: the file opens, a run that needs T5 is refused, one without it runs.
    let dir = tempfile::tempdir().unwrap();
    let file = medium_in(dir.path(), &["t5xxl_fp16.safetensors"]);
    let model = open(&file, Size::Medium.folder()).unwrap();
    let err = resolve(&model, &request(42, false)).unwrap_err().to_string();
    assert!(
        err.contains("t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn_scaled.safetensors or t5xxl_fp8_e4m3fn.safetensors"),
        "{err}"
    );
    assert!(err.contains(&dir.path().join("text_encoders").display().to_string()) && err.contains("no_t5"), "{err}");
    assert!(resolve(&model, &request(42, true)).is_ok());
}

/// The tiny Medium with `t5` (a file of `testdata/fp8/`) beside it as its only T5 file, named
/// `as_name`.
fn medium_with_t5(dir: &Path, t5: &str, as_name: &str) -> PathBuf {
    let file = medium_in(dir, &["t5xxl_fp16.safetensors"]);
    std::fs::copy(testdata().join("fp8").join(t5), dir.join("text_encoders").join(as_name)).unwrap();
    file
}

/// ComfyUI's standalone fp8 T5 files (`t5xxl_fp8_e4m3fn_scaled.safetensors`: E4M3 linear weights
/// with a `scale_weight` each and the `scaled_fp8` marker; `t5xxl_fp8_e4m3fn.safetensors`: plain,
/// at scale 1) beside the checkpoint: T5's forward on them equals transformers' forward on the
/// same dequantised weights (f32, 1e-5 relative L2: only the summation order differs) and streamed
/// gives its numbers exactly, its linear weights are held one byte each and counted so by the
/// planner, and a whole run takes them.
#[test]
fn comfyui_fp8_t5_files_equal_torch_and_are_held_in_fp8() {
    use sdgen_models::stream::StreamableModel;
    use sdgen_models::t5::{T5Config, T5EncoderModel};
    let reference = load("fp8/t5_reference.safetensors");
    let ids = reference["t5.ids"].to_dtype(DType::U32).unwrap();
    let t5_bytes = |model: &ModelFolder| {
        let manifest = sdgen::planning::manifest(model).unwrap();
        let t5 = manifest.component("text_encoder_3").unwrap();
        (t5.bytes_at(&[], sdgen_memory::plan::Precision::Bf16), t5.tensors.iter().filter(|t| t.held.is_some()).count())
    };
    let dir = tempfile::tempdir().unwrap();
    let dense = open(&medium_in(dir.path(), &[]), Size::Medium.folder()).unwrap();
    let (dense_bytes, none) = t5_bytes(&dense);
    assert_eq!(none, 0);
    for (file, key) in
        [("t5xxl_fp8_e4m3fn_scaled.safetensors", "t5.scaled_out"), ("t5xxl_fp8_e4m3fn.safetensors", "t5.plain_out")]
    {
        let dir = tempfile::tempdir().unwrap();
        let model = open(&medium_with_t5(dir.path(), file, file), Size::Medium.folder()).unwrap();
        let cfg: T5Config = model.config("text_encoder_3", "config.json").unwrap();
        let weights = model.weights("text_encoder_3").unwrap();
        let vb = weights.var_builder(DType::F32, &Device::Cpu).unwrap();
        let got = T5EncoderModel::new(&cfg, vb).unwrap().forward(&ids).unwrap();
        // Streamed (every block read per use, as the planner may choose): the same numbers.
        let streamed = T5EncoderModel::new_streamed(
            &cfg,
            weights.var_builder(DType::F32, &Device::Cpu).unwrap(),
            weights.streamed_var_builder(DType::F32, &Device::Cpu).unwrap(),
            sdgen_models::stream::Residency::Streamed { resident_blocks: 0 },
        )
        .unwrap();
        assert!(values(streamed.forward(&ids).unwrap()) == values(got.clone()), "{file}: streamed");
        let err = common::rel_l2(&got, &reference[key]);
        let from_16_bit = common::rel_l2(&got, &reference["t5.f32_out"]);
        println!("{file}: {err:.2e} from torch's forward, {from_16_bit:.3} from the 16-bit weights'");
        assert!(err < 1e-5, "{file}: {err:.2e}");
        // Seven linear layers in each of the two blocks, one byte a weight.
        let (bytes, held) = t5_bytes(&model);
        assert_eq!(held, 14, "{file}");
        assert!(bytes < dense_bytes, "{file}: {bytes} vs {dense_bytes}");
    }
    // A whole run with the scaled file, near the 16-bit T5's image.
    let dir = tempfile::tempdir().unwrap();
    let file = medium_with_t5(dir.path(), "t5xxl_fp8_e4m3fn_scaled.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors");
    let got = txt2img(&open(&file, Size::Medium.folder()).unwrap(), &request(42, false), &Runtime::cpu(), &mut |_| {})
        .unwrap();
    let want = txt2img(&dense, &request(42, false), &Runtime::cpu(), &mut |_| {}).unwrap();
    let (a, b) = (&got.images[0].pixels, &want.images[0].pixels);
    let mean = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / a.len() as f64;
    println!("fp8 T5: image mean |Δ| = {:.3}/255 from the 16-bit T5's", mean * 255.0);
    assert!(mean > 0.0 && mean * 255.0 < 10.0, "{:.3}/255", mean * 255.0);
}

/// `file` with `other`'s tensors added under `prefix` (their data after its own), at `out`.
fn with_tensors_of(file: &Path, other: &Path, prefix: &str, out: &Path) {
    type Header = BTreeMap<String, serde_json::Value>;
    let split = |bytes: &[u8]| -> (Header, Vec<u8>) {
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        (serde_json::from_slice(&bytes[8..8 + len]).unwrap(), bytes[8 + len..].to_vec())
    };
    let (mut header, mut data) = split(&std::fs::read(file).unwrap());
    let (theirs, their_data) = split(&std::fs::read(other).unwrap());
    let shift = data.len() as u64;
    for (name, mut entry) in theirs.into_iter().filter(|(n, _)| n != "__metadata__") {
        let offsets: Vec<u64> = serde_json::from_value(entry["data_offsets"].clone()).unwrap();
        entry["data_offsets"] = serde_json::json!([offsets[0] + shift, offsets[1] + shift]);
        header.insert(format!("{prefix}{name}"), entry);
    }
    data.extend_from_slice(&their_data);
    let text = serde_json::to_vec(&header).unwrap();
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&text);
    bytes.extend_from_slice(&data);
    std::fs::write(out, bytes).unwrap();
}

/// A checkpoint holding the scaled fp8 T5 inside, under `text_encoders.t5xxl.transformer.` with
/// its marker there (ComfyUI's SD 3.5 fp8 checkpoints with encoders): read as the file beside.
#[test]
fn an_fp8_t5_inside_the_checkpoint_is_read() {
    use sdgen_models::t5::{T5Config, T5EncoderModel};
    let reference = load("fp8/t5_reference.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let plain = medium_in(dir.path(), &["t5xxl_fp16.safetensors"]);
    let file = dir.path().join("sd3.5_medium_fp8_t5.safetensors");
    let t5 = testdata().join("fp8/t5xxl_fp8_e4m3fn_scaled.safetensors");
    with_tensors_of(&plain, &t5, "text_encoders.t5xxl.transformer.", &file);
    let model = open(&file, Size::Medium.folder()).unwrap();
    let cfg: T5Config = model.config("text_encoder_3", "config.json").unwrap();
    let vb = model.weights("text_encoder_3").unwrap().var_builder(DType::F32, &Device::Cpu).unwrap();
    let got =
        T5EncoderModel::new(&cfg, vb).unwrap().forward(&reference["t5.ids"].to_dtype(DType::U32).unwrap()).unwrap();
    let err = common::rel_l2(&got, &reference["t5.scaled_out"]);
    assert!(err < 1e-5, "{err:.2e}");
    let manifest = sdgen::planning::manifest(&model).unwrap();
    assert_eq!(manifest.component("text_encoder_3").unwrap().tensors.iter().filter(|t| t.held.is_some()).count(), 14);
}

/// Refused by name: a T5 fp8 file put where a CLIP file is looked for (no CLIP is read in fp8),
/// and a scaled fp8 T5 with a scale missing.
#[test]
fn an_fp8_clip_or_a_t5_scale_missing_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = medium_in(dir.path(), &["clip_g.safetensors"]);
    let clip = dir.path().join("text_encoders/clip_g.safetensors");
    std::fs::copy(testdata().join("fp8/t5xxl_fp8_e4m3fn_scaled.safetensors"), &clip).unwrap();
    let err = open(&file, Size::Medium.folder()).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains(&clip.display().to_string()) && err.contains("CLIP-G"), "{err}");
    // CLIP-G itself in fp8 (every tensor relabelled F8_E4M3): refused by its dtype.
    let header =
        sdgen::loading::SafetensorsHeader::read(&testdata().join("tiny-sd35-single/text_encoders/clip_g.safetensors"))
            .unwrap();
    let mut json = serde_json::Map::new();
    let mut bytes = 0usize;
    for (name, info) in &header.tensors {
        let n: usize = info.shape.iter().product();
        json.insert(
            name.clone(),
            serde_json::json!({"dtype": "F8_E4M3", "shape": info.shape, "data_offsets": [bytes, bytes + n]}),
        );
        bytes += n;
    }
    let head = serde_json::to_vec(&json).unwrap();
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.resize(out.len() + bytes, 0);
    std::fs::write(&clip, out).unwrap();
    let err = open(&file, Size::Medium.folder()).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("its CLIP-G text encoder is stored as F8_E4M3"), "{err}");
    assert!(err.contains("use a 16-bit clip_g.safetensors in"), "{err}");

    // The scaled T5 without the scale of its first query weight.
    let src = testdata().join("fp8/t5xxl_fp8_e4m3fn_scaled.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header.remove("encoder.block.0.layer.0.SelfAttention.q.scale_weight").unwrap();
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    let dir = tempfile::tempdir().unwrap();
    let file = medium_in(dir.path(), &["t5xxl_fp16.safetensors"]);
    std::fs::write(dir.path().join("text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors"), out).unwrap();
    let err = open(&file, Size::Medium.folder())
        .and_then(|m| resolve(&m, &request(42, false)).map(|_| m))
        .and_then(|m| m.weights("text_encoder_3").map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t5xxl_fp8_e4m3fn_scaled.safetensors")
            && err.contains("`encoder.block.0.layer.0.SelfAttention.q.weight` is fp8 in a scaled file")
            && err.contains("is missing"),
        "{err}"
    );
}

/// A config folder without T5's tokenizer (as the bundled ones are): T5 is unavailable, said
/// with what to do, and the file runs without it as diffusers runs without T5.
#[test]
fn t5_without_its_tokenizer_runs_only_without_t5() {
    let dir = tempfile::tempdir().unwrap();
    let configs = dir.path().join("configs");
    common::files::copy_dir(&Size::Large.folder(), &configs);
    std::fs::remove_dir_all(configs.join("tokenizer_3")).unwrap();
    let model = open(&Size::Large.file(), configs.clone()).unwrap();
    let err = resolve(&model, &request(42, false)).unwrap_err().to_string();
    assert!(err.contains(&format!("config folder {} has no `tokenizer_3/`", configs.display())), "{err}");
    assert!(err.contains("stabilityai/stable-diffusion-3.5-large") && err.contains("no_t5"), "{err}");
    let r = load("reference/sd3/pipeline.safetensors");
    let gen = txt2img(&model, &case_request("large_no_t5"), &Runtime::cpu(), &mut |_| {}).unwrap();
    assert_generation_matches("large_no_t5 without tokenizer_3", &[42], &gen, &r["large_no_t5"]);
}

#[test]
fn truncated_and_corrupt_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(Size::Large.file()).unwrap();
    let truncated = dir.path().join("sd3.5_large.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = ModelFolder::open(&truncated).unwrap_err().to_string();
    assert!(
        err.contains("sd3.5_large.safetensors is not a valid safetensors file") && err.contains("truncated"),
        "{err}"
    );
    let corrupt = dir.path().join("corrupt.safetensors");
    let mut garbled = bytes.clone();
    garbled[8..40].fill(b'#');
    std::fs::write(&corrupt, garbled).unwrap();
    let err = ModelFolder::open(&corrupt).unwrap_err().to_string();
    assert!(err.contains("header is not valid JSON"), "{err}");
    // A truncated file beside the checkpoint is named too.
    let file = medium_in(dir.path(), &[]);
    let clip_l = dir.path().join("text_encoders/clip_l.safetensors");
    let b = std::fs::read(&clip_l).unwrap();
    std::fs::write(&clip_l, &b[..b.len() - 100]).unwrap();
    let err = open(&file, Size::Medium.folder()).unwrap_err().to_string();
    assert!(err.contains("clip_l.safetensors is not a valid safetensors file"), "{err}");
}

/// An MMDiT deeper than its config: the blocks beyond it are not silently dropped.
#[test]
fn an_mmdit_deeper_than_its_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let configs = dir.path().join("configs");
    common::files::copy_dir(&Size::Large.folder(), &configs);
    let path = configs.join("transformer/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["num_layers"] = 2.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = open(&Size::Large.file(), configs).unwrap_err().to_string();
    assert!(err.contains("has no place in the architecture of"), "{err}");
    assert!(err.contains("model.diffusion_model.joint_blocks."), "{err}");
}

/// A CLIP-L without its projection (diffusers' SD 3 single-file loader ignores it and uses the
/// identity): served as the identity where the projection is square, refused by name where not.
#[test]
fn clip_l_without_its_projection_is_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let file = medium_in(dir.path(), &["clip_l.safetensors"]);
    let src = testdata().join("tiny-sd35-single/text_encoders/clip_l.safetensors");
    let beside = dir.path().join("text_encoders");
    common::files::rewrite_safetensors(
        &src,
        &beside,
        "clip_l.safetensors",
        |k| k != "text_projection.weight",
        &[],
        false,
    );
    // The tiny CLIP-L projects 24 to 16: no identity fits.
    let err = open(&file, Size::Medium.folder()).unwrap_err().to_string();
    assert!(err.contains("lacks `text_projection.weight`") && err.contains("clip_l.safetensors"), "{err}");
    // With a square projection (projection_dim = hidden_size) it is the identity.
    let configs = dir.path().join("configs");
    common::files::copy_dir(&Size::Medium.folder(), &configs);
    let path = configs.join("text_encoder/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["projection_dim"] = cfg["hidden_size"].clone();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let model = open(&file, configs).unwrap();
    let w = model.weights("text_encoder").unwrap();
    let view = w.single_file_view().unwrap();
    assert_eq!(view.source("text_projection.weight").unwrap().take, Take::Identity);
    let p = w.var_builder(DType::F32, &Device::Cpu).unwrap().get((24, 24), "text_projection.weight").unwrap();
    assert!(values(p) == values(Tensor::eye(24, DType::F32, &Device::Cpu).unwrap()));
}

/// A T5 file that stores its tied token embedding only as the encoder's copy
/// (`encoder.embed_tokens.weight`, where transformers saves `shared.weight`) serves it as
/// `shared.weight`, from that tensor.
#[test]
fn t5_with_only_the_encoders_embedding_copy_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = medium_in(dir.path(), &[]);
    let t5 = dir.path().join("text_encoders/t5xxl_fp16.safetensors");
    let bytes = std::fs::read(&t5).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let shared = header.remove("shared.weight").expect("the tiny T5 stores `shared.weight`");
    header.insert("encoder.embed_tokens.weight".into(), shared);
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    std::fs::write(&t5, out).unwrap();

    let model = open(&file, Size::Medium.folder()).unwrap();
    let w = model.weights("text_encoder_3").unwrap();
    let source = w.single_file_view().unwrap().source("shared.weight").unwrap();
    assert_eq!(source.original, "encoder.embed_tokens.weight");
    let want = single(Size::Medium).weights("text_encoder_3").unwrap();
    let get = |w: &sdgen::loading::ComponentWeights| {
        values(w.var_builder(DType::F32, &Device::Cpu).unwrap().get_unchecked("shared.weight").unwrap())
    };
    assert!(get(&w) == get(&want));
}
