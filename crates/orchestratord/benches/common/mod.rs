//! What the benches share, all from the test support crate (`llorch-tests`): settings from
//! the environment, order statistics and the machine's load (`bench`), binaries, the model and
//! free ports.
#![allow(dead_code, unused_imports)] // Each bench uses its own subset.

use std::process::Command;

pub mod stack;

pub use llorch_tests::bench::{env_or, loadavg, median, quantile};
pub use llorch_tests::stack::{free_port, terminate};
pub use llorch_tests::{bin, model_path};

/// The kernel's clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of a process (`self` or a pid), all threads.
pub fn cpu_secs(pid: &str, tck: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: field 3 (state) is f[0]; utime is field 14, stime field 15.
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / tck
}

/// A `kB` line of /proc/<pid>/status, in MB (10^6 bytes).
pub fn status_mb(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb * 1024.0 / 1e6)
        .unwrap_or(f64::NAN)
}
