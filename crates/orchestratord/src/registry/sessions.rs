//! Session affinity: which pool and slot hold a session's KV cache, per client, bounded by age
//! and by count.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::PoolKey;

/// The most sessions kept at once; beyond it the least recently used one is evicted (its
/// next turn simply has no affinity).
pub(crate) const MAX_SESSIONS: usize = 65_536;

/// Session affinity: which pool and slot hold a session's KV cache.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) pool: PoolKey,
    pub(crate) slot: u32,
    pub(crate) turns: u32,
    pub(crate) last_used: Instant,
}

/// Sessions by (client, session id): a client sees and steers only its own sessions. Bounded
/// by age (the TTL, purged every half second by the node watcher) and by count (the least
/// recently used is evicted when a new session would exceed the capacity).
#[derive(Debug)]
pub(crate) struct Sessions {
    ttl: Duration,
    capacity: usize,
    map: HashMap<(String, String), Session>,
}

impl Sessions {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self::with_capacity(ttl, MAX_SESSIONS)
    }

    pub(crate) fn with_capacity(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            map: HashMap::new(),
        }
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn get(&self, client: &str, id: &str, now: Instant) -> Option<&Session> {
        self.map
            .get(&(client.to_string(), id.to_string()))
            .filter(|s| now.duration_since(s.last_used) < self.ttl)
    }

    /// Drops expired sessions; returns how many.
    pub(crate) fn purge(&mut self, now: Instant) -> usize {
        let before = self.map.len();
        let ttl = self.ttl;
        self.map
            .retain(|_, s| now.duration_since(s.last_used) < ttl);
        before - self.map.len()
    }

    /// Records a turn of a session; true when another session was evicted to make room.
    pub(crate) fn record(
        &mut self,
        client: &str,
        id: &str,
        pool: PoolKey,
        slot: u32,
        now: Instant,
    ) -> bool {
        let key = (client.to_string(), id.to_string());
        let mut evicted = false;
        if !self.map.contains_key(&key) && self.map.len() >= self.capacity {
            // Full: the expired go first, then the least recently used (a scan only when the
            // table is full, never on every turn).
            if self.purge(now) == 0 {
                if let Some(oldest) = self
                    .map
                    .iter()
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(k, _)| k.clone())
                {
                    self.map.remove(&oldest);
                    evicted = true;
                }
            }
        }
        let s = self.map.entry(key).or_insert(Session {
            pool: pool.clone(),
            slot,
            turns: 0,
            last_used: now,
        });
        s.pool = pool;
        s.slot = slot;
        s.turns += 1;
        s.last_used = now;
        evicted
    }

    pub(crate) fn remove(&mut self, client: &str, id: &str) -> bool {
        self.map
            .remove(&(client.to_string(), id.to_string()))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_bounded_by_count_and_evict_the_least_recently_used() {
        let now = Instant::now();
        let mut s = Sessions::with_capacity(Duration::from_secs(600), 3);
        let pool = || ("n".to_string(), "p".to_string());
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let at = now + Duration::from_secs(i as u64);
            assert!(!s.record("k", id, pool(), 0, at));
        }
        // "a" is used again, so "b" is now the least recently used.
        assert!(!s.record("k", "a", pool(), 0, now + Duration::from_secs(5)));
        assert!(s.record("k", "d", pool(), 0, now + Duration::from_secs(6)));
        assert_eq!(s.len(), 3);
        let later = now + Duration::from_secs(7);
        assert!(s.get("k", "b", later).is_none());
        for id in ["a", "c", "d"] {
            assert!(s.get("k", id, later).is_some(), "{id}");
        }
        // Expired sessions make room before anyone recent is evicted.
        let much_later = now + Duration::from_secs(605);
        assert!(!s.record("k", "e", pool(), 0, much_later));
        assert_eq!(s.len(), 2, "d and e: a and c expired, nobody was evicted");
    }
}
