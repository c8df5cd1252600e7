//! The nft dataplane against a real kernel, in a private network namespace: deltas leave
//! exactly the table a full replacement would, and a stale delta can never commit.

use moat_enforcer_nft::desired::{Classes, Desired, desired};
use moat_enforcer_nft::nft::{self, TxLock};
use moat_enforcer_nft::render;
use moat_enforcer_nft::{Via, commit_delta, netlink};
use moat_integration::netns;
use moat_policy::Index;
use moat_policy::ir::NodeSnapshot;
use moat_policy::testkit::parse_all;
use moat_policy::testkit::random::{Features, World};
use rand::SeedableRng;
use rand::rngs::SmallRng;
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

#[test]
fn deltas_leave_exactly_what_a_full_replace_leaves() {
    if !netns::inside("deltas_leave_exactly_what_a_full_replace_leaves") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = TxLock::acquire(&dir.path().join("lock"), nft::LOCK_WAIT_DEFAULT).unwrap();
    let mut rng = SmallRng::seed_from_u64(0x5eed_4a11);
    let mut f = Features::default();
    let (mut deltas, mut elements, mut by_netlink) = (0, 0, 0);
    let mut conn = None;
    for _world in 0..12 {
        let mut world = World::generate(&mut rng, &mut f);
        let mut classes = Classes::default();
        let first = node_snapshots(&world)[0].clone();
        let node = first.node.clone();
        let mut cur: Desired = desired(&first, &mut classes);
        cur.epoch = rand::random();
        nft::apply(&lock, render::full(&cur)).unwrap();
        for _step in 0..15 {
            world.mutate(&mut rng, &mut f, false);
            let Some(next) = node_snapshots(&world).into_iter().find(|s| s.node == node) else {
                break;
            };
            let new = Desired {
                epoch: cur.epoch,
                ..desired(&next, &mut classes)
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
            elements += new.elements();
            cur = new;
        }
    }
    eprintln!("{deltas} deltas checked ({by_netlink} over netlink), {elements} elements in total");
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

#[test]
fn a_version_over_the_element_limit_is_refused_and_the_kernel_keeps_the_last() {
    if !netns::inside("a_version_over_the_element_limit_is_refused_and_the_kernel_keeps_the_last") {
        return;
    }
    use moat_dataplane::{Backend, BackendError};
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(11);
    let mut f = Features::default();
    // A small first version and a bigger second one for the same node.
    let (small, big) = loop {
        let mut world = World::generate(&mut rng, &mut f);
        let a = node_snapshots(&world)[0].clone();
        world.mutate(&mut rng, &mut f, false);
        world.mutate(&mut rng, &mut f, false);
        let Some(b) = node_snapshots(&world)
            .into_iter()
            .find(|s| s.node == a.node)
        else {
            continue;
        };
        let size = |s: &NodeSnapshot| desired(s, &mut Classes::default()).elements();
        if size(&b) > size(&a) {
            break (a, b);
        }
    };
    let limit = desired(&small, &mut Classes::default()).elements();
    let mut backend = moat_enforcer_nft::NftBackend::open(limit, &dir.path().join("lock")).unwrap();
    let none = moat_dataplane::LocalPods::default();
    backend.adopt(None, &none).unwrap();
    backend.apply_full(&small, &none).unwrap();
    let before = dump();
    let delta = moat_policy::ir::delta::diff(&small, &big);
    for result in [
        backend.apply_delta(&small, &delta, &big, &none),
        backend.apply_full(&big, &none),
    ] {
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
    assert_eq!(nft::recorded().unwrap().map(|r| r.0), Some(small.version));
}
