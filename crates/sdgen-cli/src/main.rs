//! `generate`: the SD-Generate command line. A thin `main` around [`run`], which validates the
//! arguments, resolves them once into a request and a runtime, and reports errors as one line
//! with their whole chain.

mod args;
mod progress;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use sdgen::output::{ensure_output_dir, save_image, ImageMetadata};
use sdgen::pipeline::{txt2img, Request};

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
    let resolved = args.resolve()?;
    // Prove the output folder is writable before any model is loaded, so a typo costs nothing.
    ensure_output_dir(&resolved.output)?;
    let mut bar = progress::Reporter::new();
    let model = resolved.model.open_with(&resolved.hub, &resolved.open, &mut |p| bar.download(p))?;
    bar.finish();
    let request: Request = resolved.request.clone();
    let settings = sdgen::pipeline::resolve(&model, &request)?;
    progress::log(&format!(
        "Generating {} image(s) with {} ({}) at {}x{}, {} steps, {} scheduler, guidance {}, seed {}",
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
    let generation = txt2img(&model, &request, &resolved.runtime, &mut |p| bar.report(p))?;
    bar.finish();
    for w in &generation.warnings {
        progress::log(&format!("⚠️  WARNING: {w}"));
    }

    let mut outputs = Vec::new();
    for image in &generation.images {
        let meta = ImageMetadata {
            model: resolved.model.label(),
            pipeline_type: model.family().pipeline_type.to_string(),
            memory_optimizations: "mmap_loading,stage_unloading".to_string(),
            warnings: generation.warnings.clone(),
            failures: Vec::new(),
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone().unwrap_or_default(),
            seed: image.seed,
            batch_index: image.index,
            steps: generation.settings.steps,
            guidance: generation.settings.guidance,
            scheduler: generation.settings.scheduler.to_string(),
            width: generation.settings.width,
            height: generation.settings.height,
            device: resolved.device_label.clone(),
            dtype: format!("{:?}", resolved.runtime.dtype).to_lowercase(),
            timings_ms: generation.timings_ms.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extra: Default::default(),
        };
        let saved = save_image(&resolved.output, &meta, &image.rgb8)?;
        progress::log(&format!("Saved {}", saved.png_path.display()));
        outputs.push(serde_json::json!({
            "png": saved.png_path,
            "metadata": saved.json_path,
            "seed": image.seed,
        }));
    }
    if args.json {
        let result = serde_json::json!({
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
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &result)?;
        writeln!(out)?;
    }
    Ok(ExitCode::SUCCESS)
}
