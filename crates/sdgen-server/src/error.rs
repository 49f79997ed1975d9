//! The one error type of the HTTP side: a status, the request field it is about (as the API that
//! was called spells it) and a message. Every refusal goes through it, so every 4xx has the same
//! JSON shape: `{"error": kind, "field": …, "message": …, "detail": …}` (`detail` repeats the
//! message for A1111 clients, which print FastAPI's `detail`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An HTTP error response.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    /// The HTTP status.
    #[serde(skip)]
    pub status: StatusCode,
    /// A short machine-readable kind (`invalid_request`, `queue_full`, `does_not_fit`…).
    pub error: &'static str,
    /// The request field the error is about, named as the API called spells it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong, and where there is one, what to do.
    pub message: String,
    /// An engine error's message with each field it names written `{field}` by the engine's
    /// name (`{strength} 0.1 with 4 steps…: raise {strength} or {steps}`), for a client to word
    /// with its own names (`generate --remote`: its flags; `sdgen::error::fill`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Seconds after which a retry may succeed (a full queue).
    #[serde(skip)]
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    /// An error of `status` and `kind`.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, error: kind, field: None, message: message.into(), template: None, retry_after_s: None }
    }

    /// 422: `field`'s value is wrong; `message` names it.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message) }
    }

    /// 400: the body is not JSON at all.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404: no such thing.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503 with `Retry-After`: the queue is full or the server is stopping.
    pub fn unavailable(kind: &'static str, message: impl Into<String>, retry_after_s: u64) -> Self {
        Self { retry_after_s: Some(retry_after_s), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, kind, message) }
    }

    /// The engine's error for a request whose fields `name` maps from the engine's names to the
    /// API's: 507 for the memory planner's refusal (its numbers, the fields its advice changes),
    /// 422 for the user's input (naming the field), 500 for a failure while generating.
    pub fn from_engine(err: &sdgen::Error, name: &dyn Fn(&'static str) -> Option<&'static str>) -> Self {
        let message = err.describe(name);
        let field = err.field().map(|f| name(f).unwrap_or(f).to_string());
        // Only where the message names a field: otherwise it is the template.
        let template = Some(err.template()).filter(|t| *t != err.to_string());
        if matches!(err, sdgen::Error::Cancelled) {
            return Self::new(StatusCode::CONFLICT, "cancelled", "the job was cancelled");
        }
        if err.is_does_not_fit() {
            Self { field, template, ..Self::new(StatusCode::INSUFFICIENT_STORAGE, "does_not_fit", message) }
        } else if err.is_user_error() {
            Self { field, template, ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message) }
        } else {
            Self { field, template, ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, "generation_failed", message) }
        }
    }

    /// 504: the job ran past the server's time limit (`--job-timeout`) and was stopped, with
    /// `images_done` of its `images` made (they stay).
    pub fn timed_out(limit_ms: u64, images_done: usize, images: usize) -> Self {
        let limit = format!("{} s", limit_ms as f64 / 1000.0);
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timed_out",
            format!(
                "the job ran past this server's time limit of {limit} (--job-timeout) and was stopped after \
                 {images_done} of its {images} images: ask for fewer images or steps, or ask the server's operator \
                 for a longer limit"
            ),
        )
    }

    /// The error a `failed` event reports (from a worker, maybe in another process): its kind
    /// follows from the status, as [`ApiError::from_engine`] and [`ApiError::timed_out`] chose it.
    pub fn from_failed(status: u16, field: Option<String>, message: String, template: Option<String>) -> Self {
        const KINDS: [(StatusCode, &str); 4] = [
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            (StatusCode::INSUFFICIENT_STORAGE, "does_not_fit"),
            (StatusCode::GATEWAY_TIMEOUT, "timed_out"),
            (StatusCode::CONFLICT, "cancelled"),
        ];
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = KINDS.iter().find(|(s, _)| *s == status).map_or("generation_failed", |(_, k)| *k);
        Self { field, template, ..Self::new(status, kind, message) }
    }

    /// The JSON body, `detail` included.
    pub fn body(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("plain data serializes");
        v["detail"] = self.message.clone().into();
        v
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
