//! A dual-stack 3×3 cluster with Moat enforcing on packets, for enforcement tests that go
//! beyond the conformance matrix (services, node traffic, ICMP, connection state, crashes).
//!
//! Namespaces x, y, z (labelled `ns=<name>`), pods a, b, c in each (labelled `pod=<name>`),
//! each pod with an IPv4 and an IPv6 address, serving TCP/UDP/SCTP on 80 and 81.

use std::net::IpAddr;
use std::time::Duration;

use moat_harness::agent::{ProbeReq, Proto};
use moat_harness::cluster::{Slot, Spec, slot};
use moat_harness::moat::Moat;
use moat_harness::packets;
use moat_policy::model::K8sObject;
use moat_policy::testkit::k8s;
use serde_json::json;

pub const APPLY: Duration = Duration::from_secs(30);
pub const PROBE: Duration = Duration::from_millis(400);

pub struct World {
    // Field order is drop order: the cluster goes before its address slot is released.
    pub moat: Moat,
    pub spec: Spec,
    /// Pods added after the start (`add_pod`): key → labels. Their manifests are part of
    /// [`base`](Self::base) only once [`announce`](Self::announce)d, so a test decides
    /// when the server learns of them.
    pub extra: std::collections::BTreeMap<String, ExtraPod>,
    /// Node index → its Node's labels in [`base`](Self::base) (none when absent).
    pub node_labels: std::collections::BTreeMap<usize, serde_json::Value>,
    _slot: Slot,
}

#[derive(Clone, Debug)]
pub struct ExtraPod {
    pub labels: serde_json::Value,
    /// The pod's UID (a pod recreated under a name is another pod).
    pub uid: String,
    /// Whether the server's manifests list it.
    pub announced: bool,
}

pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

impl World {
    /// Builds the cluster, starts the server and an enforcer (`backend`) per node, and waits
    /// until every node enforces the policy-free base state.
    pub fn start(backend: &str) -> World {
        Self::start_wrapped(backend, Default::default())
    }

    /// [`start`](Self::start) with some nodes' enforcers under a wrapper command (see
    /// `Moat::wrappers`).
    pub fn start_wrapped(
        backend: &str,
        wrappers: std::collections::BTreeMap<usize, Vec<String>>,
    ) -> World {
        Self::start_by(|spec, names| Moat::start_wrapped(spec, names, backend, wrappers))
    }

    /// [`start`](Self::start) with `n` server replicas watching a test API server, every
    /// enforcer given all of them (see `moat_harness::moat::replicas`).
    pub fn start_replicated(backend: &str, n: usize) -> World {
        Self::start_by(|spec, names| Moat::start_replicated(spec, names, backend, n))
    }

    /// The bed on an address slot of its own, Moat deployed by `deploy`.
    fn start_by(deploy: impl FnOnce(Spec, Vec<String>) -> anyhow::Result<Moat>) -> World {
        let s = slot().expect("address slot");
        let spec = packets::spec(s.id);
        let names = (0..spec.nodes).map(node_name).collect();
        let moat = deploy(spec.clone(), names).expect("starting moat");
        let w = World {
            moat,
            spec,
            extra: Default::default(),
            node_labels: Default::default(),
            _slot: s,
        };
        w.apply(&[]);
        w
    }

    /// Nodes, namespaces and pods, without policies.
    pub fn base(&self) -> Vec<K8sObject> {
        let mut out = Vec::new();
        for i in 0..self.spec.nodes {
            let mut metadata = json!({"name": node_name(i)});
            if let Some(labels) = self.node_labels.get(&i) {
                metadata["labels"] = labels.clone();
            }
            out.push(K8sObject::Node(k8s(json!({
                "metadata": metadata,
                "status": {"addresses": [
                    {"type": "InternalIP", "address": self.spec.node_v4(i).to_string()},
                    {"type": "InternalIP", "address": self.spec.node_v6(i).to_string()},
                ]},
            }))));
        }
        let mut namespaces: std::collections::BTreeSet<&str> = ["x", "y", "z"].into();
        for k in self.extra.keys() {
            namespaces.insert(k.split_once('/').expect("ns/name").0);
        }
        for ns in namespaces {
            out.push(K8sObject::Namespace(k8s(json!({"metadata": {
                "name": ns,
                "labels": {"ns": ns, "kubernetes.io/metadata.name": ns},
            }}))));
        }
        for p in &self.moat.cluster.spec.pods {
            let extra = self.extra.get(&p.key);
            if extra.is_some_and(|e| !e.announced) {
                continue;
            }
            let (ns, name) = p.key.split_once('/').expect("ns/name");
            let labels = extra.map_or_else(|| json!({"pod": name}), |e| e.labels.clone());
            let uid = extra.map_or_else(|| format!("uid-{ns}-{name}"), |e| e.uid.clone());
            let mut ports = Vec::new();
            for port in [80, 81] {
                for proto in ["TCP", "UDP", "SCTP"] {
                    ports.push(
                        json!({"name": format!("serve-{port}-{}", proto.to_lowercase()),
                                      "containerPort": port, "protocol": proto}),
                    );
                }
            }
            out.push(K8sObject::Pod(k8s(json!({
                "metadata": {"name": name, "namespace": ns, "labels": labels, "uid": uid},
                "spec": {"nodeName": node_name(p.node),
                         "containers": [{"name": "server", "image": "agnhost", "ports": ports}]},
                "status": {"phase": "Running",
                           "podIPs": [{"ip": p.v4.to_string()}, {"ip": p.v6.to_string()}]},
            }))));
        }
        out
    }

    /// Makes the cluster hold the base objects plus `policies` (YAML NetworkPolicies or
    /// ClusterNetworkPolicies) and
    /// waits until every enforcer has applied that state.
    pub fn apply(&self, policies: &[String]) {
        let objects = self.objects(policies);
        self.moat.apply(&objects, APPLY).expect("applying policies");
    }

    pub fn objects(&self, policies: &[String]) -> Vec<K8sObject> {
        let mut objects = self.base();
        for p in policies {
            let v: serde_yaml::Value =
                serde_yaml::from_str(p).unwrap_or_else(|e| panic!("{e}: {p}"));
            let o = if v["kind"].as_str() == Some("ClusterNetworkPolicy") {
                K8sObject::ClusterNetworkPolicy(
                    serde_yaml::from_value(v).expect("a ClusterNetworkPolicy"),
                )
            } else {
                K8sObject::NetworkPolicy(serde_yaml::from_value(v).expect("a NetworkPolicy"))
            };
            objects.push(o);
        }
        objects
    }

    /// Adds a pod to the running cluster (namespace, veth, routes, a serving agent), not yet
    /// known to the server: see [`announce`](Self::announce).
    pub fn add_pod(&mut self, p: moat_harness::cluster::PodSpec, labels: serde_json::Value) {
        let generation = self.extra.len();
        self.extra.insert(
            p.key.clone(),
            ExtraPod {
                labels,
                uid: format!("uid-{}-{generation}", p.key.replace('/', "-")),
                announced: false,
            },
        );
        self.moat.cluster.add_pod(p).expect("adding a pod");
    }

    /// Deletes a pod from the cluster (the server still lists it until the next apply).
    pub fn remove_pod(&mut self, key: &str) {
        self.moat.cluster.remove_pod(key).expect("removing a pod");
        self.extra.remove(key);
    }

    /// Lists these added pods in the manifests from the next apply on.
    pub fn announce(&mut self, keys: &[String]) {
        for k in keys {
            self.extra.get_mut(k).expect("added pod").announced = true;
        }
    }

    pub fn pod(&self, key: &str) -> &moat_harness::cluster::PodSpec {
        self.moat
            .cluster
            .spec
            .pods
            .iter()
            .find(|p| p.key == key)
            .unwrap_or_else(|| panic!("no pod {key}"))
    }

    /// Both addresses of a pod.
    pub fn ips(&self, key: &str) -> [IpAddr; 2] {
        let p = self.pod(key);
        [IpAddr::V4(p.v4), IpAddr::V6(p.v6)]
    }

    /// Probes from pod `from`, one result per request.
    pub fn probe(&mut self, from: &str, probes: Vec<ProbeReq>) -> Vec<bool> {
        let r = self
            .moat
            .cluster
            .probe(&[(from.to_string(), probes)], PROBE, 1)
            .expect("probing");
        r.into_iter().next().expect("one result")
    }

    /// Is `to` reachable from `from` with `proto`/`port` in both families? Panics when the
    /// families disagree (a dual-stack enforcement bug).
    pub fn reach(&mut self, from: &str, to: &str, proto: Proto, port: u16) -> bool {
        let probes = self
            .ips(to)
            .into_iter()
            .map(|dst| ProbeReq { dst, proto, port })
            .collect();
        let r = self.probe(from, probes);
        assert_eq!(r[0], r[1], "{from} -> {to} {proto:?}/{port}: v4 {r:?} v6");
        r[0]
    }
}

pub fn tcp(dst: IpAddr, port: u16) -> ProbeReq {
    ProbeReq {
        dst,
        proto: Proto::Tcp,
        port,
    }
}
