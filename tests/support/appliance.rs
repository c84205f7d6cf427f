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

/// Builds the Debian package (`scripts/build-deb.sh --fast`) from this checkout's binaries
/// (the ones the tests run) into `out`.
pub fn build_deb(out: &Path) {
    let bins = bin("orchestratord").parent().unwrap().to_path_buf();
    let built = Command::new(repo_root().join("scripts/build-deb.sh"))
        .arg("--fast")
        .arg("--bins")
        .arg(&bins)
        .arg("--out")
        .arg(out)
        .output()
        .expect("scripts/build-deb.sh");
    assert!(
        built.status.success(),
        "build-deb.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
}

/// What the container gets at `/mnt/llorch` (read-only): the Debian package
/// (`llama-orch.deb`), the node's configuration (`node.toml` with `pools`, the `[[pools]]`
/// tables; the model is at `/mnt/llorch/model.gguf`), the model, the operator's drop-ins, and
/// the install script: `dpkg -i`, then what an operator does after it, then `extra_install`
/// (shell lines).
pub fn stage(dir: &Path, port: u16, pools: &str, extra_install: &str) {
    let s = |p: &str| dir.join(p);
    std::fs::create_dir_all(s("dropins")).unwrap();
    build_deb(&s("llama-orch.deb"));
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
dpkg -i /mnt/llorch/llama-orch.deb
# Nothing of the stack runs or is enabled after the package's install.
for unit in llama-orch.target orchestratord.socket pool-managerd.service; do
    if [ "$(systemctl is-enabled "$unit" 2>/dev/null)" = enabled ] || systemctl is-active --quiet "$unit"; then
        echo "$unit is enabled or running after dpkg -i" >&2; exit 1
    fi
done
id llama-orch-engine >/dev/null
mkdir -p /etc/systemd/system/orchestratord.socket.d /etc/systemd/system/orchestratord.service.d
cp /mnt/llorch/node.toml /etc/llama-orch/node.toml
cp /mnt/llorch/dropins/port.conf /etc/systemd/system/orchestratord.socket.d/port.conf
cp /mnt/llorch/dropins/watchdog.conf /etc/systemd/system/orchestratord.service.d/watchdog.conf
{extra_install}
systemctl daemon-reload
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
