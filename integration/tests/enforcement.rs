//! Enforcement on real packets beyond the conformance matrix, with each dataplane:
//! ClusterIP services (egress judged after DNAT), traffic from nodes, ICMP, connection state
//! across policy changes and enforcer restarts, and enforcers killed mid-apply.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use moat_harness::agent::{ProbeReq, Proto, StreamOp};
use moat_integration::watch::{Watch, open};
use moat_integration::world::{PROBE, World, tcp};

/// The same test on each dataplane: their verdicts must not differ.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod nft {
            $(#[test]
            fn $name() {
                super::$name("nft")
            })*
        }
        mod ebpf {
            $(#[test]
            fn $name() {
                super::$name("ebpf")
            })*
        }
    };
}

on_both_backends!(
    egress_to_a_cluster_ip_is_judged_against_the_backend_pod_and_target_port,
    a_node_reaches_its_own_pods_and_other_nodes_only_by_policy,
    a_port_less_rule_allows_ping_and_a_ported_rule_does_not,
    established_connections_survive_changes_that_still_allow_them_and_restarts,
    an_enforcer_killed_mid_apply_never_opens_or_breaks_anything,
);

fn policy(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

fn egress_to_a_cluster_ip_is_judged_against_the_backend_pod_and_target_port(backend: &str) {
    let mut w = World::start(backend);
    let id = w.spec.id;
    let node = w.pod("x/a").node;
    let svc = |n: u8| {
        [
            IpAddr::V4(Ipv4Addr::new(172, 16, id, n)),
            IpAddr::V6(Ipv6Addr::new(
                0xfd96,
                u16::from(id),
                0,
                0,
                0,
                0,
                0,
                u16::from(n),
            )),
        ]
    };
    // kube-proxy on x/a's node: svc1:80 → y/b:81, svc2:80 → y/c:81.
    for (n, backend) in [(1, "y/b"), (2, "y/c")] {
        for (s, b) in svc(n).into_iter().zip(w.ips(backend)) {
            w.moat.cluster.dnat(node, s, 80, b, 81).unwrap();
        }
    }
    let probes = |w: &World| {
        let mut v: Vec<ProbeReq> = Vec::new();
        for n in [1, 2] {
            v.extend(svc(n).map(|s| tcp(s, 80)));
        }
        v.extend(w.ips("y/b").map(|b| tcp(b, 81)));
        v.extend(w.ips("y/b").map(|b| tcp(b, 80)));
        v
    };
    let p = probes(&w);
    assert_eq!(
        w.probe("x/a", p),
        vec![true; 8],
        "everything open before policy"
    );

    w.apply(&[policy(
        "to-b-81",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n    ports: [{protocol: TCP, port: 81}]\n",
    )]);
    let p = probes(&w);
    assert_eq!(
        w.probe("x/a", p),
        // svc1 (→ y/b:81) ×2, svc2 (→ y/c:81) ×2, y/b:81 ×2, y/b:80 ×2
        vec![true, true, false, false, true, true, false, false],
        "the service is judged by its backend and target port, not its address and port"
    );
}

fn a_node_reaches_its_own_pods_and_other_nodes_only_by_policy(backend: &str) {
    let mut w = World::start(backend);
    let home = w.pod("x/a").node;
    let other = (home + 1) % w.spec.nodes;
    let node_probe = |w: &World, i: usize| {
        let mut a = w.moat.cluster.node_prober(i).unwrap();
        a.probe(w.ips("x/a").map(|d| tcp(d, 80)).to_vec(), PROBE, 1)
            .unwrap()
    };
    w.apply(&[policy(
        "deny-in",
        "x",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    )]);
    assert_eq!(node_probe(&w, home), vec![true, true], "own node → pod");
    assert_eq!(
        node_probe(&w, other),
        vec![false, false],
        "other node → pod"
    );
    assert!(!w.reach("y/a", "x/a", Proto::Tcp, 80));

    let (v4, v6) = (w.spec.node_v4(other), w.spec.node_v6(other));
    w.apply(&[
        policy("deny-in", "x", "  podSelector: {}\n  policyTypes: [Ingress]\n"),
        policy(
            "from-node",
            "x",
            &format!(
                "  podSelector: {{}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: {v4}/32}}\n    - ipBlock: {{cidr: {v6}/128}}\n"
            ),
        ),
    ]);
    assert_eq!(
        node_probe(&w, other),
        vec![true, true],
        "other node allowed by ipBlock"
    );
    assert!(!w.reach("y/a", "x/a", Proto::Tcp, 80), "pods still denied");
}

fn a_port_less_rule_allows_ping_and_a_ported_rule_does_not(backend: &str) {
    let mut w = World::start(backend);
    let ping = |w: &mut World, from: &str| w.reach(from, "x/a", Proto::Icmp, 0);
    assert!(ping(&mut w, "z/b"), "ping works without policy");
    w.apply(&[policy(
        "from-y",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n",
    )]);
    assert!(ping(&mut w, "y/b"), "port-less rule: every protocol");
    assert!(w.reach("y/b", "x/a", Proto::Sctp, 81));
    assert!(!ping(&mut w, "z/b"), "other namespace");
    w.apply(&[policy(
        "from-y",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n    ports: [{protocol: TCP, port: 80}]\n",
    )]);
    assert!(!ping(&mut w, "y/b"), "a ported rule does not allow ICMP");
    assert!(w.reach("y/b", "x/a", Proto::Tcp, 80));
    assert!(!w.reach("y/b", "x/a", Proto::Tcp, 81));
}

fn established_connections_survive_changes_that_still_allow_them_and_restarts(backend: &str) {
    let mut w = World::start(backend);
    let allow = |ports: &str| {
        policy(
            "from-y",
            "x",
            &format!(
                "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{ns: y}}}}\n    ports: {ports}\n"
            ),
        )
    };
    w.apply(&[allow("[{port: 80}]")]);
    let [v4, v6] = w.ips("x/a");
    let t = Duration::from_secs(2);
    let c = &mut w.moat.cluster;
    let open = vec![
        StreamOp::Open {
            id: 1,
            dst: v4,
            port: 80,
        },
        StreamOp::Open {
            id: 2,
            dst: v6,
            port: 80,
        },
    ];
    assert_eq!(c.streams("y/b", open, t).unwrap(), vec![true, true]);
    let echo = || vec![StreamOp::Echo { id: 1 }, StreamOp::Echo { id: 2 }];

    // A change that still allows the connection: new rules, new sets, same verdict.
    w.apply(&[allow("[{port: 81}, {port: 80}]")]);
    let c = &mut w.moat.cluster;
    assert_eq!(c.streams("y/b", echo(), t).unwrap(), vec![true, true]);

    // An enforcer restart adopts the table: the connection never notices.
    let home = w.pod("x/a").node;
    w.moat.kill_enforcer(home).unwrap();
    let c = &mut w.moat.cluster;
    assert_eq!(c.streams("y/b", echo(), t).unwrap(), vec![true, true]);
    w.moat.start_enforcer(home).unwrap();
    w.apply(&[allow("[{port: 80}]")]);
    let c = &mut w.moat.cluster;
    assert_eq!(c.streams("y/b", echo(), t).unwrap(), vec![true, true]);

    // Policy now denies y: new connections fail (established ones are conntrack's, as in
    // every stateful CNI; the test does not depend on them either way).
    w.apply(&[allow("[{port: 81}]")]);
    assert!(!w.reach("y/b", "x/a", Proto::Tcp, 80));
    assert!(w.reach("y/b", "x/a", Proto::Tcp, 81));
}

/// Big policies alternate while node `home`'s enforcer is killed with SIGKILL in the middle
/// of applying them, and restarted at once. Throughout, more than 1,000 probes a second check
/// that always-allowed new flows never fail, always-denied ones never pass, and two
/// established connections never break.
///
/// "In the middle": with nft, while an `nft` transaction of the enforcer is in flight; with
/// eBPF, every other round while its pinned version record says a switch is in progress
/// (the unused slot being written, up to the flip), and in the other rounds after a random
/// delay (compiling, receiving, or the replay onto the old slot after the flip).
fn an_enforcer_killed_mid_apply_never_opens_or_breaks_anything(backend: &str) {
    let mut w = World::start(backend);
    let home = w.pod("x/a").node;
    // Both versions allow y/b → x/a:80 (TCP and UDP) and nothing from z; they differ in
    // 2,000 ipBlocks.
    let version = |k: u8| {
        let mut blocks = String::new();
        for i in 0..2000u32 {
            let a = 0x0a_f0_00_00 + u32::from(k) * 0x10000 + i;
            blocks.push_str(&format!(
                "    - ipBlock: {{cidr: {}/32}}\n",
                Ipv4Addr::from(a)
            ));
        }
        vec![
            policy(
                "from-y-b",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n    ports: [{port: 80}, {port: 80, protocol: UDP}]\n",
            ),
            policy(
                "blocks",
                "x",
                &format!(
                    "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n{blocks}    ports: [{{port: 81}}]\n"
                ),
            ),
        ]
    };
    w.apply(&version(0));
    let [v4, v6] = w.ips("x/a");
    let batch = |n: usize| -> Vec<ProbeReq> {
        (0..n)
            .map(|i| {
                let dst = if i % 2 == 0 { v4 } else { v6 };
                let proto = if i % 4 < 2 { Proto::Tcp } else { Proto::Udp };
                ProbeReq {
                    dst,
                    proto,
                    port: 80,
                }
            })
            .collect()
    };

    let mut watch = Watch::new();
    // (from, expected, probes per request, timeout, pause): the allowed prober is paced so
    // its closed connections' TIME_WAIT never exhausts the ephemeral ports.
    let probers = [
        ("y/b", true, 16, Duration::from_millis(400), 10),
        ("z/c", false, 200, Duration::from_millis(300), 0),
    ];
    for (from, expect, n, timeout, pause) in probers {
        let agent = w.moat.cluster.prober(from).unwrap();
        let pause = Duration::from_millis(pause);
        watch.probe(agent, from, batch(n), expect, timeout, pause);
    }
    let mut streams = w.moat.cluster.prober("y/b").unwrap();
    let ids = open(&mut streams, &[v4, v6], 80);
    watch.echo(streams, &ids);

    let mut mid_apply = 0;
    let rounds = 16u8;
    for round in 1..=rounds {
        let objects = w.objects(&version(round % 2));
        w.moat.write_manifests(&objects).unwrap();
        if backend == "ebpf" && round % 2 == 0 {
            std::thread::sleep(Duration::from_millis(rand::random_range(0..80)));
            w.moat.kill_enforcer(home).unwrap();
        } else {
            // Catch the enforcer mid-apply, else give up after a while and kill it wherever
            // it is.
            // The pid is looked up once (that runs `ip`): the window is milliseconds long.
            let deadline = Instant::now() + Duration::from_secs(5);
            if let Some(pid) = w.moat.enforcer_pid(home).unwrap() {
                loop {
                    let caught = match backend {
                        "nft" => nft_child(pid),
                        _ => switching(&w, home),
                    };
                    if caught || Instant::now() > deadline {
                        mid_apply += usize::from(caught);
                        w.moat.kill_enforcer(home).unwrap();
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
        w.moat.start_enforcer(home).unwrap();
        if round % 3 == 0 {
            // Sometimes let it finish, so later rounds start from an applied new version.
            let expected = moat_harness::moat::Moat::expected(&objects).unwrap();
            w.moat
                .wait_applied(&expected, Duration::from_secs(30))
                .unwrap();
        }
    }
    let last = w.objects(&version(rounds % 2));
    w.moat.apply(&last, Duration::from_secs(30)).unwrap();
    let seen = watch.finish();
    let watched = if backend == "ebpf" {
        rounds / 2
    } else {
        rounds
    };
    eprintln!(
        "{backend}: {mid_apply} of {watched} watched kills landed mid-apply; {} probes ({:.0}/s)",
        seen.probes, seen.rate
    );
    // A sanity check of the test's power, not of the dataplane: the windows are milliseconds
    // long and polled from outside, so not every watched kill lands in one.
    assert!(
        mid_apply >= usize::from(watched.div_ceil(3)),
        "too few kills landed mid-apply ({mid_apply} of {watched}) for the test to mean anything"
    );
    seen.assert_rate(1000.0);
    seen.assert_clean();
    assert!(
        !w.reach("y/b", "x/a", Proto::Tcp, 81),
        "y/b is in no ipBlock"
    );
}

/// A node switches dataplane, nft → eBPF → nft, with its enforcer restarted each time: the
/// policy in force never lapses while the new dataplane takes over, and once it enforces,
/// the old dataplane's rules are gone (stale rules would deny what newer policy allows).
#[test]
fn a_node_switching_dataplane_keeps_enforcing_and_leaves_no_stale_rules() {
    let mut w = World::start("nft");
    let home = w.pod("x/a").node;
    let from = |pod: &str| {
        policy(
            &format!("from-{}", pod.replace('/', "-")),
            "x",
            &format!(
                "  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{ns: {}}}}}\n      podSelector: {{matchLabels: {{pod: {}}}}}\n    ports: [{{port: 80}}]\n",
                &pod[..1],
                &pod[2..]
            ),
        )
    };
    w.apply(&[from("y/b")]);
    assert!(w.moat.has_nft_table(home).unwrap());

    // nft → eBPF while probers watch both verdicts.
    let mut watch = Watch::new();
    for (from, expect) in [("y/b", true), ("z/c", false)] {
        let agent = w.moat.cluster.prober(from).unwrap();
        let dst = w.ips("x/a").map(|d| tcp(d, 80)).to_vec();
        watch.probe(agent, from, dst, expect, PROBE, Duration::ZERO);
    }
    let switch = |w: &mut World, backend: &str, policies: &[String]| {
        w.moat.node_backends.insert(home, backend.to_string());
        w.moat.kill_enforcer(home).unwrap();
        w.moat.start_enforcer(home).unwrap();
        let expected = moat_harness::moat::Moat::expected(&w.objects(policies)).unwrap();
        w.moat
            .wait_applied(&expected, Duration::from_secs(30))
            .unwrap();
        // The version may be the one the old process had applied, so the fleet view shows
        // it at once: the sign the new process enforces is the other dataplane gone.
        let deadline = Instant::now() + Duration::from_secs(20);
        let took_over = |w: &World| {
            let (ebpf, nft) = (
                w.moat.has_ebpf_pins(home),
                w.moat.has_nft_table(home).unwrap(),
            );
            if backend == "ebpf" {
                ebpf && !nft
            } else {
                nft && !ebpf
            }
        };
        while !took_over(w) {
            assert!(
                Instant::now() < deadline,
                "{backend} never took over:\n{}",
                w.moat.log_tails(20)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    switch(&mut w, "ebpf", &[from("y/b")]);
    std::thread::sleep(Duration::from_millis(500));
    let seen = watch.finish();
    // Which check dropped, should a verdict have flipped.
    eprintln!(
        "eBPF counters on the switched node: {:?}",
        w.moat.ebpf_counters(home)
    );
    seen.assert_clean();
    assert!(w.moat.has_ebpf_pins(home));
    assert!(
        !w.moat.has_nft_table(home).unwrap(),
        "eBPF enforces: the nft table must be gone"
    );
    // A stale nft table would still deny z/c.
    w.apply(&[from("y/b"), from("z/c")]);
    assert!(w.reach("z/c", "x/a", Proto::Tcp, 80));

    // eBPF → nft: the pins go, and with them eBPF's rules, which would deny y/c.
    switch(&mut w, "nft", &[from("y/b"), from("z/c")]);
    assert!(w.reach("z/c", "x/a", Proto::Tcp, 80));
    assert!(!w.reach("y/c", "x/a", Proto::Tcp, 80));
    assert!(w.moat.has_nft_table(home).unwrap());
    assert!(
        !w.moat.has_ebpf_pins(home),
        "nft enforces: the eBPF pins must be gone"
    );
    w.apply(&[from("y/c")]);
    assert!(w.reach("y/c", "x/a", Proto::Tcp, 80));
    assert!(!w.reach("z/c", "x/a", Proto::Tcp, 80));
}

/// Layout 5 is the one before this binary's: every policy map hit an allow (cluster tiers
/// denied whole), where layout 6 reads verdicts and flags named-port rulesets; the flow
/// table is shared.
#[test]
fn an_upgrade_from_the_previous_map_layout_keeps_policy_and_connections() {
    upgrade_from(5);
}

/// Layout 4: the sender of an isolated-egress flow named by an 8-bit mark index (`LOCAL`,
/// `LOCAL_ADDR`), which layout 5 replaced with the local pod maps (the sender named by its
/// interface); its flow array is placed anew.
#[test]
fn an_upgrade_from_layout_4_keeps_policy_and_connections() {
    upgrade_from(4);
}

/// Layout 3: flows in the kernel's hash (`CT`), which layout 4 replaced with an array it
/// places flows in itself.
#[test]
fn an_upgrade_from_layout_3_keeps_policy_and_connections() {
    upgrade_from(3);
}

/// Layout 2: single ports in `PORTS`, which layout 3 moved into a hash of their own.
#[test]
fn an_upgrade_from_layout_2_keeps_policy_and_connections() {
    upgrade_from(2);
}

/// Layout 1 (an LRU flow table): two layouts back.
#[test]
fn an_upgrade_from_the_first_map_layout_keeps_policy_and_connections() {
    upgrade_from(1);
}

/// A node runs an older map layout's datapath (the object is a committed fixture) and is
/// upgraded to this binary's: its maps are migrated, flows included, while more than 1,000
/// probes a second and two established connections watch. The connections were opened under
/// a policy since replaced by one that denies them: only the flow table keeps them alive, so
/// a flow lost in the upgrade breaks a connection; a port rule lost in it shows as a wrong
/// probe.
fn upgrade_from(layout: u32) {
    const NEW: u32 = moat_enforcer_ebpf::LAYOUT_VERSION;
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../enforcer-ebpf/tests/fixtures/moat-datapath-layout{layout}.o"
    ));
    let home = moat_conformance::cluster::node_of(0, 0);
    let old = vec![
        "env".to_string(),
        format!("MOAT_EBPF_OBJECT={}", fixture.display()),
        format!("MOAT_EBPF_LAYOUT_FOR_TESTS={layout}"),
    ];
    let mut w = World::start_wrapped("ebpf", [(home, old)].into());
    assert_eq!(w.pod("x/a").node, home);
    let from = |pod: &str, port: u16| {
        policy(
            &format!("from-{}-{port}", pod.replace('/', "-")),
            "x",
            &format!(
                "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{ns: {}}}}}\n      podSelector: {{matchLabels: {{pod: {}}}}}\n    ports: [{{port: {port}}}]\n",
                &pod[..1],
                &pod[2..]
            ),
        )
    };
    let pins = |w: &World, n: u32| {
        std::path::Path::new(moat_harness::cluster::BPFFS)
            .join(w.moat.cluster.node(home))
            .join("moat")
            .join(&w.moat.node_names[home])
            .join(format!("v{n}"))
            .exists()
    };
    w.apply(&[from("y/b", 80), from("z/c", 81)]);
    assert!(
        pins(&w, layout) && !pins(&w, NEW),
        "the node runs layout {layout}"
    );
    let [v4, v6] = w.ips("x/a");
    let mut streams = w.moat.cluster.prober("y/b").unwrap();
    let ids = open(&mut streams, &[v4, v6], 80);
    // y/b's connections are now established flows of a policy that no longer allows them.
    let policies = [from("z/c", 81)];
    w.apply(&policies);
    let echo = ids.iter().map(|&id| StreamOp::Echo { id }).collect();
    assert_eq!(
        streams.streams(echo, Duration::from_secs(1)).unwrap(),
        vec![true, true]
    );
    assert!(
        !w.reach("y/b", "x/a", Proto::Tcp, 80),
        "new ones are denied"
    );

    let mut watch = Watch::new();
    for (from, port, expect, n, pause) in [("z/c", 81, true, 16, 10), ("y/b", 80, false, 200, 0)] {
        let agent = w.moat.cluster.prober(from).unwrap();
        let reqs: Vec<ProbeReq> = (0..n).map(|i| tcp([v4, v6][i % 2], port)).collect();
        let pause = Duration::from_millis(pause);
        watch.probe(agent, from, reqs, expect, PROBE, pause);
    }
    watch.echo(streams, &ids);
    std::thread::sleep(Duration::from_millis(500));
    // The upgrade: the same node restarted with this binary's own datapath.
    w.moat.wrappers.remove(&home);
    w.moat.kill_enforcer(home).unwrap();
    w.moat.start_enforcer(home).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pins(&w, layout) || !pins(&w, NEW) {
        assert!(
            Instant::now() < deadline,
            "no migration to layout {NEW}:\n{}",
            w.moat.log_tails(20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let expected = moat_harness::moat::Moat::expected(&w.objects(&policies)).unwrap();
    w.moat
        .wait_applied(&expected, Duration::from_secs(30))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let seen = watch.finish();
    eprintln!(
        "{:.0} probes/s; the upgraded node's drops: {:?}",
        seen.rate,
        w.moat.ebpf_counters(home).unwrap_or_default()
    );
    seen.assert_rate(1000.0);
    seen.assert_clean();
    // The new layout enforces new versions on its own, cluster tiers included: an Admin
    // Deny over the tenant's allow.
    w.apply(&[from("y/b", 80)]);
    assert!(w.reach("y/b", "x/a", Proto::Tcp, 80));
    assert!(!w.reach("z/c", "x/a", Proto::Tcp, 81));
    let deny = "
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: keep-y-out-of-x}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {ns: x}}}
  ingress:
  - {name: no-y, action: Deny, from: [{namespaces: {matchLabels: {ns: y}}}]}
";
    w.apply(&[from("y/b", 80), deny.to_string()]);
    assert!(
        !w.reach("y/b", "x/a", Proto::Tcp, 80),
        "the Admin Deny wins"
    );
    let status = w.moat.status_table(&[]).unwrap();
    assert!(!status.contains("degraded"), "nothing cut:\n{status}");
}

/// The README's platform walkthrough: `examples/platform/` on a mixed cluster (eBPF and
/// nft nodes), every cell checked against the reference evaluator, and the cells the
/// platform's ClusterNetworkPolicies decide as the README says.
#[test]
fn the_platform_example_runs_and_matches_the_evaluator() {
    let text = demo(&[
        "--backend",
        "mixed",
        "--cluster",
        "examples/cluster.yaml",
        "examples/platform/tenants.yaml",
        "--policies",
        "examples/platform/platform.yaml",
    ]);
    let (_, after) = text.split_once("\napplied ").unwrap();
    // Columns: DNS (UDP, TCP), ledger-0:5432, web-0:80, api-0:8080.
    let row = |pod: &str| -> String {
        let line = after.lines().find(|l| l.starts_with(pod)).unwrap();
        line[pod.len()..].split_whitespace().collect()
    };
    // The Admin Deny keeps team-a off the ledger although payments admits everyone; DNS
    // stays open to team-b although its own policy isolates its egress; the Baseline
    // closes team-a, whose team wrote nothing; team-b's own policy admits team-a.
    assert_eq!(row("team-a/web-0"), "✓✓·-✓", "{text}");
    assert_eq!(row("team-b/api-0"), "✓✓··-", "{text}");
    assert_eq!(row("payments/ledger-0"), "✓✓-··", "{text}");
}

/// An interface that appears in a node between two versions (a new pod's veth) gets both
/// programs within moments, not only with the node's next version.
#[test]
fn a_new_interface_gets_the_programs_before_the_next_version() {
    let w = World::start("ebpf");
    let node = 1;
    let ns = w.moat.cluster.node(node);
    let links = std::path::Path::new(moat_harness::cluster::BPFFS)
        .join(&ns)
        .join("moat")
        .join(&w.moat.node_names[node])
        .join("links");
    let ip = |args: &[&str]| {
        let ok = std::process::Command::new("ip")
            .args(["-n", &ns])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip {args:?}");
    };
    // A veth pair, as a CNI creates for a pod (this kernel has no dummy interfaces).
    ip(&[
        "link",
        "add",
        "moat-new0",
        "type",
        "veth",
        "peer",
        "name",
        "moat-new0p",
    ]);
    ip(&["link", "set", "moat-new0", "up"]);
    let pinned = || {
        let names: Vec<String> = std::fs::read_dir(&links)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ["ingress", "egress"].iter().all(|dir| {
            names
                .iter()
                .any(|n| n.contains("-moat-new0-") && n.ends_with(dir))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pinned() {
        assert!(
            Instant::now() < deadline,
            "moat-new0 has no programs after 5 s:\n{}",
            w.moat.log_tails(10)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Is node `i`'s eBPF dataplane writing a new version into its unused slot?
fn switching(w: &World, i: usize) -> bool {
    w.moat
        .ebpf_meta(i)
        .ok()
        .flatten()
        .is_some_and(|m| m.flags & moat_enforcer_ebpf::META_PENDING != 0)
}

/// Does process `pid` have a child running `nft`?
fn nft_child(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("children"))
            .unwrap_or_default()
            .split_whitespace()
            .any(|c| {
                std::fs::read_to_string(format!("/proc/{c}/comm"))
                    .is_ok_and(|comm| comm.trim() == "nft")
            })
    })
}

/// `moatctl demo ARGS` from the repository: its output, once it passed with every probed cell
/// as the reference evaluator says and every node in sync.
fn demo(args: &[&str]) -> String {
    let out = std::process::Command::new(moat_integration::binary("moatctl"))
        .arg("demo")
        .args(args)
        .current_dir(moat_integration::repo())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("every probed cell matches the reference evaluator"));
    assert!(text.contains("3 of 3 nodes in sync"), "{text}");
    text
}

/// The README's main command: the example cluster on namespaces, probed before and after the
/// example policies, every cell checked against the reference evaluator.
#[test]
fn the_demo_runs_the_examples_and_matches_the_evaluator() {
    let text = demo(&[]);
    // The policies really changed packets: denied cells appear only after them.
    let (before, after) = text.split_once("\napplied ").unwrap();
    let denied = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("shop/") || l.starts_with("kube-system/"))
            .any(|l| l.contains(" ·"))
    };
    assert!(!denied(before) && denied(after), "{text}");
}
