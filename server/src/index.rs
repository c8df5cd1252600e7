//! The index task: applies source events to a cluster's index, one synchronous step each,
//! then publishes the nodes that changed.

use std::sync::Arc;
use std::time::Instant;

use moat_policy::ir::digest::Digest;
use moat_policy::{Changes, Index};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::hub::ClusterState;
use crate::metrics::Metrics;
use crate::source::SourceEvent;
use crate::status::Fleet;

/// Applies events until the source ends. `on_change` sees every change (under the index
/// read lock, so it must not block), the first full sync included.
pub async fn run(
    mut rx: mpsc::Receiver<SourceEvent>,
    cluster: Arc<ClusterState>,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    previous: std::collections::HashMap<String, (u64, Digest)>,
    mut on_change: impl FnMut(&Changes, &Index, bool),
) {
    while let Some(ev) = rx.recv().await {
        let first = !cluster.is_synced();
        if first && !matches!(ev, SourceEvent::Reset(_)) {
            // A source always starts with its full state; nothing before it counts.
            continue;
        }
        let t = Instant::now();
        let what = match &ev {
            SourceEvent::Reset(o) => format!("full sync of {} objects", o.len()),
            SourceEvent::Batch(e) => format!("{} changes", e.len()),
        };
        let changes = cluster.apply(ev, |n| previous.get(n).copied());
        metrics.compile_seconds.observe(t.elapsed().as_secs_f64());
        metrics.generation.set(changes.generation as i64);
        if first {
            info!(
                generation = changes.generation,
                nodes = changes.updated.len(),
                "{what}"
            );
        } else {
            debug!(
                generation = changes.generation,
                nodes = changes.updated.len(),
                "{what}"
            );
        }
        // Nothing is published before the first full sync: an empty cache must never look
        // like "no policies" to a node.
        cluster.publish(&changes, &fleet);
        if first || !changes.is_empty() {
            cluster.read(|idx| on_change(&changes, idx, first));
        }
    }
}
