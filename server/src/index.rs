//! The index task: applies source events to the index, one synchronous step each.

use std::sync::{Arc, RwLock};

use moat_policy::{Changes, Index};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::source::SourceEvent;

/// Shared, lock-protected index. Writers hold the lock only for one synchronous step.
pub type SharedIndex = Arc<RwLock<Index>>;

/// Applies events until the source ends. `on_change` sees every non-empty change with the
/// index it produced (under the read lock, so it must not block).
pub async fn run(
    mut rx: mpsc::Receiver<SourceEvent>,
    index: SharedIndex,
    mut on_change: impl FnMut(&Changes, &Index, bool),
) {
    let mut synced = false;
    while let Some(ev) = rx.recv().await {
        let first = !synced;
        let changes = {
            let mut idx = index.write().expect("index lock poisoned");
            match ev {
                SourceEvent::Reset(objects) => {
                    let n = objects.len();
                    let c = idx.reset(objects);
                    info!(
                        objects = n,
                        nodes = idx.nodes().len(),
                        generation = c.generation,
                        "full sync"
                    );
                    synced = true;
                    c
                }
                SourceEvent::Batch(events) => {
                    debug!(events = events.len(), "applying changes");
                    idx.batch(events)
                }
            }
        };
        // Nothing is published before the first full sync: an empty cache must never look
        // like "no policies" to a node.
        if synced && (first || !changes.is_empty()) {
            let idx = index.read().expect("index lock poisoned");
            on_change(&changes, &idx, first);
        }
    }
}
