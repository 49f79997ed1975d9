//! Parity of SDXL's components with diffusers / transformers on the tiny base and refiner
//! (`tools/reference/make_sdxl.py`, described in `testdata/reference/README.md`): both tokenizers,
//! both text encoders and the prompt embeddings the pipeline builds from them, and the base and
//! refiner UNets with their added (text + micro-conditioning) embedding. Tolerance: the project's
//! component tolerance, `|a − b| ≤ 1e-4 · max|b|`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{load, testdata};
use sdgen::loading::ModelFolder;
use sdgen::tokenizer::ClipTokenizer;
use sdgen_models::clip::{ClipTextConfig, ClipTextModel, ClipTextOutput};
use sdgen_models::unet::{AddedConditioning, UNet2DConditionModel, UNetConfig};

const TEXT: &str = "reference/sdxl/text_encoders.safetensors";

/// The prompts of `text_encoders.safetensors` (`CLIP_PROMPTS` of `tools/reference/make_sd15.py`):
/// a short one, and a long one with "!!" that both tokenizers truncate.
const PROMPTS: [&str; 2] = [
    "a lighthouse at dusk",
    "A Photo of 2 cats, sitting on a RED sofa!! Highly-detailed, 4k, trending on artstation; \
     cinematic lighting & soft shadows, by Greg Rutkowski and Alphonse Mucha, octane render, \
     unreal engine, sharp focus, masterpiece",
];

/// [`common::assert_close`], printing the worst difference relative to `max|ref|` first (run with
/// `--nocapture` to see how much of the tolerance each check uses).
fn assert_close(name: &str, actual: &Tensor, expected: &Tensor) {
    if actual.dims() == expected.dims() {
        let diff = (actual - expected).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let scale = expected.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let rel = diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
        eprintln!("{name}: max |diff| / max|ref| = {rel:.2e}");
    }
    common::assert_close(name, actual, expected);
}

fn base() -> ModelFolder {
    ModelFolder::open(&testdata().join("tiny-sdxl")).expect("tiny SDXL base opens")
}

fn refiner() -> ModelFolder {
    ModelFolder::open(&testdata().join("tiny-sdxl-refiner")).expect("tiny SDXL refiner opens")
}

/// Token ids of `texts` through `<folder>/<component>`, as an i64 `[n, 77]` tensor.
fn tokenize(folder: &ModelFolder, component: &str, texts: &[&str]) -> Tensor {
    let tok = ClipTokenizer::from_dir(&folder.component_dir(component).unwrap()).unwrap();
    let rows: Vec<Vec<i64>> =
        texts.iter().map(|t| tok.encode(t).unwrap().ids.into_iter().map(i64::from).collect()).collect();
    let len = rows[0].len();
    Tensor::from_vec(rows.concat(), (texts.len(), len), &Device::Cpu).unwrap()
}

fn assert_ids(name: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.dims(), expected.dims(), "{name}: shape");
    let a: Vec<Vec<i64>> = actual.to_vec2().unwrap();
    let b: Vec<Vec<i64>> = expected.to_dtype(DType::I64).unwrap().to_vec2().unwrap();
    assert_eq!(a, b, "{name}");
}

fn text_encoder(folder: &ModelFolder, component: &str, with_projection: bool) -> ClipTextModel {
    let cfg: ClipTextConfig = folder.config(component, "config.json").unwrap();
    let vb = folder.weights(component).unwrap().var_builder(DType::F32, &Device::Cpu).unwrap();
    ClipTextModel::new(&cfg, with_projection, vb).unwrap()
}

fn unet(folder: &ModelFolder) -> UNet2DConditionModel {
    let cfg: UNetConfig = folder.config("unet", "config.json").unwrap();
    let vb = folder.weights("unet").unwrap().var_builder(DType::F32, &Device::Cpu).unwrap();
    UNet2DConditionModel::new(&cfg, vb).unwrap()
}

/// What the pipeline's `encode_prompt` makes of token rows: both penultimate states side by side
/// (`[b, 77, 80]`) and the second encoder's projected pooled output (`[b, 40]`).
fn encode_base(te1: &ClipTextModel, te2: &ClipTextModel, ids1: &Tensor, ids2: &Tensor) -> (Tensor, Tensor) {
    let one = te1.forward(ids1).unwrap();
    let two = te2.forward(ids2).unwrap();
    let embeds = Tensor::cat(&[&one.penultimate_hidden_state, &two.penultimate_hidden_state], 2).unwrap();
    (embeds, two.text_embeds.expect("text_encoder_2 has a projection"))
}

#[test]
fn folders_are_recognised_as_sdxl_and_refiner() {
    assert_eq!(base().family().name, "sdxl");
    assert_eq!(refiner().family().name, "sdxl-refiner");
}

#[test]
fn tokenizers_match() {
    let r = load(TEXT);
    let (m, refine) = (base(), refiner());
    let texts = PROMPTS;
    assert_ids("input_ids_1", &tokenize(&m, "tokenizer", &texts), &r["input_ids_1"]);
    assert_ids("input_ids_2", &tokenize(&m, "tokenizer_2", &texts), &r["input_ids_2"]);
    assert_ids("refiner input_ids_2", &tokenize(&refine, "tokenizer_2", &texts), &r["input_ids_2"]);
    assert_ids("empty_input_ids_1", &tokenize(&m, "tokenizer", &[""]), &r["empty_input_ids_1"]);
    assert_ids("empty_input_ids_2", &tokenize(&m, "tokenizer_2", &[""]), &r["empty_input_ids_2"]);
    assert_ids("refiner empty_input_ids_2", &tokenize(&refine, "tokenizer_2", &[""]), &r["empty_input_ids_2"]);
}

#[test]
fn text_encoders_match() {
    let r = load(TEXT);
    let m = base();
    let one = text_encoder(&m, "text_encoder", false).forward(&r["input_ids_1"]).unwrap();
    assert_close("te1_penultimate", &one.penultimate_hidden_state, &r["te1_penultimate"]);
    let ClipTextOutput { penultimate_hidden_state, pooled, text_embeds, .. } =
        text_encoder(&m, "text_encoder_2", true).forward(&r["input_ids_2"]).unwrap();
    assert_close("te2_penultimate", &penultimate_hidden_state, &r["te2_penultimate"]);
    assert_close("te2_pooled", &pooled, &r["te2_pooled"]);
    assert_close("te2_text_embeds", &text_embeds.unwrap(), &r["te2_text_embeds"]);
}

#[test]
fn prompt_embeddings_match_encode_prompt() {
    let r = load(TEXT);
    let m = base();
    let (te1, te2) = (text_encoder(&m, "text_encoder", false), text_encoder(&m, "text_encoder_2", true));
    // encode_prompt's tensors are batch-1 runs of the first prompt.
    let first = |k: &str| r[k].narrow(0, 0, 1).unwrap();
    let (embeds, pooled) = encode_base(&te1, &te2, &first("input_ids_1"), &first("input_ids_2"));
    assert_close("prompt_embeds", &embeds, &r["prompt_embeds"]);
    assert_close("pooled_prompt_embeds", &pooled, &r["pooled_prompt_embeds"]);
    let (embeds, pooled) = encode_base(&te1, &te2, &r["empty_input_ids_1"], &r["empty_input_ids_2"]);
    assert_close("negative_prompt_embeds_empty", &embeds, &r["negative_prompt_embeds_empty"]);
    assert_close("negative_pooled_empty", &pooled, &r["negative_pooled_empty"]);

    // The refiner conditions on text_encoder_2 alone; a "" negative is encoded, not zeroed.
    let te2 = text_encoder(&refiner(), "text_encoder_2", true);
    let out = te2.forward(&first("input_ids_2")).unwrap();
    assert_close("refiner_prompt_embeds", &out.penultimate_hidden_state, &r["refiner_prompt_embeds"]);
    assert_close("refiner pooled", &out.text_embeds.unwrap(), &r["pooled_prompt_embeds"]);
    let out = te2.forward(&r["empty_input_ids_2"]).unwrap();
    assert_close(
        "refiner_negative_prompt_embeds_none",
        &out.penultimate_hidden_state,
        &r["refiner_negative_prompt_embeds_none"],
    );
    assert_close("refiner negative pooled", &out.text_embeds.unwrap(), &r["negative_pooled_empty"]);
}

/// Runs `unet` on the reference inputs under `prefix` (`""` or `"odd_"`) and compares `<prefix>out`.
fn check_unet(name: &str, unet: &UNet2DConditionModel, r: &std::collections::HashMap<String, Tensor>, prefix: &str) {
    let k = |key: &str| &r[&format!("{prefix}{key}")];
    let timestep = k("timestep").to_vec1::<f32>().unwrap()[0] as f64;
    let added = AddedConditioning { text_embeds: k("text_embeds"), time_ids: k("time_ids") };
    let out = unet.forward_with(k("sample"), timestep, k("encoder_hidden_states"), Some(&added)).unwrap();
    assert_close(&format!("{name} {prefix}out"), &out, k("out"));
}

#[test]
fn base_unet_with_added_conditioning_matches() {
    let r = load("reference/sdxl/unet.safetensors");
    let unet = unet(&base());
    assert!(unet.takes_added_conditioning());
    check_unet("base unet", &unet, &r, "");
    check_unet("base unet", &unet, &r, "odd_");
    // Without its added conditioning an SDXL UNet must refuse, not panic or ignore it.
    let err = unet.forward(&r["sample"], 801.0, &r["encoder_hidden_states"]).unwrap_err().to_string();
    assert!(err.contains("text_embeds") && err.contains("time_ids"), "{err}");
}

#[test]
fn refiner_unet_with_aesthetic_score_matches() {
    let r = load("reference/sdxl/refiner_unet.safetensors");
    let unet = unet(&refiner());
    assert!(unet.takes_added_conditioning());
    assert_eq!(r["time_ids"].dims(), &[2, 5], "refiner time ids carry the aesthetic score");
    check_unet("refiner unet", &unet, &r, "");
    check_unet("refiner unet", &unet, &r, "odd_");
}
