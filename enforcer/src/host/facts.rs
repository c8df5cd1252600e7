//! What netlink said about the node, kept up to date event by event, and the
//! [`Topology`] it amounts to.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use moat_dataplane::local::{Link, Topology};

use super::decode::{Event, RouteKey, Target};

#[derive(Clone, Debug, PartialEq, Eq)]
struct LinkFacts {
    name: String,
    kind: String,
    master: Option<u32>,
    up: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    links: BTreeMap<u32, LinkFacts>,
    /// Interface → its addresses, each with whether it is global.
    addrs: BTreeMap<u32, BTreeMap<IpAddr, bool>>,
    /// Every main-table host route, as the kernel keys them.
    routes: BTreeSet<(RouteKey, Target)>,
}

/// What applying an event asks of the watcher.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// The kernel may have changed routes without saying so (IPv4 flushes the routes of an
    /// interface that goes down, and those through an address that is removed, silently), or
    /// a removal named something never seen: dump everything again.
    pub resync: bool,
}

impl Facts {
    pub fn apply(&mut self, ev: &Event) -> Effect {
        let mut fx = Effect::default();
        match ev {
            Event::Link {
                index,
                name,
                kind,
                master,
                up,
            } => {
                let new = LinkFacts {
                    name: name.clone(),
                    kind: kind.clone(),
                    master: *master,
                    up: *up,
                };
                if let Some(old) = self.links.insert(*index, new)
                    && old.up
                    && !up
                {
                    fx.resync = true;
                }
            }
            Event::LinkGone(index) => {
                self.links.remove(index);
                self.addrs.remove(index);
                // IPv4 removes routes through a vanished interface without a word.
                self.routes.retain(|(_, t)| t.oif() != Some(*index));
            }
            Event::Addr {
                index,
                addr,
                global,
                gone,
            } => {
                if *gone {
                    if let Some(a) = self.addrs.get_mut(index) {
                        a.remove(addr);
                        if a.is_empty() {
                            self.addrs.remove(index);
                        }
                    }
                    fx.resync = addr.is_ipv4();
                } else {
                    self.addrs.entry(*index).or_default().insert(*addr, *global);
                }
            }
            Event::Route {
                key,
                target,
                gone,
                replace,
            } => {
                if *gone {
                    fx.resync = !self.routes.remove(&(*key, *target));
                } else {
                    if *replace {
                        self.routes.retain(|(k, _)| k != key);
                    }
                    self.routes.insert((*key, *target));
                }
            }
            Event::Done | Event::Error(_) => {}
            Event::Overrun => fx.resync = true,
        }
        fx
    }

    /// The interface a destination is routed to, if one direct route decides it: among the
    /// routes of the lowest metric, all direct through one interface, and no route that
    /// depends on the packet's TOS. Anything else (a gateway winning, two interfaces) is not
    /// a pod's address, which fails closed: the dataplane trusts no interface with it.
    fn routed(routes: &[Target], tos: bool) -> Option<u32> {
        if tos {
            return None;
        }
        let mut oif = None;
        for t in routes {
            match (t, oif) {
                (Target::Direct(i), None) => oif = Some(*i),
                (Target::Direct(i), Some(o)) if *i == o => {}
                _ => return None,
            }
        }
        oif
    }

    pub fn topology(&self) -> Topology {
        let links = self
            .links
            .iter()
            .map(|(i, l)| {
                let link = Link {
                    index: *i,
                    name: l.name.clone(),
                    kind: l.kind.clone(),
                    master: l.master,
                    global_addr: self
                        .addrs
                        .get(i)
                        .is_some_and(|a| a.values().any(|global| *global)),
                };
                (*i, link)
            })
            .collect();
        let mut routes = BTreeMap::new();
        let mut by_dst: BTreeMap<IpAddr, (u32, Vec<Target>, bool)> = BTreeMap::new();
        for (k, t) in &self.routes {
            let e = by_dst
                .entry(k.dst)
                .or_insert((k.priority, Vec::new(), false));
            e.2 |= k.tos != 0;
            if k.priority < e.0 {
                *e = (k.priority, Vec::new(), e.2);
            }
            if k.priority == e.0 {
                e.1.push(*t);
            }
        }
        for (dst, (_, targets, tos)) in by_dst {
            if let Some(i) = Self::routed(&targets, tos)
                && self.links.contains_key(&i)
            {
                routes.insert(dst, i);
            }
        }
        Topology { links, routes }
    }
}
