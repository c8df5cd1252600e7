//! Validated, compact forms of the Kubernetes objects policy depends on.
//!
//! Conversion from `k8s-openapi` types ([`parse`]) keeps only the fields the model uses and
//! applies the API server's defaults (omitted protocol = TCP, omitted `policyTypes`, the
//! `kubernetes.io/metadata.name` namespace label), so everything downstream sees one canonical
//! form. These values own plain strings and are independent of any index.

pub mod cidr;
pub mod cnp_api;
pub mod lookup;
pub mod parse;
pub mod render;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use cidr::Cidr;
pub use parse::{K8sObject, Parsed, ValidationError, Warning};

/// Label key the API server sets on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.number() == n)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One requirement of a label selector; `values` are sorted and unique.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: Vec<String>,
}

/// A label selector as a conjunction of requirements (`matchLabels` become `In` with one
/// value). Empty selects everything. Requirements are sorted and unique.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Selector {
    pub reqs: Vec<Requirement>,
}

impl Selector {
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| {
            let v = labels.get(&r.key);
            match r.op {
                Op::In => v.is_some_and(|v| r.values.binary_search(v).is_ok()),
                Op::NotIn => v.is_none_or(|v| r.values.binary_search(v).is_err()),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
            }
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpBlock {
    pub cidr: Cidr,
    /// Sorted and unique; each strictly inside `cidr`.
    pub except: Vec<Cidr>,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Peer {
    /// Pods selected by `pods` in the namespaces selected by `namespaces`, or in the policy's
    /// own namespace when `namespaces` is `None`.
    Pods {
        namespaces: Option<Selector>,
        pods: Selector,
    },
    Block(IpBlock),
    /// Every address of the Nodes this selects (`status.addresses`, InternalIP and
    /// ExternalIP): a ClusterNetworkPolicy egress `nodes` peer, accepted only with
    /// [`parse::Options::experimental_cnp_node_peers`]. Never a pod's address, whichever node
    /// the pod runs on.
    Nodes(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PortSpec {
    /// Every port of one protocol (a port entry with only `protocol`).
    All(Protocol),
    /// `port`..=`endPort` (a single port has `first == last`).
    Range {
        proto: Protocol,
        first: u16,
        last: u16,
    },
    /// A container port name, resolved against the destination pod.
    Named { proto: Protocol, name: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    /// Empty matches every peer.
    pub peers: Vec<Peer>,
    /// Empty matches every port and protocol (ICMP included).
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// `Some` iff the policy isolates selected pods for ingress; an empty list denies all.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

/// A `ClusterNetworkPolicy` tier (the NetworkPolicy tier sits between them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CnpTier {
    Admin,
    Baseline,
}

impl CnpTier {
    pub fn as_str(self) -> &'static str {
        match self {
            CnpTier::Admin => "Admin",
            CnpTier::Baseline => "Baseline",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CnpAction {
    Accept,
    Deny,
    /// Skip the tier's remaining rules: Admin goes on to NetworkPolicy, Baseline to the
    /// default allow.
    Pass,
}

impl CnpAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CnpAction::Accept => "Accept",
            CnpAction::Deny => "Deny",
            CnpAction::Pass => "Pass",
        }
    }
}

/// The pods a `ClusterNetworkPolicy` applies to (never host-network pods).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Subject {
    /// Every pod of the namespaces this selects.
    Namespaces(Selector),
    /// Pods matching `pods` in namespaces matching `namespaces`.
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
}

/// One rule of a `ClusterNetworkPolicy`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CnpRule {
    /// `name` as written (may be empty).
    pub name: String,
    pub action: CnpAction,
    /// `None`: the rule matches nothing (an Accept rule with a peer of a kind Moat does not
    /// know: the API's fail-closed reading). Otherwise peers are never empty, except for a
    /// Deny or Pass rule with such a peer, which matches every peer and port.
    pub rule: Option<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPolicy {
    pub name: String,
    pub tier: CnpTier,
    /// 0 to 1000, lower first.
    pub priority: u32,
    pub subject: Subject,
    /// In written order; an empty list leaves that direction alone.
    pub ingress: Vec<CnpRule>,
    pub egress: Vec<CnpRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContainerPort {
    pub name: String,
    pub proto: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node: Option<String>,
    pub ips: Vec<IpAddr>,
    /// Named container ports only (unnamed ones can't be referenced); sorted.
    pub ports: Vec<ContainerPort>,
    pub host_network: bool,
    /// Phase Succeeded or Failed.
    pub terminal: bool,
    /// `metadata.uid`: a pod recreated under the same name is another endpoint.
    #[serde(default)]
    pub uid: Option<String>,
    /// When the pod's current sandbox (and with it its network interface) came up: the
    /// `PodReadyToStartContainers` condition's `lastTransitionTime`. It changes when the
    /// kubelet recreates the sandbox, which lets a node tell a pod's new interface on its old
    /// address from another pod on a reused address.
    #[serde(default)]
    pub sandbox: Option<String>,
}

impl Pod {
    /// Whether the pod takes part in policy at all: selectable by selectors and enforceable.
    pub fn is_policy_endpoint(&self) -> bool {
        !self.host_network && !self.terminal && !self.ips.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    /// Effective labels, `kubernetes.io/metadata.name` included.
    pub labels: BTreeMap<String, String>,
}

impl Namespace {
    /// Labels of a namespace whose object has not been seen (yet): only what the API server
    /// would always have set.
    pub fn implicit_labels(name: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())])
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// Sorted and unique.
    pub addrs: Vec<IpAddr>,
    /// What ClusterNetworkPolicy `nodes` peers select by. Nodes never receive them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Node(Node),
    Policy(Policy),
    ClusterPolicy(ClusterPolicy),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ObjectKey {
    Namespace(String),
    Node(String),
    Pod { namespace: String, name: String },
    Policy { namespace: String, name: String },
    ClusterPolicy(String),
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Namespace(n) => ObjectKey::Namespace(n.name.clone()),
            Object::Node(n) => ObjectKey::Node(n.name.clone()),
            Object::Pod(p) => ObjectKey::Pod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            },
            Object::Policy(p) => ObjectKey::Policy {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            },
            Object::ClusterPolicy(p) => ObjectKey::ClusterPolicy(p.name.clone()),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKey::Namespace(n) => write!(f, "Namespace {n}"),
            ObjectKey::Node(n) => write!(f, "Node {n}"),
            ObjectKey::Pod { namespace, name } => write!(f, "Pod {namespace}/{name}"),
            ObjectKey::Policy { namespace, name } => write!(f, "NetworkPolicy {namespace}/{name}"),
            ObjectKey::ClusterPolicy(name) => write!(f, "ClusterNetworkPolicy {name}"),
        }
    }
}
