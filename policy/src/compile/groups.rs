//! Address groups: one per distinct peer definition, shared by every rule and node using it.

use std::sync::{Arc, OnceLock};

use rustc_hash::FxHashSet;
use smallvec::SmallVec;

use crate::faults::{self, Fault};
use crate::index::{
    GroupDef, GroupIdx, GroupState, Index, Member, NodeIdx, NsIdx, NsSelEntry, PeerDef, PodIdx,
    Scope,
};
use crate::ir::digest::{Acc, Enc};
use crate::ir::{self, AddrPort, GroupId, Members};
use crate::model::{self, Selector};

impl Index {
    /// Interns a policy peer as a group definition (taking references on its selectors).
    /// `ns`: the namespace a pod peer without a namespace selector is confined to (a
    /// NetworkPolicy's own); `None` for cluster policies, whose pod peers always name theirs.
    pub(crate) fn peer_def(&mut self, ns: Option<NsIdx>, peer: &model::Peer) -> PeerDef {
        match peer {
            model::Peer::Pods { namespaces, pods } => {
                let pods_sel = self.selectors.intern(&mut self.strings, pods);
                let scope = match namespaces {
                    Some(s) => Scope::Sel(self.selectors.intern(&mut self.strings, s)),
                    None if faults::active(Fault::PodPeerAnyNamespace) => Scope::Sel(
                        self.selectors
                            .intern(&mut self.strings, &Selector::everything()),
                    ),
                    None => Scope::Ns(ns.expect("a namespaced policy's pod peer")),
                };
                PeerDef::Pods {
                    scope,
                    pods: pods_sel,
                }
            }
            model::Peer::Block(b) => {
                let mut b = b.clone();
                if faults::active(Fault::IgnoreExcept) {
                    b.except.clear();
                }
                PeerDef::Block(b)
            }
            model::Peer::Nodes(sel) => {
                PeerDef::Nodes(self.selectors.intern(&mut self.strings, sel))
            }
        }
    }

    /// Every pod in the cluster (the implicit peer of an egress named port with no `to`).
    pub(crate) fn all_pods_def(&mut self) -> PeerDef {
        let every = Selector::everything();
        PeerDef::Pods {
            scope: Scope::Sel(self.selectors.intern(&mut self.strings, &every)),
            pods: self.selectors.intern(&mut self.strings, &every),
        }
    }

    /// Returns the group for `def`, creating and filling it if new, with one more reference.
    /// Consumes the references `def` holds.
    pub(crate) fn ensure_group(&mut self, def: GroupDef) -> GroupIdx {
        if let Some(&g) = self.group_by_def.get(&def) {
            self.release_def(&def);
            self.groups[g.get()].refs += 1;
            return g;
        }
        let id = self.group_id(&def);
        let g = GroupIdx::new(self.groups.insert(GroupState {
            def: def.clone(),
            id,
            members: Default::default(),
            members_acc: Acc::default(),
            item: [0; 32],
            refs: 1,
            nodes: Default::default(),
            pending: None,
            cache: OnceLock::new(),
        }));
        self.group_by_def.insert(def.clone(), g);
        match def.peer() {
            PeerDef::Pods {
                scope: Scope::Ns(ns),
                ..
            } => {
                self.namespaces[ns.get()].scoped_groups.push(g);
            }
            PeerDef::Pods {
                scope: Scope::Sel(s),
                ..
            } => {
                let s = *s;
                if !self.nssel.contains_key(&s) {
                    let mut namespaces = Vec::new();
                    for (i, ns) in self.namespaces.iter_mut() {
                        if self.selectors.matches(s, self.labels.get(ns.labels)) {
                            ns.matching_nssels.push(s);
                            namespaces.push(NsIdx::new(i));
                        }
                    }
                    self.nssel.insert(
                        s,
                        NsSelEntry {
                            groups: Vec::new(),
                            namespaces,
                        },
                    );
                }
                self.nssel.get_mut(&s).expect("inserted").groups.push(g);
            }
            PeerDef::Block(_) => {
                if matches!(def, GroupDef::Named { .. }) {
                    self.block_named_groups.push(g);
                }
            }
            PeerDef::Nodes(_) => self.node_groups.push(g),
        }
        self.populate(g);
        let gs = &mut self.groups[g.get()];
        gs.pending = None;
        gs.item = ir::group_item(gs.id, &members_bytes(gs));
        g
    }

    pub(crate) fn release_group(&mut self, g: GroupIdx) {
        let gs = &mut self.groups[g.get()];
        gs.refs -= 1;
        if gs.refs == 0 {
            self.work.group_gc.push(g);
        }
    }

    pub(crate) fn gc_group(&mut self, g: GroupIdx) {
        match self.groups.get(g.get()) {
            Some(gs) if gs.refs == 0 => {
                debug_assert!(gs.nodes.is_empty(), "unreferenced group still on a node")
            }
            _ => return,
        }
        let gs = self.groups.remove(g.get());
        self.group_by_def.remove(&gs.def);
        match gs.def.peer() {
            PeerDef::Pods {
                scope: Scope::Ns(ns),
                ..
            } => {
                self.namespaces[ns.get()].scoped_groups.retain(|x| *x != g);
                self.work.ns_gc.push(*ns);
            }
            PeerDef::Pods {
                scope: Scope::Sel(s),
                ..
            } => {
                let entry = self.nssel.get_mut(s).expect("registered");
                entry.groups.retain(|x| *x != g);
                if entry.groups.is_empty() {
                    let entry = self.nssel.remove(s).expect("present");
                    for ns in entry.namespaces {
                        self.namespaces[ns.get()].matching_nssels.retain(|x| x != s);
                    }
                }
            }
            PeerDef::Block(_) => self.block_named_groups.retain(|x| *x != g),
            PeerDef::Nodes(_) => self.node_groups.retain(|x| *x != g),
        }
        self.release_def(&gs.def);
    }

    fn release_def(&mut self, def: &GroupDef) {
        match def.peer() {
            PeerDef::Pods { scope, pods } => {
                self.selectors.release(&mut self.strings, *pods);
                if let Scope::Sel(s) = scope {
                    self.selectors.release(&mut self.strings, *s);
                }
            }
            PeerDef::Nodes(sel) => self.selectors.release(&mut self.strings, *sel),
            PeerDef::Block(_) => {}
        }
        if let GroupDef::Named { name, .. } = def {
            self.strings.release(*name);
        }
    }

    /// Content-derived ID: the same definition gets the same ID on any server.
    fn group_id(&self, def: &GroupDef) -> GroupId {
        let mut e = Enc::new("group.def");
        let peer = |e: &mut Enc, p: &PeerDef| match p {
            PeerDef::Pods {
                scope: Scope::Ns(ns),
                pods,
            } => {
                e.u8(0)
                    .str(&self.namespaces[ns.get()].name)
                    .bytes32(self.selectors.content(*pods));
            }
            PeerDef::Pods {
                scope: Scope::Sel(s),
                pods,
            } => {
                e.u8(1)
                    .bytes32(self.selectors.content(*s))
                    .bytes32(self.selectors.content(*pods));
            }
            PeerDef::Block(b) => {
                e.u8(2)
                    .ip(b.cidr.addr())
                    .u8(b.cidr.prefix_len())
                    .u32(b.except.len() as u32);
                for x in &b.except {
                    e.ip(x.addr()).u8(x.prefix_len());
                }
            }
            PeerDef::Nodes(sel) => {
                e.u8(3).bytes32(self.selectors.content(*sel));
            }
        };
        match def {
            GroupDef::Peer(p) => {
                e.u8(0);
                peer(&mut e, p);
            }
            GroupDef::Named {
                peer: p,
                name,
                proto,
            } => {
                e.u8(1);
                peer(&mut e, p);
                e.str(self.strings.resolve(*name)).u8(proto.number());
            }
        }
        GroupId(e.finish_id())
    }

    /// Fills a new group by scanning: label-set classes for pod peers, the address index for
    /// named ports behind an ipBlock, the known Nodes for `nodes` peers.
    fn populate(&mut self, g: GroupIdx) {
        let def = self.groups[g.get()].def.clone();
        let mut pods: Vec<PodIdx> = Vec::new();
        match def.peer() {
            PeerDef::Nodes(_) => {
                // A named port never resolves on a Node: such a group stays empty.
                if matches!(def, GroupDef::Named { .. }) {
                    return;
                }
                let nodes: Vec<NodeIdx> = self
                    .nodes
                    .iter()
                    .map(|(i, _)| NodeIdx::new(i))
                    .filter(|n| self.node_selected(g, *n))
                    .collect();
                for n in nodes {
                    self.node_members(g, n, true);
                    if faults::active(Fault::CnpNodesPeerMatchesTheirPods) {
                        pods.extend(self.nodes[n.get()].pods.iter().copied());
                    }
                }
                pods.retain(|p| self.pods[p.get()].selectable());
                for p in pods {
                    for (ip, h) in self.pods[p.get()]
                        .ips
                        .clone()
                        .into_iter()
                        .zip(self.pods[p.get()].addr_members.clone())
                    {
                        self.member_delta(g, Member::Addr(ip), h, true);
                    }
                }
                return;
            }
            PeerDef::Pods { scope, pods: sel } => {
                let namespaces = match scope {
                    Scope::Ns(ns) => vec![*ns],
                    Scope::Sel(s) => self.nssel[s].namespaces.clone(),
                };
                for ns in namespaces {
                    for (ls, list) in &self.namespaces[ns.get()].classes {
                        if self.selectors.matches(*sel, self.labels.get(*ls)) {
                            pods.extend_from_slice(list);
                        }
                    }
                }
            }
            PeerDef::Block(b) => {
                if matches!(def, GroupDef::Named { .. }) {
                    let (lo, hi) = b.cidr.range();
                    let mut seen = FxHashSet::default();
                    for (_, list) in self.pods_by_ip.range(lo..=hi) {
                        pods.extend(list.iter().filter(|p| seen.insert(**p)));
                    }
                }
            }
        }
        self.groups[g.get()].members.reserve(pods.len());
        for p in pods {
            for (m, h) in self.pod_members(&def, p) {
                self.member_delta(g, m, h, true);
            }
        }
    }

    /// A pod's members in a group it belongs to (scope and selector already checked), with
    /// their hashes.
    fn pod_members(&self, def: &GroupDef, p: PodIdx) -> SmallVec<[(Member, [u8; 32]); 2]> {
        let pod = &self.pods[p.get()];
        match def {
            GroupDef::Peer(PeerDef::Pods { .. }) => pod
                .ips
                .iter()
                .zip(&pod.addr_members)
                .map(|(ip, h)| (Member::Addr(*ip), *h))
                .collect(),
            GroupDef::Peer(PeerDef::Block(_) | PeerDef::Nodes(_)) => SmallVec::new(),
            GroupDef::Named {
                peer: PeerDef::Nodes(_),
                ..
            } => SmallVec::new(),
            GroupDef::Named { peer, name, proto } => {
                let mut out = SmallVec::new();
                for port in pod.ports.iter() {
                    let proto_ok =
                        port.proto == *proto || faults::active(Fault::NamedPortIgnoresProtocol);
                    if port.name != *name || !proto_ok {
                        continue;
                    }
                    for ip in &pod.ips {
                        if let PeerDef::Block(b) = peer
                            && !b.contains(*ip)
                        {
                            continue;
                        }
                        let m = Member::AddrPort(AddrPort {
                            addr: *ip,
                            proto: *proto,
                            port: port.port,
                        });
                        out.push((m, member_hash(&m)));
                    }
                }
                out
            }
        }
    }

    /// Adds (or removes) a selectable pod to (from) every group it belongs to.
    pub(crate) fn pod_membership(&mut self, p: PodIdx, add: bool) {
        let pod = &self.pods[p.get()];
        let ns = &self.namespaces[pod.ns.get()];
        let labels = self.labels.get(pod.labels);
        let mut hits: SmallVec<[GroupIdx; 16]> = SmallVec::new();
        let selected = |g: &GroupIdx| match self.groups[g.get()].def.peer() {
            PeerDef::Pods { pods, .. } => self.selectors.matches(*pods, labels),
            PeerDef::Block(_) | PeerDef::Nodes(_) => false,
        };
        hits.extend(ns.scoped_groups.iter().copied().filter(selected));
        for s in &ns.matching_nssels {
            hits.extend(self.nssel[s].groups.iter().copied().filter(selected));
        }
        hits.extend(self.block_named_groups.iter().copied());
        for g in hits {
            let def = self.groups[g.get()].def.clone();
            for (m, h) in self.pod_members(&def, p) {
                self.member_delta(g, m, h, add);
            }
        }
    }

    /// Whether `nodes` group `g` selects node `n` (a known Node whose labels match).
    fn node_selected(&self, g: GroupIdx, n: NodeIdx) -> bool {
        let PeerDef::Nodes(sel) = self.groups[g.get()].def.peer() else {
            return false;
        };
        match self.nodes[n.get()].labels {
            Some(ls) if self.nodes[n.get()].known => {
                self.selectors.matches(*sel, self.labels.get(ls))
            }
            _ => false,
        }
    }

    /// Adds (or removes) node `n`'s addresses to (from) group `g`.
    fn node_members(&mut self, g: GroupIdx, n: NodeIdx, add: bool) {
        for ip in self.nodes[n.get()].addrs.clone() {
            self.member_delta(g, Member::Addr(ip), ir::addr_member(ip), add);
        }
    }

    /// Adds (or removes) a Node, as it is now, to (from) every `nodes` group selecting it.
    /// Called around every change of a Node's labels or addresses.
    pub(crate) fn node_membership(&mut self, n: NodeIdx, add: bool) {
        for g in self.node_groups.clone() {
            if matches!(self.groups[g.get()].def, GroupDef::Peer(_)) && self.node_selected(g, n) {
                self.node_members(g, n, add);
            }
        }
    }

    /// A namespace started (`add`) or stopped matching a group's namespace selector.
    pub(crate) fn group_ns_delta(&mut self, g: GroupIdx, ns: NsIdx, add: bool) {
        let def = self.groups[g.get()].def.clone();
        let PeerDef::Pods { pods: sel, .. } = def.peer() else {
            return;
        };
        let mut pods = Vec::new();
        for (ls, list) in &self.namespaces[ns.get()].classes {
            if self.selectors.matches(*sel, self.labels.get(*ls)) {
                pods.extend_from_slice(list);
            }
        }
        for p in pods {
            for (m, h) in self.pod_members(&def, p) {
                self.member_delta(g, m, h, add);
            }
        }
    }

    fn member_delta(&mut self, g: GroupIdx, m: Member, h: [u8; 32], add: bool) {
        let gs = &mut self.groups[g.get()];
        let changed = if add {
            let c = gs.members.entry(m).or_insert(0);
            *c += 1;
            *c == 1
        } else {
            let c = gs
                .members
                .get_mut(&m)
                .expect("removing a member that was never added");
            *c -= 1;
            if *c == 0 {
                gs.members.remove(&m);
                true
            } else {
                false
            }
        };
        if !changed {
            return;
        }
        if add {
            gs.members_acc.add(&h);
        } else {
            gs.members_acc.sub(&h);
        }
        gs.cache = OnceLock::new();
        if gs.pending.is_none() {
            gs.pending = Some(gs.item);
            self.work.pending_groups.push(g);
        }
    }

    /// Carries group membership changes into the digests of the nodes that hold the group.
    pub(crate) fn settle_groups(&mut self) {
        for g in std::mem::take(&mut self.work.pending_groups) {
            let Some(gs) = self.groups.get_mut(g.get()) else {
                continue;
            };
            let Some(old) = gs.pending.take() else {
                continue;
            };
            gs.item = ir::group_item(gs.id, &members_bytes(gs));
            if gs.item == old {
                continue;
            }
            let new = gs.item;
            for n in gs.nodes.iter().collect::<SmallVec<[_; 16]>>() {
                let node = &mut self.nodes[n.get()];
                node.acc.sub(&old);
                node.acc.add(&new);
                self.touch(n);
            }
        }
    }

    pub(crate) fn group_snapshot(&self, g: GroupIdx) -> Arc<ir::Group> {
        let gs = &self.groups[g.get()];
        gs.cache
            .get_or_init(|| {
                let members = match &gs.def {
                    GroupDef::Peer(PeerDef::Block(b)) => Members::Block {
                        cidr: b.cidr,
                        except: b.except.clone(),
                    },
                    GroupDef::Peer(PeerDef::Pods { .. } | PeerDef::Nodes(_)) => {
                        let mut v: Vec<_> = gs
                            .members
                            .keys()
                            .filter_map(|m| match m {
                                Member::Addr(a) => Some(*a),
                                Member::AddrPort(_) => None,
                            })
                            .collect();
                        v.sort_unstable();
                        Members::Addrs(v)
                    }
                    GroupDef::Named { .. } => {
                        let mut v: Vec<_> = gs
                            .members
                            .keys()
                            .filter_map(|m| match m {
                                Member::AddrPort(a) => Some(*a),
                                Member::Addr(_) => None,
                            })
                            .collect();
                        v.sort_unstable();
                        Members::AddrPorts(v)
                    }
                };
                Arc::new(ir::Group::with_hash(gs.id, members, members_bytes(gs)))
            })
            .clone()
    }
}

fn member_hash(m: &Member) -> [u8; 32] {
    match m {
        Member::Addr(a) => ir::addr_member(*a),
        Member::AddrPort(a) => ir::addr_port_member(a),
    }
}

fn members_bytes(gs: &GroupState) -> [u8; 32] {
    match &gs.def {
        GroupDef::Peer(PeerDef::Block(b)) => ir::block_members(&b.cidr, &b.except),
        _ => gs.members_acc.to_bytes(),
    }
}
