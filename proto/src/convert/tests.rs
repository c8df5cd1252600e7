use moat_policy::Index;
use moat_policy::ir::delta;
use moat_policy::testkit::parse_all;
use moat_policy::testkit::random::{Features, World};
use prost::Message;
use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;

fn version(s: &NodeSnapshot) -> VersionRef {
    VersionRef {
        version: s.version,
        digest: s.digest,
    }
}

#[test]
fn snapshots_and_deltas_round_trip() {
    let mut f = Features::default();
    for case in 0..200u64 {
        let mut rng = SmallRng::seed_from_u64(case);
        let mut world = World::generate(&mut rng, &mut f);
        let mut index = Index::build(parse_all(&world.objects()));
        let before = index.snapshots();
        for s in &before {
            let wire = s.to_proto().encode_to_vec();
            let back = snapshot_from_proto(
                &s.node,
                &version(s),
                &v1::NodeContent::decode(&*wire).unwrap(),
            )
            .unwrap();
            assert_eq!(&back, s);
            assert_eq!(back.content_digest(), s.digest);
        }
        world.mutate(&mut rng, &mut f, false);
        index.reset(parse_all(&world.objects()));
        for old in &before {
            let Some(new) = index.snapshot(&old.node) else {
                continue;
            };
            let d = delta::diff(old, &new);
            let wire = delta_to_proto(&d).encode_to_vec();
            let back = delta_from_proto(&v1::Delta::decode(&*wire).unwrap()).unwrap();
            assert_eq!(back, d);
            assert_eq!(delta::apply(old, &back).unwrap(), new);
        }
    }
}

#[test]
fn rejects_malformed_content() {
    let mut rng = SmallRng::seed_from_u64(11);
    let mut f = Features::default();
    let index = loop {
        let w = World::generate(&mut rng, &mut f);
        let i = Index::build(parse_all(&w.objects()));
        if i.nodes().iter().any(|n| {
            i.snapshot(&n.node)
                .unwrap()
                .groups
                .iter()
                .any(|g| matches!(g.members, Members::Addrs(ref a) if a.len() > 1))
        }) {
            break i;
        }
    };
    let s = index
        .nodes()
        .iter()
        .map(|n| index.snapshot(&n.node).unwrap())
        .find(|s| {
            s.groups
                .iter()
                .any(|g| matches!(g.members, Members::Addrs(ref a) if a.len() > 1))
        })
        .unwrap();
    let good = s.to_proto();
    let v = version(&s);
    let check = |mutate: &dyn Fn(&mut v1::NodeContent), want: &str| {
        let mut c = good.clone();
        mutate(&mut c);
        let e = snapshot_from_proto("n", &v, &c).expect_err(want);
        assert!(
            e.to_string().contains(want),
            "{e} does not mention {want:?}"
        );
    };
    let gi = good
        .groups
        .iter()
        .position(
            |g| matches!(g.members, Some(v1::group::Members::Addrs(ref a)) if a.addrs.len() > 1),
        )
        .unwrap();
    check(&|c| c.node_addrs.push(vec![1, 2, 3]), "3 bytes");
    check(
        &|c| {
            if let Some(v1::group::Members::Addrs(a)) = &mut c.groups[gi].members {
                let first = a.addrs[0].clone();
                a.addrs.push(first);
            }
        },
        "duplicate member",
    );
    check(&|c| c.groups[gi].members = None, "missing");
    if !good.rules.is_empty() {
        check(&|c| c.rules[0].priority += 1, "ID does not match");
        check(&|c| c.rules[0].direction = 7, "unknown enum value 7");
        check(
            &|c| {
                c.rules[0].ports = v1::PortsKind::Ranges as i32;
                c.rules[0].ranges = vec![v1::PortRange {
                    protocol: 1,
                    first: 1,
                    last: 2,
                }];
            },
            "protocol 1",
        );
        check(&|c| c.rules.push(c.rules[0].clone()), "appears twice");
    }
    assert!(digest(&[0; 31]).is_err());
}

/// A ClusterNetworkPolicy rule's rank needs all 64 bits of `priority`; an enforcer from before
/// them decodes the field as 32 bits, and the rule ID it recomputes then cannot match, so it
/// refuses the rule instead of enforcing a Deny as an allow.
#[test]
fn a_cluster_rank_round_trips_and_a_truncated_one_is_refused() {
    let priority = ir::cluster_rank(3, "no-tenants-to-payments", 1);
    assert!(priority > u64::from(u32::MAX));
    let peers = Peers::Any;
    let ports = Ports::Any;
    let rule = Rule {
        id: ir::rule_id(
            Direction::Ingress,
            Tier::Admin,
            priority,
            Action::Deny,
            &peers,
            &ports,
        ),
        direction: Direction::Ingress,
        tier: Tier::Admin,
        priority,
        action: Action::Deny,
        peers,
        ports,
    };
    let p = rule.to_proto();
    assert_eq!(Rule::from_proto(&p).unwrap(), rule);
    let mut old = p.clone();
    old.priority = u64::from(old.priority as u32);
    assert!(matches!(
        Rule::from_proto(&old),
        Err(ConvertError::RuleId(_))
    ));
}
