//! A1111's long, weighted prompts through the whole SD 1.5 and SDXL pipelines, against diffusers'
//! `StableDiffusionPipeline` / `StableDiffusionXLPipeline` given the embeddings of `tools/reference/make_prompts.py`'s
//! re-implementation of A1111's algorithm (`prompt_embeds=`, `negative_prompt_embeds=`): a
//! 3-chunk prompt with weights and a BREAK against a 1-chunk negative padded to 3. Image
//! tolerance as the other parity tests: 99.5% of channels within 1/255, none over 8/255.

mod common;

use common::{assert_image_close, load, testdata};
use sdgen::loading::ModelFolder;
use sdgen::pipeline::{txt2img, Request, Runtime};

/// The image of `case` (a JSON file under `reference/prompts/`: prompt, negative, seed, steps,
/// guidance, size) on the tiny model `model`, against the `pipeline_image` of `refs`.
fn a1111_prompt_image_matches(model: &str, case: &str, refs: &str) {
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(testdata().join("reference/prompts").join(case)).unwrap())
            .unwrap();
    let model = ModelFolder::open(&testdata().join(model)).unwrap();
    let n = |k: &str| case[k].as_u64().unwrap() as usize;
    let req = Request {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: Some(case["negative_prompt"].as_str().unwrap().into()),
        n: 1,
        seed: case["seed"].as_u64().unwrap(),
        steps: Some(n("steps")),
        guidance: Some(case["guidance"].as_f64().unwrap()),
        width: Some(n("width")),
        height: Some(n("height")),
        ..Default::default()
    };
    let gen = txt2img(&model, &req, &Runtime::cpu(), &mut |_| {}).unwrap();
    assert!(gen.warnings.iter().all(|w| !w.contains("dropped")), "nothing cut: {:?}", gen.warnings);
    let want: Vec<f32> =
        load(&format!("reference/prompts/{refs}"))["pipeline_image"].flatten_all().unwrap().to_vec1().unwrap();
    assert_image_close(&format!("A1111 prompt image on {}", model.root().display()), &gen.images[0].pixels, &want);
}

#[test]
fn long_weighted_prompt_image_matches_diffusers_with_a1111_embeddings() {
    a1111_prompt_image_matches("tiny-sd15", "image_case.json", "prompts.safetensors");
}

/// SDXL: the same prompt and negative against `StableDiffusionXLPipeline` given the embeddings and
/// pooled texts of A1111's algorithm (`make_prompts.py sdxl`: both encoders chunked, the pooled
/// text from the first chunk), seed 42, 10 steps, guidance 5, 64².
#[test]
fn long_weighted_prompt_sdxl_image_matches_diffusers_with_a1111_embeddings() {
    a1111_prompt_image_matches("tiny-sdxl", "sdxl.json", "sdxl.safetensors");
}

/// The empty prompt, through the engine as `generate ""` and a server's `"prompt": ""` run it,
/// against `pipe(prompt="")` (`tools/reference/make_empty_prompt.py`: no negative prompt, the
/// folder's scheduler): diffusers encodes "" as it does any text, start and end tokens then
/// padding — A1111's default prompt. On SDXL the negative side is zeros
/// (`force_zeros_for_empty_prompt`), the prompt's side the encoders' output for "".
#[test]
fn the_empty_prompt_image_matches_diffusers() {
    use sdgen::engine::{CancelToken, Engine, EngineConfig, GenerateRequest};
    use sdgen::loading::ModelSource;
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(testdata().join("reference/empty_prompt/cases.json")).unwrap())
            .unwrap();
    let mut config = EngineConfig::new(Runtime::cpu(), "cpu");
    config.hub.offline = true;
    let mut engine = Engine::new(config);
    for name in ["sd15", "sdxl"] {
        let case = &cases[name];
        let model = testdata().join(case["model"].as_str().unwrap().trim_start_matches("testdata/"));
        let mut req = GenerateRequest::new(ModelSource::Path(model), "");
        req.params.seed = case["seed"].as_u64().unwrap();
        req.params.steps = Some(case["steps"].as_u64().unwrap() as usize);
        req.params.guidance = Some(case["guidance"].as_f64().unwrap());
        (req.params.width, req.params.height) = (Some(64), Some(64));
        let batches = engine.generate(&req, &mut |_| {}, &CancelToken::new()).unwrap();
        let image = &batches[0].images[0];
        let want: Vec<f32> = load(&format!("reference/empty_prompt/{name}.safetensors"))["pipeline_image"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_image_close(&format!("the empty prompt on the tiny {name}"), &image.image.pixels, &want);
        assert_eq!(image.metadata.prompt, "");
    }
}
