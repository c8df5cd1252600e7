//! Local pods as both dataplanes enforce them: a pod is an **interface**, its addresses are
//! the host routes a CNI installs toward it, and each address is **bound** to the pod
//! (endpoint) the enforced snapshot names for it.
//!
//! ```text
//!  links + host routes (netlink) ──► Topology ──► Interfaces { pod: ifindex → addresses, other }
//!                                                        │
//!  enforced snapshot: address → endpoint ───────────────►│ Bindings::reconcile
//!                                                        ▼
//!                        LocalPods: (ifindex, address) → Known(endpoint) | Unknown
//! ```
//!
//! Why bind: an address alone does not say which pod holds it. When a pod goes and a new
//! pod gets its address on another interface, a snapshot that still names the old pod must
//! not lend the new pod the old pod's rules. So an address is bound to (interface, endpoint)
//! the first time both are seen; if its route moves to another interface it is *unknown*
//! (denied) until a snapshot names a different endpoint for it — the new pod — or a new
//! sandbox of the same pod (the kubelet recreated its network interface), and only then is
//! it bound again. `Node.spec.podCIDRs` is never consulted: Calico IPAM, Cilium's cluster
//! pool and the AWS VPC CNI don't follow it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use moat_policy::ir::{EndpointId, NodeSnapshot};

/// `--pod-interfaces`: which interfaces are pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodInterfaces {
    /// A point-to-point pod link as CNIs make them — a `veth` or `netkit` device that holds no
    /// global address of its own and has no master (a pod veth enslaved to a bridge is
    /// reported, not treated as a pod: see [`Interfaces::bridged`]). A pod's host routes
    /// (/32, /128) point at it. Classified from its creation, before any route exists, so a
    /// new pod's interface is strict from its first packet.
    Auto,
    /// Interface names matching any of these patterns (`*` matches any run of characters),
    /// e.g. `cali*`, `lxc*`: pods whatever their kind; every other interface is not one.
    Names(Vec<String>),
}

impl std::str::FromStr for PodInterfaces {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(PodInterfaces::Auto);
        }
        let pats: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect();
        if pats.is_empty() {
            return Err("expected `auto` or a comma-separated list of interface name patterns (e.g. `cali*,lxc*`)".into());
        }
        for p in &pats {
            if p.len() > 15 && !p.contains('*') {
                return Err(format!(
                    "`{p}` is longer than an interface name can be (15 bytes)"
                ));
            }
        }
        Ok(PodInterfaces::Names(pats))
    }
}

/// One network interface of the node's namespace, as netlink reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: `veth`, `netkit`, `bridge`, `vxlan`, … (empty for physical devices).
    pub kind: String,
    /// The bridge (or bond) this interface is enslaved to.
    pub master: Option<u32>,
    /// It holds a routable address of its own (an uplink does; a pod's host-side veth
    /// doesn't): any address outside 169.254/16 and fe80::/10, whatever scope the kernel
    /// gives it (`ip addr add 169.254.1.1/32` is scope global, and some CNIs put exactly
    /// that gateway address on every pod veth).
    pub global_addr: bool,
}

/// What the node looks like: its links and the host routes pointing at them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    pub links: BTreeMap<u32, Link>,
    /// Host routes (IPv4 /32, IPv6 /128) of the main table, without a gateway: address →
    /// the interface it is routed to.
    pub routes: BTreeMap<IpAddr, u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pod,
    Other,
}

fn glob(pat: &str, s: &str) -> bool {
    match pat.split_once('*') {
        None => pat == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
        }
    }
}

impl PodInterfaces {
    /// Whether `link` is a pod interface. Pure, so the eBPF dataplane's attacher (which must
    /// cover a new link within its first packets) and the topology agree.
    pub fn kind(&self, link: &Link) -> Kind {
        let pod = match self {
            PodInterfaces::Auto => {
                matches!(link.kind.as_str(), "veth" | "netkit")
                    && !link.global_addr
                    && link.master.is_none()
            }
            PodInterfaces::Names(pats) => pats.iter().any(|p| glob(p, &link.name)),
        };
        if pod { Kind::Pod } else { Kind::Other }
    }
}

/// The node's interfaces, classified.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interfaces {
    /// Pod interfaces → the addresses routed to them.
    pub pods: BTreeMap<u32, BTreeSet<IpAddr>>,
    /// Every other interface the node has (uplinks, tunnels, bridges, loopback).
    pub other: BTreeSet<u32>,
    /// Pod-like interfaces enslaved to a bridge (a bridge CNI: pods share one L3 interface,
    /// so a packet's interface can't name its sender). Source validation can't work there;
    /// reported, never silently weakened.
    pub bridged: Vec<String>,
}

impl Interfaces {
    pub fn classify(topo: &Topology, mode: &PodInterfaces) -> Interfaces {
        let mut out = Interfaces::default();
        for l in topo.links.values() {
            match mode.kind(l) {
                Kind::Pod => {
                    out.pods.insert(l.index, BTreeSet::new());
                }
                Kind::Other => {
                    out.other.insert(l.index);
                    if *mode == PodInterfaces::Auto
                        && matches!(l.kind.as_str(), "veth" | "netkit")
                        && !l.global_addr
                        && l.master
                            .is_some_and(|m| topo.links.get(&m).is_some_and(|b| b.kind == "bridge"))
                    {
                        out.bridged.push(l.name.clone());
                    }
                }
            }
        }
        for (a, i) in &topo.routes {
            if let Some(addrs) = out.pods.get_mut(i) {
                addrs.insert(*a);
            }
        }
        out
    }

    /// The interface an address is routed to, if it is a pod's.
    pub fn iface_of(&self, a: IpAddr) -> Option<u32> {
        self.pods
            .iter()
            .find_map(|(i, addrs)| addrs.contains(&a).then_some(*i))
    }
}

/// What the dataplane does with a local pod address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PodAddr {
    /// Bound to this endpoint of the enforced snapshot: its rules apply.
    Known(EndpointId),
    /// Routed to a pod interface, but the enforced snapshot doesn't name it for the pod
    /// there (yet): denied under `--unknown-pods deny`.
    Unknown,
}

/// `--unknown-pods`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownPods {
    /// Isolated from its first packet until a snapshot names it (Kubernetes asks that a pod
    /// a policy will select is isolated before it starts; allow rules may lag).
    #[default]
    Deny,
    /// Open until a snapshot names it (the behaviour of engines without this check).
    Allow,
}

impl std::str::FromStr for UnknownPods {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deny" => Ok(UnknownPods::Deny),
            "allow" => Ok(UnknownPods::Allow),
            _ => Err(format!("expected `deny` or `allow`, not `{s}`")),
        }
    }
}

/// Every local pod address, per interface: what a dataplane needs for source validation and
/// for denying unknown pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalPods {
    pub addrs: BTreeMap<(u32, IpAddr), PodAddr>,
    pub pod_ifaces: BTreeSet<u32>,
    pub other_ifaces: BTreeSet<u32>,
    pub unknown: UnknownPods,
    /// Why source validation is weaker than it should be on this node, if it is.
    pub unsupported: Option<String>,
}

impl LocalPods {
    /// What `addr` on interface `iface` is.
    pub fn get(&self, iface: u32, addr: IpAddr) -> Option<PodAddr> {
        self.addrs.get(&(iface, addr)).copied()
    }

    /// Counts per state, for logs and status.
    pub fn counts(&self) -> (usize, usize) {
        let known = self
            .addrs
            .values()
            .filter(|a| matches!(a, PodAddr::Known(_)))
            .count();
        (known, self.addrs.len() - known)
    }
}

/// Where an address was bound: the interface and the endpoint it had when first seen together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Binding {
    pub iface: u32,
    pub endpoint: EndpointId,
    /// The endpoint's sandbox generation when bound (0: unknown).
    #[serde(default)]
    pub sandbox: u64,
}

/// Address → binding. Persisted by the agent, so a restart does not forget that an
/// address moved while it was down.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bindings {
    pub by_addr: BTreeMap<IpAddr, Binding>,
}

/// Address → the endpoint the snapshot names for it, with its sandbox generation; `None`
/// when two endpoints claim it (then neither is trusted with it).
pub fn named(snap: Option<&NodeSnapshot>) -> BTreeMap<IpAddr, Option<(EndpointId, u64)>> {
    let mut out: BTreeMap<IpAddr, Option<(EndpointId, u64)>> = BTreeMap::new();
    for e in snap.iter().flat_map(|s| &s.endpoints) {
        for a in &e.addrs {
            out.entry(*a)
                .and_modify(|v| {
                    if v.map(|x| x.0) != Some(e.id) {
                        *v = None;
                    }
                })
                .or_insert(Some((e.id, e.sandbox)));
        }
    }
    out
}

impl Bindings {
    /// Brings the bindings up to date with the interfaces and the snapshot about to be (or
    /// being) enforced, and returns every local pod address's state.
    pub fn reconcile(
        &mut self,
        ifaces: &Interfaces,
        snap: Option<&NodeSnapshot>,
        unknown: UnknownPods,
    ) -> LocalPods {
        let named = named(snap);
        let routed: BTreeMap<IpAddr, u32> = ifaces
            .pods
            .iter()
            .flat_map(|(i, addrs)| addrs.iter().map(move |a| (*a, *i)))
            .collect();
        let mut out = LocalPods {
            pod_ifaces: ifaces.pods.keys().copied().collect(),
            other_ifaces: ifaces.other.clone(),
            unknown,
            unsupported: (!ifaces.bridged.is_empty()).then(|| {
                format!(
                    "bridge-based CNI: pod interfaces {} share a bridge, so a packet's interface can't name its sender; source validation and unknown-pod denial are not enforced for them",
                    ifaces.bridged.join(", ")
                )
            }),
            ..Default::default()
        };
        // Bindings of addresses the snapshot no longer names (or names twice) are forgotten:
        // the next pod to hold such an address binds afresh once a snapshot names it. A
        // binding to another endpoint than the one named now is kept until the route moves,
        // so the old pod's interface can't pass for the new pod.
        self.by_addr
            .retain(|a, _| matches!(named.get(a), Some(Some(_))));
        for (a, iface) in &routed {
            let bind = |e: EndpointId, sandbox: u64| Binding {
                iface: *iface,
                endpoint: e,
                sandbox,
            };
            let state = match (
                self.by_addr.get(a).copied(),
                named.get(a).copied().flatten(),
            ) {
                (_, None) => PodAddr::Unknown,
                (None, Some((e, sb))) => {
                    self.by_addr.insert(*a, bind(e, sb));
                    PodAddr::Known(e)
                }
                (Some(b), Some((e, sb))) if b.endpoint == e => {
                    if b.iface == *iface {
                        // The same pod where it was bound (its sandbox generation may have
                        // become known since).
                        self.by_addr.insert(*a, bind(e, sb));
                        PodAddr::Known(e)
                    } else if sb != 0 && sb != b.sandbox {
                        // The same pod on a new interface, and the API says its sandbox was
                        // recreated: its own new interface.
                        self.by_addr.insert(*a, bind(e, sb));
                        PodAddr::Known(e)
                    } else {
                        // Same pod and sandbox named, another interface: a new pod on a
                        // reused address the snapshot doesn't know yet. Never the old rules.
                        PodAddr::Unknown
                    }
                }
                (Some(b), Some((e, sb))) => {
                    if b.iface == *iface {
                        // The snapshot names a new pod while the address still routes to
                        // the old pod's interface.
                        PodAddr::Unknown
                    } else {
                        self.by_addr.insert(*a, bind(e, sb));
                        PodAddr::Known(e)
                    }
                }
            };
            out.addrs.insert((*iface, *a), state);
        }
        out
    }
}

#[cfg(test)]
mod tests;
