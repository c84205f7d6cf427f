//! Which connections are idle, oldest first: no request in flight (its TLS handshake, the wait
//! for its first request, or between keep-alive requests). At the connection limit the accept
//! loop closes the oldest idle connection to make room for a new one, so connections that send
//! nothing cannot hold every permit: a flood of idle connections only evicts its own older
//! ones, while a request in flight (a stream included) is never cut.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio_util::sync::CancellationToken;

/// The idle connections of one listener.
#[derive(Default)]
pub(crate) struct IdleSet {
    inner: Mutex<Inner>,
    /// Woken when a connection turns idle: an accept loop waiting for room may evict it.
    turned_idle: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    next: u64,
    by_age: BTreeMap<u64, std::sync::Weak<Conn>>,
}

impl IdleSet {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection, idle until its first request starts.
    pub(crate) fn register(self: &Arc<Self>) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            set: self.clone(),
            evict: CancellationToken::new(),
            state: Mutex::new(ConnState::default()),
        });
        conn.idle_again(&mut conn.state());
        conn
    }

    /// Closes the connection idle the longest; false when none is idle. Decided under that
    /// connection's own lock: one whose request started meanwhile is not closed, the next
    /// oldest is.
    pub(crate) fn evict_oldest(&self) -> bool {
        loop {
            let Some((_, conn)) = self.lock().by_age.pop_first() else {
                return false;
            };
            let Some(conn) = conn.upgrade() else {
                continue;
            };
            let state = conn.state();
            if state.in_flight == 0 {
                conn.evict.cancel();
                return true;
            }
        }
    }

    /// Resolves when a connection turns idle (then [`IdleSet::evict_oldest`] may make room).
    pub(crate) async fn turned_idle(&self) {
        self.turned_idle.notified().await;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_age.len()
    }
}

#[derive(Default)]
struct ConnState {
    /// Its place in the idle set while idle.
    key: Option<u64>,
    in_flight: usize,
}

/// One connection's entry: busy while a request (and its response body) is in flight.
pub(crate) struct Conn {
    set: Arc<IdleSet>,
    /// Fires when the accept loop evicts it.
    pub(crate) evict: CancellationToken,
    state: Mutex<ConnState>,
}

impl Conn {
    fn state(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn idle_again(self: &Arc<Self>, state: &mut ConnState) {
        let mut set = self.set.lock();
        let key = set.next;
        set.next += 1;
        set.by_age.insert(key, Arc::downgrade(self));
        state.key = Some(key);
        drop(set);
        self.set.turned_idle.notify_one();
    }

    /// A request starts: the connection is busy until the returned guard drops (with the
    /// response body).
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        let mut state = self.state();
        state.in_flight += 1;
        if let Some(key) = state.key.take() {
            self.set.lock().by_age.remove(&key);
        }
        Busy(self.clone())
    }

    /// The connection ended.
    pub(crate) fn closed(&self) {
        if let Some(key) = self.state().key.take() {
            self.set.lock().by_age.remove(&key);
        }
    }
}

/// Held while a request of a connection is in flight.
pub(crate) struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        let conn = &self.0;
        let mut state = conn.state();
        state.in_flight -= 1;
        if state.in_flight == 0 && !conn.evict.is_cancelled() {
            conn.idle_again(&mut state);
        }
    }
}

/// A response body that keeps its connection busy until it is sent whole (or dropped).
pub(crate) struct Tracked {
    pub(crate) inner: Body,
    pub(crate) _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_idle_goes_first_and_busy_ones_never() {
        let set = Arc::new(IdleSet::default());
        let a = set.register();
        let b = set.register();
        let c = set.register();
        // a is busy (a stream): not evictable.
        let stream = a.busy();
        assert_eq!(set.len(), 2);
        assert!(set.evict_oldest());
        assert!(b.evict.is_cancelled() && !c.evict.is_cancelled());
        // a's request ends: it is idle again, and younger than c.
        drop(stream);
        assert!(set.evict_oldest());
        assert!(c.evict.is_cancelled() && !a.evict.is_cancelled());
        a.closed();
        assert!(!set.evict_oldest());
    }
}
