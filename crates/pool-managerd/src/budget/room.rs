//! Whether a pool may load now, and which idle pools must unload first: a pure function from
//! the node's pools (what each is charged, on which devices, whether it has work, when it was
//! last used) and its budgets to a [`Decision`].
//!
//! The rule, in order:
//! 1. A pool that is loaded, loading or already admitted fits.
//! 2. A model larger than a device's whole budget never fits: refused.
//! 3. Otherwise the pool fits when every device it uses has room for its charge and fewer
//!    than `max_loaded` pools are loaded.
//! 4. If not, idle on-demand pools that are not pinned and that share a short device (any
//!    such pool, for `max_loaded`) are unloaded, least recently used first, until it fits.
//!    A pool loaded less than `min_resident` ago is not idle for this purpose.
//! 5. When only pools with work in flight (or loaded too recently) stand in the way, the
//!    request waits for them; when even unloading every such pool would not make room (the
//!    memory is held by pinned or always-loaded pools), it is refused at once, naming them.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// Where memory is charged: the host (CPU pools) or one GPU (by its id in node.toml).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    Host,
    Gpu(String),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Host => f.write_str("host"),
            Self::Gpu(g) => write!(f, "gpu:{g}"),
        }
    }
}

/// The budgets: bytes per device (a device without one is not limited) and the most pools
/// loaded at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Budgets {
    pub bytes: BTreeMap<Device, u64>,
    pub max_loaded: Option<u32>,
}

/// One pool as the decision sees it.
#[derive(Debug, Clone)]
pub struct Resident {
    pub pool_id: String,
    /// Bytes charged on each device while loaded.
    pub charge: Vec<(Device, u64)>,
    /// Loaded, loading or admitted to load: its charge counts.
    pub loaded: bool,
    /// Only on-demand pools can be unloaded to make room.
    pub on_demand: bool,
    pub pinned: bool,
    /// Requests in flight at the node (waiting for the model included).
    pub busy: u32,
    /// When it last took a request, or loaded.
    pub last_used: Option<Instant>,
    /// When its current engine started.
    pub loaded_since: Option<Instant>,
}

/// What to do for a pool that wants to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Fits,
    /// Unload these pools (in this order), then it fits.
    Unload(Vec<String>),
    /// Pools with work (or loaded less than `min_resident` ago) hold the room; wait for them.
    Wait {
        behind: Vec<String>,
        why: String,
    },
    /// Nothing that may be unloaded would make room.
    Refuse(String),
}

fn mib(b: u64) -> u64 {
    b.div_ceil(1 << 20)
}

/// The decision for `target` (a pool id in `pools`) under `budgets` at `now`.
pub fn decide(
    target: &str,
    pools: &[Resident],
    budgets: &Budgets,
    min_resident: Duration,
    now: Instant,
) -> Decision {
    let Some(me) = pools.iter().find(|p| p.pool_id == target) else {
        return Decision::Refuse(format!("pool {target:?} is not on this node"));
    };
    if me.loaded {
        return Decision::Fits;
    }
    for (device, need) in &me.charge {
        if let Some(budget) = budgets.bytes.get(device) {
            if need > budget {
                return Decision::Refuse(format!(
                    "pool {target} needs {} MiB on {device}, more than its whole budget of {} MiB; raise the budget or give the pool fewer slots or less context",
                    mib(*need),
                    mib(*budget)
                ));
            }
        }
    }
    let loaded: Vec<&Resident> = pools
        .iter()
        .filter(|p| p.loaded && p.pool_id != target)
        .collect();
    // What must be freed on each device, and how many pools must go for `max_loaded`.
    let mut short: BTreeMap<&Device, u64> = BTreeMap::new();
    for (device, need) in &me.charge {
        let Some(budget) = budgets.bytes.get(device) else {
            continue;
        };
        let used: u64 = loaded.iter().map(|p| charge_on(p, device)).sum();
        let over = used.saturating_add(*need).saturating_sub(*budget);
        if over > 0 {
            short.insert(device, over);
        }
    }
    let mut count_over = budgets
        .max_loaded
        .map(|m| (loaded.len() as u64 + 1).saturating_sub(u64::from(m)))
        .unwrap_or(0);
    if short.is_empty() && count_over == 0 {
        return Decision::Fits;
    }
    // Pools that may go, least recently used first; the id breaks ties.
    let mut candidates: Vec<&Resident> = loaded
        .iter()
        .copied()
        .filter(|p| p.on_demand && !p.pinned)
        .filter(|p| count_over > 0 || short.keys().any(|d| charge_on(p, d) > 0))
        .collect();
    candidates.sort_by(|a, b| {
        a.last_used
            .cmp(&b.last_used)
            .then_with(|| a.pool_id.cmp(&b.pool_id))
    });
    let idle = |p: &Resident| {
        p.busy == 0
            && p.loaded_since
                .is_none_or(|t| now.saturating_duration_since(t) >= min_resident)
    };
    // Idle pools first (least recently used first); pools with work only when the idle ones
    // are not enough.
    let (free, held): (Vec<&Resident>, Vec<&Resident>) =
        candidates.into_iter().partition(|p| idle(p));
    let mut unload = Vec::new();
    let mut behind = Vec::new();
    for (p, busy) in free
        .into_iter()
        .map(|p| (p, false))
        .chain(held.into_iter().map(|p| (p, true)))
    {
        if short.is_empty() && count_over == 0 {
            break;
        }
        let helps = count_over > 0 || short.keys().any(|d| charge_on(p, d) > 0);
        if !helps {
            continue;
        }
        if busy {
            behind.push(p.pool_id.clone());
        } else {
            unload.push(p.pool_id.clone());
        }
        count_over = count_over.saturating_sub(1);
        short.retain(|d, over| {
            *over = over.saturating_sub(charge_on(p, d));
            *over > 0
        });
    }
    if !short.is_empty() || count_over > 0 {
        return Decision::Refuse(refusal(target, me, &loaded, budgets));
    }
    if behind.is_empty() {
        Decision::Unload(unload)
    } else {
        let why = format!(
            "waiting for {} to finish its work before it can be unloaded to make room for pool {target}",
            behind.join(", ")
        );
        Decision::Wait { behind, why }
    }
}

fn charge_on(p: &Resident, device: &Device) -> u64 {
    p.charge
        .iter()
        .filter(|(d, _)| d == device)
        .map(|(_, b)| *b)
        .sum()
}

/// Names what holds the memory the target needs, with each holder's charge and why it stays.
fn refusal(target: &str, me: &Resident, loaded: &[&Resident], budgets: &Budgets) -> String {
    let mut holders = Vec::new();
    for p in loaded {
        let why = if !p.on_demand {
            "always loaded"
        } else if p.pinned {
            "pinned"
        } else {
            "on demand"
        };
        let on: Vec<String> = p
            .charge
            .iter()
            .filter(|(d, _)| me.charge.iter().any(|(m, _)| m == d))
            .map(|(d, b)| format!("{} MiB on {d}", mib(*b)))
            .collect();
        if !on.is_empty() || budgets.max_loaded.is_some() {
            holders.push(format!("{} ({why}; {})", p.pool_id, on.join(", ")));
        }
    }
    let need: Vec<String> = me
        .charge
        .iter()
        .map(|(d, b)| {
            let budget = budgets
                .bytes
                .get(d)
                .map(|b| format!(" of a {} MiB budget", mib(*b)))
                .unwrap_or_default();
            format!("{} MiB on {d}{budget}", mib(*b))
        })
        .collect();
    let count = budgets
        .max_loaded
        .map(|m| format!(", with at most {m} pools loaded"))
        .unwrap_or_default();
    format!(
        "pool {target} needs {}{count}, and the memory is held by pools that are not unloaded to make room: {}; unpin one, drain or unload one (llorch pools unload), or raise the node's budget",
        need.join(" and "),
        if holders.is_empty() { "none".to_string() } else { holders.join("; ") }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn pool(id: &str, device: Device, mib: u64, loaded: bool, last_used_ago: u64) -> Resident {
        let now = Instant::now();
        Resident {
            pool_id: id.into(),
            charge: vec![(device, mib * MIB)],
            loaded,
            on_demand: true,
            pinned: false,
            busy: 0,
            last_used: Some(now - Duration::from_secs(last_used_ago)),
            loaded_since: loaded.then(|| now - Duration::from_secs(600)),
        }
    }

    fn budget(device: Device, mib: u64) -> Budgets {
        Budgets {
            bytes: [(device, mib * MIB)].into(),
            max_loaded: None,
        }
    }

    fn decide_now(target: &str, pools: &[Resident], b: &Budgets) -> Decision {
        decide(target, pools, b, Duration::from_secs(5), Instant::now())
    }

    #[test]
    fn a_pool_that_fits_or_is_loaded_needs_nothing() {
        let pools = [
            pool("a", Device::Host, 300, true, 5),
            pool("b", Device::Host, 300, false, 50),
        ];
        assert_eq!(
            decide_now("b", &pools, &budget(Device::Host, 600)),
            Decision::Fits
        );
        assert_eq!(
            decide_now("a", &pools, &budget(Device::Host, 100)),
            Decision::Fits
        );
    }

    #[test]
    fn the_least_recently_used_idle_pool_goes_first_and_only_as_many_as_needed() {
        let pools = [
            pool("a", Device::Host, 300, true, 5),
            pool("b", Device::Host, 300, true, 60),
            pool("c", Device::Host, 300, false, 600),
        ];
        let b = budget(Device::Host, 700);
        assert_eq!(
            decide_now("c", &pools, &b),
            Decision::Unload(vec!["b".into()])
        );
        let b = budget(Device::Host, 400);
        assert_eq!(
            decide_now("c", &pools, &b),
            Decision::Unload(vec!["b".into(), "a".into()])
        );
    }

    #[test]
    fn pinned_and_always_loaded_pools_stay_and_are_named_in_the_refusal() {
        let mut pinned = pool("a", Device::Host, 300, true, 600);
        pinned.pinned = true;
        let mut always = pool("b", Device::Host, 300, true, 600);
        always.on_demand = false;
        let pools = [pinned, always, pool("c", Device::Host, 300, false, 0)];
        match decide_now("c", &pools, &budget(Device::Host, 700)) {
            Decision::Refuse(why) => {
                assert!(why.contains("a (pinned; 300 MiB on host)"), "{why}");
                assert!(why.contains("b (always loaded; 300 MiB on host)"), "{why}");
                assert!(
                    why.contains("needs 300 MiB on host of a 700 MiB budget"),
                    "{why}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pool_with_work_is_waited_for_never_unloaded() {
        let mut busy = pool("a", Device::Host, 300, true, 600);
        busy.busy = 1;
        let pools = [
            busy,
            pool("b", Device::Host, 300, true, 5),
            pool("c", Device::Host, 300, false, 0),
        ];
        // Room for two: b (idle, used more recently) goes rather than the busy a.
        assert_eq!(
            decide_now("c", &pools, &budget(Device::Host, 700)),
            Decision::Unload(vec!["b".into()])
        );
        // Room for one: a must go too, and it has work: wait, unloading nothing yet.
        match decide_now("c", &pools, &budget(Device::Host, 400)) {
            Decision::Wait { behind, .. } => assert_eq!(behind, ["a"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pool_loaded_moments_ago_is_not_unloaded_for_another() {
        let mut fresh = pool("a", Device::Host, 300, true, 0);
        fresh.loaded_since = Some(Instant::now());
        let pools = [fresh, pool("b", Device::Host, 300, false, 0)];
        assert!(matches!(
            decide_now("b", &pools, &budget(Device::Host, 400)),
            Decision::Wait { .. }
        ));
        let later = Instant::now() + Duration::from_secs(6);
        assert_eq!(
            decide(
                "b",
                &pools,
                &budget(Device::Host, 400),
                Duration::from_secs(5),
                later
            ),
            Decision::Unload(vec!["a".into()])
        );
    }

    #[test]
    fn a_model_larger_than_the_budget_is_refused_at_once() {
        let pools = [pool("a", Device::Host, 900, false, 0)];
        match decide_now("a", &pools, &budget(Device::Host, 800)) {
            Decision::Refuse(why) => assert!(
                why.contains("more than its whole budget of 800 MiB"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn max_loaded_unloads_the_least_recently_used_on_any_device() {
        let pools = [
            pool("a", Device::Gpu("0".into()), 300, true, 60),
            pool("b", Device::Host, 300, true, 5),
            pool("c", Device::Host, 300, false, 0),
        ];
        let b = Budgets {
            bytes: BTreeMap::new(),
            max_loaded: Some(2),
        };
        assert_eq!(
            decide_now("c", &pools, &b),
            Decision::Unload(vec!["a".into()])
        );
    }

    /// The GPU path with NVML absent: the budgets stand in for what NVML would say.
    #[test]
    fn gpu_pools_make_room_only_on_the_gpus_they_share() {
        let gpu0 = Device::Gpu("0".into());
        let gpu1 = Device::Gpu("1".into());
        let pools = [
            pool("on0", gpu0.clone(), 10_000, true, 600),
            pool("on1", gpu1.clone(), 10_000, true, 900),
            pool("host", Device::Host, 10_000, true, 1_000),
            pool("want", gpu0.clone(), 8_000, false, 0),
        ];
        let b = Budgets {
            bytes: [
                (gpu0, 12_000 * MIB),
                (gpu1, 12_000 * MIB),
                (Device::Host, 10_000 * MIB),
            ]
            .into(),
            max_loaded: None,
        };
        // on1 and the host pool are older, but only on0 shares GPU 0.
        assert_eq!(
            decide_now("want", &pools, &b),
            Decision::Unload(vec!["on0".into()])
        );
    }
}
