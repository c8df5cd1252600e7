//! Endpoints: the rules that apply to one local pod, and the node references they hold.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::faults::{self, Fault};
use crate::index::{
    ClusterKey, ClusterRules, CpIdx, CpSet, EndpointState, GroupIdx, Index, NamedPort, NodeIdx,
    NpLists, Order, PodIdx, RuleBlock, RuleIdx, Template,
};
use crate::intern::Sym;
use crate::ir::{self, PortRange, RuleId};
use crate::labels::LabelSetId;
use crate::model::Protocol;

type PerPod = (
    Order,
    Option<Box<[GroupIdx]>>,
    Vec<PortRange>,
    Vec<(Sym, Protocol)>,
);

/// The rules of one ingress template that need no pod, and queues those that do.
fn ingress_template(t: &Template, v: &mut Vec<RuleIdx>, per_pod: &mut Vec<PerPod>) {
    match t.static_rule {
        Some(r) => v.push(r),
        None if !t.named.is_empty() => {
            per_pod.push((t.order, t.peers.clone(), t.ranges.clone(), t.named.clone()))
        }
        None => {}
    }
}

impl Index {
    /// What the pod's node must enforce for it now; `None` if it isn't an endpoint (host
    /// network, terminal, no address, or no known node).
    fn compute_endpoint(&mut self, p: PodIdx) -> Option<EndpointState> {
        let pod = &self.pods[p.get()];
        if !pod.selectable() {
            return None;
        }
        let node = pod.node?;
        if !self.nodes[node.get()].known {
            return None;
        }
        let np = self.np_lists(p);
        let cluster = self.cluster_rules_for(p);
        let [mut mi, mut me] = std::mem::take(&mut self.work.ids);
        let pod = &self.pods[p.get()];
        // Pods without NetworkPolicy rules hash the shared cluster IDs as they are.
        let merged = |out: &mut Vec<RuleId>, n: &[RuleId], c: &[RuleId]| -> bool {
            if n.is_empty() {
                return false;
            }
            merge_sorted(n, c, out);
            true
        };
        let i: &[RuleId] = if merged(&mut mi, &np.ids[0], &cluster.ids[0]) {
            &mi
        } else {
            &cluster.ids[0]
        };
        let e: &[RuleId] = if merged(&mut me, &np.ids[1], &cluster.ids[1]) {
            &me
        } else {
            &cluster.ids[1]
        };
        let item = ir::endpoint_item_parts(
            pod.endpoint_id,
            pod.sandbox,
            &pod.ips,
            (np.ingress.is_some(), i),
            (np.egress.is_some(), e),
        );
        self.work.ids = [mi, me];
        let NpLists {
            ingress, egress, ..
        } = np;
        Some(EndpointState {
            node,
            ingress,
            egress,
            cluster,
            item,
        })
    }

    /// The pod's NetworkPolicy rule lists: a function of its namespace, labels and ports,
    /// computed once per such class in a `compile_dirty`.
    fn np_lists(&mut self, p: PodIdx) -> NpLists {
        let pod = &self.pods[p.get()];
        let class = (pod.ns, pod.labels);
        let same_ports = |k: &[NamedPort]| {
            k.len() == pod.ports.len()
                && k.iter()
                    .zip(pod.ports.iter())
                    .all(|(a, b)| (a.name, a.proto, a.port) == (b.name, b.proto, b.port))
        };
        if let Some(hit) = self
            .work
            .np_lists
            .get(&class)
            .and_then(|v| v.iter().find(|(k, _)| same_ports(k)))
        {
            return hit.1.clone();
        }
        let labels = self.labels.get(pod.labels);
        let mut ingress: Option<Vec<RuleIdx>> = None;
        let mut egress: Option<Vec<RuleIdx>> = None;
        let mut per_pod: Vec<PerPod> = Vec::new();
        for &pol in &self.namespaces[pod.ns.get()].policies {
            let ps = &self.policies[pol.get()];
            if !self.selectors.matches(ps.selector, labels) {
                continue;
            }
            if let Some(ts) = &ps.ingress {
                let v = ingress.get_or_insert_with(Vec::new);
                for t in ts {
                    ingress_template(t, v, &mut per_pod);
                }
            }
            if let Some(ts) = &ps.egress {
                let v = egress.get_or_insert_with(Vec::new);
                for t in ts {
                    v.extend(t.static_rule);
                    v.extend(t.named_rule);
                }
            }
        }
        let ports: SmallVec<[NamedPort; 8]> = pod.ports.iter().copied().collect();
        for (order, peers, ranges, named) in per_pod {
            let r = self.ingress_rule_for(order, peers.as_deref(), &ranges, &named, &ports);
            ingress
                .as_mut()
                .expect("per-pod rules come from ingress")
                .extend(r);
        }
        let ingress = ingress.map(|v| self.sorted_by_id(v));
        let egress = egress.map(|v| self.sorted_by_id(v));
        let ids = [&ingress, &egress].map(|l| {
            l.iter()
                .flatten()
                .map(|r| self.rules[r.get()].rule.id)
                .collect()
        });
        let lists = NpLists {
            ingress,
            egress,
            ids,
        };
        self.work
            .np_lists
            .entry(class)
            .or_default()
            .push((ports.into_vec().into_boxed_slice(), lists.clone()));
        lists
    }

    /// The cluster policies selecting pods with these namespace and pod labels, and whether
    /// one of them resolves ingress named ports against the pod.
    fn subjects(&mut self, ns: LabelSetId, pod: LabelSetId) -> (CpSet, bool) {
        if let Some(s) = self.work.subjects.get(&(ns, pod)) {
            return s.clone();
        }
        let mut set = CpSet::new();
        let mut named = false;
        for (i, cp) in self.cluster_policies.iter() {
            if !self.subject_selects(CpIdx::new(i), ns, pod) {
                continue;
            }
            if set.len() <= i / 64 {
                set.resize(i / 64 + 1, 0);
            }
            set[i / 64] |= 1 << (i % 64);
            named |= cp.named_ingress;
        }
        self.work.subjects.insert((ns, pod), (set.clone(), named));
        (set, named)
    }

    /// The pod's cluster rule list: the cached one for its key, or a new one, cached.
    fn cluster_rules_for(&mut self, p: PodIdx) -> Arc<ClusterRules> {
        let pod = &self.pods[p.get()];
        let (ns_labels, pod_labels) = (self.namespaces[pod.ns.get()].labels, pod.labels);
        let (subjects, named) = self.subjects(ns_labels, pod_labels);
        let pod = &self.pods[p.get()];
        let ports: Box<[(Sym, Protocol, u16)]> = if named {
            pod.ports
                .iter()
                .map(|n| (n.name, n.proto, n.port))
                .collect()
        } else {
            Box::default()
        };
        let key = ClusterKey { subjects, ports };
        if let Some(c) = self.cluster_rules.get(&key) {
            return c.clone();
        }
        let mut lists: [Vec<RuleIdx>; 2] = [Vec::new(), Vec::new()];
        let mut blocks: Vec<Arc<RuleBlock>> = Vec::new();
        for (w, bits) in key.subjects.iter().enumerate() {
            let mut bits = *bits;
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let b = self.rule_block(CpIdx::new(i), &key.ports);
                lists[0].extend_from_slice(&b.rules[..b.n_in]);
                lists[1].extend_from_slice(&b.rules[b.n_in..]);
                blocks.push(b);
            }
        }
        let [i, e] = lists;
        let rules = [self.sorted_by_id(i), self.sorted_by_id(e)];
        for r in rules.iter().flatten() {
            self.rules[r.get()].refs += 1;
        }
        for &(name, _, _) in key.ports.iter() {
            self.strings.retain(name);
        }
        let ids = rules
            .each_ref()
            .map(|l| l.iter().map(|r| self.rules[r.get()].rule.id).collect());
        self.cluster_rules_next += 1;
        let c = Arc::new(ClusterRules {
            id: self.cluster_rules_next,
            key: key.clone(),
            rules,
            ids,
            blocks: blocks.into_boxed_slice(),
        });
        self.cluster_rules.insert(key, c.clone());
        c
    }

    /// The rules cluster policy `cp` gives a pod with `ports` (ingress, then egress),
    /// shared by every list built in this `compile_dirty`.
    fn rule_block(&mut self, cp: CpIdx, ports: &[(Sym, Protocol, u16)]) -> Arc<RuleBlock> {
        let cps = &self.cluster_policies[cp.get()];
        let ports: Box<[(Sym, Protocol, u16)]> = if cps.named_ingress {
            ports.into()
        } else {
            Box::default()
        };
        let key = (cp, ports);
        if let Some(b) = self.work.blocks.get(&key) {
            return b.clone();
        }
        let mut ingress = Vec::new();
        let mut per_pod: Vec<PerPod> = Vec::new();
        for t in cps.ingress.iter().flatten() {
            ingress_template(t, &mut ingress, &mut per_pod);
        }
        let mut egress = Vec::new();
        for t in cps.egress.iter().flatten() {
            egress.extend(t.static_rule);
            egress.extend(t.named_rule);
        }
        if !per_pod.is_empty() {
            let ports: SmallVec<[NamedPort; 8]> = key
                .1
                .iter()
                .map(|&(name, proto, port)| NamedPort { name, proto, port })
                .collect();
            // As if every container port were declared for every protocol: a name match
            // alone then resolves.
            let ports: SmallVec<[NamedPort; 8]> =
                if faults::active(Fault::CnpNamedPortIgnoresProtocol) {
                    ports
                        .iter()
                        .flat_map(|p| Protocol::ALL.map(|proto| NamedPort { proto, ..*p }))
                        .collect()
                } else {
                    ports
                };
            for (order, peers, ranges, named) in per_pod {
                let r = self.ingress_rule_for(order, peers.as_deref(), &ranges, &named, &ports);
                ingress.extend(r);
            }
        }
        let n_in = ingress.len();
        ingress.extend(egress);
        self.cluster_rules_next += 1;
        let b = Arc::new(RuleBlock {
            id: self.cluster_rules_next,
            n_in,
            rules: ingress.into_boxed_slice(),
        });
        self.work.blocks.insert(key, b.clone());
        b
    }

    /// Drops every cached cluster rule list (a cluster policy changed: the keys' subject
    /// bits may now name another policy). Endpoints keep the lists they hold.
    pub(crate) fn clear_cluster_rules(&mut self) {
        for (_, c) in std::mem::take(&mut self.cluster_rules) {
            self.release_cluster_rules(&c);
        }
        self.work.cluster_rules_gc.clear();
    }

    /// Evicts the cached lists no endpoint holds any more.
    pub(crate) fn gc_cluster_rules(&mut self) {
        for key in std::mem::take(&mut self.work.cluster_rules_gc) {
            if let Some(c) = self.cluster_rules.get(&key)
                && Arc::strong_count(c) == 1
            {
                let c = self.cluster_rules.remove(&key).expect("found");
                self.release_cluster_rules(&c);
            }
        }
    }

    fn release_cluster_rules(&mut self, c: &ClusterRules) {
        for r in c.rules.iter().flatten() {
            self.release_rule(*r);
        }
        for &(name, _, _) in c.key.ports.iter() {
            self.strings.release(name);
        }
    }

    fn sorted_by_id(&self, mut v: Vec<RuleIdx>) -> Box<[RuleIdx]> {
        v.sort_unstable_by_key(|r| self.rules[r.get()].rule.id);
        v.dedup();
        v.into_boxed_slice()
    }

    pub(crate) fn recompute_endpoint(&mut self, p: PodIdx) {
        let new = self.compute_endpoint(p);
        let old = self.pods[p.get()].endpoint.take();
        if old != new {
            if let Some(o) = &old {
                self.endpoint_unref(o);
            }
            if let Some(n) = &new {
                self.endpoint_ref(n);
            }
        }
        self.pods[p.get()].endpoint = new;
    }

    fn endpoint_ref(&mut self, ep: &EndpointState) {
        let n = ep.node;
        self.nodes[n.get()].acc.add(&ep.item);
        self.touch(n);
        for r in ep.np_rules(false).chain(ep.np_rules(true)) {
            self.node_ref_rule(n, r);
        }
        let c = self.nodes[n.get()]
            .cluster_refs
            .entry(ep.cluster.id)
            .or_insert(0);
        *c += 1;
        if *c == 1 {
            // A node's first list of cluster rules brings hundreds of them at once: one
            // allocation instead of a rehash at every doubling (on each of 5,000 nodes).
            let node = &mut self.nodes[n.get()];
            if node.cluster_refs.len() == 1 {
                let more: usize = ep.cluster.blocks.iter().map(|b| b.rules.len()).sum();
                node.rule_refs.reserve(more);
            }
            for b in ep.cluster.blocks.iter() {
                let c = self.nodes[n.get()].block_refs.entry(b.id).or_insert(0);
                *c += 1;
                if *c == 1 {
                    for r in b.rules.iter() {
                        self.node_ref_rule(n, *r);
                    }
                }
            }
        }
    }

    pub(crate) fn endpoint_unref(&mut self, ep: &EndpointState) {
        let n = ep.node;
        self.nodes[n.get()].acc.sub(&ep.item);
        self.touch(n);
        for r in ep.np_rules(false).chain(ep.np_rules(true)) {
            self.node_unref_rule(n, r);
        }
        let refs = &mut self.nodes[n.get()].cluster_refs;
        let c = refs.get_mut(&ep.cluster.id).expect("node holds the list");
        *c -= 1;
        if *c == 0 {
            refs.remove(&ep.cluster.id);
            for b in ep.cluster.blocks.iter() {
                let refs = &mut self.nodes[n.get()].block_refs;
                let c = refs.get_mut(&b.id).expect("node holds the block");
                *c -= 1;
                if *c == 0 {
                    refs.remove(&b.id);
                    for r in b.rules.iter() {
                        self.node_unref_rule(n, *r);
                    }
                }
            }
        }
        self.work.cluster_rules_gc.push(ep.cluster.key.clone());
    }

    /// The rule's own count is one per node holding it: a node's further references touch
    /// only the node's map, not the rule (a cache miss per pod and rule otherwise).
    fn node_ref_rule(&mut self, n: NodeIdx, r: RuleIdx) {
        let node = &mut self.nodes[n.get()];
        let c = node.rule_refs.entry(r).or_insert(0);
        *c += 1;
        if *c == 1 {
            let rs = &mut self.rules[r.get()];
            rs.refs += 1;
            node.acc.add(&rs.hash);
            for g in rs.key.peers.iter().flatten() {
                let c = node.group_refs.entry(*g).or_insert(0);
                *c += 1;
                if *c == 1 {
                    let gs = &mut self.groups[g.get()];
                    node.acc.add(&gs.item);
                    gs.nodes.insert(n);
                }
            }
        }
    }

    fn node_unref_rule(&mut self, n: NodeIdx, r: RuleIdx) {
        let node = &mut self.nodes[n.get()];
        let c = node.rule_refs.get_mut(&r).expect("node holds the rule");
        *c -= 1;
        if *c > 0 {
            return;
        }
        node.rule_refs.remove(&r);
        let rs = &mut self.rules[r.get()];
        rs.refs -= 1;
        if rs.refs == 0 {
            self.work.rule_gc.push(r);
        }
        node.acc.sub(&rs.hash);
        for g in rs.key.peers.iter().flatten() {
            let c = node.group_refs.get_mut(g).expect("node holds the group");
            *c -= 1;
            if *c == 0 {
                node.group_refs.remove(g);
                let gs = &mut self.groups[g.get()];
                node.acc.sub(&gs.item);
                gs.nodes.remove(&n);
            }
        }
    }
}

/// The sorted union of two sorted ID lists, into `out`.
fn merge_sorted(a: &[RuleId], b: &[RuleId], out: &mut Vec<RuleId>) {
    out.clear();
    out.reserve(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        out.push(x.min(y));
        i += usize::from(x <= y);
        j += usize::from(y <= x);
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out.dedup();
}
