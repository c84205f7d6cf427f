//! The native task API (`/v2`): tasks, their event streams, cancellation, sessions, pools and
//! capabilities.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State as Ext};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use llorch_wire::engine::GenerateRequest;
use llorch_wire::node::PoolStatus;
use llorch_wire::task::{
    Capabilities, PoolCapability, PoolsAnswer, SessionInfo, TaskInfo, TaskRequest,
};
use llorch_wire::ErrorBody;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    authenticate, authorize_admin, parse, read_body, sse, ApiError, AppState, CorrelationId,
    HttpRefusal, Meter,
};
use crate::outcome::Api;
use crate::refusal::Refusal;
use crate::state::Submission;
use crate::tasks::{Follower, Task};

type Result<T> = std::result::Result<T, ApiError>;

fn native<T>(r: std::result::Result<T, impl Into<HttpRefusal>>) -> Result<T> {
    r.map_err(ApiError::native)
}

/// A task the client may see: with API keys, only its own. Ids live in each key's own
/// namespace, so another key's task of the same id is simply not there (ids are not probed).
fn own_task(state: &AppState, client: &str, id: &str) -> Result<Arc<Task>> {
    state.task(client, id).ok_or_else(|| unknown_task(id))
}

fn unknown_task(id: &str) -> ApiError {
    ApiError::native(Refusal::UnknownTask {
        task_id: id.to_string(),
    })
}

/// `POST /v2/tasks`.
pub async fn submit(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    Meter::run(Api::Native, &state, async |m| {
        submit_request(&state, cid, headers, body, m).await
    })
    .await
}

async fn submit_request(
    state: &AppState,
    cid: CorrelationId,
    headers: HeaderMap,
    body: Body,
    meter: &Meter,
) -> Result<Response> {
    let client = native(authenticate(state, &headers))?;
    let bytes = native(read_body(state, body).await)?;
    let req: TaskRequest = native(parse(&bytes))?;
    meter.model(&req.model_ref);
    if let Some(w) = req.workload.as_deref().filter(|w| *w != "completion") {
        return Err(ApiError::native((
            StatusCode::BAD_REQUEST,
            ErrorBody::invalid(
                "workload",
                format!("workload {w:?} is not supported; use completion"),
            ),
        )));
    }
    if let Some(e) = req.engine.as_deref().filter(|e| *e != "llamacpp") {
        return Err(ApiError::native((
            StatusCode::BAD_REQUEST,
            ErrorBody::invalid(
                "engine",
                format!("engine {e:?} is not supported; use llamacpp"),
            ),
        )));
    }
    if req.model_ref.is_empty() {
        return Err(ApiError::native((
            StatusCode::BAD_REQUEST,
            ErrorBody::invalid(
                "model_ref",
                "model_ref must name a model (see GET /v1/models)",
            ),
        )));
    }
    let sampling = req.sampling();
    let engine = GenerateRequest {
        prompt: req.prompt,
        messages: req.messages,
        max_tokens: Some(req.max_tokens.unwrap_or(state.config.default_max_tokens)),
        json_schema: req.json_schema,
        json_schema_strict: req.json_schema_strict,
        grammar: req.grammar,
        logprobs: req.logprobs,
        n: req.n,
        tools: req.tools,
        tool_choice: req.tool_choice,
        parallel_tool_calls: req.parallel_tool_calls,
        ..GenerateRequest::default()
    }
    .with_sampling(sampling);
    native(engine.validate().map_err(|e| (StatusCode::BAD_REQUEST, e)))?;
    let (_task, accepted) = native(state.submit(Submission {
        task_id: req.task_id,
        model: req.model_ref,
        request: engine,
        priority: req.priority,
        deadline_ms: req.deadline_ms,
        session_id: req.session_id,
        hints: req.placement,
        client,
        correlation_id: cid.0,
        ctx: req.ctx,
        api: Api::Native,
    }))?;
    meter.admitted();
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

/// `GET /v2/tasks/{id}`.
pub async fn task_info(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<TaskInfo>> {
    let client = native(authenticate(&state, &headers))?;
    let task = own_task(&state, &client, &id)?;
    let (phase, pool_id) = task.phase();
    Ok(Json(TaskInfo {
        task_id: task.id.clone(),
        state: phase.as_str().into(),
        model_ref: task.model.clone(),
        priority: task.priority,
        pool_id,
        queue_position: state.queue_position(&task),
    }))
}

/// `GET /v2/tasks/{id}/events`: the whole stream from its first event, however late the
/// subscriber connects. Disconnecting does not cancel the task; `POST …/cancel` does.
pub async fn events(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response> {
    let client = native(authenticate(&state, &headers))?;
    let task = own_task(&state, &client, &id)?;
    let subscriber = native(state.subscribe(&task))?;
    let (tx, resp) = sse::channel();
    tokio::spawn(pump(task, tx, state.config.sse_keepalive, subscriber));
    Ok(resp)
}

async fn pump(
    task: Arc<Task>,
    tx: mpsc::Sender<Bytes>,
    keep_alive: std::time::Duration,
    _subscriber: crate::state::Subscriber,
) {
    let mut follower = Follower::new(task);
    let mut idle = sse::keep_alive_timer(keep_alive);
    while let Some(events) = sse::next_batch(&mut follower, &mut idle, &tx).await {
        let mut out = String::new();
        for e in &events {
            out.push_str(&e.to_sse());
        }
        if tx.send(Bytes::from(out)).await.is_err() {
            return;
        }
    }
}

/// `POST /v2/tasks/{id}/cancel`: a client cancels its own task; the admin credential cancels
/// any client's (the operator's door, as D-Bus `CancelTask`).
pub async fn cancel(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response> {
    let (client, admin) = native(super::identify(&state, &headers))?;
    let canceled = match own_task(&state, &client, &id) {
        Ok(task) => state.cancel(&task, crate::outcome::CancelReason::Client),
        Err(_) if admin => {
            crate::control::cancel_task(&state, &id, &client).map_err(ApiError::native)?
        }
        Err(e) => return Err(e),
    };
    Ok((
        StatusCode::OK,
        Json(serde_json::json!({"task_id": id, "canceled": canceled})),
    )
        .into_response())
}

fn unknown_session(id: &str) -> ApiError {
    ApiError::native((
        StatusCode::NOT_FOUND,
        ErrorBody::invalid(
            "session_id",
            format!("session {id:?} is not known or expired"),
        ),
    ))
}

/// `GET /v2/sessions/{id}`.
pub async fn session(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>> {
    let client = native(authenticate(&state, &headers))?;
    state
        .session_info(&client, &id, Instant::now())
        .map(Json)
        .ok_or_else(|| unknown_session(&id))
}

/// `DELETE /v2/sessions/{id}`.
pub async fn delete_session(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let client = native(authenticate(&state, &headers))?;
    if state.forget_session(&client, &id) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(unknown_session(&id))
    }
}

/// `GET /v2/pools`: every pool with its slots, and the queue.
pub async fn pools(Ext(state): Ext<AppState>, headers: HeaderMap) -> Result<Json<PoolsAnswer>> {
    native(authenticate(&state, &headers))?;
    Ok(Json(state.pools_answer()))
}

/// `POST /v2/pools/{id}/drain` and `…/resume` (admin): passed to the pool's node, whose answer
/// updates the registry at once ([`crate::control::pool_action`]).
async fn pool_action(
    state: AppState,
    headers: HeaderMap,
    id: String,
    on_node: Option<String>,
    action: &str,
) -> Result<Json<PoolStatus>> {
    let operator = native(authorize_admin(&state, &headers))?;
    let status = crate::control::pool_action(&state, &id, on_node.as_deref(), action, &operator)
        .await
        .map_err(ApiError::native)?;
    Ok(Json(status))
}

/// `?node=NODE` of a pool action.
#[derive(Debug, serde::Deserialize)]
pub struct OnNode {
    pub node: Option<String>,
}

pub async fn drain(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<OnNode>,
) -> Result<Json<PoolStatus>> {
    pool_action(state, headers, id, q.node, "drain").await
}

pub async fn resume(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<OnNode>,
) -> Result<Json<PoolStatus>> {
    pool_action(state, headers, id, q.node, "resume").await
}

/// `POST /v2/pools/{id}/load|unload|pin|unpin` (admin): the node makes room and loads the
/// model, unloads it, or pins it against being unloaded to make room.
pub async fn model_action(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<OnNode>,
) -> Result<Json<PoolStatus>> {
    let action = match action.as_str() {
        a @ ("load" | "unload" | "pin" | "unpin") => a,
        other => {
            return Err(ApiError::native((
                StatusCode::NOT_FOUND,
                ErrorBody::invalid(
                    "action",
                    format!(
                    "{other:?} is not a pool action; use drain, resume, load, unload, pin or unpin"
                ),
                ),
            )))
        }
    };
    pool_action(state, headers, id, q.node, action).await
}

/// `GET /v2/meta/capabilities`.
pub async fn capabilities(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
) -> Result<Json<Capabilities>> {
    native(authenticate(&state, &headers))?;
    let pools = state
        .pool_views()
        .into_iter()
        .map(|p| PoolCapability {
            pool_id: p.pool_id,
            model_id: p.model_id,
            ctx_per_slot: p.ctx_per_slot,
            slots: p.slots_total,
            engine: "llamacpp".into(),
            engine_version: p.engine_version,
            state: p.state,
        })
        .collect();
    Ok(Json(Capabilities {
        api_version: "2".into(),
        pools,
    }))
}

/// `GET /v2/catalog/availability`: which models are on which nodes and pools, and whether a
/// request for each can be placed now (`available`), waits (`placeable` pools all busy,
/// draining or suspect), or is refused (every node offline).
pub async fn availability(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>> {
    native(authenticate(&state, &headers))?;
    Ok(Json(state.availability(Instant::now())))
}
