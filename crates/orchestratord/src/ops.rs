//! Node operations: registration, heartbeats and liveness beats. The fronts (the node API in
//! [`crate::api::nodes`], the beats socket in [`crate::beats`]) authenticate and decode; these
//! functions validate what a node says whole before any of it is used, change the registry
//! under one short lock, announce the events, count the metrics and wake the dispatcher.
//!
//! Operator actions live beside them in [`crate::control`].

use std::net::SocketAddr;
use std::time::Duration;

use llorch_client::HttpClient;
use llorch_wire::beat::{self, BEAT_LEN};
use llorch_wire::node::{Heartbeat, NodeAck, Registration};
use llorch_wire::ErrorBody;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::refusal::Refusal;
use crate::registry::{BeatOutcome, BeatSession, Node};
use crate::state::State;

/// Registers a node (anew, or again after its restart or ours). `presented` is the node token
/// the node sent; when the control plane requires node tokens, it also guards the node's own
/// API, so the client that calls the node sends it.
pub fn register(
    state: &State,
    reg: Registration,
    presented: Option<String>,
) -> Result<NodeAck, Refusal> {
    // Everything a node sends is checked before any of it is used: nothing it says may reach a
    // panic (an address that forms no request, a sum past u32) under the core lock.
    reg.validate().map_err(Refusal::InvalidReport)?;
    if !state.config.allow_plaintext && llorch_client::leaves_host_in_clear(&reg.address) {
        return Err(Refusal::PlaintextAddress {
            address: reg.address,
        });
    }
    // The node's token (when the control plane requires one) also guards the node's own API.
    let client = HttpClient::with_roots(&reg.address, &state.config.node_roots)
        .map_err(|e| Refusal::InvalidReport(ErrorBody::invalid("address", e.to_string())))?
        .with_token(state.keys().node.as_ref().and(presented));
    let heartbeat = Duration::from_secs(reg.heartbeat_secs);
    // A fresh beat session per registration, when beats are read: its key travels only in
    // this (authenticated) answer.
    let (beat, grant) = state
        .config
        .beat_port
        .and_then(|port| {
            BeatSession::new(port).or_else(|| {
                tracing::warn!(node_id = %reg.node_id, "No random key for a beat session: the node heartbeats over HTTP.");
                None
            })
        })
        .unzip();
    let node = Node {
        id: reg.node_id.clone(),
        address: reg.address.clone(),
        version: reg.version,
        heartbeat,
        last_seen: Instant::now(),
        online: true,
        pools: reg.pools,
        staged_models: reg.staged_models,
        gpus: reg.gpus,
        memory: reg.memory,
        client,
        lost: CancellationToken::new(),
        draining: false,
        offline_beats: state.config.offline_after_beats,
        beat,
    };
    let offline_after = node.offline_after();
    let models: Vec<String> = node.pools.iter().map(|p| p.model_id.clone()).collect();
    let events = add_node(state, node)?;
    state.announce(crate::events::Event::NodeJoined(reg.node_id.clone()));
    for e in events {
        state.announce(e);
    }
    // Only a node that was taken makes label values.
    state.metrics.add_models(models.iter().map(String::as_str));
    state.metrics.node_event("joined");
    tracing::info!(
        message_id = llorch_os::message_id::NODE_JOINED,
        node_id = %reg.node_id,
        address = %reg.address,
        pools = models.len(),
        "Node registered."
    );
    state.wake.notify_one();
    Ok(NodeAck {
        node_id: reg.node_id,
        offline_after_secs: offline_after.as_secs(),
        beat: grant,
        beat_counter: None,
    })
}

/// Adds or replaces a node in the registry, unless the registry is full; returns the pool
/// events its registration makes (computed only while a D-Bus front listens).
fn add_node(state: &State, node: Node) -> Result<Vec<crate::events::Event>, Refusal> {
    let mut core = state.core();
    if core.registry.full_for(&node.id) {
        return Err(Refusal::NodesFull);
    }
    // Only while a D-Bus front listens.
    let events = if state.announcing() {
        let old = core
            .registry
            .nodes
            .get(&node.id)
            .map(|n| n.pools.clone())
            .unwrap_or_default();
        crate::events::pool_changes(&node.id, &old, &node.pools, "the node registered")
    } else {
        Vec::new()
    };
    core.registry.register(node);
    Ok(events)
}

/// Applies a node's heartbeat; [`Refusal::NotRegistered`] tells a node the control plane does
/// not know it (it restarted), and the node registers again.
pub fn heartbeat(state: &State, id: String, hb: Heartbeat) -> Result<NodeAck, Refusal> {
    hb.validate().map_err(Refusal::InvalidReport)?;
    let models: Vec<String> = hb.pools.iter().map(|p| p.model_id.clone()).collect();
    let (offline_after, back, queued, events, beat_counter) = {
        let mut core = state.core();
        let was_offline = core.registry.nodes.get(&id).is_some_and(|n| !n.online);
        let Some(old) = core
            .registry
            .heartbeat(&id, hb.pools, hb.staged_models, hb.gpus)
        else {
            return Err(Refusal::NotRegistered { node: id });
        };
        if let Some(node) = core.registry.nodes.get_mut(&id) {
            node.memory = hb.memory;
        }
        let node = &core.registry.nodes[&id];
        // Only while a D-Bus front listens: the heartbeat path of 1,000 nodes stays lean.
        let events = if state.announcing() {
            crate::events::pool_changes(&id, &old, &node.pools, "reported by the node")
        } else {
            Vec::new()
        };
        (
            node.offline_after(),
            was_offline,
            !core.queue.is_empty(),
            events,
            node.beat.as_ref().map(|b| b.counter),
        )
    };
    if back {
        state.metrics.node_event("back");
        state.announce(crate::events::Event::NodeJoined(id.clone()));
    }
    for e in events {
        state.announce(e);
    }
    // Only a known node's models become label values.
    state.metrics.add_models(models.iter().map(String::as_str));
    // A heartbeat may free the way for waiting tasks (a pool turned ready, a node came back);
    // with nothing queued there is nothing to place, and 1,000 nodes must not wake the
    // dispatcher 200 times a second for nothing.
    if queued {
        state.wake.notify_one();
    }
    Ok(NodeAck {
        node_id: id,
        offline_after_secs: offline_after.as_secs(),
        beat: None,
        beat_counter,
    })
}

/// A node leaves (its agent stopped cleanly, after draining): it is forgotten at once, its
/// pools leave every view, and no lost-node alert follows. [`Refusal::NotRegistered`] when it
/// is not known.
pub fn leave(state: &State, id: String) -> Result<(), Refusal> {
    let (removed, events) = {
        let mut core = state.core();
        let old = core
            .registry
            .nodes
            .get(&id)
            .map(|n| n.pools.clone())
            .unwrap_or_default();
        let removed = core.registry.remove(&id);
        let events = if removed && state.announcing() {
            crate::events::pool_changes(&id, &old, &[], "the node left")
        } else {
            Vec::new()
        };
        (removed, events)
    };
    if !removed {
        return Err(Refusal::NotRegistered { node: id });
    }
    state.metrics.node_event("left");
    state.announce(crate::events::Event::NodeLost {
        node: id.clone(),
        reason: "it left (its node agent stopped)".into(),
    });
    for e in events {
        state.announce(e);
    }
    tracing::info!(
        message_id = llorch_os::message_id::NODE_LEFT,
        node_id = %id,
        "Node left."
    );
    // Tasks waiting for its pools are placed elsewhere, or wait for them to come back.
    state.wake.notify_one();
    Ok(())
}

/// What became of one batch of beats.
#[derive(Debug, Default)]
pub struct Beats {
    pub ok: u64,
    pub asked: u64,
    pub rejected: u64,
    /// The sessions to ask for a full report, and where to (at most `max_replies`).
    pub replies: Vec<(u64, SocketAddr)>,
    /// The acknowledgements of the beats taken, and where to.
    pub acks: Vec<([u8; llorch_wire::beat::ACK_LEN], SocketAddr)>,
    /// Whether tasks wait in the queue (a node seen again may free the way for them).
    pub queued: bool,
}

/// Applies a batch of beat datagrams under one lock.
pub fn beats(
    state: &State,
    batch: &[([u8; BEAT_LEN], SocketAddr)],
    max_replies: usize,
    now: Instant,
) -> Beats {
    let mut out = Beats::default();
    let mut core = state.core();
    for (datagram, from) in batch {
        let Some(b) = beat::parse(datagram) else {
            out.rejected += 1;
            continue;
        };
        match core.registry.beat(&b, now) {
            BeatOutcome::Ok(ack) => {
                out.ok += 1;
                // Every second beat is acknowledged: a node checks for an acknowledgement of
                // the beats of its last interval (two), and one an interval halves the cost.
                if b.counter % 2 == 0 {
                    out.acks.push((ack, *from));
                }
            }
            BeatOutcome::ReportAsked => {
                out.asked += 1;
                if out.replies.len() < max_replies {
                    out.replies.push((b.session, *from));
                }
            }
            BeatOutcome::Rejected => out.rejected += 1,
        }
    }
    out.queued = !core.queue.is_empty();
    out
}
