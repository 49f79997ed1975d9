//! Block streaming changes no number: on every tiny model (SD 1.5, SDXL, SD 3.5 Large with T5,
//! SD 3.5 Medium's MMDiT-X), the denoiser (and T5) built streamed — every block read from the file
//! per use (K = 0) or K resident — gives the resident model's outputs bit for bit, and
//! so does a whole pipeline run with the planner's streaming options.
//! The block lists are the models' own at SDXL's full size.

mod common;

use candle_core::{DType, Device, Tensor};
use common::testdata;
use sdgen::loading::quantise::Quantise;
use sdgen::loading::ModelFolder;
use sdgen::pipeline::{txt2img, Request, Runtime, StageOptions};
use sdgen_models::denoiser::Conditioning;
use sdgen_models::stream::{Residency, StreamableModel};
use sdgen_models::t5::{T5Config, T5EncoderModel};
use sdgen_models::unet::{UNet2DConditionModel, UNetConfig};

fn open(name: &str) -> ModelFolder {
    ModelFolder::open(&testdata().join(name)).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Random inputs of the model's geometry on `dev` in `dtype` (as the pipelines hand them to the
/// denoiser): a guided batch of 2 at 16×16 latents.
fn inputs(model: &ModelFolder, dev: &Device, dtype: DType) -> (Tensor, Tensor, Conditioning) {
    let g = model.denoiser_geometry().unwrap();
    let randn = |shape: &[usize]| {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_device(dev).unwrap()
    };
    let latents = randn(&[2, g.in_channels, 16, 16]);
    let timesteps = Tensor::new(&[500f64, 500.0], &Device::Cpu).unwrap();
    let family = model.family().name;
    let (pooled, time_ids) = match family {
        "sdxl" => {
            let unet: UNetConfig = model.config("unet", "config.json").unwrap();
            let text = unet.projection_class_embeddings_input_dim.unwrap() - 6 * unet.addition_time_embed_dim.unwrap();
            let ids = Tensor::new(&[[256f32, 256., 0., 0., 256., 256.]; 2], dev).unwrap().to_dtype(dtype).unwrap();
            (Some(randn(&[2, text])), Some(ids))
        }
        "sd35-large" | "sd35-medium" => {
            let cfg: sdgen_models::mmdit::MMDiTConfig = model.config("transformer", "config.json").unwrap();
            (Some(randn(&[2, cfg.pooled_projection_dim])), None)
        }
        _ => (None, None),
    };
    let cond = Conditioning { context: randn(&[2, 7, g.context_width]), pooled, time_ids, timestep_cond: None };
    (latents, timesteps, cond)
}

/// `model`'s denoiser streamed (K = 0, half, all but one) against resident on `dev` in `dtype`.
fn streamed_denoiser_matches(name: &str, model: &ModelFolder, dev: &Device, dtype: DType) {
    let blocks = model.denoiser_stream_blocks().unwrap().len();
    assert!(blocks > 2, "{name}: {blocks} blocks");
    let (latents, t, cond) = inputs(model, dev, dtype);
    let resident = model.load_denoiser(dtype, dev).unwrap();
    let expected = values(&resident.forward(&latents, &t, &cond).unwrap());
    drop(resident);
    for resident_blocks in [0, blocks / 2, blocks - 1] {
        let streamed = model.load_denoiser_with(dtype, dev, Residency::Streamed { resident_blocks }).unwrap();
        // Twice: a streamed block is rebuilt for every use.
        for _ in 0..2 {
            let got = values(&streamed.forward(&latents, &t, &cond).unwrap());
            assert!(got == expected, "{name}, {resident_blocks} of {blocks} blocks resident: outputs differ");
        }
    }
}

/// The denoisers streamed against resident on `dev` in `dtype`.
fn streamed_denoisers_match(dev: &Device, dtype: DType) {
    for name in ["tiny-sd15", "tiny-sdxl", "tiny-sd35-large", "tiny-sd35-medium"] {
        streamed_denoiser_matches(name, &open(name), dev, dtype);
    }
}

/// Quantised denoisers streamed against resident: GGUF files' blocks (Q8_0, Q4_0; on CUDA copied
/// to the device as bytes and into candle's block storage there) and `--weights fp8`.
fn streamed_quantised_denoisers_match(dev: &Device, dtype: DType) {
    let gguf = |file: &str, configs: &str| {
        common::open_configured(&testdata().join("gguf").join(file), &testdata().join(configs)).unwrap()
    };
    let fp8 = open("tiny-sd35-large").with_quantise(Some(Quantise::Fp8)).unwrap();
    for (name, model) in [
        ("tiny-sd35-large-Q8_0.gguf", gguf("tiny-sd35-large-Q8_0.gguf", "tiny-sd35-large")),
        ("tiny-sd35-large-Q4_0.gguf", gguf("tiny-sd35-large-Q4_0.gguf", "tiny-sd35-large")),
        ("tiny-sdxl-Q8_0.gguf", gguf("tiny-sdxl-Q8_0.gguf", "tiny-sdxl")),
        ("tiny-sd35-large --weights fp8", fp8),
    ] {
        streamed_denoiser_matches(name, &model, dev, dtype);
    }
}

#[test]
fn streamed_quantised_denoisers_match_the_resident_ones_bit_for_bit() {
    streamed_quantised_denoisers_match(&Device::Cpu, DType::F32);
}

#[test]
fn streamed_denoisers_match_the_resident_ones_bit_for_bit() {
    streamed_denoisers_match(&Device::Cpu, DType::F32);
    // bf16 as the GPU runs it (inputs in the model's dtype), where this processor has bf16.
    if sdgen_models::ops::cpu_bf16_supported() {
        streamed_denoisers_match(&Device::Cpu, DType::BF16);
    }
}

/// CUDA: streamed blocks are gathered into page-locked host memory and uploaded per use, one copy
/// per dtype of a block (`loading::stream::HostCopies`). Run on the
/// GPU machine: `cargo test --features cuda -p sdgen --test streaming -- --ignored`.
#[test]
#[ignore = "needs a CUDA device and a CUDA build"]
fn streamed_denoisers_and_pipelines_match_on_cuda() {
    let dev = Device::new_cuda(0).expect("a CUDA device (build with --features cuda)");
    for dtype in [DType::F32, DType::BF16] {
        streamed_denoisers_match(&dev, dtype);
        streamed_quantised_denoisers_match(&dev, dtype);
        streamed_pipelines_match(|| Runtime::new(dev.clone(), dtype));
    }
}

#[test]
fn streamed_skip_layer_guidance_matches_the_resident_model() {
    let model = open("tiny-sd35-medium");
    let (latents, t, cond) = inputs(&model, &Device::Cpu, DType::F32);
    let resident = model.load_denoiser(DType::F32, &Device::Cpu).unwrap();
    let expected = values(&resident.forward_skipping(&latents, &t, &cond, &[1]).unwrap());
    let streamed =
        model.load_denoiser_with(DType::F32, &Device::Cpu, Residency::Streamed { resident_blocks: 1 }).unwrap();
    assert!(values(&streamed.forward_skipping(&latents, &t, &cond, &[1]).unwrap()) == expected);
}

/// T5 streamed against resident on `dev`, in each of `dtypes`.
fn streamed_t5_matches(dev: &Device, dtypes: &[DType]) {
    let model = open("tiny-sd35-large");
    let cfg: T5Config = model.config("text_encoder_3", "config.json").unwrap();
    let weights = model.weights("text_encoder_3").unwrap();
    let ids = Tensor::new(&[[3u32, 17, 5, 1, 0, 0, 0, 0]], dev).unwrap();
    for &dtype in dtypes {
        let resident = T5EncoderModel::new(&cfg, weights.var_builder(dtype, dev).unwrap()).unwrap();
        let expected = values(&resident.forward(&ids).unwrap());
        for resident_blocks in [0, cfg.num_layers / 2, cfg.num_layers - 1] {
            let streamed = T5EncoderModel::new_streamed(
                &cfg,
                weights.var_builder(dtype, dev).unwrap(),
                weights.streamed_var_builder(dtype, dev).unwrap(),
                Residency::Streamed { resident_blocks },
            )
            .unwrap();
            for _ in 0..2 {
                let got = values(&streamed.forward(&ids).unwrap());
                assert!(got == expected, "{dtype:?}, {resident_blocks} resident");
            }
        }
    }
}

#[test]
fn a_streamed_t5_matches_the_resident_one_bit_for_bit() {
    streamed_t5_matches(&Device::Cpu, &[DType::F32, DType::F16]);
}

/// CUDA: T5's layers gathered into page-locked blocks and uploaded per use.
#[test]
#[ignore = "needs a CUDA device and a CUDA build"]
fn a_streamed_t5_matches_the_resident_one_on_cuda() {
    let dev = Device::new_cuda(0).expect("a CUDA device (build with --features cuda)");
    streamed_t5_matches(&dev, &[DType::F32, DType::BF16]);
}

/// Whole runs with the planner's streaming options (K = 0 and a third) against resident ones.
fn streamed_pipelines_match(runtime: impl Fn() -> Runtime) {
    for name in ["tiny-sd15", "tiny-sdxl", "tiny-sd35-large"] {
        let model = open(name);
        let req = Request {
            prompt: "a lighthouse at dusk".into(),
            n: 1,
            seed: 7,
            steps: Some(2),
            width: Some(64),
            height: Some(64),
            ..Default::default()
        };
        let resident = txt2img(&model, &req, &runtime(), &mut |_| {}).unwrap();
        let blocks = model.denoiser_stream_blocks().unwrap().len();
        for k in [0, blocks / 3] {
            let mut rt = runtime();
            rt.options = StageOptions {
                denoiser_resident_blocks: Some(k),
                t5_resident_blocks: Some(k.min(1)),
                ..Default::default()
            };
            let streamed = txt2img(&model, &req, &rt, &mut |_| {}).unwrap();
            assert!(streamed.images[0].rgb8 == resident.images[0].rgb8, "{name}: image differs with K = {k}");
            assert!(streamed.images[0].pixels == resident.images[0].pixels, "{name}: pixels differ with K = {k}");
            assert!(streamed.options_used.names().contains(&"block_streaming"), "{name}");
        }
    }
}

#[test]
fn streamed_pipelines_make_the_resident_images() {
    streamed_pipelines_match(Runtime::cpu);
}

/// SDXL's UNet at full size (the family's bundled config): its streamable blocks are every
/// resnet, every one of its 70 transformer blocks and the samplers, in forward order.
#[test]
fn sdxl_lists_its_full_size_blocks_in_forward_order() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/loading/single_file/sdxl/unet/config.json");
    let cfg: UNetConfig = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let blocks = UNet2DConditionModel::stream_blocks(&cfg);
    let count = |part: &str| blocks.iter().filter(|b| b.contains(part)).count();
    assert_eq!(count(".transformer_blocks."), 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2);
    assert_eq!(count(".resnets."), 2 * 3 + 2 + 3 * 3);
    assert_eq!(count("samplers"), 4);
    assert_eq!(blocks.len(), 70 + 17 + 4);
    assert_eq!(blocks[0], "down_blocks.0.resnets.0");
    assert_eq!(blocks[2], "down_blocks.0.downsamplers.0");
    let mid = blocks.iter().position(|b| b == "mid_block.resnets.0").unwrap();
    assert_eq!(blocks[mid + 1], "mid_block.attentions.0.transformer_blocks.0");
    assert_eq!(blocks[mid + 11], "mid_block.resnets.1");
    assert_eq!(blocks.last().unwrap(), "up_blocks.2.resnets.2");
}
