//! Image-to-image parity with diffusers' `StableDiffusionImg2ImgPipeline` on the tiny SD 1.5
//! model (`tools/reference/make_img2img.py` for PNDM, DDIM, Euler and Euler ancestral,
//! `make_img2img_dpm.py` for DPM++ 2M with and without Karras sigmas: CPU, f32, per-image
//! generators seeded seed + i). Tolerances: images 99.5% of channels within 1/255, none over
//! 8/255 (the pipeline tolerance; they agree to about 0.002/255); the preprocessed init image
//! exactly (PIL's Lanczos is reproduced byte for byte, and `2 · (v / 255) − 1` in f32 as numpy
//! and torch compute it).

mod common;

use candle_core::Tensor;
use common::{assert_close, assert_image_close, load, testdata};
use sdgen::loading::ModelFolder;
use sdgen::pipeline::{img2img, preprocess, resolve_img2img, Img2ImgRequest, InitImage, Progress, Request, Runtime};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    init: String,
    strength: f64,
    seeds: Vec<u64>,
    steps: usize,
    guidance: f64,
    scheduler: String,
    prompt: String,
    negative_prompt: Option<String>,
    width: usize,
    height: usize,
    key: String,
    timesteps: Vec<f64>,
}

/// The cases of one reference set: `img2img` (make_img2img.py: PNDM, DDIM, Euler, Euler
/// ancestral) or `img2img_dpm` (make_img2img_dpm.py: DPM++ 2M and DPM++ 2M Karras).
fn cases_of(set: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(testdata().join(format!("reference/sd15/{set}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn cases() -> Vec<Case> {
    cases_of("img2img")
}

fn model() -> ModelFolder {
    ModelFolder::open(&testdata().join("tiny-sd15")).expect("tiny model opens")
}

fn request(case: &Case) -> Img2ImgRequest {
    Img2ImgRequest {
        request: Request {
            prompt: case.prompt.clone(),
            negative_prompt: case.negative_prompt.clone(),
            n: case.seeds.len(),
            seed: case.seeds[0],
            steps: Some(case.steps),
            guidance: Some(case.guidance),
            // The output size comes from the init image, as in diffusers.
            width: None,
            height: None,
            scheduler: Some(case.scheduler.parse().unwrap()),
            ..Default::default()
        },
        init_image: InitImage::load(&testdata().join("reference/sd15").join(&case.init)).unwrap(),
        strength: Some(case.strength),
    }
}

#[test]
fn every_case_matches_diffusers() {
    check_set("img2img", 7);
}

#[test]
fn dpm_solver_cases_match_diffusers() {
    check_set("img2img_dpm", 2);
}

fn check_set(set: &str, min_cases: usize) {
    let r = load(&format!("reference/sd15/{set}.safetensors"));
    let model = model();
    let cases = cases_of(set);
    assert!(cases.len() >= min_cases, "{set}: only {} cases", cases.len());
    for case in &cases {
        let req = request(case);

        // The preprocessed init image: PIL's Lanczos resize to a multiple of 8, then [-1, 1].
        let plan = resolve_img2img(&model, &req).unwrap();
        assert_eq!((plan.settings.width, plan.settings.height), (case.width, case.height), "{}", case.name);
        let init = preprocess(&req.init_image.image, case.width, case.height).unwrap();
        let want = &r[&format!("{}_init", case.key)];
        let worst = (&init - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let worst: f32 = worst.to_scalar().unwrap();
        assert_eq!(worst, 0.0, "{}: preprocessed init image differs from diffusers'", case.name);

        let mut steps_seen = Vec::new();
        let gen = img2img(&model, &req, &Runtime::cpu(), &mut |p| {
            if let Progress::Step { index, total } = p {
                steps_seen.push((index, total));
            }
        })
        .unwrap();
        // The loop runs over timesteps[t_start · order:], PNDM's extra entry included; progress
        // counts the steps it stands for, as diffusers' bar does (its warm-up evaluation is not
        // one).
        let steps = plan.denoising_steps;
        assert_eq!(steps, case.steps - plan.skipped_steps);
        let evaluations = case.timesteps.len() - plan.skipped_steps;
        assert!(evaluations == steps || evaluations == steps + 1, "{}: {evaluations} evaluations", case.name);
        assert_eq!(steps_seen.len(), steps, "{}: steps reported", case.name);
        assert_eq!(steps_seen.last(), Some(&(steps, steps)), "{}", case.name);

        let expected = &r[&case.key];
        assert_eq!(gen.images.len(), case.seeds.len(), "{}", case.name);
        for (i, image) in gen.images.iter().enumerate() {
            assert_eq!(image.seed, case.seeds[i], "{}", case.name);
            let want: Vec<f32> = expected.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let (within, worst) = common::image_diff(&image.pixels, &want);
            eprintln!("{} image {i}: {:.3}% within 1/255, worst {worst:.3}/255", case.name, within * 100.0);
            assert_image_close(&format!("{} image {i}", case.name), &image.pixels, &want);
        }
        assert!(gen.timings_ms.contains_key("vae_encoder"), "{:?}", gen.timings_ms);
    }
}

/// Image `i` of a batch equals a run of one image with its seed: each image draws its VAE
/// sample, its added noise and its ancestral noise from its own generator only.
#[test]
fn batching_never_changes_an_image() {
    let model = model();
    let case = cases().into_iter().find(|c| c.name == "img2img_euler_a_batch2").expect("batch case");
    let batch = img2img(&model, &request(&case), &Runtime::cpu(), &mut |_| {}).unwrap();
    let mut single = request(&case);
    single.request.n = 1;
    single.request.seed = case.seeds[1];
    let alone = img2img(&model, &single, &Runtime::cpu(), &mut |_| {}).unwrap();
    let a = Tensor::new(batch.images[1].pixels.as_slice(), &candle_core::Device::Cpu).unwrap();
    let b = Tensor::new(alone.images[0].pixels.as_slice(), &candle_core::Device::Cpu).unwrap();
    assert_close("batched image 1 vs alone", &a, &b);
}

#[test]
fn bad_requests_are_refused_before_loading() {
    let model = model();
    let case = &cases()[0];
    for (strength, needle) in [(1.5, "outside [0, 1]"), (-0.1, "outside [0, 1]"), (0.0, "no step")] {
        let mut req = request(case);
        req.strength = Some(strength);
        let err = img2img(&model, &req, &Runtime::cpu(), &mut |_| panic!("nothing may run")).unwrap_err();
        assert!(matches!(err, sdgen::Error::Invalid { field: "strength", .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    let mut req = request(case);
    req.init_image.image = sdgen::image_io::RgbImage::new(7, 20, vec![0; 7 * 20 * 3]).unwrap();
    req.init_image.name = "tiny.png".into();
    let err = img2img(&model, &req, &Runtime::cpu(), &mut |_| panic!("nothing may run")).unwrap_err();
    assert!(err.to_string().contains("tiny.png") && err.to_string().contains("7x20"), "{err}");
    // An explicit size resizes the init image to it.
    req.request.width = Some(32);
    req.request.height = Some(24);
    let plan = resolve_img2img(&model, &req).unwrap();
    assert_eq!((plan.settings.width, plan.settings.height), (32, 24));
}
