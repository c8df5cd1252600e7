//! A snapshot as nftables state: what the table must contain, computed without touching
//! the kernel.
//!
//! Per-packet work must not grow with the number of policies, so rules are never laid out
//! one after another. Instead:
//!
//! * every address is mapped to a **class**: the set of address groups containing it
//!   (like Cilium's identities). Addresses in the same groups share a class, so a class map
//!   (`ipv4_addr : mark`, intervals) has about one entry per pod and per CIDR edge;
//! * every distinct rule list of a local endpoint (per direction) is a **ruleset**, a chain
//!   doing a fixed number of set lookups: any-peer ports, peer class with any port, peer class
//!   with ports, and (egress) named ports as address·protocol·port;
//! * endpoint addresses jump to their ruleset through verdict maps; endpoints no policy
//!   isolates are in no map and cost one failed lookup.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use moat_policy::ir::digest::Digest;
use moat_policy::ir::{GroupId, Members, NodeSnapshot, Peers, Ports, Rule, RuleId};

/// One ruleset chain's content.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub egress: bool,
    /// Some rule allows every peer on every port.
    pub any: bool,
    /// Any peer, these ports: (protocol, first, last), disjoint per protocol.
    pub ap: BTreeSet<(u8, u16, u16)>,
    /// Peer classes allowed on every port.
    pub aa: BTreeSet<u32>,
    /// Peer class, protocol, port range; disjoint per (class, protocol); none for classes in `aa`.
    pub gp: BTreeSet<(u32, u8, u16, u16)>,
    /// Egress named ports: destination address, protocol, port.
    pub n4: BTreeSet<(Ipv4Addr, u8, u16)>,
    pub n6: BTreeSet<(Ipv6Addr, u8, u16)>,
}

impl Ruleset {
    pub fn elements(&self) -> usize {
        self.ap.len() + self.aa.len() + self.gp.len() + self.n4.len() + self.n6.len()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub version: u64,
    pub digest: Option<Digest>,
    /// Which class numbering the kernel's table uses: new with every full replacement, kept
    /// by deltas. A delta only commits onto the numbering it was computed for.
    pub epoch: u32,
    /// Inclusive address interval → class.
    pub class4: BTreeMap<(Ipv4Addr, Ipv4Addr), u32>,
    pub class6: BTreeMap<(Ipv6Addr, Ipv6Addr), u32>,
    /// Chain name → content.
    pub rulesets: BTreeMap<String, Ruleset>,
    /// Local endpoint address → ruleset chain, per direction and family.
    pub ing4: BTreeMap<Ipv4Addr, String>,
    pub ing6: BTreeMap<Ipv6Addr, String>,
    pub eg4: BTreeMap<Ipv4Addr, String>,
    pub eg6: BTreeMap<Ipv6Addr, String>,
}

impl Desired {
    /// Elements the table holds (for capacity checks and reports).
    pub fn elements(&self) -> usize {
        self.class4.len()
            + self.class6.len()
            + self.ing4.len()
            + self.ing6.len()
            + self.eg4.len()
            + self.eg6.len()
            + self.rulesets.values().map(Ruleset::elements).sum::<usize>()
    }
}

/// Stable class numbers across applies, so a small change is a small diff.
#[derive(Default)]
pub struct Classes {
    ids: HashMap<Vec<GroupId>, u32>,
    free: Vec<u32>,
    next: u32,
}

impl Classes {
    fn id(&mut self, groups: &[GroupId]) -> u32 {
        if let Some(id) = self.ids.get(groups) {
            return *id;
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.ids.insert(groups.to_vec(), id);
        id
    }

    /// Frees the numbers of classes no longer in use.
    fn retain(&mut self, live: &BTreeSet<Vec<GroupId>>) {
        let dead: Vec<_> = self
            .ids
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        for k in dead {
            if let Some(id) = self.ids.remove(&k) {
                self.free.push(id);
            }
        }
    }
}

fn v4(a: IpAddr) -> Option<u128> {
    match a {
        IpAddr::V4(a) => Some(u128::from(u32::from(a))),
        IpAddr::V6(_) => None,
    }
}

fn v6(a: IpAddr) -> Option<u128> {
    match a {
        IpAddr::V6(a) => Some(u128::from(a)),
        IpAddr::V4(_) => None,
    }
}

/// The intervals one group covers in one family (`to` picks the family).
fn intervals(members: &Members, to: fn(IpAddr) -> Option<u128>) -> Vec<(u128, u128)> {
    match members {
        Members::Addrs(a) => a.iter().filter_map(|x| to(*x)).map(|x| (x, x)).collect(),
        Members::AddrPorts(_) => Vec::new(),
        Members::Block { cidr, except } => {
            let (lo, hi) = cidr.range();
            let (Some(lo), Some(hi)) = (to(lo), to(hi)) else {
                return Vec::new();
            };
            let mut holes: Vec<(u128, u128)> = except
                .iter()
                .filter_map(|e| {
                    let (a, b) = e.range();
                    Some((to(a)?, to(b)?))
                })
                .collect();
            holes.sort_unstable();
            let mut out = Vec::new();
            let mut cur = lo;
            for (a, b) in holes {
                if b < cur {
                    continue;
                }
                if a > cur {
                    out.push((cur, a - 1));
                }
                if b == u128::MAX {
                    return out;
                }
                cur = cur.max(b + 1);
            }
            if cur <= hi {
                out.push((cur, hi));
            }
            out
        }
    }
}

/// Splits the address space of one family into segments with a constant set of groups.
fn segments(
    snap: &NodeSnapshot,
    to: fn(IpAddr) -> Option<u128>,
) -> Vec<(u128, u128, Vec<GroupId>)> {
    // Boundary events: +group at start, -group after end.
    // An interval reaching the top of the space never ends.
    let mut events: Vec<(u128, bool, GroupId)> = Vec::new();
    for g in &snap.groups {
        for (a, b) in intervals(&g.members, to) {
            events.push((a, true, g.id));
            if let Some(e) = b.checked_add(1) {
                events.push((e, false, g.id));
            }
        }
    }
    events.sort_unstable_by_key(|e| (e.0, e.1));
    let mut active: BTreeMap<GroupId, u32> = BTreeMap::new();
    let mut out: Vec<(u128, u128, Vec<GroupId>)> = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let at = events[i].0;
        while i < events.len() && events[i].0 == at {
            let (_, start, g) = events[i];
            if start {
                *active.entry(g).or_default() += 1;
            } else if let Some(c) = active.get_mut(&g) {
                *c -= 1;
                if *c == 0 {
                    active.remove(&g);
                }
            }
            i += 1;
        }
        if active.is_empty() {
            continue;
        }
        let end = events.get(i).map_or(u128::MAX, |e| e.0 - 1);
        let set: Vec<GroupId> = active.keys().copied().collect();
        match out.last_mut() {
            Some(last) if last.1.checked_add(1) == Some(at) && last.2 == set => last.1 = end,
            _ => out.push((at, end, set)),
        }
    }
    out
}

/// Name of the chain for one direction's rule list (content-derived, so stable).
pub fn chain_name(egress: bool, rules: &[RuleId]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&[u8::from(egress)]);
    for r in rules {
        h.update(&r.0.to_le_bytes());
    }
    let hex: String = h.finalize().as_bytes()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}{hex}", if egress { "e_" } else { "i_" })
}

fn merge(mut v: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    v.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(l) if u32::from(a) <= u32::from(l.1) + 1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Computes the table content for `snap`, reusing class numbers from `classes`.
pub fn desired(snap: &NodeSnapshot, classes: &mut Classes) -> Desired {
    let mut d = Desired {
        version: snap.version,
        digest: Some(snap.digest),
        ..Default::default()
    };
    let segs4 = segments(snap, v4);
    let segs6 = segments(snap, v6);
    let live: BTreeSet<Vec<GroupId>> = segs4.iter().chain(&segs6).map(|s| s.2.clone()).collect();
    classes.retain(&live);
    let mut classes_of: HashMap<GroupId, BTreeSet<u32>> = HashMap::new();
    for (a, b, set) in &segs4 {
        let id = classes.id(set);
        d.class4
            .insert((Ipv4Addr::from(*a as u32), Ipv4Addr::from(*b as u32)), id);
        for g in set {
            classes_of.entry(*g).or_default().insert(id);
        }
    }
    for (a, b, set) in &segs6 {
        let id = classes.id(set);
        d.class6
            .insert((Ipv6Addr::from(*a), Ipv6Addr::from(*b)), id);
        for g in set {
            classes_of.entry(*g).or_default().insert(id);
        }
    }
    let rules: HashMap<RuleId, &Rule> = snap.rules.iter().map(|r| (r.id, &**r)).collect();
    let groups: HashMap<GroupId, &Members> =
        snap.groups.iter().map(|g| (g.id, &g.members)).collect();
    for e in &snap.endpoints {
        for (egress, dir) in [(false, &e.ingress), (true, &e.egress)] {
            if !dir.isolated {
                continue;
            }
            let name = chain_name(egress, &dir.rules);
            if !d.rulesets.contains_key(&name) {
                let rs = ruleset(egress, &dir.rules, &rules, &groups, &classes_of);
                d.rulesets.insert(name.clone(), rs);
            }
            for a in &e.addrs {
                match (a, egress) {
                    (IpAddr::V4(a), false) => d.ing4.insert(*a, name.clone()),
                    (IpAddr::V6(a), false) => d.ing6.insert(*a, name.clone()),
                    (IpAddr::V4(a), true) => d.eg4.insert(*a, name.clone()),
                    (IpAddr::V6(a), true) => d.eg6.insert(*a, name.clone()),
                };
            }
        }
    }
    d
}

fn ruleset(
    egress: bool,
    ids: &[RuleId],
    rules: &HashMap<RuleId, &Rule>,
    groups: &HashMap<GroupId, &Members>,
    classes_of: &HashMap<GroupId, BTreeSet<u32>>,
) -> Ruleset {
    let mut rs = Ruleset {
        egress,
        ..Default::default()
    };
    let mut ap: BTreeMap<u8, Vec<(u16, u16)>> = BTreeMap::new();
    let mut gp: BTreeMap<(u32, u8), Vec<(u16, u16)>> = BTreeMap::new();
    let empty = BTreeSet::new();
    for id in ids {
        let Some(r) = rules.get(id) else { continue };
        match (&r.peers, &r.ports) {
            (Peers::Any, Ports::Any) => rs.any = true,
            (Peers::Any, Ports::Ranges(ranges)) => {
                for x in ranges {
                    ap.entry(x.proto.number())
                        .or_default()
                        .push((x.first, x.last));
                }
            }
            (Peers::Groups(gs), Ports::Any) => {
                for g in gs {
                    rs.aa.extend(classes_of.get(g).unwrap_or(&empty));
                }
            }
            (Peers::Groups(gs), Ports::Ranges(ranges)) => {
                for g in gs {
                    for c in classes_of.get(g).unwrap_or(&empty) {
                        for x in ranges {
                            gp.entry((*c, x.proto.number()))
                                .or_default()
                                .push((x.first, x.last));
                        }
                    }
                }
            }
            (Peers::Groups(gs), Ports::FromGroups) => {
                for g in gs {
                    if let Some(Members::AddrPorts(m)) = groups.get(g) {
                        for ap in m {
                            match ap.addr {
                                IpAddr::V4(a) => rs.n4.insert((a, ap.proto.number(), ap.port)),
                                IpAddr::V6(a) => rs.n6.insert((a, ap.proto.number(), ap.port)),
                            };
                        }
                    }
                }
            }
            (Peers::Any, Ports::FromGroups) => {}
        }
    }
    for (proto, v) in ap {
        for (a, b) in merge(v) {
            rs.ap.insert((proto, a, b));
        }
    }
    for ((class, proto), v) in gp {
        if rs.aa.contains(&class) {
            continue;
        }
        for (a, b) in merge(v) {
            rs.gp.insert((class, proto, a, b));
        }
    }
    rs
}

#[cfg(test)]
mod tests;
