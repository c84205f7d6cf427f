//! The accept loop on the engine's socket: one HTTP/1.1 connection task per client, graceful
//! shutdown, and the idle exit of on-demand pools (stop accepting once [`Activity`] says no
//! generation request ran for the idle time). What a request gets is [`handle`]'s business.
//!
//! [`Activity`]: super::Activity

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::{handle, Shared};

/// The task that accepts connections on the engine's socket and serves them.
pub struct Server {
    task: tokio::task::JoinHandle<()>,
    /// Cancelled by [`Server::stop_accepting`]: stop accepting, then give open connections a
    /// moment to end.
    stop: CancellationToken,
    /// Cancelled by the accept loop when the idle clock ran out; it stopped accepting by then.
    idle: CancellationToken,
}

impl Server {
    /// Serves `listener` from now on; requests wait for, or report, the load through `shared`.
    /// With `idle_exit`, stops accepting once no generation request has been in progress for
    /// that long.
    pub fn start(listener: UnixListener, shared: Arc<Shared>, idle_exit: Option<Duration>) -> Self {
        let stop = CancellationToken::new();
        let idle = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            shared,
            idle_exit,
            stop.clone(),
            idle.clone(),
        ));
        Self { task, stop, idle }
    }

    /// Returns once the idle clock ran out and the server stopped accepting (never without
    /// `idle_exit`).
    pub async fn idle(&self) {
        self.idle.cancelled().await;
    }

    /// Stops accepting; open connections get two seconds to end after their current response.
    pub fn stop_accepting(&self) {
        self.stop.cancel();
    }

    /// Returns once the accept loop has ended: after [`Server::stop_accepting`], or after the
    /// idle exit once every accepted connection is done.
    pub async fn finished(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Accepts and serves connections until `stop` is cancelled or, with `idle_exit`, until no
/// generation request has been in progress for that long (then cancels `idle`).
async fn accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    idle_exit: Option<Duration>,
    stop: CancellationToken,
    idle: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let idle_clock = async {
        match idle_exit {
            Some(d) => {
                shared.wait_loaded().await;
                shared.activity.idle_for(d).await
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(idle_clock);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "Accept failed.");
                    continue;
                }
            },
            _ = stop.cancelled() => break,
            () = &mut idle_clock => {
                // Nothing new is accepted from here; what the accepted connections
                // still send is served in full before the engine exits.
                idle.cancel();
                graceful.shutdown().await;
                return;
            }
        };
        let shared = Arc::clone(&shared);
        // Until its first request arrives, a connection keeps the engine from going
        // idle: it may carry a generation request.
        let arrival = std::sync::Mutex::new(Some(shared.activity.arriving()));
        let svc = service_fn(move |req| {
            let first = llorch_os::sync::lock(&arrival).take();
            handle(Arc::clone(&shared), req, first)
        });
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "Connection ended with an error.");
            }
        });
    }
    // Streams end once their final event is written; do not wait on a stuck client
    // forever.
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
}
