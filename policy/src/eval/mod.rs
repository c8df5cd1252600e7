//! The reference evaluator: what Kubernetes NetworkPolicy and ClusterNetworkPolicy say about
//! one flow.
//!
//! It reads the Kubernetes objects directly and shares no code with the index or compiler
//! (its own selector matching, defaulting, CIDR containment and port resolution), so that a
//! mistake in one is caught by the other. It is slow on purpose: every flow looks at every
//! policy. It is the oracle of the property tests and of `moatctl explain`.
//!
//! Per direction: the Admin tier (ClusterNetworkPolicies by priority, rules in order; Accept
//! and Deny final, Pass on to the next tier) → NetworkPolicy (final for a pod any policy
//! isolates) → the Baseline tier → allow.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use crate::model::K8sObject;
use crate::model::cnp_api as cnp;

mod cluster;

/// The objects of one cluster, as the API serves them.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: Vec<core::Namespace>,
    pub pods: Vec<core::Pod>,
    pub nodes: Vec<core::Node>,
    pub policies: Vec<net::NetworkPolicy>,
    pub cluster_policies: Vec<cnp::ClusterNetworkPolicy>,
}

impl Cluster {
    pub fn from_objects(objects: impl IntoIterator<Item = K8sObject>) -> Self {
        let mut c = Self::default();
        for o in objects {
            match o {
                K8sObject::Namespace(n) => c.namespaces.push(n),
                K8sObject::Pod(p) => c.pods.push(p),
                K8sObject::Node(n) => c.nodes.push(n),
                K8sObject::NetworkPolicy(p) => c.policies.push(p),
                K8sObject::ClusterNetworkPolicy(p) => c.cluster_policies.push(p),
            }
        }
        c
    }
}

/// A new flow between two addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One rule of one `ClusterNetworkPolicy`: `spec.ingress[index]` or `spec.egress[index]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClusterRuleRef {
    /// `Admin` or `Baseline`.
    pub tier: String,
    pub policy: String,
    pub priority: u32,
    pub index: usize,
    /// The rule's `name` (may be empty).
    pub name: String,
    /// `Accept`, `Deny` or `Pass`.
    pub action: String,
}

impl fmt::Display for ClusterRuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (priority {}) rule {}",
            self.tier, self.policy, self.priority, self.index
        )?;
        if !self.name.is_empty() {
            write!(f, " {:?}", self.name)?;
        }
        write!(f, ": {}", self.action)
    }
}

/// One rule of one policy: `spec.ingress[index]` or `spec.egress[index]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleRef {
    pub policy: PolicyRef,
    pub index: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// This end is not a pod that policy applies to (external address, node, host-network pod).
    NotAPod,
    /// Traffic between a pod and its own node is always allowed.
    NodeLocal,
    /// No policy selects the pod for this direction.
    NotIsolated,
    /// Isolated, and these rules allow the flow.
    AllowedBy(Vec<RuleRef>),
    /// Isolated by these policies, and none of their rules allows the flow.
    DeniedBy(Vec<PolicyRef>),
    /// A ClusterNetworkPolicy rule accepted or denied the flow.
    Cluster(ClusterRuleRef),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    pub allowed: bool,
    pub reason: Reason,
    /// The Pass rules the decision went through (at most one per tier).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed: Vec<ClusterRuleRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub allowed: bool,
    pub egress: Side,
    pub ingress: Side,
}

enum Owner<'a> {
    Pod(&'a core::Pod),
    Node,
    External,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

pub fn verdict(c: &Cluster, f: &Flow) -> Verdict {
    let egress = match owner(c, f.src) {
        Owner::Pod(p) => side(c, p, Dir::Egress, f.dst, f),
        _ => not_a_pod(),
    };
    let ingress = match owner(c, f.dst) {
        Owner::Pod(p) => side(c, p, Dir::Ingress, f.src, f),
        _ => not_a_pod(),
    };
    Verdict {
        allowed: egress.allowed && ingress.allowed,
        egress,
        ingress,
    }
}

fn not_a_pod() -> Side {
    Side {
        allowed: true,
        reason: Reason::NotAPod,
        passed: Vec::new(),
    }
}

/// The pod policy applies to at `ip`, else whether it is a node address.
fn owner(c: &Cluster, ip: IpAddr) -> Owner<'_> {
    for p in &c.pods {
        if policy_pod(p) && pod_ips(p).contains(&ip) {
            return Owner::Pod(p);
        }
    }
    if c.nodes.iter().any(|n| node_ips(n).contains(&ip)) {
        return Owner::Node;
    }
    Owner::External
}

/// Pods policy applies to: not host-network, not finished, with an address.
fn policy_pod(p: &core::Pod) -> bool {
    let host_network = p
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    !host_network && !matches!(phase, Some("Succeeded" | "Failed")) && !pod_ips(p).is_empty()
}

fn pod_ips(p: &core::Pod) -> Vec<IpAddr> {
    let Some(st) = &p.status else {
        return Vec::new();
    };
    let list: Vec<&str> = match &st.pod_ips {
        Some(l) if !l.is_empty() => l.iter().map(|x| x.ip.as_str()).collect(),
        _ => st.pod_ip.as_deref().into_iter().collect(),
    };
    list.into_iter().filter_map(|s| s.parse().ok()).collect()
}

fn node_ips(n: &core::Node) -> Vec<IpAddr> {
    n.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

fn ns_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
}

/// A namespace's labels as the API server has them, `kubernetes.io/metadata.name` included,
/// even if the Namespace object itself is unknown.
fn namespace_labels(c: &Cluster, name: &str) -> BTreeMap<String, String> {
    let mut labels = c
        .namespaces
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".into(), name.into());
    labels
}

fn side(c: &Cluster, pod: &core::Pod, dir: Dir, peer: IpAddr, f: &Flow) -> Side {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let own_node = c
        .nodes
        .iter()
        .find(|n| node.is_some() && n.metadata.name.as_deref() == node);
    if own_node.is_some_and(|n| node_ips(n).contains(&peer)) {
        return Side {
            allowed: true,
            reason: Reason::NodeLocal,
            passed: Vec::new(),
        };
    }
    let mut passed = Vec::new();
    match cluster::tier(c, cluster::ADMIN, pod, dir, peer, f) {
        cluster::Outcome::Decided(allowed, r) => {
            return Side {
                allowed,
                reason: Reason::Cluster(r),
                passed,
            };
        }
        cluster::Outcome::Passed(r) => passed.push(r),
        cluster::Outcome::NoMatch => {}
    }
    let np = network_policy_tier(c, pod, dir, peer, f);
    if np.reason != Reason::NotIsolated {
        return Side { passed, ..np };
    }
    match cluster::tier(c, cluster::BASELINE, pod, dir, peer, f) {
        cluster::Outcome::Decided(allowed, r) => Side {
            allowed,
            reason: Reason::Cluster(r),
            passed,
        },
        cluster::Outcome::Passed(r) => {
            passed.push(r);
            Side { passed, ..np }
        }
        cluster::Outcome::NoMatch => Side { passed, ..np },
    }
}

/// The NetworkPolicy tier's decision: final if any policy isolates the pod for `dir`.
fn network_policy_tier(c: &Cluster, pod: &core::Pod, dir: Dir, peer: IpAddr, f: &Flow) -> Side {
    let pod_ns = ns_of(&pod.metadata);
    let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
    let mut isolating = Vec::new();
    let mut allowing = Vec::new();
    for np in &c.policies {
        if ns_of(&np.metadata) != pod_ns {
            continue;
        }
        let Some(spec) = &np.spec else { continue };
        let selector = spec.pod_selector.clone().unwrap_or_default();
        if !selector_matches(&selector, &pod_labels) || !has_type(spec, dir) {
            continue;
        }
        let pref = PolicyRef {
            namespace: pod_ns.to_string(),
            name: np.metadata.name.clone().unwrap_or_default(),
        };
        let rules: Vec<RuleView<'_>> = match dir {
            Dir::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Dir::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        let dst_pod = destination_pod(c, pod, dir, peer);
        for (i, (peers, ports)) in rules.iter().enumerate() {
            if peers_match(c, pod_ns, *peers, peer) && ports_match(*ports, dst_pod, f) {
                allowing.push(RuleRef {
                    policy: pref.clone(),
                    index: i,
                });
            }
        }
        isolating.push(pref);
    }
    let (allowed, reason) = if isolating.is_empty() {
        (true, Reason::NotIsolated)
    } else if allowing.is_empty() {
        (false, Reason::DeniedBy(isolating))
    } else {
        (true, Reason::AllowedBy(allowing))
    };
    Side {
        allowed,
        reason,
        passed: Vec::new(),
    }
}

/// A rule's peers (`from`/`to`) and ports, whichever direction it is.
type RuleView<'a> = (
    Option<&'a Vec<net::NetworkPolicyPeer>>,
    Option<&'a Vec<net::NetworkPolicyPort>>,
);

fn has_type(spec: &net::NetworkPolicySpec, dir: Dir) -> bool {
    match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        Some(types) => types.iter().any(|t| match dir {
            Dir::Ingress => t == "Ingress",
            Dir::Egress => t == "Egress",
        }),
        None => match dir {
            Dir::Ingress => true,
            Dir::Egress => spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
        },
    }
}

fn peers_match(
    c: &Cluster,
    policy_ns: &str,
    peers: Option<&Vec<net::NetworkPolicyPeer>>,
    ip: IpAddr,
) -> bool {
    let Some(peers) = peers.filter(|p| !p.is_empty()) else {
        return true;
    };
    peers.iter().any(|p| {
        if let Some(b) = &p.ip_block {
            return in_block(b, ip);
        }
        let Owner::Pod(q) = owner(c, ip) else {
            return false;
        };
        let q_ns = ns_of(&q.metadata);
        let ns_ok = match &p.namespace_selector {
            Some(s) => selector_matches(s, &namespace_labels(c, q_ns)),
            None => q_ns == policy_ns,
        };
        let pod_ok = match &p.pod_selector {
            Some(s) => selector_matches(s, &q.metadata.labels.clone().unwrap_or_default()),
            None => true,
        };
        ns_ok && pod_ok
    })
}

fn in_block(b: &net::IPBlock, ip: IpAddr) -> bool {
    let Ok(cidr) = b.cidr.parse::<IpNet>() else {
        return false;
    };
    cidr.contains(&ip)
        && !b
            .except
            .iter()
            .flatten()
            .filter_map(|e| e.parse::<IpNet>().ok())
            .any(|e| e.contains(&ip))
}

fn ports_match(
    ports: Option<&Vec<net::NetworkPolicyPort>>,
    dst_pod: Option<&core::Pod>,
    f: &Flow,
) -> bool {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return true;
    };
    let Some(flow_proto) = proto_name(f.proto) else {
        return false;
    };
    ports.iter().any(|p| {
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if proto != flow_proto {
            return false;
        }
        match &p.port {
            None => true,
            Some(IntOrString::Int(n)) => {
                let first = i64::from(*n);
                let last = p.end_port.map_or(first, i64::from);
                first <= i64::from(f.port) && i64::from(f.port) <= last
            }
            Some(IntOrString::String(name)) => {
                dst_pod.is_some_and(|q| has_named_port(q, name, proto, f.port))
            }
        }
    })
}

/// The pod whose ports a named port refers to: the destination (`pod` itself for ingress,
/// the peer for egress, if it is a pod).
fn destination_pod<'a>(
    c: &'a Cluster,
    pod: &'a core::Pod,
    dir: Dir,
    peer: IpAddr,
) -> Option<&'a core::Pod> {
    match dir {
        Dir::Ingress => Some(pod),
        Dir::Egress => match owner(c, peer) {
            Owner::Pod(p) => Some(p),
            _ => None,
        },
    }
}

/// The names policy uses for the protocols with ports.
fn proto_name(proto: u8) -> Option<&'static str> {
    match proto {
        6 => Some("TCP"),
        17 => Some("UDP"),
        132 => Some("SCTP"),
        _ => None,
    }
}

/// Whether pod `q` has a container port named `name` with this protocol and number.
fn has_named_port(q: &core::Pod, name: &str, proto: &str, port: u16) -> bool {
    container_ports(q).any(|cp| {
        cp.name.as_deref() == Some(name)
            && cp.protocol.as_deref().unwrap_or("TCP") == proto
            && i64::from(cp.container_port) == i64::from(port)
    })
}

fn container_ports(p: &core::Pod) -> impl Iterator<Item = &core::ContainerPort> {
    let spec = p.spec.as_ref();
    let main = spec.into_iter().flat_map(|s| s.containers.iter());
    let sidecars = spec
        .into_iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    main.chain(sidecars).flat_map(|c| c.ports.iter().flatten())
}

fn selector_matches(s: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = s
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = s.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let v = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => v.is_some_and(|v| values.contains(v)),
            "NotIn" => v.is_none_or(|v| !values.contains(v)),
            "Exists" => v.is_some(),
            "DoesNotExist" => v.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

#[cfg(test)]
mod tests;
