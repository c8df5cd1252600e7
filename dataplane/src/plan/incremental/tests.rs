//! In-place updates equal full recomputation, up to class numbering, on random clusters.

use std::collections::BTreeSet;

use moat_policy::Index;
use moat_policy::ir::{Tier, delta};
use moat_policy::testkit::parse_all;
use moat_policy::testkit::random::{Features, World};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;
use crate::plan::{desired, tier_tables};

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

/// A tier plan with every cluster class and address class replaced by what it stands for.
fn canon_tiers(tp: &tier_tables::TierPlan, d: &Desired, c: &Classes) -> String {
    use std::fmt::Write as _;
    let def = |id: u32| tp.def(id).cloned().unwrap_or_default();
    let g = |id: &u32| c.groups(*id).expect("live class").to_vec();
    let mut out = String::new();
    let addrs: BTreeSet<IpAddr> = d
        .addr4
        .keys()
        .map(|a| IpAddr::V4(*a))
        .chain(d.addr6.keys().map(|a| IpAddr::V6(*a)))
        .chain(tp.of_addr.keys().copied())
        .collect();
    for a in addrs {
        writeln!(out, "{a} {:?}", def(tp.cclass_at(d, a))).unwrap();
    }
    let of_class = |class: &u32| def(tp.of_class.get(class).copied().unwrap_or(0));
    for (k, class) in &d.class4 {
        writeln!(out, "{k:?} {:?}", of_class(class)).unwrap();
    }
    for (k, class) in &d.class6 {
        writeln!(out, "{k:?} {:?}", of_class(class)).unwrap();
    }
    for (name, t) in &tp.tables {
        let whole: BTreeSet<_> = t.whole.iter().map(|(k, a)| (def(*k), *a)).collect();
        let ports: BTreeSet<_> = t
            .ports
            .iter()
            .map(|((k, p, x, y), a)| (def(*k), *p, *x, *y, *a))
            .collect();
        writeln!(out, "{name} {:?} {whole:?} {ports:?}", tp.lists[name]).unwrap();
    }
    writeln!(out, "{:?}", tp.endpoints).unwrap();
    for (name, rs) in &tp.np {
        let aa: BTreeSet<_> = rs.aa.iter().map(g).collect();
        let gx: BTreeSet<_> = rs.gx.iter().map(|(c, p, x)| (g(c), p, x)).collect();
        let gp: BTreeSet<_> = rs.gp.iter().map(|(c, p, a, b)| (g(c), p, a, b)).collect();
        writeln!(
            out,
            "{name} {} {:?} {aa:?} {gx:?} {gp:?} {:?} {:?}",
            rs.any, rs.ap, rs.n4, rs.n6
        )
        .unwrap();
    }
    out
}

/// Layout 7's tier plan moved along with the address maps equals the tier plan of the new
/// snapshot, up to numbering, and its numbering stays one to one.
#[test]
fn tier_plans_patched_in_place_equal_recomputing() {
    use crate::plan::tier_tables::{patch as patch_tiers, tier_plan};
    let mut f = Features::default();
    let (mut patched, mut born) = (0, 0);
    for case in 0..150u64 {
        let mut rng = SmallRng::seed_from_u64(0x7_1e25 + case);
        let mut world = World::generate(&mut rng, &mut f);
        let snaps = |w: &World| Index::build(parse_all(&w.objects())).snapshots();
        let mut old = snaps(&world)[0].clone();
        let mut classes = Classes::default();
        let mut cur = desired(&old, &mut classes);
        let mut cache = cache(&old, &cur);
        let mut tp = tier_plan(&old, &cur, &classes);
        for step in 0..20 {
            world.mutate(&mut rng, &mut f, false);
            let Some(new) = snaps(&world).into_iter().find(|s| s.node == old.node) else {
                break;
            };
            let dl = delta::diff(&old, &new);
            if applies(&old, &dl) && new.rules.iter().any(|r| r.tier != Tier::NetworkPolicy) {
                let log = patch_in_place(&mut cur, &mut cache, &mut classes, &old, &new, &dl);
                let moved = patch_tiers(&mut tp, &new, &cur, &classes, &log);
                let mut fresh = Classes::default();
                let want_d = desired(&new, &mut fresh);
                let want = tier_plan(&new, &want_d, &fresh);
                assert_eq!(
                    canon_tiers(&tp, &cur, &classes),
                    canon_tiers(&want, &want_d, &fresh),
                    "case {case} step {step}: {dl:?}"
                );
                assert!(tp.numbering_consistent(), "case {case} step {step}");
                patched += 1;
                born += moved.born.len();
            } else {
                cur = desired(&new, &mut classes);
                cache = super::cache(&new, &cur);
                tp = tier_plan(&new, &cur, &classes);
            }
            old = new;
        }
    }
    eprintln!("{patched} tier plans patched in place, {born} cluster classes born");
    assert!(
        patched >= 50,
        "membership deltas under cluster rules ({patched})"
    );
    assert!(
        born >= 20,
        "deltas that bring cluster classes to life ({born})"
    );
}
