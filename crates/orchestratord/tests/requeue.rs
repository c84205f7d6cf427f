//! A task whose every dispatch fails before its stream starts (the request crashes its engine)
//! is tried `MAX_DISPATCH_ATTEMPTS` times and then ends with `ENGINE_FAILED`; it is not
//! requeued forever. orchestratord runs in process on a real socket; the node is a stand-in
//! that registers, heartbeats, and closes every forwarded request's connection before any
//! header, as pool-managerd's forward does when its engine dies under the request.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llorch_client::HttpClient;
use llorch_wire::node::{Heartbeat, NodeAck, PoolState, PoolStatus, Registration};
use orchestratord::dispatch::MAX_DISPATCH_ATTEMPTS;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn pool() -> PoolStatus {
    PoolStatus {
        pool_id: "p".into(),
        model_id: "m".into(),
        state: PoolState::Ready,
        slots_total: 1,
        slots_busy: 0,
        ctx_per_slot: 1024,
        device: "cpu".into(),
        engine_version: None,
        engine_pid: Some(42),
        restarts: 0,
        last_error: None,
        draining: false,
        on_demand: false,
        load_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_crashes_its_engine_ends_after_its_attempts() {
    // The node: every connection is read from and closed without an answer.
    let node = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node_addr = node.local_addr().unwrap();
    let forwards = Arc::new(AtomicU32::new(0));
    let seen = forwards.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = node.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
        }
    });

    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", api.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let state = orchestratord::State::new(orchestratord::Config::default());
    tokio::spawn(orchestratord::serve_state(state, api, shutdown.clone()));

    let client = HttpClient::new(&url).unwrap();
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
            },
        )
        .await
        .unwrap();
    // Heartbeats keep reporting the same engine ready, which clears the suspect mark one
    // second after each failure, so the task is dispatched again and again.
    let beats = client.clone();
    tokio::spawn(async move {
        loop {
            let hb = Heartbeat {
                pools: vec![pool()],
                staged_models: vec![],
            };
            let _: Result<NodeAck, _> = beats.post_json("/v2/nodes/n/heartbeat", &hb).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

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
    let last = tokio::time::timeout(Duration::from_secs(30), async {
        let mut last = None;
        while let Some(frame) = events.next_frame().await {
            let frame = frame.unwrap();
            if frame.event == "error" || frame.event == "end" {
                last = Some(frame);
                break;
            }
        }
        last
    })
    .await
    .expect("the task ended (it was not requeued forever)")
    .expect("a final event");
    assert_eq!(last.event, "error", "{last:?}");
    let body: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(body["code"], "ENGINE_FAILED", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(&format!("failed {MAX_DISPATCH_ATTEMPTS} times")),
        "{body}"
    );
    assert_eq!(forwards.load(Ordering::SeqCst), MAX_DISPATCH_ATTEMPTS);
    shutdown.cancel();
}
