//! Stopping a listener: a request that arrives on an open connection just after the stop is
//! still answered (within `FIRST_REQUEST_GRACE`), not cut off; the loop then ends.

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
async fn a_request_right_after_the_stop_is_answered() {
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
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert!(ask(&mut conn).await.starts_with("HTTP/1.1 200"));
    // The connection is idle when the stop comes; its next request arrives right after.
    stop.cancel();
    let answer = ask(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // Then the loop ends, and nothing accepts any more.
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the loop ends")
        .unwrap();
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
}
