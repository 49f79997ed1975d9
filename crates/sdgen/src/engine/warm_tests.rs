//! An engine that keeps weights warm, on the tiny models: the next batch and the next job take
//! them instead of reading the files, with the same images as a cold engine; a LoRA'd model is
//! never mistaken for the plain one; a cancelled job leaves the store usable.

use serde_json::{json, Value};

use super::*;
use crate::pipeline::Progress;

fn testdata(name: &str) -> std::path::PathBuf {
    std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata")).join(name)
}

fn engine(warm: bool) -> Engine {
    let mut config = EngineConfig::new(Runtime::cpu(), "cpu");
    config.hub.offline = true;
    config.warm = warm.then(WarmWeights::new);
    Engine::new(config)
}

/// One image of the tiny SD 1.5 in 2 steps.
fn request() -> GenerateRequest {
    let mut req = GenerateRequest::new(ModelSource::Path(testdata("tiny-sd15")), "a lighthouse");
    (req.params.seed, req.params.steps) = (7, Some(2));
    req
}

fn run(engine: &mut Engine, req: &GenerateRequest) -> Vec<Batch> {
    engine.generate(req, &mut |_| {}, &CancelToken::new()).unwrap()
}

/// The sidecar's record of how each stage came by its weights.
fn weights(batch: &Batch) -> Value {
    batch.images[0].metadata.extra.get("weight_use").cloned().unwrap_or(Value::Null)
}

fn loads(engine: &Engine, component: &str) -> u64 {
    engine.warm().unwrap().report().counts.get(component).map_or(0, |c| c.loads)
}

#[test]
fn the_next_batch_and_the_next_job_load_nothing_and_make_the_same_images() {
    let mut warm = engine(true);
    let mut req = request();
    (req.params.n, req.memory.max_images_per_batch) = (2, Some(1));
    let first = run(&mut warm, &req);
    let kept = json!({"text_encoder": "loaded_kept", "unet": "loaded_kept", "vae": "loaded_kept"});
    let reused = json!({"text_encoder": "reused", "unet": "reused", "vae": "reused"});
    assert_eq!((weights(&first[0]), weights(&first[1])), (kept, reused.clone()), "the second batch reuses");
    let second = run(&mut warm, &req);
    assert_eq!((weights(&second[0]), weights(&second[1])), (reused.clone(), reused));
    for component in ["text_encoder", "unet", "vae_decoder"] {
        assert_eq!(loads(&warm, component), 1, "{component} read once for four batches");
    }
    let report = warm.warm().unwrap().report();
    assert_eq!(report.entries.len(), 3);
    assert!(report.bytes > 0 && report.counts["unet"].reuses == 3, "{report:?}");

    let cold = run(&mut engine(false), &req);
    assert_eq!(weights(&cold[0]), Value::Null, "a cold engine records nothing");
    for (batches, what) in [(&second, "the second job"), (&cold, "a cold engine")] {
        for (a, b) in first.iter().zip(batches) {
            assert!(a.images[0].image.rgb8 == b.images[0].image.rgb8, "{what} made another image");
        }
    }
}

#[test]
fn a_lora_job_never_takes_the_plain_unet_nor_the_reverse() {
    let mut warm = engine(true);
    let plain = run(&mut warm, &request());
    let mut with_lora = request();
    let source = ModelSource::Path(testdata("lora/sd15_kohya.safetensors"));
    with_lora.loras = vec![LoraRequest { source, scale: 1.0 }];
    let lora = run(&mut warm, &with_lora);
    let adapts_encoder = lora[0].job_metadata["loras"][0]["modules"].get("text_encoder").is_some();
    let encoder = if adapts_encoder { "loaded_kept" } else { "reused" };
    assert_eq!(weights(&lora[0]), json!({"text_encoder": encoder, "unet": "loaded_kept", "vae": "reused"}));
    let cold_lora = run(&mut engine(false), &with_lora);
    assert!(lora[0].images[0].image.rgb8 == cold_lora[0].images[0].image.rgb8, "the LoRA is fused as cold");
    assert!(lora[0].images[0].image.rgb8 != plain[0].images[0].image.rgb8, "the LoRA changes the image");

    // Both UNets are warm: the plain job takes the plain one, the LoRA job its own.
    let again = run(&mut warm, &request());
    assert_eq!(weights(&again[0]), json!({"text_encoder": "reused", "unet": "reused", "vae": "reused"}));
    assert!(again[0].images[0].image.rgb8 == plain[0].images[0].image.rgb8);
    let lora_again = run(&mut warm, &with_lora);
    assert!(lora_again[0].images[0].image.rgb8 == cold_lora[0].images[0].image.rgb8);
    assert_eq!(loads(&warm, "unet"), 2, "one plain UNet, one with the LoRA");
}

#[test]
fn a_job_cancelled_mid_denoise_leaves_the_store_usable() {
    let mut warm = engine(true);
    let cancel = CancelToken::new();
    let result = warm.generate(
        &request(),
        &mut |e| {
            if let Event::Pipeline(Progress::Step { .. }) = e {
                cancel.cancel();
            }
        },
        &cancel,
    );
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    // What loaded whole before the cancel is warm, once each; the VAE never loaded.
    let components: Vec<String> = warm.warm().unwrap().report().entries.into_iter().map(|e| e.component).collect();
    assert_eq!(components, ["unet", "text_encoder"]);
    let next = run(&mut warm, &request());
    assert_eq!(weights(&next[0]), json!({"text_encoder": "reused", "unet": "reused", "vae": "loaded_kept"}));
    let cold = run(&mut engine(false), &request());
    assert!(next[0].images[0].image.rgb8 == cold[0].images[0].image.rgb8);
}

/// SDXL with its refiner: the base's weights stay warm beside the refiner's stages (the plan has
/// room for them here), and the next run takes both models' (how the unload before the refiner
/// discounts what was kept on purpose is `stages::unload_tests`: the resident set of a test
/// process running tests side by side says nothing).
#[test]
fn a_refined_run_keeps_both_models() {
    let mut req = GenerateRequest::new(ModelSource::Path(testdata("tiny-sdxl")), "a lighthouse at dusk");
    (req.params.steps, req.params.width, req.params.height) = (Some(4), Some(64), Some(64));
    let refiner = ModelSource::Path(testdata("tiny-sdxl-refiner"));
    req.refiner = Some(RefinerRequest { source: refiner, start: None, strength: None });
    let mut warm = engine(true);
    let first = run(&mut warm, &req);
    let second = run(&mut warm, &req);
    // The refiner decodes the latents (its VAE's stage is `vae`, as the base's would be).
    let uses = weights(&second[0]);
    let want = ["refiner_text_encoder_2", "refiner_unet", "text_encoder", "text_encoder_2", "unet", "vae"];
    assert_eq!(uses, Value::Object(want.iter().map(|s| (s.to_string(), json!("reused"))).collect()));
    assert!(first[0].images[0].image.rgb8 == second[0].images[0].image.rgb8);
    let cold = run(&mut engine(false), &req);
    assert!(cold[0].images[0].image.rgb8 == second[0].images[0].image.rgb8);
}

/// A streamed denoiser (`--memory-mode low`) holds only part of its weights, so it is never kept
/// warm: the low job loads its UNet without keeping it, the next resident job reads it again, and
/// both images are a cold engine's (streaming changes no number).
#[test]
fn a_streamed_denoiser_is_never_kept_warm() {
    let mut warm = engine(true);
    let mut low = request();
    low.memory.mode = sdgen_memory::plan::MemoryMode::Low;
    let streamed = run(&mut warm, &low);
    assert_eq!(weights(&streamed[0])["unet"], "loaded", "{}", weights(&streamed[0]));
    let resident = run(&mut warm, &request());
    assert_eq!(weights(&resident[0])["unet"], "loaded_kept", "{}", weights(&resident[0]));
    assert_eq!(loads(&warm, "unet"), 2, "the streamed UNet was read, and the resident one again");
    let cold = run(&mut engine(false), &request());
    assert!(streamed[0].images[0].image.rgb8 == cold[0].images[0].image.rgb8, "streaming changed the image");
    assert!(resident[0].images[0].image.rgb8 == cold[0].images[0].image.rgb8);
}
