//! Deleted nodes leave: a node the source no longer names stays visible (marked deleted)
//! for a grace period, then leaves the fleet view, the store and the metrics, so status and
//! memory follow the fleet, not its history.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::hub::Hub;

/// Sweeps every `tick`, forgetting nodes deleted longer than `grace` ago. Runs until the
/// process ends.
pub fn spawn(hub: Arc<Hub>, grace: Duration) {
    // Often enough that a node leaves close to its grace period, rarely enough to cost
    // nothing: a sweep is one pass over the fleet map.
    let tick = (grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(tick);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            sweep(&hub, grace).await;
        }
    });
}

async fn sweep(hub: &Arc<Hub>, grace: Duration) {
    let s = hub.fleet.sweep(grace, |c| hub.cluster(c).is_some());
    for ((cluster, node), status) in &s.save {
        if let Err(e) = hub.store.save_status(cluster, node, status) {
            warn!(error = %e, %cluster, %node, "cannot record a node's deletion");
        }
    }
    for (cluster, node) in &s.expired {
        if let Err(e) = hub.store.remove_node(cluster, node) {
            warn!(error = %e, %cluster, %node, "cannot remove a deleted node from the store");
        }
    }
    if !s.save.is_empty() || !s.expired.is_empty() {
        // Durable before the node leaves the view: once gone, a crash must not bring it back.
        if let Err(e) = hub.store.flush().await {
            warn!(error = %e, "cannot flush the state store");
        }
    }
    let forgotten = hub.fleet.forget(&s.expired);
    for (cluster, node) in &forgotten {
        info!(%cluster, %node, grace = ?grace, "deleted node forgotten (status, delta bases)");
    }
    // Bootstrap's record of their certificates, once those expired.
    hub.streams
        .prune_issued(std::time::SystemTime::now(), |k| hub.fleet.contains(k));
    hub.metrics.nodes_forgotten.inc_by(forgotten.len() as u64);
    hub.metrics.set_fleet(&hub.fleet.counts());
    if !forgotten.is_empty() {
        // Their snapshots' blobs, unless other nodes share them.
        crate::hub::collect_garbage(hub.store.clone()).await;
    }
}
