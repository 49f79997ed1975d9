//! LoRAs in the kohya and diffusers/PEFT formats, fused into the tiny SD 1.5's and SDXL's UNet and
//! text encoders, against diffusers' `load_lora_weights` + `fuse_lora`
//! (`tools/reference/make_lora.py`): the fused weights to the component tolerance, the images to
//! the pipeline tolerance. Then the refusals: a LoRA for the other family, one whose keys match
//! nothing, keys of no LoRA format, a scale that is not a number.

mod common;

use candle_core::{DType, Device};
use common::files::rewrite_safetensors;
use common::{assert_close, assert_generation_matches, load, testdata};
use sdgen::loading::lora::{LoraFile, LoraRequest};
use sdgen::loading::{ModelFolder, ModelSource, OpenOptions};
use sdgen::pipeline::{txt2img, Request, Runtime};

#[derive(serde::Deserialize)]
struct CaseLora {
    file: String,
    scale: f64,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    family: String,
    loras: Vec<CaseLora>,
    seeds: Vec<u64>,
    prompt: String,
    steps: usize,
    guidance: f64,
    width: usize,
    height: usize,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(testdata().join("reference/lora/lora.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn model(family: &str) -> ModelFolder {
    let dir = match family {
        "sd15" => "tiny-sd15",
        "sdxl" => "tiny-sdxl",
        other => panic!("no tiny model for {other}"),
    };
    ModelFolder::open(&testdata().join(dir)).unwrap()
}

fn with_loras(case: &Case) -> ModelFolder {
    let loras: Vec<_> = case.loras.iter().map(|l| LoraFile::new(testdata().join(&l.file), l.scale)).collect();
    model(&case.family).with_loras(&loras).unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

#[test]
fn fused_weights_match_diffusers() {
    let reference = load("reference/lora/lora.safetensors");
    for case in cases() {
        let model = with_loras(&case);
        let mut checked = std::collections::BTreeMap::new();
        for (key, want) in reference.iter().filter(|(k, _)| k.starts_with(&format!("{}/", case.name))) {
            let mut parts = key.splitn(3, '/').skip(1);
            let (component, name) = (parts.next().unwrap(), parts.next().unwrap());
            // transformers 5's CLIPTextModel names its modules without the files' `text_model.`.
            let ours = match component {
                "unet" => name.to_string(),
                _ if name.starts_with("text_model.") => name.to_string(),
                _ => format!("text_model.{name}"),
            };
            let vb = model.weights(component).unwrap().var_builder(DType::F32, &Device::Cpu).unwrap();
            let got = vb.get(want.dims(), &ours).unwrap();
            assert_close(key, &got, want);
            *checked.entry(component.to_string()).or_insert(0) += 1;
        }
        let encoders = if case.family == "sdxl" { 3 } else { 2 };
        assert_eq!(checked.len(), encoders, "{}: UNet and every text encoder checked: {checked:?}", case.name);
        eprintln!("{}: fused weights within 1e-4 · max|ref|: {checked:?}", case.name);
    }
}

/// The single-file twins of the tiny models (`make_single_file*.py`: the same weights in the
/// original layout) take the same LoRAs through their views: the same fused weights.
#[test]
fn single_file_checkpoints_take_loras_too() {
    let reference = load("reference/lora/lora.safetensors");
    for (case, file) in [
        ("sd15_kohya", "tiny-sd15-single/tiny-sd15.safetensors"),
        ("sdxl_kohya", "tiny-sdxl-single/tiny-sdxl-base.safetensors"),
    ] {
        let case = cases().into_iter().find(|c| c.name == case).unwrap();
        let loras: Vec<_> = case.loras.iter().map(|l| LoraFile::new(testdata().join(&l.file), l.scale)).collect();
        let options = OpenOptions { config_from: Some(model(&case.family).root().to_path_buf()), ..Default::default() };
        let model = ModelFolder::open_with(&testdata().join(file), &options).unwrap().with_loras(&loras).unwrap();
        let key = format!("{}/unet/mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", case.name);
        let want = &reference[&key];
        let vb = model.weights("unet").unwrap().var_builder(DType::F32, &Device::Cpu).unwrap();
        assert_close(
            &key,
            &vb.get(want.dims(), "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight").unwrap(),
            want,
        );
        let key = format!("{}/unet/down_blocks.1.resnets.0.conv1.weight", case.name);
        let want = &reference[&key];
        assert_close(&key, &vb.get(want.dims(), "down_blocks.1.resnets.0.conv1.weight").unwrap(), want);
    }
}

#[test]
fn images_match_diffusers() {
    let reference = load("reference/lora/lora.safetensors");
    for case in cases() {
        let model = with_loras(&case);
        let request = Request {
            prompt: case.prompt.clone(),
            n: case.seeds.len(),
            seed: case.seeds[0],
            steps: Some(case.steps),
            guidance: Some(case.guidance),
            width: Some(case.width),
            height: Some(case.height),
            ..Default::default()
        };
        let generation = txt2img(&model, &request, &Runtime::cpu(), &mut |_| {}).unwrap();
        assert_generation_matches(&case.name, &case.seeds, &generation, &reference[&case.name]);
    }
}

#[test]
fn applied_loras_say_what_they_change() {
    let case = cases().into_iter().find(|c| c.name == "sd15_both").unwrap();
    let model = with_loras(&case);
    let applied = &model.loras().applied;
    let summary: Vec<_> = applied.iter().map(|l| (l.name.as_str(), l.format, l.scale)).collect();
    assert_eq!(summary, [("sd15_peft", "diffusers/PEFT", 0.8), ("sd15_kohya", "kohya", 0.5)]);
    // kohya's LoCon adapts the resnets' convolutions too.
    assert!(applied[1].modules["unet"] > applied[0].modules["unet"], "{applied:?}");
    assert_eq!(applied[0].modules["text_encoder"], 3 * 6, "{applied:?}");
    assert_eq!(model.loras().file_bytes(), applied.iter().map(|l| l.file_bytes).sum::<u64>());
    // The planner's load transient: the largest of the adapted weights fused in f32 with a delta.
    let unet = model.weights("unet").unwrap();
    let patches = model.loras().component("unet").unwrap();
    let elements = |shape: &[usize]| shape.iter().product::<usize>();
    let expected = patches
        .patches
        .iter()
        .flat_map(|(name, ps)| ps.iter().map(move |p| (name, p)))
        .map(|(name, p)| {
            let lora = &patches.files[p.file].1.tensors;
            let target = elements(&unet.headers[0].tensors[name].shape);
            sdgen::loading::lora::fuse_transient_bytes(
                target,
                elements(&lora[&p.down].shape) + elements(&lora[&p.up].shape),
            )
        })
        .max()
        .unwrap();
    assert_eq!(model.loras().load_transient_bytes("unet"), expected);
    assert_eq!(model.loras().load_transient_bytes("vae"), 0);
    // The VAE has no LoRA; the model without LoRAs loads its plain weights.
    assert!(!model.weights("vae").unwrap().has_lora());
    assert!(model.weights("unet").unwrap().has_lora());
    assert!(!self::model("sd15").weights("unet").unwrap().has_lora());
}

fn refusal(family: &str, lora: &std::path::Path) -> String {
    model(family).with_loras(&[LoraFile::new(lora, 1.0)]).expect_err("refused").to_string()
}

#[test]
fn a_lora_for_the_other_family_is_refused_naming_both() {
    for format in ["kohya", "peft"] {
        let sdxl_lora = testdata().join(format!("lora/sdxl_{format}.safetensors"));
        let e = refusal("sd15", &sdxl_lora);
        assert!(e.contains("a LoRA for Stable Diffusion XL") && e.contains("(Stable Diffusion 1.5)"), "{format}: {e}");
        assert!(e.contains("text_encoder_2"), "{e}");

        let sd15_lora = testdata().join(format!("lora/sd15_{format}.safetensors"));
        let e = refusal("sdxl", &sd15_lora);
        assert!(e.contains("a LoRA for Stable Diffusion 1.5") && e.contains("(Stable Diffusion XL)"), "{format}: {e}");
    }
}

#[test]
fn a_lora_whose_keys_match_nothing_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = testdata().join("lora/sd15_kohya.safetensors");
    let extra: &[(&str, &[usize])] = &[
        ("lora_unet_no_such_block_to_q.lora_down.weight", &[4, 8]),
        ("lora_unet_no_such_block_to_q.lora_up.weight", &[8, 4]),
    ];
    let lora = rewrite_safetensors(&src, dir.path(), "nothing.safetensors", |_| false, extra, false);
    let e = refusal("sd15", &lora);
    assert!(e.contains("nothing.safetensors") && e.contains("none of its 1 modules"), "{e}");
    assert!(e.contains("lora_unet_no_such_block_to_q"), "{e}");

    // Some keys that match and one that does not: still refused, not partly applied.
    let lora = rewrite_safetensors(&src, dir.path(), "partly.safetensors", |_| true, extra, false);
    let e = refusal("sd15", &lora);
    assert!(e.contains("1 of its") && e.contains("lora_unet_no_such_block_to_q"), "{e}");

    // Keys of no LoRA format (a LoHa's) name the file and the keys.
    let extra: &[(&str, &[usize])] = &[("lora_unet_x.hada_w1_a", &[4, 8])];
    let lora = rewrite_safetensors(&src, dir.path(), "loha.safetensors", |_| false, extra, false);
    let e = refusal("sd15", &lora);
    assert!(e.contains("loha.safetensors") && e.contains("`lora_unet_x.hada_w1_a`") && e.contains("LoHa"), "{e}");
}

#[test]
fn lora_values_parse_path_and_scale() {
    let file = testdata().join("lora/sd15_peft.safetensors");
    let f = file.display();
    let r = LoraRequest::parse(&format!("{f}:0.8")).unwrap();
    assert_eq!((r.source, r.scale), (ModelSource::Path(file.clone()), 0.8));
    let r = LoraRequest::parse(&f.to_string()).unwrap();
    assert_eq!(r.scale, 1.0);
    let r = LoraRequest::parse(&format!("{f}:-0.5")).unwrap();
    assert_eq!(r.scale, -0.5);
    let r = LoraRequest::parse("org/some-lora:0.7").unwrap();
    assert_eq!(r.source, ModelSource::Repo { repo: "org/some-lora".into(), name: None });
    for bad in [format!("{f}:abc"), format!("{f}:"), format!("{f}:nan"), ":0.5".to_string()] {
        let e = LoraRequest::parse(&bad).expect_err(&bad);
        assert_eq!(e.field(), Some("lora"), "{bad}");
        eprintln!("{bad}: {e}");
    }
    let e = LoraRequest::parse(&format!("{f}:abc")).unwrap_err().to_string();
    assert!(e.contains("`abc` is not a number"), "{e}");
}
