//! The public listener under clients that hold connections without sending requests:
//! a client that trickles its headers (slowloris) or idles on a keep-alive connection is
//! closed after `--header-read-secs`; at `--max-connections` a further client closes the
//! connection idle the longest, and waits in the backlog only while every connection has a
//! request in flight (a stream is never cut). orchestratord runs in process on a real socket.

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

/// Opens a task's event stream on a connection of its own and waits for the answer's head:
/// from then on the connection has a request in flight.
async fn streaming(addr: std::net::SocketAddr, task: &str) -> TcpStream {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!("GET /v2/tasks/{task}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the head");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_limit_an_idle_connection_makes_room_and_streams_are_never_cut() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = orchestratord::Config {
        max_connections: 2,
        header_read: Duration::from_secs(30),
        // No node: the task waits in the queue, its stream open, for this long.
        registration_grace: Duration::from_secs(60),
        ..orchestratord::Config::default()
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(orchestratord::serve(config, listener, shutdown.clone()));
    let _stop = Server { addr, shutdown };
    let url = format!("http://{addr}");
    let accepted: serde_json::Value = HttpClient::new(&url)
        .unwrap()
        .post_json(
            "/v2/tasks",
            &serde_json::json!({"model_ref": "m", "prompt": "x"}),
        )
        .await
        .unwrap();
    let task = accepted["task_id"].as_str().unwrap().to_string();

    // One stream and one connection that sends nothing hold both places: the next client
    // closes the idle one and is served at once.
    let a = streaming(addr, &task).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"G").await.unwrap();
    let served = tokio::time::timeout(
        Duration::from_secs(5),
        HttpClient::new(&url)
            .unwrap()
            .get_json::<serde_json::Value>("/health/live"),
    )
    .await
    .expect("served at once: the idle connection made room");
    assert!(served.is_ok(), "{served:?}");
    until_closed(&mut idle, Duration::from_secs(5)).await;

    // Two streams hold both places: nothing is cut, the next client waits in the backlog,
    // and is served once a stream ends.
    let b = streaming(addr, &task).await;
    let waiting = HttpClient::new(&url).unwrap();
    let third = tokio::time::timeout(
        Duration::from_secs(1),
        waiting.get_json::<serde_json::Value>("/health/live"),
    )
    .await;
    assert!(
        third.is_err(),
        "a third client was served while two streams held both places: {third:?}"
    );
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
