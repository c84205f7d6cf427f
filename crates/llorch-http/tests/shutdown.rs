//! Stopping a listener: a served, idle keep-alive connection is closed at once, the loop ends
//! and nothing accepts. (A connection not served yet gets its first request answered: the
//! unit tests in `src/lib.rs`.)

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Sends one keep-alive request and reads its whole answer (the body is 2 bytes).
async fn ask(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"ok") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn the_stop_closes_idle_connections_and_ends_the_loop() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new().route("/health", get(|| async { "ok" }));
    let stop = CancellationToken::new();
    let served = tokio::spawn(llorch_http::serve(
        listener,
        app,
        llorch_http::Limits::default(),
        None,
        stop.clone(),
    ));
    // Served once: its connection is accepted and idle when the stop comes.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert!(ask(&mut idle).await.starts_with("HTTP/1.1 200"));
    stop.cancel();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        llorch_http::FIRST_REQUEST_GRACE / 2,
        idle.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "an idle keep-alive connection stayed open");
    assert!(rest.is_empty(), "{rest:?}");
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the loop ends")
        .unwrap();
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
}
