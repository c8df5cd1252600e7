use serde_json::json;

use super::*;

fn pod(ns: &str, name: &str, labels: serde_json::Value, ip: &str, node: &str) -> core::Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"containerPort": 8080, "name": "http"}]}]},
        "status": {"podIP": ip}
    }))
    .unwrap()
}

fn cluster(policies: Vec<serde_json::Value>) -> Cluster {
    Cluster {
        namespaces: vec![],
        pods: vec![
            pod("x", "a", json!({"app": "a"}), "10.0.0.1", "n1"),
            pod("x", "b", json!({"app": "b"}), "10.0.0.2", "n2"),
            pod("y", "c", json!({"app": "a"}), "10.0.1.1", "n2"),
        ],
        nodes: vec![
            serde_json::from_value(json!({
                "metadata": {"name": "n1"},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}
            }))
            .unwrap(),
        ],
        policies: policies
            .into_iter()
            .map(|p| serde_json::from_value(p).unwrap())
            .collect(),
        cluster_policies: vec![],
    }
}

fn cnp(
    name: &str,
    tier: &str,
    priority: i64,
    spec: serde_json::Value,
) -> crate::model::cnp_api::ClusterNetworkPolicy {
    let mut s = spec;
    s["tier"] = json!(tier);
    s["priority"] = json!(priority);
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": s})).unwrap()
}

fn with_cluster(mut c: Cluster, cnps: Vec<crate::model::cnp_api::ClusterNetworkPolicy>) -> Cluster {
    c.cluster_policies = cnps;
    c
}

fn allow_all_into_x() -> serde_json::Value {
    json!({"metadata": {"name": "allow", "namespace": "x"},
           "spec": {"podSelector": {}, "ingress": [{}]}})
}

#[test]
fn admin_deny_beats_a_network_policy_allow_and_pass_hands_over() {
    let deny = cnp(
        "no-y",
        "Admin",
        5,
        json!({
            "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
            "ingress": [
                {"action": "Pass", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}}],
                 "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
                {"name": "deny-y", "action": "Deny", "from": [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]},
            ],
        }),
    );
    let c = with_cluster(cluster(vec![allow_all_into_x()]), vec![deny]);
    // y/c (app a) on port 80: the Pass rule comes first, so the NetworkPolicy allows.
    let v = verdict(&c, &flow("10.0.1.1", "10.0.0.2", 80));
    assert!(v.allowed);
    assert!(matches!(v.ingress.reason, Reason::AllowedBy(_)));
    assert_eq!(v.ingress.passed.len(), 1);
    // Port 81: the Deny rule decides, whatever the NetworkPolicy allows.
    let v = verdict(&c, &flow("10.0.1.1", "10.0.0.2", 81));
    assert!(!v.allowed);
    let Reason::Cluster(r) = &v.ingress.reason else {
        panic!("{v:?}")
    };
    assert_eq!(
        (
            r.policy.as_str(),
            r.index,
            r.name.as_str(),
            r.action.as_str()
        ),
        ("no-y", 1, "deny-y", "Deny")
    );
}

#[test]
fn baseline_applies_only_where_no_network_policy_isolates() {
    let base = cnp(
        "default-deny",
        "Baseline",
        0,
        json!({
            "subject": {"namespaces": {}},
            "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
        }),
    );
    let c = with_cluster(cluster(vec![allow_all_into_x()]), vec![base]);
    // x pods are isolated by a NetworkPolicy that allows: the baseline never sees them.
    assert!(verdict(&c, &flow("10.0.1.1", "10.0.0.2", 80)).allowed);
    // y/c is not isolated: the baseline denies.
    let v = verdict(&c, &flow("10.0.0.1", "10.0.1.1", 80));
    assert!(!v.allowed);
    assert!(matches!(v.ingress.reason, Reason::Cluster(_)));
}

#[test]
fn an_egress_accept_leaves_the_ingress_decision_to_the_destination() {
    let accept = cnp(
        "out",
        "Admin",
        1,
        json!({
            "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}},
            "egress": [{"action": "Accept", "to": [{"namespaces": {}}]}],
        }),
    );
    let deny_into_x = json!({"metadata": {"name": "deny", "namespace": "x"},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}});
    let c = with_cluster(cluster(vec![deny_into_x]), vec![accept]);
    let v = verdict(&c, &flow("10.0.1.1", "10.0.0.2", 80));
    assert!(v.egress.allowed && !v.ingress.allowed && !v.allowed);
}

#[test]
fn an_unknown_peer_fails_closed_by_action() {
    let rules = |action: &str| {
        json!({
            "subject": {"namespaces": {}},
            "ingress": [{"action": action, "from": [{"someFutureField": {}}]}],
        })
    };
    let c = with_cluster(cluster(vec![]), vec![cnp("p", "Admin", 1, rules("Accept"))]);
    let v = verdict(&c, &flow("10.0.1.1", "10.0.0.2", 80));
    assert!(
        v.allowed && v.ingress.reason == Reason::NotIsolated,
        "Accept matches nothing"
    );
    // "A 'Deny all' rule" for a Deny and for a Pass: a Pass matching everything would hand
    // every flow to the (here absent) NetworkPolicy tier and skip later Admin Denies.
    for action in ["Deny", "Pass"] {
        let c = with_cluster(cluster(vec![]), vec![cnp("p", "Admin", 1, rules(action))]);
        let v = verdict(&c, &flow("10.0.1.1", "10.0.0.2", 80));
        assert!(!v.allowed, "{action} denies all");
        let Reason::Cluster(r) = &v.ingress.reason else {
            panic!("{v:?}")
        };
        assert_eq!(r.action, "Deny", "{action}");
    }
}

#[test]
fn same_priority_policies_follow_the_tie_key() {
    let mk = |name: &str, action: &str| {
        cnp(
            name,
            "Admin",
            7,
            json!({
                "subject": {"namespaces": {}},
                "ingress": [{"action": action, "from": [{"namespaces": {}}]}],
            }),
        )
    };
    let (a, b) = ("alpha", "bravo");
    let first = if cluster::tie_key(a) < cluster::tie_key(b) {
        a
    } else {
        b
    };
    let c = with_cluster(cluster(vec![]), vec![mk(a, "Accept"), mk(b, "Deny")]);
    let v = verdict(&c, &flow("10.0.1.1", "10.0.0.2", 80));
    let Reason::Cluster(r) = &v.ingress.reason else {
        panic!()
    };
    assert_eq!(r.policy, first);
    assert_eq!(
        cluster::tie_key(a),
        crate::ir::tie_key(a),
        "the evaluator and the IR agree on the definition"
    );
}

fn flow(src: &str, dst: &str, port: u16) -> Flow {
    Flow {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        proto: 6,
        port,
    }
}

#[test]
fn explains_which_rules_decide() {
    let c = cluster(vec![json!({
        "metadata": {"name": "web", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"port": "http"}]}]}
    })]);
    let v = verdict(&c, &flow("10.0.0.2", "10.0.0.1", 8080));
    assert!(v.allowed);
    assert_eq!(v.egress.reason, Reason::NotIsolated);
    let Reason::AllowedBy(rules) = &v.ingress.reason else {
        panic!("{v:?}")
    };
    assert_eq!(rules[0].policy.name, "web");
    // podSelector-only peers stay in the policy's namespace.
    let v = verdict(&c, &flow("10.0.1.1", "10.0.0.1", 8080));
    assert_eq!(
        v.ingress.reason,
        Reason::DeniedBy(vec![PolicyRef {
            namespace: "x".into(),
            name: "web".into()
        }])
    );
    // The named port resolves to 8080 only.
    assert!(!verdict(&c, &flow("10.0.0.2", "10.0.0.1", 80)).allowed);
    // The pod's own node always reaches it.
    let v = verdict(&c, &flow("192.168.0.1", "10.0.0.1", 1));
    assert!(v.allowed);
    assert_eq!(v.ingress.reason, Reason::NodeLocal);
    assert_eq!(v.egress.reason, Reason::NotAPod);
}

fn node(name: &str, labels: serde_json::Value, ip: &str) -> core::Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    }))
    .unwrap()
}

#[test]
fn a_nodes_peer_matches_the_selected_nodes_addresses_only() {
    let deny = cnp(
        "no-infra-nodes",
        "Admin",
        1,
        json!({
            "subject": {"namespaces": {}},
            "egress": [{"name": "infra", "action": "Deny",
                        "to": [{"nodes": {"matchLabels": {"pool": "infra"}}}]}],
        }),
    );
    let mut c = with_cluster(cluster(vec![]), vec![deny]);
    c.nodes = vec![
        node("n1", json!({"pool": "infra"}), "192.168.0.1"),
        node("n2", json!({"pool": "web"}), "192.168.0.2"),
        node("n3", json!({"pool": "web"}), "192.168.0.3"),
    ];
    // b runs on n2: the selected n1 is denied, by that rule.
    let v = verdict(&c, &flow("10.0.0.2", "192.168.0.1", 10250));
    assert!(!v.allowed);
    let Reason::Cluster(r) = &v.egress.reason else {
        panic!("{v:?}")
    };
    assert_eq!(
        (r.policy.as_str(), r.name.as_str()),
        ("no-infra-nodes", "infra")
    );
    // A Node the selector does not take stays reachable.
    assert!(verdict(&c, &flow("10.0.0.2", "192.168.0.3", 10250)).allowed);
    // A pod running on the selected Node is not the Node.
    assert!(verdict(&c, &flow("10.0.0.2", "10.0.0.1", 80)).allowed);
    // A pod's own node stays reachable (node-local traffic is always allowed).
    let v = verdict(&c, &flow("10.0.0.1", "192.168.0.1", 10250));
    assert!(v.allowed);
    assert_eq!(v.egress.reason, Reason::NodeLocal);
    // Relabelled out of the pool: reachable.
    c.nodes[0] = node("n1", json!({"pool": "web"}), "192.168.0.1");
    assert!(verdict(&c, &flow("10.0.0.2", "192.168.0.1", 10250)).allowed);
    // An empty selector takes every Node.
    c.cluster_policies[0].spec.as_mut().unwrap().egress[0].to[0].nodes = Some(Default::default());
    assert!(!verdict(&c, &flow("10.0.0.2", "192.168.0.3", 10250)).allowed);
}
