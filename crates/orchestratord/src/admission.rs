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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
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

/// The admission queue: every operation the dispatcher and the API do per task costs
/// O(log n) or the number of entries it returns, never the queue's length (which may be in the
/// hundreds of thousands): entries are indexed by key, by model, by deadline and (for
/// `drop-lru`) batch entries by arrival.
#[derive(Debug)]
pub struct Queue<T> {
    capacity: usize,
    policy: Policy,
    order: BTreeMap<Key, Entry<T>>,
    index: HashMap<String, Key>,
    /// The keys of each model's entries, in dispatch order, and how many of each priority.
    by_model: HashMap<String, (BTreeSet<Key>, [usize; 2])>,
    deadlines: BTreeSet<(Instant, Key)>,
    /// Batch entries by arrival (the key's last part), for `drop-lru`.
    batch: BTreeSet<(u64, Key)>,
    counts: [usize; 2],
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
            by_model: HashMap::new(),
            deadlines: BTreeSet::new(),
            batch: BTreeSet::new(),
            counts: [0, 0],
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
        self.counts[prio_index(p)]
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
                        .batch
                        .first()
                        .map(|(_, key)| self.order[key].task_id.clone());
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
        self.insert(Entry {
            task_id,
            model,
            priority,
            deadline,
            item,
            key,
        });
        Ok(pushed)
    }

    fn insert(&mut self, entry: Entry<T>) {
        let key = entry.key;
        self.index.insert(entry.task_id.clone(), key);
        let (keys, counts) = self.by_model.entry(entry.model.clone()).or_default();
        keys.insert(key);
        counts[prio_index(entry.priority)] += 1;
        if let Some(d) = entry.deadline {
            self.deadlines.insert((d, key));
        }
        if entry.priority == Priority::Batch {
            self.batch.insert((key.2, key));
        }
        self.counts[prio_index(entry.priority)] += 1;
        self.order.insert(key, entry);
    }

    /// Puts a task that was taken for dispatch back at its old place (its pool turned out not
    /// to be ready). Capacity is not checked: the task was already admitted.
    pub fn requeue(&mut self, entry: Entry<T>) {
        self.insert(entry);
    }

    pub fn remove(&mut self, task_id: &str) -> Option<Entry<T>> {
        let key = self.index.remove(task_id)?;
        let entry = self.order.remove(&key)?;
        if let Some((keys, counts)) = self.by_model.get_mut(&entry.model) {
            keys.remove(&key);
            counts[prio_index(entry.priority)] -= 1;
            if keys.is_empty() {
                self.by_model.remove(&entry.model);
            }
        }
        if let Some(d) = entry.deadline {
            self.deadlines.remove(&(d, key));
        }
        if entry.priority == Priority::Batch {
            self.batch.remove(&(key.2, key));
        }
        self.counts[prio_index(entry.priority)] -= 1;
        Some(entry)
    }

    /// Takes a task for dispatch; the caller found a pool for it.
    pub fn take(&mut self, task_id: &str) -> Option<Entry<T>> {
        let e = self.remove(task_id)?;
        let i = prio_index(e.priority);
        self.serving_turn[i] = self.serving_turn[i].max(e.key.1);
        Some(e)
    }

    /// Queued entries in dispatch order (every one: for views that list the whole queue).
    pub fn iter(&self) -> impl Iterator<Item = &Entry<T>> {
        self.order.values()
    }

    /// The models with queued entries.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.by_model.keys().map(String::as_str)
    }

    /// The entries of one model in dispatch order.
    pub fn of_model<'a>(&'a self, model: &str) -> impl Iterator<Item = &'a Entry<T>> + 'a {
        self.by_model
            .get(model)
            .into_iter()
            .flat_map(|(keys, _)| keys)
            .map(|k| &self.order[k])
    }

    /// Entries of `model` that a new task of priority `p` would queue behind: those of its
    /// priority or a more urgent one.
    pub fn ahead_of_new(&self, model: &str, p: Priority) -> usize {
        self.by_model.get(model).map_or(0, |(_, counts)| match p {
            Priority::Interactive => counts[0],
            Priority::Batch => counts[0] + counts[1],
        })
    }

    /// Tasks ahead of `task_id` that want the same model. Counted from whichever end of the
    /// model's entries is nearer (a new task is usually near the back, an interactive one
    /// ahead of a batch backlog near the front), so it costs the smaller side.
    pub fn position(&self, task_id: &str) -> Option<u32> {
        let key = *self.index.get(task_id)?;
        let (keys, _) = &self.by_model[&self.order[&key].model];
        let mut ahead = keys.range(..key);
        let mut behind = keys.range(key..).skip(1);
        let mut n = 0usize;
        loop {
            match (ahead.next(), behind.next()) {
                (None, _) => return Some(n as u32),
                (Some(_), None) => return Some((keys.len() - 1 - n) as u32),
                _ => n += 1,
            }
        }
    }

    /// Removes and returns the tasks whose deadline passed.
    pub fn expire(&mut self, now: Instant) -> Vec<Entry<T>> {
        let mut out = Vec::new();
        while let Some(&(d, key)) = self.deadlines.first() {
            if d > now {
                break;
            }
            let id = self.order[&key].task_id.clone();
            out.extend(self.remove(&id));
        }
        out
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _)| *d)
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

    /// The indexes agree with a plain scan of the queue after any sequence of operations.
    mod indexes {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Push {
                model: u8,
                client: u8,
                batch: bool,
                deadline: Option<u8>,
            },
            Remove(u8),
            TakeRequeue(u8),
            Expire(u8),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0u8..3, 0u8..3, any::<bool>(), proptest::option::of(0u8..20)).prop_map(
                    |(model, client, batch, deadline)| Op::Push { model, client, batch, deadline }
                ),
                1 => any::<u8>().prop_map(Op::Remove),
                1 => any::<u8>().prop_map(Op::TakeRequeue),
                1 => (0u8..20).prop_map(Op::Expire),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases.max(500), ..ProptestConfig::default() })]
            #[test]
            fn indexes_match_a_scan(ops in proptest::collection::vec(op(), 1..120), lru in any::<bool>()) {
                let policy = if lru { Policy::DropLru } else { Policy::Reject };
                let mut q: Queue<()> = Queue::new(40, policy);
                let base = Instant::now();
                let mut n = 0u32;
                for op in ops {
                    let ids: Vec<String> = q.iter().map(|e| e.task_id.clone()).collect();
                    let pick = |k: u8| (!ids.is_empty()).then(|| ids[k as usize % ids.len()].clone());
                    match op {
                        Op::Push { model, client, batch, deadline } => {
                            n += 1;
                            let p = if batch { Priority::Batch } else { Priority::Interactive };
                            let d = deadline.map(|s| base + Duration::from_secs(u64::from(s)));
                            let _ = q.push(format!("t{n}"), format!("m{model}"), format!("c{client}"), p, d, ());
                        }
                        Op::Remove(k) => { if let Some(id) = pick(k) { q.remove(&id); } }
                        Op::TakeRequeue(k) => {
                            if let Some(id) = pick(k) {
                                let e = q.take(&id).unwrap();
                                q.requeue(e);
                            }
                        }
                        Op::Expire(s) => {
                            let now = base + Duration::from_secs(u64::from(s));
                            let gone = q.expire(now);
                            prop_assert!(gone.iter().all(|e| e.deadline.is_some_and(|d| d <= now)));
                            prop_assert!(q.iter().all(|e| e.deadline.is_none_or(|d| d > now)));
                        }
                    }
                    let all: Vec<&Entry<()>> = q.iter().collect();
                    prop_assert!(all.len() <= 40);
                    for p in [Priority::Interactive, Priority::Batch] {
                        prop_assert_eq!(q.count(p), all.iter().filter(|e| e.priority == p).count());
                    }
                    prop_assert_eq!(q.next_deadline(), all.iter().filter_map(|e| e.deadline).min());
                    for m in ["m0", "m1", "m2"] {
                        let scan: Vec<&str> = all.iter().filter(|e| e.model == m).map(|e| e.task_id.as_str()).collect();
                        let indexed: Vec<&str> = q.of_model(m).map(|e| e.task_id.as_str()).collect();
                        prop_assert_eq!(&scan, &indexed);
                        prop_assert_eq!(q.models().any(|x| x == m), !scan.is_empty());
                        for (i, id) in scan.iter().enumerate() {
                            prop_assert_eq!(q.position(id), Some(i as u32));
                        }
                        for p in [Priority::Interactive, Priority::Batch] {
                            let behind = all.iter().filter(|e| e.model == m && e.priority <= p).count();
                            prop_assert_eq!(q.ahead_of_new(m, p), behind);
                        }
                    }
                }
            }
        }
    }
}
