//! Node liveness: the watcher that marks nodes offline when they stop reporting, forgets those
//! offline for an hour, purges expired sessions, and ends the tasks still waiting for a model
//! nobody registered once the registration grace is over.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::state::State;

/// Marks nodes offline that stopped heartbeating; runs until shutdown.
pub(crate) async fn watch_nodes(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut awaiting = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        let now = Instant::now();
        if awaiting && !state.awaiting_registrations(&state.core().registry, now) {
            // The registration grace is over: tasks still waiting for an unknown model end.
            awaiting = false;
            state.fail_unknown_models();
        }
        let (lost, forgotten) = {
            let mut core = state.core();
            core.sessions.purge(now);
            let lost = core.registry.expire_nodes(now);
            (lost, core.registry.forget_nodes(now))
        };
        for node in forgotten {
            state.metrics.evicted("nodes");
            tracing::info!(node_id = %node, "Node offline for an hour; forgotten (it registers again when it is back).");
        }
        for node in lost {
            state.metrics.node_event("lost");
            state.announce(crate::events::Event::NodeLost {
                node: node.clone(),
                reason: "missed its heartbeats".into(),
            });
            tracing::warn!(
                message_id = llorch_os::message_id::NODE_LOST,
                node_id = %node,
                "Node missed its heartbeats; marked offline."
            );
        }
    }
}
