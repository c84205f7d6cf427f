//! Local control over D-Bus (docs/DBUS.md): `llorch pools drain|resume` use orchestratord's
//! `org.llamaorch.Orchestrator1` when it is on the bus (the bus and polkit decide who may; no
//! API key needed), and fall back to HTTP when it is not; `llorch status --bus` reads its
//! properties.

use std::io::Write;

use anyhow::Context;
use llorch_bus::Mode;

#[zbus::proxy(
    interface = "org.llamaorch.Orchestrator1",
    default_service = "org.llamaorch.Orchestrator1",
    default_path = "/org/llamaorch/Orchestrator1"
)]
pub trait Orchestrator {
    fn drain_pool(&self, node: &str, pool: &str) -> zbus::Result<()>;
    fn resume_pool(&self, node: &str, pool: &str) -> zbus::Result<()>;
    fn load_pool(&self, node: &str, pool: &str) -> zbus::Result<()>;
    fn unload_pool(&self, node: &str, pool: &str) -> zbus::Result<()>;
    fn pin_pool(&self, node: &str, pool: &str, pinned: bool) -> zbus::Result<()>;
    #[zbus(property)]
    #[allow(clippy::type_complexity)]
    fn nodes(&self) -> zbus::Result<Vec<(String, String, String, u64, Vec<String>, bool)>>;
    #[zbus(property)]
    #[allow(clippy::type_complexity)]
    fn pools(&self) -> zbus::Result<Vec<(String, String, String, String, u32, u32, bool)>>;
    #[zbus(property)]
    fn queue_depth(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn queue_capacity(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn running_tasks(&self) -> zbus::Result<u32>;
}

/// orchestratord on the bus `mode` names, when it is there (`None`: use HTTP). `off`: never.
pub async fn orchestrator(mode: Mode) -> Option<OrchestratorProxy<'static>> {
    let conn = match mode {
        Mode::Off => return None,
        Mode::Auto | Mode::System => zbus::Connection::system().await.ok()?,
        Mode::Session => zbus::Connection::session().await.ok()?,
    };
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.ok()?;
    let name = zbus::names::BusName::try_from(llorch_bus::ORCHESTRATOR).ok()?;
    if !dbus.name_has_owner(name).await.ok()? {
        return None;
    }
    OrchestratorProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .ok()
}

/// What a refusal on the bus says, for the operator.
fn describe(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, Some(msg), _) => format!("{msg} ({name})"),
        other => other.to_string(),
    }
}

/// `llorch pools drain|resume` over D-Bus. `Ok(false)`: the bus refused the caller (not
/// authorized), so the caller may try HTTP with an API key instead.
pub async fn pool_action(
    proxy: &OrchestratorProxy<'_>,
    action: &str,
    pool: &str,
    node: Option<&str>,
) -> anyhow::Result<bool> {
    let node = node.unwrap_or("");
    let result = match action {
        "drain" => proxy.drain_pool(node, pool).await,
        "load" => proxy.load_pool(node, pool).await,
        "unload" => proxy.unload_pool(node, pool).await,
        "pin" => proxy.pin_pool(node, pool, true).await,
        "unpin" => proxy.pin_pool(node, pool, false).await,
        _ => proxy.resume_pool(node, pool).await,
    };
    match result {
        Ok(()) => {
            println!("pool {pool}: {action} requested over D-Bus");
            Ok(true)
        }
        Err(zbus::Error::MethodError(name, msg, _))
            if name.as_str() == "org.freedesktop.DBus.Error.AccessDenied" =>
        {
            eprintln!(
                "llorch: D-Bus refused {action} ({}); trying HTTP",
                msg.unwrap_or_default()
            );
            Ok(false)
        }
        Err(e) => anyhow::bail!("{}", describe(&e)),
    }
}

/// `llorch status --bus`: nodes, pools and the queue from orchestratord's properties.
pub async fn status(proxy: &OrchestratorProxy<'_>, out: &mut dyn Write) -> anyhow::Result<()> {
    let nodes = proxy.nodes().await.context("read Nodes over D-Bus")?;
    let pools = proxy.pools().await.context("read Pools over D-Bus")?;
    let mut rows = vec![crate::remote::node_header()];
    for (id, state, address, age_ms, _, draining) in &nodes {
        rows.push(crate::remote::node_row(
            id, state, *draining, *age_ms, address,
        ));
    }
    crate::remote::write_table(out, &rows)?;
    writeln!(out)?;
    let mut rows = vec![vec![
        "POOL".to_string(),
        "NODE".into(),
        "MODEL".into(),
        "STATE".into(),
        "SLOTS BUSY/TOTAL".into(),
    ]];
    for (node, pool, model, state, free, total, on_demand) in &pools {
        rows.push(vec![
            pool.clone(),
            node.clone(),
            model.clone(),
            crate::remote::pool_state(state, *on_demand),
            format!("{}/{total}", total.saturating_sub(*free)),
        ]);
    }
    crate::remote::write_table(out, &rows)?;
    writeln!(
        out,
        "\nqueue: {} waiting of {}, {} running (read over D-Bus)",
        proxy.queue_depth().await?,
        proxy.queue_capacity().await?,
        proxy.running_tasks().await?
    )?;
    Ok(())
}
