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
    }
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
