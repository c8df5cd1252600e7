//! `Desired` → nftables JSON commands: a full replacement, or the difference between two
//! states. Either way the commands form one `nft -j -f -` batch, which the kernel commits
//! atomically: a packet sees the old table or the new one, never a mix.
//!
//! Except a packet already in the old rules when a batch commits: it finishes them (the
//! kernel keeps the old rules for it) but looks up sets as they are *now*, and a deleted
//! map has no elements now. So the objects the rules look up are named after the class
//! numbering (`epoch`), and a table that exists is replaced without deleting anything the
//! rules in force use: [`stage`] adds the new epoch's objects beside the old ones, [`switch`]
//! points the verdict maps at them, and [`sweep`] deletes the old ones once no rule reaches
//! them. Deltas keep the epoch and change elements in place, as before.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::desired::{Desired, Ruleset};

pub const TABLE: &str = "moat";

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

/// The maps and ruleset chains (and so their sets) of one class numbering carry its epoch
/// in their names, so a replacement's objects never collide with the ones in force.
pub fn in_epoch(name: &str, epoch: u32) -> String {
    format!("{name}_{epoch:08x}")
}

/// The objects every epoch shares: the table's skeleton, changed only by [`switch`].
pub const SHARED_CHAINS: [&str; 1] = ["forward"];
pub const SHARED_SETS: [&str; 5] = [RECORD, "ing4", "ing6", "eg4", "eg6"];

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

fn port(a: u16, b: u16) -> Value {
    if a == b { json!(a) } else { range(a, b) }
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

fn map_decl(name: &str, ty: &str, map: &str, interval: bool) -> Value {
    let mut s = json!({"name": name, "type": ty, "map": map});
    if interval {
        s["flags"] = json!(["interval"]);
    }
    cmd("add", "map", s)
}

fn elements(verb: &str, set: &str, elems: Vec<Value>) -> Option<Value> {
    (!elems.is_empty()).then(|| cmd(verb, "element", json!({"name": set, "elem": elems})))
}

const ACCEPT: &str = "accept";
const RETURN: &str = "return";

/// A ruleset's set names.
fn sets(chain: &str) -> [(String, Value, bool); 6] {
    [
        (
            format!("{chain}_ap"),
            json!(["inet_proto", "inet_service"]),
            true,
        ),
        (format!("{chain}_aa"), json!("mark"), false),
        (
            format!("{chain}_gp"),
            json!(["mark", "inet_proto", "inet_service"]),
            true,
        ),
        (
            format!("{chain}_gx"),
            json!(["mark", "inet_proto", "inet_service"]),
            false,
        ),
        (
            format!("{chain}_n4"),
            json!(["ipv4_addr", "inet_proto", "inet_service"]),
            false,
        ),
        (
            format!("{chain}_n6"),
            json!(["ipv6_addr", "inet_proto", "inet_service"]),
            false,
        ),
    ]
}

/// The fixed rules of a ruleset chain: a constant number of lookups whatever its size.
fn chain_rules(name: &str, rs: &Ruleset, epoch: u32) -> Vec<Value> {
    // Ingress: allowed means accepted. Egress: allowed means "go on to the ingress check".
    let ok = if rs.egress { RETURN } else { ACCEPT };
    let verdict = json!({ ok: null });
    let peer = if rs.egress { "daddr" } else { "saddr" };
    let mut r = Vec::new();
    if rs.any {
        r.push(rule(name, vec![verdict.clone()]));
    }
    r.push(rule(
        name,
        vec![
            lookup(
                concat(vec![l4proto(), payload("th", "dport")]),
                &format!("{name}_ap"),
            ),
            verdict.clone(),
        ],
    ));
    r.push(rule(
        name,
        vec![json!({"mangle": {"key": ct("mark"), "value": 0}})],
    ));
    // Ranges first, then single addresses: a hit in the second overrides the first (a
    // failed map lookup ends the rule and leaves the mark as it was).
    for (fam, map) in [
        ("ip", "class4"),
        ("ip6", "class6"),
        ("ip", "addr4"),
        ("ip6", "addr6"),
    ] {
        r.push(rule(
            name,
            vec![json!({"mangle": {"key": ct("mark"), "value": {"map": {"key": payload(fam, peer), "data": format!("@{}", in_epoch(map, epoch))}}}})],
        ));
    }
    let clear = json!({"mangle": {"key": ct("mark"), "value": 0}});
    r.push(rule(
        name,
        vec![
            lookup(ct("mark"), &format!("{name}_aa")),
            clear.clone(),
            verdict.clone(),
        ],
    ));
    r.push(rule(
        name,
        vec![
            lookup(
                concat(vec![ct("mark"), l4proto(), payload("th", "dport")]),
                &format!("{name}_gp"),
            ),
            clear.clone(),
            verdict.clone(),
        ],
    ));
    r.push(rule(
        name,
        vec![
            lookup(
                concat(vec![ct("mark"), l4proto(), payload("th", "dport")]),
                &format!("{name}_gx"),
            ),
            clear.clone(),
            verdict.clone(),
        ],
    ));
    if rs.egress {
        for (fam, set) in [("ip", "n4"), ("ip6", "n6")] {
            r.push(rule(
                name,
                vec![
                    lookup(
                        concat(vec![
                            payload(fam, "daddr"),
                            l4proto(),
                            payload("th", "dport"),
                        ]),
                        &format!("{name}_{set}"),
                    ),
                    clear.clone(),
                    verdict.clone(),
                ],
            ));
        }
    }
    r.push(rule(
        name,
        vec![clear, json!({"counter": "denied"}), json!({"drop": null})],
    ));
    r
}

fn base_chain() -> Vec<Value> {
    let mut c = vec![cmd(
        "add",
        "chain",
        json!({"name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}),
    )];
    let r = |expr: Vec<Value>| rule("forward", expr);
    c.push(r(vec![
        json!({"match": {"op": "in", "left": ct("state"), "right": ["established", "related"]}}),
        json!({"accept": null}),
    ]));
    c.push(r(vec![
        json!({"match": {"op": "in", "left": ct("state"), "right": "invalid"}}),
        json!({"counter": "denied"}),
        json!({"drop": null}),
    ]));
    // Link-local traffic is never policy's business (routers don't forward it anyway).
    c.push(r(vec![json!({"match": {"op": "==", "left": payload("ip6", "saddr"), "right": {"prefix": {"addr": "fe80::", "len": 10}}}}), json!({"accept": null})]));
    c.push(r(vec![json!({"match": {"op": "==", "left": payload("ip", "saddr"), "right": {"prefix": {"addr": "169.254.0.0", "len": 16}}}}), json!({"accept": null})]));
    for (fam, field, map) in [
        ("ip", "saddr", "eg4"),
        ("ip6", "saddr", "eg6"),
        ("ip", "daddr", "ing4"),
        ("ip6", "daddr", "ing6"),
    ] {
        c.push(r(vec![
            json!({"vmap": {"key": payload(fam, field), "data": format!("@{map}")}}),
        ]));
    }
    c
}

// === element encodings ===

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

fn addr_elems<'a, A: ToString + 'a>(it: impl Iterator<Item = (&'a A, &'a u32)>) -> Vec<Value> {
    it.map(|(a, c)| json!([a.to_string(), c])).collect()
}

fn gx_elems<'a>(it: impl Iterator<Item = &'a (u32, u8, u16)>) -> Vec<Value> {
    it.map(|(c, p, port)| concat(vec![json!(c), json!(p), json!(port)]))
        .collect()
}

fn vmap_elems<'a, A: ToString + 'a>(
    it: impl Iterator<Item = (&'a A, &'a String)>,
    epoch: u32,
) -> Vec<Value> {
    it.map(|(a, chain)| json!([a.to_string(), {"jump": {"target": in_epoch(chain, epoch)}}]))
        .collect()
}

fn ap_elems<'a>(it: impl Iterator<Item = &'a (u8, u16, u16)>) -> Vec<Value> {
    it.map(|(p, a, b)| concat(vec![json!(p), port(*a, *b)]))
        .collect()
}

fn gp_elems<'a>(it: impl Iterator<Item = &'a (u32, u8, u16, u16)>) -> Vec<Value> {
    it.map(|(c, p, a, b)| concat(vec![json!(c), json!(p), port(*a, *b)]))
        .collect()
}

fn n_elems<'a, A: ToString + 'a>(it: impl Iterator<Item = &'a (A, u8, u16)>) -> Vec<Value> {
    it.map(|(a, p, port)| concat(vec![json!(a.to_string()), json!(p), json!(port)]))
        .collect()
}

fn ruleset_elements(verb: &str, name: &str, rs: &Ruleset) -> Vec<Value> {
    [
        elements(verb, &format!("{name}_ap"), ap_elems(rs.ap.iter())),
        elements(
            verb,
            &format!("{name}_aa"),
            rs.aa.iter().map(|c| json!(c)).collect(),
        ),
        elements(verb, &format!("{name}_gp"), gp_elems(rs.gp.iter())),
        elements(verb, &format!("{name}_gx"), gx_elems(rs.gx.iter())),
        elements(verb, &format!("{name}_n4"), n_elems(rs.n4.iter())),
        elements(verb, &format!("{name}_n6"), n_elems(rs.n6.iter())),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn add_ruleset(name: &str, rs: &Ruleset, epoch: u32) -> Vec<Value> {
    let name = &in_epoch(name, epoch);
    let mut c = Vec::new();
    for (set, ty, interval) in sets(name) {
        c.push(set_decl(&set, ty, interval));
    }
    c.push(cmd("add", "chain", json!({"name": name})));
    c.extend(chain_rules(name, rs, epoch));
    c.extend(ruleset_elements("add", name, rs));
    c
}

fn delete_ruleset(name: &str, epoch: u32) -> Vec<Value> {
    let name = &in_epoch(name, epoch);
    let mut c = vec![cmd("delete", "chain", json!({"name": name}))];
    for (set, ty, _) in sets(name) {
        // `type` is redundant for nft but the nftables crate's schema requires it.
        c.push(cmd("delete", "set", json!({"name": set, "type": ty})));
    }
    c
}

/// Replaces whatever the table holds with `d`: add-then-delete-then-add makes the delete
/// safe when the table doesn't exist, and the batch is one transaction. For a table nothing
/// enforces yet: a packet in the old table's rules while this commits finds its maps deleted
/// and is dropped (see the module docs; [`stage`], [`switch`] and [`sweep`] replace a table
/// in force).
pub fn full(d: &Desired) -> Vec<Value> {
    let mut c = vec![
        json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
        json!({"delete": {"table": {"family": "inet", "name": TABLE}}}),
        json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
        cmd("add", "counter", json!({"name": "denied"})),
        set_decl(RECORD, json!(["mark", "mark", "mark"]), false),
    ];
    for (m, ty) in [
        ("ing4", "ipv4_addr"),
        ("ing6", "ipv6_addr"),
        ("eg4", "ipv4_addr"),
        ("eg6", "ipv6_addr"),
    ] {
        c.push(map_decl(m, ty, "verdict", false));
    }
    c.extend(stage(d));
    c.extend(switch_elements(d));
    c.extend(base_chain());
    c.push(record_elem("add", d));
    c
}

/// `d`'s epoch objects (class maps, rulesets), added beside whatever the table holds: no
/// rule in force reaches them until [`switch`]. A batch of its own, so that every set is
/// complete when the first packet looks it up (the kernel installs some set types' new
/// contents only after a commit has started the new generation).
pub fn stage(d: &Desired) -> Vec<Value> {
    let e = d.epoch;
    let mut c = vec![
        map_decl(&in_epoch("class4", e), "ipv4_addr", "mark", true),
        map_decl(&in_epoch("class6", e), "ipv6_addr", "mark", true),
        map_decl(&in_epoch("addr4", e), "ipv4_addr", "mark", false),
        map_decl(&in_epoch("addr6", e), "ipv6_addr", "mark", false),
    ];
    for (name, rs) in &d.rulesets {
        c.extend(add_ruleset(name, rs, e));
    }
    c.extend(elements(
        "add",
        &in_epoch("class4", e),
        class_elems(d.class4.iter()),
    ));
    c.extend(elements(
        "add",
        &in_epoch("class6", e),
        class_elems(d.class6.iter()),
    ));
    c.extend(elements(
        "add",
        &in_epoch("addr4", e),
        addr_elems(d.addr4.iter()),
    ));
    c.extend(elements(
        "add",
        &in_epoch("addr6", e),
        addr_elems(d.addr6.iter()),
    ));
    c
}

fn switch_elements(d: &Desired) -> Vec<Value> {
    [
        elements("add", "ing4", vmap_elems(d.ing4.iter(), d.epoch)),
        elements("add", "ing6", vmap_elems(d.ing6.iter(), d.epoch)),
        elements("add", "eg4", vmap_elems(d.eg4.iter(), d.epoch)),
        elements("add", "eg6", vmap_elems(d.eg6.iter(), d.epoch)),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Points the table at `d`, staged before: the verdict maps' elements and the record, one
/// transaction of elements only. The maps themselves stay, so a packet between the old
/// rules and this commit finds one version's elements or the other's, each complete.
pub fn switch(d: &Desired) -> Vec<Value> {
    // `type` and `map` are redundant for nft but the nftables crate's schema requires them.
    let mut c = vec![cmd(
        "flush",
        "set",
        json!({"name": RECORD, "type": ["mark", "mark", "mark"]}),
    )];
    for (m, ty) in [
        ("ing4", "ipv4_addr"),
        ("ing6", "ipv6_addr"),
        ("eg4", "ipv4_addr"),
        ("eg6", "ipv6_addr"),
    ] {
        c.push(cmd(
            "flush",
            "map",
            json!({"name": m, "type": ty, "map": "verdict"}),
        ));
    }
    c.extend(switch_elements(d));
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

fn set_diff<'a, T: Ord>(old: &'a BTreeSet<T>, new: &'a BTreeSet<T>) -> (Vec<&'a T>, Vec<&'a T>) {
    (old.difference(new).collect(), new.difference(old).collect())
}

/// The commands that turn `old` (what the table holds) into `new`, as one transaction.
pub fn delta(old: &Desired, new: &Desired) -> Vec<Value> {
    // A delta keeps the class numbering, and with it the epoch and the objects' names.
    let e = new.epoch;
    debug_assert_eq!(old.epoch, e, "a delta never changes the epoch");
    // The guard comes first: deleting the old record fails the whole batch unless the kernel
    // holds exactly `old` in the same numbering — e.g. when an `nft` orphaned by a killed
    // enforcer, or another writer, changed the table since.
    let mut c = vec![record_elem("delete", old)];
    // New rulesets first: the verdict maps may point at them below.
    for (name, rs) in &new.rulesets {
        if !old.rulesets.contains_key(name) {
            c.extend(add_ruleset(name, rs, e));
        }
    }
    // Deletions before additions everywhere, so intervals never overlap transiently.
    let (r4, a4) = map_diff(&old.class4, &new.class4);
    let (r6, a6) = map_diff(&old.class6, &new.class6);
    let (class4, class6) = (in_epoch("class4", e), in_epoch("class6", e));
    c.extend(elements("delete", &class4, class_elems(r4.into_iter())));
    c.extend(elements("delete", &class6, class_elems(r6.into_iter())));
    c.extend(elements("add", &class4, class_elems(a4.into_iter())));
    c.extend(elements("add", &class6, class_elems(a6.into_iter())));
    let (r4, a4) = map_diff(&old.addr4, &new.addr4);
    let (r6, a6) = map_diff(&old.addr6, &new.addr6);
    let (addr4, addr6) = (in_epoch("addr4", e), in_epoch("addr6", e));
    c.extend(elements("delete", &addr4, addr_elems(r4.into_iter())));
    c.extend(elements("delete", &addr6, addr_elems(r6.into_iter())));
    c.extend(elements("add", &addr4, addr_elems(a4.into_iter())));
    c.extend(elements("add", &addr6, addr_elems(a6.into_iter())));
    macro_rules! vmap {
        ($field:ident, $name:expr) => {{
            let (r, a) = map_diff(&old.$field, &new.$field);
            c.extend(elements("delete", $name, vmap_elems(r.into_iter(), e)));
            c.extend(elements("add", $name, vmap_elems(a.into_iter(), e)));
        }};
    }
    vmap!(ing4, "ing4");
    vmap!(ing6, "ing6");
    vmap!(eg4, "eg4");
    vmap!(eg6, "eg6");
    for (name, rs) in &new.rulesets {
        let Some(o) = old.rulesets.get(name) else {
            continue;
        };
        if o == rs {
            continue;
        }
        let name = &in_epoch(name, e);
        if o.any != rs.any {
            c.push(cmd("flush", "chain", json!({"name": name})));
            c.extend(chain_rules(name, rs, e));
        }
        // Deletions before additions in each set, as everywhere.
        let mut sync = |set: &str, (r, a): (Vec<Value>, Vec<Value>)| {
            c.extend(elements("delete", &format!("{name}_{set}"), r));
            c.extend(elements("add", &format!("{name}_{set}"), a));
        };
        fn both<'a, T: Ord + 'a, I>(
            (r, a): (Vec<&'a T>, Vec<&'a T>),
            enc: impl Fn(std::vec::IntoIter<&'a T>) -> I,
        ) -> (I, I) {
            (enc(r.into_iter()), enc(a.into_iter()))
        }
        sync("ap", both(set_diff(&o.ap, &rs.ap), ap_elems));
        sync(
            "aa",
            both(set_diff(&o.aa, &rs.aa), |it| it.map(|x| json!(x)).collect()),
        );
        sync("gp", both(set_diff(&o.gp, &rs.gp), gp_elems));
        sync("gx", both(set_diff(&o.gx, &rs.gx), gx_elems));
        sync("n4", both(set_diff(&o.n4, &rs.n4), n_elems));
        sync("n6", both(set_diff(&o.n6, &rs.n6), n_elems));
    }
    for name in old.rulesets.keys() {
        if !new.rulesets.contains_key(name) {
            c.extend(delete_ruleset(name, e));
        }
    }
    c.push(record_elem("add", new));
    c
}

#[cfg(test)]
mod tests;
