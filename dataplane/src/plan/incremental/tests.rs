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
    use crate::plan::fixtures::{admin_egress, base, client_node, pod};
    use serde_json::json;

    let snap = |blocked: bool| {
        let mut server_labels = json!({"app": "s"});
        if blocked {
            server_labels["blocked"] = json!("yes");
        }
        let mut o = base();
        o.extend([
            pod("server", "n2", "10.0.1.1", server_labels),
            admin_egress(
                "deny-blocked",
                1,
                "Deny",
                json!({"matchLabels": {"blocked": "yes"}}),
                false,
            ),
            admin_egress(
                "accept-http",
                2,
                "Accept",
                json!({"matchLabels": {"app": "s"}}),
                true,
            ),
        ]);
        client_node(&o)
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

/// A delta naming one group twice (removed and upserted: `delta::apply` takes it, the server
/// never sends it) is planned whole: the patch would read both changes against the old group
/// and drop members the new snapshot keeps, here an Admin Deny's.
#[test]
fn a_delta_changing_a_group_twice_is_not_patched() {
    use crate::plan::fixtures::{admin_egress, base, client_node, pod};
    use serde_json::json;

    let mut o = base();
    o.extend([
        pod("a", "n2", "10.0.1.1", json!({"app": "x"})),
        pod("b", "n2", "10.0.1.2", json!({"app": "x"})),
        admin_egress(
            "deny-x",
            1,
            "Deny",
            json!({"matchLabels": {"app": "x"}}),
            false,
        ),
    ]);
    let old = client_node(&o);
    o.pop();
    o.pop();
    o.push(admin_egress(
        "deny-x",
        1,
        "Deny",
        json!({"matchLabels": {"app": "x"}}),
        false,
    ));
    let new = client_node(&o);
    let mut dl = delta::diff(&old, &new);
    assert!(applies(&old, &dl), "one pod gone: a plain membership delta");
    let g = new
        .groups
        .iter()
        .find(|g| matches!(&g.members, Members::Addrs(a) if a.len() == 1))
        .expect("the Deny's group, one member left");
    dl.patch_groups.clear();
    dl.remove_groups.push(g.id);
    dl.upsert_groups.push(std::sync::Arc::clone(g));
    assert!(!applies(&old, &dl));
}
