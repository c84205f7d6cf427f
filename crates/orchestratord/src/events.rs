//! Operator events (a node joined or was lost, a pool changed state, the queue saturated),
//! announced by the code that changes the state and forwarded by the D-Bus front as signals.
//! A broadcast channel: announcing never waits, costs nothing while nobody listens, and a
//! listener that lags loses the oldest events (counted in the log), never the daemon's time.

use llorch_wire::node::PoolStatus;

/// Events kept for a listener that lags.
pub const CAPACITY: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A node registered, or came back online after it was lost.
    NodeJoined(String),
    /// A node missed its heartbeats (or left): its id and why.
    NodeLost { node: String, reason: String },
    /// A pool's state changed: states as in `/v2/pools` (`""` for a pool that appeared or
    /// went), and why.
    PoolStateChanged {
        node: String,
        pool: String,
        old: String,
        new: String,
        reason: String,
    },
    /// The queue refused or evicted a task for the first time since it had room.
    QueueSaturated(u32),
}

/// The state changes between two reports of one node's pools, by pool id.
pub fn pool_changes(
    node: &str,
    old: &[PoolStatus],
    new: &[PoolStatus],
    reason: &str,
) -> Vec<Event> {
    let mut out = Vec::new();
    let state_of = |list: &[PoolStatus], id: &str| {
        list.iter()
            .find(|p| p.pool_id == id)
            .map(|p| p.state.to_string())
    };
    for p in new {
        let before = state_of(old, &p.pool_id).unwrap_or_default();
        let after = p.state.to_string();
        if before != after {
            let why = match (&p.last_error, p.state) {
                (Some(e), llorch_wire::node::PoolState::Failed) => e.clone(),
                _ => reason.to_string(),
            };
            out.push(Event::PoolStateChanged {
                node: node.into(),
                pool: p.pool_id.clone(),
                old: before,
                new: after,
                reason: why,
            });
        }
    }
    for p in old {
        if state_of(new, &p.pool_id).is_none() {
            out.push(Event::PoolStateChanged {
                node: node.into(),
                pool: p.pool_id.clone(),
                old: p.state.to_string(),
                new: String::new(),
                reason: "the node no longer reports it".into(),
            });
        }
    }
    out
}

impl Event {
    /// The event as `GET /v2/events` sends it (`event: notice`): its kind and fields.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Self::NodeJoined(node) => json!({"kind": "node_joined", "node_id": node}),
            Self::NodeLost { node, reason } => {
                json!({"kind": "node_lost", "node_id": node, "reason": reason})
            }
            Self::PoolStateChanged {
                node,
                pool,
                old,
                new,
                reason,
            } => json!({
                "kind": "pool_state_changed",
                "node_id": node,
                "pool_id": pool,
                "old": old,
                "new": new,
                "reason": reason,
            }),
            Self::QueueSaturated(depth) => json!({"kind": "queue_saturated", "depth": depth}),
        }
    }
}
