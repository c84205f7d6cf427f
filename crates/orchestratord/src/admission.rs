//! Admission: the bounded queue and the service-rate estimate behind `Retry-After` and
//! `predicted_start_ms`.
//!
//! Order: `interactive` before `batch`; within a priority, clients (API key names) take turns
//! (start-time fair queuing: each client's next task gets the turn after its previous one, but
//! never a turn earlier than the one being served now); within a client, FIFO. When the queue is
//! full the policy decides: `reject` refuses the newcomer, `drop-lru` evicts the oldest queued
//! `batch` task (whose client is told), and refuses only when no batch task is queued.
//!
//! The queue holds ids and ordering keys only; the dispatcher owns the tasks.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use llorch_wire::task::Priority;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Reject,
    DropLru,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reject => "reject",
            Self::DropLru => "drop-lru",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reject" => Ok(Self::Reject),
            "drop-lru" => Ok(Self::DropLru),
            other => Err(format!("{other:?} is not a policy; use reject or drop-lru")),
        }
    }
}

/// Ordering key of a queued entry: priority, fair turn, arrival.
type Key = (Priority, u64, u64);

#[derive(Debug, Clone)]
pub struct Entry<T> {
    pub task_id: String,
    pub model: String,
    pub client: String,
    pub priority: Priority,
    pub deadline: Option<Instant>,
    /// What the dispatcher needs to run the task.
    pub item: T,
    key: Key,
}

/// The queue is full and its policy found nothing to evict.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull;

/// What `push` did.
#[derive(Debug, PartialEq)]
pub enum Pushed {
    Queued,
    /// Queued after evicting this (oldest batch) task.
    Evicted(String),
}

#[derive(Debug)]
pub struct Queue<T> {
    capacity: usize,
    policy: Policy,
    order: BTreeMap<Key, Entry<T>>,
    index: HashMap<String, Key>,
    next_turn: HashMap<(Priority, String), u64>,
    serving_turn: [u64; 2],
    arrivals: u64,
}

fn prio_index(p: Priority) -> usize {
    match p {
        Priority::Interactive => 0,
        Priority::Batch => 1,
    }
}

impl<T> Queue<T> {
    pub fn new(capacity: usize, policy: Policy) -> Self {
        Self {
            capacity,
            policy,
            order: BTreeMap::new(),
            index: HashMap::new(),
            next_turn: HashMap::new(),
            serving_turn: [0, 0],
            arrivals: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn count(&self, p: Priority) -> usize {
        self.order.keys().filter(|k| k.0 == p).count()
    }

    /// Admits a task, or refuses it when the queue is full and the policy evicts nothing.
    pub fn push(
        &mut self,
        task_id: String,
        model: String,
        client: String,
        priority: Priority,
        deadline: Option<Instant>,
        item: T,
    ) -> Result<Pushed, QueueFull> {
        let mut pushed = Pushed::Queued;
        if self.order.len() >= self.capacity {
            match self.policy {
                Policy::Reject => return Err(QueueFull),
                Policy::DropLru => {
                    // The oldest batch task by arrival; an interactive newcomer or a batch one
                    // may displace it, nothing else is ever evicted.
                    let victim = self
                        .order
                        .iter()
                        .filter(|(k, _)| k.0 == Priority::Batch)
                        .min_by_key(|(k, _)| k.2)
                        .map(|(_, e)| e.task_id.clone());
                    match victim {
                        Some(id) => {
                            self.remove(&id);
                            pushed = Pushed::Evicted(id);
                        }
                        None => return Err(QueueFull),
                    }
                }
            }
        }
        let turn_slot = self
            .next_turn
            .entry((priority, client.clone()))
            .or_insert(0);
        let turn = (*turn_slot).max(self.serving_turn[prio_index(priority)]);
        *turn_slot = turn + 1;
        self.arrivals += 1;
        let key = (priority, turn, self.arrivals);
        self.index.insert(task_id.clone(), key);
        self.order.insert(
            key,
            Entry {
                task_id,
                model,
                client,
                priority,
                deadline,
                item,
                key,
            },
        );
        Ok(pushed)
    }

    /// Puts a task that was taken for dispatch back at its old place (its pool turned out not
    /// to be ready). Capacity is not checked: the task was already admitted.
    pub fn requeue(&mut self, entry: Entry<T>) {
        self.index.insert(entry.task_id.clone(), entry.key);
        self.order.insert(entry.key, entry);
    }

    pub fn remove(&mut self, task_id: &str) -> Option<Entry<T>> {
        let key = self.index.remove(task_id)?;
        self.order.remove(&key)
    }

    /// Takes a task for dispatch; the caller found a pool for it.
    pub fn take(&mut self, task_id: &str) -> Option<Entry<T>> {
        let e = self.remove(task_id)?;
        let i = prio_index(e.priority);
        self.serving_turn[i] = self.serving_turn[i].max(e.key.1);
        Some(e)
    }

    /// Queued entries in dispatch order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry<T>> {
        self.order.values()
    }

    /// Tasks ahead of `task_id` that want the same model.
    pub fn position(&self, task_id: &str) -> Option<u32> {
        let key = self.index.get(task_id)?;
        let model = &self.order[key].model;
        Some(
            self.order
                .range(..*key)
                .filter(|(_, e)| &e.model == model)
                .count() as u32,
        )
    }

    /// Removes and returns the tasks whose deadline passed.
    pub fn expire(&mut self, now: Instant) -> Vec<Entry<T>> {
        let expired: Vec<String> = self
            .order
            .values()
            .filter(|e| e.deadline.is_some_and(|d| d <= now))
            .map(|e| e.task_id.clone())
            .collect();
        expired.iter().filter_map(|id| self.remove(id)).collect()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.order.values().filter_map(|e| e.deadline).min()
    }
}

/// The measured rate at which tasks of one model finish, from the last lease durations.
#[derive(Debug, Default)]
pub struct ServiceRate {
    recent: VecDeque<Duration>,
}

/// With no measurement yet, a slot is assumed to free up after this long.
pub const PRIOR_SERVICE_TIME: Duration = Duration::from_secs(1);
const WINDOW: usize = 32;

impl ServiceRate {
    pub fn record(&mut self, held: Duration) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(held);
    }

    /// Mean time a slot is held, over the last tasks.
    pub fn mean_service_time(&self) -> Duration {
        if self.recent.is_empty() {
            return PRIOR_SERVICE_TIME;
        }
        self.recent.iter().sum::<Duration>() / self.recent.len() as u32
    }

    /// Predicted wait for a task with `ahead` tasks before it, given `free` slots now and
    /// `slots` slots in total serving the model.
    pub fn predict_start(&self, ahead: u32, free: u32, slots: u32) -> Duration {
        if ahead < free {
            return Duration::ZERO;
        }
        if slots == 0 {
            // No pool for the model is up: one service time is the best honest guess.
            return self.mean_service_time();
        }
        // Each slot frees once per mean service time; the task starts when `ahead - free + 1`
        // slots have freed.
        let needed = (ahead - free + 1) as f64;
        self.mean_service_time().mul_f64(needed / slots as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(q: &mut Queue<()>, id: &str, client: &str, p: Priority) -> Result<Pushed, QueueFull> {
        q.push(id.into(), "m".into(), client.into(), p, None, ())
    }

    fn drain_order(q: &mut Queue<()>) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let Some(id) = q.iter().next().map(|e| e.task_id.clone()) else {
                break;
            };
            q.take(&id);
            out.push(id);
        }
        out
    }

    #[test]
    fn interactive_first_then_fair_turns_then_fifo() {
        let mut q = Queue::new(100, Policy::Reject);
        for i in 0..3 {
            push(
                &mut q,
                &format!("flood{i}"),
                "flooder",
                Priority::Interactive,
            )
            .unwrap();
        }
        push(&mut q, "b1", "batcher", Priority::Batch).unwrap();
        push(&mut q, "other0", "other", Priority::Interactive).unwrap();
        push(&mut q, "other1", "other", Priority::Interactive).unwrap();
        assert_eq!(q.position("other0"), Some(1));
        assert_eq!(
            drain_order(&mut q),
            ["flood0", "other0", "flood1", "other1", "flood2", "b1"]
        );
        // A client arriving later does not get turns "owed" from the past.
        push(&mut q, "late0", "late", Priority::Interactive).unwrap();
        push(&mut q, "flood3", "flooder", Priority::Interactive).unwrap();
        assert_eq!(drain_order(&mut q), ["late0", "flood3"]);
    }

    #[test]
    fn full_queue_rejects_or_drops_the_oldest_batch_task() {
        let mut q = Queue::new(2, Policy::Reject);
        push(&mut q, "a", "c", Priority::Batch).unwrap();
        push(&mut q, "b", "c", Priority::Batch).unwrap();
        assert_eq!(
            push(&mut q, "c", "c", Priority::Interactive),
            Err(QueueFull)
        );
        assert_eq!(q.len(), 2);

        let mut q = Queue::new(2, Policy::DropLru);
        push(&mut q, "i", "c", Priority::Interactive).unwrap();
        push(&mut q, "b-old", "c", Priority::Batch).unwrap();
        assert_eq!(
            push(&mut q, "b-new", "c", Priority::Batch),
            Ok(Pushed::Evicted("b-old".into()))
        );
        assert_eq!(
            push(&mut q, "i2", "c", Priority::Interactive),
            Ok(Pushed::Evicted("b-new".into()))
        );
        // Only interactive tasks left: nothing may be evicted.
        assert_eq!(
            push(&mut q, "i3", "c", Priority::Interactive),
            Err(QueueFull)
        );
        assert_eq!(drain_order(&mut q), ["i", "i2"]);
    }

    #[test]
    fn deadlines_expire_and_requeue_keeps_the_place() {
        let mut q = Queue::new(10, Policy::Reject);
        let now = Instant::now();
        q.push(
            "a".into(),
            "m".into(),
            "c".into(),
            Priority::Interactive,
            None,
            (),
        )
        .unwrap();
        q.push(
            "b".into(),
            "m".into(),
            "c".into(),
            Priority::Interactive,
            Some(now + Duration::from_millis(10)),
            (),
        )
        .unwrap();
        assert_eq!(q.next_deadline(), Some(now + Duration::from_millis(10)));
        assert!(q.expire(now).is_empty());
        let gone = q.expire(now + Duration::from_millis(10));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].task_id, "b");
        q.push(
            "c".into(),
            "m".into(),
            "c".into(),
            Priority::Interactive,
            None,
            (),
        )
        .unwrap();
        let a = q.take("a").unwrap();
        q.requeue(a);
        assert_eq!(drain_order(&mut q), ["a", "c"]);
    }

    #[test]
    fn predictions_follow_the_measured_rate() {
        let mut r = ServiceRate::default();
        assert_eq!(r.predict_start(0, 1, 4), Duration::ZERO);
        assert_eq!(r.predict_start(0, 0, 1), PRIOR_SERVICE_TIME);
        for _ in 0..4 {
            r.record(Duration::from_millis(400));
        }
        // 4 slots each freeing every 400 ms: the 8th waiting task starts after 2 rounds.
        assert_eq!(r.predict_start(7, 0, 4), Duration::from_millis(800));
        assert_eq!(r.predict_start(3, 0, 4), Duration::from_millis(400));
    }
}
