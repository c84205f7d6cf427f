//! The end of a task: its final event, its metrics and its one journal record; cancellation;
//! and the tasks ended wholesale (no node came for their model, orchestratord is stopping).

use std::sync::Arc;

use llorch_wire::task::TaskEnd;
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::time::Instant;

use super::State;
use crate::metrics::Finished;
use crate::outcome::{CancelReason, Outcome};
use crate::tasks::{Task, TaskEvent};

impl State {
    /// Ends a task with an error event; the first final event of a task also schedules its
    /// removal and writes its metrics and journal record.
    pub(crate) fn finish(&self, task: &Task, body: ErrorBody) {
        if task.fail(body) {
            self.finished(task);
        }
    }

    /// Ends a task with its `end` event (see [`State::finish`]).
    pub(crate) fn complete(&self, task: &Task, end: TaskEnd) {
        if task.push(TaskEvent::End(end)) {
            self.finished(task);
        }
    }

    fn finished(&self, task: &Task) {
        task.forget_request();
        let evicted = self.tasks().finished(&task.key);
        for _ in 0..evicted {
            self.metrics.evicted("finished_tasks");
        }
        let now = Instant::now();
        let s = task.summary();
        let canceled = task.cancel_reason.get().copied();
        let outcome = match (&s.error, canceled) {
            (None, _) => Outcome::Ok,
            (Some(_), Some(_)) => Outcome::Canceled,
            (Some(e), None) => Outcome::of_error(e.code),
        };
        let first = task.first_token.get().copied();
        let (tokens_in, tokens_out) = s
            .end
            .as_ref()
            .map_or((0, s.tokens), |e| (e.tokens_in, e.tokens_out));
        let inter_token = match (first, &s.end) {
            (Some(first), Some(end)) if end.tokens_out >= 2 => {
                Some(now.duration_since(first) / (end.tokens_out - 1))
            }
            _ => None,
        };
        let duration = now.duration_since(task.submitted);
        let ttft = first.map(|f| f.duration_since(task.submitted));
        self.metrics.finished(&Finished {
            api: task.api,
            model: &task.model,
            outcome,
            canceled: canceled.filter(|_| outcome == Outcome::Canceled),
            duration,
            ttft,
            inter_token,
            tokens_in,
            tokens_out,
        });
        if let (Some(started), Some(end)) = (&s.started, &s.end) {
            self.tally(
                (started.node_id.clone(), started.pool_id.clone()),
                end.tokens_in,
                end.cached_tokens,
                end.tokens_out,
            );
        }
        // One journal record per task; field names become journald fields (TASK_ID, ...).
        // No prompt or generated text, no key: only the key's name.
        let started = s.started.as_ref();
        tracing::info!(
            message_id = llorch_os::message_id::TASK_FINISHED,
            task_id = %task.id,
            correlation_id = %task.correlation_id,
            model = %task.model,
            pool_id = started.map(|s| s.pool_id.as_str()),
            node_id = started.map(|s| s.node_id.as_str()),
            api_key_name = %task.client,
            api = task.api.as_str(),
            outcome = outcome.as_str(),
            error_code = s.error.as_ref().map(|e| e.code.as_str()),
            queue_ms = started.map(|s| s.queue_ms),
            ttft_ms = ttft.map(|t| t.as_millis() as u64),
            duration_ms = duration.as_millis() as u64,
            tokens_in,
            tokens_out,
            finish_reason = s.end.as_ref().map(|e| e.finish_reason.as_str()),
            "Task finished."
        );
    }

    /// Ends the queued tasks whose model no node serves (called once the registration grace
    /// is over): they waited for a node that did not come.
    pub(crate) fn fail_unknown_models(&self) {
        let orphans: Vec<Arc<Task>> = {
            let mut core = self.core();
            let known = core.registry.models();
            let unknown: Vec<String> = core
                .queue
                .models()
                .filter(|m| known.binary_search_by(|k| k.as_str().cmp(m)).is_err())
                .map(str::to_string)
                .collect();
            let keys: Vec<String> = unknown
                .iter()
                .flat_map(|m| core.queue.of_model(m).map(|e| e.task_id.clone()))
                .collect();
            keys.iter()
                .filter_map(|k| core.queue.remove(k))
                .map(|e| e.item)
                .collect()
        };
        for t in orphans {
            let body = ErrorBody {
                field: Some("model".into()),
                ..ErrorBody::new(
                    ErrorCode::ModelNotFound,
                    format!(
                        "model {:?} is not served here: no node registered it within {} s of orchestratord's start (see GET /v1/models)",
                        t.model,
                        self.config.registration_grace.as_secs()
                    ),
                )
            };
            self.finish(&t, body);
        }
    }

    /// Cancels a task: a queued one leaves the queue and ends at once; a running one is
    /// stopped by its dispatch, which frees the slot. Returns false for a finished task.
    pub(crate) fn cancel(&self, task: &Arc<Task>, reason: CancelReason) -> bool {
        if task.is_finished() {
            return false;
        }
        let _ = task.cancel_reason.set(reason);
        let why = match reason {
            CancelReason::Client => "the task was cancelled by its client",
            CancelReason::Disconnect => "the client went away",
            CancelReason::Shutdown => "orchestratord is stopping",
            CancelReason::Operator => "the task was cancelled by an operator",
        };
        // The token first: a dispatch that is about to put the task back in the queue checks it
        // under the same lock we take next, so the task is either found queued here or never
        // requeued there.
        task.cancel.cancel();
        let was_queued = self.core().queue.remove(&task.key).is_some();
        if was_queued {
            self.finish(task, ErrorBody::new(ErrorCode::Canceled, why));
        }
        true
    }

    /// Ends every queued task (orchestratord is stopping); running ones end with their streams.
    pub(crate) fn fail_queued(&self, why: &str) {
        let queued: Vec<Arc<Task>> = {
            let mut core = self.core();
            let ids: Vec<String> = core.queue.iter().map(|e| e.task_id.clone()).collect();
            ids.iter()
                .filter_map(|id| core.queue.remove(id))
                .map(|e| e.item)
                .collect()
        };
        for t in queued {
            let _ = t.cancel_reason.set(CancelReason::Shutdown);
            self.finish(
                &t,
                ErrorBody::new(ErrorCode::PoolUnavailable, why).with_retry_after_ms(1000),
            );
        }
    }
}
