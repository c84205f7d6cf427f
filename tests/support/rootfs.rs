//! The minimal Debian root filesystem the systemd tests boot or run commands in: made once
//! with debootstrap (about a minute, 250 MB) into the cache, never changed afterwards (every
//! container over it is `--volatile=overlay`), and the root privileges that takes.

use std::path::PathBuf;
use std::process::Command;

use crate::cache_dir;

/// Packages of the root filesystem: systemd as init, D-Bus for systemctl and busctl, polkit
/// (pool-managerd manages its engine units unprivileged), curl, and the OpenMP runtime
/// llama.cpp links against.
pub const INCLUDE: &str = "systemd,systemd-sysv,dbus,libpam-systemd,polkitd,libgomp1,curl";

/// How to run a command as root: nothing as root, `sudo -n` with passwordless sudo; None when
/// neither works.
pub fn try_root_prefix() -> Option<Vec<String>> {
    if is_root() {
        return Some(Vec::new());
    }
    let sudo = Command::new("sudo").args(["-n", "true"]).status();
    sudo.is_ok_and(|s| s.success())
        .then(|| vec!["sudo".into(), "-n".into()])
}

/// Whether this process runs as root (its effective uid, from /proc).
pub fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0")
}

/// As [`try_root_prefix`], for a test that cannot do without root.
pub fn root_prefix() -> Vec<String> {
    try_root_prefix().expect(
        "the appliance test boots a container with systemd-nspawn: run it as root or with passwordless sudo",
    )
}

pub fn privileged(prefix: &[String], program: &str) -> Command {
    match prefix.split_first() {
        Some((sudo, rest)) => {
            let mut c = Command::new(sudo);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// The host's release codename and Debian mirror (the rootfs matches the host, so the host's
/// binaries run in it).
pub fn suite_and_mirror() -> (String, String) {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let suite = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_string())
        .expect("VERSION_CODENAME in /etc/os-release");
    let mut sources = String::new();
    for f in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list.d/ubuntu.sources",
        "/etc/apt/sources.list",
    ] {
        sources.push_str(&std::fs::read_to_string(f).unwrap_or_default());
        sources.push('\n');
    }
    let mirror = sources
        .lines()
        .find_map(|l| {
            l.strip_prefix("URIs:")
                .map(|u| u.split_whitespace().next().unwrap_or("").to_string())
                .or_else(|| {
                    let mut w = l.split_whitespace();
                    (w.next() == Some("deb"))
                        .then(|| w.find(|x| x.starts_with("http")).unwrap_or("").to_string())
                })
        })
        .filter(|m| !m.is_empty() && !m.contains("security"))
        .unwrap_or_else(|| "http://deb.debian.org/debian".into());
    (suite, mirror)
}

/// The cached root filesystem, made once with debootstrap (about a minute, 250 MB).
pub fn rootfs(prefix: &[String]) -> PathBuf {
    let (suite, mirror) = suite_and_mirror();
    let dir = cache_dir().join("appliance");
    // One cached tree per suite and package list.
    let tag: u32 = INCLUDE
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let root = dir.join(format!("rootfs-{suite}-{tag:08x}"));
    if root.join("usr/lib/systemd/systemd").exists() || root.join("lib/systemd/systemd").exists() {
        return root;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join(format!("rootfs-{suite}-{tag:08x}.tmp"));
    let _ = privileged(prefix, "rm").arg("-rf").arg(&tmp).status();
    eprintln!(
        "appliance: debootstrap {suite} from {mirror} into {} (once)",
        root.display()
    );
    let out = privileged(prefix, "debootstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), &suite])
        .arg(&tmp)
        .arg(&mirror)
        .output()
        .expect("debootstrap is missing: install it (scripts/setup.sh does)");
    assert!(
        out.status.success(),
        "debootstrap failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &root).unwrap();
    root
}
