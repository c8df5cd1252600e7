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
    if rs.ordered() {
        return ordered_chain(d, rs, peer, p);
    }
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

/// A ruleset with deny entries: most specific lookup first, the first hit decides.
fn ordered_chain(d: &Desired, rs: &Ruleset, peer: IpAddr, p: &Packet) -> bool {
    let ported = matches!(p.proto, 6 | 17 | 132);
    let x = &rs.deny;
    if rs.egress && ported {
        let (allow, deny) = match p.dst {
            IpAddr::V4(a) => (
                rs.n4.contains(&(a, p.proto, p.port)),
                x.n4.contains(&(a, p.proto, p.port)),
            ),
            IpAddr::V6(a) => (
                rs.n6.contains(&(a, p.proto, p.port)),
                x.n6.contains(&(a, p.proto, p.port)),
            ),
        };
        assert!(!(allow && deny), "a key both allowed and denied");
        if allow || deny {
            return allow;
        }
    }
    let c = class_of(d, peer);
    let in_gp = |set: &BTreeSet<(u32, u8, u16, u16)>| {
        set.iter()
            .any(|(cl, pr, a, b)| *cl == c && *pr == p.proto && *a <= p.port && p.port <= *b)
    };
    let in_ap = |set: &BTreeSet<(u8, u16, u16)>| {
        set.iter()
            .any(|(pr, a, b)| *pr == p.proto && *a <= p.port && p.port <= *b)
    };
    let levels = [
        (
            ported && rs.gx.contains(&(c, p.proto, p.port)),
            ported && x.gx.contains(&(c, p.proto, p.port)),
        ),
        (ported && in_gp(&rs.gp), ported && in_gp(&x.gp)),
        (rs.aa.contains(&c), x.aa.contains(&c)),
        (ported && in_ap(&rs.ap), ported && in_ap(&x.ap)),
    ];
    for (allow, deny) in levels {
        assert!(!(allow && deny), "a key both allowed and denied");
        if allow || deny {
            return allow;
        }
    }
    rs.any
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

/// Random clusters of both kinds (NetworkPolicies and cluster policies together), three
/// rounds each with 300 random packets: `plan` plans every node, `judge` compares one node's
/// plan with the IR on one packet (`Err`: the first disagreement, which ends the run).
fn on_random_clusters<P>(
    cases: std::ops::Range<u64>,
    mut plan: impl FnMut(&NodeSnapshot, &mut Classes) -> P,
    mut judge: impl FnMut(&NodeSnapshot, &P, &Fleet<'_>, &Packet) -> Result<(), String>,
) -> Option<String> {
    let mut f = Features::default();
    for case in cases {
        let mut rng = SmallRng::seed_from_u64(case);
        let mut world = World::generate(&mut rng, &mut f);
        let mut classes = Classes::default();
        for round in 0..3 {
            if round > 0 {
                world.mutate(&mut rng, &mut f, false);
            }
            let snaps = Index::build(parse_all(&world.objects())).snapshots();
            let fleet = Fleet::new(&snaps);
            let plans: Vec<_> = snaps.iter().map(|s| (s, plan(s, &mut classes))).collect();
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
                for (snap, planned) in &plans {
                    // Traffic between a node and its own pods never reaches the forward hook.
                    if snap.node_addrs.contains(&src) || snap.node_addrs.contains(&dst) {
                        continue;
                    }
                    if let Err(e) = judge(snap, planned, &fleet, &p) {
                        return Some(format!("case {case}: {e}"));
                    }
                }
            }
        }
    }
    None
}

/// Compares the table with the IR on random clusters: the first disagreement, and how many
/// verdicts were compared.
fn first_mismatch(cases: std::ops::Range<u64>) -> (Option<String>, usize) {
    let mut checked = 0;
    let wrong = on_random_clusters(cases, desired, |snap, d, fleet, p| {
        let sides = [
            ("egress", egress(d, p), fleet.egress_allows(p)),
            ("ingress", ingress(d, p), fleet.ingress_allows(p)),
        ];
        for (side, got, want) in sides {
            let Some(got) = got else { continue };
            if got != want {
                return Err(format!(
                    "{side} {p:?} on {}: table {got}, IR {want}",
                    snap.node
                ));
            }
            checked += 1;
        }
        Ok(())
    });
    (wrong, checked)
}

#[test]
fn the_table_decides_like_the_ir() {
    let (wrong, checked) = first_mismatch(0..400);
    assert_eq!(wrong, None);
    assert!(checked > 10_000, "{checked}");
}

/// The two ways a per-lookup "first match" goes wrong for tiers, planted in the layout:
/// the random comparison above catches each.
#[test]
fn planted_tier_layout_mistakes_are_caught() {
    use super::plant::{self, Plant};
    for p in [Plant::AnyPeerNotFolded, Plant::OneGroupPerClass] {
        let (wrong, _) = plant::with(p, || first_mismatch(0..400));
        assert!(wrong.is_some(), "{p:?} was not caught");
        eprintln!("{p:?} caught: {}", wrong.unwrap());
    }
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

/// A node with three pods: `big` is selected by a policy allowing 300 /32 blocks on 300
/// ports (90,000 class·port entries), `small` by one allowing one peer on one port, and
/// `open` by nothing.
fn overflow_snapshot() -> NodeSnapshot {
    use moat_policy::model::K8sObject;
    use moat_policy::testkit::k8s;
    use serde_json::json;
    let pod = |name: &str, ip: &str| {
        K8sObject::Pod(k8s(json!({
            "metadata": {"name": name, "namespace": "t", "labels": {"app": name}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        })))
    };
    let blocks: Vec<_> = (0..300u32)
        .map(|i| json!({"ipBlock": {"cidr": format!("{}/32", Ipv4Addr::from(0x0b00_0000 + i))}}))
        .collect();
    let ports: Vec<_> = (0..300u16).map(|i| json!({"port": 1000 + i * 2})).collect();
    let objs = vec![
        K8sObject::Node(k8s(json!({"metadata": {"name": "n1"}}))),
        pod("big", "10.0.0.1"),
        pod("small", "10.0.0.2"),
        pod("open", "10.0.0.3"),
        K8sObject::NetworkPolicy(k8s(json!({
            "metadata": {"name": "huge", "namespace": "t"},
            "spec": {"podSelector": {"matchLabels": {"app": "big"}},
                     "ingress": [{"from": blocks, "ports": ports}]},
        }))),
        K8sObject::NetworkPolicy(k8s(json!({
            "metadata": {"name": "tiny", "namespace": "t"},
            "spec": {"podSelector": {"matchLabels": {"app": "small"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "open"}}}],
                                  "ports": [{"port": 80}]}]},
        }))),
    ];
    let index = Index::build(parse_all(&objs));
    index.snapshot("n1").unwrap()
}

#[test]
fn a_version_over_budget_denies_what_does_not_fit_and_keeps_the_rest_exact() {
    let snap = overflow_snapshot();
    let full = desired(&snap, &mut Classes::default());
    assert!(full.degraded.is_empty());
    assert!(full.elements() > 90_000);
    let budget = Budget::total(10_000);
    let cut = desired_within(
        &snap,
        &mut Classes::default(),
        &LocalPods::default(),
        &budget,
    );
    assert!(cut.elements() <= 10_000, "{}", cut.elements());
    assert_eq!(cut.degraded.len(), 1, "{:?}", cut.degraded);
    let deg = &cut.degraded[0];
    assert!(!deg.egress);
    assert!(deg.reason.contains("table elements"), "{}", deg.reason);
    let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    // The big pod denies every ingress; the small one keeps its exact rules; the open one
    // stays open.
    assert_eq!(cut.ing4[&a("10.0.0.1")], DENY_INGRESS);
    assert!(cut.rulesets[DENY_INGRESS] == Ruleset::default());
    assert_eq!(cut.ing4[&a("10.0.0.2")], full.ing4[&a("10.0.0.2")]);
    let name = &cut.ing4[&a("10.0.0.2")];
    assert_eq!(cut.rulesets[name].gx.len(), full.rulesets[name].gx.len());
    assert!(!cut.ing4.contains_key(&a("10.0.0.3")));
    // Decided on packets like the IR would after replacing the big pod's rules by none.
    for (peer, port, want) in [("11.0.0.5", 1002, false), ("10.0.0.3", 80, true)] {
        let p = Packet {
            src: IpAddr::V4(a(peer)),
            dst: IpAddr::V4(a(if want { "10.0.0.2" } else { "10.0.0.1" })),
            proto: 6,
            port,
        };
        assert_eq!(ingress(&cut, &p), Some(want), "{peer} -> {port}");
        assert_eq!(
            ingress(&full, &p),
            Some(true),
            "{peer} -> {port}, unlimited"
        );
    }
}

#[test]
fn prefix_weighted_budgets_count_what_an_lpm_trie_needs() {
    let snap = overflow_snapshot();
    // Enough for every element counted once, not for the ranges as prefixes: the plan
    // holds no port ranges here (single ports), so the prefix weighting changes nothing.
    let b = Budget {
        prefixes: true,
        ..Budget::total(100_000)
    };
    let d = desired_within(&snap, &mut Classes::default(), &LocalPods::default(), &b);
    assert!(d.degraded.is_empty());
    let tight = Budget {
        ports_exact: 1_000,
        ..b
    };
    let d = desired_within(
        &snap,
        &mut Classes::default(),
        &LocalPods::default(),
        &tight,
    );
    assert_eq!(d.degraded.len(), 1);
    assert!(
        d.degraded[0].reason.contains("single-port"),
        "{}",
        d.degraded[0].reason
    );
}

#[test]
fn groups_too_big_for_the_address_maps_deny_their_users() {
    let snap = overflow_snapshot();
    let b = Budget {
        addrs: 100,
        ..Budget::UNLIMITED
    };
    let d = desired_within(&snap, &mut Classes::default(), &LocalPods::default(), &b);
    assert!(d.addr4.len() + d.addr6.len() <= 100);
    assert_eq!(d.degraded.len(), 1, "{:?}", d.degraded);
    assert!(
        d.degraded[0].reason.contains("peer groups"),
        "{}",
        d.degraded[0].reason
    );
    assert_eq!(d.ing4[&"10.0.0.1".parse().unwrap()], DENY_INGRESS);
}

#[test]
fn check_counts_a_plan_as_it_was_built() {
    let snap = overflow_snapshot();
    let full = desired(&snap, &mut Classes::default());
    assert!(full.check(&Budget::total(full.elements())).is_ok());
    let e = full.check(&Budget::total(full.elements() - 1)).unwrap_err();
    assert_eq!(e.kind, budget::Kind::Total);
    let cut = desired_within(
        &snap,
        &mut Classes::default(),
        &LocalPods::default(),
        &Budget::total(10_000),
    );
    assert!(cut.check(&Budget::total(10_000)).is_ok());
}

/// On a dataplane that cannot take first-hit lookups (`Budget::tiers` off), a rule list with
/// a ClusterNetworkPolicy rule must be denied whole: an Admin Deny enforced as if it were an
/// allow (every rule used to read as an allow here) would open exactly what the platform
/// team closed.
#[test]
fn cluster_policy_rules_are_denied_never_read_as_allows_without_tiers() {
    use moat_policy::model::K8sObject;
    use serde_json::json;
    fn k8s<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }
    let pod = |name: &str, ip: &str| {
        K8sObject::Pod(k8s(json!({
            "metadata": {"name": name, "namespace": "t", "labels": {"app": name}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"podIP": ip},
        })))
    };
    let objs = vec![
        K8sObject::Node(k8s(json!({"metadata": {"name": "n1"}}))),
        pod("isolated", "10.0.0.1"),
        pod("open", "10.0.0.2"),
        pod("untouched", "10.0.0.3"),
        K8sObject::NetworkPolicy(k8s(json!({
            "metadata": {"name": "allow-all", "namespace": "t"},
            "spec": {"podSelector": {"matchLabels": {"app": "isolated"}}, "ingress": [{}]},
        }))),
        K8sObject::ClusterNetworkPolicy(k8s(json!({
            "metadata": {"name": "deny-from-open"},
            "spec": {"tier": "Admin", "priority": 1,
                     "subject": {"pods": {"namespaceSelector": {},
                                          "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["isolated", "open"]}]}}},
                     "ingress": [{"action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "untouched"}}}}]}]},
        }))),
    ];
    let index = Index::build(parse_all(&objs));
    let snap = index.snapshot("n1").unwrap();
    let no_tiers = Budget {
        tiers: false,
        ..Budget::UNLIMITED
    };
    let d = desired_within(
        &snap,
        &mut Classes::default(),
        &LocalPods::default(),
        &no_tiers,
    );
    let a = |s: &str| -> std::net::Ipv4Addr { s.parse().unwrap() };
    // Both selected pods, the isolated one and the one no NetworkPolicy isolates, are
    // denied whole and reported; the pod the policy does not select keeps no entry.
    assert_eq!(
        d.ing4.get(&a("10.0.0.1")).map(String::as_str),
        Some(DENY_INGRESS)
    );
    assert_eq!(
        d.ing4.get(&a("10.0.0.2")).map(String::as_str),
        Some(DENY_INGRESS)
    );
    assert_eq!(d.ing4.get(&a("10.0.0.3")), None);
    assert_eq!(d.degraded.len(), 2, "{:?}", d.degraded);
    assert!(
        d.degraded
            .iter()
            .all(|g| g.reason.contains("ClusterNetworkPolicy"))
    );
    // The denial is what the dataplanes will enforce: no ruleset allows anything.
    assert_eq!(d.rulesets[DENY_INGRESS], Ruleset::default());
}

/// The two ways "first match per lookup" goes wrong, laid out and checked against the IR
/// interpreter on every pair and probe: an any-peer allow (a NetworkPolicy rule without
/// peers) must not shadow an Admin Deny for one namespace, and a shorter-prefix Deny must not
/// override a longer-prefix Accept ranked before it (nor the reverse).
#[test]
fn cluster_tiers_are_laid_out_most_specific_first() {
    use moat_policy::model::K8sObject;
    use serde_json::json;
    fn k8s<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }
    let pod = |ns: &str, name: &str, ip: &str| {
        K8sObject::Pod(k8s(json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "web", "containerPort": 8080, "protocol": "TCP"}]}]},
            "status": {"podIP": ip},
        })))
    };
    let ns = |n: &str| K8sObject::Namespace(k8s(json!({"metadata": {"name": n}})));
    let objs = vec![
        K8sObject::Node(k8s(json!({"metadata": {"name": "n1"}}))),
        ns("x"),
        ns("y"),
        ns("z"),
        pod("x", "a", "10.0.0.1"),
        pod("x", "b", "10.0.1.1"),
        pod("y", "a", "10.0.0.2"),
        pod("y", "b", "10.0.1.2"),
        pod("z", "a", "10.0.2.3"),
        // Any peer may reach x on TCP 80 and 81.
        K8sObject::NetworkPolicy(k8s(json!({
            "metadata": {"name": "web", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80}, {"port": 81}]}]},
        }))),
        K8sObject::ClusterNetworkPolicy(k8s(json!({
            "metadata": {"name": "guard"},
            "spec": {"tier": "Admin", "priority": 1,
                     "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
                     "ingress": [
                         {"action": "Deny", "from": [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
                          "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
                         {"action": "Pass", "from": [{"namespaces": {}}],
                          "protocols": [{"tcp": {"destinationPort": {"range": {"start": 81, "end": 90}}}}]},
                         {"action": "Accept", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}}],
                          "protocols": [{"destinationNamedPort": "web"}]},
                     ],
                     "egress": [
                         {"action": "Accept", "to": [{"networks": ["10.0.1.0/24"]}],
                          "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
                         {"action": "Deny", "to": [{"networks": ["10.0.0.0/16"]}]},
                     ]},
        }))),
        K8sObject::ClusterNetworkPolicy(k8s(json!({
            "metadata": {"name": "baseline"},
            "spec": {"tier": "Baseline", "priority": 5,
                     "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "b"}}}},
                     "ingress": [
                         {"action": "Pass", "from": [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "z"}}}]},
                         {"action": "Deny", "from": [{"namespaces": {}}]},
                     ],
                     "egress": [
                         {"action": "Deny", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}}],
                          "protocols": [{"destinationNamedPort": "web"}]},
                     ]},
        }))),
    ];
    let index = Index::build(parse_all(&objs));
    let snap = index.snapshot("n1").unwrap();
    let fleet = Fleet::new(std::slice::from_ref(&snap));
    let d = desired(&snap, &mut Classes::default());
    assert!(d.degraded.is_empty(), "{:?}", d.degraded);
    assert!(
        d.rulesets.values().any(Ruleset::ordered),
        "some list denies"
    );
    let ips: Vec<IpAddr> = [
        "10.0.0.1", "10.0.1.1", "10.0.0.2", "10.0.1.2", "10.0.2.3", "10.9.9.9",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let (mut allowed, mut denied) = (0, 0);
    for src in &ips {
        for dst in &ips {
            for (proto, port) in [
                (6, 80),
                (6, 81),
                (6, 85),
                (6, 8080),
                (6, 443),
                (17, 80),
                (1, 0),
            ] {
                let p = Packet {
                    src: *src,
                    dst: *dst,
                    proto,
                    port,
                };
                let eg = egress(&d, &p).unwrap_or(true);
                let ing = ingress(&d, &p).unwrap_or(true);
                assert_eq!(eg, fleet.egress_allows(&p), "egress {p:?}");
                assert_eq!(ing, fleet.ingress_allows(&p), "ingress {p:?}");
                if eg && ing { allowed += 1 } else { denied += 1 }
            }
        }
    }
    assert!(
        allowed > 20 && denied > 20,
        "{allowed} allowed, {denied} denied"
    );
    // The two named mistakes, spelled out.
    let tcp = |s: &str, t: &str, port| Packet {
        src: s.parse().unwrap(),
        dst: t.parse().unwrap(),
        proto: 6,
        port,
    };
    assert_eq!(
        ingress(&d, &tcp("10.0.0.2", "10.0.0.1", 80)),
        Some(false),
        "y → x:80 denied over the any-peer allow"
    );
    assert_eq!(
        ingress(&d, &tcp("10.0.2.3", "10.0.0.1", 80)),
        Some(true),
        "z → x:80 allowed by it"
    );
    assert_eq!(
        egress(&d, &tcp("10.0.0.1", "10.0.1.2", 80)),
        Some(true),
        "/24 Accept before the /16 Deny"
    );
    assert_eq!(
        egress(&d, &tcp("10.0.0.1", "10.0.0.2", 80)),
        Some(false),
        "outside the /24: the /16 Deny"
    );
}

/// A list naming a rule the snapshot does not hold (only a server bug makes one) is denied
/// whole, also where nothing isolates: the missing rule could have been a Deny.
#[test]
fn a_list_naming_a_missing_rule_is_denied_whole() {
    let mut snap = overflow_snapshot();
    let small: Vec<RuleId> = snap
        .endpoints
        .iter()
        .flat_map(|e| e.ingress.rules.iter().copied())
        .collect();
    let gone = *small.last().expect("a rule");
    snap.rules.retain(|r| r.id != gone);
    let d = desired(&snap, &mut Classes::default());
    assert!(
        d.degraded
            .iter()
            .any(|g| g.rules.contains(&gone) && g.reason.contains("does not hold")),
        "{:?}",
        d.degraded
    );
}

/// Named entries whose addresses share a class still resolve per named-port rule: two
/// Admin rules on the same named port, one denying one pod set, one accepting another,
/// with nothing else telling those pods apart.
#[test]
fn named_entries_of_one_class_follow_their_own_rules() {
    use crate::plan::fixtures::{admin_egress, base, client_node, pod};
    use serde_json::json;

    let mut objects = base();
    objects.extend([
        pod("denied", "n2", "10.0.1.1", json!({"app": "x"})),
        pod("accepted", "n2", "10.0.1.2", json!({"app": "y"})),
        admin_egress(
            "deny-x",
            1,
            "Deny",
            json!({"matchLabels": {"app": "x"}}),
            true,
        ),
        admin_egress(
            "accept-y",
            2,
            "Accept",
            json!({"matchLabels": {"app": "y"}}),
            true,
        ),
    ]);
    let snap = client_node(&objects);
    let d = desired(&snap, &mut Classes::default());
    let rs = d
        .rulesets
        .values()
        .find(|rs| rs.named_ports)
        .expect("the client's egress ruleset");
    let key = |ip: &str| (ip.parse().unwrap(), 6u8, 8080u16);
    assert!(rs.deny.n4.contains(&key("10.0.1.1")), "{rs:?}");
    assert!(rs.n4.contains(&key("10.0.1.2")), "{rs:?}");
}

/// Two different rule lists whose names collide (48 bits of a hash: not expected, but a
/// shared chain would give one list's endpoints the other's rules) are both denied.
#[test]
fn colliding_list_names_deny_both_lists() {
    use super::fixtures::{admin_egress, base, client_node, pod};
    use moat_policy::model::K8sObject;
    use moat_policy::testkit::k8s;
    use serde_json::json;
    let mut objects = base();
    objects.push(pod("server", "n2", "10.0.0.2", json!({"app": "s"})));
    objects.push(pod("other", "n1", "10.0.0.3", json!({"app": "d"})));
    objects.push(admin_egress(
        "a",
        1,
        "Deny",
        json!({"matchLabels": {"app": "s"}}),
        false,
    ));
    objects.push(K8sObject::NetworkPolicy(k8s(json!({
        "metadata": {"name": "d-out", "namespace": "ns"},
        "spec": {"podSelector": {"matchLabels": {"app": "d"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "s"}}}]}]},
    }))));
    let snap = client_node(&objects);
    let a = |s: &str| -> std::net::Ipv4Addr { s.parse().unwrap() };
    let honest = desired(&snap, &mut Classes::default());
    assert!(honest.degraded.is_empty(), "{:?}", honest.degraded);
    assert_ne!(honest.eg4[&a("10.0.0.1")], honest.eg4[&a("10.0.0.3")]);
    let colliding =
        |egress: bool, _: bool, _: &[RuleId]| if egress { "e_same" } else { "i_same" }.to_string();
    let d = super::desired_named(
        &snap,
        &mut Classes::default(),
        &LocalPods::default(),
        &Budget::UNLIMITED,
        colliding,
    );
    assert_eq!(d.eg4[&a("10.0.0.1")], DENY_EGRESS);
    assert_eq!(d.eg4[&a("10.0.0.3")], DENY_EGRESS);
    assert_eq!(d.degraded.len(), 1, "{:?}", d.degraded);
    assert!(d.degraded[0].reason.contains("hash to its chain name"));
}

/// Layout 7's tier plan decides a direction: the Admin table, then the NetworkPolicy
/// ruleset (isolated) or the Baseline table. Also says whether a tier table decided.
fn tier_decides(
    tp: &tier_tables::TierPlan,
    d: &Desired,
    local: IpAddr,
    egress: bool,
    peer: IpAddr,
    p: &Packet,
) -> Option<(bool, bool)> {
    use moat_policy::ir::Action;
    let t = tp.endpoints.get(&(local, egress))?;
    if t.denied {
        return Some((false, false));
    }
    let cc = tp.cclass_at(d, peer);
    let look = |name: &Option<String>| {
        // A table left out reads as a dataplane would read it: a miss.
        name.as_ref()
            .and_then(|n| tp.tables.get(n))
            .and_then(|t| t.lookup(cc, p.proto, p.port))
    };
    match look(&t.admin) {
        Some(Action::Allow) => return Some((true, true)),
        Some(Action::Deny) => return Some((false, true)),
        _ => {}
    }
    if let Some(np) = &t.np {
        let mut dd = d.clone();
        let rs = tp.np.get(np).cloned().unwrap_or_default();
        dd.rulesets.insert(np.clone(), rs);
        return Some((chain(&dd, np, peer, p), false));
    }
    match look(&t.baseline) {
        Some(Action::Deny) => Some((false, true)),
        Some(_) => Some((true, true)),
        None => Some((true, false)),
    }
}

/// [`first_mismatch`] for layout 7's tier plan within `budget`: the first disagreement
/// with the IR, the verdicts compared, how many of them a tier table decided, and how many
/// fell on a direction the budget denied (those must deny; the rest must be exact).
fn first_tier_mismatch(
    cases: std::ops::Range<u64>,
    budget: &Budget,
) -> (Option<String>, usize, usize, usize) {
    let (mut checked, mut by_table, mut degraded) = (0, 0, 0);
    let plan = |s: &NodeSnapshot, classes: &mut Classes| {
        let d = desired(s, classes);
        let tp = tier_tables::tier_plan_within(s, &d, classes, budget);
        assert_eq!(tp.check(budget), Ok(()), "a plan within its budget");
        (d, tp)
    };
    let wrong = on_random_clusters(cases, plan, |snap, (d, tp), fleet, p| {
        let sides = [
            ("egress", (p.src, true), p.dst, fleet.egress_allows(p)),
            ("ingress", (p.dst, false), p.src, fleet.ingress_allows(p)),
        ];
        for (side, at, peer, want) in sides {
            let Some((got, table)) = tier_decides(tp, d, at.0, at.1, peer, p) else {
                continue;
            };
            // A denied direction must deny; the rest must be exact.
            let denied = tp.endpoints[&at].denied;
            let ok = if denied { !got } else { got == want };
            if !ok {
                return Err(format!(
                    "{side} {p:?} on {}: tier plan {got}, IR {want}",
                    snap.node
                ));
            }
            degraded += usize::from(denied);
            checked += 1;
            by_table += usize::from(table);
        }
        Ok(())
    });
    (wrong, checked, by_table, degraded)
}

#[test]
fn tier_tables_decide_like_the_ir() {
    let (wrong, checked, by_table, _) = first_tier_mismatch(0..400, &Budget::UNLIMITED);
    assert_eq!(wrong, None);
    assert!(checked > 10_000, "{checked}");
    eprintln!("{checked} verdicts, {by_table} decided by a tier table");
    assert!(
        by_table > 2_000,
        "{by_table} of {checked} decided by a tier table"
    );
}

#[test]
fn planted_tier_table_mistakes_are_caught() {
    use super::plant::{self, Plant};
    for p in [
        Plant::TierAnyPeerNotFolded,
        Plant::NamedPortsNotInClusterClass,
        Plant::RowsComparedByWholeOnly,
    ] {
        let (wrong, _, _, _) = plant::with(p, || first_tier_mismatch(0..400, &Budget::UNLIMITED));
        assert!(wrong.is_some(), "{p:?} was not caught");
        eprintln!("{p:?} caught: {}", wrong.unwrap());
    }
}

/// Within a budget too small for some tables and rulesets, layout 7's tier plan denies the
/// directions that use what it left out and stays exact everywhere else: never an allow the
/// IR denies.
#[test]
fn tier_tables_over_budget_deny_and_the_rest_stay_exact() {
    let tight = Budget {
        tier_entries: 6,
        ports_exact: 4,
        prefixes: true,
        ..Budget::UNLIMITED
    };
    let (wrong, checked, _, degraded) = first_tier_mismatch(0..400, &tight);
    assert_eq!(wrong, None);
    eprintln!("{checked} verdicts, {degraded} on denied directions");
    assert!(
        degraded > 1_000,
        "the budget bites ({degraded} of {checked})"
    );
    assert!(
        checked - degraded > 10_000,
        "and leaves most exact ({checked})"
    );
}
