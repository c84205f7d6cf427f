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
fn node_token(
    state: &State,
    headers: &HeaderMap,
) -> Result<Option<(String, crate::auth::NodeGrant)>> {
    let keys = state.keys();
    let Some(tokens) = &keys.node else {
        return Ok(None);
    };
    let presented = presented_key(headers);
    if let Some(holder) = presented.and_then(|k| tokens.check(k)) {
        return Ok(Some((holder.name.to_string(), holder.grant.clone())));
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

/// A node may register an address of the control plane's own machine (`unix:`, loopback) only
/// from that machine: a token holder elsewhere would otherwise make orchestratord dial its own
/// local sockets and ports with that token.
fn check_address(address: &str, peer: Option<&llorch_http::Peer>) -> Result<()> {
    let remote = peer
        .and_then(|p| p.0)
        .is_some_and(|ip| !ip.to_canonical().is_loopback());
    if remote && llorch_client::names_this_host(address) {
        tracing::warn!(
            message_id = llorch_os::message_id::NODE_REFUSED,
            address = %address,
            "Refused a registration from another machine naming an address of this one."
        );
        return Err(ApiError::native((
            StatusCode::BAD_REQUEST,
            ErrorBody::invalid(
                "address",
                format!("{address:?} names the control plane's own machine (a unix: socket or a loopback address), but the registration came from another machine; set node.advertise to an address the control plane reaches the node at"),
            ),
        )));
    }
    Ok(())
}

/// How long a registration waits for the TLS check of the node's API.
const REACH_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// A node whose API speaks TLS must be reachable, with a certificate this control plane
/// trusts, before it is registered: otherwise it would show `ready` and every task placed on
/// it would fail. Any HTTP answer proves the handshake; a connection or TLS failure refuses
/// the registration with what went wrong (the node retries, and logs it).
async fn check_reachable(state: &State, address: &str) -> Result<()> {
    let Ok(client) = llorch_client::HttpClient::with_roots(address, &state.config.node_roots)
    else {
        // Registration validation names the address's fault.
        return Ok(());
    };
    if !client.is_tls() {
        return Ok(());
    }
    let answer = tokio::time::timeout(REACH_CHECK, async {
        let req = client.build(
            client.request(axum::http::Method::GET, "/health"),
            bytes::Bytes::new(),
        )?;
        client.send(req).await.map(|_| ())
    })
    .await;
    let why = match answer {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no TLS handshake within {} s", REACH_CHECK.as_secs()),
    };
    tracing::warn!(
        message_id = llorch_os::message_id::NODE_REFUSED,
        address = %address,
        reason = %why,
        "Refused a registration: the node's API cannot be reached over TLS."
    );
    Err(ApiError::native((
        StatusCode::BAD_REQUEST,
        ErrorBody::invalid(
            "address",
            format!("the control plane cannot reach the node's API at {address} ({why}); check that the address is where the control plane reaches the node (node.advertise) and that the node's certificate is signed by the CA the control plane trusts (orchestratord --node-ca) and names that address"),
        ),
    )))
}

/// 403 when the pools a node reports exceed what its token may register (`models=`,
/// `slots=` in node-tokens): a token holder cannot capture another model's traffic or claim
/// more slots than its line allows.
fn check_grant(
    token: Option<&(String, crate::auth::NodeGrant)>,
    pools: &[llorch_wire::node::PoolStatus],
) -> Result<()> {
    let Some((name, grant)) = token else {
        return Ok(());
    };
    let claimed: Vec<(&str, &str, u32)> = pools
        .iter()
        .map(|p| (p.pool_id.as_str(), p.model_id.as_str(), p.slots_total))
        .collect();
    let Some((field, why)) = grant.refuses(&claimed) else {
        return Ok(());
    };
    tracing::warn!(
        message_id = llorch_os::message_id::NODE_REFUSED,
        token = %name,
        field = %field,
        "Refused a node report beyond what its token allows."
    );
    let mut body = ErrorBody::new(ErrorCode::Forbidden, why);
    body.field = Some(field);
    Err(ApiError::native((StatusCode::FORBIDDEN, body)))
}

/// `POST /v2/nodes/register`.
pub async fn register(
    Ext(state): Ext<AppState>,
    peer: Option<axum::Extension<llorch_http::Peer>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<NodeAck>> {
    // A request without a valid token is refused before its body is read; the binding to a
    // node id is checked once the body names it.
    let token = node_token(&state, &headers)?;
    let bytes = read_body_within(body, limits::MAX_BODY_BYTES)
        .await
        .map_err(ApiError::native)?;
    let reg: Registration = parse(&bytes).map_err(ApiError::native)?;
    check_binding(token.as_ref().map(|(n, _)| n.as_str()), &reg.node_id)?;
    check_grant(token.as_ref(), &reg.pools)?;
    check_address(&reg.address, peer.as_ref().map(|p| &p.0))?;
    // Only an address that passed validation is dialled.
    reg.validate()
        .map_err(|b| ApiError::native(crate::refusal::Refusal::InvalidReport(b)))?;
    check_reachable(&state, &reg.address).await?;
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
    let token = node_token(state, &headers)?;
    check_binding(token.as_ref().map(|(n, _)| n.as_str()), &id)?;
    let bytes = read_body_within(body, limits::MAX_BODY_BYTES)
        .await
        .map_err(ApiError::native)?;
    let hb: Heartbeat = parse(&bytes).map_err(ApiError::native)?;
    check_grant(token.as_ref(), &hb.pools)?;
    crate::ops::heartbeat(state, id, hb)
        .map(Json)
        .map_err(ApiError::native)
}

/// `POST /v2/nodes/{id}/leave` (the node's token): a node agent that stops cleanly leaves,
/// and is forgotten at once instead of being called lost.
pub async fn leave(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let token = node_token(&state, &headers)?;
    check_binding(token.as_ref().map(|(n, _)| n.as_str()), &id)?;
    crate::ops::leave(&state, id)
        .map(|()| StatusCode::NO_CONTENT)
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
