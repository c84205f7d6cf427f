//! The accept loop of every llama-orch HTTP listener (orchestratord's public API, pool-managerd's
//! node API and metrics listener): at most `max_connections` connections are served at once
//! (further ones wait in the kernel's listen backlog, nothing is refused), each must send a
//! request's headers within `header_read` of the server being ready to read them (a client
//! that trickles its headers, or a keep-alive connection idle that long, is closed), and on
//! shutdown the listener closes while open connections finish their current request.
//!
//! axum's own `serve` sets no header deadline and no connection limit, which leaves a listener
//! open to slowloris; this is the same hyper HTTP/1 server with both.

use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

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

/// Serves `app` on `listener` until `shutdown` fires, then waits for open connections to end
/// their current request (the caller bounds that wait).
pub async fn serve<L: Listener>(
    mut listener: L,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
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
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
