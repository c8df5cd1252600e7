//! The conformance cluster on packets: 3 nodes, a case's pods spread across them (x/a … z/c,
//! or those of its `cluster:` section), Moat enforcing with a real dataplane, and the probe
//! matrix sent as real TCP, UDP and SCTP.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use moat_conformance::case::Protocol;
use moat_conformance::cluster::{self, Family, NODES, Plan};
use moat_conformance::layout::{self, Layout};
use moat_conformance::{Backend, Error, Probe};
use moat_policy::model::K8sObject;

use crate::agent::{ProbeReq, Proto};
use crate::cluster::{PodSpec, Spec};
use crate::container::{Containers, Seccomp};
use crate::moat::Moat;

const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
const APPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// A backend on netns clusters: one per layout of the cases it meets (pods, their nodes and
/// addresses, ports served), each built the first time a case needs it and kept for the
/// next, so cases that share a `cluster:` section share one cluster as live updates.
pub struct PacketBackend {
    /// The cluster of the case at hand.
    pub moat: Moat,
    shape: Shape,
    /// The other clusters built so far, idle until a case of their layout comes.
    parked: Vec<(Shape, Moat)>,
    plan: Plan,
    backend: String,
    /// With containers: the image and profiles every further cluster runs under too.
    image: Option<(String, Seccomp)>,
}

/// What a netns cluster is built from: two layouts with the same shape share a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Shape {
    pods: Vec<(String, usize, Ipv4Addr, Ipv6Addr)>,
    ports: [Vec<u16>; 3],
}

impl Shape {
    fn of(s: &Spec) -> Shape {
        Shape {
            pods: s
                .pods
                .iter()
                .map(|p| (p.key.clone(), p.node, p.v4, p.v6))
                .collect(),
            ports: [s.tcp.clone(), s.udp.clone(), s.sctp.clone()],
        }
    }
}

/// The netns layout of the x/y/z conformance cluster for address slot `id` (dual-stack).
pub fn spec(id: u8) -> Spec {
    spec_of(&layout::xyz(), id)
}

/// The netns layout of `layout`'s pods for address slot `id`: dual-stack, so one cluster
/// serves both families; every pod serves every port of `layout.serves`.
pub fn spec_of(layout: &Layout, id: u8) -> Spec {
    let v4 = Plan {
        family: Family::Ipv4,
        id,
    };
    let v6 = Plan {
        family: Family::Ipv6,
        id,
    };
    let pods = layout
        .pods
        .iter()
        .map(|p| {
            let (IpAddr::V4(a), IpAddr::V6(b)) = (p.ip(v4), p.ip(v6)) else {
                unreachable!("a plan's family decides its addresses")
            };
            PodSpec {
                key: p.key.clone(),
                node: p.node(),
                v4: a,
                v6: b,
            }
        })
        .collect();
    let ports = |proto: Protocol| -> Vec<u16> {
        let mut v: Vec<u16> = layout
            .serves
            .iter()
            .filter(|s| s.protocol == proto)
            .map(|s| s.port)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    Spec {
        id,
        nodes: NODES,
        pods,
        tcp: ports(Protocol::Tcp),
        udp: ports(Protocol::Udp),
        sctp: ports(Protocol::Sctp),
    }
}

/// Names the namespaces of every cluster but a backend's first (see
/// [`Cluster::create_tagged`](crate::cluster::Cluster::create_tagged)): unique in the process.
fn next_tag() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    format!(
        "c{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

impl PacketBackend {
    /// Starts on the x/y/z cluster.
    pub fn start(plan: Plan, backend: &str) -> Result<Self, Error> {
        Self::start_in(plan, backend, None)
    }

    /// [`start`](Self::start), the server and enforcers containers of an image when
    /// `containers` is given.
    pub fn start_in(
        plan: Plan,
        backend: &str,
        containers: Option<Containers>,
    ) -> Result<Self, Error> {
        Self::start_for(plan, backend, containers, &layout::xyz())
    }

    /// [`start_in`](Self::start_in), on the cluster of `layout` (say, the first case's).
    pub fn start_for(
        plan: Plan,
        backend: &str,
        containers: Option<Containers>,
        layout: &Layout,
    ) -> Result<Self, Error> {
        let image = containers.as_ref().map(|c| (c.image.clone(), c.seccomp));
        let spec = spec_of(layout, plan.id);
        let shape = Shape::of(&spec);
        let moat = deploy(spec, backend, containers, "")?;
        Ok(Self {
            moat,
            shape,
            parked: Vec::new(),
            plan,
            backend: backend.to_string(),
            image,
        })
    }

    /// How many netns clusters this backend has built.
    pub fn clusters(&self) -> usize {
        1 + self.parked.len()
    }
}

fn deploy(
    spec: Spec,
    backend: &str,
    containers: Option<Containers>,
    tag: &str,
) -> Result<Moat, Error> {
    let names = (0..NODES).map(cluster::node_name).collect();
    Moat::start_tagged(spec, names, backend, containers, tag)
        .map_err(|e| Error::Backend(format!("{e:#}")))
}

fn proto(p: Protocol) -> Proto {
    match p {
        Protocol::Tcp => Proto::Tcp,
        Protocol::Udp => Proto::Udp,
        Protocol::Sctp => Proto::Sctp,
    }
}

impl Backend for PacketBackend {
    fn supports_cluster_section(&self) -> bool {
        true
    }

    fn enter(&mut self, layout: &Layout) -> Result<(), Error> {
        let spec = spec_of(layout, self.plan.id);
        let shape = Shape::of(&spec);
        if shape == self.shape {
            return Ok(());
        }
        let (shape, moat) = match self.parked.iter().position(|(s, _)| *s == shape) {
            Some(i) => self.parked.swap_remove(i),
            None => {
                let containers = match &self.image {
                    Some((image, seccomp)) => Some(
                        Containers::new(image, *seccomp)
                            .map_err(|e| Error::Backend(format!("{e:#}")))?,
                    ),
                    None => None,
                };
                let moat = deploy(spec, &self.backend, containers, &next_tag())?;
                (shape, moat)
            }
        };
        let old_shape = std::mem::replace(&mut self.shape, shape);
        let old = std::mem::replace(&mut self.moat, moat);
        self.parked.push((old_shape, old));
        Ok(())
    }

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
