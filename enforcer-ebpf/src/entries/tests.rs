use super::*;
use rand::{Rng, SeedableRng, rngs::SmallRng};

fn covered(ps: &[(u128, u32)], bits: u32) -> Vec<(u128, u128)> {
    ps.iter()
        .map(|(p, len)| {
            let size = bits - len;
            let end = if size >= 128 {
                u128::MAX
            } else {
                p + ((1u128 << size) - 1)
            };
            (*p, end)
        })
        .collect()
}

#[test]
fn prefixes_cover_exactly_the_range() {
    let mut rng = SmallRng::seed_from_u64(5);
    for bits in [16u32, 32, 128] {
        let max = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        for _ in 0..2_000 {
            let a = rng.random::<u128>() & max;
            let b = rng.random::<u128>() & max;
            let (lo, hi) = (a.min(b), a.max(b));
            let blocks = covered(&prefixes(lo, hi, bits), bits);
            assert_eq!(blocks.first().unwrap().0, lo);
            assert_eq!(blocks.last().unwrap().1, hi);
            for w in blocks.windows(2) {
                assert_eq!(w[0].1 + 1, w[1].0, "gap or overlap in {lo}..{hi}");
            }
            assert!(blocks.len() <= 2 * bits as usize);
        }
    }
    assert_eq!(prefixes(0, 65535, 16), vec![(0, 0)]);
    assert_eq!(prefixes(0, u128::MAX, 128), vec![(0, 0)]);
    assert_eq!(prefixes(80, 80, 16), vec![(80, 16)]);
    assert_eq!(prefixes(1, 3, 16), vec![(1, 16), (2, 15)]);
}

#[test]
fn port_ranges_become_port_prefixes_and_any_is_one_short_prefix() {
    let mut rs = Ruleset {
        any: true,
        ..Default::default()
    };
    rs.ap.insert((6, 8080, 8081));
    rs.gx.insert((3, 17, 53));
    rs.aa.insert(4);
    let mut d = Desired::default();
    d.rulesets.insert("i_x".into(), rs);
    d.ing4.insert(Ipv4Addr::new(10, 0, 0, 1), "i_x".into());
    let e = entries(&d, &mut RulesetIds::default());
    let ports: Vec<_> = e.ports.keys().map(|(l, k)| (*l, k.data)).collect();
    assert!(ports.contains(&(72, PortKey::new(0, 1, CLASS_ANY, 0, 0).data)));
    assert!(ports.contains(&(72, PortKey::new(0, 1, 4, 0, 0).data)));
    assert!(ports.contains(&(95, PortKey::new(0, 1, CLASS_ANY, 6, 8080).data)));
    assert!(ports.contains(&(96, PortKey::new(0, 1, 3, 17, 53).data)));
    assert_eq!(ports.len(), 4);
    assert_eq!(e.endpoints.len(), 1);
}

#[test]
fn ruleset_numbers_are_stable_and_reused() {
    let mut ids = RulesetIds::default();
    let mut d = Desired::default();
    d.rulesets.insert("a".into(), Ruleset::default());
    d.rulesets.insert("b".into(), Ruleset::default());
    entries(&d, &mut ids);
    let (a, b) = (ids.id("a"), ids.id("b"));
    d.rulesets.remove("a");
    d.rulesets.insert("c".into(), Ruleset::default());
    entries(&d, &mut ids);
    assert_eq!(ids.id("b"), b);
    assert_eq!(ids.id("c"), a, "a freed number is reused");
}

#[test]
fn diff_replays_old_into_new() {
    let mut d = Desired::default();
    d.addr4.insert(Ipv4Addr::new(10, 0, 0, 1), 1);
    d.addr4.insert(Ipv4Addr::new(10, 0, 0, 2), 2);
    let mut ids = RulesetIds::default();
    let old = entries(&d, &mut ids);
    d.addr4.remove(&Ipv4Addr::new(10, 0, 0, 1));
    d.addr4.insert(Ipv4Addr::new(10, 0, 0, 2), 3);
    d.class4.insert(
        (Ipv4Addr::new(10, 1, 0, 0), Ipv4Addr::new(10, 1, 0, 255)),
        4,
    );
    let new = entries(&d, &mut ids);
    let diff = Diff::between(&old, &new);
    let mut addrs = old.addrs.clone();
    for (k, v) in &diff.addrs.0 {
        addrs.insert(*k, *v);
    }
    for k in &diff.addrs.1 {
        addrs.remove(k);
    }
    assert_eq!(addrs, new.addrs);
    assert_eq!(diff.ranges.0.len(), 1);
    assert_eq!(diff.ranges.0[0].0.0, 16 + 24);
}

#[test]
fn capacity_counts_half_of_each_map() {
    let mut e = Entries::default();
    for i in 0..=(MAX_ENDPOINTS / 2) as u32 {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&i.to_be_bytes());
        e.endpoints.insert(
            EndpointKey {
                slot: 0,
                family: FAMILY_V4,
                dir: DIR_INGRESS,
                _pad: 0,
                addr,
            },
            1,
        );
    }
    assert!(matches!(
        e.check_capacity(),
        Err(EntriesError::Overflow {
            map: "ENDPOINTS",
            ..
        })
    ));
}

/// The map difference of an in-place plan patch equals the difference of the whole entry
/// sets, on random clusters and membership-only deltas, and is no larger.
#[test]
fn patched_plans_give_the_same_entries_as_whole_ones() {
    use moat_dataplane::plan::incremental::{applies, cache, patch_in_place};
    use moat_dataplane::plan::{Classes, desired};
    use moat_policy::Index;
    use moat_policy::ir::delta;
    use moat_policy::testkit::parse_all;
    use moat_policy::testkit::random::{Features, World};

    let mut f = Features::default();
    let mut patched_count = 0;
    for case in 0..60u64 {
        let mut rng = SmallRng::seed_from_u64(0xeb_f000 + case);
        let mut world = World::generate(&mut rng, &mut f);
        let snaps = |w: &World| Index::build(parse_all(&w.objects())).snapshots();
        let mut old = snaps(&world)[0].clone();
        let mut classes = Classes::default();
        let mut ids = RulesetIds::default();
        let mut plan = desired(&old, &mut classes);
        let mut c = cache(&old, &plan);
        for step in 0..20 {
            world.mutate(&mut rng, &mut f, false);
            let Some(new) = snaps(&world).into_iter().find(|s| s.node == old.node) else {
                break;
            };
            let dl = delta::diff(&old, &new);
            if applies(&old, &dl) {
                let before = entries(&plan, &mut ids);
                let log = patch_in_place(&mut plan, &mut c, &mut classes, &old, &new, &dl);
                let diff = patched(&log, &mut ids);
                let want = entries(&plan, &mut ids);
                let mut got = before.clone();
                got.apply(&diff);
                assert_eq!(got, want, "case {case} step {step}");
                assert_eq!(
                    diff.len(),
                    Diff::between(&before, &want).len(),
                    "case {case} step {step}: the patch writes no more than the change"
                );
                patched_count += 1;
            } else {
                plan = desired(&new, &mut classes);
                c = cache(&new, &plan);
            }
            old = new;
        }
    }
    assert!(patched_count >= 100, "{patched_count} patched deltas");
}

/// A ruleset with deny entries: every key carries its verdict (a key both sides name, which
/// the plan never makes, denies), and an endpoint of a ruleset with named-port rules is
/// flagged even before it has a named entry.
#[test]
fn deny_entries_carry_their_verdict_and_named_rulesets_are_flagged() {
    use moat_dataplane::plan::{Desired, Ruleset};
    let mut rs = Ruleset {
        any: true,
        egress: true,
        named_ports: true,
        ..Default::default()
    };
    rs.aa.insert(1);
    rs.deny.gx.insert((1, 6, 80));
    rs.deny.aa.insert(2);
    rs.gx.insert((2, 6, 443));
    rs.deny.ap.insert((17, 53, 53));
    rs.ap.insert((17, 53, 53));
    let mut d = Desired::default();
    d.rulesets.insert("e_tiered".into(), rs);
    d.rulesets.insert("e_plain".into(), Ruleset::default());
    d.eg4.insert("10.0.0.1".parse().unwrap(), "e_tiered".into());
    d.eg4.insert("10.0.0.2".parse().unwrap(), "e_plain".into());
    let mut ids = RulesetIds::default();
    let e = entries(&d, &mut ids);
    let id = ids.id("e_tiered");
    let v = |len: u32, class: u32, proto: u8, port: u16| {
        e.ports
            .get(&(len, PortKey::new(0, id, class, proto, port)))
            .copied()
    };
    assert_eq!(v(72, CLASS_ANY, 0, 0), Some(VERDICT_ALLOW));
    assert_eq!(v(72, 1, 0, 0), Some(VERDICT_ALLOW));
    assert_eq!(v(96, 1, 6, 80), Some(VERDICT_DENY));
    assert_eq!(v(72, 2, 0, 0), Some(VERDICT_DENY));
    assert_eq!(v(96, 2, 6, 443), Some(VERDICT_ALLOW));
    assert_eq!(v(96, CLASS_ANY, 17, 53), Some(VERDICT_DENY), "both: deny");
    assert_eq!(e.ports.len(), 6);
    let flags: Vec<u32> = e.endpoints.values().map(|v| v & RULESET_NAMED).collect();
    assert_eq!(flags, [RULESET_NAMED, 0]);
}
