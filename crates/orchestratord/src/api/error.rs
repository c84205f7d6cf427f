//! HTTP errors: the core's [`Refusal`]s as a status and a body ([`status_of`]), final error
//! events seen before a response started ([`status_for`]), and [`ApiError`], the answer in the
//! envelope of the API it belongs to (OpenAI's under `/v1`, the native one elsewhere), with
//! `Retry-After` when the body carries a retry hint.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use llorch_wire::{ErrorBody, ErrorCode};

use super::{anthropic, ollama, openai};
use crate::refusal::Refusal;

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
        | Refusal::TaskStreams { .. }
        | Refusal::WatchStreams { .. } => StatusCode::TOO_MANY_REQUESTS,
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

/// The error envelope of each surface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// The native [`ErrorBody`] (`/v2`, health, metrics).
    Native,
    /// `{"error": {message, type, param, code}}` (`/v1`).
    OpenAi,
    /// `{"type": "error", "error": {type, message}}` (`/v1/messages…`).
    Anthropic,
    /// `{"error": "message"}` (`/api/…`).
    Ollama,
}

impl Envelope {
    /// The envelope of the surface a path belongs to (for refusals made before a route runs).
    pub fn of_path(path: &str) -> Self {
        if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            Self::Anthropic
        } else if path.starts_with("/v1/") {
            Self::OpenAi
        } else if path.starts_with("/api/") {
            Self::Ollama
        } else {
            Self::Native
        }
    }
}

/// An error answer in the envelope of the API it belongs to.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    pub envelope: Envelope,
}

impl ApiError {
    pub fn native(refusal: impl Into<HttpRefusal>) -> Self {
        let (status, body) = refusal.into();
        Self {
            status,
            body,
            envelope: Envelope::Native,
        }
    }

    pub fn openai(refusal: impl Into<HttpRefusal>) -> Self {
        let (status, body) = refusal.into();
        Self {
            status,
            body,
            envelope: Envelope::OpenAi,
        }
    }

    pub fn ollama(refusal: impl Into<HttpRefusal>) -> Self {
        let (status, body) = refusal.into();
        Self {
            status,
            body,
            envelope: Envelope::Ollama,
        }
    }

    pub fn anthropic(refusal: impl Into<HttpRefusal>) -> Self {
        let (status, body) = refusal.into();
        Self {
            status,
            body,
            envelope: Envelope::Anthropic,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.body.retry_after_ms;
        let json = match self.envelope {
            Envelope::OpenAi => openai::error_envelope(self.status, &self.body),
            Envelope::Anthropic => anthropic::error_envelope(self.status, &self.body),
            Envelope::Ollama => ollama::error_envelope(self.status, &self.body),
            Envelope::Native => serde_json::to_vec(&self.body).expect("bodies serialize"),
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

/// The message of an envelope that has no field of its own for the parameter at fault
/// (Anthropic's, Ollama's): prefixed with the field, unless it already starts with it.
pub(crate) fn message_naming_field(body: &ErrorBody) -> String {
    match &body.field {
        Some(f) if !body.message.starts_with(f.as_str()) => format!("{f}: {}", body.message),
        _ => body.message.clone(),
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
        ErrorCode::PoolUnready
        | ErrorCode::PoolUnavailable
        | ErrorCode::NodeUnavailable
        | ErrorCode::InsufficientMemory => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::EngineFailed => StatusCode::BAD_GATEWAY,
        ErrorCode::Canceled => StatusCode::from_u16(499).expect("valid status"),
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
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
                        "pool \"p\" is on nodes a, b; say which with ?node=NODE (llorch pools drain|resume: --node NODE; D-Bus: the node argument)",
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
