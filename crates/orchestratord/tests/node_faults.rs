//! orchestratord against nodes that fail in the ways a network and a crashing engine do. It
//! runs in process on a real socket; the node is a stand-in on another socket that registers,
//! heartbeats, and answers forwarded requests badly:
//! - it closes every forwarded request's connection before any header, as a node whose agent
//!   dies under the request does: the task is tried `MAX_DISPATCH_ATTEMPTS` times and then ends
//!   with `ENGINE_FAILED`, it is not requeued forever (an engine that dies under the request is
//!   answered 502 by its node, and that task is not tried again at all: tests/stack.rs);
//! - it takes connections and never answers: an operator's drain gets 504 within
//!   `NODE_ACTION_TIMEOUT`;
//! - it sends an error's head and stalls its body: the dispatch gives up on the body within
//!   `ERROR_BODY_TIMEOUT` instead of holding the slot lease.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llorch_client::HttpClient;
use llorch_wire::node::{Heartbeat, NodeAck, PoolState, PoolStatus, Registration};
use orchestratord::dispatch::MAX_DISPATCH_ATTEMPTS;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy)]
enum Node {
    /// Reads the request, closes the connection.
    ClosesAtOnce,
    /// Reads the request, never answers, keeps the connection.
    NeverAnswers,
    /// Answers 503 with a body it never finishes.
    StallsItsErrorBody,
}

struct Harness {
    client: HttpClient,
    /// Connections the node accepted.
    forwards: Arc<AtomicU32>,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// orchestratord with one registered node that behaves as `behaviour` says, kept ready by
/// heartbeats every 200 ms (which also clear a suspect mark one second after each failure).
async fn start(behaviour: Node) -> Harness {
    let node = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node_addr = node.local_addr().unwrap();
    let forwards = Arc::new(AtomicU32::new(0));
    let seen = forwards.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = node.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                match behaviour {
                    Node::ClosesAtOnce => {}
                    Node::NeverAnswers => {
                        let _ = conn.read(&mut buf).await;
                    }
                    Node::StallsItsErrorBody => {
                        let head = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"code\":";
                        let _ = conn.write_all(head.as_bytes()).await;
                        let _ = conn.read(&mut buf).await;
                    }
                }
            });
        }
    });

    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", api.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    // The operator's token: a drain is an operator's.
    let admin = "admin-token-0123456789abcdef";
    let state = orchestratord::State::new(orchestratord::Config {
        admin_token: Some(
            orchestratord::ApiKeys::parse_admin_token(admin, std::path::Path::new("test")).unwrap(),
        ),
        ..orchestratord::Config::default()
    });
    tokio::spawn(orchestratord::serve_state(state, api, shutdown.clone()));

    let client = HttpClient::new(&url)
        .unwrap()
        .with_token(Some(admin.into()));
    let _: NodeAck = client
        .post_json(
            "/v2/nodes/register",
            &Registration {
                node_id: "n".into(),
                address: format!("http://{node_addr}"),
                version: "0".into(),
                heartbeat_secs: 1,
                pools: vec![pool()],
                staged_models: vec![],
                gpus: Default::default(),
                memory: Vec::new(),
            },
        )
        .await
        .unwrap();
    let beats = client.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let hb = Heartbeat {
                pools: vec![pool()],
                staged_models: vec![],
                gpus: Default::default(),
                memory: Vec::new(),
            };
            let _: Result<NodeAck, _> = beats.post_json("/v2/nodes/n/heartbeat", &hb).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Harness {
        client,
        forwards,
        shutdown,
    }
}

/// Submits a native task and returns its final event's JSON (`end` or `error`).
async fn run_task(client: &HttpClient, limit: Duration) -> (String, Value) {
    let accepted: Value = client
        .post_json(
            "/v2/tasks",
            &json!({"model_ref": "m", "prompt": "hi", "max_tokens": 4}),
        )
        .await
        .unwrap();
    let id = accepted["task_id"].as_str().unwrap();
    let mut events = client
        .events(&format!("/v2/tasks/{id}/events"))
        .await
        .unwrap();
    let last = tokio::time::timeout(limit, async {
        while let Some(frame) = events.next_frame().await {
            let frame = frame.unwrap();
            if frame.event == "error" || frame.event == "end" {
                return Some(frame);
            }
        }
        None
    })
    .await
    .unwrap_or_else(|_| panic!("the task did not end within {limit:?}"))
    .expect("a final event");
    (last.event, serde_json::from_str(&last.data).unwrap())
}

fn pool() -> PoolStatus {
    PoolStatus {
        engine_pid: Some(42),
        ..PoolStatus::new("p", "m", PoolState::Ready, 1, 1024)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_crashes_its_engine_ends_after_its_attempts() {
    let h = start(Node::ClosesAtOnce).await;
    let (event, body) = run_task(&h.client, Duration::from_secs(30)).await;
    assert_eq!(event, "error", "{body}");
    assert_eq!(body["code"], "ENGINE_FAILED", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(&format!("failed {MAX_DISPATCH_ATTEMPTS} times")),
        "{body}"
    );
    assert_eq!(h.forwards.load(Ordering::SeqCst), MAX_DISPATCH_ATTEMPTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_answers_a_drain_is_a_timely_504() {
    let h = start(Node::NeverAnswers).await;
    let started = std::time::Instant::now();
    let empty = json!({});
    let drain = h.client.post_json::<_, Value>("/v2/pools/p/drain", &empty);
    let err = tokio::time::timeout(Duration::from_secs(60), drain)
        .await
        .expect("the drain was answered (not held by the silent node)")
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(
        llorch_client::status_of(&err),
        Some(hyper::StatusCode::GATEWAY_TIMEOUT),
        "{err}"
    );
    assert!(err.to_string().contains("NODE_UNAVAILABLE"), "{err}");
    // Bounded by the timeout, not by the node (a test of the bound, not of speed).
    assert!(
        waited < orchestratord::control::NODE_ACTION_TIMEOUT * 3,
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_error_body_does_not_hold_the_task() {
    let h = start(Node::StallsItsErrorBody).await;
    let limit = llorch_client::ERROR_BODY_TIMEOUT * (MAX_DISPATCH_ATTEMPTS + 3);
    let (event, body) = run_task(&h.client, limit).await;
    assert_eq!(event, "error", "{body}");
    assert_eq!(body["code"], "ENGINE_FAILED", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("no whole body"),
        "{body}"
    );
}
