//! The node API (axum): pool status, drain and resume, and the forward of generation requests
//! to the pool's engine over its Unix socket.
//!
//! The forward never buffers the answer: the engine's body frames are passed on as they arrive
//! ([`ForwardBody`]). A body that fails mid-stream (engine killed) ends with one SSE `error`
//! event `ENGINE_FAILED`, so the caller sees a typed failure, never a silently truncated stream.
//! When the caller goes away, the engine stream is dropped and the engine cancels the job.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use llorch_client::{ClientError, UnixClient};
use llorch_wire::node::PoolStatus;
use llorch_wire::{ErrorBody, ErrorCode};

use crate::state::Node;

/// Largest request body forwarded to an engine (the engine's own limit).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// What a caller is told to wait when a pool is not ready.
pub const RETRY_AFTER_MS: u64 = 1000;

const CORRELATION: &str = "x-correlation-id";

/// The node API's routes. With a token, every route but `/health` requires
/// `Authorization: Bearer <token>`, compared in constant time by its sha256 digest.
pub fn router(node: Arc<Node>, token: Option<String>) -> Router {
    let protected = Router::new()
        .route("/v2/pools", get(pools))
        .route("/v2/pools/{id}", get(pool))
        .route("/v2/pools/{id}/drain", post(drain))
        .route("/v2/pools/{id}/resume", post(resume))
        .route("/v2/pools/{id}/{action}", post(operate))
        .route("/v2/pools/{id}/generate", post(generate));
    let protected = match token {
        Some(t) => {
            let t = Arc::new(token_digest(&t));
            protected.layer(axum::middleware::from_fn(move |req, next| {
                require_token(t.clone(), req, next)
            }))
        }
        None => protected,
    };
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(protected)
        .with_state(node)
}

/// The metrics-only listener (`node.metrics_listen`): `/metrics` and `/health`, nothing that
/// changes or reveals more than the metrics do.
pub fn metrics_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(node)
}

/// The digests are compared, never the tokens: both are 32 bytes whatever the tokens' lengths,
/// so the time a refusal takes says nothing of the token, not even its length.
fn token_digest(token: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `presented` is the token whose digest is `expected`, in constant time.
fn token_matches(expected: &[u8; 32], presented: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(token_digest(presented).ct_eq(expected))
}

async fn require_token(
    token: Arc<[u8; 32]>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if token_matches(&token, presented) {
        next.run(req).await
    } else {
        ApiError(
            StatusCode::UNAUTHORIZED,
            ErrorBody::new(
                ErrorCode::Unauthorized,
                "node token missing or not valid; only the control plane calls this API",
            ),
        )
        .into_response()
    }
}

/// An error answer: status, typed body, and `Retry-After` when the body has a retry hint.
struct ApiError(StatusCode, ErrorBody);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.1.retry_after_ms;
        let mut resp = (self.0, Json(self.1)).into_response();
        if let Some(ms) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, ms.div_ceil(1000).max(1).into());
        }
        resp
    }
}

fn unknown_pool(node: &Node, id: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        ErrorBody::invalid(
            "pool_id",
            format!(
                "pool {id:?} is not on this node; its pools are: {} (see GET /v2/pools)",
                node.pool_ids().join(", ")
            ),
        ),
    )
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// The node's metrics and its serving engines', one exposition (docs/METRICS.md).
async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let own = node.encode_metrics();
    let text = crate::metrics::scrape_engines(
        own,
        node.engine_sockets(),
        std::time::Duration::from_secs(2),
    )
    .await;
    ([(header::CONTENT_TYPE, llorch_metrics::CONTENT_TYPE)], text).into_response()
}

async fn pools(State(node): State<Arc<Node>>) -> Json<Vec<PoolStatus>> {
    Json(node.statuses())
}

async fn pool(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Json<PoolStatus>, ApiError> {
    node.status(&id)
        .map(Json)
        .ok_or_else(|| unknown_pool(&node, &id))
}

async fn drain(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Json<PoolStatus>, ApiError> {
    set_draining(&node, &id, true)
}

async fn resume(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Json<PoolStatus>, ApiError> {
    set_draining(&node, &id, false)
}

/// `POST /v2/pools/{id}/load|unload|pin|unpin`: the operator's model actions, through the same
/// code as D-Bus. `load` makes room as a request would and returns once the engine was asked
/// to start; `unload` returns once it stopped.
async fn operate(
    State(node): State<Arc<Node>>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<PoolStatus>, ApiError> {
    use crate::control::{self, ControlError};
    use crate::state::Command;
    let by = "the control plane";
    let done = match action.as_str() {
        "load" => control::command(&node, &id, Command::Load, by).await,
        "unload" => control::command(&node, &id, Command::Unload, by).await,
        "pin" | "unpin" => control::set_pinned(&node, &id, action == "pin", by).map(drop),
        _ => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                ErrorBody::invalid(
                    "action",
                    format!("{action:?} is not a pool action; use drain, resume, load, unload, pin or unpin"),
                ),
            ))
        }
    };
    done.map_err(|e| {
        let (status, code) = match &e {
            ControlError::UnknownPool { .. } => return unknown_pool(&node, &id),
            ControlError::NotOnDemand(_) => (StatusCode::CONFLICT, ErrorCode::InvalidParams),
            ControlError::NoRoom(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::InsufficientMemory,
            ),
            ControlError::Unavailable(_) | ControlError::Timeout { .. } | ControlError::Busy(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::PoolUnready)
            }
            ControlError::ConfigRejected(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidParams),
        };
        ApiError(status, ErrorBody::new(code, e.to_string()))
    })?;
    node.status(&id)
        .map(Json)
        .ok_or_else(|| unknown_pool(&node, &id))
}

fn set_draining(node: &Node, id: &str, draining: bool) -> Result<Json<PoolStatus>, ApiError> {
    crate::control::set_draining(node, id, draining, "the control plane")
        .map(Json)
        .map_err(|_| unknown_pool(node, id))
}

async fn generate(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Refused at once (unknown, draining, not ready) before the body is read.
    admit(&node, &id)?;
    let correlation = headers.get(CORRELATION).cloned();
    let body = Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorBody::invalid(
                        "body",
                        format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                    ),
                )
            } else {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    ErrorBody::invalid("body", format!("cannot read the request body: {e}")),
                )
            }
        })?
        .to_bytes();
    let by = correlation
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("a request");
    // Counted from here until the answer's body ends or is dropped.
    let (socket, guard, waking) = admit_with_room(&node, &id, by).await?;
    tracing::info!(
        pool_id = %id,
        correlation_id = correlation.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
        bytes = body.len(),
        "Forwarding a generation request."
    );
    let mut req = hyper::Request::post("/generate")
        .header(header::HOST, "localhost")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("static request");
    if let Some(c) = &correlation {
        req.headers_mut().insert(CORRELATION, c.clone());
    }
    // A request to an on-demand pool waits on its socket for the engine; if that engine
    // cannot even start, the pool fails and the request is told so instead of waiting on.
    let engine = UnixClient::new(&socket);
    let send = engine.send(req);
    let resp = if waking {
        tokio::select! {
            r = send => r,
            why = start_failed(&node, &id) => return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorBody::new(
                    ErrorCode::PoolUnready,
                    format!("pool {id:?}'s engine could not start for this request: {why}"),
                )
                .with_retry_after_ms(RETRY_AFTER_MS),
            )),
        }
    } else {
        send.await
    };
    let resp = resp.map_err(|e| match e {
        ClientError::Connect { .. } => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                ErrorCode::PoolUnready,
                format!(
                    "pool {id:?}'s engine does not accept connections ({e}); it may be restarting"
                ),
            )
            .with_retry_after_ms(RETRY_AFTER_MS),
        ),
        e => ApiError(
            StatusCode::BAD_GATEWAY,
            ErrorBody::new(
                ErrorCode::EngineFailed,
                format!("pool {id:?}'s engine failed before answering: {e}"),
            ),
        ),
    })?;
    let (parts, incoming) = resp.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut out = Response::builder().status(parts.status);
    for name in [
        header::CONTENT_TYPE,
        header::RETRY_AFTER,
        header::CACHE_CONTROL,
    ] {
        if let Some(v) = parts.headers.get(&name) {
            out = out.header(name, v.clone());
        }
    }
    if let Some(c) = correlation {
        out = out.header(CORRELATION, c);
    }
    let body = ForwardBody {
        inner: Some(incoming),
        guard: Some(guard),
        sse,
        pool: id,
    };
    Ok(out.body(Body::new(body)).expect("valid response"))
}

/// Returns once the pool's engine failed to start (the pool is `failed`), with the reason.
async fn start_failed(node: &Node, id: &str) -> String {
    let mut changes = node.generation.subscribe();
    loop {
        let failed = node.read(id, |p| {
            (p.state == llorch_wire::node::PoolState::Failed)
                .then(|| p.last_error.clone().unwrap_or_default())
        });
        match failed {
            Some(Some(why)) => return why,
            // Removed by a reload: the forward ends with the socket.
            None => std::future::pending().await,
            Some(None) => {}
        }
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Checks that a pool exists and takes forwards; returns its engine socket, busy counter, and
/// whether the request waits for an on-demand engine to start.
#[allow(clippy::type_complexity)]
/// What admission found for a forward.
enum Admission {
    /// The pool takes it: the socket, the guard that counts it in flight, and whether the
    /// engine is not ready yet (an on-demand pool loading).
    Go(std::path::PathBuf, BusyGuard, bool),
    /// The pool is not loaded (or is giving way to a swap): room must be made first.
    NeedsRoom,
    /// An on-demand pool between an unload and standby: look again once it settled.
    Settling,
}

/// Admits a forward, making room for the pool first when it is not loaded; a forward counted
/// in flight can no longer be unloaded under it.
async fn admit_with_room(
    node: &Arc<Node>,
    id: &str,
    by: &str,
) -> Result<(std::path::PathBuf, BusyGuard, bool), ApiError> {
    // A few rounds at most: a pool chosen for unloading meanwhile is made room for again.
    let mut admitted = false;
    for _ in 0..4 {
        let found = admit(node, id);
        match found {
            Ok(Admission::Go(socket, guard, waking)) => return Ok((socket, guard, waking)),
            Ok(Admission::Settling) => {
                // Between an unload and standby: wait for its state to change.
                let mut changes = node.generation.subscribe();
                let _ = tokio::time::timeout(SETTLE_WAIT, changes.changed()).await;
            }
            Ok(Admission::NeedsRoom) => {
                crate::swap::make_room(node, id, by)
                    .await
                    .map_err(|e| room_error(id, e))?;
                admitted = true;
            }
            Err(e) => {
                if admitted {
                    crate::swap::withdraw(node, id);
                }
                return Err(e);
            }
        }
    }
    if admitted {
        crate::swap::withdraw(node, id);
    }
    Err(ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorBody::new(
            ErrorCode::PoolUnready,
            format!("pool {id:?} kept being unloaded to make room for others; retry shortly"),
        )
        .with_retry_after_ms(RETRY_AFTER_MS),
    ))
}

/// The longest a forward waits for an on-demand pool to settle on standby after an unload.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn room_error(id: &str, e: crate::swap::RoomError) -> ApiError {
    use crate::swap::RoomError;
    match e {
        RoomError::Refused(why) => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(ErrorCode::InsufficientMemory, why),
        ),
        e => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                ErrorCode::PoolUnready,
                format!("no room could be made for pool {id:?}: {e}"),
            )
            .with_retry_after_ms(RETRY_AFTER_MS),
        ),
    }
}

/// Checks a forward against the pool's state and, when it can go, counts it in flight under
/// the table's lock (the lock a swap holds while it marks a pool for unloading).
fn admit(node: &Arc<Node>, id: &str) -> Result<Admission, ApiError> {
    let found = node
        .update(id, |p| {
            let needs_room = p.evicting
                || p.yielding
                || (p.config.on_demand && p.phase == crate::state::Phase::Standby && !p.charged());
            let go = (!needs_room && !p.draining)
                .then(|| p.ready_socket())
                .flatten()
                .map(|s| (s, BusyGuard::new(p.busy.clone(), node.clone())));
            if go.is_some() {
                p.last_used = Some(tokio::time::Instant::now());
            }
            let settling = p.config.on_demand && p.phase == crate::state::Phase::Stopped;
            (go, needs_room, settling, p.draining, p.state)
        })
        .ok_or_else(|| unknown_pool(node, id))?;
    let (go, needs_room, settling, draining, state) = found;
    let waking = state != llorch_wire::node::PoolState::Ready;
    if node.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                ErrorCode::PoolUnavailable,
                "this node is shutting down and takes no new requests",
            )
            .with_retry_after_ms(RETRY_AFTER_MS),
        ));
    }
    if draining {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                ErrorCode::PoolUnavailable,
                format!("pool {id:?} is draining and takes no new requests (POST /v2/pools/{id}/resume)"),
            )
            .with_retry_after_ms(RETRY_AFTER_MS),
        ));
    }
    match go {
        Some((socket, guard)) => Ok(Admission::Go(socket, guard, waking)),
        None if needs_room => Ok(Admission::NeedsRoom),
        None if settling => Ok(Admission::Settling),
        None => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                ErrorCode::PoolUnready,
                format!("pool {id:?} is {state}, not ready; retry shortly"),
            )
            .with_retry_after_ms(RETRY_AFTER_MS),
        )),
    }
}

/// Counts one forward in flight; the count drops when the guard does, whatever way the
/// forward ends.
/// A swap waiting for the pool to go idle is woken when it drops.
struct BusyGuard(Arc<AtomicU32>, Arc<Node>);

impl BusyGuard {
    fn new(busy: Arc<AtomicU32>, node: Arc<Node>) -> Self {
        busy.fetch_add(1, Ordering::SeqCst);
        Self(busy, node)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        self.1.work_done.notify_waiters();
    }
}

/// The engine's answer body, passed through frame by frame.
struct ForwardBody {
    inner: Option<Incoming>,
    guard: Option<BusyGuard>,
    sse: bool,
    pool: String,
}

impl ForwardBody {
    fn finish(&mut self) {
        self.inner = None;
        self.guard = None;
    }
}

impl http_body::Body for ForwardBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                // Trailers are not part of the engine's protocol; skip them.
                Err(_) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            },
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish();
                tracing::warn!(pool_id = %this.pool, error = %e, "The engine's stream broke off mid-answer.");
                if this.sse {
                    let body = ErrorBody::new(
                        ErrorCode::EngineFailed,
                        format!(
                            "pool {:?}'s engine stopped in the middle of the answer ({e}); the node restarts it, retry the request",
                            this.pool
                        ),
                    );
                    let frame = llorch_wire::sse::frame(
                        "error",
                        &serde_json::to_string(&body).expect("error bodies serialize"),
                    );
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(frame)))))
                } else {
                    Poll::Ready(None)
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_compared_by_digest_whatever_their_length() {
        let expected = token_digest("node-token-0123456789");
        assert!(token_matches(&expected, "node-token-0123456789"));
        for other in [
            "",
            "n",
            "node-token-012345678",
            "node-token-01234567890",
            "x".repeat(4096).as_str(),
        ] {
            assert!(!token_matches(&expected, other), "{other}");
        }
    }
}
