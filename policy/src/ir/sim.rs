//! A direct interpreter of node snapshots: what a correct dataplane must decide for a new flow.
//!
//! It reads nothing but snapshots, so comparing it with the reference evaluator checks the
//! compiler end to end; the real dataplanes are checked against it in turn. It favours
//! obviousness over speed (it does loop over rules).

use std::collections::HashMap;
use std::net::IpAddr;

use super::{
    Action, DirectionRules, Endpoint, Group, GroupId, Members, NodeSnapshot, Peers, Ports, Rule,
    RuleId, Tier,
};
use crate::model::Protocol;

/// A new flow as the dataplane sees it (after DNAT, before SNAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1/58 ICMP, …).
    pub proto: u8,
    /// Destination port; ignored for protocols without ports.
    pub port: u16,
}

struct NodeView<'a> {
    snap: &'a NodeSnapshot,
    rules: HashMap<RuleId, &'a Rule>,
    groups: HashMap<GroupId, &'a Group>,
}

/// Every node's snapshot, indexed by endpoint address.
pub struct Fleet<'a> {
    nodes: Vec<NodeView<'a>>,
    endpoints: HashMap<IpAddr, (usize, &'a Endpoint)>,
}

impl<'a> Fleet<'a> {
    pub fn new(snaps: impl IntoIterator<Item = &'a NodeSnapshot>) -> Self {
        let mut nodes = Vec::new();
        let mut endpoints = HashMap::new();
        for (i, snap) in snaps.into_iter().enumerate() {
            for e in &snap.endpoints {
                for a in &e.addrs {
                    endpoints.insert(*a, (i, e));
                }
            }
            nodes.push(NodeView {
                snap,
                rules: snap.rules.iter().map(|r| (r.id, &**r)).collect(),
                groups: snap.groups.iter().map(|g| (g.id, &**g)).collect(),
            });
        }
        Self { nodes, endpoints }
    }

    /// Both ends must allow: egress at the source's node, ingress at the destination's.
    pub fn allows(&self, p: &Packet) -> bool {
        self.egress_allows(p) && self.ingress_allows(p)
    }

    pub fn egress_allows(&self, p: &Packet) -> bool {
        let Some(&(n, ep)) = self.endpoints.get(&p.src) else {
            return true;
        };
        let node = &self.nodes[n];
        if node.snap.node_addrs.contains(&p.dst) {
            return true;
        }
        judge(node, &ep.egress, p.dst, p)
    }

    pub fn ingress_allows(&self, p: &Packet) -> bool {
        let Some(&(n, ep)) = self.endpoints.get(&p.dst) else {
            return true;
        };
        let node = &self.nodes[n];
        if node.snap.node_addrs.contains(&p.src) {
            return true;
        }
        judge(node, &ep.ingress, p.src, p)
    }
}

fn judge(node: &NodeView<'_>, d: &DirectionRules, peer: IpAddr, p: &Packet) -> bool {
    let mut rules: Vec<&Rule> = d
        .rules
        .iter()
        .map(|id| {
            *node
                .rules
                .get(id)
                .expect("snapshot references a rule it doesn't hold")
        })
        .collect();
    rules.sort_by_key(|r| (r.tier, r.priority));
    for tier in [Tier::Admin, Tier::NetworkPolicy, Tier::Baseline] {
        for r in rules.iter().filter(|r| r.tier == tier) {
            if !rule_matches(node, r, peer, p) {
                continue;
            }
            match r.action {
                Action::Allow => return true,
                Action::Deny => return false,
                // Leave this tier; the next one decides.
                Action::Pass => break,
            }
        }
        if tier == Tier::NetworkPolicy && d.isolated {
            return false;
        }
    }
    true
}

fn rule_matches(node: &NodeView<'_>, r: &Rule, peer: IpAddr, p: &Packet) -> bool {
    let group = |id: &GroupId| {
        *node
            .groups
            .get(id)
            .expect("snapshot references a group it doesn't hold")
    };
    match &r.ports {
        Ports::Any => peers_match(&r.peers, peer, group),
        Ports::Ranges(ranges) => {
            let Some(proto) = Protocol::from_number(p.proto) else {
                return false;
            };
            ranges
                .iter()
                .any(|x| x.proto == proto && x.first <= p.port && p.port <= x.last)
                && peers_match(&r.peers, peer, group)
        }
        Ports::FromGroups => {
            let Some(proto) = Protocol::from_number(p.proto) else {
                return false;
            };
            let Peers::Groups(ids) = &r.peers else {
                return false;
            };
            ids.iter().any(|id| match &group(id).members {
                Members::AddrPorts(m) => m
                    .iter()
                    .any(|m| m.addr == peer && m.proto == proto && m.port == p.port),
                _ => false,
            })
        }
    }
}

fn peers_match<'g>(peers: &Peers, peer: IpAddr, group: impl Fn(&GroupId) -> &'g Group) -> bool {
    match peers {
        Peers::Any => true,
        Peers::Groups(ids) => ids.iter().any(|id| match &group(id).members {
            Members::Addrs(a) => a.binary_search(&peer).is_ok(),
            Members::Block { cidr, except } => {
                cidr.contains(peer) && !except.iter().any(|e| e.contains(peer))
            }
            Members::AddrPorts(_) => false,
        }),
    }
}
