//! The engine's Prometheus metrics (docs/METRICS.md), served at `/metrics` on its socket and
//! re-exported by pool-managerd with a `pool` label. The decode loop updates them once per
//! step (never per token of a client); slot gauges are read when scraped.

use std::time::Duration;

use llorch_metrics::prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use llorch_metrics::register;

pub struct Metrics {
    registry: Registry,
    pub decode_steps: IntCounter,
    pub batch_size: Histogram,
    pub kv_used: Gauge,
    pub tokens_per_second: Gauge,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    /// The prefix cache (`prefix.rs`): prompt tokens not computed, by where they came from.
    pub prefix_hit_tokens: IntCounterVec,
    pub prefix_restored_bytes: IntCounter,
    pub prefix_saved_bytes: IntCounter,
    pub prefix_evictions: IntCounter,
    pub prefix_bytes: IntGauge,
    pub prefix_entries: IntGauge,
    pub prefix_limit_bytes: IntGauge,
    /// Requests that waited for another slot to compute their prefix instead of computing it.
    pub prefix_waits: IntCounter,
    slots: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = llorch_metrics::registry("llorch-engine");
        let counter = |name: &str, help: &str| register(&r, IntCounter::new(name, help));
        let int_gauge = |name: &str, help: &str| register(&r, IntGauge::new(name, help));
        let m = Self {
            decode_steps: counter(
                "llorch_engine_decode_steps_total",
                "llama_decode calls, one per step of the continuous batch.",
            ),
            batch_size: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "llorch_engine_batch_size",
                        "Sequences in each decode step.",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
                ),
            ),
            kv_used: register(
                &r,
                Gauge::new(
                    "llorch_engine_kv_cache_used_ratio",
                    "Tokens held in the slots' KV cache over the context size.",
                ),
            ),
            tokens_per_second: register(
                &r,
                Gauge::new(
                    "llorch_engine_tokens_per_second",
                    "Generated tokens per second of decoding, over the recent steps.",
                ),
            ),
            prompt_tokens: counter(
                "llorch_engine_prompt_tokens_total",
                "Prompt tokens evaluated (cache hits excluded).",
            ),
            generated_tokens: counter("llorch_engine_generated_tokens_total", "Tokens generated."),
            prefix_hit_tokens: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "llorch_prefix_cache_hit_tokens_total",
                        "Prompt tokens reused instead of computed, by source: the request's \
                         own slot, a copy from another slot, or the host cache.",
                    ),
                    &["source"],
                ),
            ),
            prefix_restored_bytes: counter(
                "llorch_prefix_cache_restored_bytes_total",
                "Bytes of prompt state restored from the host cache into a slot.",
            ),
            prefix_saved_bytes: counter(
                "llorch_prefix_cache_saved_bytes_total",
                "Bytes of prompt state saved to the host cache when a slot moved on.",
            ),
            prefix_evictions: counter(
                "llorch_prefix_cache_evictions_total",
                "Host cache entries evicted (least recently used) to stay within the bound.",
            ),
            prefix_bytes: int_gauge(
                "llorch_prefix_cache_bytes",
                "Bytes of prompt state held in the host cache.",
            ),
            prefix_entries: int_gauge(
                "llorch_prefix_cache_entries",
                "Prompt states held in the host cache.",
            ),
            prefix_limit_bytes: int_gauge(
                "llorch_prefix_cache_limit_bytes",
                "The host cache's bound in bytes (0: off).",
            ),
            prefix_waits: counter(
                "llorch_prefix_cache_waits_total",
                "Requests that waited for another slot computing their prefix, then copied it, \
                     instead of computing it beside that slot.",
            ),
            slots: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("llorch_engine_slots", "The engine's slots by state."),
                    &["state"],
                ),
            ),
            registry: r,
        };
        for s in ["busy", "free"] {
            m.slots.with_label_values(&[s]);
        }
        for s in ["slot", "shared", "host"] {
            m.prefix_hit_tokens.with_label_values(&[s]);
        }
        m
    }

    /// The text exposition, with the slot gauges set from (busy, total).
    pub fn encode(&self, slots: Option<(usize, usize)>) -> String {
        if let Some((busy, total)) = slots {
            self.slots.with_label_values(&["busy"]).set(busy as i64);
            self.slots
                .with_label_values(&["free"])
                .set(total.saturating_sub(busy) as i64);
        }
        llorch_metrics::encode(&self.registry)
    }
}

/// Generated tokens over decode time, published every half second of decoding and when the
/// loop goes idle, so the gauge reflects recent work and keeps its value while idle.
#[derive(Debug, Default)]
pub struct Throughput {
    tokens: u64,
    time: Duration,
}

impl Throughput {
    const WINDOW: Duration = Duration::from_millis(500);

    pub fn step(&mut self, metrics: &Metrics, generated: u64, took: Duration) {
        self.tokens += generated;
        self.time += took;
        if self.time >= Self::WINDOW {
            self.flush(metrics);
        }
    }

    pub fn flush(&mut self, metrics: &Metrics) {
        if self.tokens > 0 && !self.time.is_zero() {
            metrics
                .tokens_per_second
                .set(self.tokens as f64 / self.time.as_secs_f64());
        }
        *self = Self::default();
    }
}
