//! The rule IR: what one node receives.
//!
//! ```text
//!  NodeSnapshot ── endpoints ──► Endpoint { addrs, ingress: rule ids, egress: rule ids }
//!       │                                               │
//!       ├── rules ──► Rule { direction, tier, priority, action, peers, ports }
//!       │                                  │
//!       └── groups ─► Group { id, members } ◄┘  (shared by every rule and node using them)
//! ```
//!
//! * A node gets its *span*: its local endpoints, the rules that apply to them and the groups
//!   those rules reference. No policy or pod names travel; IDs are content hashes the server
//!   maps back for humans.
//! * Group IDs come from the group's *definition* (selector, ipBlock, named port), so a pod
//!   appearing changes a group's members, never a rule.
//! * Nothing here forces a per-packet loop over rules: a dataplane classifies an address into
//!   its groups (hash/LPM lookups), then looks up (endpoint, group class, proto, port).
//! * Every rule carries a tier, a priority and an action, so ClusterNetworkPolicy (Admin and
//!   Baseline tiers; Deny and Pass) fits without a new format.

pub mod delta;
pub mod digest;
pub mod sim;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::model::{Cidr, Protocol};
use digest::{Acc, Digest, Enc};

/// Content-derived 64-bit IDs, written as 16 hex digits (JSON numbers lose precision past 2^53).
macro_rules! hex_id {
    ($name:ident) => {
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{:016x}", self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                u64::from_str_radix(&s, 16)
                    .map($name)
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
hex_id!(RuleId);
hex_id!(GroupId);
hex_id!(EndpointId);

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

/// Tiers are evaluated in this order. Kubernetes NetworkPolicy lives entirely in
/// `NetworkPolicy`: allow rules, and default deny for isolated endpoints at the tier's end.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    Admin = 0,
    NetworkPolicy = 1,
    Baseline = 2,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
    /// Skip the remaining Admin rules and continue at the NetworkPolicy tier.
    Pass,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub proto: Protocol,
    pub first: u16,
    pub last: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Peers {
    Any,
    /// The peer address is in at least one of these groups (sorted).
    Groups(Vec<GroupId>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Ports {
    /// Every protocol and port, ICMP included.
    Any,
    /// Sorted, non-overlapping per protocol. Never empty: a rule whose ports all failed to
    /// resolve is not emitted.
    Ranges(Vec<PortRange>),
    /// The peer groups hold (address, protocol, port) members: an egress named port resolved
    /// per destination pod.
    FromGroups,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub id: RuleId,
    pub direction: Direction,
    pub tier: Tier,
    /// Order within the tier, lower first: 0 for NetworkPolicy (its rules only add allows);
    /// [`cluster_rank`] for a ClusterNetworkPolicy rule.
    pub priority: u64,
    pub action: Action,
    pub peers: Peers,
    pub ports: Ports,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AddrPort {
    pub addr: IpAddr,
    pub proto: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Members {
    /// Pod addresses (or, for a ClusterNetworkPolicy `nodes` peer, Node addresses), sorted.
    Addrs(Vec<IpAddr>),
    /// An ipBlock: `cidr` minus every `except` (sorted).
    Block { cidr: Cidr, except: Vec<Cidr> },
    /// Pod addresses with one resolved named port each, sorted.
    AddrPorts(Vec<AddrPort>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Group {
    pub id: GroupId,
    pub members: Members,
    /// `members_hash(&members)`, computed once: a digest over a group of 100,000 addresses
    /// must not be recomputed on every delta.
    #[serde(skip)]
    hash: OnceLock<[u8; 32]>,
}

impl Group {
    pub fn new(id: GroupId, members: Members) -> Self {
        Self {
            id,
            members,
            hash: OnceLock::new(),
        }
    }

    /// A group whose members hash the caller already knows (it must equal
    /// `members_hash(&members)`; `debug_assert`ed).
    pub fn with_hash(id: GroupId, members: Members, hash: [u8; 32]) -> Self {
        debug_assert_eq!(hash, members_hash(&members), "wrong cached members hash");
        Self {
            id,
            members,
            hash: OnceLock::from(hash),
        }
    }

    pub fn members_hash(&self) -> [u8; 32] {
        *self.hash.get_or_init(|| members_hash(&self.members))
    }

    /// Number of entries a dataplane holds for this group.
    pub fn len(&self) -> usize {
        match &self.members {
            Members::Addrs(a) => a.len(),
            Members::Block { except, .. } => 1 + except.len(),
            Members::AddrPorts(a) => a.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for Group {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.members == other.members
    }
}

impl Eq for Group {}

impl std::hash::Hash for Group {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
        self.members.hash(state);
    }
}

/// What applies to an endpoint in one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DirectionRules {
    /// Whether a NetworkPolicy selects the endpoint for this direction (default deny).
    pub isolated: bool,
    /// Sorted rule IDs.
    pub rules: Vec<RuleId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Derived from the pod's namespace, name and UID.
    pub id: EndpointId,
    /// The pod's sandbox generation (0: unknown), so a node can tell the same pod on a new
    /// interface (its sandbox was recreated) from another pod on a reused address.
    #[serde(default)]
    pub sandbox: u64,
    /// Sorted.
    pub addrs: Vec<IpAddr>,
    pub ingress: DirectionRules,
    pub egress: DirectionRules,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    pub node: String,
    pub version: u64,
    pub digest: Digest,
    /// The node's own addresses: traffic between a node and its pods is always allowed.
    pub node_addrs: Vec<IpAddr>,
    /// Sorted by ID.
    pub endpoints: Vec<Endpoint>,
    pub rules: Vec<Arc<Rule>>,
    pub groups: Vec<Arc<Group>>,
}

/// How big a snapshot is, in entries a dataplane has to hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub endpoints: usize,
    pub rules: usize,
    pub groups: usize,
    pub members: usize,
}

impl Size {
    pub fn total(&self) -> usize {
        self.endpoints + self.rules + self.groups + self.members
    }
}

impl NodeSnapshot {
    /// The digest recomputed from content alone; equal to `digest` for a well-formed snapshot.
    pub fn content_digest(&self) -> Digest {
        let mut acc = Acc::default();
        acc.add(&node_item(&self.node_addrs));
        for e in &self.endpoints {
            acc.add(&endpoint_item(e));
        }
        for r in &self.rules {
            acc.add(&rule_hash(r));
        }
        for g in &self.groups {
            acc.add(&group_item(g.id, &g.members_hash()));
        }
        acc.digest()
    }

    pub fn size(&self) -> Size {
        Size {
            endpoints: self.endpoints.len(),
            rules: self.rules.len(),
            groups: self.groups.len(),
            members: self.groups.iter().map(|g| g.len()).sum(),
        }
    }
}

// === item hashes (shared by the incremental compiler and `content_digest`) ===

pub fn node_item(addrs: &[IpAddr]) -> [u8; 32] {
    let mut e = Enc::new("node");
    e.u32(addrs.len() as u32);
    for a in addrs {
        e.ip(*a);
    }
    e.finish()
}

fn direction_rules(e: &mut Enc, isolated: bool, rules: &[RuleId]) {
    e.u8(u8::from(isolated))
        .u32(rules.len() as u32)
        .u64s(rules.iter().map(|r| r.0));
}

pub fn endpoint_item(ep: &Endpoint) -> [u8; 32] {
    endpoint_item_parts(
        ep.id,
        ep.sandbox,
        &ep.addrs,
        (ep.ingress.isolated, &ep.ingress.rules),
        (ep.egress.isolated, &ep.egress.rules),
    )
}

/// `endpoint_item` from parts: (isolated, sorted rule IDs) per direction.
pub fn endpoint_item_parts(
    id: EndpointId,
    sandbox: u64,
    addrs: &[IpAddr],
    ingress: (bool, &[RuleId]),
    egress: (bool, &[RuleId]),
) -> [u8; 32] {
    let mut e = Enc::new("endpoint");
    e.u64(id.0).u64(sandbox).u32(addrs.len() as u32);
    for a in addrs {
        e.ip(*a);
    }
    direction_rules(&mut e, ingress.0, ingress.1);
    direction_rules(&mut e, egress.0, egress.1);
    e.finish()
}

/// Hash of a rule's content (everything but `id`); the rule ID is its first 64 bits.
pub fn rule_hash(r: &Rule) -> [u8; 32] {
    rule_enc(
        r.direction,
        r.tier,
        r.priority,
        r.action,
        &r.peers,
        &r.ports,
    )
    .finish()
}

pub fn rule_id(
    direction: Direction,
    tier: Tier,
    priority: u64,
    action: Action,
    peers: &Peers,
    ports: &Ports,
) -> RuleId {
    RuleId(rule_enc(direction, tier, priority, action, peers, ports).finish_id())
}

fn rule_enc(
    direction: Direction,
    tier: Tier,
    priority: u64,
    action: Action,
    peers: &Peers,
    ports: &Ports,
) -> Enc {
    let mut e = Enc::new("rule");
    e.u8(direction as u8).u8(tier as u8);
    // NetworkPolicy rules keep the 32-bit field of the servers before ClusterNetworkPolicy
    // (the tier, encoded first, tells the widths apart), so their IDs and every digest of a
    // NetworkPolicy-only node stay the same across that upgrade and enforcers resume by delta.
    match tier {
        Tier::NetworkPolicy => e.u32(priority as u32),
        Tier::Admin | Tier::Baseline => e.u64(priority),
    };
    e.u8(action as u8);
    match peers {
        Peers::Any => {
            e.u8(0);
        }
        Peers::Groups(g) => {
            e.u8(1).u32(g.len() as u32);
            for id in g {
                e.u64(id.0);
            }
        }
    }
    match ports {
        Ports::Any => {
            e.u8(0);
        }
        Ports::Ranges(r) => {
            e.u8(1).u32(r.len() as u32);
            for p in r {
                e.u8(p.proto.number()).u16(p.first).u16(p.last);
            }
        }
        Ports::FromGroups => {
            e.u8(2);
        }
    }
    e
}

/// A ClusterNetworkPolicy rule's order within its tier, as content: the top bit always set
/// (so the rank never fits the 32-bit field of enforcers older than ClusterNetworkPolicy,
/// which then refuse the rule instead of reading a Deny as an allow), the policy's priority
/// (0 to 1000) in the next 10 bits, then [`tie_key`] of its name (same-priority policies),
/// then the rule's index in its list (at most 25). Adding or removing a policy never changes
/// another policy's rules, and no name travels to nodes.
pub fn cluster_rank(priority: u32, name: &str, index: usize) -> u64 {
    debug_assert!(priority < 1 << 10 && index < 1 << 7);
    (1 << 63) | (u64::from(priority) << 53) | (tie_key(name) << 7) | (index as u64 & 0x7f)
}

/// The documented order of same-priority ClusterNetworkPolicies of one tier (upstream leaves
/// it undefined): 46 bits of a hash of the name.
pub fn tie_key(name: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"moat.cnp.order\0");
    h.update(name.as_bytes());
    let first: [u8; 8] = h.finalize().as_bytes()[..8].try_into().expect("8 bytes");
    u64::from_be_bytes(first) >> 18
}

pub fn group_item(id: GroupId, members: &[u8; 32]) -> [u8; 32] {
    Enc::new("group").u64(id.0).bytes32(members).finish()
}

pub fn addr_member(a: IpAddr) -> [u8; 32] {
    Enc::new("member.addr").ip(a).finish()
}

pub fn addr_port_member(m: &AddrPort) -> [u8; 32] {
    Enc::new("member.addrport")
        .ip(m.addr)
        .u8(m.proto.number())
        .u16(m.port)
        .finish()
}

pub fn block_members(cidr: &Cidr, except: &[Cidr]) -> [u8; 32] {
    let mut e = Enc::new("member.block");
    e.ip(cidr.addr())
        .u8(cidr.prefix_len())
        .u32(except.len() as u32);
    for x in except {
        e.ip(x.addr()).u8(x.prefix_len());
    }
    e.finish()
}

pub fn members_hash(m: &Members) -> [u8; 32] {
    match m {
        Members::Addrs(a) => {
            let mut acc = Acc::default();
            for x in a {
                acc.add(&addr_member(*x));
            }
            acc.to_bytes()
        }
        Members::AddrPorts(a) => {
            let mut acc = Acc::default();
            for x in a {
                acc.add(&addr_port_member(x));
            }
            acc.to_bytes()
        }
        Members::Block { cidr, except } => block_members(cidr, except),
    }
}
