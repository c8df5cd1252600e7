//! Policy rules → templates → interned, content-addressed IR rules.

use std::sync::Arc;

use crate::faults::{self, Fault};
use crate::index::{
    GroupDef, GroupIdx, Index, NamedPort, NsIdx, Order, PortsKey, RuleIdx, RuleKey, RuleState,
    Template,
};
use crate::ir::{self, Direction, PortRange};
use crate::model::{self, PortSpec};

impl Index {
    pub(crate) fn build_templates(
        &mut self,
        ns: NsIdx,
        direction: Direction,
        rules: &[model::Rule],
    ) -> Vec<Template> {
        rules
            .iter()
            .map(|r| self.build_template(Some(ns), direction, r, Order::NP))
            .collect()
    }

    /// `ns`: a NetworkPolicy's namespace (`None` for a cluster policy's rule).
    pub(crate) fn build_template(
        &mut self,
        ns: Option<NsIdx>,
        direction: Direction,
        rule: &model::Rule,
        order: Order,
    ) -> Template {
        let peers: Option<Box<[GroupIdx]>> = if rule.peers.is_empty() {
            None
        } else {
            let mut gs: Vec<GroupIdx> = rule
                .peers
                .iter()
                .map(|p| {
                    let def = self.peer_def(ns, p);
                    self.ensure_group(GroupDef::Peer(def))
                })
                .collect();
            // Duplicate peers hold one reference each; rule keys list each group once.
            gs.sort_unstable();
            Some(gs.into_boxed_slice())
        };
        let mut ranges = Vec::new();
        let mut named = Vec::new();
        for p in &rule.ports {
            match p {
                PortSpec::All(proto) => ranges.push(PortRange {
                    proto: *proto,
                    first: 0,
                    last: u16::MAX,
                }),
                PortSpec::Range { proto, first, last } => {
                    let last = if faults::active(Fault::EndPortExclusive) && last > first {
                        last - 1
                    } else {
                        *last
                    };
                    ranges.push(PortRange {
                        proto: *proto,
                        first: *first,
                        last,
                    })
                }
                PortSpec::Named { proto, name } => named.push((self.strings.intern(name), *proto)),
            }
        }
        let any_port = rule.ports.is_empty();
        let mut t = Template {
            order,
            peers,
            any_port,
            ranges: normalize(ranges),
            named,
            static_rule: None,
            named_rule: None,
            named_groups: Vec::new(),
        };
        // Ingress named ports resolve against the local pod: that rule is built per pod.
        let per_pod = direction == Direction::Ingress && !t.named.is_empty();
        if !per_pod && (t.any_port || !t.ranges.is_empty()) {
            let ports = if t.any_port {
                PortsKey::Any
            } else {
                PortsKey::Ranges(t.ranges.clone().into_boxed_slice())
            };
            let r = self.intern_rule(direction, dedup_peers(t.peers.as_deref()), ports, order);
            self.rules[r.get()].refs += 1;
            t.static_rule = Some(r);
        }
        if direction == Direction::Egress && !t.named.is_empty() {
            let peer_defs: Vec<_> = if rule.peers.is_empty() {
                vec![None]
            } else {
                rule.peers.iter().map(Some).collect()
            };
            for (name, proto) in t.named.clone() {
                for p in &peer_defs {
                    let peer = match p {
                        Some(p) => self.peer_def(ns, p),
                        None => self.all_pods_def(),
                    };
                    self.strings.retain(name);
                    let g = self.ensure_group(GroupDef::Named { peer, name, proto });
                    t.named_groups.push(g);
                }
            }
            let mut key = t.named_groups.clone();
            key.sort_unstable();
            key.dedup();
            let r = self.intern_rule(
                direction,
                Some(key.into_boxed_slice()),
                PortsKey::FromGroups,
                order,
            );
            self.rules[r.get()].refs += 1;
            t.named_rule = Some(r);
        }
        t
    }

    pub(crate) fn release_templates(&mut self, ts: Vec<Template>) {
        for t in ts {
            for g in t.peers.iter().flatten().chain(&t.named_groups) {
                self.release_group(*g);
            }
            for r in t.static_rule.into_iter().chain(t.named_rule) {
                self.release_rule(r);
            }
            for (name, _) in t.named {
                self.strings.release(name);
            }
        }
    }

    /// The rule an ingress template gives for one destination pod, resolving named ports
    /// against that pod's container ports. `None` if no port resolves.
    pub(crate) fn ingress_rule_for(
        &mut self,
        order: Order,
        t_peers: Option<&[GroupIdx]>,
        t_ranges: &[PortRange],
        t_named: &[(crate::intern::Sym, model::Protocol)],
        pod_ports: &[NamedPort],
    ) -> Option<RuleIdx> {
        let ranges = ingress_ranges_for(t_ranges, t_named, pod_ports)?;
        Some(self.intern_rule(
            Direction::Ingress,
            dedup_peers(t_peers),
            PortsKey::Ranges(ranges.into_boxed_slice()),
            order,
        ))
    }

    /// The rule [`ingress_rule_for`](Self::ingress_rule_for) gives, if it exists (read-only).
    pub(crate) fn find_ingress_rule_for(
        &self,
        order: Order,
        t_peers: Option<&[GroupIdx]>,
        t_ranges: &[PortRange],
        t_named: &[(crate::intern::Sym, model::Protocol)],
        pod_ports: &[NamedPort],
    ) -> Option<RuleIdx> {
        let ranges = ingress_ranges_for(t_ranges, t_named, pod_ports)?;
        let key = rule_key(
            Direction::Ingress,
            dedup_peers(t_peers),
            PortsKey::Ranges(ranges.into_boxed_slice()),
            order,
        );
        self.rule_by_key.get(&key).copied()
    }

    /// Finds or creates the rule with this content. A new rule starts unreferenced (and is
    /// queued for collection in case nobody takes it) and holds a reference on its groups.
    pub(crate) fn intern_rule(
        &mut self,
        direction: Direction,
        peers: Option<Box<[GroupIdx]>>,
        ports: PortsKey,
        order: Order,
    ) -> RuleIdx {
        let key = rule_key(direction, peers, ports, order);
        if let Some(&r) = self.rule_by_key.get(&key) {
            return r;
        }
        let peers = match &key.peers {
            None => ir::Peers::Any,
            Some(gs) => {
                let mut ids: Vec<_> = gs.iter().map(|g| self.groups[g.get()].id).collect();
                ids.sort_unstable();
                ir::Peers::Groups(ids)
            }
        };
        let ports = match &key.ports {
            PortsKey::Any => ir::Ports::Any,
            PortsKey::Ranges(r) => ir::Ports::Ranges(r.to_vec()),
            PortsKey::FromGroups => ir::Ports::FromGroups,
        };
        let id = ir::rule_id(
            key.direction,
            key.tier,
            key.priority,
            key.action,
            &peers,
            &ports,
        );
        let rule = ir::Rule {
            id,
            direction: key.direction,
            tier: key.tier,
            priority: key.priority,
            action: key.action,
            peers,
            ports,
        };
        let hash = ir::rule_hash(&rule);
        for g in key.peers.iter().flatten() {
            self.groups[g.get()].refs += 1;
        }
        let r = RuleIdx::new(self.rules.insert(RuleState {
            key: key.clone(),
            rule: Arc::new(rule),
            hash,
            refs: 0,
        }));
        self.rule_by_key.insert(key, r);
        self.work.rule_gc.push(r);
        r
    }

    pub(crate) fn release_rule(&mut self, r: RuleIdx) {
        let rs = &mut self.rules[r.get()];
        rs.refs -= 1;
        if rs.refs == 0 {
            self.work.rule_gc.push(r);
        }
    }

    pub(crate) fn gc_rule(&mut self, r: RuleIdx) {
        match self.rules.get(r.get()) {
            Some(rs) if rs.refs == 0 => {}
            _ => return,
        }
        let rs = self.rules.remove(r.get());
        self.rule_by_key.remove(&rs.key);
        for g in rs.key.peers.iter().flatten() {
            self.release_group(*g);
        }
    }
}

fn rule_key(
    direction: Direction,
    peers: Option<Box<[GroupIdx]>>,
    ports: PortsKey,
    order: Order,
) -> RuleKey {
    RuleKey {
        direction,
        tier: order.tier,
        priority: order.priority,
        action: order.action,
        peers,
        ports,
    }
}

/// An ingress template's ports for one destination pod: its numbered ports plus its named
/// ports resolved against the pod's container ports. `None` if none resolves.
fn ingress_ranges_for(
    t_ranges: &[PortRange],
    t_named: &[(crate::intern::Sym, model::Protocol)],
    pod_ports: &[NamedPort],
) -> Option<Vec<PortRange>> {
    let mut ranges = t_ranges.to_vec();
    for (name, proto) in t_named {
        for p in pod_ports {
            let proto_ok = p.proto == *proto || faults::active(Fault::NamedPortIgnoresProtocol);
            if p.name == *name && proto_ok {
                ranges.push(PortRange {
                    proto: *proto,
                    first: p.port,
                    last: p.port,
                });
            }
        }
    }
    (!ranges.is_empty()).then(|| normalize(ranges))
}

fn dedup_peers(peers: Option<&[GroupIdx]>) -> Option<Box<[GroupIdx]>> {
    peers.map(|p| {
        let mut v = p.to_vec();
        v.sort_unstable();
        v.dedup();
        v.into_boxed_slice()
    })
}

/// Sorts ranges and merges overlapping or adjacent ones of the same protocol, so equal port
/// sets always produce equal rules.
pub(crate) fn normalize(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort_unstable();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if let Some(last) = out.last_mut()
            && last.proto == r.proto
            && u32::from(r.first) <= u32::from(last.last) + 1
        {
            last.last = last.last.max(r.last);
            continue;
        }
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol::*;

    fn r(proto: model::Protocol, first: u16, last: u16) -> PortRange {
        PortRange { proto, first, last }
    }

    #[test]
    fn normalize_merges_per_protocol() {
        let got = normalize(vec![
            r(Tcp, 80, 80),
            r(Udp, 81, 81),
            r(Tcp, 81, 90),
            r(Tcp, 85, 85),
            r(Tcp, 100, 200),
            r(Udp, 80, 80),
        ]);
        assert_eq!(got, vec![r(Tcp, 80, 90), r(Tcp, 100, 200), r(Udp, 80, 81)]);
        assert_eq!(
            normalize(vec![r(Tcp, 0, u16::MAX), r(Tcp, 5, 5)]),
            vec![r(Tcp, 0, u16::MAX)]
        );
    }
}
