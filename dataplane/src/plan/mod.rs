//! A snapshot as dataplane state: the classes, rulesets and endpoint maps a backend must
//! hold, computed without touching the kernel. Both backends build from it (nft: sets and
//! verdict maps; eBPF: hash and LPM maps), which is half of why their verdicts agree.
//!
//! Per-packet work must not grow with the number of policies, so rules are never laid out
//! one after another. Instead:
//!
//! * every address is mapped to a **class**: the set of address groups containing it
//!   (like Cilium's identities). Addresses in the same groups share a class. CIDR ranges
//!   go to an interval map (one entry per CIDR edge), single addresses — pods, /32 blocks —
//!   to a hash map looked up after it, so the common change (a pod coming or going) never
//!   makes `nft` read and rewrite an interval set;
//! * every distinct rule list of a local endpoint (per direction) is a **ruleset**, a chain
//!   doing a fixed number of set lookups: any-peer ports, peer class with any port, peer class
//!   with ports, and (egress) named ports as address·protocol·port;
//! * endpoint addresses jump to their ruleset through verdict maps; endpoints no policy
//!   isolates are in no map and cost one failed lookup.

pub mod budget;
#[cfg(test)]
mod fixtures;
pub mod incremental;
pub(crate) mod plant;
pub mod tier_tables;
pub mod tiers;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use moat_policy::ir::digest::Digest;
use moat_policy::ir::{EndpointId, GroupId, Members, NodeSnapshot, Peers, Ports, Rule, RuleId};

use crate::local::LocalPods;
pub use budget::{Budget, DENY_EGRESS, DENY_INGRESS, Degraded, Meter, Overflow};

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
    /// Peer class, protocol, port range of two or more ports; disjoint per (class,
    /// protocol); none for classes in `aa`. An interval set.
    pub gp: BTreeSet<(u32, u8, u16, u16)>,
    /// Peer class, protocol, single port: a hash set, so the common case never touches an
    /// interval set (see `Desired::addr4`).
    pub gx: BTreeSet<(u32, u8, u16)>,
    /// Egress named ports: destination address, protocol, port.
    pub n4: BTreeSet<(Ipv4Addr, u8, u16)>,
    pub n6: BTreeSet<(Ipv6Addr, u8, u16)>,
    /// Some rule of the list takes its ports from its peers' named ports: a dataplane must
    /// look up named entries even while `n4`/`n6` are empty (a patch can fill them without
    /// recomputing the ruleset).
    pub named_ports: bool,
    /// Entries that deny, from ClusterNetworkPolicy tiers (see [`tiers`]). A ruleset with
    /// any is looked up most specific first and its first hit decides (named, `gx`, `gp`,
    /// `aa`, `ap`, then `any` or drop); a key is never both allowed and denied. Without
    /// denies, every hit allows and the order does not matter.
    pub deny: Denies,
}

/// The deny entries of a ruleset, shaped as its allow entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Denies {
    pub ap: BTreeSet<(u8, u16, u16)>,
    pub aa: BTreeSet<u32>,
    pub gp: BTreeSet<(u32, u8, u16, u16)>,
    pub gx: BTreeSet<(u32, u8, u16)>,
    pub n4: BTreeSet<(Ipv4Addr, u8, u16)>,
    pub n6: BTreeSet<(Ipv6Addr, u8, u16)>,
}

impl Denies {
    pub fn len(&self) -> usize {
        self.ap.len()
            + self.aa.len()
            + self.gp.len()
            + self.gx.len()
            + self.n4.len()
            + self.n6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ruleset {
    pub fn elements(&self) -> usize {
        self.ap.len()
            + self.aa.len()
            + self.gp.len()
            + self.gx.len()
            + self.n4.len()
            + self.n6.len()
            + self.deny.len()
    }

    /// Whether its lookups must be taken most specific first (see [`deny`](Self::deny)).
    pub fn ordered(&self) -> bool {
        !self.deny.is_empty()
    }

    /// Its allow entries (but `any`), shaped as its deny entries.
    pub fn allows(&self) -> Sets<'_> {
        Sets {
            ap: &self.ap,
            aa: &self.aa,
            gp: &self.gp,
            gx: &self.gx,
            n4: &self.n4,
            n6: &self.n6,
        }
    }

    pub fn denies(&self) -> Sets<'_> {
        let d = &self.deny;
        Sets {
            ap: &d.ap,
            aa: &d.aa,
            gp: &d.gp,
            gx: &d.gx,
            n4: &d.n4,
            n6: &d.n6,
        }
    }
}

/// One verdict's entries of a ruleset: what a dataplane writes for its allows and for its
/// denies alike.
#[derive(Clone, Copy, Debug)]
pub struct Sets<'a> {
    pub ap: &'a BTreeSet<(u8, u16, u16)>,
    pub aa: &'a BTreeSet<u32>,
    pub gp: &'a BTreeSet<(u32, u8, u16, u16)>,
    pub gx: &'a BTreeSet<(u32, u8, u16)>,
    pub n4: &'a BTreeSet<(Ipv4Addr, u8, u16)>,
    pub n6: &'a BTreeSet<(Ipv6Addr, u8, u16)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub version: u64,
    pub digest: Option<Digest>,
    /// Which class numbering the kernel's table uses: new with every full replacement, kept
    /// by deltas. A delta only commits onto the numbering it was computed for.
    pub epoch: u32,
    /// Inclusive address interval → class, from groups' ranges (CIDRs) only.
    pub class4: BTreeMap<(Ipv4Addr, Ipv4Addr), u32>,
    pub class6: BTreeMap<(Ipv6Addr, Ipv6Addr), u32>,
    /// Single addresses (pods, /32 and /128 blocks) → class, looked up after the intervals
    /// and overriding them. Hash maps: `nft` reads every element of a table's interval sets
    /// before any change to the table, so pod churn must not live in them.
    pub addr4: BTreeMap<Ipv4Addr, u32>,
    pub addr6: BTreeMap<Ipv6Addr, u32>,
    /// Chain name → content.
    pub rulesets: BTreeMap<String, Ruleset>,
    /// Local endpoint address → ruleset chain, per direction and family.
    pub ing4: BTreeMap<Ipv4Addr, String>,
    pub ing6: BTreeMap<Ipv6Addr, String>,
    pub eg4: BTreeMap<Ipv4Addr, String>,
    pub eg6: BTreeMap<Ipv6Addr, String>,
    /// Local pod addresses per interface, known or not (source validation, unknown pods).
    /// Not derived from the snapshot: the backend sets it from the agent's bindings.
    pub local: LocalPods,
    /// Rule lists this version could not hold; their endpoints point at [`DENY_INGRESS`]
    /// or [`DENY_EGRESS`] instead.
    pub degraded: Vec<Degraded>,
}

impl Desired {
    /// The class of a peer address, as the dataplane finds it: its exact entry, else the
    /// range holding it (`None`: in no class).
    pub fn class_at(&self, a: IpAddr) -> Option<u32> {
        let exact = match a {
            IpAddr::V4(x) => self.addr4.get(&x),
            IpAddr::V6(x) => self.addr6.get(&x),
        };
        exact.copied().or_else(|| self.range_class_at(a))
    }

    /// The class of the address range holding `a`, ignoring exact address entries.
    pub fn range_class_at(&self, a: IpAddr) -> Option<u32> {
        fn holding<A: Ord + Copy>(m: &BTreeMap<(A, A), u32>, x: A, top: A) -> Option<u32> {
            m.range(..=(x, top))
                .next_back()
                .filter(|((lo, hi), _)| *lo <= x && x <= *hi)
                .map(|(_, c)| *c)
        }
        match a {
            IpAddr::V4(x) => holding(&self.class4, x, Ipv4Addr::from(u32::MAX)),
            IpAddr::V6(x) => holding(&self.class6, x, Ipv6Addr::from(u128::MAX)),
        }
    }

    /// Every class an address or a range has.
    pub fn live_classes(&self) -> BTreeSet<u32> {
        self.class4
            .values()
            .chain(self.class6.values())
            .chain(self.addr4.values())
            .chain(self.addr6.values())
            .copied()
            .collect()
    }

    /// Elements the table holds (for capacity checks and reports).
    pub fn elements(&self) -> usize {
        self.class4.len()
            + self.class6.len()
            + self.addr4.len()
            + self.addr6.len()
            + self.ing4.len()
            + self.ing6.len()
            + self.eg4.len()
            + self.eg6.len()
            + self.local.addrs.len()
            + self.rulesets.values().map(Ruleset::elements).sum::<usize>()
    }

    /// Whether the plan fits `budget`, counted as [`desired_within`] counts it. For plans
    /// patched in place (which never degrade anything): one that no longer fits must be
    /// recomputed with [`desired_within`].
    pub fn check(&self, budget: &Budget) -> Result<(), Overflow> {
        use budget::Kind;
        let mut m = Meter::new(*budget);
        m.take(
            Kind::Total,
            self.local.addrs.len()
                + self.ing4.len()
                + self.ing6.len()
                + self.eg4.len()
                + self.eg6.len(),
        )?;
        m.take(Kind::Addrs, self.addr4.len() + self.addr6.len())?;
        let ranges = self
            .class4
            .keys()
            .map(|(a, b)| budget.interval(u32::from(*a).into(), u32::from(*b).into(), 32))
            .chain(
                self.class6
                    .keys()
                    .map(|(a, b)| budget.interval(u128::from(*a), u128::from(*b), 128)),
            )
            .fold(0usize, usize::saturating_add);
        m.take(Kind::Ranges, ranges)?;
        for rs in self.rulesets.values() {
            take_ruleset(&mut m, rs)?;
        }
        Ok(())
    }
}

/// Counts a ruleset's entries, allow and deny, by kind (as [`Desired::check`] and the tier
/// plan's budget count them).
pub(super) fn take_ruleset(m: &mut Meter, rs: &Ruleset) -> Result<(), Overflow> {
    use budget::Kind;
    let (d, b) = (&rs.deny, m.budget);
    m.take(Kind::PortsExact, rs.gx.len() + d.gx.len())?;
    let ranged = rs.aa.len()
        + d.aa.len()
        + rs.ap
            .iter()
            .chain(&d.ap)
            .map(|(_, a, z)| b.port_range(*a, *z))
            .chain(
                rs.gp
                    .iter()
                    .chain(&d.gp)
                    .map(|(_, _, a, z)| b.port_range(*a, *z)),
            )
            .sum::<usize>();
    m.take(Kind::PortsRanged, ranged)?;
    m.take(
        Kind::Named,
        rs.n4.len() + rs.n6.len() + d.n4.len() + d.n6.len(),
    )
}

/// Stable class numbers across applies, so a small change is a small diff.
#[derive(Default)]
pub struct Classes {
    ids: HashMap<Vec<GroupId>, u32>,
    sets: HashMap<u32, Vec<GroupId>>,
    free: Vec<u32>,
    next: u32,
}

impl Classes {
    pub fn id(&mut self, groups: &[GroupId]) -> u32 {
        if let Some(id) = self.ids.get(groups) {
            return *id;
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.ids.insert(groups.to_vec(), id);
        self.sets.insert(id, groups.to_vec());
        id
    }

    /// The groups of class `id` (sorted).
    pub fn groups(&self, id: u32) -> Option<&[GroupId]> {
        self.sets.get(&id).map(Vec::as_slice)
    }

    /// Frees one class number.
    pub fn release(&mut self, id: u32) {
        if let Some(set) = self.sets.remove(&id) {
            self.ids.remove(&set);
            self.free.push(id);
        }
    }

    /// Frees the numbers of classes no longer in use.
    fn retain(&mut self, live: &std::collections::HashSet<&[GroupId]>) {
        let dead: Vec<_> = self
            .ids
            .keys()
            .filter(|k| !live.contains(k.as_slice()))
            .cloned()
            .collect();
        for k in dead {
            if let Some(id) = self.ids.remove(&k) {
                self.sets.remove(&id);
                self.free.push(id);
            }
        }
    }
}

pub fn v4(a: IpAddr) -> Option<u128> {
    match a {
        IpAddr::V4(a) => Some(u128::from(u32::from(a))),
        IpAddr::V6(_) => None,
    }
}

pub fn v6(a: IpAddr) -> Option<u128> {
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

/// Every group's intervals in one family, split into single addresses and ranges.
pub struct Spans {
    pub singles: Vec<(u128, GroupId)>,
    pub ranges: Vec<(u128, u128, GroupId)>,
}

pub fn spans(snap: &NodeSnapshot, to: fn(IpAddr) -> Option<u128>) -> Spans {
    let mut s = Spans {
        singles: Vec::new(),
        ranges: Vec::new(),
    };
    for g in &snap.groups {
        for (a, b) in intervals(&g.members, to) {
            if a == b {
                s.singles.push((a, g.id));
            } else {
                s.ranges.push((a, b, g.id));
            }
        }
    }
    s.singles.sort_unstable();
    s.singles.dedup();
    s
}

/// Splits the address space covered by `ranges` into segments with a constant set of groups.
fn segments(ranges: &[(u128, u128, GroupId)]) -> Vec<(u128, u128, Vec<GroupId>)> {
    // Boundary events: +group at start, -group after end.
    // An interval reaching the top of the space never ends.
    let mut events: Vec<(u128, bool, GroupId)> = Vec::with_capacity(ranges.len() * 2);
    for (a, b, g) in ranges {
        events.push((*a, true, *g));
        if let Some(e) = b.checked_add(1) {
            events.push((e, false, *g));
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

/// The class key of every single address: the groups listing it, plus those whose ranges
/// contain it (`segs` sorted and disjoint).
fn points(
    singles: &[(u128, GroupId)],
    segs: &[(u128, u128, Vec<GroupId>)],
) -> Vec<(u128, Vec<GroupId>)> {
    let mut out: Vec<(u128, Vec<GroupId>)> = Vec::new();
    for (a, g) in singles {
        match out.last_mut() {
            Some(last) if last.0 == *a => last.1.push(*g),
            _ => {
                let i = segs.partition_point(|s| s.1 < *a);
                let mut set = match segs.get(i) {
                    Some(s) if s.0 <= *a => s.2.clone(),
                    _ => Vec::new(),
                };
                set.push(*g);
                out.push((*a, set));
            }
        }
    }
    for (_, set) in &mut out {
        set.sort_unstable();
        set.dedup();
    }
    out
}

/// A cheap key for a rule list: direction, isolation, length, first and last rule.
type ListKey = (bool, bool, usize, Option<RuleId>, Option<RuleId>);

/// Name of the chain for one direction's rule list (content-derived, so stable).
pub fn chain_name(egress: bool, rules: &[RuleId]) -> String {
    list_name(egress, true, rules)
}

/// [`chain_name`] for a list that may not isolate (one with cluster rules: whether a
/// NetworkPolicy isolates the endpoint changes its verdicts). An isolating list keeps the
/// name it always had.
pub fn list_name(egress: bool, isolated: bool, rules: &[RuleId]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&[u8::from(egress) | if isolated { 0 } else { 2 }]);
    for r in rules {
        h.update(&r.0.to_le_bytes());
    }
    let hex: String = h.finalize().as_bytes()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}{hex}", if egress { "e_" } else { "i_" })
}

pub fn merge(mut v: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
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

/// Computes the table content for `snap`, reusing class numbers from `classes`, with no
/// limit on its size.
pub fn desired(snap: &NodeSnapshot, classes: &mut Classes) -> Desired {
    desired_within(snap, classes, &LocalPods::default(), &Budget::UNLIMITED)
}

/// Address classes of the groups in `keep`: (segments, points) per family.
type ClassLayout = (
    Vec<(u128, u128, Vec<GroupId>)>,
    Vec<(u128, u128, Vec<GroupId>)>,
    Vec<(u128, Vec<GroupId>)>,
    Vec<(u128, Vec<GroupId>)>,
);

fn layout(snap: &NodeSnapshot, dropped: &BTreeSet<GroupId>) -> ClassLayout {
    let (mut sp4, mut sp6) = (spans(snap, v4), spans(snap, v6));
    if !dropped.is_empty() {
        for sp in [&mut sp4, &mut sp6] {
            sp.singles.retain(|(_, g)| !dropped.contains(g));
            sp.ranges.retain(|(_, _, g)| !dropped.contains(g));
        }
    }
    let (segs4, segs6) = (segments(&sp4.ranges), segments(&sp6.ranges));
    let (pts4, pts6) = (points(&sp4.singles, &segs4), points(&sp6.singles, &segs6));
    (segs4, segs6, pts4, pts6)
}

/// What a layout costs: (addresses, weighted ranges).
fn layout_cost(l: &ClassLayout, budget: &Budget) -> (usize, usize) {
    let ranges =
        l.0.iter()
            .map(|s| budget.interval(s.0, s.1, 32))
            .sum::<usize>()
            + l.1
                .iter()
                .map(|s| budget.interval(s.0, s.1, 128))
                .sum::<usize>();
    (l.2.len() + l.3.len(), ranges)
}

/// What one group costs on its own: (addresses, weighted ranges).
fn group_cost(members: &Members, budget: &Budget) -> (usize, usize) {
    let (mut a, mut r) = (0, 0);
    for (to, bits) in [(v4 as fn(IpAddr) -> Option<u128>, 32), (v6, 128)] {
        for (lo, hi) in intervals(members, to) {
            if lo == hi {
                a += 1;
            } else {
                r += budget.interval(lo, hi, bits);
            }
        }
    }
    (a, r)
}

/// Computes the table content for `snap` within `budget`: what does not fit is denied
/// (see [`budget`]), never refused whole and never left open.
pub fn desired_within(
    snap: &NodeSnapshot,
    classes: &mut Classes,
    local: &LocalPods,
    budget: &Budget,
) -> Desired {
    desired_named(snap, classes, local, budget, list_name)
}

/// [`desired_within`] with the rule lists named by `namer` (a test forces collisions).
fn desired_named(
    snap: &NodeSnapshot,
    classes: &mut Classes,
    local: &LocalPods,
    budget: &Budget,
    namer: fn(bool, bool, &[RuleId]) -> String,
) -> Desired {
    let mut d = Desired {
        version: snap.version,
        digest: Some(snap.digest),
        local: local.clone(),
        ..Default::default()
    };
    // What no budget can cut: an entry per local pod address and per isolated endpoint
    // address and direction (a denied endpoint needs its entry as much as any).
    let rules: HashMap<RuleId, &Rule> = snap.rules.iter().map(|r| (r.id, &**r)).collect();
    let enforced = |d: &moat_policy::ir::DirectionRules| enforced(d, &rules);
    let fixed = local.addrs.len() + entries_of_endpoints(snap, &rules);
    let groups: HashMap<GroupId, &Members> =
        snap.groups.iter().map(|g| (g.id, &g.members)).collect();
    // Every distinct rule list, named once (hashing a long list per endpoint is what a big
    // policy over many pods would otherwise cost), with the endpoints holding it.
    struct List<'a> {
        egress: bool,
        isolated: bool,
        rules: &'a [RuleId],
        endpoints: Vec<EndpointId>,
    }
    let mut names: HashMap<ListKey, Vec<(&[RuleId], String)>> = HashMap::new();
    let mut lists: BTreeMap<String, List<'_>> = BTreeMap::new();
    let mut chain_of: Vec<[Option<String>; 2]> = Vec::with_capacity(snap.endpoints.len());
    // Names two different lists hash to: sharing a chain would give one list's endpoints
    // the other's rules.
    let mut collided: BTreeSet<String> = BTreeSet::new();
    for e in &snap.endpoints {
        let mut both = [None, None];
        for (egress, dir) in [(false, &e.ingress), (true, &e.egress)] {
            if !enforced(dir) {
                continue;
            }
            let key = (
                egress,
                dir.isolated,
                dir.rules.len(),
                dir.rules.first().copied(),
                dir.rules.last().copied(),
            );
            let known = names.entry(key).or_default();
            let name = match known.iter().find(|(r, _)| *r == dir.rules.as_slice()) {
                Some((_, n)) => n.clone(),
                None => {
                    let n = namer(egress, dir.isolated, &dir.rules);
                    known.push((&dir.rules, n.clone()));
                    n
                }
            };
            let l = lists.entry(name.clone()).or_insert_with(|| List {
                egress,
                isolated: dir.isolated,
                rules: &dir.rules,
                endpoints: Vec::new(),
            });
            if (l.egress, l.isolated, l.rules) != (egress, dir.isolated, dir.rules.as_slice()) {
                collided.insert(name.clone());
            }
            l.endpoints.push(e.id);
            both[usize::from(egress)] = Some(name);
        }
        chain_of.push(both);
    }
    let groups_of = |l: &List<'_>| -> BTreeSet<GroupId> {
        l.rules
            .iter()
            .filter_map(|id| match &rules.get(id)?.peers {
                Peers::Groups(gs) => Some(gs.iter().copied()),
                Peers::Any => None,
            })
            .flatten()
            .collect()
    };
    // Rule lists denied, with why.
    let mut denied: BTreeMap<String, String> = BTreeMap::new();
    for name in collided {
        denied.insert(
            name,
            "two different rule lists hash to its chain name; both are denied (fail closed)"
                .to_string(),
        );
    }
    // A list naming a rule the snapshot does not hold (only a server bug makes one) is
    // denied whole: the missing rule could have been a Deny.
    for (name, l) in &lists {
        if l.rules.iter().any(|id| !rules.contains_key(id)) {
            denied.insert(
                name.clone(),
                "it names a rule the snapshot does not hold (denied, fail closed)".to_string(),
            );
        }
    }
    // A dataplane that cannot take first-hit lookups gets no cluster rules: such a list is
    // denied whole, never enforced as if its Deny were an allow.
    if !budget.tiers {
        for (name, l) in &lists {
            if tiers::tiered(l.rules, &rules) {
                denied.insert(
                    name.clone(),
                    "ClusterNetworkPolicy rules are not enforced by this dataplane yet (denied, fail closed)".to_string(),
                );
            }
        }
    }
    // Groups first: their addresses and ranges are shared by every ruleset. If they don't
    // fit, the rule list whose groups weigh most is denied (its groups go with it, unless a
    // surviving list names them), until they do.
    let mut meter;
    let mut lay;
    loop {
        let live: BTreeSet<GroupId> = lists
            .iter()
            .filter(|(n, _)| !denied.contains_key(*n))
            .flat_map(|(_, l)| groups_of(l))
            .collect();
        let gone: BTreeSet<GroupId> = snap
            .groups
            .iter()
            .map(|g| g.id)
            .filter(|g| !live.contains(g))
            .collect();
        lay = layout(snap, &gone);
        let (addrs, ranges) = layout_cost(&lay, budget);
        meter = Meter::new(*budget);
        let fits = meter
            .take(budget::Kind::Total, fixed)
            .and_then(|()| meter.take(budget::Kind::Addrs, addrs))
            .and_then(|()| meter.take(budget::Kind::Ranges, ranges));
        let Err(over) = fits else { break };
        let heaviest = lists
            .iter()
            .filter(|(n, _)| !denied.contains_key(*n))
            .map(|(n, l)| {
                let w = groups_of(l)
                    .iter()
                    .filter_map(|g| groups.get(g))
                    .map(|m| {
                        let (a, r) = group_cost(m, budget);
                        a.saturating_add(r)
                    })
                    .fold(0usize, usize::saturating_add);
                (w, n.clone())
            })
            .max();
        let Some((_, n)) = heaviest else {
            // Every list is denied and the fixed entries alone don't fit: the dataplane
            // can't hold this node at all, which its own capacity check will refuse.
            meter = Meter::new(*budget);
            break;
        };
        denied.insert(n, format!("its peer groups: {over}"));
    }
    let classes_of = place(&mut d, lay, classes);
    // Cheapest lists first (by an upper bound that costs nothing to compute), so what a
    // budget cuts is the few biggest lists, not many small ones.
    let mut order: Vec<(usize, &String)> = lists
        .iter()
        .filter(|(n, _)| !denied.contains_key(*n))
        .map(|(name, l)| (bound(l.rules, &rules, &groups, &classes_of), name))
        .collect();
    order.sort();
    for (_, name) in order {
        let l = &lists[name];
        let mut trial = meter;
        let built = if tiers::tiered(l.rules, &rules) {
            tiers::ruleset(
                l.egress,
                l.isolated,
                l.rules,
                &rules,
                &groups,
                &classes_of,
                classes,
                &d,
                &mut trial,
            )
        } else {
            ruleset(l.egress, l.rules, &rules, &groups, &classes_of, &mut trial)
        };
        match built {
            Ok(mut rs) => {
                rs.named_ports = l
                    .rules
                    .iter()
                    .any(|id| rules.get(id).is_some_and(|r| takes_named_ports(r)));
                meter = trial;
                d.rulesets.insert(name.clone(), rs);
            }
            Err(over) => {
                denied.insert(name.clone(), over.to_string());
            }
        }
    }
    for (name, reason) in &denied {
        let l = &lists[name];
        d.degraded.push(Degraded {
            egress: l.egress,
            rules: l.rules.to_vec(),
            endpoints: l.endpoints.clone(),
            reason: reason.clone(),
        });
        let deny = if l.egress { DENY_EGRESS } else { DENY_INGRESS };
        d.rulesets.entry(deny.to_string()).or_insert(Ruleset {
            egress: l.egress,
            ..Default::default()
        });
    }
    for (e, both) in snap.endpoints.iter().zip(chain_of) {
        for (egress, name) in [(false, &both[0]), (true, &both[1])] {
            let Some(name) = name else { continue };
            let name = if denied.contains_key(name) {
                if egress { DENY_EGRESS } else { DENY_INGRESS }.to_string()
            } else {
                name.clone()
            };
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

/// Numbers the classes of `lay` (freeing those no longer used) and puts them into `d`'s
/// address maps; which classes hold each group.
fn place(
    d: &mut Desired,
    lay: ClassLayout,
    classes: &mut Classes,
) -> HashMap<GroupId, BTreeSet<u32>> {
    let (segs4, segs6, pts4, pts6) = lay;
    let live: std::collections::HashSet<&[GroupId]> = segs4
        .iter()
        .chain(&segs6)
        .map(|s| s.2.as_slice())
        .chain(pts4.iter().chain(&pts6).map(|p| p.1.as_slice()))
        .collect();
    classes.retain(&live);
    let mut classes_of: HashMap<GroupId, BTreeSet<u32>> = HashMap::new();
    let mut note = |set: &[GroupId], id: u32| {
        for g in set {
            classes_of.entry(*g).or_default().insert(id);
        }
    };
    for (a, b, set) in &segs4 {
        let id = classes.id(set);
        d.class4
            .insert((Ipv4Addr::from(*a as u32), Ipv4Addr::from(*b as u32)), id);
        note(set, id);
    }
    for (a, b, set) in &segs6 {
        let id = classes.id(set);
        d.class6
            .insert((Ipv6Addr::from(*a), Ipv6Addr::from(*b)), id);
        note(set, id);
    }
    for (a, set) in &pts4 {
        let id = classes.id(set);
        d.addr4.insert(Ipv4Addr::from(*a as u32), id);
        note(set, id);
    }
    for (a, set) in &pts6 {
        let id = classes.id(set);
        d.addr6.insert(Ipv6Addr::from(*a), id);
        note(set, id);
    }
    classes_of
}

/// The address maps alone, of every group of `snap` (no ruleset, no budget): what layout
/// 7's tier plan ([`tier_tables`]) is laid over.
pub fn addresses(snap: &NodeSnapshot, classes: &mut Classes) -> Desired {
    let mut d = Desired {
        version: snap.version,
        digest: Some(snap.digest),
        ..Default::default()
    };
    place(&mut d, layout(snap, &BTreeSet::new()), classes);
    d
}

/// Whether a rule takes its ports from its peers' named ports (its ruleset then needs named
/// lookups, even while no entry resolves).
pub fn takes_named_ports(r: &Rule) -> bool {
    matches!((&r.peers, &r.ports), (Peers::Groups(_), Ports::FromGroups))
}

/// Whether a direction gets entries: a NetworkPolicy isolates it, or a cluster policy has
/// rules for it (its Admin and Baseline rules apply also where nothing isolates).
fn enforced(d: &moat_policy::ir::DirectionRules, rules: &HashMap<RuleId, &Rule>) -> bool {
    d.isolated || tiers::tiered(&d.rules, rules)
}

/// The entries no budget can cut: one per address of an enforced endpoint direction (a
/// denied direction needs its entry as much as any).
pub fn endpoint_entries(snap: &NodeSnapshot) -> usize {
    let rules: HashMap<RuleId, &Rule> = snap.rules.iter().map(|r| (r.id, &**r)).collect();
    entries_of_endpoints(snap, &rules)
}

/// [`endpoint_entries`] with the snapshot's rules by ID already at hand.
fn entries_of_endpoints(snap: &NodeSnapshot, rules: &HashMap<RuleId, &Rule>) -> usize {
    snap.endpoints
        .iter()
        .map(|e| {
            e.addrs.len()
                * (usize::from(enforced(&e.ingress, rules))
                    + usize::from(enforced(&e.egress, rules)))
        })
        .sum()
}

/// An upper bound of a rule list's elements, from sizes alone.
fn bound(
    ids: &[RuleId],
    rules: &HashMap<RuleId, &Rule>,
    groups: &HashMap<GroupId, &Members>,
    classes_of: &HashMap<GroupId, BTreeSet<u32>>,
) -> usize {
    let mut n = 0usize;
    for id in ids {
        let Some(r) = rules.get(id) else { continue };
        let ports = match &r.ports {
            Ports::Ranges(v) => v.len(),
            _ => 1,
        };
        let peers = match &r.peers {
            Peers::Any => 1,
            Peers::Groups(gs) => gs
                .iter()
                .map(|g| match (&r.ports, groups.get(g)) {
                    (Ports::FromGroups, Some(m)) => match m {
                        Members::AddrPorts(a) => a.len(),
                        _ => 0,
                    },
                    _ => classes_of.get(g).map_or(0, BTreeSet::len),
                })
                .fold(0usize, usize::saturating_add),
        };
        n = n.saturating_add(peers.saturating_mul(ports));
    }
    n
}

/// One rule list's content, counted against `meter` as it grows: a list that can't fit
/// stops as soon as it is known not to, so its cross product is never built.
fn ruleset(
    egress: bool,
    ids: &[RuleId],
    rules: &HashMap<RuleId, &Rule>,
    groups: &HashMap<GroupId, &Members>,
    classes_of: &HashMap<GroupId, BTreeSet<u32>>,
    meter: &mut Meter,
) -> Result<Ruleset, Overflow> {
    use budget::Kind;
    let mut rs = Ruleset {
        egress,
        ..Default::default()
    };
    let mut ap: BTreeMap<u8, Vec<(u16, u16)>> = BTreeMap::new();
    let mut gp: BTreeMap<(u32, u8), BTreeSet<(u16, u16)>> = BTreeMap::new();
    // Raw (class, protocol, range) entries before merging, bounded by what the port maps
    // could still take: merging only ever shrinks them, so more than that can never fit.
    let room = |m: &Meter| {
        let b = m.budget;
        let exact = b.ports_exact.saturating_sub(m.used.ports_exact);
        let ranged = b.ports_ranged.saturating_sub(m.used.ports_ranged);
        let total = b.total.saturating_sub(m.used.total);
        let ports = exact.saturating_add(ranged);
        if total < ports {
            (total, Kind::Total)
        } else {
            (ports, Kind::PortsExact)
        }
    };
    let mut raw = 0usize;
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
                    for c in classes_of.get(g).unwrap_or(&empty) {
                        if rs.aa.insert(*c) {
                            meter.take(Kind::PortsRanged, 1)?;
                        }
                    }
                }
            }
            (Peers::Groups(gs), Ports::Ranges(ranges)) => {
                for g in gs {
                    for c in classes_of.get(g).unwrap_or(&empty) {
                        for x in ranges {
                            if gp
                                .entry((*c, x.proto.number()))
                                .or_default()
                                .insert((x.first, x.last))
                            {
                                raw += 1;
                                let (limit, kind) = room(meter);
                                if raw > limit {
                                    return Err(Overflow {
                                        kind,
                                        needed: raw,
                                        limit,
                                    });
                                }
                            }
                        }
                    }
                }
            }
            (Peers::Groups(gs), Ports::FromGroups) => {
                for g in gs {
                    if let Some(Members::AddrPorts(m)) = groups.get(g) {
                        for ap in m {
                            let new = match ap.addr {
                                IpAddr::V4(a) => rs.n4.insert((a, ap.proto.number(), ap.port)),
                                IpAddr::V6(a) => rs.n6.insert((a, ap.proto.number(), ap.port)),
                            };
                            if new {
                                meter.take(Kind::Named, 1)?;
                            }
                        }
                    }
                }
            }
            (Peers::Any, Ports::FromGroups) => {}
        }
    }
    for (proto, v) in ap {
        for (a, b) in merge(v) {
            meter.take(Kind::PortsRanged, meter.budget.port_range(a, b))?;
            rs.ap.insert((proto, a, b));
        }
    }
    for ((class, proto), v) in gp {
        if rs.aa.contains(&class) {
            continue;
        }
        for (a, b) in merge(v.into_iter().collect()) {
            if a == b {
                meter.take(Kind::PortsExact, 1)?;
                rs.gx.insert((class, proto, a));
            } else {
                meter.take(Kind::PortsRanged, meter.budget.port_range(a, b))?;
                rs.gp.insert((class, proto, a, b));
            }
        }
    }
    Ok(rs)
}

#[cfg(test)]
mod tests;
