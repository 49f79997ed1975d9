//! `generate --remote URL`: the job runs on an `sdgen-server`, everything else happens here.
//!
//! The flags are validated exactly as for a local run (a bad one exits 2 with nothing sent and
//! nothing written), the job goes to `POST /v1/jobs` as the server's own request type
//! ([`sdgen::engine::wire::JobBody`]), its event stream drives the same progress reporter as a
//! local run, and each image is saved as soon as the server has made it: the server's PNG bytes
//! (its `parameters` text is the one a local run writes), named as a local run names them, with
//! the server's sidecar plus `extra.remote` (the URL and the job's id). The server's refusals
//! keep the command line's exit codes (see [`client`]); Ctrl-C cancels the job on the server.

mod client;
mod interrupt;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use base64::Engine as _;
use sdgen::engine::wire::{JobBody, JobEvent, LoraBody, Seed, SkipLayers, UpscaleBody};
use sdgen::output::{save_png_to, ImageMetadata};
use sdgen::pipeline::Progress;
use serde_json::json;

use crate::args::{Args, Resolved};
use crate::progress;
use client::Server;

/// Runs the job on the server at `url`.
pub fn run(args: &Args, url: &str) -> anyhow::Result<ExitCode> {
    refuse_local_only(args)?;
    let resolved = args.resolve()?;
    // As a local run: the output proven usable before anything is sent, nothing created yet.
    resolved.output.check(resolved.request.image_count())?;
    let body = job_body(args, &resolved)?;
    let key = args.api_key.clone().or_else(|| std::env::var("SDGEN_API_KEY").ok()).filter(|k| !k.is_empty());
    let server = Server::new(url, key);
    let id = server.submit(&body)?;
    progress::log(&format!("Job {id} sent to {}", server.url));
    let interrupted = interrupt::cancel_on_ctrl_c(&server, &id);
    let mut job = RemoteJob { server: &server, id: &id, resolved: &resolved, args, outputs: Vec::new(), first: None };
    match job.follow() {
        Err(_) if interrupted.is_set() => {
            progress::warn(&format!("Interrupted: job {id} cancelled on {}", server.url));
            Ok(ExitCode::from(130))
        }
        Err(e) => Err(e),
        Ok(()) => {
            if args.json {
                job.print_json()?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The flags that set up this machine's run, which the job API does not carry: refused (exit 2)
/// rather than silently ignored.
fn refuse_local_only(args: &Args) -> anyhow::Result<()> {
    let local_only = [
        (args.check, "--check", "it reports this machine (the server's memory is at /v1/memory)"),
        (args.prompt_style != "a1111", "--prompt-style", "the server reads prompts A1111's way"),
        (args.clip_skip.is_some(), "--clip-skip", "the job API takes no clip skip yet"),
        (args.config_from.is_some(), "--config-from", "it names a folder on this machine"),
        (args.max_memory.is_some(), "--max-memory", "the server's own --max-memory applies"),
        (args.memory_mode != "auto", "--memory-mode", "the server plans its own memory"),
        (args.device != "cpu", "--device", "the server runs on its own device (sdgen-server --device)"),
        (args.dtype.is_some(), "--dtype", "the server runs its own dtype (sdgen-server --dtype)"),
        (args.no_fast_kernels, "--no-fast-kernels", "the server chooses its kernels"),
        (args.keep_warm, "--keep-warm", "the server keeps its own weights warm (sdgen-server --no-keep-warm)"),
    ];
    match local_only.iter().find(|(given, ..)| *given) {
        Some((_, flag, why)) => Err(invalid(format!("{flag} does not apply with --remote: {why}"))),
        None => Ok(()),
    }
}

/// The job as the server's API takes it: every setting resolved here (the seed drawn, a preset's
/// values filled in, its name sent for the metadata), the init image's file as it is. A VAE or
/// LoRA path goes as given: the server opens only those it was started with (`--extra-vae`,
/// `--extra-lora`).
fn job_body(args: &Args, resolved: &Resolved) -> anyhow::Result<JobBody> {
    let (request, params) = (&resolved.request, &resolved.request.params);
    let init_image = match &args.init_image {
        // Already read and decoded by `resolve`; the server decodes the same bytes.
        Some(path) => Some(
            base64::engine::general_purpose::STANDARD
                .encode(std::fs::read(path).with_context(|| format!("--init-image {}", path.display()))?),
        ),
        None => None,
    };
    let preset = args.quality.as_deref().map(sdgen::presets::find).transpose()?;
    let (prompt, prompts) = match request.prompts.as_slice() {
        [one] => (one.clone(), None),
        all => (String::new(), Some(all.to_vec())),
    };
    Ok(JobBody {
        prompt,
        prompts,
        vae: args.vae.clone(),
        loras: (request.loras.iter()).map(|l| LoraBody { source: l.source.label(), scale: Some(l.scale) }).collect(),
        quality: args.quality.clone(),
        upscale: (request.upscale.iter())
            .map(|u| UpscaleBody { factor: u.factor, hires_strength: u.hires_strength, tiled: u.tiled })
            .collect(),
        negative_prompt: params.negative_prompt.clone(),
        // Without --model (or --pro, or a preset's model), the server's default model.
        model: (args.model.is_some() || args.pro || preset.is_some()).then(|| args.model_name(preset).to_string()),
        n: Some(params.n),
        batch_size: Some(args.batch_size),
        seed: Seed(Some(params.seed)),
        steps: params.steps,
        guidance: params.guidance,
        width: params.width,
        height: params.height,
        scheduler: params.scheduler.map(|s| s.to_string()),
        init_image,
        strength: request.img2img.as_ref().and_then(|i| i.strength),
        no_t5: params.family_options.no_t5,
        max_sequence_length: params.family_options.max_sequence_length,
        skip_layer_guidance: args.slg.clone().map(|layers| SkipLayers { layers, scale: args.slg_scale }),
        refiner: args.refiner.clone(),
        refiner_start: args.refiner_start,
        refiner_strength: args.refiner_strength,
        weights: request.open.weights.map(|q| q.name().to_string()),
    })
}

/// A server's line, its `template` filled in with the flags where it has one.
fn flagged(message: String, template: Option<String>) -> String {
    template.map_or(message, |t| sdgen::error::fill(&t, &crate::args::flag))
}

/// A job on the server, followed to its end.
struct RemoteJob<'a> {
    server: &'a Server,
    id: &'a str,
    resolved: &'a Resolved,
    args: &'a Args,
    /// What `--json` lists of each saved image.
    outputs: Vec<serde_json::Value>,
    /// The first image's metadata, for `--json`.
    first: Option<ImageMetadata>,
}

impl RemoteJob<'_> {
    /// Shows the job's progress and saves each image as it is made, until the job ends.
    fn follow(&mut self) -> anyhow::Result<()> {
        let mut bar = progress::Reporter::new();
        for event in self.server.events(self.id)? {
            match event? {
                JobEvent::Queued { position } if position > 0 => {
                    progress::log(&format!("Queued behind {}", crate::plural(position, "job")));
                }
                JobEvent::Queued { .. } | JobEvent::Started => {}
                JobEvent::StageStart { stage } => bar.report(Progress::StageStart(&stage)),
                JobEvent::StageEnd { stage, elapsed_ms } => {
                    bar.report(Progress::StageEnd { stage: &stage, elapsed_ms })
                }
                JobEvent::Step { step, steps, .. } => bar.report(Progress::Step { index: step, total: steps }),
                // Worded with the flags where the line names fields, as a local run words it.
                JobEvent::Log { message, template } => {
                    bar.finish();
                    progress::log(&flagged(message, template));
                }
                JobEvent::Warning { message, template } => {
                    bar.finish();
                    progress::warn(&flagged(message, template));
                }
                JobEvent::Image { index, .. } => {
                    bar.finish();
                    self.save(index)?;
                }
                JobEvent::Done { .. } => return Ok(()),
                JobEvent::Failed { status, field, message, template } => {
                    bar.finish();
                    let message = client::flag_message(field.as_deref(), &message, template.as_deref());
                    let url = &self.server.url;
                    // A 4xx is the request's fault (found once the model was open), a 507 a job
                    // the worker's memory cannot hold (as the server's own check answers it): exit 2.
                    return Err(if (400..500).contains(&status) || status == 507 {
                        invalid(format!("the server at {url} refused the job: {message}"))
                    } else {
                        anyhow!("the job failed on the server at {url}: {message}")
                    });
                }
                JobEvent::Cancelled { images } => {
                    bar.finish();
                    return Err(anyhow!(
                        "job {} was cancelled on the server at {} after {}",
                        self.id,
                        self.server.url,
                        crate::plural(images, "image")
                    ));
                }
            }
        }
        // The stream ended without the job's last event: ask where the job is.
        let state = self.server.job(self.id).map(|j| j["state"].to_string()).unwrap_or_else(|e| e.to_string());
        Err(anyhow!("the event stream from {} ended before job {} did ({state})", self.server.url, self.id))
    }

    /// Fetches image `index` and writes it as a local run would.
    fn save(&mut self, index: usize) -> anyhow::Result<()> {
        let job = self.server.job(self.id)?;
        let image = job["images"]
            .as_array()
            .and_then(|all| all.iter().find(|i| i["index"].as_u64() == Some(index as u64)))
            .ok_or_else(|| anyhow!("the server at {} lists no image {index} of job {}", self.server.url, self.id))?;
        let mut meta: ImageMetadata = serde_json::from_value(image["metadata"].clone())
            .with_context(|| format!("the metadata of image {index} from {}", self.server.url))?;
        // Where it ran; and the init image named as here, as a local run names it.
        meta.extra.insert("remote".into(), json!({ "url": self.server.url, "job": self.id }));
        if let Some(path) = &self.args.init_image {
            meta.extra.insert("init_image".into(), path.display().to_string().into());
        }
        let png = self.server.image(self.id, index)?;
        let total = self.resolved.request.image_count();
        let saved = save_png_to(&self.resolved.output, index, total, &meta, &png)?;
        progress::log(&format!("Saved {}", saved.png_path.display()));
        self.outputs.push(json!({ "png": saved.png_path, "metadata": saved.json_path, "seed": meta.seed }));
        self.first.get_or_insert(meta);
        Ok(())
    }

    /// The `--json` result, shaped as a local run's.
    fn print_json(&self) -> anyhow::Result<()> {
        let Some(meta) = &self.first else { return Ok(()) };
        let mut result = json!({
            "images": self.outputs,
            "model": meta.model,
            "steps": meta.steps,
            "guidance": meta.guidance,
            "scheduler": meta.scheduler,
            "width": meta.width,
            "height": meta.height,
            "timings_ms": meta.timings_ms,
            "warnings": meta.warnings,
        });
        for (k, v) in &meta.extra {
            result[k] = v.clone();
        }
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &result)?;
        writeln!(out)?;
        Ok(())
    }
}

fn invalid(message: String) -> anyhow::Error {
    sdgen::Error::InvalidInput(message).into()
}
