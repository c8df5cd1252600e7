//! The cluster a case runs against: its namespaces and pods (see [`Layout`]; by default x, y,
//! z with pods a, b, c each, serving TCP, UDP and SCTP on 80 and 81), spread over three nodes,
//! and the addresses of all of them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use moat_policy::model::K8sObject;
use serde_json::json;

use crate::Error;
use crate::case::Case;
use crate::layout::Layout;
use crate::policy;

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
pub const NODES: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        })
    }
}

/// Addresses of one cluster. Pods lie in one /4 (10.0.0.0/8 ⊂ 0.0.0.0/4, fd00::/8 ⊂
/// f000::/4) as the schema requires; nodes lie outside it. `id` keeps clusters that run side
/// by side apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub family: Family,
    pub id: u8,
}

impl Plan {
    pub fn new(family: Family) -> Self {
        Self { family, id: 0 }
    }

    /// The address of the `pod`-th pod of the `ns`-th namespace (`ns` < 256, `pod` < 246:
    /// [`Layout::of`] refuses larger clusters).
    pub fn pod_ip(&self, ns: usize, pod: usize) -> IpAddr {
        match self.family {
            Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(10, self.id, ns as u8, pod as u8 + 10)),
            Family::Ipv6 => IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                u16::from(self.id),
                0,
                0,
                0,
                0,
                ns as u16,
                pod as u16 + 10,
            )),
        }
    }

    pub fn node_ip(&self, node: usize) -> IpAddr {
        match self.family {
            Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(192, 168, self.id, node as u8 + 1)),
            Family::Ipv6 => IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                u16::from(self.id),
                0,
                0,
                0,
                0,
                node as u16 + 1,
            )),
        }
    }

    /// The address of an x/y/z pod (a case's own pods: [`Layout::ip_of`]).
    pub fn ip_of(&self, pod: &str) -> Option<IpAddr> {
        let (ns, p) = parse_pod(pod)?;
        Some(self.pod_ip(ns, p))
    }
}

pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// Spreads pods so that every node holds one pod of each namespace, with different names.
pub fn node_of(ns: usize, pod: usize) -> usize {
    (ns + pod) % NODES
}

/// `"x/a"` → (0, 0), in the x/y/z model.
pub fn parse_pod(s: &str) -> Option<(usize, usize)> {
    let (ns, p) = s.split_once('/')?;
    Some((
        NAMESPACES.iter().position(|n| *n == ns)?,
        PODS.iter().position(|n| *n == p)?,
    ))
}

/// The pods of the x/y/z model.
pub fn all_pods() -> impl Iterator<Item = String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
}

/// The objects of the cluster in the state `case` describes.
pub fn objects(case: &Case, plan: Plan) -> Result<Vec<K8sObject>, Error> {
    objects_in(&Layout::of(case)?, case, plan)
}

/// [`objects`] for a case whose layout is already known.
pub fn objects_in(layout: &Layout, case: &Case, plan: Plan) -> Result<Vec<K8sObject>, Error> {
    let mut out = Vec::new();
    for i in 0..NODES {
        out.push(K8sObject::Node(k8s(json!({
            "metadata": {"name": node_name(i)},
            "status": {"addresses": [{"type": "InternalIP", "address": plan.node_ip(i).to_string()}]},
        }))));
    }
    for ns in &layout.namespaces {
        out.push(K8sObject::Namespace(k8s(
            json!({"metadata": {"name": ns.name, "labels": ns.labels}}),
        )));
    }
    for p in &layout.pods {
        let ports: Vec<serde_json::Value> = p
            .ports
            .iter()
            .map(|c| json!({"name": c.name, "containerPort": c.port, "protocol": c.protocol.to_string()}))
            .collect();
        out.push(K8sObject::Pod(k8s(json!({
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
            "spec": {"nodeName": node_name(p.node()),
                     "containers": [{"name": "server", "image": "registry.k8s.io/e2e-test-images/agnhost:2.53", "ports": ports}]},
            "status": {"phase": "Running", "podIPs": [{"ip": p.ip(plan).to_string()}]},
        }))));
    }
    let ip_of = |pod: &str| layout.ip_of(plan, pod);
    for (i, p) in case.policies.iter().enumerate() {
        out.push(policy::object(p, &ip_of).map_err(|message| Error::Case {
            path: case.path.clone(),
            message: format!("policies[{i}]: {message}"),
        })?);
    }
    Ok(out)
}

fn k8s<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("cluster objects are well-formed")
}
