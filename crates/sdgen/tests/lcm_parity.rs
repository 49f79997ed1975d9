//! Latent consistency and SDXL-Turbo pipelines against diffusers on the tiny models
//! (`tools/reference/make_lcm.py`, each reference made by `from_pretrained` of the folder):
//! - an LCM UNet (`tiny-sd15-lcm`: `time_cond_proj_dim`, LCM scheduler config) vs
//!   `LatentConsistencyModelPipeline`: guidance through the w-embedding, no CFG, the scheduler's
//!   noise between steps from the per-image generators; an SDXL LCM UNet (`tiny-sdxl-lcm`, as
//!   lcm-sdxl in SDXL base) vs `StableDiffusionXLPipeline`'s `timestep_cond`;
//! - SDXL with an LCM-LoRA (`lora/sdxl_lcm.safetensors`, lcm-lora-sdxl's key format) fused and the
//!   LCM scheduler vs `load_lora_weights` + `fuse_lora` + `LCMScheduler.from_config`, at guidance 1
//!   (`--quality lcm`) and with CFG;
//! - SDXL-Turbo's settings (`tiny-sdxl-turbo`: Euler ancestral with trailing spacing from its own
//!   config, guidance 0) at 1 and 4 steps.
//!
//! Each image 100% within 1/255 of diffusers' in f32 (stricter than the project's pipeline
//! tolerance, which `assert_generation_matches` checks too).

mod common;

use common::{assert_generation_matches, image_diff, load, testdata};
use sdgen::loading::lora::LoraFile;
use sdgen::loading::ModelFolder;
use sdgen::pipeline::{txt2img, Request, Runtime};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    model: String,
    seeds: Vec<u64>,
    steps: usize,
    guidance: f64,
    prompt: String,
    width: usize,
    height: usize,
    scheduler: String,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(testdata().join("reference/lcm/pipelines.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn model(name: &str) -> ModelFolder {
    let open = |dir: &str| ModelFolder::open(&testdata().join(dir)).unwrap();
    match name {
        "sd15_lcm" => open("tiny-sd15-lcm"),
        "sdxl_lcm_unet" => open("tiny-sdxl-lcm"),
        "sdxl_turbo" => open("tiny-sdxl-turbo"),
        "sdxl_lcm_lora" => {
            open("tiny-sdxl").with_loras(&[LoraFile::new(testdata().join("lora/sdxl_lcm.safetensors"), 1.0)]).unwrap()
        }
        other => panic!("no model {other}"),
    }
}

#[test]
fn lcm_and_turbo_images_match_diffusers() {
    let reference = load("reference/lcm/pipelines.safetensors");
    let cases = cases();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let model = model(&case.model);
        let request = Request {
            prompt: case.prompt.clone(),
            n: case.seeds.len(),
            seed: case.seeds[0],
            steps: Some(case.steps),
            guidance: Some(case.guidance),
            width: Some(case.width),
            height: Some(case.height),
            // The folders' own schedulers, except LCM swapped in for the LoRA (as diffusers' users do).
            scheduler: (case.model == "sdxl_lcm_lora").then(|| case.scheduler.parse().unwrap()),
            ..Default::default()
        };
        let generation = txt2img(&model, &request, &Runtime::cpu(), &mut |_| {}).unwrap();
        assert_eq!(generation.settings.scheduler.name(), case.scheduler, "{}", case.name);
        let want = &reference[&case.name];
        assert_generation_matches(&case.name, &case.seeds, &generation, want);
        for (i, image) in generation.images.iter().enumerate() {
            let want: Vec<f32> = want.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let (within, worst) = image_diff(&image.pixels, &want);
            assert!(within == 1.0 && worst <= 1.0, "{} image {i}: {within} within 1/255, worst {worst}", case.name);
        }
    }
}

/// The LCM UNet's guidance is embedded, not classifier-free: one conditioning row per image, and
/// a negative prompt (which diffusers' LCM pipeline does not take) is reported unused.
#[test]
fn an_lcm_unet_guides_by_its_embedding() {
    let model = model("sd15_lcm");
    assert_eq!(model.denoiser_geometry().unwrap().guidance_embedding_dim, Some(256));
    assert!(!sdgen::pipeline::classifier_free(&model, 8.0).unwrap());
    assert!(sdgen::pipeline::classifier_free(&ModelFolder::open(&testdata().join("tiny-sd15")).unwrap(), 8.0).unwrap());
    let request = Request {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: Some("blurry".into()),
        n: 1,
        seed: 11,
        steps: Some(4),
        guidance: Some(8.0),
        width: Some(64),
        height: Some(64),
        ..Default::default()
    };
    let generation = txt2img(&model, &request, &Runtime::cpu(), &mut |_| {}).unwrap();
    assert!(generation.warnings.iter().any(|w| w.contains("negative prompt is not used")), "{:?}", generation.warnings);
    // The negative prompt changes nothing: the image is the reference's first.
    let want: Vec<f32> = load("reference/lcm/pipelines.safetensors")["sd15_lcm"]
        .get(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(image_diff(&generation.images[0].pixels, &want).0, 1.0);
}
