//! Shared state: the queue, the registry and the sessions behind one short synchronous lock
//! (never held across an `.await`), the task table, and the dispatcher's wake-up.
//!
//! [`State::submit`] is where a request is admitted: model lookup, feasibility of its placement
//! hints, the deadline check against the predicted start, and the queue's policy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use llorch_wire::engine::GenerateRequest;
use llorch_wire::task::{PlacementHints, Priority, TaskAccepted, TaskEnd, TaskStreams};
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::{Pushed, Queue, ServiceRate};
use crate::config::Config;
use crate::metrics::{Finished, Gauges, Metrics, NODE_STATES, POOL_STATES};
use crate::outcome::{Api, CancelReason, Outcome, Rejection};
use crate::placement::{capacity_for, place, Ask, Placement};
use crate::refusal::Refusal;
use crate::registry::{Registry, Sessions};
use crate::tasks::{Task, TaskEvent, TaskTable};

pub struct Core {
    pub queue: Queue<Arc<Task>>,
    pub registry: Registry,
    pub sessions: Sessions,
}

impl Core {
    /// The snapshot behind the metrics' gauges of the queue and the registry.
    pub fn gauges(&self, now: Instant) -> Gauges {
        let mut g = Gauges {
            queue_depth: [
                self.queue.count(Priority::Interactive) as i64,
                self.queue.count(Priority::Batch) as i64,
            ],
            ..Gauges::default()
        };
        let nodes = &self.registry.nodes;
        for (i, state) in NODE_STATES.iter().enumerate() {
            g.nodes[i] = nodes.values().filter(|n| n.state(now) == *state).count() as i64;
        }
        g.nodes_draining = nodes.values().filter(|n| n.draining).count() as i64;
        for c in self.registry.candidates() {
            let i = if c.node_online {
                POOL_STATES.iter().position(|s| *s == c.state).unwrap_or(0)
            } else {
                POOL_STATES.len()
            };
            g.pools[i] += 1;
            if c.node_online && c.state == llorch_wire::node::PoolState::Ready {
                let leased = self
                    .registry
                    .leased(&(c.node_id.to_string(), c.pool_id.to_string()));
                g.slots_busy += i64::from(leased);
                g.slots_free += i64::from(c.slots_total.saturating_sub(leased));
            }
        }
        g
    }
}

/// Client API keys and node tokens; replaced as a whole on reload (SIGHUP).
#[derive(Debug, Default)]
pub struct Keys {
    pub api: Option<crate::auth::ApiKeys>,
    pub node: Option<crate::auth::ApiKeys>,
}

pub struct State {
    pub config: Config,
    keys: std::sync::RwLock<Arc<Keys>>,
    core: Mutex<Core>,
    tasks: Mutex<TaskTable>,
    /// Wakes the dispatcher: a task arrived, a slot freed, a node reported.
    pub wake: Notify,
    pub shutdown: CancellationToken,
    pub started: Instant,
    pub metrics: Metrics,
    /// The queue refused or evicted since it last had room (logged once per episode).
    saturated: std::sync::atomic::AtomicBool,
    /// Native event-stream subscribers per client.
    subscribers: Mutex<HashMap<String, u32>>,
    /// Operator events for the D-Bus front ([`State::announce`]).
    pub events: tokio::sync::broadcast::Sender<crate::events::Event>,
}

/// Native event streams (`GET /v2/tasks/{id}/events`) one task may have open at once.
pub const MAX_SUBSCRIBERS_PER_TASK: u32 = 8;
/// Native event streams one client (API key) may have open at once, all tasks together.
pub const MAX_SUBSCRIBERS_PER_CLIENT: u32 = 256;

/// One open native event stream, counted against its task's and its client's limits until
/// dropped.
pub struct Subscriber {
    state: Arc<State>,
    task: Arc<Task>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task
            .subscribers
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = crate::sync::lock(&self.state.subscribers);
        if let Some(n) = map.get_mut(&self.task.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.task.client);
            }
        }
    }
}

/// What a front end (OpenAI or native) hands to admission.
#[derive(Debug)]
pub struct Submission {
    pub task_id: Option<String>,
    pub model: String,
    pub request: GenerateRequest,
    pub priority: Priority,
    pub deadline_ms: Option<u64>,
    pub session_id: Option<String>,
    pub hints: Option<PlacementHints>,
    pub client: String,
    pub correlation_id: String,
    /// The context the client says the task needs (native `ctx`); checked against the pools.
    pub ctx: Option<u32>,
    pub api: Api,
}

impl State {
    pub fn new(mut config: Config) -> Arc<Self> {
        let keys = Keys {
            api: config.api_keys.take(),
            node: config.node_tokens.take(),
        };
        let core = Core {
            queue: Queue::new(config.queue_capacity, config.policy),
            registry: Registry::default(),
            sessions: Sessions::new(config.session_ttl),
        };
        let metrics = Metrics::new(config.queue_capacity);
        Arc::new(Self {
            metrics,
            saturated: Default::default(),
            subscribers: Default::default(),
            events: tokio::sync::broadcast::Sender::new(crate::events::CAPACITY),
            config,
            keys: std::sync::RwLock::new(Arc::new(keys)),
            core: Mutex::new(core),
            tasks: Mutex::new(TaskTable::default()),
            wake: Notify::new(),
            shutdown: CancellationToken::new(),
            started: Instant::now(),
        })
    }

    /// Tells the D-Bus front (if any) of an operator event; never waits.
    pub fn announce(&self, event: crate::events::Event) {
        let _ = self.events.send(event);
    }

    /// Whether anyone listens to operator events (so the heartbeat path can skip the diff).
    pub fn announcing(&self) -> bool {
        self.events.receiver_count() > 0
    }

    /// Whether requests are served: a pool is ready, or an on-demand pool is on standby (its
    /// first request loads the model). `/health/ready` and D-Bus `Ready`.
    pub fn serving(&self) -> (bool, usize, usize) {
        self.core().registry.serving()
    }

    /// The keys in force now.
    pub fn keys(&self) -> Arc<Keys> {
        crate::sync::read(&self.keys).clone()
    }

    /// Reads the key files again (SIGHUP). A file that no longer parses leaves the keys in
    /// force unchanged; running streams are not touched either way. Returns the key counts.
    pub fn reload_keys(&self) -> Result<(usize, usize), crate::auth::KeysError> {
        use crate::auth::{ApiKeys, KeyKind, KeysError};
        let load = |p: &Option<std::path::PathBuf>, kind| -> Result<_, KeysError> {
            p.as_deref().map(|p| ApiKeys::load(p, kind)).transpose()
        };
        let keys = Keys {
            api: load(&self.config.api_keys_path, KeyKind::Api)?,
            node: load(&self.config.node_tokens_path, KeyKind::Node)?,
        };
        let counts = (
            keys.api.as_ref().map_or(0, |k| k.len()),
            keys.node.as_ref().map_or(0, |k| k.len()),
        );
        *crate::sync::write(&self.keys) = Arc::new(keys);
        Ok(counts)
    }

    /// Sets the metrics' gauges for a scrape: read under the core lock, set without it.
    pub fn read_gauges(&self) {
        let gauges = self.core().gauges(Instant::now());
        self.metrics.set_gauges(&gauges);
    }

    pub fn core(&self) -> MutexGuard<'_, Core> {
        crate::sync::lock(&self.core)
    }

    pub fn tasks(&self) -> MutexGuard<'_, TaskTable> {
        crate::sync::lock(&self.tasks)
    }

    pub fn task(&self, client: &str, id: &str) -> Option<Arc<Task>> {
        self.tasks().get(&Task::key_for(client, id))
    }

    /// Opens a native event stream on `task`: 429 `RATE_LIMITED` when the task or its client
    /// has as many open as allowed.
    pub fn subscribe(self: &Arc<Self>, task: &Arc<Task>) -> Result<Subscriber, Refusal> {
        use std::sync::atomic::Ordering;
        let mut map = crate::sync::lock(&self.subscribers);
        let of_client = map.get(&task.client).copied().unwrap_or(0);
        if of_client >= MAX_SUBSCRIBERS_PER_CLIENT {
            return Err(Refusal::ClientStreams { open: of_client });
        }
        let of_task = task.subscribers.load(Ordering::Relaxed);
        if of_task >= MAX_SUBSCRIBERS_PER_TASK {
            return Err(Refusal::TaskStreams {
                task_id: task.id.clone(),
                open: of_task,
            });
        }
        task.subscribers.fetch_add(1, Ordering::Relaxed);
        map.insert(task.client.clone(), of_client + 1);
        Ok(Subscriber {
            state: Arc::clone(self),
            task: Arc::clone(task),
        })
    }

    /// Ends a task with an error event; the first final event of a task also schedules its
    /// removal and writes its metrics and journal record.
    pub fn finish(&self, task: &Task, body: ErrorBody) {
        if task.fail(body) {
            self.finished(task);
        }
    }

    /// Ends a task with its `end` event (see [`State::finish`]).
    pub fn complete(&self, task: &Task, end: TaskEnd) {
        if task.push(TaskEvent::End(end)) {
            self.finished(task);
        }
    }

    fn finished(&self, task: &Task) {
        task.forget_request();
        let evicted = self.tasks().finished(&task.key);
        for _ in 0..evicted {
            self.metrics.evicted("finished_tasks");
        }
        let now = Instant::now();
        let s = task.summary();
        let canceled = task.cancel_reason.get().copied();
        let outcome = match (&s.error, canceled) {
            (None, _) => Outcome::Ok,
            (Some(_), Some(_)) => Outcome::Canceled,
            (Some(e), None) => Outcome::of_error(e.code),
        };
        let first = task.first_token.get().copied();
        let (tokens_in, tokens_out) = s
            .end
            .as_ref()
            .map_or((0, s.tokens), |e| (e.tokens_in, e.tokens_out));
        let inter_token = match (first, &s.end) {
            (Some(first), Some(end)) if end.tokens_out >= 2 => {
                Some(now.duration_since(first) / (end.tokens_out - 1))
            }
            _ => None,
        };
        let duration = now.duration_since(task.submitted);
        let ttft = first.map(|f| f.duration_since(task.submitted));
        self.metrics.finished(&Finished {
            api: task.api,
            model: &task.model,
            outcome,
            canceled: canceled.filter(|_| outcome == Outcome::Canceled),
            duration,
            ttft,
            inter_token,
            tokens_in,
            tokens_out,
        });
        // One journal record per task; field names become journald fields (TASK_ID, ...).
        // No prompt or generated text, no key: only the key's name.
        let started = s.started.as_ref();
        tracing::info!(
            message_id = llorch_os::message_id::TASK_FINISHED,
            task_id = %task.id,
            correlation_id = %task.correlation_id,
            model = %task.model,
            pool_id = started.map(|s| s.pool_id.as_str()),
            node_id = started.map(|s| s.node_id.as_str()),
            api_key_name = %task.client,
            api = task.api.as_str(),
            outcome = outcome.as_str(),
            error_code = s.error.as_ref().map(|e| e.code.as_str()),
            queue_ms = started.map(|s| s.queue_ms),
            ttft_ms = ttft.map(|t| t.as_millis() as u64),
            duration_ms = duration.as_millis() as u64,
            tokens_in,
            tokens_out,
            finish_reason = s.end.as_ref().map(|e| e.finish_reason.as_str()),
            "Task finished."
        );
    }

    /// Logs the first refusal or eviction of a saturation episode.
    fn saturated(&self, capacity: usize) {
        if !self
            .saturated
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                message_id = llorch_os::message_id::QUEUE_SATURATED,
                queue_capacity = capacity,
                "The queue is full: tasks are refused or evicted until it has room."
            );
            self.announce(crate::events::Event::QueueSaturated(
                u32::try_from(capacity).unwrap_or(u32::MAX),
            ));
        }
    }

    /// Admits a task to the queue, or refuses it.
    pub fn submit(self: &Arc<Self>, sub: Submission) -> Result<(Arc<Task>, TaskAccepted), Refusal> {
        let task_id = match sub.task_id.clone() {
            Some(id) => {
                if id.is_empty()
                    || id.len() > 128
                    || !id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
                {
                    return Err(Refusal::InvalidTaskId);
                }
                id
            }
            None => new_id("task"),
        };
        let task = Arc::new(Task::new(
            task_id.clone(),
            sub.model.clone(),
            sub.priority,
            sub.client.clone(),
            sub.session_id.clone(),
            sub.hints.clone(),
            sub.request.clone(),
            sub.correlation_id.clone(),
            sub.api,
        ));
        {
            let mut tasks = self.tasks();
            // Ids are per client: another key's task of the same id is neither found nor
            // revealed here.
            if tasks.contains(&task.key) {
                return Err(Refusal::TaskExists { task_id });
            }
            tasks.insert(task.clone());
        }
        let admitted = self.admit(&task, &sub);
        match admitted {
            Ok((accepted, evicted)) => {
                if let Some(victim) = evicted {
                    self.metrics.rejected(Rejection::Evicted);
                    tracing::info!(task_id = %victim.id, "Evicted from the full queue (drop-lru).");
                    self.finish(
                        &victim,
                        ErrorBody {
                            policy_label: Some("drop-lru".into()),
                            ..ErrorBody::new(
                                ErrorCode::QueueFullDropLru,
                                "the queue was full and this batch task was the oldest; it was dropped for a newer task (submit again later)",
                            )
                        },
                    );
                }
                self.wake.notify_one();
                Ok((task, accepted))
            }
            Err(refusal) => {
                self.tasks().remove(&task.key);
                Err(refusal)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn admit(
        &self,
        task: &Arc<Task>,
        sub: &Submission,
    ) -> Result<(TaskAccepted, Option<Arc<Task>>), Refusal> {
        let mut core = self.core();
        // Only the pools of the task's model: admission costs the same in a large cluster.
        let candidates = core.registry.candidates_for(|m| m == sub.model);
        // Just after a (re)start, nodes are still registering: a task for a model not known
        // yet waits in the queue for them (until the grace ends) instead of being refused.
        let now = Instant::now();
        let awaiting_nodes = self.awaiting_registrations(&core.registry, now)
            && !candidates.iter().any(|c| c.model_id == sub.model);
        if awaiting_nodes {
            let left = self
                .grace_end(&core.registry)
                .saturating_duration_since(now);
            return self.enqueue(&mut core, task, sub, left, Duration::ZERO);
        }
        if core.registry.nodes.is_empty() {
            // Just started (or restarted): nodes register within a heartbeat, and until one
            // does no model is known. A retry soon succeeds; a 404 would be wrong.
            return Err(Refusal::NoNodes);
        }
        if !candidates.iter().any(|c| c.model_id == sub.model) {
            return Err(Refusal::UnknownModel {
                model: sub.model.clone(),
                known: core.registry.models(),
            });
        }
        if !candidates
            .iter()
            .any(|c| c.model_id == sub.model && c.node_online)
        {
            return Err(Refusal::ModelOffline {
                model: sub.model.clone(),
            });
        }
        let session_pool = sub
            .session_id
            .as_deref()
            .and_then(|s| core.sessions.get(&sub.client, s, Instant::now()))
            .map(|s| s.pool.clone());
        let ask = Ask {
            model: &sub.model,
            session_pool: session_pool.as_ref().map(|(n, p)| (n.as_str(), p.as_str())),
            hints: sub.hints.as_ref(),
            slot_wait: core.registry.slot_wait(&candidates, &sub.model),
        };
        if let Placement::Impossible { reason } = place(&candidates, &ask) {
            return Err(Refusal::Unplaceable { reason });
        }
        if let Some(ctx) = sub.ctx {
            let max_ctx = candidates
                .iter()
                .filter(|c| c.model_id == sub.model)
                .map(|c| {
                    core.registry
                        .pool(&(c.node_id.to_string(), c.pool_id.to_string()))
                        .map_or(0, |p| p.ctx_per_slot)
                })
                .max()
                .unwrap_or(0);
            if ctx > max_ctx {
                return Err(Refusal::CtxTooLarge {
                    ctx,
                    max_ctx,
                    model: sub.model.clone(),
                });
            }
        }
        let (free, slots) = capacity_for(&candidates, &sub.model);
        let ahead = core.queue.ahead_of_new(&sub.model, sub.priority) as u32;
        let default_rate = ServiceRate::default();
        let rate = core.registry.rate(&sub.model).unwrap_or(&default_rate);
        let mut predicted = rate.predict_start(ahead, free, slots);
        // An on-demand pool on standby with room for the task starts it after its load.
        if let Some(load) = candidates
            .iter()
            .filter(|c| {
                c.model_id == sub.model && (c.standby() || c.waking()) && c.free_slots > ahead
            })
            .map(|c| c.load_time())
            .min()
        {
            predicted = predicted.min(load);
        }
        let one_slot = rate.predict_start(0, 0, slots.max(1));
        if let Some(deadline_ms) = sub.deadline_ms {
            if predicted > Duration::from_millis(deadline_ms) {
                self.metrics.rejected(Rejection::Deadline);
                return Err(Refusal::DeadlineUnmet {
                    deadline_ms,
                    predicted,
                    ahead,
                    retry_after_ms: one_slot.as_millis().max(1) as u64,
                });
            }
        }
        self.enqueue(&mut core, task, sub, predicted, one_slot)
    }

    /// Pushes an admitted task into the queue (under the core lock the caller holds).
    #[allow(clippy::type_complexity)]
    fn enqueue(
        &self,
        core: &mut Core,
        task: &Arc<Task>,
        sub: &Submission,
        predicted: Duration,
        one_slot: Duration,
    ) -> Result<(TaskAccepted, Option<Arc<Task>>), Refusal> {
        let deadline = sub
            .deadline_ms
            .map(|ms| task.submitted + Duration::from_millis(ms));
        let policy = core.queue.policy();
        let capacity = core.queue.capacity();
        let pushed = core.queue.push(
            task.key.clone(),
            sub.model.clone(),
            sub.client.clone(),
            sub.priority,
            deadline,
            task.clone(),
        );
        if pushed.is_ok() {
            // Counted under the core lock, before anyone can take and finish the task.
            self.metrics.admitted(&task.model);
        }
        let evicted = match pushed {
            Ok(Pushed::Queued) => {
                self.saturated
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                None
            }
            Ok(Pushed::Evicted(id)) => {
                self.saturated(capacity);
                self.tasks().get(&id)
            }
            Err(crate::admission::QueueFull) => {
                self.metrics.rejected(Rejection::QueueFull);
                self.saturated(capacity);
                let retry_ms = one_slot.as_millis().max(1) as u64;
                return Err(Refusal::QueueFull {
                    capacity,
                    policy,
                    retry_after_ms: retry_ms,
                });
            }
        };
        let position = core.queue.position(&task.key).unwrap_or(0);
        Ok((
            TaskAccepted {
                task_id: task.id.clone(),
                queue_position: position,
                predicted_start_ms: predicted.as_millis() as u64,
                streams: TaskStreams {
                    sse: format!("/v2/tasks/{}/events", task.id),
                },
            },
            evicted,
        ))
    }

    /// Whether nodes may still be registering after orchestratord's start, so a model nobody
    /// serves yet may be served in a moment. Every live node reports within one of its heartbeat
    /// intervals of the start (a heartbeat answered 404, or refused, makes it register again),
    /// so the wait ends 1.5 intervals (the longest any registered node uses) after the start,
    /// and at the latest after `--registration-grace-secs`.
    pub fn awaiting_registrations(&self, registry: &Registry, now: Instant) -> bool {
        now < self.grace_end(registry)
    }

    fn grace_end(&self, registry: &Registry) -> Instant {
        let cap = self.started + self.config.registration_grace;
        if Instant::now() >= cap {
            // Past the cap no node can extend it: spare the scan of every node.
            return cap;
        }
        match registry.nodes.values().map(|n| n.heartbeat).max() {
            Some(hb) => cap.min(self.started + hb + hb / 2),
            None => cap,
        }
    }

    /// Ends the queued tasks whose model no node serves (called once the registration grace
    /// is over): they waited for a node that did not come.
    pub fn fail_unknown_models(&self) {
        let orphans: Vec<Arc<Task>> = {
            let mut core = self.core();
            let known = core.registry.models();
            let unknown: Vec<String> = core
                .queue
                .models()
                .filter(|m| known.binary_search_by(|k| k.as_str().cmp(m)).is_err())
                .map(str::to_string)
                .collect();
            let keys: Vec<String> = unknown
                .iter()
                .flat_map(|m| core.queue.of_model(m).map(|e| e.task_id.clone()))
                .collect();
            keys.iter()
                .filter_map(|k| core.queue.remove(k))
                .map(|e| e.item)
                .collect()
        };
        for t in orphans {
            let body = ErrorBody {
                field: Some("model".into()),
                ..ErrorBody::new(
                    ErrorCode::ModelNotFound,
                    format!(
                        "model {:?} is not served here: no node registered it within {} s of orchestratord's start (see GET /v1/models)",
                        t.model,
                        self.config.registration_grace.as_secs()
                    ),
                )
            };
            self.finish(&t, body);
        }
    }

    /// Cancels a task: a queued one leaves the queue and ends at once; a running one is
    /// stopped by its dispatch, which frees the slot. Returns false for a finished task.
    pub fn cancel(&self, task: &Arc<Task>, reason: CancelReason) -> bool {
        if task.is_finished() {
            return false;
        }
        let _ = task.cancel_reason.set(reason);
        let why = match reason {
            CancelReason::Client => "the task was cancelled by its client",
            CancelReason::Disconnect => "the client went away",
            CancelReason::Shutdown => "orchestratord is stopping",
            CancelReason::Operator => "the task was cancelled by an operator",
        };
        // The token first: a dispatch that is about to put the task back in the queue checks it
        // under the same lock we take next, so the task is either found queued here or never
        // requeued there.
        task.cancel.cancel();
        let was_queued = self.core().queue.remove(&task.key).is_some();
        if was_queued {
            self.finish(task, ErrorBody::new(ErrorCode::Canceled, why));
        }
        true
    }

    /// Ends every queued task (orchestratord is stopping); running ones end with their streams.
    pub fn fail_queued(&self, why: &str) {
        let queued: Vec<Arc<Task>> = {
            let mut core = self.core();
            let ids: Vec<String> = core.queue.iter().map(|e| e.task_id.clone()).collect();
            ids.iter()
                .filter_map(|id| core.queue.remove(id))
                .map(|e| e.item)
                .collect()
        };
        for t in queued {
            let _ = t.cancel_reason.set(CancelReason::Shutdown);
            self.finish(
                &t,
                ErrorBody::new(ErrorCode::PoolUnavailable, why).with_retry_after_ms(1000),
            );
        }
    }

    /// The service manager's status line: pools, queue, slots.
    pub fn status_line(&self) -> String {
        let core = self.core();
        let candidates = core.registry.candidates();
        let ready = candidates
            .iter()
            .filter(|c| c.node_online && c.state == llorch_wire::node::PoolState::Ready)
            .count();
        let standby = candidates.iter().filter(|c| c.standby()).count();
        let slots = candidates
            .iter()
            .fold(0u32, |n, c| n.saturating_add(c.slots_total));
        let standby = if standby > 0 {
            format!(" ({standby} on standby)")
        } else {
            String::new()
        };
        format!(
            "{ready} of {} pools ready{standby} on {} nodes; queue {}/{}; {} of {slots} slots busy",
            candidates.len(),
            core.registry.nodes.len(),
            core.queue.len(),
            core.queue.capacity(),
            core.registry.total_leased(),
        )
    }

    pub fn queue_position(&self, task: &Task) -> Option<u32> {
        self.core().queue.position(&task.key)
    }
}

/// A fresh id: a prefix and 16 random hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", llorch_wire::id::random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Node;
    use llorch_client::HttpClient;
    use llorch_wire::node::{PoolState, PoolStatus};

    /// A state with one registered node serving `m` (nothing is dispatched: no runtime runs
    /// the dispatcher).
    fn state_with_a_node() -> Arc<State> {
        let state = State::new(Config::default());
        state.core().registry.register(Node {
            id: "n".into(),
            address: "unix:/nonexistent.sock".into(),
            version: "0".into(),
            heartbeat: Duration::from_secs(5),
            last_seen: Instant::now(),
            online: true,
            pools: vec![PoolStatus::new("p", "m", PoolState::Ready, 1, 1024)],
            staged_models: vec![],
            gpus: Default::default(),
            client: HttpClient::new("unix:/nonexistent.sock").unwrap(),
            lost: CancellationToken::new(),
            draining: false,
            offline_beats: 3,
            beat: None,
        });
        state
    }

    #[tokio::test]
    async fn a_finished_task_is_kept_without_its_prompt() {
        let state = state_with_a_node();
        let prompt = "x".repeat(512 * 1024);
        let (task, _) = state
            .submit(Submission {
                task_id: None,
                model: "m".into(),
                request: GenerateRequest::prompt(prompt.clone()),
                priority: Priority::Batch,
                deadline_ms: None,
                session_id: None,
                hints: None,
                client: "c".into(),
                correlation_id: "cid".into(),
                ctx: None,
                api: Api::Native,
            })
            .unwrap();
        assert_eq!(task.request().unwrap().prompt.as_deref(), Some(&*prompt));
        assert!(state.cancel(&task, CancelReason::Client));
        // The task stays for its info and late readers, its prompt does not.
        let kept = state
            .task(&task.client, &task.id)
            .expect("a finished task is retained");
        assert!(kept.is_finished());
        assert!(kept.request().is_none());
    }
}
