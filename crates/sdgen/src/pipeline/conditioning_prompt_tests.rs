//! A1111's long and weighted prompts on the tiny SD 1.5 against `tools/reference/make_prompts.py`
//! (a re-implementation of A1111's `sd_hijack_clip.py`/`sd_emphasis.py` on transformers'
//! `CLIPTextModel`): the same chunks (ids and weights) and the same embeddings (f32, ≤ 1e-5
//! relative to the largest magnitude).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdgen_models::clip::{ClipTextConfig, ClipTextModel};

use super::encode_a1111;
use crate::loading::family::HiddenLayer;
use crate::prompt::{self, PromptChunk};
use crate::tokenizer::ClipTokenizer;

fn testdata() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata"))
}

fn tiny_clip() -> (ClipTokenizer, ClipTextModel) {
    let dir = testdata().join("tiny-sd15");
    let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer")).unwrap();
    let cfg: ClipTextConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("text_encoder/config.json")).unwrap()).unwrap();
    let weights = dir.join("text_encoder/model.safetensors");
    // SAFETY: the test data is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu).unwrap() };
    (tokenizer, ClipTextModel::new(&cfg, false, vb).unwrap())
}

#[test]
fn chunks_and_embeddings_match_a1111_reference() {
    let dir = testdata().join("reference/prompts");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("prompts.json")).unwrap()).unwrap();
    let reference = candle_core::safetensors::load(dir.join("prompts.safetensors"), &Device::Cpu).unwrap();
    let (tokenizer, clip) = tiny_clip();
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let text = case["prompt"].as_str().unwrap();
        let want: Vec<(Vec<u32>, Vec<f64>)> = case["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    serde_json::from_value(c["ids"].clone()).unwrap(),
                    serde_json::from_value(c["multipliers"].clone()).unwrap(),
                )
            })
            .collect();
        let mut got = prompt::a1111_chunks(&tokenizer, text).unwrap();
        let pad_to = case["pad_to_chunks"].as_u64().map_or(got.len(), |n| n as usize);
        got.resize(pad_to, PromptChunk::empty(tokenizer.chunk_frame().unwrap()));
        assert_eq!(got.len(), want.len(), "{name}: chunk count");
        for (i, (g, (ids, weights))) in got.iter().zip(&want).enumerate() {
            assert_eq!(&g.ids, ids, "{name}: chunk {i} ids");
            for (a, b) in g.multipliers.iter().zip(weights) {
                assert!((a - b).abs() <= 1e-12, "{name}: chunk {i} weights {a} vs {b}");
            }
        }
        // A padded case is the negative side of a longer prompt: encode it beside one.
        let skip = case["clip_skip"].as_u64().map(|n| n as usize);
        let mut texts = vec![text.to_owned()];
        if pad_to > 1 && case["pad_to_chunks"].is_u64() {
            // `pad_to` chunks: one word between BREAKs.
            texts.push(vec!["word"; pad_to].join(" BREAK "));
        }
        let (hidden, _) =
            encode_a1111(&clip, &tokenizer, &texts, HiddenLayer::Last, skip, &Device::Cpu).unwrap().remove(0);
        let want = &reference[name];
        assert_eq!(hidden.dims(), want.dims(), "{name}: shape");
        let max_ref = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (hidden - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-5 * max_ref, "{name}: max |Δ| {diff} (largest value {max_ref})");
    }
}

/// The cases exercise what they are for: more than one chunk, weights other than 1, a BREAK,
/// the clip skip (a test that passes on one chunk of ones would prove little).
#[test]
fn reference_cases_cover_chunking_and_weights() {
    let (tokenizer, _) = tiny_clip();
    let long = prompt::a1111_chunks(&tokenizer, &"a lighthouse at dusk, ".repeat(12)).unwrap();
    assert!(long.len() >= 2);
    let weighted = prompt::a1111_chunks(&tokenizer, "a (red:1.3) house BREAK [sky]").unwrap();
    assert_eq!(weighted.len(), 2);
    assert!(!weighted[0].unweighted() && !weighted[1].unweighted());
}

/// The same tokens give the same state whether encoded diffusers' way or as one A1111 chunk.
#[test]
fn plain_short_prompt_is_diffusers_encoding() {
    let (tokenizer, clip) = tiny_clip();
    let text = "a lighthouse".to_owned();
    assert!(!prompt::needs_a1111(&tokenizer, prompt::PromptStyle::A1111, std::slice::from_ref(&text)).unwrap());
    let ids = tokenizer.encode(&text).unwrap().ids;
    let chunk = prompt::a1111_chunks(&tokenizer, &text).unwrap();
    assert_eq!(chunk[0].ids, ids);
    let one = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    assert_eq!(clip.forward(&one).unwrap().last_hidden_state.dims(), &[1, 77, 32]);
}

/// SD 3.5's joint conditioning from all three encoders — CLIP-L's and bigG's penultimate states
/// padded to T5's width beside T5's 256 tokens, and the two pooled projections side by side —
/// against diffusers' `StableDiffusion3Pipeline.encode_prompt` (tiny Large, `make_sd3.py`'s
/// `components.safetensors`: the negative "" first, then the prompt).
#[test]
fn sd35_conditioning_matches_diffusers_encode_prompt() {
    use super::super::stages::StageLog;
    use super::super::{Request, Runtime};
    use super::{encode_prompts, ImageSize};
    let model = crate::loading::ModelFolder::open(&testdata().join("tiny-sd35-large")).unwrap();
    let req = Request {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: Some(String::new()),
        n: 1,
        ..Default::default()
    };
    let size = ImageSize { height: 64, width: 96 };
    let (mut log, mut warnings) = (StageLog::default(), Vec::new());
    let cond =
        encode_prompts(&model, &req, true, size, "", &Runtime::cpu(), &mut log, &mut warnings, &mut |_| {}).unwrap();
    let r =
        candle_core::safetensors::load(testdata().join("reference/sd3/components.safetensors"), &Device::Cpu).unwrap();
    let close = |name: &str, got: &Tensor| {
        let want = &r[name];
        assert_eq!(got.dims(), want.dims(), "{name}");
        let diff = (got.to_dtype(DType::F32).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-5 * scale.max(1.0), "{name}: max difference {diff} (scale {scale})");
    };
    close("context", &cond.context);
    close("pooled", cond.pooled.as_ref().expect("SD 3.5 has pooled text"));
}

/// SDXL's conditioning of a long, weighted prompt with a BREAK (3 chunks) against a weighted
/// negative padded to 3, as A1111 builds it (`make_prompts.py`'s SDXL part: CLIP-L's and bigG's
/// penultimate states side by side, each chunk weighted with its mean restored; bigG's pooled
/// text from the first chunk): the same chunks and the same context and pooled text (f32,
/// ≤ 1e-5 of the largest value), the negative first.
#[test]
fn sdxl_long_weighted_prompt_matches_a1111_reference() {
    use super::super::stages::StageLog;
    use super::super::{Request, Runtime};
    use super::{encode_prompts, ImageSize};
    let dir = testdata().join("reference/prompts");
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sdxl.json")).unwrap()).unwrap();
    let r = candle_core::safetensors::load(dir.join("sdxl.safetensors"), &Device::Cpu).unwrap();
    let model = crate::loading::ModelFolder::open(&testdata().join("tiny-sdxl")).unwrap();
    let text = |k: &str| case[k].as_str().unwrap().to_string();
    // Both tokenizers cut the same chunks (the ids up to each chunk's end token, then pads).
    let tokenizer = ClipTokenizer::from_dir(&testdata().join("tiny-sdxl/tokenizer")).unwrap();
    let chunks = prompt::a1111_chunks(&tokenizer, &text("prompt")).unwrap();
    assert_eq!(chunks.len(), 3);
    for (got, want) in chunks.iter().zip(case["chunks"].as_array().unwrap()) {
        assert_eq!(got.ids, serde_json::from_value::<Vec<u32>>(want["ids"].clone()).unwrap());
        let weights: Vec<f64> = serde_json::from_value(want["multipliers"].clone()).unwrap();
        assert!(got.multipliers.iter().zip(&weights).all(|(a, b)| (a - b).abs() <= 1e-12));
    }
    let req =
        Request { prompt: text("prompt"), negative_prompt: Some(text("negative_prompt")), n: 1, ..Default::default() };
    let size = ImageSize { height: 64, width: 64 };
    let (mut log, mut warnings) = (StageLog::default(), Vec::new());
    let cond =
        encode_prompts(&model, &req, true, size, "", &Runtime::cpu(), &mut log, &mut warnings, &mut |_| {}).unwrap();
    let both = |key: &str| Tensor::cat(&[&r[&format!("{key}.negative")], &r[&format!("{key}.prompt")]], 0).unwrap();
    let close = |name: &str, got: &Tensor, want: &Tensor| {
        assert_eq!(got.dims(), want.dims(), "{name}");
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-5 * scale.max(1.0), "{name}: max difference {diff} (scale {scale})");
    };
    close("context", &cond.context, &both("context"));
    close("pooled", cond.pooled.as_ref().expect("SDXL has pooled text"), &both("pooled"));
}
