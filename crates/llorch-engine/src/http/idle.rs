//! The idle clock of on-demand pools: [`Activity`] counts generation requests in progress and
//! accepted connections whose first request has not arrived, and remembers when the last
//! generation request ended. It does not decide what idling means; the accept loop
//! (`server.rs`) waits on [`Activity::idle_for`] and stops accepting when it returns.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Generation requests in progress, connections whose first request has not arrived yet,
/// and when the last generation request ended.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<ActivityState>,
    changed: Notify,
}

#[derive(Debug, Clone, Copy)]
struct ActivityState {
    generating: usize,
    /// Accepted connections that sent no request yet: one may be a generation request, so
    /// the engine does not go idle under it; they do not restart the idle clock.
    arriving: usize,
    last: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                generating: 0,
                arriving: 0,
                last: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }
}

impl Activity {
    /// Counts one generation request from now until the guard drops.
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        llorch_os::sync::lock(&self.state).generating += 1;
        self.changed.notify_waiters();
        ActivityGuard(Arc::clone(self))
    }

    /// Counts one accepted connection until its first request arrives (the guard drops).
    pub fn arriving(self: &Arc<Self>) -> ArrivalGuard {
        llorch_os::sync::lock(&self.state).arriving += 1;
        self.changed.notify_waiters();
        ArrivalGuard(Arc::clone(self))
    }

    /// Restarts the idle clock.
    pub fn touch(&self) {
        llorch_os::sync::lock(&self.state).last = Instant::now();
        self.changed.notify_waiters();
    }

    /// Returns once no generation request has been in progress for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let woken = self.changed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let ActivityState {
                generating,
                arriving,
                last,
            } = *llorch_os::sync::lock(&self.state);
            if generating > 0 || arriving > 0 {
                woken.await;
                continue;
            }
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline.into()) => {}
                () = woken => {}
            }
        }
    }
}

/// One generation request in progress; its drop ends it and restarts the idle clock.
#[derive(Debug)]
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        {
            let mut s = llorch_os::sync::lock(&self.0.state);
            s.generating -= 1;
            s.last = Instant::now();
        }
        self.0.changed.notify_waiters();
    }
}

/// One accepted connection whose first request has not reached [`handle`](super::handle) yet.
#[derive(Debug)]
pub struct ArrivalGuard(Arc<Activity>);

impl Drop for ArrivalGuard {
    fn drop(&mut self) {
        llorch_os::sync::lock(&self.0.state).arriving -= 1;
        self.0.changed.notify_waiters();
    }
}
