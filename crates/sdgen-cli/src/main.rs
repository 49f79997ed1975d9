//! `generate`: the SD-Generate command line. A thin `main` around [`run`], which validates the
//! arguments, resolves them once into a request and a runtime, and reports errors as one line
//! with their whole chain.

mod args;
mod check;
mod from_png;
mod models;
mod progress;
mod remote;

use std::cell::RefCell;
use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use sdgen::engine::{Batch, CancelToken, Engine, Event};
use sdgen::output::save_image_to;
use sdgen::pipeline::Settings;

use args::{Args, Resolved};

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

/// `a: b: c` for an error and its causes, skipping a cause its parent's message already quotes;
/// the engine's errors about a request field name the flag that set it.
fn chain(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in err.chain() {
        let text = match e.downcast_ref::<sdgen::Error>() {
            Some(e) => e.describe(&args::flag),
            None => e.to_string(),
        };
        if !parts.last().is_some_and(|p| p.ends_with(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

fn run() -> anyhow::Result<ExitCode> {
    let mut args = Args::parse();
    if let Some(png) = args.from_png.clone() {
        for warning in from_png::apply(&mut args, &png)? {
            progress::warn(&warning);
        }
    }
    if args.no_fast_kernels {
        sdgen::kernels::set_fast_kernels(false);
    }
    if let Some(threads) = args.threads {
        sdgen::kernels::set_cpu_threads(threads)
            .map_err(|e| sdgen::Error::InvalidInput(format!("--threads {threads}: {e}")))?;
    }
    if args.list_models {
        let mut hub = sdgen::hub::HubOptions::from_env();
        hub.offline = true;
        return models::list(&hub);
    }
    if args.list_presets {
        print!("{}", sdgen::presets::table());
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(url) = &args.remote {
        progress::set_quiet(args.quiet);
        progress::set_verbose(args.verbose);
        return remote::run(&args, url);
    }
    let resolved = args.resolve()?;
    // GPU memory probe and pool trim for the memory manager (nothing to install on the CPU).
    let _device_memory = sdgen::device_memory::DeviceMemory::install(&resolved.engine.runtime.device);
    progress::set_quiet(args.quiet);
    progress::set_verbose(args.verbose);
    progress::memory("Startup");
    if args.check {
        return check::run(&resolved, args.json);
    }
    // Prove the output usable before any model is loaded, so a typo costs nothing, and create
    // nothing yet: a refused run leaves no folder behind (the first save makes it).
    resolved.output.check(resolved.request.image_count())?;
    let bar = RefCell::new(progress::Reporter::new());
    let mut events = |e: Event| report(&mut bar.borrow_mut(), e);
    let mut engine = Engine::new(resolved.engine.clone());
    let mut saver = Saver { resolved: &resolved, outputs: Vec::new(), first: None };
    // Each batch is saved as soon as it is made: an interrupted run keeps what it finished.
    engine.generate_each(&resolved.request, &mut events, &CancelToken::new(), &mut |batch| {
        bar.borrow_mut().finish();
        saver.save(batch)
    })?;
    if args.json {
        saver.print_json()?;
    }
    // The seed's completion point: everything dropped, memory returned, final state logged. One
    // pass: the aggressive cleanup's 0.5 s pause is for a next model to load into, and the
    // process exits here.
    drop(saver);
    drop(engine);
    sdgen_memory::cleanup_memory(false);
    progress::memory("Complete");
    Ok(ExitCode::SUCCESS)
}

/// Prints what the engine reports: lines and warnings on stderr, bars for downloads and steps.
fn report(bar: &mut progress::Reporter, event: Event) {
    match event {
        Event::Log(line) => {
            bar.finish();
            progress::log(line);
        }
        Event::Detail(line) if progress::verbose() => {
            bar.finish();
            progress::log(line);
        }
        Event::Detail(_) => {}
        Event::Warning(line) => {
            bar.finish();
            progress::warn(line);
        }
        Event::Evicted(eviction) => {
            bar.finish();
            progress::log(&eviction.to_string());
        }
        Event::Download(p) => bar.download(p),
        Event::Pipeline(p) => bar.report(p),
    }
}

/// `1 image`, `3 images`.
pub(crate) fn plural(n: usize, noun: &str) -> String {
    sdgen::engine::plural(n, noun)
}

/// Saves each batch's images as it finishes and collects what `--json` reports.
struct Saver<'a> {
    resolved: &'a Resolved,
    outputs: Vec<serde_json::Value>,
    /// The first batch, without its images: its settings, timings, warnings and the job's
    /// metadata, for `--json`.
    first: Option<Batch>,
}

impl Saver<'_> {
    /// Writes the batch's images with their sidecars.
    fn save(&mut self, mut batch: Batch) -> anyhow::Result<()> {
        for image in &batch.images {
            let (output, all) = (&self.resolved.output, batch.job_images);
            let saved = save_image_to(output, image.index, all, &image.metadata, &image.image.rgb8)?;
            progress::log(&format!("Saved {}", saved.png_path.display()));
            self.outputs.push(serde_json::json!({
                "png": saved.png_path,
                "metadata": saved.json_path,
                "seed": image.image.seed,
            }));
        }
        if self.first.is_none() {
            batch.images.clear();
            self.first = Some(batch);
        }
        Ok(())
    }

    /// The `--json` result: one document on stdout.
    fn print_json(&self) -> anyhow::Result<()> {
        let Some(Batch { settings, output_size, timings_ms, warnings, job_metadata, .. }) = &self.first else {
            return Ok(());
        };
        let Settings { steps, guidance, scheduler, .. } = settings;
        // The images' size (upscaled where asked); `passes` has the first pass's.
        let (width, height) = output_size;
        let mut result = serde_json::json!({
            "images": self.outputs,
            "model": self.resolved.request.model.label(),
            "steps": steps,
            "guidance": guidance,
            "scheduler": scheduler.to_string(),
            "width": width,
            "height": height,
            "timings_ms": timings_ms,
            "warnings": warnings,
        });
        for (k, v) in job_metadata {
            result[k] = v.clone();
        }
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &result)?;
        writeln!(out)?;
        Ok(())
    }
}
