//! Registration and heartbeats to the control plane.
//!
//! The node registers on start, then heartbeats every `heartbeat_secs`, and at once (coalesced
//! over [`COALESCE`]) when a pool's state changes. A heartbeat answered 404 means the control
//! plane forgot the node (it restarted): the node registers again right away. An unreachable
//! control plane is retried every interval and logged once when it goes away and once when it
//! comes back. The node keeps serving either way.

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use llorch_client::{status_of, ClientError, HttpClient};
use llorch_wire::node::{Heartbeat, NodeAck, PoolStatus, Registration};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::state::Node;

/// State changes closer together than this go out in one heartbeat.
pub const COALESCE: Duration = Duration::from_millis(50);

/// What the heartbeat task needs to know about the node.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node_id: String,
    pub advertise: String,
    pub heartbeat_secs: u64,
}

/// Sends registrations and heartbeats until `shutdown`.
pub async fn run(
    node: Arc<Node>,
    client: HttpClient,
    identity: Identity,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_secs(identity.heartbeat_secs);
    let heartbeat_path = format!("/v2/nodes/{}/heartbeat", identity.node_id);
    let mut registered = false;
    // Fed from this loop, the node agent's own work loop; it wakes at least every half
    // watchdog period even between heartbeats.
    let mut watchdog = llorch_os::service::Watchdog::from_env();
    let mut announced_ready = false;
    // Assume reachable, so the first failure is logged.
    let mut reachable = true;
    // After a failed call the next one comes sooner (100 ms, doubling up to the interval), so
    // a control plane that restarts (its socket held by systemd) sees the node again quickly.
    let mut retry = RETRY_START;
    loop {
        let (pools, gpus) = node.report();
        let result: Result<NodeAck, ClientError> = if registered {
            let hb = Heartbeat {
                pools: pools.clone(),
                staged_models: node.staged_models(),
                gpus,
            };
            within(interval, client.post_json(&heartbeat_path, &hb)).await
        } else {
            let reg = Registration {
                node_id: identity.node_id.clone(),
                address: identity.advertise.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                heartbeat_secs: identity.heartbeat_secs,
                pools: pools.clone(),
                staged_models: node.staged_models(),
                gpus,
            };
            within(interval, client.post_json("/v2/nodes/register", &reg)).await
        };
        node.metrics.heartbeat_sent(match &result {
            Ok(_) => "ok",
            Err(e) if status_of(e).is_some() => "refused",
            Err(_) => "unreachable",
        });
        match result {
            Ok(ack) => {
                if !reachable {
                    tracing::info!(control_plane = %client.address(), "Control plane reachable again.");
                    reachable = true;
                }
                if !registered {
                    tracing::info!(
                        control_plane = %client.address(),
                        node_id = %ack.node_id,
                        offline_after_secs = ack.offline_after_secs,
                        "Registered with the control plane."
                    );
                    registered = true;
                    if !announced_ready {
                        // Ready once registered: from now on the control plane can place work
                        // on this node.
                        llorch_os::service::ready();
                        announced_ready = true;
                    }
                }
            }
            Err(e) if registered && status_of(&e) == Some(StatusCode::NOT_FOUND) => {
                tracing::info!(control_plane = %client.address(), "The control plane does not know this node; registering again.");
                registered = false;
                reachable = true;
                continue;
            }
            Err(e) => {
                if reachable {
                    tracing::warn!(
                        control_plane = %client.address(),
                        error = %e,
                        retry_secs = identity.heartbeat_secs,
                        "Control plane unreachable; the node keeps serving and retries every interval."
                    );
                    reachable = false;
                }
            }
        }
        llorch_os::service::status(&status_line(&pools, client.address(), registered));
        let next = if reachable {
            retry = RETRY_START;
            Instant::now() + interval
        } else {
            let wait = retry.min(interval);
            retry = (retry * 2).min(interval);
            Instant::now() + wait
        };
        loop {
            watchdog.feed();
            let feed_by = watchdog
                .period()
                .map(|p| Instant::now() + p)
                .unwrap_or(next)
                .min(next);
            tokio::select! {
                () = tokio::time::sleep_until(feed_by) => {
                    if Instant::now() >= next {
                        break;
                    }
                }
                () = node.changed.notified() => {
                    // Let a burst of changes (failed, loading, ready) settle into one heartbeat.
                    tokio::select! {
                        () = tokio::time::sleep(COALESCE) => {}
                        () = shutdown.cancelled() => return,
                    }
                    break;
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// The first retry delay after a failed registration or heartbeat.
const RETRY_START: Duration = Duration::from_millis(100);

/// The service manager's status line: registration and each pool's state.
fn status_line(pools: &[PoolStatus], control_plane: &str, registered: bool) -> String {
    let pools: Vec<String> = pools
        .iter()
        .map(|p| {
            format!(
                "{} {} ({}/{} busy)",
                p.pool_id, p.state, p.slots_busy, p.slots_total
            )
        })
        .collect();
    format!(
        "{} {control_plane}; pools: {}",
        if registered {
            "registered with"
        } else {
            "not registered with"
        },
        if pools.is_empty() {
            "none".to_string()
        } else {
            pools.join(", ")
        }
    )
}

/// A call that takes longer than one heartbeat interval is abandoned, so a control plane that
/// black-holes packets cannot hold the loop for the kernel's TCP timeout.
async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Transport {
            address: "control plane".into(),
            reason: format!("no answer within {} s", limit.as_secs()),
        }),
    }
}

/// On shutdown: one last heartbeat, with every pool reported as draining, so the control plane
/// stops placing work on this node before its engines stop. Best effort, at most one second.
pub async fn final_heartbeat(node: &Node, client: &HttpClient, identity: &Identity) {
    let (pools, gpus) = node.report();
    let hb = Heartbeat {
        pools,
        staged_models: node.staged_models(),
        gpus,
    };
    let path = format!("/v2/nodes/{}/heartbeat", identity.node_id);
    let sent = within(
        Duration::from_secs(1),
        client.post_json::<_, NodeAck>(&path, &hb),
    )
    .await;
    if let Err(e) = sent {
        tracing::debug!(error = %e, "The last heartbeat did not reach the control plane.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use axum::extract::{Path, State};
    use axum::http::StatusCode as Status;
    use axum::routing::post;
    use axum::{Json, Router};

    /// A control plane that records what it got and forgets the node after its first heartbeat.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<String>>,
    }

    async fn register(State(f): State<Arc<Fake>>, Json(r): Json<Registration>) -> Json<NodeAck> {
        f.calls
            .lock()
            .unwrap()
            .push(format!("register {} {}", r.node_id, r.address));
        Json(NodeAck {
            node_id: r.node_id,
            offline_after_secs: 15,
        })
    }

    async fn heartbeat(
        State(f): State<Arc<Fake>>,
        Path(id): Path<String>,
        Json(h): Json<Heartbeat>,
    ) -> Result<Json<NodeAck>, Status> {
        let mut calls = f.calls.lock().unwrap();
        let first = !calls.iter().any(|c| c.starts_with("heartbeat"));
        calls.push(format!("heartbeat {id} {}", h.pools[0].state));
        if first {
            Err(Status::NOT_FOUND)
        } else {
            Ok(Json(NodeAck {
                node_id: id,
                offline_after_secs: 15,
            }))
        }
    }

    #[tokio::test]
    async fn registers_heartbeats_on_change_and_registers_again_after_404() {
        let fake = Arc::new(Fake::default());
        let app = Router::new()
            .route("/v2/nodes/register", post(register))
            .route("/v2/nodes/{id}/heartbeat", post(heartbeat))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let cfg = crate::config::parse(
            std::path::Path::new("t.toml"),
            include_str!("../examples/node.toml"),
        )
        .unwrap();
        let node = Node::new(cfg.pools());
        let stop = CancellationToken::new();
        // A long interval: every heartbeat below is caused by a state change.
        let task = tokio::spawn(run(
            node.clone(),
            HttpClient::new(&format!("http://{addr}")).unwrap(),
            Identity {
                node_id: "n1".into(),
                advertise: "unix:/run/n1.sock".into(),
                heartbeat_secs: 300,
            },
            stop.clone(),
        ));
        let calls = |n: usize| {
            let fake = fake.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    let c = fake.calls.lock().unwrap().clone();
                    if c.len() >= n {
                        return c;
                    }
                    assert!(Instant::now() < deadline, "only {c:?}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        assert_eq!(calls(1).await, ["register n1 unix:/run/n1.sock"]);
        node.update("default", |p| p.phase = crate::state::Phase::Failed);
        // The change goes out at once; the 404 makes the node register again right away.
        assert_eq!(
            calls(3).await[1..],
            ["heartbeat n1 failed", "register n1 unix:/run/n1.sock"]
        );
        node.update("default", |p| p.phase = crate::state::Phase::Provisioning);
        assert_eq!(calls(4).await[3], "heartbeat n1 provisioning");
        stop.cancel();
        task.await.unwrap();
    }
}
