//! Whole SD 3.5 pipelines against diffusers on the tiny random-weight SD 3.5 Large- and
//! Medium-style folders (`tools/reference/make_sd3.py`, `testdata/reference/sd3/`): no, given
//! and no guidance; a non-square batch; Turbo's guidance 0; without T5; a shorter T5 sequence;
//! MMDiT-X with skip-layer guidance; image-to-image; finished by the SDXL refiner from the decoded
//! images (`tools/reference/make_sd3_refiner.py`). Each case's timesteps must be diffusers'.
//! Tolerance: the project's pipeline tolerance (`common::assert_image_close`: ≥ 99.5% of
//! channels within 1/255, none over 8/255).

mod common;

use common::{assert_close, assert_generation_matches, load, testdata};
use sdgen::loading::ModelFolder;
use sdgen::pipeline::{
    img2img, txt2img, txt2img_with_refiner, FamilyOptions, Handoff, Img2ImgRequest, InitImage, Progress, RefinerRun,
    Request, Runtime, SkipLayerGuidance,
};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    model: String,
    prompt: String,
    negative_prompt: Option<String>,
    seeds: Vec<u64>,
    steps: usize,
    guidance: f64,
    width: usize,
    height: usize,
    timesteps: Vec<f64>,
    #[serde(default)]
    no_t5: bool,
    #[serde(default)]
    max_sequence_length: Option<usize>,
    #[serde(default)]
    skip_guidance_layers: Option<Vec<usize>>,
    #[serde(default)]
    init_image: Option<String>,
    #[serde(default)]
    strength: Option<f64>,
}

impl Case {
    fn request(&self) -> Request {
        Request {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            n: self.seeds.len(),
            seed: self.seeds[0],
            steps: Some(self.steps),
            guidance: Some(self.guidance),
            width: Some(self.width),
            height: Some(self.height),
            scheduler: None,
            family_options: FamilyOptions {
                max_sequence_length: self.max_sequence_length,
                no_t5: self.no_t5,
                skip_layer_guidance: self.skip_guidance_layers.clone().map(SkipLayerGuidance::new),
            },
            ..Default::default()
        }
    }

    fn folder(&self) -> ModelFolder {
        ModelFolder::open(&testdata().join(format!("tiny-sd35-{}", self.model))).expect("tiny SD 3.5 opens")
    }
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(testdata().join("reference/sd3/pipeline.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_case_matches_diffusers() {
    let r = load("reference/sd3/pipeline.safetensors");
    let cases = cases();
    assert!(cases.len() >= 10, "{} cases", cases.len());
    for case in &cases {
        let model = case.folder();
        let mut steps = 0;
        let mut count = |p: Progress| {
            if let Progress::Step { .. } = p {
                steps += 1;
            }
        };
        let gen = match &case.init_image {
            None => txt2img(&model, &case.request(), &Runtime::cpu(), &mut count).unwrap(),
            Some(init) => {
                let req = Img2ImgRequest {
                    request: case.request(),
                    init_image: InitImage::load(&testdata().join("reference/sd3").join(init)).unwrap(),
                    strength: case.strength,
                };
                img2img(&model, &req, &Runtime::cpu(), &mut count).unwrap()
            }
        };
        assert_eq!(steps, case.timesteps.len(), "{}: steps run", case.name);
        assert_generation_matches(&case.name, &case.seeds, &gen, &r[case.name.as_str()]);
        let t5_ran = gen.timings_ms.contains_key("text_encoder_3");
        assert_eq!(t5_ran, !case.no_t5, "{}: {:?}", case.name, gen.timings_ms);
        for stage in ["text_encoder", "text_encoder_2", "transformer", "vae"] {
            assert!(gen.timings_ms.contains_key(stage), "{}: {:?}", case.name, gen.timings_ms);
        }
    }
}

/// What a refined case's run is given (both halves); `None` is each half's default.
#[derive(serde::Deserialize)]
struct Given {
    steps: Option<usize>,
    guidance: Option<f64>,
}

/// A case of `reference/sd3/refiner.json`.
#[derive(serde::Deserialize)]
struct RefinedCase {
    name: String,
    prompt: String,
    negative_prompt: Option<String>,
    seeds: Vec<u64>,
    width: usize,
    height: usize,
    request: Given,
    strength: Option<f64>,
    base_timesteps: Vec<f64>,
    refiner_timesteps: Vec<f64>,
}

/// SD 3.5 Large, decoded, then the SDXL refiner's image-to-image on the float images, as
/// diffusers' two pipeline calls: the refined images and the base's, each to the pipeline
/// tolerance; the steps each half ran and the handoff recorded.
#[test]
fn refined_by_image_matches_diffusers() {
    let r = load("reference/sd3/refiner.safetensors");
    let text = std::fs::read_to_string(testdata().join("reference/sd3/refiner.json")).unwrap();
    let cases: Vec<RefinedCase> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 2, "{} cases", cases.len());
    let base = ModelFolder::open(&testdata().join("tiny-sd35-large")).unwrap();
    let refiner = ModelFolder::open(&testdata().join("tiny-sdxl-refiner")).unwrap();
    for case in &cases {
        let req = Request {
            prompt: case.prompt.clone(),
            negative_prompt: case.negative_prompt.clone(),
            n: case.seeds.len(),
            seed: case.seeds[0],
            steps: case.request.steps,
            guidance: case.request.guidance,
            width: Some(case.width),
            height: Some(case.height),
            ..Default::default()
        };
        let run = RefinerRun::choose(&base, &refiner, None, case.strength).unwrap();
        assert!(matches!(run, RefinerRun::Image(_)), "{}", case.name);
        // The base's own images, for the halves to be told apart when a case fails.
        let alone = txt2img(&base, &req, &Runtime::cpu(), &mut |_| {}).unwrap();
        assert_generation_matches(
            &format!("{} base", case.name),
            &case.seeds,
            &alone,
            &r[&format!("{}_base", case.name)],
        );
        let mut steps = 0;
        let mut count = |p: Progress| {
            if let Progress::Step { .. } = p {
                steps += 1;
            }
        };
        let gen = txt2img_with_refiner(&base, Some(run), &req, &Runtime::cpu(), &mut count).unwrap();
        assert_eq!(steps, case.base_timesteps.len() + case.refiner_timesteps.len(), "{}: steps run", case.name);
        assert_generation_matches(&case.name, &case.seeds, &gen, &r[case.name.as_str()]);
        let info = gen.refinement.as_ref().expect("the refinement is recorded");
        assert_eq!(info.handoff, Handoff::Image);
        assert_eq!(
            (info.base_steps, info.refiner_steps),
            (case.base_timesteps.len(), case.refiner_timesteps.len()),
            "{}",
            case.name
        );
        assert_eq!(info.handoff_timestep, case.refiner_timesteps[0], "{}", case.name);
        assert_eq!(info.strength, Some(case.strength.unwrap_or(0.3)));
        assert!(info.base_unloaded && info.high_noise_fraction.is_none());
        // Both halves' stages, apart: the base decodes, the refiner encodes, denoises and decodes.
        for stage in [
            "text_encoder_3",
            "transformer",
            "vae",
            "refiner_text_encoder_2",
            "refiner_vae_encoder",
            "refiner_unet",
            "refiner_vae",
        ] {
            assert!(gen.timings_ms.contains_key(stage), "{}: {stage} in {:?}", case.name, gen.timings_ms);
        }
    }
}

/// The transformer on the pipeline's own conditioning, through the engine's loader (sharded
/// weights), against diffusers' forward.
#[test]
fn the_loaded_transformer_is_diffusers() {
    let r = load("reference/sd3/components.safetensors");
    let model = ModelFolder::open(&testdata().join("tiny-sd35-large")).unwrap();
    let denoiser = model.load_denoiser(candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let cond = sdgen_models::denoiser::Conditioning {
        context: r["context"].clone(),
        pooled: Some(r["pooled"].clone()),
        time_ids: None,
        timestep_cond: None,
    };
    let out = denoiser.forward(&r["transformer_latents"], &r["transformer_timesteps"], &cond).unwrap();
    assert_close("transformer", &out, &r["transformer_out"]);
}

#[test]
fn sd35_options_are_refused_where_they_do_not_apply() {
    let sd15 = ModelFolder::open(&testdata().join("tiny-sd15")).unwrap();
    let large = ModelFolder::open(&testdata().join("tiny-sd35-large")).unwrap();
    let base =
        Request { prompt: "x".into(), n: 1, steps: Some(2), width: Some(64), height: Some(64), ..Default::default() };
    let with = |o: FamilyOptions| Request { family_options: o, ..base.clone() };
    let slg = |layers: Vec<usize>| FamilyOptions {
        skip_layer_guidance: Some(SkipLayerGuidance::new(layers)),
        ..Default::default()
    };
    let refused = [
        (&sd15, with(FamilyOptions { no_t5: true, ..Default::default() }), "no_t5 applies"),
        (
            &sd15,
            with(FamilyOptions { max_sequence_length: Some(77), ..Default::default() }),
            "max_sequence_length applies",
        ),
        (&sd15, with(slg(vec![1])), "skip_layer_guidance skips"),
        (&large, with(FamilyOptions { max_sequence_length: Some(513), ..Default::default() }), "512"),
        (&large, with(slg(vec![3])), "layer 3"),
        (&large, Request { guidance: Some(1.0), ..with(slg(vec![1])) }, "needs guidance above 1"),
    ];
    for (model, req, needle) in refused {
        let err = sdgen::pipeline::resolve(model, &req).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert!(sdgen::pipeline::resolve(&large, &with(slg(vec![2]))).is_ok());
}

/// A shard missing from a sharded transformer is named; a size SD 3.5 cannot take is refused
/// with the nearest valid one.
#[test]
fn a_missing_shard_and_a_bad_size_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sd35");
    common::files::copy_dir(&testdata().join("tiny-sd35-large"), &copy);
    let shard = "diffusion_pytorch_model-00002-of-00003.safetensors";
    std::fs::remove_file(copy.join("transformer").join(shard)).unwrap();
    let err = match ModelFolder::open(&copy) {
        Err(e) => e.to_string(),
        Ok(model) => model.load_denoiser(candle_core::DType::F32, &candle_core::Device::Cpu).err().unwrap().to_string(),
    };
    assert!(err.contains(shard), "{err}");

    let large = ModelFolder::open(&testdata().join("tiny-sd35-large")).unwrap();
    let req = Request { prompt: "x".into(), n: 1, width: Some(72), height: Some(64), ..Default::default() };
    let err = sdgen::pipeline::resolve(&large, &req).unwrap_err().to_string();
    assert!(err.contains("width 72") && err.contains("multiple of 16") && err.contains("80"), "{err}");
}
