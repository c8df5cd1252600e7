//! Snapshot shape: size grows with pods plus rules, never pods × pods; pods change group
//! membership, never rules; IDs and digests depend on content only.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use moat_policy::Index;
use moat_policy::ir::{Members, Peers};
use moat_policy::model::{Node, Object, Peer, Pod, Policy, PortSpec, Protocol, Rule, Selector};

fn pod(i: u32, app: &str, nodes: u32) -> Object {
    Object::Pod(Pod {
        namespace: "big".into(),
        name: format!("p{i}"),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        node: Some(format!("n{}", i % nodes)),
        ips: vec![IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))],
        ports: vec![],
        host_network: false,
        terminal: false,
        uid: None,
        sandbox: None,
    })
}

fn all_to_all(name: &str, port: u16) -> Object {
    let everyone = vec![Peer::Pods {
        namespaces: None,
        pods: Selector::everything(),
    }];
    let rule = Rule {
        peers: everyone,
        ports: vec![PortSpec::Range {
            proto: Protocol::Tcp,
            first: port,
            last: port,
        }],
    };
    Object::Policy(Policy {
        namespace: "big".into(),
        name: name.into(),
        pod_selector: Selector::everything(),
        ingress: Some(vec![rule.clone()]),
        egress: Some(vec![rule]),
    })
}

fn cluster(pods: u32, nodes: u32, policies: u16) -> Vec<Object> {
    let mut v: Vec<Object> = (0..nodes)
        .map(|n| {
            Object::Node(Node {
                name: format!("n{n}"),
                addrs: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, n as u8 + 1))],
                labels: Default::default(),
            })
        })
        .collect();
    v.extend((0..pods).map(|i| pod(i, if i % 2 == 0 { "a" } else { "b" }, nodes)));
    v.extend((0..policies).map(|k| all_to_all(&format!("all-{k}"), 1000 + k)));
    v
}

#[test]
fn snapshot_size_is_linear_not_quadratic() {
    let (pods, nodes, policies) = (2_000u32, 20u32, 50u16);
    let index = Index::build(cluster(pods, nodes, policies));
    for n in index.nodes() {
        let s = index.snapshot(&n.node).unwrap().size();
        let local = (pods / nodes) as usize;
        // Every local pod, two rules per policy (one each way), one shared group of every pod.
        assert_eq!(s.endpoints, local);
        assert_eq!(s.rules, 2 * policies as usize);
        assert_eq!(s.groups, 1, "all 50 policies share one peer group");
        assert_eq!(s.members, pods as usize);
        // A pod-pair expansion would hold local × pods × policies entries.
        assert!(s.total() <= local + 2 * policies as usize + 1 + pods as usize);
    }
}

#[test]
fn a_new_pod_changes_membership_not_rules() {
    let mut index = Index::build(cluster(200, 4, 3));
    let before = index.snapshot("n1").unwrap();
    let rules_before: BTreeSet<_> = before.rules.iter().map(|r| r.id).collect();
    let changes = index.apply(pod(10_000, "a", 4));
    assert_eq!(
        changes.updated.len(),
        4,
        "every node holds the all-pods group"
    );
    let after = index.snapshot("n1").unwrap();
    let rules_after: BTreeSet<_> = after.rules.iter().map(|r| r.id).collect();
    assert_eq!(rules_before, rules_after);
    assert_eq!(before.groups[0].id, after.groups[0].id);
    let Members::Addrs(a) = &after.groups[0].members else {
        panic!()
    };
    assert_eq!(a.len(), 201);
    assert!(after.version > before.version);
    for r in &after.rules {
        assert_eq!(r.peers, Peers::Groups(vec![after.groups[0].id]));
    }
}

#[test]
fn ids_and_digests_depend_on_content_only() {
    let objects = cluster(300, 5, 4);
    let a = Index::build(objects.clone());
    let mut reversed = objects.clone();
    reversed.reverse();
    let mut b = Index::new();
    for o in reversed {
        b.apply(o);
    }
    let da: Vec<_> = a.nodes().into_iter().map(|n| (n.node, n.digest)).collect();
    let db: Vec<_> = b.nodes().into_iter().map(|n| (n.node, n.digest)).collect();
    assert_eq!(da, db);
    assert_eq!(
        a.snapshot("n2").unwrap().rules,
        b.snapshot("n2").unwrap().rules
    );
    // Versions differ (b took many steps); content does not.
    assert_ne!(
        a.snapshot("n2").unwrap().version,
        b.snapshot("n2").unwrap().version
    );
}

#[test]
fn versions_continue_from_a_starting_generation() {
    let mut index = Index::starting_at(41);
    let c = index.reset(cluster(10, 2, 1));
    assert_eq!(c.generation, 42);
    assert!(c.updated.iter().all(|u| u.version == 42));
    // A relist with one pod changed bumps only that pod's node.
    let mut objects = cluster(10, 2, 1);
    objects.retain(|o| !matches!(o, Object::Pod(p) if p.name == "p3"));
    let c = index.reset(objects);
    assert_eq!(c.generation, 43);
    let nodes: Vec<_> = c.updated.iter().map(|u| u.node.to_string()).collect();
    let mut nodes = nodes;
    nodes.sort();
    assert_eq!(
        nodes,
        ["n0", "n1"],
        "p3 left the shared group, so both nodes change"
    );
    assert!(index.reset(cluster(10, 2, 1)).updated.len() == 2);
    assert!(
        index.reset(cluster(10, 2, 1)).is_empty(),
        "an identical relist is a no-op"
    );
}
