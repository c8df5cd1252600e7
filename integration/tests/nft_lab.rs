//! The nft dataplane against a real kernel, in a private network namespace: deltas (of a
//! version, of the local pod table, of both) leave exactly the table a full replacement
//! would, a stale delta can never commit, a version over the element limit is applied with
//! what doesn't fit denied, and a restart keeps the table while reconciling the local pods.

use std::net::IpAddr;

use moat_dataplane::local::{LocalPods, PodAddr, UnknownPods, named};
use moat_enforcer_nft::desired::{Budget, Classes, Desired, desired, desired_within};
use moat_enforcer_nft::nft::{self, TxLock};
use moat_enforcer_nft::render;
use moat_enforcer_nft::{Via, commit_delta, netlink};
use moat_integration::netns;
use moat_policy::Index;
use moat_policy::ir::NodeSnapshot;
use moat_policy::testkit::parse_all;
use moat_policy::testkit::random::{Features, World};
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The kernel's table as comparable JSON: no handles, objects and set elements in a
/// canonical order.
fn dump() -> Value {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "table", "inet", render::TABLE])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Value = serde_json::from_slice(&out.stdout).unwrap();
    fn norm(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("handle");
                if let Some(Value::Array(e)) = m.get_mut("elem") {
                    e.sort_by_key(|x| x.to_string());
                }
                m.values_mut().for_each(norm);
            }
            Value::Array(a) => a.iter_mut().for_each(norm),
            _ => {}
        }
    }
    let objects = v["nftables"].as_array_mut().unwrap();
    objects.retain(|o| o.get("metainfo").is_none());
    // Listing order is creation order, which means nothing — except for the rules within
    // one chain: a stable sort by kind and name keeps exactly that.
    objects.sort_by_key(|o| {
        let (kind, body) = o.as_object().unwrap().iter().next().unwrap();
        let name = body
            .get("chain")
            .or(body.get("name"))
            .map(|n| n.to_string())
            .unwrap_or_default();
        (kind.clone(), name)
    });
    norm(&mut v);
    v
}

/// Fails with the objects only one side has.
fn same(a: &Value, b: &Value, what: &str) {
    let list = |v: &Value| {
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
    };
    let (a, b) = (list(a), list(b));
    let only_a: Vec<_> = a.iter().filter(|o| !b.contains(o)).collect();
    let only_b: Vec<_> = b.iter().filter(|o| !a.contains(o)).collect();
    assert!(
        a == b,
        "{what}: tables differ\nonly in the first:\n{only_a:#?}\nonly in the second:\n{only_b:#?}\n(same objects, other order: {})",
        only_a.is_empty() && only_b.is_empty()
    );
}

fn node_snapshots(world: &World) -> Vec<NodeSnapshot> {
    Index::build(parse_all(&world.objects())).snapshots()
}

/// Local pods as the agent could find them: most endpoint addresses known on one of a few
/// pod interfaces, some unknown, some not routed here, now and then an unnamed address.
/// Interface indexes need not exist: nft takes any number.
fn random_local(rng: &mut SmallRng, snap: &NodeSnapshot) -> LocalPods {
    let mut l = LocalPods {
        unknown: if rng.random_bool(0.3) {
            UnknownPods::Allow
        } else {
            UnknownPods::Deny
        },
        ..Default::default()
    };
    l.pod_ifaces.extend(10..10 + rng.random_range(1..5u32));
    l.other_ifaces.extend([1, 2]);
    let ifaces: Vec<u32> = l.pod_ifaces.iter().copied().collect();
    for (a, who) in named(Some(snap)) {
        if rng.random_bool(0.2) {
            continue;
        }
        let state = match who {
            Some((e, _)) if rng.random_bool(0.8) => PodAddr::Known(e),
            _ => PodAddr::Unknown,
        };
        l.addrs.insert((*ifaces.choose(rng).unwrap(), a), state);
    }
    if rng.random_bool(0.3) {
        let a: IpAddr = format!("10.250.0.{}", rng.random_range(1..9u8))
            .parse()
            .unwrap();
        l.addrs
            .insert((*ifaces.choose(rng).unwrap(), a), PodAddr::Unknown);
    }
    l
}

fn planned(snap: &NodeSnapshot, classes: &mut Classes, local: &LocalPods) -> Desired {
    desired_within(snap, classes, local, &Budget::UNLIMITED)
}

#[test]
fn deltas_leave_exactly_what_a_full_replace_leaves() {
    if !netns::inside("deltas_leave_exactly_what_a_full_replace_leaves") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = TxLock::acquire(&dir.path().join("lock"), nft::LOCK_WAIT_DEFAULT).unwrap();
    let mut rng = SmallRng::seed_from_u64(0x5eed_4a11);
    let mut f = Features::default();
    let (mut deltas, mut elements, mut by_netlink, mut locals) = (0, 0, 0, 0);
    let mut conn = None;
    for _world in 0..12 {
        let mut world = World::generate(&mut rng, &mut f);
        let mut classes = Classes::default();
        let first = node_snapshots(&world)[0].clone();
        let node = first.node.clone();
        let mut cur: Desired = planned(&first, &mut classes, &random_local(&mut rng, &first));
        cur.epoch = rand::random();
        nft::apply(&lock, render::full(&cur)).unwrap();
        for _step in 0..15 {
            world.mutate(&mut rng, &mut f, false);
            let Some(next) = node_snapshots(&world).into_iter().find(|s| s.node == node) else {
                break;
            };
            let local = random_local(&mut rng, &next);
            let new = Desired {
                epoch: cur.epoch,
                ..planned(&next, &mut classes, &local)
            };
            match commit_delta(&lock, &mut conn, render::delta(&cur, &new)).unwrap() {
                Via::Netlink => by_netlink += 1,
                Via::Nft => {}
            }
            let after_delta = dump();
            nft::apply(&lock, render::full(&new)).unwrap();
            same(
                &after_delta,
                &dump(),
                &format!("delta {} -> {}", cur.version, new.version),
            );
            deltas += 1;
            elements += moat_enforcer_nft::table_elements(&new);
            cur = new;
            // The local pod table alone changes (an interface or route came or went), as
            // `set_local` sends it: always over netlink.
            let mut moved = cur.clone();
            moved.local = random_local(&mut rng, &next);
            let batch = render::relocal(&moved, &cur.local);
            assert!(
                netlink::supports(&batch),
                "a local pod table change is elements only"
            );
            commit_delta(&lock, &mut conn, batch).unwrap();
            let after = dump();
            nft::apply(&lock, render::full(&moved)).unwrap();
            same(
                &after,
                &dump(),
                &format!("local pod table at {}", moved.version),
            );
            locals += 1;
            cur = moved;
        }
    }
    eprintln!(
        "{deltas} deltas checked ({by_netlink} over netlink) and {locals} local pod table changes, {elements} elements in total"
    );
    assert!(deltas >= 100);
    assert!(by_netlink >= 10, "both paths are exercised");
    assert!(by_netlink < deltas, "both paths are exercised");
}

/// Layout 7 (rendered, not yet the backend's): its deltas, committed by the kernel, leave
/// exactly what its full replacement leaves. The kernel, not only the table model, takes
/// every batch: nft 1.0.6 cannot delete a single value from a concatenated interval set
/// (ENOENT), so the tier tables write `[p, p]`.
#[test]
fn tier_layout_deltas_leave_exactly_what_a_full_replace_leaves() {
    use moat_dataplane::plan::addresses;
    use moat_dataplane::plan::tier_tables::{TierPlan, tier_plan};
    if !netns::inside("tier_layout_deltas_leave_exactly_what_a_full_replace_leaves") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = TxLock::acquire(&dir.path().join("lock"), nft::LOCK_WAIT_DEFAULT).unwrap();
    let mut rng = SmallRng::seed_from_u64(0x5eed_7137);
    let mut f = Features::default();
    let (mut deltas, mut tiered) = (0, 0);
    for _world in 0..12 {
        let mut world = World::generate(&mut rng, &mut f);
        let mut classes = Classes::default();
        let first = node_snapshots(&world)[0].clone();
        let node = first.node.clone();
        let epoch = rand::random();
        let plan = |snap: &NodeSnapshot, classes: &mut Classes, rng: &mut SmallRng| {
            let mut d = addresses(snap, classes);
            d.local = random_local(rng, snap);
            d.epoch = epoch;
            let tp: TierPlan = tier_plan(snap, &d, classes);
            (d, tp)
        };
        let mut cur = plan(&first, &mut classes, &mut rng);
        nft::apply(&lock, render::full_tiers(&cur.0, &cur.1)).unwrap();
        for _step in 0..10 {
            world.mutate(&mut rng, &mut f, false);
            let Some(next) = node_snapshots(&world).into_iter().find(|s| s.node == node) else {
                break;
            };
            let new = plan(&next, &mut classes, &mut rng);
            let batch = render::delta_tiers((&cur.0, &cur.1), (&new.0, &new.1));
            nft::apply(&lock, batch).unwrap();
            let after = dump();
            nft::apply(&lock, render::full_tiers(&new.0, &new.1)).unwrap();
            same(&after, &dump(), &format!("tier delta to {}", new.0.version));
            deltas += 1;
            tiered += usize::from(!new.1.tables.is_empty());
            cur = new;
        }
    }
    eprintln!("{deltas} layout-7 deltas checked, {tiered} with tier tables");
    assert!(deltas >= 80 && tiered >= 20, "{deltas} {tiered}");
}

#[test]
fn a_replacement_beside_the_table_leaves_exactly_what_a_full_one_does() {
    if !netns::inside("a_replacement_beside_the_table_leaves_exactly_what_a_full_one_does") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = TxLock::acquire(&dir.path().join("lock"), nft::LOCK_WAIT_DEFAULT).unwrap();
    let mut rng = SmallRng::seed_from_u64(0x5eed_5a4b);
    let mut f = Features::default();
    let mut conn = None;
    for epoch in 1..=20u32 {
        let mut world = World::generate(&mut rng, &mut f);
        let a = node_snapshots(&world)[0].clone();
        world.mutate(&mut rng, &mut f, false);
        let Some(b) = node_snapshots(&world)
            .into_iter()
            .find(|s| s.node == a.node)
        else {
            continue;
        };
        // The node's pods change with the version: the switch carries the local pod table.
        let (la, lb) = (random_local(&mut rng, &a), random_local(&mut rng, &b));
        let da = Desired {
            epoch,
            ..planned(&a, &mut Classes::default(), &la)
        };
        let db = Desired {
            epoch: epoch + 1000,
            ..planned(&b, &mut Classes::default(), &lb)
        };
        nft::apply(&lock, render::full(&da)).unwrap();
        let held = nft::objects().unwrap().unwrap();
        nft::apply(&lock, render::stage(&db)).unwrap();
        // Over netlink as the backend does, and through `nft`, its fallback, every other time.
        let by_nft = epoch % 2 == 0;
        if by_nft {
            nft::apply(&lock, render::switch(&db)).unwrap();
        } else {
            assert_eq!(
                commit_delta(&lock, &mut conn, render::switch(&db)).unwrap(),
                Via::Netlink
            );
        }
        let chains: Vec<String> = held
            .chains
            .into_iter()
            .filter(|c| !render::SHARED_CHAINS.contains(&c.as_str()))
            .collect();
        let sets: Vec<Value> = held
            .sets
            .into_iter()
            .filter(|s| !render::SHARED_SETS.iter().any(|n| s["name"] == *n))
            .collect();
        assert!(!sets.is_empty(), "the old epoch's class maps at least");
        if by_nft {
            nft::apply(&lock, render::sweep(&chains, &sets)).unwrap();
        } else {
            let via = commit_delta(&lock, &mut conn, render::sweep(&chains, &sets)).unwrap();
            assert_eq!(via, Via::Netlink, "the sweep needs no element listing");
        }
        let replaced = dump();
        nft::apply(&lock, render::full(&db)).unwrap();
        same(&replaced, &dump(), "staged, switched and swept vs full");
    }
}

#[test]
fn a_delta_for_another_base_never_commits() {
    if !netns::inside("a_delta_for_another_base_never_commits") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = TxLock::acquire(&dir.path().join("lock"), nft::LOCK_WAIT_DEFAULT).unwrap();
    let mut rng = SmallRng::seed_from_u64(7);
    let mut f = Features::default();
    let mut world = World::generate(&mut rng, &mut f);
    let a = node_snapshots(&world)[0].clone();
    // A change whose element-only part the netlink path can carry (no interval sets), so
    // both paths are tried below.
    let (da, db) = loop {
        world.mutate(&mut rng, &mut f, false);
        let s = node_snapshots(&world)
            .into_iter()
            .find(|s| s.node == a.node)
            .unwrap();
        if s.digest == a.digest {
            continue;
        }
        let mut classes = Classes::default();
        let da = Desired {
            epoch: 1,
            ..desired(&a, &mut classes)
        };
        let db = Desired {
            epoch: 1,
            ..desired(&s, &mut classes)
        };
        let mut only = db.clone();
        only.rulesets = da.rulesets.clone();
        if netlink::supports(&render::delta(&da, &only)) {
            break (da, db);
        }
    };
    // The kernel holds `a` in another numbering (a replacement happened meanwhile): the
    // delta computed against epoch 1 must fail as a whole.
    let replaced = Desired {
        epoch: 2,
        ..da.clone()
    };
    nft::apply(&lock, render::full(&replaced)).unwrap();
    let before = dump();
    let err = nft::apply(&lock, render::delta(&da, &db)).unwrap_err();
    assert!(matches!(err, nft::Error::Refused(_)), "{err}");
    // The netlink path refuses it just the same (an element-only delta for another base).
    let mut only_elements = db.clone();
    only_elements.rulesets = da.rulesets.clone();
    let batch = render::delta(&da, &only_elements);
    assert!(netlink::supports(&batch));
    let err = commit_delta(&lock, &mut None, batch).unwrap_err();
    assert!(matches!(err, nft::Error::Refused(_)), "{err}");
    same(
        &before,
        &dump(),
        "nothing of the refused netlink batch is in the kernel",
    );
    same(
        &before,
        &dump(),
        "nothing of the refused batch is in the kernel",
    );
    assert_eq!(nft::recorded().unwrap().map(|r| r.0), Some(a.version));
}

#[test]
fn a_second_writer_waits_for_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lock");
    let first = TxLock::acquire(&path, nft::LOCK_WAIT_DEFAULT).unwrap();
    let t = std::time::Instant::now();
    let err = TxLock::acquire(&path, std::time::Duration::from_millis(200))
        .err()
        .unwrap();
    assert!(matches!(err, nft::Error::Busy(_)), "{err}");
    assert!(t.elapsed() >= std::time::Duration::from_millis(200));
    drop(first);
    TxLock::acquire(&path, std::time::Duration::from_millis(200)).unwrap();
}

/// Node n1: `big` (10.0.0.1) selected by a policy allowing 300 /32 blocks on 300 ports
/// (90,000 class·port entries, when `huge`), `small` (10.0.0.2) by one allowing `open`
/// on port 80, `open` (10.0.0.3) by none.
fn overflow_snapshot(huge: bool) -> NodeSnapshot {
    use moat_policy::model::K8sObject;
    use moat_policy::testkit::k8s;
    use serde_json::json;
    let pod = |name: &str, ip: &str| {
        K8sObject::Pod(k8s(json!({
            "metadata": {"name": name, "namespace": "t", "uid": name, "labels": {"app": name}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        })))
    };
    let blocks: Vec<_> = (0..300u32)
        .map(|i| json!({"ipBlock": {"cidr": format!("11.0.{}.{}/32", i / 256, i % 256)}}))
        .collect();
    let ports: Vec<_> = (0..300u16).map(|i| json!({"port": 1000 + i * 2})).collect();
    let mut objs = vec![
        K8sObject::Node(k8s(json!({"metadata": {"name": "n1"}}))),
        pod("big", "10.0.0.1"),
        pod("small", "10.0.0.2"),
        pod("open", "10.0.0.3"),
        K8sObject::NetworkPolicy(k8s(json!({
            "metadata": {"name": "tiny", "namespace": "t"},
            "spec": {"podSelector": {"matchLabels": {"app": "small"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "open"}}}],
                                  "ports": [{"port": 80}]}]},
        }))),
    ];
    let n = if huge { 300 } else { 2 };
    objs.push(K8sObject::NetworkPolicy(k8s(json!({
        "metadata": {"name": "huge", "namespace": "t"},
        "spec": {"podSelector": {"matchLabels": {"app": "big"}},
                 "ingress": [{"from": blocks[..n], "ports": ports[..n]}]},
    }))));
    Index::build(parse_all(&objs)).snapshot("n1").unwrap()
}

/// Each pod known on its own interface (10, 11, 12).
fn overflow_local(snap: &NodeSnapshot) -> LocalPods {
    let mut l = LocalPods::default();
    l.other_ifaces.insert(1);
    for (i, e) in snap.endpoints.iter().enumerate() {
        let iface = 10 + i as u32;
        l.pod_ifaces.insert(iface);
        for a in &e.addrs {
            l.addrs.insert((iface, *a), PodAddr::Known(e.id));
        }
    }
    l
}

/// The kernel's elements: set or map name → its elements as JSON text.
fn kernel_elements() -> std::collections::BTreeMap<String, Vec<String>> {
    let d = dump();
    let mut out = std::collections::BTreeMap::new();
    for o in d["nftables"].as_array().unwrap() {
        let Some((_, body)) = o
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| *k == "set" || *k == "map")
        else {
            continue;
        };
        let elems = body["elem"]
            .as_array()
            .map(|a| a.iter().map(|e| e.to_string()).collect())
            .unwrap_or_default();
        out.insert(body["name"].as_str().unwrap().to_string(), elems);
    }
    out
}

#[test]
fn a_version_over_the_element_limit_is_applied_degraded_and_the_rest_exact() {
    if !netns::inside("a_version_over_the_element_limit_is_applied_degraded_and_the_rest_exact") {
        return;
    }
    use moat_dataplane::{Backend, BackendError};
    let dir = tempfile::tempdir().unwrap();
    let (small, big) = (overflow_snapshot(false), overflow_snapshot(true));
    let local = overflow_local(&big);
    let unlimited = planned(&big, &mut Classes::default(), &local);
    assert!(unlimited.degraded.is_empty());
    assert!(moat_enforcer_nft::table_elements(&unlimited) > 90_000);
    let limit = 10_000;
    let mut backend = moat_enforcer_nft::NftBackend::open(limit, &dir.path().join("lock")).unwrap();
    backend.adopt(None, &local).unwrap();
    assert!(
        backend
            .apply_full(&small, &local)
            .unwrap()
            .degraded
            .is_empty()
    );
    let delta = moat_policy::ir::delta::diff(&small, &big);
    // (interface, endpoint) of the pod with address `a` (see `overflow_local`).
    let pod = |a: &str| {
        let i = big
            .endpoints
            .iter()
            .position(|e| e.addrs.contains(&a.parse().unwrap()))
            .unwrap();
        (10 + i as u32, big.endpoints[i].id)
    };
    for (how, applied) in [
        ("delta", backend.apply_delta(&small, &delta, &big, &local)),
        ("full", backend.apply_full(&big, &local)),
    ] {
        let applied = applied.unwrap_or_else(|e| panic!("{how}: {e}"));
        assert_eq!(applied.degraded.len(), 1, "{how}: {:?}", applied.degraded);
        let cut = &applied.degraded[0];
        assert!(!cut.egress, "{how}");
        assert!(
            cut.reason.contains("table elements"),
            "{how}: {}",
            cut.reason
        );
        assert_eq!(
            nft::recorded().unwrap().map(|r| r.0),
            Some(big.version),
            "{how}"
        );
        let kernel = kernel_elements();
        let total: usize = kernel.values().map(Vec::len).sum();
        assert!(total <= limit, "{how}: {total} elements in the kernel");
        assert_eq!(
            backend.counters()["elements"],
            total as u64 - 1,
            "{how}: the count is the kernel's (but the record)"
        );
        // big denies all ingress; small keeps exactly its rules; open stays open. Ruleset
        // chains carry the epoch of the table in force (its class maps' suffix).
        let epoch = kernel
            .keys()
            .find_map(|k| k.strip_prefix("class4_"))
            .expect("an epoch's class map")
            .to_string();
        let dst = &kernel["dst4"];
        let to = |iface: u32, addr: &str, verdict: &str| {
            dst.iter()
                .any(|e| e.contains(&format!("\"{iface}\",\"{addr}\"")) && e.contains(verdict))
        };
        assert_eq!(cut.endpoints, vec![pod("10.0.0.1").1], "{how}");
        assert!(
            to(
                pod("10.0.0.1").0,
                "10.0.0.1",
                &format!("\"i_deny_{epoch}\"")
            ),
            "{how}: {dst:?}"
        );
        let small_chain = &unlimited.ing4[&"10.0.0.2".parse().unwrap()];
        let small_in = format!("\"{small_chain}_{epoch}\"");
        assert!(
            to(pod("10.0.0.2").0, "10.0.0.2", &small_in),
            "{how}: {dst:?}"
        );
        assert!(
            to(pod("10.0.0.3").0, "10.0.0.3", "accept"),
            "{how}: {dst:?}"
        );
        let rs = &unlimited.rulesets[small_chain];
        assert_eq!(
            kernel[&format!("{small_chain}_{epoch}_gx")].len(),
            rs.gx.len(),
            "{how}: small's rules"
        );
        assert_eq!(
            kernel[&format!("{small_chain}_{epoch}_ap")].len(),
            rs.ap.len()
        );
    }
    // Refused only when what no budget can cut does not fit; the last version stays.
    let before = dump();
    let mut tiny = moat_enforcer_nft::NftBackend::open(5, &dir.path().join("lock2")).unwrap();
    let result = tiny.apply_full(&small, &local);
    assert!(
        matches!(result, Err(BackendError::Refused { .. })),
        "{result:?}"
    );
    same(
        &before,
        &dump(),
        "a refused version leaves the table as it was",
    );
}

/// The dump without the record's element (its epoch is drawn anew by each replacement).
fn dump_but_record() -> Value {
    let mut d = dump();
    for o in d["nftables"].as_array_mut().unwrap() {
        if o["set"]["name"] == render::RECORD {
            o["set"]["elem"] = Value::Null;
        }
    }
    d
}

#[test]
fn a_restart_keeps_the_table_and_reconciles_the_local_pods() {
    if !netns::inside("a_restart_keeps_the_table_and_reconciles_the_local_pods") {
        return;
    }
    use moat_dataplane::{Adopted, Backend};
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("lock");
    let mut rng = SmallRng::seed_from_u64(3);
    let mut f = Features::default();
    let world = World::generate(&mut rng, &mut f);
    let snap = node_snapshots(&world)[0].clone();
    let (before, after) = (random_local(&mut rng, &snap), random_local(&mut rng, &snap));
    {
        let mut first = moat_enforcer_nft::NftBackend::open(1_000_000, &lock).unwrap();
        first.adopt(None, &before).unwrap();
        first.apply_full(&snap, &before).unwrap();
    }
    // The same version, the node's pods changed while no enforcer ran.
    let mut second = moat_enforcer_nft::NftBackend::open(1_000_000, &lock).unwrap();
    assert_eq!(
        second.adopt(Some(&snap), &after).unwrap(),
        Adopted::Enforcing
    );
    let adopted = dump_but_record();
    // Compared in the epoch the adoption drew (its objects' names carry it).
    let epoch = dump()["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o["map"]["name"].as_str()?.strip_prefix("class4_"))
        .map(|e| u32::from_str_radix(e, 16).unwrap())
        .expect("an epoch's class map");
    let lock2 = TxLock::acquire(&dir.path().join("lock2"), nft::LOCK_WAIT_DEFAULT).unwrap();
    let whole = Desired {
        epoch,
        ..planned(&snap, &mut Classes::default(), &after)
    };
    nft::apply(&lock2, render::full(&whole)).unwrap();
    same(
        &adopted,
        &dump_but_record(),
        "adopted with the pods as they are now",
    );
    drop(second);
    // A table newer than the record is kept as it is, local pod table and all.
    let older = NodeSnapshot {
        version: snap.version - 1,
        ..snap.clone()
    };
    let kept = dump();
    let mut third = moat_enforcer_nft::NftBackend::open(1_000_000, &lock).unwrap();
    assert_eq!(
        third.adopt(Some(&older), &before).unwrap(),
        Adopted::Unknown
    );
    same(&kept, &dump(), "an unknown table is kept");
}

/// A namespace of its own for one end of the forwarding lab, deleted on drop with its link.
struct Peer(String, String);

impl Peer {
    /// A namespace linked to this one (the router) by a veth: `here` on this side, `addr` on
    /// the other, routed through `gw`. MACs are fixed and neighbours static, so nothing but
    /// the forward hook can hold a packet back.
    fn new(name: &str, here: &str, addr: &str, gw: &str, n: u8) -> Peer {
        let ns = format!("moat-{}-lab{name}", std::process::id());
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &ns]);
        let peer = Peer(ns.clone(), here.to_string());
        let (mac_here, mac_there) = (
            format!("02:00:00:00:{n:02x}:01"),
            format!("02:00:00:00:{n:02x}:02"),
        );
        ip(&[
            "link", "add", here, "address", &mac_here, "type", "veth", "peer", "name", "eth0",
            "address", &mac_there, "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{gw}/24"), "dev", here]);
        ip(&["link", "set", here, "up"]);
        ip(&[
            "neigh",
            "replace",
            addr,
            "lladdr",
            &mac_there,
            "dev",
            here,
            "nud",
            "permanent",
        ]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", gw]);
        ip(&[
            "-n",
            &ns,
            "neigh",
            "replace",
            gw,
            "lladdr",
            &mac_here,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        peer
    }

    /// Moves the calling thread into this namespace.
    /// Moves the calling thread into this namespace.
    fn enter(&self) {
        enter_ns(&self.0);
    }

    /// Runs `f` on a thread inside this namespace.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.0.clone();
        std::thread::spawn(move || {
            enter_ns(&ns);
            f()
        })
        .join()
        .unwrap()
    }

    fn listen_tcp(&self, port: u16) -> std::net::TcpListener {
        self.within(move || std::net::TcpListener::bind(("0.0.0.0", port)).unwrap())
    }

    fn bind_udp(&self, port: u16) -> std::net::UdpSocket {
        self.within(move || {
            let s = std::net::UdpSocket::bind(("0.0.0.0", port)).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(1)))
                .unwrap();
            s
        })
    }

    /// Whether a TCP connection from here to `dst:port` is set up within a second.
    fn tcp_connects(&self, dst: IpAddr, port: u16) -> bool {
        self.within(move || {
            let to = std::net::SocketAddr::new(dst, port);
            std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(1)).is_ok()
        })
    }

    /// Whether a datagram from here to `dst:port` reaches `at` (bound there) within a second.
    fn udp_arrives(&self, dst: IpAddr, port: u16, at: &std::net::UdpSocket) -> bool {
        let token: [u8; 8] = rand::random();
        self.within(move || {
            let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            s.send_to(&token, (dst, port)).unwrap();
        });
        let mut buf = [0u8; 64];
        matches!(at.recv_from(&mut buf), Ok((8, _)) if buf[..8] == token)
    }

    /// Whether an ICMP echo request from here to `dst` is answered within a second.
    fn echo_answered(&self, dst: IpAddr) -> bool {
        use socket2::{Domain, Protocol, Socket, Type};
        self.within(move || {
            let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(1)))
                .unwrap();
            let (id, seq): (u16, u16) = (rand::random(), 1);
            let req = moat_harness::icmp::echo_request(false, id, seq);
            s.send_to(&req, &std::net::SocketAddr::new(dst, 0).into())
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
            while std::time::Instant::now() < deadline {
                let Ok(n) = s.recv(&mut buf) else {
                    return false;
                };
                // SAFETY: `recv` initialised the first `n` bytes.
                let p: Vec<u8> = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                let ihl = usize::from(p[0] & 0x0f) * 4;
                if moat_harness::icmp::parse_reply(false, &p[ihl..]) == Some((id, seq)) {
                    return true;
                }
            }
            false
        })
    }
}

fn enter_ns(name: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Explicitly: a namespace's links go away some time after the namespace does, and
        // the next lab reuses the name.
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.1])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn nft_run(script: &str) {
    use std::io::Write;
    let mut c = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "nft: {script}");
}

/// Packets a counter of the `lab` table counted.
fn lab_counter(name: &str) -> u64 {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "counter", "ip", "lab", name])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o["counter"]["packets"].as_u64())
        .unwrap()
}

/// The lab's cluster: nodes n0 and n1, namespaces x and y, pod x/a (10.0.2.2) on n0 and
/// pod y/b (10.0.1.2) on n1.
fn lab_cluster() -> Vec<moat_policy::model::K8sObject> {
    use moat_policy::model::K8sObject;
    use moat_policy::testkit::k8s;
    use serde_json::json;
    let mut objects = Vec::new();
    for (i, addr) in [(0, "10.0.3.1"), (1, "10.0.3.2")] {
        objects.push(K8sObject::Node(k8s(json!({
            "metadata": {"name": format!("n{i}")},
            "status": {"addresses": [{"type": "InternalIP", "address": addr}]},
        }))));
    }
    for ns in ["x", "y"] {
        objects.push(K8sObject::Namespace(k8s(json!({"metadata": {
            "name": ns, "labels": {"ns": ns, "kubernetes.io/metadata.name": ns},
        }}))));
    }
    for (ns, pod, node, ip) in [("x", "a", "n0", "10.0.2.2"), ("y", "b", "n1", "10.0.1.2")] {
        objects.push(K8sObject::Pod(k8s(json!({
            "metadata": {"name": pod, "namespace": ns, "labels": {"pod": pod}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        }))));
    }
    objects
}

/// Node n0's snapshot: pod x/a (10.0.2.2) on it accepts UDP/TCP 9 from pod y/b (10.0.1.2, on
/// n1) and port 81 from 20 /32 blocks (offset by `k`, so two versions differ).
fn forwarding_snapshot(k: u32) -> NodeSnapshot {
    use moat_policy::model::K8sObject;
    use moat_policy::testkit::k8s;
    use serde_json::json;
    let mut objects = lab_cluster();
    let blocks: Vec<_> = (0..20u32)
        .map(|i| json!({"ipBlock": {"cidr": format!("{}/32", std::net::Ipv4Addr::from(0x0af0_0000 + k * 0x10000 + i))}}))
        .collect();
    for (name, spec) in [
        (
            "from-y-b",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}],
                             "ports": [{"port": 9, "protocol": "UDP"}, {"port": 9, "protocol": "TCP"}]}],
            }),
        ),
        (
            "blocks",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": blocks, "ports": [{"port": 81}]}],
            }),
        ),
    ] {
        objects.push(K8sObject::NetworkPolicy(k8s(json!({
            "metadata": {"name": name, "namespace": "x"}, "spec": spec,
        }))));
    }
    Index::build(parse_all(&objects))
        .snapshots()
        .into_iter()
        .find(|s| s.node == "n0")
        .unwrap()
}

/// The forwarding lab: this namespace routes between a remote client (`vc`, 10.0.1.2, pod
/// y/b) and this node's pod x/a (`vs`, 10.0.2.2), which accepts UDP 9 from it; the `lab`
/// table counts UDP 9 before conntrack (`pre`) and after everything else (`post`).
struct Lab {
    client: std::sync::Arc<Peer>,
    server: Peer,
    versions: [NodeSnapshot; 2],
    local: LocalPods,
    lock: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Lab {
    /// `confirm`: whether the lab lets the flood's flows be confirmed by conntrack. When not
    /// (dropped after Moat's hook, before conntrack confirms), every packet is a flow's first
    /// and Moat's rulesets judge each one.
    fn new(confirm: bool) -> Lab {
        Lab::with(
            [forwarding_snapshot(0), forwarding_snapshot(1)],
            confirm,
            false,
        )
    }

    /// `notrack`: the lab exempts the flood from conntrack (as a `notrack` rule of another
    /// component would), so Moat's hook sees it untracked.
    fn with(versions: [NodeSnapshot; 2], confirm: bool, notrack: bool) -> Lab {
        use moat_dataplane::local::{Bindings, Interfaces};
        let client = Peer::new("c", "vc", "10.0.1.2", "10.0.1.1", 1);
        let server = Peer::new("s", "vs", "10.0.2.2", "10.0.2.1", 2);
        let index = |dev: &str| -> u32 {
            std::fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let mut ifaces = Interfaces::default();
        ifaces
            .pods
            .insert(index("vs"), ["10.0.2.2".parse().unwrap()].into());
        ifaces.other.insert(index("vc"));
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        let post = if confirm {
            "udp dport 9 counter name \"post\""
        } else {
            "udp dport 9 counter name \"post\" drop"
        };
        let raw = if notrack { "udp dport 9 notrack" } else { "" };
        nft_run(&format!(
            "table ip lab {{
               counter pre {{}}
               counter post {{}}
               chain pre {{
                 type filter hook prerouting priority -400;
                 udp dport 9 counter name \"pre\"
               }}
               chain raw {{
                 type filter hook prerouting priority -300;
                 {raw}
               }}
               chain post {{
                 type filter hook postrouting priority 400;
                 {post}
               }}
             }}"
        ));
        let dir = tempfile::tempdir().unwrap();
        let local = Bindings::default().reconcile(&ifaces, Some(&versions[0]), Default::default());
        assert_eq!(local.counts(), (1, 0), "the server pod is known");
        Lab {
            client: std::sync::Arc::new(client),
            server,
            versions,
            local,
            lock: dir.path().join("lock"),
            _dir: dir,
        }
    }

    fn open(&self) -> moat_enforcer_nft::NftBackend {
        moat_enforcer_nft::NftBackend::open(moat_enforcer_nft::DEFAULT_MAX_ELEMENTS, &self.lock)
            .unwrap()
    }

    /// A backend enforcing `snap` on a table of its own making.
    fn enforcing(&self, snap: &NodeSnapshot) -> moat_enforcer_nft::NftBackend {
        use moat_dataplane::Backend;
        let mut backend = self.open();
        backend.adopt(None, &self.local).unwrap();
        backend.apply_full(snap, &self.local).unwrap();
        backend
    }

    /// Runs `changes` under a one-core [`flood`](Self::flood), then stops it: (packets that
    /// reached the router, packets that left it), and how long `changes` took.
    fn flooded(&self, changes: impl FnOnce()) -> ((u64, u64), std::time::Duration) {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = self.flood(1, &stop);
        let t = std::time::Instant::now();
        changes();
        let took = t.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flood.into_iter().for_each(|t| t.join().unwrap());
        (self.counted(), took)
    }

    /// [`flood`](Self::flood) for `secs`, then stopped.
    fn flood_for(&self, threads: usize, secs: u64) {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = self.flood(threads, &stop);
        std::thread::sleep(std::time::Duration::from_secs(secs));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flood.into_iter().for_each(|t| t.join().unwrap());
    }

    /// One UDP flow (10.0.1.2:5000 → 10.0.2.2:9) that never sees a reply, sent from
    /// `threads` threads sharing its socket, each pinned to a core of its own where there
    /// are enough, until `stop`.
    fn flood(
        &self,
        threads: usize,
        stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let socket = {
            let client = self.client.clone();
            std::thread::spawn(move || {
                client.enter();
                std::net::UdpSocket::bind("10.0.1.2:5000").unwrap()
            })
            .join()
            .unwrap()
        };
        (0..threads)
            .map(|i| {
                let (stop, client) = (stop.clone(), self.client.clone());
                let s = socket.try_clone().unwrap();
                std::thread::spawn(move || {
                    client.enter();
                    if threads > 1 {
                        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                        unsafe { libc::CPU_SET(i % cores, &mut set) };
                        let pinned = unsafe {
                            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set)
                        };
                        assert_eq!(pinned, 0, "pinning a sender to core {}", i % cores);
                    }
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = s.send_to(b"moat", "10.0.2.2:9");
                    }
                })
            })
            .collect()
    }

    /// (packets that reached the router, packets that left it), once the flood stopped.
    fn counted(&self) -> (u64, u64) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        (lab_counter("pre"), lab_counter("post"))
    }

    fn assert_none_dropped(&self, (pre, post): (u64, u64), what: &str) {
        assert!(
            pre > 100_000,
            "too few packets for the test to mean anything"
        );
        assert_eq!(
            pre - post,
            0,
            "allowed packets dropped {what}; Moat's counters {:?}; conntrack {:?}; {}",
            nft::counters(),
            conntrack_stats(),
            ip_stats()
        );
        let _ = &self.server;
    }
}

/// An enforcer restarting and adopting its table, or taking a full snapshot, replaces the
/// table in force while an allowed flow's packets cross the forward hook as fast as one core
/// sends them: not one may be dropped. (Replaced in one transaction that deletes the old
/// table, some were: a packet in the old rules as it committed found their maps empty.)
/// Each packet is its flow's first (the lab never lets conntrack confirm one), so the
/// rulesets judge every one of them.
#[test]
fn full_replacements_never_drop_an_allowed_packet_in_flight() {
    use moat_dataplane::Backend;
    if !netns::inside("full_replacements_never_drop_an_allowed_packet_in_flight") {
        return;
    }
    let lab = Lab::new(false);
    let backend = lab.enforcing(&lab.versions[0]);
    let rounds = 500;
    let (counted, took) = lab.flooded(|| {
        let mut backend = backend;
        for i in 0..rounds {
            let (last, next) = (&lab.versions[i % 2], &lab.versions[(i + 1) % 2]);
            // A restart: the next enforcer adopts the table (replacing it with the same
            // content), then takes a full snapshot of the other version.
            drop(backend);
            backend = lab.open();
            assert_eq!(
                backend.adopt(Some(last), &lab.local).unwrap(),
                moat_dataplane::Adopted::Enforcing
            );
            backend.apply_full(next, &lab.local).unwrap();
        }
    });
    eprintln!(
        "{} replacements in {took:?}; {} packets reached the router, {} left it",
        2 * rounds,
        counted.0,
        counted.1
    );
    lab.assert_none_dropped(counted, "while the table was replaced");
}

/// A delta between the lab's two versions moves the pod to another ruleset (the `blocks`
/// rule changed) and retires the one it leaves, in the delta's own transaction, while an
/// allowed flow's packets cross the forward hook as fast as one core sends them: not one
/// may be dropped. A packet the old local pod table had just sent into the retired ruleset
/// is still in its rules as the delta commits; it is safe only because a ruleset's objects
/// are plain sets, whose elements a deletion leaves in place until the kernel frees them
/// after a grace period. A deleted *map* has its elements deactivated at once (the class
/// maps a full replacement sweeps, which is why it waits; see
/// `full_replacements_never_drop_an_allowed_packet_in_flight`): a ruleset that came to
/// look up a map of its own would drop packets here.
#[test]
fn deltas_that_retire_a_ruleset_never_drop_an_allowed_packet_in_flight() {
    use moat_dataplane::Backend;
    if !netns::inside("deltas_that_retire_a_ruleset_never_drop_an_allowed_packet_in_flight") {
        return;
    }
    let lab = Lab::new(false);
    let mut backend = lab.enforcing(&lab.versions[0]);
    let rulesets = |b: &moat_enforcer_nft::NftBackend| b.counters()["rulesets"];
    let chains = || nft::objects().unwrap().expect("the table").chains.len();
    let before = (rulesets(&backend), chains());
    let deltas =
        [0, 1].map(|i| moat_policy::ir::delta::diff(&lab.versions[i], &lab.versions[1 - i]));
    let rounds = 300;
    let (counted, took) = lab.flooded(|| {
        for i in 0..rounds {
            let (old, new) = (&lab.versions[i % 2], &lab.versions[(i + 1) % 2]);
            backend
                .apply_delta(old, &deltas[i % 2], new, &lab.local)
                .unwrap();
        }
    });
    eprintln!(
        "{rounds} deltas in {took:?}; {} packets reached the router, {} left it",
        counted.0, counted.1
    );
    assert_eq!(
        (rulesets(&backend), chains()),
        before,
        "each delta retires as many rulesets as it adds, and deletes them"
    );
    lab.assert_none_dropped(counted, "while deltas retired rulesets");
}

/// Packets of one allowed flow crossing the forward hook on two cores at once, before any
/// reply: they share one conntrack entry, and a ruleset that kept the peer's class in that
/// entry's mark let one packet read the mark while another rewrote it (and drop it as
/// denied; with cluster tiers, a class's Deny could read as "no class"). Only a flow's first
/// packet, whose entry no other packet can see yet, may be judged that way.
#[test]
fn one_flow_on_two_cores_is_never_judged_on_another_packets_class() {
    if !netns::inside("one_flow_on_two_cores_is_never_judged_on_another_packets_class") {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cores >= 2,
        "this test needs two cores to race two packets ({cores})"
    );
    let lab = Lab::new(true);
    let backend = lab.enforcing(&lab.versions[0]);
    lab.flood_for(2, 8);
    let counted = lab.counted();
    eprintln!(
        "{} packets of one flow from two cores reached the router, {} left it",
        counted.0, counted.1
    );
    lab.assert_none_dropped(counted, "between two cores");
    drop(backend);
}

/// Node n0's snapshot with no NetworkPolicy and one Admin ClusterNetworkPolicy: pod x/a
/// denies ingress from namespace y (the client's), and everything else is allowed. Its
/// ingress ruleset is ordered: a Deny for the client's class, then "any peer" allowed.
fn admin_deny_snapshot() -> NodeSnapshot {
    use moat_policy::model::K8sObject;
    use serde_json::json;
    let base = forwarding_snapshot(0);
    let mut objects = lab_cluster();
    objects.push(K8sObject::ClusterNetworkPolicy(
        serde_json::from_value(json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "keep-y-off-x"},
            "spec": {
                "tier": "Admin", "priority": 10,
                "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
                "ingress": [{"name": "no-y", "action": "Deny",
                             "from": [{"namespaces": {"matchLabels": {"ns": "y"}}}]}],
            },
        }))
        .unwrap(),
    ));
    let snap = Index::build(parse_all(&objects))
        .snapshots()
        .into_iter()
        .find(|s| s.node == "n0")
        .unwrap();
    assert_ne!(snap, base);
    snap
}

/// A packet conntrack does not track (another component's `notrack`) has no conntrack mark
/// for its peer's class: the ordered ruleset's class lookups all miss, which read as "no
/// class" and let the "any peer" allow pass what the Admin Deny denies. It must be denied.
#[test]
fn an_untracked_packet_never_skips_its_class_deny() {
    if !netns::inside("an_untracked_packet_never_skips_its_class_deny") {
        return;
    }
    let snap = admin_deny_snapshot();
    for notrack in [false, true] {
        let lab = Lab::with([snap.clone(), snap.clone()], true, notrack);
        let backend = lab.enforcing(&snap);
        let denied = nft::counters()["denied"];
        lab.flood_for(1, 2);
        let (pre, post) = lab.counted();
        let denied = nft::counters()["denied"] - denied;
        eprintln!(
            "notrack {notrack}: {pre} packets reached the router, {post} left it, {denied} \
             denied by Moat"
        );
        assert!(
            pre > 10_000,
            "too few packets for the test to mean anything"
        );
        assert_eq!(
            post, 0,
            "packets the Admin Deny denies passed (notrack {notrack})"
        );
        assert_eq!(
            denied, pre,
            "every packet denied by the ruleset, not elsewhere"
        );
        if notrack {
            assert_eq!(tracked_flows(), 0, "the `notrack` did not take");
        }
        drop(backend);
        drop(lab);
        nft_run("delete table ip lab");
    }
}

/// Layout 7 (rendered by `render::full_tiers`, not yet the backend's) on real packets: pod
/// x/a's ingress from pod y/b under an Admin policy (Pass TCP 8080, Pass TCP 9090, Accept
/// UDP 53, Deny TCP 8000-8100, Deny everything else) and a Baseline one (Deny TCP
/// 9000-9999). Pass to a Baseline that denies nothing there allows; Pass to its Deny
/// denies; the Accept holds over the last Deny; the range Deny, the port-less Deny (UDP,
/// ICMP) deny — each as the IR decides.
#[test]
fn the_tier_layout_decides_on_packets() {
    use moat_dataplane::plan::tier_tables::tier_plan;
    use moat_dataplane::plan::{Classes, addresses};
    use moat_policy::ir::sim::{Fleet, Packet as SimPacket};
    use moat_policy::model::K8sObject;
    use serde_json::json;
    if !netns::inside("the_tier_layout_decides_on_packets") {
        return;
    }
    let mut objects = lab_cluster();
    let from_y = json!([{"namespaces": {"matchLabels": {"ns": "y"}}}]);
    let tcp =
        |a: u16, b: u16| json!([{"tcp": {"destinationPort": {"range": {"start": a, "end": b}}}}]);
    let one = |proto: &str, p: u16| json!([{ proto: {"destinationPort": {"number": p}} }]);
    for (name, tier, rules) in [
        (
            "tiers-lab",
            "Admin",
            json!([
                {"name": "pass-8080", "action": "Pass", "from": from_y, "protocols": one("tcp", 8080)},
                {"name": "pass-9090", "action": "Pass", "from": from_y, "protocols": one("tcp", 9090)},
                {"name": "dns", "action": "Accept", "from": from_y, "protocols": one("udp", 53)},
                {"name": "range", "action": "Deny", "from": from_y, "protocols": tcp(8000, 8100)},
                {"name": "rest", "action": "Deny", "from": from_y},
            ]),
        ),
        (
            "tiers-lab-base",
            "Baseline",
            json!([{"name": "nines", "action": "Deny", "from": [{"namespaces": {}}], "protocols": tcp(9000, 9999)}]),
        ),
    ] {
        objects.push(K8sObject::ClusterNetworkPolicy(
            serde_json::from_value(json!({
                "apiVersion": "policy.networking.k8s.io/v1alpha2",
                "kind": "ClusterNetworkPolicy",
                "metadata": {"name": name},
                "spec": {"tier": tier, "priority": 10,
                         "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
                         "ingress": rules},
            }))
            .unwrap(),
        ));
    }
    let snaps = Index::build(parse_all(&objects)).snapshots();
    let fleet = Fleet::new(&snaps);
    let snap = snaps.iter().find(|s| s.node == "n0").unwrap().clone();
    let lab = Lab::with([snap.clone(), snap.clone()], true, false);
    let mut classes = Classes::default();
    let mut d = addresses(&snap, &mut classes);
    d.local = lab.local.clone();
    d.epoch = rand::random();
    let tp = tier_plan(&snap, &d, &classes);
    assert_eq!(tp.tables.len(), 2, "an Admin and a Baseline table");
    let lock = TxLock::acquire(&lab.lock, nft::LOCK_WAIT_DEFAULT).unwrap();
    nft::apply(&lock, render::full_tiers(&d, &tp)).unwrap();

    let (client, server): (IpAddr, IpAddr) =
        ("10.0.1.2".parse().unwrap(), "10.0.2.2".parse().unwrap());
    let probes: [(u8, u16, bool); 7] = [
        (6, 8080, true),
        (6, 9090, false),
        (17, 53, true),
        (6, 8081, false),
        (6, 7000, false),
        (17, 5000, false),
        (1, 0, false),
    ];
    let listeners: Vec<std::thread::JoinHandle<()>> = probes
        .iter()
        .filter(|(proto, ..)| *proto == 6)
        .map(|&(_, port, _)| {
            let l = lab.server.listen_tcp(port);
            std::thread::spawn(move || while l.accept().is_ok() {})
        })
        .collect();
    let udp: Vec<(u16, std::net::UdpSocket)> = probes
        .iter()
        .filter(|(proto, ..)| *proto == 17)
        .map(|&(_, port, _)| (port, lab.server.bind_udp(port)))
        .collect();
    let denied = nft::counters()["denied"];
    for (proto, port, allowed) in probes {
        let ir = fleet.ingress_allows(&SimPacket {
            src: client,
            dst: server,
            proto,
            port,
        });
        assert_eq!(
            ir, allowed,
            "the IR decides {proto}/{port} otherwise than the test says"
        );
        let got = match proto {
            6 => lab.client.tcp_connects(server, port),
            17 => {
                let s = &udp.iter().find(|(p, _)| *p == port).unwrap().1;
                lab.client.udp_arrives(server, port, s)
            }
            _ => lab.client.echo_answered(server),
        };
        assert_eq!(got, allowed, "protocol {proto} port {port} on packets");
    }
    let dropped = nft::counters()["denied"] - denied;
    assert!(
        dropped >= 5,
        "the denied probes were Moat's drops ({dropped})"
    );
    drop(listeners);
}

/// Conntrack entries in this namespace (the lab's flood is its only traffic).
fn tracked_flows() -> u64 {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A flow conntrack confirmed without Moat allowing it (started before Moat's table, as one
/// a previous dataplane dropped after conntrack would be) is judged, never inherited: only
/// a flow whose first packet a ruleset allowed carries the stamp that lets its later packets
/// pass unjudged.
#[test]
fn a_flow_confirmed_without_moat_is_still_judged() {
    if !netns::inside("a_flow_confirmed_without_moat_is_still_judged") {
        return;
    }
    let snap = admin_deny_snapshot();
    let lab = Lab::with([snap.clone(), snap.clone()], true, false);
    // Conntrack runs in a namespace only while some rule needs it: another component's.
    nft_run(
        "table ip other {
           chain c {
             type filter hook forward priority 10;
             ct state new counter
           }
         }",
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = lab.flood(1, &stop);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (pre0, post0) = (lab_counter("pre"), lab_counter("post"));
    assert!(post0 > 1_000, "without Moat the flow passes: {post0}");
    assert!(tracked_flows() > 0, "the flow is confirmed");
    let backend = lab.enforcing(&snap);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (pre1, post1) = (lab_counter("pre"), lab_counter("post"));
    std::thread::sleep(std::time::Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.into_iter().for_each(|t| t.join().unwrap());
    let (pre, post) = lab.counted();
    eprintln!(
        "before Moat {post0} of {pre0} passed; under Moat {} of {} passed",
        post - post1,
        pre - pre1
    );
    assert!(
        pre - pre1 > 10_000,
        "too few packets for the test to mean anything"
    );
    assert_eq!(
        post - post1,
        0,
        "a denied flow confirmed before Moat inherited an allow"
    );
    drop(backend);
}

/// This namespace's conntrack statistics summed over CPUs (`/proc/net/stat/nf_conntrack`,
/// hexadecimal), those that are not zero: where a packet went if not to Moat's rules.
fn conntrack_stats() -> std::collections::BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/net/stat/nf_conntrack").unwrap_or_default();
    let mut lines = text.lines();
    let names: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let mut sum = std::collections::BTreeMap::new();
    for l in lines {
        for (n, v) in names.iter().zip(l.split_whitespace()) {
            *sum.entry(n.to_string()).or_insert(0) += u64::from_str_radix(v, 16).unwrap_or(0);
        }
    }
    sum.retain(|n, v| *v > 0 && n != "entries");
    sum
}

/// The IP statistics of this namespace (`/proc/net/snmp`): forwarded, discarded, unroutable.
fn ip_stats() -> String {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let ip: Vec<&str> = text.lines().filter(|l| l.starts_with("Ip:")).collect();
    match ip.as_slice() {
        [names, values] => names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
            .filter(|(_, v)| *v != "0")
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}
