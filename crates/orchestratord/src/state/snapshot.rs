//! The fleet at one moment, as `GET /v2/events` sends it (and the web console draws it): the
//! nodes, the pools with their load, cache hits and speed, the queue with each waiting task's
//! predicted start, and the last tasks with their placement reasons, timings and outcome.
//!
//! What a viewer sees follows the API's credential rules: the nodes (and their GPUs) only with
//! the admin credential, as `GET /v2/nodes`; tasks of other clients only with the admin
//! credential; an anonymous viewer (no API keys configured, so all clients share one namespace
//! of unguessable task ids) sees the tasks without their ids. No prompt or generated text is
//! ever in a snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use llorch_wire::task::{NodeView, PoolView, Priority, QueueView};
use serde::Serialize;
use tokio::time::Instant;

use super::{Core, State};
use crate::admission::ServiceRate;
use crate::placement::capacity_for;
use crate::registry::PoolKey;
use crate::tasks::{Phase, Task};

/// Tasks listed in a snapshot, newest first.
pub const RECENT_TASKS: usize = 50;
/// Waiting tasks listed in a snapshot, in dispatch order (the counts cover all of them).
pub const WAITING_LISTED: usize = 50;
/// Pools whose tallies are kept before those of pools no longer registered are dropped.
const MAX_TALLIES: usize = 1024;

/// Who looks: what the snapshot may show them.
#[derive(Debug, Clone, Serialize)]
pub struct Viewer {
    /// The API key's name, `anonymous`, or the operator token's holder.
    pub name: String,
    pub admin: bool,
    /// API keys are configured: a client's own tasks are in its own namespace.
    #[serde(skip)]
    pub keyed: bool,
}

impl Viewer {
    /// Whether the viewer may see `task` at all, and with its id.
    fn sees(&self, task: &Task) -> (bool, bool) {
        if self.admin {
            (true, true)
        } else if self.keyed {
            let own = task.client == self.name;
            (own, own)
        } else {
            (true, false)
        }
    }
}

/// What finished tasks did on one pool since orchestratord started.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PoolTally {
    pub tasks: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub tokens_out: u64,
}

/// A pool in a snapshot: its view in `/v2/pools`, and what its tasks did.
#[derive(Debug, Clone, Serialize)]
pub struct PoolEntry {
    #[serde(flatten)]
    pub view: PoolView,
    /// Tokens generated on it so far (finished tasks and those running).
    pub tokens_out_total: u64,
    /// Generated tokens per second since the stream's previous snapshot; absent in the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Share of prompt tokens its finished tasks found in its prefix cache; absent before
    /// its first finished task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_cache_hit_rate: Option<f64>,
    pub tasks_finished: u64,
}

/// A waiting task.
#[derive(Debug, Clone, Serialize)]
pub struct Waiting {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    pub model: String,
    pub priority: Priority,
    /// 1-based, in dispatch order over the whole queue.
    pub position: u32,
    /// Tasks of the same model ahead of it.
    pub ahead_same_model: u32,
    /// When it is predicted to start, from now (the admission's prediction).
    pub predicted_start_ms: u64,
    pub waited_ms: u64,
}

/// One of the last tasks.
#[derive(Debug, Clone, Serialize)]
pub struct TaskEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    pub model: String,
    pub api: &'static str,
    pub priority: Priority,
    /// `queued`, `running`, `done`, `failed` or `canceled`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_id: Option<String>,
    /// Why placement chose its pool.
    pub placement: Vec<String>,
    pub age_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_in: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u32>,
    pub tokens_out: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// How it ended: a finish reason (`stop`, `length`…) or an error code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The queue: its counts, and the first waiting tasks.
#[derive(Debug, Clone, Serialize)]
pub struct QueueEntry {
    #[serde(flatten)]
    pub view: QueueView,
    pub waiting: Vec<Waiting>,
}

/// The whole fleet at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub viewer: Viewer,
    /// Only for the admin credential (as `GET /v2/nodes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<NodeView>>,
    pub pools: Vec<PoolEntry>,
    pub queue: QueueEntry,
    pub tasks: Vec<TaskEntry>,
}

impl State {
    /// Adds a finished task's counts to its pool's tally.
    pub(crate) fn tally(&self, key: PoolKey, prompt: u32, cached: u32, out: u32) {
        let full = {
            let tallies = llorch_os::sync::lock(&self.tallies);
            tallies.len() >= MAX_TALLIES && !tallies.contains_key(&key)
        };
        if full {
            // Keep those of pools still registered: a node that keeps renaming its pools
            // cannot grow the map. (The two locks are never held together.)
            let registered: std::collections::HashSet<PoolKey> = self
                .core()
                .registry
                .pool_views()
                .into_iter()
                .map(|p| (p.node_id, p.pool_id))
                .collect();
            llorch_os::sync::lock(&self.tallies).retain(|k, _| registered.contains(k));
        }
        let mut tallies = llorch_os::sync::lock(&self.tallies);
        if tallies.len() >= MAX_TALLIES && !tallies.contains_key(&key) {
            return;
        }
        let t = tallies.entry(key).or_default();
        t.tasks += 1;
        t.prompt_tokens += u64::from(prompt);
        t.cached_tokens += u64::from(cached);
        t.tokens_out += u64::from(out);
    }

    /// The fleet as `viewer` may see it. `totals` holds the stream's previous token counts
    /// (for the pools' tokens per second) and is replaced with this snapshot's.
    pub(crate) fn snapshot(&self, viewer: &Viewer, totals: &mut Totals) -> Snapshot {
        let now = Instant::now();
        // The tallies before the tasks: a task that finishes in between is missing from this
        // snapshot's token totals for a moment, never counted twice.
        let tallies = llorch_os::sync::lock(&self.tallies).clone();
        // The tasks under the task table's lock alone: the core lock is never taken with it.
        let mut recent: Vec<Arc<Task>> = self.tasks().iter().cloned().collect();
        recent.sort_unstable_by_key(|t| std::cmp::Reverse(t.submitted));
        // Tokens streamed so far per pool; only the unfinished tasks' summaries are read (most
        // kept tasks are finished ones).
        let mut streaming: HashMap<PoolKey, u64> = HashMap::new();
        for t in recent.iter().filter(|t| !t.is_finished()) {
            let s = t.summary();
            if let Some(started) = s.started {
                *streaming
                    .entry((started.node_id, started.pool_id))
                    .or_default() += u64::from(s.tokens);
            }
        }
        let tasks = recent
            .iter()
            .filter(|t| viewer.sees(t).0)
            .take(RECENT_TASKS)
            .map(|t| task_entry(t, viewer, now))
            .collect();
        let core = self.core();
        let pools = pool_entries(&core, &tallies, &streaming, totals, now);
        Snapshot {
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            viewer: viewer.clone(),
            nodes: viewer.admin.then(|| core.registry.node_views(now)),
            pools,
            queue: queue_entry(&core, viewer, now),
            tasks,
        }
    }
}

/// Each pool's generated tokens when a stream's last snapshot was taken: what its next one
/// computes tokens per second from.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    at: Option<Instant>,
    tokens: HashMap<PoolKey, u64>,
}

fn pool_entries(
    core: &Core,
    tallies: &HashMap<PoolKey, PoolTally>,
    streaming: &HashMap<PoolKey, u64>,
    totals: &mut Totals,
    now: Instant,
) -> Vec<PoolEntry> {
    let secs = totals.at.map(|at| now.duration_since(at).as_secs_f64());
    let mut next = HashMap::new();
    let pools = core
        .registry
        .pool_views()
        .into_iter()
        .map(|view| {
            let key = (view.node_id.clone(), view.pool_id.clone());
            let tally = tallies.get(&key).copied().unwrap_or_default();
            let total = tally.tokens_out + streaming.get(&key).copied().unwrap_or(0);
            let tokens_per_second = match (secs, totals.tokens.get(&key)) {
                (Some(secs), Some(before)) if secs > 0.0 => {
                    let rate = total.saturating_sub(*before) as f64 / secs;
                    Some((rate * 10.0).round() / 10.0)
                }
                _ => None,
            };
            next.insert(key, total);
            PoolEntry {
                view,
                tokens_out_total: total,
                tokens_per_second,
                prefix_cache_hit_rate: (tally.prompt_tokens > 0)
                    .then(|| tally.cached_tokens as f64 / tally.prompt_tokens as f64),
                tasks_finished: tally.tasks,
            }
        })
        .collect();
    *totals = Totals {
        at: Some(now),
        tokens: next,
    };
    pools
}

fn queue_entry(core: &Core, viewer: &Viewer, now: Instant) -> QueueEntry {
    let candidates = core.registry.candidates();
    let default_rate = ServiceRate::default();
    let mut ahead: HashMap<&str, u32> = HashMap::new();
    let mut waiting = Vec::new();
    for (i, e) in core.queue.iter().enumerate() {
        let same = ahead.entry(e.model.as_str()).or_default();
        let before = *same;
        *same += 1;
        let (sees, with_id) = viewer.sees(&e.item);
        if !sees || waiting.len() >= WAITING_LISTED {
            continue;
        }
        let (free, slots) = capacity_for(&candidates, &e.model);
        let rate = core.registry.rate(&e.model).unwrap_or(&default_rate);
        waiting.push(Waiting {
            task_id: with_id.then(|| e.item.id.clone()),
            client: viewer.admin.then(|| e.item.client.clone()),
            model: e.model.clone(),
            priority: e.priority,
            position: i as u32 + 1,
            ahead_same_model: before,
            predicted_start_ms: rate.predict_start(before, free, slots).as_millis() as u64,
            waited_ms: now.duration_since(e.item.submitted).as_millis() as u64,
        });
    }
    QueueEntry {
        view: super::views::queue_view(core),
        waiting,
    }
}

fn task_entry(t: &Task, viewer: &Viewer, now: Instant) -> TaskEntry {
    let (_, with_id) = viewer.sees(t);
    let (phase, pool_id) = t.phase();
    let s = t.summary();
    let started = s.started.as_ref();
    let end = s.end.as_ref();
    let ttft = t
        .first_token
        .get()
        .map(|f| f.duration_since(t.submitted).as_millis() as u64);
    let tokens_per_second = end.and_then(|e| {
        (e.decode_time_ms > 0).then(|| {
            (f64::from(e.tokens_out) * 1000.0 / e.decode_time_ms as f64 * 10.0).round() / 10.0
        })
    });
    let outcome = match phase {
        Phase::Queued | Phase::Running => None,
        Phase::Done => end.map(|e| e.finish_reason.as_str().to_string()),
        _ => s.error.as_ref().map(|e| e.code.as_str().to_string()),
    };
    TaskEntry {
        task_id: with_id.then(|| t.id.clone()),
        client: viewer.admin.then(|| t.client.clone()),
        model: t.model.clone(),
        api: t.api.as_str(),
        priority: t.priority,
        state: phase.as_str(),
        node_id: started.map(|s| s.node_id.clone()),
        pool_id: pool_id.or_else(|| started.map(|s| s.pool_id.clone())),
        placement: t.placement(),
        age_ms: now.duration_since(t.submitted).as_millis() as u64,
        queue_ms: started.map(|s| s.queue_ms),
        ttft_ms: ttft,
        tokens_in: end.map(|e| e.tokens_in),
        cached_tokens: end.map(|e| e.cached_tokens),
        tokens_out: end.map_or(s.tokens, |e| e.tokens_out),
        tokens_per_second,
        outcome,
        error: s.error.map(|e| e.message),
    }
}

#[cfg(test)]
mod tests {
    use llorch_wire::engine::GenerateRequest;

    use super::*;
    use crate::outcome::Api;

    fn task_of(client: &str) -> Task {
        Task::new(
            "t".into(),
            "m".into(),
            Priority::Interactive,
            client.into(),
            None,
            None,
            GenerateRequest::prompt("x"),
            "cid".into(),
            Api::Native,
        )
    }

    fn viewer(name: &str, admin: bool, keyed: bool) -> Viewer {
        Viewer {
            name: name.into(),
            admin,
            keyed,
        }
    }

    #[test]
    fn each_viewer_sees_what_the_api_would_show_it() {
        let (alice, bob) = (task_of("alice"), task_of("bob"));
        // The admin credential: every task, with its id.
        assert_eq!(viewer("op", true, true).sees(&bob), (true, true));
        // With API keys: a client's own tasks only, with their ids.
        let a = viewer("alice", false, true);
        assert_eq!(a.sees(&alice), (true, true));
        assert_eq!(a.sees(&bob), (false, false));
        // Without keys every client is `anonymous` and shares one namespace of unguessable
        // task ids: the tasks show, their ids do not.
        let anon = viewer("anonymous", false, false);
        assert_eq!(anon.sees(&task_of("anonymous")), (true, false));
    }
}
