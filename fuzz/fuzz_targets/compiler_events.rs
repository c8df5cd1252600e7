//! Arbitrary event sequences over a tiny universe (so names, labels and addresses collide):
//! after every event the index must be internally consistent, and at the end it must equal
//! a full compile of the final state.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use moat_policy::model::{
    Cidr, ContainerPort, IpBlock, Namespace, Node, Object, ObjectKey, Op as SelOp, Peer, Pod,
    Policy, PortSpec, Protocol, Requirement, Rule, Selector,
};
use moat_policy::{Event, Index};

const KEYS: [&str; 3] = ["app", "tier", "env"];
const VALUES: [&str; 3] = ["a", "b", "c"];
const PORT_NAMES: [&str; 2] = ["http", "dns"];

#[derive(Arbitrary, Debug)]
enum Op {
    Pod {
        ns: u8,
        name: u8,
        labels: [Option<u8>; 3],
        node: u8,
        ip: u8,
        v6: bool,
        ports: Vec<(u8, u8, u8)>,
        host: bool,
        terminal: bool,
    },
    DeletePod {
        ns: u8,
        name: u8,
    },
    Namespace {
        ns: u8,
        labels: [Option<u8>; 3],
    },
    DeleteNamespace {
        ns: u8,
    },
    Node {
        n: u8,
        addr: u8,
    },
    DeleteNode {
        n: u8,
    },
    Policy {
        ns: u8,
        name: u8,
        selector: Sel,
        ingress: Option<Vec<R>>,
        egress: Option<Vec<R>>,
    },
    DeletePolicy {
        ns: u8,
        name: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Sel(Vec<(u8, u8, u8)>);

#[derive(Arbitrary, Debug)]
struct R {
    peers: Vec<P>,
    ports: Vec<(u8, u8, u8, u8)>,
}

#[derive(Arbitrary, Debug)]
enum P {
    Pods(Sel),
    Ns(Sel),
    Both(Sel, Sel),
    Block {
        v6: bool,
        base: u8,
        len: u8,
        except: Option<u8>,
    },
}

fn labels(l: &[Option<u8>; 3]) -> BTreeMap<String, String> {
    l.iter()
        .zip(KEYS)
        .filter_map(|(v, k)| v.map(|v| (k.to_string(), VALUES[v as usize % 3].to_string())))
        .collect()
}

fn selector(s: &Sel) -> Selector {
    let mut reqs: Vec<Requirement> =
        s.0.iter()
            .take(3)
            .map(|(k, op, v)| {
                let op =
                    [SelOp::In, SelOp::NotIn, SelOp::Exists, SelOp::DoesNotExist][*op as usize % 4];
                let values = match op {
                    SelOp::In | SelOp::NotIn => vec![VALUES[*v as usize % 3].to_string()],
                    _ => vec![],
                };
                Requirement {
                    key: KEYS[*k as usize % 3].to_string(),
                    op,
                    values,
                }
            })
            .collect();
    reqs.sort();
    reqs.dedup();
    Selector { reqs }
}

fn pod_ip(ip: u8, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(ip % 16)))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, ip % 16))
    }
}

fn rule(r: &R) -> Rule {
    let peers = r
        .peers
        .iter()
        .take(3)
        .map(|p| match p {
            P::Pods(s) => Peer::Pods {
                namespaces: None,
                pods: selector(s),
            },
            P::Ns(s) => Peer::Pods {
                namespaces: Some(selector(s)),
                pods: Selector::everything(),
            },
            P::Both(a, b) => Peer::Pods {
                namespaces: Some(selector(b)),
                pods: selector(a),
            },
            P::Block {
                v6,
                base,
                len,
                except,
            } => {
                let max = if *v6 { 128 } else { 32 };
                let len = [0u8, 8, 28, max][*len as usize % 4];
                let cidr = Cidr::new(pod_ip(*base, *v6), len).expect("valid prefix");
                let except = match except {
                    Some(e) if len < max => vec![Cidr::new(pod_ip(*e, *v6), max).expect("host")]
                        .into_iter()
                        .filter(|x| cidr.covers(x))
                        .collect(),
                    _ => vec![],
                };
                Peer::Block(IpBlock { cidr, except })
            }
        })
        .collect();
    let mut ports: Vec<PortSpec> = r
        .ports
        .iter()
        .take(3)
        .map(|(kind, proto, p, span)| {
            let proto = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][*proto as usize % 3];
            let first = 78 + u16::from(*p % 6);
            match kind % 3 {
                0 => PortSpec::Range {
                    proto,
                    first,
                    last: first + u16::from(*span % 4),
                },
                1 => PortSpec::All(proto),
                _ => PortSpec::Named {
                    proto,
                    name: PORT_NAMES[*p as usize % 2].to_string(),
                },
            }
        })
        .collect();
    ports.sort();
    ports.dedup();
    Rule { peers, ports }
}

fn event(op: &Op) -> Event {
    let ns = |n: &u8| format!("ns{}", n % 3);
    match op {
        Op::Pod {
            ns: n,
            name,
            labels: l,
            node,
            ip,
            v6,
            ports,
            host,
            terminal,
        } => {
            let mut ports: Vec<ContainerPort> = ports
                .iter()
                .take(3)
                .map(|(name, proto, port)| ContainerPort {
                    name: PORT_NAMES[*name as usize % 2].to_string(),
                    proto: [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][*proto as usize % 3],
                    port: 78 + u16::from(*port % 6),
                })
                .collect();
            ports.sort();
            ports.dedup();
            Event::Apply(Object::Pod(Pod {
                namespace: ns(n),
                name: format!("p{}", name % 6),
                labels: labels(l),
                node: Some(format!("node{}", node % 3)),
                ips: vec![pod_ip(*ip, *v6)],
                ports,
                host_network: *host,
                terminal: *terminal,
                uid: None,
                sandbox: None,
            }))
        }
        Op::DeletePod { ns: n, name } => Event::Delete(ObjectKey::Pod {
            namespace: ns(n),
            name: format!("p{}", name % 6),
        }),
        Op::Namespace { ns: n, labels: l } => {
            let mut labels = labels(l);
            labels.insert("kubernetes.io/metadata.name".into(), ns(n));
            Event::Apply(Object::Namespace(Namespace {
                name: ns(n),
                labels,
            }))
        }
        Op::DeleteNamespace { ns: n } => Event::Delete(ObjectKey::Namespace(ns(n))),
        Op::Node { n, addr } => Event::Apply(Object::Node(Node {
            name: format!("node{}", n % 3),
            addrs: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, addr % 4))],
            labels: Default::default(),
        })),
        Op::DeleteNode { n } => Event::Delete(ObjectKey::Node(format!("node{}", n % 3))),
        Op::Policy {
            ns: n,
            name,
            selector: s,
            ingress,
            egress,
        } => Event::Apply(Object::Policy(Policy {
            namespace: ns(n),
            name: format!("pol{}", name % 4),
            pod_selector: selector(s),
            ingress: ingress
                .as_ref()
                .map(|rs| rs.iter().take(3).map(rule).collect()),
            egress: egress
                .as_ref()
                .map(|rs| rs.iter().take(3).map(rule).collect()),
        })),
        Op::DeletePolicy { ns: n, name } => Event::Delete(ObjectKey::Policy {
            namespace: ns(n),
            name: format!("pol{}", name % 4),
        }),
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut index = Index::new();
    let mut state: BTreeMap<ObjectKey, Object> = BTreeMap::new();
    for op in ops.iter().take(64) {
        let e = event(op);
        match &e {
            Event::Apply(o) => {
                state.insert(o.key(), o.clone());
            }
            Event::Delete(k) => {
                state.remove(k);
            }
        }
        index.batch([e]);
        if let Err(err) = index.verify() {
            panic!("inconsistent after {op:?}: {err}");
        }
    }
    let full = Index::build(state.into_values());
    let a: Vec<_> = index
        .nodes()
        .into_iter()
        .map(|n| (n.node, n.digest))
        .collect();
    let b: Vec<_> = full
        .nodes()
        .into_iter()
        .map(|n| (n.node, n.digest))
        .collect();
    assert_eq!(a, b, "incremental and full compile differ");
});
