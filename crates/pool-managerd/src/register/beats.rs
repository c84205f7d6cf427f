//! The sending end of a beat session: the UDP socket to the control plane's beats port, the
//! session's key and counter, and whether a report showed that beats arrive.

use std::sync::atomic::{AtomicU64, Ordering};

use llorch_wire::beat::{self, BeatGrant, BeatKey, ACK_LEN, BEATS_PER_INTERVAL, REPORT_EVERY};
use tokio::net::UdpSocket;

/// The sending end of a beat session.
pub(super) struct Beats {
    socket: UdpSocket,
    session: u64,
    key: BeatKey,
    counter: u64,
    /// Whether a report showed that beats arrive.
    verified: bool,
    /// Beats sent since the last report.
    pub(super) sent: u32,
    /// The counter when the last report went out.
    counter_at_report: u64,
    /// Whether the control plane acknowledges each beat it takes.
    acks: bool,
    /// The highest counter acknowledged.
    acked: AtomicU64,
}

impl Beats {
    /// A socket connected to the grant's port on the control plane's host (the host of
    /// `control_plane`, the URL the node registered at).
    pub(super) async fn open(grant: &BeatGrant, control_plane: &str) -> Result<Beats, String> {
        let key = BeatKey::from_hex(&grant.key)?;
        let uri: hyper::Uri = control_plane
            .parse()
            .map_err(|e| format!("{control_plane} is not a URL: {e}"))?;
        let host = uri
            .host()
            .filter(|_| uri.scheme_str() != Some("unix"))
            .ok_or_else(|| format!("{control_plane} is not reached over IP"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let to = tokio::net::lookup_host((host, grant.port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let from = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = UdpSocket::bind(from)
            .await
            .map_err(|e| format!("cannot bind a UDP socket: {e}"))?;
        socket
            .connect(to)
            .await
            .map_err(|e| format!("cannot reach {to} over UDP: {e}"))?;
        Ok(Beats {
            socket,
            session: grant.session,
            key,
            counter: 0,
            verified: false,
            sent: 0,
            counter_at_report: 0,
            acks: grant.acks,
            acked: AtomicU64::new(0),
        })
    }

    /// After a report was taken: `taken` is the highest counter the control plane took. None
    /// of two or more beats since the last report taken means they do not arrive (the older
    /// of them was sent half an interval before, and beats are read every 100 ms): beats stop
    /// until the next registration.
    pub(super) fn reported(mut self, taken: Option<u64>, control_plane: &str) -> Option<Beats> {
        if self.sent >= 2 {
            self.verified = taken.unwrap_or(0) > self.counter_at_report;
            if !self.verified {
                tracing::warn!(
                    control_plane = %control_plane,
                    port = self.socket.peer_addr().map(|a| a.port()).unwrap_or(0),
                    "Liveness beats do not reach the control plane (is its UDP port filtered?); heartbeating over HTTPS every interval instead."
                );
                return None;
            }
        }
        self.sent = 0;
        self.counter_at_report = self.counter;
        Some(self)
    }

    /// Beats that may go between two reports: until a report showed that beats arrive, one
    /// interval's (the check comes early); then [`REPORT_EVERY`] intervals'.
    pub(super) fn report_after(&self) -> u32 {
        if self.verified {
            REPORT_EVERY * BEATS_PER_INTERVAL
        } else {
            BEATS_PER_INTERVAL
        }
    }

    /// Whether the beats of the last interval went unacknowledged (counting from the last
    /// report): the control plane did not take them, whatever the reason, and a report over
    /// HTTPS must go now, before the node turns suspect there. Never without acknowledgements.
    pub(super) fn unacknowledged(&self) -> bool {
        let answered = self
            .acked
            .load(Ordering::Relaxed)
            .max(self.counter_at_report);
        self.acks && self.counter >= answered + u64::from(BEATS_PER_INTERVAL)
    }

    pub(super) async fn send(&mut self) -> std::io::Result<()> {
        self.counter += 1;
        self.sent += 1;
        self.socket
            .send(&beat::encode(self.session, self.counter, &self.key))
            .await
            .map(drop)
    }
}

/// Resolves when the control plane asks for a full report of this session (or the socket
/// reports an error, such as a closed port); never without beats. Takes the acknowledgements
/// meanwhile.
pub(super) async fn report_requested(beats: Option<&Beats>) {
    let Some(b) = beats else {
        return std::future::pending().await;
    };
    let mut buf = [0u8; ACK_LEN + 1];
    loop {
        match b.socket.recv(&mut buf).await {
            Ok(n) if beat::parse_report_request(&buf[..n]) == Some(b.session) => return,
            Ok(n) => {
                if let Some(counter) = beat::parse_ack(&buf[..n], b.session, &b.key) {
                    b.acked.fetch_max(counter, Ordering::Relaxed);
                }
            }
            Err(_) => return,
        }
    }
}
