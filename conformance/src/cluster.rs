//! The cluster every case runs against: namespaces x, y, z with pods a, b, c each, spread
//! over three nodes, serving TCP, UDP and SCTP on 80 and 81.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use moat_policy::model::K8sObject;
use serde_json::json;

use crate::Error;
use crate::case::{Case, ContainerPortSpec, Protocol};

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

/// `"x/a"` → (0, 0).
pub fn parse_pod(s: &str) -> Option<(usize, usize)> {
    let (ns, p) = s.split_once('/')?;
    Some((
        NAMESPACES.iter().position(|n| *n == ns)?,
        PODS.iter().position(|n| *n == p)?,
    ))
}

pub fn all_pods() -> impl Iterator<Item = String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
}

fn default_ports() -> Vec<ContainerPortSpec> {
    let mut v = Vec::new();
    for port in [80, 81] {
        for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            v.push(ContainerPortSpec {
                name: format!("serve-{port}-{}", protocol.to_string().to_lowercase()),
                port,
                protocol,
            });
        }
    }
    v
}

/// The objects of the cluster in the state `case` describes.
pub fn objects(case: &Case, plan: Plan) -> Result<Vec<K8sObject>, Error> {
    let bad = |message: String| Error::Case {
        path: case.path.clone(),
        message,
    };
    let mut out = Vec::new();
    for i in 0..NODES {
        out.push(K8sObject::Node(k8s(json!({
            "metadata": {"name": node_name(i)},
            "status": {"addresses": [{"type": "InternalIP", "address": plan.node_ip(i).to_string()}]},
        }))));
    }
    for ns in NAMESPACES {
        let labels = case.namespace_labels.get(ns).cloned().unwrap_or_else(|| {
            BTreeMap::from([
                ("ns".to_string(), ns.to_string()),
                ("kubernetes.io/metadata.name".to_string(), ns.to_string()),
            ])
        });
        out.push(K8sObject::Namespace(k8s(
            json!({"metadata": {"name": ns, "labels": labels}}),
        )));
    }
    for key in case
        .namespace_labels
        .keys()
        .chain(case.pod_labels.keys())
        .chain(case.pod_ports.keys())
    {
        if !NAMESPACES.contains(&key.as_str()) && parse_pod(key).is_none() {
            return Err(bad(format!(
                "{key:?} is not one of the case's namespaces or pods"
            )));
        }
    }
    for (i, ns) in NAMESPACES.iter().enumerate() {
        for (j, p) in PODS.iter().enumerate() {
            let key = format!("{ns}/{p}");
            let labels = case
                .pod_labels
                .get(&key)
                .cloned()
                .unwrap_or_else(|| BTreeMap::from([("pod".to_string(), p.to_string())]));
            let ports: Vec<serde_json::Value> = case
                .pod_ports
                .get(&key)
                .cloned()
                .unwrap_or_else(default_ports)
                .iter()
                .map(|c| json!({"name": c.name, "containerPort": c.port, "protocol": c.protocol.to_string()}))
                .collect();
            out.push(K8sObject::Pod(k8s(json!({
                "metadata": {"name": p, "namespace": ns, "labels": labels},
                "spec": {"nodeName": node_name(node_of(i, j)),
                         "containers": [{"name": "server", "image": "registry.k8s.io/e2e-test-images/agnhost:2.53", "ports": ports}]},
                "status": {"phase": "Running", "podIPs": [{"ip": plan.pod_ip(i, j).to_string()}]},
            }))));
        }
    }
    for (i, p) in case.policies.iter().enumerate() {
        let mut p = p.clone();
        substitute(&mut p, plan).map_err(|m| bad(format!("policies[{i}]: {m}")))?;
        let np: NetworkPolicy =
            serde_yaml::from_value(p).map_err(|e| bad(format!("policies[{i}]: {e}")))?;
        out.push(K8sObject::NetworkPolicy(np));
    }
    Ok(out)
}

fn k8s<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("cluster objects are well-formed")
}

/// Resolves `{{podIP ns/pod}}`, `{{podCIDR ns/pod}}` and `{{podLargeCIDR ns/pod}}`.
fn substitute(v: &mut serde_yaml::Value, plan: Plan) -> Result<(), String> {
    match v {
        serde_yaml::Value::String(s) if s.contains("{{") => *s = resolve(s, plan)?,
        serde_yaml::Value::Sequence(items) => {
            for i in items {
                substitute(i, plan)?;
            }
        }
        serde_yaml::Value::Mapping(m) => {
            for (_, i) in m.iter_mut() {
                substitute(i, plan)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn resolve(s: &str, plan: Plan) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .ok_or_else(|| format!("unterminated placeholder in {s:?}"))?
            + start;
        let inner = rest[start + 2..end].trim();
        let (kind, pod) = inner
            .split_once(' ')
            .ok_or_else(|| format!("bad placeholder {inner:?}"))?;
        let ip = plan
            .ip_of(pod.trim())
            .ok_or_else(|| format!("unknown pod {pod:?} in placeholder"))?;
        let text = match kind {
            "podIP" => ip.to_string(),
            "podCIDR" => match ip {
                IpAddr::V4(_) => format!("{ip}/32"),
                IpAddr::V6(_) => format!("{ip}/128"),
            },
            "podLargeCIDR" => match ip {
                IpAddr::V4(a) => format!("{}/4", Ipv4Addr::from(u32::from(a) & 0xf000_0000)),
                IpAddr::V6(a) => format!("{}/4", Ipv6Addr::from(u128::from(a) & (0xf << 124))),
            },
            other => return Err(format!("unknown placeholder {other:?}")),
        };
        out.push_str(&text);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        let v4 = Plan::new(Family::Ipv4);
        assert_eq!(resolve("{{podIP x/b}}", v4).unwrap(), "10.0.0.11");
        assert_eq!(resolve("{{podCIDR z/c}}", v4).unwrap(), "10.0.2.12/32");
        assert_eq!(resolve("{{ podLargeCIDR y/a }}", v4).unwrap(), "0.0.0.0/4");
        let v6 = Plan::new(Family::Ipv6);
        assert_eq!(resolve("{{podCIDR x/a}}", v6).unwrap(), "fd00::a/128");
        assert_eq!(resolve("{{podLargeCIDR x/a}}", v6).unwrap(), "f000::/4");
        assert!(resolve("{{podIP q/a}}", v4).is_err());
        assert!(resolve("{{podMask x/a}}", v4).is_err());
    }
}
