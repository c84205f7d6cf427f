//! Shared state: the queue, the registry and the sessions behind one short synchronous lock
//! (never held across an `.await`), the task table, and the dispatcher's wake-up.
//!
//! [`State::submit`] is where a request is admitted: model lookup, feasibility of its placement
//! hints, the deadline check against the predicted start, and the queue's policy.

mod admit;
mod finish;
pub(crate) mod snapshot;
mod subscribers;
mod views;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use llorch_wire::task::Priority;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::Queue;
use crate::config::Config;
use crate::metrics::{Gauges, Metrics, NODE_STATES, POOL_STATES};
use crate::registry::{Registry, Sessions};
use crate::tasks::{Task, TaskTable};
pub(crate) use admit::Submission;
pub(crate) use subscribers::Subscriber;

pub(crate) struct Core {
    pub(crate) queue: Queue<Arc<Task>>,
    pub(crate) registry: Registry,
    pub(crate) sessions: Sessions,
    /// Where each prompt prefix was placed, for cache-aware placement.
    pub(crate) prefixes: crate::prefixes::PrefixIndex,
}

impl Core {
    /// The snapshot behind the metrics' gauges of the queue and the registry.
    pub(crate) fn gauges(&self, now: Instant) -> Gauges {
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
pub(crate) struct Keys {
    pub(crate) api: Option<crate::auth::ApiKeys>,
    pub(crate) node: Option<crate::auth::ApiKeys>,
    /// The operator's token (`--admin-token-file`).
    pub(crate) admin: Option<crate::auth::ApiKeys>,
}

pub struct State {
    pub(crate) config: Config,
    keys: std::sync::RwLock<Arc<Keys>>,
    core: Mutex<Core>,
    tasks: Mutex<TaskTable>,
    /// Wakes the dispatcher: a task arrived, a slot freed, a node reported.
    pub(crate) wake: Notify,
    /// Passes the dispatcher has finished (a stop waits for one that saw every queued task).
    pub(crate) passes: tokio::sync::watch::Sender<u64>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) started: Instant,
    pub(crate) metrics: Metrics,
    /// The queue refused or evicted since it last had room (logged once per episode).
    saturated: std::sync::atomic::AtomicBool,
    /// Native event-stream subscribers per client.
    subscribers: Mutex<HashMap<String, u32>>,
    /// Operator events for the D-Bus front ([`State::announce`]).
    pub(crate) events: tokio::sync::broadcast::Sender<crate::events::Event>,
    /// Stored answers of the Responses API (`previous_response_id`).
    pub(crate) conversations: crate::conversations::Conversations,
    /// What finished tasks did on each pool (`GET /v2/events`).
    tallies: Mutex<HashMap<crate::registry::PoolKey, snapshot::PoolTally>>,
    /// Open `GET /v2/events` streams.
    pub(crate) watchers: std::sync::atomic::AtomicU32,
}

impl State {
    pub fn new(mut config: Config) -> Arc<Self> {
        let keys = Keys {
            api: config.api_keys.take(),
            node: config.node_tokens.take(),
            admin: config.admin_token.take(),
        };
        let core = Core {
            queue: Queue::new(config.queue_capacity, config.policy),
            registry: Registry::default(),
            sessions: Sessions::new(config.session_ttl),
            prefixes: Default::default(),
        };
        let metrics = Metrics::new(config.queue_capacity);
        Arc::new(Self {
            metrics,
            saturated: Default::default(),
            subscribers: Default::default(),
            tallies: Default::default(),
            watchers: Default::default(),
            events: tokio::sync::broadcast::Sender::new(crate::events::CAPACITY),
            conversations: crate::conversations::Conversations::new(
                config.responses_ttl,
                config.responses_store_bytes,
            ),
            config,
            keys: std::sync::RwLock::new(Arc::new(keys)),
            core: Mutex::new(core),
            tasks: Mutex::new(TaskTable::default()),
            wake: Notify::new(),
            passes: tokio::sync::watch::Sender::new(0),
            shutdown: CancellationToken::new(),
            started: Instant::now(),
        })
    }

    /// Tells the D-Bus front (if any) of an operator event; never waits.
    pub(crate) fn announce(&self, event: crate::events::Event) {
        let _ = self.events.send(event);
    }

    /// Whether anyone listens to operator events (so the heartbeat path can skip the diff).
    pub(crate) fn announcing(&self) -> bool {
        self.events.receiver_count() > 0
    }

    /// Whether requests are served: a pool is ready, or an on-demand pool is on standby (its
    /// first request loads the model). `/health/ready` and D-Bus `Ready`.
    pub(crate) fn serving(&self) -> (bool, usize, usize) {
        self.core().registry.serving()
    }

    /// The keys in force now.
    pub(crate) fn keys(&self) -> Arc<Keys> {
        llorch_os::sync::read(&self.keys).clone()
    }

    /// Reads the key files again (SIGHUP), each on its own: a file that no longer parses (or
    /// is gone) keeps its keys in force, and does not stop the others from being reloaded (a
    /// node token removed from its file is revoked even while the API key file is broken). An
    /// operator token file that is gone revokes the operator token. Running streams are not
    /// touched. Returns the key counts, or the first file's error after applying the rest.
    pub(crate) fn reload_keys(&self) -> Result<(usize, usize), crate::auth::KeysError> {
        use crate::auth::{ApiKeys, KeyKind, KeysError};
        let old = self.keys();
        let mut first_error: Option<KeysError> = None;
        let mut keep = |loaded: Result<Option<ApiKeys>, KeysError>, old: &Option<ApiKeys>| {
            loaded.unwrap_or_else(|e| {
                first_error.get_or_insert(e);
                old.clone()
            })
        };
        let load = |p: &Option<std::path::PathBuf>, kind| -> Result<_, KeysError> {
            p.as_deref().map(|p| ApiKeys::load(p, kind)).transpose()
        };
        let admin = match self.config.admin_token_path.as_deref() {
            Some(p) if !p.exists() => Ok(None),
            p => p.map(ApiKeys::load_admin_token).transpose(),
        };
        let keys = Keys {
            api: keep(load(&self.config.api_keys_path, KeyKind::Api), &old.api),
            node: keep(
                load(&self.config.node_tokens_path, KeyKind::Node),
                &old.node,
            ),
            admin: keep(admin, &old.admin),
        };
        let counts = (
            keys.api.as_ref().map_or(0, |k| k.len()),
            keys.node.as_ref().map_or(0, |k| k.len()),
        );
        *llorch_os::sync::write(&self.keys) = Arc::new(keys);
        match first_error {
            Some(e) => Err(e),
            None => Ok(counts),
        }
    }

    /// Sets the metrics' gauges for a scrape: read under the core lock, set without it.
    pub(crate) fn read_gauges(&self) {
        let gauges = self.core().gauges(Instant::now());
        self.metrics.set_gauges(&gauges);
    }

    pub(crate) fn core(&self) -> MutexGuard<'_, Core> {
        llorch_os::sync::lock(&self.core)
    }

    pub(crate) fn tasks(&self) -> MutexGuard<'_, TaskTable> {
        llorch_os::sync::lock(&self.tasks)
    }

    pub(crate) fn task(&self, client: &str, id: &str) -> Option<Arc<Task>> {
        self.tasks().get(&Task::key_for(client, id))
    }

    /// Whether nodes may still be registering after orchestratord's start, so a model nobody
    /// serves yet may be served in a moment. Every live node reports within one of its heartbeat
    /// intervals of the start (a heartbeat answered 404, or refused, makes it register again),
    /// so the wait ends 1.5 intervals (the longest any registered node uses) after the start,
    /// and at the latest after `--registration-grace-secs`.
    pub(crate) fn awaiting_registrations(&self, registry: &Registry, now: Instant) -> bool {
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

    /// The service manager's status line: pools, queue, slots.
    pub(crate) fn status_line(&self) -> String {
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

    pub(crate) fn queue_position(&self, task: &Task) -> Option<u32> {
        self.core().queue.position(&task.key)
    }
}

/// A fresh id: a prefix and 16 random hex digits.
pub(crate) fn new_id(prefix: &str) -> String {
    // 128 bits: a task id is all another anonymous client of a home stack would need to
    // read a task's output.
    format!(
        "{prefix}-{:016x}{:016x}",
        llorch_wire::id::random_u64(),
        llorch_wire::id::random_u64()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use llorch_wire::engine::GenerateRequest;

    use super::*;
    use crate::outcome::{Api, CancelReason};
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
            memory: Vec::new(),
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
