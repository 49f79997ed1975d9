//! The engine on the tiny SD 1.5 folder: batches with their metadata, cancellation between steps
//! and stages, and the opened model reused from job to job.

use super::*;
use crate::pipeline::Progress;

fn tiny_sd15() -> ModelSource {
    ModelSource::Path(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sd15")).into())
}

fn engine() -> Engine {
    let mut config = EngineConfig::new(Runtime::cpu(), "cpu");
    config.hub.offline = true;
    Engine::new(config)
}

/// Two images, one per batch, in 2 steps.
fn request() -> GenerateRequest {
    let mut req = GenerateRequest::new(tiny_sd15(), "a lighthouse");
    req.params.n = 2;
    req.params.seed = 7;
    req.params.steps = Some(2);
    req.memory.max_images_per_batch = Some(1);
    req
}

#[test]
fn a_job_gives_its_batches_with_their_metadata() {
    let mut engine = engine();
    let batches = engine.generate(&request(), &mut |_| {}, &CancelToken::new()).unwrap();
    assert_eq!(batches.len(), 2, "one image per batch");
    let images: Vec<&FinishedImage> = batches.iter().flat_map(|b| &b.images).collect();
    assert_eq!(images.iter().map(|i| (i.index, i.image.seed)).collect::<Vec<_>>(), [(0, 7), (1, 8)]);
    let meta = &images[1].metadata;
    assert_eq!((meta.seed, meta.batch_index, meta.steps, meta.prompt.as_str()), (8, 1, 2, "a lighthouse"));
    assert_eq!(meta.model, tiny_sd15().label());
    assert!(meta.extra.contains_key("plan") && meta.extra.contains_key("memory"), "{:?}", meta.extra.keys());
    assert!(batches[0].job_metadata.contains_key("plan"));
    assert_eq!(batches[0].job_images, 2);
}

#[test]
fn a_job_cancelled_after_its_first_step_stops_and_the_engine_goes_on() {
    let mut engine = engine();
    let cancel = CancelToken::new();
    let mut steps = 0;
    let mut delivered = 0;
    let result = engine.generate_each(
        &request(),
        &mut |e| {
            if let Event::Pipeline(Progress::Step { .. }) = e {
                steps += 1;
                cancel.cancel();
            }
        },
        &cancel,
        &mut |_| {
            delivered += 1;
            Ok::<_, Error>(())
        },
    );
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert_eq!((steps, delivered), (1, 0), "stopped after the first step, nothing of the batch delivered");

    // A job cancelled between stages (before the denoiser loads) stops there too.
    let cancel = CancelToken::new();
    let mut stages = Vec::new();
    let result = engine.generate(
        &request(),
        &mut |e| {
            if let Event::Pipeline(Progress::StageEnd { stage, .. }) = e {
                stages.push(stage.to_string());
                cancel.cancel();
            }
        },
        &cancel,
    );
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert_eq!(stages, ["text_encoder"]);

    // The engine still works, on the model it opened for the first job.
    let batches = engine.generate(&request(), &mut |_| {}, &CancelToken::new()).unwrap();
    assert_eq!(batches.iter().map(|b| b.images.len()).sum::<usize>(), 2);
    assert_eq!(engine.models_opened(), 1, "opened once for three jobs");
}

#[test]
fn a_request_is_refused_before_anything_opens() {
    let mut engine = engine();
    let mut req = request();
    req.prompts = vec!["  ".into()];
    let err = engine.generate(&req, &mut |_| {}, &CancelToken::new()).unwrap_err();
    assert!(err.to_string().contains("the prompt is empty"), "{err}");
    let mut req = request();
    req.params.seed = u64::MAX;
    let err = engine.generate(&req, &mut |_| {}, &CancelToken::new()).unwrap_err();
    assert!(err.to_string().contains("past the largest seed"), "{err}");
    assert_eq!(engine.models_opened(), 0);
}

/// A batch after the first parses nothing: the configs and headers the first read are the open
/// model's (today's runs read the VAE's config alone about ten times a batch).
#[test]
fn later_batches_parse_no_file_again() {
    let ModelSource::Path(dir) = tiny_sd15() else { unreachable!() };
    let model = ModelFolder::open(&dir).unwrap();
    let opened = model.files_parsed();
    let req = Request { prompt: "a lighthouse".into(), n: 1, steps: Some(2), ..Default::default() };
    crate::pipeline::txt2img(&model, &req, &Runtime::cpu(), &mut |_| {}).unwrap();
    let first = model.files_parsed();
    assert!(first > opened, "the first batch parses the stages' configs ({opened} → {first})");
    for seed in 1..3 {
        crate::pipeline::txt2img(&model, &Request { seed, ..req.clone() }, &Runtime::cpu(), &mut |_| {}).unwrap();
    }
    assert_eq!(model.files_parsed(), first, "batches 2 and 3 parse nothing");
}
