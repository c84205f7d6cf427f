//! Running the task of an OpenAI request: it is admitted at `interactive` priority, its events
//! are read into one whole answer or handed to the stream, and it is cancelled when the client
//! goes away.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use llorch_wire::engine::GenerateRequest;
use llorch_wire::task::Priority;
use llorch_wire::{ErrorBody, ErrorCode};

use super::request::Common;
use super::response::{choice_of, whole_answer, Answer, Kind, Shape};
use super::{oai, stream, unix_now, Result};
use crate::api::{sse, status_for, ApiError, AppState, CorrelationId, Meter};
use crate::outcome::Api;
use crate::state::{State, Submission};
use crate::tasks::{Follower, Task, TaskEvent};

/// Cancels the task when the request (or its stream) is dropped before the task ended: the
/// client went away.
pub(super) struct CancelOnDrop {
    state: Arc<State>,
    task: Arc<Task>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self
            .state
            .cancel(&self.task, crate::outcome::CancelReason::Disconnect)
        {
            tracing::debug!(task_id = %self.task.id, "Client went away; task cancelled.");
        }
    }
}

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
    let (task, _) = oai(state.submit(Submission {
        task_id: None,
        model: model.clone(),
        request: engine,
        priority: Priority::Interactive,
        deadline_ms: None,
        session_id: None,
        hints: None,
        client,
        correlation_id: cid.0,
        ctx: None,
        api: meter.api,
    }))?;
    meter.admitted();
    let guard = CancelOnDrop {
        state: state.clone(),
        task: task.clone(),
    };
    let follower = Follower::new(task.clone());
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
    // Streaming: wait for the task to start, so a refusal is still an HTTP error. A start that
    // takes longer than the keep-alive interval (`--sse-keepalive-secs`: a long queue, a model
    // loading on demand) commits to the stream instead, and keep-alive comments flow until the
    // first text; a failure after that is an error chunk.
    let keep_alive = state.config.sse_keepalive;
    let first = match tokio::time::timeout(keep_alive, follower.next_batch()).await {
        Ok(batch) => {
            let first = batch.unwrap_or_default();
            if let Some(TaskEvent::Error(body)) = first.iter().find(|e| e.is_final()) {
                return Err(ApiError::openai((status_for(body.code), body.clone())));
            }
            Some(first)
        }
        Err(_) => None,
    };
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
