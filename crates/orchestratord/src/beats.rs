//! Liveness beats from nodes ([`llorch_wire::beat`]): one UDP socket, read in batches.
//!
//! A heartbeat over HTTPS costs orchestratord about 120 us of CPU, most of it waking up for
//! the request and answering it; 1,000 nodes every 5 s made that 2.5% of a core. A beat is a
//! 52-byte datagram nobody answers. The socket is not registered with the runtime's poller:
//! datagrams wait in the kernel's buffer, and this task wakes every [`BATCH_EVERY`] to read
//! what came, verify each tag and apply the batch under one lock. The socket buffer bounds
//! what can wait; at most [`MAX_PER_BATCH`] are taken per wake-up, so a flood costs bounded
//! work and drops in the kernel.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use llorch_wire::beat::{self, BEAT_LEN};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::ops::Beats;
use crate::state::State;

/// How often the socket is read. Small next to any heartbeat interval (1 s at the least), so
/// the time a beat waits is noise in the node's suspect and offline deadlines.
pub(crate) const BATCH_EVERY: Duration = Duration::from_millis(100);
/// The most datagrams taken per read; more wait for the next one or drop in the kernel.
pub(crate) const MAX_PER_BATCH: usize = 4096;
/// The most report requests sent per read: answers to strangers stay bounded (and each is
/// smaller than the datagram it answers, so none amplifies).
const MAX_REPLIES_PER_BATCH: usize = 256;

/// Reads beats from `socket` until `shutdown`.
pub async fn serve(state: Arc<State>, socket: UdpSocket, shutdown: CancellationToken) {
    if let Err(e) = socket.set_nonblocking(true) {
        tracing::error!(error = %e, "Cannot read the beats socket; nodes heartbeat over HTTP.");
        return;
    }
    let mut tick = tokio::time::interval(BATCH_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut batch: Vec<([u8; BEAT_LEN], SocketAddr)> = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let malformed = read_batch(&socket, &mut batch);
        if batch.is_empty() {
            state.metrics.beats("rejected", malformed);
            continue;
        }
        let now = Instant::now();
        let Beats {
            ok,
            asked,
            rejected,
            replies,
            queued,
        } = crate::ops::beats(&state, &batch, MAX_REPLIES_PER_BATCH, now);
        let rejected = rejected + malformed;
        for (session, to) in replies {
            // Best effort: a lost answer is asked again by the node's next beat.
            let _ = socket.send_to(&beat::report_request(session), to);
        }
        state.metrics.beats("ok", ok);
        state.metrics.beats("report_asked", asked);
        state.metrics.beats("rejected", rejected);
        if rejected > 0 {
            tracing::debug!(rejected, "Dropped beats that do not verify.");
        }
        // A suspect node seen again may free the way for waiting tasks.
        if ok > 0 && queued {
            state.wake.notify_one();
        }
    }
}

/// Reads what waits on the socket (at most [`MAX_PER_BATCH`]) into `batch`, keeping the
/// datagrams of a beat's length; returns how many others were dropped.
fn read_batch(socket: &UdpSocket, batch: &mut Vec<([u8; BEAT_LEN], SocketAddr)>) -> u64 {
    batch.clear();
    let mut dropped = 0;
    // One byte more than a beat: a longer datagram is truncated to it and seen as too long.
    let mut buf = [0u8; BEAT_LEN + 1];
    while batch.len() + (dropped as usize) < MAX_PER_BATCH {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if n == BEAT_LEN => {
                let mut d = [0u8; BEAT_LEN];
                d.copy_from_slice(&buf[..BEAT_LEN]);
                batch.push((d, from));
            }
            Ok(_) => dropped += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            // An ICMP error for an earlier answer, or an interrupted call: read on.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionRefused | ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::debug!(error = %e, "Reading the beats socket failed.");
                break;
            }
        }
    }
    dropped
}
