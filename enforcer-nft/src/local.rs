//! The local pod table as the nft dataplane holds it: which interface is a pod, which
//! (interface, address) pairs are local pod addresses, and what each such pair leads to.
//!
//! ```text
//!  in_if   iif → goto pod_src | goto other_src        (no element: unclassified)
//!  out_if  oif → goto pod_dst | accept                (no element: unclassified)
//!  src4/6  iif . saddr → goto <egress ruleset> | return | goto unknown_pod
//!                                                     (no element: spoofed)
//!  dst4/6  oif . daddr → goto <ingress ruleset> | accept
//!                                                     (no element: unknown pod)
//!  local4/6  every local pod address                  (from another interface: spoofed)
//! ```
//!
//! Derived from a [`Desired`] alone (its `local`, and the endpoint maps `eg4`… naming each
//! isolated address's ruleset), so a delta is the difference of two derivations and the
//! kernel never holds a local entry that the rules beside it don't match.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use moat_dataplane::local::{LocalPods, PodAddr, UnknownPods, named};
use moat_policy::ir::NodeSnapshot;

use crate::desired::Desired;
use crate::render::in_epoch;

/// Chains of the base layout (see `render::base`). Ruleset chains are `i_…`/`e_…`, so
/// none of these can collide with one.
pub const SENDER: &str = "sender";
pub const POD_SRC: &str = "pod_src";
pub const OTHER_SRC: &str = "other_src";
pub const POD_DST: &str = "pod_dst";
/// Count-and-drop chains, each with the named counter of the same name.
pub const SPOOFED: &str = "spoofed";
pub const UNKNOWN_POD: &str = "unknown_pod";
pub const UNCLASSIFIED: &str = "unclassified";

/// What a local table element leads to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Accept,
    /// Back to the base chain (from `sender`, which it jumped to): the next check.
    Return,
    Goto(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalTable {
    pub in_if: BTreeMap<u32, Verdict>,
    pub out_if: BTreeMap<u32, Verdict>,
    pub src4: BTreeMap<(u32, Ipv4Addr), Verdict>,
    pub src6: BTreeMap<(u32, Ipv6Addr), Verdict>,
    pub dst4: BTreeMap<(u32, Ipv4Addr), Verdict>,
    pub dst6: BTreeMap<(u32, Ipv6Addr), Verdict>,
    pub local4: BTreeSet<Ipv4Addr>,
    pub local6: BTreeSet<Ipv6Addr>,
}

impl LocalTable {
    /// The local table for `d` (its `local` with its endpoint maps).
    pub fn of(d: &Desired) -> LocalTable {
        LocalTable::with(&d.local, d)
    }

    /// The local table of `local` beside `d`'s endpoint maps.
    pub fn with(local: &LocalPods, d: &Desired) -> LocalTable {
        let allow = local.unknown == UnknownPods::Allow;
        // Ruleset chains carry `d`'s epoch; the base chains are shared by every epoch.
        let ruleset = |c: &String| in_epoch(c, d.epoch);
        let mut t = LocalTable::default();
        // An interface in both sets is a pod: the stricter reading.
        for i in &local.other_ifaces {
            t.in_if.insert(*i, Verdict::Goto(OTHER_SRC.into()));
            t.out_if.insert(*i, Verdict::Accept);
        }
        for i in &local.pod_ifaces {
            t.in_if.insert(*i, Verdict::Goto(POD_SRC.into()));
            t.out_if.insert(*i, Verdict::Goto(POD_DST.into()));
        }
        for ((iface, a), state) in &local.addrs {
            let (eg, ing) = match a {
                IpAddr::V4(x) => (d.eg4.get(x), d.ing4.get(x)),
                IpAddr::V6(x) => (d.eg6.get(x), d.ing6.get(x)),
            };
            let (src, dst) = match state {
                PodAddr::Known(_) => (
                    Some(eg.map_or(Verdict::Return, |c| Verdict::Goto(ruleset(c)))),
                    Some(ing.map_or(Verdict::Accept, |c| Verdict::Goto(ruleset(c)))),
                ),
                PodAddr::Unknown if allow => (Some(Verdict::Return), Some(Verdict::Accept)),
                // No receiver element: `pod_dst` drops what it doesn't find as unknown.
                PodAddr::Unknown => (Some(Verdict::Goto(UNKNOWN_POD.into())), None),
            };
            match a {
                IpAddr::V4(x) => {
                    t.local4.insert(*x);
                    t.src4.extend(src.map(|v| ((*iface, *x), v)));
                    t.dst4.extend(dst.map(|v| ((*iface, *x), v)));
                }
                IpAddr::V6(x) => {
                    t.local6.insert(*x);
                    t.src6.extend(src.map(|v| ((*iface, *x), v)));
                    t.dst6.extend(dst.map(|v| ((*iface, *x), v)));
                }
            }
        }
        t
    }

    pub fn len(&self) -> usize {
        self.in_if.len()
            + self.out_if.len()
            + self.src4.len()
            + self.src6.len()
            + self.dst4.len()
            + self.dst6.len()
            + self.local4.len()
            + self.local6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How many elements the local table of `local` holds, whatever the rules beside it:
/// `LocalTable::of(d).len()` for every `d` with `d.local == *local`.
pub fn elements(local: &LocalPods) -> usize {
    let ifaces = local.pod_ifaces.union(&local.other_ifaces).count();
    let receivers = local
        .addrs
        .values()
        .filter(|s| matches!(s, PodAddr::Known(_)) || local.unknown == UnknownPods::Allow)
        .count();
    let distinct: BTreeSet<IpAddr> = local.addrs.keys().map(|(_, a)| *a).collect();
    2 * ifaces + local.addrs.len() + receivers + distinct.len()
}

/// `local` as `snap` can vouch for it: an address is `Known` only as the endpoint the
/// snapshot names for it (the agent binds against the same snapshot, so this changes
/// nothing unless the two disagree — and then the address is no one's, not the wrong pod's).
pub fn vouched(local: &LocalPods, snap: &NodeSnapshot) -> LocalPods {
    let named = named(Some(snap));
    let mut out = local.clone();
    for ((_, a), state) in out.addrs.iter_mut() {
        if let PodAddr::Known(e) = *state
            && named.get(a).copied().flatten().map(|n| n.0) != Some(e)
        {
            *state = PodAddr::Unknown;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use moat_policy::ir::EndpointId;

    use super::*;

    #[test]
    fn the_element_count_is_the_table_s() {
        let e = EndpointId;
        for unknown in [UnknownPods::Deny, UnknownPods::Allow] {
            let mut l = LocalPods {
                unknown,
                ..Default::default()
            };
            l.pod_ifaces.extend([3, 4, 5]);
            l.other_ifaces.extend([1, 2, 5]);
            let a4 = |x: u8| IpAddr::V4(Ipv4Addr::new(10, 0, 0, x));
            l.addrs.insert((3, a4(1)), PodAddr::Known(e(1)));
            l.addrs.insert((4, a4(1)), PodAddr::Unknown);
            l.addrs.insert((4, a4(2)), PodAddr::Unknown);
            l.addrs
                .insert((5, "fd00::1".parse().unwrap()), PodAddr::Known(e(2)));
            let d = Desired {
                local: l.clone(),
                ..Default::default()
            };
            let t = LocalTable::of(&d);
            assert_eq!(t.len(), elements(&l), "{unknown:?}");
            assert_eq!(t.in_if[&5], Verdict::Goto(POD_SRC.into()));
            assert_eq!(t.out_if[&5], Verdict::Goto(POD_DST.into()));
        }
    }
}
