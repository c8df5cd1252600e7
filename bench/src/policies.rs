//! Policies of a chosen size for the dataplane benchmarks.

use std::net::Ipv4Addr;

use moat_policy::model::K8sObject;
use moat_policy::testkit::k8s;
use serde_json::{Value, json};

/// The address of filler peer `i`: 100.64.0.0/10, never used by any host of the benchmarks.
pub fn filler(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x6440_0000 + i as u32)
}

/// The address of group member `i`: 100.96.0.0/12, likewise unused.
pub fn member(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x6460_0000 + i as u32)
}

/// Filler rule `i`: one /32 peer, one port; TCP and UDP alternate. None of them matches the
/// measured traffic, so a linear list has to look at every one.
pub fn filler_rule(i: usize) -> (Ipv4Addr, &'static str, u16) {
    let proto = if i.is_multiple_of(2) { "TCP" } else { "UDP" };
    (filler(i), proto, 1024 + (i % 60_000) as u16)
}

/// A policy in `ns` selecting pods `selector` with `rules` filler ingress rules, one rule
/// whose peer group has `members` members (TCP 9000), and last, `allow` (a rule's JSON,
/// e.g. the one the measured traffic needs).
pub fn big(
    name: &str,
    ns: &str,
    selector: Value,
    rules: usize,
    members: usize,
    allow: Option<Value>,
) -> K8sObject {
    let mut ingress: Vec<Value> = (0..rules)
        .map(|i| {
            let (peer, proto, port) = filler_rule(i);
            json!({"from": [{"ipBlock": {"cidr": format!("{peer}/32")}}],
                   "ports": [{"protocol": proto, "port": port}]})
        })
        .collect();
    if members > 0 {
        let from: Vec<Value> = (0..members)
            .map(|i| json!({"ipBlock": {"cidr": format!("{}/32", member(i))}}))
            .collect();
        ingress.push(json!({"from": from, "ports": [{"protocol": "TCP", "port": 9000}]}));
    }
    ingress.extend(allow);
    K8sObject::NetworkPolicy(k8s(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": selector, "policyTypes": ["Ingress"], "ingress": ingress},
    })))
}

/// `n` filler pods on node `node` in namespace `ns` (`role: filler-<i>`, 10.2.1.0/24 and
/// up): peers of [`admin_tiers`]' rules, never a measured flow's end.
pub fn filler_pods(n: usize, node: &str, ns: &str) -> Vec<K8sObject> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(0x0a02_0100 + i as u32);
            K8sObject::Pod(k8s(json!({
                "metadata": {"name": format!("filler-{i}"), "namespace": ns,
                             "labels": {"role": format!("filler-{i}")}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
                "status": {"phase": "Running", "podIPs": [{"ip": ip.to_string()}]},
            })))
        })
        .collect()
}

/// `n` Admin ClusterNetworkPolicies selecting every namespace, policy `i` with a Deny and a
/// Pass ingress rule from `peer(i)` and `peer(i + 1)` (peers JSON) on ports no measured flow
/// uses: they give the measured pod a tiered ruleset with deny entries (every class it
/// names resolved through all three tiers) without deciding its traffic.
pub fn admin_tiers(n: usize, peer: impl Fn(usize) -> Value) -> Vec<K8sObject> {
    (0..n)
        .map(|i| {
            let port = |proto: &str, p: usize| json!([{proto: {"destinationPort": {"number": p}}}]);
            K8sObject::ClusterNetworkPolicy(k8s(json!({
                "apiVersion": "policy.networking.k8s.io/v1alpha2",
                "kind": "ClusterNetworkPolicy",
                "metadata": {"name": format!("admin-{i}")},
                "spec": {
                    "tier": "Admin",
                    "priority": i % 1000,
                    "subject": {"namespaces": {}},
                    "ingress": [
                        {"name": "deny", "action": "Deny", "from": peer(i),
                         "protocols": port("tcp", 2000 + i)},
                        {"name": "pass", "action": "Pass", "from": peer((i + 1) % n),
                         "protocols": port("udp", 3000 + i)},
                    ],
                },
            })))
        })
        .collect()
}

/// [`admin_tiers`]' peer `i` as the filler pod `i` of [`filler_pods`].
pub fn filler_peer(i: usize) -> Value {
    json!([{"pods": {"namespaceSelector": {},
                      "podSelector": {"matchLabels": {"role": format!("filler-{i}")}}}}])
}
