//! The node registry: nodes, their pools as last reported, the slots orchestratord leased on
//! each pool, and pools marked suspect after an engine failure.
//!
//! orchestratord is the only client of the engines, so its lease count is the truth about busy
//! slots; the node's report says which pools exist and whether they are ready.
//!
//! - this file: nodes (registration, heartbeats, offline and forgotten nodes), suspect pools,
//!   and the snapshots and views read from them;
//! - [`beats`]: liveness-beat sessions and what a beat does;
//! - [`leases`]: slot leases and service rates;
//! - [`sessions`]: session affinity.

mod beats;
mod leases;
mod sessions;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use llorch_client::HttpClient;
use llorch_wire::node::{GpuReport, PoolState, PoolStatus};
use llorch_wire::task::{NodeView, PoolView};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::ServiceRate;
use crate::placement::Candidate;
pub(crate) use beats::{BeatOutcome, BeatSession};
pub(crate) use sessions::Sessions;

pub(crate) type PoolKey = (String, String);

/// The most nodes the control plane keeps. A registration of a new node id beyond it is
/// refused (503); nodes offline for [`FORGET_OFFLINE_AFTER`] are forgotten to make room.
pub(crate) const MAX_NODES: usize = 1024;
/// How long an offline node is kept (listed offline, its pools unplaced) before it is
/// forgotten. It registers again whenever it comes back.
pub(crate) const FORGET_OFFLINE_AFTER: Duration = Duration::from_secs(3600);

/// The shortest time a pool stays suspect when its node keeps reporting the same engine ready:
/// long enough that a heartbeat sent before the node noticed a crash cannot clear the mark.
pub(crate) const SUSPECT_FOR: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Node {
    pub id: String,
    pub address: String,
    pub version: String,
    pub heartbeat: Duration,
    pub last_seen: Instant,
    pub online: bool,
    pub pools: Vec<PoolStatus>,
    pub staged_models: Vec<String>,
    /// Its GPUs, from its last registration or heartbeat.
    pub gpus: GpuReport,
    /// Its memory budgets and charges, from its last registration or heartbeat.
    pub memory: Vec<llorch_wire::node::DeviceMemory>,
    pub client: HttpClient,
    /// Fired when the node is marked offline: its running tasks end with `NODE_UNAVAILABLE`.
    pub lost: CancellationToken,
    /// Drained by an operator: nothing new is placed on it; its running tasks finish. Kept
    /// across the node's re-registration (the operator's intent outlives a node restart).
    pub draining: bool,
    /// Heartbeat intervals without a heartbeat after which it is offline
    /// (`--offline-after-beats`).
    pub offline_beats: u32,
    /// Its liveness-beat session, granted at registration when the control plane reads beats.
    pub beat: Option<BeatSession>,
}

impl Node {
    pub(crate) fn offline_after(&self) -> Duration {
        self.heartbeat * self.offline_beats
    }

    /// Whether the node missed its last heartbeat (none for 1.5 intervals) while still online:
    /// it is `suspect`, and nothing new is placed on it until it reports again; its running
    /// tasks go on until it is offline.
    pub(crate) fn missed_beat(&self, now: Instant) -> bool {
        self.online && now.duration_since(self.last_seen) > self.heartbeat + self.heartbeat / 2
    }

    /// A pool's state as every view tells it (`/v2/pools`, `llorch status`, D-Bus, metrics):
    /// what the node last reported, or `offline` once the node is.
    pub(crate) fn pool_state(&self, p: &PoolStatus) -> PoolState {
        if self.online {
            p.state
        } else {
            PoolState::Offline
        }
    }

    /// `online`, `suspect` or `offline`.
    pub(crate) fn state(&self, now: Instant) -> &'static str {
        if !self.online {
            "offline"
        } else if self.missed_beat(now) {
            "suspect"
        } else {
            "online"
        }
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    pub(crate) nodes: BTreeMap<String, Node>,
    leases: HashMap<PoolKey, u32>,
    /// Pools whose engine or node failed a request, with the engine pid reported then and when
    /// the mark was set. They are skipped until their node reports the pool not ready, or ready
    /// with another engine, or sends any heartbeat at least [`SUSPECT_FOR`] after the mark (a
    /// failure that did not kill the engine must not keep the pool out for good).
    suspect: HashMap<PoolKey, (Option<u32>, Instant)>,
    rates: HashMap<String, ServiceRate>,
    /// Beat session id to node id, for the nodes that have one.
    beat_sessions: HashMap<u64, String>,
}

impl Registry {
    /// Adds or replaces a node. Leases on its pools are kept: tasks still running there hold
    /// them and return them when they end.
    pub fn register(&mut self, node: Node) {
        // A pool marked suspect keeps that mark only while the node reports the same engine.
        for p in &node.pools {
            let key = (node.id.clone(), p.pool_id.clone());
            if self
                .suspect
                .get(&key)
                .is_some_and(|(pid, _)| p.engine_pid != *pid)
            {
                self.suspect.remove(&key);
            }
        }
        let mut node = node;
        if let Some(old) = self.nodes.get(&node.id) {
            node.draining |= old.draining;
        }
        if let Some(b) = &node.beat {
            self.beat_sessions.insert(b.id, node.id.clone());
        }
        if let Some(old) = self.nodes.insert(node.id.clone(), node) {
            // The node restarted: whatever ran on its old engines is gone.
            old.lost.cancel();
            if let Some(b) = old.beat {
                self.beat_sessions.remove(&b.id);
            }
        }
    }

    /// Applies a heartbeat and returns the pools it replaced (moved, not copied: the caller
    /// may compare them with the new ones); None when the node is unknown (it must register
    /// again).
    pub(crate) fn heartbeat(
        &mut self,
        node_id: &str,
        pools: Vec<PoolStatus>,
        staged: Vec<String>,
        gpus: GpuReport,
    ) -> Option<Vec<PoolStatus>> {
        let node = self.nodes.get_mut(node_id)?;
        if !node.online {
            // An offline node that reports again comes back with a fresh token.
            node.online = true;
            node.lost = CancellationToken::new();
            tracing::info!(node_id = %node_id, "Node is back online.");
        }
        node.last_seen = Instant::now();
        if let Some(b) = node.beat.as_mut() {
            b.report_due = false;
        }
        node.staged_models = staged;
        node.gpus = gpus;
        let mut pools = pools;
        for (i, p) in pools.iter_mut().enumerate() {
            // A report read before an operator's change the control plane already has (a
            // heartbeat on its way while a drain was answered) is older: keep the newer one.
            let known = node
                .pools
                .get(i)
                .filter(|o| o.pool_id == p.pool_id)
                .or_else(|| node.pools.iter().find(|o| o.pool_id == p.pool_id));
            if let Some(known) = known.filter(|k| p.seq != 0 && p.seq < k.seq) {
                *p = known.clone();
            }
        }
        for p in &pools {
            let key = (node_id.to_string(), p.pool_id.clone());
            if let Some((pid, since)) = self.suspect.get(&key) {
                if p.state != PoolState::Ready
                    || p.engine_pid != *pid
                    || since.elapsed() >= SUSPECT_FOR
                {
                    self.suspect.remove(&key);
                }
            }
        }
        Some(std::mem::replace(&mut node.pools, pools))
    }

    /// Whether a registration of `node_id` would exceed [`MAX_NODES`].
    pub(crate) fn full_for(&self, node_id: &str) -> bool {
        !self.nodes.contains_key(node_id) && self.nodes.len() >= MAX_NODES
    }

    /// Forgets nodes offline for longer than [`FORGET_OFFLINE_AFTER`]; returns their ids.
    /// Leases their tasks still hold are returned as those tasks end.
    pub(crate) fn forget_nodes(&mut self, now: Instant) -> Vec<String> {
        let gone: Vec<String> = self
            .nodes
            .values()
            .filter(|n| !n.online && now.duration_since(n.last_seen) > FORGET_OFFLINE_AFTER)
            .map(|n| n.id.clone())
            .collect();
        for id in &gone {
            if let Some(b) = self.nodes.remove(id).and_then(|n| n.beat) {
                self.beat_sessions.remove(&b.id);
            }
            self.suspect.retain(|(node, _), _| node != id);
        }
        gone
    }

    /// Forgets a node that left (its agent stopped cleanly); false when it is unknown. Tasks
    /// still running there end (its `lost` token), and their leases return as they do.
    pub(crate) fn remove(&mut self, node_id: &str) -> bool {
        let Some(node) = self.nodes.remove(node_id) else {
            return false;
        };
        node.lost.cancel();
        if let Some(b) = node.beat {
            self.beat_sessions.remove(&b.id);
        }
        self.suspect.retain(|(n, _), _| n != node_id);
        true
    }

    /// Marks nodes offline that missed their heartbeats; returns their ids.
    pub(crate) fn expire_nodes(&mut self, now: Instant) -> Vec<String> {
        let mut lost = Vec::new();
        for node in self.nodes.values_mut() {
            if node.online && now.duration_since(node.last_seen) > node.offline_after() {
                node.online = false;
                node.lost.cancel();
                lost.push(node.id.clone());
            }
        }
        lost
    }

    pub(crate) fn mark_suspect(&mut self, key: &PoolKey) {
        let pid = self.pool(key).and_then(|p| p.engine_pid);
        self.suspect.insert(key.clone(), (pid, Instant::now()));
    }

    pub(crate) fn pool(&self, key: &PoolKey) -> Option<&PoolStatus> {
        self.nodes
            .get(&key.0)?
            .pools
            .iter()
            .find(|p| p.pool_id == key.1)
    }

    /// Drains (`true`) or resumes a node; false when it is unknown.
    pub(crate) fn set_draining(&mut self, node_id: &str, draining: bool) -> bool {
        match self.nodes.get_mut(node_id) {
            Some(n) => {
                n.draining = draining;
                true
            }
            None => false,
        }
    }

    /// The view of one node.
    pub(crate) fn node_view(&self, node: &Node, now: Instant) -> NodeView {
        NodeView {
            node_id: node.id.clone(),
            address: node.address.clone(),
            // One word everywhere: a suspect node is not called online.
            online: node.state(now) == "online",
            state: node.state(now).to_string(),
            draining: node.draining,
            running: self.running_on(&node.id),
            version: node.version.clone(),
            last_seen_ms: now.duration_since(node.last_seen).as_millis() as u64,
            pools: node.pools.iter().map(|p| p.pool_id.clone()).collect(),
            staged_models: node.staged_models.clone(),
            gpus: node.gpus.clone(),
            memory: node.memory.clone(),
        }
    }

    /// The snapshot placement decides on. A pool of a node that missed a heartbeat counts as
    /// suspect: skipped, but its model stays served (tasks wait rather than fail).
    pub fn candidates(&self) -> Vec<Candidate<'_>> {
        self.candidates_for(|_| true)
    }

    /// The snapshot of the pools whose model `wanted` accepts: what placement needs for the
    /// models actually waiting, a small part of a large cluster's pools.
    pub fn candidates_for(&self, wanted: impl Fn(&str) -> bool) -> Vec<Candidate<'_>> {
        let now = Instant::now();
        let mut out = Vec::new();
        // One key, refilled per pool: the lookups allocate nothing once it has grown.
        let mut key: PoolKey = (String::new(), String::new());
        for node in self.nodes.values() {
            // A draining node's pools, like a silent node's, are skipped by placement.
            let node_suspect = node.missed_beat(now) || node.draining;
            key.0.clear();
            key.0.push_str(&node.id);
            for p in node.pools.iter().filter(|p| wanted(&p.model_id)) {
                key.1.clear();
                key.1.push_str(&p.pool_id);
                out.push(Candidate {
                    pool_id: &p.pool_id,
                    node_id: &node.id,
                    model_id: &p.model_id,
                    state: p.state,
                    node_online: node.online,
                    free_slots: p.slots_total.saturating_sub(self.leased(&key)),
                    slots_total: p.slots_total,
                    suspect: node_suspect || self.suspect.contains_key(&key),
                    load_ms: p.load_ms,
                    on_demand: p.on_demand,
                    vram: p.vram_need_bytes.zip(p.vram_free_bytes),
                });
            }
        }
        out
    }

    /// Model ids served by any registered pool, whatever its state.
    pub(crate) fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .nodes
            .values()
            .flat_map(|n| n.pools.iter().map(|p| p.model_id.clone()))
            .collect();
        m.sort();
        m.dedup();
        m
    }

    /// (serving, ready pools, on-demand pools on standby): requests are served when a pool is
    /// ready or an on-demand pool waits on standby (its first request loads the model).
    pub(crate) fn serving(&self) -> (bool, usize, usize) {
        let candidates = self.candidates();
        let standby = candidates.iter().filter(|c| c.standby()).count();
        let ready = candidates
            .iter()
            .filter(|c| c.node_online && c.state == PoolState::Ready)
            .count();
        (ready + standby > 0, ready, standby)
    }

    pub(crate) fn pool_views(&self) -> Vec<PoolView> {
        let now = Instant::now();
        let mut out = Vec::new();
        for node in self.nodes.values() {
            for p in &node.pools {
                let key = (node.id.clone(), p.pool_id.clone());
                out.push(PoolView {
                    pool_id: p.pool_id.clone(),
                    node_id: node.id.clone(),
                    model_id: p.model_id.clone(),
                    state: node.pool_state(p),
                    node_online: node.state(now) == "online",
                    slots_total: p.slots_total,
                    slots_busy: self.leased(&key),
                    ctx_per_slot: p.ctx_per_slot,
                    device: p.device.clone(),
                    engine_version: p.engine_version.clone(),
                    restarts: p.restarts,
                    last_error: p.last_error.clone(),
                    on_demand: p.on_demand,
                    load_ms: p.load_ms,
                    memory_charge_bytes: p.memory_charge_bytes,
                    memory_charged: p.memory_charged,
                    pinned: p.pinned,
                    swaps: p.swaps,
                });
            }
        }
        out
    }

    pub(crate) fn node_views(&self, now: Instant) -> Vec<NodeView> {
        self.nodes
            .values()
            .map(|n| self.node_view(n, now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn node(id: &str, last_seen: Instant) -> Node {
        Node {
            id: id.into(),
            address: "unix:/nonexistent.sock".into(),
            version: "0".into(),
            heartbeat: Duration::from_secs(1),
            last_seen,
            online: true,
            pools: vec![],
            staged_models: vec![],
            gpus: GpuReport::default(),
            memory: Vec::new(),
            client: HttpClient::new("unix:/nonexistent.sock").unwrap(),
            lost: CancellationToken::new(),
            draining: false,
            offline_beats: 3,
            beat: None,
        }
    }

    #[test]
    fn nodes_offline_for_an_hour_are_forgotten_and_the_table_is_bounded() {
        let start = Instant::now();
        let mut r = Registry::default();
        r.register(node("old", start));
        r.register(node("live", start + FORGET_OFFLINE_AFTER));
        let now = start + FORGET_OFFLINE_AFTER + Duration::from_secs(2);
        // Missed heartbeats: offline, still listed.
        assert_eq!(r.expire_nodes(now), ["old"]);
        assert!(r.forget_nodes(start + Duration::from_secs(10)).is_empty());
        // An hour offline: forgotten.
        assert_eq!(r.forget_nodes(now), ["old"]);
        assert_eq!(r.nodes.keys().collect::<Vec<_>>(), ["live"]);

        let mut r = Registry::default();
        for i in 0..MAX_NODES {
            r.register(node(&format!("n{i}"), start));
        }
        assert!(r.full_for("another"));
        assert!(!r.full_for("n0"), "a known node may always register again");
    }

    /// A heartbeat of node `w` with these pools and nothing else; false when `w` is unknown.
    pub(super) fn beat(r: &mut Registry, pools: Vec<PoolStatus>) -> bool {
        r.heartbeat("w", pools, vec![], GpuReport::default())
            .is_some()
    }

    #[test]
    fn a_nodes_gpus_follow_its_reports_into_its_view() {
        let mut r = Registry::default();
        r.register(node("w", Instant::now()));
        let now = Instant::now();
        assert!(r.node_view(&r.nodes["w"], now).gpus.devices.is_empty());
        let gpus = GpuReport {
            driver_version: Some("550.54.15".into()),
            cuda_version: Some("12.4".into()),
            devices: vec![llorch_wire::node::GpuStatus {
                index: 0,
                uuid: "GPU-0a".into(),
                name: "NVIDIA H200".into(),
                memory_total_bytes: 141 << 30,
                memory_used_bytes: 1 << 30,
                memory_free_bytes: 140 << 30,
                utilization_percent: Some(0),
                temperature_celsius: Some(30),
            }],
        };
        assert!(r.heartbeat("w", vec![], vec![], gpus.clone()).is_some());
        assert_eq!(r.node_view(&r.nodes["w"], now).gpus, gpus);
        // A node that stops reporting them (its driver gone) has none.
        assert!(beat(&mut r, vec![]));
        assert!(r.node_view(&r.nodes["w"], now).gpus.is_empty());
    }

    #[test]
    fn a_node_that_missed_a_beat_is_suspect_and_skipped_then_offline() {
        let start = Instant::now();
        let mut n = node("w", start);
        n.pools = vec![PoolStatus::new("p", "m", PoolState::Ready, 2, 1024)];
        let mut r = Registry::default();
        r.register(n);
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(r.nodes["w"].state(at(1400)), "online");
        assert_eq!(r.nodes["w"].state(at(1600)), "suspect");
        // Placement skips a suspect node's pools, which still serve their model (tasks wait).
        let mut quiet = node("q", Instant::now() - Duration::from_secs(2));
        quiet.pools = vec![PoolStatus::new("p", "m", PoolState::Ready, 2, 1024)];
        r.register(quiet);
        let c = r.candidates();
        let of = |id: &str| c.iter().find(|c| c.node_id == id).unwrap();
        assert!(of("q").suspect && of("q").node_online && !of("q").serving());
        assert!(!of("w").suspect && of("w").serving());
        assert_eq!(r.expire_nodes(at(2900)), ["q"], "w is not offline yet");
        assert_eq!(r.expire_nodes(at(3100)), ["w"]);
        assert_eq!(r.nodes["w"].state(at(3100)), "offline");
        // A heartbeat brings it back at once.
        assert!(beat(&mut r, vec![]));
        assert_eq!(r.nodes["w"].state(Instant::now()), "online");

        // `--offline-after-beats 5`: suspect after 1.5 intervals as before, offline after 5.
        let mut patient = node("p", start);
        patient.offline_beats = 5;
        r.register(patient);
        assert_eq!(r.nodes["p"].state(at(1600)), "suspect");
        assert!(!r.expire_nodes(at(4900)).contains(&"p".to_string()));
        assert!(r.expire_nodes(at(5100)).contains(&"p".to_string()));
    }

    #[test]
    fn a_heartbeat_read_before_an_answered_drain_does_not_undo_it() {
        let mut r = Registry::default();
        let status = |state, draining, seq| PoolStatus {
            draining,
            seq,
            ..PoolStatus::new("p", "m", state, 2, 1024)
        };
        let mut n = node("w", Instant::now());
        n.pools = vec![status(PoolState::Ready, false, 4)];
        r.register(n);
        // The node answered the drain (count 5); a heartbeat it read before (count 4) arrives
        // after that answer was recorded: the drain stays.
        r.nodes.get_mut("w").unwrap().pools[0] = status(PoolState::Draining, true, 5);
        assert!(beat(&mut r, vec![status(PoolState::Ready, false, 4)]));
        assert_eq!(r.nodes["w"].pools[0].state, PoolState::Draining);
        // Later reports (and nodes that do not count) replace it as before.
        assert!(beat(&mut r, vec![status(PoolState::Failed, true, 5)]));
        assert_eq!(r.nodes["w"].pools[0].state, PoolState::Failed);
        assert!(beat(&mut r, vec![status(PoolState::Ready, false, 0)]));
        assert_eq!(r.nodes["w"].pools[0].state, PoolState::Ready);
    }

    #[test]
    fn a_drained_node_takes_nothing_new_and_stays_drained_across_its_restart() {
        let mut r = Registry::default();
        let mut n = node("w", Instant::now());
        n.pools = vec![PoolStatus::new("p", "m", PoolState::Ready, 2, 1024)];
        r.register(n);
        let key = ("w".to_string(), "p".to_string());
        r.lease(&key);
        assert!(r.set_draining("w", true));
        assert!(!r.set_draining("nobody", true));
        assert!(r.candidates()[0].suspect, "placement skips it");
        let v = r.node_view(&r.nodes["w"], Instant::now());
        assert!(v.draining && v.running == 1, "{v:?}");
        // It registers again (a restart of pool-managerd): still drained.
        let mut again = node("w", Instant::now());
        again.pools = vec![PoolStatus::new("p", "m", PoolState::Ready, 2, 1024)];
        r.register(again);
        assert!(r.nodes["w"].draining);
        r.release(&key, "m", None);
        assert_eq!(r.running_on("w"), 0);
        assert!(r.set_draining("w", false));
        assert!(!r.candidates()[0].suspect);
    }
}
