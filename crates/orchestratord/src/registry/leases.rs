//! Slot leases and service rates: the slots orchestratord leased on each pool (the truth about
//! busy slots, as orchestratord is the engines' only client), and how long a slot of each model
//! is held, behind predicted starts.

use std::time::Duration;

use super::{PoolKey, Registry};
use crate::admission::ServiceRate;
use crate::placement::Candidate;

impl Registry {
    pub(crate) fn lease(&mut self, key: &PoolKey) {
        *self.leases.entry(key.clone()).or_default() += 1;
    }

    pub(crate) fn release(&mut self, key: &PoolKey, model: &str, held: Option<Duration>) {
        if let Some(n) = self.leases.get_mut(key) {
            *n = n.saturating_sub(1);
        }
        if self.nodes.get(&key.0).is_some_and(|n| n.draining) && self.running_on(&key.0) == 0 {
            tracing::info!(node_id = %key.0, "Node drained: no task runs on it any more.");
        }
        if let Some(held) = held {
            self.rates
                .entry(model.to_string())
                .or_default()
                .record(held);
        }
    }

    /// Tasks running on a node's pools (the leases orchestratord holds there).
    pub(crate) fn running_on(&self, node_id: &str) -> u32 {
        self.leases
            .iter()
            .filter(|((n, _), _)| n == node_id)
            .fold(0, |sum, (_, l)| sum.saturating_add(*l))
    }

    /// Leases held now, by pool (in no particular order).
    pub(crate) fn leases(&self) -> impl Iterator<Item = (&PoolKey, u32)> {
        self.leases
            .iter()
            .map(|(k, n)| (k, *n))
            .filter(|(_, n)| *n > 0)
    }

    pub(crate) fn leased(&self, key: &PoolKey) -> u32 {
        self.leases.get(key).copied().unwrap_or(0)
    }

    pub(crate) fn total_leased(&self) -> u32 {
        self.leases.values().fold(0, |n, l| n.saturating_add(*l))
    }

    pub(crate) fn rate(&self, model: &str) -> Option<&ServiceRate> {
        self.rates.get(model)
    }

    /// How long until a slot of a loaded pool serving `model` frees up: the model's mean
    /// service time spread over those pools' slots.
    pub(crate) fn slot_wait(&self, candidates: &[Candidate], model: &str) -> std::time::Duration {
        let (_, slots) = crate::placement::capacity_for(candidates, model);
        let default_rate = ServiceRate::default();
        self.rate(model)
            .unwrap_or(&default_rate)
            .predict_start(0, 0, slots.max(1))
    }
}
