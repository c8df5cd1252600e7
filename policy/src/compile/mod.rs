//! The incremental compiler: dirty endpoints → rules and groups → node digests → versions.
//!
//! Object events (see `index::objects`) update group membership eagerly and mark endpoints
//! dirty; `flush` recomputes exactly the dirty endpoints, collects what nothing references any
//! more, and gives a new version to exactly the nodes whose digest changed.

mod endpoints;
mod groups;
mod rules;

#[cfg(test)]
mod node_groups_tests;

use crate::index::{Changes, Index, NodeIdx, NodeVersion, NsIdx};
use crate::ir::{self, DirectionRules, NodeSnapshot};

impl Index {
    pub(crate) fn flush(&mut self) -> Changes {
        self.compile_dirty();
        self.publish()
    }

    pub(crate) fn compile_dirty(&mut self) {
        self.settle_groups();
        let mut dirty = std::mem::take(&mut self.work.dirty_pods);
        // By node: a node's reference counts stay in cache while its pods are recomputed
        // (the order of pods is otherwise immaterial).
        dirty.sort_unstable_by_key(|p| self.pods.get(p.get()).map(|s| s.node));
        for p in dirty {
            match self.pods.get_mut(p.get()) {
                Some(s) if s.dirty => s.dirty = false,
                _ => continue,
            }
            self.recompute_endpoint(p);
        }
        self.work.subjects.clear();
        self.work.np_lists.clear();
        self.work.blocks.clear();
        self.gc_cluster_rules();
        self.collect_garbage();
    }

    fn collect_garbage(&mut self) {
        // Rules first: a dead rule releases its groups.
        while let Some(r) = self.work.rule_gc.pop() {
            self.gc_rule(r);
        }
        while let Some(g) = self.work.group_gc.pop() {
            self.gc_group(g);
        }
        for ns in std::mem::take(&mut self.work.ns_gc) {
            self.gc_namespace(ns);
        }
    }

    fn gc_namespace(&mut self, idx: NsIdx) {
        let Some(ns) = self.namespaces.get(idx.get()) else {
            return;
        };
        if ns.known || ns.pod_count > 0 || !ns.policies.is_empty() || !ns.scoped_groups.is_empty() {
            return;
        }
        let ns = self.namespaces.remove(idx.get());
        self.ns_by_name.remove(&ns.name);
        for s in &ns.matching_nssels {
            if let Some(e) = self.nssel.get_mut(s) {
                e.namespaces.retain(|x| *x != idx);
            }
        }
        self.labels.release(&mut self.strings, ns.labels);
    }

    fn gc_nodes(&mut self) {
        for n in std::mem::take(&mut self.work.node_gc) {
            let Some(node) = self.nodes.get(n.get()) else {
                continue;
            };
            if node.known || !node.pods.is_empty() || node.published.is_some() {
                continue;
            }
            debug_assert!(node.rule_refs.is_empty() && node.group_refs.is_empty());
            let node = self.nodes.remove(n.get());
            self.node_by_name.remove(&node.name);
        }
    }

    /// Gives the next generation to every touched node whose digest changed.
    fn publish(&mut self) -> Changes {
        let next = self.generation + 1;
        let mut changes = Changes::default();
        for n in std::mem::take(&mut self.work.touched_nodes) {
            let Some(node) = self.nodes.get_mut(n.get()) else {
                continue;
            };
            node.touched = false;
            if node.known {
                let digest = node.acc.digest();
                if node.published.map(|(_, d)| d) != Some(digest) {
                    node.published = Some((next, digest));
                    changes.updated.push(NodeVersion {
                        node: node.name.clone(),
                        version: next,
                        digest,
                    });
                }
            } else if node.published.take().is_some() {
                changes.removed.push(node.name.clone());
                self.work.node_gc.push(n);
            }
        }
        self.gc_nodes();
        if !changes.is_empty() {
            self.generation = next;
        }
        changes.generation = self.generation;
        changes
    }

    /// Publishes a freshly built index that replaces `old`: unchanged nodes keep their
    /// versions, and nodes `old` published that are gone are reported removed.
    pub(crate) fn publish_against(&mut self, old: &Index) -> Changes {
        let next = old.generation + 1;
        let mut changes = Changes::default();
        for n in std::mem::take(&mut self.work.touched_nodes) {
            self.nodes[n.get()].touched = false;
        }
        for (_, node) in self.nodes.iter_mut() {
            if !node.known {
                continue;
            }
            let digest = node.acc.digest();
            let before = old
                .node_by_name
                .get(&node.name)
                .and_then(|i| old.nodes[i.get()].published);
            match before {
                Some((v, d)) if d == digest => node.published = Some((v, d)),
                _ => {
                    node.published = Some((next, digest));
                    changes.updated.push(NodeVersion {
                        node: node.name.clone(),
                        version: next,
                        digest,
                    });
                }
            }
        }
        for (_, node) in old.nodes.iter() {
            let still = self
                .node_by_name
                .get(&node.name)
                .is_some_and(|i| self.nodes[i.get()].known);
            if node.published.is_some() && !still {
                changes.removed.push(node.name.clone());
            }
        }
        self.gc_nodes();
        self.generation = if changes.is_empty() {
            old.generation
        } else {
            next
        };
        changes.generation = self.generation;
        changes
    }

    /// Every node that has a snapshot, with its version and digest, sorted by name.
    pub fn nodes(&self) -> Vec<NodeVersion> {
        let mut v: Vec<_> = self
            .nodes
            .iter()
            .filter_map(|(_, n)| {
                let (version, digest) = n.published?;
                Some(NodeVersion {
                    node: n.name.clone(),
                    version,
                    digest,
                })
            })
            .collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    /// Every node's current snapshot, in the order of [`nodes`](Self::nodes).
    pub fn snapshots(&self) -> Vec<NodeSnapshot> {
        self.nodes()
            .iter()
            .filter_map(|n| self.snapshot(&n.node))
            .collect()
    }

    /// The node's current snapshot (its span), or `None` for a node the index doesn't know.
    pub fn snapshot(&self, node: &str) -> Option<NodeSnapshot> {
        let n: NodeIdx = *self.node_by_name.get(node)?;
        let ns = &self.nodes[n.get()];
        let (version, digest) = ns.published?;
        let dir = |ep: &crate::index::EndpointState, egress: bool| {
            let mut rules: Vec<_> = ep
                .rules(egress)
                .map(|r| self.rules[r.get()].rule.id)
                .collect();
            rules.sort_unstable();
            rules.dedup();
            DirectionRules {
                isolated: if egress { &ep.egress } else { &ep.ingress }.is_some(),
                rules,
            }
        };
        let mut endpoints: Vec<_> = ns
            .pods
            .iter()
            .filter_map(|p| {
                let pod = &self.pods[p.get()];
                let ep = pod.endpoint.as_ref()?;
                Some(ir::Endpoint {
                    id: pod.endpoint_id,
                    sandbox: pod.sandbox,
                    addrs: pod.ips.to_vec(),
                    ingress: dir(ep, false),
                    egress: dir(ep, true),
                })
            })
            .collect();
        endpoints.sort_by_key(|e| e.id);
        let mut rules: Vec<_> = ns
            .rule_refs
            .keys()
            .map(|r| self.rules[r.get()].rule.clone())
            .collect();
        rules.sort_by_key(|r| r.id);
        let mut groups: Vec<_> = ns
            .group_refs
            .keys()
            .map(|g| self.group_snapshot(*g))
            .collect();
        groups.sort_by_key(|g| g.id);
        Some(NodeSnapshot {
            node: node.to_string(),
            version,
            digest,
            node_addrs: ns.addrs.clone(),
            endpoints,
            rules,
            groups,
        })
    }

    /// Checks internal consistency: every node's incrementally maintained digest equals the
    /// digest recomputed from its materialised snapshot. For tests and fuzzing.
    pub fn verify(&self) -> Result<(), String> {
        for (_, n) in self.nodes.iter() {
            if !n.known {
                if n.published.is_some() || !n.rule_refs.is_empty() {
                    return Err(format!("unknown node {} still has state", n.name));
                }
                continue;
            }
            let snap = self
                .snapshot(&n.name)
                .ok_or_else(|| format!("known node {} has no snapshot", n.name))?;
            let content = snap.content_digest();
            if content != snap.digest {
                return Err(format!(
                    "node {}: incremental digest {} != content digest {}",
                    n.name,
                    snap.digest.short(),
                    content.short()
                ));
            }
        }
        for (i, g) in self.groups.iter() {
            if g.refs == 0 {
                return Err(format!("group {i} is unreferenced but alive"));
            }
        }
        for (i, r) in self.rules.iter() {
            if r.refs == 0 {
                return Err(format!("rule {i} is unreferenced but alive"));
            }
        }
        Ok(())
    }
}
