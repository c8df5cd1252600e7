//! Random cases on the conformance cluster, for differential tests: policies drawn from the
//! whole NetworkPolicy surface the 9-pod cluster can exercise (selectors with labels and
//! expressions, namespace selectors, ipBlocks with excepts around pod addresses, numbered,
//! ranged and named ports of every protocol, either direction, with and without
//! `policyTypes`), and random labels and named ports on the objects they select.
//!
//! A random case has no expectations: a differential test asks the reference evaluator.

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::case::{Case, ContainerPortSpec, ProbeSpec, Protocol};
use crate::cluster::{NAMESPACES, PODS, all_pods};

/// What every random case probes: both served ports, every protocol.
pub const PROBES: [ProbeSpec; 4] = [
    ProbeSpec {
        protocol: Protocol::Tcp,
        port: 80,
    },
    ProbeSpec {
        protocol: Protocol::Tcp,
        port: 81,
    },
    ProbeSpec {
        protocol: Protocol::Udp,
        port: 80,
    },
    ProbeSpec {
        protocol: Protocol::Sctp,
        port: 81,
    },
];

/// The case of `seed`: the same seed gives the same case.
pub fn case(seed: u64) -> Case {
    let mut rng = SmallRng::seed_from_u64(seed);
    let r = &mut rng;
    let mut namespace_labels = BTreeMap::new();
    for ns in NAMESPACES {
        let mut l = BTreeMap::from([
            ("ns".to_string(), ns.to_string()),
            ("kubernetes.io/metadata.name".to_string(), ns.to_string()),
        ]);
        if r.random_bool(0.5) {
            l.insert("team".into(), (*pick(r, &["blue", "red"])).into());
        }
        namespace_labels.insert(ns.to_string(), l);
    }
    let mut pod_labels = BTreeMap::new();
    let mut pod_ports = BTreeMap::new();
    for key in all_pods() {
        let pod = key.rsplit('/').next().unwrap().to_string();
        let mut l = BTreeMap::from([("pod".to_string(), pod)]);
        if r.random_bool(0.5) {
            l.insert("role".into(), (*pick(r, &["web", "db"])).into());
        }
        if r.random_bool(0.3) {
            l.insert("env".into(), (*pick(r, &["prod", "dev"])).into());
        }
        pod_labels.insert(key.clone(), l);
        if r.random_bool(0.4) {
            // "web" names a different port and protocol on different pods.
            let (port, protocol) = *[
                (80, Protocol::Tcp),
                (81, Protocol::Tcp),
                (80, Protocol::Udp),
                (81, Protocol::Sctp),
            ]
            .choose(r)
            .unwrap();
            pod_ports.insert(
                key,
                vec![ContainerPortSpec {
                    name: "web".into(),
                    port,
                    protocol,
                }],
            );
        }
    }
    let policies = (0..r.random_range(1..=4))
        .map(|i| serde_yaml::to_value(policy(r, i)).expect("json is yaml"))
        .collect();
    Case {
        name: format!("random-{seed}"),
        source: format!("moat random case, seed {seed}"),
        cluster: None,
        policies,
        namespace_labels,
        pod_labels,
        pod_ports,
        probes: PROBES.to_vec(),
        expect: Vec::new(),
        path: format!("random:{seed}").into(),
    }
}

fn policy(r: &mut SmallRng, i: usize) -> Value {
    let ns = *NAMESPACES.choose(r).unwrap();
    let mut spec = json!({"podSelector": pod_selector(r)});
    let ingress = r.random_bool(0.7);
    let egress = r.random_bool(0.5);
    let rules = |r: &mut SmallRng, to: &str| -> Value {
        (0..r.random_range(0..=2))
            .map(|_| {
                let mut rule = json!({});
                if r.random_bool(0.7) {
                    let peers: Vec<Value> = (0..r.random_range(1..=2)).map(|_| peer(r)).collect();
                    rule[to] = json!(peers);
                }
                if r.random_bool(0.6) {
                    let ports: Vec<Value> = (0..r.random_range(1..=2)).map(|_| port(r)).collect();
                    rule["ports"] = json!(ports);
                }
                rule
            })
            .collect()
    };
    if ingress {
        spec["ingress"] = rules(r, "from");
    }
    if egress {
        spec["egress"] = rules(r, "to");
    }
    // policyTypes omitted: Ingress, plus Egress if egress rules are present.
    if r.random_bool(0.7) || !(ingress || egress) {
        let mut types = Vec::new();
        if ingress || !egress {
            types.push("Ingress");
        }
        if egress {
            types.push("Egress");
        }
        spec["policyTypes"] = json!(types);
    }
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": format!("random-{i}"), "namespace": ns},
        "spec": spec,
    })
}

fn pick<T: Copy>(r: &mut SmallRng, items: &[T]) -> T {
    *items.choose(r).expect("not empty")
}

fn pod_selector(r: &mut SmallRng) -> Value {
    match r.random_range(0..6) {
        0 => json!({}),
        1 | 2 => json!({"matchLabels": {"pod": PODS.choose(r).unwrap()}}),
        3 => json!({"matchLabels": {"role": pick(r, &["web", "db"])}}),
        4 => {
            json!({"matchExpressions": [{"key": "role", "operator": pick(r, &["Exists", "DoesNotExist"])}]})
        }
        _ => {
            json!({"matchExpressions": [{"key": "env", "operator": pick(r, &["In", "NotIn"]), "values": ["prod"]}]})
        }
    }
}

fn namespace_selector(r: &mut SmallRng) -> Value {
    match r.random_range(0..4) {
        0 => json!({}),
        1 | 2 => json!({"matchLabels": {"ns": NAMESPACES.choose(r).unwrap()}}),
        _ => json!({"matchLabels": {"team": pick(r, &["blue", "red"])}}),
    }
}

fn peer(r: &mut SmallRng) -> Value {
    match r.random_range(0..5) {
        0 => json!({"podSelector": pod_selector(r)}),
        1 => json!({"namespaceSelector": namespace_selector(r)}),
        2 => json!({"namespaceSelector": namespace_selector(r), "podSelector": pod_selector(r)}),
        _ => {
            let around = all_pods().collect::<Vec<_>>();
            let center = around.choose(r).unwrap();
            // A pod's own /32 (/128), or the /4 around every pod with up to two pods cut out.
            let block = if r.random_bool(0.5) {
                json!({"cidr": format!("{{{{podCIDR {center}}}}}")})
            } else {
                let holes: Vec<String> = (0..r.random_range(0..=2))
                    .map(|_| format!("{{{{podCIDR {}}}}}", around.choose(r).unwrap()))
                    .collect();
                let mut b = json!({"cidr": format!("{{{{podLargeCIDR {center}}}}}")});
                if !holes.is_empty() {
                    b["except"] = json!(holes);
                }
                b
            };
            json!({"ipBlock": block})
        }
    }
}

fn port(r: &mut SmallRng) -> Value {
    let mut p = match r.random_range(0..6) {
        0 | 1 => json!({"port": pick(r, &[80, 81])}),
        2 => json!({"port": pick(r, &[79, 80]), "endPort": pick(r, &[80, 81])}),
        3 => json!({"port": "web"}),
        4 => json!({"port": pick(r, &["serve-80-tcp", "serve-81-sctp", "serve-80-udp"])}),
        _ => json!({}),
    };
    if r.random_bool(0.6) {
        p["protocol"] = json!(pick(r, &["TCP", "UDP", "SCTP"]));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Family, Plan, objects};

    /// Every generated case builds valid objects, and a seed always gives the same case.
    #[test]
    fn cases_are_valid_and_reproducible() {
        for seed in 0..300 {
            let c = case(seed);
            for family in [Family::Ipv4, Family::Ipv6] {
                let objs = objects(&c, Plan::new(family)).unwrap();
                for o in &objs {
                    moat_policy::model::parse::object(o).unwrap();
                }
            }
            assert_eq!(
                format!("{:?}", c.policies),
                format!("{:?}", case(seed).policies)
            );
        }
    }
}
