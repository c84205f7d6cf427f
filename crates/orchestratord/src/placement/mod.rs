//! Placement: a pure function from a snapshot of pools to a decision and the reasons for it.
//!
//! Filters first (model served, node online, pool ready, not draining, a free slot, pin and
//! avoid and prefer-without-fallback), then a score (session affinity for KV cache reuse, then
//! preference, then the most free slots), then a deterministic tie-break on the pool id. Only
//! this module decides where a task runs; the dispatcher applies the decision.
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
    let score = |p: &Candidate| -> (bool, bool, u32) {
        (
            ask.session_pool == Some((p.node_id, p.pool_id)),
            preferred(hints, p),
            p.free_slots,
        )
    };
    // Highest score wins; among equals the smallest pool id, then node id, so the choice never
    // depends on the order the snapshot was built in.
    let best = ready.into_iter().max_by(|a, b| {
        score(a)
            .cmp(&score(b))
            .then_with(|| (&b.pool_id, &b.node_id).cmp(&(&a.pool_id, &a.node_id)))
    });
    match best {
        Some(p) => {
            let (session, preferred, free) = score(p);
            if session {
                reasons.push(format!("{}: holds the session's KV cache", p.pool_id));
            }
            if preferred {
                reasons.push(format!("{}: preferred", p.pool_id));
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
mod tests {
    use super::*;

    fn pool<'a>(id: &'a str, model: &'a str, free: u32) -> Candidate<'a> {
        Candidate {
            pool_id: id,
            node_id: "n1",
            model_id: model,
            state: PoolState::Ready,
            node_online: true,
            free_slots: free,
            slots_total: 4,
            suspect: false,
            load_ms: None,
            on_demand: false,
            vram: None,
        }
    }

    fn placed(p: Placement) -> String {
        match p {
            Placement::Place { pool_id, .. } => pool_id,
            other => panic!("expected a placement, got {other:?}"),
        }
    }

    #[test]
    fn least_loaded_wins_and_ties_break_on_pool_id() {
        let pools = [pool("b", "m", 2), pool("a", "m", 2), pool("c", "m", 1)];
        let ask = Ask {
            model: "m",
            ..Ask::default()
        };
        assert_eq!(placed(place(&pools, &ask)), "a");
        let pools = [pool("b", "m", 3), pool("a", "m", 2)];
        assert_eq!(placed(place(&pools, &ask)), "b");
        // Order of the snapshot does not matter.
        let mut rev = pools.clone();
        rev.reverse();
        assert_eq!(place(&pools, &ask), place(&rev, &ask));
    }

    #[test]
    fn filters_model_state_slots_and_node() {
        let mut loading = pool("a", "m", 4);
        loading.state = PoolState::Loading;
        let mut offline = pool("b", "m", 4);
        offline.node_online = false;
        let full = pool("c", "m", 0);
        let other = pool("d", "x", 4);
        let mut draining = pool("e", "m", 4);
        draining.state = PoolState::Draining;
        let mut suspect = pool("f", "m", 4);
        suspect.suspect = true;
        let pools = [loading, offline, full, other, draining, suspect];
        let ask = Ask {
            model: "m",
            ..Ask::default()
        };
        match place(&pools, &ask) {
            Placement::Wait { reasons } => {
                assert_eq!(reasons.len(), 5, "{reasons:?}");
                assert!(reasons.iter().any(|r| r == "a: loading"));
                assert!(reasons.iter().any(|r| r == "c: no free slot"));
            }
            other => panic!("{other:?}"),
        }
        let ask = Ask {
            model: "nope",
            ..Ask::default()
        };
        assert!(matches!(place(&pools, &ask), Placement::Impossible { .. }));
    }

    fn standby(id: &str, free: u32, load_ms: Option<u64>) -> Candidate<'_> {
        Candidate {
            state: PoolState::Standby,
            load_ms,
            on_demand: true,
            ..pool(id, "m", free)
        }
    }

    #[test]
    fn loaded_pools_win_and_standby_pools_count_their_load_time() {
        let ask = |slot_wait_ms| Ask {
            model: "m",
            slot_wait: Duration::from_millis(slot_wait_ms),
            ..Ask::default()
        };
        // A loaded pool with a free slot wins, however many slots the standby pool has.
        let pools = [standby("a", 4, Some(100)), pool("b", "m", 1)];
        assert_eq!(placed(place(&pools, &ask(10_000))), "b");
        // No loaded pool: the standby pool loads; the quickest load wins.
        let pools = [standby("a", 4, Some(900)), standby("b", 4, Some(300))];
        match place(&pools, &ask(0)) {
            Placement::Place {
                pool_id, reasons, ..
            } => {
                assert_eq!(pool_id, "b");
                assert!(
                    reasons
                        .iter()
                        .any(|r| r == "b: standby; its model loads first (~300 ms)"),
                    "{reasons:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Without a measured load the default estimate counts.
        let pools = [standby("a", 4, None), standby("b", 4, Some(20_000))];
        assert_eq!(placed(place(&pools, &ask(0))), "a");
        // Loaded pools are full: load only when that is quicker than a slot freeing up.
        let pools = [standby("a", 4, Some(2_000)), pool("b", "m", 0)];
        assert!(matches!(place(&pools, &ask(500)), Placement::Wait { .. }));
        assert_eq!(placed(place(&pools, &ask(5_000))), "a");
        // A GPU pool whose model does not fit its GPUs' free memory now is not loaded; one
        // that fits is.
        let gib = 1u64 << 30;
        let mut big = standby("a", 4, Some(100));
        big.vram = Some((20 * gib, 8 * gib));
        let mut fits = standby("b", 4, Some(9_000));
        fits.vram = Some((6 * gib, 8 * gib));
        match place(&[big.clone(), fits], &ask(0)) {
            Placement::Place {
                pool_id, reasons, ..
            } => {
                assert_eq!(pool_id, "b");
                assert!(
                    reasons.contains(
                        &"a: on demand; needs 20480 MiB of VRAM, its GPUs have 8192 MiB free"
                            .to_string()
                    ),
                    "{reasons:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(place(&[big], &ask(0)), Placement::Wait { .. }));
        // A suspect or offline standby pool is not loaded.
        let mut suspect = standby("a", 4, Some(1));
        suspect.suspect = true;
        let mut offline = standby("b", 4, Some(1));
        offline.node_online = false;
        assert!(matches!(
            place(&[suspect, offline], &ask(0)),
            Placement::Wait { .. }
        ));
        // A pool that is loading already takes the next tasks too, before another copy of the
        // model is loaded elsewhere; a plain pool that is loading does not.
        let mut waking = standby("b", 3, Some(5_000));
        waking.state = PoolState::Loading;
        let pools = [standby("a", 4, Some(100)), waking.clone()];
        assert_eq!(placed(place(&pools, &ask(0))), "b");
        waking.on_demand = false;
        let pools = [standby("a", 4, Some(100)), waking];
        assert_eq!(placed(place(&pools, &ask(0))), "a");
        // A pin to a standby pool loads it.
        let pin = PlacementHints {
            pin_pool_id: Some("a".into()),
            ..PlacementHints::default()
        };
        let pools = [standby("a", 4, Some(2_000)), pool("b", "m", 4)];
        let pinned = Ask {
            hints: Some(&pin),
            ..ask(0)
        };
        assert_eq!(placed(place(&pools, &pinned)), "a");
    }

    #[test]
    fn session_affinity_beats_load() {
        let pools = [pool("a", "m", 4), pool("b", "m", 1)];
        let ask = Ask {
            model: "m",
            session_pool: Some(("n1", "b")),
            ..Ask::default()
        };
        assert_eq!(placed(place(&pools, &ask)), "b");
        // A full session pool is not waited for: another pool serves the turn.
        let pools = [pool("a", "m", 4), pool("b", "m", 0)];
        assert_eq!(placed(place(&pools, &ask)), "a");
    }

    #[test]
    fn pins_prefers_and_avoids() {
        let pools = [pool("a", "m", 4), pool("b", "m", 1), pool("c", "x", 4)];
        let pin_b = PlacementHints {
            pin_pool_id: Some("b".into()),
            ..PlacementHints::default()
        };
        fn ask(h: &PlacementHints) -> Ask<'_> {
            Ask {
                model: "m",
                hints: Some(h),
                ..Ask::default()
            }
        }
        assert_eq!(placed(place(&pools, &ask(&pin_b))), "b");
        // A pin to a busy pool waits for it.
        let busy = [pool("a", "m", 4), pool("b", "m", 0)];
        assert!(matches!(place(&busy, &ask(&pin_b)), Placement::Wait { .. }));
        for pin in ["c", "zz"] {
            let h = PlacementHints {
                pin_pool_id: Some(pin.into()),
                ..PlacementHints::default()
            };
            assert!(matches!(
                place(&pools, &ask(&h)),
                Placement::Impossible { .. }
            ));
        }
        let avoid_a = PlacementHints {
            avoid_pools: vec!["a".into()],
            ..PlacementHints::default()
        };
        assert_eq!(placed(place(&pools, &ask(&avoid_a))), "b");
        let avoid_all = PlacementHints {
            avoid_pools: vec!["a".into(), "b".into()],
            ..PlacementHints::default()
        };
        assert!(matches!(
            place(&pools, &ask(&avoid_all)),
            Placement::Impossible { .. }
        ));
        let prefer_b = PlacementHints {
            prefer_pools: vec!["b".into()],
            ..PlacementHints::default()
        };
        assert_eq!(placed(place(&pools, &ask(&prefer_b))), "b");
        // Without fallback, a busy preferred pool is waited for.
        let prefer_only = PlacementHints {
            prefer_pools: vec!["b".into()],
            allow_fallback: Some(false),
            ..PlacementHints::default()
        };
        assert!(matches!(
            place(&busy, &ask(&prefer_only)),
            Placement::Wait { .. }
        ));
        let with_fallback = PlacementHints {
            allow_fallback: Some(true),
            ..prefer_only.clone()
        };
        assert_eq!(placed(place(&busy, &ask(&with_fallback))), "a");
    }

    #[test]
    fn pool_ids_repeat_across_nodes_and_node_hints_choose() {
        let on = |node: &'static str, free| Candidate {
            node_id: node,
            ..pool("default", "m", free)
        };
        let pools = [on("w2", 2), on("w3", 2)];
        let at = |p: Placement| match p {
            Placement::Place { node_id, .. } => node_id,
            other => panic!("{other:?}"),
        };
        // A session sticks to its node, whichever order the snapshot has.
        for session in ["w2", "w3"] {
            let ask = Ask {
                model: "m",
                session_pool: Some((session, "default")),
                ..Ask::default()
            };
            assert_eq!(at(place(&pools, &ask)), session);
            let mut rev = pools.clone();
            rev.reverse();
            assert_eq!(at(place(&rev, &ask)), session);
        }
        let hinted = |h: PlacementHints| {
            let ask = Ask {
                model: "m",
                hints: Some(&h),
                ..Ask::default()
            };
            place(&pools, &ask)
        };
        let pin = |n: &str| PlacementHints {
            pin_node_id: Some(n.into()),
            ..PlacementHints::default()
        };
        assert_eq!(at(hinted(pin("w3"))), "w3");
        assert!(
            matches!(hinted(pin("w9")), Placement::Impossible { reason } if reason.contains("does not exist"))
        );
        let avoid = PlacementHints {
            avoid_nodes: vec!["w2".into()],
            ..PlacementHints::default()
        };
        assert_eq!(at(hinted(avoid)), "w3");
        let all = PlacementHints {
            avoid_nodes: vec!["w2".into(), "w3".into()],
            ..PlacementHints::default()
        };
        assert!(matches!(hinted(all), Placement::Impossible { .. }));
        let prefer = PlacementHints {
            prefer_nodes: vec!["w3".into()],
            ..PlacementHints::default()
        };
        assert_eq!(at(hinted(prefer)), "w3");
        let strict = PlacementHints {
            prefer_nodes: vec!["w9".into()],
            allow_fallback: Some(false),
            ..PlacementHints::default()
        };
        assert!(matches!(hinted(strict), Placement::Impossible { .. }));
    }
}
