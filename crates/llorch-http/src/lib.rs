//! The accept loop of every llama-orch HTTP listener (orchestratord's public API, pool-managerd's
//! node API and metrics listener): at most `max_connections` connections are served at once
//! (further ones wait in the kernel's listen backlog, nothing is refused), each must send a
//! request's headers within `header_read` of the server being ready to read them (a client
//! that trickles its headers, or a keep-alive connection idle that long, is closed), and on
//! shutdown the listener closes while open connections finish their current request (after
//! [`FIRST_REQUEST_GRACE`], so a connection accepted at the last moment is answered too).
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
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// After the listener closes, how long connections are served before the graceful shutdown
/// starts. A connection accepted just before the stop (its TLS handshake still running, its
/// first request on the way) would otherwise count as idle and be closed unanswered; during
/// this time it is read and its request served like any other.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(500);

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
    let graceful = GracefulShutdown::new();
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
        let service = TowerToHyperService::new(app.clone());
        let Some(tls) = &tls else {
            let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                let _ = conn.await;
                drop(permit);
            });
            continue;
        };
        // The handshake runs in the connection's own task, so a slow one holds no other.
        let (tls, http, watcher) = (tls.clone(), http.clone(), graceful.watcher());
        let deadline = limits.header_read;
        tokio::spawn(async move {
            match tokio::time::timeout(deadline, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn).await;
                }
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
    tokio::time::sleep(FIRST_REQUEST_GRACE).await;
    graceful.shutdown().await;
}
