//! The HTTP front: routes, the correlation id, authentication, body limits and the two error
//! envelopes (OpenAI's under `/v1`, the native one elsewhere).
//!
//! - [`openai`]: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.
//! - [`native`]: `/v2/tasks…`, `/v2/sessions/…`, `/v2/pools…`, `/v2/meta/capabilities`.
//! - [`nodes`]: node registration and heartbeats, `/v2/nodes`.
//! - [`sse`]: the streaming response body.

pub mod native;
pub mod nodes;
pub mod openai;
pub mod sse;

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
use crate::refusal::Refusal;
use crate::state::{new_id, State};

pub type AppState = Arc<State>;

/// An HTTP refusal: the status and the typed body (the front's own refusals, and the core's
/// [`Refusal`]s once mapped).
pub type HttpRefusal = (StatusCode, ErrorBody);

/// The HTTP status of a refusal of the core.
pub fn status_of(refusal: &Refusal) -> StatusCode {
    match refusal {
        Refusal::InvalidTaskId
        | Refusal::Unplaceable { .. }
        | Refusal::CtxTooLarge { .. }
        | Refusal::InvalidReport(_)
        | Refusal::PlaintextAddress { .. } => StatusCode::BAD_REQUEST,
        Refusal::UnknownModel { .. }
        | Refusal::UnknownPool { .. }
        | Refusal::UnknownNode { .. }
        | Refusal::UnknownTask { .. }
        | Refusal::NotRegistered { .. } => StatusCode::NOT_FOUND,
        Refusal::TaskExists { .. }
        | Refusal::AmbiguousPool { .. }
        | Refusal::AmbiguousTask { .. } => StatusCode::CONFLICT,
        Refusal::DeadlineUnmet { .. }
        | Refusal::QueueFull { .. }
        | Refusal::ClientStreams { .. }
        | Refusal::TaskStreams { .. } => StatusCode::TOO_MANY_REQUESTS,
        Refusal::NoNodes | Refusal::ModelOffline { .. } | Refusal::NodesFull => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Refusal::NodeFailed { .. } => StatusCode::BAD_GATEWAY,
        Refusal::NodeSilent { .. } => StatusCode::GATEWAY_TIMEOUT,
    }
}

impl From<Refusal> for HttpRefusal {
    fn from(refusal: Refusal) -> Self {
        (status_of(&refusal), refusal.body())
    }
}

/// The correlation id of a request, echoed from `X-Correlation-Id` or generated.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

/// An error answer in the envelope of the API it belongs to.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    pub openai: bool,
}

impl ApiError {
    pub fn native(refusal: impl Into<HttpRefusal>) -> Self {
        let (status, body) = refusal.into();
        Self {
            status,
            body,
            openai: false,
        }
    }

    pub fn openai(refusal: impl Into<HttpRefusal>) -> Self {
        let (status, body) = refusal.into();
        Self {
            status,
            body,
            openai: true,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.body.retry_after_ms;
        let json = if self.openai {
            openai::error_envelope(self.status, &self.body)
        } else {
            serde_json::to_vec(&self.body).expect("bodies serialize")
        };
        let mut resp = (
            self.status,
            [("content-type", "application/json")],
            Bytes::from(json),
        )
            .into_response();
        if let Some(ms) = retry {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(ms.div_ceil(1000).max(1)));
        }
        resp
    }
}

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

/// The HTTP status for a final error event seen before a response started.
pub fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidParams => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::ModelNotFound => StatusCode::NOT_FOUND,
        ErrorCode::AdmissionReject
        | ErrorCode::QueueFullDropLru
        | ErrorCode::DeadlineUnmet
        | ErrorCode::RateLimited
        | ErrorCode::SlowReader => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::PoolUnready | ErrorCode::PoolUnavailable | ErrorCode::NodeUnavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::EngineFailed => StatusCode::BAD_GATEWAY,
        ErrorCode::Canceled => StatusCode::from_u16(499).expect("valid status"),
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The client a request comes from (the API key's name), or an `UNAUTHORIZED` refusal.
pub fn authenticate(state: &State, headers: &HeaderMap) -> Result<String, HttpRefusal> {
    identify(state, headers).map(|(name, _)| name)
}

/// Like [`authenticate`], for the operator endpoints (drain, resume, the node list): the key
/// must carry the `admin` mark, or the answer is 403 `FORBIDDEN`. Without API keys (loopback
/// only) every caller is the operator.
pub fn authorize_admin(state: &State, headers: &HeaderMap) -> Result<String, HttpRefusal> {
    let (name, admin) = identify(state, headers)?;
    if admin {
        return Ok(name);
    }
    tracing::info!(client = %name, "Refused an operator request from a key without the admin mark.");
    Err((
        StatusCode::FORBIDDEN,
        ErrorBody::new(
            ErrorCode::Forbidden,
            format!("the API key {name:?} may not do this; operator endpoints need a key marked `admin` in the API key file"),
        ),
    ))
}

/// The key's name and whether it is an admin key.
fn identify(state: &State, headers: &HeaderMap) -> Result<(String, bool), HttpRefusal> {
    let keys = state.keys();
    let Some(keys) = &keys.api else {
        return Ok(("anonymous".into(), true));
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
    let path = req.uri().path().to_string();
    let body = ErrorBody::invalid(
        "path",
        format!("no such endpoint {} {path}; see docs/API.md", req.method()),
    );
    ApiError {
        status: StatusCode::NOT_FOUND,
        body,
        openai: path.starts_with("/v1/"),
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
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
        .route("/v2/meta/capabilities", get(native::capabilities))
        .route("/v2/catalog/availability", get(native::availability))
        .route("/v2/nodes", get(nodes::list))
        .route("/v2/nodes/register", post(nodes::register))
        .route("/v2/nodes/{id}/heartbeat", post(nodes::heartbeat))
        .route("/v2/nodes/{id}/drain", post(nodes::drain))
        .route("/v2/nodes/{id}/resume", post(nodes::resume))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(correlation))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::admission::Policy;

    /// Each refusal of the core answers with the status and body the HTTP API gave before
    /// refusals were typed (the expected pairs are the old code's, verbatim).
    #[test]
    fn refusals_answer_with_their_status_and_body() {
        let invalid = |f: &str, m: &str| ErrorBody::invalid(f, m);
        let cases: Vec<(Refusal, HttpRefusal)> = vec![
            (
                Refusal::InvalidTaskId,
                (
                    StatusCode::BAD_REQUEST,
                    invalid(
                        "task_id",
                        "task_id must be 1 to 128 characters of letters, digits, - _ . :",
                    ),
                ),
            ),
            (
                Refusal::TaskExists {
                    task_id: "t".into(),
                },
                (
                    StatusCode::CONFLICT,
                    invalid(
                        "task_id",
                        "task \"t\" already exists; choose another task_id or leave it out",
                    ),
                ),
            ),
            (
                Refusal::NoNodes,
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorBody::new(
                        ErrorCode::NodeUnavailable,
                        "no node has registered with the control plane yet; retry in a moment",
                    )
                    .with_retry_after_ms(1000),
                ),
            ),
            (
                Refusal::UnknownModel {
                    model: "x".into(),
                    known: vec!["a".into(), "b".into()],
                },
                (
                    StatusCode::NOT_FOUND,
                    ErrorBody {
                        field: Some("model".into()),
                        ..ErrorBody::new(
                            ErrorCode::ModelNotFound,
                            "model \"x\" is not served here; known models: a, b (see GET /v1/models)",
                        )
                    },
                ),
            ),
            (
                Refusal::UnknownModel {
                    model: "x".into(),
                    known: vec![],
                },
                (
                    StatusCode::NOT_FOUND,
                    ErrorBody {
                        field: Some("model".into()),
                        ..ErrorBody::new(
                            ErrorCode::ModelNotFound,
                            "model \"x\" is not served here; known models: none yet (see GET /v1/models)",
                        )
                    },
                ),
            ),
            (
                Refusal::ModelOffline { model: "m".into() },
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorBody::new(
                        ErrorCode::NodeUnavailable,
                        "every node serving model \"m\" is offline; retry when one reports again (see GET /v2/nodes)",
                    )
                    .with_retry_after_ms(5000),
                ),
            ),
            (
                Refusal::Unplaceable {
                    reason: "why".into(),
                },
                (
                    StatusCode::BAD_REQUEST,
                    invalid("placement", "cannot place this task: why"),
                ),
            ),
            (
                Refusal::CtxTooLarge {
                    ctx: 9000,
                    max_ctx: 4096,
                    model: "m".into(),
                },
                (
                    StatusCode::BAD_REQUEST,
                    invalid(
                        "ctx",
                        "ctx is 9000; pools of model \"m\" hold at most 4096 tokens per slot",
                    ),
                ),
            ),
            (
                Refusal::DeadlineUnmet {
                    deadline_ms: 10,
                    predicted: Duration::from_millis(1500),
                    ahead: 3,
                    retry_after_ms: 700,
                },
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorBody::new(
                        ErrorCode::DeadlineUnmet,
                        "deadline_ms is 10 but the task is predicted to start in 1500 ms (3 tasks ahead); raise deadline_ms or retry later",
                    )
                    .with_retry_after_ms(700),
                ),
            ),
            (
                Refusal::QueueFull {
                    capacity: 8,
                    policy: Policy::Reject,
                    retry_after_ms: 250,
                },
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorBody {
                        policy_label: Some(Policy::Reject.as_str().into()),
                        ..ErrorBody::new(
                            ErrorCode::AdmissionReject,
                            "the queue is full (8 tasks waiting); retry after the Retry-After interval",
                        )
                        .with_retry_after_ms(250)
                    },
                ),
            ),
            (
                Refusal::ClientStreams { open: 256 },
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorBody::new(
                        ErrorCode::RateLimited,
                        "this API key has 256 event streams open, the most allowed; close one first",
                    )
                    .with_retry_after_ms(1000),
                ),
            ),
            (
                Refusal::TaskStreams {
                    task_id: "t".into(),
                    open: 8,
                },
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorBody::new(
                        ErrorCode::RateLimited,
                        "task t has 8 event streams open, the most allowed; close one first",
                    )
                    .with_retry_after_ms(1000),
                ),
            ),
            (
                Refusal::UnknownPool {
                    pool: "p".into(),
                    on_node: Some("n".into()),
                },
                (
                    StatusCode::NOT_FOUND,
                    invalid(
                        "pool_id",
                        "pool \"p\" is not known on node \"n\"; see GET /v2/pools",
                    ),
                ),
            ),
            (
                Refusal::UnknownPool {
                    pool: "p".into(),
                    on_node: None,
                },
                (
                    StatusCode::NOT_FOUND,
                    invalid("pool_id", "pool \"p\" is not known; see GET /v2/pools"),
                ),
            ),
            (
                Refusal::AmbiguousPool {
                    pool: "p".into(),
                    nodes: vec!["a".into(), "b".into()],
                },
                (
                    StatusCode::CONFLICT,
                    invalid(
                        "node",
                        "pool \"p\" is on nodes a, b; say which with ?node=NODE (D-Bus: the node argument)",
                    ),
                ),
            ),
            (
                Refusal::NodeSilent {
                    node: "n".into(),
                    action: "drain".into(),
                    pool: "p".into(),
                    within: Duration::from_secs(5),
                },
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    ErrorBody::new(
                        ErrorCode::NodeUnavailable,
                        "node n did not answer within 5 s to drain pool p; try again",
                    ),
                ),
            ),
            (
                Refusal::NodeFailed {
                    node: "n".into(),
                    action: "resume".into(),
                    pool: "p".into(),
                    error: "boom".into(),
                },
                (
                    StatusCode::BAD_GATEWAY,
                    ErrorBody::new(
                        ErrorCode::NodeUnavailable,
                        "node n did not resume pool p: boom",
                    ),
                ),
            ),
            (
                Refusal::UnknownNode { node: "n".into() },
                (
                    StatusCode::NOT_FOUND,
                    invalid("node_id", "node \"n\" is not known; see GET /v2/nodes"),
                ),
            ),
            (
                Refusal::UnknownTask {
                    task_id: "t".into(),
                },
                (
                    StatusCode::NOT_FOUND,
                    invalid(
                        "task_id",
                        "task \"t\" is not known (finished tasks are kept for 5 minutes)",
                    ),
                ),
            ),
            (
                Refusal::AmbiguousTask {
                    task_id: "t".into(),
                    clients: vec!["k1".into(), "k2".into()],
                },
                (
                    StatusCode::CONFLICT,
                    invalid(
                        "task_id",
                        "task id \"t\" was chosen by several API keys (k1, k2); cancel it with that key's own POST /v2/tasks/{id}/cancel",
                    ),
                ),
            ),
            (
                Refusal::InvalidReport(invalid("pools[0].slots_total", "too many")),
                (
                    StatusCode::BAD_REQUEST,
                    invalid("pools[0].slots_total", "too many"),
                ),
            ),
            (
                Refusal::PlaintextAddress {
                    address: "http://10.0.0.2:9200".into(),
                },
                (
                    StatusCode::BAD_REQUEST,
                    invalid(
                        "address",
                        "http://10.0.0.2:9200 is plain HTTP off this host: prompts and the node token would cross the network in the clear; give the node API TLS (node.tls_cert, node.tls_key, an https:// address) or start orchestratord with --allow-plaintext",
                    ),
                ),
            ),
            (
                Refusal::NodesFull,
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorBody::new(
                        ErrorCode::NodeUnavailable,
                        "the control plane already keeps 1024 nodes; offline nodes are forgotten after 3600 s, or remove nodes from service",
                    )
                    .with_retry_after_ms(60_000),
                ),
            ),
            (
                Refusal::NotRegistered { node: "n".into() },
                (
                    StatusCode::NOT_FOUND,
                    ErrorBody::new(
                        ErrorCode::NodeUnavailable,
                        "node \"n\" is not registered; register again",
                    ),
                ),
            ),
        ];
        for (refusal, expected) in cases {
            let name = format!("{refusal:?}");
            let answer: HttpRefusal = refusal.into();
            assert_eq!(answer, expected, "{name}");
        }
    }
}
