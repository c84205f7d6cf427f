//! The loop on a Unix socket, as pool-managerd's node API runs at home: a request is served,
//! and a client that trickles its headers is closed after the deadline.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_unix_listener_serves_and_closes_trickled_headers() {
    let dir = std::env::temp_dir().join(format!("llorch-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let app = Router::new().route("/health", get(|| async { "ok" }));
    let stop = CancellationToken::new();
    let limits = llorch_http::Limits {
        max_connections: 8,
        header_read: Duration::from_secs(1),
    };
    let server = tokio::spawn(llorch_http::serve(
        listener,
        app,
        limits,
        None,
        stop.clone(),
    ));

    let mut ok = UnixStream::connect(&path).await.unwrap();
    ok.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    ok.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(answer.ends_with(b"ok"));

    let mut slow = UnixStream::connect(&path).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest))
        .await
        .expect("closed after the header deadline")
        .unwrap();

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the loop ends on shutdown")
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
