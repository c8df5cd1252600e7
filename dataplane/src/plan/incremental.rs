//! Updating the desired table in place for the most common delta — pods coming and going
//! elsewhere in the cluster, i.e. address-group membership patches and nothing else —
//! instead of recomputing it from the whole snapshot. The work is proportional to the
//! addresses that changed (plus, for a class that appears or disappears, the rules of the
//! rulesets that mention its groups), not to the size of the table.
//!
//! Lists with ClusterNetworkPolicy rules are patched the same way: a class coming to life
//! gets the entries [`tiers`](super::tiers) would resolve for it (allow and deny), a class
//! dying loses both, and a named-port entry at an address whose groups changed is resolved
//! again (its verdict folds in the rules of the address's class).
//!
//! The result equals a full [`desired`](super::desired) up to class numbering
//! (the tests compare both on random clusters); every other delta takes the full path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use moat_policy::ir::delta::{Delta, GroupPatch};
use moat_policy::ir::{GroupId, Members, NodeSnapshot, Peers, Ports, Rule, RuleId};

use super::budget::{Budget, Overflow};
use super::tiers::{self, Entry, Ranked, Resolver};
use super::{Classes, Desired, Ruleset, list_name, merge, spans, takes_named_ports, v4, v6};

/// What the in-place update needs to know beyond the table itself.
#[derive(Default)]
pub struct Cache {
    /// Address → the groups listing it as a single address (sorted).
    singles: HashMap<IpAddr, Vec<GroupId>>,
    /// Class → how many class-map and address-map entries use it.
    refs: HashMap<u32, usize>,
    /// Ruleset chain → its rule list.
    rules: HashMap<String, List>,
    /// Rulesets with cluster rules and named-port rules (their named entries' verdicts
    /// depend on the classes of their addresses).
    tiered_named: BTreeSet<String>,
    /// Group → the rulesets with a rule naming it as a peer.
    users: HashMap<GroupId, Vec<String>>,
}

/// One rule list with a ruleset.
struct List {
    /// In the snapshot's order.
    rules: Vec<Arc<Rule>>,
    isolated: bool,
    /// A list with cluster rules (resolved by [`tiers`]), indexed once: a patch only ever
    /// resolves a few classes of it.
    ranked: Option<Ranked<Arc<Rule>>>,
}

/// Builds the cache for `d`, the full desired table of `snap`.
pub fn cache(snap: &NodeSnapshot, d: &Desired) -> Cache {
    let mut c = Cache::default();
    for (to, wrap) in [
        (
            v4 as fn(IpAddr) -> Option<u128>,
            (|a: u128| IpAddr::V4(Ipv4Addr::from(a as u32))) as fn(u128) -> IpAddr,
        ),
        (v6, |a: u128| IpAddr::V6(Ipv6Addr::from(a))),
    ] {
        for (a, g) in spans(snap, to).singles {
            c.singles.entry(wrap(a)).or_default().push(g);
        }
    }
    for id in d
        .class4
        .values()
        .chain(d.class6.values())
        .chain(d.addr4.values())
        .chain(d.addr6.values())
    {
        *c.refs.entry(*id).or_default() += 1;
    }
    let by_id: HashMap<RuleId, Arc<Rule>> =
        snap.rules.iter().map(|r| (r.id, Arc::clone(r))).collect();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for e in &snap.endpoints {
        for (egress, dir) in [(false, &e.ingress), (true, &e.egress)] {
            let tiered = tiers::tiered(&dir.rules, &by_id);
            if !dir.isolated && !tiered {
                continue;
            }
            let name = list_name(egress, dir.isolated, &dir.rules);
            if !seen.insert(name.clone()) {
                continue;
            }
            let rules: Vec<Arc<Rule>> = dir
                .rules
                .iter()
                .filter_map(|id| by_id.get(id).cloned())
                .collect();
            let mut groups: BTreeSet<GroupId> = BTreeSet::new();
            for r in &rules {
                if let Peers::Groups(gs) = &r.peers {
                    groups.extend(gs.iter().copied());
                }
            }
            for g in groups {
                c.users.entry(g).or_default().push(name.clone());
            }
            if tiered && rules.iter().any(|r| takes_named_ports(r)) {
                c.tiered_named.insert(name.clone());
            }
            let ranked = tiered.then(|| Ranked::new(rules.clone()));
            c.rules.insert(
                name,
                List {
                    rules,
                    isolated: dir.isolated,
                    ranked,
                },
            );
        }
    }
    c
}

fn old_group(old: &NodeSnapshot, id: GroupId) -> Option<&Members> {
    old.groups.iter().find(|g| g.id == id).map(|g| &g.members)
}

/// Can `delta` (from `old`) be applied in place? Only when it changes nothing but the
/// members of address groups (patched, or resent whole, or removed). A plan that degraded
/// something is never patched (the patch could not tell when the cut rules fit again), and
/// a patched plan must still pass [`Desired::check`](super::Desired::check) against the
/// budget, else it is recomputed whole.
pub fn applies(old: &NodeSnapshot, delta: &Delta) -> bool {
    let addrs = |m: Option<&Members>| matches!(m, None | Some(Members::Addrs(_)));
    // Each group changed at most once: the patch reads every change against the old group,
    // while applying a delta takes removals, then upserts, then patches in turn. The server
    // never repeats a group; a delta that does (a bug, or crafted) is planned whole, never
    // patched into a table that lost a Deny's members.
    let mut seen = std::collections::HashSet::new();
    let once = delta
        .patch_groups
        .iter()
        .map(|p| match p {
            GroupPatch::Addrs { id, .. } | GroupPatch::AddrPorts { id, .. } => *id,
        })
        .chain(delta.upsert_groups.iter().map(|g| g.id))
        .chain(delta.remove_groups.iter().copied())
        .all(|id| seen.insert(id));
    once && delta.node_addrs.is_none()
        && delta.upsert_endpoints.is_empty()
        && delta.remove_endpoints.is_empty()
        && delta.add_rules.is_empty()
        && delta.remove_rules.is_empty()
        && delta
            .patch_groups
            .iter()
            .all(|p| matches!(p, GroupPatch::Addrs { .. }))
        && delta
            .upsert_groups
            .iter()
            .all(|g| addrs(Some(&g.members)) && addrs(old_group(old, g.id)))
        && delta
            .remove_groups
            .iter()
            .all(|id| addrs(old_group(old, *id)))
}

/// Every membership change of `delta`: (group, added, removed).
fn changes(old: &NodeSnapshot, delta: &Delta) -> Vec<(GroupId, Vec<IpAddr>, Vec<IpAddr>)> {
    let members = |m: Option<&Members>| -> BTreeSet<IpAddr> {
        match m {
            Some(Members::Addrs(a)) => a.iter().copied().collect(),
            _ => BTreeSet::new(),
        }
    };
    let mut out = Vec::new();
    for p in &delta.patch_groups {
        if let GroupPatch::Addrs { id, add, remove } = p {
            out.push((*id, add.clone(), remove.clone()));
        }
    }
    for g in &delta.upsert_groups {
        let (was, now) = (members(old_group(old, g.id)), members(Some(&g.members)));
        out.push((
            g.id,
            now.difference(&was).copied().collect(),
            was.difference(&now).copied().collect(),
        ));
    }
    for id in &delta.remove_groups {
        out.push((
            *id,
            Vec::new(),
            members(old_group(old, *id)).into_iter().collect(),
        ));
    }
    out
}

/// `cur` (the table of `old`) moved to `new` by `delta`, which must [apply](applies);
/// `cache` and `classes` are updated along.
pub fn patch(
    cur: &Desired,
    cache: &mut Cache,
    classes: &mut Classes,
    old: &NodeSnapshot,
    new: &NodeSnapshot,
    delta: &Delta,
) -> Desired {
    let mut d = cur.clone();
    patch_in_place(&mut d, cache, classes, old, new, delta);
    d
}

/// What [`patch_in_place`] changed, for a dataplane that writes only that.
#[derive(Debug, Default)]
pub struct Patched {
    /// Single addresses whose class changed: address → (class before, class after).
    pub addrs: BTreeMap<IpAddr, (Option<u32>, Option<u32>)>,
    /// Rulesets that changed: the elements they lost and gained (class entries only: a
    /// patch never touches the rest).
    pub rulesets: BTreeMap<String, RulesetChange>,
    /// Classes that came to life, and that died (their numbers freed).
    pub born: BTreeSet<u32>,
    pub died: BTreeSet<u32>,
}

#[derive(Debug, Default)]
pub struct RulesetChange {
    pub removed: Ruleset,
    pub added: Ruleset,
}

impl RulesetChange {
    /// Drops what was removed and added back (a class number released and reused).
    fn net(&mut self) {
        fn both<T: Ord + Copy>(a: &mut BTreeSet<T>, b: &mut BTreeSet<T>) {
            let common: Vec<T> = a.intersection(b).copied().collect();
            for x in common {
                a.remove(&x);
                b.remove(&x);
            }
        }
        let (r, a) = (&mut self.removed, &mut self.added);
        both(&mut r.aa, &mut a.aa);
        both(&mut r.gx, &mut a.gx);
        both(&mut r.gp, &mut a.gp);
        both(&mut r.n4, &mut a.n4);
        both(&mut r.n6, &mut a.n6);
        let (r, a) = (&mut r.deny, &mut a.deny);
        both(&mut r.aa, &mut a.aa);
        both(&mut r.gx, &mut a.gx);
        both(&mut r.gp, &mut a.gp);
        both(&mut r.n4, &mut a.n4);
        both(&mut r.n6, &mut a.n6);
    }
}

/// [`patch`] without the copy: `d` (the table of `old`) becomes the table of `new`.
pub fn patch_in_place(
    d: &mut Desired,
    cache: &mut Cache,
    classes: &mut Classes,
    old: &NodeSnapshot,
    new: &NodeSnapshot,
    delta: &Delta,
) -> Patched {
    let mut log = Patched::default();
    d.version = new.version;
    d.digest = Some(new.digest);
    let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
    for (id, add, remove) in changes(old, delta) {
        let id = &id;
        for a in &remove {
            if let Some(v) = cache.singles.get_mut(a) {
                v.retain(|g| g != id);
            }
            touched.insert(*a);
        }
        for a in &add {
            let v = cache.singles.entry(*a).or_default();
            if let Err(i) = v.binary_search(id) {
                v.insert(i, *id);
            }
            touched.insert(*a);
        }
    }
    // Class → (references before, after), for the classes whose count moved.
    let mut changed: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    let mut count = |refs: &mut HashMap<u32, usize>, id: u32, up: bool| {
        let r = refs.entry(id).or_default();
        let e = changed.entry(id).or_insert((*r, *r));
        if up {
            *r += 1;
        } else {
            *r -= 1;
        }
        e.1 = *r;
    };
    // Touched address → its groups now (its class), for named entries resolved again.
    let mut groups_now: Vec<(IpAddr, Vec<GroupId>)> = Vec::new();
    for a in touched {
        let singles = cache.singles.get(&a).cloned().unwrap_or_default();
        if singles.is_empty() {
            cache.singles.remove(&a);
        }
        let range_class = d.range_class_at(a);
        let old = match a {
            IpAddr::V4(x) => d.addr4.remove(&x),
            IpAddr::V6(x) => d.addr6.remove(&x),
        };
        if let Some(o) = old {
            count(&mut cache.refs, o, false);
        }
        if singles.is_empty() {
            log.addrs.insert(a, (old, None));
            if !cache.tiered_named.is_empty() {
                let set = range_class
                    .and_then(|rc| classes.groups(rc))
                    .unwrap_or_default();
                groups_now.push((a, set.to_vec()));
            }
            continue;
        }
        let mut set = singles;
        if let Some(rc) = range_class {
            set.extend_from_slice(classes.groups(rc).unwrap_or_default());
            set.sort_unstable();
            set.dedup();
        }
        if !cache.tiered_named.is_empty() {
            groups_now.push((a, set.clone()));
        }
        let id = classes.id(&set);
        match a {
            IpAddr::V4(x) => d.addr4.insert(x, id),
            IpAddr::V6(x) => d.addr6.insert(x, id),
        };
        count(&mut cache.refs, id, true);
        log.addrs.insert(a, (old, Some(id)));
    }
    // Classes that died lose their rule entries first (their numbers may be reused below).
    for (id, (was, now)) in &changed {
        if *was > 0 && *now == 0 {
            let groups = classes.groups(*id).unwrap_or_default().to_vec();
            for name in users(cache, &groups) {
                if let Some(rs) = d.rulesets.get_mut(&name) {
                    let removed = &mut log.rulesets.entry(name).or_default().removed;
                    drop_class(rs, *id, removed);
                }
            }
            cache.refs.remove(id);
            classes.release(*id);
            log.died.insert(*id);
        }
    }
    // Class entries resolve without members (only named entries read them).
    let no_members = HashMap::new();
    let mut resolvers: HashMap<String, Resolver<'_, Arc<Rule>>> = HashMap::new();
    for (id, (was, now)) in &changed {
        if *was == 0 && *now > 0 {
            log.born.insert(*id);
            let groups = classes.groups(*id).unwrap_or_default().to_vec();
            for name in users(cache, &groups) {
                let (Some(rs), Some(list)) = (d.rulesets.get_mut(&name), cache.rules.get(&name))
                else {
                    continue;
                };
                let mut added = Ruleset::default();
                if let Some(ranked) = &list.ranked {
                    let r = resolvers
                        .entry(name.clone())
                        .or_insert_with(|| Resolver::new(ranked, list.isolated, &no_members));
                    if r.names(&groups) {
                        r.class(*id, &groups, &mut |allow, e| put(&mut added, allow, e))
                            .expect("unmetered");
                    }
                } else {
                    add_class(&mut added, &list.rules, *id, &groups);
                }
                merge_into(rs, &added);
                merge_into(&mut log.rulesets.entry(name).or_default().added, &added);
            }
        }
    }
    drop(resolvers);
    if !groups_now.is_empty() {
        renamed(d, cache, new, &groups_now, &mut log);
    }
    log.addrs.retain(|_, (was, now)| was != now);
    for c in log.rulesets.values_mut() {
        c.net();
    }
    log
}

/// Unmetered: a patched table is checked against the budget whole afterwards.
fn put(rs: &mut Ruleset, allow: bool, e: Entry) -> Result<(), Overflow> {
    tiers::insert(rs, allow, e, &Budget::UNLIMITED);
    Ok(())
}

/// Adds every entry of `from` to `to`, on its side.
fn merge_into(to: &mut Ruleset, from: &Ruleset) {
    to.aa.extend(&from.aa);
    to.gx.extend(&from.gx);
    to.gp.extend(&from.gp);
    to.n4.extend(&from.n4);
    to.n6.extend(&from.n6);
    let (t, f) = (&mut to.deny, &from.deny);
    t.aa.extend(&f.aa);
    t.gx.extend(&f.gx);
    t.gp.extend(&f.gp);
    t.n4.extend(&f.n4);
    t.n6.extend(&f.n6);
}

/// Removes class `id`'s entries, allow and deny, from `rs`, noting them in `removed`.
pub(super) fn drop_class(rs: &mut Ruleset, id: u32, removed: &mut Ruleset) {
    // Entries are ordered by class first: the class's are one range.
    fn take<T: Ord + Copy>(
        set: &mut BTreeSet<T>,
        range: std::ops::RangeInclusive<T>,
        out: &mut BTreeSet<T>,
    ) {
        let found: Vec<T> = set.range(range).copied().collect();
        for e in found {
            set.remove(&e);
            out.insert(e);
        }
    }
    let gx = (id, 0, 0)..=(id, u8::MAX, u16::MAX);
    let gp = (id, 0, 0, 0)..=(id, u8::MAX, u16::MAX, u16::MAX);
    take(&mut rs.aa, id..=id, &mut removed.aa);
    take(&mut rs.gx, gx.clone(), &mut removed.gx);
    take(&mut rs.gp, gp.clone(), &mut removed.gp);
    take(&mut rs.deny.aa, id..=id, &mut removed.deny.aa);
    take(&mut rs.deny.gx, gx, &mut removed.deny.gx);
    take(&mut rs.deny.gp, gp, &mut removed.deny.gp);
}

/// Resolves again the named entries at addresses whose class changed, in the rulesets with
/// cluster rules (elsewhere a named entry allows whatever the address's class).
fn renamed(
    d: &mut Desired,
    cache: &Cache,
    new: &NodeSnapshot,
    groups_now: &[(IpAddr, Vec<GroupId>)],
    log: &mut Patched,
) {
    // The named entries at those addresses: (ruleset, address's index, protocol, port,
    // allowed). Most patches find none and stop here.
    let mut found: Vec<(&String, usize, u8, u16, bool)> = Vec::new();
    for name in &cache.tiered_named {
        let Some(rs) = d.rulesets.get(name) else {
            continue;
        };
        for (i, (a, _)) in groups_now.iter().enumerate() {
            let mut note =
                |p: u8, port: u16, allowed: bool| found.push((name, i, p, port, allowed));
            match a {
                IpAddr::V4(x) => {
                    let at = (*x, 0, 0)..=(*x, u8::MAX, u16::MAX);
                    rs.n4.range(at.clone()).for_each(|k| note(k.1, k.2, true));
                    rs.deny.n4.range(at).for_each(|k| note(k.1, k.2, false));
                }
                IpAddr::V6(x) => {
                    let at = (*x, 0, 0)..=(*x, u8::MAX, u16::MAX);
                    rs.n6.range(at.clone()).for_each(|k| note(k.1, k.2, true));
                    rs.deny.n6.range(at).for_each(|k| note(k.1, k.2, false));
                }
            }
        }
    }
    if found.is_empty() {
        return;
    }
    let members: HashMap<GroupId, &Members> =
        new.groups.iter().map(|g| (g.id, &g.members)).collect();
    let mut resolvers: HashMap<&String, Resolver<'_, Arc<Rule>>> = HashMap::new();
    for (name, i, p, port, was) in found {
        let (Some(list), Some(rs)) = (cache.rules.get(name), d.rulesets.get_mut(name)) else {
            continue;
        };
        let Some(ranked) = &list.ranked else { continue };
        let r = resolvers
            .entry(name)
            .or_insert_with(|| Resolver::new(ranked, list.isolated, &members));
        let (a, groups) = &groups_now[i];
        let now = r.named(*a, groups, p, port);
        if now == was {
            continue;
        }
        let (mut gone, mut came) = (Ruleset::default(), Ruleset::default());
        tiers::insert(
            &mut gone,
            was,
            Entry::Named(*a, p, port),
            &Budget::UNLIMITED,
        );
        tiers::insert(
            &mut came,
            now,
            Entry::Named(*a, p, port),
            &Budget::UNLIMITED,
        );
        match (a, was) {
            (IpAddr::V4(x), true) => rs.n4.remove(&(*x, p, port)),
            (IpAddr::V4(x), false) => rs.deny.n4.remove(&(*x, p, port)),
            (IpAddr::V6(x), true) => rs.n6.remove(&(*x, p, port)),
            (IpAddr::V6(x), false) => rs.deny.n6.remove(&(*x, p, port)),
        };
        merge_into(rs, &came);
        let change = log.rulesets.entry(name.clone()).or_default();
        merge_into(&mut change.removed, &gone);
        merge_into(&mut change.added, &came);
    }
}

fn users(cache: &Cache, groups: &[GroupId]) -> BTreeSet<String> {
    groups
        .iter()
        .filter_map(|g| cache.users.get(g))
        .flatten()
        .cloned()
        .collect()
}

/// Adds class `id` (made of `groups`) to a ruleset, as `desired::ruleset` would have.
pub(super) fn add_class<R: std::borrow::Borrow<Rule>>(
    rs: &mut Ruleset,
    rules: &[R],
    id: u32,
    groups: &[GroupId],
) {
    let mut any = false;
    let mut ports: BTreeMap<u8, Vec<(u16, u16)>> = BTreeMap::new();
    for r in rules {
        let r = r.borrow();
        let Peers::Groups(gs) = &r.peers else {
            continue;
        };
        if !gs.iter().any(|g| groups.binary_search(g).is_ok()) {
            continue;
        }
        match &r.ports {
            Ports::Any => any = true,
            Ports::Ranges(ranges) => {
                for x in ranges {
                    ports
                        .entry(x.proto.number())
                        .or_default()
                        .push((x.first, x.last));
                }
            }
            Ports::FromGroups => {}
        }
    }
    if any {
        rs.aa.insert(id);
        return;
    }
    for (proto, v) in ports {
        for (a, b) in merge(v) {
            if a == b {
                rs.gx.insert((id, proto, a));
            } else {
                rs.gp.insert((id, proto, a, b));
            }
        }
    }
}

#[cfg(test)]
mod tests;
