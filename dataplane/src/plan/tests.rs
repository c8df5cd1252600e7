//! The table content, interpreted the way the kernel evaluates it, decides every packet
//! exactly as the IR interpreter does — on random clusters.

use std::net::IpAddr;

use moat_policy::Index;
use moat_policy::ir::sim::{Fleet, Packet};
use moat_policy::testkit::parse_all;
use moat_policy::testkit::random::{Features, PROBES, World};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;

use super::*;

fn class_of(d: &Desired, a: IpAddr) -> u32 {
    let exact = match a {
        IpAddr::V4(a) => d.addr4.get(&a),
        IpAddr::V6(a) => d.addr6.get(&a),
    };
    if let Some(c) = exact {
        return *c;
    }
    match a {
        IpAddr::V4(a) => d
            .class4
            .iter()
            .find(|((lo, hi), _)| *lo <= a && a <= *hi)
            .map_or(0, |(_, c)| *c),
        IpAddr::V6(a) => d
            .class6
            .iter()
            .find(|((lo, hi), _)| *lo <= a && a <= *hi)
            .map_or(0, |(_, c)| *c),
    }
}

/// One ruleset chain, as nft evaluates it.
fn chain(d: &Desired, name: &str, peer: IpAddr, p: &Packet) -> bool {
    let rs = &d.rulesets[name];
    let ported = matches!(p.proto, 6 | 17 | 132);
    if rs.any {
        return true;
    }
    if ported
        && rs
            .ap
            .iter()
            .any(|(pr, a, b)| *pr == p.proto && *a <= p.port && p.port <= *b)
    {
        return true;
    }
    let c = class_of(d, peer);
    if rs.aa.contains(&c) {
        return true;
    }
    if ported
        && rs
            .gp
            .iter()
            .any(|(cl, pr, a, b)| *cl == c && *pr == p.proto && *a <= p.port && p.port <= *b)
    {
        return true;
    }
    if ported && rs.gx.contains(&(c, p.proto, p.port)) {
        return true;
    }
    if rs.egress && ported {
        let hit = match p.dst {
            IpAddr::V4(a) => rs.n4.contains(&(a, p.proto, p.port)),
            IpAddr::V6(a) => rs.n6.contains(&(a, p.proto, p.port)),
        };
        if hit {
            return true;
        }
    }
    false
}

fn egress(d: &Desired, p: &Packet) -> Option<bool> {
    let name = match p.src {
        IpAddr::V4(a) => d.eg4.get(&a),
        IpAddr::V6(a) => d.eg6.get(&a),
    }?;
    Some(chain(d, name, p.dst, p))
}

fn ingress(d: &Desired, p: &Packet) -> Option<bool> {
    let name = match p.dst {
        IpAddr::V4(a) => d.ing4.get(&a),
        IpAddr::V6(a) => d.ing6.get(&a),
    }?;
    Some(chain(d, name, p.src, p))
}

#[test]
fn the_table_decides_like_the_ir() {
    let mut f = Features::default();
    let mut checked = 0;
    for case in 0..400u64 {
        let mut rng = SmallRng::seed_from_u64(case);
        let mut world = World::generate(&mut rng, &mut f);
        let mut classes = Classes::default();
        for round in 0..3 {
            if round > 0 {
                world.mutate(&mut rng, &mut f, false);
            }
            let snaps = Index::build(parse_all(&world.objects())).snapshots();
            let fleet = Fleet::new(&snaps);
            let desired: Vec<_> = snaps
                .iter()
                .map(|s| (s, desired(s, &mut classes)))
                .collect();
            let addrs = world.addresses();
            for _ in 0..300 {
                let src = *addrs.choose(&mut rng).unwrap();
                let same: Vec<_> = addrs
                    .iter()
                    .copied()
                    .filter(|a| a.is_ipv4() == src.is_ipv4())
                    .collect();
                let dst = *same.choose(&mut rng).unwrap();
                let (proto, port) = *PROBES.choose(&mut rng).unwrap();
                let p = Packet {
                    src,
                    dst,
                    proto,
                    port,
                };
                for (snap, d) in &desired {
                    // Traffic between a node and its own pods never reaches the forward hook.
                    if snap.node_addrs.contains(&src) || snap.node_addrs.contains(&dst) {
                        continue;
                    }
                    if let Some(got) = egress(d, &p) {
                        assert_eq!(
                            got,
                            fleet.egress_allows(&p),
                            "case {case}: egress {p:?} on {}",
                            snap.node
                        );
                        checked += 1;
                    }
                    if let Some(got) = ingress(d, &p) {
                        assert_eq!(
                            got,
                            fleet.ingress_allows(&p),
                            "case {case}: ingress {p:?} on {}",
                            snap.node
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 10_000, "{checked}");
}

#[test]
fn classes_are_stable_across_small_changes() {
    let mut rng = SmallRng::seed_from_u64(9);
    let mut f = Features::default();
    let world = World::generate(&mut rng, &mut f);
    let index = Index::build(parse_all(&world.objects()));
    let snap = index.snapshot(&index.nodes()[0].node).unwrap();
    let mut classes = Classes::default();
    let a = desired(&snap, &mut classes);
    let b = desired(&snap, &mut classes);
    assert_eq!(a, b, "recomputing gives identical content");
}

#[test]
fn blocks_with_excepts_become_disjoint_intervals() {
    use moat_policy::model::Cidr;
    let c = |s: &str| Cidr::parse(s).unwrap().cidr;
    let m = Members::Block {
        cidr: c("10.0.0.0/8"),
        except: vec![c("10.1.0.0/16"), c("10.1.2.0/24"), c("10.255.0.0/16")],
    };
    let got: Vec<_> = intervals(&m, v4)
        .into_iter()
        .map(|(a, b)| {
            (
                Ipv4Addr::from(a as u32).to_string(),
                Ipv4Addr::from(b as u32).to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("10.0.0.0".into(), "10.0.255.255".into()),
            ("10.2.0.0".into(), "10.254.255.255".into())
        ]
        .to_vec()
        .into_iter()
        .map(|(a, b): (String, String)| (a, b))
        .collect::<Vec<_>>()
    );
    let all6 = Members::Block {
        cidr: c("::/0"),
        except: vec![c("ffff::/16")],
    };
    assert_eq!(intervals(&all6, v6), vec![(0, (0xffffu128 << 112) - 1)]);
}
