//! `nodes` peers: groups of Node addresses, kept up to date by Node events alone.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::index::Index;
use crate::ir::{Members, NodeSnapshot, Peers};
use crate::model::{K8sObject, Object, ObjectKey, parse};
use crate::testkit::{PARSE, parse_all};

fn node(name: &str, labels: Value, addrs: &[&str]) -> Object {
    let addrs: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .collect();
    let k = K8sObject::Node(
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"addresses": addrs},
        }))
        .unwrap(),
    );
    parse::object_with(&k, &PARSE).unwrap().value
}

/// Pod `a` on n2 under an Admin policy denying egress to Nodes labelled pool=infra (n1).
fn cluster() -> Vec<K8sObject> {
    vec![
        K8sObject::Pod(
            serde_json::from_value(json!({
                "metadata": {"name": "a", "namespace": "x", "labels": {"app": "a"}},
                "spec": {"nodeName": "n2", "containers": [{"name": "c"}]},
                "status": {"podIPs": [{"ip": "10.0.0.1"}]}
            }))
            .unwrap(),
        ),
        K8sObject::Pod(
            serde_json::from_value(json!({
                "metadata": {"name": "b", "namespace": "x", "labels": {"app": "b"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
                "status": {"podIPs": [{"ip": "10.0.0.2"}]}
            }))
            .unwrap(),
        ),
        K8sObject::ClusterNetworkPolicy(
            serde_json::from_value(json!({
                "metadata": {"name": "no-infra"},
                "spec": {"tier": "Admin", "priority": 1,
                         "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}},
                         "egress": [{"action": "Deny", "to": [{"nodes": {"matchLabels": {"pool": "infra"}}}]}]}
            }))
            .unwrap(),
        ),
    ]
}

/// The one group n2's snapshot holds, as addresses.
fn members(s: &NodeSnapshot) -> Vec<IpAddr> {
    assert_eq!(s.groups.len(), 1, "{s:?}");
    match &s.groups[0].members {
        Members::Addrs(a) => a.clone(),
        other => panic!("a nodes peer compiles to addresses, not {other:?}"),
    }
}

fn ips(s: &[&str]) -> Vec<IpAddr> {
    s.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn a_node_event_changes_only_the_group_membership() {
    let mut objects = parse_all(&cluster());
    objects.push(node(
        "n1",
        json!({"pool": "infra"}),
        &["192.168.0.1", "fd99::1"],
    ));
    objects.push(node("n2", json!({"pool": "web"}), &["192.168.0.2"]));
    let mut index = Index::build(objects);
    index.verify().unwrap();
    let before = index.snapshot("n2").unwrap();
    // Node addresses only: never the pod running on n1.
    assert_eq!(members(&before), ips(&["192.168.0.1", "fd99::1"]));
    assert_eq!(before.rules.len(), 1);
    let Peers::Groups(g) = &before.rules[0].peers else {
        panic!("{:?}", before.rules[0]);
    };
    assert_eq!(g, &vec![before.groups[0].id]);
    // n1 holds no pod the policy selects: it has no group to hold.
    assert!(index.snapshot("n1").unwrap().groups.is_empty());

    let same_rules = |index: &Index, members_now: &[&str]| {
        let after = index.snapshot("n2").unwrap();
        assert_eq!(members(&after), ips(members_now));
        assert_eq!(
            after.groups[0].id, before.groups[0].id,
            "content-derived ID"
        );
        let ids = |s: &NodeSnapshot| s.rules.iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(&after), ids(&before), "rules untouched");
        assert_eq!(after.endpoints, before.endpoints, "endpoints untouched");
        index.verify().unwrap();
    };
    let updated = |c: crate::index::Changes| {
        let mut v: Vec<String> = c.updated.iter().map(|u| u.node.to_string()).collect();
        v.sort();
        v
    };

    // Relabelled out of the pool: only n2 (which holds the group) gets a new version.
    let c = index.apply(node(
        "n1",
        json!({"pool": "web"}),
        &["192.168.0.1", "fd99::1"],
    ));
    assert_eq!(updated(c), ["n2"]);
    same_rules(&index, &[]);
    // n2 itself joins the pool.
    let c = index.apply(node("n2", json!({"pool": "infra"}), &["192.168.0.2"]));
    assert_eq!(updated(c), ["n2"]);
    same_rules(&index, &["192.168.0.2"]);
    // n1 back in the pool, then readdressed.
    index.apply(node("n1", json!({"pool": "infra"}), &["192.168.0.1"]));
    same_rules(&index, &["192.168.0.1", "192.168.0.2"]);
    index.apply(node("n1", json!({"pool": "infra"}), &["192.168.0.9"]));
    same_rules(&index, &["192.168.0.2", "192.168.0.9"]);
    // An unchanged Node is no event at all.
    let c = index.apply(node("n1", json!({"pool": "infra"}), &["192.168.0.9"]));
    assert!(c.is_empty(), "{c:?}");
    // A Node deleted leaves the group.
    index.delete(&ObjectKey::Node("n1".into()));
    same_rules(&index, &["192.168.0.2"]);

    // The incremental result is what a full compile of the same state gives.
    let digests = |i: &Index| {
        i.nodes()
            .into_iter()
            .map(|n| (n.node, n.digest))
            .collect::<Vec<_>>()
    };
    assert_eq!(digests(&Index::build(index.objects())), digests(&index));
}

#[test]
fn node_labels_and_groups_are_released_with_their_objects() {
    let mut objects = parse_all(&cluster());
    objects.push(node("n1", json!({"pool": "infra"}), &["192.168.0.1"]));
    objects.push(node(
        "n2",
        json!({"pool": "web", "zone": "z1"}),
        &["192.168.0.2"],
    ));
    let mut index = Index::build(objects.clone());
    let keys: Vec<ObjectKey> = objects.iter().map(Object::key).collect();
    index.batch(keys.into_iter().map(crate::Event::Delete));
    let s = index.stats();
    assert_eq!(
        (s.groups, s.label_sets, s.selectors, s.strings, s.nodes),
        (0, 0, 0, 0, 0),
        "{s:?}"
    );
}
