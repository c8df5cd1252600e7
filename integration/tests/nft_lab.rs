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
    let b = loop {
        world.mutate(&mut rng, &mut f, false);
        let s = node_snapshots(&world)
            .into_iter()
            .find(|s| s.node == a.node)
            .unwrap();
        if s.digest != a.digest {
            break s;
        }
    };
    let mut classes = Classes::default();
    let da = Desired {
        epoch: 1,
        ..desired(&a, &mut classes)
    };
    let db = Desired {
        epoch: 1,
        ..desired(&b, &mut classes)
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
        // big denies all ingress; small keeps exactly its rules; open stays open.
        let dst = &kernel["dst4"];
        let to = |iface: u32, addr: &str, verdict: &str| {
            dst.iter()
                .any(|e| e.contains(&format!("\"{iface}\",\"{addr}\"")) && e.contains(verdict))
        };
        assert_eq!(cut.endpoints, vec![pod("10.0.0.1").1], "{how}");
        assert!(
            to(pod("10.0.0.1").0, "10.0.0.1", "\"i_deny\""),
            "{how}: {dst:?}"
        );
        let small_chain = &unlimited.ing4[&"10.0.0.2".parse().unwrap()];
        assert!(
            to(pod("10.0.0.2").0, "10.0.0.2", small_chain),
            "{how}: {dst:?}"
        );
        assert!(
            to(pod("10.0.0.3").0, "10.0.0.3", "accept"),
            "{how}: {dst:?}"
        );
        let rs = &unlimited.rulesets[small_chain];
        assert_eq!(
            kernel[&format!("{small_chain}_gx")].len(),
            rs.gx.len(),
            "{how}: small's rules"
        );
        assert_eq!(kernel[&format!("{small_chain}_ap")].len(), rs.ap.len());
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
    let lock2 = TxLock::acquire(&dir.path().join("lock2"), nft::LOCK_WAIT_DEFAULT).unwrap();
    nft::apply(
        &lock2,
        render::full(&planned(&snap, &mut Classes::default(), &after)),
    )
    .unwrap();
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
