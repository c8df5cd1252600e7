//! Large clusters shaped like real ones, for benchmarks.
//!
//! Each namespace belongs to a team and an environment and runs a handful of apps
//! (deployments with replicas sharing a label set). Its policies mix what production clusters
//! carry: a default deny, DNS egress to kube-system, scraping from monitoring on a named port,
//! app-to-app allows within the namespace (numeric and named ports, matchExpressions), allows
//! from the same team's frontends in other namespaces, and egress to external CIDRs with
//! excepts. Deterministic for a given seed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::k8s;
use crate::model::K8sObject;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    pub nodes: usize,
    pub namespaces: usize,
    pub pods: usize,
    pub policies: usize,
}

impl Scale {
    /// 1,000 nodes / 300 namespaces / 30,000 pods / 3,000 policies.
    pub const MEDIUM: Scale = Scale {
        nodes: 1_000,
        namespaces: 300,
        pods: 30_000,
        policies: 3_000,
    };
    /// Antrea's published scale test: 100,000 pods and 75,000 policies (here on 5,000 nodes,
    /// 1,000 namespaces of 100 pods and 75 policies each).
    pub const ANTREA: Scale = Scale {
        nodes: 5_000,
        namespaces: 1_000,
        pods: 100_000,
        policies: 75_000,
    };

    /// The same shape at `percent` of the size (nodes, namespaces, pods and policies alike).
    pub fn percent(self, percent: usize) -> Scale {
        let f = |x: usize| (x * percent / 100).max(1);
        Scale {
            nodes: f(self.nodes),
            namespaces: f(self.namespaces),
            pods: f(self.pods),
            policies: f(self.policies),
        }
    }
}

const TIERS: [&str; 5] = ["frontend", "backend", "db", "cache", "worker"];
const ENVS: [&str; 3] = ["prod", "staging", "dev"];
const TEAMS: usize = 20;

pub fn pod_ip_v4(n: usize) -> IpAddr {
    let n = n as u32 + 1;
    IpAddr::V4(Ipv4Addr::new(
        10,
        64 + (n >> 16) as u8,
        (n >> 8) as u8,
        n as u8,
    ))
}

pub fn pod_ip_v6(n: usize) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(
        0xfd00_0000_0000_0000_0000_0000_0000_0000u128 | (n as u128 + 1),
    ))
}

pub fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// Streams the cluster's objects: nodes, then per namespace its Namespace, pods and
/// policies. Also emits `kube-system` (DNS) and `monitoring` (Prometheus).
pub fn generate(scale: Scale, seed: u64, mut emit: impl FnMut(K8sObject)) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for i in 0..scale.nodes {
        let v4 = IpAddr::V4(Ipv4Addr::new(
            172,
            16 + (i >> 16) as u8,
            (i >> 8) as u8,
            i as u8,
        ));
        emit(K8sObject::Node(k8s(json!({
            "metadata": {"name": node_name(i), "labels": {"kubernetes.io/hostname": node_name(i)}},
            "status": {"addresses": [{"type": "InternalIP", "address": v4.to_string()},
                                     {"type": "Hostname", "address": node_name(i)}]},
        }))));
    }
    let mut pod_no = 0usize;
    let mut pod = |rng: &mut SmallRng,
                   ns: &str,
                   name: String,
                   labels: Value,
                   ports: Value,
                   emit: &mut dyn FnMut(K8sObject)| {
        let ips = if pod_no.is_multiple_of(2) {
            json!([{"ip": pod_ip_v4(pod_no).to_string()}, {"ip": pod_ip_v6(pod_no).to_string()}])
        } else {
            json!([{"ip": pod_ip_v4(pod_no).to_string()}])
        };
        pod_no += 1;
        let node = node_name(rng.random_range(0..scale.nodes));
        emit(K8sObject::Pod(k8s(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.example/app:1", "ports": ports}]},
            "status": {"phase": "Running", "podIPs": ips},
        }))));
    };

    emit(namespace("kube-system", json!({})));
    for r in 0..2 {
        pod(
            &mut rng,
            "kube-system",
            format!("coredns-{r}"),
            json!({"k8s-app": "kube-dns"}),
            json!([{"name": "dns", "containerPort": 53, "protocol": "UDP"}, {"name": "dns-tcp", "containerPort": 53}]),
            &mut emit,
        );
    }
    emit(namespace("monitoring", json!({"team": "platform"})));
    for r in 0..2 {
        pod(
            &mut rng,
            "monitoring",
            format!("prometheus-{r}"),
            json!({"app": "prometheus"}),
            json!([{"name": "web", "containerPort": 9090}]),
            &mut emit,
        );
    }

    let pods_per_ns = scale.pods.div_ceil(scale.namespaces);
    let policies_per_ns = scale.policies.div_ceil(scale.namespaces);
    let apps = (pods_per_ns / 5).max(1);
    let (mut pods_left, mut policies_left) = (scale.pods, scale.policies);
    for i in 0..scale.namespaces {
        let ns = format!("ns-{i:05}");
        let team = format!("team-{}", i % TEAMS);
        emit(namespace(
            &ns,
            json!({"team": team, "env": ENVS[i % ENVS.len()]}),
        ));
        for p in 0..pods_per_ns.min(pods_left) {
            let app = p % apps;
            let tier = TIERS[app % TIERS.len()];
            let labels = json!({"app": format!("app-{app}"), "tier": tier, "version": format!("v{}", app % 3),
                                "pod-template-hash": format!("{:08x}", (i * 131 + app * 7919) as u32)});
            let mut ports = vec![
                json!({"name": "http", "containerPort": 8080}),
                json!({"name": "metrics", "containerPort": 9090}),
            ];
            if tier == "backend" {
                ports.push(json!({"name": "grpc", "containerPort": 9000 + (app % 4)}));
            }
            pod(
                &mut rng,
                &ns,
                format!("app-{app}-{p:04}"),
                labels,
                Value::Array(ports),
                &mut emit,
            );
        }
        pods_left = pods_left.saturating_sub(pods_per_ns);
        for k in 0..policies_per_ns.min(policies_left) {
            emit(K8sObject::NetworkPolicy(k8s(policy(&ns, &team, k, apps))));
        }
        policies_left = policies_left.saturating_sub(policies_per_ns);
    }
}

fn namespace(name: &str, labels: Value) -> K8sObject {
    K8sObject::Namespace(k8s(json!({"metadata": {"name": name, "labels": labels}})))
}

fn policy(ns: &str, team: &str, k: usize, apps: usize) -> Value {
    let meta = |name: String| json!({"name": name, "namespace": ns});
    let app = |j: usize| format!("app-{}", j % apps);
    match k {
        0 => json!({"metadata": meta("default-deny".into()),
                    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
        1 => json!({"metadata": meta("allow-dns".into()), "spec": {
            "podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
                       {"to": [{"podSelector": {}}]},
                       {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "169.254.169.254/32"]}}],
                        "ports": [{"port": 443}]}]}}),
        2 => json!({"metadata": meta("allow-monitoring".into()), "spec": {
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                                   "podSelector": {"matchLabels": {"app": "prometheus"}}}],
                         "ports": [{"port": "metrics"}]}]}}),
        _ => {
            let j = k - 3;
            let target = app(j);
            let peer = app(j + 1 + j / apps);
            let spec = match (j / apps) % 4 {
                0 => json!({"podSelector": {"matchLabels": {"app": target}},
                            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": peer}}}],
                                         "ports": [{"port": 8080}]}]}),
                1 => json!({"podSelector": {"matchLabels": {"app": target}},
                            "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                                            {"key": "tier", "operator": "In", "values": ["frontend", "backend"]}]}}],
                                         "ports": [{"port": "http"}, {"port": "grpc"}]}]}),
                2 => json!({"podSelector": {"matchLabels": {"app": target}},
                            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": team}},
                                                   "podSelector": {"matchLabels": {"tier": "frontend"}}},
                                                  {"ipBlock": {"cidr": "192.0.2.0/24"}}],
                                         "ports": [{"port": 8000, "endPort": 8100}]}]}),
                _ => {
                    json!({"podSelector": {"matchLabels": {"app": target}}, "policyTypes": ["Ingress", "Egress"],
                            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": peer}}},
                                                  {"namespaceSelector": {"matchExpressions": [
                                                      {"key": "env", "operator": "NotIn", "values": ["dev"]}]},
                                                   "podSelector": {"matchLabels": {"app": target}}}]}],
                            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": peer}}}], "ports": [{"port": "http"}]},
                                       {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.96.0.0/12"]}}],
                                        "ports": [{"port": 5432}]}]})
                }
            };
            json!({"metadata": meta(format!("app-policy-{k:03}")), "spec": spec})
        }
    }
}

/// Emits `admin` Admin-tier and `baseline` Baseline-tier ClusterNetworkPolicies for a cluster
/// from [`generate`] (any scale: they select by the labels it uses, never by name).
///
/// What a platform team writes over every tenant: subjects are broad (all namespaces, one or
/// two environments, half the teams, a tier across the cluster), as are many peers, and the
/// rules mix Accept, Deny and Pass, numeric ports, ranges, named ports and CIDRs in both
/// families. Peers come from a small vocabulary, as real admin policies share their notions
/// ("dev", "monitoring", "DNS"); a few priorities tie, which upstream allows. Deterministic.
pub fn cluster_policies(admin: usize, baseline: usize, mut emit: impl FnMut(K8sObject)) {
    for i in 0..admin {
        // Every 25th policy shares its predecessor's priority.
        let priority = if i % 25 == 24 { (i - 1) * 10 } else { i * 10 };
        let priority = priority.min(1000);
        let ingress: Vec<Value> = (0..1 + i % 3).map(|k| admin_ingress(i + k * 7)).collect();
        let egress: Vec<Value> = (0..1 + (i / 3) % 3)
            .map(|k| admin_egress(i + k * 5))
            .collect();
        emit(cnp(
            format!("admin-{i:03}"),
            "Admin",
            priority,
            cnp_subject(i),
            ingress,
            egress,
        ));
    }
    for i in 0..baseline {
        let (ingress, egress) = baseline_rules(i);
        emit(cnp(
            format!("baseline-{i:03}"),
            "Baseline",
            i * 50,
            cnp_subject(i + 3),
            ingress,
            egress,
        ));
    }
}

fn cnp(
    name: String,
    tier: &str,
    priority: usize,
    subject: Value,
    ingress: Vec<Value>,
    egress: Vec<Value>,
) -> K8sObject {
    K8sObject::ClusterNetworkPolicy(k8s(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {"tier": tier, "priority": priority, "subject": subject,
                 "ingress": ingress, "egress": egress},
    })))
}

fn teams(from: usize, n: usize) -> Value {
    json!(
        (0..n)
            .map(|k| format!("team-{}", (from + k) % TEAMS))
            .collect::<Vec<_>>()
    )
}

/// Between a fifth and all of the cluster's application pods; one in ten selects every pod.
fn cnp_subject(i: usize) -> Value {
    match i % 10 {
        0 => json!({"namespaces": {}}),
        1 => {
            json!({"namespaces": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "staging"]}]}})
        }
        2 => {
            json!({"namespaces": {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}]}})
        }
        3 => {
            json!({"namespaces": {"matchExpressions": [{"key": "team", "operator": "In", "values": teams(i, TEAMS / 2)}]}})
        }
        4 => json!({"namespaces": {"matchExpressions": [{"key": "team", "operator": "Exists"}]}}),
        5 => json!({"pods": {"namespaceSelector": {},
                             "podSelector": {"matchExpressions": [
                                 {"key": "tier", "operator": "In", "values": ["frontend", "backend"]}]}}}),
        6 => {
            json!({"pods": {"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": {}}})
        }
        7 => json!({"pods": {"namespaceSelector": {"matchExpressions": [
                                 {"key": "team", "operator": "In", "values": teams(i, 4)}]},
                             "podSelector": {"matchLabels": {"tier": "db"}}}}),
        8 => json!({"namespaces": {"matchLabels": {"env": "dev"}}}),
        _ => {
            json!({"namespaces": {"matchExpressions": [{"key": "team", "operator": "NotIn", "values": teams(i, 2)}]}})
        }
    }
}

fn action(i: usize) -> &'static str {
    ["Deny", "Accept", "Pass"][i % 3]
}

fn tcp(n: u16) -> Value {
    json!({"tcp": {"destinationPort": {"number": n}}})
}

fn tcp_range(start: u16, end: u16) -> Value {
    json!({"tcp": {"destinationPort": {"range": {"start": start, "end": end}}}})
}

fn admin_ingress(j: usize) -> Value {
    let env = |e: &str| json!({"namespaces": {"matchLabels": {"env": e}}});
    match j % 6 {
        0 => {
            json!({"action": "Deny", "from": [env("dev")], "protocols": [tcp(5432), tcp_range(6379, 6380)]})
        }
        1 => json!({"action": "Accept", "from": [{"pods": {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                        "podSelector": {"matchLabels": {"app": "prometheus"}}}}],
                    "protocols": [{"destinationNamedPort": "metrics"}]}),
        2 => {
            json!({"action": "Pass", "from": [{"namespaces": {"matchLabels": {"team": format!("team-{}", j % TEAMS)}}}]})
        }
        3 => {
            json!({"action": action(j / 6), "from": [{"namespaces": {}}], "protocols": [tcp_range(22, 23)]})
        }
        4 => json!({"action": "Accept", "from": [{"namespaces": {"matchExpressions": [
                        {"key": "env", "operator": "In", "values": ["prod", "staging"]}]}}],
                    "protocols": [tcp(8080), tcp_range(9000, 9003), {"destinationNamedPort": "http"}]}),
        _ => json!({"action": "Deny", "from": [{"pods": {"namespaceSelector": {},
                        "podSelector": {"matchLabels": {"tier": "worker"}}}}]}),
    }
}

fn admin_egress(j: usize) -> Value {
    let networks = |v: &[&str]| json!({"networks": v});
    match j % 6 {
        0 => json!({"action": "Accept", "to": [{"pods": {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}}],
                    "protocols": [{"udp": {"destinationPort": {"number": 53}}}, tcp(53)]}),
        1 => {
            json!({"action": "Deny", "to": [networks(&["169.254.169.254/32", "fd00:ec2::254/128"])]})
        }
        2 => json!({"action": "Pass", "to": [{"namespaces": {"matchLabels": {"env": "prod"}}}],
                    "protocols": [{"destinationNamedPort": "http"}]}),
        3 => json!({"action": action(j / 6), "to": [networks(&["10.0.0.0/8", "fd00::/8"])],
                    "protocols": [tcp_range(5432, 5439)]}),
        4 => {
            json!({"action": "Accept", "to": [networks(&["0.0.0.0/0", "::/0"])], "protocols": [tcp(443)]})
        }
        _ => json!({"action": "Deny", "to": [{"namespaces": {"matchLabels": {"env": "dev"}}}]}),
    }
}

/// Defaults where tenants wrote nothing: deny from everywhere but the namespace's own team,
/// no egress to the internet but DNS and HTTPS.
fn baseline_rules(i: usize) -> (Vec<Value>, Vec<Value>) {
    let team = json!({"namespaces": {"matchLabels": {"team": format!("team-{}", i % TEAMS)}}});
    let ingress = vec![
        json!({"action": "Accept", "from": [team]}),
        json!({"action": "Deny", "from": [{"namespaces": {}}]}),
    ];
    let egress = if i.is_multiple_of(2) {
        vec![
            admin_egress(0),
            admin_egress(4),
            json!({"action": "Deny", "to": [{"networks": ["0.0.0.0/0", "::/0"]}]}),
        ]
    } else {
        vec![
            json!({"action": "Accept", "to": [{"namespaces": {}}], "protocols": [{"destinationNamedPort": "http"}]}),
        ]
    };
    (ingress, egress)
}
