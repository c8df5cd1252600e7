//! The namespaces and pods of one case: the x/y/z model, or the case's own `cluster:`
//! section, with `namespaceLabels`, `podLabels` and `podPorts` applied on top.
//!
//! Namespaces and pods are numbered in name order; a pod's address and node come from its
//! namespace's number and its number within that namespace (see [`Plan::pod_ip`]), so the
//! x/y/z model keeps the addresses it always had.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::Error;
use crate::case::{Case, ClusterSpec, ContainerPortSpec, ProbeSpec, Protocol};
use crate::cluster::{NAMESPACES, PODS, Plan, node_of};

/// The label the API server sets on every namespace.
const NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// `Plan::pod_ip` puts the namespace number in one IPv4 octet…
const MAX_NAMESPACES: usize = 256;
/// …and the pod number + 10 in another.
const MAX_PODS_PER_NAMESPACE: usize = 246;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// `"ns/name"`, as the cases name it.
    pub key: String,
    pub namespace: String,
    pub name: String,
    /// Index of its namespace in [`Layout::namespaces`].
    pub ns_index: usize,
    /// Index among its namespace's pods.
    pub index: usize,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<ContainerPortSpec>,
}

impl Pod {
    pub fn ip(&self, plan: Plan) -> IpAddr {
        plan.pod_ip(self.ns_index, self.index)
    }

    pub fn node(&self) -> usize {
        node_of(self.ns_index, self.index)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// In name order.
    pub namespaces: Vec<Namespace>,
    /// By namespace, then name.
    pub pods: Vec<Pod>,
    /// What every pod serves.
    pub serves: Vec<ProbeSpec>,
}

impl Layout {
    pub fn of(case: &Case) -> Result<Layout, Error> {
        let bad = |message: String| Error::Case {
            path: case.path.clone(),
            message,
        };
        let mut layout = match &case.cluster {
            None => xyz(),
            Some(c) => section(c).map_err(bad)?,
        };
        if layout.namespaces.len() > MAX_NAMESPACES {
            return Err(bad(format!(
                "{} namespaces; the address plan holds {MAX_NAMESPACES}",
                layout.namespaces.len()
            )));
        }
        if let Some(p) = layout
            .pods
            .iter()
            .find(|p| p.index >= MAX_PODS_PER_NAMESPACE)
        {
            return Err(bad(format!(
                "namespace {:?} has more than {MAX_PODS_PER_NAMESPACE} pods, more than the address plan holds",
                p.namespace
            )));
        }
        layout.apply_overrides(case).map_err(bad)?;
        Ok(layout)
    }

    fn apply_overrides(&mut self, case: &Case) -> Result<(), String> {
        for (name, labels) in &case.namespace_labels {
            let ns = self
                .namespaces
                .iter_mut()
                .find(|n| &n.name == name)
                .ok_or_else(|| {
                    format!("namespaceLabels: {name:?} is not a namespace of the case")
                })?;
            ns.labels = labels.clone();
        }
        for (key, labels) in &case.pod_labels {
            self.pod_mut(key)
                .ok_or_else(|| format!("podLabels: {key:?} is not a pod of the case"))?
                .labels = labels.clone();
        }
        for (key, ports) in &case.pod_ports {
            self.pod_mut(key)
                .ok_or_else(|| format!("podPorts: {key:?} is not a pod of the case"))?
                .ports = ports.clone();
        }
        Ok(())
    }

    pub fn pod(&self, key: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.key == key)
    }

    fn pod_mut(&mut self, key: &str) -> Option<&mut Pod> {
        self.pods.iter_mut().find(|p| p.key == key)
    }

    pub fn ip_of(&self, plan: Plan, key: &str) -> Option<IpAddr> {
        Some(self.pod(key)?.ip(plan))
    }
}

/// The layout a `cluster:` section describes, before overrides.
fn section(c: &ClusterSpec) -> Result<Layout, String> {
    for (name, labels) in &c.namespaces {
        // The schema promises it; a case without it would test a cluster that cannot exist.
        if labels.get(NAME_LABEL) != Some(name) {
            return Err(format!(
                "cluster.namespaces: {name:?} must carry {NAME_LABEL}: {name}"
            ));
        }
    }
    let mut pods: BTreeMap<(&str, &str), Pod> = BTreeMap::new();
    for (key, spec) in &c.pods {
        let Some((ns, name)) = key
            .split_once('/')
            .filter(|(_, name)| !name.is_empty() && !name.contains('/'))
        else {
            return Err(format!("cluster.pods: {key:?} is not \"ns/name\""));
        };
        let Some(ns_index) = c.namespaces.keys().position(|n| n == ns) else {
            return Err(format!(
                "cluster.pods: {key:?} is in a namespace cluster.namespaces lacks"
            ));
        };
        let pod = Pod {
            key: key.clone(),
            namespace: ns.to_string(),
            name: name.to_string(),
            ns_index,
            index: 0,
            labels: spec.labels.clone(),
            ports: spec.ports.clone(),
        };
        pods.insert((ns, name), pod);
    }
    let mut pods: Vec<Pod> = pods.into_values().collect();
    // Number the pods of each namespace; the map kept them in (namespace, name) order.
    for i in 1..pods.len() {
        if pods[i].ns_index == pods[i - 1].ns_index {
            pods[i].index = pods[i - 1].index + 1;
        }
    }
    let namespaces = c
        .namespaces
        .iter()
        .map(|(name, labels)| Namespace {
            name: name.clone(),
            labels: labels.clone(),
        })
        .collect();
    Ok(Layout {
        namespaces,
        pods,
        serves: c.serves.clone(),
    })
}

/// The x/y/z model of the schema: pods `a`, `b`, `c` in each namespace, serving TCP, UDP and
/// SCTP on 80 and 81, each port a named container port.
pub fn xyz() -> Layout {
    let protocols = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
    let mut serves = Vec::new();
    let mut ports = Vec::new();
    for port in [80, 81] {
        for protocol in protocols {
            serves.push(ProbeSpec { protocol, port });
            ports.push(ContainerPortSpec {
                name: format!("serve-{port}-{}", protocol.to_string().to_lowercase()),
                port,
                protocol,
            });
        }
    }
    let namespaces = NAMESPACES
        .iter()
        .map(|ns| Namespace {
            name: ns.to_string(),
            labels: BTreeMap::from([
                ("ns".to_string(), ns.to_string()),
                (NAME_LABEL.to_string(), ns.to_string()),
            ]),
        })
        .collect();
    let mut pods = Vec::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        for (j, p) in PODS.iter().enumerate() {
            pods.push(Pod {
                key: format!("{ns}/{p}"),
                namespace: ns.to_string(),
                name: p.to_string(),
                ns_index: i,
                index: j,
                labels: BTreeMap::from([("pod".to_string(), p.to_string())]),
                ports: ports.clone(),
            });
        }
    }
    Layout {
        namespaces,
        pods,
        serves,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::cluster::{Family, all_pods};

    fn parse(text: &str) -> Result<Case, Error> {
        Case::parse(Path::new("test.yaml"), text)
    }

    const CLUSTER: &str = "
name: t
cluster:
  namespaces:
    empty: {kubernetes.io/metadata.name: empty}
    b-ns: {kubernetes.io/metadata.name: b-ns, team: blue}
    a-ns: {kubernetes.io/metadata.name: a-ns}
  pods:
    b-ns/q: {labels: {app: q}, ports: [{name: dns, port: 53, protocol: UDP}]}
    a-ns/z: {labels: {app: z}}
    b-ns/p: {}
    a-ns/y: {}
  serves: [{protocol: UDP, port: 53}]
";

    /// The x/y/z model keeps the addresses, nodes and ports it had before `cluster:` existed.
    #[test]
    fn xyz_is_the_model_of_a_case_without_cluster() {
        let case = parse("name: t\nprobes: []\nexpect: []\n").unwrap();
        let l = Layout::of(&case).unwrap();
        let keys: Vec<String> = l.pods.iter().map(|p| p.key.clone()).collect();
        assert_eq!(keys, all_pods().collect::<Vec<_>>());
        let plan = Plan::new(Family::Ipv4);
        for p in &l.pods {
            assert_eq!(Some(p.ip(plan)), plan.ip_of(&p.key));
        }
        assert_eq!(l.serves.len(), 6);
        assert!(l.pods.iter().all(|p| p.ports.len() == 6));
    }

    /// Namespaces and pods are numbered in name order; the address follows the number.
    #[test]
    fn a_cluster_section_numbers_pods_within_their_namespace() {
        let case = parse(&format!("{CLUSTER}probes: []\nexpect: []\n")).unwrap();
        let l = Layout::of(&case).unwrap();
        let names: Vec<&str> = l.namespaces.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a-ns", "b-ns", "empty"]);
        let pods: Vec<(&str, usize, usize)> = l
            .pods
            .iter()
            .map(|p| (p.key.as_str(), p.ns_index, p.index))
            .collect();
        assert_eq!(
            pods,
            [
                ("a-ns/y", 0, 0),
                ("a-ns/z", 0, 1),
                ("b-ns/p", 1, 0),
                ("b-ns/q", 1, 1)
            ]
        );
        let v6 = Plan::new(Family::Ipv6);
        assert_eq!(
            l.ip_of(v6, "b-ns/q").unwrap().to_string(),
            "fd00::1:b",
            "namespace 1, pod 1"
        );
        assert_eq!(l.pod("b-ns/q").unwrap().ports[0].protocol, Protocol::Udp);
        assert!(l.pod("b-ns/p").unwrap().ports.is_empty());
    }

    #[test]
    fn overrides_apply_on_top_of_the_cluster_section() {
        let text = format!(
            "{CLUSTER}podLabels: {{b-ns/p: {{app: new}}}}\nnamespaceLabels: {{empty: {{x: '1'}}}}\nprobes: []\nexpect: []\n"
        );
        let l = Layout::of(&parse(&text).unwrap()).unwrap();
        assert_eq!(l.pod("b-ns/p").unwrap().labels["app"], "new");
        assert_eq!(
            l.namespaces[2].labels,
            BTreeMap::from([("x".into(), "1".into())])
        );
    }

    /// Every way a case can disagree with its own model is an error that says where.
    #[test]
    fn a_case_inconsistent_with_its_model_is_rejected() {
        let probe = "probes: [{protocol: UDP, port: 53}]\nexpect: [{probe: {protocol: UDP, port: 53}, default: true";
        let bad = [
            (
                format!(
                    "{CLUSTER}{probe}, exceptions: [{{from: a-ns/y, to: x/a, allowed: false}}]}}]\n"
                ),
                "\"x/a\"",
            ),
            (
                format!(
                    "{CLUSTER}probes: [{{protocol: TCP, port: 80}}]\nexpect: [{{probe: {{protocol: TCP, port: 80}}, default: true}}]\n"
                ),
                "not served",
            ),
            (
                format!("{CLUSTER}podLabels: {{x/a: {{}}}}\n{probe}}}]\n"),
                "podLabels",
            ),
            (
                CLUSTER.replace("a-ns/z:", "c-ns/z:") + "probes: []\nexpect: []\n",
                "c-ns/z",
            ),
            (
                CLUSTER.replace("a-ns/z:", "z:") + "probes: []\nexpect: []\n",
                "\"z\"",
            ),
            (
                CLUSTER.replace("{kubernetes.io/metadata.name: a-ns}", "{}")
                    + "probes: []\nexpect: []\n",
                "a-ns",
            ),
            (
                "name: t\nnamespaceLabels: {q: {}}\nprobes: []\nexpect: []\n".to_string(),
                "namespaceLabels",
            ),
        ];
        for (text, needle) in bad {
            let e = parse(&text).expect_err(&text).to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
        parse(&format!(
            "{CLUSTER}{probe}, exceptions: [{{from: a-ns/y, to: b-ns/q, allowed: false}}]}}]\n"
        ))
        .unwrap();
    }
}
