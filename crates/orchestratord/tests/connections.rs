//! The public listener under clients that hold connections without sending requests:
//! a client that trickles its headers (slowloris) or idles on a keep-alive connection is
//! closed after `--header-read-secs`, and at `--max-connections` a further client waits in the
//! backlog until a connection closes, then is served. orchestratord runs in process on a real
//! socket.

use std::time::Duration;

use llorch_client::HttpClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

struct Server {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(max_connections: usize, header_read: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = orchestratord::Config {
        max_connections,
        header_read,
        ..orchestratord::Config::default()
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(orchestratord::serve(config, listener, shutdown.clone()));
    Server { addr, shutdown }
}

/// Reads until the server closes the connection; the bytes it sent.
async fn until_closed(conn: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 1024];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server closed the connection");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_headers_and_idle_keep_alive_are_closed() {
    let s = start(64, Duration::from_secs(1)).await;
    // Slowloris: a request line and one header, then nothing.
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    until_closed(&mut slow, Duration::from_secs(10)).await;

    // A whole request is answered; the connection then idles and is closed.
    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    idle.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_limit_the_next_client_waits_then_is_served() {
    let s = start(2, Duration::from_secs(30)).await;
    let url = format!("http://{}", s.addr);
    // Two connections that send nothing hold both places.
    let mut a = TcpStream::connect(s.addr).await.unwrap();
    let b = TcpStream::connect(s.addr).await.unwrap();
    // Make sure the server took both: a byte of a request each is read, not answered.
    a.write_all(b"G").await.unwrap();
    let waiting = HttpClient::new(&url).unwrap();
    let third = tokio::time::timeout(
        Duration::from_secs(1),
        waiting.get_json::<serde_json::Value>("/health/live"),
    )
    .await;
    assert!(
        third.is_err(),
        "a third client was served while two connections held both places: {third:?}"
    );
    // One place frees: the next client is served (from the backlog, nothing was refused).
    drop(b);
    let served = tokio::time::timeout(
        Duration::from_secs(10),
        HttpClient::new(&url)
            .unwrap()
            .get_json::<serde_json::Value>("/health/live"),
    )
    .await
    .expect("served once a place freed");
    assert!(served.is_ok(), "{served:?}");
    drop(a);
}
