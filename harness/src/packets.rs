//! The conformance cluster on packets: 3 nodes, pods x/a … z/c spread across them, Moat
//! enforcing with a real dataplane, and the probe matrix sent as real TCP, UDP and SCTP.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use moat_conformance::cluster::{self, Family, NAMESPACES, NODES, PODS, Plan};
use moat_conformance::{Backend, Error, Probe};
use moat_policy::model::K8sObject;

use crate::agent::{ProbeReq, Proto};
use crate::cluster::{PodSpec, Spec};
use crate::moat::Moat;

const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
const APPLY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct PacketBackend {
    pub moat: Moat,
}

/// The netns layout of the conformance cluster for address slot `id` (dual-stack).
pub fn spec(id: u8) -> Spec {
    let v4 = Plan {
        family: Family::Ipv4,
        id,
    };
    let v6 = Plan {
        family: Family::Ipv6,
        id,
    };
    let mut pods = Vec::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        for (j, p) in PODS.iter().enumerate() {
            let (IpAddr::V4(a), IpAddr::V6(b)) = (v4.pod_ip(i, j), v6.pod_ip(i, j)) else {
                unreachable!()
            };
            pods.push(PodSpec {
                key: format!("{ns}/{p}"),
                node: cluster::node_of(i, j),
                v4: a,
                v6: b,
            });
        }
    }
    Spec {
        id,
        nodes: NODES,
        pods,
        tcp: vec![80, 81],
        udp: vec![80, 81],
        sctp: vec![80, 81],
    }
}

impl PacketBackend {
    pub fn start(plan: Plan, backend: &str) -> Result<Self, Error> {
        Self::start_in(plan, backend, None)
    }

    /// [`start`](Self::start), the server and enforcers containers of an image when
    /// `containers` is given.
    pub fn start_in(
        plan: Plan,
        backend: &str,
        containers: Option<crate::container::Containers>,
    ) -> Result<Self, Error> {
        let names = (0..NODES).map(cluster::node_name).collect();
        let spec = spec(plan.id);
        let moat = match containers {
            Some(c) => Moat::start_in_containers(spec, names, backend, c),
            None => Moat::start(spec, names, backend),
        }
        .map_err(|e| Error::Backend(format!("{e:#}")))?;
        Ok(Self { moat })
    }
}

fn proto(p: moat_conformance::case::Protocol) -> Proto {
    match p {
        moat_conformance::case::Protocol::Tcp => Proto::Tcp,
        moat_conformance::case::Protocol::Udp => Proto::Udp,
        moat_conformance::case::Protocol::Sctp => Proto::Sctp,
    }
}

impl Backend for PacketBackend {
    fn apply(&mut self, objects: &[K8sObject]) -> Result<(), Error> {
        let e = |e: anyhow::Error| Error::Backend(format!("{e:#}"));
        let expected = Moat::expected(objects).map_err(e)?;
        self.moat.write_manifests(objects).map_err(e)?;
        self.moat.wait_applied(&expected, APPLY_TIMEOUT).map_err(e)
    }

    fn probe(&mut self, probes: &[Probe]) -> Result<Vec<bool>, Error> {
        // One request per source pod, all pods at once; results back in the caller's order.
        let mut by_pod: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, p) in probes.iter().enumerate() {
            by_pod.entry(p.from.clone()).or_default().push(i);
        }
        let reqs: Vec<(String, Vec<ProbeReq>)> = by_pod
            .iter()
            .map(|(from, idx)| {
                let v = idx
                    .iter()
                    .map(|i| ProbeReq {
                        dst: probes[*i].to_ip,
                        proto: proto(probes[*i].spec.protocol),
                        port: probes[*i].spec.port,
                    })
                    .collect();
                (from.clone(), v)
            })
            .collect();
        let results = self
            .moat
            .cluster
            .probe(&reqs, PROBE_TIMEOUT, 1)
            .map_err(|e| Error::Backend(format!("{e:#}")))?;
        let mut out = vec![false; probes.len()];
        for ((_, idx), r) in by_pod.iter().zip(results) {
            for (i, ok) in idx.iter().zip(r) {
                out[*i] = ok;
            }
        }
        Ok(out)
    }
}
