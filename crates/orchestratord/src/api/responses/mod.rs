//! OpenAI's Responses API: `POST /v1/responses` (whole and streamed), `GET` and `DELETE
//! /v1/responses/{id}`, with OpenAI's error envelope. A request is translated into the same
//! engine request as `/v1/chat/completions` and goes through the same admission (`interactive`
//! priority), placement, metrics (`api="openai_responses"`), journal record and cancellation
//! on disconnect. With `store` (the default) the answer and its conversation are kept for the
//! key that asked ([`crate::conversations`]), so the next turn can send `previous_response_id`.
//!
//! - this file: the routes' handlers, from the request to the task and back;
//! - [`request`]: the body, its input items and tools, the engine request they become;
//! - [`response`]: the response object, its output items, usage;
//! - [`stream`]: the event stream of a streamed answer.

mod request;
mod response;
mod stream;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State as Ext};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use llorch_wire::engine::ChatMessage;
use llorch_wire::ErrorBody;
use serde_json::{json, Map, Value};

use super::interactive::{admit, first_events, read_to_end, Admitted};
use super::{authenticate, client_json, sse, ApiError, AppState, CorrelationId, Meter};
use crate::conversations::Stored;
use crate::outcome::Api;
use request::{rename_field, CreateResponse};
use response::{Answer, Shape};

type Result<T> = std::result::Result<T, ApiError>;

fn oai<T>(r: std::result::Result<T, impl Into<super::HttpRefusal>>) -> Result<T> {
    r.map_err(ApiError::openai)
}

fn bad(e: ErrorBody) -> ApiError {
    ApiError::openai((StatusCode::BAD_REQUEST, rename_field(e)))
}

fn not_found(id: &str) -> ApiError {
    ApiError::openai((
        StatusCode::NOT_FOUND,
        ErrorBody::invalid(
            "response_id",
            format!("no stored response with id {id:?} for this key (responses are kept in memory for a limited time, and not at all with store: false)"),
        ),
    ))
}

/// Keeps a finished answer for the next turn, when the request asked to store it.
pub(super) struct Keeper {
    state: Option<AppState>,
    owner: String,
    /// The conversation before this turn's answer (earlier turns and this input).
    history: Vec<ChatMessage>,
}

impl Keeper {
    fn keep(self, id: &str, answer: &Answer, response: Value) -> Value {
        let Some(state) = self.state else {
            return response;
        };
        let mut history = self.history;
        history.push(answer.message());
        let stored = Stored {
            history: Arc::new(history),
            response: Arc::new(response.clone()),
        };
        if state.conversations.put(&self.owner, id, stored) {
            response
        } else {
            tracing::info!(
                response_id = id,
                "A response too large to store was not stored."
            );
            let mut r = response;
            r["store"] = json!(false);
            r
        }
    }
}

/// `POST /v1/responses`.
pub async fn create(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    Meter::run(Api::OpenAiResponses, &state.clone(), async |m| {
        create_request(state, cid, headers, body, m).await
    })
    .await
}

/// The parameters a response object echoes.
fn echo(req: &CreateResponse, turn: &request::Turn, parallel: bool) -> Map<String, Value> {
    let echo = json!({
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata.clone().unwrap_or_default(),
        "parallel_tool_calls": parallel,
        "previous_response_id": req.previous_response_id,
        "store": req.store != Some(false),
        "temperature": req.temperature,
        "top_p": req.top_p,
        "text": {"format": turn.format},
        "tool_choice": req.tool_choice.clone().unwrap_or(json!("auto")),
        "tools": turn.tools,
        "truncation": "disabled",
    });
    let Value::Object(mut echo) = echo else {
        unreachable!("an object")
    };
    if let Some(user) = &req.user {
        echo.insert("user".into(), json!(user));
    }
    echo
}

async fn create_request(
    state: AppState,
    cid: CorrelationId,
    headers: HeaderMap,
    body: Body,
    meter: &Meter,
) -> Result<Response> {
    let (client, value) = oai(client_json(&state, &headers, body).await)?;
    let req: CreateResponse = llorch_wire::json::from_value(&value).map_err(bad)?;
    meter.model(&req.model);
    let history = match &req.previous_response_id {
        None => Arc::new(Vec::new()),
        Some(id) => match state.conversations.get(&client, id) {
            Some(s) => s.history,
            None => {
                return Err(bad(ErrorBody::invalid(
                    "previous_response_id",
                    format!("previous_response_id {id:?} names no stored response of this key: it expired, was deleted, was made with store: false, or the server restarted; resend the conversation as input items"),
                )))
            }
        },
    };
    let max_tokens = req
        .max_output_tokens
        .unwrap_or(state.config.default_max_tokens);
    let turn = req.turn(&history, max_tokens).map_err(bad)?;
    turn.engine.validate().map_err(bad)?;
    let tools = turn.engine.effective_tool_choice();
    let echo = echo(&req, &turn, turn.engine.parallel_tool_calls);
    let keeper = Keeper {
        state: (req.store != Some(false)).then(|| state.clone()),
        owner: client.clone(),
        history: history.iter().cloned().chain(turn.input).collect(),
    };
    let model = req.model.clone();
    let Admitted {
        task,
        mut follower,
        guard,
    } = oai(admit(
        &state,
        cid,
        client,
        model.clone(),
        turn.engine,
        meter,
    ))?;
    let shape = Shape {
        id: format!("resp_{}", &task.id[5..]),
        created_at: crate::api::openai::unix_now(),
        model,
        tools,
        echo,
    };
    if req.stream != Some(true) {
        let (text, end) = oai(read_to_end(&mut follower).await)?;
        drop(guard);
        let answer = Answer::read(&shape, text, &end);
        let r = shape.response(answer.status, answer.items(&shape), Some(&end));
        return Ok(Json(keeper.keep(&shape.id, &answer, r)).into_response());
    }
    let keep_alive = state.config.sse_keepalive;
    let first = oai(first_events(&mut follower, keep_alive).await)?;
    let (tx, resp) = sse::channel();
    tokio::spawn(stream::pump(
        tx,
        follower,
        guard,
        (shape, keeper),
        keep_alive,
        first,
    ));
    Ok(resp)
}

/// `GET /v1/responses/{id}`: a stored response of the caller's key.
pub async fn retrieve(
    Ext(state): Ext<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>> {
    let client = oai(authenticate(&state, &headers))?;
    match state.conversations.get(&client, &id) {
        Some(s) => Ok(Json((*s.response).clone())),
        None => Err(not_found(&id)),
    }
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete(
    Ext(state): Ext<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>> {
    let client = oai(authenticate(&state, &headers))?;
    if state.conversations.delete(&client, &id) {
        Ok(Json(
            json!({"id": id, "object": "response", "deleted": true}),
        ))
    } else {
        Err(not_found(&id))
    }
}
