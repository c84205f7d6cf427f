//! The slot table: which slots are busy and which tokens each slot's KV cache holds. Request
//! handlers reserve a slot here (choosing by shared prefix) and get a [`SlotLease`]; the lease
//! is the only way a slot goes back: the decode loop releases it with the tokens it left in
//! the cache, and a job that never reached the decode loop returns it on drop. One short
//! synchronous lock, never held across an await.

use std::sync::{Arc, Mutex};

use llorch_wire::engine::{SlotState, SlotStatus, SlotsStatus};

use crate::prefix::common_prefix;

#[derive(Debug, Clone, Default)]
struct Slot {
    busy: bool,
    /// Tokens in this slot's KV cache, as of the end of its last request.
    cached: Vec<i32>,
    /// Whose prompt they are (`prefix::plan`): another scope's count as nothing.
    scope: u64,
    /// Logical clock of the last reservation, for least-recently-used tie-breaks.
    last_used: u64,
}

#[derive(Debug)]
pub struct SlotTable {
    slots: Vec<Slot>,
    clock: u64,
    ctx_per_slot: u32,
}

/// A reserved slot and how many prompt tokens its cache already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub slot: usize,
    pub shared_prefix: usize,
    /// The cache scope of the request it was reserved for.
    pub scope: u64,
}

impl SlotTable {
    pub fn new(n: usize, ctx_per_slot: u32) -> Self {
        Self {
            slots: vec![Slot::default(); n],
            clock: 0,
            ctx_per_slot,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.busy).count()
    }

    /// Reserves a slot of `table` for `prompt` (chosen as `SlotTable::reserve` says) and
    /// returns its lease. `None` when all are busy.
    pub fn lease(
        table: &Arc<Mutex<SlotTable>>,
        prompt: &[i32],
        scope: u64,
        preferred: Option<usize>,
    ) -> Option<SlotLease> {
        let reservation = llorch_os::sync::lock(table).reserve(prompt, scope, preferred)?;
        Some(SlotLease {
            table: Arc::clone(table),
            reservation,
            returned: false,
        })
    }

    /// Reserves a free slot for `prompt`: the preferred one when it is free, otherwise the free
    /// slot sharing the longest token prefix with the prompt, ties going to the least recently
    /// used (so the cache of a recent conversation survives longest). `None` when all are busy.
    /// Private: outside this file a slot is reserved as a [`SlotLease`], so it goes back.
    fn reserve(
        &mut self,
        prompt: &[i32],
        scope: u64,
        preferred: Option<usize>,
    ) -> Option<Reservation> {
        let shared = |s: &Slot| {
            if s.scope == scope {
                common_prefix(&s.cached, prompt)
            } else {
                0
            }
        };
        let chosen = match preferred {
            Some(p) if self.slots.get(p).is_some_and(|s| !s.busy) => p,
            _ => self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.busy)
                .max_by_key(|(i, s)| {
                    (
                        shared(s),
                        std::cmp::Reverse(s.last_used),
                        std::cmp::Reverse(*i),
                    )
                })
                .map(|(i, _)| i)?,
        };
        self.clock += 1;
        let slot = &mut self.slots[chosen];
        slot.busy = true;
        slot.last_used = self.clock;
        Some(Reservation {
            slot: chosen,
            shared_prefix: shared(slot),
            scope,
        })
    }

    /// Returns a slot, recording the tokens its KV cache now holds. Called only by
    /// [`SlotLease`], so once per reservation.
    fn release(&mut self, slot: usize, cached: Vec<i32>, scope: u64) {
        let s = &mut self.slots[slot];
        debug_assert!(s.busy, "slot {slot} released twice");
        s.busy = false;
        s.cached = cached;
        s.scope = scope;
    }

    pub fn status(&self) -> SlotsStatus {
        SlotsStatus {
            total: self.slots.len() as u32,
            busy: self.busy() as u32,
            ctx_per_slot: self.ctx_per_slot,
            slots: self
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| SlotStatus {
                    id: i as u32,
                    state: if s.busy {
                        SlotState::Busy
                    } else {
                        SlotState::Idle
                    },
                    cached_tokens: s.cached.len() as u32,
                })
                .collect(),
        }
    }
}

/// A reserved slot. It goes back to the table exactly once: by [`SlotLease::release`], which
/// the decode loop calls with the tokens left in the slot's KV cache before the job's final
/// event, or on drop, with nothing cached, for a job that never reached the decode loop.
#[derive(Debug)]
pub struct SlotLease {
    table: Arc<Mutex<SlotTable>>,
    reservation: Reservation,
    returned: bool,
}

impl SlotLease {
    pub fn slot(&self) -> usize {
        self.reservation.slot
    }

    /// The cache scope of the request the slot was reserved for.
    pub fn scope(&self) -> u64 {
        self.reservation.scope
    }

    /// Returns the slot, recording the tokens its KV cache now holds.
    pub fn release(mut self, cached: Vec<i32>) {
        self.give_back(cached);
    }

    fn give_back(&mut self, cached: Vec<i32>) {
        self.returned = true;
        llorch_os::sync::lock(&self.table).release(
            self.reservation.slot,
            cached,
            self.reservation.scope,
        );
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        // Not while a panic unwinds (a job dropped with a panicking decode thread): the table's
        // lock may be poisoned, and a second panic here would abort. Such a slot stays busy,
        // as it always has.
        if !self.returned && !std::thread::panicking() {
            self.give_back(Vec::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_longest_shared_prefix_then_least_recently_used() {
        let mut t = SlotTable::new(3, 100);
        // Fill caches: slot 0 has [1,2,3], slot 1 has [1,2,9,9], slot 2 empty.
        for (want, cache) in [(0, vec![1, 2, 3]), (1, vec![1, 2, 9, 9])] {
            let r = t.reserve(&cache, 0, Some(want)).unwrap();
            t.release(r.slot, cache, 0);
        }
        let r = t.reserve(&[1, 2, 9, 5], 0, None).unwrap();
        assert_eq!(
            r,
            Reservation {
                slot: 1,
                shared_prefix: 3,
                scope: 0,
            }
        );
        // Another scope shares nothing with them.
        t.release(r.slot, vec![1, 2, 9, 9], 0);
        let other = t.reserve(&[1, 2, 9, 5], 4, Some(1)).unwrap();
        assert_eq!((other.slot, other.shared_prefix), (1, 0));
        t.release(other.slot, vec![1, 2, 9, 9], 0);
        let again = t.reserve(&[1, 2, 9, 5], 0, Some(1)).unwrap();
        assert_eq!((again.slot, again.shared_prefix), (1, 3));
        // No prefix anywhere: the least recently used free slot (2 was never used).
        let r2 = t.reserve(&[7], 0, None).unwrap();
        assert_eq!(r2.slot, 2);
        let r3 = t.reserve(&[7], 0, None).unwrap();
        assert_eq!(r3.slot, 0);
        assert_eq!(t.reserve(&[7], 0, None), None, "all busy");
        assert_eq!(t.busy(), 3);
        t.release(1, vec![], 0);
        assert_eq!(t.status().busy, 2);
    }

    #[test]
    fn a_lease_goes_back_once_by_release_or_by_drop() {
        let t = Arc::new(Mutex::new(SlotTable::new(2, 100)));
        let a = SlotTable::lease(&t, &[1, 2], 0, Some(0)).unwrap();
        let b = SlotTable::lease(&t, &[1, 2], 0, None).unwrap();
        assert_eq!((a.slot(), b.slot()), (0, 1));
        assert!(SlotTable::lease(&t, &[1], 0, None).is_none(), "all busy");
        a.release(vec![1, 2, 3]);
        drop(b);
        let status = llorch_os::sync::lock(&t).status();
        assert_eq!(status.busy, 0);
        assert_eq!(status.slots[0].cached_tokens, 3);
        assert_eq!(
            status.slots[1].cached_tokens, 0,
            "a dropped lease records no cache"
        );
    }

    #[test]
    fn a_busy_preferred_slot_falls_back_to_another() {
        let mut t = SlotTable::new(2, 100);
        let a = t.reserve(&[1], 0, Some(1)).unwrap();
        assert_eq!(a.slot, 1);
        let b = t.reserve(&[1], 0, Some(1)).unwrap();
        assert_eq!(b.slot, 0);
    }
}
