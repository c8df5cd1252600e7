use std::net::{IpAddr, Ipv4Addr};

use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use moat_dataplane::plan::tier_tables::TierTable;
use moat_policy::ir::Action;

use moat_dataplane::plan::tier_tables::tier_plan;
use moat_dataplane::plan::{Classes, addresses};
use moat_policy::ir::Tier;

use super::super::interp::{Packet, Table};
use super::super::tests::{Outcome, judged, on_random_worlds, random_local};
use super::super::{cmd, delta_tiers, full_tiers, map_decl, payload, rule};
use super::*;

const ACTIONS: [Action; 3] = [Action::Allow, Action::Deny, Action::Pass];

/// A table over cluster classes 0..=5 as the plan shapes one: a whole action per class
/// present, and disjoint port runs that differ from it.
fn random_table(rng: &mut SmallRng) -> TierTable {
    let mut t = TierTable::default();
    for c in 0..=5u32 {
        if !rng.random_bool(0.7) {
            continue;
        }
        let whole = *ACTIONS.choose(rng).unwrap();
        t.whole.insert(c, whole);
        for p in PORTED {
            let mut at = 0u32;
            for _ in 0..rng.random_range(0..4) {
                let lo = at + rng.random_range(0..3000);
                let hi = lo + rng.random_range(0..3000);
                if hi > u32::from(u16::MAX) {
                    break;
                }
                let a = *ACTIONS
                    .iter()
                    .filter(|a| **a != whole)
                    .collect::<Vec<_>>()
                    .choose(rng)
                    .unwrap();
                t.ports.insert((c, p, lo as u16, hi as u16), *a);
                at = hi + 1;
            }
            // Now and then a run at the top of the port space, ending at its last port or
            // just before it.
            if rng.random_bool(0.3) && at < 60_000 {
                let hi = u16::MAX - rng.random_range(0..2);
                let a = if whole == Action::Deny {
                    Action::Allow
                } else {
                    Action::Deny
                };
                t.ports.insert((c, p, 60_000, hi), a);
            }
        }
    }
    t
}

/// Counters naming how a packet ended.
const ENDS: [&str; 4] = ["a_acc", "a_deny", "b_deny", "through"];

fn ends(allow: &str, deny: &str) -> Ends {
    Ends {
        allow: vec![json!({"counter": allow}), json!({"accept": null})],
        deny: vec![json!({"counter": deny}), json!({"drop": null})],
    }
}

/// A table model holding an Admin and a Baseline table, and a `forward` chain that puts the
/// peer's cluster class into the mark (10.0.0.c is class c for 1 ≤ c ≤ 6; 6 has no rows
/// anywhere; other addresses are class 0) and decides both tiers.
fn rendered(admin: &TierTable, baseline: &TierTable) -> Vec<Value> {
    let mut c = vec![json!({"add": {"table": {"family": "inet", "name": super::super::TABLE}}})];
    c.extend(ENDS.map(|n| cmd("add", "counter", json!({"name": n}))));
    c.push(map_decl("cc4", json!("ipv4_addr"), "mark", false));
    c.extend(elements(
        "add",
        "cc4",
        (1..=6u32)
            .map(|i| json!([Ipv4Addr::new(10, 0, 0, i as u8).to_string(), i]))
            .collect(),
    ));
    c.extend(add_table("A", admin));
    c.extend(add_table("B", baseline));
    c.push(cmd(
        "add",
        "chain",
        json!({"name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}),
    ));
    c.push(rule(
        "forward",
        vec![json!({"mangle": {"key": ct("mark"), "value": 0}})],
    ));
    c.push(rule(
        "forward",
        vec![json!({"mangle": {"key": ct("mark"), "value": {"map": {"key": payload("ip", "daddr"), "data": "@cc4"}}}})],
    ));
    c.extend(block("forward", "A", &ends("a_acc", "a_deny"), false));
    c.extend(block("forward", "B", &ends("unused", "b_deny"), true));
    c.push(rule(
        "forward",
        vec![json!({"counter": "through"}), json!({"accept": null})],
    ));
    c
}

/// What the tiers decide, read from the tables' own lookup.
fn expected(
    admin: &TierTable,
    baseline: &TierTable,
    cc: u32,
    proto: u8,
    port: u16,
) -> &'static str {
    match admin.lookup(cc, proto, port) {
        Some(Action::Allow) => "a_acc",
        Some(Action::Deny) => "a_deny",
        _ => match baseline.lookup(cc, proto, port) {
            Some(Action::Deny) => "b_deny",
            _ => "through",
        },
    }
}

fn ended(t: &mut Table, p: &Packet) -> String {
    let (_, moved) = t.run_counted(p);
    assert_eq!(moved.len(), 1, "{p:?}: {moved:?}");
    moved[0].clone()
}

/// Ports worth probing: every run's edges and their neighbours, the ends, a random one.
fn ports(rng: &mut SmallRng, t: &[&TierTable]) -> Vec<u16> {
    let mut v = vec![0, 1, u16::MAX, rng.random()];
    for (_, _, lo, hi) in t.iter().flat_map(|t| t.ports.keys()) {
        v.extend([*lo, *hi, lo.saturating_sub(1), hi.saturating_add(1)]);
    }
    v
}

/// The rendered tier blocks decide like [`TierTable::lookup`]: Admin Accept and Deny final,
/// Pass and a miss on to Baseline, whose Deny alone denies; a class with rows never judged
/// by class 0's; protocols without ports by the class's whole action.
#[test]
fn tier_blocks_decide_like_the_tables() {
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    for case in 0..300u64 {
        let mut rng = SmallRng::seed_from_u64(case);
        let (admin, baseline) = (random_table(&mut rng), random_table(&mut rng));
        let mut table = Table::default();
        table
            .apply(&rendered(&admin, &baseline))
            .unwrap_or_else(|e| panic!("case {case}: {e}"));
        for host in 0..=7u8 {
            let cc = if (1..=6).contains(&host) {
                u32::from(host)
            } else {
                0
            };
            for proto in [6, 17, 132, 1, 58, 47, 0, 255] {
                let ps = if PORTED.contains(&proto) {
                    ports(&mut rng, &[&admin, &baseline])
                } else {
                    vec![rng.random()]
                };
                for port in ps {
                    let p = Packet {
                        iif: 1,
                        oif: 2,
                        src: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)),
                        dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, host)),
                        proto,
                        port,
                    };
                    let want = expected(&admin, &baseline, cc, proto, port);
                    assert_eq!(ended(&mut table, &p), want, "case {case}: {p:?} class {cc}");
                    *seen.entry(want.to_string()).or_default() += 1;
                }
            }
        }
    }
    eprintln!("{seen:?}");
    for e in ENDS {
        assert!(
            seen.get(e).is_some_and(|n| *n > 1000),
            "too few {e}: {seen:?}"
        );
    }
}

/// The cluster class maps and their classify rules give every peer address the cluster
/// class [`TierPlan::cclass_at`] gives it, on random clusters of both kinds (single
/// addresses overriding their ranges, to class 0 too).
#[test]
fn cluster_class_maps_classify_like_the_plan() {
    let (mut checked, mut nonzero, mut overridden) = (0usize, 0usize, 0usize);
    on_random_worlds(80, 1, |case, _, _, world, snaps, _| {
        for snap in snaps {
            let mut classes = Classes::default();
            let d = addresses(snap, &mut classes);
            let tp = tier_plan(snap, &d, &classes);
            let maps = ClusterClassMaps::of(&d, &tp);
            let epoch = 7;
            let mut c =
                vec![json!({"add": {"table": {"family": "inet", "name": super::super::TABLE}}})];
            c.extend(maps.add(epoch));
            c.push(cmd(
                "add",
                "chain",
                json!({"name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}),
            ));
            c.extend(classify("forward", "saddr", epoch));
            let mut table = Table::default();
            table
                .apply(&c)
                .unwrap_or_else(|e| panic!("case {case}: {e}"));
            for a in world.addresses() {
                let p = Packet {
                    iif: 1,
                    oif: 2,
                    src: a,
                    dst: a,
                    proto: 6,
                    port: 80,
                };
                let want = tp.cclass_at(&d, a);
                let (_, got) = table.run_marked(&p);
                assert_eq!(got, u128::from(want), "case {case} node {}: {a}", snap.node);
                checked += 1;
                nonzero += usize::from(want != 0);
                let single = match a {
                    IpAddr::V4(x) => maps.ccaddr4.contains_key(&x),
                    IpAddr::V6(x) => maps.ccaddr6.contains_key(&x),
                };
                overridden += usize::from(single && d.range_class_at(a).is_some());
            }
        }
    });
    eprintln!(
        "{checked} addresses, {nonzero} in a cluster class, {overridden} singles over a range"
    );
    assert!(
        nonzero > 1000 && overridden > 100,
        "{checked} {nonzero} {overridden}"
    );
}

/// Layout 7 rendered whole — address maps, cluster class maps, tier tables, tier chains,
/// NetworkPolicy rulesets and the local pod table — decides every packet as the fail-closed
/// spec does with the IR of both kinds (`render::tests::spec`): Admin Accept and Deny
/// final, Pass on to the NetworkPolicy ruleset where one isolates, else to Baseline.
#[test]
fn the_tier_layout_decides_like_the_spec() {
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    let mut checked = 0usize;
    on_random_worlds(120, 2, |case, round, rng, world, snaps, classes| {
        let snap = &snaps[0];
        let mut d = addresses(snap, classes);
        d.local = random_local(rng, snap);
        d.epoch = rng.random();
        let tp = tier_plan(snap, &d, classes);
        let kind = if snap.rules.iter().any(|r| r.tier != Tier::NetworkPolicy) {
            "tiered"
        } else {
            "np"
        };
        let mut table = Table::default();
        table
            .apply(&full_tiers(&d, &tp))
            .unwrap_or_else(|e| panic!("case {case}: {e}"));
        let what = format!("case {case} round {round}");
        for want in judged(rng, world, snaps, &d, &mut table, &what) {
            *seen.entry(format!("{kind} {want:?}")).or_default() += 1;
            checked += 1;
        }
    });
    eprintln!("{checked} packets; {seen:?}");
    for o in [Outcome::Pass, Outcome::Denied] {
        for kind in ["tiered", "np"] {
            let n = seen.get(&format!("{kind} {o:?}")).copied().unwrap_or(0);
            assert!(n > 1000, "too few {kind} {o:?}: {seen:?}");
        }
    }
}

/// A layout-7 delta turns the table of one version into exactly the full table of the next
/// (one epoch), in an order the kernel takes: nothing deleted while a rule or the local pod
/// table still names it, nothing named before it exists.
#[test]
fn tier_deltas_equal_full_tables() {
    let (mut deltas, mut chains_moved, mut tables_refilled) = (0usize, 0usize, 0usize);
    let (mut prev, mut epoch) = (None, 0u32);
    on_random_worlds(120, 4, |case, round, rng, _, snaps, classes| {
        if round == 0 {
            (prev, epoch) = (None, rng.random());
        }
        let snap = &snaps[0];
        let mut d = addresses(snap, classes);
        d.local = random_local(rng, snap);
        d.epoch = epoch;
        let tp = tier_plan(snap, &d, classes);
        let mut whole = Table::default();
        whole
            .apply(&full_tiers(&d, &tp))
            .unwrap_or_else(|e| panic!("case {case}: {e}"));
        if let Some((pd, ptp, mut table)) = prev.take() {
            let batch = delta_tiers((&pd, &ptp), (&d, &tp));
            let touched = |verb: &str, kind: &str, table_set: bool| {
                batch.iter().any(|c| {
                    c[verb][kind]["name"]
                        .as_str()
                        .is_some_and(|n| !table_set || n.starts_with('A') || n.starts_with('B'))
                })
            };
            chains_moved += usize::from(touched("delete", "chain", false));
            tables_refilled +=
                usize::from(touched("delete", "element", true) || touched("add", "element", true));
            Table::apply(&mut table, &batch)
                .unwrap_or_else(|e| panic!("case {case} round {round}: {e}"));
            let diff = table.differences(&whole);
            assert!(diff.is_empty(), "case {case} round {round}: {diff:#?}");
            deltas += 1;
        }
        prev = Some((d, tp, whole));
    });
    eprintln!(
        "{deltas} deltas; {chains_moved} deleted a chain, {tables_refilled} named a table's sets"
    );
    assert!(deltas > 300 && chains_moved > 30 && tables_refilled > 30);
}
