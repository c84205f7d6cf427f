//! The D-Bus front (docs/DBUS.md): `org.llamaorch.PoolManager1` at `/org/llamaorch/PoolManager1`
//! (reload, the pool list, pool state signals) and one `org.llamaorch.PoolManager1.Pool` object
//! per pool at `/org/llamaorch/PoolManager1/pool/<label>` ([`llorch_bus::path_label`]).
//! Methods call the same [`crate::control`] actions as the node API.
//!
//! The pool table is compared whenever a pool's state changes and at most every
//! [`llorch_bus::PROPERTY_PERIOD`] otherwise: objects come and go with the pools of a reload,
//! a state change is one `PoolStateChanged`, and other changes (busy slots, the drain flag)
//! are coalesced into one `PropertiesChanged` per pool.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use llorch_bus::{authorize, BusError};
use llorch_wire::node::{PoolState, PoolStatus};
use tokio_util::sync::CancellationToken;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, Value};

use crate::control::{ControlError, ReloadRequest};
use crate::state::{Command, Node};

/// A pool object's path.
pub fn pool_path(id: &str) -> String {
    format!(
        "{}/pool/{}",
        llorch_bus::POOL_MANAGER_PATH,
        llorch_bus::path_label(id)
    )
}

fn bus_error(e: ControlError) -> BusError {
    BusError::code(e.code(), e.to_string())
}

/// What a pool object's properties say.
#[derive(Debug, Clone, PartialEq)]
struct PoolProps {
    status: PoolStatus,
    sha256: String,
}

impl PoolProps {
    fn read(node: &Node, id: &str) -> Option<Self> {
        node.read(id, |p| PoolProps {
            status: p.status(),
            sha256: p
                .handoff
                .as_ref()
                .map(|h| h.model_sha256.clone())
                .or_else(|| p.config.model.sha256.clone())
                .unwrap_or_default(),
        })
    }

    fn all(node: &Node) -> BTreeMap<String, Self> {
        node.pool_ids()
            .into_iter()
            .filter_map(|id| Self::read(node, &id).map(|p| (id, p)))
            .collect()
    }

    /// Every property by D-Bus name.
    fn values(&self) -> Vec<(&'static str, Value<'static>)> {
        let s = &self.status;
        vec![
            ("Id", Value::from(s.pool_id.clone())),
            ("State", Value::from(s.state.to_string())),
            ("Model", Value::from(s.model_id.clone())),
            ("Sha256", Value::from(self.sha256.clone())),
            ("EnginePid", Value::from(s.engine_pid.unwrap_or(0))),
            ("SlotsTotal", Value::from(s.slots_total)),
            ("SlotsBusy", Value::from(s.slots_busy)),
            ("LoadMs", Value::from(s.load_ms.unwrap_or(0))),
            (
                "LastError",
                Value::from(s.last_error.clone().unwrap_or_default()),
            ),
            ("Restarts", Value::from(s.restarts)),
            ("OnDemand", Value::from(s.on_demand)),
            ("Draining", Value::from(s.draining)),
        ]
    }

    fn changed_since(&self, before: &PoolProps) -> HashMap<&'static str, Value<'static>> {
        let old: HashMap<_, _> = before.values().into_iter().collect();
        self.values()
            .into_iter()
            .filter(|(k, v)| old.get(k) != Some(v))
            .collect()
    }
}

/// Why a pool is in its new state, for `PoolStateChanged`.
fn reason(p: &PoolStatus) -> String {
    match p.state {
        PoolState::Provisioning => "staging and verifying the model".into(),
        PoolState::Loading => "the engine started and loads the model".into(),
        PoolState::Ready => "the engine serves".into(),
        PoolState::Draining if p.draining => "drained by an operator".into(),
        PoolState::Draining => "the engine is stopping".into(),
        PoolState::Standby => "on standby: the first request loads the model".into(),
        PoolState::Failed => p.last_error.clone().unwrap_or_default(),
        // Only the control plane says it; a node never holds it.
        PoolState::Offline => "the control plane does not hear this node".into(),
    }
}

pub struct Manager {
    node: Arc<Node>,
    node_id: String,
    reloads: tokio::sync::mpsc::Sender<ReloadRequest>,
}

#[zbus::interface(name = "org.llamaorch.PoolManager1")]
impl Manager {
    /// This node's id (`node.id`).
    #[zbus(property)]
    fn node_id(&self) -> String {
        self.node_id.clone()
    }

    /// Reads node.toml again, as `systemctl reload pool-managerd` does: added, removed and
    /// changed pools apply at once; a file that does not pass the checks changes nothing and
    /// is refused with `org.llamaorch.Error.ConfigRejected`.
    async fn reload(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BusError> {
        let caller = authorize(conn, &hdr, "Reload").await?;
        tracing::info!(by = %caller, "Reload requested on D-Bus.");
        crate::control::reload(&self.reloads)
            .await
            .map(drop)
            .map_err(bus_error)
    }

    /// Every pool: id, object path, state.
    fn list_pools(&self) -> Vec<(String, OwnedObjectPath, String)> {
        self.node
            .statuses()
            .into_iter()
            .filter_map(|p| {
                let path = OwnedObjectPath::try_from(pool_path(&p.pool_id)).ok()?;
                Some((p.pool_id, path, p.state.to_string()))
            })
            .collect()
    }

    /// A pool's state changed (`""` for a pool that appeared or went).
    #[zbus(signal)]
    async fn pool_state_changed(
        emitter: &SignalEmitter<'_>,
        pool: &str,
        old: &str,
        new: &str,
        reason: &str,
    ) -> zbus::Result<()>;
}

pub struct Pool {
    node: Arc<Node>,
    id: String,
}

impl Pool {
    fn props(&self) -> zbus::fdo::Result<PoolProps> {
        PoolProps::read(&self.node, &self.id)
            .ok_or_else(|| zbus::fdo::Error::UnknownObject(format!("pool {} was removed", self.id)))
    }

    async fn command(
        &self,
        conn: &zbus::Connection,
        hdr: &Header<'_>,
        command: Command,
    ) -> Result<(), BusError> {
        let caller = authorize(conn, hdr, command.as_str()).await?;
        crate::control::command(&self.node, &self.id, command, &caller.to_string())
            .await
            .map_err(bus_error)
    }

    async fn pin_flag(
        &self,
        conn: &zbus::Connection,
        hdr: &Header<'_>,
        pinned: bool,
    ) -> Result<(), BusError> {
        let method = if pinned { "Pin" } else { "Unpin" };
        let caller = authorize(conn, hdr, method).await?;
        crate::control::set_pinned(&self.node, &self.id, pinned, &caller.to_string())
            .map(drop)
            .map_err(bus_error)
    }

    async fn drain_flag(
        &self,
        conn: &zbus::Connection,
        hdr: &Header<'_>,
        draining: bool,
    ) -> Result<(), BusError> {
        let method = if draining { "Drain" } else { "Resume" };
        let caller = authorize(conn, hdr, method).await?;
        crate::control::set_draining(&self.node, &self.id, draining, &caller.to_string())
            .map(drop)
            .map_err(bus_error)
    }
}

#[zbus::interface(name = "org.llamaorch.PoolManager1.Pool")]
impl Pool {
    #[zbus(property)]
    fn id(&self) -> String {
        self.id.clone()
    }

    /// `provisioning`, `loading`, `ready`, `draining`, `standby` or `failed`.
    #[zbus(property)]
    fn state(&self) -> zbus::fdo::Result<String> {
        Ok(self.props()?.status.state.to_string())
    }

    #[zbus(property)]
    fn model(&self) -> zbus::fdo::Result<String> {
        Ok(self.props()?.status.model_id)
    }

    /// The model file's sha256 (the loaded engine's, else the configured one; `""` if none).
    #[zbus(property)]
    fn sha256(&self) -> zbus::fdo::Result<String> {
        Ok(self.props()?.sha256)
    }

    /// The engine's process id; 0 when none runs.
    #[zbus(property)]
    fn engine_pid(&self) -> zbus::fdo::Result<u32> {
        Ok(self.props()?.status.engine_pid.unwrap_or(0))
    }

    #[zbus(property)]
    fn slots_total(&self) -> zbus::fdo::Result<u32> {
        Ok(self.props()?.status.slots_total)
    }

    #[zbus(property)]
    fn slots_busy(&self) -> zbus::fdo::Result<u32> {
        Ok(self.props()?.status.slots_busy)
    }

    /// The engine's last load time, start to ready; 0 before the first load.
    #[zbus(property)]
    fn load_ms(&self) -> zbus::fdo::Result<u64> {
        Ok(self.props()?.status.load_ms.unwrap_or(0))
    }

    #[zbus(property)]
    fn last_error(&self) -> zbus::fdo::Result<String> {
        Ok(self.props()?.status.last_error.unwrap_or_default())
    }

    /// Engine restarts after failures.
    #[zbus(property)]
    fn restarts(&self) -> zbus::fdo::Result<u32> {
        Ok(self.props()?.status.restarts)
    }

    #[zbus(property)]
    fn on_demand(&self) -> zbus::fdo::Result<bool> {
        Ok(self.props()?.status.on_demand)
    }

    #[zbus(property)]
    fn draining(&self) -> zbus::fdo::Result<bool> {
        Ok(self.props()?.status.draining)
    }

    /// Loads the model now (see docs/DBUS.md); returns once the engine was asked to start.
    async fn load(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BusError> {
        self.command(conn, &hdr, Command::Load).await
    }

    /// Stops an on-demand pool's engine; returns once it stopped.
    async fn unload(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BusError> {
        self.command(conn, &hdr, Command::Unload).await
    }

    /// Pins an on-demand pool: it is never unloaded to make room for another.
    async fn pin(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BusError> {
        self.pin_flag(conn, &hdr, true).await
    }

    async fn unpin(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BusError> {
        self.pin_flag(conn, &hdr, false).await
    }

    #[zbus(property)]
    fn pinned(&self) -> zbus::fdo::Result<bool> {
        Ok(self.props()?.status.pinned)
    }

    /// Stops the engine and starts it again; returns once the old one stopped.
    async fn restart(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BusError> {
        self.command(conn, &hdr, Command::Restart).await
    }

    async fn drain(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BusError> {
        self.drain_flag(conn, &hdr, true).await
    }

    async fn resume(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BusError> {
        self.drain_flag(conn, &hdr, false).await
    }
}

/// Offers `org.llamaorch.PoolManager1` (with an object per pool) on the bus `mode` names and
/// keeps it current until `stop` fires. `Err`: an explicitly chosen bus cannot be had.
pub async fn start(
    node: Arc<Node>,
    node_id: String,
    mode: llorch_bus::Mode,
    reloads: tokio::sync::mpsc::Sender<ReloadRequest>,
    stop: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    let pools = PoolProps::all(&node);
    let manager = Manager {
        node: node.clone(),
        node_id,
        reloads,
    };
    let objects: Vec<(String, Pool)> = pools
        .keys()
        .map(|id| {
            (
                pool_path(id),
                Pool {
                    node: node.clone(),
                    id: id.clone(),
                },
            )
        })
        .collect();
    let conn = llorch_bus::serve(mode, llorch_bus::POOL_MANAGER, |mut b| {
        b = b.serve_at(llorch_bus::POOL_MANAGER_PATH, manager)?;
        for (path, pool) in objects {
            b = b.serve_at(path, pool)?;
        }
        Ok(b)
    })
    .await?;
    Ok(conn.map(|conn| tokio::spawn(publish(conn, node, pools, stop))))
}

async fn publish(
    conn: zbus::Connection,
    node: Arc<Node>,
    mut last: BTreeMap<String, PoolProps>,
    stop: CancellationToken,
) {
    let mut states = node.generation.subscribe();
    let mut tick = tokio::time::interval(llorch_bus::PROPERTY_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = states.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = PoolProps::all(&node);
        if let Err(e) = announce(&conn, &node, &last, &now).await {
            tracing::debug!(error = %e, "Cannot update D-Bus.");
        }
        last = now;
    }
}

/// Brings the bus up to date from `before` to `now`: objects, signals, properties.
async fn announce(
    conn: &zbus::Connection,
    node: &Arc<Node>,
    before: &BTreeMap<String, PoolProps>,
    now: &BTreeMap<String, PoolProps>,
) -> zbus::Result<()> {
    let server = conn.object_server();
    let manager = SignalEmitter::new(conn, llorch_bus::POOL_MANAGER_PATH)?;
    for (id, old) in before {
        if !now.contains_key(id) {
            server.remove::<Pool, _>(pool_path(id)).await?;
            Manager::pool_state_changed(
                &manager,
                id,
                &old.status.state.to_string(),
                "",
                "removed from the configuration",
            )
            .await?;
        }
    }
    for (id, p) in now {
        let new_state = p.status.state.to_string();
        match before.get(id) {
            None => {
                server
                    .at(
                        pool_path(id),
                        Pool {
                            node: node.clone(),
                            id: id.clone(),
                        },
                    )
                    .await?;
                Manager::pool_state_changed(
                    &manager,
                    id,
                    "",
                    &new_state,
                    "added to the configuration",
                )
                .await?;
            }
            // Nothing changed (most ticks): nothing to compare field by field.
            Some(old) if old == p => {}
            Some(old) => {
                if old.status.state != p.status.state {
                    Manager::pool_state_changed(
                        &manager,
                        id,
                        &old.status.state.to_string(),
                        &new_state,
                        &reason(&p.status),
                    )
                    .await?;
                }
                llorch_bus::properties_changed(
                    conn,
                    &pool_path(id),
                    llorch_bus::POOL_INTERFACE,
                    &p.changed_since(old),
                )
                .await?;
            }
        }
    }
    Ok(())
}
