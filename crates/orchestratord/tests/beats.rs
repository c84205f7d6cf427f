//! Liveness beats against orchestratord in process, on real sockets: a node registered over
//! HTTP gets a beat session; its UDP beats alone keep it online past the suspect and offline
//! deadlines; beats that are replayed, forged or malformed do not, and are counted; a stranger
//! or an offline node is asked for a full report; without beats the node goes offline.

use std::net::UdpSocket;
use std::time::Duration;

use llorch_client::HttpClient;
use llorch_wire::beat::{self, BeatKey};
use llorch_wire::node::{Heartbeat, NodeAck, PoolState, PoolStatus, Registration};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

struct Harness {
    client: HttpClient,
    beats: std::net::SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The operator's token: the node list is an operator's.
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

fn admin_token() -> orchestratord::ApiKeys {
    orchestratord::ApiKeys::parse_admin_token(ADMIN_TOKEN, std::path::Path::new("test")).unwrap()
}

async fn start() -> Harness {
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", api.local_addr().unwrap());
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let beats = socket.local_addr().unwrap();
    let config = orchestratord::Config {
        beat_port: Some(beats.port()),
        admin_token: Some(admin_token()),
        ..orchestratord::Config::default()
    };
    let shutdown = CancellationToken::new();
    let state = orchestratord::State::new(config);
    tokio::spawn(orchestratord::beats::serve(
        state.clone(),
        socket,
        shutdown.clone(),
    ));
    tokio::spawn(orchestratord::serve_state(state, api, shutdown.clone()));
    Harness {
        client: HttpClient::new(&url)
            .unwrap()
            .with_token(Some(ADMIN_TOKEN.into())),
        beats,
        shutdown,
    }
}

async fn node_state(client: &HttpClient) -> String {
    let nodes: Value = client.get_json("/v2/nodes").await.unwrap();
    nodes[0]["state"].as_str().unwrap().to_string()
}

async fn beats_counted(client: &HttpClient, outcome: &str) -> u64 {
    llorch_tests::prom::scrape(client)
        .await
        .sum("llorch_node_beats_total", &[("outcome", outcome)]) as u64
}

/// Waits until `/metrics` counts `n` beats with `outcome` (beats are read every 100 ms).
async fn until_counted(client: &HttpClient, outcome: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while beats_counted(client, outcome).await < n {
        assert!(
            Instant::now() < deadline,
            "{outcome} beats never reached {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn client_socket(to: std::net::SocketAddr) -> tokio::net::UdpSocket {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(to).await.unwrap();
    s
}

/// The next datagram on `s`, within 3 s.
async fn recv(s: &tokio::net::UdpSocket, buf: &mut [u8]) -> usize {
    tokio::time::timeout(Duration::from_secs(3), s.recv(buf))
        .await
        .expect("an answer within 3 s")
        .unwrap()
}

#[tokio::test]
async fn beats_keep_a_node_online_and_nothing_else_does() {
    let h = start().await;
    let reg = Registration {
        node_id: "w".into(),
        address: "http://127.0.0.1:1".into(),
        version: "0".into(),
        heartbeat_secs: 1,
        pools: vec![PoolStatus::new("p", "m", PoolState::Ready, 1, 1024)],
        staged_models: vec![],
        gpus: Default::default(),
        memory: Vec::new(),
    };
    let ack: NodeAck = h
        .client
        .post_json("/v2/nodes/register", &reg)
        .await
        .unwrap();
    let grant = ack.beat.expect("a beat session is granted");
    assert_eq!(grant.port, h.beats.port());
    let key = BeatKey::from_hex(&grant.key).unwrap();
    let node = client_socket(h.beats).await;

    // 3.5 s (past the 1.5 s suspect and 3 s offline deadlines) of beats every half second and
    // no HTTP heartbeat: the node stays online throughout. The sleep is the node's own pace:
    // what is tested is that time passing with beats alone does not make it suspect.
    for counter in 1..=7 {
        node.send(&beat::encode(grant.session, counter, &key))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            node_state(&h.client).await,
            "online",
            "after beat {counter}"
        );
    }
    until_counted(&h.client, "ok", 7).await;
    // Every second beat taken (even counters) was acknowledged, under the session's key.
    let mut buf = [0u8; 64];
    for counter in [2, 4, 6] {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), node.recv(&mut buf))
            .await
            .expect("an acknowledgement")
            .unwrap();
        assert_eq!(
            beat::parse_ack(&buf[..n], grant.session, &key),
            Some(counter)
        );
    }
    // A heartbeat's answer says which beats were taken: the node's check that they arrive.
    let hb = Heartbeat {
        pools: reg.pools.clone(),
        staged_models: vec![],
        gpus: Default::default(),
        memory: Vec::new(),
    };
    let ack: NodeAck = h
        .client
        .post_json("/v2/nodes/w/heartbeat", &hb)
        .await
        .unwrap();
    assert_eq!(ack.beat_counter, Some(7));

    // Replays, forged tags and odd datagrams are dropped and counted; none is answered.
    let (forger, _) = BeatKey::generate().unwrap();
    node.send(&beat::encode(grant.session, 7, &key))
        .await
        .unwrap();
    node.send(&beat::encode(grant.session, 8, &forger))
        .await
        .unwrap();
    node.send(b"hello").await.unwrap();
    until_counted(&h.client, "rejected", 3).await;
    // Replies go out before the batch is counted: had any been sent, it would be here.
    let mut buf = [0u8; 64];
    assert!(
        node.try_recv(&mut buf).is_err(),
        "a rejected beat was answered"
    );

    // A session nobody granted is asked for a full report.
    let stranger = client_socket(h.beats).await;
    stranger
        .send(&beat::encode(grant.session ^ 1, 1, &key))
        .await
        .unwrap();
    let n = recv(&stranger, &mut buf).await;
    assert_eq!(
        beat::parse_report_request(&buf[..n]),
        Some(grant.session ^ 1)
    );

    // Beats stop: suspect, then offline after 3 intervals without one.
    let deadline = Instant::now() + Duration::from_secs(6);
    while node_state(&h.client).await != "offline" {
        assert!(
            Instant::now() < deadline,
            "the silent node never went offline"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A beat does not bring it back: the node is asked for the report that does.
    node.send(&beat::encode(grant.session, 9, &key))
        .await
        .unwrap();
    let n = recv(&node, &mut buf).await;
    assert_eq!(beat::parse_report_request(&buf[..n]), Some(grant.session));
    assert_eq!(node_state(&h.client).await, "offline");
}
