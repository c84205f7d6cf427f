//! The slot lease: a task placed on a pool holds one of its slots until it ends.

use std::sync::Arc;

use llorch_wire::ErrorBody;
use tokio::time::Instant;

use super::forward::Outcome;
use crate::registry::PoolKey;
use crate::state::State;
use crate::tasks::Task;

/// A leased slot. It is returned exactly once: explicitly before a task's final event (so a
/// client that saw `end` finds the slot free for its next request), or by `Drop` on any other
/// path, so none can leak it.
pub(crate) struct Lease {
    state: Arc<State>,
    pub(crate) pool: PoolKey,
    model: String,
    since: Instant,
    /// Whether the hold time counts toward the service rate (false when the task never ran).
    pub(super) measured: bool,
    released: bool,
}

impl Lease {
    /// A lease on a slot of `pool`, taken at `since` (the registry counts it separately).
    pub(super) fn new(state: Arc<State>, pool: PoolKey, model: String, since: Instant) -> Self {
        Self {
            state,
            pool,
            model,
            since,
            measured: false,
            released: false,
        }
    }

    /// Returns the slot now; later calls and the drop do nothing.
    pub(crate) fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let held = self.measured.then(|| self.since.elapsed());
        self.state
            .core()
            .registry
            .release(&self.pool, &self.model, held);
        self.state.wake.notify_one();
    }
}

impl Lease {
    /// Ends the task with `body` once its slot is back; with `suspect`, the pool is skipped
    /// until its node reports again (the failure was the pool's).
    pub(super) fn end(&mut self, task: &Task, body: ErrorBody, suspect: bool) -> Outcome {
        if suspect {
            self.state.core().registry.mark_suspect(&self.pool);
        }
        self.release();
        self.state.finish(task, body);
        Outcome::Done
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
    }
}
