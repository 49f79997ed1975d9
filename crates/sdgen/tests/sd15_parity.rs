//! Parity of every SD 1.5 component, and of whole pipelines, with diffusers on the tiny model
//! (`tools/reference/make_sd15.py`). Tolerances: components `|a − b| ≤ 1e-4 · max|b|`; images
//! 99.5% of channels within 1/255, none over 8/255.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, assert_image_close, load, pipeline_cases, testdata, Case};
use sdgen::loading::ModelFolder;
use sdgen::pipeline::{txt2img, Request, Runtime};
use sdgen_models::clip::{ClipTextConfig, ClipTextModel};
use sdgen_models::unet::{UNet2DConditionModel, UNetConfig};
use sdgen_models::vae::{AutoencoderKL, VaeConfig};

fn model() -> ModelFolder {
    ModelFolder::open(&testdata().join("tiny-sd15")).expect("tiny model opens")
}

#[test]
fn folder_is_recognised_as_sd15() {
    assert_eq!(model().family().name, "sd15");
}

#[test]
fn text_encoder_matches() {
    let m = model();
    let r = load("reference/sd15/clip.safetensors");
    let cfg: ClipTextConfig = m.config("text_encoder", "config.json").unwrap();
    let vb = m.weights("text_encoder").unwrap().var_builder(DType::F32, &Device::Cpu).unwrap();
    let enc = ClipTextModel::new(&cfg, false, vb).unwrap();
    let out = enc.forward(&r["input_ids"]).unwrap();
    assert_close("last_hidden_state", &out.last_hidden_state, &r["last_hidden_state"]);
    assert_close("penultimate_hidden_state", &out.penultimate_hidden_state, &r["penultimate_hidden_state"]);
    assert_close("pooled", &out.pooled, &r["pooled"]);
}

#[test]
fn unet_matches() {
    let m = model();
    let r = load("reference/sd15/unet.safetensors");
    let cfg: UNetConfig = m.config("unet", "config.json").unwrap();
    let vb = m.weights("unet").unwrap().var_builder(DType::F32, &Device::Cpu).unwrap();
    let unet = UNet2DConditionModel::new(&cfg, vb).unwrap();
    let t = |k: &str| r[k].to_vec1::<f32>().unwrap()[0] as f64;
    let out = unet.forward(&r["sample"], t("timestep"), &r["encoder_hidden_states"]).unwrap();
    assert_close("unet out", &out, &r["out"]);
    let odd = unet.forward(&r["odd_sample"], t("odd_timestep"), &r["odd_encoder_hidden_states"]).unwrap();
    assert_close("unet odd-size out", &odd, &r["odd_out"]);
}

#[test]
fn vae_matches() {
    let m = model();
    let r = load("reference/sd15/vae.safetensors");
    let cfg: VaeConfig = m.config("vae", "config.json").unwrap();
    let vb = m.weights("vae").unwrap().var_builder(DType::F32, &Device::Cpu).unwrap();
    let vae = AutoencoderKL::new(&cfg, true, true, vb).unwrap();
    let dist = vae.encode(&r["image"]).unwrap();
    assert_close("latent mean", &dist.mean, &r["latent_mean"]);
    assert_close("latent logvar", &dist.logvar, &r["latent_logvar"]);
    assert_close("decoded", &vae.decode(&r["latent_mean"]).unwrap(), &r["decoded"]);
    assert_close("decoded random", &vae.decode(&r["latent_in"]).unwrap(), &r["decoded_random"]);
}

fn run_case(case: &Case, n: usize, seed: u64) -> sdgen::pipeline::Generation {
    let req = Request { n, seed, ..case.request() };
    txt2img(&model(), &req, &Runtime::cpu(), &mut |_| {}).unwrap()
}

#[test]
fn pipelines_match_diffusers() {
    let r = load("reference/sd15/pipeline.safetensors");
    for case in pipeline_cases() {
        let gen = run_case(&case, case.seeds.len(), case.seeds[0]);
        let expected = &r[&case.key];
        assert_eq!(gen.images.len(), case.seeds.len(), "{}", case.name);
        for (i, image) in gen.images.iter().enumerate() {
            assert_eq!(image.seed, case.seeds[i]);
            let want: Vec<f32> = expected.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_image_close(&format!("{} image {i}", case.name), &image.pixels, &want);
        }
    }
}

#[test]
fn batching_never_changes_an_image() {
    let case = pipeline_cases().into_iter().find(|c| c.name == "batch2").expect("batch2 case");
    let batch = run_case(&case, 2, case.seeds[0]);
    for (i, &seed) in case.seeds.iter().enumerate() {
        let single = run_case(&case, 1, seed);
        let a = Tensor::new(batch.images[i].pixels.as_slice(), &Device::Cpu).unwrap();
        let b = Tensor::new(single.images[0].pixels.as_slice(), &Device::Cpu).unwrap();
        assert_close(&format!("batched image {i} vs alone"), &a, &b);
    }
}
