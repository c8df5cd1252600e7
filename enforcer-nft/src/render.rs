//! `Desired` → nftables JSON commands: a full replacement, or the difference between two
//! states. Either way the commands form one `nft -j -f -` batch, which the kernel commits
//! atomically: a packet sees the old table or the new one, never a mix — the rules and the
//! local pod table switch together.
//!
//! Except a packet already in the old rules when a batch commits: it finishes them (the
//! kernel keeps the old rules for it) but looks up sets as they are *now*, and a deleted
//! map has no elements now. So the objects the ruleset chains look up are named after the
//! class numbering (`epoch`), and a table that exists is replaced without deleting anything
//! the rules in force use: [`stage`] adds the new epoch's objects beside the old ones,
//! [`switch`] points the local pod table (the base chains' verdict maps, shared by every
//! epoch) at them, and [`sweep`] deletes the old ones once no rule reaches them and no
//! packet is still in the rules that did (`crate::nft::grace_period`). Deltas keep the epoch
//! and change elements in place.

mod base;
mod ruleset;
pub mod tier;

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::desired::Desired;
use crate::local::LocalTable;

pub use base::{COUNTERS, DENIED};

use crate::local::{OTHER_SRC, POD_DST, POD_SRC, SENDER, SPOOFED, UNCLASSIFIED, UNKNOWN_POD};

pub const TABLE: &str = "moat";

/// The maps and ruleset chains (and so their sets) of one class numbering carry its epoch
/// in their names, so a replacement's objects never collide with the ones in force.
pub fn in_epoch(name: &str, epoch: u32) -> String {
    format!("{name}_{epoch:08x}")
}

/// The objects every epoch shares: the base chains and the local pod table, whose elements
/// only [`switch`] (and deltas) change.
pub const SHARED_CHAINS: [&str; 8] = [
    "forward",
    SENDER,
    POD_SRC,
    OTHER_SRC,
    POD_DST,
    SPOOFED,
    UNKNOWN_POD,
    UNCLASSIFIED,
];
pub const SHARED_SETS: [&str; 9] = [
    RECORD, "in_if", "out_if", "src4", "src6", "dst4", "dst6", "local4", "local6",
];

fn obj(kind: &str, body: Value) -> Value {
    let mut b = body;
    b["family"] = json!("inet");
    b["table"] = json!(TABLE);
    json!({ kind: b })
}

fn cmd(verb: &str, kind: &str, body: Value) -> Value {
    json!({ verb: obj(kind, body) })
}

/// The set holding the table's record: one element, whose comment says which version,
/// digest and class numbering (epoch) the table holds. A delta deletes the old element
/// first, so it commits only onto exactly the state it was computed from.
pub const RECORD: &str = "record";

/// The record's text (the element's comment).
pub fn record(d: &Desired) -> String {
    format!(
        "v_{}_{}_{:08x}",
        d.version,
        d.digest.map(|x| x.to_string()).unwrap_or_default(),
        d.epoch
    )
}

/// The record element's key: version, digest prefix, epoch.
fn record_key(d: &Desired) -> Value {
    let digest = d.digest.map(|x| x.to_string()).unwrap_or_default();
    let prefix = u32::from_str_radix(digest.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    json!({"concat": [d.version as u32, prefix, d.epoch]})
}

fn record_elem(verb: &str, d: &Desired) -> Value {
    let elem = if verb == "add" {
        json!({"elem": {"val": record_key(d), "comment": record(d)}})
    } else {
        record_key(d)
    };
    cmd(verb, "element", json!({"name": RECORD, "elem": [elem]}))
}

/// Parses a record back to (version, digest).
pub fn parse_info(name: &str) -> Option<(u64, String)> {
    let mut parts = name.strip_prefix("v_")?.split('_');
    let (v, d, e) = (parts.next()?, parts.next()?, parts.next()?);
    u32::from_str_radix(e, 16).ok()?;
    Some((v.parse().ok()?, d.to_string()))
}

fn payload(proto: &str, field: &str) -> Value {
    json!({"payload": {"protocol": proto, "field": field}})
}

fn ct(key: &str) -> Value {
    json!({"ct": {"key": key}})
}

fn l4proto() -> Value {
    json!({"meta": {"key": "l4proto"}})
}

fn lookup(left: Value, set: &str) -> Value {
    json!({"match": {"op": "==", "left": left, "right": format!("@{set}")}})
}

fn concat(items: Vec<Value>) -> Value {
    json!({"concat": items})
}

fn range(a: impl Into<Value>, b: impl Into<Value>) -> Value {
    json!({"range": [a.into(), b.into()]})
}

/// One value, or the range between two (a port or protocol run, inclusive).
fn port<T: Into<Value> + PartialEq + Copy>(a: T, b: T) -> Value {
    if a == b { a.into() } else { range(a, b) }
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    cmd("add", "rule", json!({"chain": chain, "expr": expr}))
}

fn set_decl(name: &str, ty: Value, interval: bool) -> Value {
    let mut s = json!({"name": name, "type": ty});
    if interval {
        s["flags"] = json!(["interval"]);
    }
    cmd("add", "set", s)
}

fn map_decl(name: &str, ty: Value, map: &str, interval: bool) -> Value {
    let mut s = json!({"name": name, "type": ty, "map": map});
    if interval {
        s["flags"] = json!(["interval"]);
    }
    cmd("add", "map", s)
}

fn elements(verb: &str, set: &str, elems: Vec<Value>) -> Option<Value> {
    (!elems.is_empty()).then(|| cmd(verb, "element", json!({"name": set, "elem": elems})))
}

fn class_elems<'a, A: ToString + PartialEq + 'a>(
    it: impl Iterator<Item = (&'a (A, A), &'a u32)>,
) -> Vec<Value> {
    it.map(|((a, b), c)| {
        let key = if a == b {
            json!(a.to_string())
        } else {
            range(a.to_string(), b.to_string())
        };
        json!([key, c])
    })
    .collect()
}

fn addr_class_elems<'a, A: ToString + 'a>(
    it: impl Iterator<Item = (&'a A, &'a u32)>,
) -> Vec<Value> {
    it.map(|(a, c)| json!([a.to_string(), c])).collect()
}

/// Replaces whatever the table holds with `d`: add-then-delete-then-add makes the delete
/// safe when the table doesn't exist, and the batch is one transaction. For a table nothing
/// enforces yet: a packet in the old table's rules while this commits finds its maps deleted
/// and is dropped (see the module docs; [`stage`], [`switch`] and [`sweep`] replace a table
/// in force).
pub fn full(d: &Desired) -> Vec<Value> {
    full_staged(d, stage(d))
}

/// [`full`] for layout 7: `d`'s address maps (`plan::addresses`) pointed at the tier plan
/// `tp` (see [`tier`]). Not yet used by the backend.
pub fn full_tiers(d: &Desired, tp: &moat_dataplane::plan::tier_tables::TierPlan) -> Vec<Value> {
    let (d, chains) = tier::with_tiers(d, tp);
    let mut staged = stage(&d);
    staged.extend(tier::stage(&d, tp, &chains));
    full_staged(&d, staged)
}

/// A full replacement holding `staged` (the epoch objects of `d`).
fn full_staged(d: &Desired, staged: Vec<Value>) -> Vec<Value> {
    let mut c = vec![
        json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
        json!({"delete": {"table": {"family": "inet", "name": TABLE}}}),
        json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
        set_decl(RECORD, json!(["mark", "mark", "mark"]), false),
    ];
    c.extend(base::declarations());
    c.extend(staged);
    c.extend(base::add_local(&LocalTable::of(d)));
    c.extend(base::chains());
    c.push(record_elem("add", d));
    c
}

/// `d`'s epoch objects (class maps, rulesets), added beside whatever the table holds: no
/// rule in force reaches them until [`switch`]. A batch of its own, so that every set is
/// complete when the first packet looks it up (the kernel installs some set types' new
/// contents only after a commit has started the new generation).
pub fn stage(d: &Desired) -> Vec<Value> {
    let e = d.epoch;
    let (class4, class6) = (in_epoch("class4", e), in_epoch("class6", e));
    let (addr4, addr6) = (in_epoch("addr4", e), in_epoch("addr6", e));
    let mut c = vec![
        map_decl(&class4, json!("ipv4_addr"), "mark", true),
        map_decl(&class6, json!("ipv6_addr"), "mark", true),
        map_decl(&addr4, json!("ipv4_addr"), "mark", false),
        map_decl(&addr6, json!("ipv6_addr"), "mark", false),
    ];
    for (name, rs) in &d.rulesets {
        c.extend(ruleset::add_ruleset(name, rs, e));
    }
    c.extend(elements("add", &class4, class_elems(d.class4.iter())));
    c.extend(elements("add", &class6, class_elems(d.class6.iter())));
    c.extend(elements("add", &addr4, addr_class_elems(d.addr4.iter())));
    c.extend(elements("add", &addr6, addr_class_elems(d.addr6.iter())));
    c
}

/// Points the table at `d`, staged before: the local pod table's elements (its verdicts
/// name `d`'s ruleset chains) and the record, one transaction of elements only. The maps
/// themselves stay, so a packet between the old rules and this commit finds one version's
/// elements or the other's, each complete — and the node's pods as `d` has them.
pub fn switch(d: &Desired) -> Vec<Value> {
    // `type` and `map` are redundant for nft but the nftables crate's schema requires them.
    let mut c = vec![cmd(
        "flush",
        "set",
        json!({"name": RECORD, "type": ["mark", "mark", "mark"]}),
    )];
    c.extend(base::flush_local());
    c.extend(base::add_local(&LocalTable::of(d)));
    c.push(record_elem("add", d));
    c
}

/// Deletes the given chains and sets (see [`crate::nft::Objects`]): an earlier epoch's, once
/// [`switch`] has left no rule in force that reaches them. Chains first, which frees the sets
/// their rules look up.
pub fn sweep(chains: &[String], sets: &[Value]) -> Vec<Value> {
    let mut c: Vec<Value> = chains
        .iter()
        .map(|n| cmd("delete", "chain", json!({"name": n})))
        .collect();
    for s in sets {
        let kind = if s.get("map").is_some() { "map" } else { "set" };
        let mut body = json!({"name": s["name"], "type": s["type"]});
        if let Some(m) = s.get("map") {
            body["map"] = m.clone();
        }
        c.push(cmd("delete", kind, body));
    }
    c
}

type Pairs<'a, K, V> = Vec<(&'a K, &'a V)>;

/// (removed, added) between two maps: a changed value is a removal and an addition.
fn map_diff<'a, K: Ord, V: PartialEq>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> (Pairs<'a, K, V>, Pairs<'a, K, V>) {
    let removed = old.iter().filter(|(k, v)| new.get(k) != Some(v)).collect();
    let added = new.iter().filter(|(k, v)| old.get(k) != Some(v)).collect();
    (removed, added)
}

/// One set of address maps of an epoch: intervals (v4, v6) and single addresses (v4, v6)
/// → a class number.
type AddressMaps<'a> = (
    &'a BTreeMap<(std::net::Ipv4Addr, std::net::Ipv4Addr), u32>,
    &'a BTreeMap<(std::net::Ipv6Addr, std::net::Ipv6Addr), u32>,
    &'a BTreeMap<std::net::Ipv4Addr, u32>,
    &'a BTreeMap<std::net::Ipv6Addr, u32>,
);

/// The element changes from `old` to `new` of the address maps named `names` (in `epoch`;
/// the order of [`AddressMaps`]): the class maps' and the cluster class maps' alike.
fn address_maps_change(
    names: [&str; 4],
    epoch: u32,
    old: AddressMaps<'_>,
    new: AddressMaps<'_>,
) -> Vec<Value> {
    let [i4, i6, s4, s6] = names.map(|n| in_epoch(n, epoch));
    let mut c = Vec::new();
    let (r4, a4) = map_diff(old.0, new.0);
    let (r6, a6) = map_diff(old.1, new.1);
    c.extend(elements("delete", &i4, class_elems(r4.into_iter())));
    c.extend(elements("delete", &i6, class_elems(r6.into_iter())));
    c.extend(elements("add", &i4, class_elems(a4.into_iter())));
    c.extend(elements("add", &i6, class_elems(a6.into_iter())));
    let (r4, a4) = map_diff(old.2, new.2);
    let (r6, a6) = map_diff(old.3, new.3);
    c.extend(elements("delete", &s4, addr_class_elems(r4.into_iter())));
    c.extend(elements("delete", &s6, addr_class_elems(r6.into_iter())));
    c.extend(elements("add", &s4, addr_class_elems(a4.into_iter())));
    c.extend(elements("add", &s6, addr_class_elems(a6.into_iter())));
    c
}

/// The commands that turn `old` (what the table holds) into `new`, as one transaction.
pub fn delta(old: &Desired, new: &Desired) -> Vec<Value> {
    delta_spliced(old, new, Vec::new(), Vec::new())
}

/// [`delta`] for layout 7 (see [`full_tiers`]): the tier objects change beside the rest, new
/// ones before the local pod table may point at them, old ones after it no longer does.
pub fn delta_tiers(
    (old, old_tp): (&Desired, &moat_dataplane::plan::tier_tables::TierPlan),
    (new, new_tp): (&Desired, &moat_dataplane::plan::tier_tables::TierPlan),
) -> Vec<Value> {
    let (od, oc) = tier::with_tiers(old, old_tp);
    let (nd, nc) = tier::with_tiers(new, new_tp);
    let (added, removed) = tier::change((&od, old_tp, &oc), (&nd, new_tp, &nc));
    delta_spliced(&od, &nd, added, removed)
}

/// [`delta`], with `added` (objects the new local pod table and rulesets may name) before
/// the local pod table changes and `removed` (objects only the old ones named) after the
/// rulesets have changed, before old rulesets go.
fn delta_spliced(
    old: &Desired,
    new: &Desired,
    added: Vec<Value>,
    removed: Vec<Value>,
) -> Vec<Value> {
    // A delta keeps the class numbering, and with it the epoch and the objects' names.
    let e = new.epoch;
    debug_assert_eq!(old.epoch, e, "a delta never changes the epoch");
    // The guard comes first: deleting the old record fails the whole batch unless the kernel
    // holds exactly `old` in the same numbering — e.g. when an `nft` orphaned by a killed
    // enforcer, or another writer, changed the table since.
    let mut c = vec![record_elem("delete", old)];
    // New rulesets first: the local pod table may point at them below.
    for (name, rs) in &new.rulesets {
        if !old.rulesets.contains_key(name) {
            c.extend(ruleset::add_ruleset(name, rs, e));
        }
    }
    // Deletions before additions everywhere, so intervals never overlap transiently.
    c.extend(address_maps_change(
        ["class4", "class6", "addr4", "addr6"],
        e,
        (&old.class4, &old.class6, &old.addr4, &old.addr6),
        (&new.class4, &new.class6, &new.addr4, &new.addr6),
    ));
    c.extend(added);
    c.extend(base::change_local(
        &LocalTable::of(old),
        &LocalTable::of(new),
    ));
    for (name, rs) in &new.rulesets {
        if let Some(o) = old.rulesets.get(name) {
            c.extend(ruleset::change(name, o, rs, e));
        }
    }
    c.extend(removed);
    // Last: nothing may still point at a ruleset when it goes. In this same commit: a packet
    // still in its rules keeps finding its sets' elements (the kernel deactivates a deleted
    // *map*'s elements at once, a plain set's never; a ruleset holds plain sets only).
    for (name, rs) in &old.rulesets {
        if !new.rulesets.contains_key(name) {
            c.extend(ruleset::delete_ruleset(name, rs, e));
        }
    }
    c.push(record_elem("add", new));
    c
}

/// The commands that change the local pod table of `d` from `old` to `d.local`, nothing
/// else, as one transaction (guarded by the record like any delta).
pub fn relocal(d: &Desired, old: &moat_dataplane::LocalPods) -> Vec<Value> {
    let mut c = vec![record_elem("delete", d)];
    c.extend(base::change_local(
        &LocalTable::with(old, d),
        &LocalTable::of(d),
    ));
    c.push(record_elem("add", d));
    c
}

#[cfg(test)]
mod interp;
#[cfg(test)]
mod tests;
