//! Node registration and heartbeats (called by pool-managerd), and `GET /v2/nodes`.
//!
//! Heartbeat handling takes one short lock and never waits behind inference work.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State as Ext};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use llorch_client::HttpClient;
use llorch_wire::node::{limits, Heartbeat, NodeAck, Registration};
use llorch_wire::task::NodeView;
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{authorize_admin, parse, read_body_within, ApiError, AppState};
use crate::auth::presented_key;
use crate::registry::{BeatSession, Node};
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
    let bad = |field: &str, msg: String| {
        ApiError::native((StatusCode::BAD_REQUEST, ErrorBody::invalid(field, msg)))
    };
    // Everything a node sends is checked before any of it is used: nothing it says may reach a
    // panic (an address that forms no request, a sum past u32) under the core lock.
    reg.validate()
        .map_err(|e| ApiError::native((StatusCode::BAD_REQUEST, e)))?;
    if !state.config.allow_plaintext && llorch_client::leaves_host_in_clear(&reg.address) {
        return Err(bad(
            "address",
            format!(
                "{} is plain HTTP off this host: prompts and the node token would cross the network in the clear; give the node API TLS (node.tls_cert, node.tls_key, an https:// address) or start orchestratord with --allow-plaintext",
                reg.address
            ),
        ));
    }
    // The node's token (when the control plane requires one) also guards the node's own API.
    let client = HttpClient::with_roots(&reg.address, &state.config.node_roots)
        .map_err(|e| bad("address", e.to_string()))?
        .with_token(
            state
                .keys()
                .node
                .as_ref()
                .and_then(|_| presented_key(&headers).map(str::to_string)),
        );
    let heartbeat = Duration::from_secs(reg.heartbeat_secs);
    // A fresh beat session per registration, when beats are read: its key travels only in
    // this (authenticated) answer.
    let (beat, grant) = state
        .config
        .beat_port
        .and_then(|port| {
            BeatSession::new(port).or_else(|| {
                tracing::warn!(node_id = %reg.node_id, "No random key for a beat session: the node heartbeats over HTTP.");
                None
            })
        })
        .unzip();
    let node = Node {
        id: reg.node_id.clone(),
        address: reg.address.clone(),
        version: reg.version,
        heartbeat,
        last_seen: Instant::now(),
        online: true,
        pools: reg.pools,
        staged_models: reg.staged_models,
        gpus: reg.gpus,
        client,
        lost: CancellationToken::new(),
        draining: false,
        offline_beats: state.config.offline_after_beats,
        beat,
    };
    let offline_after = node.offline_after();
    let models: Vec<String> = node.pools.iter().map(|p| p.model_id.clone()).collect();
    let events = {
        let mut core = state.core();
        if core.registry.full_for(&node.id) {
            return Err(ApiError::native((
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorBody::new(
                    ErrorCode::NodeUnavailable,
                    format!(
                        "the control plane already keeps {} nodes; offline nodes are forgotten after {} s, or remove nodes from service",
                        crate::registry::MAX_NODES,
                        crate::registry::FORGET_OFFLINE_AFTER.as_secs()
                    ),
                )
                .with_retry_after_ms(60_000),
            )));
        }
        // Only while a D-Bus front listens.
        let events = if state.announcing() {
            let old = core
                .registry
                .nodes
                .get(&node.id)
                .map(|n| n.pools.clone())
                .unwrap_or_default();
            crate::events::pool_changes(&node.id, &old, &node.pools, "the node registered")
        } else {
            Vec::new()
        };
        core.registry.register(node);
        events
    };
    state.announce(crate::events::Event::NodeJoined(reg.node_id.clone()));
    for e in events {
        state.announce(e);
    }
    // Only a node that was taken makes label values.
    state.metrics.add_models(models.iter().map(String::as_str));
    state.metrics.node_event("joined");
    tracing::info!(
        message_id = llorch_os::message_id::NODE_JOINED,
        node_id = %reg.node_id,
        address = %reg.address,
        pools = models.len(),
        "Node registered."
    );
    state.wake.notify_one();
    Ok(Json(NodeAck {
        node_id: reg.node_id,
        offline_after_secs: offline_after.as_secs(),
        beat: grant,
        beat_counter: None,
    }))
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
    hb.validate()
        .map_err(|e| ApiError::native((StatusCode::BAD_REQUEST, e)))?;
    let models: Vec<String> = hb.pools.iter().map(|p| p.model_id.clone()).collect();
    let (offline_after, back, queued, events, beat_counter) = {
        let mut core = state.core();
        let was_offline = core.registry.nodes.get(&id).is_some_and(|n| !n.online);
        let Some(old) = core
            .registry
            .heartbeat(&id, hb.pools, hb.staged_models, hb.gpus)
        else {
            return Err(ApiError::native((
                StatusCode::NOT_FOUND,
                ErrorBody::new(
                    ErrorCode::NodeUnavailable,
                    format!("node {id:?} is not registered; register again"),
                ),
            )));
        };
        let node = &core.registry.nodes[&id];
        // Only while a D-Bus front listens: the heartbeat path of 1,000 nodes stays lean.
        let events = if state.announcing() {
            crate::events::pool_changes(&id, &old, &node.pools, "reported by the node")
        } else {
            Vec::new()
        };
        (
            node.offline_after(),
            was_offline,
            !core.queue.is_empty(),
            events,
            node.beat.as_ref().map(|b| b.counter),
        )
    };
    if back {
        state.metrics.node_event("back");
        state.announce(crate::events::Event::NodeJoined(id.clone()));
    }
    for e in events {
        state.announce(e);
    }
    // Only a known node's models become label values.
    state.metrics.add_models(models.iter().map(String::as_str));
    // A heartbeat may free the way for waiting tasks (a pool turned ready, a node came back);
    // with nothing queued there is nothing to place, and 1,000 nodes must not wake the
    // dispatcher 200 times a second for nothing.
    if queued {
        state.wake.notify_one();
    }
    Ok(Json(NodeAck {
        node_id: id,
        offline_after_secs: offline_after.as_secs(),
        beat: None,
        beat_counter,
    }))
}

/// `GET /v2/nodes`.
pub async fn list(Ext(state): Ext<AppState>, headers: HeaderMap) -> Result<Json<Vec<NodeView>>> {
    authorize_admin(&state, &headers).map_err(ApiError::native)?;
    Ok(Json(state.core().registry.node_views(Instant::now())))
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
