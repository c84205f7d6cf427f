//! The HTTP front: routes, the correlation id, authentication, body limits and the error
//! envelopes (OpenAI's under `/v1`, Anthropic's under `/v1/messages`, Ollama's under `/api`, the
//! native one elsewhere).
//!
//! - [`openai`]: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`.
//! - [`responses`]: `/v1/responses`, `/v1/responses/{id}`.
//! - [`anthropic`]: `/v1/messages`, `/v1/messages/count_tokens`.
//! - [`ollama`]: `/api/chat`, `/api/generate`, `/api/tags`, `/api/ps`, `/api/show`, `/api/version`.
//! - `interactive.rs`: admitting a client surface's request, and cancelling it on disconnect.
//! - [`native`]: `/v2/tasks…`, `/v2/sessions/…`, `/v2/pools…`, `/v2/meta/capabilities`.
//! - [`nodes`]: node registration and heartbeats, `/v2/nodes`.
//! - `watch.rs`: `/v2/events`, the fleet as a live event stream (the web console follows it).
//! - [`sse`]: the streaming response body.
//! - `error.rs`: refusals of the core as HTTP statuses, and the error envelopes.

pub mod anthropic;
mod boundary;
mod error;
mod fields;
mod interactive;
pub mod native;
pub mod nodes;
pub mod ollama;
pub mod openai;
pub mod responses;
pub mod sse;
mod watch;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State as Ext};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use llorch_wire::{ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;

use crate::auth::presented_key;
use crate::metrics::UNKNOWN_MODEL;
use crate::outcome::{Api, Outcome};
use crate::state::{new_id, State};
pub use boundary::Boundary;
pub use error::{status_for, ApiError, Envelope, HttpRefusal};

pub type AppState = Arc<State>;

/// The correlation id of a request, echoed from `X-Correlation-Id` or generated.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

/// Counts a generation request that was refused before admission (`llorch_requests_total`);
/// an admitted one is counted when its task ends.
pub struct Meter {
    pub api: Api,
    model: std::sync::OnceLock<String>,
    admitted: std::sync::atomic::AtomicBool,
}

impl Meter {
    pub fn new(api: Api) -> Self {
        Self {
            api,
            model: Default::default(),
            admitted: Default::default(),
        }
    }

    /// The model the request names, once its body was read.
    pub fn model(&self, model: &str) {
        let _ = self.model.set(model.to_string());
    }

    /// The task was admitted: its end will be counted.
    pub fn admitted(&self) {
        self.admitted
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs one request of a surface with a meter of its `api`: the response, after counting
    /// a refusal (an admitted request is counted when its task ends).
    pub async fn run(
        api: Api,
        state: &State,
        request: impl AsyncFnOnce(&Meter) -> Result<Response, ApiError>,
    ) -> Response {
        let meter = Meter::new(api);
        let result = request(&meter).await;
        meter.count(state, result)
    }

    /// The response, after counting a refusal.
    pub fn count(&self, state: &State, result: Result<Response, ApiError>) -> Response {
        if let Err(e) = &result {
            if !self.admitted.load(std::sync::atomic::Ordering::Relaxed) {
                let model = self.model.get().map_or(UNKNOWN_MODEL, String::as_str);
                state
                    .metrics
                    .request(self.api, model, Outcome::of_refusal(e.status));
            }
        }
        result.into_response()
    }
}

/// The client a request comes from (the API key's name), or an `UNAUTHORIZED` refusal.
pub fn authenticate(state: &State, headers: &HeaderMap) -> Result<String, HttpRefusal> {
    identify(state, headers).map(|(name, _)| name)
}

/// Like [`authenticate`], for the operator endpoints (drain, resume, the node list): the
/// caller must present a key marked `admin` or the operator's token (`--admin-token-file`),
/// or the answer is 403 `FORBIDDEN`. Without API keys, other callers are anonymous clients,
/// not operators: a web page can reach a loopback listener too.
pub fn authorize_admin(state: &State, headers: &HeaderMap) -> Result<String, HttpRefusal> {
    let (name, admin) = identify(state, headers)?;
    if admin {
        return Ok(name);
    }
    tracing::info!(client = %name, "Refused an operator request from a caller without the admin credential.");
    let message = if state.keys().api.is_some() {
        format!("the API key {name:?} may not do this; operator endpoints need a key marked `admin` in the API key file (or the token of --admin-token-file)")
    } else {
        "operator endpoints need the admin credential: `llorch` sends the token `llorch up` wrote for it; otherwise give orchestratord --admin-token-file and send that token as `Authorization: Bearer`, or act over D-Bus (`llorch pools drain`, docs/DBUS.md)".to_string()
    };
    Err((
        StatusCode::FORBIDDEN,
        ErrorBody::new(ErrorCode::Forbidden, message),
    ))
}

/// The caller's name and whether it holds an admin credential.
fn identify(state: &State, headers: &HeaderMap) -> Result<(String, bool), HttpRefusal> {
    let keys = state.keys();
    let presented = presented_key(headers);
    if let (Some(admin), Some(p)) = (&keys.admin, presented) {
        if let Some(holder) = admin.check(p) {
            return Ok((holder.name.to_string(), true));
        }
    }
    let Some(keys) = &keys.api else {
        // No keys (loopback only): every client shares one namespace of unguessable task ids.
        return Ok(("anonymous".into(), false));
    };
    let unauthorized = |m: &str| {
        (
            StatusCode::UNAUTHORIZED,
            ErrorBody::new(ErrorCode::Unauthorized, m),
        )
    };
    let Some(presented) = presented_key(headers) else {
        return Err(unauthorized(
            "no API key: send `Authorization: Bearer <key>` (or `X-API-Key: <key>`)",
        ));
    };
    match keys.check(presented) {
        Some(holder) => Ok((holder.name.to_string(), holder.admin)),
        None => {
            tracing::info!(
                fingerprint = %crate::auth::fingerprint(presented),
                "Refused an unknown API key."
            );
            Err(unauthorized(
                "the API key is not valid; check the key you were given",
            ))
        }
    }
}

/// Reads a request body up to the configured limit (413 beyond it).
pub async fn read_body(state: &State, body: Body) -> Result<Bytes, HttpRefusal> {
    read_body_within(body, state.config.max_body_bytes).await
}

/// Reads the whole body, up to `limit` bytes (413 beyond).
pub async fn read_body_within(body: Body, limit: usize) -> Result<Bytes, HttpRefusal> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorBody::invalid(
                        "body",
                        format!("the request body is larger than {limit} bytes"),
                    ),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    ErrorBody::invalid("body", format!("cannot read the request body: {e}")),
                )
            }
        })
}

/// Decodes a JSON body, naming the field at fault.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HttpRefusal> {
    llorch_wire::json::parse(bytes).map_err(|e| (StatusCode::BAD_REQUEST, e))
}

/// What a client surface's handler reads first: the caller (or 401), then its body as JSON
/// (413 beyond the limit, 400 for what is not JSON).
pub async fn client_json(
    state: &State,
    headers: &HeaderMap,
    body: Body,
) -> Result<(String, serde_json::Value), HttpRefusal> {
    let client = authenticate(state, headers)?;
    let bytes = read_body(state, body).await?;
    Ok((client, parse(&bytes)?))
}

async fn correlation(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| new_id("req"));
    req.extensions_mut().insert(CorrelationId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-correlation-id", v);
    }
    resp
}

async fn live() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "live"}))
}

async fn ready(Ext(state): Ext<AppState>) -> Response {
    // An on-demand pool on standby serves too: its first request loads the model.
    let (serving, ready, standby) = state.serving();
    let body = serde_json::json!({
        "status": if serving {"ready"} else {"unready"},
        "ready_pools": ready,
        "standby_pools": standby,
    });
    let status = if serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(Ext(state): Ext<AppState>) -> impl IntoResponse {
    state.read_gauges();
    let text = state.metrics.encode();
    ([("content-type", llorch_metrics::CONTENT_TYPE)], text)
}

async fn not_found(req: Request) -> ApiError {
    not_found_at(req.method().as_str(), req.uri().path())
}

/// `GET /`: a browser (it asks for HTML) goes to the web console; anything else gets the 404
/// it got before the console existed.
async fn root(headers: HeaderMap) -> Response {
    let wants_html = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        return crate::console::redirect("/ui/");
    }
    not_found_at("GET", "/").into_response()
}

/// The 404 of a path no route serves.
fn not_found_at(method: &str, path: &str) -> ApiError {
    let body = ErrorBody::invalid(
        "path",
        format!("no such endpoint {method} {path}; see docs/API.md"),
    );
    ApiError {
        status: StatusCode::NOT_FOUND,
        body,
        envelope: Envelope::of_path(path),
    }
}

/// The routes, behind the browser checks of `boundary`.
pub fn router(state: AppState, boundary: Boundary) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/api/version", get(ollama::version))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings))
        .route("/v2/tasks", post(native::submit))
        .route("/v2/tasks/{id}", get(native::task_info))
        .route("/v2/tasks/{id}/events", get(native::events))
        .route("/v2/tasks/{id}/cancel", post(native::cancel))
        .route(
            "/v2/sessions/{id}",
            get(native::session).delete(native::delete_session),
        )
        .route("/v2/pools", get(native::pools))
        .route("/v2/pools/{id}/drain", post(native::drain))
        .route("/v2/pools/{id}/resume", post(native::resume))
        .route("/v2/pools/{id}/{action}", post(native::model_action))
        .route("/v2/meta/capabilities", get(native::capabilities))
        .route("/v2/catalog/availability", get(native::availability))
        .route("/v2/events", get(watch::events))
        .route("/v2/nodes", get(nodes::list))
        .route("/v2/nodes/register", post(nodes::register))
        .route("/v2/nodes/{id}/heartbeat", post(nodes::heartbeat))
        .route("/v2/nodes/{id}/leave", post(nodes::leave))
        .route("/v2/nodes/{id}/drain", post(nodes::drain))
        .route("/v2/nodes/{id}/resume", post(nodes::resume))
        .merge(crate::console::router())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(boundary),
            boundary::guard,
        ))
        .layer(axum::middleware::from_fn(correlation))
        .with_state(state)
}
