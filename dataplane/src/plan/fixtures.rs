//! Small hand-made clusters for the plan's tests: a client pod (`app: c`) on node `n1`,
//! servers on `n2`, every pod with the named port `http` (TCP 8080), and Admin policies
//! whose subject is the client.

use moat_policy::Index;
use moat_policy::ir::NodeSnapshot;
use moat_policy::model::K8sObject;
use moat_policy::testkit::{k8s, parse_all};
use serde_json::{Value, json};

/// Nodes `n1` and `n2`, namespace `ns`, and the client pod.
pub fn base() -> Vec<K8sObject> {
    vec![
        K8sObject::Node(k8s(json!({"metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}))),
        K8sObject::Node(k8s(json!({"metadata": {"name": "n2"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}}))),
        K8sObject::Namespace(k8s(json!({"metadata": {"name": "ns"}}))),
        pod("client", "n1", "10.0.0.1", json!({"app": "c"})),
    ]
}

/// A pod of namespace `ns` with the named port `http`.
pub fn pod(name: &str, node: &str, ip: &str, labels: Value) -> K8sObject {
    K8sObject::Pod(k8s(json!({
        "metadata": {"name": name, "namespace": "ns", "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main",
            "ports": [{"name": "http", "protocol": "TCP", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
    })))
}

/// An Admin policy over the client with one egress rule to the pods `peer` selects, on the
/// named port `http` when `named` (else on every port).
pub fn admin_egress(
    name: &str,
    priority: u32,
    action: &str,
    peer: Value,
    named: bool,
) -> K8sObject {
    let mut rule = json!({"action": action, "to": [{"pods": {
        "namespaceSelector": {}, "podSelector": peer}}]});
    if named {
        rule["protocols"] = json!([{"destinationNamedPort": "http"}]);
    }
    K8sObject::ClusterNetworkPolicy(k8s(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {"tier": "Admin", "priority": priority,
            "subject": {"pods": {"namespaceSelector": {},
                "podSelector": {"matchLabels": {"app": "c"}}}},
            "egress": [rule]},
    })))
}

/// The client's node's snapshot.
pub fn client_node(objects: &[K8sObject]) -> NodeSnapshot {
    Index::build(parse_all(objects))
        .snapshot("n1")
        .expect("n1's snapshot")
}
