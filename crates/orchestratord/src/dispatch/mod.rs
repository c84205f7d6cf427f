//! Dispatch: the loop that takes queued tasks in order, places them, leases a slot and starts
//! each task's stream from its node.
//!
//! A task whose pool turns out not to be ready (the node says so, or cannot be reached before
//! the stream starts) goes back to its place in the queue and the pool is skipped until its
//! node reports again. Once a stream has started, a failure ends the task with a typed error
//! event (`ENGINE_FAILED`, `NODE_UNAVAILABLE`, `CANCELED`), never a silent truncation.
//!
//! - this file: the dispatcher loop and one pass of it ([`take_work`]);
//! - [`lease`]: the slot lease, returned exactly once;
//! - [`forward`]: sending a placed task to its node and relaying the engine's events;
//! - [`liveness`]: the watcher that marks silent nodes offline.

mod forward;
mod lease;
mod liveness;

use std::sync::Arc;
use std::time::Duration;

use llorch_client::HttpClient;
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::{Entry, Queue};
use crate::outcome::{Decision, Rejection};
use crate::placement::{place, Ask, Candidate, Placement};
use crate::registry::{PoolKey, Registry, Sessions};
use crate::state::{Core, State};
use crate::tasks::Task;
pub(crate) use lease::Lease;
pub(crate) use liveness::watch_nodes;

/// At a stop, lets the dispatcher finish a pass that began after this call, so a task admitted
/// just before the stop is placed if a slot is free now instead of being failed unseen. Waits
/// at most `limit` (a wedged dispatcher must not hold the stop).
pub(crate) async fn settle(state: &State, limit: Duration) {
    let mut passes = state.passes.subscribe();
    let _ = tokio::time::timeout(limit, async {
        // Two passes: one may already be under way with a snapshot older than this call.
        for _ in 0..2 {
            let seen = *passes.borrow_and_update();
            state.wake.notify_one();
            if passes.wait_for(|n| *n != seen).await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// How many times a task may be sent to a pool whose node or engine then fails before the
/// stream starts. A request that crashes its engine each time must not crash it forever (and
/// mark the pool suspect each time); after this many it ends with `ENGINE_FAILED`.
pub const MAX_DISPATCH_ATTEMPTS: u32 = 3;

/// A task taken from the queue with its slot, ready to be sent to its node.
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

/// What one pass of the dispatcher took from the queue.
#[derive(Default)]
struct Work {
    /// Tasks whose deadline passed while they waited.
    expired: Vec<Entry<Arc<Task>>>,
    /// Tasks that leave the queue without running.
    impossible: Vec<(Entry<Arc<Task>>, Unplaced)>,
    /// Tasks placed, each with its lease.
    started: Vec<Dispatched>,
    /// When the earliest deadline of a task still queued passes.
    next_deadline: Option<Instant>,
}

/// Runs until shutdown: expires deadlines, places what can be placed, starts the streams.
pub(crate) async fn run(state: Arc<State>) {
    // The watchdog is fed from this loop: if dispatching wedges, the service manager restarts
    // the daemon. A tick every second keeps an idle loop turning, and refreshes the status line.
    let mut watchdog = llorch_os::service::Watchdog::from_env();
    let mut tick = tokio::time::interval(watchdog.wait(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = String::new();
    loop {
        watchdog.feed();
        let Work {
            expired,
            impossible,
            started,
            next_deadline,
        } = take_work(&state);
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
            tokio::spawn(forward::stream_task(state.clone(), d));
        }
        state.passes.send_modify(|n| *n = n.wrapping_add(1));
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

/// One pass under the core lock: expires deadlines, then places what can be placed.
fn take_work(state: &Arc<State>) -> Work {
    let now = Instant::now();
    let mut guard = state.core();
    let core = &mut *guard;
    let awaiting = state.awaiting_registrations(&core.registry, now);
    let expired = core.queue.expire(now);
    let Core {
        queue,
        registry,
        sessions,
        prefixes,
    } = core;
    // No snapshot without work: heartbeats wake this loop too, and a snapshot of thousands of
    // pools is the pass's largest cost.
    let models: Vec<String> = queue.models().map(str::to_string).collect();
    // A pool that is not ready (restarting, unloaded, gone) starts again with empty caches:
    // forgotten before tasks are placed by what it held (only then, so heartbeats, which wake
    // this loop too, do not pay for it).
    if !models.is_empty() && !prefixes.is_empty() {
        prefixes.retain(|node, pool| {
            registry.nodes.get(node).is_some_and(|n| {
                n.pools
                    .iter()
                    .any(|p| p.pool_id == pool && p.state == llorch_wire::node::PoolState::Ready)
            })
        });
    }
    let candidates = if models.is_empty() {
        Vec::new()
    } else {
        // Only the pools of the models that wait: in a large cluster, a small part.
        let wanted: std::collections::HashSet<&str> = models.iter().map(String::as_str).collect();
        registry.candidates_for(|m| wanted.contains(m))
    };
    let mut pass = Pass {
        state,
        now,
        awaiting,
        queue,
        registry,
        sessions,
        prefixes,
        candidates,
        work: Work {
            expired,
            ..Work::default()
        },
        leased: Vec::new(),
    };
    // Model by model (a pool serves one model, so models never compete for a slot), and within
    // a model in dispatch order, looking at most at its free slots plus SCAN_SLACK tasks: a
    // pass costs what it can place, not the queue's length.
    for model in &models {
        pass.model(model);
    }
    // Leases taken by this pass, applied once the snapshot (which borrows the registry) ends.
    let Pass {
        mut work,
        leased,
        candidates,
        ..
    } = pass;
    drop(candidates);
    for key in &leased {
        registry.lease(key);
    }
    work.next_deadline = queue.next_deadline();
    work
}

/// One pass of the dispatcher over the queue, with the snapshot placement decides on.
struct Pass<'a> {
    state: &'a Arc<State>,
    now: Instant,
    /// Nodes may still be registering: a model nobody serves yet is waited for.
    awaiting: bool,
    queue: &'a mut Queue<Arc<Task>>,
    registry: &'a Registry,
    sessions: &'a Sessions,
    prefixes: &'a mut crate::prefixes::PrefixIndex,
    candidates: Vec<Candidate<'a>>,
    work: Work,
    /// Leases taken by this pass, applied once the snapshot (which borrows the registry) ends.
    leased: Vec<PoolKey>,
}

impl Pass<'_> {
    /// Places the tasks of one model, in dispatch order.
    fn model(&mut self, model: &str) {
        let candidates = &self.candidates;
        let served = candidates.iter().any(|c| c.model_id == model);
        let mut free: u32 = candidates
            .iter()
            .filter(|c| c.model_id == model && (c.serving() || c.standby() || c.waking()))
            .fold(0u32, |n, c| n.saturating_add(c.free_slots));
        // A model nobody serves: its tasks are all impossible (unless nodes may still be
        // registering), so all of them are looked at once.
        let budget = if served {
            if free == 0 {
                return;
            }
            free as usize + SCAN_SLACK
        } else if self.awaiting {
            return;
        } else {
            usize::MAX
        };
        let order: Vec<Arc<Task>> = self
            .queue
            .of_model(model)
            .take(budget)
            .map(|e| e.item.clone())
            .collect();
        for task in order {
            if served && free == 0 {
                break;
            }
            if self.task(&task, served) {
                free = free.saturating_sub(1);
            }
        }
    }

    /// Places one task, or ends it, or leaves it waiting; true when it was placed.
    fn task(&mut self, task: &Arc<Task>, served: bool) -> bool {
        let queue = &mut *self.queue;
        if task.cancel.is_cancelled() {
            // Cancelled while a dispatch gave it back: end it here.
            if let Some(e) = queue.remove(&task.key) {
                self.work.impossible.push((e, Unplaced::Cancelled));
            }
            return false;
        }
        let session = task
            .session_id
            .as_deref()
            .and_then(|s| self.sessions.get(&task.client, s, self.now))
            .cloned();
        let ask = Ask {
            model: &task.model,
            session_pool: session
                .as_ref()
                .map(|s| (s.pool.0.as_str(), s.pool.1.as_str())),
            hints: task.hints.as_ref(),
            slot_wait: self.registry.slot_wait(&self.candidates, &task.model),
            cached: self
                .candidates
                .iter()
                .filter(|c| {
                    self.state.config.cache_aware_placement
                        && !self.prefixes.is_empty()
                        && c.model_id == task.model
                        && !task.prefix.is_empty()
                })
                .map(|c| {
                    let bytes = self.prefixes.expected(c.node_id, c.pool_id, &task.prefix);
                    (c.node_id, c.pool_id, bytes)
                })
                .filter(|(_, _, bytes)| *bytes > 0)
                .collect(),
        };
        match place(&self.candidates, &ask) {
            Placement::Wait { .. } => false,
            Placement::Impossible { reason } => {
                if let Some(e) = queue.remove(&task.key) {
                    // A model nobody registered (the grace after a restart is over) is
                    // not found, as it would have been at admission.
                    let why = if served {
                        Unplaced::Impossible(reason)
                    } else {
                        Unplaced::UnknownModel(reason)
                    };
                    self.work.impossible.push((e, why));
                }
                false
            }
            Placement::Place {
                pool_id,
                node_id,
                reasons,
            } => {
                let Some(node) = self.registry.nodes.get(&node_id) else {
                    return false;
                };
                let (client, lost) = (node.client.clone(), node.lost.clone());
                let Some(entry) = queue.take(&task.key) else {
                    return false;
                };
                tracing::debug!(task_id = %task.id, pool_id = %pool_id, ?reasons, "Placed.");
                task.set_placement(reasons);
                self.state.metrics.decision(Decision::Placed);
                let key: PoolKey = (node_id, pool_id);
                self.prefixes.record(&key, &task.prefix);
                self.leased.push(key.clone());
                let mut cold = false;
                if let Some(c) = self
                    .candidates
                    .iter_mut()
                    .find(|c| c.node_id == key.0 && c.pool_id == key.1)
                {
                    c.free_slots = c.free_slots.saturating_sub(1);
                    cold = c.standby() || c.waking();
                }
                let slot_hint = session.filter(|s| s.pool == key).map(|s| s.slot);
                self.work.started.push(Dispatched {
                    entry,
                    lease: Lease::new(self.state.clone(), key, task.model.clone(), self.now),
                    client,
                    lost,
                    slot_hint,
                    cold,
                });
                true
            }
        }
    }
}
