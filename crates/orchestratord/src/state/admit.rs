//! Admission: [`State::submit`] checks a task's id, its model, the feasibility of its placement
//! hints, its deadline against the predicted start and the queue's policy, then queues it.

use std::sync::Arc;
use std::time::Duration;

use llorch_wire::engine::GenerateRequest;
use llorch_wire::task::{PlacementHints, Priority, TaskAccepted, TaskStreams};
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::time::Instant;

use super::{new_id, Core, State};
use crate::admission::{Pushed, ServiceRate};
use crate::outcome::{Api, Rejection};
use crate::placement::{capacity_for, place, Ask, Placement};
use crate::refusal::Refusal;
use crate::tasks::Task;

/// What a front end (OpenAI or native) hands to admission.
#[derive(Debug)]
pub(crate) struct Submission {
    pub(crate) task_id: Option<String>,
    pub(crate) model: String,
    pub(crate) request: GenerateRequest,
    pub(crate) priority: Priority,
    pub(crate) deadline_ms: Option<u64>,
    pub(crate) session_id: Option<String>,
    pub(crate) hints: Option<PlacementHints>,
    pub(crate) client: String,
    pub(crate) correlation_id: String,
    /// The context the client says the task needs (native `ctx`); checked against the pools.
    pub(crate) ctx: Option<u32>,
    pub(crate) api: Api,
}

impl State {
    /// Logs the first refusal or eviction of a saturation episode.
    fn saturated(&self, capacity: usize) {
        if !self
            .saturated
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                message_id = llorch_os::message_id::QUEUE_SATURATED,
                queue_capacity = capacity,
                "The queue is full: tasks are refused or evicted until it has room."
            );
            self.announce(crate::events::Event::QueueSaturated(
                u32::try_from(capacity).unwrap_or(u32::MAX),
            ));
        }
    }

    /// Admits a task to the queue, or refuses it.
    pub(crate) fn submit(
        self: &Arc<Self>,
        sub: Submission,
    ) -> Result<(Arc<Task>, TaskAccepted), Refusal> {
        let task_id = match sub.task_id.clone() {
            Some(id) => {
                if id.is_empty()
                    || id.len() > 128
                    || !id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
                {
                    return Err(Refusal::InvalidTaskId);
                }
                id
            }
            None => new_id("task"),
        };
        let task = Arc::new(Task::new(
            task_id.clone(),
            sub.model.clone(),
            sub.priority,
            sub.client.clone(),
            sub.session_id.clone(),
            sub.hints.clone(),
            sub.request.clone(),
            sub.correlation_id.clone(),
            sub.api,
        ));
        {
            let mut tasks = self.tasks();
            // Ids are per client: another key's task of the same id is neither found nor
            // revealed here.
            if tasks.contains(&task.key) {
                return Err(Refusal::TaskExists { task_id });
            }
            tasks.insert(task.clone());
        }
        let admitted = self.admit(&task, &sub);
        match admitted {
            Ok((accepted, evicted)) => {
                if let Some(victim) = evicted {
                    self.metrics.rejected(Rejection::Evicted);
                    tracing::info!(task_id = %victim.id, "Evicted from the full queue (drop-lru).");
                    self.finish(
                        &victim,
                        ErrorBody {
                            policy_label: Some("drop-lru".into()),
                            ..ErrorBody::new(
                                ErrorCode::QueueFullDropLru,
                                "the queue was full and this batch task was the oldest; it was dropped for a newer task (submit again later)",
                            )
                        },
                    );
                }
                self.wake.notify_one();
                Ok((task, accepted))
            }
            Err(refusal) => {
                self.tasks().remove(&task.key);
                Err(refusal)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn admit(
        &self,
        task: &Arc<Task>,
        sub: &Submission,
    ) -> Result<(TaskAccepted, Option<Arc<Task>>), Refusal> {
        let mut core = self.core();
        // Only the pools of the task's model: admission costs the same in a large cluster.
        let candidates = core.registry.candidates_for(|m| m == sub.model);
        // Just after a (re)start, nodes are still registering: a task for a model not known
        // yet waits in the queue for them (until the grace ends) instead of being refused.
        let now = Instant::now();
        let awaiting_nodes = self.awaiting_registrations(&core.registry, now)
            && !candidates.iter().any(|c| c.model_id == sub.model);
        if awaiting_nodes {
            let left = self
                .grace_end(&core.registry)
                .saturating_duration_since(now);
            return self.enqueue(&mut core, task, sub, left, Duration::ZERO);
        }
        if core.registry.nodes.is_empty() {
            // Just started (or restarted): nodes register within a heartbeat, and until one
            // does no model is known. A retry soon succeeds; a 404 would be wrong.
            return Err(Refusal::NoNodes);
        }
        if !candidates.iter().any(|c| c.model_id == sub.model) {
            return Err(Refusal::UnknownModel {
                model: sub.model.clone(),
                known: core.registry.models(),
            });
        }
        if !candidates
            .iter()
            .any(|c| c.model_id == sub.model && c.node_online)
        {
            return Err(Refusal::ModelOffline {
                model: sub.model.clone(),
            });
        }
        let session_pool = sub
            .session_id
            .as_deref()
            .and_then(|s| core.sessions.get(&sub.client, s, Instant::now()))
            .map(|s| s.pool.clone());
        let ask = Ask {
            model: &sub.model,
            session_pool: session_pool.as_ref().map(|(n, p)| (n.as_str(), p.as_str())),
            hints: sub.hints.as_ref(),
            slot_wait: core.registry.slot_wait(&candidates, &sub.model),
            cached: Vec::new(),
        };
        if let Placement::Impossible { reason } = place(&candidates, &ask) {
            return Err(Refusal::Unplaceable { reason });
        }
        if let Some(ctx) = sub.ctx {
            let max_ctx = candidates
                .iter()
                .filter(|c| c.model_id == sub.model)
                .map(|c| {
                    core.registry
                        .pool(&(c.node_id.to_string(), c.pool_id.to_string()))
                        .map_or(0, |p| p.ctx_per_slot)
                })
                .max()
                .unwrap_or(0);
            if ctx > max_ctx {
                return Err(Refusal::CtxTooLarge {
                    ctx,
                    max_ctx,
                    model: sub.model.clone(),
                });
            }
        }
        let (free, slots) = capacity_for(&candidates, &sub.model);
        let ahead = core.queue.ahead_of_new(&sub.model, sub.priority) as u32;
        let default_rate = ServiceRate::default();
        let rate = core.registry.rate(&sub.model).unwrap_or(&default_rate);
        let mut predicted = rate.predict_start(ahead, free, slots);
        // An on-demand pool on standby with room for the task starts it after its load.
        if let Some(load) = candidates
            .iter()
            .filter(|c| {
                c.model_id == sub.model && (c.standby() || c.waking()) && c.free_slots > ahead
            })
            .map(|c| c.load_time())
            .min()
        {
            predicted = predicted.min(load);
        }
        let one_slot = rate.predict_start(0, 0, slots.max(1));
        if let Some(deadline_ms) = sub.deadline_ms {
            if predicted > Duration::from_millis(deadline_ms) {
                self.metrics.rejected(Rejection::Deadline);
                return Err(Refusal::DeadlineUnmet {
                    deadline_ms,
                    predicted,
                    ahead,
                    retry_after_ms: one_slot.as_millis().max(1) as u64,
                });
            }
        }
        self.enqueue(&mut core, task, sub, predicted, one_slot)
    }

    /// Pushes an admitted task into the queue (under the core lock the caller holds).
    #[allow(clippy::type_complexity)]
    fn enqueue(
        &self,
        core: &mut Core,
        task: &Arc<Task>,
        sub: &Submission,
        predicted: Duration,
        one_slot: Duration,
    ) -> Result<(TaskAccepted, Option<Arc<Task>>), Refusal> {
        let deadline = sub
            .deadline_ms
            .map(|ms| task.submitted + Duration::from_millis(ms));
        let policy = core.queue.policy();
        let capacity = core.queue.capacity();
        let pushed = core.queue.push(
            task.key.clone(),
            sub.model.clone(),
            sub.client.clone(),
            sub.priority,
            deadline,
            task.clone(),
        );
        if pushed.is_ok() {
            // Counted under the core lock, before anyone can take and finish the task.
            self.metrics.admitted(&task.model);
        }
        let evicted = match pushed {
            Ok(Pushed::Queued) => {
                self.saturated
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                None
            }
            Ok(Pushed::Evicted(id)) => {
                self.saturated(capacity);
                self.tasks().get(&id)
            }
            Err(crate::admission::QueueFull) => {
                self.metrics.rejected(Rejection::QueueFull);
                self.saturated(capacity);
                let retry_ms = one_slot.as_millis().max(1) as u64;
                return Err(Refusal::QueueFull {
                    capacity,
                    policy,
                    retry_after_ms: retry_ms,
                });
            }
        };
        let position = core.queue.position(&task.key).unwrap_or(0);
        Ok((
            TaskAccepted {
                task_id: task.id.clone(),
                queue_position: position,
                predicted_start_ms: predicted.as_millis() as u64,
                streams: TaskStreams {
                    sse: format!("/v2/tasks/{}/events", task.id),
                },
            },
            evicted,
        ))
    }
}
