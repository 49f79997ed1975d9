//! `generate`: the SD-Generate command line. A thin `main` around [`run`], which validates the
//! arguments, resolves them once into a request and a runtime, and reports errors as one line
//! with their whole chain.

mod args;
mod check;
mod progress;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use sdgen::output::{ensure_output_dir, save_image, ImageMetadata};
use sdgen::pipeline::{check_refiner, img2img, resolve_img2img, txt2img_refined, Img2ImgRequest, Refiner, Request};

use args::Args;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", chain(&err));
            let user_error = err.downcast_ref::<sdgen::Error>().is_some_and(sdgen::Error::is_user_error);
            ExitCode::from(if user_error { 2 } else { 1 })
        }
    }
}

/// `a: b: c` for an error and its causes, skipping a cause its parent's message already quotes.
fn chain(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in err.chain() {
        let text = e.to_string();
        if !parts.last().is_some_and(|p| p.ends_with(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

fn run() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if args.no_fast_kernels {
        sdgen::kernels::set_fast_kernels(false);
    }
    let mut resolved = args.resolve()?;
    // GPU memory probe and pool trim for the memory manager (nothing to install on the CPU).
    let _device_memory = sdgen::device_memory::DeviceMemory::install(&resolved.runtime.device);
    sdgen_memory::log_memory_status("Startup");
    if args.check {
        return check::run(&resolved);
    }
    // Prove the output folder is writable before any model is loaded, so a typo costs nothing.
    ensure_output_dir(&resolved.output)?;
    let mut bar = progress::Reporter::new();
    let mut model = resolved.model.open_with(&resolved.hub, &resolved.open, &mut |p| bar.download(p))?;
    bar.finish();
    let vae_dir = match &resolved.vae {
        Some(sdgen::loading::ModelSource::Path(p)) => Some(p.clone()),
        Some(sdgen::loading::ModelSource::Repo { repo, .. }) => {
            let dir = sdgen::hub::fetch_component(&resolved.hub, repo, "main", &mut |p| bar.download(p))?;
            bar.finish();
            Some(dir)
        }
        None => None,
    };
    if let Some(dir) = &vae_dir {
        model = model.with_vae(dir)?;
    }
    // The refiner is opened (downloaded) now, so a wrong one is refused before any weight loads.
    let refiner_model = match &resolved.refiner {
        Some((source, _)) => {
            let mut m = source
                .open_with(&resolved.hub, &sdgen::loading::OpenOptions::default(), &mut |p| bar.download(p))
                .map_err(|e| anyhow::Error::new(e).context("--refiner"))?;
            bar.finish();
            // The refiner decodes the image: a --vae replaces its VAE too (as diffusers' fp16-fix
            // recipe passes `vae=` to both pipelines).
            if let Some(dir) = &vae_dir {
                m = m.with_vae(dir).map_err(|e| anyhow::Error::new(e).context("--refiner"))?;
            }
            Some(m)
        }
        None => None,
    };
    let refiner = match (&refiner_model, &resolved.refiner) {
        (Some(m), Some((_, fraction))) => {
            let r = Refiner { model: m, high_noise_fraction: *fraction };
            check_refiner(&model, &r)?;
            Some(r)
        }
        _ => None,
    };
    let request: Request = resolved.request.clone();
    let img2img_request = resolved.img2img.take().map(|(init_image, strength)| Img2ImgRequest {
        request: request.clone(),
        init_image,
        strength,
    });
    // Everything is validated here, before any weights are loaded.
    let (settings, img2img_plan) = match &img2img_request {
        Some(req) => {
            let plan = resolve_img2img(&model, req)?;
            (plan.settings.clone(), Some(plan))
        }
        None => (sdgen::pipeline::resolve(&model, &request)?, None),
    };
    let from = match (&img2img_request, &img2img_plan) {
        (Some(req), Some(plan)) => format!(
            " from {} (strength {}: the last {} of {} steps)",
            req.init_image.name, plan.strength, plan.denoising_steps, settings.steps
        ),
        _ => String::new(),
    };
    progress::log(&format!(
        "Generating {} image(s) with {} ({}) at {}x{}, {} steps, {} scheduler, guidance {}, seed {}{from}",
        request.n,
        model.family().display,
        resolved.model.label(),
        settings.width,
        settings.height,
        settings.steps,
        settings.scheduler,
        settings.guidance,
        request.seed
    ));
    // The plan: decided from the weights' headers and the memory available, before any weight
    // is read; a run that cannot fit is refused here with the numbers and what would help.
    let plan = sdgen::planning::plan_run(
        &model,
        &settings,
        request.n,
        img2img_request.is_some(),
        &resolved.runtime.device,
        resolved.runtime.dtype,
        resolved.memory,
    )?;
    for line in plan.to_string().lines() {
        progress::log(line);
    }
    if let Some(w) = &plan.warning {
        progress::log(w);
    }
    resolved.runtime.options = sdgen::planning::stage_options(&model, &plan, &settings, false)?;
    // The refiner runs after the base is unloaded: its stages are planned on their own, and the
    // run takes the leaner of both plans' options where they share one.
    let refiner_plan = match &refiner {
        Some(r) => {
            let p = sdgen::planning::plan_run(
                r.model,
                &settings,
                request.n,
                false,
                &resolved.runtime.device,
                resolved.runtime.dtype,
                resolved.memory,
            )
            .map_err(|e| anyhow::Error::new(e).context("--refiner"))?;
            for line in p.to_string().lines() {
                progress::log(line);
            }
            if let Some(w) = &p.warning {
                progress::log(w);
            }
            let o = sdgen::planning::stage_options(r.model, &p, &settings, false)?;
            let rt = &mut resolved.runtime.options;
            rt.attention_slice = match (rt.attention_slice, o.attention_slice) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            rt.vae_slicing |= o.vae_slicing;
            rt.vae_tile_px = rt.vae_tile_px.or(o.vae_tile_px);
            rt.text_encoder_on_host |= o.text_encoder_on_host;
            Some(p)
        }
        None => None,
    };

    // The images, in batches of what fits; image i keeps generator seed + i whatever its batch.
    // With a refiner, a batch must fit both halves: the smaller of the two plans' batches.
    let per_batch = refiner_plan
        .as_ref()
        .map_or(plan.images_per_batch, |p| p.images_per_batch.min(plan.images_per_batch))
        .clamp(1, request.n);
    let mut generations = Vec::new();
    for start in (0..request.n).step_by(per_batch) {
        let mut part = request.clone();
        part.n = per_batch.min(request.n - start);
        part.seed = request.seed.wrapping_add(start as u64);
        let generation = match &img2img_request {
            Some(req) => img2img(
                &model,
                &Img2ImgRequest { request: part, init_image: req.init_image.clone(), strength: req.strength },
                &resolved.runtime,
                &mut |p| bar.report(p),
            )?,
            None => txt2img_refined(&model, refiner, &part, &resolved.runtime, &mut |p| bar.report(p))?,
        };
        bar.finish();
        generations.push((start, generation));
    }
    let generation = &generations[0].1;
    // diffusers names its image-to-image classes by inserting "Img2Img" before "Pipeline"
    // (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline).
    let pipeline_type = match &img2img_request {
        Some(_) if !model.family().pipeline_type.contains("Img2Img") => {
            model.family().pipeline_type.replacen("Pipeline", "Img2ImgPipeline", 1)
        }
        Some(_) => model.family().pipeline_type.to_string(),
        None => model.family().pipeline_type.to_string(),
    };
    let mut extra = serde_json::Map::new();
    extra.insert("plan".into(), serde_json::to_value(&plan)?);
    // Which kernels made the image: a wrong image reported with "stock" rules our kernels out.
    extra.insert("kernels".into(), sdgen::kernels::kernel_summary(&resolved.runtime.device).into());
    if let Some(p) = &refiner_plan {
        extra.insert("refiner_plan".into(), serde_json::to_value(p)?);
    }
    if let Some(vae) = &resolved.vae {
        extra.insert("vae".into(), vae.label().into());
    }
    if let (Some(req), Some(plan)) = (&img2img_request, &img2img_plan) {
        extra.insert("init_image".into(), req.init_image.name.clone().into());
        extra.insert("strength".into(), plan.strength.into());
    }
    for (_, generation) in &generations {
        for w in &generation.warnings {
            progress::log(&format!("⚠️  WARNING: {w}"));
        }
        for f in &generation.failures {
            progress::log(&format!("⚠️  WARNING: recovered from running out of memory: {f}"));
        }
    }

    let mut outputs = Vec::new();
    for (start, generation) in &generations {
        let memory_optimizations = generation.options_used.names().join(",");
        let mut extra = extra.clone();
        extra.insert("memory".into(), serde_json::to_value(&generation.memory)?);
        if let Some(r) = &generation.refinement {
            let mut r = r.clone();
            // The model as the user named it (a hub repo, not its cache folder).
            if let Some((source, _)) = &resolved.refiner {
                r.model = source.label();
            }
            extra.insert("refiner".into(), serde_json::to_value(&r)?);
        }
        for image in &generation.images {
            let meta = ImageMetadata {
                model: resolved.model.label(),
                pipeline_type: pipeline_type.clone(),
                memory_optimizations: memory_optimizations.clone(),
                warnings: generation
                    .warnings
                    .iter()
                    .cloned()
                    .chain(plan.warning.clone())
                    .chain(refiner_plan.as_ref().and_then(|p| p.warning.clone()))
                    .collect(),
                failures: generation.failures.clone(),
                prompt: request.prompt.clone(),
                negative_prompt: request.negative_prompt.clone().unwrap_or_default(),
                seed: image.seed,
                batch_index: start + image.index,
                steps: generation.settings.steps,
                guidance: generation.settings.guidance,
                scheduler: generation.settings.scheduler.to_string(),
                width: generation.settings.width,
                height: generation.settings.height,
                device: resolved.device_label.clone(),
                dtype: format!("{:?}", resolved.runtime.dtype).to_lowercase(),
                timings_ms: generation.timings_ms.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                extra: extra.clone(),
            };
            let saved = save_image(&resolved.output, &meta, &image.rgb8)?;
            progress::log(&format!("Saved {}", saved.png_path.display()));
            outputs.push(serde_json::json!({
                "png": saved.png_path,
                "metadata": saved.json_path,
                "seed": image.seed,
            }));
        }
    }

    if args.json {
        let mut result = serde_json::json!({
            "images": outputs,
            "model": resolved.model.label(),
            "steps": generation.settings.steps,
            "guidance": generation.settings.guidance,
            "scheduler": generation.settings.scheduler.to_string(),
            "width": generation.settings.width,
            "height": generation.settings.height,
            "timings_ms": generation.timings_ms,
            "warnings": generation.warnings,
        });
        for (k, v) in &extra {
            result[k] = v.clone();
        }
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &result)?;
        writeln!(out)?;
    }
    // The seed's completion point: everything dropped, memory returned, final state logged.
    drop(generations);
    drop(model);
    sdgen_memory::cleanup_memory(true);
    sdgen_memory::log_memory_status("Complete");
    Ok(ExitCode::SUCCESS)
}
