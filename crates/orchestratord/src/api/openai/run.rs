//! Running the task of an OpenAI request: it is admitted at `interactive` priority, its events
//! are read into one whole answer or handed to the stream, and it is cancelled when the client
//! goes away.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use llorch_wire::engine::GenerateRequest;
use llorch_wire::{ErrorBody, ErrorCode};

use super::request::Common;
use super::response::{choice_of, whole_answer, Answer, Kind, Shape};
use super::{oai, stream, unix_now, Result};
use crate::api::interactive::{admit, first_events, Admitted, CancelOnDrop};
use crate::api::{sse, status_for, ApiError, AppState, CorrelationId, Meter};
use crate::outcome::Api;
use crate::tasks::{Follower, TaskEvent};

pub(super) async fn run(
    state: AppState,
    cid: CorrelationId,
    client: String,
    model: String,
    engine: GenerateRequest,
    common: &Common,
    meter: &Meter,
) -> Result<Response> {
    let kind = match meter.api {
        Api::OpenAiCompletions => Kind::Completion,
        _ => Kind::Chat,
    };
    oai(engine.validate().map_err(|e| (StatusCode::BAD_REQUEST, e)))?;
    let with_logprobs = engine.logprobs.is_some();
    // With tools in play the whole answer is read before it is known to be calls or text.
    let tools = engine.effective_tool_choice();
    let n = engine.n.unwrap_or(1);
    let Admitted {
        task,
        follower,
        guard,
    } = oai(admit(&state, cid, client, model.clone(), engine, meter))?;
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{}", &task.id[5..]),
        Kind::Completion => format!("cmpl-{}", &task.id[5..]),
    };
    let shape = Shape {
        kind,
        id,
        created: unix_now(),
        model,
        n,
        with_logprobs,
        tools,
    };
    if common.stream != Some(true) {
        return whole(follower, guard, &shape).await;
    }
    streamed(&state, follower, guard, shape, common.include_usage()).await
}

/// Reads the task to its end and answers with the whole `chat.completion` /
/// `text_completion`, or with the task's error.
async fn whole(mut follower: Follower, guard: CancelOnDrop, shape: &Shape) -> Result<Response> {
    let n = shape.n;
    let mut answers: Vec<Answer> = (0..n).map(|_| Answer::default()).collect();
    while let Some(events) = follower.next_batch().await {
        for e in events {
            match e {
                TaskEvent::Token(t) => answers[choice_of(&t, n)].add(t),
                TaskEvent::End(end) => {
                    drop(guard);
                    let answer = whole_answer(shape, answers, &end);
                    return Ok(Json(answer).into_response());
                }
                TaskEvent::Error(body) => {
                    return Err(ApiError::openai((status_for(body.code), body)));
                }
                _ => {}
            }
        }
    }
    Err(ApiError::openai((
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorBody::new(ErrorCode::Internal, "the task ended without a result"),
    )))
}

/// Answers with a stream ([`stream::pump`]) once the task started.
async fn streamed(
    state: &AppState,
    mut follower: Follower,
    guard: CancelOnDrop,
    shape: Shape,
    include_usage: bool,
) -> Result<Response> {
    let keep_alive = state.config.sse_keepalive;
    let first = oai(first_events(&mut follower, keep_alive).await)?;
    let (tx, resp) = sse::channel();
    tokio::spawn(stream::pump(
        tx,
        follower,
        guard,
        shape,
        include_usage,
        keep_alive,
        first,
    ));
    Ok(resp)
}
