//! Anthropic's Messages API: `POST /v1/messages` (whole and streamed) and
//! `POST /v1/messages/count_tokens`, with Anthropic's error envelope. A request is translated
//! into the same engine request as `/v1/chat/completions` and goes through the same admission
//! (`interactive` priority), placement, metrics (`api="anthropic_messages"`), journal record and
//! cancellation on disconnect. The key is read from `x-api-key` or `Authorization: Bearer`.
//!
//! - this file: the routes' handlers, from the request to the task and back;
//! - [`request`]: the body, its content blocks and tools, the engine request they become;
//! - [`response`]: the whole `message`, stop reasons, usage, the error envelope;
//! - [`stream`]: the event stream of a streamed answer.

mod request;
mod response;
mod stream;

use axum::body::Body;
use axum::extract::State as Ext;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use llorch_wire::ErrorBody;
use serde_json::json;

use super::interactive::{admit, first_events, read_to_end, Admitted};
use super::{
    authenticate, parse, read_body, sse, ApiError, AppState, CorrelationId, HttpRefusal, Meter,
};
use crate::outcome::Api;
use request::{rename_field, MessagesRequest};
pub use response::error_envelope;
use response::Shape;

type Result<T> = std::result::Result<T, ApiError>;

fn ant<T>(r: std::result::Result<T, impl Into<HttpRefusal>>) -> Result<T> {
    r.map_err(ApiError::anthropic)
}

fn bad(e: ErrorBody) -> ApiError {
    ApiError::anthropic((StatusCode::BAD_REQUEST, rename_field(e)))
}

/// Authenticates and decodes a request body.
async fn decode(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    meter: &Meter,
) -> Result<(String, MessagesRequest)> {
    let client = ant(authenticate(state, headers))?;
    let bytes = ant(read_body(state, body).await)?;
    let req: MessagesRequest = ant(parse(&bytes))?;
    meter.model(&req.model);
    Ok((client, req))
}

/// `POST /v1/messages`.
pub async fn messages(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    Meter::run(Api::AnthropicMessages, &state.clone(), async |m| {
        messages_request(state, cid, headers, body, m).await
    })
    .await
}

async fn messages_request(
    state: AppState,
    cid: CorrelationId,
    headers: HeaderMap,
    body: Body,
    meter: &Meter,
) -> Result<Response> {
    let (client, req) = decode(&state, &headers, body, meter).await?;
    let Some(max_tokens) = req.max_tokens else {
        return Err(bad(ErrorBody::invalid(
            "max_tokens",
            "max_tokens: field required (the most tokens the answer may have)",
        )));
    };
    let (model, stream) = (req.model.clone(), req.stream == Some(true));
    let engine = req.into_engine().map_err(bad)?;
    engine.validate().map_err(bad)?;
    let tools = engine.effective_tool_choice();
    let Admitted {
        task,
        mut follower,
        guard,
    } = ant(admit(&state, cid, client, model.clone(), engine, meter))?;
    let shape = Shape {
        id: format!("msg_{}", &task.id[5..]),
        model,
        tools,
        max_tokens,
    };
    if !stream {
        let (text, end) = ant(read_to_end(&mut follower).await)?;
        drop(guard);
        return Ok(Json(response::message(&shape, text, &end)).into_response());
    }
    let keep_alive = state.config.sse_keepalive;
    let first = ant(first_events(&mut follower, keep_alive).await)?;
    let (tx, resp) = sse::channel();
    tokio::spawn(stream::pump(tx, follower, guard, shape, keep_alive, first));
    Ok(resp)
}

/// `POST /v1/messages/count_tokens`: the prompt the request would have, as the model's
/// engine renders and tokenizes it (tools included). It is placed like any request, and the
/// engine answers without decoding or taking a slot.
pub async fn count_tokens(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    Meter::run(Api::AnthropicMessages, &state.clone(), async |m| {
        count_request(state, cid, headers, body, m).await
    })
    .await
}

async fn count_request(
    state: AppState,
    cid: CorrelationId,
    headers: HeaderMap,
    body: Body,
    meter: &Meter,
) -> Result<Response> {
    let (client, req) = decode(&state, &headers, body, meter).await?;
    if let Some(field) = [
        ("max_tokens", req.max_tokens.is_some()),
        ("stream", req.stream.is_some()),
    ]
    .iter()
    .find_map(|(f, given)| given.then_some(*f))
    {
        return Err(bad(ErrorBody::invalid(
            field,
            format!("{field}: count_tokens does not take this field"),
        )));
    }
    let model = req.model.clone();
    let mut engine = req.into_engine().map_err(bad)?;
    engine.count_only = true;
    // Nothing is generated: the queue's prediction of its service time is one token's.
    engine.max_tokens = Some(1);
    engine.validate().map_err(bad)?;
    let Admitted {
        mut follower,
        guard,
        ..
    } = ant(admit(&state, cid, client, model, engine, meter))?;
    let (_, end) = ant(read_to_end(&mut follower).await)?;
    drop(guard);
    Ok(Json(json!({"input_tokens": end.tokens_in})).into_response())
}
