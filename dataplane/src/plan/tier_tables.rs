//! The cluster tiers as tables of their own (map layout 7's plan; the design is
//! `docs/design/cluster-tiers.md`, "Next"). Not yet taken by a dataplane: the dataplanes
//! still enforce [`super::tiers`]' resolved rulesets. This is the plan's half, checked
//! against the IR on random clusters and measured by `moat-bench cnp-node`.
//!
//! Why: resolving the tiers into every rule list copies each Admin rule into each list
//! holding it, and a broad Admin peer then names every class of the node, so the largest
//! node at the Antrea scale needs millions of entries. The Admin and Baseline tiers only
//! see the cluster rules' groups, so:
//!
//! * every peer address gets a **cluster class**: the cluster-rule groups of its class
//!   and, for the groups of cluster rules with named ports, the (protocol, port) each
//!   resolves to at that address. Addresses alike to the cluster rules share one, whatever
//!   their NetworkPolicy groups;
//! * every distinct Admin or Baseline rule list is one **table** keyed by (cluster class,
//!   protocol, port segment), each entry the first matching rule's action, any-peer rules
//!   folded in. A class the table holds nothing for is judged as class 0 (no cluster
//!   group), and a miss there passes: two longest-prefix lookups at most decide a tier;
//! * an endpoint direction points at its Admin table, its NetworkPolicy ruleset (exactly
//!   a NetworkPolicy-only ruleset: allows, ORed) when a NetworkPolicy isolates it, and
//!   else its Baseline table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use moat_policy::ir::{Action, GroupId, Members, NodeSnapshot, Peers, Ports, Rule, RuleId, Tier};

mod patch;

pub use patch::{TiersPatched, patch};

use super::budget::{Budget, Kind, Meter, Overflow};
use super::plant;
use super::tiers::{PORTED, in_ranges, merged, segments};
use super::{Classes, Desired, Ruleset, list_name, take_ruleset};

/// What a peer address is to the cluster rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterClass {
    /// The cluster-rule groups of its address class, sorted.
    pub groups: Vec<GroupId>,
    /// Its resolved named ports in the named-port groups of cluster rules: (group,
    /// protocol, port), sorted.
    pub named: Vec<(GroupId, u8, u16)>,
}

/// One Admin or Baseline rule list as a table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierTable {
    /// Cluster class → its action wherever none of its port entries holds (protocols
    /// without ports included). A class not here is judged as class 0; class 0 not here:
    /// the tier passes.
    pub whole: BTreeMap<u32, Action>,
    /// (cluster class, protocol, first, last) → action: disjoint per (class, protocol),
    /// each differing from the class's whole action.
    pub ports: BTreeMap<(u32, u8, u16, u16), Action>,
}

impl TierTable {
    /// The tier's action for a peer of cluster class `cc` (`None`: a miss, which passes).
    pub fn lookup(&self, cc: u32, proto: u8, port: u16) -> Option<Action> {
        let c = if self.whole.contains_key(&cc) { cc } else { 0 };
        let whole = *self.whole.get(&c)?;
        if PORTED.contains(&proto)
            && let Some((&(kc, kp, lo, hi), a)) =
                self.ports.range(..=(c, proto, port, u16::MAX)).next_back()
            && (kc, kp) == (c, proto)
            && lo <= port
            && port <= hi
        {
            return Some(*a);
        }
        Some(whole)
    }

    pub fn entries(&self) -> usize {
        self.whole.len() + self.ports.len()
    }

    /// What it costs within `b`: an entry per class's whole verdict, its port runs as the
    /// prefixes an LPM trie needs where the budget counts prefixes.
    pub fn cost(&self, b: &Budget) -> usize {
        self.whole.len()
            + self
                .ports
                .keys()
                .map(|k| b.port_range(k.2, k.3))
                .fold(0usize, usize::saturating_add)
    }
}

/// An endpoint direction's tiers, by table and ruleset name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tiers {
    pub admin: Option<String>,
    /// Its NetworkPolicy ruleset, when a NetworkPolicy isolates it.
    pub np: Option<String>,
    /// Its Baseline table, when no NetworkPolicy isolates it.
    pub baseline: Option<String>,
    /// Its rule list names a rule the snapshot does not hold: denied whole (fail closed).
    pub denied: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierPlan {
    /// Cluster class → number (class 0, no cluster group and no named port, is not here).
    pub cclasses: BTreeMap<ClusterClass, u32>,
    /// Number → cluster class, and how many entries of `of_class` and `of_addr` use it
    /// (its rows go with the last).
    defs: HashMap<u32, (ClusterClass, usize)>,
    free: Vec<u32>,
    next: u32,
    /// The groups cluster rules name with ports of their own, and with named ports.
    plain: BTreeSet<GroupId>,
    named: BTreeSet<GroupId>,
    /// Each table's rules, ranked, and each NetworkPolicy ruleset's.
    pub lists: BTreeMap<String, Vec<RuleId>>,
    pub np_lists: BTreeMap<String, Vec<RuleId>>,
    /// Address class → cluster class, for every address without named ports of its own.
    pub of_class: BTreeMap<u32, u32>,
    /// Addresses in named-port groups of cluster rules → cluster class (over `of_class`).
    pub of_addr: BTreeMap<IpAddr, u32>,
    pub tables: BTreeMap<String, TierTable>,
    /// NetworkPolicy-only rulesets, as [`super::desired`] lays them out.
    pub np: BTreeMap<String, Ruleset>,
    /// (local endpoint address, egress) → its tiers; only enforced directions.
    pub endpoints: BTreeMap<(IpAddr, bool), Tiers>,
    /// Tables and NetworkPolicy rulesets the budget could not hold, with why: the endpoint
    /// directions using one are denied.
    pub degraded: BTreeMap<String, String>,
}

impl TierPlan {
    /// The cluster class of a peer address, as the dataplane finds it.
    pub fn cclass_at(&self, d: &Desired, a: IpAddr) -> u32 {
        if let Some(c) = self.of_addr.get(&a) {
            return *c;
        }
        d.class_at(a)
            .and_then(|c| self.of_class.get(&c))
            .copied()
            .unwrap_or(0)
    }

    /// Every table entry (the measure of fit).
    pub fn table_entries(&self) -> usize {
        self.tables.values().map(TierTable::entries).sum()
    }

    /// Whether the plan fits `budget`, counted as [`tier_plan_within`] counts it. A plan
    /// patched in place that no longer fits must be planned again whole.
    pub fn check(&self, budget: &Budget) -> Result<(), Overflow> {
        let mut m = Meter::new(*budget);
        for t in self.tables.values() {
            m.take(Kind::TierEntries, t.cost(budget))?;
        }
        for rs in self.np.values() {
            take_ruleset(&mut m, rs)?;
        }
        Ok(())
    }

    /// Leaves out what does not fit `budget`, cheapest kept first, and denies its users.
    fn fit(&mut self, budget: &Budget) {
        let mut order: Vec<(usize, bool, String)> = self
            .tables
            .iter()
            .map(|(n, t)| (t.cost(budget), true, n.clone()))
            .chain(
                self.np
                    .iter()
                    .map(|(n, rs)| (rs.elements(), false, n.clone())),
            )
            .collect();
        order.sort();
        let mut m = Meter::new(*budget);
        for (cost, table, name) in order {
            let mut trial = m;
            let fits = if table {
                trial.take(Kind::TierEntries, cost)
            } else {
                take_ruleset(&mut trial, &self.np[&name])
            };
            match fits {
                Ok(()) => m = trial,
                Err(over) => {
                    if table {
                        self.tables.remove(&name);
                        self.lists.remove(&name);
                    } else {
                        self.np.remove(&name);
                        self.np_lists.remove(&name);
                    }
                    self.degraded.insert(name, over.to_string());
                }
            }
        }
        if self.degraded.is_empty() {
            return;
        }
        for t in self.endpoints.values_mut() {
            let gone = [&t.admin, &t.np, &t.baseline]
                .into_iter()
                .flatten()
                .any(|n| self.degraded.contains_key(n));
            t.denied |= gone;
        }
    }

    /// Whether every number's use count is what `of_class` and `of_addr` hold, and the
    /// numbering is one to one (for the tests).
    #[cfg(test)]
    pub(crate) fn numbering_consistent(&self) -> bool {
        let mut uses: HashMap<u32, usize> = HashMap::new();
        for id in self.of_class.values().chain(self.of_addr.values()) {
            *uses.entry(*id).or_default() += 1;
        }
        uses.remove(&0);
        uses.len() == self.defs.len()
            && self.cclasses.len() == self.defs.len()
            && self
                .defs
                .iter()
                .all(|(id, (cc, n))| uses.get(id) == Some(n) && self.cclasses.get(cc) == Some(id))
    }

    /// The cluster class numbered `id`.
    pub fn def(&self, id: u32) -> Option<&ClusterClass> {
        self.defs.get(&id).map(|d| &d.0)
    }

    /// One more use of `cc`: its number, and whether it is new (0, class 0, is never).
    fn take(&mut self, cc: ClusterClass) -> (u32, bool) {
        if cc == ClusterClass::default() {
            return (0, false);
        }
        if let Some(id) = self.cclasses.get(&cc) {
            self.defs.get_mut(id).expect("numbered").1 += 1;
            return (*id, false);
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.cclasses.insert(cc.clone(), id);
        self.defs.insert(id, (cc, 1));
        (id, true)
    }

    /// One use of `id` less; whether it was the last (its number is then free).
    fn give_back(&mut self, id: u32) -> bool {
        let Some(d) = self.defs.get_mut(&id) else {
            return false;
        };
        d.1 -= 1;
        if d.1 > 0 {
            return false;
        }
        let (cc, _) = self.defs.remove(&id).expect("present");
        self.cclasses.remove(&cc);
        self.free.push(id);
        true
    }

    /// The cluster-rule groups among `groups` (an address class's): the cluster class of
    /// its addresses without named ports of their own.
    fn of_groups(&self, groups: Option<&[GroupId]>) -> Vec<GroupId> {
        groups
            .unwrap_or_default()
            .iter()
            .copied()
            .filter(|g| self.plain.contains(g))
            .collect()
    }
}

/// Layout 7's tier plan of `snap`, over the address classes of `d` (planned from `snap`
/// with `classes`), without limits.
pub fn tier_plan(snap: &NodeSnapshot, d: &Desired, classes: &Classes) -> TierPlan {
    tier_plan_within(snap, d, classes, &Budget::UNLIMITED)
}

/// [`tier_plan`] within `budget`: the tables and NetworkPolicy rulesets that do not fit,
/// biggest first, are left out and their endpoint directions denied (fail closed), never
/// opened. (The address maps are `d`'s, counted by their own plan.)
pub fn tier_plan_within(
    snap: &NodeSnapshot,
    d: &Desired,
    classes: &Classes,
    budget: &Budget,
) -> TierPlan {
    let mut tp = build(snap, d, classes);
    tp.fit(budget);
    tp
}

fn build(snap: &NodeSnapshot, d: &Desired, classes: &Classes) -> TierPlan {
    let rules: HashMap<RuleId, &Rule> = snap.rules.iter().map(|r| (r.id, &**r)).collect();
    let members: HashMap<GroupId, &Members> =
        snap.groups.iter().map(|g| (g.id, &g.members)).collect();
    // The groups the cluster rules name, by how they name them.
    let (mut plain, mut named) = (BTreeSet::new(), BTreeSet::new());
    for r in rules.values().filter(|r| r.tier != Tier::NetworkPolicy) {
        if let Peers::Groups(gs) = &r.peers {
            let to = if matches!(r.ports, Ports::FromGroups) {
                &mut named
            } else {
                &mut plain
            };
            to.extend(gs.iter().copied());
        }
    }
    let mut tp = TierPlan {
        plain,
        named,
        ..Default::default()
    };
    for c in d.live_classes() {
        let cc = ClusterClass {
            groups: tp.of_groups(classes.groups(c)),
            named: Vec::new(),
        };
        let (cc, _) = tp.take(cc);
        if cc != 0 {
            tp.of_class.insert(c, cc);
        }
    }
    let mut sig: BTreeMap<IpAddr, Vec<(GroupId, u8, u16)>> = BTreeMap::new();
    for g in &tp.named {
        if let Some(Members::AddrPorts(m)) = members.get(g) {
            for k in m {
                sig.entry(k.addr)
                    .or_default()
                    .push((*g, k.proto.number(), k.port));
            }
        }
    }
    for (addr, mut n) in sig {
        n.sort_unstable();
        n.dedup();
        if plant::on(plant::Plant::NamedPortsNotInClusterClass) {
            n.clear();
        }
        let cc = ClusterClass {
            groups: tp.of_groups(d.class_at(addr).and_then(|c| classes.groups(c))),
            named: n,
        };
        let (cc, _) = tp.take(cc);
        tp.of_addr.insert(addr, cc);
    }
    // Every enforced endpoint direction's tiers, each distinct list built once.
    let classes_of = classes_of(d, classes);
    for e in &snap.endpoints {
        for (egress, dir) in [(false, &e.ingress), (true, &e.egress)] {
            if !super::enforced(dir, &rules) {
                continue;
            }
            let mut t = Tiers {
                denied: dir.rules.iter().any(|id| !rules.contains_key(id)),
                ..Default::default()
            };
            let of = |tier: Tier| -> Vec<RuleId> {
                let mut v: Vec<&Rule> = dir
                    .rules
                    .iter()
                    .filter_map(|id| rules.get(id).copied())
                    .filter(|r| r.tier == tier)
                    .collect();
                v.sort_by_key(|r| (r.priority, r.id));
                v.into_iter().map(|r| r.id).collect()
            };
            let table = |tier: Tier, tp: &mut TierPlan| -> Option<String> {
                let ids = of(tier);
                if ids.is_empty() {
                    return None;
                }
                let name = format!(
                    "{}{}",
                    if tier == Tier::Admin { "A" } else { "B" },
                    list_name(egress, true, &ids)
                );
                if !tp.tables.contains_key(&name) {
                    let list: Vec<&Rule> = ids.iter().map(|id| rules[id]).collect();
                    let t = table_of(&list, &tp.cclasses);
                    tp.tables.insert(name.clone(), t);
                    tp.lists.insert(name.clone(), ids);
                }
                Some(name)
            };
            t.admin = table(Tier::Admin, &mut tp);
            if dir.isolated {
                let ids = of(Tier::NetworkPolicy);
                let name = list_name(egress, true, &ids);
                if !tp.np.contains_key(&name) {
                    let mut m = Meter::new(Budget::UNLIMITED);
                    if let Ok(rs) =
                        super::ruleset(egress, &ids, &rules, &members, &classes_of, &mut m)
                    {
                        tp.np.insert(name.clone(), rs);
                        tp.np_lists.insert(name.clone(), ids);
                    }
                }
                t.np = Some(name);
            } else {
                t.baseline = table(Tier::Baseline, &mut tp);
            }
            for a in &e.addrs {
                tp.endpoints.insert((*a, egress), t.clone());
            }
        }
    }
    tp
}

/// Group → the address classes holding it, from the plan's address maps.
fn classes_of(d: &Desired, classes: &Classes) -> HashMap<GroupId, BTreeSet<u32>> {
    let mut out: HashMap<GroupId, BTreeSet<u32>> = HashMap::new();
    let live = d.live_classes();
    for c in live {
        for g in classes.groups(c).unwrap_or_default() {
            out.entry(*g).or_default().insert(c);
        }
    }
    out
}

/// One tier's rule list (ranked) as a table over every cluster class.
fn table_of(list: &[&Rule], cclasses: &BTreeMap<ClusterClass, u32>) -> TierTable {
    let ix = Indexed::new(list);
    let mut t = TierTable::default();
    put(&mut t, 0, &ix.row0);
    for (cc, id) in cclasses {
        if let Some(row) = ix.rows_of(cc) {
            put(&mut t, *id, &row);
        }
    }
    t
}

/// A ranked rule list indexed by the peers its rules can match.
struct Indexed<'a> {
    list: &'a [&'a Rule],
    any_peer: Vec<usize>,
    by_group: HashMap<GroupId, Vec<usize>>,
    /// The rows of class 0.
    row0: Rows,
}

impl<'a> Indexed<'a> {
    fn new(list: &'a [&'a Rule]) -> Self {
        let mut any_peer = Vec::new();
        let mut by_group: HashMap<GroupId, Vec<usize>> = HashMap::new();
        for (i, r) in list.iter().enumerate() {
            match &r.peers {
                Peers::Any => any_peer.push(i),
                Peers::Groups(gs) => {
                    for g in gs {
                        by_group.entry(*g).or_default().push(i);
                    }
                }
            }
        }
        let row0 = rows(list, &any_peer, &ClusterClass::default());
        Indexed {
            list,
            any_peer,
            by_group,
            row0,
        }
    }

    /// The rows of `cc`, unless it is judged as class 0.
    fn rows_of(&self, cc: &ClusterClass) -> Option<Rows> {
        let mut own: Vec<usize> = cc
            .groups
            .iter()
            .chain(cc.named.iter().map(|(g, _, _)| g))
            .flat_map(|g| self.by_group.get(g).into_iter().flatten().copied())
            .collect();
        // A class no rule names is judged as class 0.
        if own.is_empty() {
            return None;
        }
        // Any-peer rules ranked before the class's own: folded in, never shadowed.
        if !plant::on(plant::Plant::TierAnyPeerNotFolded) {
            own.extend(&self.any_peer);
        }
        own.sort_unstable();
        own.dedup();
        let row = rows(self.list, &own, cc);
        let same = if plant::on(plant::Plant::RowsComparedByWholeOnly) {
            row.0 == self.row0.0
        } else {
            row == self.row0
        };
        (!same).then_some(row)
    }
}

/// A class's whole action and its port runs that differ from it.
type Rows = (Action, Vec<(u8, u16, u16, Action)>);

fn put(t: &mut TierTable, c: u32, (whole, ports): &Rows) {
    if c == 0 && *whole == Action::Pass && ports.is_empty() {
        return;
    }
    t.whole.insert(c, *whole);
    for (p, a, b, act) in ports {
        t.ports.insert((c, *p, *a, *b), *act);
    }
}

/// The rows of cluster class `cc` over the rules `own` (indexes into the ranked `list`:
/// every rule that can match it).
fn rows(list: &[&Rule], own: &[usize], cc: &ClusterClass) -> Rows {
    let first = |proto: Option<u8>, port: u16| -> Action {
        own.iter()
            .map(|i| list[*i])
            .find(|r| matches(r, cc, proto, port))
            .map_or(Action::Pass, |r| r.action)
    };
    let whole = first(None, 0);
    let rules: Vec<&Rule> = own.iter().map(|i| list[*i]).collect();
    // Its named ports cut the port space only where a named-port rule can match them.
    let named: Vec<(u8, u16)> = if rules.iter().any(|r| matches!(r.ports, Ports::FromGroups)) {
        cc.named.iter().map(|(_, p, port)| (*p, *port)).collect()
    } else {
        Vec::new()
    };
    let mut ports = Vec::new();
    for (p, segs) in &segments(&rules, &named) {
        for (a, b, act) in merged(segs, |port| first(Some(*p), port)) {
            if act != whole {
                ports.push((*p, a, b, act));
            }
        }
    }
    (whole, ports)
}

/// Whether rule `r` matches a peer of cluster class `cc` (`proto` `None`: a protocol
/// without ports).
fn matches(r: &Rule, cc: &ClusterClass, proto: Option<u8>, port: u16) -> bool {
    match (&r.ports, &r.peers) {
        (Ports::FromGroups, Peers::Groups(gs)) => proto.is_some_and(|p| {
            gs.iter()
                .any(|g| cc.named.binary_search(&(*g, p, port)).is_ok())
        }),
        (Ports::FromGroups, Peers::Any) => false,
        (ports, peers) => {
            let ports_ok = match ports {
                Ports::Any => true,
                Ports::Ranges(v) => in_ranges(v, proto, port),
                Ports::FromGroups => false,
            };
            ports_ok
                && match peers {
                    Peers::Any => true,
                    Peers::Groups(gs) => gs.iter().any(|g| cc.groups.binary_search(g).is_ok()),
                }
        }
    }
}
