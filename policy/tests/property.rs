//! Property tests: compiled snapshots agree with the reference evaluator on random clusters,
//! the incremental compiler agrees with a full compile whatever the event order, and every
//! event reports exactly the nodes whose snapshot changed.
//!
//! `MOAT_SEED=<n>` replays a run; `MOAT_CASES=<n>` changes how many clusters are generated.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use moat_policy::eval::{self, Flow};
use moat_policy::faults::{self, Fault};
use moat_policy::ir::digest::Digest;
use moat_policy::ir::sim::{Fleet, Packet};
use moat_policy::model::{self, K8sObject, ObjectKey};
use moat_policy::testkit::random::{Features, PROBES, World};
use moat_policy::testkit::{PARSE, parse_all};
use moat_policy::{Event, Index};
use rand::rngs::SmallRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

fn base_seed() -> u64 {
    match std::env::var("MOAT_SEED") {
        Ok(s) => s.parse().expect("MOAT_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64,
    }
}

fn cases(default: u64) -> u64 {
    std::env::var("MOAT_CASES").map_or(default, |s| s.parse().expect("MOAT_CASES is a number"))
}

/// Whether a run is long enough to require that every counted kind of decision or event
/// happened: a short replay (`MOAT_CASES`) may legitimately miss the rarer ones.
fn full_run(n: u64, default: u64) -> bool {
    n >= default
}

/// What decided flows, as counted by [`World::attribution`]; each must be non-zero after a
/// default run, so that a generator drifting away from a semantic fails the test instead of
/// silently testing less.
const DECIDERS: [&str; 15] = [
    "decided: Admin Accept",
    "decided: Admin Deny",
    "decided: Admin Pass",
    "decided: Baseline Accept",
    "decided: Baseline Deny",
    "decided: Baseline Pass",
    "decided: NetworkPolicy allow",
    "decided: NetworkPolicy deny",
    "decided: default allow",
    "peer: namespaces",
    "peer: pods",
    "peer: networks",
    "peer: nodes",
    "peer: unknown kind (fail closed)",
    "port: named port resolved",
];

/// Compiles the world and compares simulated snapshots with the evaluator on sampled flows.
fn check_semantics(world: &World, rng: &mut SmallRng, flows: usize) -> Result<(), String> {
    let index = Index::build(parse_all(&world.objects()));
    check_index(&index, world, rng, flows, &mut Features::default())
}

/// Compares `index` (which must hold `world`) with the evaluator on sampled flows, counting
/// in `coverage` what decided them.
fn check_index(
    index: &Index,
    world: &World,
    rng: &mut SmallRng,
    flows: usize,
    coverage: &mut Features,
) -> Result<(), String> {
    let cluster = eval::Cluster::from_objects(world.objects());
    let attribution = world.attribution();
    index.verify()?;
    let snaps: Vec<_> = index
        .nodes()
        .iter()
        .map(|n| index.snapshot(&n.node).expect("listed node has a snapshot"))
        .collect();
    let fleet = Fleet::new(&snaps);
    let addrs = world.addresses();
    for _ in 0..flows {
        let src = *addrs.choose(rng).expect("addresses");
        let same_family: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == src.is_ipv4())
            .collect();
        let dst = *same_family.choose(rng).expect("src itself");
        let (proto, port) = *PROBES.choose(rng).expect("probes");
        let flow = Flow {
            src,
            dst,
            proto,
            port,
        };
        let want = eval::verdict(&cluster, &flow);
        attribution.count(&flow, &want, coverage);
        let got = fleet.allows(&Packet {
            src,
            dst,
            proto,
            port,
        });
        if want.allowed != got {
            return Err(format!(
                "{src} -> {dst} proto {proto} port {port}: evaluator says {} ({want:?}), compiled snapshots say {got}",
                want.allowed
            ));
        }
    }
    Ok(())
}

#[test]
fn compiled_snapshots_agree_with_the_evaluator() {
    let seed = base_seed();
    let n = cases(3000);
    let mut features = Features::default();
    let mut coverage = Features::default();
    for case in 0..n {
        let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(case));
        let mut world = World::generate(&mut rng, &mut features);
        let mut index = Index::build(parse_all(&world.objects()));
        if let Err(e) = check_index(&index, &world, &mut rng, 200, &mut coverage) {
            panic!("case {case} (MOAT_SEED={seed}): {e}\nworld: {world:#?}");
        }
        // The same after live updates, as a watch would deliver them.
        let before = keyed(world.objects());
        world.mutate(&mut rng, &mut features, false);
        index.batch(diff(&before, &keyed(world.objects()), &mut rng));
        if let Err(e) = check_index(&index, &world, &mut rng, 200, &mut coverage) {
            panic!("case {case} after mutation (MOAT_SEED={seed}): {e}\nworld: {world:#?}");
        }
    }
    eprintln!("{n} random clusters (MOAT_SEED={seed}); features generated:\n{features}");
    eprintln!("sides of sampled flows, by what decided them:\n{coverage}");
    for d in DECIDERS.iter().filter(|_| full_run(n, 3000)) {
        assert!(
            coverage.get(d) > 0,
            "no sampled flow was decided by {d} (MOAT_SEED={seed})"
        );
    }
    for (feature, count) in features.iter() {
        assert!(count > 0, "generator never produced {feature}");
    }
    for must in [
        "selector: In",
        "selector: NotIn",
        "selector: NotIn on an absent key",
        "selector: Exists",
        "selector: DoesNotExist",
        "port: named",
        "port: endPort range",
        "ipBlock: with except",
        "ipBlock: IPv6",
        "rule: multiple peers",
        "peer: podSelector AND namespaceSelector",
        "port: SCTP",
        "world: both policy kinds",
        "cnp: same tier and priority (tie)",
        "cnp subject: pods",
        "cnp peer: networks covering a pod address",
        "cnp peer: networks covering no pod address",
        "cnp peer: nodes",
        "cnp peer: unknown kind (fail closed)",
        "cnp protocol: destinationNamedPort",
        "cnp protocol: port range",
        "cnp protocol: sctp",
    ] {
        assert!(
            features.get(must) >= n / 20,
            "{must} generated only {} times",
            features.get(must)
        );
    }
    // Rarer by design, but they must not vanish.
    for must in [
        "cnp protocol: unknown kind (fail closed)",
        "mutation: relabel changed a cnp subject's pods",
    ] {
        assert!(
            features.get(must) >= n / 100,
            "{must} generated only {} times",
            features.get(must)
        );
    }
}

#[test]
fn planted_semantic_bugs_are_caught() {
    let seed = base_seed();
    for fault in Fault::ALL {
        let found = faults::with(fault, || {
            let mut features = Features::default();
            (0..3000u64).find_map(|case| {
                let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(case));
                let world = World::generate(&mut rng, &mut features);
                check_semantics(&world, &mut rng, 300)
                    .err()
                    .map(|e| (case, e))
            })
        });
        match found {
            Some((case, e)) => eprintln!("{fault:?}: caught at case {case}: {e}"),
            None => {
                panic!("planted bug {fault:?} was not caught in 3000 clusters (MOAT_SEED={seed})")
            }
        }
    }
}

/// The index can give back its state as Kubernetes objects that the evaluator judges exactly
/// like the originals (the server's live explain relies on it).
#[test]
fn index_objects_round_trip_through_the_evaluator() {
    let seed = base_seed();
    let mut features = Features::default();
    for case in 0..cases(600) / 2 {
        let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(case));
        let world = World::generate(&mut rng, &mut features);
        let original = eval::Cluster::from_objects(world.objects());
        let index = Index::build(parse_all(&world.objects()));
        let rendered =
            eval::Cluster::from_objects(index.objects().iter().map(model::render::to_k8s));
        let again = Index::build(parse_all(&rendered_objects(&index)));
        let d1: Vec<_> = index
            .nodes()
            .into_iter()
            .map(|n| (n.node, n.digest))
            .collect();
        let d2: Vec<_> = again
            .nodes()
            .into_iter()
            .map(|n| (n.node, n.digest))
            .collect();
        assert_eq!(
            d1, d2,
            "case {case} (MOAT_SEED={seed}): re-parsed objects compile differently"
        );
        let addrs = world.addresses();
        for _ in 0..200 {
            let src = *addrs.choose(&mut rng).expect("addresses");
            let dst = *addrs.choose(&mut rng).expect("addresses");
            let (proto, port) = *PROBES.choose(&mut rng).expect("probes");
            let f = Flow {
                src,
                dst,
                proto,
                port,
            };
            assert_eq!(
                eval::verdict(&original, &f).allowed,
                eval::verdict(&rendered, &f).allowed,
                "case {case} (MOAT_SEED={seed}): {f:?}"
            );
        }
    }
}

fn rendered_objects(index: &Index) -> Vec<K8sObject> {
    index.objects().iter().map(model::render::to_k8s).collect()
}

fn keyed(objects: Vec<K8sObject>) -> BTreeMap<ObjectKey, K8sObject> {
    objects
        .into_iter()
        .map(|o| {
            let m = model::parse::object_with(&o, &PARSE).expect("valid").value;
            (m.key(), o)
        })
        .collect()
}

/// The events that turn `from` into `to`, in random order.
fn diff(
    from: &BTreeMap<ObjectKey, K8sObject>,
    to: &BTreeMap<ObjectKey, K8sObject>,
    rng: &mut SmallRng,
) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::new();
    for (k, o) in to {
        if from.get(k) != Some(o) {
            events.push(Event::Apply(
                model::parse::object_with(o, &PARSE).expect("valid").value,
            ));
        }
    }
    for k in from.keys() {
        if !to.contains_key(k) {
            events.push(Event::Delete(k.clone()));
        }
    }
    events.shuffle(rng);
    events
}

/// Content digest of every node's snapshot (what the node would enforce).
fn contents(index: &Index) -> BTreeMap<Arc<str>, Digest> {
    index
        .nodes()
        .into_iter()
        .map(|n| {
            let s = index.snapshot(&n.node).expect("snapshot");
            (n.node, s.content_digest())
        })
        .collect()
}

/// Applies one event and checks that exactly the nodes whose content changed were reported,
/// with versions that only grow.
fn apply_checked(index: &mut Index, event: Event) -> Result<(), String> {
    let before = contents(index);
    let versions: BTreeMap<_, _> = index
        .nodes()
        .into_iter()
        .map(|n| (n.node, n.version))
        .collect();
    let changes = index.batch([event.clone()]);
    index.verify()?;
    let after = contents(index);
    let changed: BTreeSet<&Arc<str>> = after
        .iter()
        .filter(|(n, d)| before.get(*n) != Some(d))
        .map(|(n, _)| n)
        .collect();
    let reported: BTreeSet<&Arc<str>> = changes.updated.iter().map(|u| &u.node).collect();
    if changed != reported {
        return Err(format!(
            "{event:?}: nodes changed {changed:?}, reported {reported:?}"
        ));
    }
    let removed: BTreeSet<&Arc<str>> = before.keys().filter(|n| !after.contains_key(*n)).collect();
    let reported_removed: BTreeSet<&Arc<str>> = changes.removed.iter().collect();
    if removed != reported_removed {
        return Err(format!(
            "{event:?}: nodes removed {removed:?}, reported {reported_removed:?}"
        ));
    }
    for u in &changes.updated {
        if versions.get(&u.node).is_some_and(|v| *v >= u.version) {
            return Err(format!(
                "{}: version went from {:?} to {}",
                u.node,
                versions.get(&u.node),
                u.version
            ));
        }
    }
    Ok(())
}

#[test]
fn incremental_compile_matches_full_compile_in_any_order() {
    let seed = base_seed();
    let n = cases(600) / 2;
    let mut features = Features::default();
    for case in 0..n {
        let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(case));
        let mut world = World::generate(&mut rng, &mut features);
        let mut index = Index::new();
        let mut current: BTreeMap<ObjectKey, K8sObject> = BTreeMap::new();
        for round in 0..4 {
            if round > 0 {
                world.mutate(&mut rng, &mut features, true);
            }
            let next = keyed(world.objects());
            for e in diff(&current, &next, &mut rng) {
                if let Err(err) = apply_checked(&mut index, e) {
                    panic!("case {case} round {round} (MOAT_SEED={seed}): {err}");
                }
            }
            current = next;
            let fresh = Index::build(parse_all(&current.values().cloned().collect::<Vec<_>>()));
            let incremental: Vec<_> = index
                .nodes()
                .into_iter()
                .map(|n| (n.node, n.digest))
                .collect();
            let full: Vec<_> = fresh
                .nodes()
                .into_iter()
                .map(|n| (n.node, n.digest))
                .collect();
            assert_eq!(
                incremental, full,
                "case {case} round {round} (MOAT_SEED={seed}): incremental != full compile"
            );

            // A relist of the same state is a no-op: same digests, same versions, no changes.
            let before = index.nodes();
            let changes = index.reset(parse_all(&current.values().cloned().collect::<Vec<_>>()));
            assert!(
                changes.is_empty(),
                "case {case}: relist of unchanged state reported {changes:?}"
            );
            assert_eq!(index.nodes(), before);
            index.verify().unwrap();
        }
        // Deleting everything leaves nothing behind.
        let keys: Vec<_> = current.keys().cloned().collect();
        let mut keys = keys;
        keys.shuffle(&mut rng);
        if rng.random_bool(0.5) {
            index.batch(keys.into_iter().map(Event::Delete));
        } else {
            index.reset(Vec::new());
        }
        let stats = index.stats();
        assert_eq!(
            (
                stats.pods,
                stats.policies,
                stats.groups,
                stats.rules,
                stats.strings,
                stats.label_sets,
                stats.selectors,
                stats.nodes,
                stats.namespaces
            ),
            (0, 0, 0, 0, 0, 0, 0, 0, 0),
            "case {case} (MOAT_SEED={seed}): state left after deleting everything: {stats:?}"
        );
    }
    eprintln!("{n} incremental runs (MOAT_SEED={seed}); features generated:\n{features}");
    let must = [
        "mutation: cnp added",
        "mutation: cnp deleted",
        "mutation: cnp priority changed",
        "mutation: cnp tier changed",
        "mutation: cnp rewritten",
        "mutation: relabel changed a cnp subject's pods",
        "mutation: node relabelled",
        "mutation: node address changed",
    ];
    for must in must.iter().filter(|_| full_run(n, 300)) {
        assert!(
            features.get(must) > 0,
            "the event sequences never had a {must:?} (MOAT_SEED={seed})"
        );
    }
}
