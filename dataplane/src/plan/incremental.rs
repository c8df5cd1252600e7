//! Updating the desired table in place for the most common delta — pods coming and going
//! elsewhere in the cluster, i.e. address-group membership patches and nothing else —
//! instead of recomputing it from the whole snapshot. The work is proportional to the
//! addresses that changed (plus, for a class that appears or disappears, the rules of the
//! rulesets that mention its groups), not to the size of the table.
//!
//! The result equals a full [`desired`](super::desired) up to class numbering
//! (the tests compare both on random clusters); every other delta takes the full path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use moat_policy::ir::delta::{Delta, GroupPatch};
use moat_policy::ir::{GroupId, Members, NodeSnapshot, Peers, Ports, Rule, RuleId};

use super::{Classes, Desired, Ruleset, chain_name, merge, spans, v4, v6};

/// What the in-place update needs to know beyond the table itself.
#[derive(Default)]
pub struct Cache {
    /// Address → the groups listing it as a single address (sorted).
    singles: HashMap<IpAddr, Vec<GroupId>>,
    /// Class → how many class-map and address-map entries use it.
    refs: HashMap<u32, usize>,
    /// Ruleset chain → its rules, in order.
    rules: HashMap<String, Vec<Arc<Rule>>>,
    /// Group → the rulesets with a rule naming it as a peer.
    users: HashMap<GroupId, Vec<String>>,
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
    let by_id: HashMap<RuleId, &Arc<Rule>> = snap.rules.iter().map(|r| (r.id, r)).collect();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for e in &snap.endpoints {
        for (egress, dir) in [(false, &e.ingress), (true, &e.egress)] {
            if !dir.isolated {
                continue;
            }
            let name = chain_name(egress, &dir.rules);
            if !seen.insert(name.clone()) {
                continue;
            }
            let rules: Vec<Arc<Rule>> = dir
                .rules
                .iter()
                .filter_map(|id| by_id.get(id).map(|r| Arc::clone(r)))
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
            c.rules.insert(name, rules);
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
    // Lists with cluster rules are resolved whole (`tiers`): a class appearing there changes
    // verdicts at many keys, which the patch below does not know how to fold.
    old.rules
        .iter()
        .all(|r| r.tier == moat_policy::ir::Tier::NetworkPolicy)
        && delta.node_addrs.is_none()
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
        both(&mut self.removed.aa, &mut self.added.aa);
        both(&mut self.removed.gx, &mut self.added.gx);
        both(&mut self.removed.gp, &mut self.added.gp);
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
    for a in touched {
        let singles = cache.singles.get(&a).cloned().unwrap_or_default();
        if singles.is_empty() {
            cache.singles.remove(&a);
        }
        let range_class = match a {
            IpAddr::V4(x) => d
                .class4
                .range(..=(x, Ipv4Addr::from(u32::MAX)))
                .next_back()
                .filter(|((lo, hi), _)| *lo <= x && x <= *hi)
                .map(|(_, c)| *c),
            IpAddr::V6(x) => d
                .class6
                .range(..=(x, Ipv6Addr::from(u128::MAX)))
                .next_back()
                .filter(|((lo, hi), _)| *lo <= x && x <= *hi)
                .map(|(_, c)| *c),
        };
        let old = match a {
            IpAddr::V4(x) => d.addr4.remove(&x),
            IpAddr::V6(x) => d.addr6.remove(&x),
        };
        if let Some(o) = old {
            count(&mut cache.refs, o, false);
        }
        if singles.is_empty() {
            log.addrs.insert(a, (old, None));
            continue;
        }
        let mut set = singles;
        if let Some(rc) = range_class {
            set.extend_from_slice(classes.groups(rc).unwrap_or_default());
            set.sort_unstable();
            set.dedup();
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
                    if rs.aa.remove(id) {
                        removed.aa.insert(*id);
                    }
                    // Entries are ordered by class first: the class's are one range.
                    let gx: Vec<_> = rs
                        .gx
                        .range((*id, 0, 0)..=(*id, u8::MAX, u16::MAX))
                        .copied()
                        .collect();
                    for e in gx {
                        rs.gx.remove(&e);
                        removed.gx.insert(e);
                    }
                    let gp: Vec<_> = rs
                        .gp
                        .range((*id, 0, 0, 0)..=(*id, u8::MAX, u16::MAX, u16::MAX))
                        .copied()
                        .collect();
                    for e in gp {
                        rs.gp.remove(&e);
                        removed.gp.insert(e);
                    }
                }
            }
            cache.refs.remove(id);
            classes.release(*id);
        }
    }
    for (id, (was, now)) in &changed {
        if *was == 0 && *now > 0 {
            let groups = classes.groups(*id).unwrap_or_default().to_vec();
            for name in users(cache, &groups) {
                if let (Some(rs), Some(rules)) = (d.rulesets.get_mut(&name), cache.rules.get(&name))
                {
                    let mut added = Ruleset::default();
                    add_class(&mut added, rules, *id, &groups);
                    rs.aa.extend(added.aa.iter().copied());
                    rs.gx.extend(added.gx.iter().copied());
                    rs.gp.extend(added.gp.iter().copied());
                    let change = &mut log.rulesets.entry(name).or_default().added;
                    change.aa.extend(added.aa);
                    change.gx.extend(added.gx);
                    change.gp.extend(added.gp);
                }
            }
        }
    }
    log.addrs.retain(|_, (was, now)| was != now);
    for c in log.rulesets.values_mut() {
        c.net();
    }
    log
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
fn add_class(rs: &mut Ruleset, rules: &[Arc<Rule>], id: u32, groups: &[GroupId]) {
    let mut any = false;
    let mut ports: BTreeMap<u8, Vec<(u16, u16)>> = BTreeMap::new();
    for r in rules {
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
