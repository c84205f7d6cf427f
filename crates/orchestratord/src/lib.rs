//! orchestratord: the control plane.
//!
//! Code map (where a request is admitted, placed, streamed and cancelled). The fronts
//! translate; the core decides:
//!
//! Fronts, which authenticate, decode and map answers, and never take the core's lock:
//! - [`api`]: HTTP routes (`api/mod.rs`), error envelopes and the HTTP status of each
//!   refusal (`api/error.rs`); [`api::openai`] (`request.rs` validation, `run.rs` the task,
//!   `response.rs` whole answers, `stream.rs` chunks) and [`api::native`] turn requests into
//!   [`state::Submission`]s; [`api::anthropic`], [`api::responses`] and [`api::ollama`]
//!   translate their surfaces into the same engine request; [`api::nodes`] takes
//!   registrations and heartbeats.
//! - [`console`]: the web console's pages and scripts under `/ui/` (embedded; they call the
//!   API like any client); `api/watch.rs`: `GET /v2/events`, the fleet as a live stream of
//!   snapshots (`state/snapshot.rs`) and operator events.
//! - [`dbus`]: `org.llamaorch.Orchestrator1`, its properties, methods and signals.
//! - [`beats`]: the UDP socket that reads liveness beats in batches.
//!
//! The core:
//! - [`state`]: [`state::State`] and the core behind its one short lock; `state/admit.rs`:
//!   [`state::State::submit`] admits (model, placement feasibility, deadline, queue policy);
//!   `finish.rs`: a task's end, [`state::State::cancel`], the journal record; `views.rs`: the
//!   read-only views the fronts call; `subscribers.rs`: event-stream limits.
//! - [`control`]: operator actions (drain, resume, cancel any task, reload keys); [`ops`]:
//!   node registration, heartbeats and batches of beats. Both are shared by every front.
//! - [`refusal`]: why the core declines a request ([`refusal::Refusal`]); each front maps it
//!   to its own answer.
//! - [`admission`]: the bounded queue (priorities, fair turns, drop-lru, deadlines) and the
//!   service-rate estimate behind `Retry-After` and `predicted_start_ms`.
//! - [`placement`]: the pure placement function.
//! - [`dispatch`]: the dispatcher loop (`dispatch/mod.rs`), slot leases (`lease.rs`),
//!   forwarding a task to its node and relaying its events (`forward.rs`), node liveness
//!   (`liveness.rs`).
//! - [`tasks`]: tasks and their bounded event logs (late subscribers get the whole stream).
//! - [`registry`]: nodes, pools and suspect pools (`registry/mod.rs`), beat sessions
//!   (`beats.rs`), leases and service rates (`leases.rs`), sessions (`sessions.rs`).
//! - [`metrics`]: the Prometheus metrics, set from events and from a [`metrics::Gauges`]
//!   snapshot ([`state::State::finish`] and [`state::State::complete`] write a task's
//!   metrics and journal record, once per task); [`events`]: the operator events the D-Bus
//!   front turns into signals.
//! - [`outcome`]: the label vocabularies (front, outcome, rejection, cancel reason, placement
//!   decision), below both [`tasks`] and [`metrics`].
//! - [`conversations`]: stored answers of the Responses API (per key, bounded, with a TTL).
//! - [`auth`], [`config`]. Locks are taken through `llorch_os::sync` (the workspace's policy:
//!   they outlive a panic).
//!
//! Layering: no module reaches itself through another (`tests/layout.rs` checks every crate);
//! shared types move down ([`outcome`], [`metrics::Gauges`]) rather than up.
//!
//! Invariants: only [`placement`] decides where a task runs; a slot lease is returned exactly
//! once (by `Drop`); no lock is held across an `.await`; nothing a client or a node sends can
//! reach a panic (registrations and heartbeats are validated whole before use, sums over node
//! input saturate).

// The code map above links the crate's internals on purpose: it is read in the source and in
// `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod admission;
pub(crate) mod api;
pub(crate) mod auth;
pub mod beats;
pub mod config;
pub(crate) mod console;
pub mod control;
pub(crate) mod conversations;
pub mod dbus;
pub mod dispatch;
pub(crate) mod events;
pub(crate) mod metrics;
pub(crate) mod ops;
pub(crate) mod outcome;
pub mod placement;
pub(crate) mod prefixes;
pub(crate) mod refusal;
pub mod registry;
pub mod secrets;
pub mod state;
pub(crate) mod tasks;

use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use auth::ApiKeys;
pub use config::{Args, Config};
pub use state::State;

/// Exit codes (the workspace's, `llorch_wire::exit`): 64 configuration invalid; 69 a listener
/// or the D-Bus name cannot be had; 70 an internal failure (signal handlers, the server loop).
pub use llorch_wire::exit;

/// How long open streams may run after shutdown was asked before the process exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = State::new(config);
    serve_state(state, listener, shutdown).await
}

/// Runs the dispatcher loop and starts it again should a bug panic inside it: a control plane
/// that serves requests but no longer dispatches would be the worst of both. (Under systemd a
/// wedged loop is also caught by the watchdog it feeds.)
async fn supervise_dispatcher(state: Arc<State>) {
    // Aborting this task (shutdown) must abort the loop it runs too.
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    loop {
        let run = tokio::spawn(dispatch::run(state.clone()));
        let _abort = AbortOnDrop(run.abort_handle());
        match run.await {
            Err(e) if e.is_panic() => {
                tracing::error!("The dispatcher panicked; starting it again.");
                // A bug that panics on every pass must not spin a core.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => return,
        }
    }
}

/// Serves the API in plain HTTP on a Unix socket (`--local-socket`, or the inherited socket
/// named `local`) until `shutdown` fires: how this machine's node agent reaches a control plane
/// whose API listens only on another address or only in TLS. The socket file's owner and mode
/// decide who connects; requests pass the same checks as on a loopback listener.
pub async fn serve_local(
    state: Arc<State>,
    listener: tokio::net::UnixListener,
    shutdown: CancellationToken,
) {
    let (app, limits) = app_for(&state, None);
    llorch_http::serve(listener, app, limits, None, shutdown).await;
}

/// The API's router for a listener at `local` (None: a Unix socket), with its connection
/// bounds.
fn app_for(
    state: &Arc<State>,
    local: Option<std::net::SocketAddr>,
) -> (axum::Router, llorch_http::Limits) {
    let boundary = api::Boundary::new(
        local,
        &state.config.allowed_hosts,
        state.config.cors_origins.clone(),
    );
    let limits = llorch_http::Limits {
        max_connections: state.config.max_connections,
        header_read: state.config.header_read,
    };
    (api::router(state.clone(), boundary), limits)
}

pub async fn serve_state(
    state: Arc<State>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let dispatcher = tokio::spawn(supervise_dispatcher(state.clone()));
    let watcher = tokio::spawn(dispatch::watch_nodes(state.clone()));
    let (app, limits) = app_for(&state, listener.local_addr().ok());
    // Small SSE writes must leave at once: Nagle's algorithm would hold them for an ACK.
    let listener = listener.tap_io(|s| {
        let _ = s.set_nodelay(true);
    });
    let tls = state.config.tls.clone().map(|t| t.0);
    let server = tokio::spawn(llorch_http::serve(
        listener,
        app,
        limits,
        tls,
        shutdown.clone(),
    ));
    // The listener is bound and the (empty) registry exists: requests are served from here on.
    llorch_os::service::ready_with_status(&state.status_line());
    shutdown.cancelled().await;
    llorch_os::service::stopping();
    tracing::info!(
        "Stopping: no new connections; open streams get {} s.",
        SHUTDOWN_GRACE.as_secs()
    );
    // Tasks queued now end at once, retriable: the next process takes them sooner than this
    // one could. The dispatcher keeps running while connections accepted before the stop are
    // served: a request that arrives on one (its TLS handshake was still running when the stop
    // came) is placed and answered, not left in a queue nobody reads until the process exits.
    let why = "orchestratord is stopping; submit the task again when it is back";
    // What can start now starts first: a task admitted a moment before the stop has not met
    // the dispatcher yet, and failing it would turn a free slot into a retry.
    dispatch::settle(&state, Duration::from_millis(500)).await;
    state.fail_queued(why);
    let mut server = server;
    if tokio::time::timeout(SHUTDOWN_GRACE - LAST_CALL, &mut server)
        .await
        .is_err()
    {
        // What still waits gets its answer before the process ends and cuts the connections.
        state.fail_queued(why);
        let _ = tokio::time::timeout(LAST_CALL, &mut server).await;
    }
    state.shutdown.cancel();
    dispatcher.abort();
    watcher.abort();
    Ok(())
}

/// The end of the shutdown grace in which tasks still queued are answered with a retriable
/// error, so their clients hear it before the process exits.
const LAST_CALL: Duration = Duration::from_secs(1);
