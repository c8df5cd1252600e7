//! Endpoints: the rules that apply to one local pod, and the node references they hold.

use smallvec::SmallVec;

use crate::faults::{self, Fault};
use crate::index::{
    CpIdx, EndpointState, GroupIdx, Index, NamedPort, NodeIdx, Order, PodIdx, RuleIdx, Template,
};
use crate::intern::Sym;
use crate::ir::{self, PortRange, RuleId};
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
        // Cluster policies selecting the pod: their rules apply whether or not a
        // NetworkPolicy isolates it, so they are kept apart from the isolating lists.
        let mut cluster: [Vec<RuleIdx>; 2] = [Vec::new(), Vec::new()];
        let mut cluster_per_pod: Vec<PerPod> = Vec::new();
        let ns_labels = self.namespaces[pod.ns.get()].labels;
        for (i, cp) in self.cluster_policies.iter() {
            if !self.subject_selects(CpIdx::new(i), ns_labels, pod.labels) {
                continue;
            }
            for t in cp.ingress.iter().flatten() {
                ingress_template(t, &mut cluster[0], &mut cluster_per_pod);
            }
            for t in cp.egress.iter().flatten() {
                cluster[1].extend(t.static_rule);
                cluster[1].extend(t.named_rule);
            }
        }
        if !per_pod.is_empty() || !cluster_per_pod.is_empty() {
            let ports: SmallVec<[NamedPort; 8]> = pod.ports.iter().copied().collect();
            for (order, peers, ranges, named) in per_pod {
                let r = self.ingress_rule_for(order, peers.as_deref(), &ranges, &named, &ports);
                ingress
                    .as_mut()
                    .expect("per-pod rules come from ingress")
                    .extend(r);
            }
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
            for (order, peers, ranges, named) in cluster_per_pod {
                let r = self.ingress_rule_for(order, peers.as_deref(), &ranges, &named, &ports);
                cluster[0].extend(r);
            }
        }
        let ingress = ingress.map(|v| self.sorted_by_id(v));
        let egress = egress.map(|v| self.sorted_by_id(v));
        let [ci, ce] = cluster;
        let cluster = [self.sorted_by_id(ci), self.sorted_by_id(ce)];
        let ids = |l: &Option<Box<[RuleIdx]>>, c: &[RuleIdx]| -> SmallVec<[RuleId; 16]> {
            let mut v: SmallVec<[RuleId; 16]> = l
                .iter()
                .flatten()
                .chain(c)
                .map(|r| self.rules[r.get()].rule.id)
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let pod = &self.pods[p.get()];
        let item = ir::endpoint_item_parts(
            pod.endpoint_id,
            pod.sandbox,
            &pod.ips,
            (ingress.is_some(), &ids(&ingress, &cluster[0])),
            (egress.is_some(), &ids(&egress, &cluster[1])),
        );
        Some(EndpointState {
            node,
            ingress,
            egress,
            cluster,
            item,
        })
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
        for r in ep.rules(false).chain(ep.rules(true)) {
            self.node_ref_rule(n, r);
        }
    }

    pub(crate) fn endpoint_unref(&mut self, ep: &EndpointState) {
        let n = ep.node;
        self.nodes[n.get()].acc.sub(&ep.item);
        self.touch(n);
        for r in ep.rules(false).chain(ep.rules(true)) {
            self.node_unref_rule(n, r);
        }
    }

    fn node_ref_rule(&mut self, n: NodeIdx, r: RuleIdx) {
        let rs = &mut self.rules[r.get()];
        rs.refs += 1;
        let node = &mut self.nodes[n.get()];
        let c = node.rule_refs.entry(r).or_insert(0);
        *c += 1;
        if *c == 1 {
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
        let rs = &mut self.rules[r.get()];
        rs.refs -= 1;
        if rs.refs == 0 {
            self.work.rule_gc.push(r);
        }
        let node = &mut self.nodes[n.get()];
        let c = node.rule_refs.get_mut(&r).expect("node holds the rule");
        *c -= 1;
        if *c > 0 {
            return;
        }
        node.rule_refs.remove(&r);
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
