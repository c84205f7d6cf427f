//! Prometheus plumbing shared by the daemons. Each daemon owns its metrics (in its own
//! `metrics` module) and registers them in the [`Registry`] made here, which already holds
//! `llorch_build_info{version,role}` and the process collector. docs/METRICS.md is the
//! reference of every name.

use prometheus::{Encoder, Opts, Registry, TextEncoder};

pub use prometheus;

/// Buckets for request latencies: 5 ms to 5 minutes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Buckets for the gap between two tokens: 1 ms to 2.5 s.
pub const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A registry with `llorch_build_info{version,role} 1` and the process collector.
pub fn registry(role: &str) -> Registry {
    let registry = Registry::new();
    let info = prometheus::IntGauge::with_opts(
        Opts::new("llorch_build_info", "Build information; always 1.")
            .const_label("version", env!("CARGO_PKG_VERSION"))
            .const_label("role", role),
    )
    .expect("valid metric");
    info.set(1);
    registry.register(Box::new(info)).expect("registered once");
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("registered once");
    registry
}

/// Registers a metric made by `make`; panics on a programming error (bad name, duplicate).
pub fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let m = metric.expect("valid metric");
    registry
        .register(Box::new(m.clone()))
        .expect("registered once");
    m
}

/// A counter family with labels, registered.
pub fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::IntCounterVec {
    register(
        registry,
        prometheus::IntCounterVec::new(Opts::new(name, help), labels),
    )
}

/// An integer gauge family with labels, registered.
pub fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::IntGaugeVec {
    register(
        registry,
        prometheus::IntGaugeVec::new(Opts::new(name, help), labels),
    )
}

/// The registry's metrics in the text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding does not fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}

#[derive(Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// Merges several scrapes into one valid exposition: each metric family appears once, with its
/// `# HELP`/`# TYPE` lines from the first scrape that has it and the samples of all of them.
/// Samples of a scrape given with `Some(pool)` get a `pool="<pool>"` label (pool-managerd
/// re-exporting its engines).
pub fn merge<'a>(scrapes: impl IntoIterator<Item = (Option<&'a str>, &'a str)>) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: std::collections::HashMap<String, Family> = Default::default();
    for (pool, text) in scrapes {
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                current = name.to_string();
                let f = family(&mut families, &mut order, name);
                f.help.get_or_insert_with(|| help.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
                current = name.to_string();
                let f = family(&mut families, &mut order, name);
                f.kind.get_or_insert_with(|| kind.to_string());
            } else if line.starts_with('#') || line.trim().is_empty() {
                continue;
            } else {
                let name_end = line.find(['{', ' ']).unwrap_or(line.len());
                let name = &line[..name_end];
                // A sample belongs to the family announced before it (histogram samples carry
                // suffixes); an unannounced one is its own family.
                let key = if !current.is_empty() && name.starts_with(current.as_str()) {
                    current.clone()
                } else {
                    name.to_string()
                };
                let sample = match pool {
                    Some(p) => with_label(line, name_end, "pool", p),
                    None => line.to_string(),
                };
                family(&mut families, &mut order, &key).samples.push(sample);
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let f = &families[&name];
        if let Some(h) = &f.help {
            out.push_str(&format!("# HELP {name} {h}\n"));
        }
        if let Some(k) = &f.kind {
            out.push_str(&format!("# TYPE {name} {k}\n"));
        }
        for s in &f.samples {
            out.push_str(s);
            out.push('\n');
        }
    }
    out
}

fn family<'f>(
    families: &'f mut std::collections::HashMap<String, Family>,
    order: &mut Vec<String>,
    name: &str,
) -> &'f mut Family {
    if !families.contains_key(name) {
        order.push(name.to_string());
    }
    families.entry(name.to_string()).or_default()
}

fn with_label(line: &str, name_end: usize, label: &str, value: &str) -> String {
    let value = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    let (name, rest) = line.split_at(name_end);
    match rest.strip_prefix('{') {
        Some(r) if r.starts_with('}') => format!("{name}{{{label}=\"{value}\"{r}"),
        Some(r) => format!("{name}{{{label}=\"{value}\",{r}"),
        None => format!("{name}{{{label}=\"{value}\"}}{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_and_process_metrics_are_there() {
        let text = encode(&registry("tester"));
        assert!(text.contains("# TYPE llorch_build_info gauge"), "{text}");
        assert!(
            text.contains(&format!(
                "llorch_build_info{{role=\"tester\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn merging_keeps_one_family_header_and_labels_each_pool() {
        let node = "# HELP llorch_build_info Build.\n# TYPE llorch_build_info gauge\nllorch_build_info{role=\"pool-managerd\",version=\"0\"} 1\n# HELP up Up.\n# TYPE up gauge\nup 1\n";
        let engine = "# HELP llorch_build_info Build.\n# TYPE llorch_build_info gauge\nllorch_build_info{role=\"llorch-engine\",version=\"0\"} 1\n# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 3\nh_sum 4.5\nh_count 3\n";
        let merged = merge([(None, node), (Some("a"), engine), (Some("b\"c"), engine)]);
        assert_eq!(merged.matches("# TYPE llorch_build_info gauge").count(), 1);
        assert_eq!(merged.matches("# TYPE h histogram").count(), 1);
        assert!(merged.contains(
            "llorch_build_info{role=\"pool-managerd\",version=\"0\"} 1\nllorch_build_info{pool=\"a\",role=\"llorch-engine\",version=\"0\"} 1\n"
        ), "{merged}");
        assert!(merged.contains("h_sum{pool=\"a\"} 4.5\n"), "{merged}");
        assert!(merged.contains("h_count{pool=\"b\\\"c\"} 3\n"), "{merged}");
        assert!(
            merged.contains("h_bucket{pool=\"a\",le=\"+Inf\"} 3\n"),
            "{merged}"
        );
        assert!(merged.contains("# TYPE up gauge\nup 1\n"), "{merged}");
    }
}
