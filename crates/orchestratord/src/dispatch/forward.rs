//! Forwarding a placed task to its node: `POST /v2/pools/{id}/generate` (with a slot hint when
//! the task's session holds a KV cache there), then each engine event becomes a task event.
//! A failure before the stream starts gives the task back to the queue (up to
//! [`MAX_DISPATCH_ATTEMPTS`]); after that it is a final error event.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use llorch_client::{error_from_response, ClientError, EventStream, HttpClient};
use llorch_wire::engine::{EndEvent, EngineEvent, TokenEvent};
use llorch_wire::task::{MetricsEvent, StartedEvent, TaskEnd};
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::time::Instant;

use super::{Dispatched, Lease, MAX_DISPATCH_ATTEMPTS};
use crate::outcome::Decision;
use crate::state::State;
use crate::tasks::{Task, TaskEvent};

/// How long a dispatch retries an engine that says all its slots are busy (a cancelled stream's
/// slot is freed by the engine one decode step after orchestratord already returned the lease).
const BUSY_RETRY: Duration = Duration::from_millis(10);
const BUSY_RETRIES: u32 = 50;
/// How long the node may take to answer a task sent to a pool on standby, on top of the
/// stream idle limit: the engine loads the model first. A load that fails or hangs is ended by
/// the node's side (the engine exits, or systemd's start timeout), which breaks the request.
const COLD_START_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Why a dispatch gave its task back to the queue.
pub(super) enum Outcome {
    Done,
    /// The attempt failed before the stream started; `why` is the last failure, for the
    /// task's final error once its attempts are spent.
    Requeue {
        suspect: bool,
        why: String,
        /// The node itself could not be reached (connection or TLS), not its pool.
        unreachable: bool,
    },
}

/// Runs one dispatch of a placed task: forwards it, and ends it or gives it back to the queue
/// when the attempt failed before its stream started.
pub(super) async fn stream_task(state: Arc<State>, d: Dispatched) {
    let Dispatched {
        entry,
        mut lease,
        client,
        lost,
        slot_hint,
        cold,
    } = d;
    let task = entry.item.clone();
    let outcome = tokio::select! {
        o = forward(&state, &task, &mut lease, &client, slot_hint, cold) => o,
        _ = task.cancel.cancelled() => {
            lease.end(&task, ErrorBody::new(ErrorCode::Canceled, "the task was cancelled"), false)
        }
        _ = lost.cancelled() => {
            let why = format!("node {} stopped reporting while it ran this task; submit it again", lease.pool.0);
            lease.end(&task, ErrorBody::new(ErrorCode::NodeUnavailable, why), false)
        }
    };
    if let Outcome::Requeue {
        suspect,
        why,
        unreachable,
    } = outcome
    {
        let attempts = task.failed_attempts.fetch_add(1, Ordering::Relaxed) + 1;
        if attempts >= MAX_DISPATCH_ATTEMPTS {
            let body = if unreachable {
                // The node, not the request: say where it could not be reached.
                tracing::warn!(message_id = llorch_os::message_id::NODE_UNREACHABLE, task_id = %task.id, node_id = %lease.pool.0, attempts, reason = %why, "The node could not be reached on every attempt; ending the task.");
                ErrorBody::new(
                    ErrorCode::NodeUnavailable,
                    format!(
                        "the task was sent {attempts} times and the node could not be reached (last: {why}); an operator must check the node's address and that the control plane trusts its certificate"
                    ),
                )
            } else {
                tracing::warn!(task_id = %task.id, pool_id = %lease.pool.1, attempts, reason = %why, "The task failed on every attempt; ending it.");
                ErrorBody::new(
                    ErrorCode::EngineFailed,
                    format!(
                        "the task failed {attempts} times before its stream started (last: {why}); it may crash the engine, or the pools serving it are failing"
                    ),
                )
            };
            lease.end(&task, body, suspect);
            drop(lease);
            return;
        }
        state.metrics.decision(Decision::Requeued);
        let mut core = state.core();
        if suspect {
            core.registry.mark_suspect(&lease.pool);
        }
        if !task.cancel.is_cancelled() && !task.is_finished() {
            task.set_queued();
            core.queue.requeue(entry);
        }
        drop(core);
        if task.cancel.is_cancelled() && !task.is_finished() {
            lease.end(
                &task,
                ErrorBody::new(ErrorCode::Canceled, "the task was cancelled"),
                false,
            );
        }
    }
    // The lease drops here, after the upstream stream was dropped (which cancels the engine's
    // job), and wakes the dispatcher.
    drop(lease);
}

async fn forward(
    state: &Arc<State>,
    task: &Arc<Task>,
    lease: &mut Lease,
    client: &HttpClient,
    slot_hint: Option<u32>,
    cold: bool,
) -> Outcome {
    match send(state, task, lease, client, slot_hint, cold).await {
        Ok(resp) => relay(state, task, lease, client, resp).await,
        Err(outcome) => outcome,
    }
}

/// Sends the task to its pool and returns the node's answer once it is OK: an engine that says
/// all its slots are busy is asked again for a moment; any other refusal ends the attempt with
/// the task's [`Outcome`] (ended, or back to the queue).
async fn send(
    state: &Arc<State>,
    task: &Arc<Task>,
    lease: &mut Lease,
    client: &HttpClient,
    slot_hint: Option<u32>,
    cold: bool,
) -> Result<Response<Incoming>, Outcome> {
    let Some(mut request) = task.request() else {
        // It ended (cancelled) between placement and here: nothing to send.
        return Err(Outcome::Done);
    };
    request.slot = slot_hint;
    request.task_id = Some(task.id.clone());
    let body = bytes::Bytes::from(serde_json::to_vec(&request).expect("requests serialize"));
    let path = format!("/v2/pools/{}/generate", lease.pool.1);
    let headers = [(
        HeaderName::from_static("x-correlation-id"),
        HeaderValue::from_str(&task.correlation_id).unwrap_or(HeaderValue::from_static("invalid")),
    )];
    let mut busy_retries = 0;
    let idle = state.config.stream_idle;
    let first_answer = if cold { idle + COLD_START_LIMIT } else { idle };
    loop {
        let answered =
            tokio::time::timeout(first_answer, client.post_raw(&path, body.clone(), &headers))
                .await
                .unwrap_or_else(|_| {
                    Err(ClientError::Transport {
                        address: client.address().to_string(),
                        reason: format!("no answer within {} s", first_answer.as_secs()),
                    })
                });
        match answered {
            // No request can be formed for this node (registration validates addresses and
            // ids, so this is a bug, never input): end the task with a typed error rather than
            // requeue it forever or panic.
            Err(e @ ClientError::Request { .. }) => {
                tracing::error!(task_id = %task.id, pool_id = %lease.pool.1, node_id = %lease.pool.0, error = %e, "Cannot form a request to the node.");
                let why = format!("cannot send the task to node {}: {e}", lease.pool.0);
                return Err(lease.end(
                    task,
                    ErrorBody::new(ErrorCode::NodeUnavailable, why),
                    false,
                ));
            }
            Err(e) => {
                tracing::warn!(task_id = %task.id, pool_id = %lease.pool.1, node_id = %lease.pool.0, error = %e, "Node unreachable; task goes back to the queue.");
                return Err(Outcome::Requeue {
                    suspect: true,
                    why: e.to_string(),
                    unreachable: matches!(e, ClientError::Unreachable { .. }),
                });
            }
            Ok(resp) if resp.status() == StatusCode::OK => return Ok(resp),
            Ok(resp) => {
                let status = resp.status();
                let err = error_from_response(resp).await;
                let body = match &err {
                    ClientError::Status { body: Some(b), .. } => (**b).clone(),
                    other => ErrorBody::new(ErrorCode::Internal, other.to_string()),
                };
                match (status, body.code) {
                    (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::PoolUnavailable)
                        if busy_retries < BUSY_RETRIES =>
                    {
                        busy_retries += 1;
                        tokio::time::sleep(BUSY_RETRY).await;
                    }
                    // The engine refused the request itself (too long for a slot, …), or the
                    // node cannot make room for the model (what holds the memory is named):
                    // the client's answer, not a reason to try again.
                    (StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE, _)
                    | (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::InsufficientMemory) => {
                        return Err(lease.end(task, body, false));
                    }
                    // The engine took the request and died before answering it: the
                    // request may be what kills it (a hostile grammar or prompt), so it is
                    // not sent to the next pool, which it would kill too. The node restarts
                    // the engine; the pool is skipped until the node reports again.
                    (StatusCode::BAD_GATEWAY, ErrorCode::EngineFailed) => {
                        tracing::warn!(task_id = %task.id, pool_id = %lease.pool.1, reason = %body.message, "The engine failed while taking the task; ending the task instead of trying another pool.");
                        let why = format!(
                            "the engine of pool {} failed while taking this task ({}); it is not retried on another pool in case the request itself crashes engines",
                            lease.pool.1, body.message
                        );
                        let body = ErrorBody {
                            retriable: false,
                            ..ErrorBody::new(ErrorCode::EngineFailed, why)
                        };
                        return Err(lease.end(task, body, true));
                    }
                    (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => {
                        tracing::warn!(node_id = %lease.pool.0, "The node refused orchestratord's node token.");
                        let why = format!("node {} refused the control plane's token; an operator must fix the node tokens", lease.pool.0);
                        return Err(lease.end(
                            task,
                            ErrorBody::new(ErrorCode::NodeUnavailable, why),
                            false,
                        ));
                    }
                    // Not ready, draining, still busy after the retries, unknown pool, engine
                    // failed before answering: the pool is skipped until its node reports
                    // again, and the task waits in the queue.
                    _ => {
                        tracing::info!(task_id = %task.id, pool_id = %lease.pool.1, status = %status, reason = %body.message, "Pool cannot take the task; it goes back to the queue.");
                        return Err(Outcome::Requeue {
                            unreachable: false,
                            suspect: true,
                            why: format!(
                                "pool {} answered {status}: {}",
                                lease.pool.1, body.message
                            ),
                        });
                    }
                }
            }
        }
    }
}

/// Relays the engine's events into the task's log, from `started` to its final event.
async fn relay(
    state: &Arc<State>,
    task: &Arc<Task>,
    lease: &mut Lease,
    client: &HttpClient,
    resp: Response<Incoming>,
) -> Outcome {
    let idle = state.config.stream_idle;
    lease.measured = true;
    let started_at = Instant::now();
    let queue_wait = started_at.duration_since(task.submitted);
    state.metrics.started(queue_wait);
    let queue_ms = queue_wait.as_millis() as u64;
    task.push(TaskEvent::Started(StartedEvent {
        task_id: task.id.clone(),
        pool_id: lease.pool.1.clone(),
        node_id: lease.pool.0.clone(),
        queue_ms,
    }));
    let mut events =
        match EventStream::from_response(resp, std::path::Path::new(client.address())).await {
            Ok(e) => e,
            Err(e) => {
                return lease.end(
                    task,
                    ErrorBody::new(ErrorCode::EngineFailed, e.to_string()),
                    false,
                );
            }
        };
    let mut first_token: Option<Instant> = None;
    let mut i = 0u32;
    let mut tokens = Vec::new();
    loop {
        // Take what already arrived in one go: a burst of tokens becomes one append to the
        // task's log and one wake-up of its readers, not one each.
        let next = match events.next_ready_event() {
            Some(ev) => Some(ev),
            None => {
                task.push_tokens(std::mem::take(&mut tokens));
                match tokio::time::timeout(idle, events.next_event()).await {
                    Ok(ev) => ev,
                    Err(_) => {
                        tracing::warn!(task_id = %task.id, pool_id = %lease.pool.1, idle_secs = idle.as_secs(), "No event from the engine; ending the task.");
                        let why = format!(
                            "pool {} sent nothing for {} s; the engine may be stuck (retry the request)",
                            lease.pool.1,
                            idle.as_secs()
                        );
                        return lease.end(task, ErrorBody::new(ErrorCode::EngineFailed, why), true);
                    }
                }
            }
        };
        match next {
            Some(Ok(EngineEvent::Token(t))) => {
                if first_token.is_none() {
                    let now = Instant::now();
                    first_token = Some(now);
                    let _ = task.first_token.set(now);
                }
                tokens.push(TaskEvent::Token(TokenEvent { i, ..t }));
                i += 1;
                continue;
            }
            _ => task.push_tokens(std::mem::take(&mut tokens)),
        }
        match next {
            Some(Ok(EngineEvent::Token(_))) => unreachable!("handled above"),
            Some(Ok(EngineEvent::End(end))) => {
                complete(state, task, lease, end, first_token, queue_ms);
                return Outcome::Done;
            }
            Some(Ok(EngineEvent::Error(body))) => {
                let suspect = body.code == ErrorCode::EngineFailed;
                return lease.end(task, body, suspect);
            }
            Some(Err(e)) => {
                let why = format!("the stream from pool {} broke: {e}", lease.pool.1);
                return lease.end(task, ErrorBody::new(ErrorCode::EngineFailed, why), true);
            }
            None => {
                let why = format!(
                    "the stream from pool {} ended without an end event",
                    lease.pool.1
                );
                return lease.end(task, ErrorBody::new(ErrorCode::EngineFailed, why), true);
            }
        }
    }
}

/// Ends the task with its `end` event: the slot is returned first, then the metrics event, the
/// session's turn and the end.
fn complete(
    state: &Arc<State>,
    task: &Arc<Task>,
    lease: &mut Lease,
    end: EndEvent,
    first_token: Option<Instant>,
    queue_ms: u64,
) {
    // The slot is free before the client can see the end.
    lease.release();
    let now = Instant::now();
    let first = first_token.unwrap_or(now);
    let decode = now.duration_since(first);
    task.push(TaskEvent::Metrics(MetricsEvent {
        tokens_out: end.completion_tokens,
        cached_tokens: end.cached_tokens,
        tokens_per_second: if decode.as_secs_f64() > 0.0 {
            end.completion_tokens.saturating_sub(1) as f64 / decode.as_secs_f64()
        } else {
            0.0
        },
    }));
    if let Some(s) = &task.session_id {
        let evicted =
            state
                .core()
                .sessions
                .record(&task.client, s, lease.pool.clone(), end.slot, now);
        if evicted {
            state.metrics.evicted("sessions");
        }
    }
    state.complete(
        task,
        TaskEnd {
            task_id: task.id.clone(),
            tokens_in: end.prompt_tokens,
            cached_tokens: end.cached_tokens,
            tokens_out: end.completion_tokens,
            queue_ms,
            ttft_ms: first.duration_since(task.submitted).as_millis() as u64,
            decode_time_ms: decode.as_millis() as u64,
            finish_reason: end.finish_reason,
            choices: end.choices,
            stop_sequence: end.stop_sequence,
            embeddings: end.embeddings,
        },
    );
}
