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
        let da = Desired {
            epoch,
            ..desired(&a, &mut Classes::default())
        };
        let db = Desired {
            epoch: epoch + 1000,
            ..desired(&b, &mut Classes::default())
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

/// A namespace of its own for one end of the forwarding lab, deleted on drop.
struct Peer(String);

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
        let peer = Peer(ns.clone());
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
    fn enter(&self) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
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

/// Node n0's snapshot: pod x/a (10.0.2.2) on it accepts UDP/TCP 9 from pod y/b (10.0.1.2, on
/// n1) and port 81 from 20 /32 blocks (offset by `k`, so two versions differ).
fn forwarding_snapshot(k: u32) -> NodeSnapshot {
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

/// An enforcer restarting and adopting its table, or taking a full snapshot, replaces the
/// table in force while an allowed flow's packets cross the forward hook as fast as one core
/// sends them: not one may be dropped. (Replaced in one transaction that deletes the old
/// table, some were: a packet in the old rules as it committed found their maps empty.)
#[test]
fn full_replacements_never_drop_an_allowed_packet_in_flight() {
    use moat_dataplane::Backend;
    let none = moat_dataplane::LocalPods::default();
    if !netns::inside("full_replacements_never_drop_an_allowed_packet_in_flight") {
        return;
    }
    let client = Peer::new("c", "vc", "10.0.1.2", "10.0.1.1", 1);
    let server = Peer::new("s", "vs", "10.0.2.2", "10.0.2.1", 2);
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    // Counted before conntrack and after everything else in this namespace: the difference
    // is what the forward path dropped.
    nft_run(
        "table ip lab {
           counter pre {}
           counter post {}
           chain pre {
             type filter hook prerouting priority -400;
             udp dport 9 counter name \"pre\"
           }
           chain post {
             type filter hook postrouting priority 400;
             udp dport 9 counter name \"post\"
           }
         }",
    );
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("lock");
    let versions = [forwarding_snapshot(0), forwarding_snapshot(1)];
    let open = || {
        moat_enforcer_nft::NftBackend::open(moat_enforcer_nft::DEFAULT_MAX_ELEMENTS, &lock).unwrap()
    };
    let mut backend = open();
    backend.adopt(None, &none).unwrap();
    backend.apply_full(&versions[0], &none).unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            client.enter();
            // One flow that never sees a reply stays NEW to conntrack: every packet of it is
            // judged by the rulesets, like the first packet of a new connection.
            let s = std::net::UdpSocket::bind("10.0.1.2:5000").unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = s.send_to(b"moat", "10.0.2.2:9");
            }
            drop(client);
        })
    };
    let rounds = 500;
    let t = std::time::Instant::now();
    for i in 0..rounds {
        let (last, next) = (&versions[i % 2], &versions[(i + 1) % 2]);
        // A restart: the next enforcer adopts the table (replacing it with the same content),
        // then takes a full snapshot of the other version.
        drop(backend);
        backend = open();
        assert_eq!(
            backend.adopt(Some(last), &none).unwrap(),
            moat_dataplane::Adopted::Enforcing
        );
        backend.apply_full(next, &none).unwrap();
    }
    let took = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (pre, post) = (lab_counter("pre"), lab_counter("post"));
    eprintln!(
        "{} replacements in {took:?}; {pre} packets reached the router, {post} left it",
        2 * rounds
    );
    assert!(
        pre > 100_000,
        "too few packets for the test to mean anything"
    );
    assert_eq!(
        pre - post,
        0,
        "allowed packets dropped while the table was replaced"
    );
    drop(server);
}
