//! Small random clusters that exercise every NetworkPolicy feature.
//!
//! Vocabularies are tiny on purpose, so selectors hit and miss often, the same port name
//! resolves differently on different pods, and ipBlocks overlap pod addresses.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rand::Rng;
use rand::rngs::SmallRng;
use rand::seq::{IndexedMutRandom, IndexedRandom};
use serde_json::{Value, json};

use super::k8s;
use crate::model::K8sObject;

const POD_KEYS: [&str; 3] = ["app", "tier", "env"];
const NS_KEYS: [&str; 2] = ["env", "team"];
const VALUES: [&str; 3] = ["a", "b", "c"];
const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];
const PORTS: [u16; 5] = [53, 80, 81, 8080, 9090];
const PROTOS: [&str; 3] = ["TCP", "UDP", "SCTP"];

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

/// A generated cluster, kept as plain data so it can be mutated and rendered again.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub namespaces: Vec<GenNamespace>,
    pub nodes: Vec<GenNode>,
    pub pods: Vec<GenPod>,
    /// NetworkPolicy manifests as JSON.
    pub policies: Vec<Value>,
    next_pod: u32,
    next_policy: u32,
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
        for _ in 0..rng.random_range(1..=5) {
            w.add_policy(rng, f);
        }
        w
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

    fn random_block(&self, rng: &mut SmallRng, f: &mut Features) -> Value {
        let v6 = rng.random_bool(0.4);
        let max: u8 = if v6 { 128 } else { 32 };
        let anchors: Vec<IpAddr> = self
            .pods
            .iter()
            .flat_map(|p| p.ips.iter())
            .chain(self.nodes.iter().flat_map(|n| n.ips.iter()))
            .filter(|ip| ip.is_ipv6() == v6)
            .copied()
            .collect();
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
        f.hit(if v6 { "ipBlock: IPv6" } else { "ipBlock: IPv4" });
        if len == 0 {
            f.hit("ipBlock: all addresses (/0)");
        }
        let host_bits = len < max && rng.random_bool(0.1);
        let cidr = if host_bits {
            f.hit("ipBlock: host bits set (normalised)");
            format!("{anchor}/{len}")
        } else {
            format!("{}/{len}", mask(anchor, len))
        };
        let mut block = json!({"cidr": cidr});
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

    /// Random edits: labels, ports, pods and policies come and go. Nodes stay unless
    /// `nodes` is set (the evaluator judges policy, not whether a node enforces it).
    pub fn mutate(&mut self, rng: &mut SmallRng, f: &mut Features, nodes: bool) {
        for _ in 0..rng.random_range(1..=4) {
            match rng.random_range(0..if nodes { 14 } else { 13 }) {
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
                                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(
                                    0xfd00,
                                    0,
                                    0,
                                    0,
                                    0,
                                    0,
                                    0,
                                    n as u16 + 1,
                                )),
                            };
                        }
                        f.hit("mutation: pod address changed");
                    }
                }
                13 => {
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
                _ => {}
            }
        }
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
                "metadata": {"name": n.name},
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
        out
    }

    /// Addresses worth probing: pods, nodes, and outsiders (inside and outside pod ranges).
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .chain(self.nodes.iter().flat_map(|n| n.ips.iter().copied()))
            .chain(
                ["10.0.0.250", "203.0.113.7", "fd00::fff0", "2001:db8::7"]
                    .iter()
                    .map(|s| s.parse().expect("literal")),
            )
            .collect();
        v.sort();
        v.dedup();
        v
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
