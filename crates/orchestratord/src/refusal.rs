//! Refusals: why the core declined a request before any work began (admission, event-stream
//! limits, operator actions). The core says *what* was refused; each front says it in its own
//! terms: the HTTP API as a status and the native or OpenAI error envelope ([`crate::api`]),
//! the D-Bus front as an error name ([`crate::dbus`]). [`Refusal::body`] is the typed error
//! both send: its code, message, field, retry hint and policy label.

use std::time::Duration;

use llorch_wire::{ErrorBody, ErrorCode};

use crate::admission::Policy;

/// A request the core refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// A task id the client chose is not 1 to 128 characters of letters, digits, `-_.:`.
    InvalidTaskId,
    /// The client already has a task of this id.
    TaskExists { task_id: String },
    /// No node has registered since the control plane started.
    NoNodes,
    /// No registered pool serves the model; `known` are the models that are served.
    UnknownModel { model: String, known: Vec<String> },
    /// Every node serving the model is offline.
    ModelOffline { model: String },
    /// The placement hints can never be met.
    Unplaceable { reason: String },
    /// The context asked for is more than any pool of the model holds per slot.
    CtxTooLarge {
        ctx: u32,
        max_ctx: u32,
        model: String,
    },
    /// The task is predicted to start after its deadline.
    DeadlineUnmet {
        deadline_ms: u64,
        predicted: Duration,
        ahead: u32,
        retry_after_ms: u64,
    },
    /// The queue is full and its policy refuses the task.
    QueueFull {
        capacity: usize,
        policy: Policy,
        retry_after_ms: u64,
    },
    /// The client (API key) has as many event streams open as allowed.
    ClientStreams { open: u32 },
    /// The task has as many event streams open as allowed.
    TaskStreams { task_id: String, open: u32 },
    /// As many fleet event streams (`GET /v2/events`) are open as allowed for this caller.
    WatchStreams { open: u32, admin_reserved: u32 },
    /// No node (or not `on_node`) has a pool of this id.
    UnknownPool {
        pool: String,
        on_node: Option<String>,
    },
    /// Several nodes have a pool of this id; the operator must say which.
    AmbiguousPool { pool: String, nodes: Vec<String> },
    /// The pool's node did not answer an operator action in time.
    NodeSilent {
        node: String,
        action: String,
        pool: String,
        within: Duration,
    },
    /// The pool's node failed an operator action.
    NodeFailed {
        node: String,
        action: String,
        pool: String,
        error: String,
    },
    /// No node of this id is registered.
    UnknownNode { node: String },
    /// No task of this id is known (finished tasks are kept for a while).
    UnknownTask { task_id: String },
    /// Several API keys chose this task id; the operator's door cannot tell which is meant.
    AmbiguousTask {
        task_id: String,
        clients: Vec<String>,
    },
    /// What a node sent (a registration, a heartbeat) is not valid; the body names the field.
    InvalidReport(ErrorBody),
    /// A node registered a plain-HTTP address off this host, and plaintext is not allowed.
    PlaintextAddress { address: String },
    /// The registry keeps as many nodes as allowed ([`crate::registry::MAX_NODES`]).
    NodesFull,
    /// A heartbeat of a node the control plane does not know (it restarted): register again.
    NotRegistered { node: String },
}

impl Refusal {
    /// The typed error every front sends for this refusal.
    pub fn body(&self) -> ErrorBody {
        match self {
            Self::InvalidTaskId
            | Self::TaskExists { .. }
            | Self::ClientStreams { .. }
            | Self::TaskStreams { .. }
            | Self::WatchStreams { .. }
            | Self::UnknownTask { .. }
            | Self::AmbiguousTask { .. } => self.task_body(),
            Self::NoNodes
            | Self::UnknownModel { .. }
            | Self::ModelOffline { .. }
            | Self::Unplaceable { .. }
            | Self::CtxTooLarge { .. }
            | Self::DeadlineUnmet { .. }
            | Self::QueueFull { .. } => self.admission_body(),
            Self::UnknownPool { .. }
            | Self::AmbiguousPool { .. }
            | Self::NodeSilent { .. }
            | Self::NodeFailed { .. }
            | Self::UnknownNode { .. }
            | Self::InvalidReport(_)
            | Self::PlaintextAddress { .. }
            | Self::NodesFull
            | Self::NotRegistered { .. } => self.node_body(),
        }
    }

    /// Refusals about a task by its id, and its event streams.
    fn task_body(&self) -> ErrorBody {
        let rate_limited =
            |what: String| ErrorBody::new(ErrorCode::RateLimited, what).with_retry_after_ms(1000);
        match self {
            Self::InvalidTaskId => ErrorBody::invalid(
                "task_id",
                "task_id must be 1 to 128 characters of letters, digits, - _ . :",
            ),
            Self::TaskExists { task_id } => ErrorBody::invalid(
                "task_id",
                format!("task {task_id:?} already exists; choose another task_id or leave it out"),
            ),
            Self::ClientStreams { open } => rate_limited(format!(
                "this API key has {open} event streams open, the most allowed; close one first"
            )),
            Self::TaskStreams { task_id, open } => rate_limited(format!(
                "task {task_id} has {open} event streams open, the most allowed; close one first"
            )),
            Self::WatchStreams { open, admin_reserved } => rate_limited(format!(
                "{open} fleet event streams (GET /v2/events) are open, the most allowed; close one (a console tab) first; the last {admin_reserved} are kept for the admin credential"
            )),
            Self::UnknownTask { task_id } => ErrorBody::invalid(
                "task_id",
                format!("task {task_id:?} is not known (finished tasks are kept for 5 minutes)"),
            ),
            Self::AmbiguousTask { task_id, clients } => ErrorBody::invalid(
                "task_id",
                format!(
                    "task id {task_id:?} was chosen by several API keys ({}); cancel it with that key's own POST /v2/tasks/{{id}}/cancel",
                    clients.join(", ")
                ),
            ),
            _ => unreachable!("body() sends only task refusals here"),
        }
    }

    /// Refusals of admission: the model, the placement hints, the deadline, the queue.
    fn admission_body(&self) -> ErrorBody {
        match self {
            Self::NoNodes => ErrorBody::new(
                ErrorCode::NodeUnavailable,
                "no node has registered with the control plane yet; retry in a moment",
            )
            .with_retry_after_ms(1000),
            Self::UnknownModel { model, known } => {
                let known = if known.is_empty() {
                    "none yet".to_string()
                } else {
                    known.join(", ")
                };
                ErrorBody {
                    field: Some("model".into()),
                    ..ErrorBody::new(
                        ErrorCode::ModelNotFound,
                        format!("model {model:?} is not served here; known models: {known} (see GET /v1/models)"),
                    )
                }
            }
            Self::ModelOffline { model } => ErrorBody::new(
                ErrorCode::NodeUnavailable,
                format!(
                    "every node serving model {model:?} is offline; retry when one reports again (see GET /v2/nodes)"
                ),
            )
            .with_retry_after_ms(5000),
            Self::Unplaceable { reason } => {
                ErrorBody::invalid("placement", format!("cannot place this task: {reason}"))
            }
            Self::CtxTooLarge {
                ctx,
                max_ctx,
                model,
            } => ErrorBody::invalid(
                "ctx",
                format!("ctx is {ctx}; pools of model {model:?} hold at most {max_ctx} tokens per slot"),
            ),
            Self::DeadlineUnmet {
                deadline_ms,
                predicted,
                ahead,
                retry_after_ms,
            } => ErrorBody::new(
                ErrorCode::DeadlineUnmet,
                format!(
                    "deadline_ms is {deadline_ms} but the task is predicted to start in {} ms ({ahead} tasks ahead); raise deadline_ms or retry later",
                    predicted.as_millis()
                ),
            )
            .with_retry_after_ms(*retry_after_ms),
            Self::QueueFull {
                capacity,
                policy,
                retry_after_ms,
            } => ErrorBody {
                policy_label: Some(policy.as_str().into()),
                ..ErrorBody::new(
                    ErrorCode::AdmissionReject,
                    format!("the queue is full ({capacity} tasks waiting); retry after the Retry-After interval"),
                )
                .with_retry_after_ms(*retry_after_ms)
            },
            _ => unreachable!("body() sends only admission refusals here"),
        }
    }

    /// Refusals about nodes and pools: operator actions, and what nodes report.
    fn node_body(&self) -> ErrorBody {
        match self {
            Self::UnknownPool { pool, on_node } => {
                let on = on_node
                    .as_ref()
                    .map(|n| format!(" on node {n:?}"))
                    .unwrap_or_default();
                ErrorBody::invalid(
                    "pool_id",
                    format!("pool {pool:?} is not known{on}; see GET /v2/pools"),
                )
            }
            Self::AmbiguousPool { pool, nodes } => ErrorBody::invalid(
                "node",
                format!(
                    "pool {pool:?} is on nodes {}; say which with ?node=NODE (llorch pools drain|resume: --node NODE; D-Bus: the node argument)",
                    nodes.join(", ")
                ),
            ),
            Self::NodeSilent {
                node,
                action,
                pool,
                within,
            } => ErrorBody::new(
                ErrorCode::NodeUnavailable,
                format!(
                    "node {node} did not answer within {} s to {action} pool {pool}; try again",
                    within.as_secs()
                ),
            ),
            Self::NodeFailed {
                node,
                action,
                pool,
                error,
            } => ErrorBody::new(
                ErrorCode::NodeUnavailable,
                format!("node {node} did not {action} pool {pool}: {error}"),
            ),
            Self::UnknownNode { node } => ErrorBody::invalid(
                "node_id",
                format!("node {node:?} is not known; see GET /v2/nodes"),
            ),
            Self::InvalidReport(body) => body.clone(),
            Self::PlaintextAddress { address } => ErrorBody::invalid(
                "address",
                format!(
                    "{address} is plain HTTP off this host: prompts and the node token would cross the network in the clear; give the node API TLS (node.tls_cert, node.tls_key, an https:// address) or start orchestratord with --allow-plaintext"
                ),
            ),
            Self::NodesFull => ErrorBody::new(
                ErrorCode::NodeUnavailable,
                format!(
                    "the control plane already keeps {} nodes; offline nodes are forgotten after {} s, or remove nodes from service",
                    crate::registry::MAX_NODES,
                    crate::registry::FORGET_OFFLINE_AFTER.as_secs()
                ),
            )
            .with_retry_after_ms(60_000),
            Self::NotRegistered { node } => ErrorBody::new(
                ErrorCode::NodeUnavailable,
                format!("node {node:?} is not registered; register again"),
            ),
            _ => unreachable!("body() sends only node refusals here"),
        }
    }
}
