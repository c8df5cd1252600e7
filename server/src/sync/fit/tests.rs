use std::collections::BTreeMap;

use moat_policy::Index;
use moat_policy::ir::{DirectionRules, Endpoint};
use moat_policy::model::{
    Cidr, IpBlock, Namespace, Node, Object, Op, Peer, Pod, Policy, Requirement, Rule, Selector,
};
use moat_policy::testkit::parse_all;
use moat_policy::testkit::random::{Features, World};
use rand::SeedableRng;

use super::*;

fn encoded(s: &NodeSnapshot) -> usize {
    s.to_proto().encoded_len()
}

/// The direction of `e` named by `egress`.
fn dir(e: &Endpoint, egress: bool) -> &DirectionRules {
    if egress { &e.egress } else { &e.ingress }
}

/// Every property a served snapshot must have against the compiled one.
fn check(orig: &NodeSnapshot, f: &Fitted, limit: usize) {
    let s = &f.snap;
    assert_eq!(s.digest, s.content_digest(), "digest is content-derived");
    assert_eq!(s.version, orig.version);
    moat_policy::ir::delta::check_references(s).expect("served snapshot is consistent");
    assert_eq!(s.endpoints.len(), orig.endpoints.len());
    for (a, b) in orig.endpoints.iter().zip(&s.endpoints) {
        assert_eq!((a.id, &a.addrs, a.sandbox), (b.id, &b.addrs, b.sandbox));
        for egress in [false, true] {
            let (was, now) = (dir(a, egress), dir(b, egress));
            let cut = f.cut.iter().any(|c| {
                c.egress == egress
                    && c.endpoints.contains(&a.id.0)
                    && c.rules == was.rules.iter().map(|r| r.0).collect::<Vec<_>>()
            });
            if cut {
                // A cut list denies (isolated, no rule), never opens — also one of cluster
                // rules that no NetworkPolicy isolated.
                assert!(now.rules.is_empty(), "a cut list keeps no rule");
                assert!(now.isolated, "a cut list isolates");
            } else {
                assert_eq!(
                    was, now,
                    "an endpoint whose list fits keeps its exact rules"
                );
            }
        }
    }
    for r in &s.rules {
        let o = orig
            .rules
            .iter()
            .find(|x| x.id == r.id)
            .expect("no new rule");
        assert_eq!(o, r);
    }
    if f.cut.is_empty() {
        assert_eq!(s.digest, orig.digest);
    } else {
        assert_ne!(s.digest, orig.digest);
        assert!(encoded(s) + ENVELOPE <= limit || lists(s) == 0);
    }
}

fn lists(s: &NodeSnapshot) -> usize {
    s.endpoints
        .iter()
        .map(|e| usize::from(!e.ingress.rules.is_empty()) + usize::from(!e.egress.rules.is_empty()))
        .sum()
}

#[test]
fn random_snapshots_fit_any_limit_and_keep_what_fits_exact() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(12);
    let mut f = Features::default();
    let mut degraded = 0;
    for _ in 0..150 {
        let world = World::generate(&mut rng, &mut f);
        let index = Index::build(parse_all(&world.objects()));
        for snap in index.snapshots() {
            let snap = Arc::new(snap);
            let exact = encoded(&snap);
            // Far above: untouched, the same allocation.
            let roomy = fit(snap.clone(), exact + ENVELOPE);
            assert!(roomy.cut.is_empty());
            assert!(Arc::ptr_eq(&roomy.snap, &snap));
            for limit in [exact / 2 + ENVELOPE, exact / 4 + ENVELOPE, ENVELOPE] {
                let got = fit(snap.clone(), limit);
                check(&snap, &got, limit);
                degraded += usize::from(!got.cut.is_empty());
            }
        }
    }
    assert!(degraded > 100, "only {degraded} cases degraded anything");
}

fn app(app: &str) -> Selector {
    Selector {
        reqs: vec![Requirement {
            key: "app".into(),
            op: Op::In,
            values: vec![app.into()],
        }],
    }
}

fn pod(name: &str, label: &str, ip: &str) -> Object {
    Object::Pod(Pod {
        namespace: "app".into(),
        name: name.into(),
        labels: BTreeMap::from([("app".to_string(), label.to_string())]),
        node: Some("n1".into()),
        ips: vec![ip.parse().unwrap()],
        ports: vec![],
        host_network: false,
        terminal: false,
        uid: None,
        sandbox: None,
    })
}

fn policy(name: &str, target: &str, peers: Vec<Peer>) -> Object {
    Object::Policy(Policy {
        namespace: "app".into(),
        name: name.into(),
        pod_selector: app(target),
        ingress: Some(vec![Rule {
            peers,
            ports: vec![],
        }]),
        egress: None,
    })
}

#[test]
fn only_the_biggest_list_is_denied_and_only_in_its_direction() {
    let blocks: Vec<Peer> = (0..2000u32)
        .map(|i| {
            Peer::Block(IpBlock {
                cidr: Cidr::new(
                    std::net::Ipv4Addr::new(10, 100 + (i / 256) as u8, (i % 256) as u8, 0).into(),
                    24,
                )
                .unwrap(),
                except: vec![],
            })
        })
        .collect();
    let web_peer = Peer::Pods {
        namespaces: None,
        pods: app("db"),
    };
    let index = Index::build(vec![
        Object::Node(Node {
            name: "n1".into(),
            addrs: vec![],
            labels: Default::default(),
        }),
        Object::Namespace(Namespace {
            name: "app".into(),
            labels: Namespace::implicit_labels("app"),
        }),
        pod("db", "db", "10.0.0.1"),
        pod("web", "web", "10.0.0.2"),
        policy("db-from-blocks", "db", blocks),
        policy("web-from-db", "web", vec![web_peer]),
    ]);
    let snap = Arc::new(index.snapshot("n1").unwrap());
    let exact = encoded(&snap);
    assert!(exact > 40_000, "{exact}");
    let limit = 8 * 1024;
    let got = fit(snap.clone(), limit);
    check(&snap, &got, limit);
    assert_eq!(got.cut.len(), 1, "one list is enough");
    let db = snap
        .endpoints
        .iter()
        .find(|e| e.addrs == ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()])
        .unwrap();
    assert_eq!(got.cut[0].endpoints, [db.id.0]);
    assert!(!got.cut[0].egress);
    assert!(
        got.cut[0].reason.contains("8192-byte message limit"),
        "{}",
        got.cut[0].reason
    );
    assert!(encoded(&got.snap) + ENVELOPE <= limit);
    // The 2,000 groups went with the list; web's rule and its group stayed.
    assert_eq!(got.snap.rules.len(), 1);
    assert_eq!(got.snap.groups.len(), 1);
    // Deterministic: the same input gives the same digest (another stream, a restart).
    assert_eq!(fit(snap.clone(), limit).snap.digest, got.snap.digest);
}
