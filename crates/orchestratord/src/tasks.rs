//! Tasks and their event logs.
//!
//! Every task keeps the events it produced (`started`, `token`…, `metrics`, `end` or `error`)
//! so a subscriber that connects late still gets the whole stream. The log of one task is
//! bounded: the engine stops a generation at its slot's context, so a task holds at most
//! `ctx_per_slot` token events plus four others. Finished tasks are kept for
//! [`RETAIN_FINISHED`] (at most [`MAX_FINISHED`] of them) so a client can still read the end.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use llorch_wire::engine::{GenerateRequest, TokenEvent};
use llorch_wire::task::{MetricsEvent, PlacementHints, Priority, StartedEvent, TaskEnd};
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Api, CancelReason};

pub const RETAIN_FINISHED: Duration = Duration::from_secs(300);
pub const MAX_FINISHED: usize = 4096;

/// One event of a task's stream.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    Started(StartedEvent),
    Token(TokenEvent),
    Metrics(MetricsEvent),
    End(TaskEnd),
    Error(ErrorBody),
}

impl TaskEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Started(_) => "started",
            Self::Token(_) => "token",
            Self::Metrics(_) => "metrics",
            Self::End(_) => "end",
            Self::Error(_) => "error",
        }
    }

    pub fn to_sse(&self) -> String {
        let data = match self {
            Self::Started(e) => serde_json::to_string(e),
            Self::Token(e) => serde_json::to_string(e),
            Self::Metrics(e) => serde_json::to_string(e),
            Self::End(e) => serde_json::to_string(e),
            Self::Error(e) => serde_json::to_string(e),
        }
        .expect("events serialize");
        llorch_wire::sse::frame(self.name(), &data)
    }

    pub fn is_final(&self) -> bool {
        matches!(self, Self::End(_) | Self::Error(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Queued,
    Running,
    Done,
    Failed,
    Canceled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }
}

#[derive(Debug)]
struct Log {
    events: Vec<TaskEvent>,
    phase: Phase,
    pool_id: Option<String>,
}

/// One admitted task.
#[derive(Debug)]
pub struct Task {
    /// The id its client knows it by (chosen by the client, or generated).
    pub id: String,
    /// The id under which orchestratord keeps it: the client's id within its client's
    /// namespace ([`Task::key_for`]), so a client-chosen id taken by another API key is not
    /// taken for this one, and its existence is never revealed.
    pub key: String,
    pub model: String,
    pub priority: Priority,
    /// The API key's name (or `anonymous`): the unit of fair share.
    pub client: String,
    pub session_id: Option<String>,
    pub hints: Option<PlacementHints>,
    /// What is sent to the engine (the slot hint is added at dispatch), until the task ends:
    /// a finished task is kept for its info and late readers, and must not keep its prompt
    /// (up to the body limit, for each of thousands of retained tasks).
    request: Mutex<Option<GenerateRequest>>,
    pub submitted: Instant,
    pub correlation_id: String,
    /// The front end it came through.
    pub api: Api,
    /// Fired to stop the task: the client cancelled or went away.
    pub cancel: CancellationToken,
    /// Why it was cancelled, set by whoever cancelled it first.
    pub cancel_reason: OnceLock<CancelReason>,
    /// When its first token arrived.
    pub first_token: OnceLock<Instant>,
    /// Dispatches that failed before the stream started (see `dispatch::MAX_DISPATCH_ATTEMPTS`).
    pub failed_attempts: std::sync::atomic::AtomicU32,
    log: Mutex<Log>,
    changed: watch::Sender<usize>,
}

impl Task {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        model: String,
        priority: Priority,
        client: String,
        session_id: Option<String>,
        hints: Option<PlacementHints>,
        request: GenerateRequest,
        correlation_id: String,
        api: Api,
    ) -> Self {
        Self {
            key: Self::key_for(&client, &id),
            id,
            model,
            priority,
            client,
            session_id,
            hints,
            request: Mutex::new(Some(request)),
            submitted: Instant::now(),
            correlation_id,
            api,
            cancel: CancellationToken::new(),
            cancel_reason: OnceLock::new(),
            first_token: OnceLock::new(),
            failed_attempts: std::sync::atomic::AtomicU32::new(0),
            log: Mutex::new(Log {
                events: Vec::new(),
                phase: Phase::Queued,
                pool_id: None,
            }),
            changed: watch::channel(0).0,
        }
    }

    /// The internal key of task `id` of `client`. A newline can be in neither (client names
    /// are key-file tokens, task ids are validated), so no two pairs share a key.
    pub fn key_for(client: &str, id: &str) -> String {
        format!("{client}\n{id}")
    }

    /// The request to send to the engine; None once the task ended.
    pub fn request(&self) -> Option<GenerateRequest> {
        crate::sync::lock(&self.request).clone()
    }

    /// Drops the request (the prompt) when the task ends.
    pub fn forget_request(&self) {
        crate::sync::lock(&self.request).take();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        crate::sync::lock(&self.log)
    }

    pub fn phase(&self) -> (Phase, Option<String>) {
        let log = self.lock();
        (log.phase, log.pool_id.clone())
    }

    pub fn is_finished(&self) -> bool {
        !matches!(self.lock().phase, Phase::Queued | Phase::Running)
    }

    /// Back to the queue (its pool turned out not to be ready).
    pub fn set_queued(&self) {
        let mut log = self.lock();
        if log.phase == Phase::Running {
            log.phase = Phase::Queued;
            log.pool_id = None;
        }
    }

    /// Appends an event. A final event closes the log; nothing is appended after it. Returns
    /// false when the log was already closed.
    pub fn push(&self, event: TaskEvent) -> bool {
        let n = {
            let mut log = self.lock();
            if !matches!(log.phase, Phase::Queued | Phase::Running) {
                return false;
            }
            match &event {
                TaskEvent::Started(s) => {
                    log.phase = Phase::Running;
                    log.pool_id = Some(s.pool_id.clone());
                }
                TaskEvent::End(_) => log.phase = Phase::Done,
                TaskEvent::Error(e) if e.code == ErrorCode::Canceled => log.phase = Phase::Canceled,
                TaskEvent::Error(_) => log.phase = Phase::Failed,
                _ => {}
            }
            log.events.push(event);
            log.events.len()
        };
        self.changed.send_replace(n);
        true
    }

    /// Appends several non-final events under one lock with one wake-up of the readers.
    pub fn push_tokens(&self, events: Vec<TaskEvent>) {
        if events.is_empty() {
            return;
        }
        debug_assert!(events.iter().all(|e| !e.is_final()));
        let n = {
            let mut log = self.lock();
            if log.phase != Phase::Running {
                return;
            }
            log.events.extend(events);
            log.events.len()
        };
        self.changed.send_replace(n);
    }

    /// Ends the task with an error event (no-op when it already ended).
    pub fn fail(&self, body: ErrorBody) -> bool {
        self.push(TaskEvent::Error(body))
    }

    /// What a finished task's record needs, from its log.
    pub fn summary(&self) -> Summary {
        let log = self.lock();
        let mut s = Summary::default();
        for e in &log.events {
            match e {
                TaskEvent::Started(st) => s.started = Some(st.clone()),
                TaskEvent::Token(_) => s.tokens += 1,
                TaskEvent::End(end) => s.end = Some(end.clone()),
                TaskEvent::Error(body) => s.error = Some(body.clone()),
                TaskEvent::Metrics(_) => {}
            }
        }
        s
    }

    /// Events from index `from`, and whether the log is closed.
    pub fn read_from(&self, from: usize) -> (Vec<TaskEvent>, bool) {
        let log = self.lock();
        let closed = !matches!(log.phase, Phase::Queued | Phase::Running);
        (log.events.get(from..).unwrap_or_default().to_vec(), closed)
    }

    /// A receiver that changes whenever an event is appended.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.changed.subscribe()
    }
}

/// A task's log, summed up for its record.
#[derive(Debug, Default)]
pub struct Summary {
    pub started: Option<StartedEvent>,
    pub tokens: u32,
    pub end: Option<TaskEnd>,
    pub error: Option<ErrorBody>,
}

/// Reads a task's events in order from the first, waiting for new ones.
pub struct Follower {
    task: std::sync::Arc<Task>,
    next: usize,
    changed: watch::Receiver<usize>,
}

impl Follower {
    pub fn new(task: std::sync::Arc<Task>) -> Self {
        let changed = task.subscribe();
        Self {
            task,
            next: 0,
            changed,
        }
    }

    /// The events not read yet (waiting for at least one), or `None` once the log is closed
    /// and everything was read.
    pub async fn next_batch(&mut self) -> Option<Vec<TaskEvent>> {
        loop {
            let (events, closed) = self.task.read_from(self.next);
            if !events.is_empty() {
                self.next += events.len();
                return Some(events);
            }
            if closed {
                return None;
            }
            if self.changed.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// All known tasks by key ([`Task::key`]), with finished ones kept for a while.
#[derive(Debug, Default)]
pub struct TaskTable {
    tasks: HashMap<String, std::sync::Arc<Task>>,
    finished: VecDeque<(Instant, String)>,
}

impl TaskTable {
    pub fn get(&self, id: &str) -> Option<std::sync::Arc<Task>> {
        self.tasks.get(id).cloned()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.tasks.contains_key(id)
    }

    pub fn insert(&mut self, task: std::sync::Arc<Task>) {
        self.purge(Instant::now());
        self.tasks.insert(task.key.clone(), task);
    }

    pub fn remove(&mut self, id: &str) {
        self.tasks.remove(id);
    }

    /// Records that a task finished, for retention.
    pub fn finished(&mut self, id: &str) {
        self.finished.push_back((Instant::now(), id.to_string()));
        self.purge(Instant::now());
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    fn purge(&mut self, now: Instant) {
        while let Some((at, _)) = self.finished.front() {
            if self.finished.len() > MAX_FINISHED || now.duration_since(*at) > RETAIN_FINISHED {
                let (_, id) = self.finished.pop_front().expect("front exists");
                self.tasks.remove(&id);
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        Task::new(
            "t".into(),
            "m".into(),
            Priority::Interactive,
            "c".into(),
            None,
            None,
            GenerateRequest::prompt("x"),
            "cid".into(),
            Api::Native,
        )
    }

    #[tokio::test]
    async fn late_readers_get_everything_and_the_log_closes_once() {
        let t = task();
        let mut rx = t.subscribe();
        assert!(t.push(TaskEvent::Token(TokenEvent::text("a", 0))));
        rx.changed().await.unwrap();
        assert!(t.fail(ErrorBody::new(ErrorCode::Canceled, "stop")));
        assert!(!t.push(TaskEvent::Token(TokenEvent::text("b", 1))));
        assert!(!t.fail(ErrorBody::new(ErrorCode::EngineFailed, "late")));
        let (events, closed) = t.read_from(0);
        assert!(closed);
        assert_eq!(events.len(), 2);
        assert_eq!(t.phase().0, Phase::Canceled);
        assert!(t.read_from(5).0.is_empty());
    }
}
