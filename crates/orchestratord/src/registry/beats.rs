//! Liveness-beat sessions ([`llorch_wire::beat`]): the session a registration grants, and a
//! beat's effect on its node. The socket that reads beats is [`crate::beats`].

use llorch_wire::beat::{Beat, BeatGrant, BeatKey};
use tokio::time::Instant;

use super::{Registry, SUSPECT_FOR};

/// A node registration's beat session ([`llorch_wire::beat`]): its id, key, and the highest
/// counter taken so far (a beat must count higher).
#[derive(Debug)]
pub struct BeatSession {
    pub(crate) id: u64,
    pub(crate) key: BeatKey,
    pub(crate) counter: u64,
    /// Beats are answered with a request for a full heartbeat until one arrives (set when the
    /// node tokens are reloaded: a revoked token stops at the node's next beat).
    pub(crate) report_due: bool,
}

impl BeatSession {
    /// A fresh session for a registration, and the grant that tells the node of it (beats to
    /// `port`). None only when the system's random source fails.
    pub(crate) fn new(port: u16) -> Option<(BeatSession, BeatGrant)> {
        let (key, hex) = BeatKey::generate()?;
        let id = llorch_wire::id::random_u64();
        let grant = BeatGrant {
            port,
            session: id,
            key: hex,
            acks: true,
        };
        let session = BeatSession {
            id,
            key,
            counter: 0,
            report_due: false,
        };
        Some((session, grant))
    }
}

/// What became of one beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BeatOutcome {
    /// Taken: the node is seen now; the acknowledgement to send back.
    Ok([u8; llorch_wire::beat::ACK_LEN]),
    /// Ask the sender for a full report: the session is unknown (the control plane restarted,
    /// or the node registered again since) or its node is offline (a report brings it back).
    ReportAsked,
    /// A tag that does not verify, or a counter not above the last: dropped, no answer.
    Rejected,
}

impl Registry {
    /// Applies one liveness beat. A verified beat of an online node counts as a heartbeat
    /// that repeats the node's last report: the node is seen now, and its pools' suspect
    /// marks older than [`SUSPECT_FOR`] lapse, as a repeated report would clear them.
    pub(crate) fn beat(&mut self, beat: &Beat<'_>, now: Instant) -> BeatOutcome {
        let Some(node) = self
            .beat_sessions
            .get(&beat.session)
            .and_then(|id| self.nodes.get_mut(id))
        else {
            return BeatOutcome::ReportAsked;
        };
        let Some(session) = node.beat.as_mut().filter(|s| s.id == beat.session) else {
            return BeatOutcome::ReportAsked;
        };
        if !beat.verify(&session.key) || beat.counter <= session.counter {
            return BeatOutcome::Rejected;
        }
        session.counter = beat.counter;
        let ack = llorch_wire::beat::ack(beat.session, beat.counter, &session.key);
        if !node.online || session.report_due {
            return BeatOutcome::ReportAsked;
        }
        node.last_seen = now;
        let id = &node.id;
        self.suspect
            .retain(|(n, _), (_, since)| n != id || now.duration_since(*since) < SUSPECT_FOR);
        BeatOutcome::Ok(ack)
    }

    /// Makes every node's next beat ask for a full heartbeat (which checks its token again).
    pub(crate) fn ask_reports(&mut self) {
        for b in self.nodes.values_mut().filter_map(|n| n.beat.as_mut()) {
            b.report_due = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use llorch_wire::node::{PoolState, PoolStatus};

    use super::super::tests::{beat, node};
    use super::*;

    #[test]
    fn a_verified_beat_keeps_a_node_seen_and_anything_else_does_not() {
        use llorch_wire::beat;
        let start = Instant::now();
        let (key, _) = BeatKey::generate().unwrap();
        let (wrong, _) = BeatKey::generate().unwrap();
        let mut n = node("w", start);
        n.pools = vec![PoolStatus::new("p", "m", PoolState::Ready, 2, 1024)];
        n.beat = Some(BeatSession {
            id: 9,
            key: key.clone(),
            counter: 0,
            report_due: false,
        });
        let mut r = Registry::default();
        r.register(n);
        let at = |ms| start + Duration::from_millis(ms);
        let apply = |r: &mut Registry, session, counter, key: &BeatKey, now| {
            let d = beat::encode(session, counter, key);
            r.beat(&beat::parse(&d).unwrap(), now)
        };
        // A pool marked suspect (its engine failed a request) and a node about to be suspect.
        r.mark_suspect(&("w".into(), "p".into()));
        assert!(matches!(
            apply(&mut r, 9, 1, &key, at(500)),
            BeatOutcome::Ok(_)
        ));
        assert_eq!(r.nodes["w"].state(at(1900)), "online", "seen at 0.5 s");
        assert!(
            r.candidates()[0].suspect,
            "the pool's mark is younger than SUSPECT_FOR"
        );
        // Replayed, counted lower, or tagged with another key: dropped; the node is not seen.
        assert_eq!(apply(&mut r, 9, 1, &key, at(900)), BeatOutcome::Rejected);
        assert_eq!(apply(&mut r, 9, 5, &wrong, at(900)), BeatOutcome::Rejected);
        assert_eq!(r.nodes["w"].state(at(2100)), "suspect");
        // A later beat lifts the pool's mark once SUSPECT_FOR has passed, as a repeated report.
        let later = Instant::now() + SUSPECT_FOR;
        assert!(matches!(
            apply(&mut r, 9, 2, &key, later),
            BeatOutcome::Ok(_)
        ));
        assert!(!r.candidates()[0].suspect);
        // After a reload of the node tokens, beats ask for a heartbeat until one comes.
        r.ask_reports();
        assert_eq!(apply(&mut r, 9, 3, &key, later), BeatOutcome::ReportAsked);
        let pools = r.nodes["w"].pools.clone();
        assert!(beat(&mut r, pools));
        assert!(matches!(
            apply(&mut r, 9, 4, &key, later),
            BeatOutcome::Ok(_)
        ));
        // Unknown sessions are asked for a report; so is an offline node, which a beat does not
        // bring back (only a report does).
        assert_eq!(apply(&mut r, 10, 1, &key, later), BeatOutcome::ReportAsked);
        assert_eq!(r.expire_nodes(later + Duration::from_secs(4)), ["w"]);
        assert_eq!(
            apply(&mut r, 9, 5, &key, later + Duration::from_secs(4)),
            BeatOutcome::ReportAsked
        );
        assert!(!r.nodes["w"].online);
        // A new registration replaces the session: the old one is unknown from then on.
        let mut again = node("w", later);
        again.beat = Some(BeatSession {
            id: 11,
            key: key.clone(),
            counter: 0,
            report_due: false,
        });
        r.register(again);
        assert_eq!(apply(&mut r, 9, 6, &key, later), BeatOutcome::ReportAsked);
        assert!(matches!(
            apply(&mut r, 11, 1, &key, later),
            BeatOutcome::Ok(_)
        ));
        assert_eq!(r.beat_sessions.len(), 1);
    }
}
