//! The engine's `GET /slots` and `GET /health` bodies.

use serde::{Deserialize, Serialize};

/// `GET /slots`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotsStatus {
    pub total: u32,
    pub busy: u32,
    /// Context (tokens) of each slot.
    pub ctx_per_slot: u32,
    pub slots: Vec<SlotStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub id: u32,
    pub state: SlotState,
    /// Tokens held in this slot's KV cache, reusable by a request with the same prefix.
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    Idle,
    Busy,
}

/// `GET /health`: 200 with `ready`, 503 with `loading` (and why) or `draining`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Load progress from 0 to 1 while loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Loading,
    Ready,
    Draining,
}
