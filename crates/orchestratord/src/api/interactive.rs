//! What every client-facing surface (OpenAI's `/v1`, Anthropic's `/v1/messages`) does once its
//! request is translated into an engine request: admit it as an `interactive` task, read its
//! events, wait for it to start before committing to a stream, and cancel it when the client
//! goes away (the request, or the stream that answers it, is dropped).

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use llorch_wire::engine::GenerateRequest;
use llorch_wire::task::{Priority, TaskEnd};
use llorch_wire::{ErrorBody, ErrorCode};

use super::{status_for, AppState, CorrelationId, HttpRefusal, Meter};
use crate::state::{State, Submission};
use crate::tasks::{Follower, Task, TaskEvent};

/// Cancels the task when the request (or its stream) is dropped before the task ended: the
/// client went away, and its slot is freed.
pub(crate) struct CancelOnDrop {
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

/// An admitted task: its events to read, and the guard that cancels it when dropped early.
pub(crate) struct Admitted {
    pub(crate) task: Arc<Task>,
    pub(crate) follower: Follower,
    pub(crate) guard: CancelOnDrop,
}

/// Admits a validated engine request at `interactive` priority, for `client`.
pub(crate) fn admit(
    state: &AppState,
    cid: CorrelationId,
    client: String,
    model: String,
    engine: GenerateRequest,
    meter: &Meter,
) -> Result<Admitted, HttpRefusal> {
    let (task, _) = state.submit(Submission {
        task_id: None,
        model,
        request: engine,
        priority: Priority::Interactive,
        deadline_ms: None,
        session_id: None,
        hints: None,
        client,
        correlation_id: cid.0,
        ctx: None,
        api: meter.api,
    })?;
    meter.admitted();
    Ok(Admitted {
        guard: CancelOnDrop {
            state: state.clone(),
            task: task.clone(),
        },
        follower: Follower::new(task.clone()),
        task,
    })
}

/// Reads a task to its end (an answer that is not streamed): its whole text and how it
/// ended, or the task's error.
pub(crate) async fn read_to_end(follower: &mut Follower) -> Result<(String, TaskEnd), HttpRefusal> {
    let mut text = String::new();
    while let Some(events) = follower.next_batch().await {
        for e in events {
            match e {
                TaskEvent::Token(t) => text.push_str(&t.t),
                TaskEvent::End(end) => return Ok((text, end)),
                TaskEvent::Error(body) => return Err((status_for(body.code), body)),
                _ => {}
            }
        }
    }
    Err((
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorBody::new(ErrorCode::Internal, "the task ended without a result"),
    ))
}

/// Before a stream is committed to: waits for the task's first events, so a refusal (a full
/// queue, a failed placement) is still an HTTP error. A start that takes longer than
/// `keep_alive` (a long queue, a model loading on demand) commits to the stream instead
/// (`Ok(None)`), and the stream sends keep-alives until the first text.
pub(crate) async fn first_events(
    follower: &mut Follower,
    keep_alive: Duration,
) -> Result<Option<Vec<TaskEvent>>, HttpRefusal> {
    match tokio::time::timeout(keep_alive, follower.next_batch()).await {
        Ok(batch) => {
            let first = batch.unwrap_or_default();
            if let Some(TaskEvent::Error(body)) = first.iter().find(|e| e.is_final()) {
                return Err((status_for(body.code), body.clone()));
            }
            Ok(Some(first))
        }
        Err(_) => Ok(None),
    }
}
