//! Registration and heartbeats to the control plane.
//!
//! The node registers on start, then heartbeats every `heartbeat_secs`, and at once (coalesced
//! over [`COALESCE`]) when a pool's state changes. A heartbeat answered 404 means the control
//! plane forgot the node (it restarted): the node registers again right away. An unreachable
//! control plane is retried every interval and logged once when it goes away and once when it
//! comes back. The node keeps serving either way.
//!
//! When the registration's answer grants a beat session (the control plane reads UDP beats,
//! [`llorch_wire::beat`]), an interval in which nothing changed and the last report was taken
//! sends [`BEATS_PER_INTERVAL`] beats instead of a heartbeat; a full heartbeat still goes out
//! on every change, after any failure, every [`REPORT_EVERY`](llorch_wire::beat::REPORT_EVERY) intervals, and when the control
//! plane answers a beat asking for one (it restarted, or has the node offline). The first
//! report comes one interval after registration: when the control plane took none of the beats
//! sent since (UDP filtered on the way), the node says so once and heartbeats over HTTP until
//! it registers again, instead of going offline.

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use llorch_client::{status_of, ClientError, HttpClient};
use llorch_wire::beat::BEATS_PER_INTERVAL;
use llorch_wire::node::{Heartbeat, NodeAck, PoolStatus, Registration};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::beats::{report_requested, Beats};
use crate::state::Node;

mod beats;
mod stop;

pub use self::stop::{final_heartbeat, leave};

/// State changes closer together than this go out in one heartbeat.
pub const COALESCE: Duration = Duration::from_millis(50);
/// A control plane's request for a report is followed at most this often; more come from a
/// stranger, and the next interval's heartbeat answers them.
const REPORT_REQUEST_SPACING: Duration = Duration::from_secs(1);

/// What the heartbeat task needs to know about the node.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node_id: String,
    pub advertise: String,
    pub heartbeat_secs: u64,
}

/// Sends registrations, heartbeats and beats until `shutdown`.
pub async fn run(
    node: Arc<Node>,
    client: HttpClient,
    identity: Identity,
    shutdown: CancellationToken,
) {
    let mut s = Reporter::new(node, client, identity);
    loop {
        let (pools, gpus) = s.node.report();
        let after = match s.beat().await {
            Some(after) => after,
            None => s.call(&pools, gpus).await,
        };
        if let After::CallAgain = after {
            continue;
        }
        llorch_os::service::status(&status_line(&pools, s.client.address(), s.registered));
        let next = s.next_call();
        if !s.wait(next, &shutdown).await {
            return;
        }
    }
}

/// What the loop does once a beat or a call went out.
enum After {
    /// Report the status and wait for the next call.
    Wait,
    /// Call again at once (a beat could not be sent; the control plane forgot the node).
    CallAgain,
}

/// The heartbeat task's state between calls.
struct Reporter {
    node: Arc<Node>,
    client: HttpClient,
    identity: Identity,
    interval: Duration,
    heartbeat_path: String,
    registered: bool,
    /// Fed from this loop, the node agent's own work loop; it wakes at least every half
    /// watchdog period even between heartbeats.
    watchdog: llorch_os::service::Watchdog,
    announced_ready: bool,
    /// Assume reachable, so the first failure is logged.
    reachable: bool,
    /// After a failed call the next one comes sooner (100 ms, doubling up to the interval), so
    /// a control plane that restarts (its socket held by systemd) sees the node again quickly.
    retry: Duration,
    /// The beat session of this registration, when the control plane granted one.
    beats: Option<Beats>,
    /// A full heartbeat must go out: something changed, or the last call was not taken.
    report_due: bool,
    last_call: Instant,
}

impl Reporter {
    fn new(node: Arc<Node>, client: HttpClient, identity: Identity) -> Self {
        Self {
            node,
            client,
            interval: Duration::from_secs(identity.heartbeat_secs),
            heartbeat_path: format!("/v2/nodes/{}/heartbeat", identity.node_id),
            identity,
            registered: false,
            watchdog: llorch_os::service::Watchdog::from_env(),
            announced_ready: false,
            reachable: true,
            retry: RETRY_START,
            beats: None,
            report_due: true,
            last_call: Instant::now(),
        }
    }

    /// Sends a beat when one is due instead of a heartbeat; None when none is.
    async fn beat(&mut self) -> Option<After> {
        let beat_now = self.registered && !self.report_due;
        let b = self
            .beats
            .as_mut()
            .filter(|b| beat_now && b.sent < b.report_after())?;
        if b.unacknowledged() {
            // Lost on the way, or crowded out of the control plane's socket by a flood: the
            // report goes over HTTPS before the node turns suspect there.
            self.node.metrics.beat_sent("unacknowledged");
            tracing::debug!(
                "The last interval's beats were not acknowledged; sending a heartbeat."
            );
            self.report_due = true;
            return Some(After::CallAgain);
        }
        if let Err(e) = b.send().await {
            // A closed port (an ICMP answer to the last beat) or no route: a full
            // heartbeat says more, at once.
            self.node.metrics.beat_sent("failed");
            tracing::debug!(error = %e, "A beat could not be sent; sending a heartbeat.");
            self.report_due = true;
            return Some(After::CallAgain);
        }
        self.node.metrics.beat_sent("sent");
        Some(After::Wait)
    }

    /// Registers, or heartbeats once registered, and takes the answer.
    async fn call(&mut self, pools: &[PoolStatus], gpus: llorch_wire::node::GpuReport) -> After {
        let interval = self.interval;
        let client = &self.client;
        self.last_call = Instant::now();
        let result: Result<NodeAck, ClientError> = if self.registered {
            let hb = Heartbeat {
                pools: pools.to_vec(),
                staged_models: self.node.staged_models(),
                gpus,
                memory: self.node.device_memory(),
            };
            within(interval, client.post_json(&self.heartbeat_path, &hb)).await
        } else {
            let reg = Registration {
                node_id: self.identity.node_id.clone(),
                address: self.identity.advertise.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                heartbeat_secs: self.identity.heartbeat_secs,
                pools: pools.to_vec(),
                staged_models: self.node.staged_models(),
                gpus,
                memory: self.node.device_memory(),
            };
            within(interval, client.post_json("/v2/nodes/register", &reg)).await
        };
        self.node.metrics.heartbeat_sent(match &result {
            Ok(_) => "ok",
            Err(e) if status_of(e).is_some() => "refused",
            Err(_) => "unreachable",
        });
        match result {
            Ok(ack) => self.taken(ack).await,
            Err(e) if self.registered && status_of(&e) == Some(StatusCode::NOT_FOUND) => {
                tracing::info!(control_plane = %self.client.address(), "The control plane does not know this node; registering again.");
                self.registered = false;
                self.beats = None;
                self.reachable = true;
                return After::CallAgain;
            }
            Err(e) => {
                self.report_due = true;
                if self.reachable {
                    let retry = "the node keeps serving and tries again after 0.1 s, doubling the wait up to every heartbeat interval";
                    match status_of(&e) {
                        // It answered: the node's token, id or report is what it refuses.
                        Some(status) => tracing::warn!(
                            control_plane = %self.client.address(),
                            status = %status,
                            error = %e,
                            max_retry_secs = self.identity.heartbeat_secs,
                            "The control plane refused this node ({status}): fix what the error names (node token, node id, address, pools); {retry}."
                        ),
                        None => tracing::warn!(
                            control_plane = %self.client.address(),
                            error = %e,
                            max_retry_secs = self.identity.heartbeat_secs,
                            "Control plane unreachable; {retry}."
                        ),
                    }
                    self.reachable = false;
                }
            }
        }
        After::Wait
    }

    /// The control plane took a registration or heartbeat.
    async fn taken(&mut self, ack: NodeAck) {
        let client = &self.client;
        self.report_due = false;
        if self.registered {
            self.beats = self
                .beats
                .take()
                .and_then(|b| b.reported(ack.beat_counter, client.address()));
        }
        if !self.reachable {
            tracing::info!(control_plane = %client.address(), "Control plane reachable again.");
            self.reachable = true;
        }
        if !self.registered {
            tracing::info!(
                control_plane = %client.address(),
                node_id = %ack.node_id,
                offline_after_secs = ack.offline_after_secs,
                beats = ack.beat.is_some(),
                "Registered with the control plane."
            );
            self.registered = true;
            self.beats = match &ack.beat {
                Some(grant) => Beats::open(grant, client.address())
                    .await
                    .inspect_err(|e| tracing::warn!(error = %e, "Cannot send liveness beats; heartbeating over HTTP every interval."))
                    .ok(),
                None => None,
            };
            if !self.announced_ready {
                // Ready once registered: from now on the control plane can place
                // work on this node.
                llorch_os::service::ready();
                self.announced_ready = true;
            }
        }
    }

    /// When the next beat or call is due.
    fn next_call(&mut self) -> Instant {
        let interval = self.interval;
        if self.reachable {
            self.retry = RETRY_START;
            // Beating, the next call is the next beat.
            match &self.beats {
                Some(_) if self.registered && !self.report_due => {
                    Instant::now() + interval / BEATS_PER_INTERVAL
                }
                _ => Instant::now() + interval,
            }
        } else {
            let wait = self.retry.min(interval);
            self.retry = (self.retry * 2).min(interval);
            Instant::now() + wait
        }
    }

    /// Waits until `next`, a pool's change or the control plane's request for a report,
    /// feeding the watchdog meanwhile; false on shutdown.
    async fn wait(&mut self, next: Instant, shutdown: &CancellationToken) -> bool {
        loop {
            self.watchdog.feed();
            let feed_by = self
                .watchdog
                .period()
                .map(|p| Instant::now() + p)
                .unwrap_or(next)
                .min(next);
            tokio::select! {
                () = tokio::time::sleep_until(feed_by) => {
                    if Instant::now() >= next {
                        return true;
                    }
                }
                () = self.node.changed.notified() => {
                    // Let a burst of changes (failed, loading, ready) settle into one heartbeat.
                    tokio::select! {
                        () = tokio::time::sleep(COALESCE) => {}
                        () = shutdown.cancelled() => return false,
                    }
                    self.report_due = true;
                    return true;
                }
                () = report_requested(self.beats.as_ref()), if !self.report_due => {
                    self.report_due = true;
                    if self.last_call.elapsed() >= REPORT_REQUEST_SPACING {
                        return true;
                    }
                }
                () = shutdown.cancelled() => return false,
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
pub(super) async fn within<T>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_wire::beat::{self, BeatGrant, BeatKey};
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
            beat: None,
            beat_counter: None,
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
                beat: None,
                beat_counter: None,
            }))
        }
    }

    /// Serves `app` as the control plane and runs the example node's registration loop
    /// against it, heartbeating every `heartbeat_secs`.
    async fn node_against(
        app: Router,
        heartbeat_secs: u64,
    ) -> (Arc<Node>, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let cfg = crate::config::parse(
            std::path::Path::new("t.toml"),
            include_str!("../../examples/node.toml"),
        )
        .unwrap();
        let node = Node::new(cfg.pools());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            node.clone(),
            HttpClient::new(&format!("http://{addr}")).unwrap(),
            Identity {
                node_id: "n1".into(),
                advertise: "unix:/run/n1.sock".into(),
                heartbeat_secs,
            },
            stop.clone(),
        ));
        (node, stop, task)
    }

    #[tokio::test]
    async fn registers_heartbeats_on_change_and_registers_again_after_404() {
        let fake = Arc::new(Fake::default());
        let app = Router::new()
            .route("/v2/nodes/register", post(register))
            .route("/v2/nodes/{id}/heartbeat", post(heartbeat))
            .with_state(fake.clone());
        // A long interval: every heartbeat below is caused by a state change.
        let (node, stop, task) = node_against(app, 300).await;
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

    /// A control plane that grants beats on a UDP socket the test reads, takes every
    /// heartbeat, and answers each with the beat counter the test says it took.
    struct Beating {
        calls: Mutex<Vec<String>>,
        /// Fired on every call.
        called: tokio::sync::Notify,
        grant: BeatGrant,
        taken: std::sync::atomic::AtomicU64,
    }

    async fn register_beating(
        State(f): State<Arc<Beating>>,
        Json(r): Json<Registration>,
    ) -> Json<NodeAck> {
        f.calls.lock().unwrap().push("register".into());
        f.called.notify_waiters();
        Json(NodeAck {
            node_id: r.node_id,
            offline_after_secs: 3,
            beat: Some(f.grant.clone()),
            beat_counter: None,
        })
    }

    async fn heartbeat_beating(
        State(f): State<Arc<Beating>>,
        Json(h): Json<Heartbeat>,
    ) -> Json<NodeAck> {
        f.calls
            .lock()
            .unwrap()
            .push(format!("heartbeat {}", h.pools[0].state));
        f.called.notify_waiters();
        Json(NodeAck {
            node_id: "n1".into(),
            offline_after_secs: 3,
            beat: None,
            beat_counter: Some(f.taken.load(std::sync::atomic::Ordering::SeqCst)),
        })
    }

    /// A node (heartbeat every second) registered with a fake control plane that grants
    /// beats: the fake, its UDP socket, the beat key, the node, and what stops the node.
    struct BeatingRig {
        fake: Arc<Beating>,
        udp: tokio::net::UdpSocket,
        key: BeatKey,
        node: Arc<Node>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl BeatingRig {
        async fn start() -> Self {
            Self::start_with(false).await
        }

        /// `acks`: the grant says beats are acknowledged.
        async fn start_with(acks: bool) -> Self {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let (key, hex_key) = BeatKey::generate().unwrap();
            let fake = Arc::new(Beating {
                calls: Mutex::default(),
                called: Default::default(),
                grant: BeatGrant {
                    port: udp.local_addr().unwrap().port(),
                    session: 77,
                    key: hex_key,
                    acks,
                },
                taken: Default::default(),
            });
            let app = Router::new()
                .route("/v2/nodes/register", post(register_beating))
                .route("/v2/nodes/{id}/heartbeat", post(heartbeat_beating))
                .with_state(fake.clone());
            let (node, stop, task) = node_against(app, 1).await;
            Self {
                fake,
                udp,
                key,
                node,
                stop,
                task,
            }
        }

        fn calls(&self) -> Vec<String> {
            self.fake.calls.lock().unwrap().clone()
        }

        /// Waits (3 s at most) for the `n`th call and returns it.
        async fn call(&self, n: usize) -> String {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                // Registered before the check, so a call between the two is not missed.
                let called = self.fake.called.notified();
                if let Some(c) = self.calls().get(n - 1) {
                    return c.clone();
                }
                if tokio::time::timeout_at(deadline, called).await.is_err() {
                    panic!("no call {n}: {:?}", self.calls());
                }
            }
        }

        /// The next beat, verified: its counter and sender. `take`: the fake control plane
        /// takes it (later heartbeats are answered with its counter).
        async fn beat(&self, take: bool) -> (u64, std::net::SocketAddr) {
            let mut buf = [0u8; 128];
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(3), self.udp.recv_from(&mut buf))
                    .await
                    .expect("a beat within 3 s")
                    .unwrap();
            let b = beat::parse(&buf[..n]).expect("a beat");
            assert!(
                b.verify(&self.key),
                "the beat is tagged with the granted key"
            );
            assert_eq!(b.session, 77);
            if take {
                self.fake
                    .taken
                    .store(b.counter, std::sync::atomic::Ordering::SeqCst);
            }
            (b.counter, from)
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn beats_replace_unchanged_heartbeats_and_a_report_request_or_a_change_sends_one() {
        let rig = BeatingRig::start().await;
        // Registered, then two beats an interval, counting up, instead of a heartbeat.
        assert_eq!(rig.beat(true).await.0, 1);
        assert_eq!(rig.beat(true).await.0, 2);
        assert_eq!(rig.calls(), ["register"]);
        // One interval in, a heartbeat checks that beats arrive; they do, so beats go on.
        assert_eq!(rig.call(2).await, "heartbeat provisioning");
        assert_eq!(rig.beat(true).await.0, 3);
        let (fourth, from) = rig.beat(true).await;
        assert_eq!(fourth, 4);
        assert_eq!(rig.calls().len(), 2);
        // The control plane asks for a report: a full heartbeat follows at once.
        rig.udp
            .send_to(&beat::report_request(77), from)
            .await
            .unwrap();
        assert_eq!(rig.call(3).await, "heartbeat provisioning");
        // Beats again, the counter going on; then a change goes out as a heartbeat.
        assert_eq!(rig.beat(true).await.0, 5);
        rig.node
            .update("default", |p| p.phase = crate::state::Phase::Failed);
        assert_eq!(rig.call(4).await, "heartbeat failed");
        rig.stop().await;
    }

    #[tokio::test]
    async fn unacknowledged_beats_give_way_to_a_heartbeat_within_an_interval() {
        let rig = BeatingRig::start_with(true).await;
        let ack = |counter: u64| beat::ack(77, counter, &rig.key);
        // Taken and acknowledged: beats go on after the first check.
        for counter in 1..=4 {
            let (c, from) = rig.beat(true).await;
            assert_eq!(c, counter);
            rig.udp.send_to(&ack(c), from).await.unwrap();
            if counter == 2 {
                assert_eq!(rig.call(2).await, "heartbeat provisioning");
            }
        }
        // Taken but not acknowledged (crowded out of the socket, or the acks lost; a forged
        // ack counts for nothing): after one interval of them, a heartbeat instead of a beat.
        let (forged_key, _) = BeatKey::generate().unwrap();
        let (five, from) = rig.beat(true).await;
        rig.udp
            .send_to(&beat::ack(77, five, &forged_key), from)
            .await
            .unwrap();
        let (six, _) = rig.beat(true).await;
        assert_eq!((five, six), (5, 6));
        let six_at = Instant::now();
        assert_eq!(rig.call(3).await, "heartbeat provisioning");
        assert!(six_at.elapsed() < Duration::from_millis(900));
        rig.stop().await;
    }

    #[tokio::test]
    async fn beats_that_do_not_arrive_give_way_to_heartbeats_before_the_node_is_suspect() {
        let rig = BeatingRig::start().await;
        // The control plane takes none of them (its UDP port filtered, say).
        rig.beat(false).await;
        rig.beat(false).await;
        // The check one interval in shows it: from then on a heartbeat every interval and no
        // beat, so the node is never suspect (1.5 intervals without news).
        assert_eq!(rig.call(2).await, "heartbeat provisioning");
        let checked = Instant::now();
        assert_eq!(rig.call(3).await, "heartbeat provisioning");
        assert_eq!(rig.call(4).await, "heartbeat provisioning");
        assert!(checked.elapsed() < Duration::from_millis(2500));
        let mut buf = [0u8; 128];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rig.udp.recv_from(&mut buf))
                .await
                .is_err(),
            "no beat after the check"
        );
        rig.stop().await;
    }
}
