//! Native event-stream subscribers, counted per task and per client (API key) so that neither
//! can open streams without bound.

use std::sync::Arc;

use super::State;
use crate::refusal::Refusal;
use crate::tasks::Task;

/// Native event streams (`GET /v2/tasks/{id}/events`) one task may have open at once.
pub(crate) const MAX_SUBSCRIBERS_PER_TASK: u32 = 8;
/// Native event streams one client (API key) may have open at once, all tasks together.
pub(crate) const MAX_SUBSCRIBERS_PER_CLIENT: u32 = 256;

/// One open native event stream, counted against its task's and its client's limits until
/// dropped.
pub(crate) struct Subscriber {
    state: Arc<State>,
    task: Arc<Task>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task
            .subscribers
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = llorch_os::sync::lock(&self.state.subscribers);
        if let Some(n) = map.get_mut(&self.task.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.task.client);
            }
        }
    }
}

impl State {
    /// Opens a native event stream on `task`: 429 `RATE_LIMITED` when the task or its client
    /// has as many open as allowed.
    pub(crate) fn subscribe(self: &Arc<Self>, task: &Arc<Task>) -> Result<Subscriber, Refusal> {
        use std::sync::atomic::Ordering;
        let mut map = llorch_os::sync::lock(&self.subscribers);
        let of_client = map.get(&task.client).copied().unwrap_or(0);
        if of_client >= MAX_SUBSCRIBERS_PER_CLIENT {
            return Err(Refusal::ClientStreams { open: of_client });
        }
        let of_task = task.subscribers.load(Ordering::Relaxed);
        if of_task >= MAX_SUBSCRIBERS_PER_TASK {
            return Err(Refusal::TaskStreams {
                task_id: task.id.clone(),
                open: of_task,
            });
        }
        task.subscribers.fetch_add(1, Ordering::Relaxed);
        map.insert(task.client.clone(), of_client + 1);
        Ok(Subscriber {
            state: Arc::clone(self),
            task: Arc::clone(task),
        })
    }
}
