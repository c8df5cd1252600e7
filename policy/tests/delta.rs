//! Deltas: applying `diff(old, new)` to `old` gives exactly `new`, on random clusters under
//! random changes; a delta is refused against the wrong base or with a wrong digest; a
//! one-pod change costs a handful of entries, not a snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use moat_policy::Index;
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::{self, DeltaError};
use moat_policy::ir::digest::Digest;
use moat_policy::testkit::parse_all;
use moat_policy::testkit::random::{Features, World};
use moat_policy::testkit::synthetic::{self, Scale};
use rand::SeedableRng;
use rand::rngs::SmallRng;

fn snapshots(index: &Index) -> BTreeMap<Arc<str>, NodeSnapshot> {
    index
        .nodes()
        .into_iter()
        .map(|n| (n.node.clone(), index.snapshot(&n.node).unwrap()))
        .collect()
}

#[test]
fn applying_a_diff_reproduces_the_new_snapshot() {
    let seed: u64 = std::env::var("MOAT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut features = Features::default();
    let mut deltas = 0;
    for case in 0..400u64 {
        let mut rng = SmallRng::seed_from_u64(seed + case);
        let mut world = World::generate(&mut rng, &mut features);
        let mut index = Index::build(parse_all(&world.objects()));
        for _ in 0..4 {
            let before = snapshots(&index);
            world.mutate(&mut rng, &mut features, false);
            index.reset(parse_all(&world.objects()));
            for (node, new) in snapshots(&index) {
                let Some(old) = before.get(&node) else {
                    continue;
                };
                let d = delta::diff(old, &new);
                let got = delta::apply(old, &d).unwrap_or_else(|e| panic!("case {case}: {e}"));
                assert_eq!(got, new, "case {case} node {node}");
                assert_eq!(got.content_digest(), new.digest);
                deltas += 1;
            }
        }
    }
    assert!(deltas > 1000);
}

#[test]
fn refuses_the_wrong_base_and_wrong_results() {
    let mut rng = SmallRng::seed_from_u64(3);
    let mut f = Features::default();
    let mut world = World::generate(&mut rng, &mut f);
    let index = Index::build(parse_all(&world.objects()));
    let node = index.nodes()[0].node.clone();
    let a = index.snapshot(&node).unwrap();
    let b = loop {
        world.mutate(&mut rng, &mut f, false);
        let i2 = Index::build(parse_all(&world.objects()));
        if let Some(s) = i2.snapshot(&node)
            && s.digest != a.digest
        {
            break s;
        }
    };
    let d = delta::diff(&a, &b);
    // Against a base with another version or digest.
    let mut other = a.clone();
    other.version += 1;
    assert!(matches!(
        delta::apply(&other, &d),
        Err(DeltaError::WrongBase { .. })
    ));
    // A delta that announces a digest its content doesn't have.
    let mut lying = d.clone();
    lying.version.digest = Digest([7; 32]);
    assert!(matches!(
        delta::apply(&a, &lying),
        Err(DeltaError::Digest { .. })
    ));
    // A delta removing something the base lacks.
    let mut bogus = d.clone();
    bogus.remove_rules.push(moat_policy::ir::RuleId(42));
    assert!(matches!(
        delta::apply(&a, &bogus),
        Err(DeltaError::Missing { .. })
    ));
    assert_eq!(delta::apply(&a, &d).unwrap(), b);
}

#[test]
fn a_one_pod_change_is_a_small_delta() {
    let scale = Scale {
        nodes: 50,
        namespaces: 10,
        pods: 2_000,
        policies: 100,
    };
    let mut objects = Vec::new();
    synthetic::generate(scale, 1, |o| objects.push(o));
    let mut index = Index::build(parse_all(&objects));
    let before = snapshots(&index);
    // One more replica of the cluster DNS: its address joins a group every node holds.
    let pod = moat_policy::model::Pod {
        namespace: "kube-system".into(),
        name: "coredns-extra".into(),
        labels: [("k8s-app".to_string(), "kube-dns".to_string())].into(),
        node: Some(synthetic::node_name(3)),
        ips: vec![synthetic::pod_ip_v4(999_999)],
        ports: vec![],
        host_network: false,
        terminal: false,
        uid: None,
        sandbox: None,
    };
    let changes = index.apply(moat_policy::model::Object::Pod(pod));
    assert_eq!(changes.updated.len(), 50);
    for (node, new) in snapshots(&index) {
        let old = &before[&node];
        let d = delta::diff(old, &new);
        assert!(
            d.entries() <= 4,
            "{node}: {} entries for one new pod (snapshot has {})",
            d.entries(),
            new.size().total()
        );
        assert!(new.size().total() > 100 * d.entries());
    }
}
