//! Tasks and their event logs.
//!
//! Every task keeps the events it produced (`started`, `token`…, `metrics`, `end` or `error`)
//! so a subscriber that connects late still gets the stream. Bounds:
//!
//! - One task's log keeps at most [`MAX_LOG_BYTES`] of events (counted as their text and
//!   log-probabilities; a token event with 20 alternatives per token is a few KiB). Past that the
//!   oldest events are dropped from the log. A subscriber that connects later starts at the
//!   oldest kept event (token `i` shows how many it missed); one that was reading and fell
//!   behind the dropped part gets a final `SLOW_READER` error on its stream, never a silent gap.
//!   The task itself goes on.
//! - Finished tasks are kept for [`RETAIN_FINISHED`], at most [`MAX_FINISHED`] of them and
//!   [`MAX_FINISHED_BYTES`] of logs together; the oldest go first (counted as evictions of
//!   `finished_tasks` when the bytes bound made them go).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use llorch_wire::engine::{GenerateRequest, TokenEvent};
use llorch_wire::task::{MetricsEvent, PlacementHints, Priority, StartedEvent, TaskEnd};
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::outcome::{Api, CancelReason};

pub const RETAIN_FINISHED: Duration = Duration::from_secs(300);
pub const MAX_FINISHED: usize = 4096;
/// Bytes of events one task's log keeps.
pub const MAX_LOG_BYTES: usize = 16 << 20;
/// Bytes of the logs of all finished tasks kept together.
pub const MAX_FINISHED_BYTES: usize = 256 << 20;
/// Lines of placement reasons a task keeps.
pub const MAX_PLACEMENT_REASONS: usize = 8;

/// What an event costs in a log, roughly: its text and log-probabilities, plus a fixed part.
fn event_bytes(e: &TaskEvent) -> usize {
    const FIXED: usize = 64;
    match e {
        TaskEvent::Token(t) => {
            FIXED
                + t.t.len()
                + t.lp
                    .iter()
                    .map(|l| {
                        FIXED
                            + 2 * l.token.len()
                            + l.top_logprobs
                                .iter()
                                .map(|a| FIXED + 2 * a.token.len())
                                .sum::<usize>()
                    })
                    .sum::<usize>()
        }
        TaskEvent::Error(b) => FIXED + b.message.len(),
        _ => 4 * FIXED,
    }
}

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
    /// The kept events; the first is event number `dropped`.
    events: VecDeque<TaskEvent>,
    /// Events dropped from the front to keep the log within [`MAX_LOG_BYTES`].
    dropped: usize,
    bytes: usize,
    /// Kept whole whatever is dropped: the task's record is made from it.
    summary: Summary,
    phase: Phase,
    pool_id: Option<String>,
}

impl Log {
    fn append(&mut self, event: TaskEvent) {
        match &event {
            TaskEvent::Started(st) => self.summary.started = Some(st.clone()),
            TaskEvent::Token(_) => self.summary.tokens += 1,
            TaskEvent::End(end) => self.summary.end = Some(end.clone()),
            TaskEvent::Error(body) => self.summary.error = Some(body.clone()),
            TaskEvent::Metrics(_) => {}
        }
        self.bytes += event_bytes(&event);
        self.events.push_back(event);
        // The last event always stays: a finished task's end is always there to read.
        while self.bytes > MAX_LOG_BYTES && self.events.len() > 1 {
            let Some(old) = self.events.pop_front() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(event_bytes(&old));
            self.dropped += 1;
        }
    }

    /// The number the next event will have.
    fn end(&self) -> usize {
        self.dropped + self.events.len()
    }
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
    /// Its prompt's prefix blocks, for cache-aware placement (hashes only: no prompt text).
    pub prefix: Vec<crate::prefixes::Block>,
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
    /// Native event streams open on it (see `state::MAX_SUBSCRIBERS_PER_TASK`).
    pub subscribers: std::sync::atomic::AtomicU32,
    /// Why its (last) pool was chosen, as placement said (`GET /v2/events` shows it).
    placement: Mutex<Vec<String>>,
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
        mut request: GenerateRequest,
        correlation_id: String,
        api: Api,
    ) -> Self {
        // Each client (API key) is a cache scope of its own: no client reuses, or learns from
        // `cached_tokens` or from speed, what another client's prompts left in a cache.
        request.cache_scope = Some(crate::prefixes::scope_of(&client));
        Self {
            key: Self::key_for(&client, &id),
            id,
            model,
            priority,
            client,
            session_id,
            hints,
            // A count computes nothing an engine would keep.
            prefix: if request.count_only {
                Vec::new()
            } else {
                crate::prefixes::blocks(&request)
            },
            request: Mutex::new(Some(request)),
            submitted: Instant::now(),
            correlation_id,
            api,
            cancel: CancellationToken::new(),
            cancel_reason: OnceLock::new(),
            first_token: OnceLock::new(),
            failed_attempts: std::sync::atomic::AtomicU32::new(0),
            subscribers: std::sync::atomic::AtomicU32::new(0),
            placement: Mutex::new(Vec::new()),
            log: Mutex::new(Log {
                events: VecDeque::new(),
                dropped: 0,
                bytes: 0,
                summary: Summary::default(),
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

    /// Records why placement chose its pool (again, when it is placed again). Placement says
    /// something of every pool of the model it passed over; a task keeps the decisive lines,
    /// which come last, and counts the rest (thousands of retained tasks on a cluster of
    /// hundreds of pools must not keep a line per pool each).
    pub fn set_placement(&self, mut reasons: Vec<String>) {
        if reasons.len() > MAX_PLACEMENT_REASONS {
            let cut = reasons.len() - (MAX_PLACEMENT_REASONS - 1);
            reasons.drain(..cut);
            reasons.insert(0, format!("{cut} more pools passed over"));
        }
        *llorch_os::sync::lock(&self.placement) = reasons;
    }

    /// Why placement chose its pool; empty before it was placed.
    pub fn placement(&self) -> Vec<String> {
        llorch_os::sync::lock(&self.placement).clone()
    }

    /// The request to send to the engine; None once the task ended.
    pub fn request(&self) -> Option<GenerateRequest> {
        llorch_os::sync::lock(&self.request).clone()
    }

    /// Drops the request (the prompt) when the task ends.
    pub fn forget_request(&self) {
        llorch_os::sync::lock(&self.request).take();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        llorch_os::sync::lock(&self.log)
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
            log.append(event);
            log.end()
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
            for e in events {
                log.append(e);
            }
            log.end()
        };
        self.changed.send_replace(n);
    }

    /// Ends the task with an error event (no-op when it already ended).
    pub fn fail(&self, body: ErrorBody) -> bool {
        self.push(TaskEvent::Error(body))
    }

    /// What a finished task's record needs, from its log.
    pub fn summary(&self) -> Summary {
        self.lock().summary.clone()
    }

    /// Bytes its log holds.
    pub fn log_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Events from number `from` on, the number of the first one returned (later than `from`
    /// when events were dropped), and whether the log is closed.
    pub fn read_from(&self, from: usize) -> (Vec<TaskEvent>, usize, bool) {
        let log = self.lock();
        let closed = !matches!(log.phase, Phase::Queued | Phase::Running);
        let first = from.max(log.dropped);
        let events = log
            .events
            .range((first - log.dropped).min(log.events.len())..);
        (events.cloned().collect(), first, closed)
    }

    /// A receiver that changes whenever an event is appended.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.changed.subscribe()
    }
}

/// A task's log, summed up for its record.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub started: Option<StartedEvent>,
    pub tokens: u32,
    pub end: Option<TaskEnd>,
    pub error: Option<ErrorBody>,
}

/// Reads a task's events in order from the first kept one, waiting for new ones.
pub struct Follower {
    task: std::sync::Arc<Task>,
    /// The number of the next event to read; `None` before the first read.
    next: Option<usize>,
    changed: watch::Receiver<usize>,
    /// It fell behind and got its final error.
    lagged: bool,
}

impl Follower {
    pub fn new(task: std::sync::Arc<Task>) -> Self {
        let changed = task.subscribe();
        Self {
            task,
            next: None,
            changed,
            lagged: false,
        }
    }

    /// The events not read yet (waiting for at least one), or `None` once the log is closed
    /// and everything was read. A follower whose unread events were dropped (it read more
    /// than [`MAX_LOG_BYTES`] behind the task) gets a final `SLOW_READER` error instead.
    pub async fn next_batch(&mut self) -> Option<Vec<TaskEvent>> {
        if self.lagged {
            return None;
        }
        loop {
            let from = self.next.unwrap_or(0);
            let (events, first, closed) = self.task.read_from(from);
            if self.next.is_some() && first > from {
                self.lagged = true;
                return Some(vec![TaskEvent::Error(ErrorBody::new(
                    ErrorCode::SlowReader,
                    format!(
                        "this stream was read too slowly: {} events of task {} were dropped before it read them (a task keeps {} MiB of events); the task goes on",
                        first - from,
                        self.task.id,
                        MAX_LOG_BYTES >> 20
                    ),
                ))]);
            }
            if !events.is_empty() {
                self.next = Some(first + events.len());
                return Some(events);
            }
            self.next = Some(first);
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
    /// Finished tasks in the order they finished, with their log's bytes.
    finished: VecDeque<(Instant, String, usize)>,
    finished_bytes: usize,
}

impl TaskTable {
    pub fn get(&self, id: &str) -> Option<std::sync::Arc<Task>> {
        self.tasks.get(id).cloned()
    }

    /// Every task whose client-visible id is `id`, whoever its client (an operator's search;
    /// a scan of the table).
    pub fn with_id(&self, id: &str) -> Vec<std::sync::Arc<Task>> {
        self.tasks
            .values()
            .filter(|t| t.id == id)
            .cloned()
            .collect()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.tasks.contains_key(id)
    }

    /// Every task kept: queued, running, and finished ones within their retention.
    pub fn iter(&self) -> impl Iterator<Item = &std::sync::Arc<Task>> {
        self.tasks.values()
    }

    pub fn insert(&mut self, task: std::sync::Arc<Task>) {
        let _ = self.purge(Instant::now());
        self.tasks.insert(task.key.clone(), task);
    }

    pub fn remove(&mut self, id: &str) {
        self.tasks.remove(id);
    }

    /// Records that a task finished, for retention. Returns how many finished tasks the
    /// bytes bound evicted.
    pub fn finished(&mut self, id: &str) -> usize {
        let bytes = self.tasks.get(id).map_or(0, |t| t.log_bytes());
        self.finished
            .push_back((Instant::now(), id.to_string(), bytes));
        self.finished_bytes += bytes;
        self.purge(Instant::now())
    }

    /// Forgets finished tasks past their retention, beyond the count or beyond the bytes;
    /// returns how many went for the bytes.
    fn purge(&mut self, now: Instant) -> usize {
        let mut for_bytes = 0;
        loop {
            let too_many = self.finished.len() > MAX_FINISHED;
            let too_big = self.finished_bytes > MAX_FINISHED_BYTES;
            let old = self
                .finished
                .front()
                .is_some_and(|(at, _, _)| now.duration_since(*at) > RETAIN_FINISHED);
            if !(old || too_many || too_big) {
                break;
            }
            let Some((_, id, bytes)) = self.finished.pop_front() else {
                break;
            };
            if too_big && !old && !too_many {
                for_bytes += 1;
            }
            self.finished_bytes = self.finished_bytes.saturating_sub(bytes);
            self.tasks.remove(&id);
        }
        for_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        named("t")
    }

    fn named(id: &str) -> Task {
        Task::new(
            id.into(),
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

    #[test]
    fn a_task_keeps_the_decisive_placement_reasons_only() {
        let t = task();
        let mut reasons: Vec<String> = (0..1000).map(|i| format!("p{i}: no free slot")).collect();
        reasons.push("chosen: 3 free slots".into());
        t.set_placement(reasons);
        let kept = t.placement();
        assert_eq!(kept.len(), MAX_PLACEMENT_REASONS);
        assert_eq!(kept[0], "994 more pools passed over");
        assert_eq!(kept.last().unwrap(), "chosen: 3 free slots");
        t.set_placement(vec!["a: 1 free slots".into()]);
        assert_eq!(t.placement(), ["a: 1 free slots"]);
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
        let (events, first, closed) = t.read_from(0);
        assert!(closed && first == 0);
        assert_eq!(events.len(), 2);
        assert_eq!(t.phase().0, Phase::Canceled);
        assert!(t.read_from(5).0.is_empty());
    }

    /// A token event of about 1 MiB.
    fn big_token(i: u32) -> TaskEvent {
        TaskEvent::Token(TokenEvent::text("x".repeat(1 << 20), i))
    }

    #[tokio::test]
    async fn a_log_keeps_its_bytes_bound_and_a_slow_reader_is_told() {
        let t = std::sync::Arc::new(task());
        t.push(TaskEvent::Started(StartedEvent {
            task_id: "t".into(),
            pool_id: "p".into(),
            node_id: "n".into(),
            queue_ms: 0,
        }));
        let mut live = Follower::new(t.clone());
        assert_eq!(live.next_batch().await.unwrap().len(), 1);
        // 40 MiB of tokens through a 16 MiB log.
        for i in 0..40 {
            t.push_tokens(vec![big_token(i)]);
        }
        assert!(t.log_bytes() <= MAX_LOG_BYTES, "{}", t.log_bytes());
        let s = t.summary();
        assert_eq!(s.tokens, 40);
        assert!(s.started.is_some(), "the record keeps what the log dropped");
        // The reader that stopped after `started` lost events: it is told, once, and stops.
        match live.next_batch().await.unwrap().as_slice() {
            [TaskEvent::Error(e)] => {
                assert_eq!(e.code, ErrorCode::SlowReader);
                assert!(e.message.contains("dropped"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        assert!(live.next_batch().await.is_none());
        // A reader that comes now starts at the oldest kept event: token i tells the gap.
        let mut late = Follower::new(t.clone());
        let first = late.next_batch().await.unwrap();
        match &first[0] {
            TaskEvent::Token(tok) => assert!(tok.i >= 24, "{}", tok.i),
            other => panic!("{other:?}"),
        }
        assert!(t.fail(ErrorBody::new(ErrorCode::Canceled, "stop")));
        let rest = late.next_batch().await.unwrap();
        assert!(matches!(rest.last(), Some(TaskEvent::Error(e)) if e.code == ErrorCode::Canceled));
    }

    #[test]
    fn finished_tasks_are_bounded_by_bytes_oldest_first() {
        let mut table = TaskTable::default();
        let mut evicted = 0;
        for k in 0..20 {
            let t = std::sync::Arc::new(named(&format!("t{k}")));
            t.push(TaskEvent::Started(StartedEvent {
                task_id: t.id.clone(),
                pool_id: "p".into(),
                node_id: "n".into(),
                queue_ms: 0,
            }));
            t.push_tokens((0..15).map(big_token).collect());
            t.fail(ErrorBody::new(ErrorCode::Canceled, "stop"));
            table.insert(t.clone());
            evicted += table.finished(&t.key);
        }
        // Each keeps 15 MiB: 17 fit in 256 MiB.
        assert_eq!(evicted, 3);
        assert!(table.get(&Task::key_for("c", "t0")).is_none());
        assert!(table.get(&Task::key_for("c", "t3")).is_some());
        assert!(table.finished_bytes <= MAX_FINISHED_BYTES);
    }
}
