//! The web page at `/`: one HTML file with its script and style inline, compiled into the
//! binary (no Node build, nothing read from disk at run time). It is a client of the public API
//! only — `/sdapi/v1/sd-models` for the models, `POST /v1/jobs`, the job's event stream for the
//! progress bar, its images, `/v1/memory` — so it can do nothing a `curl` user cannot.
//!
//! The page itself is served without the API key (it holds no data, and the key is typed into
//! it); every call it makes carries the key as `Authorization: Bearer`. The event stream is read
//! with `fetch` and a stream reader rather than `EventSource`, which cannot send headers — so the
//! key never goes into a URL (where logs and proxies would keep it).

use axum::http::header;
use axum::response::IntoResponse;

/// The page (`src/web/index.html`).
const INDEX_HTML: &str = include_str!("web/index.html");

/// `GET /`: the page.
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Its script calls only this origin (and reads back the images it made, `blob:`);
            // nothing else may load into it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self' blob:; img-src 'self' blob:; base-uri 'none'; form-action 'none'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX_HTML,
    )
}
