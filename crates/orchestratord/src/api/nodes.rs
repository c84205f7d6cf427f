//! Node registration and heartbeats (called by pool-managerd), and `GET /v2/nodes`.
//!
//! Heartbeat handling takes one short lock and never waits behind inference work.

use axum::body::Body;
use axum::extract::{Path, State as Ext};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use llorch_wire::node::{limits, Heartbeat, NodeAck, Registration};
use llorch_wire::task::NodeView;
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::time::Instant;

use super::{authorize_admin, parse, read_body_within, ApiError, AppState};
use crate::auth::presented_key;
use crate::state::State;

type Result<T> = std::result::Result<T, ApiError>;

/// The node id a request's node token is bound to (`*`: any), or 401 when the control plane
/// requires node tokens and the request has no valid one. `None`: tokens are not required
/// (loopback without a node-tokens file).
fn node_token(state: &State, headers: &HeaderMap) -> Result<Option<String>> {
    let keys = state.keys();
    let Some(tokens) = &keys.node else {
        return Ok(None);
    };
    let presented = presented_key(headers);
    if let Some(holder) = presented.and_then(|k| tokens.check(k)) {
        return Ok(Some(holder.name.to_string()));
    }
    tracing::warn!(
        message_id = llorch_os::message_id::NODE_REFUSED,
        fingerprint = %presented.map(crate::auth::fingerprint).unwrap_or_else(|| "none".into()),
        "Refused a node request without a valid node token."
    );
    Err(ApiError::native((
        StatusCode::UNAUTHORIZED,
        ErrorBody::new(
            ErrorCode::Unauthorized,
            "node token missing or not valid; give pool-managerd the token listed in the control plane's node-tokens file",
        ),
    )))
}

/// 403 unless a token bound to `bound` may act as `node_id`: one worker's token cannot act
/// for another.
fn check_binding(bound: Option<&str>, node_id: &str) -> Result<()> {
    let Some(bound) = bound else {
        return Ok(());
    };
    if bound == crate::auth::ANY_NODE || bound == node_id {
        return Ok(());
    }
    tracing::warn!(
        message_id = llorch_os::message_id::NODE_REFUSED,
        token = %bound,
        node_id = %node_id,
        "Refused a node token used for another node id."
    );
    Err(ApiError::native((
        StatusCode::FORBIDDEN,
        ErrorBody::new(
            ErrorCode::Forbidden,
            format!(
                "this node token is bound to node {bound:?} and may not act as node {node_id:?}; set node.id to the id the token is listed under in the control plane's node-tokens file"
            ),
        ),
    )))
}

/// `POST /v2/nodes/register`.
pub async fn register(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<NodeAck>> {
    // A request without a valid token is refused before its body is read; the binding to a
    // node id is checked once the body names it.
    let bound = node_token(&state, &headers)?;
    let bytes = read_body_within(body, limits::MAX_BODY_BYTES)
        .await
        .map_err(ApiError::native)?;
    let reg: Registration = parse(&bytes).map_err(ApiError::native)?;
    check_binding(bound.as_deref(), &reg.node_id)?;
    let presented = presented_key(&headers).map(str::to_string);
    crate::ops::register(&state, reg, presented)
        .map(Json)
        .map_err(ApiError::native)
}

/// `POST /v2/nodes/{id}/heartbeat`; 404 `NODE_UNAVAILABLE` tells a node the control plane does
/// not know it (it restarted), and the node registers again.
pub async fn heartbeat(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<NodeAck>> {
    let result = heartbeat_request(&state, headers, id, body).await;
    state.metrics.heartbeat(match &result {
        Ok(_) => "ok",
        Err(e) if e.status == StatusCode::UNAUTHORIZED || e.status == StatusCode::FORBIDDEN => {
            "unauthorized"
        }
        Err(e) if e.status == StatusCode::NOT_FOUND => "unknown_node",
        Err(_) => "invalid",
    });
    result
}

async fn heartbeat_request(
    state: &AppState,
    headers: HeaderMap,
    id: String,
    body: Body,
) -> Result<Json<NodeAck>> {
    check_binding(node_token(state, &headers)?.as_deref(), &id)?;
    let bytes = read_body_within(body, limits::MAX_BODY_BYTES)
        .await
        .map_err(ApiError::native)?;
    let hb: Heartbeat = parse(&bytes).map_err(ApiError::native)?;
    crate::ops::heartbeat(state, id, hb)
        .map(Json)
        .map_err(ApiError::native)
}

/// `GET /v2/nodes`.
pub async fn list(Ext(state): Ext<AppState>, headers: HeaderMap) -> Result<Json<Vec<NodeView>>> {
    authorize_admin(&state, &headers).map_err(ApiError::native)?;
    Ok(Json(state.node_views(Instant::now())))
}

/// `POST /v2/nodes/{id}/drain` and `…/resume` (admin): [`crate::control::node_action`].
async fn node_action(
    state: AppState,
    headers: HeaderMap,
    id: String,
    draining: bool,
) -> Result<Json<NodeView>> {
    let operator = authorize_admin(&state, &headers).map_err(ApiError::native)?;
    crate::control::node_action(&state, &id, draining, &operator)
        .map(Json)
        .map_err(ApiError::native)
}

pub async fn drain(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<NodeView>> {
    node_action(state, headers, id, true).await
}

pub async fn resume(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<NodeView>> {
    node_action(state, headers, id, false).await
}
