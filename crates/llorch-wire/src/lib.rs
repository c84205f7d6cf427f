//! Wire types shared by every llama-orch role.
//!
//! This crate owns the formats other processes (and other tools) read: the engine's HTTP request
//! and SSE event bodies, the typed error body and its codes, the handoff file an engine writes
//! when it is ready, and the engine plan the provisioner writes for it, and the exit codes of every binary. It does no I/O: encoding
//! to bytes and decoding from bytes is as far as it goes.

pub mod beat;
pub mod engine;
pub mod error;
pub mod exit;
pub mod gbnf;
pub mod handoff;
pub mod id;
pub mod json;
pub mod node;
pub mod plan;
pub mod sampling;
pub mod schema;
pub mod sse;
pub mod task;
pub mod tools;

pub use error::{ErrorBody, ErrorCode};
