//! Real packets through real veths: the netns harness itself, and (below) enforcement.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use moat_harness::agent::{ProbeReq, Proto};
use moat_harness::cluster::{self, Cluster, PodSpec, Spec};

fn three_by_three(id: u8) -> Spec {
    let mut pods = Vec::new();
    for (i, ns) in ["x", "y", "z"].iter().enumerate() {
        for (j, p) in ["a", "b", "c"].iter().enumerate() {
            pods.push(PodSpec {
                key: format!("{ns}/{p}"),
                node: (i + j) % 3,
                v4: Ipv4Addr::new(10, id, i as u8, j as u8 + 10),
                v6: Ipv6Addr::new(0xfd00, u16::from(id), 0, 0, 0, 0, i as u16, j as u16 + 10),
            });
        }
    }
    Spec {
        id,
        nodes: 3,
        pods,
        tcp: vec![80, 81],
        udp: vec![80, 81],
        sctp: vec![80, 81],
    }
}

#[test]
fn the_harness_reaches_everything_without_policy() {
    let slot = cluster::slot().unwrap();
    let spec = three_by_three(slot.id);
    let mut c = Cluster::create(spec.clone()).unwrap();
    let mut reqs = Vec::new();
    for from in &spec.pods {
        let mut probes = Vec::new();
        for to in &spec.pods {
            for dst in [IpAddr::V4(to.v4), IpAddr::V6(to.v6)] {
                for proto in [Proto::Tcp, Proto::Udp, Proto::Sctp] {
                    probes.push(ProbeReq {
                        dst,
                        proto,
                        port: 81,
                    });
                }
            }
        }
        reqs.push((from.key.clone(), probes));
    }
    let t = std::time::Instant::now();
    let results = c.probe(&reqs, Duration::from_millis(500), 1).unwrap();
    let failed: Vec<_> = reqs
        .iter()
        .zip(&results)
        .flat_map(|((from, probes), r)| {
            probes
                .iter()
                .zip(r)
                .filter(|(_, ok)| !**ok)
                .map(move |(p, _)| format!("{from} -> {p:?}"))
        })
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    eprintln!("{} probes in {:?}", 9 * 9 * 6, t.elapsed());
    // A closed port is refused (TCP) or unanswered (UDP, SCTP).
    let r = c
        .probe(
            &[(
                "x/a".into(),
                vec![
                    ProbeReq {
                        dst: IpAddr::V4(spec.pods[4].v4),
                        proto: Proto::Tcp,
                        port: 82,
                    },
                    ProbeReq {
                        dst: IpAddr::V6(spec.pods[4].v6),
                        proto: Proto::Udp,
                        port: 82,
                    },
                    ProbeReq {
                        dst: IpAddr::V4(spec.pods[4].v4),
                        proto: Proto::Sctp,
                        port: 82,
                    },
                ],
            )],
            Duration::from_millis(300),
            0,
        )
        .unwrap();
    assert_eq!(r[0], vec![false, false, false]);
    // Nothing of it is reachable from the root namespace.
    let out = std::process::Command::new("ip")
        .args(["route", "get", &spec.pods[0].v4.to_string()])
        .output()
        .unwrap();
    let route = String::from_utf8_lossy(&out.stdout);
    assert!(!route.contains("vp") && !route.contains("br0"), "{route}");
    let names = c.fabric();
    drop(c);
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&names),
        "namespaces removed on drop"
    );
}
