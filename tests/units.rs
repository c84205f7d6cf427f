//! The unit files in `systemd/`: `systemd-analyze verify` has nothing to say about any of them,
//! and each daemon's sandbox stays within its exposure budget
//! (`systemd-analyze security --offline=yes`).

use std::path::PathBuf;
use std::process::Command;

use llorch_tests::bin;

fn units_dir() -> PathBuf {
    llorch_tests::repo_root().join("systemd")
}

fn unit_files() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = std::fs::read_dir(units_dir())
        .expect("systemd/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("service" | "socket" | "target")
            )
        })
        .collect();
    units.sort();
    units
}

fn analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze is installed (scripts/setup.sh installs systemd)")
}

#[test]
fn every_unit_verifies_without_a_word() {
    // verify checks that ExecStart= binaries exist: point them at the ones just built.
    let dir = tempfile::tempdir().unwrap();
    let built = bin("orchestratord").parent().unwrap().to_path_buf();
    let mut copies = Vec::new();
    for unit in unit_files() {
        let text = std::fs::read_to_string(&unit).unwrap();
        let copy = dir.path().join(unit.file_name().unwrap());
        std::fs::write(
            &copy,
            text.replace("/usr/bin/", &format!("{}/", built.display())),
        )
        .unwrap();
        copies.push(copy.display().to_string());
    }
    assert!(copies.len() >= 7, "{copies:?}");
    let mut args = vec!["verify"];
    args.extend(copies.iter().map(String::as_str));
    let out = analyze(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values; anything it prints is a finding.
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn each_daemon_stays_within_its_exposure_budget() {
    let budgets = [
        ("orchestratord.service", 1.1),
        ("pool-managerd.service", 1.1),
        ("engine-provisioner@.service", 1.1),
        ("llorch-engine@.service", 0.4),
        ("llama-orch-node-token.service", 0.9),
    ];
    for (unit, budget) in budgets {
        let path = units_dir().join(unit);
        let out = analyze(&["security", "--offline=yes", path.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("{unit}: no exposure level in {text}"));
        let score: f64 = line
            .split(": ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: cannot read {line:?}"));
        assert!(score <= budget, "{unit}: exposure {score} above {budget}");
        eprintln!("{unit}: exposure {score} (budget {budget})");
    }
}
