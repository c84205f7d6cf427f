//! pool-managerd's Prometheus metrics (docs/METRICS.md is the reference), the GPU readings
//! from NVML, and the re-export of each ready engine's metrics with a `pool` label.
//!
//! Counters move where things happen (the supervisor, the handoff watcher, the heartbeat
//! loop); the pool gauges are read from the pool table when `/metrics` is scraped.

use std::time::Duration;

use llorch_metrics::prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use llorch_metrics::{counter_vec as counter, gauge_vec as gauge};
use llorch_metrics::{register, LATENCY_BUCKETS};
use llorch_wire::node::{PoolState, PoolStatus};

const POOL_STATES: [PoolState; 6] = PoolState::ALL;

/// Why the supervisor starts a pool's processes again (`llorch_engine_restarts_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    Crashed,
    StartFailed,
    ProvisionFailed,
}

impl Restart {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Crashed => "crashed",
            Self::StartFailed => "start_failed",
            Self::ProvisionFailed => "provision_failed",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pool_slots: IntGaugeVec,
    pool_state: IntGaugeVec,
    engine_starts: IntCounterVec,
    engine_restarts: IntCounterVec,
    load_duration: HistogramVec,
    verification_failures: IntCounterVec,
    handoff_events: IntCounterVec,
    heartbeats_sent: IntCounterVec,
    beats_sent: IntCounterVec,
    swaps: IntCounterVec,
    unload_duration: HistogramVec,
    pool_memory: IntGaugeVec,
    device_memory: IntGaugeVec,
    gpu: Option<Gpu>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("gpu", &self.gpu.is_some())
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// The node's metrics, every series of the given pools started at 0; GPU gauges when the
    /// inventory has NVML.
    pub fn new<'a>(
        pools: impl IntoIterator<Item = &'a str>,
        gpus: &std::sync::Arc<crate::gpu::Inventory>,
    ) -> Self {
        let r = llorch_metrics::registry("pool-managerd");
        let m = Self {
            pool_slots: gauge(
                &r,
                "llorch_pool_slots",
                "The pool's slots by state.",
                &["pool", "state"],
            ),
            pool_state: gauge(
                &r,
                "llorch_pool_state",
                "1 for the pool's current state, 0 for the others.",
                &["pool", "state"],
            ),
            engine_starts: counter(
                &r,
                "llorch_engine_starts_total",
                "Engine start attempts by result.",
                &["pool", "result"],
            ),
            engine_restarts: counter(
                &r,
                "llorch_engine_restarts_total",
                "Restarts of a pool's processes after a failure.",
                &["pool", "reason"],
            ),
            load_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "llorch_model_load_duration_seconds",
                        "From the engine's start to its handoff file.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["pool"],
                ),
            ),
            verification_failures: counter(
                &r,
                "llorch_model_verification_failures_total",
                "The provisioner refused the model file.",
                &["pool"],
            ),
            handoff_events: counter(
                &r,
                "llorch_handoff_events_total",
                "Handoff files seen by the watcher.",
                &["kind"],
            ),
            heartbeats_sent: counter(
                &r,
                "llorch_heartbeats_sent_total",
                "Registrations and heartbeats sent to the control plane.",
                &["outcome"],
            ),
            beats_sent: counter(
                &r,
                "llorch_beats_sent_total",
                "Liveness beats (UDP) sent to the control plane: sent, or failed (the local send failed; the next call is a full heartbeat).",
                &["outcome"],
            ),
            swaps: counter(
                &r,
                "llorch_pool_swaps_total",
                "Unloads of the pool to make room for another (least recently used first).",
                &["pool"],
            ),
            unload_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "llorch_pool_unload_duration_seconds",
                        "From the decision to unload a pool for room to its engine gone.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["pool"],
                ),
            ),
            pool_memory: gauge(
                &r,
                "llorch_pool_memory_charged_bytes",
                "What the pool is charged against the node's budgets now (0 while unloaded).",
                &["pool"],
            ),
            device_memory: gauge(
                &r,
                "llorch_node_memory_bytes",
                "Each budgeted device's budget and what the loaded pools are charged on it.",
                &["device", "kind"],
            ),
            gpu: Gpu::new(&r, gpus),
            registry: r,
        };
        for pool in pools {
            m.add_pool(pool);
        }
        for k in ["written", "removed", "invalid"] {
            m.handoff_events.with_label_values(&[k]);
        }
        for o in ["ok", "refused", "unreachable"] {
            m.heartbeats_sent.with_label_values(&[o]);
        }
        for o in ["sent", "failed"] {
            m.beats_sent.with_label_values(&[o]);
        }
        m
    }

    /// Starts the series of a pool at 0 (a pool of the configuration, or one added on reload).
    pub fn add_pool(&self, pool: &str) {
        for s in ["busy", "free"] {
            self.pool_slots.with_label_values(&[pool, s]);
        }
        for s in POOL_STATES {
            self.pool_state.with_label_values(&[pool, s.as_str()]);
        }
        for r in ["ready", "failed"] {
            self.engine_starts.with_label_values(&[pool, r]);
        }
        for r in [
            Restart::Crashed,
            Restart::StartFailed,
            Restart::ProvisionFailed,
        ] {
            self.engine_restarts.with_label_values(&[pool, r.as_str()]);
        }
        self.load_duration.with_label_values(&[pool]);
        self.verification_failures.with_label_values(&[pool]);
        self.swaps.with_label_values(&[pool]);
        self.unload_duration.with_label_values(&[pool]);
        self.pool_memory.with_label_values(&[pool]);
    }

    /// Pool `pool` was unloaded, in `took`, to make room for another.
    pub fn swapped(&self, pool: &str, took: Duration) {
        self.swaps.with_label_values(&[pool]).inc();
        self.unload_duration
            .with_label_values(&[pool])
            .observe(took.as_secs_f64());
    }

    /// Each budgeted device: (device, budget, charged now), bytes.
    pub fn set_memory(&self, devices: &[(String, u64, u64)]) {
        for (device, budget, charged) in devices {
            let g = |kind: &str, v: u64| {
                self.device_memory
                    .with_label_values(&[device, kind])
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            g("budget", *budget);
            g("charged", *charged);
        }
    }

    /// Drops the gauges of a pool removed on reload (its counters stay: they only grow).
    pub fn remove_pool(&self, pool: &str) {
        for s in ["busy", "free"] {
            let _ = self.pool_slots.remove_label_values(&[pool, s]);
        }
        for s in POOL_STATES {
            let _ = self.pool_state.remove_label_values(&[pool, s.as_str()]);
        }
        let _ = self.pool_memory.remove_label_values(&[pool]);
    }

    /// An engine wrote its handoff file `load` after it was started.
    pub fn engine_ready(&self, pool: &str, load: Duration) {
        self.engine_starts.with_label_values(&[pool, "ready"]).inc();
        self.load_duration
            .with_label_values(&[pool])
            .observe(load.as_secs_f64());
    }

    /// A start attempt failed; the supervisor will try again.
    pub fn start_failed(&self, pool: &str, restart: Restart) {
        if restart != Restart::Crashed {
            self.engine_starts
                .with_label_values(&[pool, "failed"])
                .inc();
        }
        self.engine_restarts
            .with_label_values(&[pool, restart.as_str()])
            .inc();
    }

    pub fn verification_failed(&self, pool: &str) {
        self.verification_failures.with_label_values(&[pool]).inc();
    }

    pub fn handoff(&self, kind: &str) {
        self.handoff_events.with_label_values(&[kind]).inc();
    }

    pub fn heartbeat_sent(&self, outcome: &str) {
        self.heartbeats_sent.with_label_values(&[outcome]).inc();
    }

    pub fn beat_sent(&self, outcome: &str) {
        self.beats_sent.with_label_values(&[outcome]).inc();
    }

    /// Sets the pool gauges from the pools' statuses (called under the pool table's lock, so a
    /// pool removed meanwhile cannot come back).
    pub fn set_pool_gauges(&self, pools: &[PoolStatus]) {
        for p in pools {
            let id = p.pool_id.as_str();
            for s in POOL_STATES {
                self.pool_state
                    .with_label_values(&[id, s.as_str()])
                    .set(i64::from(p.state == s));
            }
            let busy = i64::from(p.slots_busy);
            let free = if p.state == PoolState::Ready {
                i64::from(p.slots_total) - busy
            } else {
                0
            };
            self.pool_slots.with_label_values(&[id, "busy"]).set(busy);
            self.pool_slots
                .with_label_values(&[id, "free"])
                .set(free.max(0));
            let charged = match (p.memory_charged, p.memory_charge_bytes) {
                (true, Some(b)) => i64::try_from(b).unwrap_or(i64::MAX),
                _ => 0,
            };
            self.pool_memory.with_label_values(&[id]).set(charged);
        }
    }

    /// The text exposition of the node's own metrics.
    pub fn encode(&self) -> String {
        if let Some(gpu) = &self.gpu {
            gpu.read();
        }
        llorch_metrics::encode(&self.registry)
    }
}

/// GPU gauges, present only when the node's inventory has NVML.
struct Gpu {
    inventory: std::sync::Arc<crate::gpu::Inventory>,
    memory: IntGaugeVec,
    utilization: llorch_metrics::prometheus::GaugeVec,
}

impl Gpu {
    fn new(r: &Registry, inventory: &std::sync::Arc<crate::gpu::Inventory>) -> Option<Self> {
        if !inventory.has_nvml() {
            return None;
        }
        let gpu = Self {
            inventory: inventory.clone(),
            memory: gauge(
                r,
                "llorch_gpu_memory_bytes",
                "GPU memory by kind (used, total).",
                &["gpu", "kind"],
            ),
            utilization: register(
                r,
                llorch_metrics::prometheus::GaugeVec::new(
                    Opts::new(
                        "llorch_gpu_utilization_ratio",
                        "Fraction of the last sample period the GPU was busy.",
                    ),
                    &["gpu"],
                ),
            ),
        };
        gpu.read();
        Some(gpu)
    }

    fn read(&self) {
        for g in self.inventory.read().devices {
            let label = g.index.to_string();
            self.memory
                .with_label_values(&[&label, "used"])
                .set(g.memory_used_bytes as i64);
            self.memory
                .with_label_values(&[&label, "total"])
                .set(g.memory_total_bytes as i64);
            if let Some(u) = g.utilization_percent {
                self.utilization
                    .with_label_values(&[&label])
                    .set(f64::from(u) / 100.0);
            }
        }
    }
}

/// Fetches each ready engine's `/metrics` over its socket (at most `timeout` each, all at
/// once) and merges them into the node's own exposition with a `pool` label. An engine that
/// does not answer is left out of this scrape.
pub async fn scrape_engines(
    own: String,
    engines: Vec<(String, std::path::PathBuf)>,
    timeout: Duration,
) -> String {
    let mut fetches = tokio::task::JoinSet::new();
    for (pool, socket) in engines {
        fetches.spawn(fetch_engine(pool, socket, timeout));
    }
    let mut scraped: Vec<(String, String)> =
        fetches.join_all().await.into_iter().flatten().collect();
    // Pools in a stable order, whatever order the answers came in.
    scraped.sort();
    llorch_metrics::merge(
        std::iter::once((None, own.as_str()))
            .chain(scraped.iter().map(|(p, t)| (Some(p.as_str()), t.as_str()))),
    )
}

async fn fetch_engine(
    pool: String,
    socket: std::path::PathBuf,
    timeout: Duration,
) -> Option<(String, String)> {
    let client = llorch_client::UnixClient::new(&socket);
    match tokio::time::timeout(timeout, client.get_bytes("/metrics")).await {
        Ok(Ok((status, body))) if status.is_success() => {
            Some((pool, String::from_utf8_lossy(&body).into_owned()))
        }
        Ok(Ok((status, _))) => {
            tracing::debug!(pool_id = %pool, %status, "The engine refused its metrics.");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(pool_id = %pool, error = %e, "Cannot read the engine's metrics.");
            None
        }
        Err(_) => {
            tracing::debug!(pool_id = %pool, "The engine's metrics did not come in time.");
            None
        }
    }
}
