//! State kept per object and per compiled entry.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use rustc_hash::{FxHashMap, FxHashSet};
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
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct EndpointState {
    pub node: NodeIdx,
    /// `None`: not isolated. Sorted by rule ID.
    pub ingress: Option<Box<[RuleIdx]>>,
    pub egress: Option<Box<[RuleIdx]>>,
    /// ClusterNetworkPolicy rules (ingress, egress), sorted by rule ID: they apply whether
    /// or not a NetworkPolicy isolates the pod.
    pub cluster: [Box<[RuleIdx]>; 2],
    pub item: [u8; 32],
}

impl EndpointState {
    /// Every rule of one direction (NetworkPolicy and cluster), sorted by rule ID.
    pub fn rules(&self, egress: bool) -> impl Iterator<Item = RuleIdx> + '_ {
        let np = if egress { &self.egress } else { &self.ingress };
        np.iter()
            .flat_map(|l| l.iter())
            .chain(self.cluster[usize::from(egress)].iter())
            .copied()
    }
}

pub(crate) struct NodeState {
    pub name: Arc<str>,
    /// A Node object exists: only known nodes get snapshots.
    pub known: bool,
    pub addrs: Vec<IpAddr>,
    /// Pods whose `nodeName` is this node.
    pub pods: Vec<PodIdx>,
    pub rule_refs: FxHashMap<RuleIdx, u32>,
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
    Pods { scope: Scope, pods: SelId },
    Block(IpBlock),
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
    pub nodes: FxHashSet<NodeIdx>,
    /// Queued for digest propagation, with the item nodes currently hold.
    pub pending: Option<[u8; 32]>,
    pub cache: OnceLock<Arc<ir::Group>>,
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
    /// References from templates and endpoints.
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
}
