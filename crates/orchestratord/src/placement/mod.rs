//! Placement: a pure function from a snapshot of pools to a decision and the reasons for it.
//!
//! Filters first (model served, node online, pool ready, not draining, a free slot, pin and
//! avoid and prefer-without-fallback), then a score (session affinity for KV cache reuse, then
//! preference, then the prompt's expected cached prefix, then the most free slots), then a
//! deterministic tie-break on the pool id. Only this module decides where a task runs; the
//! dispatcher applies the decision.
//!
//! The cache bonus (cache-aware placement) holds only while a pool runs no more than its share
//! of the model's running tasks plus one: a pool's share is its slots over the slots of every
//! ready pool of the model, and the test is `busy × all slots ≤ slots × (all busy + 1)` before
//! the task is added. So a popular prefix draws its requests to the pool that holds it until
//! that pool runs one task more than an even spread would give it; then they spread by free
//! slots, and the next pool to serve the prefix caches it too.
//!
//! A loaded pool always wins over an on-demand pool on `standby`. A standby pool is chosen only
//! when no loaded pool has a free slot, and then only when its load time (as its node last
//! measured it) is shorter than the wait for a loaded pool's slot; the task waits otherwise.
//! A standby GPU pool whose estimated VRAM is more than its GPUs have free is not loaded.

use std::time::Duration;

use llorch_wire::node::PoolState;
use llorch_wire::task::PlacementHints;

/// One pool as placement sees it. Its ids are borrowed from the registry, so the snapshot of
/// thousands of pools the dispatcher takes on each pass costs no allocation per pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<'a> {
    pub pool_id: &'a str,
    pub node_id: &'a str,
    pub model_id: &'a str,
    pub state: PoolState,
    pub node_online: bool,
    /// Slots not leased to running tasks.
    pub free_slots: u32,
    pub slots_total: u32,
    /// A pool whose engine just failed a request: skipped until its node reports again.
    pub suspect: bool,
    /// The engine's last measured load time (start to ready), if its node reported one.
    pub load_ms: Option<u64>,
    /// Loaded by its first request; while it loads, the node passes tasks on to wait for it.
    pub on_demand: bool,
    /// A GPU pool's VRAM need and its GPUs' free VRAM, as its node last reported them.
    pub vram: Option<(u64, u64)>,
}

/// What loading a standby pool is assumed to cost before its node has measured a load.
pub(crate) const DEFAULT_LOAD_TIME: Duration = Duration::from_secs(10);

impl Candidate<'_> {
    /// Ready on an online node and not suspect: it may take work (slots permitting).
    pub fn serving(&self) -> bool {
        self.node_online && self.state == PoolState::Ready && !self.suspect
    }

    /// An unloaded on-demand pool on an online node: it may take work once its model loads.
    pub fn standby(&self) -> bool {
        self.node_online && self.state == PoolState::Standby && !self.suspect
    }

    /// An on-demand pool whose model is loading (a request started it): tasks sent there wait
    /// for the same load, sooner done than a standby pool's.
    pub fn waking(&self) -> bool {
        self.node_online && self.on_demand && self.state == PoolState::Loading && !self.suspect
    }

    /// A standby pool whose model would not fit its GPUs' free memory now: (need, free).
    pub fn vram_short(&self) -> Option<(u64, u64)> {
        self.vram.filter(|(need, free)| need > free)
    }

    /// How long a task placed here waits for the model to load.
    pub fn load_time(&self) -> Duration {
        self.load_ms
            .map_or(DEFAULT_LOAD_TIME, Duration::from_millis)
    }
}

/// What placement is asked to place.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ask<'a> {
    pub model: &'a str,
    /// The pool holding the task's session (KV cache), as (node id, pool id), if any.
    pub session_pool: Option<(&'a str, &'a str)>,
    pub hints: Option<&'a PlacementHints>,
    /// How long a slot of a loaded pool takes to free up (the model's measured service time
    /// over its slots): what waiting costs, against loading a standby pool.
    pub slot_wait: Duration,
    /// Pools that probably hold the start of the prompt, as (node id, pool id, bytes of the
    /// prompt's text) from the prefix index.
    pub cached: Vec<(&'a str, &'a str, u32)>,
}

impl Ask<'_> {
    /// Bytes of the prompt that `p` probably holds.
    fn cached_on(&self, p: &Candidate) -> u32 {
        self.cached
            .iter()
            .find(|(n, id, _)| *n == p.node_id && *id == p.pool_id)
            .map_or(0, |c| c.2)
    }
}

/// Whether `p` may take one more task for its cache: it runs no more than its share of the
/// running tasks plus one (`busy` and `slots` are those of every ready pool of the model).
fn within_share(p: &Candidate, busy: u64, slots: u64) -> bool {
    let own_busy = u64::from(p.slots_total.saturating_sub(p.free_slots));
    own_busy * slots <= u64::from(p.slots_total) * (busy + 1)
}

#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// Run on this pool.
    Place {
        pool_id: String,
        node_id: String,
        reasons: Vec<String>,
    },
    /// No eligible pool has a free slot now; the task waits.
    Wait { reasons: Vec<String> },
    /// The hints can never be met (a pin to a pool that does not serve the model, every pool
    /// avoided): an error for the client, never a silent fallback.
    Impossible { reason: String },
}

/// Free and total slots of ready pools serving `model`.
pub(crate) fn capacity_for(candidates: &[Candidate], model: &str) -> (u32, u32) {
    candidates
        .iter()
        .filter(|c| c.model_id == model && c.serving())
        // Saturating: node input is bounded per pool, but the number of pools is not.
        .fold((0u32, 0u32), |(f, s), c| {
            (
                f.saturating_add(c.free_slots),
                s.saturating_add(c.slots_total),
            )
        })
}

/// The pools of `serving` (those of the task's model) that the placement hints allow: node
/// hints first, as they narrow the pools the pool hints then choose among. `Err`: why the
/// hints can never be met.
fn eligible<'a, 'p>(
    pools: &[Candidate<'p>],
    serving: Vec<&'a Candidate<'p>>,
    ask: &Ask<'_>,
    hints: &PlacementHints,
) -> Result<Vec<&'a Candidate<'p>>, String> {
    // Node hints first: they narrow the pools the pool hints then choose among.
    let serving: Vec<&Candidate> = match &hints.pin_node_id {
        Some(pin) => {
            let on: Vec<&Candidate> = serving
                .iter()
                .copied()
                .filter(|p| p.node_id == pin)
                .collect();
            if on.is_empty() {
                let reason = if pools.iter().any(|p| p.node_id == pin) {
                    format!("pinned node {pin:?} does not serve model {:?}", ask.model)
                } else {
                    format!("pinned node {pin:?} does not exist")
                };
                return Err(reason);
            }
            on
        }
        None => serving,
    };
    let serving: Vec<&Candidate> = serving
        .into_iter()
        .filter(|p| !hints.avoid_nodes.iter().any(|x| x == p.node_id))
        .collect();
    if serving.is_empty() {
        return Err(format!(
            "every node serving model {:?} is in avoid_nodes",
            ask.model
        ));
    }
    let eligible: Vec<&Candidate> = if let Some(pin) = &hints.pin_pool_id {
        match serving.iter().find(|p| p.pool_id == pin) {
            Some(p) => vec![*p],
            None => {
                let reason = if pools.iter().any(|p| p.pool_id == pin) {
                    format!("pinned pool {pin:?} does not serve model {:?}", ask.model)
                } else {
                    format!("pinned pool {pin:?} does not exist")
                };
                return Err(reason);
            }
        }
    } else {
        let not_avoided: Vec<&Candidate> = serving
            .iter()
            .copied()
            .filter(|p| !hints.avoid_pools.iter().any(|x| x == p.pool_id))
            .collect();
        if not_avoided.is_empty() {
            return Err(format!(
                "every pool serving model {:?} is in avoid_pools",
                ask.model
            ));
        }
        let prefers = !hints.prefer_pools.is_empty() || !hints.prefer_nodes.is_empty();
        if prefers && hints.allow_fallback == Some(false) {
            let preferred: Vec<&Candidate> = not_avoided
                .iter()
                .copied()
                .filter(|p| preferred(hints, p))
                .collect();
            if preferred.is_empty() {
                return Err(format!(
                        "none of prefer_pools or prefer_nodes serves model {:?} and allow_fallback is false",
                        ask.model
                    ));
            }
            preferred
        } else {
            not_avoided
        }
    };
    Ok(eligible)
}

/// Decides where `ask` runs given `pools`. Pure: the same inputs give the same answer.
pub fn place(pools: &[Candidate], ask: &Ask<'_>) -> Placement {
    let mut reasons = Vec::new();
    let serving: Vec<&Candidate> = pools.iter().filter(|p| p.model_id == ask.model).collect();
    if serving.is_empty() {
        return Placement::Impossible {
            reason: format!("no pool serves model {:?}", ask.model),
        };
    }
    let empty = PlacementHints::default();
    let hints = ask.hints.unwrap_or(&empty);
    let eligible = match eligible(pools, serving, ask, hints) {
        Ok(eligible) => eligible,
        Err(reason) => return Placement::Impossible { reason },
    };
    let mut ready: Vec<&Candidate> = Vec::new();
    let mut standby: Vec<&Candidate> = Vec::new();
    let mut loaded_but_full = false;
    for p in eligible {
        if p.standby() && p.free_slots > 0 {
            if let Some((need, free)) = p.vram_short() {
                reasons.push(format!(
                    "{}: on demand; needs {} MiB of VRAM, its GPUs have {} MiB free",
                    p.pool_id,
                    need >> 20,
                    free >> 20
                ));
                continue;
            }
        }
        if (p.standby() || p.waking()) && p.free_slots > 0 {
            standby.push(p);
            continue;
        }
        loaded_but_full |= p.serving() && p.free_slots == 0;
        let why_not = if !p.node_online {
            Some("node offline")
        } else if p.state != PoolState::Ready {
            Some(p.state.as_str())
        } else if p.suspect {
            Some("engine failed, waiting for its node to report")
        } else if p.free_slots == 0 {
            Some("no free slot")
        } else {
            None
        };
        match why_not {
            Some(w) => reasons.push(format!("{}: {w}", p.pool_id)),
            None => ready.push(p),
        }
    }
    let (busy, slots) = ready.iter().fold((0u64, 0u64), |(b, s), p| {
        (
            b + u64::from(p.slots_total.saturating_sub(p.free_slots)),
            s + u64::from(p.slots_total),
        )
    });
    let cache = |p: &Candidate| -> u32 {
        match ask.cached_on(p) {
            0 => 0,
            _ if !within_share(p, busy, slots) => 0,
            bytes => bytes,
        }
    };
    let score = |p: &Candidate| -> (bool, bool, u32, u32) {
        (
            ask.session_pool == Some((p.node_id, p.pool_id)),
            preferred(hints, p),
            cache(p),
            p.free_slots,
        )
    };
    // A pool that holds the prefix but lost its bonus to the load rule, for the reasons.
    let crowded = ready
        .iter()
        .filter(|p| ask.cached_on(p) > 0 && !within_share(p, busy, slots))
        .map(|p| (p.pool_id, ask.cached_on(p)))
        .max_by_key(|c| c.1);
    // Highest score wins; among equals the smallest pool id, then node id, so the choice never
    // depends on the order the snapshot was built in.
    let best = ready.into_iter().max_by(|a, b| {
        score(a)
            .cmp(&score(b))
            .then_with(|| (&b.pool_id, &b.node_id).cmp(&(&a.pool_id, &a.node_id)))
    });
    match best {
        Some(p) => {
            let (session, preferred, cached, free) = score(p);
            if session {
                reasons.push(format!("{}: holds the session's KV cache", p.pool_id));
            }
            if preferred {
                reasons.push(format!("{}: preferred", p.pool_id));
            }
            if cached > 0 {
                reasons.push(format!(
                    "{}: probably holds the first {cached} bytes of the prompt (cache)",
                    p.pool_id
                ));
            } else if let Some((id, bytes)) = crowded {
                reasons.push(format!(
                    "{id}: probably holds the first {bytes} bytes of the prompt, but runs more than its share of the model's tasks"
                ));
            }
            reasons.push(format!("{}: {free} free slots", p.pool_id));
            Placement::Place {
                pool_id: p.pool_id.to_string(),
                node_id: p.node_id.to_string(),
                reasons,
            }
        }
        None => place_cold(standby, loaded_but_full, ask.slot_wait, reasons),
    }
}

/// Whether a hint prefers this pool (by its id or its node's).
fn preferred(hints: &PlacementHints, p: &Candidate) -> bool {
    hints.prefer_pools.iter().any(|x| x == p.pool_id)
        || hints.prefer_nodes.iter().any(|x| x == p.node_id)
}

/// No loaded pool has a free slot: load a standby pool, unless a loaded pool's slot frees up
/// sooner than the model loads. A pool already loading wins (no second copy of the model),
/// then the quickest load, then the most free slots, then the smallest id.
fn place_cold(
    standby: Vec<&Candidate>,
    loaded_but_full: bool,
    slot_wait: Duration,
    mut reasons: Vec<String>,
) -> Placement {
    let best = standby.into_iter().min_by(|a, b| {
        b.waking()
            .cmp(&a.waking())
            .then_with(|| a.load_time().cmp(&b.load_time()))
            .then_with(|| b.free_slots.cmp(&a.free_slots))
            .then_with(|| a.pool_id.cmp(b.pool_id))
    });
    let Some(p) = best else {
        return Placement::Wait { reasons };
    };
    let load = p.load_time().as_millis();
    if loaded_but_full && p.load_time() > slot_wait {
        reasons.push(format!(
            "{}: on demand; loading takes ~{load} ms, a loaded pool frees a slot in ~{} ms",
            p.pool_id,
            slot_wait.as_millis()
        ));
        return Placement::Wait { reasons };
    }
    let what = if p.waking() { "loading" } else { "standby" };
    reasons.push(format!(
        "{}: {what}; its model loads first (~{load} ms)",
        p.pool_id
    ));
    Placement::Place {
        pool_id: p.pool_id.to_string(),
        node_id: p.node_id.to_string(),
        reasons,
    }
}

#[cfg(test)]
mod tests;
