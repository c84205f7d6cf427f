//! The accept loop of every llama-orch HTTP listener (orchestratord's public API, pool-managerd's
//! node API and metrics listener): at most `max_connections` connections are served at once; at
//! the limit, a new connection closes the one idle the longest (no request in flight: see
//! [`idle`]), and waits in the kernel's listen backlog only when every connection is busy with
//! a request. Each must send a
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

mod idle;
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

/// The address a request came from, in its extensions (`Extension<Peer>`): the peer's IP for
/// TCP listeners, None for Unix sockets (a local process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub Option<std::net::IpAddr>);

/// A listener's peer address, as a [`Peer`].
pub trait PeerAddr {
    fn peer(&self) -> Peer;
}

impl PeerAddr for std::net::SocketAddr {
    fn peer(&self) -> Peer {
        Peer(Some(self.ip()))
    }
}

impl PeerAddr for tokio::net::unix::SocketAddr {
    fn peer(&self) -> Peer {
        Peer(None)
    }
}

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
    L::Addr: std::fmt::Debug + PeerAddr,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let idle = Arc::new(idle::IdleSet::default());
    // Every connection, its TLS handshake included: the loop ends when the last one did.
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(true);
    loop {
        // axum's Listener retries failed accepts (out of descriptors, say) after a pause.
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        // A permit for it: at the limit, the connection idle the longest makes room; when
        // every connection has a request in flight, this one waits (and the next ones wait in
        // the backlog).
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => break,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                // Until a place frees: each time a connection turns idle, it makes room.
                let mut got = None;
                loop {
                    if idle.evict_oldest() {
                        tracing::debug!(peer = ?peer, "At the connection limit: closed the connection idle the longest.");
                    }
                    tokio::select! {
                        p = permits.clone().acquire_owned() => {
                            got = p.ok();
                            break;
                        }
                        () = idle.turned_idle() => {}
                        () = shutdown.cancelled() => break,
                    }
                }
                match got {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        let conn = idle.register();
        let from = peer.peer();
        let (app, http, shutdown) = (app.clone(), http.clone(), shutdown.clone());
        let Some(tls) = &tls else {
            connections.spawn(async move {
                serve_one(TokioIo::new(stream), app, http, shutdown, &conn, from).await;
                conn.closed();
                drop(permit);
            });
            continue;
        };
        // The handshake runs in the connection's own task, so a slow one holds no other.
        let tls = tls.clone();
        let deadline = limits.header_read;
        connections.spawn(async move {
            let handshake = tokio::select! {
                h = tokio::time::timeout(deadline, tls.accept(stream)) => Some(h),
                () = conn.evict.cancelled() => None,
            };
            match handshake {
                Some(Ok(Ok(stream))) => {
                    serve_one(TokioIo::new(stream), app, http, shutdown, &conn, from).await
                }
                Some(Ok(Err(e))) => {
                    tracing::info!(peer = ?peer, error = %e, "Closed a connection that did not complete a TLS handshake.");
                }
                Some(Err(_)) => {
                    tracing::info!(peer = ?peer, "Closed a connection whose TLS handshake took longer than the header deadline.");
                }
                None => {}
            }
            conn.closed();
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
async fn serve_one<I>(
    io: I,
    app: Router,
    http: Http1,
    shutdown: CancellationToken,
    conn_idle: &Arc<idle::Conn>,
    from: Peer,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use hyper::service::Service;
    let first = Arc::new(Notify::new());
    let served = Arc::new(AtomicBool::new(false));
    let svc = TowerToHyperService::new(app);
    let (mark, seen, tracked) = (first.clone(), served.clone(), conn_idle.clone());
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(from);
            if !seen.swap(true, Ordering::Relaxed) {
                mark.notify_one();
            }
            // Busy from the request's head to the end of its response body.
            let busy = tracked.busy();
            let answer = svc.call(req);
            async move {
                let resp = answer.await?;
                Ok::<_, std::convert::Infallible>(
                    resp.map(|inner| axum::body::Body::new(idle::Tracked { inner, _busy: busy })),
                )
            }
        });
    let conn = http.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        // Evicted while idle: what is still being written (the end of the last answer) goes
        // out, a request that arrived meanwhile is answered, then the connection closes.
        () = conn_idle.evict.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(FIRST_REQUEST_GRACE, conn.as_mut()).await;
            return;
        }
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
        let stop = stop.clone();
        let task = tokio::spawn(async move {
            let set = Arc::new(idle::IdleSet::default());
            let conn = set.register();
            serve_one(TokioIo::new(server), app, http, stop, &conn, Peer(None)).await
        });
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
