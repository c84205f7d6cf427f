//! The loop with TLS on a TCP listener, as orchestratord and a worker's node API face the
//! network: a client that trusts the CA is served; one that trusts only the system's store, a
//! plaintext client, and a client that never starts its handshake are all refused, and none of
//! them holds the listener.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use llorch_client::{HttpClient, TlsRoots};
use llorch_tests::pki::Ca;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_tls_listener_serves_verified_clients_only() {
    let dir = tempfile_dir();
    let ca = Ca::new(&dir, "test");
    let server = ca.server("api", &["localhost", "127.0.0.1"]);
    let tls = llorch_http::tls::acceptor(&server.cert, &server.key).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new().route("/health", get(|| async { "ok" }));
    let stop = CancellationToken::new();
    let limits = llorch_http::Limits {
        max_connections: 8,
        header_read: Duration::from_secs(1),
    };
    let served = tokio::spawn(llorch_http::serve(
        listener,
        app,
        limits,
        Some(tls),
        stop.clone(),
    ));

    // A silent client (no ClientHello) is closed after the header deadline, and meanwhile the
    // others are served.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();

    // Trusting the CA: served, by IP address and by name.
    let roots = TlsRoots::from_pem_file(&ca.cert).unwrap();
    for addr in [
        format!("https://127.0.0.1:{port}"),
        format!("https://localhost:{port}"),
    ] {
        let client = HttpClient::with_roots(&addr, &roots).unwrap();
        assert!(client.is_tls());
        let status = health(&client)
            .await
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert_eq!(status, 200, "{addr}");
    }

    // Trusting only the system's store: the certificate is refused, and the error says why.
    let system = HttpClient::new(&format!("https://127.0.0.1:{port}")).unwrap();
    let err = health(&system).await.unwrap_err().to_string();
    assert!(err.contains("certificate"), "{err}");

    // Plain HTTP: no HTTP answer comes back, the connection is closed.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer))
        .await
        .expect("a plaintext client is closed");
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut rest))
        .await
        .expect("a client that never starts TLS is closed after the deadline");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the loop ends on shutdown")
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

async fn health(client: &HttpClient) -> Result<hyper::StatusCode, llorch_client::ClientError> {
    let req = client.build(
        client.request(hyper::Method::GET, "/health"),
        Default::default(),
    )?;
    Ok(client.send(req).await?.status())
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("llorch-http-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
