//! State kept per object and per compiled entry.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::intern::Sym;
use crate::ir::digest::{Acc, Digest};
use crate::ir::{self, Action, AddrPort, Direction, EndpointId, GroupId, PortRange, Tier};
use crate::labels::LabelSetId;
use crate::model::{ClusterPolicy, IpBlock, Policy, Protocol};
use crate::selector::SelId;

macro_rules! idx {
    ($name:ident) => {
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub(crate) struct $name(pub(crate) u32);
        impl $name {
            pub(crate) fn new(i: usize) -> Self {
                Self(u32::try_from(i).expect(concat!("too many entries for ", stringify!($name))))
            }
            pub(crate) fn get(self) -> usize {
                self.0 as usize
            }
        }
    };
}
idx!(NsIdx);
idx!(PodIdx);
idx!(NodeIdx);
idx!(PolicyIdx);
idx!(GroupIdx);
idx!(RuleIdx);
idx!(CpIdx);

pub(crate) struct NsState {
    pub name: Arc<str>,
    /// Effective labels (the implicit name label only, until the Namespace object is seen).
    pub labels: LabelSetId,
    pub known: bool,
    /// Selectable pods, by label set: selectors are evaluated per set, not per pod.
    pub classes: FxHashMap<LabelSetId, Vec<PodIdx>>,
    /// All pods in the namespace, selectable or not (for garbage collection).
    pub pod_count: u32,
    pub policies: Vec<PolicyIdx>,
    /// Groups whose pods come from this namespace only (podSelector-only peers).
    pub scoped_groups: Vec<GroupIdx>,
    /// Namespace selectors (of live groups) that match this namespace.
    pub matching_nssels: Vec<SelId>,
}

pub(crate) struct NsSelEntry {
    pub groups: Vec<GroupIdx>,
    pub namespaces: Vec<NsIdx>,
}

#[derive(Clone, Copy)]
pub(crate) struct NamedPort {
    pub name: Sym,
    pub proto: Protocol,
    pub port: u16,
}

pub(crate) struct PodState {
    pub name: Arc<str>,
    pub ns: NsIdx,
    pub labels: LabelSetId,
    pub node: Option<NodeIdx>,
    pub ips: SmallVec<[IpAddr; 2]>,
    /// `ir::addr_member` of each of `ips`: the pod joins many groups, broad cluster policy
    /// peers above all, and each would hash the same addresses again.
    pub addr_members: SmallVec<[[u8; 32]; 2]>,
    pub ports: Box<[NamedPort]>,
    pub host_network: bool,
    pub terminal: bool,
    pub endpoint_id: EndpointId,
    /// The sandbox generation (hash of [`Pod::sandbox`](crate::model::Pod::sandbox)), 0 if
    /// unknown.
    pub sandbox: u64,
    pub uid: Option<Arc<str>>,
    pub sandbox_raw: Option<Arc<str>>,
    pub endpoint: Option<EndpointState>,
    pub dirty: bool,
}

impl PodState {
    /// Selected by selectors, and enforced on its node.
    pub fn selectable(&self) -> bool {
        !self.host_network && !self.terminal && !self.ips.is_empty()
    }
}

/// A local pod as its node enforces it.
#[derive(Clone)]
pub(crate) struct EndpointState {
    pub node: NodeIdx,
    /// `None`: not isolated. Sorted by rule ID.
    pub ingress: Option<Box<[RuleIdx]>>,
    pub egress: Option<Box<[RuleIdx]>>,
    /// ClusterNetworkPolicy rules: they apply whether or not a NetworkPolicy isolates the
    /// pod. Shared by every pod with the same [`ClusterKey`].
    pub cluster: Arc<ClusterRules>,
    pub item: [u8; 32],
}

impl PartialEq for EndpointState {
    /// The cluster list by identity: nodes count references per list, so an endpoint that
    /// moves to an equal list from another cache entry must be re-referenced.
    fn eq(&self, other: &Self) -> bool {
        self.node == other.node
            && self.ingress == other.ingress
            && self.egress == other.egress
            && Arc::ptr_eq(&self.cluster, &other.cluster)
            && self.item == other.item
    }
}

impl EndpointState {
    /// Every rule of one direction (NetworkPolicy, then cluster).
    pub fn rules(&self, egress: bool) -> impl Iterator<Item = RuleIdx> + '_ {
        self.np_rules(egress)
            .chain(self.cluster.rules[usize::from(egress)].iter().copied())
    }

    /// The NetworkPolicy rules of one direction, sorted by rule ID.
    pub fn np_rules(&self, egress: bool) -> impl Iterator<Item = RuleIdx> + '_ {
        let np = if egress { &self.egress } else { &self.ingress };
        np.iter().flat_map(|l| l.iter()).copied()
    }
}

/// A pod's container ports, as far as named ports resolve against them.
pub(crate) type PortsOf = Box<[(Sym, Protocol, u16)]>;

/// NetworkPolicy lists for pods with these container ports.
pub(crate) type NpListsFor = (Box<[NamedPort]>, NpLists);

/// The cluster policies selecting a pod, as a bitset over [`CpIdx`].
pub(crate) type CpSet = SmallVec<[u64; 2]>;

/// What a pod's ClusterNetworkPolicy rules depend on. Admin policies select broad sets, so
/// thousands of pods share one key, and with it one rule list.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ClusterKey {
    pub subjects: CpSet,
    /// The pod's container ports, when a selecting policy has an ingress named port to
    /// resolve against them; empty otherwise, so that pods share whatever their ports.
    pub ports: Box<[(Sym, Protocol, u16)]>,
}

/// The ClusterNetworkPolicy rules of every pod with one [`ClusterKey`]. While cached in
/// `Index::cluster_rules` it holds a reference on each rule and on the key's port names.
pub(crate) struct ClusterRules {
    /// Unique for the index's lifetime: nodes count their endpoints' lists by it.
    pub id: u64,
    pub key: ClusterKey,
    /// Ingress, egress; each sorted by rule ID.
    pub rules: [Box<[RuleIdx]>; 2],
    /// The same rules' IDs, sorted, for the endpoint digest.
    pub ids: [Box<[ir::RuleId]>; 2],
    /// The same rules again, by policy: lists share these, and a node takes each block's
    /// rules once however many of its lists hold it.
    pub blocks: Box<[Arc<RuleBlock>]>,
}

/// The rules one cluster policy gives a pod (both directions).
pub(crate) struct RuleBlock {
    /// Unique for the index's lifetime, like [`ClusterRules::id`].
    pub id: u64,
    /// `rules[..n_in]` are ingress rules, the rest egress.
    pub n_in: usize,
    pub rules: Box<[RuleIdx]>,
}

pub(crate) struct NodeState {
    pub name: Arc<str>,
    /// A Node object exists: only known nodes get snapshots.
    pub known: bool,
    pub addrs: Vec<IpAddr>,
    /// The Node object's labels, while it is known: `nodes` peers select by them.
    pub labels: Option<LabelSetId>,
    /// Pods whose `nodeName` is this node.
    pub pods: Vec<PodIdx>,
    pub rule_refs: FxHashMap<RuleIdx, u32>,
    /// Local endpoints per cluster rule list ([`ClusterRules::id`]): a list's rules are
    /// referenced once per node, not once per pod.
    pub cluster_refs: FxHashMap<u64, u32>,
    /// Cluster lists per [`RuleBlock::id`] held through them.
    pub block_refs: FxHashMap<u64, u32>,
    pub group_refs: FxHashMap<GroupIdx, u32>,
    pub acc: Acc,
    pub published: Option<(u64, Digest)>,
    pub touched: bool,
}

pub(crate) struct PolicyState {
    pub ns: NsIdx,
    pub name: Arc<str>,
    pub model: Policy,
    /// The generation whose flush first compiled this content.
    pub generation: u64,
    pub selector: SelId,
    pub ingress: Option<Vec<Template>>,
    pub egress: Option<Vec<Template>>,
}

pub(crate) struct ClusterPolicyState {
    pub name: Arc<str>,
    pub model: ClusterPolicy,
    /// The generation whose flush first compiled this content.
    pub generation: u64,
    /// Subject: namespaces, and pods within them (`None`: every pod).
    pub ns_sel: SelId,
    pub pod_sel: Option<SelId>,
    /// Some ingress rule names a port, which resolves against each selected pod's ports.
    pub named_ingress: bool,
    /// Per rule in written order; `None`: the rule matches nothing.
    pub ingress: Vec<Option<Template>>,
    pub egress: Vec<Option<Template>>,
}

/// Where a rule sits in evaluation: its tier, its order there, and what a match does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Order {
    pub tier: Tier,
    pub priority: u64,
    pub action: Action,
}

impl Order {
    /// Every NetworkPolicy rule: one precedence, allows only.
    pub const NP: Order = Order {
        tier: Tier::NetworkPolicy,
        priority: 0,
        action: Action::Allow,
    };
}

/// One policy rule, compiled as far as it can be without knowing the pod it applies to.
pub(crate) struct Template {
    pub order: Order,
    /// `None`: any peer.
    pub peers: Option<Box<[GroupIdx]>>,
    pub any_port: bool,
    pub ranges: Vec<PortRange>,
    pub named: Vec<(Sym, Protocol)>,
    /// The rule for numeric ports (or any port), when it needs no per-pod resolution.
    pub static_rule: Option<RuleIdx>,
    /// Egress named ports: one rule over (address, port) groups.
    pub named_rule: Option<RuleIdx>,
    pub named_groups: Vec<GroupIdx>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Scope {
    Ns(NsIdx),
    Sel(SelId),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PeerDef {
    Pods {
        scope: Scope,
        pods: SelId,
    },
    Block(IpBlock),
    /// The addresses of the Nodes this selects.
    Nodes(SelId),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum GroupDef {
    Peer(PeerDef),
    Named {
        peer: PeerDef,
        name: Sym,
        proto: Protocol,
    },
}

impl GroupDef {
    pub fn peer(&self) -> &PeerDef {
        match self {
            GroupDef::Peer(p) | GroupDef::Named { peer: p, .. } => p,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Member {
    Addr(IpAddr),
    AddrPort(AddrPort),
}

pub(crate) struct GroupState {
    pub def: GroupDef,
    pub id: GroupId,
    /// Member → number of pods contributing it (two pods may share an address).
    pub members: FxHashMap<Member, u32>,
    pub members_acc: Acc,
    /// This group's term in a node digest: hash of (id, members).
    pub item: [u8; 32],
    /// References from templates and rules.
    pub refs: u32,
    pub nodes: NodeSet,
    /// Queued for digest propagation, with the item nodes currently hold.
    pub pending: Option<[u8; 32]>,
    pub cache: OnceLock<Arc<ir::Group>>,
}

/// The nodes holding a group. A broad group (a `namespaces: {}` peer of a cluster policy) is
/// held by every node: as a hash set it grew through a dozen rehashes per group during a full
/// load and cost 40 KiB at 5,000 nodes; as a bitset it costs a bit per node and an insert is
/// a store. Groups held by a few nodes stay a short list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum NodeSet {
    #[default]
    Empty,
    Few(SmallVec<[NodeIdx; 6]>),
    Bits {
        words: Vec<u64>,
        len: usize,
    },
}

impl NodeSet {
    const FEW: usize = 6;

    /// Adds `n`; whether it was new.
    pub fn insert(&mut self, n: NodeIdx) -> bool {
        match self {
            NodeSet::Empty => {
                *self = NodeSet::Few(SmallVec::from_slice(&[n]));
                true
            }
            NodeSet::Few(v) => {
                if v.contains(&n) {
                    return false;
                }
                if v.len() < Self::FEW {
                    v.push(n);
                    return true;
                }
                let mut bits = NodeSet::Bits {
                    words: Vec::new(),
                    len: 0,
                };
                for m in v.iter().copied().chain([n]) {
                    bits.insert(m);
                }
                *self = bits;
                true
            }
            NodeSet::Bits { words, len } => {
                let (w, b) = (n.get() / 64, n.get() % 64);
                if w >= words.len() {
                    words.resize(w + 1, 0);
                }
                let new = words[w] & (1 << b) == 0;
                words[w] |= 1 << b;
                *len += usize::from(new);
                new
            }
        }
    }

    /// Removes `n`; whether it was there.
    pub fn remove(&mut self, n: &NodeIdx) -> bool {
        let removed = match self {
            NodeSet::Empty => false,
            NodeSet::Few(v) => match v.iter().position(|m| m == n) {
                Some(i) => {
                    v.swap_remove(i);
                    true
                }
                None => false,
            },
            NodeSet::Bits { words, len } => {
                let (w, b) = (n.get() / 64, n.get() % 64);
                let had = words.get(w).is_some_and(|x| x & (1 << b) != 0);
                if had {
                    words[w] &= !(1 << b);
                    *len -= 1;
                }
                had
            }
        };
        if self.is_empty() {
            *self = NodeSet::Empty;
        }
        removed
    }

    pub fn len(&self) -> usize {
        match self {
            NodeSet::Empty => 0,
            NodeSet::Few(v) => v.len(),
            NodeSet::Bits { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = NodeIdx> + '_ {
        let few = match self {
            NodeSet::Few(v) => v.as_slice(),
            _ => &[],
        };
        let words = match self {
            NodeSet::Bits { words, .. } => words.as_slice(),
            _ => &[],
        };
        few.iter()
            .copied()
            .chain(words.iter().enumerate().flat_map(|(w, x)| {
                let mut x = *x;
                std::iter::from_fn(move || {
                    if x == 0 {
                        return None;
                    }
                    let b = x.trailing_zeros() as usize;
                    x &= x - 1;
                    Some(NodeIdx::new(w * 64 + b))
                })
            }))
    }
}

#[cfg(test)]
mod node_set_tests {
    use super::{NodeIdx, NodeSet};
    use std::collections::BTreeSet;

    /// Against a `BTreeSet`, through the small list, the switch to bits and back to empty.
    #[test]
    fn node_set_is_a_set() {
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        for round in 0..200 {
            let (mut s, mut model) = (NodeSet::default(), BTreeSet::new());
            let span = [8, 64, 300, 5000][round % 4];
            for _ in 0..400 {
                let n = NodeIdx::new(next(span) as usize);
                if next(3) == 0 {
                    assert_eq!(s.remove(&n), model.remove(&n));
                } else {
                    assert_eq!(s.insert(n), model.insert(n));
                }
                assert_eq!(s.len(), model.len());
                assert_eq!(s.is_empty(), model.is_empty());
            }
            let mut got: Vec<NodeIdx> = s.iter().collect();
            got.sort();
            assert_eq!(got, model.iter().copied().collect::<Vec<_>>());
            for n in model {
                assert!(s.remove(&n));
            }
            assert_eq!(s, NodeSet::Empty);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PortsKey {
    Any,
    Ranges(Box<[PortRange]>),
    FromGroups,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RuleKey {
    pub direction: Direction,
    pub tier: Tier,
    pub priority: u64,
    pub action: Action,
    /// `None`: any peer. Sorted.
    pub peers: Option<Box<[GroupIdx]>>,
    pub ports: PortsKey,
}

pub(crate) struct RuleState {
    pub key: RuleKey,
    pub rule: Arc<ir::Rule>,
    pub hash: [u8; 32],
    /// References from templates, cached cluster rule lists, and nodes (one per node).
    pub refs: u32,
}

/// Work queued by object events for the next flush.
#[derive(Default)]
pub(crate) struct Work {
    pub dirty_pods: Vec<PodIdx>,
    pub touched_nodes: Vec<NodeIdx>,
    pub pending_groups: Vec<GroupIdx>,
    pub rule_gc: Vec<RuleIdx>,
    pub group_gc: Vec<GroupIdx>,
    pub ns_gc: Vec<NsIdx>,
    pub node_gc: Vec<NodeIdx>,
    /// Keys of cluster rule lists an endpoint let go of: evicted if nothing else holds them.
    pub cluster_rules_gc: Vec<ClusterKey>,
    /// Cluster policies selecting a pod, by (namespace labels, pod labels); valid for one
    /// `compile_dirty` only (label set IDs are reused once released).
    pub subjects: FxHashMap<(LabelSetId, LabelSetId), (CpSet, bool)>,
    /// Rule blocks by (cluster policy, the ports its named ports resolved against); valid
    /// for one `compile_dirty`, like `subjects` (lists built later get blocks of their own).
    pub blocks: FxHashMap<(CpIdx, PortsOf), Arc<RuleBlock>>,
    /// NetworkPolicy rule lists by (namespace, pod labels), then by pod ports; valid for one
    /// `compile_dirty` only, like `subjects`.
    pub np_lists: FxHashMap<(NsIdx, LabelSetId), SmallVec<[NpListsFor; 1]>>,
    /// Inside `Index::load` (a fresh index), after its pods: every endpoint is dirty already.
    pub loading: bool,
    /// Scratch for merging an endpoint's rule IDs.
    pub ids: [Vec<ir::RuleId>; 2],
}

/// A pod's NetworkPolicy rules per direction (`None`: not isolated), sorted by rule ID, with
/// those IDs.
#[derive(Clone)]
pub(crate) struct NpLists {
    pub ingress: Option<Box<[RuleIdx]>>,
    pub egress: Option<Box<[RuleIdx]>>,
    pub ids: [SmallVec<[ir::RuleId; 16]>; 2],
}
