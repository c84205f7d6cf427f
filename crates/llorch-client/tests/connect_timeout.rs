//! A peer that never accepts the connection (its listen queue is full, as on an overloaded or
//! wedged node) is reported unreachable within `CONNECT_TIMEOUT`, over TCP on loopback.

use std::time::{Duration, Instant};

use llorch_client::{ClientError, HttpClient, CONNECT_TIMEOUT};
use tokio::net::{TcpSocket, TcpStream};

#[tokio::test]
async fn a_full_listen_queue_is_unreachable_within_the_connect_timeout() {
    // A listener that never accepts, with the smallest queue, filled by connections we hold.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    assert!(
        held.len() < 8,
        "the kernel kept accepting connections into a queue of 0; cannot test here"
    );

    let client = HttpClient::new(&format!("http://{addr}")).unwrap();
    let started = Instant::now();
    let answer = tokio::time::timeout(
        CONNECT_TIMEOUT * 4,
        client.get_json::<serde_json::Value>("/health"),
    )
    .await
    .expect("the client gave up by itself");
    let waited = started.elapsed();
    assert!(
        matches!(answer, Err(ClientError::Unreachable { .. })),
        "{answer:?}"
    );
    assert!(waited >= CONNECT_TIMEOUT / 2, "{waited:?}");
    drop(listener);
}

/// The same over a Unix socket (an engine's): a socket whose queue is full answers `UnixClient`
/// with a connect error within `CONNECT_TIMEOUT`, never a wait without end.
#[tokio::test]
async fn a_full_unix_socket_is_a_connect_error_within_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("engine.sock");
    let socket = tokio::net::UnixSocket::new_stream().unwrap();
    socket.bind(&path).unwrap();
    let listener = socket.listen(0).unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::UnixStream::connect(&path),
        )
        .await
        {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    assert!(held.len() < 8, "the kernel kept queueing connections");

    let client = llorch_client::UnixClient::new(&path);
    let answer = tokio::time::timeout(CONNECT_TIMEOUT * 4, client.get_bytes("/health"))
        .await
        .expect("the client gave up by itself");
    assert!(
        matches!(answer, Err(ClientError::Connect { .. })),
        "{answer:?}"
    );
    drop(listener);
}
