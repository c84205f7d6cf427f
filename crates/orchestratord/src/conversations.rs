//! Stored responses of OpenAI's Responses API (`store`, `previous_response_id`): each answer
//! with the conversation that led to it, so the next turn can name it instead of resending its
//! history. Kept in memory only (a restart forgets them), for each API key apart: a key sees
//! and deletes only its own. Bounded three ways: a response lives `ttl` after it was stored;
//! all stored responses together hold at most `budget` bytes (the oldest go first); and one key
//! holds at most a quarter of that, so one client cannot push out everyone else's.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use llorch_wire::engine::ChatMessage;
use serde_json::Value;

/// One stored response.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The conversation up to and including this response's answer (without `instructions`,
    /// which are not carried to the next turn).
    pub history: Arc<Vec<ChatMessage>>,
    /// The response object, as `GET /v1/responses/{id}` returns it.
    pub response: Arc<Value>,
}

struct Entry {
    owner: String,
    at: Instant,
    bytes: usize,
    stored: Stored,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Ids in the order they were stored (ids removed since are skipped).
    order: VecDeque<String>,
    bytes: usize,
    by_owner: HashMap<String, usize>,
}

impl Inner {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let e = self.entries.remove(id)?;
        self.bytes -= e.bytes;
        if let Some(b) = self.by_owner.get_mut(&e.owner) {
            *b -= e.bytes;
            if *b == 0 {
                self.by_owner.remove(&e.owner);
            }
        }
        Some(e)
    }

    /// Drops expired responses (the oldest are at the front).
    fn expire(&mut self, ttl: Duration, now: Instant) {
        while let Some(id) = self.order.front() {
            if self
                .entries
                .get(id)
                .is_some_and(|e| now.duration_since(e.at) < ttl)
            {
                break;
            }
            if let Some(id) = self.order.pop_front() {
                self.remove(&id);
            }
        }
    }

    /// Drops the oldest response of `owner` (any owner's when `None`).
    fn evict_oldest(&mut self, owner: Option<&str>) -> bool {
        let pos = self.order.iter().position(|id| {
            self.entries
                .get(id)
                .is_some_and(|e| owner.is_none_or(|o| e.owner == o))
        });
        match pos.and_then(|p| self.order.remove(p)) {
            Some(id) => self.remove(&id).is_some(),
            None => false,
        }
    }
}

/// The store; see the module's text.
pub struct Conversations {
    inner: Mutex<Inner>,
    ttl: Duration,
    budget: usize,
}

impl Conversations {
    pub fn new(ttl: Duration, budget: usize) -> Self {
        Self {
            inner: Mutex::default(),
            ttl,
            budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        llorch_os::sync::lock(&self.inner)
    }

    /// The most one key may hold.
    fn per_owner(&self) -> usize {
        self.budget / 4
    }

    /// Keeps a response for `owner`; false when it is larger than one key may hold (it is
    /// then not stored, and the answer says `store: false`).
    pub fn put(&self, owner: &str, id: &str, stored: Stored) -> bool {
        let bytes = id.len()
            + serde_json::to_vec(&*stored.history).map_or(0, |v| v.len())
            + stored.response.to_string().len();
        if bytes > self.per_owner() {
            return false;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        inner.expire(self.ttl, now);
        while inner.by_owner.get(owner).copied().unwrap_or(0) + bytes > self.per_owner()
            && inner.evict_oldest(Some(owner))
        {}
        while inner.bytes + bytes > self.budget && inner.evict_oldest(None) {}
        inner.remove(id);
        inner.bytes += bytes;
        *inner.by_owner.entry(owner.to_string()).or_default() += bytes;
        inner.order.push_back(id.to_string());
        inner.entries.insert(
            id.to_string(),
            Entry {
                owner: owner.to_string(),
                at: now,
                bytes,
                stored,
            },
        );
        true
    }

    /// `owner`'s response `id`, while it lives. Another key's response is not found, the same
    /// as one that never was.
    pub fn get(&self, owner: &str, id: &str) -> Option<Stored> {
        let mut inner = self.lock();
        inner.expire(self.ttl, Instant::now());
        inner
            .entries
            .get(id)
            .filter(|e| e.owner == owner)
            .map(|e| e.stored.clone())
    }

    /// Deletes `owner`'s response `id`; false when there is none.
    pub fn delete(&self, owner: &str, id: &str) -> bool {
        let mut inner = self.lock();
        inner.expire(self.ttl, Instant::now());
        if inner.entries.get(id).is_none_or(|e| e.owner != owner) {
            return false;
        }
        inner.order.retain(|i| i != id);
        inner.remove(id).is_some()
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(text: &str) -> Stored {
        Stored {
            history: Arc::new(vec![ChatMessage::new("user", text)]),
            response: Arc::new(json!({"id": "r"})),
        }
    }

    #[test]
    fn a_key_sees_only_its_own_responses() {
        let c = Conversations::new(Duration::from_secs(60), 1 << 20);
        assert!(c.put("alice", "resp_1", stored("hi")));
        assert!(c.get("alice", "resp_1").is_some());
        assert!(c.get("bob", "resp_1").is_none());
        assert!(!c.delete("bob", "resp_1"));
        assert!(c.delete("alice", "resp_1"));
        assert!(c.get("alice", "resp_1").is_none());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn one_key_cannot_push_out_the_others() {
        let c = Conversations::new(Duration::from_secs(60), 4000);
        assert!(c.put("bob", "resp_b", stored("bob's")));
        // Alice stores far more than her quarter: her own oldest go, bob's stays.
        for i in 0..100 {
            assert!(c.put("alice", &format!("resp_a{i}"), stored(&"x".repeat(100))));
        }
        assert!(c.get("bob", "resp_b").is_some());
        assert!(c.get("alice", "resp_a99").is_some());
        assert!(c.get("alice", "resp_a0").is_none());
        assert!(c.bytes() <= 4000);
        // Larger than a key may hold: not stored.
        assert!(!c.put("alice", "resp_big", stored(&"x".repeat(2000))));
        assert!(c.get("alice", "resp_big").is_none());
    }

    #[test]
    fn responses_expire() {
        let c = Conversations::new(Duration::ZERO, 1 << 20);
        assert!(c.put("alice", "resp_1", stored("hi")));
        assert!(c.get("alice", "resp_1").is_none());
        assert_eq!(c.bytes(), 0);
    }
}
