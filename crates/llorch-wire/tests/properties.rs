//! Property tests of the wire parsers that read another process's bytes: the SSE decoder, node
//! registrations and heartbeats, engine requests and handoff files. Whatever arrives, they
//! never panic; the decoder's buffer stays within its limit and frames round-trip through it
//! however the bytes are split; a refused body names a field.

use llorch_wire::engine::GenerateRequest;
use llorch_wire::handoff::Handoff;
use llorch_wire::json::parse;
use llorch_wire::node::{Heartbeat, PoolState, PoolStatus, Registration};
use llorch_wire::sse::{frame, Decoder, Frame};
use proptest::prelude::*;

/// JSON-ish text: mostly the characters JSON is made of, so the parser gets past the first
/// byte often.
fn json_like() -> impl Strategy<Value = String> {
    proptest::string::string_regex(r#"[{}\[\]":,0-9a-z_ .\-\\]{0,300}"#).unwrap()
}

fn pool_status() -> impl Strategy<Value = PoolStatus> {
    (
        ".{0,80}",
        ".{0,140}",
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        ".{0,300}",
        proptest::option::of(".{0,9000}"),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(pool_id, model_id, slots_total, slots_busy, ctx, device, last_error, load_ms)| {
                PoolStatus {
                    pool_id,
                    model_id,
                    state: PoolState::Ready,
                    slots_total,
                    slots_busy,
                    ctx_per_slot: ctx,
                    device,
                    engine_version: None,
                    engine_pid: None,
                    restarts: 0,
                    last_error,
                    draining: false,
                    on_demand: false,
                    load_ms,
                    seq: 0,
                    vram_need_bytes: None,
                    vram_free_bytes: None,
                    memory_charge_bytes: None,
                    memory_charged: false,
                    pinned: false,
                    swaps: 0,
                }
            },
        )
}

const FIELDS: [&str; 5] = [
    "node_id",
    "address",
    "version",
    "heartbeat_secs",
    "staged_models",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases.max(2000), ..ProptestConfig::default() })]

    #[test]
    fn the_sse_decoder_takes_any_bytes_in_any_chunks(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let mut d = Decoder::with_limit(1024);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut from = 0;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            if d.push(&bytes[from..cut]).is_err() {
                // Refused past its limit: it starts afresh and keeps taking bytes.
                d = Decoder::with_limit(1024);
            }
            from = cut;
        }
    }

    #[test]
    fn frames_round_trip_however_the_bytes_are_split(
        events in proptest::collection::vec(("[a-z_]{1,12}", "[^\r]{0,200}"), 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let wire: String = events.iter().map(|(e, d)| frame(e, d)).collect();
        let bytes = wire.as_bytes();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut d = Decoder::default();
        let mut got = Vec::new();
        let mut from = 0;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            got.extend(d.push(&bytes[from..cut]).unwrap());
            from = cut;
        }
        let want: Vec<Frame> = events
            .into_iter()
            .map(|(event, data)| Frame { event, data })
            .collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn node_bodies_never_panic_and_refusals_name_a_field(text in json_like()) {
        if let Ok(r) = parse::<Registration>(text.as_bytes()) {
            if let Err(e) = r.validate() {
                prop_assert!(e.field.is_some());
            }
        }
        if let Ok(h) = parse::<Heartbeat>(text.as_bytes()) {
            let _ = h.validate();
        }
    }

    #[test]
    fn any_registration_is_validated_without_panic(
        node_id in ".{0,80}",
        address in ".{0,300}",
        version in ".{0,300}",
        heartbeat_secs in any::<u64>(),
        pools in proptest::collection::vec(pool_status(), 0..4),
        staged in proptest::collection::vec(".{0,140}", 0..4),
    ) {
        let r = Registration { node_id, address, version, heartbeat_secs, pools, staged_models: staged, gpus: Default::default(), memory: Vec::new() };
        match r.validate() {
            Ok(()) => {
                // What passed is what the bounds promise.
                prop_assert!((1..=300).contains(&r.heartbeat_secs));
                prop_assert!(r.pools.iter().all(|p| p.slots_busy <= p.slots_total && p.slots_total <= 1024));
            }
            Err(e) => {
                let field = e.field.unwrap();
                prop_assert!(
                    FIELDS.contains(&field.as_str()) || field.starts_with("pools") || field.starts_with("staged_models["),
                    "{}", field
                );
            }
        }
    }

    #[test]
    fn engine_requests_and_handoff_files_never_panic(text in json_like(), bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for input in [text.as_bytes(), &bytes[..]] {
            if let Ok(req) = parse::<GenerateRequest>(input) {
                if let Err(e) = req.validate() {
                    prop_assert!(e.field.is_some());
                }
            }
            let _ = serde_json::from_slice::<Handoff>(input);
        }
    }
}
