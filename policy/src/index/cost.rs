//! What a policy costs a node's dataplane, estimated from the index alone (no plan is built:
//! doing that for every node would cost the server what the nodes' dataplanes cost), so an
//! operator sees a policy's budget before a dataplane runs out of it.
//!
//! The estimate follows how `moat_dataplane::plan` expands rules — per distinct rule list
//! on the node, each rule costs (peer entries × port ranges), where a peer group's entries
//! are its addresses, or its CIDR with its excepts as intervals — plus the policy's groups
//! themselves and an entry per address and isolated direction of the pods it selects. It
//! is an upper bound of the elements the policy adds as counted by the nftables dataplane
//! (entries shared with other policies are counted for each of them); eBPF counts
//! intervals and port ranges as the LPM prefixes they become, which can be more.

use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use super::{GroupDef, GroupIdx, Index, NodeIdx, PeerDef, PolicyIdx, RuleIdx, Template};

/// A policy's estimated cost on each node holding a pod it selects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyCost {
    /// `(node, estimated elements)`, sorted by node.
    pub nodes: Vec<(Arc<str>, u64)>,
}

impl PolicyCost {
    /// The node where it costs most (the first by name among equals).
    pub fn busiest(&self) -> Option<(&Arc<str>, u64)> {
        self.nodes
            .iter()
            .fold(None, |best: Option<(&Arc<str>, u64)>, (n, c)| match best {
                Some((_, b)) if b >= *c => best,
                _ => Some((n, *c)),
            })
    }
}

/// A policy whose estimate on some node is above a threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CostWarning {
    pub namespace: String,
    pub name: String,
    /// The busiest node and the estimate there.
    pub node: Arc<str>,
    pub elements: u64,
}

impl Index {
    pub fn policy_cost(&self, namespace: &str, name: &str) -> Option<PolicyCost> {
        let ns = *self.ns_by_name.get(namespace)?;
        let p = *self.policy_by_key.get(&(ns, Arc::from(name)))?;
        Some(self.cost_of(p))
    }

    /// Policies compiled at or after generation `since` (0: all) whose estimate on their
    /// busiest node exceeds `threshold`, sorted by namespace and name.
    pub fn costly_policies(&self, threshold: u64, since: u64) -> Vec<CostWarning> {
        let mut out: Vec<CostWarning> = self
            .policies
            .iter()
            .filter(|(_, ps)| ps.generation >= since)
            .filter_map(|(i, ps)| {
                let cost = self.cost_of(PolicyIdx::new(i));
                let (node, elements) = cost.busiest()?;
                (elements > threshold).then(|| CostWarning {
                    namespace: self.namespaces[ps.ns.get()].name.to_string(),
                    name: ps.name.to_string(),
                    node: node.clone(),
                    elements,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    fn cost_of(&self, p: PolicyIdx) -> PolicyCost {
        let ps = &self.policies[p.get()];
        let per_list = [(&ps.ingress, false), (&ps.egress, true)].map(|(ts, egress)| {
            ts.iter()
                .flatten()
                .map(|t| self.template_cost(t, egress))
                .fold(0u64, u64::saturating_add)
        });
        let mut groups: FxHashSet<GroupIdx> = FxHashSet::default();
        for t in ps.ingress.iter().chain(&ps.egress).flatten() {
            groups.extend(t.peers.iter().flatten().chain(&t.named_groups));
        }
        let group_entries = groups
            .iter()
            .map(|g| self.group_entries(*g))
            .fold(0u64, u64::saturating_add);
        let directions = [ps.ingress.is_some(), ps.egress.is_some()];

        // Per node: the distinct rule lists of the selected pods (each is one ruleset in the
        // plan), and their endpoint entries.
        #[derive(Default)]
        struct OnNode<'a> {
            lists: [FxHashSet<&'a [RuleIdx]>; 2],
            entries: u64,
        }
        let mut on: FxHashMap<NodeIdx, OnNode<'_>> = FxHashMap::default();
        for (ls, pods) in &self.namespaces[ps.ns.get()].classes {
            if !self.selectors.matches(ps.selector, self.labels.get(*ls)) {
                continue;
            }
            for pod in pods {
                let pod = &self.pods[pod.get()];
                let Some(ep) = &pod.endpoint else { continue };
                let n = on.entry(ep.node).or_default();
                for (d, list) in [&ep.ingress, &ep.egress].into_iter().enumerate() {
                    if !directions[d] {
                        continue;
                    }
                    n.lists[d].insert(list.as_deref().unwrap_or(&[]));
                    n.entries += pod.ips.len() as u64;
                }
            }
        }
        let mut nodes: Vec<(Arc<str>, u64)> = on
            .into_iter()
            .map(|(n, o)| {
                let rules = (0..2)
                    .map(|d| (o.lists[d].len() as u64).saturating_mul(per_list[d]))
                    .fold(0u64, u64::saturating_add);
                let total = rules
                    .saturating_add(group_entries)
                    .saturating_add(o.entries);
                (self.nodes[n.get()].name.clone(), total)
            })
            .collect();
        nodes.sort();
        PolicyCost { nodes }
    }

    /// What one rule of a policy expands to in one ruleset: peer entries × port entries.
    fn template_cost(&self, t: &Template, egress: bool) -> u64 {
        let peers = match &t.peers {
            None => 1,
            Some(gs) => gs
                .iter()
                .map(|g| self.group_entries(*g))
                .fold(0u64, u64::saturating_add),
        };
        // Ingress named ports resolve to one port each on the destination pod; egress ones
        // live in (address, port) groups instead.
        let named = if egress { 0 } else { t.named.len() };
        let ports = if t.any_port {
            1
        } else {
            (t.ranges.len() + named) as u64
        };
        let named_groups = t
            .named_groups
            .iter()
            .map(|g| self.group_entries(*g))
            .fold(0u64, u64::saturating_add);
        peers.saturating_mul(ports).saturating_add(named_groups)
    }

    /// A group's entries in a plan: its addresses (or address·ports), or its CIDR as the
    /// intervals its excepts leave.
    fn group_entries(&self, g: GroupIdx) -> u64 {
        let gs = &self.groups[g.get()];
        match &gs.def {
            GroupDef::Peer(PeerDef::Block(b)) => 1 + b.except.len() as u64,
            _ => gs.members.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::model::K8sObject;
    use crate::testkit::parse_all;

    fn objects(policy_spec: Value) -> Vec<K8sObject> {
        let mut v = Vec::new();
        for (i, n) in ["n1", "n2"].iter().enumerate() {
            v.push(K8sObject::Node(
                serde_json::from_value(json!({"metadata": {"name": n}})).unwrap(),
            ));
            for j in 0..3 {
                v.push(K8sObject::Pod(
                    serde_json::from_value(json!({
                        "metadata": {"name": format!("db-{n}-{j}"), "namespace": "app",
                                     "labels": {"app": "db", "shard": j.to_string()}},
                        "spec": {"nodeName": n},
                        "status": {"podIPs": [{"ip": format!("10.0.{i}.{j}")}, {"ip": format!("fd00::{i}:{j}")}]}
                    }))
                    .unwrap(),
                ));
            }
        }
        v.push(K8sObject::NetworkPolicy(
            serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": "app"},
                "spec": policy_spec,
            }))
            .unwrap(),
        ));
        v
    }

    #[test]
    fn counts_peers_times_ports_per_distinct_rule_list_plus_groups_and_endpoints() {
        let blocks: Vec<Value> = (0..100)
            .map(|i| json!({"ipBlock": {"cidr": format!("192.0.{i}.0/24")}}))
            .collect();
        let idx = Index::build(parse_all(&objects(json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": blocks, "ports": [{"port": 80}, {"port": 443}, {"port": 8000, "endPort": 8100}]}],
        }))));
        let cost = idx.policy_cost("app", "p").unwrap();
        // One list per node (every db pod has the same rules): 100 blocks × 3 port ranges,
        // plus the 100 groups, plus 3 pods × 2 addresses in the ingress map.
        let want = 100 * 3 + 100 + 3 * 2;
        assert_eq!(
            cost.nodes,
            [(Arc::from("n1"), want), (Arc::from("n2"), want)]
        );
        assert_eq!(cost.busiest(), Some((&Arc::from("n1"), want)));
        let warned = idx.costly_policies(want - 1, 0);
        assert_eq!(warned.len(), 1);
        assert_eq!((warned[0].name.as_str(), warned[0].elements), ("p", want));
        assert!(idx.costly_policies(want, 0).is_empty());
        // Only policies compiled since a generation are considered.
        assert!(idx.costly_policies(0, idx.generation() + 1).is_empty());
        assert!(idx.policy_cost("app", "nope").is_none());
    }

    #[test]
    fn pod_peers_count_their_addresses_and_each_distinct_list_counts_again() {
        // Shard 0 also gets a second policy, so on each node db pods hold two distinct
        // ingress lists: `p`'s rule is expanded in both.
        let mut objs = objects(json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}],
        }));
        objs.push(K8sObject::NetworkPolicy(
            serde_json::from_value(json!({
                "metadata": {"name": "q", "namespace": "app"},
                "spec": {"podSelector": {"matchLabels": {"shard": "0"}}, "ingress": [{}]},
            }))
            .unwrap(),
        ));
        let idx = Index::build(parse_all(&objs));
        let cost = idx.policy_cost("app", "p").unwrap();
        // The peer group: 6 pods × 2 addresses = 12 entries, one port; 2 lists per node;
        // the group once; 3 pods × 2 addresses.
        let want = 12 * 2 + 12 + 6;
        assert_eq!(cost.busiest(), Some((&Arc::from("n1"), want)));
    }
}
