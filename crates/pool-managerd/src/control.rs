//! Operator actions on this node's pools, one implementation for both doors: the node API
//! (`POST /v2/pools/{id}/drain|resume`, which the control plane calls) and D-Bus
//! (`org.llamaorch.PoolManager1`). The same checks, the same transitions, the same log lines.

use std::time::Duration;

use llorch_wire::node::PoolStatus;

use crate::state::{Command, Node, Unanswered};

/// How long `Load`, `Unload` and `Restart` may take to be carried out: an engine's stop grace
/// and then some. (A load is not waited for: the pool's state says when it is ready.)
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("pool {id:?} is not on this node; its pools are: {known}")]
    UnknownPool { id: String, known: String },
    #[error("{0}")]
    NotOnDemand(String),
    #[error("pool {0} is starting or stopping; try again in a moment")]
    Unavailable(String),
    #[error("pool {id} did not carry out {command} within {} s; see journalctl -u pool-managerd", COMMAND_TIMEOUT.as_secs())]
    Timeout { id: String, command: &'static str },
    #[error("{0}")]
    ConfigRejected(String),
    /// No room could be made to load the pool (what holds the memory is named).
    #[error("{0}")]
    NoRoom(String),
    /// Room could not be made now (pools with work held it past the wait); try again later.
    #[error("{0}")]
    Busy(String),
}

impl ControlError {
    /// The error's name on D-Bus (`org.llamaorch.Error.<code>`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownPool { .. } => "NotFound",
            Self::NotOnDemand(_) => "NotOnDemand",
            Self::Unavailable(_) => "Unavailable",
            Self::Timeout { .. } => "Timeout",
            Self::ConfigRejected(_) => "ConfigRejected",
            Self::NoRoom(_) => "InsufficientMemory",
            Self::Busy(_) => "Unavailable",
        }
    }
}

fn unknown(node: &Node, id: &str) -> ControlError {
    ControlError::UnknownPool {
        id: id.to_string(),
        known: node.pool_ids().join(", "),
    }
}

/// Drains (`true`) or resumes a pool: a drained pool takes no new work; running work finishes.
pub fn set_draining(
    node: &Node,
    id: &str,
    draining: bool,
    by: &str,
) -> Result<PoolStatus, ControlError> {
    node.operator_change(id, |p| {
        if p.draining != draining {
            tracing::info!(pool_id = %id, draining, by = %by, "Drain flag changed by an operator.");
        }
        p.draining = draining;
    })
    .ok_or_else(|| unknown(node, id))?;
    // The flag is reported even when the state does not change (a pool not ready yet).
    node.changed.notify_one();
    node.status(id).ok_or_else(|| unknown(node, id))
}

/// Pins (`true`) or unpins an on-demand pool: a pinned pool is never unloaded to make room for
/// another (its keep-alive still unloads it).
pub fn set_pinned(
    node: &Node,
    id: &str,
    pinned: bool,
    by: &str,
) -> Result<PoolStatus, ControlError> {
    let on_demand = node
        .read(id, |p| p.config.on_demand)
        .ok_or_else(|| unknown(node, id))?;
    if !on_demand {
        return Err(ControlError::NotOnDemand(format!(
            "pool {id} is not on demand: it is never unloaded to make room, so pinning it changes nothing"
        )));
    }
    node.operator_change(id, |p| {
        if p.pinned != pinned {
            tracing::info!(pool_id = %id, pinned, by = %by, "Pin changed by an operator.");
        }
        p.pinned = pinned;
    });
    node.changed.notify_one();
    node.status(id).ok_or_else(|| unknown(node, id))
}

/// Hands `command` to the pool's supervisor and waits until it was carried out. `Load` of an
/// on-demand pool that is not loaded makes room for it first, as a request would.
pub async fn command(
    node: &Node,
    id: &str,
    command: Command,
    by: &str,
) -> Result<(), ControlError> {
    let sender = node
        .read(id, |p| p.commands.clone())
        .ok_or_else(|| unknown(node, id))?
        .ok_or_else(|| ControlError::Unavailable(id.to_string()))?;
    let needs_room = node
        .read(id, |p| p.config.on_demand && !p.charged())
        .unwrap_or(false);
    if command == Command::Load && needs_room {
        crate::swap::make_room(node, id, by)
            .await
            .map_err(|e| match e {
                crate::swap::RoomError::Refused(why) => ControlError::NoRoom(why),
                // Busy pools or a failed unload: worth trying again, not a refusal.
                e => ControlError::Busy(e.to_string()),
            })?;
    }
    crate::state::ask(sender, command, by, COMMAND_TIMEOUT)
        .await
        .map_err(|e| match e {
            Unanswered::NoSupervisor => ControlError::Unavailable(id.to_string()),
            Unanswered::TimedOut => ControlError::Timeout {
                id: id.to_string(),
                command: command.as_str(),
            },
            Unanswered::Refused(why) => ControlError::NotOnDemand(why),
        })
}

/// A request to read node.toml again, answered with what changed.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<crate::pools::Changes, String>>;

/// Asks the node's main loop to reload its configuration (as SIGHUP does) and waits for the
/// outcome.
pub async fn reload(
    reloads: &tokio::sync::mpsc::Sender<ReloadRequest>,
) -> Result<crate::pools::Changes, ControlError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let stopped = || ControlError::Unavailable("(the node is stopping)".into());
    reloads.send(reply).await.map_err(|_| stopped())?;
    answer
        .await
        .map_err(|_| stopped())?
        .map_err(ControlError::ConfigRejected)
}
