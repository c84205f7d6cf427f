//! What a reload (SIGHUP or D-Bus `Reload`) cannot apply: the `[node]` keys that changed,
//! which take effect only when pool-managerd restarts. Pools are compared and applied by
//! [`crate::pools`].

use super::NodeConfig;

/// The `[node]` keys that differ between two configurations (they apply only at a restart).
pub fn node_changes(old: &NodeConfig, new: &NodeConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut differ = |key: &'static str, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    differ("node.id", old.id != new.id);
    differ("node.control_plane", old.control_plane != new.control_plane);
    differ("node.listen", old.listen != new.listen);
    differ("node.advertise", old.advertise != new.advertise);
    differ("node.cache_dir", old.cache_dir != new.cache_dir);
    differ("node.runtime_dir", old.runtime_dir != new.runtime_dir);
    differ(
        "node.heartbeat_secs",
        old.heartbeat_secs != new.heartbeat_secs,
    );
    differ("node.engine_bin", old.engine_bin != new.engine_bin);
    differ(
        "node.provisioner_bin",
        old.provisioner_bin != new.provisioner_bin,
    );
    differ("node.token_file", old.token_file != new.token_file);
    differ("node.tls_cert", old.tls_cert != new.tls_cert);
    differ("node.tls_key", old.tls_key != new.tls_key);
    differ(
        "node.control_plane_ca",
        old.control_plane_ca != new.control_plane_ca,
    );
    differ(
        "node.allow_plaintext",
        old.allow_plaintext != new.allow_plaintext,
    );
    differ(
        "node.metrics_listen",
        old.metrics_listen != new.metrics_listen,
    );
    differ("node.launcher", old.launcher != new.launcher);
    differ(
        "node.memory_budget_mib",
        old.memory_budget_mib != new.memory_budget_mib,
    );
    differ(
        "node.gpu_memory_budget_mib",
        old.gpu_memory_budget_mib != new.gpu_memory_budget_mib,
    );
    differ("node.max_loaded", old.max_loaded != new.max_loaded);
    differ(
        "node.min_resident_secs",
        old.min_resident_secs != new.min_resident_secs,
    );
    keys
}
