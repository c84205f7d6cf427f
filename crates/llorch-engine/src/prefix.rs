//! The prefix cache past the slot. A prompt's KV cells come from wherever they are cheapest:
//!
//! 1. the request's own slot, when its cache already starts with the prompt (nothing to do);
//! 2. another slot, busy or idle, that holds a longer prefix: its sequence state is copied into
//!    the slot and cut to the shared prefix (a memory copy, no compute), so a system prompt used
//!    by four slots is computed once;
//! 3. the host cache ([`HostCache`]): prompt states saved in host memory when a slot moved on
//!    to another prompt, restored into the slot (a copy of the saved cells) when one is the
//!    longest prefix;
//! 4. otherwise the prompt is computed; and a request whose prefix another slot is computing
//!    right now waits for it ([`wait_for`]) and then takes route 2, so a burst of requests with
//!    one new system prompt computes it once.
//!
//! [`plan`] makes that choice (pure, unit tested); `decode/` carries it out on the llama
//! context. The host cache is bounded in bytes and evicts the least recently used entry.

/// A slot's state is saved to the host cache when it holds at least this many tokens that the
/// next request would drop; shorter states cost more to manage than to recompute.
pub const MIN_SAVE_TOKENS: usize = 64;
/// Another slot's state or a host entry is copied in only when it saves at least this many
/// tokens over the slot's own cache: a copy moves the whole saved sequence, which a few tokens
/// of prefill would beat.
pub const MIN_COPY_GAIN: usize = 32;

/// Where a request's reused prompt tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Its own slot's cache.
    Own,
    /// Another slot's sequence state, copied.
    Slot(usize),
    /// A host cache entry (index into [`HostCache`]), restored.
    Host(usize),
}

impl Source {
    /// The label of `llorch_prefix_cache_hit_tokens_total`.
    pub fn label(self) -> &'static str {
        match self {
            Source::Own => "slot",
            Source::Slot(_) => "shared",
            Source::Host(_) => "host",
        }
    }
}

/// The choice for one request: where its first `tokens` prompt tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub source: Source,
    pub tokens: usize,
}

/// Picks the source that saves the most prompt tokens for `prompt` in `slot`, given what every
/// slot's cache holds (`kv`, sequence id = index) and the host cache. Another slot and the host
/// cache are both copies of a whole sequence state, so either must beat the slot's own cache by
/// [`MIN_COPY_GAIN`] tokens; between them the longer wins, another slot on a tie (it stays
/// where it is, while a host entry's use reorders the cache).
///
/// Only state of the request's `scope` counts (orchestratord gives each API key one): what
/// another key's prompts left behind is never reused, so no key can learn from its speed or
/// its `cached_tokens` what another key sent. A slot of another scope counts as empty.
pub fn plan<S, T: AsRef<[i32]>>(
    slot: usize,
    kv: &[T],
    scopes: &[u64],
    host: &HostCache<S>,
    prompt: &[i32],
    scope: u64,
) -> Plan {
    let held = |i: usize| -> &[i32] {
        if scopes[i] == scope {
            kv[i].as_ref()
        } else {
            &[]
        }
    };
    let own = Plan {
        source: Source::Own,
        tokens: common_prefix(held(slot), prompt),
    };
    let mut copy = Plan {
        source: Source::Own,
        tokens: 0,
    };
    for i in 0..kv.len() {
        let n = common_prefix(held(i), prompt);
        if i != slot && n > copy.tokens {
            copy = Plan {
                source: Source::Slot(i),
                tokens: n,
            };
        }
    }
    if let Some((i, n)) = host.longest(prompt, scope) {
        if n > copy.tokens {
            copy = Plan {
                source: Source::Host(i),
                tokens: n,
            };
        }
    }
    if copy.tokens >= own.tokens + MIN_COPY_GAIN {
        copy
    } else {
        own
    }
}

/// Whether the cache of `slot` is worth saving before it is cut back to `keep` tokens: it
/// holds at least [`MIN_SAVE_TOKENS`] that would be lost, and no other slot nor host entry
/// of its scope already holds all of it.
pub fn worth_saving<S, T: AsRef<[i32]>>(
    slot: usize,
    keep: usize,
    kv: &[T],
    scopes: &[u64],
    host: &HostCache<S>,
) -> bool {
    let held = kv[slot].as_ref();
    let scope = scopes[slot];
    held.len() >= MIN_SAVE_TOKENS
        && held.len().saturating_sub(keep) >= MIN_SAVE_TOKENS
        && !kv.iter().enumerate().any(|(i, other)| {
            i != slot && scopes[i] == scope && common_prefix(other.as_ref(), held) == held.len()
        })
        && !host.covers(held, scope)
}

/// The slot whose prompt, still being computed, this request should wait for rather than
/// compute the same tokens beside it: the computing slot (`computing`: slot index and the whole
/// prompt it is evaluating, same scope only) sharing the longest prefix with `prompt`, when that
/// beats `planned` (what [`plan`] finds cached now) by at least [`MIN_COPY_GAIN`] tokens. The
/// wait ends when that slot's cells hold the shared part; the request then copies them (a
/// [`Source::Slot`] plan) and computes only the rest. So several requests arriving together with
/// one new system prompt compute it once, where computing it side by side would split every
/// batch between copies of the same work.
pub fn wait_for<'a>(
    planned: usize,
    prompt: &[i32],
    computing: impl Iterator<Item = (usize, &'a [i32])>,
) -> Option<usize> {
    // The last prompt token is always evaluated (its logits are sampled), so it is never shared.
    let limit = prompt.len().saturating_sub(1);
    computing
        .map(|(slot, other)| (slot, common_prefix(other, prompt).min(limit)))
        .filter(|(_, n)| *n >= planned + MIN_COPY_GAIN)
        .max_by_key(|(slot, n)| (*n, std::cmp::Reverse(*slot)))
        .map(|(slot, _)| slot)
}

pub fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct Entry<S> {
    tokens: Vec<i32>,
    /// Whose prompts these are (see [`plan`]).
    scope: u64,
    state: S,
    bytes: usize,
    last_used: u64,
}

/// Prompt states in host memory, keyed by their tokens, at most `limit` bytes in all. `S` is
/// llama.cpp's opaque sequence state in the engine (a plain value in the tests).
pub struct HostCache<S> {
    entries: Vec<Entry<S>>,
    bytes: usize,
    limit: usize,
    clock: u64,
}

/// What an insert did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub stored: bool,
    /// Entries evicted to make room (least recently used first).
    pub evicted: u32,
    /// Entries dropped because the new one extends them (it restores them too).
    pub subsumed: u32,
}

impl<S> HostCache<S> {
    pub fn new(limit: usize) -> Self {
        Self {
            entries: Vec::new(),
            bytes: 0,
            limit,
            clock: 0,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry sharing the longest prefix with `prompt`, and that length (`None`: no entry
    /// shares a token).
    pub fn longest(&self, prompt: &[i32], scope: u64) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.scope == scope)
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt)))
            .filter(|(_, n)| *n > 0)
            .max_by_key(|(i, n)| (*n, std::cmp::Reverse(*i)))
    }

    /// Whether an entry starts with all of `tokens`.
    pub fn covers(&self, tokens: &[i32], scope: u64) -> bool {
        self.entries.iter().any(|e| {
            e.scope == scope
                && e.tokens.len() >= tokens.len()
                && e.tokens[..tokens.len()] == *tokens
        })
    }

    /// Entry `i`'s state, marked as used now.
    pub fn take_use(&mut self, i: usize) -> (&S, usize) {
        self.clock += 1;
        let e = &mut self.entries[i];
        e.last_used = self.clock;
        (&e.state, e.bytes)
    }

    /// Stores `state` (`bytes` long) for `tokens`, dropping the entries it extends and then the
    /// least recently used until it fits. A state larger than the whole bound is not stored.
    pub fn insert(&mut self, tokens: Vec<i32>, scope: u64, state: S, bytes: usize) -> Inserted {
        let mut out = Inserted::default();
        if bytes > self.limit {
            return out;
        }
        let before = self.entries.len();
        let mut freed = 0;
        self.entries.retain(|e| {
            let extended = e.scope == scope
                && e.tokens.len() <= tokens.len()
                && tokens[..e.tokens.len()] == e.tokens;
            if extended {
                freed += e.bytes;
            }
            !extended
        });
        self.bytes -= freed;
        out.subsumed = (before - self.entries.len()) as u32;
        while self.bytes + bytes > self.limit {
            let Some((oldest, _)) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
            else {
                break;
            };
            let e = self.entries.swap_remove(oldest);
            self.bytes -= e.bytes;
            out.evicted += 1;
        }
        self.clock += 1;
        self.entries.push(Entry {
            tokens,
            scope,
            state,
            bytes,
            last_used: self.clock,
        });
        self.bytes += bytes;
        out.stored = true;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(start: i32, n: usize) -> Vec<i32> {
        (start..start + n as i32).collect()
    }

    #[test]
    fn eviction_keeps_the_bound_and_drops_the_least_recently_used() {
        let mut c = HostCache::new(1000);
        assert!(c.insert(tokens(0, 100), 0, "a", 400).stored);
        assert!(c.insert(tokens(1000, 100), 0, "b", 400).stored);
        // Using `a` makes `b` the least recently used.
        let (i, n) = c.longest(&tokens(0, 50), 0).unwrap();
        assert_eq!(n, 50);
        assert_eq!(*c.take_use(i).0, "a");
        let r = c.insert(tokens(2000, 100), 0, "c", 400);
        assert_eq!((r.stored, r.evicted), (true, 1));
        assert!(c.bytes() <= c.limit());
        assert!(c.longest(&tokens(1000, 10), 0).is_none(), "b was evicted");
        assert!(c.longest(&tokens(0, 10), 0).is_some(), "a stayed");
        // A state larger than the bound is refused and evicts nothing.
        let r = c.insert(tokens(3000, 100), 0, "huge", 1001);
        assert_eq!(r, Inserted::default());
        assert_eq!(c.len(), 2);
        // Many inserts never pass the bound.
        for k in 0..50 {
            c.insert(tokens(10_000 + k * 200, 100), 0, "x", 300);
            assert!(c.bytes() <= c.limit(), "bound kept after insert {k}");
        }
    }

    #[test]
    fn a_longer_state_replaces_the_prefixes_it_extends() {
        let mut c = HostCache::new(10_000);
        c.insert(tokens(0, 100), 0, 1, 100);
        c.insert(tokens(0, 50), 0, 2, 50);
        assert!(c.covers(&tokens(0, 100), 0));
        assert!(c.covers(&tokens(0, 30), 0));
        assert!(!c.covers(&tokens(0, 101), 0));
        let r = c.insert(tokens(0, 200), 0, 3, 200);
        assert_eq!(r.subsumed, 2);
        assert_eq!((c.len(), c.bytes()), (1, 200));
    }

    #[test]
    fn the_plan_takes_the_source_that_saves_the_most() {
        let system = tokens(0, 300);
        let prompt = [system.clone(), tokens(5000, 40)].concat();
        let mut host = HostCache::new(1 << 20);
        // Own slot empty, slot 2 holds the system prompt and an old question: share it.
        let kv = vec![
            vec![],
            tokens(9000, 10),
            [system.clone(), tokens(7000, 40)].concat(),
        ];
        assert_eq!(
            plan(0, &kv, &[0; 3], &host, &prompt, 0),
            Plan {
                source: Source::Slot(2),
                tokens: 300
            }
        );
        // A host entry with the whole prompt beats it by more than the restore threshold.
        host.insert(prompt.clone(), 0, (), 1);
        assert_eq!(
            plan(0, &kv, &[0; 3], &host, &prompt, 0),
            Plan {
                source: Source::Host(0),
                tokens: prompt.len()
            }
        );
        // Own slot wins ties: nothing to move.
        let kv = vec![prompt.clone(), prompt.clone(), vec![]];
        assert_eq!(plan(0, &kv, &[0; 3], &host, &prompt, 0).source, Source::Own);
        // A host entry that gains less than MIN_COPY_GAIN is not worth a copy.
        let kv = vec![prompt[..prompt.len() - 10].to_vec(), vec![], vec![]];
        assert_eq!(plan(0, &kv, &[0; 3], &host, &prompt, 0).source, Source::Own);
    }

    #[test]
    fn a_request_waits_for_the_slot_computing_the_longest_shared_prefix() {
        let system = tokens(0, 300);
        let mut mine = system.clone();
        mine.extend(tokens(5000, 10));
        let mut theirs = system[..200].to_vec();
        theirs.extend(tokens(7000, 50));
        let computing = [(1, theirs.as_slice()), (2, system.as_slice())];
        // Slot 2 computes all 300 shared tokens, slot 1 only 200 of them.
        assert_eq!(wait_for(0, &mine, computing.iter().copied()), Some(2));
        // What is cached already counts: 280 of 300 are not worth a wait.
        assert_eq!(wait_for(280, &mine, computing.iter().copied()), None);
        assert_eq!(wait_for(268, &mine, computing.iter().copied()), Some(2));
        // A prompt shorter than the gain, or nothing in common: no wait.
        assert_eq!(wait_for(0, &tokens(0, 20), computing.iter().copied()), None);
        assert_eq!(
            wait_for(0, &tokens(9000, 400), computing.iter().copied()),
            None
        );
        // Nothing computing: no wait.
        assert_eq!(wait_for(0, &mine, std::iter::empty()), None);
        // The same prompt: all but its last token is shared.
        assert_eq!(
            wait_for(0, &system, [(3, system.as_slice())].into_iter()),
            Some(3)
        );
    }

    #[test]
    fn a_slot_is_saved_only_when_its_cache_would_be_lost() {
        let long = tokens(0, 200);
        let mut host: HostCache<()> = HostCache::new(1 << 20);
        let kv = vec![long.clone(), vec![]];
        assert!(worth_saving(0, 0, &kv, &[0; 2], &host));
        assert!(
            !worth_saving(0, 190, &kv, &[0; 2], &host),
            "little is dropped"
        );
        let short = vec![tokens(0, 10), vec![]];
        assert!(!worth_saving(0, 0, &short, &[0; 2], &host), "too short");
        let shared = vec![long.clone(), [long.clone(), tokens(900, 5)].concat()];
        assert!(
            !worth_saving(0, 0, &shared, &[0; 2], &host),
            "another slot holds it"
        );
        host.insert(long.clone(), 0, (), 1);
        assert!(
            !worth_saving(0, 0, &kv, &[0; 2], &host),
            "already in the host cache"
        );
    }

    #[test]
    fn another_scopes_state_is_never_reused() {
        let system = tokens(0, 300);
        let prompt = [system.clone(), tokens(5000, 40)].concat();
        let mut host = HostCache::new(1 << 20);
        // Slot 1 and a host entry hold the system prompt, both of scope 7 (another key).
        let kv = vec![system.clone(), [system.clone(), tokens(7000, 40)].concat()];
        host.insert(prompt.clone(), 7, (), 1);
        let own = plan(0, &kv, &[7, 7], &host, &prompt, 9);
        assert_eq!(
            (own.source, own.tokens),
            (Source::Own, 0),
            "nothing of scope 7"
        );
        // Scope 7 itself finds them.
        assert_eq!(
            plan(0, &kv, &[7, 7], &host, &prompt, 7).source,
            Source::Host(0)
        );
        // Saving looks only at the slot's own scope: the host entry of scope 7 does not cover
        // slot 0 of scope 9.
        let kv = vec![system.clone(), vec![]];
        assert!(worth_saving(0, 0, &kv, &[9, 0], &host));
        host.insert(system.clone(), 9, (), 1);
        assert!(!worth_saving(0, 0, &kv, &[9, 0], &host));
        assert_eq!(
            host.len(),
            2,
            "a scope's entry does not replace another scope's"
        );
    }
}
