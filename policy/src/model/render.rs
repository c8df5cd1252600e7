//! Model objects back to Kubernetes objects, keeping every field policy reads. Lets the
//! server answer live `explain` questions with the reference evaluator from its compact
//! index, without holding full Kubernetes objects.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::cnp_api as cnp;
use super::{
    ClusterPolicy, CnpRule, K8sObject, Object, Op, Peer, PortSpec, Rule, Selector, Subject,
};

pub fn to_k8s(o: &Object) -> K8sObject {
    match o {
        Object::ClusterPolicy(p) => K8sObject::ClusterNetworkPolicy(cluster_policy(p)),
        Object::Namespace(n) => K8sObject::Namespace(core::Namespace {
            metadata: ObjectMeta {
                name: Some(n.name.clone()),
                labels: Some(n.labels.clone()),
                ..Default::default()
            },
            ..Default::default()
        }),
        Object::Node(n) => K8sObject::Node(core::Node {
            metadata: ObjectMeta {
                name: Some(n.name.clone()),
                labels: (!n.labels.is_empty()).then(|| n.labels.clone()),
                ..Default::default()
            },
            status: Some(core::NodeStatus {
                addresses: Some(
                    n.addrs
                        .iter()
                        .map(|a| core::NodeAddress {
                            type_: "InternalIP".into(),
                            address: a.to_string(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }),
        Object::Pod(p) => K8sObject::Pod(core::Pod {
            metadata: ObjectMeta {
                name: Some(p.name.clone()),
                namespace: Some(p.namespace.clone()),
                labels: Some(p.labels.clone()),
                ..Default::default()
            },
            spec: Some(core::PodSpec {
                node_name: p.node.clone(),
                host_network: Some(p.host_network),
                containers: vec![core::Container {
                    name: "main".into(),
                    ports: Some(
                        p.ports
                            .iter()
                            .map(|c| core::ContainerPort {
                                name: Some(c.name.clone()),
                                protocol: Some(c.proto.as_str().into()),
                                container_port: i32::from(c.port),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(core::PodStatus {
                phase: Some(if p.terminal { "Succeeded" } else { "Running" }.into()),
                pod_ips: Some(
                    p.ips
                        .iter()
                        .map(|ip| core::PodIP { ip: ip.to_string() })
                        .collect(),
                ),
                ..Default::default()
            }),
        }),
        Object::Policy(p) => {
            let mut types = Vec::new();
            if p.ingress.is_some() {
                types.push("Ingress".to_string());
            }
            if p.egress.is_some() {
                types.push("Egress".to_string());
            }
            K8sObject::NetworkPolicy(net::NetworkPolicy {
                metadata: ObjectMeta {
                    name: Some(p.name.clone()),
                    namespace: Some(p.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(net::NetworkPolicySpec {
                    pod_selector: Some(selector(&p.pod_selector)),
                    policy_types: Some(types),
                    ingress: p.ingress.as_ref().map(|rules| {
                        rules
                            .iter()
                            .map(|r| net::NetworkPolicyIngressRule {
                                from: peers(r),
                                ports: ports(r),
                            })
                            .collect()
                    }),
                    egress: p.egress.as_ref().map(|rules| {
                        rules
                            .iter()
                            .map(|r| net::NetworkPolicyEgressRule {
                                to: peers(r),
                                ports: ports(r),
                            })
                            .collect()
                    }),
                }),
            })
        }
    }
}

fn selector(s: &Selector) -> LabelSelector {
    LabelSelector {
        match_labels: None,
        match_expressions: Some(
            s.reqs
                .iter()
                .map(|r| LabelSelectorRequirement {
                    key: r.key.clone(),
                    operator: match r.op {
                        Op::In => "In",
                        Op::NotIn => "NotIn",
                        Op::Exists => "Exists",
                        Op::DoesNotExist => "DoesNotExist",
                    }
                    .into(),
                    values: (!r.values.is_empty()).then(|| r.values.clone()),
                })
                .collect(),
        ),
    }
}

fn peers(r: &Rule) -> Option<Vec<net::NetworkPolicyPeer>> {
    if r.peers.is_empty() {
        return None;
    }
    Some(
        r.peers
            .iter()
            .map(|p| match p {
                Peer::Pods { namespaces, pods } => net::NetworkPolicyPeer {
                    pod_selector: Some(selector(pods)),
                    namespace_selector: namespaces.as_ref().map(selector),
                    ip_block: None,
                },
                Peer::Block(b) => net::NetworkPolicyPeer {
                    ip_block: Some(net::IPBlock {
                        cidr: b.cidr.to_string(),
                        except: (!b.except.is_empty())
                            .then(|| b.except.iter().map(ToString::to_string).collect()),
                    }),
                    ..Default::default()
                },
                // Only a ClusterNetworkPolicy has these (a NetworkPolicy peer never parses to
                // one): rendered as a peer that selects nothing, never as one that opens.
                Peer::Nodes(_) => net::NetworkPolicyPeer {
                    pod_selector: Some(nothing()),
                    ..Default::default()
                },
            })
            .collect(),
    )
}

/// A selector no label set matches (a key both present and absent).
fn nothing() -> LabelSelector {
    let req = |operator: &str| LabelSelectorRequirement {
        key: "moat.io/never".into(),
        operator: operator.into(),
        values: None,
    };
    LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![req("Exists"), req("DoesNotExist")]),
    }
}

fn ports(r: &Rule) -> Option<Vec<net::NetworkPolicyPort>> {
    if r.ports.is_empty() {
        return None;
    }
    Some(
        r.ports
            .iter()
            .map(|p| match p {
                PortSpec::All(proto) => net::NetworkPolicyPort {
                    protocol: Some(proto.as_str().into()),
                    ..Default::default()
                },
                PortSpec::Range { proto, first, last } => net::NetworkPolicyPort {
                    protocol: Some(proto.as_str().into()),
                    port: Some(IntOrString::Int(i32::from(*first))),
                    end_port: (last > first).then_some(i32::from(*last)),
                },
                PortSpec::Named { proto, name } => net::NetworkPolicyPort {
                    protocol: Some(proto.as_str().into()),
                    port: Some(IntOrString::String(name.clone())),
                    end_port: None,
                },
            })
            .collect(),
    )
}

fn cluster_policy(p: &ClusterPolicy) -> cnp::ClusterNetworkPolicy {
    let subject = match &p.subject {
        Subject::Namespaces(n) => cnp::Subject {
            namespaces: Some(selector(n)),
            pods: None,
        },
        Subject::Pods { namespaces, pods } => cnp::Subject {
            namespaces: None,
            pods: Some(cnp::NamespacedPod {
                namespace_selector: selector(namespaces),
                pod_selector: selector(pods),
            }),
        },
    };
    cnp::ClusterNetworkPolicy {
        metadata: ObjectMeta {
            name: Some(p.name.clone()),
            ..Default::default()
        },
        spec: Some(cnp::Spec {
            tier: p.tier.as_str().to_string(),
            priority: Some(i64::from(p.priority)),
            subject,
            ingress: p
                .ingress
                .iter()
                .map(|r| {
                    let (peers, protocols) = cluster_rule(r);
                    cnp::IngressRule {
                        name: r.name.clone(),
                        action: r.action.as_str().to_string(),
                        from: peers
                            .into_iter()
                            .map(|e| cnp::IngressPeer {
                                namespaces: e.namespaces,
                                pods: e.pods,
                            })
                            .collect(),
                        protocols,
                    }
                })
                .collect(),
            egress: p
                .egress
                .iter()
                .map(|r| {
                    let (to, protocols) = cluster_rule(r);
                    cnp::EgressRule {
                        name: r.name.clone(),
                        action: r.action.as_str().to_string(),
                        to,
                        protocols,
                    }
                })
                .collect(),
        }),
        status: None,
    }
}

/// A rule's peers and protocols. A rule that matches nothing (Accept) or everything (Deny,
/// Pass) because of a peer kind Moat does not know comes back with such a peer: empty.
fn cluster_rule(r: &CnpRule) -> (Vec<cnp::EgressPeer>, Option<Vec<cnp::ProtocolMatch>>) {
    let Some(rule) = r.rule.as_ref().filter(|x| !x.peers.is_empty()) else {
        return (vec![cnp::EgressPeer::default()], None);
    };
    let peers = rule
        .peers
        .iter()
        .map(|p| match p {
            Peer::Pods { namespaces, pods } => cnp::EgressPeer {
                pods: Some(cnp::NamespacedPod {
                    namespace_selector: namespaces.as_ref().map(selector).unwrap_or_default(),
                    pod_selector: selector(pods),
                }),
                ..Default::default()
            },
            Peer::Block(b) => cnp::EgressPeer {
                networks: Some(vec![b.cidr.to_string()]),
                ..Default::default()
            },
            Peer::Nodes(n) => cnp::EgressPeer {
                nodes: Some(selector(n)),
                ..Default::default()
            },
        })
        .collect();
    if rule.ports.is_empty() {
        return (peers, None);
    }
    let mut out: Vec<cnp::ProtocolMatch> = Vec::new();
    for p in &rule.ports {
        let port = |first: u16, last: u16| cnp::ProtocolPort {
            destination_port: Some(if first == last {
                cnp::Port {
                    number: Some(i64::from(first)),
                    range: None,
                }
            } else {
                cnp::Port {
                    number: None,
                    range: Some(cnp::PortRange {
                        start: i64::from(first),
                        end: i64::from(last),
                    }),
                }
            }),
        };
        let m = match p {
            PortSpec::Named { name, .. } => cnp::ProtocolMatch {
                destination_named_port: Some(name.clone()),
                ..Default::default()
            },
            PortSpec::Range { proto, first, last } => proto_match(*proto, port(*first, *last)),
            PortSpec::All(proto) => proto_match(*proto, port(1, u16::MAX)),
        };
        if !out.contains(&m) {
            out.push(m);
        }
    }
    (peers, Some(out))
}

fn proto_match(proto: super::Protocol, p: cnp::ProtocolPort) -> cnp::ProtocolMatch {
    let mut m = cnp::ProtocolMatch::default();
    match proto {
        super::Protocol::Tcp => m.tcp = Some(p),
        super::Protocol::Udp => m.udp = Some(p),
        super::Protocol::Sctp => m.sctp = Some(p),
    }
    m
}
