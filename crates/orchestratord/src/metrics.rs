//! orchestratord's Prometheus metrics (docs/METRICS.md is the reference) and the one journal
//! record written per finished task.
//!
//! Counters and histograms move where things happen (admission, dispatch, a task's end);
//! gauges that describe the registry and the queue are read from them when `/metrics` is
//! scraped, so a scrape never changes a value.

use std::collections::HashSet;
use std::sync::RwLock;
use std::time::Duration;

use llorch_metrics::prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};
use llorch_metrics::{counter_vec as counter, gauge_vec as gauge};
use llorch_metrics::{register, INTER_TOKEN_BUCKETS, LATENCY_BUCKETS};
use llorch_wire::node::PoolState;
use llorch_wire::task::Priority;

use crate::outcome::{Api, CancelReason, Decision, Outcome, Rejection};

/// The outcome label of a heartbeat (`llorch_node_heartbeats_total{outcome}`).
pub const HEARTBEAT_OUTCOMES: [&str; 4] = ["ok", "unknown_node", "unauthorized", "invalid"];

/// The outcome label of a liveness beat (`llorch_node_beats_total{outcome}`): `ok` (taken),
/// `report_asked` (unknown session or offline node: the sender was asked for a full report),
/// `rejected` (a tag that does not verify, a replayed counter, or not a beat at all).
pub const BEAT_OUTCOMES: [&str; 3] = ["ok", "report_asked", "rejected"];

/// The pool states of `llorch_pools{state}`, in the order of [`Gauges::pools`] (then `offline`).
pub const POOL_STATES: [PoolState; 6] = PoolState::ALL;

/// The node states of `llorch_nodes{state}`, in the order of [`Gauges::nodes`].
pub const NODE_STATES: [&str; 3] = ["online", "suspect", "offline"];

/// What the gauges of the queue and the registry say: a snapshot read under the core lock,
/// so that this module needs to know neither the queue nor the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Tasks queued: interactive, batch.
    pub queue_depth: [i64; 2],
    /// Nodes by state, in the order of [`NODE_STATES`].
    pub nodes: [i64; 3],
    pub nodes_draining: i64,
    /// Pools of online nodes by state, in the order of [`POOL_STATES`], then the pools of
    /// offline nodes.
    pub pools: [i64; POOL_STATES.len() + 1],
    /// Slots of ready pools on online nodes: leased, and not.
    pub slots_busy: i64,
    pub slots_free: i64,
}

/// The label used for a model no node registered.
pub const UNKNOWN_MODEL: &str = "unknown";

/// The bounded tables whose evictions `llorch_evictions_total{table}` counts: `sessions`
/// (least recently used, when full) and `nodes` (offline for an hour).
pub const EVICTION_TABLES: [&str; 2] = ["sessions", "nodes"];

/// The most `model` label values (models nodes registered) before new ones count as `unknown`
/// (said once in the log): the series set stays bounded whatever nodes report.
pub const MAX_MODEL_LABELS: usize = 256;

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    queue_depth: IntGaugeVec,
    queue_capacity: IntGauge,
    rejections: IntCounterVec,
    queue_wait: Histogram,
    ttft: HistogramVec,
    inter_token: HistogramVec,
    duration: HistogramVec,
    prompt_tokens: IntCounterVec,
    generated_tokens: IntCounterVec,
    in_flight: IntGaugeVec,
    canceled: IntCounterVec,
    placements: IntCounterVec,
    node: NodeMetrics,
    evictions: IntCounterVec,
    /// Set once the model label set is full (to say so once).
    labels_full: std::sync::atomic::AtomicBool,
    /// Models some node registered: the bounded set of `model` label values.
    models: RwLock<HashSet<String>>,
}

/// The node registry's metrics: nodes, pools and slots by state, heartbeats, beats and node
/// life events.
struct NodeMetrics {
    nodes: IntGaugeVec,
    pools: IntGaugeVec,
    slots: IntGaugeVec,
    heartbeats: IntCounterVec,
    beats: IntCounterVec,
    node_events: IntCounterVec,
    nodes_draining: IntGauge,
}

impl NodeMetrics {
    fn new(r: &Registry) -> Self {
        Self {
            nodes: gauge(r, "llorch_nodes", "Registered nodes by state.", &["state"]),
            pools: gauge(
                r,
                "llorch_pools",
                "Pools of all nodes by state.",
                &["state"],
            ),
            slots: gauge(
                r,
                "llorch_slots",
                "Slots of ready pools on online nodes.",
                &["state"],
            ),
            heartbeats: counter(
                r,
                "llorch_node_heartbeats_total",
                "Node heartbeats received by outcome.",
                &["outcome"],
            ),
            beats: counter(
                r,
                "llorch_node_beats_total",
                "Node liveness beats (UDP) received by outcome.",
                &["outcome"],
            ),
            node_events: counter(
                r,
                "llorch_node_events_total",
                "Node life events: joined (registered), lost (went offline), back (reported again after being offline), left (its agent stopped cleanly).",
                &["event"],
            ),
            nodes_draining: register(
                r,
                IntGauge::new(
                    "llorch_nodes_draining",
                    "Nodes an operator drained (nothing new is placed on them).",
                ),
            ),
        }
    }

    /// Starts the series of every known label value at 0.
    fn start_series(&self) {
        for e in ["joined", "lost", "back", "left"] {
            self.node_events.with_label_values(&[e]);
        }
        for s in ["online", "offline"] {
            self.nodes.with_label_values(&[s]);
        }
        for s in POOL_STATES
            .iter()
            .map(|s| s.as_str())
            .chain([PoolState::Offline.as_str()])
        {
            self.pools.with_label_values(&[s]);
        }
        for s in ["busy", "free"] {
            self.slots.with_label_values(&[s]);
        }
        for o in HEARTBEAT_OUTCOMES {
            self.heartbeats.with_label_values(&[o]);
        }
        for o in BEAT_OUTCOMES {
            self.beats.with_label_values(&[o]);
        }
    }
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> HistogramVec {
    register(
        r,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        ),
    )
}

impl Metrics {
    pub fn new(queue_capacity: usize) -> Self {
        let r = llorch_metrics::registry("orchestratord");
        let m = Self {
            requests: counter(
                &r,
                "llorch_requests_total",
                "Generation requests by API, model and outcome.",
                &["api", "model", "outcome"],
            ),
            queue_depth: gauge(
                &r,
                "llorch_queue_depth",
                "Tasks waiting in the admission queue.",
                &["priority"],
            ),
            queue_capacity: register(
                &r,
                IntGauge::new("llorch_queue_capacity", "The admission queue's capacity."),
            ),
            rejections: counter(
                &r,
                "llorch_admission_rejections_total",
                "Tasks refused or dropped by admission.",
                &["reason"],
            ),
            queue_wait: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "llorch_queue_wait_seconds",
                        "From admission to the start of the task's stream.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                ),
            ),
            ttft: histogram(
                &r,
                "llorch_time_to_first_token_seconds",
                "From admission to the first generated token.",
                LATENCY_BUCKETS,
                &["model"],
            ),
            inter_token: histogram(
                &r,
                "llorch_inter_token_latency_seconds",
                "Mean gap between generated tokens, one observation per task.",
                INTER_TOKEN_BUCKETS,
                &["model"],
            ),
            duration: histogram(
                &r,
                "llorch_request_duration_seconds",
                "From admission to the task's final event.",
                LATENCY_BUCKETS,
                &["model"],
            ),
            prompt_tokens: counter(
                &r,
                "llorch_prompt_tokens_total",
                "Prompt tokens of finished tasks.",
                &["model"],
            ),
            generated_tokens: counter(
                &r,
                "llorch_generated_tokens_total",
                "Generated tokens of finished tasks.",
                &["model"],
            ),
            in_flight: gauge(
                &r,
                "llorch_tasks_in_flight",
                "Admitted tasks not finished yet.",
                &["model"],
            ),
            canceled: counter(
                &r,
                "llorch_tasks_canceled_total",
                "Tasks ended by a cancel.",
                &["reason"],
            ),
            placements: counter(
                &r,
                "llorch_placement_decisions_total",
                "Dispatcher decisions about queued tasks.",
                &["outcome"],
            ),
            node: NodeMetrics::new(&r),
            evictions: counter(
                &r,
                "llorch_evictions_total",
                "Entries dropped from a bounded table to make room or because they aged out.",
                &["table"],
            ),
            labels_full: std::sync::atomic::AtomicBool::new(false),
            models: RwLock::new(HashSet::new()),
            registry: r,
        };
        m.queue_capacity.set(queue_capacity as i64);
        m.node.start_series();
        for p in [Priority::Interactive, Priority::Batch] {
            m.queue_depth.with_label_values(&[p.as_str()]);
        }
        for r in Rejection::ALL {
            m.rejections.with_label_values(&[r.as_str()]);
        }
        for c in CancelReason::ALL {
            m.canceled.with_label_values(&[c.as_str()]);
        }
        for d in Decision::ALL {
            m.placements.with_label_values(&[d.as_str()]);
        }
        for t in EVICTION_TABLES {
            m.evictions.with_label_values(&[t]);
        }
        m.add_model(UNKNOWN_MODEL);
        m
    }

    /// Counts an entry dropped from a bounded table (one of [`EVICTION_TABLES`]).
    pub fn evicted(&self, table: &'static str) {
        self.evictions.with_label_values(&[table]).inc();
    }

    /// Starts the series of models a node registered (at 0), once per model.
    pub fn add_models<'a>(&self, models: impl IntoIterator<Item = &'a str>) {
        for model in models {
            if !llorch_os::sync::read(&self.models).contains(model) {
                self.add_model(model);
            }
        }
    }

    fn add_model(&self, model: &str) {
        {
            let mut models = llorch_os::sync::write(&self.models);
            if models.contains(model) {
                return;
            }
            if models.len() >= MAX_MODEL_LABELS {
                // Its requests count under `unknown` (model_label).
                if !self
                    .labels_full
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(model = %model, max = MAX_MODEL_LABELS, "Too many models for metric labels; further models count as \"unknown\".");
                }
                return;
            }
            models.insert(model.to_string());
        }
        for api in Api::ALL {
            for o in Outcome::ALL {
                self.requests
                    .with_label_values(&[api.as_str(), model, o.as_str()]);
            }
        }
        self.ttft.with_label_values(&[model]);
        self.inter_token.with_label_values(&[model]);
        self.duration.with_label_values(&[model]);
        self.prompt_tokens.with_label_values(&[model]);
        self.generated_tokens.with_label_values(&[model]);
        self.in_flight.with_label_values(&[model]);
    }

    /// The `model` label for a model name from a request: itself when a node registered it,
    /// else `unknown` (labels come only from bounded sets).
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        if llorch_os::sync::read(&self.models).contains(model) {
            model
        } else {
            UNKNOWN_MODEL
        }
    }

    pub fn request(&self, api: Api, model: &str, outcome: Outcome) {
        self.count_request(api, self.model_label(model), outcome);
    }

    fn count_request(&self, api: Api, label: &str, outcome: Outcome) {
        self.requests
            .with_label_values(&[api.as_str(), label, outcome.as_str()])
            .inc();
    }

    pub fn rejected(&self, why: Rejection) {
        self.rejections.with_label_values(&[why.as_str()]).inc();
    }

    pub fn admitted(&self, model: &str) {
        self.in_flight
            .with_label_values(&[self.model_label(model)])
            .inc();
    }

    pub fn decision(&self, d: Decision) {
        self.placements.with_label_values(&[d.as_str()]).inc();
    }

    pub fn started(&self, queue_wait: Duration) {
        self.queue_wait.observe(queue_wait.as_secs_f64());
    }

    pub fn heartbeat(&self, outcome: &str) {
        self.node.heartbeats.with_label_values(&[outcome]).inc();
    }

    /// `n` liveness beats with one outcome (one of [`BEAT_OUTCOMES`]).
    pub fn beats(&self, outcome: &str, n: u64) {
        if n > 0 {
            self.node.beats.with_label_values(&[outcome]).inc_by(n);
        }
    }

    /// A node joined, was lost, or came back (`llorch_node_events_total{event}`).
    pub fn node_event(&self, event: &str) {
        self.node.node_events.with_label_values(&[event]).inc();
    }

    /// Records a finished task (called exactly once per admitted task).
    pub fn finished(&self, f: &Finished<'_>) {
        let model = self.model_label(f.model);
        self.in_flight.with_label_values(&[model]).dec();
        self.count_request(f.api, model, f.outcome);
        if let Some(reason) = f.canceled {
            self.canceled.with_label_values(&[reason.as_str()]).inc();
        }
        self.duration
            .with_label_values(&[model])
            .observe(f.duration.as_secs_f64());
        if let Some(t) = f.ttft {
            self.ttft
                .with_label_values(&[model])
                .observe(t.as_secs_f64());
        }
        if let Some(gap) = f.inter_token {
            self.inter_token
                .with_label_values(&[model])
                .observe(gap.as_secs_f64());
        }
        self.prompt_tokens
            .with_label_values(&[model])
            .inc_by(u64::from(f.tokens_in));
        self.generated_tokens
            .with_label_values(&[model])
            .inc_by(u64::from(f.tokens_out));
    }

    /// Sets the gauges that describe the queue and the registry from a snapshot (read under
    /// the core lock, set here without it).
    pub fn set_gauges(&self, g: &Gauges) {
        self.queue_depth
            .with_label_values(&[Priority::Interactive.as_str()])
            .set(g.queue_depth[0]);
        self.queue_depth
            .with_label_values(&[Priority::Batch.as_str()])
            .set(g.queue_depth[1]);
        for (state, n) in NODE_STATES.iter().zip(g.nodes) {
            self.node.nodes.with_label_values(&[state]).set(n);
        }
        self.node.nodes_draining.set(g.nodes_draining);
        for (i, s) in POOL_STATES
            .iter()
            .map(|s| s.as_str())
            .chain([PoolState::Offline.as_str()])
            .enumerate()
        {
            self.node.pools.with_label_values(&[s]).set(g.pools[i]);
        }
        self.node
            .slots
            .with_label_values(&["busy"])
            .set(g.slots_busy);
        self.node
            .slots
            .with_label_values(&["free"])
            .set(g.slots_free);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        llorch_metrics::encode(&self.registry)
    }
}

/// What is recorded about a finished task.
#[derive(Debug)]
pub struct Finished<'a> {
    pub api: Api,
    pub model: &'a str,
    pub outcome: Outcome,
    pub canceled: Option<CancelReason>,
    pub duration: Duration,
    pub ttft: Option<Duration>,
    pub inter_token: Option<Duration>,
    pub tokens_in: u32,
    pub tokens_out: u32,
}

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn model_labels_are_bounded_whatever_nodes_report() {
        let m = Metrics::new(8);
        let models: Vec<String> = (0..MAX_MODEL_LABELS + 50)
            .map(|i| format!("m{i}"))
            .collect();
        m.add_models(models.iter().map(String::as_str));
        assert_eq!(m.model_label("m0"), "m0");
        // `unknown` took one of the places.
        assert_eq!(
            m.model_label(&models[MAX_MODEL_LABELS - 2]),
            models[MAX_MODEL_LABELS - 2]
        );
        assert_eq!(m.model_label(&models[MAX_MODEL_LABELS]), UNKNOWN_MODEL);
        assert_eq!(llorch_os::sync::read(&m.models).len(), MAX_MODEL_LABELS);
    }
}
