//! Making room for a pool: the decision of [`crate::budget`], carried out one swap at a time.
//!
//! A request for a pool that is not loaded (on `standby`, or marked to yield or be evicted)
//! takes the node's room lock, a fair mutex: requests that need room are served in arrival
//! order, and while one waits no later one can load past it. Under the lock it decides, and:
//! - fits: the pool is admitted (charged from now) and the request goes on to its socket, whose
//!   first connection starts the engine; every request after it finds the pool charged, so
//!   twenty requests for a loading pool start one engine;
//! - unload: each chosen pool is marked `evicting` under the table's lock only if it has no
//!   request in flight (a request admitted meanwhile wins, and the decision is made again),
//!   then unloaded through its supervisor as an operator's `Unload` is;
//! - wait: pools with work hold the room; those loaded at least `min_resident_secs` ago are
//!   marked `yielding`, so requests that arrive for them queue behind this swap instead of
//!   keeping them busy forever; the swap waits for a change of any pool, up to [`SWAP_WAIT`];
//! - refuse: nothing that may be unloaded would make room; the request is answered at once.
//!
//! The guarantee: a pool is never unloaded with a request in flight at the node, a pool that
//! loaded is left loaded for at least `min_resident_secs` (so two models that take turns swap
//! at most once a period), and a request that needs room waits at most [`SWAP_WAIT`] for the
//! work of the pools it must displace.

use std::time::Duration;

use tokio::time::Instant;

use crate::budget::{decide, Decision, Resident};
use crate::state::{Command, Node};

/// The longest a request waits for busy pools to make room before it is refused (below the
/// control plane's first-answer limit for a pool that is not loaded).
pub const SWAP_WAIT: Duration = Duration::from_secs(90);
/// How long a fresh admission counts as work in flight (the step from the room to the socket).
const ADMISSION_HOLD: Duration = Duration::from_secs(2);

/// How many times one request unloads pools for its room before it gives up.
const MAX_UNLOAD_ROUNDS: u32 = 4;

/// Why no room was made.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// Nothing that may be unloaded would make room.
    #[error("{0}")]
    Refused(String),
    /// Pools with work still held the room after [`SWAP_WAIT`].
    #[error("{why} (gave up after {secs} s)", secs = SWAP_WAIT.as_secs())]
    TimedOut { why: String },
    /// An unload did not happen (the pool's supervisor is gone or refused).
    #[error("{0}")]
    Unload(String),
}

/// Makes room for pool `id` and admits it, waiting its turn; `by` names who asked (a request's
/// correlation id, or an operator).
pub async fn make_room(node: &Node, id: &str, by: &str) -> Result<(), RoomError> {
    // The wait for the turn counts in the limit too.
    let deadline = Instant::now() + SWAP_WAIT;
    let Ok(_turn) = tokio::time::timeout_at(deadline, node.room.lock()).await else {
        return Err(RoomError::TimedOut {
            why: format!("other swaps held the node for pool {id}'s turn"),
        });
    };
    let mut changes = node.generation.subscribe();
    // Unloads that left the decision as it was (a pool that took work meanwhile, say):
    // decided again a few times, never spun on.
    let mut unload_rounds = 0;
    let result = loop {
        // Registered before the table is read, so a forward that ends meanwhile is not missed.
        let work_done = node.work_done.notified();
        tokio::pin!(work_done);
        work_done.as_mut().enable();
        changes.borrow_and_update();
        let settings = llorch_os::sync::lock(&node.memory).clone();
        let now = Instant::now();
        let pools = residents(node);
        match decide(id, &pools, &settings.budgets, settings.min_resident, now) {
            Decision::Fits => {
                admit(node, id, now);
                break Ok(());
            }
            Decision::Unload(victims) => {
                unload_rounds += 1;
                if unload_rounds > MAX_UNLOAD_ROUNDS {
                    break Err(RoomError::Unload(format!(
                        "unloading {} did not make room for pool {id}",
                        victims.join(", ")
                    )));
                }
                if let Err(e) = unload_all(node, &victims, &pools, id, by).await {
                    break Err(e);
                }
            }
            Decision::Wait { behind, why } => {
                mark_yielding(node, &behind, settings.min_resident, now);
                tracing::info!(pool_id = %id, waiting_for = ?behind, by = %by, "{why}");
                // Wake when a forward ends or a state changes, or when the youngest pool in
                // the way has been loaded long enough.
                let wake = next_resident_expiry(&pools, &behind, settings.min_resident)
                    .map_or(deadline, |t| t.min(deadline));
                tokio::select! {
                    _ = changes.changed() => {}
                    () = &mut work_done => {}
                    () = tokio::time::sleep_until(wake) => {}
                }
                if Instant::now() >= deadline {
                    break Err(RoomError::TimedOut { why });
                }
            }
            Decision::Refuse(why) => break Err(RoomError::Refused(why)),
        }
    };
    clear_yielding(node);
    if let Err(e) = &result {
        tracing::warn!(pool_id = %id, by = %by, reason = %e, "No room for the pool: the request is refused.");
    }
    result
}

/// Every pool as the decision sees it, from one look at the table.
fn residents(node: &Node) -> Vec<Resident> {
    node.with_table(|pools| {
        pools
            .values()
            .map(|p| Resident {
                pool_id: p.config.id.clone(),
                charge: p.charge.clone(),
                loaded: p.charged(),
                on_demand: p.config.on_demand,
                pinned: p.pinned,
                // A pool admitted moments ago is as good as busy: its request is on its way
                // from the room to the pool's socket, not counted in flight yet.
                busy: p.busy.load(std::sync::atomic::Ordering::SeqCst)
                    + u32::from(p.admitted.is_some_and(|t| t.elapsed() < ADMISSION_HOLD)),
                last_used: p.last_used,
                loaded_since: p.resident_since(),
            })
            .collect()
    })
}

/// Takes back an admission whose request did not go on to the pool's socket (refused, or gone),
/// so the pool is not charged for an engine that will not start.
pub fn withdraw(node: &Node, id: &str) {
    node.with_table(|pools| {
        if let Some(p) = pools.get_mut(id) {
            if p.phase != crate::state::Phase::Running {
                p.admitted = None;
            }
        }
    });
}

/// Charges pool `id` from `now` and marks it used: the next decision counts it loaded.
fn admit(node: &Node, id: &str, now: Instant) {
    node.with_table(|pools| {
        if let Some(p) = pools.get_mut(id) {
            if !p.charged() {
                p.admitted = Some(now);
            }
            p.last_used = Some(now);
        }
    });
}

/// Unloads `victims` in order; one that took a request since the decision is left alone (the
/// caller decides again).
async fn unload_all(
    node: &Node,
    victims: &[String],
    pools: &[Resident],
    for_pool: &str,
    by: &str,
) -> Result<(), RoomError> {
    for victim in victims {
        // Marked under the table's lock only while it has nothing in flight: the node API
        // counts a request in flight under the same lock, and sends none to a marked pool.
        let claimed = node.with_table(|t| match t.get_mut(victim) {
            Some(p) if p.busy.load(std::sync::atomic::Ordering::SeqCst) == 0 => {
                p.evicting = true;
                true
            }
            _ => false,
        });
        if !claimed {
            return Ok(());
        }
        let idle_secs = pools
            .iter()
            .find(|p| &p.pool_id == victim)
            .and_then(|p| p.last_used)
            .map(|t| t.elapsed().as_secs());
        tracing::info!(
            pool_id = %victim,
            for_pool = %for_pool,
            idle_secs,
            by = %by,
            "Unloading the least recently used idle pool to make room for another."
        );
        let started = Instant::now();
        let done = ask_supervisor(
            node,
            victim,
            Command::Unload,
            &format!("room for pool {for_pool}"),
        )
        .await;
        node.with_table(|t| {
            if let Some(p) = t.get_mut(victim) {
                p.evicting = false;
                if done.is_ok() {
                    p.swaps += 1;
                    p.admitted = None;
                }
            }
        });
        match done {
            Ok(()) => node.metrics.swapped(victim, started.elapsed()),
            Err(e) => {
                return Err(RoomError::Unload(format!(
                    "pool {victim} could not be unloaded to make room for pool {for_pool}: {e}"
                )))
            }
        }
    }
    Ok(())
}

/// The longest an unload may take: the engine's stop grace and then some.
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(20);

/// Hands `command` to pool `id`'s supervisor and waits until it was carried out.
async fn ask_supervisor(node: &Node, id: &str, command: Command, by: &str) -> Result<(), String> {
    let sender = node
        .read(id, |p| p.commands.clone())
        .flatten()
        .ok_or_else(|| format!("pool {id} has no supervisor now"))?;
    crate::state::ask(sender, command, by, UNLOAD_TIMEOUT)
        .await
        .map_err(|e| match e {
            crate::state::Unanswered::NoSupervisor => "its supervisor stopped".to_string(),
            crate::state::Unanswered::TimedOut => {
                format!("not done within {} s", UNLOAD_TIMEOUT.as_secs())
            }
            crate::state::Unanswered::Refused(why) => why,
        })
}

/// Marks the pools in the way that have been loaded long enough: new requests for them queue
/// behind the swap.
fn mark_yielding(node: &Node, behind: &[String], min_resident: Duration, now: Instant) {
    node.with_table(|t| {
        for id in behind {
            if let Some(p) = t.get_mut(id) {
                p.yielding = p
                    .resident_since()
                    .is_none_or(|s| now.saturating_duration_since(s) >= min_resident);
            }
        }
    });
}

fn clear_yielding(node: &Node) {
    node.with_table(|t| t.values_mut().for_each(|p| p.yielding = false));
}

/// When the first of `behind` that is loaded too recently to be unloaded stops being so.
fn next_resident_expiry(
    pools: &[Resident],
    behind: &[String],
    min_resident: Duration,
) -> Option<Instant> {
    pools
        .iter()
        .filter(|p| behind.contains(&p.pool_id))
        .filter_map(|p| p.loaded_since.map(|s| s + min_resident))
        .filter(|t| *t > Instant::now())
        .min()
}
