//! Placement's decisions on hand-built snapshots.

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

#[test]
fn a_cached_prefix_draws_tasks_to_its_pool_until_it_runs_past_its_share() {
    // Two pools of 4 slots; `b` holds the prompt's prefix. Tasks are placed one by one,
    // each taking a slot, as the dispatcher does.
    let mut pools = vec![pool("a", "m", 4), pool("b", "m", 4)];
    let mut placed = Vec::new();
    for _ in 0..8 {
        let ask = Ask {
            model: "m",
            cached: vec![("n1", "b", 3000)],
            ..Ask::default()
        };
        let Placement::Place {
            pool_id, reasons, ..
        } = place(&pools, &ask)
        else {
            panic!("no placement");
        };
        if pool_id == "b" {
            assert!(
                reasons
                    .iter()
                    .any(|r| r.contains("first 3000 bytes") && r.contains("(cache)")),
                "{reasons:?}"
            );
        } else if pools[1].free_slots > 0 {
            assert!(
                reasons.iter().any(|r| r.contains("more than its share")),
                "{reasons:?}"
            );
        }
        let p = pools.iter_mut().find(|p| p.pool_id == pool_id).unwrap();
        p.free_slots -= 1;
        placed.push(pool_id);
    }
    // b takes the first two (an even spread plus one), then never runs more than one task
    // above a's count while it has a free slot.
    assert_eq!(placed[..3], ["b", "b", "a"], "{placed:?}");
    let mut counts = (0, 0);
    for p in &placed {
        match p.as_str() {
            "a" => counts.0 += 1,
            _ => counts.1 += 1,
        }
        assert!(counts.1 <= counts.0 + 2, "{placed:?}");
    }
    assert_eq!(counts, (4, 4));
    // Without a cached prefix, the most free slots win (a, by id, on a tie).
    let fresh = vec![pool("a", "m", 4), pool("b", "m", 4)];
    let ask = Ask {
        model: "m",
        ..Ask::default()
    };
    assert!(matches!(place(&fresh, &ask), Placement::Place { pool_id, .. } if pool_id == "a"));
    // A session outranks the cache.
    let ask = Ask {
        model: "m",
        session_pool: Some(("n1", "a")),
        cached: vec![("n1", "b", 3000)],
        ..Ask::default()
    };
    assert!(matches!(place(&fresh, &ask), Placement::Place { pool_id, .. } if pool_id == "a"));
}
