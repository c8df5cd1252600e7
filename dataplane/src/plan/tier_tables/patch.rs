//! A tier plan moved along with an in-place patch of the address maps
//! ([`incremental::patch_in_place`](super::super::incremental::patch_in_place)): pods coming
//! and going elsewhere, group membership and nothing else. Rule lists, endpoints and named
//! ports stay; what moves is which cluster class an address class (or an address with named
//! ports) has, and a cluster class coming to life gets its rows in every table (one
//! dying loses them). The work is proportional to the classes that changed, times the
//! tables, not to the node's size.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use moat_policy::ir::{NodeSnapshot, Rule, RuleId};

use super::super::incremental::{Patched, add_class, drop_class};
use super::super::{Classes, Desired, Ruleset};
use super::{ClusterClass, Indexed, TierPlan, TierTable, put};

/// What [`patch`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TiersPatched {
    /// Cluster classes that came to life (rows added to every table that judges them
    /// otherwise than class 0) and died (rows dropped). A number can be in both: freed
    /// and taken again.
    pub born: BTreeSet<u32>,
    pub died: BTreeSet<u32>,
    /// Address classes, and addresses with named ports, whose cluster class changed.
    pub classes: BTreeSet<u32>,
    pub addrs: BTreeSet<IpAddr>,
}

/// Moves `tp` (the tier plan of the snapshot before) to `new`, whose address maps `d` and
/// `classes` hold after the patch that `log` describes.
pub fn patch(
    tp: &mut TierPlan,
    new: &NodeSnapshot,
    d: &Desired,
    classes: &Classes,
    log: &Patched,
) -> TiersPatched {
    let mut out = TiersPatched::default();
    let took = |tp: &mut TierPlan, cc: ClusterClass, out: &mut TiersPatched| -> u32 {
        let (id, fresh) = tp.take(cc);
        if fresh {
            out.born.insert(id);
        }
        id
    };
    let gave = |tp: &mut TierPlan, id: u32, out: &mut TiersPatched| {
        if tp.give_back(id) {
            out.died.insert(id);
        }
    };
    // The address classes addresses moved out of and into: each one's cluster class again
    // (taken before the old is given back, so an unchanged one keeps its rows).
    let touched: BTreeSet<u32> = log
        .addrs
        .values()
        .flat_map(|(a, b)| [*a, *b])
        .flatten()
        .chain(log.born.iter().copied())
        .chain(log.died.iter().copied())
        .collect();
    for c in touched {
        let groups = classes.groups(c);
        let id = match groups {
            Some(g) => {
                let cc = ClusterClass {
                    groups: tp.of_groups(Some(g)),
                    named: Vec::new(),
                };
                took(tp, cc, &mut out)
            }
            None => 0,
        };
        let old = if id == 0 {
            tp.of_class.remove(&c)
        } else {
            tp.of_class.insert(c, id)
        };
        if let Some(o) = old {
            gave(tp, o, &mut out);
        }
        if old.unwrap_or(0) != id {
            out.classes.insert(c);
        }
    }
    // Addresses with named ports whose address class changed: same ports, new groups.
    for addr in log.addrs.keys() {
        let Some(old) = tp.of_addr.get(addr).copied() else {
            continue;
        };
        let named = tp.def(old).map(|d| d.named.clone()).unwrap_or_default();
        let cc = ClusterClass {
            groups: tp.of_groups(d.class_at(*addr).and_then(|c| classes.groups(c))),
            named,
        };
        let id = took(tp, cc, &mut out);
        tp.of_addr.insert(*addr, id);
        gave(tp, old, &mut out);
        if id != old {
            out.addrs.insert(*addr);
        }
    }
    // Rows: the dead first (a freed number may have been taken again).
    for id in &out.died {
        for t in tp.tables.values_mut() {
            drop_rows(t, *id);
        }
    }
    let rules: HashMap<RuleId, &Rule> = new.rules.iter().map(|r| (r.id, &**r)).collect();
    let born: Vec<(u32, ClusterClass)> = out
        .born
        .iter()
        .filter_map(|id| Some((*id, tp.def(*id)?.clone())))
        .collect();
    if !born.is_empty() {
        for (name, ids) in &tp.lists {
            let list: Vec<&Rule> = ids.iter().filter_map(|id| rules.get(id).copied()).collect();
            let ix = Indexed::new(&list);
            let t = tp.tables.get_mut(name).expect("a table per list");
            for (id, cc) in &born {
                if let Some(row) = ix.rows_of(cc) {
                    put(t, *id, &row);
                }
            }
        }
    }
    // The NetworkPolicy rulesets follow the address classes, as the full plan's do.
    if log.born.is_empty() && log.died.is_empty() {
        return out;
    }
    for (name, rs) in tp.np.iter_mut() {
        let mut scratch = Ruleset::default();
        for id in &log.died {
            drop_class(rs, *id, &mut scratch);
        }
        let list: Vec<&Rule> = tp.np_lists[name]
            .iter()
            .filter_map(|id| rules.get(id).copied())
            .collect();
        for id in &log.born {
            if let Some(groups) = classes.groups(*id) {
                add_class(rs, &list, *id, groups);
            }
        }
    }
    out
}

/// Drops cluster class `id`'s rows from `t`.
fn drop_rows(t: &mut TierTable, id: u32) {
    t.whole.remove(&id);
    let keys: Vec<_> = t
        .ports
        .range((id, 0, 0, 0)..=(id, u8::MAX, u16::MAX, u16::MAX))
        .map(|(k, _)| *k)
        .collect();
    for k in keys {
        t.ports.remove(&k);
    }
}
