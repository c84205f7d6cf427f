//! The node's running pools: one supervisor each, started at boot and added, stopped or
//! replaced when the configuration is reloaded (SIGHUP, `systemctl reload pool-managerd`).
//! A pool whose `[[pools]]` entry did not change keeps its engine and its streams.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{PoolConfig, RuntimeLayout};
use crate::launcher::Launcher;
use crate::state::Node;

struct Running {
    config: PoolConfig,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub struct Pools {
    node: Arc<Node>,
    launcher: Arc<dyn Launcher>,
    layout: RuntimeLayout,
    grace: Duration,
    /// Cancelled at shutdown; each pool's own token is a child of it.
    all: CancellationToken,
    running: BTreeMap<String, Running>,
}

/// What a reload changed, by pool id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub replaced: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.replaced.is_empty()
    }
}

impl Pools {
    pub fn new(
        node: Arc<Node>,
        launcher: Arc<dyn Launcher>,
        layout: RuntimeLayout,
        grace: Duration,
        all: CancellationToken,
    ) -> Self {
        Self {
            node,
            launcher,
            layout,
            grace,
            all,
            running: BTreeMap::new(),
        }
    }

    /// Starts the supervisor of a pool the node's table already holds.
    pub fn start(&mut self, config: PoolConfig) {
        let stop = self.all.child_token();
        let task = tokio::spawn(crate::supervisor::supervise(
            self.node.clone(),
            config.clone(),
            self.launcher.clone(),
            self.layout.clone(),
            self.grace,
            stop.clone(),
        ));
        self.running
            .insert(config.id.clone(), Running { config, stop, task });
    }

    /// Stops a pool's supervisor (its engine drains for the grace period).
    async fn stop(&mut self, id: &str) {
        if let Some(r) = self.running.remove(id) {
            r.stop.cancel();
            let _ = r.task.await;
        }
    }

    /// Makes the running pools those of `wanted`: new ids start, missing ones stop, changed
    /// ones stop and start again with their new settings; the others are not touched.
    pub async fn apply(&mut self, wanted: &[PoolConfig]) -> Changes {
        let mut changes = Changes::default();
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|id| !wanted.iter().any(|p| &p.id == *id))
            .cloned()
            .collect();
        for id in gone {
            tracing::info!(pool_id = %id, "Pool removed from the configuration; stopping it.");
            self.stop(&id).await;
            self.node.remove_pool(&id);
            changes.removed.push(id);
        }
        for p in wanted {
            match self.running.get(&p.id) {
                Some(r) if r.config == *p => continue,
                Some(_) => {
                    tracing::info!(pool_id = %p.id, "Pool settings changed; restarting it with the new ones.");
                    self.stop(&p.id).await;
                    changes.replaced.push(p.id.clone());
                }
                None => {
                    tracing::info!(pool_id = %p.id, "Pool added to the configuration; starting it.");
                    changes.added.push(p.id.clone());
                }
            }
            // One swap under the table's lock: no heartbeat goes out without the pool.
            self.node.put_pool(p.clone());
            self.start(p.clone());
        }
        changes
    }

    /// Waits for every supervisor after shutdown cancelled them.
    pub async fn join(self) {
        for (_, r) in self.running {
            let _ = r.task.await;
        }
    }
}
