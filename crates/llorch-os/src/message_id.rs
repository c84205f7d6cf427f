//! Stable journald `MESSAGE_ID`s of the events an operator alerts on (docs/METRICS.md lists
//! them). Log them as the `message_id` field: the journald layer turns it into `MESSAGE_ID`.
//! Never change a value: alerts and saved `journalctl` queries depend on them.

/// orchestratord: one record per finished task.
pub const TASK_FINISHED: &str = "e7846ffff7a2484e9c2b1dbb157ce02c";
/// pool-managerd: an engine wrote its handoff file and serves.
pub const ENGINE_READY: &str = "abe1172963a64f73ac7bfa31084c61ea";
/// pool-managerd: an engine exited without being asked to.
pub const ENGINE_CRASHED: &str = "9e28f6f50b014cb5817eb2a796f3069d";
/// pool-managerd: the provisioner refused the model file (checksum, format).
pub const MODEL_VERIFICATION_FAILED: &str = "19c7666871564f3da5f1259a0b03c8c9";
/// orchestratord: a node registered.
pub const NODE_JOINED: &str = "d7c6ac74af534de981c716cb00c6c97a";
/// orchestratord: a node missed its heartbeats and is offline.
pub const NODE_LOST: &str = "5fbc07f9aa4c46aa8c447f64e22c02df";
/// orchestratord: a node left on a clean stop of its node agent (no alert: nothing was lost).
pub const NODE_LEFT: &str = "0b8c4f1e6a2d4f59b3e7c91d5a6f2e84";
/// orchestratord: a node's API could not be reached (connection or TLS) while tasks were sent
/// to it: a wrong address or a certificate the control plane does not trust.
pub const NODE_UNREACHABLE: &str = "6d2a9e47c1b84f0e8a35f7d2c4b91e63";
/// A daemon refused its configuration (at start or on reload).
pub const CONFIG_REJECTED: &str = "eeed5bc405024c9ba51f3679fe20df43";
/// orchestratord: the queue refused or evicted a task for the first time since it had room.
pub const QUEUE_SATURATED: &str = "84ab6012d84a49fdae86921b2805f97a";
/// orchestratord: a node request was refused (no valid node token, or a token bound to another
/// node id): a misconfigured worker or an impostor.
pub const NODE_REFUSED: &str = "93706c9873b647948d70f1c152461b28";
/// A daemon refused a mutating D-Bus call (the caller's uid is in the record).
pub const DBUS_REFUSED: &str = "e4b3e844652a43f981c68f4663a5e12e";
