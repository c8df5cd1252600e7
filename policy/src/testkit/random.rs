//! Small random clusters that exercise every NetworkPolicy and ClusterNetworkPolicy feature.
//!
//! Vocabularies are tiny on purpose, so selectors hit and miss often, the same port name
//! resolves differently on different pods, ipBlocks and `networks` overlap pod addresses, and
//! cluster policies of one tier share priorities (so the tie order matters).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rand::Rng;
use rand::rngs::SmallRng;
use rand::seq::{IndexedMutRandom, IndexedRandom};
use serde_json::{Value, json};

use super::k8s;
use crate::eval::{ClusterRuleRef, Flow, Reason, Side, Verdict};
use crate::model::cnp_api;
use crate::model::{
    ClusterPolicy, K8sObject, NAMESPACE_NAME_LABEL, Object, Peer, PortSpec, Protocol, Rule, Subject,
};

const POD_KEYS: [&str; 3] = ["app", "tier", "env"];
const NS_KEYS: [&str; 2] = ["env", "team"];
const NODE_KEYS: [&str; 2] = ["pool", "role"];
const VALUES: [&str; 3] = ["a", "b", "c"];
const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];
const PORTS: [u16; 5] = [53, 80, 81, 8080, 9090];
const PROTOS: [&str; 3] = ["TCP", "UDP", "SCTP"];
/// Few values, so that policies of one tier often share a priority.
const CNP_PRIORITIES: [u32; 5] = [0, 1, 1, 2, 1000];
const CNP_ACTIONS: [&str; 3] = ["Accept", "Deny", "Pass"];
/// Addresses outside every pod and node range (probed, and anchors of `networks` that
/// cover no pod).
const OUTSIDERS: [&str; 4] = ["10.0.0.250", "203.0.113.7", "fd00::fff0", "2001:db8::7"];

/// (IP protocol, port) pairs every flow is probed with.
pub const PROBES: [(u8, u16); 12] = [
    (6, 80),
    (6, 81),
    (6, 53),
    (6, 8080),
    (6, 9090),
    (6, 85),
    (17, 53),
    (17, 80),
    (17, 81),
    (132, 80),
    (132, 9090),
    (1, 0),
];

/// How often the generator produced each feature, so a run shows what it covered.
#[derive(Default, Clone)]
pub struct Features(BTreeMap<&'static str, u64>);

impl Features {
    pub fn hit(&mut self, feature: &'static str) {
        *self.0.entry(feature).or_default() += 1;
    }

    pub fn get(&self, feature: &str) -> u64 {
        self.0.get(feature).copied().unwrap_or(0)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.0.iter().map(|(k, v)| (*k, *v))
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.0 {
            writeln!(f, "  {k:<34} {v:>8}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct GenNamespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Whether the Namespace object exists (pods can outlive it in watch order).
    pub present: bool,
}

#[derive(Clone, Debug)]
pub struct GenNode {
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// What `nodes` peers select by.
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct GenPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<(String, &'static str, u16)>,
    pub host_network: bool,
    pub terminal: bool,
}

impl GenPod {
    /// Whether policy applies to the pod: not host-network, not finished, with an address.
    pub fn is_endpoint(&self) -> bool {
        !self.host_network && !self.terminal && !self.ips.is_empty()
    }
}

/// A generated cluster, kept as plain data so it can be mutated and rendered again.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub namespaces: Vec<GenNamespace>,
    pub nodes: Vec<GenNode>,
    pub pods: Vec<GenPod>,
    /// NetworkPolicy manifests as JSON.
    pub policies: Vec<Value>,
    /// ClusterNetworkPolicy manifests as JSON.
    pub cluster_policies: Vec<Value>,
    next_pod: u32,
    next_policy: u32,
    next_cluster_policy: u32,
}

impl World {
    pub fn generate(rng: &mut SmallRng, f: &mut Features) -> World {
        let mut w = World::default();
        for i in 0..rng.random_range(2..=3u8) {
            w.nodes.push(GenNode {
                name: format!("node-{i}"),
                ips: vec![
                    IpAddr::V4(Ipv4Addr::new(192, 168, 0, i + 1)),
                    IpAddr::V6(Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, u16::from(i) + 1)),
                ],
                labels: random_labels(rng, &NODE_KEYS),
            });
        }
        for i in 0..rng.random_range(2..=4) {
            let name = format!("ns{i}");
            let labels = random_labels(rng, &NS_KEYS);
            w.namespaces.push(GenNamespace {
                name,
                labels,
                present: true,
            });
        }
        for _ in 0..rng.random_range(3..=10) {
            w.add_pod(rng, f);
        }
        // Either kind may be missing, so each is also seen without the other.
        let policies = if rng.random_bool(0.15) {
            0
        } else {
            rng.random_range(1..=5)
        };
        for _ in 0..policies {
            w.add_policy(rng, f);
        }
        let cluster_policies = if rng.random_bool(0.25) {
            0
        } else {
            rng.random_range(1..=4)
        };
        for _ in 0..cluster_policies {
            w.add_cluster_policy(rng, f);
        }
        w.count_policy_mix(f);
        w
    }

    fn count_policy_mix(&self, f: &mut Features) {
        f.hit(
            match (self.policies.is_empty(), self.cluster_policies.is_empty()) {
                (false, false) => "world: both policy kinds",
                (false, true) => "world: NetworkPolicies only",
                (true, false) => "world: ClusterNetworkPolicies only",
                (true, true) => "world: no policy",
            },
        );
        let mut seen = BTreeSet::new();
        let ties = self
            .cluster_policies
            .iter()
            .filter(|p| {
                !seen.insert((
                    p["spec"]["tier"].to_string(),
                    p["spec"]["priority"].to_string(),
                ))
            })
            .count();
        if ties > 0 {
            f.hit("cnp: same tier and priority (tie)");
        }
    }

    fn add_pod(&mut self, rng: &mut SmallRng, f: &mut Features) {
        let n = self.next_pod;
        self.next_pod += 1;
        let ns = self
            .namespaces
            .choose(rng)
            .expect("namespaces")
            .name
            .clone();
        let node = self.nodes.choose(rng).expect("nodes").clone();
        let mut pod = GenPod {
            namespace: ns,
            name: format!("pod{n}"),
            labels: random_labels(rng, &POD_KEYS),
            node: node.name.clone(),
            ips: Vec::new(),
            ports: random_ports(rng),
            host_network: false,
            terminal: false,
        };
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, (n / 200) as u8, (n % 200) as u8 + 1));
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n as u16 + 1));
        match rng.random_range(0..100) {
            0..5 => {
                pod.host_network = true;
                pod.ips = node.ips.clone();
                f.hit("pod: hostNetwork");
            }
            5..9 => {
                pod.terminal = true;
                pod.ips = vec![v4, v6];
                f.hit("pod: terminal phase");
            }
            9..12 => f.hit("pod: no IP yet"),
            12..27 => {
                pod.ips = vec![v4];
                f.hit("pod: IPv4 only");
            }
            27..40 => {
                pod.ips = vec![v6];
                f.hit("pod: IPv6 only");
            }
            _ => {
                pod.ips = vec![v4, v6];
                f.hit("pod: dual-stack");
            }
        }
        self.pods.push(pod);
    }

    fn add_policy(&mut self, rng: &mut SmallRng, f: &mut Features) {
        let n = self.next_policy;
        self.next_policy += 1;
        let ns = self
            .namespaces
            .choose(rng)
            .expect("namespaces")
            .name
            .clone();
        let p = self.random_policy(rng, f, &ns, &format!("pol{n}"));
        self.policies.push(p);
    }

    fn random_policy(&self, rng: &mut SmallRng, f: &mut Features, ns: &str, name: &str) -> Value {
        let mut spec = serde_json::Map::new();
        spec.insert("podSelector".into(), selector(rng, f, &POD_KEYS));
        match rng.random_range(0..4) {
            0 => f.hit("policyTypes omitted"),
            1 => {
                spec.insert("policyTypes".into(), json!(["Ingress"]));
            }
            2 => {
                spec.insert("policyTypes".into(), json!(["Egress"]));
                f.hit("policyTypes: Egress only");
            }
            _ => {
                spec.insert("policyTypes".into(), json!(["Ingress", "Egress"]));
            }
        }
        for (dir, peers_key) in [("ingress", "from"), ("egress", "to")] {
            if rng.random_bool(0.2) {
                continue;
            }
            let rules: Vec<Value> = (0..rng.random_range(0..=3))
                .map(|_| self.random_rule(rng, f, peers_key))
                .collect();
            if rules.is_empty() {
                f.hit("direction with empty rule list (deny all)");
            }
            spec.insert(dir.into(), Value::Array(rules));
        }
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        })
    }

    fn random_rule(&self, rng: &mut SmallRng, f: &mut Features, peers_key: &str) -> Value {
        let mut rule = serde_json::Map::new();
        match rng.random_range(0..10) {
            0..2 => f.hit("rule: any peer (no from/to)"),
            2 => {
                rule.insert(peers_key.into(), json!([]));
                f.hit("rule: any peer (empty list)");
            }
            _ => {
                let n = rng.random_range(1..=3);
                if n > 1 {
                    f.hit("rule: multiple peers");
                }
                let peers: Vec<Value> = (0..n).map(|_| self.random_peer(rng, f)).collect();
                rule.insert(peers_key.into(), Value::Array(peers));
            }
        }
        if rng.random_bool(0.3) {
            f.hit("rule: no ports (all protocols)");
        } else {
            let ports: Vec<Value> = (0..rng.random_range(1..=3))
                .map(|_| random_port(rng, f))
                .collect();
            rule.insert("ports".into(), Value::Array(ports));
        }
        Value::Object(rule)
    }

    fn random_peer(&self, rng: &mut SmallRng, f: &mut Features) -> Value {
        match rng.random_range(0..10) {
            0..3 => {
                f.hit("peer: podSelector only");
                json!({"podSelector": selector(rng, f, &POD_KEYS)})
            }
            3..5 => {
                f.hit("peer: namespaceSelector only");
                json!({"namespaceSelector": selector(rng, f, &NS_KEYS)})
            }
            5..7 => {
                f.hit("peer: podSelector AND namespaceSelector");
                json!({"podSelector": selector(rng, f, &POD_KEYS), "namespaceSelector": selector(rng, f, &NS_KEYS)})
            }
            _ => json!({"ipBlock": self.random_block(rng, f)}),
        }
    }

    /// Pod and node addresses of one family.
    fn anchors(&self, v6: bool) -> Vec<IpAddr> {
        self.pods
            .iter()
            .flat_map(|p| p.ips.iter())
            .chain(self.nodes.iter().flat_map(|n| n.ips.iter()))
            .filter(|ip| ip.is_ipv6() == v6)
            .copied()
            .collect()
    }

    fn random_block(&self, rng: &mut SmallRng, f: &mut Features) -> Value {
        let v6 = rng.random_bool(0.4);
        let max: u8 = if v6 { 128 } else { 32 };
        let anchors = self.anchors(v6);
        let Prefix {
            anchor,
            len,
            text,
            host_bits,
        } = random_prefix(rng, &anchors, v6);
        f.hit(if v6 { "ipBlock: IPv6" } else { "ipBlock: IPv4" });
        if len == 0 {
            f.hit("ipBlock: all addresses (/0)");
        }
        if host_bits {
            f.hit("ipBlock: host bits set (normalised)");
        }
        let mut block = json!({ "cidr": text });
        if len < max && rng.random_bool(0.5) {
            let inside: Vec<IpAddr> = anchors
                .iter()
                .copied()
                .filter(|a| mask(*a, len) == mask(anchor, len))
                .collect();
            let except: Vec<String> = (0..rng.random_range(1..=2))
                .map(|_| {
                    let a = *inside.choose(rng).expect("anchor is inside");
                    let l = rng.random_range(len + 1..=max);
                    format!("{}/{l}", mask(a, l))
                })
                .collect();
            f.hit("ipBlock: with except");
            block["except"] = json!(except);
        }
        block
    }

    fn add_cluster_policy(&mut self, rng: &mut SmallRng, f: &mut Features) {
        let n = self.next_cluster_policy;
        self.next_cluster_policy += 1;
        let p = self.random_cluster_policy(rng, f, &format!("cnp{n}"));
        self.cluster_policies.push(p);
    }

    fn random_cluster_policy(&self, rng: &mut SmallRng, f: &mut Features, name: &str) -> Value {
        let tier = if rng.random_bool(0.5) {
            f.hit("cnp: Admin tier");
            "Admin"
        } else {
            f.hit("cnp: Baseline tier");
            "Baseline"
        };
        let priority = *CNP_PRIORITIES.choose(rng).expect("priorities");
        let mut spec = json!({
            "tier": tier,
            "priority": priority,
            "subject": self.cnp_subject(rng, f),
        });
        for (dir, egress) in [("ingress", false), ("egress", true)] {
            if rng.random_bool(0.2) {
                f.hit("cnp: direction without rules");
                continue;
            }
            let rules: Vec<Value> = (0..rng.random_range(1..=4))
                .map(|_| self.random_cnp_rule(rng, f, egress))
                .collect();
            if rules.len() > 1 {
                f.hit("cnp: several rules in one direction");
            }
            spec[dir] = Value::Array(rules);
        }
        json!({
            "apiVersion": cnp_api::API_VERSION,
            "kind": cnp_api::KIND,
            "metadata": {"name": name},
            "spec": spec,
        })
    }

    fn cnp_subject(&self, rng: &mut SmallRng, f: &mut Features) -> Value {
        if rng.random_bool(0.5) {
            f.hit("cnp subject: namespaces");
            json!({"namespaces": self.cnp_ns_selector(rng, f)})
        } else {
            f.hit("cnp subject: pods");
            json!({"pods": {
                "namespaceSelector": self.cnp_ns_selector(rng, f),
                "podSelector": selector(rng, f, &POD_KEYS),
            }})
        }
    }

    /// Cluster policies name namespaces by selector only, often by the name label the API
    /// server sets.
    fn cnp_ns_selector(&self, rng: &mut SmallRng, f: &mut Features) -> Value {
        if rng.random_bool(0.15) {
            f.hit("cnp selector: namespace name label");
            let ns = &self.namespaces.choose(rng).expect("namespaces").name;
            return json!({"matchLabels": {NAMESPACE_NAME_LABEL: ns}});
        }
        selector(rng, f, &NS_KEYS)
    }

    fn random_cnp_rule(&self, rng: &mut SmallRng, f: &mut Features, egress: bool) -> Value {
        let action = *CNP_ACTIONS.choose(rng).expect("actions");
        f.hit(match action {
            "Accept" => "cnp rule: Accept",
            "Deny" => "cnp rule: Deny",
            _ => "cnp rule: Pass",
        });
        let mut rule = serde_json::Map::new();
        if rng.random_bool(0.3) {
            rule.insert(
                "name".into(),
                json!(format!("rule-{}", rng.random_range(0..10))),
            );
        }
        rule.insert("action".into(), json!(action));
        let peers: Vec<Value> = (0..rng.random_range(1..=3))
            .map(|_| self.random_cnp_peer(rng, f, egress))
            .collect();
        if peers.len() > 1 {
            f.hit("cnp rule: several peers");
        }
        // The API refuses a named port beside a `networks` or `nodes` peer (no pod, no port
        // names).
        let named_ok = !peers
            .iter()
            .any(|p| p.get("networks").is_some() || p.get("nodes").is_some());
        rule.insert(
            (if egress { "to" } else { "from" }).into(),
            Value::Array(peers),
        );
        if rng.random_bool(0.3) {
            f.hit("cnp rule: no protocols (all traffic)");
        } else {
            let protocols: Vec<Value> = (0..rng.random_range(1..=3))
                .map(|_| random_protocol_match(rng, f, named_ok))
                .collect();
            rule.insert("protocols".into(), Value::Array(protocols));
        }
        Value::Object(rule)
    }

    fn random_cnp_peer(&self, rng: &mut SmallRng, f: &mut Features, egress: bool) -> Value {
        // Rare: a fail-closed Deny or Pass matches everything and hides the rules after it.
        if rng.random_bool(0.012) {
            f.hit("cnp peer: unknown kind (fail closed)");
            return unknown_peer(rng);
        }
        match rng.random_range(0..100) {
            0..35 => {
                f.hit("cnp peer: namespaces");
                json!({"namespaces": self.cnp_ns_selector(rng, f)})
            }
            35..65 if egress => self.random_networks(rng, f),
            65..77 if egress => {
                f.hit("cnp peer: nodes");
                json!({"nodes": selector(rng, f, &NODE_KEYS)})
            }
            _ => {
                f.hit("cnp peer: pods");
                json!({"pods": {
                    "namespaceSelector": self.cnp_ns_selector(rng, f),
                    "podSelector": selector(rng, f, &POD_KEYS),
                }})
            }
        }
    }

    /// A `networks` peer around pod and node addresses or, now and then, addresses no pod has.
    fn random_networks(&self, rng: &mut SmallRng, f: &mut Features) -> Value {
        let cidrs: Vec<String> = (0..rng.random_range(1..=2))
            .map(|_| {
                let v6 = rng.random_bool(0.4);
                let anchors = if rng.random_bool(0.3) {
                    outsiders(v6)
                } else {
                    self.anchors(v6)
                };
                let prefix = random_prefix(rng, &anchors, v6);
                if prefix.host_bits {
                    f.hit("cnp networks: host bits set (normalised)");
                }
                prefix.text
            })
            .collect();
        let nets: Vec<ipnet::IpNet> = cidrs
            .iter()
            .map(|c| c.parse().expect("generated CIDR"))
            .collect();
        let covers_pod = self
            .pods
            .iter()
            .flat_map(|p| &p.ips)
            .any(|ip| nets.iter().any(|n| n.contains(ip)));
        f.hit(if covers_pod {
            "cnp peer: networks covering a pod address"
        } else {
            "cnp peer: networks covering no pod address"
        });
        json!({ "networks": cidrs })
    }

    /// Random edits: labels, ports, pods and policies of both kinds come and go. Nodes may be
    /// relabelled; they stay, with their addresses, unless `nodes` is set (the evaluator judges
    /// policy, not whether a node enforces it).
    pub fn mutate(&mut self, rng: &mut SmallRng, f: &mut Features, nodes: bool) {
        for _ in 0..rng.random_range(1..=4) {
            let op = rng.random_range(0..18);
            // Relabels are what moves pods in and out of cluster policy subjects.
            let relabel = matches!(op, 0 | 1 | 9 | 10);
            let before = relabel.then(|| self.subject_selection());
            self.mutate_one(rng, f, op, nodes);
            if before.is_some_and(|b| b != self.subject_selection()) {
                f.hit("mutation: relabel changed a cnp subject's pods");
            }
        }
    }

    fn mutate_one(&mut self, rng: &mut SmallRng, f: &mut Features, op: u32, nodes: bool) {
        match op {
            0 if !self.pods.is_empty() => {
                let i = rng.random_range(0..self.pods.len());
                self.pods[i].labels = random_labels(rng, &POD_KEYS);
                f.hit("mutation: pod relabelled");
            }
            1 => {
                let i = rng.random_range(0..self.namespaces.len());
                self.namespaces[i].labels = random_labels(rng, &NS_KEYS);
                f.hit("mutation: namespace relabelled");
            }
            2 if !self.pods.is_empty() => {
                let i = rng.random_range(0..self.pods.len());
                self.pods[i].ports = random_ports(rng);
                f.hit("mutation: pod ports changed");
            }
            3 if !self.pods.is_empty() => {
                let i = rng.random_range(0..self.pods.len());
                self.pods.remove(i);
                f.hit("mutation: pod deleted");
            }
            4 => {
                self.add_pod(rng, f);
                f.hit("mutation: pod added");
            }
            5 if !self.policies.is_empty() => {
                let i = rng.random_range(0..self.policies.len());
                let ns = self.policies[i]["metadata"]["namespace"]
                    .as_str()
                    .expect("ns")
                    .to_string();
                let name = self.policies[i]["metadata"]["name"]
                    .as_str()
                    .expect("name")
                    .to_string();
                self.policies[i] = self.random_policy(rng, f, &ns, &name);
                f.hit("mutation: policy updated");
            }
            6 if !self.policies.is_empty() => {
                let i = rng.random_range(0..self.policies.len());
                self.policies.remove(i);
                f.hit("mutation: policy deleted");
            }
            7 => {
                self.add_policy(rng, f);
                f.hit("mutation: policy added");
            }
            8 if !self.pods.is_empty() => {
                let i = rng.random_range(0..self.pods.len());
                let p = &mut self.pods[i];
                if !p.host_network {
                    p.terminal = !p.terminal;
                    f.hit("mutation: pod phase changed");
                }
            }
            9 => {
                let i = rng.random_range(0..self.namespaces.len());
                self.namespaces[i].labels.clear();
                f.hit("mutation: namespace labels cleared");
            }
            10 => {
                let i = rng.random_range(0..self.namespaces.len());
                self.namespaces[i].present = !self.namespaces[i].present;
                f.hit("mutation: namespace object deleted or restored");
            }
            11 if !self.pods.is_empty() => {
                let i = rng.random_range(0..self.pods.len());
                let node = self.nodes.choose(rng).expect("nodes").clone();
                let p = &mut self.pods[i];
                p.node = node.name;
                if p.host_network {
                    p.ips = node.ips;
                }
                f.hit("mutation: pod moved to another node");
            }
            12 if !self.pods.is_empty() => {
                let i = rng.random_range(0..self.pods.len());
                let p = &mut self.pods[i];
                if !p.host_network && !p.ips.is_empty() {
                    // Swap to an unused address of the same shape.
                    let n = 1000 + self.next_pod;
                    self.next_pod += 1;
                    for ip in &mut p.ips {
                        *ip = match ip {
                            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(
                                10,
                                0,
                                (n / 200) as u8,
                                (n % 200) as u8 + 1,
                            )),
                            IpAddr::V6(_) => {
                                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n as u16 + 1))
                            }
                        };
                    }
                    f.hit("mutation: pod address changed");
                }
            }
            13 if nodes => {
                if rng.random_bool(0.5) && self.nodes.len() > 1 {
                    let i = rng.random_range(0..self.nodes.len());
                    let gone = self.nodes.remove(i);
                    self.pods.retain(|p| p.node != gone.name);
                    f.hit("mutation: node deleted with its pods");
                } else if let Some(n) = self.nodes.choose_mut(rng) {
                    if let IpAddr::V4(a) = n.ips[0] {
                        n.ips[0] = IpAddr::V4(Ipv4Addr::from(u32::from(a) + 100));
                    }
                    f.hit("mutation: node address changed");
                }
            }
            14 if !self.cluster_policies.is_empty() => {
                let i = rng.random_range(0..self.cluster_policies.len());
                self.update_cluster_policy(rng, f, i);
            }
            15 if !self.cluster_policies.is_empty() => {
                let i = rng.random_range(0..self.cluster_policies.len());
                self.cluster_policies.remove(i);
                f.hit("mutation: cnp deleted");
            }
            16 => {
                self.add_cluster_policy(rng, f);
                f.hit("mutation: cnp added");
            }
            // Moves the Node in or out of `nodes` peers; it enforces the same either way.
            17 => {
                let n = self.nodes.choose_mut(rng).expect("nodes");
                n.labels = random_labels(rng, &NODE_KEYS);
                f.hit("mutation: node relabelled");
            }
            _ => {}
        }
    }

    /// Rewrites cluster policy `i`, or moves it alone: a new priority reorders it among its
    /// tier, a new tier moves every rule across the NetworkPolicy tier.
    fn update_cluster_policy(&mut self, rng: &mut SmallRng, f: &mut Features, i: usize) {
        let p = &mut self.cluster_policies[i];
        match rng.random_range(0..3) {
            0 => {
                p["spec"]["priority"] = json!(CNP_PRIORITIES.choose(rng).expect("priorities"));
                f.hit("mutation: cnp priority changed");
            }
            1 => {
                let flipped = if p["spec"]["tier"] == "Admin" {
                    "Baseline"
                } else {
                    "Admin"
                };
                p["spec"]["tier"] = json!(flipped);
                f.hit("mutation: cnp tier changed");
            }
            _ => {
                let name = p["metadata"]["name"].as_str().expect("name").to_string();
                self.cluster_policies[i] = self.random_cluster_policy(rng, f, &name);
                f.hit("mutation: cnp rewritten");
            }
        }
    }

    /// The cluster policies as Moat parses them (generators only produce valid ones).
    fn parsed_cluster_policies(&self) -> Vec<ClusterPolicy> {
        self.cluster_policies
            .iter()
            .map(|v| {
                let o = K8sObject::ClusterNetworkPolicy(k8s(v.clone()));
                match crate::model::parse::object_with(&o, &super::PARSE)
                    .expect("generated object is valid")
                    .value
                {
                    Object::ClusterPolicy(p) => p,
                    other => unreachable!("a ClusterNetworkPolicy parsed as {other:?}"),
                }
            })
            .collect()
    }

    /// (policy, namespace, pod) for every pod a cluster policy's subject selects.
    fn subject_selection(&self) -> BTreeSet<(String, String, String)> {
        let mut out = BTreeSet::new();
        for cp in self.parsed_cluster_policies() {
            for p in self.pods.iter().filter(|p| p.is_endpoint()) {
                let ns = self.ns_labels(&p.namespace);
                let selected = match &cp.subject {
                    Subject::Namespaces(n) => n.matches(&ns),
                    Subject::Pods { namespaces, pods } => {
                        namespaces.matches(&ns) && pods.matches(&p.labels)
                    }
                };
                if selected {
                    out.insert((cp.name.clone(), p.namespace.clone(), p.name.clone()));
                }
            }
        }
        out
    }

    /// A namespace's labels as the API server serves them, name label included (also for a
    /// namespace whose object is gone).
    fn ns_labels(&self, name: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .iter()
            .find(|n| n.present && n.name == name)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
        labels
    }

    /// The pod policy applies to at `ip`, if any.
    fn endpoint_at(&self, ip: IpAddr) -> Option<&GenPod> {
        self.pods
            .iter()
            .find(|p| p.is_endpoint() && p.ips.contains(&ip))
    }

    pub fn objects(&self) -> Vec<K8sObject> {
        let mut out = Vec::new();
        for n in &self.nodes {
            let addrs: Vec<Value> = n
                .ips
                .iter()
                .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
                .collect();
            out.push(K8sObject::Node(k8s(json!({
                "metadata": {"name": n.name, "labels": n.labels},
                "status": {"addresses": addrs},
            }))));
        }
        for n in self.namespaces.iter().filter(|n| n.present) {
            out.push(K8sObject::Namespace(k8s(json!({
                "metadata": {"name": n.name, "labels": n.labels},
            }))));
        }
        for p in &self.pods {
            let ports: Vec<Value> = p
                .ports
                .iter()
                .map(|(name, proto, port)| json!({"name": name, "protocol": proto, "containerPort": port}))
                .collect();
            let ips: Vec<Value> = p
                .ips
                .iter()
                .map(|ip| json!({"ip": ip.to_string()}))
                .collect();
            out.push(K8sObject::Pod(k8s(json!({
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                "spec": {"nodeName": p.node, "hostNetwork": p.host_network,
                         "containers": [{"name": "main", "ports": ports}]},
                "status": {"phase": if p.terminal { "Succeeded" } else { "Running" }, "podIPs": ips},
            }))));
        }
        for p in &self.policies {
            out.push(K8sObject::NetworkPolicy(k8s(p.clone())));
        }
        for p in &self.cluster_policies {
            out.push(K8sObject::ClusterNetworkPolicy(k8s(p.clone())));
        }
        out
    }

    /// Addresses worth probing: pods, nodes, and outsiders (inside and outside pod ranges).
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .chain(self.nodes.iter().flat_map(|n| n.ips.iter().copied()))
            .chain(outsiders(false))
            .chain(outsiders(true))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// The kind of one `ClusterNetworkPolicy` peer, as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerKind {
    Namespaces,
    Pods,
    Networks,
    Nodes,
}

/// One cluster policy rule: Moat's reading, and what its JSON says the parser cannot show.
struct RuleView {
    /// `None` when the rule fails closed (then its peers no longer say what matched).
    rule: Option<Rule>,
    /// The written kind of each of `rule`'s peers (a `networks` peer gives one per CIDR).
    kinds: Vec<PeerKind>,
    /// What made the rule fail closed, if anything did.
    fail_closed: Option<&'static str>,
}

/// Says what decided each side of a flow, as coverage counters: the tier and action, and for
/// a cluster policy rule the kinds of its peers that matched and whether a named port
/// resolved. Built once per world, since it parses the cluster policies.
pub struct Attribution<'w> {
    world: &'w World,
    /// By (policy, egress, rule index).
    rules: BTreeMap<(String, bool, usize), RuleView>,
}

impl World {
    pub fn attribution(&self) -> Attribution<'_> {
        let mut rules = BTreeMap::new();
        for (json, parsed) in self
            .cluster_policies
            .iter()
            .zip(self.parsed_cluster_policies())
        {
            for (egress, dir, model) in [
                (false, "ingress", &parsed.ingress),
                (true, "egress", &parsed.egress),
            ] {
                let written = json["spec"][dir].as_array().map_or(&[][..], Vec::as_slice);
                for (i, (w, m)) in written.iter().zip(model).enumerate() {
                    rules.insert((parsed.name.clone(), egress, i), rule_view(w, m, egress));
                }
            }
        }
        Attribution { world: self, rules }
    }
}

fn rule_view(written: &Value, model: &crate::model::CnpRule, egress: bool) -> RuleView {
    let peers = written[if egress { "to" } else { "from" }]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let mut kinds = Vec::new();
    let mut unknown_peer = false;
    for p in peers {
        if p.get("namespaces").is_some() {
            kinds.push(PeerKind::Namespaces);
        } else if p.get("pods").is_some() {
            kinds.push(PeerKind::Pods);
        } else if p.get("nodes").is_some() {
            kinds.push(PeerKind::Nodes);
        } else if let Some(nets) = p.get("networks").and_then(Value::as_array) {
            kinds.extend(nets.iter().map(|_| PeerKind::Networks));
        } else {
            unknown_peer = true;
        }
    }
    let unknown_protocol = written["protocols"].as_array().is_some_and(|l| {
        l.iter().any(|m| {
            ["tcp", "udp", "sctp", "destinationNamedPort"]
                .iter()
                .all(|k| m.get(k).is_none())
        })
    });
    let fail_closed = if unknown_peer {
        Some("peer: unknown kind (fail closed)")
    } else if unknown_protocol {
        Some("protocol: unknown kind (fail closed)")
    } else {
        None
    };
    RuleView {
        rule: model.rule.clone().filter(|_| fail_closed.is_none()),
        kinds,
        fail_closed,
    }
}

impl Attribution<'_> {
    /// Counts what decided each side of `v`, the evaluator's verdict on `flow`.
    pub fn count(&self, flow: &Flow, v: &Verdict, c: &mut Features) {
        self.count_side(flow, &v.egress, true, c);
        self.count_side(flow, &v.ingress, false, c);
    }

    fn count_side(&self, flow: &Flow, side: &Side, egress: bool, c: &mut Features) {
        for r in &side.passed {
            self.count_cluster_rule(flow, r, egress, c);
        }
        match &side.reason {
            Reason::Cluster(r) => self.count_cluster_rule(flow, r, egress, c),
            Reason::AllowedBy(_) => c.hit("decided: NetworkPolicy allow"),
            Reason::DeniedBy(_) => c.hit("decided: NetworkPolicy deny"),
            // Also where a Baseline Pass handed over: that is the default allow.
            Reason::NotIsolated => c.hit("decided: default allow"),
            Reason::NotAPod | Reason::NodeLocal => c.hit("decided: not a pod, or node-local"),
        }
    }

    fn count_cluster_rule(&self, flow: &Flow, r: &ClusterRuleRef, egress: bool, c: &mut Features) {
        c.hit(match (r.tier.as_str(), r.action.as_str()) {
            ("Admin", "Accept") => "decided: Admin Accept",
            ("Admin", "Deny") => "decided: Admin Deny",
            ("Admin", "Pass") => "decided: Admin Pass",
            ("Baseline", "Accept") => "decided: Baseline Accept",
            ("Baseline", "Deny") => "decided: Baseline Deny",
            ("Baseline", "Pass") => "decided: Baseline Pass",
            other => panic!("unknown tier and action {other:?}"),
        });
        let view = self
            .rules
            .get(&(r.policy.clone(), egress, r.index))
            .unwrap_or_else(|| panic!("the verdict names a rule the world lacks: {r}"));
        if let Some(why) = view.fail_closed {
            c.hit(why);
            return;
        }
        let Some(rule) = &view.rule else {
            return;
        };
        let peer = if egress { flow.dst } else { flow.src };
        let mut matched: Vec<PeerKind> = rule
            .peers
            .iter()
            .zip(&view.kinds)
            .filter(|(p, _)| self.peer_matches(p, peer))
            .map(|(_, k)| *k)
            .collect();
        matched.dedup();
        for k in matched {
            c.hit(match k {
                PeerKind::Namespaces => "peer: namespaces",
                PeerKind::Pods => "peer: pods",
                PeerKind::Networks => "peer: networks",
                PeerKind::Nodes => "peer: nodes",
            });
        }
        if self.named_port_resolves(&rule.ports, flow) {
            c.hit("port: named port resolved");
        }
    }

    fn peer_matches(&self, p: &Peer, ip: IpAddr) -> bool {
        match p {
            Peer::Block(b) => b.contains(ip),
            Peer::Nodes(sel) => self
                .world
                .nodes
                .iter()
                .any(|n| sel.matches(&n.labels) && n.ips.contains(&ip)),
            Peer::Pods { namespaces, pods } => self.world.endpoint_at(ip).is_some_and(|q| {
                namespaces
                    .as_ref()
                    .is_none_or(|n| n.matches(&self.world.ns_labels(&q.namespace)))
                    && pods.matches(&q.labels)
            }),
        }
    }

    /// Whether one of `ports`' named ports is the flow's destination port on its
    /// destination pod.
    fn named_port_resolves(&self, ports: &[PortSpec], flow: &Flow) -> bool {
        let Some(dst) = self.world.endpoint_at(flow.dst) else {
            return false;
        };
        ports.iter().any(|p| match p {
            PortSpec::Named { proto, name } => {
                proto.number() == flow.proto
                    && dst.ports.iter().any(|(n, pr, port)| {
                        n == name && Protocol::parse(pr) == Some(*proto) && *port == flow.port
                    })
            }
            _ => false,
        })
    }
}

fn random_labels(rng: &mut SmallRng, keys: &[&str]) -> BTreeMap<String, String> {
    keys.iter()
        .filter_map(|k| {
            if rng.random_bool(0.6) {
                Some((
                    k.to_string(),
                    VALUES.choose(rng).expect("values").to_string(),
                ))
            } else {
                None
            }
        })
        .collect()
}

fn random_ports(rng: &mut SmallRng) -> Vec<(String, &'static str, u16)> {
    PORT_NAMES
        .iter()
        .filter_map(|n| {
            if !rng.random_bool(0.6) {
                return None;
            }
            let proto = if rng.random_bool(0.6) {
                "TCP"
            } else {
                PROTOS.choose(rng).expect("protos")
            };
            Some((n.to_string(), proto, *PORTS.choose(rng).expect("ports")))
        })
        .collect()
}

fn selector(rng: &mut SmallRng, f: &mut Features, keys: &[&str]) -> Value {
    if rng.random_bool(0.25) {
        f.hit("selector: empty (everything)");
        return json!({});
    }
    let mut sel = serde_json::Map::new();
    let labels: BTreeMap<String, String> = keys
        .iter()
        .filter_map(|k| {
            if rng.random_bool(0.35) {
                Some((
                    k.to_string(),
                    VALUES.choose(rng).expect("values").to_string(),
                ))
            } else {
                None
            }
        })
        .collect();
    if !labels.is_empty() {
        f.hit("selector: matchLabels");
        sel.insert("matchLabels".into(), json!(labels));
    }
    let mut exprs = Vec::new();
    for _ in 0..rng.random_range(0..=2) {
        // "zone" never appears on objects: exercises absent keys.
        let key = if rng.random_bool(0.2) {
            "zone"
        } else {
            keys.choose(rng).expect("keys")
        };
        let values: Vec<&str> = VALUES
            .iter()
            .copied()
            .filter(|_| rng.random_bool(0.5))
            .collect();
        let values = if values.is_empty() { vec!["a"] } else { values };
        let e = match rng.random_range(0..4) {
            0 => {
                f.hit("selector: In");
                json!({"key": key, "operator": "In", "values": values})
            }
            1 => {
                f.hit(if key == "zone" {
                    "selector: NotIn on an absent key"
                } else {
                    "selector: NotIn"
                });
                json!({"key": key, "operator": "NotIn", "values": values})
            }
            2 => {
                f.hit("selector: Exists");
                json!({"key": key, "operator": "Exists"})
            }
            _ => {
                f.hit("selector: DoesNotExist");
                json!({"key": key, "operator": "DoesNotExist"})
            }
        };
        exprs.push(e);
    }
    if !exprs.is_empty() {
        sel.insert("matchExpressions".into(), Value::Array(exprs));
    }
    Value::Object(sel)
}

fn random_port(rng: &mut SmallRng, f: &mut Features) -> Value {
    let mut p = serde_json::Map::new();
    let proto = match rng.random_range(0..5) {
        0 => {
            f.hit("port: protocol omitted (TCP)");
            None
        }
        1 | 2 => Some("TCP"),
        3 => {
            f.hit("port: UDP");
            Some("UDP")
        }
        _ => {
            f.hit("port: SCTP");
            Some("SCTP")
        }
    };
    if let Some(proto) = proto {
        p.insert("protocol".into(), json!(proto));
    }
    match rng.random_range(0..20) {
        0..6 => {
            p.insert("port".into(), json!(PORTS.choose(rng).expect("ports")));
            f.hit("port: number");
        }
        6..10 => {
            let first = *PORTS.choose(rng).expect("ports");
            p.insert("port".into(), json!(first));
            p.insert("endPort".into(), json!(first + rng.random_range(0..=10)));
            f.hit("port: endPort range");
        }
        10..13 => f.hit("port: protocol only (all ports)"),
        _ => {
            p.insert("port".into(), json!(PORT_NAMES.choose(rng).expect("names")));
            f.hit("port: named");
        }
    }
    Value::Object(p)
}

/// A generated prefix and the address it was drawn around.
struct Prefix {
    anchor: IpAddr,
    len: u8,
    text: String,
    /// `text` keeps the anchor's host bits (the parser normalises them).
    host_bits: bool,
}

/// A prefix around one of `anchors` (all of family `v6`; a fixed address when empty).
fn random_prefix(rng: &mut SmallRng, anchors: &[IpAddr], v6: bool) -> Prefix {
    let max: u8 = if v6 { 128 } else { 32 };
    let anchor = anchors.choose(rng).copied().unwrap_or(if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))
    });
    let lens: &[u8] = if v6 {
        &[0, 8, 64, 112, 120, 128]
    } else {
        &[0, 8, 16, 24, 28, 32]
    };
    let len = *lens.choose(rng).expect("lens");
    let host_bits = len < max && rng.random_bool(0.1) && mask(anchor, len) != anchor;
    let text = if host_bits {
        format!("{anchor}/{len}")
    } else {
        format!("{}/{len}", mask(anchor, len))
    };
    Prefix {
        anchor,
        len,
        text,
        host_bits,
    }
}

fn outsiders(v6: bool) -> Vec<IpAddr> {
    OUTSIDERS
        .iter()
        .map(|s| s.parse::<IpAddr>().expect("literal"))
        .filter(|ip| ip.is_ipv6() == v6)
        .collect()
}

/// A peer of a kind this version does not know: nothing, or a field from a newer API (which
/// the types must ignore, not refuse).
fn unknown_peer(rng: &mut SmallRng) -> Value {
    if rng.random_bool(0.5) {
        json!({})
    } else {
        json!({"fromTheFuture": {"matchLabels": {"app": "a"}}})
    }
}

/// One `protocols` entry; `named_ok`: a `destinationNamedPort` is allowed.
fn random_protocol_match(rng: &mut SmallRng, f: &mut Features, named_ok: bool) -> Value {
    if rng.random_bool(0.008) {
        f.hit("cnp protocol: unknown kind (fail closed)");
        return json!({});
    }
    match rng.random_range(0..100) {
        0..30 if named_ok => {
            f.hit("cnp protocol: destinationNamedPort");
            json!({"destinationNamedPort": PORT_NAMES.choose(rng).expect("names")})
        }
        _ => {
            let key = match rng.random_range(0..4) {
                0 | 1 => "tcp",
                2 => "udp",
                _ => "sctp",
            };
            let first = *PORTS.choose(rng).expect("ports");
            let port = if rng.random_bool(0.35) {
                f.hit("cnp protocol: port range");
                json!({"range": {"start": first, "end": first + rng.random_range(1..=10)}})
            } else {
                f.hit("cnp protocol: port number");
                json!({ "number": first })
            };
            f.hit(match key {
                "tcp" => "cnp protocol: tcp",
                "udp" => "cnp protocol: udp",
                _ => "cnp protocol: sctp",
            });
            json!({key: {"destinationPort": port}})
        }
    }
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{self, Cluster};

    /// Two pods in one namespace under one Admin policy: egress denies pod1's address by
    /// `networks` and accepts pods labelled app=a on the named port `http`; ingress passes
    /// everything through a peer of an unknown kind.
    fn world() -> World {
        let pod = |name: &str, app: &str, ip: &str, ports| GenPod {
            namespace: "ns0".into(),
            name: name.into(),
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            node: "node-0".into(),
            ips: vec![ip.parse().expect("literal")],
            ports,
            host_network: false,
            terminal: false,
        };
        World {
            namespaces: vec![GenNamespace {
                name: "ns0".into(),
                labels: BTreeMap::new(),
                present: true,
            }],
            nodes: vec![GenNode {
                name: "node-0".into(),
                ips: vec!["192.168.0.1".parse().expect("literal")],
                labels: BTreeMap::new(),
            }],
            pods: vec![
                pod("pod0", "a", "10.0.0.1", vec![("http".into(), "UDP", 80)]),
                pod("pod1", "b", "10.0.0.2", Vec::new()),
            ],
            cluster_policies: vec![json!({
                "metadata": {"name": "cnp0"},
                "spec": {
                    "tier": "Admin",
                    "priority": 0,
                    "subject": {"namespaces": {}},
                    "egress": [
                        {"action": "Deny", "to": [{"networks": ["10.0.0.2/32"]}]},
                        {"action": "Accept",
                         "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}}],
                         "protocols": [{"destinationNamedPort": "http"}]},
                    ],
                    "ingress": [{"action": "Pass", "from": [{}]}],
                },
            })],
            ..World::default()
        }
    }

    fn counted(w: &World, src: &str, dst: &str, proto: u8, port: u16) -> Vec<(&'static str, u64)> {
        let flow = Flow {
            src: src.parse().expect("literal"),
            dst: dst.parse().expect("literal"),
            proto,
            port,
        };
        let v = eval::verdict(&Cluster::from_objects(w.objects()), &flow);
        let mut c = Features::default();
        w.attribution().count(&flow, &v, &mut c);
        c.iter().collect()
    }

    #[test]
    fn attribution_names_the_tier_action_peer_kind_and_named_port() {
        let w = world();
        assert_eq!(
            counted(&w, "10.0.0.1", "10.0.0.2", 6, 80),
            // The ingress Pass with an unknown peer is "a 'Deny all' rule" (fail closed).
            vec![
                ("decided: Admin Deny", 2),
                ("peer: networks", 1),
                ("peer: unknown kind (fail closed)", 1),
            ]
        );
        assert_eq!(
            counted(&w, "10.0.0.2", "10.0.0.1", 17, 80),
            vec![
                ("decided: Admin Accept", 1),
                ("decided: Admin Deny", 1),
                ("peer: pods", 1),
                ("peer: unknown kind (fail closed)", 1),
                ("port: named port resolved", 1),
            ]
        );
        // The named port is UDP: over TCP nothing resolves, and nothing else matches.
        assert_eq!(
            counted(&w, "10.0.0.2", "10.0.0.1", 6, 80),
            vec![
                ("decided: Admin Deny", 1),
                ("decided: default allow", 1),
                ("peer: unknown kind (fail closed)", 1),
            ]
        );
    }
}
