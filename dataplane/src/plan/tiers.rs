//! Rule lists with ClusterNetworkPolicy rules: the Admin tier, NetworkPolicy and the Baseline
//! tier resolved into one ruleset whose lookups the dataplane takes **most specific first,
//! first hit wins** (named address·port → class × port → class × any port → any peer × port
//! → the default), instead of ORing allows.
//!
//! A peer address maps to exactly one class (the groups containing it: a shorter prefix's
//! groups are in every longer prefix's class), so the decision for (class, protocol, port) is
//! a function of the rule list alone. This module tabulates it: every entry holds the final
//! verdict of all three tiers at its key, so a less specific entry can never win where a more
//! specific one exists, and an any-peer rule ranked before a class rule is folded into that
//! class's entries (never shadowed by them, never shadowing them).
//!
//! The work is proportional to (classes the list names + 1) × (port segments its rules cut)
//! × rules: fine for cluster policies' sizes; NetworkPolicy-only lists never come here.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use moat_policy::ir::{
    Action, AddrPort, GroupId, Members, Peers, PortRange, Ports, Rule, RuleId, Tier,
};
use moat_policy::model::Protocol;

use super::budget::{Budget, Kind, Meter, Overflow};
use super::plant;
use super::{Classes, Desired, Ruleset};

/// The three protocols with ports; anything else (ICMP…) only meets port-less rules.
pub(super) const PORTED: [u8; 3] = [6, 17, 132];

/// Where a flow's peer stands: the groups of its class, and (for named ports) its address.
struct At<'a> {
    groups: &'a [GroupId],
    addr: Option<IpAddr>,
}

struct Lists<'a> {
    admin: Vec<&'a Rule>,
    np: Vec<&'a Rule>,
    baseline: Vec<&'a Rule>,
    isolated: bool,
    members: &'a HashMap<GroupId, &'a Members>,
}

impl Lists<'_> {
    /// The verdict of all three tiers for a flow to or from `at` with `proto`/`port`
    /// (`proto` `None`: a protocol without ports).
    fn allows(&self, at: &At<'_>, proto: Option<u8>, port: u16) -> bool {
        for r in &self.admin {
            if self.matches(r, at, proto, port) {
                match r.action {
                    Action::Allow => return true,
                    Action::Deny => return false,
                    Action::Pass => break,
                }
            }
        }
        if self.isolated {
            return self.np.iter().any(|r| self.matches(r, at, proto, port));
        }
        for r in &self.baseline {
            if self.matches(r, at, proto, port) {
                match r.action {
                    Action::Allow | Action::Pass => return true,
                    Action::Deny => return false,
                }
            }
        }
        true
    }

    fn matches(&self, r: &Rule, at: &At<'_>, proto: Option<u8>, port: u16) -> bool {
        match &r.ports {
            Ports::FromGroups => {
                let (Some(addr), Some(proto), Peers::Groups(gs)) = (at.addr, proto, &r.peers)
                else {
                    return false;
                };
                let Some(proto) = Protocol::ALL.into_iter().find(|p| p.number() == proto) else {
                    return false;
                };
                let key = AddrPort { addr, proto, port };
                // Members are sorted (the IR's invariant, restored on decoding): a broad
                // named-port peer holds every pod of the cluster.
                gs.iter().any(|g| match self.members.get(g) {
                    Some(Members::AddrPorts(m)) => m.binary_search(&key).is_ok(),
                    _ => false,
                })
            }
            ports => {
                let ports_ok = match ports {
                    Ports::Any => true,
                    Ports::Ranges(v) => in_ranges(v, proto, port),
                    Ports::FromGroups => unreachable!(),
                };
                ports_ok
                    && match &r.peers {
                        Peers::Any => true,
                        Peers::Groups(gs) => gs.iter().any(|g| at.groups.binary_search(g).is_ok()),
                    }
            }
        }
    }
}

/// Whether `proto`/`port` is in one of `ranges` (`proto` `None`: a protocol without ports,
/// in none).
pub(super) fn in_ranges(ranges: &[PortRange], proto: Option<u8>, port: u16) -> bool {
    proto.is_some_and(|p| {
        ranges
            .iter()
            .any(|x| x.proto.number() == p && x.first <= port && port <= x.last)
    })
}

/// Whether any rule of `ids` belongs to a cluster tier, or is not in `rules` (its tier
/// unknown: the list is then enforced, and denied whole, never skipped).
pub fn tiered<R: Borrow<Rule>>(ids: &[RuleId], rules: &HashMap<RuleId, R>) -> bool {
    ids.iter().any(|id| {
        rules
            .get(id)
            .is_none_or(|r| r.borrow().tier != Tier::NetworkPolicy)
    })
}

/// The segments `[lo, hi]` of 0..=65535 within which no rule's port range starts or ends,
/// nor a single port of `singles` (protocol, port), per protocol with ports.
pub(super) fn segments(rules: &[&Rule], singles: &[(u8, u16)]) -> BTreeMap<u8, Vec<(u16, u16)>> {
    let mut cuts: BTreeMap<u8, BTreeSet<u32>> = PORTED
        .iter()
        .map(|p| (*p, BTreeSet::from([0u32])))
        .collect();
    for (p, port) in singles {
        let c = cuts.entry(*p).or_default();
        c.insert(u32::from(*port));
        c.insert(u32::from(*port) + 1);
    }
    for r in rules {
        if let Ports::Ranges(v) = &r.ports {
            for x in v {
                let c = cuts.entry(x.proto.number()).or_default();
                c.insert(u32::from(x.first));
                c.insert(u32::from(x.last) + 1);
            }
        }
    }
    cuts.into_iter()
        .map(|(p, c)| {
            let c: Vec<u32> = c.into_iter().filter(|x| *x <= 65535).collect();
            let segs = c
                .iter()
                .enumerate()
                .map(|(i, lo)| {
                    let hi = c.get(i + 1).map_or(65535, |n| n - 1);
                    (*lo as u16, hi as u16)
                })
                .collect();
            (p, segs)
        })
        .collect()
}

/// One rule list holding cluster rules, by rank and indexed by the peers its rules can
/// match: built once per list (an in-place patch keeps it across versions, since a list's
/// rules never change under a patch).
pub struct Ranked<R> {
    /// The rules by rank: (tier, priority, content ID).
    list: Vec<R>,
    any_peer: Vec<usize>,
    by_group: HashMap<GroupId, Vec<usize>>,
    from_groups: Vec<usize>,
    /// Groups a rule with ports of its own names: a class containing one gets entries.
    named_groups: HashSet<GroupId>,
}

impl<R: Borrow<Rule>> Ranked<R> {
    pub fn new(mut list: Vec<R>) -> Self {
        list.sort_by_key(|r| {
            let r = r.borrow();
            (r.tier, r.priority, r.id)
        });
        // A peer's verdict depends only on the rules that can match it: the any-peer rules
        // and those naming one of its groups. Resolving each class over its own rules (and
        // its own port cuts) keeps the work near the list's size; over the whole list it is
        // classes × segments × rules, which at 10,000 single-peer rules never ends.
        let (mut any_peer, mut by_group, mut from_groups) =
            (Vec::new(), HashMap::new(), Vec::new());
        let mut named_groups = HashSet::new();
        for (i, r) in list.iter().enumerate() {
            let r = r.borrow();
            match &r.peers {
                Peers::Any => any_peer.push(i),
                Peers::Groups(gs) => {
                    for g in gs {
                        by_group.entry(*g).or_insert_with(Vec::new).push(i);
                    }
                    if matches!(r.ports, Ports::FromGroups) {
                        from_groups.push(i);
                    } else {
                        named_groups.extend(gs.iter().copied());
                    }
                }
            }
        }
        Ranked {
            list,
            any_peer,
            by_group,
            from_groups,
            named_groups,
        }
    }

    fn rule(&self, i: usize) -> &Rule {
        self.list[i].borrow()
    }
}

/// Resolves the entries of any class or named address of one [`Ranked`] list on its own:
/// the full plan resolves every class, an in-place patch only the classes a membership
/// change brings to life.
pub struct Resolver<'a, R> {
    ranked: &'a Ranked<R>,
    isolated: bool,
    members: &'a HashMap<GroupId, &'a Members>,
    /// The any-peer rules' verdicts, for a peer in no class the list names.
    anyone: Lists<'a>,
    /// The verdict of a peer in no class, on a protocol without ports.
    pub default: bool,
}

impl<'a, R: Borrow<Rule>> Resolver<'a, R> {
    /// `members` is read only for named ports (an empty map serves a caller that resolves
    /// classes only).
    pub fn new(
        ranked: &'a Ranked<R>,
        isolated: bool,
        members: &'a HashMap<GroupId, &'a Members>,
    ) -> Self {
        let anyone: Vec<&'a Rule> = ranked.any_peer.iter().map(|i| ranked.rule(*i)).collect();
        let anyone = lists(&anyone, isolated, members, false);
        let default = anyone.allows(&NOWHERE, None, 0);
        Resolver {
            ranked,
            isolated,
            members,
            anyone,
            default,
        }
    }

    fn relevant(&self, groups: &[GroupId], named: bool) -> Vec<&'a Rule> {
        let r = self.ranked;
        let mut idx = r.any_peer.clone();
        for g in groups {
            idx.extend(r.by_group.get(g).into_iter().flatten());
        }
        if named {
            idx.extend(&r.from_groups);
        }
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| r.rule(i)).collect()
    }

    /// Whether a class of `groups` gets entries of its own.
    pub fn names(&self, groups: &[GroupId]) -> bool {
        groups.iter().any(|g| self.ranked.named_groups.contains(g))
    }

    /// The entries of a peer in no class: protocol and port ranges where the any-peer rules
    /// decide otherwise than [`default`](Self::default).
    pub fn anyone(&self, put: &mut Put<'_>) -> Result<(), Overflow> {
        let any: Vec<&Rule> = self.relevant(&[], false);
        for (p, v) in &segments(&any, &[]) {
            for (a, b, allow) in merged(v, |port| self.anyone.allows(&NOWHERE, Some(*p), port)) {
                if allow != self.default {
                    put(allow, Entry::Ap(*p, a, b))?;
                }
            }
        }
        Ok(())
    }

    /// The entries of class `c`, made of `groups`: its whole-class verdict, and the ports
    /// where it differs.
    pub fn class(&self, c: u32, groups: &[GroupId], put: &mut Put<'_>) -> Result<(), Overflow> {
        let own = self.relevant(groups, false);
        let lists = &lists(&own, self.isolated, self.members, true);
        let at = At { groups, addr: None };
        let whole = lists.allows(&at, None, 0);
        // A class whose whole verdict is the default needs no whole-class entry: where its
        // lookup misses, the any-peer lookup decides, so only the ports where the class
        // decides otherwise than a peer in no class need entries (each of `own`'s segments
        // has one any-peer verdict: its cuts include the any-peer rules'). Most classes of
        // a big NetworkPolicy list are then one entry, as without tiers.
        let fall_through = whole == self.default;
        if !fall_through {
            put(whole, Entry::Aa(c))?;
        }
        for (p, v) in &segments(&own, &[]) {
            let base = |port| {
                if fall_through {
                    self.anyone.allows(&NOWHERE, Some(*p), port)
                } else {
                    whole
                }
            };
            let mut runs: Vec<(u16, u16, bool)> = Vec::new();
            for (a, b) in v {
                let allow = lists.allows(&at, Some(*p), *a);
                if allow == base(*a) {
                    runs.push((*a, *b, allow));
                    continue;
                }
                match runs.last_mut() {
                    Some(l)
                        if l.2 == allow
                            && base(l.0) != l.2
                            && u32::from(l.1) + 1 == u32::from(*a) =>
                    {
                        l.1 = *b
                    }
                    _ => runs.push((*a, *b, allow)),
                }
            }
            for (a, b, allow) in runs {
                if allow == base(a) {
                    continue;
                }
                let e = if a == b {
                    Entry::Gx(c, *p, a)
                } else {
                    Entry::Gp(c, *p, a, b)
                };
                put(allow, e)?;
            }
        }
        Ok(())
    }

    /// Every resolved named port of the list: (address, protocol, port).
    pub fn named_keys(&self) -> BTreeSet<(IpAddr, u8, u16)> {
        let mut named = BTreeSet::new();
        for i in &self.ranked.from_groups {
            if let Peers::Groups(gs) = &self.ranked.rule(*i).peers {
                for g in gs {
                    if let Some(Members::AddrPorts(m)) = self.members.get(g) {
                        named.extend(m.iter().map(|m| (m.addr, m.proto.number(), m.port)));
                    }
                }
            }
        }
        named
    }

    /// The named-port rules holding (`addr`, `proto`, `port`): with the class of `addr`,
    /// all that [`named`](Self::named)'s verdict depends on.
    pub fn named_hits(&self, addr: IpAddr, proto: u8, port: u16) -> Vec<usize> {
        let lists = lists(&[], self.isolated, self.members, false);
        let at = At {
            groups: &[],
            addr: Some(addr),
        };
        self.ranked
            .from_groups
            .iter()
            .copied()
            .filter(|i| lists.matches(self.ranked.rule(*i), &at, Some(proto), port))
            .collect()
    }

    /// The verdict at a named entry: everything that also matches there folded in. `groups`
    /// is the class of `addr`.
    pub fn named(&self, addr: IpAddr, groups: &[GroupId], proto: u8, port: u16) -> bool {
        let at = At {
            groups,
            addr: Some(addr),
        };
        let own = self.relevant(groups, true);
        lists(&own, self.isolated, self.members, false).allows(&at, Some(proto), port)
    }
}

/// Where a resolver puts an entry (allow or deny).
pub type Put<'p> = dyn FnMut(bool, Entry) -> Result<(), Overflow> + 'p;

const NOWHERE: At<'static> = At {
    groups: &[],
    addr: None,
};

/// The three tiers of `rules` (sorted by rank).
fn lists<'a>(
    rules: &[&'a Rule],
    isolated: bool,
    members: &'a HashMap<GroupId, &'a Members>,
    for_class: bool,
) -> Lists<'a> {
    // What the tests plant to show they catch it: class entries that ignore the any-peer
    // rules ranked before them.
    let folded = !plant::on(plant::Plant::AnyPeerNotFolded);
    let tier = |t: Tier| -> Vec<&'a Rule> {
        rules
            .iter()
            .copied()
            .filter(|r| r.tier == t)
            .filter(|r| t == Tier::NetworkPolicy || folded || !for_class || r.peers != Peers::Any)
            .collect()
    };
    Lists {
        admin: tier(Tier::Admin),
        np: tier(Tier::NetworkPolicy),
        baseline: tier(Tier::Baseline),
        isolated,
        members,
    }
}

/// Puts `e` into `rs` on the allow or the deny side; the entries it costs, by kind.
pub fn insert(rs: &mut Ruleset, allow: bool, e: Entry, budget: &Budget) -> (Kind, usize) {
    match e {
        Entry::Ap(p, a, b) => {
            if allow {
                rs.ap.insert((p, a, b))
            } else {
                rs.deny.ap.insert((p, a, b))
            };
            (Kind::PortsRanged, budget.port_range(a, b))
        }
        Entry::Aa(c) => {
            if allow {
                rs.aa.insert(c)
            } else {
                rs.deny.aa.insert(c)
            };
            (Kind::PortsRanged, 1)
        }
        Entry::Gx(c, p, port) => {
            if allow {
                rs.gx.insert((c, p, port))
            } else {
                rs.deny.gx.insert((c, p, port))
            };
            (Kind::PortsExact, 1)
        }
        Entry::Gp(c, p, a, b) => {
            if allow {
                rs.gp.insert((c, p, a, b))
            } else {
                rs.deny.gp.insert((c, p, a, b))
            };
            (Kind::PortsRanged, budget.port_range(a, b))
        }
        Entry::Named(a, p, port) => {
            let new = match (a, allow) {
                (IpAddr::V4(a), true) => rs.n4.insert((a, p, port)),
                (IpAddr::V6(a), true) => rs.n6.insert((a, p, port)),
                (IpAddr::V4(a), false) => rs.deny.n4.insert((a, p, port)),
                (IpAddr::V6(a), false) => rs.deny.n6.insert((a, p, port)),
            };
            (Kind::Named, usize::from(new))
        }
    }
}

/// The resolved ruleset of one rule list holding cluster rules, counted against `meter`.
#[allow(clippy::too_many_arguments)]
pub fn ruleset<'a>(
    egress: bool,
    isolated: bool,
    ids: &[RuleId],
    rules: &HashMap<RuleId, &'a Rule>,
    members: &'a HashMap<GroupId, &'a Members>,
    classes_of: &HashMap<GroupId, BTreeSet<u32>>,
    classes: &Classes,
    table: &Desired,
    meter: &mut Meter,
) -> Result<Ruleset, Overflow> {
    let ranked = Ranked::new(
        ids.iter()
            .filter_map(|id| rules.get(id).copied())
            .collect::<Vec<&Rule>>(),
    );
    let r = Resolver::new(&ranked, isolated, members);
    let mut rs = Ruleset {
        egress,
        any: r.default,
        ..Default::default()
    };
    let budget = meter.budget;
    let into = &mut rs;
    let mut put = |allow: bool, e: Entry| -> Result<(), Overflow> {
        let (kind, n) = insert(into, allow, e, &budget);
        meter.take(kind, n)
    };
    r.anyone(&mut put)?;
    // Every class a rule names.
    let named_classes: BTreeSet<u32> = ranked
        .named_groups
        .iter()
        .filter_map(|g| classes_of.get(g))
        .flatten()
        .copied()
        .collect();
    for c in named_classes {
        let Some(groups) = classes.groups(c) else {
            continue;
        };
        // What the tests plant to show they catch it: a class read as one group only (the
        // mistake of taking a longest-prefix match for the whole answer).
        let groups = if plant::on(plant::Plant::OneGroupPerClass) {
            &groups[groups.len().saturating_sub(1)..]
        } else {
            groups
        };
        r.class(c, groups, &mut put)?;
    }
    // Named ports: an entry per resolved (address, protocol, port).
    // The class of each address comes from the table's address maps, already laid out. A
    // broad named-port peer names every pod of the cluster, most of them alike: the verdict
    // is resolved once per (class, protocol, port, named-port rules holding the key).
    let mut memo: HashMap<(Option<u32>, u8, u16, Vec<usize>), bool> = HashMap::new();
    for (addr, p, port) in r.named_keys() {
        let class = table.class_at(addr);
        let hits = r.named_hits(addr, p, port);
        let allow = *memo.entry((class, p, port, hits)).or_insert_with(|| {
            let groups = class.and_then(|c| classes.groups(c)).unwrap_or_default();
            r.named(addr, groups, p, port)
        });
        put(allow, Entry::Named(addr, p, port))?;
    }
    Ok(rs)
}

pub enum Entry {
    Ap(u8, u16, u16),
    Aa(u32),
    Gx(u32, u8, u16),
    Gp(u32, u8, u16, u16),
    Named(IpAddr, u8, u16),
}

/// `segs` with their verdicts, neighbours of equal verdict merged.
pub(super) fn merged<V: PartialEq + Copy>(
    segs: &[(u16, u16)],
    verdict: impl Fn(u16) -> V,
) -> Vec<(u16, u16, V)> {
    let mut out: Vec<(u16, u16, V)> = Vec::new();
    for (a, b) in segs {
        let v = verdict(*a);
        match out.last_mut() {
            Some(l) if l.2 == v && u32::from(l.1) + 1 == u32::from(*a) => l.1 = *b,
            _ => out.push((*a, *b, v)),
        }
    }
    out
}
