//! What a node says when it stops cleanly: a last heartbeat with every pool draining (so
//! nothing new is placed on it while its engines stop), then, once they are gone, that it
//! leaves (so the control plane forgets it instead of calling it lost).

use std::time::Duration;

use hyper::StatusCode;
use llorch_client::{status_of, HttpClient};
use llorch_wire::node::{Heartbeat, NodeAck};

use super::{within, Identity};
use crate::state::Node;

/// On shutdown: one last heartbeat, with every pool reported as draining, so the control plane
/// stops placing work on this node before its engines stop. Best effort, at most one second.
pub async fn final_heartbeat(node: &Node, client: &HttpClient, identity: &Identity) {
    let (pools, gpus) = node.report();
    let hb = Heartbeat {
        pools,
        staged_models: node.staged_models(),
        gpus,
        memory: node.device_memory(),
    };
    let path = format!("/v2/nodes/{}/heartbeat", identity.node_id);
    let sent = within(
        Duration::from_secs(1),
        client.post_json::<_, NodeAck>(&path, &hb),
    )
    .await;
    if let Err(e) = sent {
        tracing::debug!(error = %e, "The last heartbeat did not reach the control plane.");
    }
}

/// On a clean stop, once the engines are gone: tells the control plane this node leaves, so
/// it forgets the node at once instead of waiting for missed heartbeats (which would count as
/// a lost node and page someone). Best effort, at most one second.
pub async fn leave(client: &HttpClient, identity: &Identity) {
    let path = format!("/v2/nodes/{}/leave", identity.node_id);
    let sent = within(Duration::from_secs(1), async {
        let resp = client.post_raw(&path, "{}", &[]).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(llorch_client::error_from_response(resp).await)
        }
    })
    .await;
    match sent {
        Ok(()) => tracing::info!(control_plane = %client.address(), "Left the control plane."),
        // Never registered (refused, or the control plane restarted): nothing to leave.
        Err(e) if status_of(&e) == Some(StatusCode::NOT_FOUND) => {
            tracing::info!(control_plane = %client.address(), "The control plane does not know this node; nothing to leave.");
        }
        Err(e) => {
            tracing::warn!(control_plane = %client.address(), error = %e, "Could not tell the control plane this node leaves; it will call the node lost once its heartbeats are missed.")
        }
    }
}
