//! Fail closed, played by an attacker on real packets (issue #12): forged sources from an
//! egress-isolated pod, new pods probed before the server knows them, a pod on a reused
//! address, a policy built to overflow a node, and the policy server moving while unknown
//! pods are denied. One dual-stack 3×3 cluster per dataplane (nft, eBPF, mixed) runs every
//! case in turn.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use moat_harness::agent::{ProbeReq, Proto};
use moat_harness::cluster::PodSpec;
use moat_harness::spoof::{Kind, SpoofReq};
use moat_integration::world::{APPLY, World, tcp};
use serde_json::json;

#[test]
fn nft() {
    every_attack_fails("nft", Moved::NotYet);
}

#[test]
fn ebpf() {
    every_attack_fails("ebpf", Moved::Included);
}

#[test]
fn mixed() {
    every_attack_fails("mixed", Moved::Included);
}

// The nft cluster runs the attacks without the move (`nft` above) and the move alone here,
// so each stays within its time budget.
#[test]
fn nft_server_moved() {
    let mut w = World::start("nft");
    w.apply(&policies());
    the_fleet_follows_a_server_that_moved(&mut w);
}

#[derive(PartialEq)]
enum Moved {
    NotYet,
    Included,
}

const PROBE: Duration = Duration::from_millis(300);

fn policy(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

/// The standing policies: x/a may only reach y/b on 80; z/c admits only x/b on 80; in
/// namespace w, `role=web` admits y/b and may reach y/b, `role=locked` admits only z/c.
fn policies() -> Vec<String> {
    vec![
        policy(
            "a-egress",
            "x",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n    ports: [{port: 80}, {port: 80, protocol: UDP}]\n",
        ),
        policy(
            "c-ingress",
            "z",
            "  podSelector: {matchLabels: {pod: c}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: x}}\n      podSelector: {matchLabels: {pod: b}}\n    ports: [{port: 80}, {port: 80, protocol: UDP}]\n",
        ),
        policy(
            "web",
            "w",
            "  podSelector: {matchLabels: {role: web}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n    ports: [{port: 80}]\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n    ports: [{port: 80}]\n",
        ),
        policy(
            "locked",
            "w",
            "  podSelector: {matchLabels: {role: locked}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: z}}\n      podSelector: {matchLabels: {pod: c}}\n    ports: [{port: 80}]\n",
        ),
    ]
}

fn every_attack_fails(backend: &str, moved: Moved) {
    let mut w = World::start(backend);
    w.apply(&policies());
    spoofed_sources_never_arrive(&mut w);
    let added = new_pods_are_isolated_until_named(&mut w);
    a_reused_address_never_inherits_the_old_pods_rules(&mut w, &added);
    an_overflowing_policy_denies_what_it_cannot_express(&mut w);
    if moved == Moved::Included {
        the_fleet_follows_a_server_that_moved(&mut w);
    }
}

fn spoof(src: IpAddr, dst: IpAddr, kind: Kind, token: u64) -> SpoofReq {
    SpoofReq {
        src,
        dst,
        kind,
        port: 80,
        token,
    }
}

/// Sends `reqs` from pod `from` and asks pod `to` which arrived.
fn sent_and_heard(w: &mut World, from: &str, to: &str, reqs: Vec<SpoofReq>) -> Vec<bool> {
    let sent = w
        .moat
        .cluster
        .agent(from)
        .unwrap()
        .spoof(reqs.clone())
        .unwrap();
    assert!(sent.iter().all(|s| *s), "{from} could not send {reqs:?}");
    std::thread::sleep(Duration::from_millis(300));
    w.moat.cluster.agent(to).unwrap().heard(reqs).unwrap()
}

fn spoofed_sources_never_arrive(w: &mut World) {
    let [b4, b6] = w.ips("x/b");
    let [c4, c6] = w.ips("z/c");
    let [ya4, ya6] = w.ips("y/a");
    let mut token = rand::random::<u64>() >> 1;
    let mut next = || {
        token += 1;
        token
    };
    // Control: x/b sending as itself reaches z/c, so "not heard" below means dropped.
    let own: Vec<SpoofReq> = [(b4, c4), (b6, c6)]
        .into_iter()
        .flat_map(|(s, d)| {
            [
                spoof(s, d, Kind::Udp, next()),
                spoof(s, d, Kind::Syn, next()),
            ]
        })
        .collect();
    let heard = sent_and_heard(w, "x/b", "z/c", own.clone());
    assert!(
        heard.iter().all(|h| *h),
        "x/b's own packets to z/c: {heard:?} for {own:?}"
    );
    // x/a (egress-isolated; z/c admits only x/b) forging x/b's addresses, a forwarded
    // link-local source, and an address nobody has; to z/c and to the unisolated y/a.
    let forged: Vec<SpoofReq> = [
        (b4, c4),
        (b6, c6),
        (IpAddr::V4(Ipv4Addr::new(169, 254, 9, 9)), c4),
        (IpAddr::V4(Ipv4Addr::new(10, 250, 0, 1)), c4),
        (IpAddr::V6("fd00:ffff::1".parse::<Ipv6Addr>().unwrap()), c6),
    ]
    .into_iter()
    .flat_map(|(s, d)| {
        [
            spoof(s, d, Kind::Udp, next()),
            spoof(s, d, Kind::Syn, next()),
        ]
    })
    .collect();
    let heard = sent_and_heard(w, "x/a", "z/c", forged.clone());
    for (r, h) in forged.iter().zip(&heard) {
        assert!(!h, "x/a forging {} reached z/c: {r:?}", r.src);
    }
    let open: Vec<SpoofReq> = [
        (b4, ya4),
        (b6, ya6),
        (IpAddr::V4(Ipv4Addr::new(169, 254, 9, 9)), ya4),
    ]
    .into_iter()
    .flat_map(|(s, d)| {
        [
            spoof(s, d, Kind::Udp, next()),
            spoof(s, d, Kind::Syn, next()),
        ]
    })
    .collect();
    let heard = sent_and_heard(w, "x/a", "y/a", open.clone());
    for (r, h) in open.iter().zip(&heard) {
        assert!(
            !h,
            "x/a forging {} reached the unisolated y/a: {r:?}",
            r.src
        );
    }
    // And the real thing still works: x/a as itself may reach y/b.
    assert!(w.reach("x/a", "y/b", Proto::Tcp, 80));
    assert!(!w.reach("x/a", "z/c", Proto::Tcp, 80));
}

/// Pod `k` of namespace w: node `k % 3`, addresses in a block the base pods don't use.
fn w_pod(w: &World, name: &str, k: usize) -> PodSpec {
    let id = w.spec.id;
    PodSpec {
        key: format!("w/{name}"),
        node: k % w.spec.nodes,
        v4: Ipv4Addr::new(10, id, 20, 10 + k as u8),
        v6: Ipv6Addr::new(0xfd00, u16::from(id), 0, 0, 0, 0, 20, 10 + k as u16),
    }
}

fn probes(dsts: &[IpAddr], port: u16) -> Vec<ProbeReq> {
    dsts.iter().map(|d| tcp(*d, port)).collect()
}

/// 50 pods appear in a loop and are probed at once, both ways, before the server lists them:
/// nothing passes. Once it lists them, what policy allows starts within the sync latency.
fn new_pods_are_isolated_until_named(w: &mut World) -> Vec<String> {
    let mut keys = Vec::new();
    let [yb4, yb6] = w.ips("y/b");
    for batch in 0..5 {
        let mut fresh = Vec::new();
        for k in batch * 10..batch * 10 + 10 {
            let p = w_pod(w, &format!("p{k}"), k);
            fresh.push(p.key.clone());
            w.add_pod(p, json!({"role": "web"}));
        }
        // Into the new pods from y/b (allowed once they are known) and from z/c (never)...
        let dsts: Vec<IpAddr> = fresh.iter().flat_map(|k| w.ips(k)).collect();
        let reqs = vec![
            ("y/b".to_string(), probes(&dsts, 80)),
            ("z/c".to_string(), probes(&dsts, 80)),
        ];
        // ...and out of them to y/b (allowed once known).
        let mut reqs = reqs;
        for k in &fresh {
            reqs.push((k.clone(), probes(&[yb4, yb6], 80)));
        }
        let results = w.moat.cluster.probe(&reqs, PROBE, 0).unwrap();
        for ((from, ps), rs) in reqs.iter().zip(&results) {
            for (p, ok) in ps.iter().zip(rs) {
                assert!(
                    !ok,
                    "{from} -> {} passed before any snapshot named the pod",
                    p.dst
                );
            }
        }
        keys.extend(fresh);
    }
    // The server learns of them now; allowed traffic follows within the sync latency.
    w.announce(&keys);
    let objects = w.objects(&policies());
    let expected = moat_harness::moat::Moat::expected(&objects).unwrap();
    let written = Instant::now();
    w.moat.write_manifests(&objects).unwrap();
    let first = w.ips(&keys[0])[0];
    let mut first_allowed = None;
    while written.elapsed() < APPLY {
        if w.probe("y/b", vec![tcp(first, 80)])[0] {
            first_allowed = Some(written.elapsed());
            break;
        }
    }
    w.moat.wait_applied(&expected, APPLY).unwrap();
    let applied = written.elapsed();
    let first_allowed = first_allowed.expect("allowed traffic to a new pod never started");
    eprintln!(
        "{}: first allowed connection to a new pod {:?} after the server learned of 50 pods; every node applied in {:?}",
        w.moat.backend, first_allowed, applied
    );
    let dsts: Vec<IpAddr> = keys.iter().flat_map(|k| w.ips(k)).collect();
    let r = w
        .moat
        .cluster
        .probe(
            &[
                ("y/b".to_string(), probes(&dsts, 80)),
                ("z/c".to_string(), probes(&dsts, 80)),
            ],
            PROBE,
            1,
        )
        .unwrap();
    assert!(r[0].iter().all(|ok| *ok), "y/b -> new web pods: {:?}", r[0]);
    assert!(r[1].iter().all(|ok| !ok), "z/c -> new web pods: {:?}", r[1]);
    keys
}

/// A pod goes and a new pod with other labels gets its address on a new interface while
/// the server still lists the old one: neither the old pod's rules nor open traffic.
fn a_reused_address_never_inherits_the_old_pods_rules(w: &mut World, added: &[String]) {
    let old = w.pod(&added[0]).clone();
    let [a4, a6] = w.ips(&old.key);
    assert!(
        w.reach("y/b", &old.key, Proto::Tcp, 80),
        "the old pod admits y/b"
    );
    w.remove_pod(&old.key);
    let new = PodSpec {
        key: "w/reused".into(),
        ..old.clone()
    };
    w.add_pod(new.clone(), json!({"role": "locked"}));
    for from in ["y/b", "z/c"] {
        let r = w.probe(from, probes(&[a4, a6], 80));
        assert_eq!(
            r,
            [false, false],
            "{from} reached the new pod on the reused address before any snapshot named it"
        );
    }
    w.announce(std::slice::from_ref(&new.key));
    w.apply(&policies());
    assert!(
        !w.reach("y/b", &new.key, Proto::Tcp, 80),
        "the new pod's own rules"
    );
    assert!(
        w.reach("z/c", &new.key, Proto::Tcp, 80),
        "the new pod's own rules"
    );
}

/// 1,500 /32 blocks × 1,500 ports (2.25 million class·port entries) selecting a pod on node
/// 0, whose enforcer holds at most 20,000 elements: the version applies degraded, the
/// selected pods deny in that direction, everything else stays exact, and the enforcer's
/// memory stays bounded.
fn an_overflowing_policy_denies_what_it_cannot_express(w: &mut World) {
    w.moat
        .node_args
        .insert(0, vec!["--max-elements".into(), "20000".into()]);
    w.moat.kill_enforcer(0).unwrap();
    w.moat.start_enforcer(0).unwrap();
    let [yb4, _] = w.ips("y/b");
    let mut blocks = format!("    - ipBlock: {{cidr: {yb4}/32}}\n");
    for i in 1..1500u32 {
        blocks.push_str(&format!(
            "    - ipBlock: {{cidr: {}/32}}\n",
            Ipv4Addr::from(0x0b00_0000 + i)
        ));
    }
    let mut ports = String::new();
    for i in 0..1500u32 {
        ports.push_str(&format!("{{port: {}}}, ", 80 + i * 7));
    }
    let huge = policy(
        "huge",
        "w",
        &format!(
            "  podSelector: {{matchLabels: {{role: victim}}}}\n  ingress:\n  - from:\n{blocks}    ports: [{ports}]\n"
        ),
    );
    assert!(
        huge.len() > 50_000,
        "the attack policy is {} bytes",
        huge.len()
    );
    let victim = w_pod(w, "victim", 60);
    assert_eq!(victim.node, 0);
    w.add_pod(victim.clone(), json!({"role": "victim"}));
    w.announce(std::slice::from_ref(&victim.key));
    let mut ps = policies();
    ps.push(huge);
    w.apply(&ps);
    // Exact, y/b's address on port 80 would be allowed; it can't be expressed here.
    assert!(
        !w.reach("y/b", &victim.key, Proto::Tcp, 80),
        "the victim must deny, not open"
    );
    assert!(!w.reach("z/c", &victim.key, Proto::Tcp, 80));
    // Unselected pods on the same node keep their exact verdicts.
    let web0 = w
        .moat
        .cluster
        .spec
        .pods
        .iter()
        .find(|p| p.key.starts_with("w/p") && p.node == 0)
        .expect("a web pod on node 0")
        .key
        .clone();
    assert!(w.reach("y/b", &web0, Proto::Tcp, 80));
    assert!(!w.reach("z/c", &web0, Proto::Tcp, 80));
    let status = w.moat.status_table(&[]).unwrap();
    assert!(
        status.contains("degraded"),
        "status names the degradation:\n{status}"
    );
    assert!(
        status.contains("w/huge"),
        "status names the policy:\n{status}"
    );
    let pid = w.moat.enforcer_pid(0).unwrap().expect("enforcer running");
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("VmHWM");
    eprintln!("{}: node 0's enforcer peaked at {hwm} kB", w.moat.backend);
    assert!(
        hwm < 256 * 1024,
        "the enforcer grew to {hwm} kB on one policy"
    );
    // Back to exact.
    w.moat.node_args.remove(&0);
    w.moat.kill_enforcer(0).unwrap();
    w.moat.start_enforcer(0).unwrap();
    w.apply(&policies());
}

/// With unknown pods denied, the server restarts on another address (as a host-network
/// server rescheduled to another node): the fleet finds it through its service address and
/// converges within 10 s.
fn the_fleet_follows_a_server_that_moved(w: &mut World) {
    let vip = Ipv4Addr::new(10, 96, w.spec.id, 1);
    w.moat.use_server_vip(vip).unwrap();
    for i in 0..w.spec.nodes {
        w.moat.kill_enforcer(i).unwrap();
        w.moat.start_enforcer(i).unwrap();
    }
    w.apply(&policies());
    w.moat
        .move_server(Ipv4Addr::new(192, 168, w.spec.id, 253))
        .unwrap();
    let moved = Instant::now();
    let mut ps = policies();
    ps.push(policy(
        "after-move",
        "y",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: []\n",
    ));
    let objects = w.objects(&ps);
    w.moat
        .apply(&objects, Duration::from_secs(10))
        .expect("the fleet converged on the moved server within 10 s");
    eprintln!(
        "{}: converged {:?} after the server moved",
        w.moat.backend,
        moved.elapsed()
    );
    assert!(
        !w.reach("x/b", "y/a", Proto::Tcp, 80),
        "the new version is enforced"
    );
}
