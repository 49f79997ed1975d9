//! The AUTOMATIC1111-compatible subset (`/sdapi/v1/…`), with A1111's request and response shapes
//! (its `modules/api/models.py`), so existing clients work unchanged.
//!
//! Differences a client may notice: a setting left out takes the model's default (the command
//! line's), not A1111's fixed 512×512, 50 steps, CFG 7; unknown fields are ignored as A1111 does,
//! but a feature we do not have (an inpainting `mask`, hires fix) is refused by name rather than
//! silently skipped. The images are the PNGs `generate` writes for the same settings, byte for
//! byte, and `info`'s `infotexts` are their `parameters` text.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::jobs::{Api, Job, JobSpec, JobState, Running};
use crate::request::{self, Seed, Settings};
use crate::routes::{body, submit, AppState};

/// The A1111 routes.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/memory", get(memory))
}

/// The fields of `StableDiffusionProcessingTxt2Img`/`Img2Img` this server reads; every other
/// one is ignored, as A1111 ignores what it does not know.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct A1111Request {
    prompt: String,
    negative_prompt: Option<String>,
    seed: Seed,
    steps: Option<usize>,
    cfg_scale: Option<f64>,
    width: Option<usize>,
    height: Option<usize>,
    sampler_name: Option<String>,
    sampler_index: Option<String>,
    scheduler: Option<String>,
    batch_size: Option<usize>,
    n_iter: Option<usize>,
    denoising_strength: Option<f64>,
    init_images: Option<Vec<String>>,
    mask: Option<String>,
    enable_hr: Option<bool>,
    hr_scale: Option<f64>,
    hr_upscaler: Option<String>,
    hr_resize_x: Option<usize>,
    hr_resize_y: Option<usize>,
    hr_second_pass_steps: Option<usize>,
    override_settings: Option<Map<String, Value>>,
    refiner_checkpoint: Option<String>,
    refiner_switch_at: Option<f64>,
    send_images: Option<bool>,
}

/// `POST /sdapi/v1/txt2img`.
async fn txt2img(
    State(state): State<Arc<AppState>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    generate(state, raw, false).await
}

/// `POST /sdapi/v1/img2img`.
async fn img2img(
    State(state): State<Arc<AppState>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    generate(state, raw, true).await
}

/// Runs a request to its end and answers as A1111: `images` (base64 PNG), `parameters` (the
/// request as given), `info` (a JSON string).
async fn generate(
    state: Arc<AppState>,
    raw: Result<Bytes, BytesRejection>,
    img2img: bool,
) -> Result<Json<Value>, ApiError> {
    let raw = body(&state, raw)?;
    let (r, mut echo) = request::parse_body::<A1111Request>(&raw)?;
    if r.mask.is_some() {
        return Err(ApiError::invalid("mask", "mask: inpainting is not supported by this server"));
    }
    let upscale = if r.enable_hr == Some(true) && !img2img { vec![hires_fix(&r)?] } else { Vec::new() };
    let model_name = r
        .override_settings
        .as_ref()
        .and_then(|o| o.get("sd_model_checkpoint"))
        .map(|v| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                ApiError::invalid("override_settings.sd_model_checkpoint", "sd_model_checkpoint must be a string")
            })
        })
        .transpose()?;
    let model_field =
        if model_name.is_some() { "override_settings.sd_model_checkpoint" } else { "sd_model_checkpoint" };
    let model = state.models.resolve(model_name.as_deref().unwrap_or(&state.default_model()), model_field)?;
    let init_image = if img2img {
        let images = r.init_images.as_deref().unwrap_or_default();
        match images {
            [] => return Err(ApiError::invalid("init_images", "init_images: img2img needs one base64 image")),
            [one] => Some(request::init_image(one, "init_images")?),
            _ => {
                return Err(ApiError::invalid(
                    "init_images",
                    "init_images: only one init image per request is supported",
                ))
            }
        }
    } else {
        None
    };
    let (batch_size, n_iter) = (r.batch_size.unwrap_or(1), r.n_iter.unwrap_or(1));
    if batch_size == 0 {
        return Err(ApiError::invalid("batch_size", "batch_size must be at least 1"));
    }
    let images = batch_size
        .checked_mul(n_iter)
        .ok_or_else(|| ApiError::invalid("n_iter", "batch_size × n_iter is too large"))?;
    let refiner = match &r.refiner_checkpoint {
        Some(name) if !name.is_empty() && name != "None" => Some(sdgen::engine::RefinerRequest {
            source: state.models.resolve(name, "refiner_checkpoint")?,
            start: r.refiner_switch_at,
            strength: None,
        }),
        _ => None,
    };
    let settings = Settings {
        prompts: vec![r.prompt],
        negative_prompt: r.negative_prompt,
        model,
        images,
        batch_size,
        seed: r.seed,
        steps: r.steps,
        guidance: r.cfg_scale,
        width: r.width,
        height: r.height,
        scheduler: sampler(r.sampler_name.as_deref().or(r.sampler_index.as_deref()), r.scheduler.as_deref())?,
        init_image,
        strength: if img2img { r.denoising_strength } else { None },
        family_options: Default::default(),
        refiner,
        vae: None,
        loras: Vec::new(),
        upscale,
        quality: None,
        // A1111 has no such field: its checkpoints are quantised or not as stored.
        weights: None,
    };
    let request = settings.into_request(&state.limits, Api::A1111)?;
    let job = submit(&state, JobSpec { request, api: Api::A1111, timeout_ms: None }, model_field).await?;
    job.wait().await;
    // A1111 echoes the request, its init images left out.
    if img2img {
        echo["init_images"] = Value::Null;
    }
    answer(&job, echo, r.send_images.unwrap_or(true), batch_size)
}

/// A1111's hires fix (`enable_hr`) as the engine's upscale and hires pass: `hr_scale` (2 when
/// absent, as A1111's default) a factor the engine has, `hr_upscaler` Lanczos (the only one
/// here: no latent or ESRGAN upscalers), `denoising_strength` the pass's strength.
fn hires_fix(r: &A1111Request) -> Result<sdgen::engine::UpscaleRequest, ApiError> {
    if let Some(u) = r.hr_upscaler.as_deref().filter(|u| !u.eq_ignore_ascii_case("lanczos")) {
        return Err(ApiError::invalid(
            "hr_upscaler",
            format!("hr_upscaler `{u}` is not available on this server: only Lanczos (or none given)"),
        ));
    }
    for (field, v) in [("hr_resize_x", r.hr_resize_x), ("hr_resize_y", r.hr_resize_y)] {
        if let Some(v) = v.filter(|&v| v != 0) {
            return Err(ApiError::invalid(field, format!("{field} {v}: give hr_scale instead (2, 3 or 4)")));
        }
    }
    // A1111's hires pass schedules `hr_second_pass_steps` steps (0: the first pass's); ours
    // always the first pass's: another number is refused, never dropped.
    if let Some(n) = r.hr_second_pass_steps.filter(|&n| n != 0 && Some(n) != r.steps) {
        let first = r.steps.map_or("the model's default".to_string(), |s| format!("steps, {s}"));
        return Err(ApiError::invalid(
            "hr_second_pass_steps",
            format!("hr_second_pass_steps {n}: the hires pass here runs the first pass's steps ({first}); give 0 or leave it out"),
        ));
    }
    let scale = r.hr_scale.unwrap_or(2.0);
    if scale.fract() != 0.0 || !(2.0..=4.0).contains(&scale) {
        return Err(ApiError::invalid("hr_scale", format!("hr_scale {scale} is not 2, 3 or 4")));
    }
    // A1111's web UI's default hires denoising strength.
    let strength = r.denoising_strength.unwrap_or(0.7);
    Ok(sdgen::engine::UpscaleRequest { factor: scale as u32, hires_strength: Some(strength), tiled: false })
}

/// A1111's sampler (and, since 1.9, its separate schedule type: only `Karras` with `DPM++ 2M`
/// is one we have), as our scheduler.
fn sampler(name: Option<&str>, schedule: Option<&str>) -> Result<Option<sdgen::schedulers::SchedulerKind>, ApiError> {
    let schedule = schedule.map(str::trim).filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("automatic"));
    let name = name.map(str::trim).filter(|s| !s.is_empty());
    match (name, schedule) {
        (None, None) => Ok(None),
        (Some(n), None) => request::scheduler(n, "sampler_name").map(Some),
        (Some(n), Some(s)) if s.eq_ignore_ascii_case("karras") && n.eq_ignore_ascii_case("DPM++ 2M") => {
            request::scheduler("DPM++ 2M Karras", "sampler_name").map(Some)
        }
        (_, Some(s)) => Err(ApiError::invalid(
            "scheduler",
            format!("scheduler `{s}` is not available: use Automatic, or Karras with DPM++ 2M"),
        )),
    }
}

/// The A1111 response of a finished job; a failed job's error with its status.
fn answer(job: &Job, parameters: Value, send_images: bool, batch_size: usize) -> Result<Json<Value>, ApiError> {
    let s = job.status();
    if s.state == JobState::Failed {
        return Err(s.error.clone().unwrap_or_else(|| ApiError::bad_request("the job failed")));
    }
    if !s.state.is_final() {
        // The server is stopping while the broker's workers go on with the job.
        return Err(ApiError::unavailable(
            "shutting_down",
            format!(
                "the server stopped before job {} ended; it goes on: GET /v1/jobs/{} on a server of this broker",
                job.id, job.id
            ),
            5,
        ));
    }
    // Interrupted (`/sdapi/v1/interrupt`): as A1111, what was finished is the answer.
    let images: Vec<String> = if send_images {
        s.images.iter().map(|i| base64::engine::general_purpose::STANDARD.encode(&i.png)).collect()
    } else {
        Vec::new()
    };
    let req = &job.spec.request;
    let first = s.images.first().map(|i| &i.metadata);
    let seeds: Vec<u64> = s.images.iter().map(|i| i.seed).collect();
    let infotexts: Vec<&str> = s.images.iter().map(|i| i.parameters.as_str()).collect();
    let negative = req.params.negative_prompt.clone().unwrap_or_default();
    let info = json!({
        "prompt": req.params.prompt,
        "all_prompts": vec![&req.params.prompt; s.images.len()],
        "negative_prompt": negative,
        "all_negative_prompts": vec![&negative; s.images.len()],
        "seed": req.params.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; s.images.len()],
        "subseed_strength": 0,
        "width": first.map(|m| m.width),
        "height": first.map(|m| m.height),
        "sampler_name": first.map(|m| sdgen::output::a1111_sampler_name(&m.scheduler)),
        "cfg_scale": first.map(|m| m.guidance),
        "steps": first.map(|m| m.steps),
        "batch_size": batch_size,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": req.model.label(),
        "sd_model_hash": first.and_then(|m| m.extra.get("model_hash").cloned()),
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.and_then(|m| m.extra.get("strength").cloned()),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": job_timestamp(job),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": false,
        "interrupted": s.state == JobState::Cancelled,
        "version": first.map_or_else(|| format!("sdgen {}", env!("CARGO_PKG_VERSION")), |m| format!("sdgen {}", m.version)),
    });
    Ok(Json(json!({ "images": images, "parameters": parameters, "info": info.to_string() })))
}

/// A1111's `job_timestamp`: `YYYYMMDDhhmmss`, UTC.
fn job_timestamp(job: &Job) -> String {
    let secs = job.created.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}{:02}{:02}{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

/// `GET /sdapi/v1/sd-models`: the models this server was started with and the named models in
/// its hub cache.
async fn sd_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut names: Vec<(String, String)> = Vec::new();
    let default = state.default_model();
    for p in std::iter::once(&default).chain(&state.models.paths) {
        if !names.iter().any(|(n, _)| n == p) {
            names.push((p.clone(), p.clone()));
        }
    }
    let hub = state.preflight.hub();
    for m in sdgen::loading::NAMED_MODELS {
        if let Ok(dir) = sdgen::hub::find_cached(hub, m.repo, "main") {
            names.push((m.name.to_string(), dir.display().to_string()));
        }
    }
    let list: Vec<Value> = names
        .into_iter()
        .map(|(name, filename)| {
            json!({ "title": name, "model_name": name, "hash": null, "sha256": null, "filename": filename, "config": null })
        })
        .collect();
    Json(Value::Array(list))
}

/// `GET /sdapi/v1/samplers`: A1111's names for our schedulers, with our names as aliases.
async fn samplers() -> Json<Value> {
    let mut list: Vec<Value> = Vec::new();
    for kind in sdgen::schedulers::SchedulerKind::ALL {
        let name = kind.a1111_name();
        if list.iter().any(|v| v["name"] == name) {
            continue;
        }
        let aliases: Vec<&str> = std::iter::once(kind.name()).chain(kind.aliases().iter().copied()).collect();
        list.push(json!({ "name": name, "aliases": aliases, "options": {} }));
    }
    Json(Value::Array(list))
}

/// `GET /sdapi/v1/progress`: A1111's `ProgressResponse`, which has one current job. With several
/// workers (a broker) several jobs run at once: the current one is the longest-running — the one
/// A1111's single queue would be on, and the one `interrupt` stops — and `state.job_count`
/// counts every job running or queued. Each running job, with its worker and its own progress,
/// is listed in `running` (longest-running first), a field A1111 clients ignore.
async fn progress(State(state): State<Arc<AppState>>) -> Json<Value> {
    let depth = state.queue.depth();
    let running = state.queue.running();
    let Some(current) = running.first() else {
        return Json(json!({
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {
                "skipped": false, "interrupted": false, "job": "", "job_count": depth,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
            },
            "current_image": null,
            "textinfo": null,
            "running": [],
        }));
    };
    let job = &current.job;
    let now = job_progress(current);
    Json(json!({
        "progress": now["progress"],
        "eta_relative": now["eta_relative"],
        "state": {
            "skipped": false,
            "interrupted": job.cancel.is_cancelled(),
            "job": job.id,
            "job_count": depth + running.len(),
            "job_timestamp": job_timestamp(job),
            "job_no": now["job_no"],
            "sampling_step": now["sampling_step"],
            "sampling_steps": now["sampling_steps"],
        },
        "current_image": null,
        "textinfo": now["textinfo"],
        "running": running.iter().map(job_progress).collect::<Vec<_>>(),
    }))
}

/// Where a running job is, in A1111's words: its progress in [0, 1], the seconds left at its
/// pace so far, the image it is on, its step of the batch's steps, its stage.
fn job_progress(running: &Running) -> Value {
    let s = running.job.status();
    let p = &s.progress;
    let elapsed = s.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let eta = if p.fraction > 0.0 { elapsed / p.fraction - elapsed } else { 0.0 };
    json!({
        "job": running.job.id, "worker": running.worker, "progress": p.fraction, "eta_relative": eta,
        "job_no": p.images_done, "sampling_step": p.step, "sampling_steps": p.steps, "textinfo": p.stage,
    })
}

/// `POST /sdapi/v1/interrupt`: stops the current job — the one `progress` reports, the
/// longest-running — at its next step (its finished images stand).
async fn interrupt(State(state): State<Arc<AppState>>) -> Json<Value> {
    if let Some(current) = state.queue.running().first() {
        state.queue.cancel(&current.job);
    }
    Json(json!({}))
}

/// `GET /sdapi/v1/options`: the options this server has (the model).
async fn get_options(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "sd_model_checkpoint": state.default_model(), "samples_format": "png" }))
}

/// `POST /sdapi/v1/options`: `sd_model_checkpoint` switches the default model (checked first:
/// an unknown one is refused), and, as A1111 unloads the checkpoint it leaves, drops the warm
/// weights; other options are ignored.
async fn set_options(
    State(state): State<Arc<AppState>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let raw = body(&state, raw)?;
    let (options, _) = request::parse_body::<Map<String, Value>>(&raw)?;
    if let Some(v) = options.get("sd_model_checkpoint") {
        let name = v
            .as_str()
            .ok_or_else(|| ApiError::invalid("sd_model_checkpoint", "sd_model_checkpoint must be a string"))?;
        let source = state.models.resolve(name, "sd_model_checkpoint")?;
        let preflight = state.preflight.clone();
        let opened = tokio::task::spawn_blocking(move || preflight.open(&source).map(|_| ()))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
        opened.map_err(|e| {
            let why = e.describe(&Api::A1111.field_names());
            ApiError::invalid("sd_model_checkpoint", format!("sd_model_checkpoint `{name}` cannot be opened: {why}"))
        })?;
        let name = name.trim().to_string();
        let previous =
            std::mem::replace(&mut *state.default_model.write().unwrap_or_else(|e| e.into_inner()), name.clone());
        if let Some(warm) = state.warm.clone().filter(|_| previous != name) {
            let reason = format!("the default model switched from {previous} to {name}");
            let dropped = tokio::task::spawn_blocking(move || warm.clear(&reason))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
            if let Some(eviction) = dropped {
                eprintln!("sdgen-server: {eviction}");
            }
        }
    }
    Ok(Json(Value::Null))
}

/// `GET /sdapi/v1/memory`: A1111's `MemoryResponse` (`ram`, `cuda`).
async fn memory() -> Json<Value> {
    let info = sdgen_memory::memory_info();
    let ram = json!({
        "free": info.system_available_bytes,
        "used": info.system_used_bytes,
        "total": info.system_total_bytes,
    });
    let cuda = match info.gpu {
        Some(g) => json!({ "system": { "free": g.free_bytes, "used": g.used_bytes, "total": g.total_bytes } }),
        None => json!({ "error": "no GPU" }),
    };
    Json(json!({ "ram": ram, "cuda": cuda }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdgen::schedulers::SchedulerKind;

    #[test]
    fn samplers_and_schedule_types() {
        assert_eq!(sampler(None, Some("Automatic")).unwrap(), None);
        assert_eq!(sampler(Some("Euler a"), None).unwrap(), Some(SchedulerKind::EulerAncestral));
        assert_eq!(sampler(Some("DPM++ 2M"), Some("Karras")).unwrap(), Some(SchedulerKind::DpmPp2mKarras));
        assert_eq!(sampler(Some("DPM++ 2M Karras"), Some("automatic")).unwrap(), Some(SchedulerKind::DpmPp2mKarras));
        assert_eq!(sampler(Some("Euler"), Some("Karras")).unwrap_err().field.as_deref(), Some("scheduler"));
        assert_eq!(sampler(Some("LMS"), None).unwrap_err().field.as_deref(), Some("sampler_name"));
    }

    #[test]
    fn job_timestamps_are_utc_civil_time() {
        let mut job = Job::new(JobSpec {
            request: sdgen::engine::GenerateRequest::new(sdgen::loading::ModelSource::parse("sd15"), "a cat"),
            api: Api::A1111,
            timeout_ms: None,
        });
        // 2024-02-29 23:59:58 UTC.
        Arc::get_mut(&mut job).unwrap().created = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_709_251_198);
        assert_eq!(job_timestamp(&job), "20240229235958");
    }
}
