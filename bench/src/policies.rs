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
