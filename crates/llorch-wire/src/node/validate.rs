//! The bounds a control plane holds every registration and heartbeat to before any of it is
//! used ([`limits`]): one error that names the first field at fault.

use super::*;
use crate::id::{valid_id, valid_model_id, MAX_ID_LEN};
use crate::ErrorBody;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ErrorBody {
    ErrorBody::invalid(field, message)
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), ErrorBody> {
    if value.len() > max {
        return Err(invalid(
            field,
            format!(
                "{field} is {} bytes; at most {max} are allowed",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("{field} must not hold control characters"),
        ));
    }
    Ok(())
}

/// Checks what the address can be before the client parses it: `unix:/absolute/path` or
/// `http://host:port`, bounded, without spaces or control characters. (`llorch-client` parses
/// it fully when it makes the client.)
fn check_address(address: &str) -> Result<(), ErrorBody> {
    const FIELD: &str = "address";
    check_text(FIELD, address, limits::MAX_ADDRESS_BYTES)?;
    if address.chars().any(char::is_whitespace) {
        return Err(invalid(
            FIELD,
            format!("address {address:?} must not hold spaces"),
        ));
    }
    let ok = match address.split_once(':') {
        Some(("unix", path)) => path.starts_with('/'),
        Some(("http" | "https", rest)) => rest.starts_with("//") && rest.len() > 2,
        _ => false,
    };
    if !ok {
        return Err(invalid(
            FIELD,
            format!(
                "address {address:?} must be unix:/absolute/path, https://host:port or http://host:port"
            ),
        ));
    }
    Ok(())
}

fn check_pools(pools: &[PoolStatus]) -> Result<(), ErrorBody> {
    if pools.len() > limits::MAX_POOLS {
        return Err(invalid(
            "pools",
            format!(
                "{} pools reported; a node may report at most {}",
                pools.len(),
                limits::MAX_POOLS
            ),
        ));
    }
    for (i, p) in pools.iter().enumerate() {
        let field = |name: &str| format!("pools[{i}].{name}");
        if !valid_id(&p.pool_id) {
            return Err(invalid(
                field("pool_id"),
                format!(
                    "pool id {:?} must be 1 to {MAX_ID_LEN} of A-Z a-z 0-9 _ . -",
                    p.pool_id
                ),
            ));
        }
        if p.state == PoolState::Offline {
            return Err(invalid(
                field("state"),
                "offline is what the control plane says of a node it does not hear; report the pool's own state",
            ));
        }
        if pools[..i].iter().any(|q| q.pool_id == p.pool_id) {
            return Err(invalid(
                field("pool_id"),
                format!("pool id {:?} is reported twice", p.pool_id),
            ));
        }
        if !valid_model_id(&p.model_id) {
            return Err(invalid(
                field("model_id"),
                format!(
                    "model id {:?} must be 1 to 128 of A-Z a-z 0-9 _ . - :",
                    p.model_id
                ),
            ));
        }
        if p.slots_total > limits::MAX_SLOTS {
            return Err(invalid(
                field("slots_total"),
                format!(
                    "slots_total is {}; a pool has at most {}",
                    p.slots_total,
                    limits::MAX_SLOTS
                ),
            ));
        }
        if p.slots_busy > p.slots_total {
            return Err(invalid(
                field("slots_busy"),
                format!(
                    "slots_busy {} is more than slots_total {}",
                    p.slots_busy, p.slots_total
                ),
            ));
        }
        if p.ctx_per_slot > limits::MAX_CTX_PER_SLOT {
            return Err(invalid(
                field("ctx_per_slot"),
                format!(
                    "ctx_per_slot is {}; at most {} is allowed",
                    p.ctx_per_slot,
                    limits::MAX_CTX_PER_SLOT
                ),
            ));
        }
        check_text(&field("device"), &p.device, limits::MAX_TEXT_BYTES)?;
        if let Some(v) = &p.engine_version {
            check_text(&field("engine_version"), v, limits::MAX_TEXT_BYTES)?;
        }
        if let Some(e) = &p.last_error {
            // Log lines carry newlines and tabs; other control characters are refused.
            if e.len() > limits::MAX_LAST_ERROR_BYTES {
                return Err(invalid(
                    field("last_error"),
                    format!(
                        "last_error is {} bytes; at most {} are allowed",
                        e.len(),
                        limits::MAX_LAST_ERROR_BYTES
                    ),
                ));
            }
        }
        if p.load_ms.is_some_and(|ms| ms > limits::MAX_LOAD_MS) {
            return Err(invalid(
                field("load_ms"),
                format!("load_ms is more than a day ({} ms)", limits::MAX_LOAD_MS),
            ));
        }
    }
    Ok(())
}

fn check_staged(staged: &[String]) -> Result<(), ErrorBody> {
    if staged.len() > limits::MAX_STAGED_MODELS {
        return Err(invalid(
            "staged_models",
            format!(
                "{} staged models reported; at most {} are allowed",
                staged.len(),
                limits::MAX_STAGED_MODELS
            ),
        ));
    }
    if let Some((i, m)) = staged.iter().enumerate().find(|(_, m)| !valid_model_id(m)) {
        return Err(invalid(
            format!("staged_models[{i}]"),
            format!("model id {m:?} must be 1 to 128 of A-Z a-z 0-9 _ . - :"),
        ));
    }
    Ok(())
}

fn check_gpus(gpus: &GpuReport) -> Result<(), ErrorBody> {
    for (field, v) in [
        ("gpus.driver_version", &gpus.driver_version),
        ("gpus.cuda_version", &gpus.cuda_version),
    ] {
        if let Some(v) = v {
            check_text(field, v, limits::MAX_TEXT_BYTES)?;
        }
    }
    if gpus.devices.len() > limits::MAX_GPUS {
        return Err(invalid(
            "gpus.devices",
            format!(
                "{} GPUs reported; a node may report at most {}",
                gpus.devices.len(),
                limits::MAX_GPUS
            ),
        ));
    }
    for (i, g) in gpus.devices.iter().enumerate() {
        let field = |name: &str| format!("gpus.devices[{i}].{name}");
        check_text(&field("uuid"), &g.uuid, limits::MAX_TEXT_BYTES)?;
        check_text(&field("name"), &g.name, limits::MAX_TEXT_BYTES)?;
        let seen = &gpus.devices[..i];
        if seen.iter().any(|h| h.index == g.index) {
            return Err(invalid(
                field("index"),
                format!("GPU index {} is reported twice", g.index),
            ));
        }
        if seen.iter().any(|h| h.uuid == g.uuid) {
            return Err(invalid(
                field("uuid"),
                format!("GPU {:?} is reported twice", g.uuid),
            ));
        }
        for (name, v) in [
            ("memory_used_bytes", g.memory_used_bytes),
            ("memory_free_bytes", g.memory_free_bytes),
        ] {
            if v > g.memory_total_bytes {
                return Err(invalid(
                    field(name),
                    format!(
                        "{name} {v} is more than memory_total_bytes {}",
                        g.memory_total_bytes
                    ),
                ));
            }
        }
        if g.utilization_percent.is_some_and(|u| u > 100) {
            return Err(invalid(
                field("utilization_percent"),
                "utilization_percent is more than 100",
            ));
        }
        if g.temperature_celsius
            .is_some_and(|t| t > limits::MAX_GPU_CELSIUS)
        {
            return Err(invalid(
                field("temperature_celsius"),
                format!(
                    "temperature_celsius is more than {}",
                    limits::MAX_GPU_CELSIUS
                ),
            ));
        }
    }
    Ok(())
}

impl Registration {
    /// Checks every field against the bounds in [`limits`]; the error names the first field at
    /// fault. The control plane calls it before anything of the node is used.
    pub fn validate(&self) -> Result<(), ErrorBody> {
        if !valid_id(&self.node_id) {
            return Err(invalid(
                "node_id",
                format!(
                    "node_id {:?} must be 1 to {MAX_ID_LEN} of A-Z a-z 0-9 _ . -",
                    self.node_id
                ),
            ));
        }
        check_address(&self.address)?;
        check_text("version", &self.version, limits::MAX_TEXT_BYTES)?;
        if !limits::HEARTBEAT_SECS.contains(&self.heartbeat_secs) {
            return Err(invalid(
                "heartbeat_secs",
                format!(
                    "heartbeat_secs is {}; use {} to {}",
                    self.heartbeat_secs,
                    limits::HEARTBEAT_SECS.start(),
                    limits::HEARTBEAT_SECS.end()
                ),
            ));
        }
        check_pools(&self.pools)?;
        check_staged(&self.staged_models)?;
        check_gpus(&self.gpus)?;
        check_memory(&self.memory)
    }
}

impl Heartbeat {
    /// Checks every field against the bounds in [`limits`], as [`Registration::validate`] does.
    pub fn validate(&self) -> Result<(), ErrorBody> {
        check_pools(&self.pools)?;
        check_staged(&self.staged_models)?;
        check_gpus(&self.gpus)?;
        check_memory(&self.memory)
    }
}

/// The budgeted devices: the host and at most one entry per GPU, each named `host` or
/// `gpu:<id>` with an id of a node.toml device (an index or a `GPU-…` UUID).
fn check_memory(memory: &[DeviceMemory]) -> Result<(), ErrorBody> {
    if memory.len() > limits::MAX_GPUS + 1 {
        return Err(invalid(
            "memory",
            format!("{} devices; at most {}", memory.len(), limits::MAX_GPUS + 1),
        ));
    }
    for (i, m) in memory.iter().enumerate() {
        let named = m.device == "host"
            || m.device.strip_prefix("gpu:").is_some_and(|g| {
                !g.is_empty()
                    && g.len() <= 64
                    && g.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !named {
            return Err(invalid(
                format!("memory[{i}].device"),
                "is not host or gpu:<index or GPU UUID>",
            ));
        }
        if memory[..i].iter().any(|o| o.device == m.device) {
            return Err(invalid(
                format!("memory[{i}].device"),
                format!("{} is reported twice", m.device),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(id: &str) -> PoolStatus {
        PoolStatus {
            engine_pid: Some(7),
            load_ms: Some(120),
            seq: 3,
            ..PoolStatus::new(id, "smollm2-135m", PoolState::Ready, 4, 2048)
        }
    }

    fn registration() -> Registration {
        Registration {
            node_id: "home".into(),
            address: "http://127.0.0.1:9200".into(),
            version: "0.0.0".into(),
            heartbeat_secs: 5,
            pools: vec![pool("default")],
            staged_models: vec!["smollm2-135m".into()],
            gpus: GpuReport {
                driver_version: Some("550.54.15".into()),
                cuda_version: Some("12.4".into()),
                devices: vec![gpu(0, "GPU-0a"), gpu(1, "GPU-1b")],
            },
            memory: Vec::new(),
        }
    }

    fn gpu(index: u32, uuid: &str) -> GpuStatus {
        GpuStatus {
            index,
            uuid: uuid.into(),
            name: "NVIDIA GeForce RTX 4090".into(),
            memory_total_bytes: 24 << 30,
            memory_used_bytes: 1 << 30,
            memory_free_bytes: 23 << 30,
            utilization_percent: Some(3),
            temperature_celsius: Some(41),
        }
    }

    fn field_of(r: &Registration) -> String {
        r.validate().unwrap_err().field.unwrap()
    }

    #[test]
    fn a_real_registration_passes() {
        registration().validate().unwrap();
        let mut unix = registration();
        unix.address = "unix:/run/llama-orch/pool-managerd.sock".into();
        unix.validate().unwrap();
        Heartbeat {
            pools: unix.pools,
            staged_models: vec![],
            gpus: GpuReport::default(),
            memory: Vec::new(),
        }
        .validate()
        .unwrap();
        // A CPU node sends no `gpus` at all; an older control plane would refuse the key.
        let mut cpu = registration();
        cpu.gpus = GpuReport::default();
        let json = serde_json::to_value(&cpu).unwrap();
        assert!(json.get("gpus").is_none(), "{json}");
    }

    #[test]
    fn a_node_may_not_report_a_pool_offline() {
        let mut r = registration();
        r.pools[0].state = PoolState::Offline;
        assert_eq!(field_of(&r), "pools[0].state");
        let hb = Heartbeat {
            pools: r.pools,
            staged_models: vec![],
            gpus: GpuReport::default(),
            memory: Vec::new(),
        };
        assert_eq!(hb.validate().unwrap_err().field.unwrap(), "pools[0].state");
    }

    #[test]
    fn every_bad_field_is_named() {
        type Change = Box<dyn Fn(&mut Registration)>;
        let cases: Vec<(&str, Change)> = vec![
            ("node_id", Box::new(|r| r.node_id = String::new())),
            (
                "address",
                Box::new(|r| r.address = "http://bad host:1".into()),
            ),
            ("address", Box::new(|r| r.address = "ftp://host:1".into())),
            (
                "address",
                Box::new(|r| r.address = "unix:relative.sock".into()),
            ),
            ("address", Box::new(|r| r.address = "http://".into())),
            (
                "memory[0].device",
                Box::new(|r| {
                    r.memory = vec![DeviceMemory {
                        device: "gpu:../../etc".into(),
                        budget_bytes: 1,
                        charged_bytes: 0,
                    }]
                }),
            ),
            (
                "memory[1].device",
                Box::new(|r| {
                    let host = DeviceMemory {
                        device: "host".into(),
                        budget_bytes: 1,
                        charged_bytes: 0,
                    };
                    r.memory = vec![host.clone(), host];
                }),
            ),
            (
                "memory",
                Box::new(|r| {
                    r.memory = (0..100)
                        .map(|i| DeviceMemory {
                            device: format!("gpu:{i}"),
                            budget_bytes: 1,
                            charged_bytes: 0,
                        })
                        .collect()
                }),
            ),
            (
                "address",
                Box::new(|r| r.address = format!("http://{}", "h".repeat(300))),
            ),
            (
                "version",
                Box::new(|r| {
                    r.version = "1
2"
                    .into()
                }),
            ),
            ("heartbeat_secs", Box::new(|r| r.heartbeat_secs = 0)),
            (
                "gpus.devices[1].index",
                Box::new(|r| r.gpus.devices[1].index = 0),
            ),
            (
                "gpus.devices[1].uuid",
                Box::new(|r| r.gpus.devices[1].uuid = "GPU-0a".into()),
            ),
            (
                "gpus.devices[0].memory_free_bytes",
                Box::new(|r| r.gpus.devices[0].memory_free_bytes = 25 << 30),
            ),
            (
                "gpus.devices[0].utilization_percent",
                Box::new(|r| r.gpus.devices[0].utilization_percent = Some(101)),
            ),
            (
                "gpus.devices[0].temperature_celsius",
                Box::new(|r| r.gpus.devices[0].temperature_celsius = Some(500)),
            ),
            (
                "gpus.devices[0].name",
                Box::new(|r| r.gpus.devices[0].name = "x\u{7}".into()),
            ),
            (
                "gpus.devices",
                Box::new(|r| {
                    r.gpus.devices = (0..65).map(|i| gpu(i, &format!("GPU-{i}"))).collect()
                }),
            ),
            (
                "gpus.driver_version",
                Box::new(|r| r.gpus.driver_version = Some("v".repeat(300))),
            ),
            ("heartbeat_secs", Box::new(|r| r.heartbeat_secs = u64::MAX)),
            (
                "pools[0].pool_id",
                Box::new(|r| r.pools[0].pool_id = String::new()),
            ),
            (
                "pools[1].pool_id",
                Box::new(|r| r.pools.push(pool("default"))),
            ),
            (
                "pools[0].model_id",
                Box::new(|r| r.pools[0].model_id = "a b".into()),
            ),
            (
                "pools[0].slots_total",
                Box::new(|r| r.pools[0].slots_total = u32::MAX),
            ),
            (
                "pools[0].slots_busy",
                Box::new(|r| r.pools[0].slots_busy = 5),
            ),
            (
                "pools[0].ctx_per_slot",
                Box::new(|r| r.pools[0].ctx_per_slot = u32::MAX),
            ),
            (
                "pools[0].device",
                Box::new(|r| r.pools[0].device = "x".repeat(300)),
            ),
            (
                "pools[0].last_error",
                Box::new(|r| r.pools[0].last_error = Some("e".repeat(9000))),
            ),
            (
                "pools[0].load_ms",
                Box::new(|r| r.pools[0].load_ms = Some(u64::MAX)),
            ),
            (
                "pools",
                Box::new(|r| r.pools = (0..10_000).map(|i| pool(&format!("p{i}"))).collect()),
            ),
            (
                "staged_models",
                Box::new(|r| r.staged_models = vec!["m".into(); 2000]),
            ),
            (
                "staged_models[0]",
                Box::new(|r| r.staged_models = vec!["../x".into()]),
            ),
        ];
        for (field, change) in cases {
            let mut r = registration();
            change(&mut r);
            assert_eq!(field_of(&r), field, "{r:?}");
        }
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        let long = "é".repeat(limits::MAX_LAST_ERROR_BYTES);
        let cut = truncate_text(&long, limits::MAX_LAST_ERROR_BYTES);
        assert!(cut.len() <= limits::MAX_LAST_ERROR_BYTES);
        assert!(cut.ends_with("[...]"));
        assert_eq!(truncate_text("short", 10), "short");
    }
}
