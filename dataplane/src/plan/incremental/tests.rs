//! In-place updates equal full recomputation, up to class numbering, on random clusters.

use std::collections::BTreeSet;

use moat_policy::Index;
use moat_policy::ir::{Tier, delta};
use moat_policy::testkit::parse_all;
use moat_policy::testkit::random::{Features, World};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;
use crate::plan::desired;

/// The table with every class number replaced by the groups it stands for.
fn canon(d: &Desired, c: &Classes) -> String {
    let g = |id: &u32| c.groups(*id).expect("live class").to_vec();
    let mut out = String::new();
    out += &format!(
        "{:?}\n",
        d.class4.iter().map(|(k, v)| (k, g(v))).collect::<Vec<_>>()
    );
    out += &format!(
        "{:?}\n",
        d.class6.iter().map(|(k, v)| (k, g(v))).collect::<Vec<_>>()
    );
    out += &format!(
        "{:?}\n",
        d.addr4.iter().map(|(k, v)| (k, g(v))).collect::<Vec<_>>()
    );
    out += &format!(
        "{:?}\n",
        d.addr6.iter().map(|(k, v)| (k, g(v))).collect::<Vec<_>>()
    );
    out += &format!("{:?} {:?} {:?} {:?}\n", d.ing4, d.ing6, d.eg4, d.eg6);
    for (name, rs) in &d.rulesets {
        let aa: BTreeSet<_> = rs.aa.iter().map(g).collect();
        let gx: BTreeSet<_> = rs.gx.iter().map(|(c, p, x)| (g(c), p, x)).collect();
        let gp: BTreeSet<_> = rs.gp.iter().map(|(c, p, a, b)| (g(c), p, a, b)).collect();
        out += &format!(
            "{name} {} {} {:?} {aa:?} {gx:?} {gp:?} {:?} {:?}\n",
            rs.any, rs.named_ports, rs.ap, rs.n4, rs.n6
        );
        let dn = &rs.deny;
        let aa: BTreeSet<_> = dn.aa.iter().map(g).collect();
        let gx: BTreeSet<_> = dn.gx.iter().map(|(c, p, x)| (g(c), p, x)).collect();
        let gp: BTreeSet<_> = dn.gp.iter().map(|(c, p, a, b)| (g(c), p, a, b)).collect();
        out += &format!(
            "  deny {:?} {aa:?} {gx:?} {gp:?} {:?} {:?}\n",
            dn.ap, dn.n4, dn.n6
        );
    }
    out
}

#[test]
fn patching_in_place_equals_recomputing() {
    let mut f = Features::default();
    let (mut patched, mut full, mut tiered) = (0, 0, 0);
    for case in 0..150u64 {
        let mut rng = SmallRng::seed_from_u64(0x1_c0de + case);
        let mut world = World::generate(&mut rng, &mut f);
        let snaps = |w: &World| Index::build(parse_all(&w.objects())).snapshots();
        let mut old = snaps(&world)[0].clone();
        let mut classes = Classes::default();
        let mut cur = desired(&old, &mut classes);
        let mut cache = cache(&old, &cur);
        for step in 0..20 {
            world.mutate(&mut rng, &mut f, false);
            let Some(new) = snaps(&world).into_iter().find(|s| s.node == old.node) else {
                break;
            };
            let dl = delta::diff(&old, &new);
            let mut fresh = Classes::default();
            let want = desired(&new, &mut fresh);
            if applies(&old, &dl) {
                let got = patch(&cur, &mut cache, &mut classes, &old, &new, &dl);
                assert_eq!(
                    canon(&got, &classes),
                    canon(&want, &fresh),
                    "case {case} step {step}: {dl:?}"
                );
                cur = got;
                patched += 1;
                if new.rules.iter().any(|r| r.tier != Tier::NetworkPolicy) {
                    tiered += 1;
                }
            } else {
                cur = desired(&new, &mut classes);
                cache = super::cache(&new, &cur);
                full += 1;
            }
            old = new;
        }
    }
    eprintln!("{patched} deltas patched in place ({tiered} with cluster rules), {full} recomputed");
    assert!(
        patched >= 300,
        "the generator produces membership-only deltas ({patched})"
    );
    assert!(
        tiered >= 50,
        "membership-only deltas under cluster rules are patched too ({tiered})"
    );
}

/// Under cluster rules a named-port entry folds in the rules of its address's class: a
/// destination pod relabelled into an Admin Deny's peers turns its named entry from allow
/// to deny, in a delta that changes only a group's members (the named group stays).
#[test]
fn a_relabel_under_cluster_rules_resolves_named_entries_again() {
    use moat_policy::model::K8sObject;
    use moat_policy::testkit::k8s;
    use serde_json::json;

    let world = |blocked: bool| -> Vec<K8sObject> {
        let mut server_labels = json!({"app": "s"});
        if blocked {
            server_labels["blocked"] = json!("yes");
        }
        let pod = |name: &str, node: &str, ip: &str, labels: serde_json::Value| {
            K8sObject::Pod(k8s(json!({
                "metadata": {"name": name, "namespace": "ns", "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "main",
                    "ports": [{"name": "http", "protocol": "TCP", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
            })))
        };
        let rule = |action: &str, peer: serde_json::Value, named: bool| {
            let mut r = json!({"action": action, "to": [{"pods": {
                "namespaceSelector": {}, "podSelector": peer}}]});
            if named {
                r["protocols"] = json!([{"destinationNamedPort": "http"}]);
            }
            r
        };
        let cnp = |name: &str, priority: u32, r: serde_json::Value| {
            K8sObject::ClusterNetworkPolicy(k8s(json!({
                "apiVersion": "policy.networking.k8s.io/v1alpha2",
                "kind": "ClusterNetworkPolicy",
                "metadata": {"name": name},
                "spec": {"tier": "Admin", "priority": priority,
                    "subject": {"pods": {"namespaceSelector": {},
                        "podSelector": {"matchLabels": {"app": "c"}}}},
                    "egress": [r]},
            })))
        };
        vec![
            K8sObject::Node(k8s(json!({"metadata": {"name": "n1"},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}))),
            K8sObject::Node(k8s(json!({"metadata": {"name": "n2"},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}}))),
            K8sObject::Namespace(k8s(json!({"metadata": {"name": "ns"}}))),
            pod("client", "n1", "10.0.0.1", json!({"app": "c"})),
            pod("server", "n2", "10.0.1.1", server_labels),
            cnp(
                "deny-blocked",
                1,
                rule("Deny", json!({"matchLabels": {"blocked": "yes"}}), false),
            ),
            cnp(
                "accept-http",
                2,
                rule("Accept", json!({"matchLabels": {"app": "s"}}), true),
            ),
        ]
    };
    let snap = |blocked| {
        Index::build(parse_all(&world(blocked)))
            .snapshots()
            .into_iter()
            .find(|s| s.node == "n1")
            .expect("n1's snapshot")
    };
    let (old, new) = (snap(false), snap(true));
    let dl = delta::diff(&old, &new);
    assert!(applies(&old, &dl), "a membership-only delta: {dl:?}");
    let mut classes = Classes::default();
    let cur = desired(&old, &mut classes);
    let named = |d: &Desired| {
        let rs = d
            .rulesets
            .values()
            .find(|rs| rs.named_ports)
            .expect("the named ruleset");
        (rs.n4.len(), rs.deny.n4.len())
    };
    assert_eq!(named(&cur), (1, 0), "allowed before the relabel");
    let mut cache = cache(&old, &cur);
    let got = patch(&cur, &mut cache, &mut classes, &old, &new, &dl);
    let mut fresh = Classes::default();
    let want = desired(&new, &mut fresh);
    assert_eq!(named(&want), (0, 1), "denied after it");
    assert_eq!(canon(&got, &classes), canon(&want, &fresh));
}
