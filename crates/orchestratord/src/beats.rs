//! Liveness beats from nodes ([`llorch_wire::beat`]): one UDP socket, read whenever datagrams
//! wait.
//!
//! A heartbeat over HTTPS costs orchestratord about 120 us of CPU, most of it waking up for
//! the request and answering it; 1,000 nodes every 5 s made that 2.5% of a core. A beat is a
//! 52-byte datagram, verified and applied in a batch under one lock; every second beat of a
//! session is acknowledged with one datagram. The socket is read when it is readable, what
//! waits is taken in one batch (at most [`MAX_PER_BATCH`]), and the next wait starts
//! [`COALESCE`] later, so beats share wake-ups; a flood of forged datagrams (no key needed to
//! send them) costs a parse and a lookup each.
//! The buffer is made as large as the kernel allows ([`RECEIVE_BUFFER`]; the socket unit sets
//! `ReceiveBuffer=`, which may exceed that). A node whose beats are lost anyway learns it from
//! the missing acknowledgements within one interval and reports over HTTPS.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use llorch_wire::beat::{self, BEAT_LEN};
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ops::Beats;
use crate::state::State;

/// The window the answers to strangers are counted in.
pub(crate) const REPLY_WINDOW: Duration = Duration::from_millis(100);
/// The most datagrams taken per batch; more are read in the next one, at once.
pub(crate) const MAX_PER_BATCH: usize = 4096;
/// The most report requests sent per [`REPLY_WINDOW`]: answers to strangers stay bounded
/// (and each is smaller than the datagram it answers, so none amplifies).
const MAX_REPLIES_PER_WINDOW: usize = 256;
/// The receive buffer asked for (`SO_RCVBUF`; the kernel caps it at `net.core.rmem_max`).
pub(crate) const RECEIVE_BUFFER: usize = 8 << 20;
/// After a batch, the socket is left to fill this long before it is waited on again: beats
/// share wake-ups (one per beat doubled the control plane's CPU for 1,000 nodes,
/// docs/PERFORMANCE.md). A flood fills the kernel's default buffer (about 270 beats) in this
/// time, and real beats may drop with it; the socket unit's `ReceiveBuffer=8M` holds a flood of
/// 20,000 a second, and a node whose beats go unacknowledged reports over HTTPS anyway.
pub(crate) const COALESCE: Duration = Duration::from_millis(100);

/// Reads beats from `socket` until `shutdown`.
pub async fn serve(state: Arc<State>, socket: std::net::UdpSocket, shutdown: CancellationToken) {
    let raised = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, RECEIVE_BUFFER);
    let buffer = rustix::net::sockopt::socket_recv_buffer_size(&socket).unwrap_or(0);
    tracing::debug!(
        bytes = buffer,
        asked = RECEIVE_BUFFER,
        raised = raised.is_ok(),
        "Beats socket receive buffer."
    );
    let socket = match socket
        .set_nonblocking(true)
        .and_then(|()| UdpSocket::from_std(socket))
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot read the beats socket; nodes heartbeat over HTTP.");
            return;
        }
    };
    let mut batch: Vec<([u8; BEAT_LEN], SocketAddr)> = Vec::new();
    let mut window = Instant::now();
    let mut replies_left = MAX_REPLIES_PER_WINDOW;
    loop {
        tokio::select! {
            r = socket.readable() => if let Err(e) = r {
                tracing::error!(error = %e, "The beats socket failed; nodes heartbeat over HTTP.");
                return;
            },
            () = shutdown.cancelled() => return,
        }
        let malformed = read_batch(&socket, &mut batch);
        let full = batch.len() + malformed as usize >= MAX_PER_BATCH;
        if batch.is_empty() {
            state.metrics.beats("rejected", malformed);
            coalesce(full, &shutdown).await;
            continue;
        }
        let now = Instant::now();
        if now.duration_since(window) >= REPLY_WINDOW {
            window = now;
            replies_left = MAX_REPLIES_PER_WINDOW;
        }
        let Beats {
            ok,
            asked,
            rejected,
            replies,
            acks,
            queued,
        } = crate::ops::beats(&state, &batch, replies_left, now);
        replies_left -= replies.len();
        let rejected = rejected + malformed;
        // Best effort: a lost acknowledgement costs the node one HTTPS report, a lost report
        // request is asked again by its next beat.
        for (ack, to) in acks {
            let _ = socket.try_send_to(&ack, to);
        }
        for (session, to) in replies {
            let _ = socket.try_send_to(&beat::report_request(session), to);
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
        coalesce(full, &shutdown).await;
    }
}

/// Waits [`COALESCE`] before the next read, unless the last batch was full (more waits now).
async fn coalesce(full: bool, shutdown: &CancellationToken) {
    if !full {
        tokio::select! {
            () = tokio::time::sleep(COALESCE) => {}
            () = shutdown.cancelled() => {}
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
        match socket.try_recv_from(&mut buf) {
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
