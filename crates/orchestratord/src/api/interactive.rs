//! What every client-facing surface (OpenAI's `/v1`, Anthropic's `/v1/messages`, Ollama's
//! `/api`) does once its request is translated into an engine request: admit it as an
//! `interactive` task, read its events, wait for it to start before committing to a stream,
//! and cancel it when the client goes away (the request, or the stream that answers it, is
//! dropped). Embedding requests (`/v1/embeddings`, `/api/embed`) are read here too.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use llorch_wire::engine::{EmbedInput, GenerateRequest};
use llorch_wire::task::{Priority, TaskEnd};
use llorch_wire::{ErrorBody, ErrorCode};
use serde_json::Value;

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

/// An embedding request's `input` as the engine takes it: a string, a list of strings, a list
/// of token ids (one input), or a list of such lists, as OpenAI's `input` is (Ollama's is the
/// first two). Refusals name `input` or the item at fault.
pub(crate) fn embed_inputs(input: &Value) -> Result<Vec<EmbedInput>, ErrorBody> {
    let token = |v: &Value| v.as_u64().and_then(|t| u32::try_from(t).ok());
    let items = match input {
        Value::String(s) => return Ok(vec![EmbedInput::Text(s.clone())]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            let ids: Option<Vec<u32>> = items.iter().map(token).collect();
            return ids.map(|t| vec![EmbedInput::Tokens(t)]).ok_or_else(|| {
                ErrorBody::invalid("input", "input's token ids must be integers from 0")
            });
        }
        Value::Array(items) => items,
        _ => {
            return Err(ErrorBody::invalid(
                "input",
                "input must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
            ))
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(EmbedInput::Text(s.clone())),
            Value::Array(ids) => ids
                .iter()
                .map(token)
                .collect::<Option<Vec<u32>>>()
                .map(EmbedInput::Tokens)
                .ok_or_else(|| {
                    ErrorBody::invalid(
                        format!("input[{i}]"),
                        format!("input[{i}]'s token ids must be integers from 0"),
                    )
                }),
            _ => Err(ErrorBody::invalid(
                format!("input[{i}]"),
                format!("input[{i}] must be a string or a list of token ids"),
            )),
        })
        .collect()
}

/// Runs an embedding request to its end, at `interactive` priority like the other client
/// requests (placed, metered, recorded and cancelled on disconnect the same way): its end
/// carries the vectors, in input order, and the tokens read.
pub(crate) async fn embed(
    state: &AppState,
    cid: CorrelationId,
    client: String,
    model: String,
    (inputs, truncate): (Vec<EmbedInput>, bool),
    meter: &Meter,
) -> Result<TaskEnd, HttpRefusal> {
    let engine = GenerateRequest {
        embed: Some(inputs),
        embed_truncate: truncate,
        // Nothing is generated: the queue's prediction of its service time is one token's.
        max_tokens: Some(1),
        ..GenerateRequest::default()
    };
    engine
        .validate()
        .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let Admitted {
        mut follower,
        guard,
        ..
    } = admit(state, cid, client, model, engine, meter)?;
    let (_, end) = read_to_end(&mut follower).await?;
    drop(guard);
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_take_openais_four_shapes() {
        let text = |s: &str| EmbedInput::Text(s.into());
        assert_eq!(embed_inputs(&json!("a")).unwrap(), [text("a")]);
        assert_eq!(
            embed_inputs(&json!(["a", "b"])).unwrap(),
            [text("a"), text("b")]
        );
        assert_eq!(
            embed_inputs(&json!([1, 2])).unwrap(),
            [EmbedInput::Tokens(vec![1, 2])]
        );
        assert_eq!(
            embed_inputs(&json!([[1], [2, 3]])).unwrap(),
            [EmbedInput::Tokens(vec![1]), EmbedInput::Tokens(vec![2, 3])]
        );
        let field = |v: Value| embed_inputs(&v).unwrap_err().field.unwrap();
        assert_eq!(field(json!([1, -2])), "input");
        assert_eq!(field(json!(["a", {"b": 1}])), "input[1]");
        assert_eq!(field(json!([[1], [1.5]])), "input[1]");
        assert_eq!(field(json!(7)), "input");
    }
}
