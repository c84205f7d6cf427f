//! Liveness beats: the small UDP datagrams a registered node sends every heartbeat interval
//! instead of a full HTTP heartbeat, while nothing it reports has changed.
//!
//! A beat says "this node is alive and its last report still holds". It carries no secret and
//! no state, only the session the control plane granted at registration (over the
//! authenticated, TLS-protected registration) and a counter, under an HMAC-SHA256 tag keyed
//! with the session's key. The counter stops replays: the control plane takes only a counter
//! higher than the last it took for that session. Anything that changes goes in a full
//! report, the HTTP heartbeat, as before.
//!
//! The control plane answers a beat only to ask for a full report: when it does not know the
//! session (it restarted) or has the node offline. That reply is unauthenticated (a
//! restarted control plane has no key), so a node takes it only as a hint to send its
//! authenticated report sooner, never as a statement.
//!
//! A beat the control plane takes is acknowledged, under the session's key, so a node learns
//! within one interval that its beats stopped arriving (dropped by a filter, or crowded out of
//! the control plane's socket by a flood) and sends its authenticated report over HTTPS
//! instead. Only a beat that verified is acknowledged: a stranger's datagram gets nothing, or
//! the report request, which is smaller than what caused it.
//!
//! ```text
//! beat  (52 bytes): "LOB1" | session u64 BE | counter u64 BE | HMAC-SHA256(key, first 20 bytes)
//! reply (13 bytes): "LOB1" | session u64 BE | 1 (send a full report)
//! ack   (53 bytes): "LOB1" | session u64 BE | counter u64 BE | 2 | HMAC-SHA256(key, first 21 bytes)
//! ```

use ring::hmac;
use serde::{Deserialize, Serialize};

/// The first four bytes of every beat and reply (format version 1).
pub const MAGIC: [u8; 4] = *b"LOB1";
/// Bytes in a beat.
pub const BEAT_LEN: usize = 4 + 8 + 8 + TAG_LEN;
/// Bytes in a reply.
pub const REPLY_LEN: usize = 4 + 8 + 1;
/// Bytes in an acknowledgement.
pub const ACK_LEN: usize = ACK_SIGNED_LEN + TAG_LEN;
const ACK_SIGNED_LEN: usize = 4 + 8 + 8 + 1;
/// Bytes of a session key.
pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 32;
const SIGNED_LEN: usize = 4 + 8 + 8;
/// A node that beats still sends a full report (HTTP heartbeat) at least every this many
/// intervals (a minute at the default 5 s), so what changes without being an event (free GPU
/// memory) stays fresh.
pub const REPORT_EVERY: u32 = 12;
/// Beats per heartbeat interval: two, so one lost datagram never leaves a gap of 1.5
/// intervals (what makes a node suspect). A beat costs the control plane a few microseconds.
pub const BEATS_PER_INTERVAL: u32 = 2;
/// The reply's kind: send a full report now.
const REPLY_REPORT: u8 = 1;
/// The acknowledgement's kind byte.
const REPLY_ACK: u8 = 2;

/// What a registration's answer grants a node that may beat: where, as which session, and the
/// key of its tags (hex). Absent when the control plane takes no beats; the node then sends a
/// full heartbeat every interval, as it always could.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeatGrant {
    /// UDP port on the control plane's host (the host of the URL the node registered at).
    pub port: u16,
    /// The session: names this registration of this node; a new one each registration.
    pub session: u64,
    /// The session's HMAC-SHA256 key, 64 hex digits.
    pub key: String,
    /// Whether each beat taken is acknowledged (control planes before acknowledgements leave
    /// it out, and their nodes do not wait for one).
    #[serde(default)]
    pub acks: bool,
}

/// The key stays out of logs.
impl std::fmt::Debug for BeatGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BeatGrant")
            .field("port", &self.port)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

/// A session's HMAC key.
#[derive(Clone)]
pub struct BeatKey(hmac::Key);

impl std::fmt::Debug for BeatKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeatKey(..)")
    }
}

impl BeatKey {
    /// A fresh random key, and its hex form for the grant. None only when the system's random
    /// source fails.
    pub fn generate() -> Option<(BeatKey, String)> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; KEY_LEN];
        ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
        Some((Self::from_bytes(&bytes), hex::encode(bytes)))
    }

    /// The key of a grant; an error names what is wrong with it.
    pub fn from_hex(key: &str) -> Result<BeatKey, String> {
        let bytes = hex::decode(key).map_err(|e| format!("beat key is not hex: {e}"))?;
        if bytes.len() != KEY_LEN {
            return Err(format!("beat key has {} bytes, not {KEY_LEN}", bytes.len()));
        }
        Ok(Self::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8]) -> BeatKey {
        BeatKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }
}

/// The beat of `session` numbered `counter`.
pub fn encode(session: u64, counter: u64, key: &BeatKey) -> [u8; BEAT_LEN] {
    let mut out = [0u8; BEAT_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4..12].copy_from_slice(&session.to_be_bytes());
    out[12..20].copy_from_slice(&counter.to_be_bytes());
    let tag = hmac::sign(&key.0, &out[..SIGNED_LEN]);
    out[SIGNED_LEN..].copy_from_slice(tag.as_ref());
    out
}

/// A datagram shaped like a beat, not yet verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat<'a> {
    pub session: u64,
    pub counter: u64,
    bytes: &'a [u8],
}

impl Beat<'_> {
    /// Whether the tag is right for `key` (compared in constant time).
    pub fn verify(&self, key: &BeatKey) -> bool {
        hmac::verify(&key.0, &self.bytes[..SIGNED_LEN], &self.bytes[SIGNED_LEN..]).is_ok()
    }
}

/// Reads a datagram as a beat: None unless it has a beat's length and magic.
pub fn parse(datagram: &[u8]) -> Option<Beat<'_>> {
    if datagram.len() != BEAT_LEN || datagram[..4] != MAGIC {
        return None;
    }
    Some(Beat {
        session: u64::from_be_bytes(datagram[4..12].try_into().ok()?),
        counter: u64::from_be_bytes(datagram[12..20].try_into().ok()?),
        bytes: datagram,
    })
}

/// The reply asking the node of `session` for a full report.
pub fn report_request(session: u64) -> [u8; REPLY_LEN] {
    let mut out = [0u8; REPLY_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4..12].copy_from_slice(&session.to_be_bytes());
    out[12] = REPLY_REPORT;
    out
}

/// The acknowledgement of the beat of `session` numbered `counter`.
pub fn ack(session: u64, counter: u64, key: &BeatKey) -> [u8; ACK_LEN] {
    let mut out = [0u8; ACK_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4..12].copy_from_slice(&session.to_be_bytes());
    out[12..20].copy_from_slice(&counter.to_be_bytes());
    out[20] = REPLY_ACK;
    let tag = hmac::sign(&key.0, &out[..ACK_SIGNED_LEN]);
    out[ACK_SIGNED_LEN..].copy_from_slice(tag.as_ref());
    out
}

/// The counter an acknowledgement of `session` confirms, when it verifies under `key`.
pub fn parse_ack(datagram: &[u8], session: u64, key: &BeatKey) -> Option<u64> {
    if datagram.len() != ACK_LEN || datagram[..4] != MAGIC || datagram[20] != REPLY_ACK {
        return None;
    }
    if u64::from_be_bytes(datagram[4..12].try_into().ok()?) != session {
        return None;
    }
    hmac::verify(
        &key.0,
        &datagram[..ACK_SIGNED_LEN],
        &datagram[ACK_SIGNED_LEN..],
    )
    .ok()?;
    Some(u64::from_be_bytes(datagram[12..20].try_into().ok()?))
}

/// The session a reply asks a full report of; None for anything else.
pub fn parse_report_request(datagram: &[u8]) -> Option<u64> {
    if datagram.len() != REPLY_LEN || datagram[..4] != MAGIC || datagram[12] != REPLY_REPORT {
        return None;
    }
    Some(u64::from_be_bytes(datagram[4..12].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_beat_verifies_under_its_key_only_and_any_changed_byte_breaks_it() {
        let (key, hex_key) = BeatKey::generate().unwrap();
        let same = BeatKey::from_hex(&hex_key).unwrap();
        let (other, _) = BeatKey::generate().unwrap();
        let beat = encode(0xfeed_beef, 7, &key);
        let parsed = parse(&beat).unwrap();
        assert_eq!((parsed.session, parsed.counter), (0xfeed_beef, 7));
        assert!(parsed.verify(&same));
        assert!(!parsed.verify(&other));
        for i in 4..BEAT_LEN {
            let mut bad = beat;
            bad[i] ^= 1;
            assert!(!parse(&bad).unwrap().verify(&key), "byte {i} changed");
        }
        assert!(parse(&beat[..BEAT_LEN - 1]).is_none());
        let mut wrong_magic = beat;
        wrong_magic[0] = b'X';
        assert!(parse(&wrong_magic).is_none());
    }

    #[test]
    fn keys_of_the_wrong_shape_are_refused_with_a_reason() {
        assert!(BeatKey::from_hex("zz").unwrap_err().contains("not hex"));
        assert!(BeatKey::from_hex("abcd").unwrap_err().contains("2 bytes"));
    }

    #[test]
    fn a_report_request_round_trips_and_a_beat_is_not_one() {
        assert_eq!(parse_report_request(&report_request(42)), Some(42));
        let (key, _) = BeatKey::generate().unwrap();
        assert_eq!(parse_report_request(&encode(42, 1, &key)), None);
        assert_eq!(parse(&report_request(42)), None);
    }

    #[test]
    fn an_ack_verifies_for_its_session_and_key_only() {
        let (key, _) = BeatKey::generate().unwrap();
        let (other, _) = BeatKey::generate().unwrap();
        let a = ack(9, 41, &key);
        assert_eq!(parse_ack(&a, 9, &key), Some(41));
        assert_eq!(parse_ack(&a, 8, &key), None);
        assert_eq!(parse_ack(&a, 9, &other), None);
        for i in 0..ACK_LEN {
            let mut bad = a;
            bad[i] ^= 1;
            assert_eq!(parse_ack(&bad, 9, &key), None, "byte {i} changed");
        }
        assert_eq!(parse_ack(&encode(9, 41, &key), 9, &key), None);
        assert_eq!(parse_report_request(&a), None);
    }

    proptest! {
        #[test]
        fn any_datagram_parses_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let (key, _) = BeatKey::generate().unwrap();
            if let Some(b) = parse(&bytes) {
                prop_assert!(!b.verify(&key));
            }
            let _ = parse_report_request(&bytes);
            prop_assert_eq!(parse_ack(&bytes, 1, &key), None);
        }
    }
}
