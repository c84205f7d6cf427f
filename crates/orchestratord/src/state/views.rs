//! Read-only views of the core for the fronts (the HTTP API, the D-Bus front): each takes the
//! core lock for one short read and returns owned values, so no front holds the lock itself.

use llorch_wire::task::{NodeView, PoolView, PoolsAnswer, Priority, QueueView, SessionInfo};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{Core, State};

impl State {
    /// Model ids served by any registered pool, whatever its state (`GET /v1/models`).
    pub(crate) fn models(&self) -> Vec<String> {
        self.core().registry.models()
    }

    /// Every node as `GET /v2/nodes` lists it.
    pub(crate) fn node_views(&self, now: Instant) -> Vec<NodeView> {
        self.core().registry.node_views(now)
    }

    /// Every pool of every node, with its leased slots.
    pub(crate) fn pool_views(&self) -> Vec<PoolView> {
        self.core().registry.pool_views()
    }

    /// `GET /v2/pools`: every pool with its slots, and the queue.
    pub(crate) fn pools_answer(&self) -> PoolsAnswer {
        let core = self.core();
        PoolsAnswer {
            pools: core.registry.pool_views(),
            queue: queue_view(&core),
        }
    }

    /// A client's session `id`, unless it is unknown or expired.
    pub(crate) fn session_info(&self, client: &str, id: &str, now: Instant) -> Option<SessionInfo> {
        let core = self.core();
        let s = core.sessions.get(client, id, now)?;
        let left = core
            .sessions
            .ttl()
            .saturating_sub(now.duration_since(s.last_used));
        Some(SessionInfo {
            session_id: id.to_string(),
            pool_id: s.pool.1.clone(),
            slot: s.slot,
            turns: s.turns,
            expires_in_ms: left.as_millis() as u64,
        })
    }

    /// Forgets a client's session; false when it was not known.
    pub(crate) fn forget_session(&self, client: &str, id: &str) -> bool {
        self.core().sessions.remove(client, id)
    }

    /// `GET /v2/catalog/availability`: which models are on which nodes and pools, and whether
    /// a request for each can be placed now (`available`), waits (`placeable` pools all busy,
    /// draining or suspect), or is refused (every node offline).
    pub(crate) fn availability(&self, now: Instant) -> Value {
        let core = self.core();
        let mut models: std::collections::BTreeMap<&str, Vec<Value>> = Default::default();
        for node in core.registry.nodes.values() {
            for p in &node.pools {
                let key = (node.id.clone(), p.pool_id.clone());
                let busy = core.registry.leased(&key);
                models.entry(p.model_id.as_str()).or_default().push(json!({
                    "node_id": node.id,
                    "node_state": node.state(now),
                    "node_draining": node.draining,
                    "pool_id": p.pool_id,
                    "state": p.state,
                    "slots_total": p.slots_total,
                    "slots_free": p.slots_total.saturating_sub(busy),
                }));
            }
        }
        let candidates = core.registry.candidates();
        let list: Vec<Value> = models
            .into_iter()
            .map(|(model, locations)| {
                let of_model = || candidates.iter().filter(move |c| c.model_id == model);
                let serving = of_model().any(|c| c.serving() || c.standby() || c.waking());
                let online = of_model().any(|c| c.node_online);
                json!({
                    "model_id": model,
                    "available": serving,
                    "nodes_online": online,
                    "locations": locations,
                })
            })
            .collect();
        json!({ "models": list })
    }

    /// Tasks waiting in the queue.
    pub(crate) fn queue_depth(&self) -> usize {
        self.core().queue.len()
    }

    pub(crate) fn queue_capacity(&self) -> usize {
        self.core().queue.capacity()
    }

    /// Tasks holding a slot now.
    pub(crate) fn running_tasks(&self) -> u32 {
        self.core().registry.total_leased()
    }

    /// Runs `read` on the core under its lock and returns what it computed: for a front that
    /// needs several values read at one moment (D-Bus property digests). `read` is synchronous,
    /// so the lock can never be held across an `.await`; keep it short.
    pub(crate) fn read<R>(&self, read: impl FnOnce(&Core) -> R) -> R {
        read(&self.core())
    }
}

/// The queue's counts, as `GET /v2/pools` and `GET /v2/events` give them.
pub(super) fn queue_view(core: &Core) -> QueueView {
    QueueView {
        depth: core.queue.len() as u32,
        capacity: core.queue.capacity() as u32,
        interactive: core.queue.count(Priority::Interactive) as u32,
        batch: core.queue.count(Priority::Batch) as u32,
        running: core.registry.total_leased(),
        policy: core.queue.policy().as_str().into(),
    }
}
