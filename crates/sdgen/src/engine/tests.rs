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
    req.prompts = Vec::new();
    let err = engine.generate(&req, &mut |_| {}, &CancelToken::new()).unwrap_err();
    assert!(err.to_string().contains("no prompts"), "{err}");
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

/// The tokenizers are the open model's too: a second batch reads no tokenizer file (they are
/// gone from the folder by then) and gives the same image.
#[test]
fn later_batches_read_no_tokenizer_file() {
    let ModelSource::Path(dir) = tiny_sd15() else { unreachable!() };
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("model");
    copy_dir(&dir, &copy);
    let model = ModelFolder::open(&copy).unwrap();
    let req = Request { prompt: "a lighthouse".into(), n: 1, steps: Some(2), ..Default::default() };
    let first = crate::pipeline::txt2img(&model, &req, &Runtime::cpu(), &mut |_| {}).unwrap();
    let parsed = model.files_parsed();
    for entry in std::fs::read_dir(copy.join("tokenizer")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let second = crate::pipeline::txt2img(&model, &req, &Runtime::cpu(), &mut |_| {}).unwrap();
    assert_eq!(model.files_parsed(), parsed, "the second batch parses nothing");
    assert_eq!(first.images[0].rgb8, second.images[0].rgb8);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn tiny_sdxl() -> ModelSource {
    ModelSource::Path(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sdxl")).into())
}

/// `--quality 4k` on the tiny SDXL with its first pass scaled down to 64×80 (explicit sizes win
/// over the preset's): the passes run in order (first pass, upscale, hires pass), at the right
/// sizes, and the result is exactly the first pass's image upscaled by PIL's Lanczos and then run
/// through image-to-image at the preset's strength, as the pipeline runs it alone.
#[test]
fn the_4k_preset_runs_its_passes_in_order_at_scaled_down_sizes() {
    let mut req = GenerateRequest::new(tiny_sdxl(), "a lighthouse at dusk");
    (req.params.steps, req.params.width, req.params.height, req.params.seed) = (Some(4), Some(64), Some(80), 3);
    crate::presets::find("4k").unwrap().apply(&mut req).unwrap();
    let (mut stages, mut lines) = (Vec::new(), Vec::new());
    let batches = engine()
        .generate(
            &req,
            &mut |e| match e {
                Event::Pipeline(Progress::StageStart(s)) => stages.push(s.to_string()),
                Event::Pipeline(Progress::Note(l)) | Event::Log(l) => lines.push(l.to_string()),
                _ => {}
            },
            &CancelToken::new(),
        )
        .unwrap();
    let first = ["text_encoder", "text_encoder_2", "unet", "vae"];
    let hires = ["hires_text_encoder", "hires_text_encoder_2", "hires_vae_encoder", "hires_unet", "hires_vae"];
    let want: Vec<&str> = first.iter().copied().chain(["upscale"]).chain(hires).collect();
    assert_eq!(stages, want);
    for line in [
        "Then upscaling ×2 with Lanczos to 128x160",
        "Then a hires image-to-image pass at 128x160: strength 0.3 (the last 1 of 4 steps)",
        "🧹 Cleaning memory before upscaling...",
        "🧹 Cleaning memory after upscaling...",
    ] {
        assert!(lines.iter().any(|l| l == line), "no `{line}` in {lines:#?}");
    }

    let image = &batches[0].images[0];
    let meta = &image.metadata;
    assert_eq!((meta.width, meta.height, image.image.rgb8.len()), (128, 160, 128 * 160 * 3));
    assert_eq!(meta.extra["preset"], "4k");
    let passes = serde_json::json!([
        {"pass": "generate", "width": 64, "height": 80},
        {"pass": "upscale", "factor": 2, "filter": "lanczos", "width": 128, "height": 160},
        {"pass": "hires", "strength": 0.3, "steps": 4, "denoising_steps": 1, "width": 128, "height": 160},
    ]);
    assert_eq!(meta.extra["passes"], passes);
    for stage in want.iter().filter(|s| !s.starts_with("text_encoder")) {
        assert!(meta.timings_ms.contains_key(*stage), "{stage} not timed: {:?}", meta.timings_ms.keys());
    }
    let a1111 = crate::output::a1111_parameters(meta);
    assert!(a1111.contains("Size: 64x80") && a1111.contains("Hires upscale: 2, Hires steps: 4"), "{a1111}");

    // The same passes, one by one through the pipeline.
    let ModelSource::Path(dir) = tiny_sdxl() else { unreachable!() };
    let model = ModelFolder::open(&dir).unwrap();
    let rt = Runtime::cpu();
    let part = Request { prompt: "a lighthouse at dusk".into(), ..req.params.clone() };
    let base = crate::pipeline::txt2img(&model, &part, &rt, &mut |_| {}).unwrap();
    let base = crate::image_io::RgbImage::new(64, 80, base.images[0].rgb8.clone()).unwrap();
    let upscaled = crate::image_io::resize_lanczos(&base, 128, 160).unwrap();
    let init_image = crate::pipeline::InitImage { name: "upscaled".into(), image: upscaled };
    let alone = img2img(
        &model,
        &Img2ImgRequest { request: Request { width: None, height: None, ..part }, init_image, strength: Some(0.3) },
        &rt,
        &mut |_| {},
    )
    .unwrap();
    assert!(alone.images[0].rgb8 == image.image.rgb8, "the hires pass is img2img of the upscaled image");
}

/// `--upscale` alone after the SDXL base + refiner: the refined image upscaled, nothing else run.
#[test]
fn an_upscale_follows_the_refiner() {
    let refiner = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sdxl-refiner"));
    let mut req = GenerateRequest::new(tiny_sdxl(), "a lighthouse at dusk");
    (req.params.steps, req.params.width, req.params.height) = (Some(4), Some(64), Some(64));
    req.refiner = Some(RefinerRequest { source: ModelSource::Path(refiner.into()), start: None, strength: None });
    req.upscale = vec![UpscaleRequest { factor: 3, hires_strength: None, tiled: false }];
    let mut stages = Vec::new();
    let batches = engine()
        .generate(
            &req,
            &mut |e| {
                if let Event::Pipeline(Progress::StageStart(s)) = e {
                    stages.push(s.to_string())
                }
            },
            &CancelToken::new(),
        )
        .unwrap();
    assert_eq!(stages.last().map(String::as_str), Some("upscale"));
    assert!(stages.iter().any(|s| s == "refiner_unet") && !stages.iter().any(|s| s.starts_with("hires_")));
    let image = &batches[0].images[0];
    assert_eq!((image.metadata.width, image.image.rgb8.len()), (192, 192 * 192 * 3));
    assert!(image.metadata.extra.contains_key("refiner"));
    let a1111 = crate::output::a1111_parameters(&image.metadata);
    assert!(a1111.contains("Size: 64x64") && a1111.contains("Postprocess upscale by: 3"), "{a1111}");
}

/// The engine's log lines and warnings refer to fields, named as the engine's caller names them
/// (`EngineConfig::field_names`): the CLI's flags, a server's JSON fields.
#[test]
fn log_lines_name_fields_as_the_caller_does() {
    let mut engine = engine();
    let mut req = request();
    req.params.steps = Some(1);
    (req.params.width, req.params.height) = (Some(64), Some(64));
    // The leanest plan takes one image at a time, whatever the batch size.
    req.memory.max_images_per_batch = Some(2);
    req.memory.mode = sdgen_memory::plan::MemoryMode::Low;
    let logs = |engine: &mut Engine| {
        let mut lines = Vec::new();
        engine
            .generate(
                &req,
                &mut |e| {
                    if let Event::Log(l) = e {
                        lines.push(l.to_string())
                    }
                },
                &CancelToken::new(),
            )
            .unwrap();
        lines.into_iter().find(|l| l.contains("does not fit in the memory available")).expect("the batch size's line")
    };
    assert_eq!(logs(&mut engine), "batch_size 2 does not fit in the memory available: 1 image at a time");
    engine.set_field_names(|f| (f == "batch_size").then_some("--batch-size"));
    assert_eq!(logs(&mut engine), "--batch-size 2 does not fit in the memory available: 1 image at a time");
}

fn testdata(name: &str) -> ModelSource {
    ModelSource::Path(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata")).join(name))
}

/// `plan` lists every pass the job runs, each planned with its verdict; where a pass does not
/// fit it refuses with the planner's error, the one the job itself ends with: the same function
/// decides both.
#[test]
fn plan_lists_every_pass_and_refuses_as_the_job_does() {
    use sdgen_memory::plan::Verdict;
    let hub = HubOptions { offline: true, ..HubOptions::from_env() };
    let open = |name: &str| testdata(name).open_with(&hub, &Default::default(), &mut |_| {}).unwrap();
    let (base, refiner) = (open("tiny-sdxl"), open("tiny-sdxl-refiner"));
    let mut req = GenerateRequest::new(testdata("tiny-sdxl"), "a lighthouse");
    req.params.steps = Some(4);
    (req.params.width, req.params.height) = (Some(64), Some(64));
    req.refiner = Some(RefinerRequest { source: testdata("tiny-sdxl-refiner"), start: None, strength: None });
    req.upscale = vec![UpscaleRequest { factor: 2, hires_strength: Some(0.5), tiled: false }];
    let rt = Runtime::cpu();
    let job = plan(&base, Some(&refiner), &req, &rt, &mut |_| {}).unwrap();
    let passes: Vec<Pass> = job.passes().iter().map(|(p, _)| *p).collect();
    assert_eq!(passes, [Pass::Base, Pass::Refiner, Pass::Hires(0)]);
    assert!(job.passes().iter().all(|(_, p)| p.verdict != Verdict::DoesNotFit));
    assert_eq!((job.first_size, job.output_size), ((64, 64), (128, 128)));
    // Without the refiner model (a hub one not downloaded yet, for a server) its pass is left out.
    let job = plan(&base, None, &req, &rt, &mut |_| {}).unwrap();
    assert_eq!(job.passes().iter().map(|(p, _)| *p).collect::<Vec<_>>(), [Pass::Base, Pass::Hires(0)]);

    // In 1 MB nothing fits: the planner's refusal, and the job's own error is the same.
    req.memory.max_memory_bytes = Some(1 << 20);
    let refused = plan(&base, Some(&refiner), &req, &rt, &mut |_| {}).unwrap_err();
    assert!(refused.is_does_not_fit() && refused.is_user_error(), "{refused}");
    let ran = engine().generate(&req, &mut |_| {}, &CancelToken::new()).unwrap_err();
    // The same refusal, up to the figures: the process's own memory (the tests around this one
    // run in it) counts against the budget, measured at each planning.
    let figures_out = |e: &Error| e.to_string().replace(|c: char| c.is_ascii_digit(), "#");
    assert!(ran.is_does_not_fit(), "{ran}");
    assert_eq!(figures_out(&ran), figures_out(&refused));
    // A preset made for another family is refused by the plan too (not only by a run).
    let mut lcm = GenerateRequest::new(tiny_sd15(), "a lighthouse");
    crate::presets::find("lcm").unwrap().apply(&mut lcm).unwrap();
    let sd15 = tiny_sd15().open_with(&hub, &Default::default(), &mut |_| {}).unwrap();
    let e = plan(&sd15, None, &lcm, &rt, &mut |_| {}).unwrap_err();
    assert_eq!(e.field(), Some("quality"), "{e}");
}

/// A refiner that decodes the base's latents takes the request's VAE; one of another latent
/// space (after SD 3.5) keeps its own. The engine's opening and a server's check share this.
#[test]
fn the_refiner_takes_the_requests_vae_only_where_it_decodes_the_bases_latents() {
    let hub = HubOptions { offline: true, ..HubOptions::from_env() };
    let open = |name: &str| testdata(name).open_with(&hub, &Default::default(), &mut |_| {}).unwrap();
    let (sdxl, sd35, refiner) = (open("tiny-sdxl"), open("tiny-sd35-medium"), open("tiny-sdxl-refiner"));
    let vae = testdata("tiny-sdxl/vae");
    assert_eq!(refiner_vae(&sdxl, &refiner, Some(&vae)), Some(&vae));
    assert_eq!(refiner_vae(&sd35, &refiner, Some(&vae)), None);
    assert_eq!(refiner_vae(&sdxl, &refiner, None), None);
}
