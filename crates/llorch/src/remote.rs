//! Client commands that talk HTTP to orchestratord: `generate`, `chat`, `status`, `pools`.
//! The URL comes from `--url` or `LLORCH_URL`, the key from `LLORCH_API_KEY`.

use std::io::{BufRead, Write};

use anyhow::{bail, Context};
use llorch_client::HttpClient;
use llorch_wire::engine::{ChatMessage, TokenEvent};
use llorch_wire::node::PoolStatus;
use llorch_wire::task::{NodeView, PoolsAnswer, TaskAccepted, TaskEnd, TaskRequest};
use llorch_wire::ErrorBody;
use serde_json::Value;

pub fn client(
    url: &str,
    ca: Option<&std::path::Path>,
    key: Option<String>,
) -> anyhow::Result<HttpClient> {
    let roots = match ca {
        Some(ca) => llorch_client::TlsRoots::from_pem_file(ca).context("--ca")?,
        None => llorch_client::TlsRoots::system(),
    };
    Ok(HttpClient::with_roots(url, &roots)
        .with_context(|| format!("--url {url}"))?
        .with_token(key))
}

/// A client error in the words of what went wrong: orchestratord could not be reached, or it
/// answered and refused (a missing or non-admin key is not an unreachable server).
pub fn explain(client: &HttpClient, e: llorch_client::ClientError) -> anyhow::Error {
    use hyper::StatusCode;
    let at = client.address();
    let context = match llorch_client::status_of(&e) {
        Some(status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)) => format!(
            "orchestratord at {at} refused the request ({status}): give an admin API key in LLORCH_API_KEY (or run on the machine of `llorch up`, whose operator token is sent for you)"
        ),
        Some(status) => format!("orchestratord at {at} answered {status}"),
        None => format!("cannot reach orchestratord at {at}"),
    };
    anyhow::Error::new(e).context(context)
}

/// The model to use: the one given, else the only (or first) model the server lists.
pub async fn pick_model(client: &HttpClient, model: Option<String>) -> anyhow::Result<String> {
    if let Some(m) = model {
        return Ok(m);
    }
    let list: Value = client
        .get_json("/v1/models")
        .await
        .with_context(|| format!("cannot list models at {}", client.address()))?;
    list["data"]
        .as_array()
        .and_then(|d| d.first())
        .and_then(|m| m["id"].as_str())
        .map(str::to_string)
        .context("the server serves no model yet; is a pool ready? (llorch status)")
}

/// Submits a task and writes its text to `out` as it arrives; returns the text and end event.
pub async fn run_task(
    client: &HttpClient,
    req: &TaskRequest,
    out: &mut dyn Write,
) -> anyhow::Result<(String, TaskEnd)> {
    let accepted: TaskAccepted = client.post_json("/v2/tasks", req).await?;
    let mut events = client.events(&accepted.streams.sse).await?;
    let mut text = String::new();
    while let Some(frame) = events.next_frame().await {
        let frame = frame?;
        match frame.event.as_str() {
            "token" => {
                let t: TokenEvent = serde_json::from_str(&frame.data)?;
                out.write_all(t.t.as_bytes())?;
                out.flush()?;
                text.push_str(&t.t);
            }
            "end" => return Ok((text, serde_json::from_str(&frame.data)?)),
            "error" => {
                let e: ErrorBody = serde_json::from_str(&frame.data)?;
                bail!("the task failed: {e}");
            }
            _ => {}
        }
    }
    bail!("the stream ended without an end event")
}

fn stats(end: &TaskEnd) -> String {
    let tps = if end.decode_time_ms > 0 {
        end.tokens_out.saturating_sub(1) as f64 * 1000.0 / end.decode_time_ms as f64
    } else {
        0.0
    };
    format!(
        "{} prompt tokens, {} generated, queued {} ms, first token after {} ms, {:.0} tokens/s",
        end.tokens_in, end.tokens_out, end.queue_ms, end.ttft_ms, tps
    )
}

pub struct GenerateOptions {
    pub model: Option<String>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    pub prompt: String,
}

pub async fn generate(client: &HttpClient, opts: GenerateOptions) -> anyhow::Result<()> {
    let model = pick_model(client, opts.model).await?;
    let req = TaskRequest {
        model_ref: model,
        messages: Some(vec![ChatMessage::new("user", opts.prompt)]),
        max_tokens: Some(opts.max_tokens),
        temperature: opts.temperature,
        ..TaskRequest::default()
    };
    let (_, end) = run_task(client, &req, &mut std::io::stdout()).await?;
    println!();
    eprintln!("llorch: {}", stats(&end));
    Ok(())
}

/// A conversation on the terminal: each line is a user turn; the session keeps the KV cache
/// on one pool, so later turns start fast.
pub async fn chat(
    client: &HttpClient,
    model: Option<String>,
    max_tokens: u32,
    temperature: Option<f32>,
    system: Option<String>,
) -> anyhow::Result<()> {
    let model = pick_model(client, model).await?;
    let session = format!("chat-{}", std::process::id());
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(ChatMessage::new("system", s));
    }
    eprintln!("llorch: chatting with {model}; an empty line or Ctrl-D ends.");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(ChatMessage::new("user", line.trim_end().to_string()));
        let req = TaskRequest {
            model_ref: model.clone(),
            session_id: Some(session.clone()),
            messages: Some(messages.clone()),
            max_tokens: Some(max_tokens),
            temperature,
            ..TaskRequest::default()
        };
        let (text, end) = run_task(client, &req, &mut std::io::stdout()).await?;
        println!();
        eprintln!("llorch: {}", stats(&end));
        messages.push(ChatMessage::new("assistant", text));
    }
    let path = format!("/v2/sessions/{session}");
    if let Ok(req) = client.build(
        client.request(hyper::Method::DELETE, &path),
        bytes::Bytes::new(),
    ) {
        let _ = client.send(req).await;
    }
    Ok(())
}

/// `llorch status`: nodes, pools and the queue as tables.
pub async fn status(client: &HttpClient, out: &mut dyn Write) -> anyhow::Result<()> {
    let nodes: Vec<NodeView> = client
        .get_json("/v2/nodes")
        .await
        .map_err(|e| explain(client, e))?;
    let pools: PoolsAnswer = client.get_json("/v2/pools").await?;
    let mut rows = vec![node_header()];
    for n in &nodes {
        let state = if n.state.is_empty() {
            if n.online { "online" } else { "offline" }.to_string()
        } else {
            n.state.clone()
        };
        rows.push(node_row(
            &n.node_id,
            &state,
            n.draining,
            n.last_seen_ms,
            &n.address,
        ));
    }
    write_table(out, &rows)?;
    writeln!(out)?;
    write_table(out, &gpu_rows(&nodes))?;
    writeln!(out)?;
    let memory = memory_rows(&nodes);
    if memory.len() > 1 {
        write_table(out, &memory)?;
        writeln!(out)?;
    }
    let mut rows = vec![vec![
        "POOL".to_string(),
        "NODE".into(),
        "MODEL".into(),
        "STATE".into(),
        "SLOTS BUSY/TOTAL".into(),
        "LOAD".into(),
        "MEMORY".into(),
        "SWAPS".into(),
        "RESTARTS".into(),
        "LAST ERROR".into(),
    ]];
    for p in &pools.pools {
        rows.push(vec![
            p.pool_id.clone(),
            p.node_id.clone(),
            p.model_id.clone(),
            pool_state(&p.state.to_string(), p.on_demand),
            format!("{}/{}", p.slots_busy, p.slots_total),
            // What a cold start of an on-demand pool waits for.
            p.load_ms
                .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            memory_cell(p.memory_charge_bytes, p.memory_charged, p.pinned),
            p.swaps.to_string(),
            p.restarts.to_string(),
            p.last_error
                .as_deref()
                .map(|e| e.lines().next().unwrap_or("").chars().take(60).collect())
                .unwrap_or_default(),
        ]);
    }
    write_table(out, &rows)?;
    let q = &pools.queue;
    writeln!(
        out,
        "\nqueue: {} waiting ({} interactive, {} batch) of {}, {} running, policy {}",
        q.depth, q.interactive, q.batch, q.capacity, q.running, q.policy
    )?;
    Ok(())
}

/// `llorch status`'s GPU table: one row per GPU of each node, or one saying the node has none.
pub fn gpu_rows(nodes: &[NodeView]) -> Vec<Vec<String>> {
    let gib = |b: u64| format!("{:.1}", b as f64 / f64::from(1u32 << 30));
    let mut rows = vec![[
        "NODE",
        "GPU",
        "NAME",
        "MEMORY FREE/TOTAL GiB",
        "UTIL",
        "TEMP",
        "UUID",
    ]
    .map(String::from)
    .to_vec()];
    for n in nodes {
        if n.gpus.devices.is_empty() {
            rows.push(vec![
                n.node_id.clone(),
                "-".into(),
                "CPU only (no NVIDIA driver)".into(),
            ]);
        }
        for g in &n.gpus.devices {
            rows.push(vec![
                n.node_id.clone(),
                g.index.to_string(),
                g.name.clone(),
                format!("{}/{}", gib(g.memory_free_bytes), gib(g.memory_total_bytes)),
                g.utilization_percent
                    .map_or_else(|| "-".into(), |u| format!("{u}%")),
                g.temperature_celsius
                    .map_or_else(|| "-".into(), |t| format!("{t} C")),
                g.uuid.clone(),
            ]);
        }
    }
    rows
}

/// `llorch status`'s memory table: one row per budgeted device of each node, its budget and
/// what the loaded pools are charged on it (only the header when no node reports budgets).
pub fn memory_rows(nodes: &[NodeView]) -> Vec<Vec<String>> {
    let mib = |b: u64| b.div_ceil(1 << 20);
    let mut rows = vec![["NODE", "DEVICE", "CHARGED/BUDGET MiB", "USED"]
        .map(String::from)
        .to_vec()];
    for n in nodes {
        for m in &n.memory {
            let used = (m.charged_bytes as f64 / m.budget_bytes.max(1) as f64) * 100.0;
            rows.push(vec![
                n.node_id.clone(),
                m.device.clone(),
                format!("{}/{}", mib(m.charged_bytes), mib(m.budget_bytes)),
                format!("{used:.0}%"),
            ]);
        }
    }
    rows
}

/// The header of `llorch status`'s node table (over HTTP or D-Bus).
pub fn node_header() -> Vec<String> {
    ["NODE", "STATE", "LAST SEEN", "ADDRESS"]
        .map(String::from)
        .to_vec()
}

/// One row of the node table.
pub fn node_row(
    id: &str,
    state: &str,
    draining: bool,
    last_seen_ms: u64,
    address: &str,
) -> Vec<String> {
    vec![
        id.to_string(),
        if draining {
            format!("{state} (draining)")
        } else {
            state.to_string()
        },
        format!("{:.1} s ago", last_seen_ms as f64 / 1000.0),
        address.to_string(),
    ]
}

/// A pool's memory charge as the table shows it: `512 MiB` while charged, `(512 MiB)` while
/// unloaded, and `pinned` when it is never unloaded for room.
pub fn memory_cell(bytes: Option<u64>, charged: bool, pinned: bool) -> String {
    let amount = match bytes {
        Some(b) if charged => format!("{} MiB", b.div_ceil(1 << 20)),
        Some(b) => format!("({} MiB)", b.div_ceil(1 << 20)),
        None => "-".into(),
    };
    if pinned {
        format!("{amount} pinned")
    } else {
        amount
    }
}

/// A pool's state as the tables show it.
pub fn pool_state(state: &str, on_demand: bool) -> String {
    if on_demand {
        format!("{state} (on demand)")
    } else {
        state.to_string()
    }
}

pub fn write_table(out: &mut dyn Write, rows: &[Vec<String>]) -> std::io::Result<()> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

/// `llorch pools drain|resume ID`.
pub async fn pool_action(
    client: &HttpClient,
    action: &str,
    id: &str,
    node: Option<&str>,
) -> anyhow::Result<()> {
    let query = node.map(|n| format!("?node={n}")).unwrap_or_default();
    let status: PoolStatus = client
        .post_json(
            &format!("/v2/pools/{id}/{action}{query}"),
            &serde_json::json!({}),
        )
        .await?;
    println!(
        "pool {}: {}{}{}",
        status.pool_id,
        status.state,
        if status.draining { " (draining)" } else { "" },
        if status.pinned { " (pinned)" } else { "" }
    );
    Ok(())
}

/// `llorch nodes drain NODE [--wait SECS]`.
pub async fn node_drain(
    client: &HttpClient,
    node: &str,
    wait: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let view: NodeView = client
        .post_json(&format!("/v2/nodes/{node}/drain"), &serde_json::json!({}))
        .await?;
    println!(
        "node {}: draining, {} task(s) running",
        view.node_id, view.running
    );
    let Some(limit) = wait else {
        return Ok(());
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let nodes: Vec<NodeView> = client.get_json("/v2/nodes").await?;
        let Some(v) = nodes.into_iter().find(|n| n.node_id == node) else {
            anyhow::bail!("node {node} is no longer listed");
        };
        if v.running == 0 {
            println!("node {node}: drained, no task runs on it");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "node {node} still runs {} task(s) after {} s",
                v.running,
                limit.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `llorch nodes resume NODE`.
pub async fn node_resume(client: &HttpClient, node: &str) -> anyhow::Result<()> {
    let view: NodeView = client
        .post_json(&format!("/v2/nodes/{node}/resume"), &serde_json::json!({}))
        .await?;
    println!("node {}: placing work again ({})", view.node_id, view.state);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_wire::node::{GpuReport, GpuStatus};

    fn node(id: &str, devices: Vec<GpuStatus>) -> NodeView {
        NodeView {
            node_id: id.into(),
            address: "unix:/x.sock".into(),
            online: true,
            state: "online".into(),
            draining: false,
            running: 0,
            version: "0".into(),
            last_seen_ms: 0,
            pools: vec![],
            staged_models: vec![],
            gpus: GpuReport {
                driver_version: None,
                cuda_version: None,
                devices,
            },
            memory: vec![llorch_wire::node::DeviceMemory {
                device: "host".into(),
                budget_bytes: 1700 << 20,
                charged_bytes: 850 << 20,
            }],
        }
    }

    #[test]
    fn the_memory_table_has_a_row_per_budgeted_device() {
        let rows = memory_rows(&[node("box", vec![])]);
        assert_eq!(rows[1], ["box", "host", "850/1700", "50%"]);
    }

    #[test]
    fn the_gpu_table_has_a_row_per_gpu_and_one_per_cpu_node() {
        let gpu = |index, total_gib: u64, free_gib: u64| GpuStatus {
            index,
            uuid: format!("GPU-{index}"),
            name: "NVIDIA GeForce RTX 4090".into(),
            memory_total_bytes: total_gib << 30,
            memory_used_bytes: (total_gib - free_gib) << 30,
            memory_free_bytes: free_gib << 30,
            utilization_percent: Some(37),
            temperature_celsius: None,
        };
        let rows = gpu_rows(&[
            node("box", vec![gpu(0, 24, 20), gpu(1, 12, 12)]),
            node("cpu", vec![]),
        ]);
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[1],
            [
                "box",
                "0",
                "NVIDIA GeForce RTX 4090",
                "20.0/24.0",
                "37%",
                "-",
                "GPU-0"
            ]
        );
        assert_eq!(rows[2][3], "12.0/12.0");
        assert_eq!(rows[3], ["cpu", "-", "CPU only (no NVIDIA driver)"]);
    }
}
