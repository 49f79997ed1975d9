//! Single-file checkpoints (`tools/reference/make_single_file.py`): the tiny SD 1.5 in the
//! original layout loads exactly the tensors of its folder twin and draws the same images as
//! diffusers (99.5% of channels within 1/255, none over 8/255, as the folder's parity tests) — and
//! bit for bit the folder's own images; families are recognised from real-shaped key lists; other
//! families and incomplete files are refused, naming what they look like or the first missing key.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::{assert_image_close, load, pipeline_cases, testdata, Case};
use sdgen::loading::single_file::manifest::ModelConfig;
use sdgen::loading::{Checkpoint, ModelFolder, ModelSource, OpenOptions, SafetensorsHeader, TensorInfo};
use sdgen::pipeline::{txt2img, Runtime};

fn checkpoint_path() -> PathBuf {
    testdata().join("tiny-sd15-single/tiny-sd15.safetensors")
}

fn tiny_configs() -> OpenOptions {
    OpenOptions { config_from: Some(testdata().join("tiny-sd15")), ..Default::default() }
}

fn single() -> ModelFolder {
    ModelFolder::open_with(&checkpoint_path(), &tiny_configs()).expect("single file opens")
}

fn folder() -> ModelFolder {
    ModelFolder::open(&testdata().join("tiny-sd15")).expect("folder opens")
}

#[test]
fn single_file_is_recognised_by_its_tensors() {
    let m = single();
    assert_eq!(m.family().name, "sd15");
    assert_eq!(m.pipeline_class(), "StableDiffusionPipeline");
    assert_eq!(m.checkpoint().unwrap().path, checkpoint_path());
    assert_eq!(m.root(), testdata().join("tiny-sd15"));
}

/// Every tensor of the folder, served by the single file under the same name, with the same shape
/// and the same values (the VAE's mid-attention weights come back from [C, C, 1, 1] as [C, C]);
/// and nothing else (the schedule buffers and EMA scalars of the file are left out).
#[test]
fn components_are_the_folders_tensors() {
    let (s, f) = (single(), folder());
    for component in ["text_encoder", "unet", "vae"] {
        let (sw, fw) = (s.weights(component).unwrap(), f.weights(component).unwrap());
        let (sh, fh) = (&sw.headers[0].tensors, &fw.headers[0].tensors);
        assert_eq!(sh.keys().collect::<Vec<_>>(), fh.keys().collect::<Vec<_>>(), "{component}: names");
        let (svb, fvb) =
            (sw.var_builder(DType::F32, &Device::Cpu).unwrap(), fw.var_builder(DType::F32, &Device::Cpu).unwrap());
        for (name, info) in fh {
            assert_eq!(sh[name].shape, info.shape, "{component} {name}: header shape");
            let (a, b) = (svb.get_unchecked(name).unwrap(), fvb.get_unchecked(name).unwrap());
            assert_eq!(a.dims(), b.dims(), "{component} {name}");
            let a: Vec<f64> = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f64> = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(a == b, "{component} {name}: values differ");
            // The model asks with the shape it expects; 1×1 convolutions must pass that check.
            if info.shape.len() == 2 && info.dtype == "F32" {
                svb.get((info.shape[0], info.shape[1]), name).unwrap();
            }
        }
        assert!(sw.describe().contains("tiny-sd15.safetensors"), "{}", sw.describe());
        assert_manifest_is(&testdata().join("tiny-sd15"), component, fh);
    }
    let vae = s.weights("vae").unwrap();
    let view = vae.single_file_view().unwrap();
    assert_eq!(
        view.original_name("decoder.mid_block.attentions.0.to_q.weight"),
        Some("first_stage_model.decoder.mid.attn_1.q.weight")
    );
    let err = s.weights("safety_checker").unwrap_err().to_string();
    assert!(err.contains("safety_checker") && err.contains("tiny-sd15.safetensors"), "{err}");
}

fn run(model: &ModelFolder, case: &Case) -> sdgen::pipeline::Generation {
    let req = case.request();
    txt2img(model, &req, &Runtime::cpu(), &mut |_| {}).unwrap()
}

/// The pipeline through the single file: within the parity tolerance of diffusers (which draws
/// these very images from the file with `from_single_file`, bit for bit equal to the folder's, as
/// make_single_file.py checks), and identical to the folder twin's run.
#[test]
fn single_file_draws_the_folders_images() {
    let cases: Vec<Case> = pipeline_cases();
    let reference = load("reference/sd15/pipeline.safetensors");
    let (s, f) = (single(), folder());
    for case in cases.iter().filter(|c| ["pndm_negative", "batch2", "euler", "nonsquare"].contains(&c.name.as_str())) {
        let (got, twin) = (run(&s, case), run(&f, case));
        assert_eq!(got.images.len(), case.seeds.len());
        for (i, image) in got.images.iter().enumerate() {
            let want: Vec<f32> = reference[&case.key].get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_image_close(&format!("{} image {i}", case.name), &image.pixels, &want);
            assert!(image.pixels == twin.images[i].pixels, "{} image {i}: single file and folder differ", case.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Real-shaped key lists
// ---------------------------------------------------------------------------------------------

/// `testdata/tiny-sd15-single/sd15-real-keys.json`: a real SD 1.5 checkpoint's tensors, as a header
/// (no data; byte ranges laid end to end), and where diffusers puts each.
fn real_sd15() -> (SafetensorsHeader, BTreeMap<String, (String, String)>) {
    let text = std::fs::read_to_string(testdata().join("tiny-sd15-single/sd15-real-keys.json")).unwrap();
    let entries: BTreeMap<String, Vec<serde_json::Value>> = serde_json::from_str(&text).unwrap();
    let mut tensors = BTreeMap::new();
    let mut diffusers = BTreeMap::new();
    let mut offset = 0u64;
    for (key, e) in entries {
        let dtype = e[0].as_str().unwrap().to_string();
        let shape: Vec<usize> = serde_json::from_value(e[1].clone()).unwrap();
        let bytes = shape.iter().product::<usize>() as u64 * if dtype == "I64" { 8 } else { 4 };
        tensors.insert(key.clone(), TensorInfo { dtype, shape, data_offsets: (offset, offset + bytes) });
        offset += bytes;
        if e.len() == 4 {
            diffusers.insert(key, (e[2].as_str().unwrap().to_string(), e[3].as_str().unwrap().to_string()));
        }
    }
    (SafetensorsHeader { tensors, metadata: BTreeMap::new(), file_bytes: offset }, diffusers)
}

/// The manifest of `component`'s config in `config_dir` is exactly `tensors`' names (the CLIP
/// position_ids buffer aside).
fn assert_manifest_is(config_dir: &Path, component: &str, tensors: &BTreeMap<String, TensorInfo>) {
    let text = std::fs::read_to_string(config_dir.join(component).join("config.json")).unwrap();
    let cfg = match component {
        "unet" => ModelConfig::Unet(serde_json::from_str(&text).unwrap()),
        "vae" => ModelConfig::Vae(serde_json::from_str(&text).unwrap()),
        _ => ModelConfig::ClipText(serde_json::from_str(&text).unwrap()),
    };
    let expected: BTreeSet<String> = cfg.expected().unwrap().into_iter().collect();
    let held: BTreeSet<String> = tensors.keys().filter(|k| !k.ends_with("position_ids")).cloned().collect();
    assert_eq!(expected, held, "{component} manifest");
}

fn with_shape(mut h: SafetensorsHeader, key: &str, shape: &[usize]) -> SafetensorsHeader {
    h.tensors.get_mut(key).unwrap_or_else(|| panic!("{key}")).shape = shape.to_vec();
    h
}

/// A real SD 1.5 checkpoint's names are recognised, renamed exactly as diffusers renames them, and
/// complete for SD 1.5's real (bundled) configs.
#[test]
fn real_sd15_keys_map_as_diffusers_maps_them() {
    let (header, diffusers) = real_sd15();
    let label = Path::new("v1-5-pruned-emaonly.safetensors");
    let ckpt = Checkpoint::from_header(label, header, None).expect("a real SD 1.5 key list opens");
    assert_eq!(ckpt.family.name, "sd15");
    let mut seen = 0;
    for view in ckpt.components() {
        let want: BTreeMap<&str, &str> = diffusers
            .iter()
            .filter(|(_, (c, _))| c == view.component)
            .map(|(original, (_, name))| (name.as_str(), original.as_str()))
            .collect();
        assert_eq!(
            view.tensors.keys().map(String::as_str).collect::<Vec<_>>(),
            want.keys().copied().collect::<Vec<_>>()
        );
        for (name, original) in &want {
            assert_eq!(view.original_name(name), Some(*original), "{name}");
        }
        seen += want.len();
        assert_manifest_is(&ckpt.config_dir, view.component, &view.tensors);
    }
    assert_eq!(seen, diffusers.len());
    let vae = ckpt.component("vae").unwrap();
    assert_eq!(vae.tensors["encoder.mid_block.attentions.0.to_v.weight"].shape, vec![512, 512]);
}

#[test]
fn families_are_recognised_from_real_shaped_keys() {
    let (header, _) = real_sd15();
    let refused =
        |h: SafetensorsHeader| Checkpoint::from_header(Path::new("x.safetensors"), h, None).unwrap_err().to_string();
    let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
    let err = refused(with_shape(header.clone(), conv_in, &[320, 9, 3, 3]));
    assert!(err.contains("inpainting") && err.contains(conv_in), "{err}");
    let to_k = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
    let err = refused(with_shape(header.clone(), to_k, &[320, 1024]));
    assert!(err.contains("Stable Diffusion 2.x") && err.contains(to_k), "{err}");
    assert!(err.contains("Stable Diffusion 1.5"), "names what this build runs: {err}");
    // SDXL: its second (OpenCLIP bigG) text encoder under `conditioner.embedders.1`.
    let mut sdxl = header.clone();
    let bias = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias";
    sdxl.tensors.insert(bias.into(), TensorInfo { dtype: "F16".into(), shape: vec![1280], data_offsets: (0, 2560) });
    let err = refused(sdxl);
    assert!(err.contains("SDXL base") && err.contains(bias), "{err}");
    let mut nothing = header;
    nothing.tensors.retain(|k, _| k.starts_with("first_stage_model."));
    let err = refused(nothing);
    assert!(err.contains("not a checkpoint this build recognises") && err.contains("first_stage_model."), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Refusals of real files
// ---------------------------------------------------------------------------------------------

/// Writes a safetensors file holding `keep`'s tensors of the tiny checkpoint (bytes copied as they
/// are, whatever their dtype), plus `extra` zero-filled f16 tensors.
fn rewrite(dir: &Path, name: &str, keep: impl Fn(&str) -> bool, extra: &[(&str, &[usize])]) -> PathBuf {
    rewrite_as(dir, name, keep, extra, false)
}

/// [`rewrite`], with the f32 tensors stored as f16 when `half`.
fn rewrite_as(dir: &Path, name: &str, keep: impl Fn(&str) -> bool, extra: &[(&str, &[usize])], half: bool) -> PathBuf {
    common::files::rewrite_safetensors(&checkpoint_path(), dir, name, keep, extra, half)
}

/// Most single files are stored in f16: each tensor is converted on its own, when fetched, to the
/// dtype asked for — exactly the f32 value rounded once to f16.
#[test]
fn half_precision_single_files_load_into_any_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let path = rewrite_as(dir.path(), "tiny-fp16.safetensors", |_| true, &[], true);
    let (s, f) = (ModelFolder::open_with(&path, &tiny_configs()).unwrap(), folder());
    for component in ["text_encoder", "vae"] {
        let (sw, fw) = (s.weights(component).unwrap(), f.weights(component).unwrap());
        let reference = fw.var_builder(DType::F32, &Device::Cpu).unwrap();
        for target in [DType::F32, DType::F16] {
            let vb = sw.var_builder(target, &Device::Cpu).unwrap();
            let stored_f16 = sw.headers[0].tensors.values().filter(|i| i.dtype == "F16").count();
            assert_eq!(stored_f16 + usize::from(component == "text_encoder"), sw.headers[0].tensors.len());
            for (name, info) in sw.headers[0].tensors.iter().filter(|(_, i)| i.dtype == "F16") {
                let got = vb.get_unchecked(name).unwrap();
                assert_eq!((got.dtype(), got.dims()), (target, info.shape.as_slice()), "{name}");
                let want = reference.get_unchecked(name).unwrap().to_dtype(DType::F16).unwrap();
                let diff = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap()).unwrap();
                let worst = diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(worst, 0.0, "{component} {name} as {target:?}");
            }
        }
    }
}

#[test]
fn another_family_is_refused_naming_what_it_looks_like() {
    let dir = tempfile::tempdir().unwrap();
    let sdxl = rewrite(
        dir.path(),
        "sdxl-like.safetensors",
        |_| false,
        &[
            ("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight", &[77, 8]),
            ("conditioner.embedders.1.model.positional_embedding", &[77, 8]),
            ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", &[8]),
            ("model.diffusion_model.input_blocks.0.0.weight", &[8, 4, 3, 3]),
            ("model.diffusion_model.label_emb.0.0.weight", &[32, 16]),
            ("first_stage_model.decoder.conv_in.weight", &[8, 4, 3, 3]),
        ],
    );
    let err = ModelFolder::open(&sdxl).unwrap_err().to_string();
    assert!(err.contains("sdxl-like.safetensors") && err.contains("looks like an SDXL base checkpoint"), "{err}");
    assert!(err.contains("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"), "{err}");
    let lora =
        rewrite(dir.path(), "lora.safetensors", |_| false, &[("lora_unet_mid_block_attentions_0_proj_in.alpha", &[])]);
    let err = ModelFolder::open(&lora).unwrap_err().to_string();
    assert!(err.contains("LoRA"), "{err}");
}

#[test]
fn missing_tensors_are_refused_naming_the_first_missing_key() {
    let dir = tempfile::tempdir().unwrap();
    let open = |path: &Path| ModelFolder::open_with(path, &tiny_configs()).unwrap_err().to_string();
    // One missing tensor: the VAE's (conv-shaped) mid-attention query.
    let q = "first_stage_model.decoder.mid.attn_1.q.weight";
    let err = open(&rewrite(dir.path(), "no-q.safetensors", |k| k != q, &[]));
    assert!(err.contains("no-q.safetensors") && err.contains(&format!("lacks `{q}`")), "{err}");
    assert!(err.contains("decoder.mid_block.attentions.0.to_q.weight"), "{err}");
    // Two: the UNet's is named, being loaded before the VAE (and an upsampler after an attention
    // block sits in slot 2 of the original numbering).
    let up = "model.diffusion_model.output_blocks.5.2.conv.bias";
    let err = open(&rewrite(dir.path(), "two.safetensors", |k| k != q && k != up, &[]));
    assert!(err.contains(&format!("lacks `{up}`")) && !err.contains(q), "{err}");
    // A whole model.
    let err = open(&rewrite(dir.path(), "no-vae.safetensors", |k| !k.starts_with("first_stage_model."), &[]));
    assert!(err.contains("has no VAE (no `first_stage_model.*` tensors)"), "{err}");
    let err = open(&rewrite(dir.path(), "no-clip.safetensors", |k| !k.starts_with("cond_stage_model."), &[]));
    assert!(err.contains("has no CLIP text encoder"), "{err}");
}

/// Without a config folder the family's real configs apply, and the tiny checkpoint does not fit
/// them: refused up front with the shape that shows it (through `--model PATH` as well).
#[test]
fn configs_default_to_the_familys_and_must_fit() {
    let err = ModelSource::parse(checkpoint_path().to_str().unwrap()).open().unwrap_err().to_string();
    assert!(err.contains("token_embedding.weight` has shape [1014, 32]"), "{err}");
    assert!(err.contains("[49408, 768]") && err.contains("config_from"), "{err}");
    // The defaults are SD 1.5's own folder, less the weights.
    let (header, _) = real_sd15();
    let ckpt = Checkpoint::from_header(Path::new("real.safetensors"), header, None).unwrap();
    let unet: sdgen_models::unet::UNetConfig =
        serde_json::from_str(&std::fs::read_to_string(ckpt.config_dir.join("unet/config.json")).unwrap()).unwrap();
    assert_eq!(unet.block_out_channels, vec![320, 640, 1280, 1280]);
    let tokenizer = sdgen::tokenizer::ClipTokenizer::from_dir(&ckpt.config_dir.join("tokenizer")).unwrap();
    assert_eq!(tokenizer.vocab_size(), 49408);
    assert_eq!(ckpt.pipeline_class, "StableDiffusionPipeline");
}

#[test]
fn config_folders_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions { config_from: Some(dir.path().to_path_buf()), ..Default::default() };
    let err = ModelFolder::open_with(&checkpoint_path(), &opts).unwrap_err().to_string();
    assert!(err.contains("lacks text_encoder/config.json") && err.contains("tokenizer/vocab.json"), "{err}");
    let err = ModelFolder::open_with(&testdata().join("tiny-sd15"), &tiny_configs()).unwrap_err().to_string();
    assert!(err.contains("single-file checkpoints only"), "{err}");
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"not a pickle").unwrap();
    let err = ModelFolder::open(&ckpt).unwrap_err().to_string();
    assert!(err.contains("pickle") && err.contains("model.ckpt"), "{err}");
}
