//! SDXL single-file checkpoints in Stability's original layout
//! (`tools/reference/make_single_file_sdxl.py`): the tiny base and refiner open with their
//! folders' configs and serve exactly the folders' tensors — OpenCLIP's fused q/k/v split into
//! three, its `text_projection` transposed — as diffusers' `from_single_file` loads them (checked
//! by the script, which also checks the outputs against the folders'); the real checkpoints'
//! key lists rename exactly as diffusers renames them, with SDXL's real (bundled) configs; files
//! are recognised as base or refiner, and incomplete or mismatched ones are refused naming the
//! original key or the component at fault. Tolerance: none — every tensor compares exactly (the
//! f16 file: exactly the f32 value rounded once).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::testdata;
use sdgen::loading::single_file::manifest::ModelConfig;
use sdgen::loading::single_file::rules::Take;
use sdgen::loading::{Checkpoint, ModelFolder, ModelSource, OpenOptions, SafetensorsHeader, TensorInfo};

const KINDS: [Kind; 2] = [Kind::Base, Kind::Refiner];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Base,
    Refiner,
}

impl Kind {
    fn file(self) -> PathBuf {
        testdata().join(match self {
            Kind::Base => "tiny-sdxl-single/tiny-sdxl-base.safetensors",
            Kind::Refiner => "tiny-sdxl-single/tiny-sdxl-refiner.safetensors",
        })
    }
    fn folder(self) -> PathBuf {
        testdata().join(match self {
            Kind::Base => "tiny-sdxl",
            Kind::Refiner => "tiny-sdxl-refiner",
        })
    }
    fn real_keys(self) -> PathBuf {
        testdata().join(match self {
            Kind::Base => "tiny-sdxl-single/sdxl-base-real-keys.json",
            Kind::Refiner => "tiny-sdxl-single/sdxl-refiner-real-keys.json",
        })
    }
    fn family(self) -> &'static str {
        match self {
            Kind::Base => "sdxl",
            Kind::Refiner => "sdxl-refiner",
        }
    }
    fn components(self) -> &'static [&'static str] {
        match self {
            Kind::Base => &["text_encoder", "text_encoder_2", "unet", "vae"],
            Kind::Refiner => &["text_encoder_2", "unet", "vae"],
        }
    }
    /// The prefix of OpenCLIP bigG's keys.
    fn big_g(self) -> &'static str {
        match self {
            Kind::Base => "conditioner.embedders.1.model.",
            Kind::Refiner => "conditioner.embedders.0.model.",
        }
    }
}

fn configs_of(dir: PathBuf) -> OpenOptions {
    OpenOptions { config_from: Some(dir), ..Default::default() }
}

fn single(kind: Kind) -> ModelFolder {
    ModelFolder::open_with(&kind.file(), &configs_of(kind.folder()))
        .unwrap_or_else(|e| panic!("{kind:?} single file opens: {e}"))
}

fn folder(kind: Kind) -> ModelFolder {
    ModelFolder::open(&kind.folder()).unwrap_or_else(|e| panic!("{kind:?} folder opens: {e}"))
}

/// For a failure on a tensor stored transposed: where the transpose happens.
fn hint(name: &str) -> &'static str {
    if name == "text_projection.weight" {
        " (stored transposed: `ComponentWeights::var_builder` must serve a single file's share through \
         `ComponentView::var_builder`, which transposes it back)"
    } else {
        ""
    }
}

fn values(t: Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// The manifest of `component`'s config in `config_dir` is exactly `tensors`' names (the CLIP
/// position_ids buffer aside).
fn assert_manifest_is(config_dir: &Path, component: &str, tensors: &BTreeMap<String, TensorInfo>) {
    let text = std::fs::read_to_string(config_dir.join(component).join("config.json")).unwrap();
    let cfg = match component {
        "unet" => ModelConfig::Unet(serde_json::from_str(&text).unwrap()),
        "vae" => ModelConfig::Vae(serde_json::from_str(&text).unwrap()),
        "text_encoder_2" => ModelConfig::ClipTextWithProjection(serde_json::from_str(&text).unwrap()),
        _ => ModelConfig::ClipText(serde_json::from_str(&text).unwrap()),
    };
    let expected: BTreeSet<String> = cfg.expected().unwrap().into_iter().collect();
    let held: BTreeSet<String> = tensors.keys().filter(|k| !k.ends_with("position_ids")).cloned().collect();
    assert_eq!(expected, held, "{component} manifest");
}

#[test]
fn tiny_single_files_are_recognised_with_their_config_folders() {
    for kind in KINDS {
        let m = single(kind);
        assert_eq!(m.family().name, kind.family());
        let class = if kind == Kind::Base { "StableDiffusionXLPipeline" } else { "StableDiffusionXLImg2ImgPipeline" };
        assert_eq!(m.pipeline_class(), class);
        assert_eq!(m.checkpoint().unwrap().path, kind.file());
        assert_eq!(m.root(), kind.folder());
        let held: Vec<&str> = m.checkpoint().unwrap().components().map(|c| c.component).collect();
        assert_eq!(held, kind.components());
    }
}

/// Every tensor of the folders, served by the single files under the same name, with the same
/// shape and the same values, through the `VarBuilder` the pipeline builds its models from; and
/// nothing else (the CLIP `position_ids` buffer aside, which the folder's transformers 5 save
/// lacks; `logit_scale` is left out).
#[test]
fn components_are_the_folders_tensors() {
    for kind in KINDS {
        let (s, f) = (single(kind), folder(kind));
        for &component in kind.components() {
            let (sw, fw) = (s.weights(component).unwrap(), f.weights(component).unwrap());
            let (sh, fh) = (&sw.headers[0].tensors, &fw.headers[0].tensors);
            let names: Vec<&String> = sh.keys().filter(|k| !k.ends_with("position_ids")).collect();
            assert_eq!(names, fh.keys().collect::<Vec<_>>(), "{kind:?} {component}: names");
            let (svb, fvb): (VarBuilder, VarBuilder) =
                (sw.var_builder(DType::F32, &Device::Cpu).unwrap(), fw.var_builder(DType::F32, &Device::Cpu).unwrap());
            for (name, info) in fh {
                assert_eq!(sh[name].shape, info.shape, "{kind:?} {component} {name}: header shape");
                let (a, b) = (svb.get_unchecked(name).unwrap(), fvb.get_unchecked(name).unwrap());
                assert_eq!(a.dims(), b.dims(), "{kind:?} {component} {name}");
                assert!(values(a) == values(b), "{kind:?} {component} {name}: values differ{}", hint(name));
                // The model asks with the shape it expects.
                svb.get(info.shape.clone(), name).unwrap();
            }
            assert!(sw.describe().contains("tiny-sdxl-"), "{}", sw.describe());
            assert_manifest_is(&kind.folder(), component, sh);
        }
        let te2 = s.weights("text_encoder_2").unwrap();
        let view = te2.single_file_view().unwrap();
        let big_g = kind.big_g();
        let in_proj = format!("{big_g}transformer.resblocks.1.attn.in_proj_weight");
        for (i, piece) in ["q", "k", "v"].into_iter().enumerate() {
            let name = format!("text_model.encoder.layers.1.self_attn.{piece}_proj.weight");
            let source = view.source(&name).unwrap();
            assert_eq!((source.original.as_str(), source.take), (in_proj.as_str(), Take::Chunk { index: i, of: 3 }));
        }
        let projection = view.source("text_projection.weight").unwrap();
        assert_eq!(projection.original, format!("{big_g}text_projection"));
        assert_eq!(projection.take, Take::Transposed);
        // The view's own VarBuilder serves the same tensors (the projection transposed back).
        let (vb, fvb) = (
            view.var_builder(DType::F32, &Device::Cpu).unwrap(),
            f.weights("text_encoder_2").unwrap().var_builder(DType::F32, &Device::Cpu).unwrap(),
        );
        for name in ["text_projection.weight", "text_model.encoder.layers.2.self_attn.v_proj.bias"] {
            assert!(values(vb.get_unchecked(name).unwrap()) == values(fvb.get_unchecked(name).unwrap()), "{name}");
        }
    }
    let err = single(Kind::Refiner).weights("text_encoder").unwrap_err().to_string();
    assert!(err.contains("holds no `text_encoder`") && err.contains("tiny-sdxl-refiner.safetensors"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Real-shaped key lists
// ---------------------------------------------------------------------------------------------

/// Where diffusers puts one original tensor.
struct Renamed {
    component: String,
    /// One name, or q/k/v of a fused tensor.
    names: Vec<String>,
    /// The shape of each diffusers tensor.
    shape: Vec<usize>,
}

/// A real checkpoint's tensors (`*-real-keys.json`) as a header (no data; byte ranges laid end
/// to end) and where diffusers puts each.
fn real(kind: Kind) -> (SafetensorsHeader, BTreeMap<String, Renamed>) {
    let text = std::fs::read_to_string(kind.real_keys()).unwrap();
    let entries: BTreeMap<String, Vec<serde_json::Value>> = serde_json::from_str(&text).unwrap();
    let mut tensors = BTreeMap::new();
    let mut renamed = BTreeMap::new();
    let mut offset = 0u64;
    for (key, e) in entries {
        let dtype = e[0].as_str().unwrap().to_string();
        let shape: Vec<usize> = serde_json::from_value(e[1].clone()).unwrap();
        let bytes = shape.iter().product::<usize>() as u64 * if dtype == "I64" { 8 } else { 2 };
        tensors.insert(key.clone(), TensorInfo { dtype, shape: shape.clone(), data_offsets: (offset, offset + bytes) });
        offset += bytes;
        if e.len() >= 4 {
            let names = match &e[3] {
                serde_json::Value::String(n) => vec![n.clone()],
                list => serde_json::from_value(list.clone()).unwrap(),
            };
            let shape = e.get(4).map_or(shape, |s| serde_json::from_value(s.clone()).unwrap());
            renamed.insert(key, Renamed { component: e[2].as_str().unwrap().to_string(), names, shape });
        }
    }
    (SafetensorsHeader { tensors, metadata: BTreeMap::new(), file_bytes: offset }, renamed)
}

fn label(kind: Kind) -> PathBuf {
    PathBuf::from(if kind == Kind::Base { "sd_xl_base_1.0.safetensors" } else { "sd_xl_refiner_1.0.safetensors" })
}

/// The real SDXL checkpoints' names are recognised, renamed exactly as diffusers renames them
/// (names, shapes, fused q/k/v pieces as byte ranges of their tensor), and complete for SDXL's
/// real (bundled) configs.
#[test]
fn real_keys_map_as_diffusers_maps_them() {
    for kind in KINDS {
        let (header, renamed) = real(kind);
        let ckpt = Checkpoint::from_header(&label(kind), header.clone(), None)
            .unwrap_or_else(|e| panic!("the real {kind:?} key list opens: {e}"));
        assert_eq!(ckpt.family.name, kind.family());
        let mut seen = 0;
        for view in ckpt.components() {
            let mut want: BTreeMap<&str, (&str, &[usize])> = BTreeMap::new();
            for (original, r) in renamed.iter().filter(|(_, r)| r.component == view.component) {
                for name in &r.names {
                    want.insert(name, (original, &r.shape));
                }
            }
            let names: Vec<&str> =
                view.tensors.keys().map(String::as_str).filter(|k| !k.ends_with("position_ids")).collect();
            assert_eq!(names, want.keys().copied().collect::<Vec<_>>(), "{kind:?} {}", view.component);
            for (name, (original, shape)) in &want {
                assert_eq!(view.original_name(name), Some(*original), "{name}");
                assert_eq!(view.tensors[*name].shape, shape.to_vec(), "{name}");
            }
            seen += want.len();
            assert_manifest_is(&ckpt.config_dir, view.component, &view.tensors);
        }
        assert_eq!(seen, renamed.values().map(|r| r.names.len()).sum::<usize>());

        // q, k, v: consecutive thirds of the stored bytes.
        let te2 = ckpt.component("text_encoder_2").unwrap();
        let fused = &header.tensors[&format!("{}transformer.resblocks.31.attn.in_proj_weight", kind.big_g())];
        let third = fused.byte_len() / 3;
        for (i, piece) in ["q", "k", "v"].into_iter().enumerate() {
            let info = &te2.tensors[&format!("text_model.encoder.layers.31.self_attn.{piece}_proj.weight")];
            let start = fused.data_offsets.0 + i as u64 * third;
            assert_eq!(info.data_offsets, (start, start + third), "{piece}");
        }
        assert_eq!(te2.source("text_projection.weight").unwrap().take, Take::Transposed);
        let vae = ckpt.component("vae").unwrap();
        assert_eq!(vae.tensors["encoder.mid_block.attentions.0.to_v.weight"].shape, vec![512, 512]);
    }
}

#[test]
fn base_and_refiner_are_told_apart() {
    let (base, _) = real(Kind::Base);
    let (refiner, _) = real(Kind::Refiner);
    let open = |kind, h: &SafetensorsHeader, dir: Option<&Path>| Checkpoint::from_header(&label(kind), h.clone(), dir);
    assert_eq!(open(Kind::Refiner, &refiner, None).unwrap().family.name, "sdxl-refiner");
    assert_eq!(open(Kind::Base, &base, None).unwrap().family.name, "sdxl");
    // A refiner given the base's configs, and the other way round: refused by the components the
    // folder's model_index.json names, before any config is applied.
    let err = open(Kind::Refiner, &refiner, Some(&Kind::Base.folder())).unwrap_err().to_string();
    assert!(err.contains("names a `text_encoder`") && err.contains("Stable Diffusion XL refiner"), "{err}");
    let err = open(Kind::Base, &base, Some(&Kind::Refiner.folder())).unwrap_err().to_string();
    assert!(err.contains("names no `text_encoder`") && err.contains("sd_xl_base_1.0"), "{err}");
    // The tiny files, which only a config folder identifies: the refiner is not the base the
    // base's folder is for.
    let err = ModelFolder::open_with(&Kind::Refiner.file(), &configs_of(Kind::Base.folder())).unwrap_err().to_string();
    assert!(err.contains("is not the Stable Diffusion XL checkpoint config folder"), "{err}");
    assert!(err.contains("no `conditioner.embedders.0.transformer.*` tensors"), "{err}");
    assert!(err.contains("looks like an SDXL UNet"), "says what it looks like: {err}");
    let err = ModelFolder::open_with(&Kind::Base.file(), &configs_of(Kind::Refiner.folder())).unwrap_err().to_string();
    assert!(err.contains("is not the Stable Diffusion XL refiner checkpoint"), "{err}");
    assert!(err.contains("no `conditioner.embedders.0.model.*` tensors"), "{err}");
    // An SD 1.5 folder for an SDXL file.
    let err = ModelFolder::open_with(&Kind::Base.file(), &configs_of(testdata().join("tiny-sd15"))).unwrap_err();
    assert!(err.to_string().contains("no `cond_stage_model.transformer.*` tensors"), "{err}");
}

/// Without a config folder SDXL's real configs apply: the tiny files, whose bigG has 3 layers
/// where the real one's 10th identifies SDXL, are not recognised; the real key lists get SDXL's
/// own folders, tokenizers included.
#[test]
fn configs_default_to_sdxls_own() {
    let err = ModelSource::parse(Kind::Base.file().to_str().unwrap()).open().unwrap_err().to_string();
    assert!(err.contains("looks like an SDXL UNet") && err.contains("label_emb.0.0.weight"), "{err}");
    // An SDXL of another size: what does not match, and the fix (not "cannot run … it runs SDXL").
    assert!(err.contains("but not the text encoders of the standard SDXL base or refiner"), "{err}");
    assert!(err.contains("resblocks.9") && err.contains("config_from DIR"), "{err}");
    assert!(!err.contains("cannot run"), "{err}");
    for kind in KINDS {
        let (header, _) = real(kind);
        let ckpt = Checkpoint::from_header(&label(kind), header, None).unwrap();
        let unet: sdgen_models::unet::UNetConfig =
            serde_json::from_str(&std::fs::read_to_string(ckpt.config_dir.join("unet/config.json")).unwrap()).unwrap();
        let vae: sdgen_models::vae::VaeConfig =
            serde_json::from_str(&std::fs::read_to_string(ckpt.config_dir.join("vae/config.json")).unwrap()).unwrap();
        assert_eq!((vae.scaling_factor, vae.force_upcast), (0.13025, Some(true)));
        let tokenizer_2 = sdgen::tokenizer::ClipTokenizer::from_dir(&ckpt.config_dir.join("tokenizer_2")).unwrap();
        assert_eq!((tokenizer_2.vocab_size(), tokenizer_2.pad_id()), (49408, 0), "tokenizer_2 pads with `!`");
        match kind {
            Kind::Base => {
                assert_eq!(unet.block_out_channels, vec![320, 640, 1280]);
                assert_eq!(unet.projection_class_embeddings_input_dim, Some(2816));
                let tokenizer = sdgen::tokenizer::ClipTokenizer::from_dir(&ckpt.config_dir.join("tokenizer")).unwrap();
                assert_eq!(tokenizer.pad_id(), 49407, "tokenizer pads with <|endoftext|>");
                assert_eq!(ckpt.pipeline_class, "StableDiffusionXLPipeline");
            }
            Kind::Refiner => {
                assert_eq!(unet.block_out_channels, vec![384, 768, 1536, 1536]);
                assert_eq!(unet.projection_class_embeddings_input_dim, Some(2560));
                assert!(!ckpt.config_dir.join("text_encoder").exists());
                assert_eq!(ckpt.pipeline_class, "StableDiffusionXLImg2ImgPipeline");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals of files
// ---------------------------------------------------------------------------------------------

/// Writes a safetensors file holding `keep`'s tensors of `src` (bytes copied as they are,
/// whatever their dtype; the f32 ones as f16 when `half`).
fn rewrite(src: &Path, dir: &Path, name: &str, keep: impl Fn(&str) -> bool, half: bool) -> PathBuf {
    common::files::rewrite_safetensors(src, dir, name, keep, &[], half)
}

#[test]
fn truncated_files_are_refused_naming_the_missing_key() {
    let dir = tempfile::tempdir().unwrap();
    for kind in KINDS {
        let open = |path: &Path| ModelFolder::open_with(path, &configs_of(kind.folder())).unwrap_err().to_string();
        // A bigG layer gone: its first tensor in diffusers' order is k_proj, a third of in_proj.
        let layer = format!("{}transformer.resblocks.2.", kind.big_g());
        let path = rewrite(&kind.file(), dir.path(), "no-layer.safetensors", |k| !k.starts_with(&layer), false);
        let err = open(&path);
        assert!(
            err.contains("no-layer.safetensors") && err.contains(&format!("lacks `{layer}attn.in_proj_weight`")),
            "{err}"
        );
        assert!(err.contains("text_model.encoder.layers.2.self_attn.k_proj.weight"), "{err}");
        // The projection alone.
        let projection = format!("{}text_projection", kind.big_g());
        let err = open(&rewrite(&kind.file(), dir.path(), "no-proj.safetensors", |k| k != projection, false));
        assert!(err.contains(&format!("lacks `{projection}`")) && err.contains("`text_projection.weight`"), "{err}");
        // The added embedding.
        let label_emb = "model.diffusion_model.label_emb.0.2.weight";
        let err = open(&rewrite(&kind.file(), dir.path(), "no-emb.safetensors", |k| k != label_emb, false));
        assert!(
            err.contains(&format!("lacks `{label_emb}`")) && err.contains("add_embedding.linear_2.weight"),
            "{err}"
        );
        // The whole second text encoder.
        let err =
            open(&rewrite(&kind.file(), dir.path(), "no-te2.safetensors", |k| !k.starts_with(kind.big_g()), false));
        assert!(err.contains("has no OpenCLIP text encoder"), "{err}");
    }
    // A real-size file missing bigG's last layer (the 10th, which identifies it, still there).
    let (mut header, _) = real(Kind::Base);
    header.tensors.retain(|k, _| !k.starts_with("conditioner.embedders.1.model.transformer.resblocks.31."));
    let err = Checkpoint::from_header(&label(Kind::Base), header, None).unwrap_err().to_string();
    assert!(
        err.contains("lacks `conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight`"),
        "{err}"
    );
}

/// A fused tensor that does not split in three, and a projection that is not a matrix, are
/// refused naming the key.
#[test]
fn malformed_open_clip_tensors_are_refused() {
    let (header, _) = real(Kind::Refiner);
    let with_shape = |key: &str, shape: &[usize]| {
        let mut h = header.clone();
        h.tensors.get_mut(key).unwrap().shape = shape.to_vec();
        Checkpoint::from_header(&label(Kind::Refiner), h, None).unwrap_err().to_string()
    };
    let in_proj = "conditioner.embedders.0.model.transformer.resblocks.4.attn.in_proj_bias";
    let err = with_shape(in_proj, &[3841]);
    assert!(err.contains(in_proj) && err.contains("does not split into 3"), "{err}");
    let projection = "conditioner.embedders.0.model.text_projection";
    let err = with_shape(projection, &[1280 * 1280]);
    assert!(err.contains(projection) && err.contains("where a matrix belongs"), "{err}");
    // A bigG of another width than the config's: the first spot shape, named by its original key.
    let err = with_shape("conditioner.embedders.0.model.token_embedding.weight", &[49408, 1024]);
    assert!(err.contains("looks like an SDXL refiner checkpoint") && err.contains("has shape [49408, 1024]"), "{err}");
}

/// Released SDXL files are f16: each piece of a fused tensor is read from its own byte range and
/// converted alone — exactly the f32 value rounded once to f16, into any dtype.
#[test]
fn half_precision_pieces_load_into_any_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let kind = Kind::Base;
    let path = rewrite(&kind.file(), dir.path(), "tiny-fp16.safetensors", |_| true, true);
    let (s, f) = (ModelFolder::open_with(&path, &configs_of(kind.folder())).unwrap(), folder(kind));
    let (sw, fw) = (s.weights("text_encoder_2").unwrap(), f.weights("text_encoder_2").unwrap());
    let reference = fw.var_builder(DType::F32, &Device::Cpu).unwrap();
    for target in [DType::F32, DType::F16, DType::BF16] {
        let vb = sw.var_builder(target, &Device::Cpu).unwrap();
        for (name, info) in &sw.headers[0].tensors {
            assert_eq!(info.dtype, "F16", "{name}");
            let got = vb.get_unchecked(name).unwrap();
            assert_eq!((got.dtype(), got.dims()), (target, info.shape.as_slice()), "{name}");
            let want = reference.get_unchecked(name).unwrap().to_dtype(DType::F16).unwrap().to_dtype(target).unwrap();
            assert!(values(got) == values(want), "text_encoder_2 {name} as {target:?}{}", hint(name));
        }
    }
}
