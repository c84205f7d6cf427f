//! The appliance as the tests boot it (tests/appliance.rs, tests/faults.rs): what a package
//! and an operator would install into a systemd-nspawn container, and `curl` from the host.

use std::path::Path;
use std::process::Command;

use crate::{bin, model_path, repo_root};

/// The default model's sha256.
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The `default` pool both appliance tests run: the default model, 2 slots of 1024 tokens.
pub fn default_pool() -> String {
    format!(
        r#"
[[pools]]
id = "default"
slots = 2
ctx = 1024
threads = 2

[pools.model]
id = "{}"
source = "/mnt/llorch/model.gguf"
sha256 = "{MODEL_SHA256}"
"#,
        crate::stack::MODEL_ID
    )
}

/// What the container gets at `/mnt/llorch` (read-only): binaries, units, configuration
/// (`node.toml` with `pools`, the `[[pools]]` tables; the model is at `/mnt/llorch/model.gguf`),
/// the model, and the install script a package's post-install step would run, followed by
/// `extra_install` (shell lines).
pub fn stage(dir: &Path, port: u16, pools: &str, extra_install: &str) {
    let s = |p: &str| dir.join(p);
    for d in ["bin", "units", "dropins", "generators"] {
        std::fs::create_dir_all(s(d)).unwrap();
    }
    for b in [
        "orchestratord",
        "pool-managerd",
        "llorch-engine",
        "engine-provisioner",
    ] {
        std::fs::copy(bin(b), s("bin").join(b)).unwrap();
    }
    std::fs::copy(
        bin("llama-orch-gpu-generator"),
        s("generators").join("llama-orch-gpu-generator"),
    )
    .unwrap();
    let units = repo_root().join("systemd");
    for e in std::fs::read_dir(&units).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), s("units").join(e.file_name())).unwrap();
    }
    if std::fs::hard_link(model_path(), s("model.gguf")).is_err() {
        std::fs::copy(model_path(), s("model.gguf")).unwrap();
    }
    std::fs::write(
        s("node.toml"),
        format!(
            r#"[node]
id = "appliance"
control_plane = "http://127.0.0.1:{port}"
listen = "unix:/run/llama-orch/pool-managerd.sock"
cache_dir = "/var/cache/llama-orch/models"
runtime_dir = "/run/llama-orch"
heartbeat_secs = 1
{pools}"#
        ),
    )
    .unwrap();
    // The test's own settings, as drop-ins an operator would write: a free port, and a short
    // watchdog so the stuck-daemon step takes seconds.
    std::fs::write(
        s("dropins/port.conf"),
        format!("[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n"),
    )
    .unwrap();
    std::fs::write(
        s("dropins/watchdog.conf"),
        "[Service]\nWatchdogSec=3\nTimeoutAbortSec=2\n",
    )
    .unwrap();
    std::fs::write(
        s("install.sh"),
        format!(
            r#"#!/bin/sh
set -e
install -m 0755 /mnt/llorch/bin/* /usr/bin/
install -D -m 0755 -t /usr/lib/systemd/system-generators /mnt/llorch/generators/llama-orch-gpu-generator
cp /mnt/llorch/units/*.service /mnt/llorch/units/*.socket /mnt/llorch/units/*.target /etc/systemd/system/
mkdir -p /etc/sysusers.d /etc/tmpfiles.d /etc/llama-orch /etc/systemd/system/orchestratord.socket.d /etc/systemd/system/orchestratord.service.d /etc/polkit-1/rules.d /usr/share/dbus-1/system.d /usr/share/polkit-1/actions
cp /mnt/llorch/units/llama-orch.polkit.rules /etc/polkit-1/rules.d/50-llama-orch.rules
cp /mnt/llorch/units/org.llamaorch.conf /usr/share/dbus-1/system.d/org.llamaorch.conf
cp /mnt/llorch/units/org.llamaorch.policy /usr/share/polkit-1/actions/org.llamaorch.policy
cp /mnt/llorch/units/llama-orch.sysusers.conf /etc/sysusers.d/llama-orch.conf
cp /mnt/llorch/units/llama-orch.tmpfiles.conf /etc/tmpfiles.d/llama-orch.conf
cp /mnt/llorch/node.toml /etc/llama-orch/node.toml
cp /mnt/llorch/dropins/port.conf /etc/systemd/system/orchestratord.socket.d/port.conf
cp /mnt/llorch/dropins/watchdog.conf /etc/systemd/system/orchestratord.service.d/watchdog.conf
systemd-sysusers
systemd-tmpfiles --create
{extra_install}
systemctl daemon-reload
systemctl reload dbus
"#
        ),
    )
    .unwrap();
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir)
        .status()
        .unwrap();
}

/// Boots the cached root filesystem with `dir` (staged by [`stage`]) at `/mnt/llorch` and
/// runs its install script: the appliance, installed, units not started yet.
pub fn boot(dir: &Path, name: &str) -> crate::container::Container {
    let prefix = crate::rootfs::root_prefix();
    let root = crate::rootfs::rootfs(&prefix);
    let c =
        crate::container::Container::boot(prefix, &root, dir, dir.join("nspawn.log"), name, &[]);
    c.ok(&["sh", "/mnt/llorch/install.sh"]);
    c
}

/// `curl` from the host: (HTTP status, body); status 0 when the connection failed.
pub fn curl(port: u16, args: &[&str], path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "60", "-w", "\n%{http_code}"])
        .args(args)
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}
