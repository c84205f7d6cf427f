//! The accept loop of every llama-orch HTTP listener (orchestratord's public API, pool-managerd's
//! node API and metrics listener): at most `max_connections` connections are served at once
//! (further ones wait in the kernel's listen backlog, nothing is refused), each must send a
//! request's headers within `header_read` of the server being ready to read them (a client
//! that trickles its headers, or a keep-alive connection idle that long, is closed), and on
//! shutdown the listener closes while open connections finish their current request (one
//! accepted at the last moment gets its first request answered: [`FIRST_REQUEST_GRACE`]).
//!
//! axum's own `serve` sets no header deadline and no connection limit, which leaves a listener
//! open to slowloris; this is the same hyper HTTP/1 server with both.
//!
//! With a [`tls::Acceptor`], every connection must complete a TLS handshake (within the same
//! header deadline) before any HTTP is read; one that does not (a plaintext client, a scanner)
//! is closed and logged.

pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Once the stop came, how long a connection that has not had its first request yet (accepted
/// just before the stop, its TLS handshake perhaps still running) waits for it; the request is
/// then answered and the connection closed. Connections that were served already close when
/// idle, at once.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// How one listener's connections are bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read: Duration,
}

impl Default for Limits {
    /// For listeners without knobs of their own: 4096 connections, 30 s for the headers.
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_read: Duration::from_secs(30),
        }
    }
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until `shutdown` fires, then waits
/// for open connections to end their current request (the caller bounds that wait).
pub async fn serve<L: Listener>(
    mut listener: L,
    app: Router,
    limits: Limits,
    tls: Option<tls::Acceptor>,
    shutdown: CancellationToken,
) where
    L::Addr: std::fmt::Debug,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Every connection, its TLS handshake included: the loop ends when the last one did.
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(true);
    loop {
        // A permit first: at the limit, the next connection stays in the backlog.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        // axum's Listener retries failed accepts (out of descriptors, say) after a pause.
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (app, http, shutdown) = (app.clone(), http.clone(), shutdown.clone());
        let Some(tls) = &tls else {
            connections.spawn(async move {
                serve_one(TokioIo::new(stream), app, http, shutdown).await;
                drop(permit);
            });
            continue;
        };
        // The handshake runs in the connection's own task, so a slow one holds no other.
        let tls = tls.clone();
        let deadline = limits.header_read;
        connections.spawn(async move {
            match tokio::time::timeout(deadline, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_one(TokioIo::new(stream), app, http, shutdown).await,
                Ok(Err(e)) => {
                    tracing::info!(peer = ?peer, error = %e, "Closed a connection that did not complete a TLS handshake.");
                }
                Err(_) => {
                    tracing::info!(peer = ?peer, "Closed a connection whose TLS handshake took longer than the header deadline.");
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it ends. Once `shutdown` fires, it closes as soon as it is idle
/// (a request in flight is answered first); one that has not had its first request yet waits
/// up to [`FIRST_REQUEST_GRACE`] for it, so a client whose connection was accepted just before
/// the stop is answered rather than cut off.
async fn serve_one<I>(io: I, app: Router, http: Http1, shutdown: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use hyper::service::Service;
    let first = Arc::new(Notify::new());
    let served = Arc::new(AtomicBool::new(false));
    let svc = TowerToHyperService::new(app);
    let (mark, seen) = (first.clone(), served.clone());
    let service = hyper::service::service_fn(move |req| {
        if !seen.swap(true, Ordering::Relaxed) {
            mark.notify_one();
        }
        svc.call(req)
    });
    let conn = http.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = shutdown.cancelled() => {}
    }
    if !served.load(Ordering::Relaxed) {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = first.notified() => {}
            () = tokio::time::sleep(FIRST_REQUEST_GRACE) => {}
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

type Http1 = hyper::server::conn::http1::Builder;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn start(stop: &CancellationToken) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(4096);
        let app = Router::new().route("/health", get(|| async { "ok" }));
        let mut http = Http1::new();
        http.timer(TokioTimer::new());
        let task = tokio::spawn(serve_one(TokioIo::new(server), app, http, stop.clone()));
        (client, task)
    }

    #[tokio::test]
    async fn a_first_request_after_the_stop_is_answered() {
        // The stop came before the connection was served at all (its TLS handshake ended
        // after it, say): its first request still gets its answer, then it closes.
        let stop = CancellationToken::new();
        stop.cancel();
        let (mut client, task) = start(&stop);
        client
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer))
            .await
            .expect("answered and closed")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_grace_and_a_served_one_at_once() {
        let stop = CancellationToken::new();
        let (_silent, silent_task) = start(&stop);
        let (mut served, served_task) = start(&stop);
        served
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let mut answer = Vec::new();
        while !answer.ends_with(b"ok") {
            let n = served.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the answer");
            answer.extend_from_slice(&buf[..n]);
        }
        let stopped = tokio::time::Instant::now();
        stop.cancel();
        // The served, idle keep-alive connection closes at once.
        served_task.await.unwrap();
        assert!(
            stopped.elapsed() < FIRST_REQUEST_GRACE / 2,
            "{:?}",
            stopped.elapsed()
        );
        // The silent one after the grace, not before and not much later.
        silent_task.await.unwrap();
        let waited = stopped.elapsed();
        assert!(
            waited >= FIRST_REQUEST_GRACE && waited < FIRST_REQUEST_GRACE * 2,
            "{waited:?}"
        );
    }
}
