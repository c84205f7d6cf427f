//! The fuzz corpus (`fuzz/corpus/` at the repository root): real bytes of each wire format,
//! captured from the running stack or written as the API documents them. Every sample parses
//! as what it is, and mutations of the samples (bytes overwritten, cut, repeated) never make
//! a parser panic or a refusal lose its field. `make test` runs a few hundred mutations per
//! sample; `make fuzz` runs them for minutes (`PROPTEST_CASES`), and a failing input is kept by
//! proptest in `proptest-regressions/` and replayed first ever after.

use std::path::PathBuf;

use llorch_wire::engine::{EngineEvent, GenerateRequest};
use llorch_wire::json::parse;
use llorch_wire::node::{Heartbeat, Registration};
use llorch_wire::sse::Decoder;
use llorch_wire::task::TaskRequest;
use proptest::prelude::*;

fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(kind);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            (path.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no samples in {}", dir.display());
    out
}

/// Feeds `bytes` to the parser for `kind`; returns whether it was accepted.
fn feed(kind: &str, bytes: &[u8]) -> bool {
    match kind {
        "sse" => {
            let mut d = Decoder::default();
            let Ok(frames) = d.push(bytes) else {
                return false;
            };
            let mut ok = true;
            for f in frames {
                // Engine, native and OpenAI streams share the framing; the engine's events are
                // the ones with a typed decoder here.
                if matches!(f.event.as_str(), "token" | "end" | "error") {
                    ok &= EngineEvent::from_sse(&f.event, &f.data).is_ok()
                        || serde_json::from_str::<serde_json::Value>(&f.data).is_ok();
                }
            }
            ok
        }
        "engine-request" => match parse::<GenerateRequest>(bytes) {
            Ok(r) => checked(r.validate()),
            Err(e) => named(&e),
        },
        "task-request" => match parse::<TaskRequest>(bytes) {
            Ok(_) => true,
            Err(e) => named(&e),
        },
        "registration" => match parse::<Registration>(bytes) {
            Ok(r) => checked(r.validate()),
            Err(e) => named(&e),
        },
        "heartbeat" => match parse::<Heartbeat>(bytes) {
            Ok(h) => checked(h.validate()),
            Err(e) => named(&e),
        },
        other => panic!("unknown corpus {other}"),
    }
}

/// A refusal always names the field at fault.
fn named(e: &llorch_wire::ErrorBody) -> bool {
    assert!(e.field.is_some(), "a refusal without a field: {e:?}");
    false
}

fn checked(r: Result<(), llorch_wire::ErrorBody>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) => named(&e),
    }
}

const KINDS: [&str; 5] = [
    "sse",
    "engine-request",
    "task-request",
    "registration",
    "heartbeat",
];

#[test]
fn every_sample_is_accepted_as_what_it_is() {
    for kind in KINDS {
        for (name, bytes) in corpus(kind) {
            assert!(feed(kind, &bytes), "{name} was refused");
        }
    }
}

/// A mutation: overwrite, cut, or repeat a part of the sample.
#[derive(Debug, Clone)]
enum Mutation {
    Set(prop::sample::Index, u8),
    Cut(prop::sample::Index),
    Repeat(prop::sample::Index, prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Cut),
        1 => (any::<prop::sample::Index>(), any::<prop::sample::Index>()).prop_map(|(a, b)| Mutation::Repeat(a, b)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        match m {
            Mutation::Set(i, b) => {
                let i = i.index(bytes.len());
                bytes[i] = *b;
            }
            Mutation::Cut(i) => bytes.truncate(i.index(bytes.len())),
            Mutation::Repeat(a, b) => {
                let (a, b) = (a.index(bytes.len()), b.index(bytes.len()));
                let part = bytes[a.min(b)..a.max(b)].to_vec();
                bytes.splice(a.max(b)..a.max(b), part);
            }
        }
    }
    bytes
}

proptest! {
    // At least 500 cases; `make fuzz` raises it with PROPTEST_CASES.
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases.max(500), ..ProptestConfig::default() })]

    #[test]
    fn mutated_samples_never_panic_a_parser(
        kind in prop::sample::select(KINDS.to_vec()),
        pick in any::<prop::sample::Index>(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let samples = corpus(kind);
        let (_, bytes) = &samples[pick.index(samples.len())];
        let _ = feed(kind, &mutate(bytes.clone(), &mutations));
    }
}
