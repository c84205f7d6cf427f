//! The alert rules and their unit tests, checked by Prometheus' own `promtool` (installed by
//! scripts/setup.sh from Debian's `prometheus` package). That the dashboard and the rules use
//! only exported names is checked against live scrapes in `tests/metrics.rs`.

use std::process::Command;

use llorch_tests::repo_root;

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("promtool is missing: install Debian's prometheus package (scripts/setup.sh does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_are_valid() {
    let out = promtool(&["check", "rules", "docs/observability/alerts.yml"]);
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
}

#[test]
fn every_alert_fires_on_a_synthetic_failure_and_stays_quiet_when_healthy() {
    let out = promtool(&["test", "rules", "docs/observability/alerts.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    // Each alert of the rule file has a case that expects it to fire and one that expects
    // silence.
    let rules = std::fs::read_to_string(repo_root().join("docs/observability/alerts.yml")).unwrap();
    let tests =
        std::fs::read_to_string(repo_root().join("docs/observability/alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(alerts.len(), 8, "{alerts:?}");
    for a in alerts {
        let cases: Vec<&str> = tests
            .split("alertname: ")
            .skip(1)
            .filter(|c| c.starts_with(a))
            .collect();
        assert!(
            cases.iter().any(|c| c
                .lines()
                .nth(1)
                .is_some_and(|l| l.contains("exp_alerts: []"))),
            "no quiet case for {a}"
        );
        assert!(
            cases.iter().any(|c| !c
                .lines()
                .nth(1)
                .is_some_and(|l| l.contains("exp_alerts: []"))),
            "no firing case for {a}"
        );
    }
}
