//! Server failover on packets: three `moat-server` replicas watching the test API server in
//! the fabric namespace, a mixed eBPF/nft cluster whose enforcers are given all three, and
//! probes running throughout: killing the replica most enforcers hold, and restarting every
//! replica in turn, never lets a denied packet through, never breaks an established
//! connection, and every node takes the changes made meanwhile.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use moat_harness::agent::{ProbeReq, Proto};
use moat_harness::cluster::PodSpec;
use moat_harness::moat::Moat;
use moat_integration::watch::{Watch, open};
use moat_integration::world::{APPLY, World};
use serde_json::json;

/// y/b may reach the `pod=a` pods of x on 80 (TCP and UDP) and on `more` ports; nobody else.
fn policies(more: &[u16]) -> Vec<String> {
    let mut ports = String::from("[{port: 80}, {port: 80, protocol: UDP}");
    for p in more {
        ports.push_str(&format!(", {{port: {p}}}"));
    }
    ports.push(']');
    vec![format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: a-from-y-b, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{ns: y}}}}\n      podSelector: {{matchLabels: {{pod: b}}}}\n    ports: {ports}\n"
    )]
}

fn probes(dsts: &[IpAddr], n: usize) -> Vec<ProbeReq> {
    (0..n)
        .map(|i| ProbeReq {
            dst: dsts[i % dsts.len()],
            proto: if i % 4 < 2 { Proto::Tcp } else { Proto::Udp },
            port: 80,
        })
        .collect()
}

/// Applies `objects` without waiting; `during` runs at once; then waits until every node
/// enforces them, and says how long that took.
fn change(w: &mut World, more: &[u16], during: impl FnOnce(&mut World)) -> Duration {
    let objects = w.objects(&policies(more));
    let expected = Moat::expected(&objects).unwrap();
    w.moat.write_manifests(&objects).unwrap();
    let t = Instant::now();
    during(w);
    w.moat.wait_applied(&expected, APPLY).unwrap();
    t.elapsed()
}

#[test]
fn killing_and_rolling_the_server_replicas_opens_nothing_and_breaks_nothing() {
    let mut w = World::start_replicated("mixed", 3);
    w.apply(&policies(&[]));
    let [v4, v6] = w.ips("x/a");

    let mut watch = Watch::new();
    let probers = [
        ("y/b", true, 16, Duration::from_millis(400), 10),
        ("z/c", false, 64, Duration::from_millis(300), 0),
    ];
    for (from, expect, n, timeout, pause) in probers {
        let agent = w.moat.cluster.prober(from).unwrap();
        watch.probe(
            agent,
            from,
            probes(&[v4, v6], n),
            expect,
            timeout,
            Duration::from_millis(pause),
        );
    }
    let mut streams = w.moat.cluster.prober("y/b").unwrap();
    let ids = open(&mut streams, &[v4, v6], 80);
    watch.echo(streams, &ids);

    // A pod appears and the policy changes while the replica most enforcers hold dies.
    let victim = w.moat.busiest_replica().unwrap();
    let id = w.spec.id;
    let new = PodSpec {
        key: "x/d".into(),
        node: 1,
        v4: Ipv4Addr::new(10, id, 20, 40),
        v6: Ipv6Addr::new(0xfd00, u16::from(id), 0, 0, 0, 0, 20, 40),
    };
    w.add_pod(new.clone(), json!({"pod": "a"}));
    w.announce(std::slice::from_ref(&new.key));
    let took = change(&mut w, &[81], |w| w.moat.kill_replica(victim).unwrap());
    eprintln!("killed r{victim}: every node enforced the change {took:?} after the kill");
    for (from, port, allowed) in [("y/b", 80, true), ("y/b", 81, true), ("z/c", 80, false)] {
        assert_eq!(
            w.reach(from, "x/d", Proto::Tcp, port),
            allowed,
            "{from} -> the pod created during the failover, port {port}"
        );
    }
    assert!(w.reach("y/b", "x/a", Proto::Tcp, 81));

    // A rolling restart: each replica drains, and a change lands while it is away.
    w.moat.start_replica(victim).unwrap();
    for i in 0..3 {
        w.moat.terminate_replica(i).unwrap();
        let more: &[u16] = if i % 2 == 0 { &[] } else { &[81] };
        let took = change(&mut w, more, |_| {});
        eprintln!("r{i} drained and stopped: every node enforced the next change in {took:?}");
        w.moat.start_replica(i).unwrap();
    }
    let last = w.objects(&policies(&[81]));
    w.moat.apply(&last, APPLY).unwrap();
    let seen = watch.finish();
    eprintln!("{} probes ({:.0}/s) throughout", seen.probes, seen.rate);
    seen.assert_clean();
    assert!(w.reach("y/b", "x/a", Proto::Tcp, 81));
    assert!(!w.reach("z/c", "x/a", Proto::Tcp, 81));
}
