//! Local pods as the program reads them (layout 5 on): `PODS` ((interface, address) → Known
//! or Unknown), `LOCAL_ADDRS` (every local pod address) and `IFACES` (classified interfaces
//! and the address a pod's egress rules are found under), made from a [`LocalPods`].
//!
//! They switch with a version by the order of writes (docs/design/fail-closed.md,
//! Atomicity): whatever makes an address or interface *less* trusted is written before the
//! selector flips, whatever makes it *more* trusted after, so no packet sees an address
//! trusted under the other version's rules.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use moat_dataplane::local::{LocalPods, PodAddr, UnknownPods};
use moat_ebpf_common::{
    FAMILY_V4, FAMILY_V6, IFACE_OTHER, IFACE_POD, Iface, LocalKey, POD_KNOWN, POD_UNKNOWN_ALLOW,
    POD_UNKNOWN_DENY, PodKey,
};

/// The three maps' content.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodTables {
    pub pods: BTreeMap<PodKey, u8>,
    pub addrs: BTreeSet<LocalKey>,
    pub ifaces: BTreeMap<u32, Iface>,
}

/// Writes to the three maps: puts and deletes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodWrites {
    pub pods: (Vec<(PodKey, u8)>, Vec<PodKey>),
    pub addrs: (Vec<LocalKey>, Vec<LocalKey>),
    pub ifaces: (Vec<(u32, Iface)>, Vec<u32>),
}

impl PodWrites {
    pub fn is_empty(&self) -> bool {
        self.pods.0.is_empty()
            && self.pods.1.is_empty()
            && self.addrs.0.is_empty()
            && self.addrs.1.is_empty()
            && self.ifaces.0.is_empty()
            && self.ifaces.1.is_empty()
    }
}

fn family_bytes(a: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (FAMILY_V4, out)
        }
        IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
    }
}

/// How much an entry lets through: an unknown pod under `deny` nothing, a known one what its
/// rules allow, an unknown one under `allow` everything. (Not the values' order: known → open
/// unknown is a step up, written after the flip.)
fn openness(v: u8) -> u8 {
    match v {
        POD_UNKNOWN_DENY => 0,
        POD_KNOWN => 1,
        POD_UNKNOWN_ALLOW => 2,
        // No other value is written; rank it as the most open, so it is never written early.
        _ => u8::MAX,
    }
}

impl PodTables {
    pub fn of(local: &LocalPods) -> PodTables {
        let mut t = PodTables::default();
        for i in &local.other_ifaces {
            t.ifaces.insert(
                *i,
                Iface {
                    kind: IFACE_OTHER,
                    ..Default::default()
                },
            );
        }
        for i in &local.pod_ifaces {
            t.ifaces.insert(
                *i,
                Iface {
                    kind: IFACE_POD,
                    ..Default::default()
                },
            );
        }
        for ((ifindex, a), state) in &local.addrs {
            let (family, addr) = family_bytes(*a);
            let v = match (state, local.unknown) {
                (PodAddr::Known(_), _) => POD_KNOWN,
                (PodAddr::Unknown, UnknownPods::Deny) => POD_UNKNOWN_DENY,
                (PodAddr::Unknown, UnknownPods::Allow) => POD_UNKNOWN_ALLOW,
            };
            t.pods.insert(
                PodKey {
                    ifindex: *ifindex,
                    family,
                    _pad: [0; 3],
                    addr,
                },
                v,
            );
            t.addrs.insert(LocalKey {
                family,
                _pad: [0; 3],
                addr,
            });
            // The sender's identity for its egress rules: its first known address per family
            // (a pod's addresses of one family share its endpoint and so its rules).
            if let (PodAddr::Known(_), Some(iface)) = (state, t.ifaces.get_mut(ifindex)) {
                if iface.kind != IFACE_POD {
                    continue;
                }
                let (has, slot) = if family == FAMILY_V4 {
                    (&mut iface.has4, &mut iface.addr4)
                } else {
                    (&mut iface.has6, &mut iface.addr6)
                };
                if *has == 0 {
                    *has = 1;
                    *slot = addr;
                }
            }
        }
        t
    }

    /// The writes from `self` to `new`, split into those to make before a version's flip
    /// (less trust) and after it (more trust).
    pub fn diff(&self, new: &PodTables) -> (PodWrites, PodWrites) {
        let (mut before, mut after) = (PodWrites::default(), PodWrites::default());
        for (k, v) in &new.pods {
            match self.pods.get(k) {
                Some(old) if old == v => {}
                Some(old) if openness(*v) < openness(*old) => before.pods.0.push((*k, *v)),
                _ => after.pods.0.push((*k, *v)),
            }
        }
        for k in self.pods.keys() {
            if !new.pods.contains_key(k) {
                before.pods.1.push(*k);
            }
        }
        // A local pod address arriving from elsewhere is spoofed: knowing one more is less
        // trust, forgetting one is more.
        before.addrs.0 = new.addrs.difference(&self.addrs).copied().collect();
        after.addrs.1 = self.addrs.difference(&new.addrs).copied().collect();
        for (i, v) in &new.ifaces {
            match self.ifaces.get(i) {
                Some(o) if o == v => {}
                // A pod interface naming its pod by another address: a stale name after the
                // flip may be an endpoint the new rules lack (no rules: not isolated), so a
                // new name goes in before it. Under the old rules the new name is the same
                // pod's, or its packets are still denied as unknown. A name that goes away
                // waits for after the flip: its addresses are denied before it.
                Some(o) if o.kind == IFACE_POD && v.kind == IFACE_POD => {
                    let mut early = *o;
                    if v.has4 != 0 {
                        (early.has4, early.addr4) = (1, v.addr4);
                    }
                    if v.has6 != 0 {
                        (early.has6, early.addr6) = (1, v.addr6);
                    }
                    if early != *o {
                        before.ifaces.0.push((*i, early));
                    }
                    if early != *v {
                        after.ifaces.0.push((*i, *v));
                    }
                }
                _ => after.ifaces.0.push((*i, *v)),
            }
        }
        for i in self.ifaces.keys() {
            if !new.ifaces.contains_key(i) {
                before.ifaces.1.push(*i);
            }
        }
        (before, after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_policy::ir::EndpointId;

    fn lp(addrs: &[(u32, &str, Option<u64>)], unknown: UnknownPods) -> LocalPods {
        let mut l = LocalPods {
            unknown,
            ..Default::default()
        };
        for (i, a, e) in addrs {
            l.pod_ifaces.insert(*i);
            l.addrs.insert(
                (*i, a.parse().unwrap()),
                e.map_or(PodAddr::Unknown, |e| PodAddr::Known(EndpointId(e))),
            );
        }
        l.other_ifaces.insert(1);
        l
    }

    #[test]
    fn trust_goes_up_after_the_flip_and_down_before_it() {
        let old = PodTables::of(&lp(
            &[(5, "10.0.0.1", Some(1)), (6, "10.0.0.2", None)],
            UnknownPods::Deny,
        ));
        // .1 moves to a new interface (unknown there), .2 becomes known, .3 appears.
        let new = PodTables::of(&lp(
            &[
                (7, "10.0.0.1", None),
                (6, "10.0.0.2", Some(2)),
                (6, "10.0.0.3", Some(2)),
            ],
            UnknownPods::Deny,
        ));
        let (before, after) = old.diff(&new);
        let key = |i: u32, a: [u8; 4]| {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&a);
            PodKey {
                ifindex: i,
                family: FAMILY_V4,
                _pad: [0; 3],
                addr,
            }
        };
        assert_eq!(before.pods.1, vec![key(5, [10, 0, 0, 1])]);
        assert!(before.pods.0.is_empty());
        let mut up = after.pods.0.clone();
        up.sort();
        assert_eq!(
            up,
            vec![
                (key(6, [10, 0, 0, 2]), POD_KNOWN),
                (key(6, [10, 0, 0, 3]), POD_KNOWN),
                (key(7, [10, 0, 0, 1]), POD_UNKNOWN_DENY),
            ]
        );
        assert_eq!(before.ifaces.1, vec![5]);
        assert_eq!(
            before.addrs.0.len(),
            1,
            "10.0.0.3 is refused from elsewhere first"
        );
        // Interface 6 now names its pod by its first known address, before the flip.
        let six = before.ifaces.0.iter().find(|(i, _)| *i == 6).unwrap().1;
        assert_eq!((six.has4, six.addr4[3]), (1, 2));
        assert!(!after.ifaces.0.iter().any(|(i, _)| *i == 6));
        // Its name moving to another address goes in before the flip too (after it, the
        // stale name would be an endpoint the new rules lack); a name going away, after.
        let deny = |l: &[(u32, &str, Option<u64>)]| PodTables::of(&lp(l, UnknownPods::Deny));
        let two = deny(&[(6, "10.0.0.2", Some(2)), (6, "10.0.0.3", Some(2))]);
        let (before, after) = two.diff(&deny(&[(6, "10.0.0.2", None), (6, "10.0.0.3", Some(2))]));
        let six = before.ifaces.0.iter().find(|(i, _)| *i == 6).unwrap().1;
        assert_eq!((six.has4, six.addr4[3]), (1, 3));
        assert!(after.ifaces.0.is_empty());
        let (before, after) = two.diff(&deny(&[(6, "10.0.0.2", None), (6, "10.0.0.3", None)]));
        assert!(before.ifaces.0.is_empty());
        assert_eq!(after.ifaces.0[0].1.has4, 0);
        // Under `--unknown-pods allow`, known → unknown opens the pod (no rules): a step up,
        // after the flip; unknown → known is the step down, before it.
        let allow = |l: &[(u32, &str, Option<u64>)]| PodTables::of(&lp(l, UnknownPods::Allow));
        let known = allow(&[(6, "10.0.0.2", Some(2))]);
        let open = allow(&[(6, "10.0.0.2", None)]);
        let (before, after) = known.diff(&open);
        assert!(before.pods.0.is_empty());
        assert_eq!(
            after.pods.0,
            vec![(key(6, [10, 0, 0, 2]), POD_UNKNOWN_ALLOW)]
        );
        let (before, after) = open.diff(&known);
        assert_eq!(before.pods.0, vec![(key(6, [10, 0, 0, 2]), POD_KNOWN)]);
        assert!(after.pods.0.is_empty());
        // Known → unknown is a step down, written before the flip.
        let (before, _) = new.diff(&PodTables::of(&lp(
            &[(6, "10.0.0.2", None), (6, "10.0.0.3", Some(2))],
            UnknownPods::Deny,
        )));
        assert!(
            before
                .pods
                .0
                .contains(&(key(6, [10, 0, 0, 2]), POD_UNKNOWN_DENY))
        );
    }
}
