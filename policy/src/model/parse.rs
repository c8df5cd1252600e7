//! `k8s-openapi` objects → validated model objects.
//!
//! Validation mirrors the API server's (`pkg/apis/networking/validation`), because the file
//! source has no API server in front of it, and an object the API server would refuse must
//! never silently half-work. Every error names the object and the field path.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    Cidr, ContainerPort, IpBlock, NAMESPACE_NAME_LABEL, Namespace, Node, Object, Op, Peer, Pod,
    Policy, PortSpec, Protocol, Requirement, Rule, Selector,
};

/// A rejected object: which one, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct ValidationError {
    pub object: String,
    pub field: String,
    pub message: String,
}

/// Something accepted but worth telling the user (e.g. a normalised CIDR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub object: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

#[derive(Debug, Clone)]
pub struct Parsed<T> {
    pub value: T,
    pub warnings: Vec<Warning>,
}

type Result<T, E = ValidationError> = std::result::Result<T, E>;

/// What a source accepts beyond the standard API: experimental features, off unless the
/// server is started with them. Sources pass it to [`object_with`] and
/// [`cluster_network_policy_with`]; the plain functions use the default (everything off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// ClusterNetworkPolicy egress `nodes` peers (experimental upstream): refused unless set
    /// (`moat-server --experimental-cnp-node-peers`).
    pub experimental_cnp_node_peers: bool,
}

impl Options {
    /// Every experimental feature on (tests and generators).
    pub fn experimental() -> Self {
        Options {
            experimental_cnp_node_peers: true,
        }
    }
}

struct Ctx {
    object: String,
    warnings: Vec<Warning>,
    opts: Options,
}

impl Ctx {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ValidationError {
        ValidationError {
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning {
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }

    fn done<T>(self, value: T) -> Parsed<T> {
        Parsed {
            value,
            warnings: self.warnings,
        }
    }
}

/// Name and namespace of a namespaced object; a missing namespace means `default`, as with
/// `kubectl apply`.
fn namespaced_name(kind: &str, meta: &ObjectMeta) -> (Ctx, Result<(String, String)>) {
    let ns = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let name = meta.name.clone().unwrap_or_default();
    let ctx = Ctx {
        object: format!(
            "{kind} {ns}/{}",
            if name.is_empty() { "<unnamed>" } else { &name }
        ),
        warnings: Vec::new(),
        opts: Options::default(),
    };
    let r = check_name(&ctx, "metadata.name", &name)
        .and_then(|_| check_name(&ctx, "metadata.namespace", &ns))
        .map(|_| (ns, name));
    (ctx, r)
}

fn cluster_name(kind: &str, meta: &ObjectMeta) -> (Ctx, Result<String>) {
    let name = meta.name.clone().unwrap_or_default();
    let ctx = Ctx {
        object: format!(
            "{kind} {}",
            if name.is_empty() { "<unnamed>" } else { &name }
        ),
        warnings: Vec::new(),
        opts: Options::default(),
    };
    let r = check_name(&ctx, "metadata.name", &name).map(|_| name);
    (ctx, r)
}

fn check_name(ctx: &Ctx, field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ctx.err(
            field,
            format!("{name:?} is not a valid name (lowercase letters, digits, '-' and '.', starting and ending alphanumeric)"),
        ))
    }
}

pub fn namespace(ns: &core::Namespace) -> Result<Parsed<Namespace>> {
    let (mut ctx, name) = cluster_name("Namespace", &ns.metadata);
    let name = name?;
    let mut labels = labels(&ctx, "metadata.labels", ns.metadata.labels.as_ref())?;
    match labels.get(NAMESPACE_NAME_LABEL) {
        Some(v) if v != &name => ctx.warn(
            format!("metadata.labels[{NAMESPACE_NAME_LABEL}]"),
            format!("is {v:?}; the API server always sets it to the namespace name {name:?}, and so does Moat"),
        ),
        _ => {}
    }
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
    Ok(ctx.done(Namespace { name, labels }))
}

pub fn node(node: &core::Node) -> Result<Parsed<Node>> {
    let (ctx, name) = cluster_name("Node", &node.metadata);
    let name = name?;
    let labels = labels(&ctx, "metadata.labels", node.metadata.labels.as_ref())?;
    let mut addrs = Vec::new();
    let list = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, a) in list.iter().enumerate() {
        if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
            continue;
        }
        let ip: IpAddr = a.address.parse().map_err(|_| {
            ctx.err(
                format!("status.addresses[{i}].address"),
                format!("{:?} is not an IP address", a.address),
            )
        })?;
        addrs.push(ip);
    }
    addrs.sort();
    addrs.dedup();
    Ok(ctx.done(Node {
        name,
        addrs,
        labels,
    }))
}

pub fn pod(pod: &core::Pod) -> Result<Parsed<Pod>> {
    let (ctx, names) = namespaced_name("Pod", &pod.metadata);
    let (namespace, name) = names?;
    let labels = labels(&ctx, "metadata.labels", pod.metadata.labels.as_ref())?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();

    let mut ips = Vec::new();
    match status
        .and_then(|s| s.pod_ips.as_ref())
        .filter(|l| !l.is_empty())
    {
        Some(list) => {
            for (i, p) in list.iter().enumerate() {
                ips.push(parse_ip(&ctx, &format!("status.podIPs[{i}].ip"), &p.ip)?);
            }
        }
        None => {
            if let Some(ip) = status
                .and_then(|s| s.pod_ip.as_ref())
                .filter(|s| !s.is_empty())
            {
                ips.push(parse_ip(&ctx, "status.podIP", ip)?);
            }
        }
    }
    ips.sort();
    ips.dedup();

    let mut ports = Vec::new();
    if let Some(spec) = spec {
        let sidecars = spec
            .init_containers
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
            .map(|(i, c)| (format!("spec.initContainers[{i}]"), c));
        let main = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.containers[{i}]"), c));
        for (path, c) in main.chain(sidecars) {
            for (j, p) in c.ports.iter().flatten().enumerate() {
                let Some(pname) = &p.name else { continue };
                let field = format!("{path}.ports[{j}]");
                check_port_name(&ctx, &format!("{field}.name"), pname)?;
                let port =
                    check_port_number(&ctx, &format!("{field}.containerPort"), p.container_port)?;
                let proto = protocol(&ctx, &format!("{field}.protocol"), p.protocol.as_deref())?;
                ports.push(ContainerPort {
                    name: pname.clone(),
                    proto,
                    port,
                });
            }
        }
    }
    ports.sort();
    ports.dedup();

    let terminal = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    );
    Ok(ctx.done(Pod {
        namespace,
        name,
        labels,
        node: spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        ips,
        ports,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        terminal,
        uid: pod.metadata.uid.clone().filter(|u| !u.is_empty()),
        sandbox: status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| {
                c.iter()
                    .find(|c| c.type_ == "PodReadyToStartContainers" && c.status == "True")
            })
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.to_string()),
    }))
}

pub fn network_policy(np: &net::NetworkPolicy) -> Result<Parsed<Policy>> {
    let (mut ctx, names) = namespaced_name("NetworkPolicy", &np.metadata);
    let (namespace, name) = names?;
    let spec = np
        .spec
        .as_ref()
        .ok_or_else(|| ctx.err("spec", "required"))?;
    let pod_selector = match &spec.pod_selector {
        Some(s) => selector(&ctx, "spec.podSelector", s)?,
        None => Selector::everything(),
    };

    let mut ingress_type = false;
    let mut egress_type = false;
    match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress_type = true,
                    "Egress" => egress_type = true,
                    other => {
                        return Err(ctx.err(
                            format!("spec.policyTypes[{i}]"),
                            format!("unsupported value {other:?}: supported values are \"Ingress\", \"Egress\""),
                        ));
                    }
                }
            }
        }
        None => {
            ingress_type = true;
            egress_type = spec.egress.as_ref().is_some_and(|e| {
                !e.is_empty() || crate::faults::active(crate::faults::Fault::EgressTypeWhenEmpty)
            });
        }
    }

    // Rules of a direction the policy doesn't isolate are ignored, but they must still be valid.
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        ingress.push(rule(
            &mut ctx,
            &path,
            "from",
            r.from.as_deref(),
            r.ports.as_deref(),
        )?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        egress.push(rule(
            &mut ctx,
            &path,
            "to",
            r.to.as_deref(),
            r.ports.as_deref(),
        )?);
    }
    Ok(ctx.done(Policy {
        namespace,
        name,
        pod_selector,
        ingress: ingress_type.then_some(ingress),
        egress: egress_type.then_some(egress),
    }))
}

fn rule(
    ctx: &mut Ctx,
    path: &str,
    peers_field: &str,
    peers: Option<&[net::NetworkPolicyPeer]>,
    ports: Option<&[net::NetworkPolicyPort]>,
) -> Result<Rule> {
    let mut out = Rule {
        peers: Vec::new(),
        ports: Vec::new(),
    };
    for (j, p) in peers.unwrap_or_default().iter().enumerate() {
        out.peers
            .push(peer(ctx, &format!("{path}.{peers_field}[{j}]"), p)?);
    }
    for (j, p) in ports.unwrap_or_default().iter().enumerate() {
        out.ports.push(port(ctx, &format!("{path}.ports[{j}]"), p)?);
    }
    out.ports.sort();
    out.ports.dedup();
    Ok(out)
}

fn peer(ctx: &mut Ctx, path: &str, p: &net::NetworkPolicyPeer) -> Result<Peer> {
    let n = usize::from(p.pod_selector.is_some())
        + usize::from(p.namespace_selector.is_some())
        + usize::from(p.ip_block.is_some());
    if n == 0 {
        return Err(ctx.err(
            path,
            "must specify a peer (podSelector, namespaceSelector or ipBlock)",
        ));
    }
    if let Some(b) = &p.ip_block {
        if n > 1 {
            return Err(ctx.err(
                path,
                "ipBlock may not be combined with podSelector or namespaceSelector",
            ));
        }
        return Ok(Peer::Block(ip_block(ctx, &format!("{path}.ipBlock"), b)?));
    }
    let pods = match &p.pod_selector {
        Some(s) => selector(ctx, &format!("{path}.podSelector"), s)?,
        None => Selector::everything(),
    };
    let namespaces = match &p.namespace_selector {
        Some(s) => Some(selector(ctx, &format!("{path}.namespaceSelector"), s)?),
        None => None,
    };
    Ok(Peer::Pods { namespaces, pods })
}

fn ip_block(ctx: &mut Ctx, path: &str, b: &net::IPBlock) -> Result<IpBlock> {
    let cidr = parse_cidr(ctx, &format!("{path}.cidr"), &b.cidr)?;
    let mut except = Vec::new();
    for (k, e) in b.except.iter().flatten().enumerate() {
        let field = format!("{path}.except[{k}]");
        let c = parse_cidr(ctx, &field, e)?;
        if !cidr.covers(&c) || c.prefix_len() <= cidr.prefix_len() {
            return Err(ctx.err(
                field,
                format!("{e} must be a strict subset of cidr {}", b.cidr),
            ));
        }
        except.push(c);
    }
    except.sort();
    except.dedup();
    Ok(IpBlock { cidr, except })
}

fn parse_cidr(ctx: &mut Ctx, field: &str, s: &str) -> Result<Cidr> {
    let p = Cidr::parse(s).map_err(|e| ctx.err(field, e.to_string()))?;
    if p.had_host_bits {
        ctx.warn(
            field,
            format!(
                "{s} has host bits set; using {} (older API servers accepted this)",
                p.cidr
            ),
        );
    }
    Ok(p.cidr)
}

fn port(ctx: &Ctx, path: &str, p: &net::NetworkPolicyPort) -> Result<PortSpec> {
    let proto = protocol(ctx, &format!("{path}.protocol"), p.protocol.as_deref())?;
    match &p.port {
        None => {
            if p.end_port.is_some() {
                return Err(ctx.err(
                    format!("{path}.endPort"),
                    "may not be specified when `port` is not specified",
                ));
            }
            Ok(PortSpec::All(proto))
        }
        Some(IntOrString::Int(n)) => {
            let first = check_port_number(ctx, &format!("{path}.port"), *n)?;
            let last = match p.end_port {
                None => first,
                Some(e) => {
                    let last = check_port_number(ctx, &format!("{path}.endPort"), e)?;
                    if last < first {
                        return Err(ctx.err(
                            format!("{path}.endPort"),
                            format!("{last} must be greater than or equal to `port` ({first})"),
                        ));
                    }
                    last
                }
            };
            Ok(PortSpec::Range { proto, first, last })
        }
        Some(IntOrString::String(name)) => {
            if p.end_port.is_some() {
                return Err(ctx.err(
                    format!("{path}.endPort"),
                    "may not be specified when `port` is non-numeric",
                ));
            }
            check_port_name(ctx, &format!("{path}.port"), name)?;
            Ok(PortSpec::Named {
                proto,
                name: name.clone(),
            })
        }
    }
}

fn protocol(ctx: &Ctx, field: &str, p: Option<&str>) -> Result<Protocol> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(s) => Protocol::parse(s).ok_or_else(|| {
            ctx.err(
                field,
                format!(
                    "unsupported protocol {s:?}: supported values are \"TCP\", \"UDP\", \"SCTP\""
                ),
            )
        }),
    }
}

fn check_port_number(ctx: &Ctx, field: &str, n: i32) -> Result<u16> {
    match u16::try_from(n) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(ctx.err(field, format!("{n} is not a valid port number (1-65535)"))),
    }
}

/// IANA service name, as Kubernetes' `IsValidPortName`.
fn check_port_name(ctx: &Ctx, field: &str, name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(ctx.err(
            field,
            format!("{name:?} is not a valid port name (1-15 lowercase letters, digits and '-', at least one letter)"),
        ))
    }
}

fn parse_ip(ctx: &Ctx, field: &str, s: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| ctx.err(field, format!("{s:?} is not an IP address")))
}

fn labels(
    ctx: &Ctx,
    path: &str,
    l: Option<&BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>> {
    let l = l.cloned().unwrap_or_default();
    for (k, v) in &l {
        check_label_key(ctx, &format!("{path}[{k}]"), k)?;
        check_label_value(ctx, &format!("{path}[{k}]"), v)?;
    }
    Ok(l)
}

fn selector(ctx: &Ctx, path: &str, s: &LabelSelector) -> Result<Selector> {
    let mut reqs = Vec::new();
    for (k, v) in s.match_labels.iter().flatten() {
        let field = format!("{path}.matchLabels[{k}]");
        check_label_key(ctx, &field, k)?;
        check_label_value(ctx, &field, v)?;
        reqs.push(Requirement {
            key: k.clone(),
            op: Op::In,
            values: vec![v.clone()],
        });
    }
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let field = format!("{path}.matchExpressions[{i}]");
        check_label_key(ctx, &format!("{field}.key"), &e.key)?;
        let op = match e.operator.as_str() {
            "In" => Op::In,
            "NotIn" => Op::NotIn,
            "Exists" => Op::Exists,
            "DoesNotExist" => Op::DoesNotExist,
            other => {
                return Err(ctx.err(
                    format!("{field}.operator"),
                    format!(
                        "unknown operator {other:?}: supported are In, NotIn, Exists, DoesNotExist"
                    ),
                ));
            }
        };
        let mut values = e.values.clone().unwrap_or_default();
        match op {
            Op::In | Op::NotIn if values.is_empty() => {
                return Err(ctx.err(
                    format!("{field}.values"),
                    format!("must be non-empty when operator is {}", e.operator),
                ));
            }
            Op::Exists | Op::DoesNotExist if !values.is_empty() => {
                return Err(ctx.err(
                    format!("{field}.values"),
                    format!("must be empty when operator is {}", e.operator),
                ));
            }
            _ => {}
        }
        for (j, v) in values.iter().enumerate() {
            check_label_value(ctx, &format!("{field}.values[{j}]"), v)?;
        }
        values.sort();
        values.dedup();
        reqs.push(Requirement {
            key: e.key.clone(),
            op,
            values,
        });
    }
    reqs.sort();
    reqs.dedup();
    Ok(Selector { reqs })
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn check_label_key(ctx: &Ctx, field: &str, key: &str) -> Result<()> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                let b = part.as_bytes();
                !b.is_empty()
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            })
    });
    if prefix_ok && is_label_name(name) {
        Ok(())
    } else {
        Err(ctx.err(field, format!("{key:?} is not a valid label key")))
    }
}

fn check_label_value(ctx: &Ctx, field: &str, v: &str) -> Result<()> {
    if v.is_empty() || is_label_name(v) {
        Ok(())
    } else {
        Err(ctx.err(field, format!("{v:?} is not a valid label value")))
    }
}

/// The Kubernetes objects the model reads, as the API (or a manifest) delivers them.
// Short-lived on the way into the model; boxing would only add noise at every use.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum K8sObject {
    Namespace(core::Namespace),
    Pod(core::Pod),
    Node(core::Node),
    NetworkPolicy(net::NetworkPolicy),
    ClusterNetworkPolicy(super::cnp_api::ClusterNetworkPolicy),
}

/// Validates and converts any supported object, with every experimental feature off.
pub fn object(o: &K8sObject) -> Result<Parsed<Object>> {
    object_with(o, &Options::default())
}

/// Validates and converts any supported object, accepting what `opts` enables.
pub fn object_with(o: &K8sObject, opts: &Options) -> Result<Parsed<Object>> {
    fn wrap<T>(p: Parsed<T>, f: impl FnOnce(T) -> Object) -> Parsed<Object> {
        Parsed {
            value: f(p.value),
            warnings: p.warnings,
        }
    }
    Ok(match o {
        K8sObject::Namespace(n) => wrap(namespace(n)?, Object::Namespace),
        K8sObject::Pod(p) => wrap(pod(p)?, Object::Pod),
        K8sObject::Node(n) => wrap(node(n)?, Object::Node),
        K8sObject::NetworkPolicy(p) => wrap(network_policy(p)?, Object::Policy),
        K8sObject::ClusterNetworkPolicy(p) => wrap(
            cnp::cluster_network_policy_with(p, opts)?,
            Object::ClusterPolicy,
        ),
    })
}

mod cnp;
pub use cnp::{MAX_PRIORITY, cluster_network_policy, cluster_network_policy_with};

#[cfg(test)]
mod tests;
