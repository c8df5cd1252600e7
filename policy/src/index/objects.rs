//! Object events → raw state, eager group membership, and dirty marks for the next flush.

use std::sync::Arc;

use smallvec::SmallVec;

use super::{
    ClusterPolicyState, CpIdx, Index, NamedPort, NodeIdx, NodeState, NsIdx, NsState, Order, PodIdx,
    PodState, PolicyIdx, PolicyState,
};
use crate::faults::{self, Fault};
use crate::ir::digest::Enc;
use crate::ir::{self, Direction, EndpointId};
use crate::labels::value_of;
use crate::model::{
    ClusterPolicy, CnpAction, CnpTier, Namespace, Node, Object, ObjectKey, Pod, Policy, Subject,
};

impl Index {
    pub(crate) fn upsert(&mut self, o: Object) {
        match o {
            Object::Namespace(n) => self.upsert_namespace(n),
            Object::Pod(p) => self.upsert_pod(p),
            Object::Node(n) => self.upsert_node(n),
            Object::Policy(p) => self.upsert_policy(p),
            Object::ClusterPolicy(p) => self.upsert_cluster_policy(p),
        }
    }

    pub(crate) fn remove(&mut self, key: &ObjectKey) {
        match key {
            ObjectKey::Namespace(name) => self.remove_namespace(name),
            ObjectKey::Node(name) => self.remove_node(name),
            ObjectKey::Pod { namespace, name } => {
                if let Some(p) = self.find_pod(namespace, name) {
                    self.pod_out(p);
                }
            }
            ObjectKey::Policy { namespace, name } => {
                if let Some(p) = self.find_policy(namespace, name) {
                    self.policy_out(p);
                }
            }
            ObjectKey::ClusterPolicy(name) => {
                if let Some(&p) = self.cluster_policy_by_name.get(name.as_str()) {
                    self.cluster_policy_out(p);
                }
            }
        }
    }

    pub(crate) fn mark_dirty(&mut self, p: PodIdx) {
        let pod = &mut self.pods[p.get()];
        if !pod.dirty {
            pod.dirty = true;
            self.work.dirty_pods.push(p);
        }
    }

    pub(crate) fn touch(&mut self, n: NodeIdx) {
        let node = &mut self.nodes[n.get()];
        if !node.touched {
            node.touched = true;
            self.work.touched_nodes.push(n);
        }
    }

    // === namespaces ===

    pub(crate) fn ns_idx(&mut self, name: &str) -> NsIdx {
        if let Some(&i) = self.ns_by_name.get(name) {
            return i;
        }
        let labels = self
            .labels
            .intern(&mut self.strings, &Namespace::implicit_labels(name));
        let name: Arc<str> = Arc::from(name);
        let matching: Vec<_> = self
            .nssel
            .keys()
            .copied()
            .filter(|s| self.selectors.matches(*s, self.labels.get(labels)))
            .collect();
        let idx = NsIdx::new(self.namespaces.insert(NsState {
            name: name.clone(),
            labels,
            known: false,
            classes: Default::default(),
            pod_count: 0,
            policies: Vec::new(),
            scoped_groups: Vec::new(),
            matching_nssels: matching.clone(),
        }));
        for s in matching {
            self.nssel.get_mut(&s).expect("listed").namespaces.push(idx);
        }
        self.ns_by_name.insert(name, idx);
        self.work.ns_gc.push(idx);
        idx
    }

    fn upsert_namespace(&mut self, n: Namespace) {
        let idx = self.ns_idx(&n.name);
        let new = self.labels.intern(&mut self.strings, &n.labels);
        let ns = &mut self.namespaces[idx.get()];
        ns.known = true;
        if ns.labels == new {
            self.labels.release(&mut self.strings, new);
            return;
        }
        let old = std::mem::replace(&mut ns.labels, new);
        self.ns_relabelled(idx);
        self.ns_subject_changed(idx);
        self.labels.release(&mut self.strings, old);
    }

    fn remove_namespace(&mut self, name: &str) {
        let Some(&idx) = self.ns_by_name.get(name) else {
            return;
        };
        if !self.namespaces[idx.get()].known {
            return;
        }
        // Pods may outlive their namespace in watch order; they keep the labels the API
        // server always sets.
        let implicit = self
            .labels
            .intern(&mut self.strings, &Namespace::implicit_labels(name));
        let ns = &mut self.namespaces[idx.get()];
        ns.known = false;
        let old = std::mem::replace(&mut ns.labels, implicit);
        if old != implicit {
            self.ns_relabelled(idx);
            self.ns_subject_changed(idx);
        }
        self.labels.release(&mut self.strings, old);
        self.work.ns_gc.push(idx);
    }

    /// A namespace's labels changed: groups scoped by namespace selectors gain or lose its pods.
    fn ns_relabelled(&mut self, idx: NsIdx) {
        let sels: Vec<_> = self.nssel.keys().copied().collect();
        for s in sels {
            let ns = &self.namespaces[idx.get()];
            let now = self.selectors.matches(s, self.labels.get(ns.labels));
            let before = ns.matching_nssels.contains(&s);
            if now == before {
                continue;
            }
            let entry = self.nssel.get_mut(&s).expect("listed");
            let ns = &mut self.namespaces[idx.get()];
            if now {
                ns.matching_nssels.push(s);
                entry.namespaces.push(idx);
            } else {
                ns.matching_nssels.retain(|x| *x != s);
                entry.namespaces.retain(|x| *x != idx);
            }
            for g in entry.groups.clone() {
                self.group_ns_delta(g, idx, now);
            }
        }
    }

    // === nodes ===

    pub(crate) fn node_idx(&mut self, name: &str) -> NodeIdx {
        if let Some(&i) = self.node_by_name.get(name) {
            return i;
        }
        let name: Arc<str> = Arc::from(name);
        let idx = NodeIdx::new(self.nodes.insert(NodeState {
            name: name.clone(),
            known: false,
            addrs: Vec::new(),
            labels: None,
            pods: Vec::new(),
            rule_refs: Default::default(),
            cluster_refs: Default::default(),
            block_refs: Default::default(),
            group_refs: Default::default(),
            acc: Default::default(),
            published: None,
            touched: false,
        }));
        self.node_by_name.insert(name, idx);
        self.work.node_gc.push(idx);
        idx
    }

    fn upsert_node(&mut self, n: Node) {
        let idx = self.node_idx(&n.name);
        let labels = self.labels.intern(&mut self.strings, &n.labels);
        let node = &self.nodes[idx.get()];
        if node.known && node.addrs == n.addrs && node.labels == Some(labels) {
            self.labels.release(&mut self.strings, labels);
            return;
        }
        // Out of the `nodes` groups as it was, back in as it is: a relabel or a new address
        // changes group membership only (rules stay; nodes holding the group get a new
        // version through the group's digest).
        self.node_membership(idx, false);
        let node = &mut self.nodes[idx.get()];
        let was_known = node.known;
        if was_known {
            node.acc.sub(&ir::node_item(&node.addrs));
        }
        node.acc.add(&ir::node_item(&n.addrs));
        node.addrs = n.addrs;
        node.known = true;
        let old = node.labels.replace(labels);
        if let Some(old) = old {
            self.labels.release(&mut self.strings, old);
        }
        self.node_membership(idx, true);
        self.touch(idx);
        if !was_known {
            for p in self.nodes[idx.get()].pods.clone() {
                self.mark_dirty(p);
            }
        }
    }

    fn remove_node(&mut self, name: &str) {
        let Some(&idx) = self.node_by_name.get(name) else {
            return;
        };
        if !self.nodes[idx.get()].known {
            return;
        }
        self.node_membership(idx, false);
        let node = &mut self.nodes[idx.get()];
        node.acc.sub(&ir::node_item(&node.addrs));
        node.addrs.clear();
        node.known = false;
        if let Some(old) = node.labels.take() {
            self.labels.release(&mut self.strings, old);
        }
        self.touch(idx);
        for p in self.nodes[idx.get()].pods.clone() {
            self.mark_dirty(p);
        }
        self.work.node_gc.push(idx);
    }

    // === pods ===

    fn find_pod(&self, namespace: &str, name: &str) -> Option<PodIdx> {
        let ns = *self.ns_by_name.get(namespace)?;
        self.pod_by_key.get(&(ns, Arc::from(name))).copied()
    }

    fn upsert_pod(&mut self, pod: Pod) {
        let ns = self.ns_idx(&pod.namespace);
        let name: Arc<str> = Arc::from(pod.name.as_str());
        if let Some(&p) = self.pod_by_key.get(&(ns, name.clone())) {
            if self.pod_unchanged(p, &pod) {
                return;
            }
            self.pod_out(p);
        }
        let labels = self.labels.intern(&mut self.strings, &pod.labels);
        let node = pod.node.as_deref().map(|n| self.node_idx(n));
        let ports: Box<[NamedPort]> = pod
            .ports
            .iter()
            .map(|c| NamedPort {
                name: self.strings.intern(&c.name),
                proto: c.proto,
                port: c.port,
            })
            .collect();
        let endpoint_id = {
            let mut e = Enc::new("endpoint.id");
            e.str(&pod.namespace).str(&pod.name);
            if let Some(uid) = &pod.uid {
                e.str(uid);
            }
            EndpointId(e.finish_id())
        };
        let sandbox = pod.sandbox.as_deref().map_or(0, |s| {
            Enc::new("endpoint.sandbox").str(s).finish_id().max(1)
        });
        let p = PodIdx::new(self.pods.insert(PodState {
            name: name.clone(),
            ns,
            labels,
            node,
            addr_members: pod.ips.iter().map(|ip| ir::addr_member(*ip)).collect(),
            ips: SmallVec::from_vec(pod.ips),
            ports,
            host_network: pod.host_network,
            terminal: pod.terminal,
            endpoint_id,
            sandbox,
            uid: pod.uid.as_deref().map(Arc::from),
            sandbox_raw: pod.sandbox.as_deref().map(Arc::from),
            endpoint: None,
            dirty: false,
        }));
        self.pod_by_key.insert((ns, name), p);
        self.namespaces[ns.get()].pod_count += 1;
        if let Some(n) = node {
            self.nodes[n.get()].pods.push(p);
        }
        let state = &self.pods[p.get()];
        if state.selectable() {
            let ls = state.labels;
            self.namespaces[ns.get()]
                .classes
                .entry(ls)
                .or_default()
                .push(p);
            for ip in state.ips.clone() {
                self.pods_by_ip.entry(ip).or_default().push(p);
            }
            self.pod_membership(p, true);
            if node.is_some() {
                self.mark_dirty(p);
            }
        }
    }

    fn pod_unchanged(&self, p: PodIdx, pod: &Pod) -> bool {
        let s = &self.pods[p.get()];
        let node_same = match (&s.node, &pod.node) {
            (None, None) => true,
            (Some(n), Some(m)) => *self.nodes[n.get()].name == **m,
            _ => false,
        };
        let labels = self.labels.get(s.labels);
        let labels_same = labels.len() == pod.labels.len()
            && pod
                .labels
                .iter()
                .all(|(k, v)| match (self.strings.get(k), self.strings.get(v)) {
                    (Some(k), Some(v)) => value_of(labels, k) == Some(v),
                    _ => false,
                });
        let ports_same = s.ports.len() == pod.ports.len()
            && s.ports.iter().zip(&pod.ports).all(|(a, b)| {
                self.strings.resolve(a.name) == b.name && a.proto == b.proto && a.port == b.port
            });
        node_same
            && labels_same
            && ports_same
            && s.ips.as_slice() == pod.ips.as_slice()
            && s.host_network == pod.host_network
            && s.terminal == pod.terminal
            && s.uid.as_deref() == pod.uid.as_deref()
            && s.sandbox_raw.as_deref() == pod.sandbox.as_deref()
    }

    /// Removes a pod and everything it contributed.
    fn pod_out(&mut self, p: PodIdx) {
        if self.pods[p.get()].selectable() {
            self.pod_membership(p, false);
            let s = &self.pods[p.get()];
            let (ns, ls, ips) = (s.ns, s.labels, s.ips.clone());
            let classes = &mut self.namespaces[ns.get()].classes;
            if let Some(list) = classes.get_mut(&ls) {
                list.retain(|x| *x != p);
                if list.is_empty() {
                    classes.remove(&ls);
                }
            }
            for ip in ips {
                if let Some(list) = self.pods_by_ip.get_mut(&ip) {
                    list.retain(|x| *x != p);
                    if list.is_empty() {
                        self.pods_by_ip.remove(&ip);
                    }
                }
            }
        }
        if let Some(ep) = self.pods[p.get()].endpoint.take() {
            self.endpoint_unref(&ep);
        }
        let s = self.pods.remove(p.get());
        self.pod_by_key.remove(&(s.ns, s.name.clone()));
        if let Some(n) = s.node {
            let node = &mut self.nodes[n.get()];
            if let Some(i) = node.pods.iter().position(|x| *x == p) {
                node.pods.swap_remove(i);
            }
            self.work.node_gc.push(n);
        }
        self.namespaces[s.ns.get()].pod_count -= 1;
        self.work.ns_gc.push(s.ns);
        self.labels.release(&mut self.strings, s.labels);
        for port in s.ports.iter() {
            self.strings.release(port.name);
        }
    }

    // === policies ===

    fn find_policy(&self, namespace: &str, name: &str) -> Option<PolicyIdx> {
        let ns = *self.ns_by_name.get(namespace)?;
        self.policy_by_key.get(&(ns, Arc::from(name))).copied()
    }

    fn upsert_policy(&mut self, policy: Policy) {
        let ns = self.ns_idx(&policy.namespace);
        let name: Arc<str> = Arc::from(policy.name.as_str());
        if let Some(&p) = self.policy_by_key.get(&(ns, name.clone())) {
            if self.policies[p.get()].model == policy {
                return;
            }
            self.policy_out(p);
        }
        let selector = self
            .selectors
            .intern(&mut self.strings, &policy.pod_selector);
        let ingress = policy
            .ingress
            .as_ref()
            .map(|rules| self.build_templates(ns, Direction::Ingress, rules));
        let egress = policy
            .egress
            .as_ref()
            .map(|rules| self.build_templates(ns, Direction::Egress, rules));
        let p = PolicyIdx::new(self.policies.insert(PolicyState {
            ns,
            name: name.clone(),
            model: policy,
            generation: self.generation + 1,
            selector,
            ingress,
            egress,
        }));
        self.policy_by_key.insert((ns, name), p);
        self.namespaces[ns.get()].policies.push(p);
        self.mark_selected_dirty(ns, selector);
    }

    fn policy_out(&mut self, p: PolicyIdx) {
        let (ns, selector) = {
            let s = &self.policies[p.get()];
            (s.ns, s.selector)
        };
        self.mark_selected_dirty(ns, selector);
        let s = self.policies.remove(p.get());
        self.policy_by_key.remove(&(ns, s.name.clone()));
        self.namespaces[ns.get()].policies.retain(|x| *x != p);
        self.work.ns_gc.push(ns);
        for ts in [s.ingress, s.egress].into_iter().flatten() {
            self.release_templates(ts);
        }
        self.selectors.release(&mut self.strings, selector);
    }

    fn mark_selected_dirty(&mut self, ns: NsIdx, selector: crate::selector::SelId) {
        if self.work.loading {
            return;
        }
        let mut hit: Vec<PodIdx> = Vec::new();
        for (ls, pods) in &self.namespaces[ns.get()].classes {
            if self.selectors.matches(selector, self.labels.get(*ls)) {
                hit.extend_from_slice(pods);
            }
        }
        for p in hit {
            if self.pods[p.get()].node.is_some() {
                self.mark_dirty(p);
            }
        }
    }

    // === cluster network policies ===

    /// A namespace's labels changed: which cluster policies select its pods may have.
    fn ns_subject_changed(&mut self, idx: NsIdx) {
        if self.cluster_policies.is_empty() {
            return;
        }
        let pods: Vec<PodIdx> = self.namespaces[idx.get()]
            .classes
            .values()
            .flatten()
            .copied()
            .collect();
        for p in pods {
            if self.pods[p.get()].node.is_some() {
                self.mark_dirty(p);
            }
        }
    }

    fn upsert_cluster_policy(&mut self, policy: ClusterPolicy) {
        let name: Arc<str> = Arc::from(policy.name.as_str());
        if let Some(&p) = self.cluster_policy_by_name.get(&name) {
            if self.cluster_policies[p.get()].model == policy {
                return;
            }
            self.cluster_policy_out(p);
        }
        let (ns_sel, pod_sel) = match &policy.subject {
            Subject::Namespaces(n) => (n, None),
            Subject::Pods { namespaces, pods } => (namespaces, Some(pods)),
        };
        let pod_sel = if faults::active(Fault::CnpPodsSubjectIgnoresPodSelector) {
            None
        } else {
            pod_sel
        };
        let ns_sel = self.selectors.intern(&mut self.strings, ns_sel);
        let pod_sel = pod_sel.map(|s| self.selectors.intern(&mut self.strings, s));
        let tier = match policy.tier {
            CnpTier::Admin => ir::Tier::Admin,
            CnpTier::Baseline => ir::Tier::Baseline,
        };
        let tier = if faults::active(Fault::CnpBaselineAsAdmin) {
            ir::Tier::Admin
        } else {
            tier
        };
        let build = |idx: &mut Self, direction: Direction, rules: &[crate::model::CnpRule]| {
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let i = if faults::active(Fault::CnpRuleOrderReversed) {
                        rules.len() - 1 - i
                    } else {
                        i
                    };
                    let order = Order {
                        tier,
                        priority: ir::cluster_rank(policy.priority, &policy.name, i),
                        action: match r.action {
                            CnpAction::Accept => ir::Action::Allow,
                            CnpAction::Deny => ir::Action::Deny,
                            CnpAction::Pass => ir::Action::Pass,
                        },
                    };
                    let order = if faults::active(Fault::CnpPassAsAccept)
                        && order.action == ir::Action::Pass
                    {
                        Order {
                            action: ir::Action::Allow,
                            ..order
                        }
                    } else {
                        order
                    };
                    // Flipping the 46 tie-key bits of the rank reverses the order of
                    // same-priority policies and nothing else.
                    let order = if faults::active(Fault::CnpTieKeyInverted) {
                        Order {
                            priority: order.priority ^ (((1 << 46) - 1) << 7),
                            ..order
                        }
                    } else {
                        order
                    };
                    // Peers of a cluster policy always name their namespaces, so no
                    // namespace scopes them.
                    r.rule
                        .as_ref()
                        .map(|rule| idx.build_template(None, direction, rule, order))
                })
                .collect::<Vec<_>>()
        };
        let ingress = build(self, Direction::Ingress, &policy.ingress);
        let egress = build(self, Direction::Egress, &policy.egress);
        let named_ingress = ingress
            .iter()
            .flatten()
            .any(|t| t.static_rule.is_none() && !t.named.is_empty());
        self.clear_cluster_rules();
        let p = CpIdx::new(self.cluster_policies.insert(ClusterPolicyState {
            name: name.clone(),
            model: policy,
            generation: self.generation + 1,
            ns_sel,
            pod_sel,
            named_ingress,
            ingress,
            egress,
        }));
        self.cluster_policy_by_name.insert(name, p);
        self.mark_subject_dirty(p);
    }

    fn cluster_policy_out(&mut self, p: CpIdx) {
        self.clear_cluster_rules();
        self.mark_subject_dirty(p);
        let s = self.cluster_policies.remove(p.get());
        self.cluster_policy_by_name.remove(&s.name);
        for ts in [s.ingress, s.egress] {
            self.release_templates(ts.into_iter().flatten().collect());
        }
        self.selectors.release(&mut self.strings, s.ns_sel);
        if let Some(sel) = s.pod_sel {
            self.selectors.release(&mut self.strings, sel);
        }
    }

    /// Whether cluster policy `p` selects pods with labels `pod` in a namespace labelled `ns`.
    pub(crate) fn subject_selects(
        &self,
        p: CpIdx,
        ns: crate::labels::LabelSetId,
        pod: crate::labels::LabelSetId,
    ) -> bool {
        let s = &self.cluster_policies[p.get()];
        self.selectors.matches(s.ns_sel, self.labels.get(ns))
            && s.pod_sel
                .is_none_or(|sel| self.selectors.matches(sel, self.labels.get(pod)))
    }

    fn mark_subject_dirty(&mut self, p: CpIdx) {
        if self.work.loading {
            return;
        }
        let mut hit: Vec<PodIdx> = Vec::new();
        for (_, ns) in &self.namespaces {
            let s = &self.cluster_policies[p.get()];
            if !self.selectors.matches(s.ns_sel, self.labels.get(ns.labels)) {
                continue;
            }
            for (ls, pods) in &ns.classes {
                if s.pod_sel
                    .is_none_or(|sel| self.selectors.matches(sel, self.labels.get(*ls)))
                {
                    hit.extend_from_slice(pods);
                }
            }
        }
        for p in hit {
            if self.pods[p.get()].node.is_some() {
                self.mark_dirty(p);
            }
        }
    }
}
