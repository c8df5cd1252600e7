//! The two ClusterNetworkPolicy tiers, read straight from the API objects.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{
    Cluster, ClusterRuleRef, Dir, Flow, Owner, destination_pod, has_named_port, namespace_labels,
    node_ips, ns_of, owner, proto_name, selector_matches,
};
use crate::model::cnp_api as cnp;

pub(super) const ADMIN: &str = "Admin";
pub(super) const BASELINE: &str = "Baseline";

pub(super) enum Outcome {
    /// Accept (true) or Deny (false).
    Decided(bool, ClusterRuleRef),
    Passed(ClusterRuleRef),
    NoMatch,
}

/// Policies of one tier with equal priority are taken in the order of this key of their
/// names (Moat's documented choice where upstream leaves the order undefined): a hash, so that
/// it can travel to nodes as a number without the name, and so that adding a policy never
/// reorders the others. Computed here independently of the compiler, from the definition.
pub fn tie_key(name: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"moat.cnp.order\0");
    h.update(name.as_bytes());
    let b = h.finalize();
    let first: [u8; 8] = b.as_bytes()[..8].try_into().expect("8 bytes");
    u64::from_be_bytes(first) >> 18
}

/// The first rule of `tier`'s policies selecting `pod` that matches the flow.
pub(super) fn tier(
    c: &Cluster,
    tier: &str,
    pod: &core::Pod,
    dir: Dir,
    peer: IpAddr,
    f: &Flow,
) -> Outcome {
    let mut policies: Vec<(u32, u64, &str, &cnp::Spec)> = c
        .cluster_policies
        .iter()
        .filter_map(|p| {
            let spec = p.spec.as_ref()?;
            let name = p.metadata.name.as_deref()?;
            let priority = u32::try_from(spec.priority?).ok()?;
            (spec.tier == tier && selects(c, &spec.subject, pod)).then_some((
                priority,
                tie_key(name),
                name,
                spec,
            ))
        })
        .collect();
    policies.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    for (priority, _, name, spec) in policies {
        let rules: Vec<RuleView<'_>> = match dir {
            Dir::Ingress => spec
                .ingress
                .iter()
                .map(|r| {
                    let peers = r.from.iter().map(PeerView::Ingress).collect();
                    (
                        r.name.as_str(),
                        r.action.as_str(),
                        peers,
                        r.protocols.as_ref(),
                    )
                })
                .collect(),
            Dir::Egress => spec
                .egress
                .iter()
                .map(|r| {
                    let peers = r.to.iter().map(PeerView::Egress).collect();
                    (
                        r.name.as_str(),
                        r.action.as_str(),
                        peers,
                        r.protocols.as_ref(),
                    )
                })
                .collect(),
        };
        let dst_pod = destination_pod(c, pod, dir, peer);
        for (index, (rule_name, action, peers, protocols)) in rules.into_iter().enumerate() {
            // The types file's fail-closed reading of a peer (or protocol entry) of a kind
            // this version does not know: Accept matches nothing, Deny and Pass deny all.
            let unknown = peers.iter().any(PeerView::unknown)
                || protocols.is_some_and(|l| l.iter().any(unknown_protocol));
            let hit = if unknown {
                action != "Accept"
            } else {
                peers.iter().any(|p| p.matches(c, peer))
                    && protocols_match(protocols.map(Vec::as_slice), dst_pod, f)
            };
            if !hit {
                continue;
            }
            // "Deny all" for a Deny or a Pass rule (a Pass matching everything would skip
            // every later Admin Deny).
            let action = if unknown { "Deny" } else { action };
            let r = ClusterRuleRef {
                tier: tier.to_string(),
                policy: name.to_string(),
                priority,
                index,
                name: rule_name.to_string(),
                action: action.to_string(),
            };
            return match action {
                "Accept" => Outcome::Decided(true, r),
                "Deny" => Outcome::Decided(false, r),
                _ => Outcome::Passed(r),
            };
        }
    }
    Outcome::NoMatch
}

fn selects(c: &Cluster, s: &cnp::Subject, pod: &core::Pod) -> bool {
    let ns = namespace_labels(c, ns_of(&pod.metadata));
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    match (&s.namespaces, &s.pods) {
        (Some(n), None) => selector_matches(n, &ns),
        (None, Some(p)) => {
            selector_matches(&p.namespace_selector, &ns)
                && selector_matches(&p.pod_selector, &labels)
        }
        _ => false,
    }
}

/// A rule's name, action, peers and protocols, whichever direction it is.
type RuleView<'a> = (
    &'a str,
    &'a str,
    Vec<PeerView<'a>>,
    Option<&'a Vec<cnp::ProtocolMatch>>,
);

enum PeerView<'a> {
    Ingress(&'a cnp::IngressPeer),
    Egress(&'a cnp::EgressPeer),
}

/// What one peer names, whichever direction it is.
struct PeerParts<'a> {
    namespaces: Option<&'a LabelSelector>,
    pods: Option<&'a cnp::NamespacedPod>,
    nodes: Option<&'a LabelSelector>,
    networks: Option<&'a Vec<String>>,
}

impl PeerView<'_> {
    fn parts(&self) -> PeerParts<'_> {
        match self {
            PeerView::Ingress(p) => PeerParts {
                namespaces: p.namespaces.as_ref(),
                pods: p.pods.as_ref(),
                nodes: None,
                networks: None,
            },
            PeerView::Egress(p) => PeerParts {
                namespaces: p.namespaces.as_ref(),
                pods: p.pods.as_ref(),
                nodes: p.nodes.as_ref(),
                networks: p.networks.as_ref(),
            },
        }
    }

    fn unknown(&self) -> bool {
        let p = self.parts();
        p.namespaces.is_none() && p.pods.is_none() && p.nodes.is_none() && p.networks.is_none()
    }

    fn matches(&self, c: &Cluster, ip: IpAddr) -> bool {
        let PeerParts {
            namespaces,
            pods,
            nodes,
            networks,
        } = self.parts();
        if let Some(nets) = networks {
            return nets
                .iter()
                .any(|n| n.parse::<IpNet>().is_ok_and(|n| n.contains(&ip)));
        }
        // The selected Nodes' own addresses: never a pod's, whatever node it runs on.
        if let Some(sel) = nodes {
            return c.nodes.iter().any(|n| {
                selector_matches(sel, &n.metadata.labels.clone().unwrap_or_default())
                    && node_ips(n).contains(&ip)
            });
        }
        let Owner::Pod(q) = owner(c, ip) else {
            return false;
        };
        let ns = namespace_labels(c, ns_of(&q.metadata));
        if let Some(n) = namespaces {
            return selector_matches(n, &ns);
        }
        if let Some(p) = pods {
            let labels = q.metadata.labels.clone().unwrap_or_default();
            return selector_matches(&p.namespace_selector, &ns)
                && selector_matches(&p.pod_selector, &labels);
        }
        false
    }
}

fn unknown_protocol(m: &cnp::ProtocolMatch) -> bool {
    m.tcp.is_none() && m.udp.is_none() && m.sctp.is_none() && m.destination_named_port.is_none()
}

fn protocols_match(
    list: Option<&[cnp::ProtocolMatch]>,
    dst_pod: Option<&core::Pod>,
    f: &Flow,
) -> bool {
    let Some(list) = list else {
        return true;
    };
    let Some(proto) = proto_name(f.proto) else {
        return false;
    };
    list.iter().any(|m| {
        if let Some(name) = &m.destination_named_port {
            return dst_pod.is_some_and(|q| has_named_port(q, name, proto, f.port));
        }
        let (p, want) = match (&m.tcp, &m.udp, &m.sctp) {
            (Some(p), _, _) => (p, "TCP"),
            (_, Some(p), _) => (p, "UDP"),
            (_, _, Some(p)) => (p, "SCTP"),
            _ => return false,
        };
        if want != proto {
            return false;
        }
        let Some(port) = &p.destination_port else {
            return false;
        };
        let port_no = i64::from(f.port);
        match (&port.number, &port.range) {
            (Some(n), _) => *n == port_no,
            (None, Some(r)) => r.start <= port_no && port_no <= r.end,
            _ => false,
        }
    })
}
