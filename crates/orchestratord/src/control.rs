//! Operator actions, one implementation for both doors (HTTP `/v2/pools/{id}/drain`,
//! `/v2/nodes/{id}/drain`, …, and D-Bus `org.llamaorch.Orchestrator1`): the same checks, the
//! same state transitions, the same journal records. The front ends authenticate the operator
//! and turn a [`Refusal`] into their own error.

use std::sync::Arc;
use std::time::Duration;

use llorch_wire::node::PoolStatus;
use llorch_wire::task::NodeView;
use tokio::time::Instant;

use crate::events::Event;
use crate::outcome::CancelReason;
use crate::refusal::Refusal;
use crate::state::State;

/// How long a node may take to drain, resume, pin or unpin a pool (it only flips a flag).
pub const NODE_ACTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node may take to load or unload a pool: making room may wait for busy pools
/// (the node's 90 s) and unload others (20 s each at most).
pub const NODE_MODEL_ACTION_TIMEOUT: Duration = Duration::from_secs(150);

/// Drains (`drain`) or resumes (`resume`) a pool, through its node; the node's answer updates
/// the registry at once. Pool ids are unique per node, not across nodes: `on_node` says which.
pub(crate) async fn pool_action(
    state: &Arc<State>,
    id: &str,
    on_node: Option<&str>,
    action: &str,
    operator: &str,
) -> Result<PoolStatus, Refusal> {
    let found: Vec<(String, llorch_client::HttpClient)> = {
        let core = state.core();
        core.registry
            .nodes
            .values()
            .filter(|n| on_node.is_none_or(|want| n.id == want))
            .filter(|n| n.pools.iter().any(|p| p.pool_id == id))
            .map(|n| (n.id.clone(), n.client.clone()))
            .collect()
    };
    let (node_id, client) = match <[_; 1]>::try_from(found) {
        Ok([one]) => one,
        Err(found) if found.is_empty() => {
            return Err(Refusal::UnknownPool {
                pool: id.to_string(),
                on_node: on_node.map(str::to_string),
            });
        }
        Err(found) => {
            return Err(Refusal::AmbiguousPool {
                pool: id.to_string(),
                nodes: found.into_iter().map(|(n, _)| n).collect(),
            });
        }
    };
    let (path, empty) = (format!("/v2/pools/{id}/{action}"), serde_json::json!({}));
    let call = client.post_json(&path, &empty);
    // A node that takes the connection and never answers must not hold the operator's request.
    let limit = match action {
        "load" | "unload" => NODE_MODEL_ACTION_TIMEOUT,
        _ => NODE_ACTION_TIMEOUT,
    };
    let answer = tokio::time::timeout(limit, call)
        .await
        .map_err(|_| Refusal::NodeSilent {
            node: node_id.clone(),
            action: action.to_string(),
            pool: id.to_string(),
            within: limit,
        })?;
    let status: PoolStatus = answer.map_err(|e| Refusal::NodeFailed {
        node: node_id.clone(),
        action: action.to_string(),
        pool: id.to_string(),
        error: e.to_string(),
    })?;
    let old = {
        let mut core = state.core();
        core.registry
            .nodes
            .get_mut(&node_id)
            .and_then(|node| node.pools.iter_mut().find(|p| p.pool_id == id))
            .map(|p| std::mem::replace(p, status.clone()).state)
    };
    if let Some(old) = old.filter(|old| *old != status.state) {
        state.announce(Event::PoolStateChanged {
            node: node_id.clone(),
            pool: id.to_string(),
            old: old.to_string(),
            new: status.state.to_string(),
            reason: format!("{action} requested by {operator}"),
        });
    }
    state.wake.notify_one();
    tracing::info!(pool_id = %id, node_id = %node_id, action, operator = %operator, "Pool {action} requested.");
    Ok(status)
}

/// Drains (`true`) or resumes a node: nothing new is placed on a drained node, its running
/// tasks finish; the answer says how many still run.
pub(crate) fn node_action(
    state: &State,
    id: &str,
    draining: bool,
    operator: &str,
) -> Result<NodeView, Refusal> {
    let view = {
        let mut core = state.core();
        if !core.registry.set_draining(id, draining) {
            return Err(Refusal::UnknownNode {
                node: id.to_string(),
            });
        }
        let node = &core.registry.nodes[id];
        core.registry.node_view(node, Instant::now())
    };
    tracing::info!(
        node_id = %id,
        operator = %operator,
        running = view.running,
        "{}",
        if draining { "Node drain requested." } else { "Node resumed." }
    );
    state.wake.notify_one();
    Ok(view)
}

/// Cancels a task by its id, whoever submitted it (the operator's door; a client cancels its
/// own tasks through `POST /v2/tasks/{id}/cancel`). Returns whether it was still running or
/// queued. Ids live in each API key's namespace: an id that two keys chose is refused as
/// ambiguous rather than guessed.
pub(crate) fn cancel_task(state: &State, task_id: &str, operator: &str) -> Result<bool, Refusal> {
    let found = state.tasks().with_id(task_id);
    let task = match <[_; 1]>::try_from(found) {
        Ok([one]) => one,
        Err(found) if found.is_empty() => {
            return Err(Refusal::UnknownTask {
                task_id: task_id.to_string(),
            })
        }
        Err(found) => {
            return Err(Refusal::AmbiguousTask {
                task_id: task_id.to_string(),
                clients: found.iter().map(|t| t.client.clone()).collect(),
            });
        }
    };
    let canceled = state.cancel(&task, CancelReason::Operator);
    tracing::info!(task_id = %task_id, client = %task.client, operator = %operator, canceled, "Task cancel requested by an operator.");
    Ok(canceled)
}

/// Reads the key files again (SIGHUP, `systemctl reload`, D-Bus `ReloadKeys`) and logs the
/// outcome; a file that no longer parses leaves the keys in force.
pub fn reload_keys(state: &State, by: &str) -> Result<(usize, usize), crate::auth::KeysError> {
    llorch_os::service::reloading();
    let result = state.reload_keys();
    // A revoked node token must not live on in beats: every node's next beat is answered with
    // a request for its (authenticated) heartbeat. Also when another file failed: the node
    // tokens may have been read again all the same.
    state.core().registry.ask_reports();
    match &result {
        Ok((api, node)) => tracing::info!(
            api_keys = api,
            node_tokens = node,
            by = %by,
            "Reloaded the key files."
        ),
        Err(e) => tracing::error!(
            message_id = llorch_os::message_id::CONFIG_REJECTED,
            error = %e,
            by = %by,
            "Reload failed for a key file; its keys stay in force, the other files were read again."
        ),
    }
    llorch_os::service::ready();
    result
}
