//! `GET /v2/events`: the fleet, live. A server-sent event stream that a page (the web console)
//! or a script follows: a `snapshot` of the fleet (`state::snapshot`) at once and then every
//! `interval_ms`, and each operator event (`notice`: a node joined or was lost, a pool changed
//! state, the queue saturated) the moment it happens, followed by a fresh snapshot.
//!
//! Read-only, with the API's credentials: a snapshot shows what the caller could read through
//! the other endpoints. Streams are bounded: at most [`MAX_WATCHERS`] open at once, the last
//! [`ADMIN_RESERVED`] of them for the admin credential, so clients cannot lock the operator out.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State as Ext};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use llorch_wire::ErrorBody;
use tokio::sync::{broadcast, mpsc};

use super::{identify, sse, ApiError, AppState};
use crate::refusal::Refusal;
use crate::state::snapshot::{Totals, Viewer};
use crate::state::State;

/// Fleet event streams open at once, all callers together.
pub const MAX_WATCHERS: u32 = 32;
/// Of those, the last ones only the admin credential may open.
pub const ADMIN_RESERVED: u32 = 8;
/// The snapshot interval without `interval_ms`, and its bounds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(1000);
const MIN_INTERVAL_MS: u64 = 250;
/// Also bounds how long a stream whose client went away keeps its place: the server learns of
/// it when a write fails, the second after the client left.
const MAX_INTERVAL_MS: u64 = 10_000;

#[derive(Debug, serde::Deserialize)]
pub struct WatchQuery {
    interval_ms: Option<String>,
}

/// One open stream, counted until dropped.
struct Watcher(Arc<State>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

fn open(state: &Arc<State>, admin: bool) -> Result<Watcher, Refusal> {
    let limit = if admin {
        MAX_WATCHERS
    } else {
        MAX_WATCHERS - ADMIN_RESERVED
    };
    state
        .watchers
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < limit).then_some(n + 1)
        })
        .map(|_| Watcher(state.clone()))
        .map_err(|open| Refusal::WatchStreams {
            open,
            admin_reserved: ADMIN_RESERVED,
        })
}

fn interval(q: &WatchQuery) -> Result<Duration, ApiError> {
    let Some(raw) = q.interval_ms.as_deref() else {
        return Ok(DEFAULT_INTERVAL);
    };
    match raw.parse::<u64>() {
        Ok(ms) if (MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&ms) => {
            Ok(Duration::from_millis(ms))
        }
        _ => Err(ApiError::native((
            StatusCode::BAD_REQUEST,
            ErrorBody::invalid(
                "interval_ms",
                format!(
                    "interval_ms must be a whole number of milliseconds from {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS} (got {raw:?})"
                ),
            ),
        ))),
    }
}

/// `GET /v2/events`.
pub async fn events(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    Query(q): Query<WatchQuery>,
) -> Result<Response, ApiError> {
    let (name, admin) = identify(&state, &headers).map_err(ApiError::native)?;
    let every = interval(&q)?;
    let watcher = open(&state, admin).map_err(ApiError::native)?;
    let viewer = Viewer {
        name,
        admin,
        keyed: state.keys().api.is_some(),
    };
    // Subscribed before the first snapshot: nothing that happens after it is missed.
    let notices = state.events.subscribe();
    let (tx, resp) = sse::channel();
    tokio::spawn(follow(state, viewer, every, notices, tx, watcher));
    Ok(resp)
}

fn frame(event: &str, data: &impl serde::Serialize) -> Bytes {
    let json = serde_json::to_string(data).unwrap_or_else(|_| "{}".into());
    Bytes::from(llorch_wire::sse::frame(event, &json))
}

async fn follow(
    state: AppState,
    viewer: Viewer,
    every: Duration,
    mut notices: broadcast::Receiver<crate::events::Event>,
    tx: mpsc::Sender<Bytes>,
    _watcher: Watcher,
) {
    let mut totals = Totals::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            notice = notices.recv() => match notice {
                Ok(e) => {
                    if tx.send(frame("notice", &e.to_json())).await.is_err() {
                        return;
                    }
                    tick.reset();
                }
                // A lagging stream skips the notices it missed; the next snapshot is whole.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tx.closed() => return,
            _ = state.shutdown.cancelled() => return,
        }
        let snap = state.snapshot(&viewer, &mut totals);
        if tx.send(frame("snapshot", &snap)).await.is_err() {
            return;
        }
    }
}
