//! Dispatch: the loop that takes queued tasks in order, places them, leases a slot and streams
//! each task from its node; and the lease that returns the slot exactly once.
//!
//! A task whose pool turns out not to be ready (the node says so, or cannot be reached before
//! the stream starts) goes back to its place in the queue and the pool is skipped until its
//! node reports again. Once a stream has started, a failure ends the task with a typed error
//! event (`ENGINE_FAILED`, `NODE_UNAVAILABLE`, `CANCELED`), never a silent truncation.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};
use hyper::StatusCode;
use llorch_client::{error_from_response, ClientError, EventStream, HttpClient};
use llorch_wire::engine::{EngineEvent, TokenEvent};
use llorch_wire::task::{MetricsEvent, StartedEvent, TaskEnd};
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::Entry;
use crate::metrics::{Decision, Rejection};
use crate::placement::{place, Ask, Placement};
use crate::registry::PoolKey;
use crate::state::{Core, State};
use crate::tasks::{Task, TaskEvent};

/// How long a dispatch retries an engine that says all its slots are busy (a cancelled stream's
/// slot is freed by the engine one decode step after orchestratord already returned the lease).
const BUSY_RETRY: Duration = Duration::from_millis(10);
const BUSY_RETRIES: u32 = 50;
/// How long the node may take to answer a task sent to a pool on standby, on top of the
/// stream idle limit: the engine loads the model first. A load that fails or hangs is ended by
/// the node's side (the engine exits, or systemd's start timeout), which breaks the request.
const COLD_START_LIMIT: Duration = Duration::from_secs(15 * 60);

/// How many times a task may be sent to a pool whose node or engine then fails before the
/// stream starts. A request that crashes its engine each time must not crash it forever (and
/// mark the pool suspect each time); after this many it ends with `ENGINE_FAILED`.
pub const MAX_DISPATCH_ATTEMPTS: u32 = 3;

/// A leased slot. It is returned exactly once: explicitly before a task's final event (so a
/// client that saw `end` finds the slot free for its next request), or by `Drop` on any other
/// path, so none can leak it.
pub struct Lease {
    state: Arc<State>,
    pub pool: PoolKey,
    model: String,
    since: Instant,
    /// Whether the hold time counts toward the service rate (false when the task never ran).
    measured: bool,
    released: bool,
}

impl Lease {
    /// Returns the slot now; later calls and the drop do nothing.
    pub fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let held = self.measured.then(|| self.since.elapsed());
        self.state
            .core()
            .registry
            .release(&self.pool, &self.model, held);
        self.state.wake.notify_one();
    }
}

impl Lease {
    /// Ends the task with `body` once its slot is back; with `suspect`, the pool is skipped
    /// until its node reports again (the failure was the pool's).
    fn end(&mut self, task: &Task, body: ErrorBody, suspect: bool) -> Outcome {
        if suspect {
            self.state.core().registry.mark_suspect(&self.pool);
        }
        self.release();
        self.state.finish(task, body);
        Outcome::Done
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
    }
}

struct Dispatched {
    entry: Entry<Arc<Task>>,
    lease: Lease,
    client: HttpClient,
    lost: CancellationToken,
    slot_hint: Option<u32>,
    /// Placed on a pool on standby: the first answer waits for the model to load.
    cold: bool,
}

/// Why a queued task leaves the queue without running.
enum Unplaced {
    /// Cancelled while a dispatch gave it back.
    Cancelled,
    /// Placement says it can never run (its pin names a pool that no longer serves it, ...).
    Impossible(String),
    /// No pool serves its model: nobody registered it after a restart.
    UnknownModel(String),
}

/// Runs until shutdown: expires deadlines, places what can be placed, starts the streams.
pub async fn run(state: Arc<State>) {
    // The watchdog is fed from this loop: if dispatching wedges, the service manager restarts
    // the daemon. A tick every second keeps an idle loop turning, and refreshes the status line.
    let mut watchdog = llorch_os::service::Watchdog::from_env();
    let mut tick = tokio::time::interval(watchdog.wait(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = String::new();
    loop {
        watchdog.feed();
        let (expired, impossible, started, next_deadline) = take_work(&state);
        for e in expired {
            state.metrics.rejected(Rejection::Expired);
            state.finish(
                &e.item,
                ErrorBody::new(
                    ErrorCode::DeadlineUnmet,
                    "the task's deadline_ms passed while it waited in the queue",
                ),
            );
        }
        for (e, why) in impossible {
            let body = match why {
                _ if e.item.cancel.is_cancelled() => {
                    ErrorBody::new(ErrorCode::Canceled, "the task was cancelled")
                }
                Unplaced::Cancelled => {
                    ErrorBody::new(ErrorCode::Canceled, "the task was cancelled")
                }
                Unplaced::Impossible(reason) => {
                    state.metrics.decision(Decision::Impossible);
                    ErrorBody::new(
                        ErrorCode::PoolUnavailable,
                        format!("the task can no longer be placed: {reason}"),
                    )
                }
                Unplaced::UnknownModel(reason) => {
                    state.metrics.decision(Decision::Impossible);
                    ErrorBody {
                        field: Some("model".into()),
                        ..ErrorBody::new(
                            ErrorCode::ModelNotFound,
                            format!("{reason}: no node registered it after orchestratord started (see GET /v1/models)"),
                        )
                    }
                }
            };
            state.finish(&e.item, body);
        }
        for d in started {
            tokio::spawn(stream_task(state.clone(), d));
        }
        let sleep = async {
            match next_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = state.wake.notified() => {}
            _ = sleep => {}
            _ = tick.tick() => {
                let line = state.status_line();
                if line != last_status {
                    llorch_os::service::status(&line);
                    last_status = line;
                }
            }
            _ = state.shutdown.cancelled() => return,
        }
    }
}

/// Tasks of a model looked at in one pass beyond its free slots: room for tasks that wait for
/// a particular pool (a session's, a pinned one) while later ones could start elsewhere.
const SCAN_SLACK: usize = 64;

#[allow(clippy::type_complexity)]
fn take_work(
    state: &Arc<State>,
) -> (
    Vec<Entry<Arc<Task>>>,
    Vec<(Entry<Arc<Task>>, Unplaced)>,
    Vec<Dispatched>,
    Option<Instant>,
) {
    let now = Instant::now();
    let mut guard = state.core();
    let core = &mut *guard;
    let awaiting = state.awaiting_registrations(&core.registry, now);
    let expired = core.queue.expire(now);
    let mut impossible = Vec::new();
    let mut started = Vec::new();
    // Leases taken by this pass, applied once the snapshot (which borrows the registry) ends.
    let mut leased: Vec<PoolKey> = Vec::new();
    let Core {
        queue,
        registry,
        sessions,
    } = core;
    // No snapshot without work: heartbeats wake this loop too, and a snapshot of thousands of
    // pools is the pass's largest cost.
    let models: Vec<String> = queue.models().map(str::to_string).collect();
    let mut candidates = if models.is_empty() {
        Vec::new()
    } else {
        // Only the pools of the models that wait: in a large cluster, a small part.
        let wanted: std::collections::HashSet<&str> = models.iter().map(String::as_str).collect();
        registry.candidates_for(|m| wanted.contains(m))
    };
    // Model by model (a pool serves one model, so models never compete for a slot), and within
    // a model in dispatch order, looking at most at its free slots plus SCAN_SLACK tasks: a
    // pass costs what it can place, not the queue's length.
    for model in &models {
        let served = candidates.iter().any(|c| c.model_id == *model);
        let mut free: u32 = candidates
            .iter()
            .filter(|c| c.model_id == *model && (c.serving() || c.standby() || c.waking()))
            .fold(0u32, |n, c| n.saturating_add(c.free_slots));
        // A model nobody serves: its tasks are all impossible (unless nodes may still be
        // registering), so all of them are looked at once.
        let budget = if served {
            if free == 0 {
                continue;
            }
            free as usize + SCAN_SLACK
        } else if awaiting {
            continue;
        } else {
            usize::MAX
        };
        let order: Vec<Arc<Task>> = queue
            .of_model(model)
            .take(budget)
            .map(|e| e.item.clone())
            .collect();
        for task in order {
            if served && free == 0 {
                break;
            }
            if task.cancel.is_cancelled() {
                // Cancelled while a dispatch gave it back: end it here.
                if let Some(e) = queue.remove(&task.key) {
                    impossible.push((e, Unplaced::Cancelled));
                }
                continue;
            }
            let session = task
                .session_id
                .as_deref()
                .and_then(|s| sessions.get(&task.client, s, now))
                .cloned();
            let ask = Ask {
                model: &task.model,
                session_pool: session
                    .as_ref()
                    .map(|s| (s.pool.0.as_str(), s.pool.1.as_str())),
                hints: task.hints.as_ref(),
                slot_wait: registry.slot_wait(&candidates, &task.model),
            };
            match place(&candidates, &ask) {
                Placement::Wait { .. } => {}
                Placement::Impossible { reason } => {
                    if let Some(e) = queue.remove(&task.key) {
                        // A model nobody registered (the grace after a restart is over) is
                        // not found, as it would have been at admission.
                        let why = if served {
                            Unplaced::Impossible(reason)
                        } else {
                            Unplaced::UnknownModel(reason)
                        };
                        impossible.push((e, why));
                    }
                }
                Placement::Place {
                    pool_id,
                    node_id,
                    reasons,
                } => {
                    let Some(node) = registry.nodes.get(&node_id) else {
                        continue;
                    };
                    let (client, lost) = (node.client.clone(), node.lost.clone());
                    let Some(entry) = queue.take(&task.key) else {
                        continue;
                    };
                    tracing::debug!(task_id = %task.id, pool_id = %pool_id, ?reasons, "Placed.");
                    state.metrics.decision(Decision::Placed);
                    let key: PoolKey = (node_id, pool_id);
                    leased.push(key.clone());
                    let mut cold = false;
                    if let Some(c) = candidates
                        .iter_mut()
                        .find(|c| c.node_id == key.0 && c.pool_id == key.1)
                    {
                        c.free_slots = c.free_slots.saturating_sub(1);
                        cold = c.standby() || c.waking();
                    }
                    free = free.saturating_sub(1);
                    let slot_hint = session.filter(|s| s.pool == key).map(|s| s.slot);
                    started.push(Dispatched {
                        entry,
                        lease: Lease {
                            state: state.clone(),
                            pool: key,
                            model: task.model.clone(),
                            since: now,
                            measured: false,
                            released: false,
                        },
                        client,
                        lost,
                        slot_hint,
                        cold,
                    });
                }
            }
        }
    }
    drop(candidates);
    for key in &leased {
        registry.lease(key);
    }
    let next = queue.next_deadline();
    (expired, impossible, started, next)
}

/// Why a dispatch gave its task back to the queue.
enum Outcome {
    Done,
    /// The attempt failed before the stream started; `why` is the last failure, for the
    /// task's final error once its attempts are spent.
    Requeue {
        suspect: bool,
        why: String,
    },
}

async fn stream_task(state: Arc<State>, d: Dispatched) {
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
    if let Outcome::Requeue { suspect, why } = outcome {
        let attempts = task.failed_attempts.fetch_add(1, Ordering::Relaxed) + 1;
        if attempts >= MAX_DISPATCH_ATTEMPTS {
            tracing::warn!(task_id = %task.id, pool_id = %lease.pool.1, attempts, reason = %why, "The task failed on every attempt; ending it.");
            let why = format!(
                "the task failed {attempts} times before its stream started (last: {why}); it may crash the engine, or the pools serving it are failing"
            );
            lease.end(&task, ErrorBody::new(ErrorCode::EngineFailed, why), suspect);
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
    let Some(mut request) = task.request() else {
        // It ended (cancelled) between placement and here: nothing to send.
        return Outcome::Done;
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
    let resp = loop {
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
                return lease.end(task, ErrorBody::new(ErrorCode::NodeUnavailable, why), false);
            }
            Err(e) => {
                tracing::warn!(task_id = %task.id, pool_id = %lease.pool.1, node_id = %lease.pool.0, error = %e, "Node unreachable; task goes back to the queue.");
                return Outcome::Requeue {
                    suspect: true,
                    why: e.to_string(),
                };
            }
            Ok(resp) if resp.status() == StatusCode::OK => break resp,
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
                    // The engine refused the request itself (too long for a slot, …): the
                    // client's error.
                    (StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE, _) => {
                        return lease.end(task, body, false);
                    }
                    (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => {
                        tracing::warn!(node_id = %lease.pool.0, "The node refused orchestratord's node token.");
                        let why = format!("node {} refused the control plane's token; an operator must fix the node tokens", lease.pool.0);
                        return lease.end(
                            task,
                            ErrorBody::new(ErrorCode::NodeUnavailable, why),
                            false,
                        );
                    }
                    // Not ready, draining, still busy after the retries, unknown pool, engine
                    // failed before answering: the pool is skipped until its node reports
                    // again, and the task waits in the queue.
                    _ => {
                        tracing::info!(task_id = %task.id, pool_id = %lease.pool.1, status = %status, reason = %body.message, "Pool cannot take the task; it goes back to the queue.");
                        return Outcome::Requeue {
                            suspect: true,
                            why: format!(
                                "pool {} answered {status}: {}",
                                lease.pool.1, body.message
                            ),
                        };
                    }
                }
            }
        }
    };
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
                    let evicted = state.core().sessions.record(
                        &task.client,
                        s,
                        lease.pool.clone(),
                        end.slot,
                        now,
                    );
                    if evicted {
                        state.metrics.evicted("sessions");
                    }
                }
                state.complete(
                    task,
                    TaskEnd {
                        task_id: task.id.clone(),
                        tokens_in: end.prompt_tokens,
                        tokens_out: end.completion_tokens,
                        queue_ms,
                        ttft_ms: first.duration_since(task.submitted).as_millis() as u64,
                        decode_time_ms: decode.as_millis() as u64,
                        finish_reason: end.finish_reason,
                        choices: end.choices,
                    },
                );
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

/// Marks nodes offline that stopped heartbeating; runs until shutdown.
pub async fn watch_nodes(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut awaiting = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        let now = Instant::now();
        if awaiting && !state.awaiting_registrations(&state.core().registry, now) {
            // The registration grace is over: tasks still waiting for an unknown model end.
            awaiting = false;
            state.fail_unknown_models();
        }
        let (lost, forgotten) = {
            let mut core = state.core();
            core.sessions.purge(now);
            let lost = core.registry.expire_nodes(now);
            (lost, core.registry.forget_nodes(now))
        };
        for node in forgotten {
            state.metrics.evicted("nodes");
            tracing::info!(node_id = %node, "Node offline for an hour; forgotten (it registers again when it is back).");
        }
        for node in lost {
            state.metrics.node_event("lost");
            state.announce(crate::events::Event::NodeLost {
                node: node.clone(),
                reason: "missed its heartbeats".into(),
            });
            tracing::warn!(
                message_id = llorch_os::message_id::NODE_LOST,
                node_id = %node,
                "Node missed its heartbeats; marked offline."
            );
        }
    }
}
