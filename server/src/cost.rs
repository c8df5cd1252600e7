//! Warnings about policies whose estimated dataplane cost (`Index::costly_policies`) is
//! above `--policy-cost-warn` on some node: an operator sees the budget before a
//! dataplane runs out of it and denies the pods the policy selects instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::hub::ClusterState;

/// What was last warned about per (cluster, namespace, name), so an unchanged estimate is
/// logged once.
#[derive(Default)]
pub struct Warned(Mutex<HashMap<PolicyKey, u64>>);

/// (cluster, namespace, name).
type PolicyKey = (Arc<str>, String, String);

impl Warned {
    /// Checks the policies compiled at or after generation `since` (0: all), off the async
    /// runtime (a full check walks every policy's pods), and logs those above `threshold`.
    pub fn check(self: &Arc<Self>, cluster: Arc<ClusterState>, threshold: u64, since: u64) {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let found = cluster.read(|i| i.costly_policies(threshold, since));
            let mut warned = me.0.lock().expect("warned lock");
            for w in found {
                let key = (cluster.name.clone(), w.namespace.clone(), w.name.clone());
                if warned.insert(key, w.elements) == Some(w.elements) {
                    continue;
                }
                warn!(
                    cluster = %cluster.name,
                    policy = %format!("{}/{}", w.namespace, w.name),
                    node = %w.node,
                    elements = w.elements,
                    threshold,
                    "NetworkPolicy {}/{} is estimated at {} dataplane elements on node {} (above --policy-cost-warn {threshold}): a dataplane that cannot hold it denies the pods it selects instead",
                    w.namespace,
                    w.name,
                    w.elements,
                    w.node,
                );
            }
        });
    }
}
