//! The router: shared state, authentication, the body limit, and the server's own API
//! (`/v1/jobs`, `/v1/memory`, `/metrics`, `/healthz`). The A1111 routes are in `a1111.rs`.

use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::UNIX_EPOCH;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{self, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::jobs::{Api, Broker, Cancelled, Job, JobSpec, QueueRefusal};
use crate::metrics::{Metrics, WorkerReport};
use crate::preflight::Preflight;
use crate::request::{self, Limits, ModelPolicy, Settings};
use sdgen::engine::wire::JobBody;
use sdgen::engine::WarmWeights;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// Where jobs wait and run: the in-process queue or a Redis broker.
    pub queue: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    /// The in-process worker's warm weights (none kept with `--no-keep-warm`; `None` with a
    /// broker, whose workers hold them).
    pub warm: Option<WarmWeights>,
    pub preflight: Arc<Preflight>,
    pub limits: Limits,
    pub models: ModelPolicy,
    /// The model a request that names none runs (`--model`; A1111's options switch it).
    pub default_model: RwLock<String>,
    /// The bearer token every route but `/healthz` needs, when set.
    pub api_key: Option<String>,
    /// `--max-memory`, applied to every job.
    pub max_memory_bytes: Option<u64>,
    /// `--job-timeout`, applied to every job.
    pub job_timeout_ms: Option<u64>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// The device, as the metadata names it.
    pub device_label: String,
}

impl AppState {
    /// The default model's name.
    pub fn default_model(&self) -> String {
        self.default_model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The whole HTTP API.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/jobs", post(create_job))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/images/{index}", get(job_image))
        .route("/v1/memory", get(memory))
        .route("/metrics", get(metrics))
        .merge(crate::a1111::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        // Outside the authentication: a load balancer's probe carries no key, and the web page
        // holds no data (the key is typed into it; its every call carries the key).
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/", get(crate::web::page))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// `Authorization: Bearer <key>` when the server has a key; 401 otherwise.
async fn authenticate(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(key) = &state.api_key else { return next.run(request).await };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => next.run(request).await,
        Some(_) => {
            state.metrics.refused("unauthorized");
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the API key is wrong").into_response()
        }
        None => {
            state.metrics.refused("unauthorized");
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this server needs an API key: send `Authorization: Bearer <key>`",
            )
            .into_response()
        }
    }
}

/// Compares without stopping at the first difference (the time taken says nothing of the key).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The request body, or 413 past the limit.
pub fn body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is larger than this server's limit of {} bytes", state.max_body_bytes),
            )
        } else {
            ApiError::bad_request(format!("the body cannot be read: {e}"))
        }
    })
}

/// Checks a request, then queues it: 422/507 from the check, 503 when the queue is full.
pub async fn submit(state: &Arc<AppState>, mut spec: JobSpec, model_field: &str) -> Result<Arc<Job>, ApiError> {
    spec.request.memory.max_memory_bytes = state.max_memory_bytes;
    spec.timeout_ms = state.job_timeout_ms;
    let (preflight, check_spec, model_field_owned) = (state.preflight.clone(), spec.clone(), model_field.to_string());
    let limits = state.limits;
    let verdict = tokio::task::spawn_blocking(move || {
        preflight.check(&check_spec.request, &check_spec.api.field_names(), &model_field_owned, &limits)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("the check failed: {e}")))?;
    if let Err(e) = verdict {
        state.metrics.refused(if e.status == StatusCode::INSUFFICIENT_STORAGE { "does_not_fit" } else { "invalid" });
        return Err(e);
    }
    let job = Job::new(spec);
    match state.queue.push(job.clone()) {
        Ok(()) => Ok(job),
        Err(QueueRefusal::Full) => {
            state.metrics.refused("queue_full");
            Err(ApiError::unavailable(
                "queue_full",
                format!("the queue is full ({} jobs waiting): retry later", state.queue.capacity()),
                5,
            ))
        }
        Err(QueueRefusal::Closed) => Err(ApiError::unavailable("shutting_down", "the server is shutting down", 30)),
        Err(QueueRefusal::Unreachable(message)) => Err(ApiError::unavailable("broker_unreachable", message, 5)),
    }
}

/// `POST /v1/jobs` → 202 `{id, state, url, events}`.
async fn create_job(
    State(state): State<Arc<AppState>>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(&state, raw)?;
    let (b, _) = request::parse_body::<JobBody>(&raw)?;
    if b.strength.is_some() && b.init_image.is_none() {
        return Err(ApiError::invalid("strength", "strength needs init_image: it sets how much of it to change"));
    }
    let model = state.models.resolve(b.model.as_deref().unwrap_or(&state.default_model()), "model")?;
    let refiner = match b.refiner {
        Some(r) => Some(sdgen::engine::RefinerRequest {
            source: state.models.resolve(&r, "refiner")?,
            start: b.refiner_start,
            strength: b.refiner_strength,
        }),
        None if b.refiner_start.is_some() => {
            return Err(ApiError::invalid("refiner_start", "refiner_start needs refiner"))
        }
        None if b.refiner_strength.is_some() => {
            return Err(ApiError::invalid("refiner_strength", "refiner_strength needs refiner"))
        }
        None => None,
    };
    let prompts =
        match b.prompts {
            None => vec![b.prompt],
            Some(_) if !b.prompt.is_empty() => {
                return Err(ApiError::invalid("prompts", "prompts replaces prompt: give one or the other"))
            }
            Some(p) if p.iter().all(|p| p.trim().is_empty()) => return Err(ApiError::invalid(
                "prompts",
                "prompts has no prompt (its blank ones are skipped, as a prompt file's lines): say what to draw, or \
                 give \"prompt\": \"\" for an image of no prompt",
            )),
            // As `--prompt-file`: blank lines are no prompts.
            Some(p) => p.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect(),
        };
    let vae = b.vae.as_deref().map(|v| state.models.vae(v, "vae")).transpose()?;
    let loras = (b.loras.iter().enumerate())
        .map(|(i, l)| state.models.lora(&l.source, l.scale, &format!("loras[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let upscale = (b.upscale.into_iter())
        .map(|u| sdgen::engine::UpscaleRequest { factor: u.factor, hires_strength: u.hires_strength, tiled: u.tiled })
        .collect();
    let settings = Settings {
        prompts,
        negative_prompt: b.negative_prompt,
        model,
        images: b.n.unwrap_or(1),
        batch_size: b.batch_size.unwrap_or(1),
        seed: b.seed,
        steps: b.steps,
        guidance: b.guidance,
        width: b.width,
        height: b.height,
        scheduler: b.scheduler.as_deref().map(|s| request::scheduler(s, "scheduler")).transpose()?,
        init_image: b.init_image.as_deref().map(|d| request::init_image(d, "init_image")).transpose()?,
        strength: b.strength,
        family_options: sdgen::pipeline::FamilyOptions {
            max_sequence_length: b.max_sequence_length,
            no_t5: b.no_t5,
            skip_layer_guidance: b.skip_layer_guidance.as_ref().map(|s| s.to_guidance()),
        },
        refiner,
        vae,
        loras,
        upscale,
        quality: b.quality,
        weights: b.weights.as_deref().map(|w| request::weights(w, "weights")).transpose()?,
    };
    let request = settings.into_request(&state.limits, Api::Jobs)?;
    let job = submit(&state, JobSpec { request, api: Api::Jobs, timeout_ms: None }, "model").await?;
    let body = json!({
        "id": job.id,
        "state": "queued",
        "url": format!("/v1/jobs/{}", job.id),
        "events": format!("/v1/jobs/{}/events", job.id),
    });
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, format!("/v1/jobs/{}", job.id))], Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
struct JobQuery {
    /// `base64` puts each PNG in the answer.
    #[serde(default)]
    images: Option<String>,
}

/// A job by id or 404.
fn find_job(state: &AppState, id: &str) -> Result<Arc<Job>, ApiError> {
    state.queue.get(id).ok_or_else(|| ApiError::not_found(format!("no job `{id}` (finished jobs are kept a while)")))
}

/// `GET /v1/jobs/{id}`: state, progress, images (URLs, or base64 with `?images=base64`), error.
async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<JobQuery>,
) -> Result<Json<Value>, ApiError> {
    let job = find_job(&state, &id)?;
    Ok(Json(job_json(&job, q.images.as_deref() == Some("base64"))))
}

/// A job as `GET /v1/jobs/{id}` shows it.
pub fn job_json(job: &Job, inline: bool) -> Value {
    let s = job.status();
    let images: Vec<Value> = s
        .images
        .iter()
        .map(|i| {
            let mut v = json!({
                "index": i.index,
                "seed": i.seed,
                "url": format!("/v1/jobs/{}/images/{}", job.id, i.index),
                "parameters": i.parameters,
                "metadata": i.metadata,
            });
            if inline {
                v["png_base64"] = base64::engine::general_purpose::STANDARD.encode(&i.png).into();
            }
            v
        })
        .collect();
    let created_ms = job.created.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    json!({
        "id": job.id,
        "state": s.state,
        "model": job.spec.request.model.label(),
        "seed": job.spec.request.params.seed,
        "created_unix_ms": created_ms,
        "elapsed_ms": s.started.map(|t| s.finished.unwrap_or_else(std::time::Instant::now).duration_since(t).as_millis() as u64),
        "progress": s.progress,
        "images": images,
        "error": s.error.as_ref().map(|e| { let mut b = e.body(); b["status"] = e.status.as_u16().into(); b }),
    })
}

/// `DELETE /v1/jobs/{id}`: cancels a queued job now, a running one at its next step (202); 409
/// when it had already ended.
async fn cancel_job(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let job = find_job(&state, &id)?;
    match state.queue.cancel(&job) {
        Cancelled::AlreadyEnded => {
            let s = job.status().state;
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_ended",
                format!("job `{id}` has already ended ({})", s.name()),
            ));
        }
        // The worker counts the running job's end.
        Cancelled::FromQueue => state.metrics.job_ended("cancelled"),
        Cancelled::Running => {}
        Cancelled::Unreachable(message) => return Err(ApiError::unavailable("broker_unreachable", message, 5)),
    }
    Ok((StatusCode::ACCEPTED, Json(job_json(&job, false))).into_response())
}

/// `GET /v1/jobs/{id}/events`: the job's events as server-sent events, from its first (queued)
/// to its last (done, failed or cancelled), then the stream ends (also when the server stops
/// while a broker's job goes on).
async fn job_events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<sse::Event, Infallible>>>, ApiError> {
    let job = find_job(&state, &id)?;
    let rx = job.subscribe();
    let stream = futures_util::stream::unfold((job, rx, 0usize), |(job, mut rx, next)| async move {
        loop {
            let (event, ended) = {
                let s = job.status();
                (s.events.get(next).cloned(), s.is_settled())
            };
            if let Some(e) = event {
                let data = serde_json::to_string(&e).expect("plain data serializes");
                let sse = sse::Event::default().event(e.name()).data(data);
                return Some((Ok(sse), (job, rx, next + 1)));
            }
            if ended || rx.changed().await.is_err() {
                return None;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(sse::KeepAlive::default()))
}

/// `GET /v1/jobs/{id}/images/{index}`: the PNG.
async fn job_image(
    State(state): State<Arc<AppState>>,
    Path((id, index)): Path<(String, usize)>,
) -> Result<Response, ApiError> {
    let job = find_job(&state, &id)?;
    let png = job.status().images.iter().find(|i| i.index == index).map(|i| i.png.clone());
    let png = png.ok_or_else(|| ApiError::not_found(format!("job `{id}` has no image {index} (yet)")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

/// `GET /v1/memory`: the seed's memory fields (process, system, GPU when there is one) and the
/// weights kept warm, with their loads, reuses and evictions (`null` with a broker); with a
/// broker, `workers`: each live worker's memory, peaks and warm weights.
async fn memory(State(state): State<Arc<AppState>>) -> Json<Value> {
    let info = sdgen_memory::memory_info();
    let workers = state.queue.workers().map(|workers| {
        let worker = |w: &WorkerReport| {
            json!({
                "name": w.name,
                "device": w.device,
                "updated_unix_ms": w.updated_unix_ms,
                "running": w.figures.running,
                "memory": w.figures.memory,
                "max_memory_bytes": w.max_memory_bytes,
                "peak_rss_bytes": w.figures.counts.peak_rss_bytes,
                "peak_gpu_bytes": w.figures.counts.peak_gpu_bytes,
                "warm": w.figures.warm,
            })
        };
        workers.iter().map(worker).collect::<Vec<Value>>()
    });
    let mut body = json!({
        "device": state.device_label,
        "memory": info,
        "max_memory_bytes": state.max_memory_bytes,
        "warm": state.warm.as_ref().map(WarmWeights::report),
    });
    if let Some(workers) = workers {
        body["workers"] = workers.into();
    }
    Json(body)
}

/// `GET /metrics`: Prometheus text (with a broker, its live workers' beside this server's).
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let own = state.metrics.figures(!state.queue.running().is_empty(), state.warm.as_ref().map(WarmWeights::report));
    let workers = state.queue.workers();
    let text = state.metrics.render(state.queue.depth(), &own, workers.as_deref());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
