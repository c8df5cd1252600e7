//! `ClusterNetworkPolicy` → [`ClusterPolicy`], validated as the CRD's schema and CEL rules
//! validate it (counts, ranges, exactly-one-of), plus what Moat cannot enforce.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{Ctx, Options, Result, check_port_name, cluster_name, parse_cidr, selector};
use crate::faults::{self, Fault};
use crate::model::cnp_api as api;
use crate::model::{
    ClusterPolicy, CnpAction, CnpRule, CnpTier, IpBlock, Peer, PortSpec, Protocol, Rule, Selector,
    Subject,
};

/// Upper bounds the CRD sets.
pub const MAX_PRIORITY: i64 = 1000;
const MAX_RULES: usize = 25;
const MAX_PEERS: usize = 25;
const MAX_PROTOCOLS: usize = 25;
const MAX_NETWORKS: usize = 25;
const MAX_RULE_NAME: usize = 100;

/// With every experimental feature off.
pub fn cluster_network_policy(
    p: &api::ClusterNetworkPolicy,
) -> Result<super::Parsed<ClusterPolicy>> {
    cluster_network_policy_with(p, &Options::default())
}

pub fn cluster_network_policy_with(
    p: &api::ClusterNetworkPolicy,
    opts: &Options,
) -> Result<super::Parsed<ClusterPolicy>> {
    let (mut ctx, name) = cluster_name("ClusterNetworkPolicy", &p.metadata);
    ctx.opts = *opts;
    let name = name?;
    let spec = p.spec.as_ref().ok_or_else(|| ctx.err("spec", "required"))?;
    let tier = match spec.tier.as_str() {
        "Admin" => CnpTier::Admin,
        "Baseline" => CnpTier::Baseline,
        "" => return Err(ctx.err("spec.tier", "required: \"Admin\" or \"Baseline\"")),
        other => {
            return Err(ctx.err(
                "spec.tier",
                format!(
                    "unsupported value {other:?}: supported values are \"Admin\", \"Baseline\""
                ),
            ));
        }
    };
    let priority = match spec.priority {
        None => return Err(ctx.err("spec.priority", "required (0 to 1000)")),
        Some(n) if !(0..=MAX_PRIORITY).contains(&n) => {
            return Err(ctx.err(
                "spec.priority",
                format!("{n} is out of range: must be 0 to {MAX_PRIORITY}"),
            ));
        }
        Some(n) => n as u32,
    };
    let subject = subject(&ctx, &spec.subject)?;
    for (field, n) in [
        ("spec.ingress", spec.ingress.len()),
        ("spec.egress", spec.egress.len()),
    ] {
        if n > MAX_RULES {
            return Err(ctx.err(field, format!("{n} rules: at most {MAX_RULES} are allowed")));
        }
    }
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().enumerate() {
        let path = format!("spec.ingress[{i}]");
        let peers: Vec<PeerIn<'_>> = r.from.iter().map(PeerIn::Ingress).collect();
        ingress.push(rule(
            &mut ctx,
            &path,
            "from",
            &r.name,
            &r.action,
            &peers,
            r.protocols.as_deref(),
        )?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().enumerate() {
        let path = format!("spec.egress[{i}]");
        let peers: Vec<PeerIn<'_>> = r.to.iter().map(PeerIn::Egress).collect();
        egress.push(rule(
            &mut ctx,
            &path,
            "to",
            &r.name,
            &r.action,
            &peers,
            r.protocols.as_deref(),
        )?);
    }
    Ok(ctx.done(ClusterPolicy {
        name,
        tier,
        priority,
        subject,
        ingress,
        egress,
    }))
}

fn subject(ctx: &Ctx, s: &api::Subject) -> Result<Subject> {
    match (&s.namespaces, &s.pods) {
        (Some(n), None) => Ok(Subject::Namespaces(selector(ctx, "spec.subject.namespaces", n)?)),
        (None, Some(p)) => Ok(Subject::Pods {
            namespaces: selector(ctx, "spec.subject.pods.namespaceSelector", &p.namespace_selector)?,
            pods: selector(ctx, "spec.subject.pods.podSelector", &p.pod_selector)?,
        }),
        (Some(_), Some(_)) => Err(ctx.err(
            "spec.subject",
            "exactly one of namespaces and pods may be set",
        )),
        // A subject of a kind this version does not know: no safe reading exists (selecting
        // nothing opens, selecting everything may close what the author never meant), so the
        // object is refused and its last valid version stays in force.
        (None, None) => Err(ctx.err(
            "spec.subject",
            "required: exactly one of namespaces and pods (a subject of another kind needs a newer Moat)",
        )),
    }
}

enum PeerIn<'a> {
    Ingress(&'a api::IngressPeer),
    Egress(&'a api::EgressPeer),
}

/// What one peer parsed to.
enum PeerOut {
    Peers(Vec<Peer>),
    /// No field Moat knows: the fail-closed case.
    Unknown,
}

fn rule(
    ctx: &mut Ctx,
    path: &str,
    peers_field: &str,
    name: &str,
    action: &str,
    peers: &[PeerIn<'_>],
    protocols: Option<&[api::ProtocolMatch]>,
) -> Result<CnpRule> {
    if name.chars().count() > MAX_RULE_NAME {
        return Err(ctx.err(
            format!("{path}.name"),
            format!("longer than {MAX_RULE_NAME} characters"),
        ));
    }
    let mut action = match action {
        "Accept" => CnpAction::Accept,
        "Deny" => CnpAction::Deny,
        "Pass" => CnpAction::Pass,
        "" => {
            return Err(ctx.err(
                format!("{path}.action"),
                "required: \"Accept\", \"Deny\" or \"Pass\"",
            ));
        }
        other => {
            return Err(ctx.err(
                format!("{path}.action"),
                format!("unsupported value {other:?}: supported values are \"Accept\", \"Deny\", \"Pass\""),
            ));
        }
    };
    let field = format!("{path}.{peers_field}");
    if peers.is_empty() {
        return Err(ctx.err(&field, "required: at least one peer"));
    }
    if peers.len() > MAX_PEERS {
        return Err(ctx.err(
            &field,
            format!("{} peers: at most {MAX_PEERS} are allowed", peers.len()),
        ));
    }
    let mut out = Vec::new();
    let mut unknown = false;
    // Peers without named ports: a named port beside one is refused, as the CRD does.
    let mut portless = false;
    for (j, p) in peers.iter().enumerate() {
        let ppath = format!("{field}[{j}]");
        let got = match p {
            PeerIn::Ingress(p) => ingress_peer(ctx, &ppath, p)?,
            PeerIn::Egress(p) => {
                portless |= p.networks.is_some() || p.nodes.is_some();
                egress_peer(ctx, &ppath, p)?
            }
        };
        match got {
            PeerOut::Peers(v) => out.extend(v),
            PeerOut::Unknown => unknown = true,
        }
    }
    let ports = match protocols {
        None => Some(Vec::new()),
        Some(list) => ports(ctx, path, list, portless)?,
    };
    let ports = if faults::active(Fault::CnpNoProtocolsExcludesIcmp) && protocols.is_none() {
        Some(Protocol::ALL.into_iter().map(PortSpec::All).collect())
    } else {
        ports
    };
    // The types file's fail-closed reading of a peer (and, by the same reasoning, of a
    // protocol entry) with no field this version knows: an Accept rule matches nothing, a
    // Deny or Pass rule is "a 'Deny all' rule". A Pass that matched everything would skip
    // every later Admin Deny, so a Pass becomes a Deny as the types file says.
    let matches_everything = Rule {
        peers: Vec::new(),
        ports: Vec::new(),
    };
    let unknown_what = if unknown {
        "a peer"
    } else {
        "a protocol entry"
    };
    if faults::active(Fault::CnpUnknownPeerAcceptsAll) && unknown && action == CnpAction::Accept {
        return Ok(CnpRule {
            name: name.to_string(),
            action,
            rule: Some(matches_everything),
        });
    }
    let rule = match (unknown || ports.is_none(), action) {
        (false, _) => {
            let mut ports = ports.unwrap_or_default();
            ports.sort();
            ports.dedup();
            Some(Rule { peers: out, ports })
        }
        (true, CnpAction::Accept) => {
            ctx.warn(
                path,
                format!("{unknown_what} with no field this version of Moat knows: the Accept rule matches nothing (fail closed)"),
            );
            None
        }
        (true, written) => {
            ctx.warn(
                path,
                format!("{unknown_what} with no field this version of Moat knows: the {} rule denies all traffic (fail closed)", written.as_str()),
            );
            action = CnpAction::Deny;
            Some(matches_everything)
        }
    };
    Ok(CnpRule {
        name: name.to_string(),
        action,
        rule,
    })
}

fn namespaced_pod(ctx: &Ctx, path: &str, p: &api::NamespacedPod) -> Result<Peer> {
    Ok(Peer::Pods {
        namespaces: Some(selector(
            ctx,
            &format!("{path}.namespaceSelector"),
            &p.namespace_selector,
        )?),
        pods: selector(ctx, &format!("{path}.podSelector"), &p.pod_selector)?,
    })
}

fn namespaces(ctx: &Ctx, path: &str, s: &LabelSelector) -> Result<Peer> {
    Ok(Peer::Pods {
        namespaces: Some(selector(ctx, path, s)?),
        pods: Selector::everything(),
    })
}

fn ingress_peer(ctx: &Ctx, path: &str, p: &api::IngressPeer) -> Result<PeerOut> {
    match (&p.namespaces, &p.pods) {
        (Some(_), Some(_)) => Err(ctx.err(path, "exactly one of namespaces and pods may be set")),
        (Some(n), None) => Ok(PeerOut::Peers(vec![namespaces(
            ctx,
            &format!("{path}.namespaces"),
            n,
        )?])),
        (None, Some(p)) => Ok(PeerOut::Peers(vec![namespaced_pod(
            ctx,
            &format!("{path}.pods"),
            p,
        )?])),
        (None, None) => Ok(PeerOut::Unknown),
    }
}

fn egress_peer(ctx: &mut Ctx, path: &str, p: &api::EgressPeer) -> Result<PeerOut> {
    let set = usize::from(p.namespaces.is_some())
        + usize::from(p.pods.is_some())
        + usize::from(p.nodes.is_some())
        + usize::from(p.networks.is_some())
        + usize::from(p.domain_names.is_some());
    if set > 1 {
        return Err(ctx.err(
            path,
            "exactly one of namespaces, pods, nodes, networks and domainNames may be set",
        ));
    }
    if p.domain_names.is_some() {
        return Err(ctx.err(
            format!("{path}.domainNames"),
            "domainNames peers are not supported by Moat: the policy is refused rather than enforced without them",
        ));
    }
    if let Some(n) = &p.nodes {
        let field = format!("{path}.nodes");
        if !ctx.opts.experimental_cnp_node_peers {
            return Err(ctx.err(
                field,
                "nodes peers (experimental upstream) are not supported unless the server runs with --experimental-cnp-node-peers (MOAT_EXPERIMENTAL_CNP_NODE_PEERS=true): the policy is refused rather than enforced without them",
            ));
        }
        return Ok(PeerOut::Peers(vec![Peer::Nodes(selector(ctx, &field, n)?)]));
    }
    if let Some(n) = &p.namespaces {
        return Ok(PeerOut::Peers(vec![namespaces(
            ctx,
            &format!("{path}.namespaces"),
            n,
        )?]));
    }
    if let Some(pods) = &p.pods {
        return Ok(PeerOut::Peers(vec![namespaced_pod(
            ctx,
            &format!("{path}.pods"),
            pods,
        )?]));
    }
    if let Some(nets) = &p.networks {
        let field = format!("{path}.networks");
        if nets.is_empty() {
            return Err(ctx.err(field, "must list at least one CIDR"));
        }
        if nets.len() > MAX_NETWORKS {
            return Err(ctx.err(
                field,
                format!("{} CIDRs: at most {MAX_NETWORKS} are allowed", nets.len()),
            ));
        }
        let mut out = Vec::new();
        for (k, n) in nets.iter().enumerate() {
            let cidr = parse_cidr(ctx, &format!("{field}[{k}]"), n)?;
            out.push(Peer::Block(IpBlock {
                cidr,
                except: Vec::new(),
            }));
        }
        return Ok(PeerOut::Peers(out));
    }
    Ok(PeerOut::Unknown)
}

/// `None`: an entry with no field this version knows (fail closed by the rule's action).
fn ports(
    ctx: &Ctx,
    path: &str,
    list: &[api::ProtocolMatch],
    portless: bool,
) -> Result<Option<Vec<PortSpec>>> {
    let field = format!("{path}.protocols");
    if list.is_empty() {
        return Err(ctx.err(field, "must list at least one protocol when present"));
    }
    if list.len() > MAX_PROTOCOLS {
        return Err(ctx.err(
            field,
            format!(
                "{} entries: at most {MAX_PROTOCOLS} are allowed",
                list.len()
            ),
        ));
    }
    let mut out = Vec::new();
    let mut unknown = false;
    for (i, m) in list.iter().enumerate() {
        let ipath = format!("{field}[{i}]");
        let set = usize::from(m.tcp.is_some())
            + usize::from(m.udp.is_some())
            + usize::from(m.sctp.is_some())
            + usize::from(m.destination_named_port.is_some());
        if set > 1 {
            return Err(ctx.err(
                ipath,
                "exactly one of tcp, udp, sctp and destinationNamedPort may be set",
            ));
        }
        if let Some(name) = &m.destination_named_port {
            let npath = format!("{ipath}.destinationNamedPort");
            if portless {
                return Err(ctx.err(
                    npath,
                    "networks/nodes/domainNames peer cannot be set with namedPorts since there are no namedPorts for networks/nodes/domainNames",
                ));
            }
            check_port_name(ctx, &npath, name)?;
            // A named port matches the container port of that name with its own protocol:
            // one entry per protocol, of which at most one can resolve.
            for proto in Protocol::ALL {
                out.push(PortSpec::Named {
                    proto,
                    name: name.clone(),
                });
            }
            continue;
        }
        let (proto, pp, key) = match (&m.tcp, &m.udp, &m.sctp) {
            (Some(p), _, _) => (Protocol::Tcp, p, "tcp"),
            (_, Some(p), _) => (Protocol::Udp, p, "udp"),
            (_, _, Some(p)) => (Protocol::Sctp, p, "sctp"),
            _ => {
                unknown = true;
                continue;
            }
        };
        let ppath = format!("{ipath}.{key}.destinationPort");
        let Some(port) = &pp.destination_port else {
            return Err(ctx.err(ppath, "required"));
        };
        let check = |f: &str, n: i64| -> Result<u16> {
            match u16::try_from(n) {
                Ok(p) if p >= 1 => Ok(p),
                _ => Err(ctx.err(f, format!("{n} is not a valid port number (1-65535)"))),
            }
        };
        match (&port.number, &port.range) {
            (Some(n), None) => {
                let n = check(&format!("{ppath}.number"), *n)?;
                out.push(PortSpec::Range {
                    proto,
                    first: n,
                    last: n,
                });
            }
            (None, Some(r)) => {
                let first = check(&format!("{ppath}.range.start"), r.start)?;
                let last = check(&format!("{ppath}.range.end"), r.end)?;
                if first >= last {
                    return Err(ctx.err(
                        format!("{ppath}.range"),
                        format!("start ({first}) must be less than end ({last})"),
                    ));
                }
                out.push(PortSpec::Range { proto, first, last });
            }
            _ => {
                return Err(ctx.err(ppath, "exactly one of number and range must be set"));
            }
        }
    }
    Ok(if unknown { None } else { Some(out) })
}
