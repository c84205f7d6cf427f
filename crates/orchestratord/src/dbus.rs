//! The D-Bus front (docs/DBUS.md): `org.llamaorch.Orchestrator1` at
//! `/org/llamaorch/Orchestrator1`. Properties read the same state as the HTTP API; methods call
//! the same [`crate::control`] actions; signals forward [`crate::events`].
//!
//! `PropertiesChanged` is coalesced: the properties are compared every [`PROPERTY_PERIOD`] and
//! the changed ones go out in one signal, so a busy queue costs at most four signals a second.
//! A node's heartbeat age is reported when read, and does not by itself count as a change.

use std::collections::HashMap;
use std::sync::Arc;

use llorch_bus::{authorize, BusError};
use tokio::time::Instant;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::Value;

use crate::events::Event;
use crate::refusal::Refusal;
use crate::state::{Core, State};

pub(crate) use llorch_bus::PROPERTY_PERIOD;

/// `Nodes`: id, state (`online`, `suspect`, `offline`), address, milliseconds since its last
/// heartbeat, its pool ids, and whether an operator drained it.
pub(crate) type NodeEntry = (String, String, String, u64, Vec<String>, bool);
/// `Pools`: node, pool, model, state, free slots, total slots, on demand.
pub(crate) type PoolEntry = (String, String, String, String, u32, u32, bool);

pub(crate) struct Orchestrator {
    state: Arc<State>,
}

/// A refusal of the shared action, as a D-Bus error: `Forbidden` is the bus's `AccessDenied`,
/// every other code is `org.llamaorch.Error.<Code>` (`InvalidParams`, `NodeUnavailable`, ...).
fn bus_error(refusal: Refusal) -> BusError {
    let body = refusal.body();
    match body.code {
        llorch_wire::ErrorCode::Forbidden | llorch_wire::ErrorCode::Unauthorized => {
            BusError::access_denied(body.message)
        }
        code => BusError::code(&format!("{code:?}"), body.message),
    }
}

/// What the properties say, read under one lock. `Nodes` and `Pools` are kept as digests
/// (heartbeat ages left out): comparing them four times a second allocates nothing, however
/// many nodes there are; their values are built only when they changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    ready: bool,
    queue_depth: u32,
    queue_capacity: u32,
    running: u32,
    nodes: u64,
    pools: u64,
}

fn digest(value: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

impl Snapshot {
    fn take(state: &State) -> Self {
        state.read(Self::of)
    }

    fn of(core: &Core) -> Self {
        let now = Instant::now();
        let registry = &core.registry;
        let ready = registry.serving().0;
        let nodes = registry.nodes.values().fold(0u64, |h, n| {
            let h = digest((h, &n.id, n.state(now), &n.address, n.draining));
            n.pools.iter().fold(h, |h, p| digest((h, &p.pool_id)))
        });
        let mut pools = registry.nodes.values().fold(0u64, |h, n| {
            n.pools.iter().fold(h, |h, p| {
                digest((
                    h,
                    &n.id,
                    &p.pool_id,
                    &p.model_id,
                    p.state,
                    p.slots_total,
                    p.on_demand,
                ))
            })
        });
        // Leases come in no order: combined so that the order does not matter.
        for (key, n) in registry.leases() {
            pools ^= digest((key, n));
        }
        Self {
            ready,
            queue_depth: u32::try_from(core.queue.len()).unwrap_or(u32::MAX),
            queue_capacity: u32::try_from(core.queue.capacity()).unwrap_or(u32::MAX),
            running: registry.total_leased(),
            nodes,
            pools,
        }
    }

    /// The properties that differ from `before`, by D-Bus name, with their values now.
    fn changed_since(
        &self,
        before: &Snapshot,
        state: &State,
    ) -> HashMap<&'static str, Value<'static>> {
        let mut out = HashMap::new();
        if self.ready != before.ready {
            out.insert("Ready", Value::from(self.ready));
        }
        if self.queue_depth != before.queue_depth {
            out.insert("QueueDepth", Value::from(self.queue_depth));
        }
        if self.queue_capacity != before.queue_capacity {
            out.insert("QueueCapacity", Value::from(self.queue_capacity));
        }
        if self.running != before.running {
            out.insert("RunningTasks", Value::from(self.running));
        }
        if self.nodes != before.nodes {
            out.insert("Nodes", Value::from(nodes(state)));
        }
        if self.pools != before.pools {
            out.insert("Pools", Value::from(pools(state)));
        }
        out
    }
}

fn nodes(state: &State) -> Vec<NodeEntry> {
    let now = Instant::now();
    state.read(|core| {
        core.registry
            .nodes
            .values()
            .map(|n| {
                (
                    n.id.clone(),
                    n.state(now).to_string(),
                    n.address.clone(),
                    now.duration_since(n.last_seen).as_millis() as u64,
                    n.pools.iter().map(|p| p.pool_id.clone()).collect(),
                    n.draining,
                )
            })
            .collect()
    })
}

fn pools(state: &State) -> Vec<PoolEntry> {
    state.read(pool_entries)
}

fn pool_entries(core: &Core) -> Vec<PoolEntry> {
    let mut out = Vec::new();
    for n in core.registry.nodes.values() {
        for p in &n.pools {
            let leased = core.registry.leased(&(n.id.clone(), p.pool_id.clone()));
            out.push((
                n.id.clone(),
                p.pool_id.clone(),
                p.model_id.clone(),
                n.pool_state(p).to_string(),
                p.slots_total.saturating_sub(leased),
                p.slots_total,
                p.on_demand,
            ));
        }
    }
    out
}

#[zbus::interface(name = "org.llamaorch.Orchestrator1")]
impl Orchestrator {
    /// Whether requests are served (a pool is ready, or an on-demand pool is on standby).
    #[zbus(property)]
    fn ready(&self) -> bool {
        self.state.serving().0
    }

    /// Tasks waiting in the admission queue.
    #[zbus(property)]
    fn queue_depth(&self) -> u32 {
        u32::try_from(self.state.queue_depth()).unwrap_or(u32::MAX)
    }

    #[zbus(property)]
    fn queue_capacity(&self) -> u32 {
        u32::try_from(self.state.queue_capacity()).unwrap_or(u32::MAX)
    }

    /// Tasks holding a slot now.
    #[zbus(property)]
    fn running_tasks(&self) -> u32 {
        self.state.running_tasks()
    }

    #[zbus(property)]
    fn nodes(&self) -> Vec<NodeEntry> {
        nodes(&self.state)
    }

    #[zbus(property)]
    fn pools(&self) -> Vec<PoolEntry> {
        pools(&self.state)
    }

    /// Drains a pool: nothing new is placed on it, running tasks finish. `node` may be empty
    /// when the pool id is on one node only.
    async fn drain_pool(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
        node: String,
        pool: String,
    ) -> Result<(), BusError> {
        self.pool_action(conn, &hdr, "DrainPool", node, pool, "drain")
            .await
    }

    async fn resume_pool(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
        node: String,
        pool: String,
    ) -> Result<(), BusError> {
        self.pool_action(conn, &hdr, "ResumePool", node, pool, "resume")
            .await
    }

    /// Loads a pool's model now, making room as a request would (docs/DBUS.md).
    async fn load_pool(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
        node: String,
        pool: String,
    ) -> Result<(), BusError> {
        self.pool_action(conn, &hdr, "LoadPool", node, pool, "load")
            .await
    }

    /// Unloads an on-demand pool's model; returns once its engine stopped.
    async fn unload_pool(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
        node: String,
        pool: String,
    ) -> Result<(), BusError> {
        self.pool_action(conn, &hdr, "UnloadPool", node, pool, "unload")
            .await
    }

    /// Pins (`pinned`) or unpins an on-demand pool: a pinned pool is never unloaded to make
    /// room for another.
    async fn pin_pool(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
        node: String,
        pool: String,
        pinned: bool,
    ) -> Result<(), BusError> {
        let (method, action) = if pinned {
            ("PinPool", "pin")
        } else {
            ("PinPool", "unpin")
        };
        self.pool_action(conn, &hdr, method, node, pool, action)
            .await
    }

    /// Drains a node: nothing new is placed on any of its pools, running tasks finish.
    async fn drain_node(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
        node: String,
    ) -> Result<(), BusError> {
        let caller = authorize(conn, &hdr, "DrainNode").await?;
        crate::control::node_action(&self.state, &node, true, &caller.to_string())
            .map(drop)
            .map_err(bus_error)
    }

    async fn resume_node(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
        node: String,
    ) -> Result<(), BusError> {
        let caller = authorize(conn, &hdr, "ResumeNode").await?;
        crate::control::node_action(&self.state, &node, false, &caller.to_string())
            .map(drop)
            .map_err(bus_error)
    }

    /// Cancels a task by id, whoever submitted it: a queued task ends at once, a running one
    /// stops and frees its slot; its stream ends with `CANCELED`. True when it had not ended.
    async fn cancel_task(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
        task_id: String,
    ) -> Result<bool, BusError> {
        let caller = authorize(conn, &hdr, "CancelTask").await?;
        crate::control::cancel_task(&self.state, &task_id, &caller.to_string()).map_err(bus_error)
    }

    /// Reads the API key and node token files again (as `systemctl reload orchestratord`).
    async fn reload_keys(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BusError> {
        let caller = authorize(conn, &hdr, "ReloadKeys").await?;
        crate::control::reload_keys(&self.state, &caller.to_string())
            .map(drop)
            .map_err(|e| BusError::code("ConfigRejected", e.to_string()))
    }

    #[zbus(signal)]
    async fn node_joined(emitter: &SignalEmitter<'_>, id: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn node_lost(emitter: &SignalEmitter<'_>, id: &str, reason: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn pool_state_changed(
        emitter: &SignalEmitter<'_>,
        node: &str,
        pool: &str,
        old: &str,
        new: &str,
        reason: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn queue_saturated(emitter: &SignalEmitter<'_>, depth: u32) -> zbus::Result<()>;
}

impl Orchestrator {
    async fn pool_action(
        &self,
        conn: &zbus::Connection,
        hdr: &Header<'_>,
        method: &str,
        node: String,
        pool: String,
        action: &str,
    ) -> Result<(), BusError> {
        let caller = authorize(conn, hdr, method).await?;
        let node = Some(node.as_str()).filter(|n| !n.is_empty());
        crate::control::pool_action(&self.state, &pool, node, action, &caller.to_string())
            .await
            .map(drop)
            .map_err(bus_error)
    }
}

/// Offers `org.llamaorch.Orchestrator1` on the bus `mode` names and forwards events and
/// property changes until shutdown. `Err`: an explicitly chosen bus cannot be had.
pub async fn start(state: Arc<State>, mode: llorch_bus::Mode) -> Result<(), String> {
    let iface = Orchestrator {
        state: state.clone(),
    };
    // Subscribed before the name is taken: no event of the first moments is lost.
    let events = state.events.subscribe();
    let conn = llorch_bus::serve(mode, llorch_bus::ORCHESTRATOR, |b| {
        b.serve_at(llorch_bus::ORCHESTRATOR_PATH, iface)
    })
    .await?;
    if let Some(conn) = conn {
        tokio::spawn(publish(conn, state, events));
    }
    Ok(())
}

async fn publish(
    conn: zbus::Connection,
    state: Arc<State>,
    mut events: tokio::sync::broadcast::Receiver<Event>,
) {
    let Ok(emitter) = SignalEmitter::new(&conn, llorch_bus::ORCHESTRATOR_PATH) else {
        return;
    };
    let mut last = Snapshot::take(&state);
    let mut tick = tokio::time::interval(PROPERTY_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(e) => {
                    if let Err(err) = signal(&emitter, &e).await {
                        tracing::debug!(error = %err, "Cannot emit a D-Bus signal.");
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "The D-Bus front fell behind; some signals were not sent.");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                let now = Snapshot::take(&state);
                let changed = now.changed_since(&last, &state);
                let _ = llorch_bus::properties_changed(
                    &conn,
                    llorch_bus::ORCHESTRATOR_PATH,
                    llorch_bus::ORCHESTRATOR,
                    &changed,
                )
                .await;
                last = now;
            }
            () = state.shutdown.cancelled() => return,
        }
    }
}

async fn signal(emitter: &SignalEmitter<'_>, event: &Event) -> zbus::Result<()> {
    match event {
        Event::NodeJoined(id) => Orchestrator::node_joined(emitter, id).await,
        Event::NodeLost { node, reason } => Orchestrator::node_lost(emitter, node, reason).await,
        Event::PoolStateChanged {
            node,
            pool,
            old,
            new,
            reason,
        } => Orchestrator::pool_state_changed(emitter, node, pool, old, new, reason).await,
        Event::QueueSaturated(depth) => Orchestrator::queue_saturated(emitter, *depth).await,
    }
}
