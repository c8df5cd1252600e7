//! A ruleset chain (one per distinct rule list and direction) and its sets: a fixed number
//! of lookups whatever the list's size (see `desired`).

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::{cmd, concat, ct, elements, in_epoch, l4proto, lookup, payload, port, rule, set_decl};
use crate::desired::{Ruleset, Sets};

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

/// The deny sets of an ordered ruleset ([`Ruleset::ordered`]): `_d` + the allow set's
/// suffix, same types. Only ordered rulesets have them, so NetworkPolicy-only tables are
/// exactly what they were.
fn deny_sets(chain: &str) -> Vec<(String, Value, bool)> {
    sets(chain)
        .into_iter()
        .map(|(n, ty, interval)| {
            let (base, suffix) = n.rsplit_once('_').expect("suffixed");
            (format!("{base}_d{suffix}"), ty, interval)
        })
        .collect()
}

/// The fixed rules of ruleset chain `name` (already in `epoch`, see [`in_epoch`]): a constant
/// number of lookups whatever its size, in the class maps of the same epoch.
fn chain_rules(name: &str, rs: &Ruleset, epoch: u32) -> Vec<Value> {
    if rs.ordered() {
        return ordered_rules(name, rs, epoch);
    }
    // Ingress: allowed means accepted. Egress: allowed means "go on to the ingress check".
    // Every allow stamps the flow (see [`inherited`]).
    let verdict = || vec![stamp(rs.egress), ok(rs.egress)];
    let with = |mut e: Vec<Value>, then: Vec<Value>| {
        e.extend(then);
        e
    };
    let peer = if rs.egress { "daddr" } else { "saddr" };
    let mut r = vec![inherited(name, rs.egress)];
    if rs.any {
        r.push(rule(name, verdict()));
    }
    r.push(rule(
        name,
        with(
            vec![lookup(
                concat(vec![l4proto(), payload("th", "dport")]),
                &format!("{name}_ap"),
            )],
            verdict(),
        ),
    ));
    let clear = json!({"mangle": {"key": ct("mark"), "value": 0}});
    // Named ports before the class: keyed by address, they need no conntrack mark (an
    // untracked packet they allow is allowed, as in an ordered ruleset).
    if rs.egress {
        for (fam, set) in [("ip", "n4"), ("ip6", "n6")] {
            let key = named_key(fam);
            r.push(rule(
                name,
                with(vec![lookup(key, &format!("{name}_{set}"))], verdict()),
            ));
        }
    }
    r.extend(classify(name, peer, epoch));
    r.push(rule(
        name,
        with(
            vec![lookup(ct("mark"), &format!("{name}_aa")), clear.clone()],
            verdict(),
        ),
    ));
    // Peer groups by exact port, then by port range.
    for set in ["gp", "gx"] {
        r.push(rule(
            name,
            with(
                vec![
                    lookup(
                        concat(vec![ct("mark"), l4proto(), payload("th", "dport")]),
                        &format!("{name}_{set}"),
                    ),
                    clear.clone(),
                ],
                verdict(),
            ),
        ));
    }
    r.push(rule(
        name,
        vec![clear, json!({"counter": "denied"}), json!({"drop": null})],
    ));
    r
}

/// An egress named-port entry's key: destination address, protocol, port.
fn named_key(fam: &str) -> Value {
    concat(vec![
        payload(fam, "daddr"),
        l4proto(),
        payload("th", "dport"),
    ])
}

/// The conntrack label bits Moat sets on a flow whose first packet a ruleset allowed, per
/// direction (its own bits: labels are a 128-bit set shared with other components).
pub const STAMP_EGRESS: u32 = 126;
pub const STAMP_INGRESS: u32 = 127;

/// A ruleset's allow. Ingress: accepted. Egress: "go on to the ingress check" (back to
/// `forward`, after `jump sender`).
pub(super) fn ok(egress: bool) -> Value {
    if egress {
        json!({"return": null})
    } else {
        json!({"accept": null})
    }
}

pub(super) fn stamp(egress: bool) -> Value {
    let bit = if egress { STAMP_EGRESS } else { STAMP_INGRESS };
    json!({"mangle": {"key": ct("label"), "value": bit}})
}

/// The first rule of every ruleset: a packet of a flow whose first packet this direction's
/// ruleset allowed (conntrack confirmed the flow, and it carries the ruleset's stamp, but no
/// reply came yet) inherits that verdict, as the eBPF program's flow table lets it, and is
/// not judged again. Judging it would be wrong, not just slow: the class below is kept in
/// the flow's conntrack mark, which every packet of a confirmed flow shares — two cores
/// judging two of its packets at once read each other's marks. A first packet's entry is its
/// own until it is confirmed, after this hook, so stamping it is race-free too. Confirmed
/// alone is not enough: a flow can be confirmed without Moat allowing it (one a previous
/// dataplane dropped after conntrack, one older than the table); such a flow is judged.
pub(super) fn inherited(name: &str, egress: bool) -> Value {
    let bit = if egress { STAMP_EGRESS } else { STAMP_INGRESS };
    rule(
        name,
        vec![
            json!({"match": {"op": "in", "left": ct("status"), "right": "confirmed"}}),
            json!({"match": {"op": "in", "left": ct("label"), "right": bit}}),
            ok(egress),
        ],
    )
}

/// Rules that set the peer's class into the conntrack mark (ranges first, then single
/// addresses: a hit in the second overrides the first, and a failed map lookup ends the rule
/// and leaves the mark as it was). A packet without a conntrack entry (`notrack`) has no
/// mark to keep it in: every lookup on it would miss, which in an ordered ruleset reads as
/// "no class" and skips the class's Deny, so such a packet is denied where its class
/// decides.
/// Denies a packet without a conntrack entry (see [`classify`]).
pub(super) fn untracked(name: &str) -> Value {
    rule(
        name,
        vec![
            json!({"match": {"op": "in", "left": ct("state"), "right": "untracked"}}),
            json!({"counter": "denied"}),
            json!({"drop": null}),
        ],
    )
}

fn classify(name: &str, peer: &str, epoch: u32) -> Vec<Value> {
    let clear = json!({"mangle": {"key": ct("mark"), "value": 0}});
    let mut r = vec![untracked(name), rule(name, vec![clear])];
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
    r
}

/// A ruleset with deny entries (cluster tiers): most specific lookup first, the first hit
/// decides — named address·port, class × single port, class × port range, class × any
/// port, any peer × port, then the default. Each level is a deny set and an allow set with
/// disjoint keys, so their order within a level does not matter.
fn ordered_rules(name: &str, rs: &Ruleset, epoch: u32) -> Vec<Value> {
    let clear = json!({"mangle": {"key": ct("mark"), "value": 0}});
    let allow = || vec![clear.clone(), stamp(rs.egress), ok(rs.egress)];
    let deny = || {
        vec![
            clear.clone(),
            json!({"counter": "denied"}),
            json!({"drop": null}),
        ]
    };
    let peer = if rs.egress { "daddr" } else { "saddr" };
    let level = |r: &mut Vec<Value>, key: Value, set: &str| {
        for (prefix, then) in [("d", deny()), ("", allow())] {
            let mut e = vec![lookup(key.clone(), &format!("{name}_{prefix}{set}"))];
            e.extend(then);
            r.push(rule(name, e));
        }
    };
    let mut r = vec![inherited(name, rs.egress)];
    if rs.egress {
        for (fam, set) in [("ip", "n4"), ("ip6", "n6")] {
            let key = named_key(fam);
            level(&mut r, key, set);
        }
    }
    r.extend(classify(name, peer, epoch));
    let class_port = || concat(vec![ct("mark"), l4proto(), payload("th", "dport")]);
    level(&mut r, class_port(), "gx");
    level(&mut r, class_port(), "gp");
    level(&mut r, ct("mark"), "aa");
    level(
        &mut r,
        concat(vec![l4proto(), payload("th", "dport")]),
        "ap",
    );
    r.push(rule(name, if rs.any { allow() } else { deny() }));
    r
}

fn gx_elems<'a>(it: impl Iterator<Item = &'a (u32, u8, u16)>) -> Vec<Value> {
    it.map(|(c, p, port)| concat(vec![json!(c), json!(p), json!(port)]))
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

fn aa_elems<'a>(it: impl Iterator<Item = &'a u32>) -> Vec<Value> {
    it.map(|c| json!(c)).collect()
}

/// `verb` every element of `s` in the sets `<name>_<prefix><suffix>`.
fn sets_elements(verb: &str, name: &str, prefix: &str, s: Sets<'_>) -> Vec<Value> {
    let set = |suffix: &str| format!("{name}_{prefix}{suffix}");
    [
        elements(verb, &set("ap"), ap_elems(s.ap.iter())),
        elements(verb, &set("aa"), aa_elems(s.aa.iter())),
        elements(verb, &set("gp"), gp_elems(s.gp.iter())),
        elements(verb, &set("gx"), gx_elems(s.gx.iter())),
        elements(verb, &set("n4"), n_elems(s.n4.iter())),
        elements(verb, &set("n6"), n_elems(s.n6.iter())),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The element changes from `old` to `new` in the sets `<name>_<prefix><suffix>`, deletions
/// before additions in each set, as everywhere.
fn sets_diff(name: &str, prefix: &str, old: Sets<'_>, new: Sets<'_>) -> Vec<Value> {
    let mut c = Vec::new();
    let mut sync = |suffix: &str, (r, a): (Vec<Value>, Vec<Value>)| {
        c.extend(elements("delete", &format!("{name}_{prefix}{suffix}"), r));
        c.extend(elements("add", &format!("{name}_{prefix}{suffix}"), a));
    };
    sync("ap", both(set_diff(old.ap, new.ap), ap_elems));
    sync("aa", both(set_diff(old.aa, new.aa), aa_elems));
    sync("gp", both(set_diff(old.gp, new.gp), gp_elems));
    sync("gx", both(set_diff(old.gx, new.gx), gx_elems));
    sync("n4", both(set_diff(old.n4, new.n4), n_elems));
    sync("n6", both(set_diff(old.n6, new.n6), n_elems));
    c
}

fn ruleset_elements(verb: &str, name: &str, rs: &Ruleset) -> Vec<Value> {
    let mut out = sets_elements(verb, name, "d", rs.denies());
    out.extend(sets_elements(verb, name, "", rs.allows()));
    out
}

pub(super) fn add_ruleset(name: &str, rs: &Ruleset, epoch: u32) -> Vec<Value> {
    let name = &in_epoch(name, epoch);
    let mut c = Vec::new();
    for (set, ty, interval) in sets(name) {
        c.push(set_decl(&set, ty, interval));
    }
    if rs.ordered() {
        for (set, ty, interval) in deny_sets(name) {
            c.push(set_decl(&set, ty, interval));
        }
    }
    c.push(cmd("add", "chain", json!({"name": name})));
    c.extend(chain_rules(name, rs, epoch));
    c.extend(ruleset_elements("add", name, rs));
    c
}

pub(super) fn delete_ruleset(name: &str, rs: &Ruleset, epoch: u32) -> Vec<Value> {
    let name = &in_epoch(name, epoch);
    let mut c = vec![cmd("delete", "chain", json!({"name": name}))];
    let deny = if rs.ordered() {
        deny_sets(name)
    } else {
        Vec::new()
    };
    for (set, ty, _) in sets(name).into_iter().chain(deny) {
        // `type` is redundant for nft but the nftables crate's schema requires it.
        c.push(cmd("delete", "set", json!({"name": set, "type": ty})));
    }
    c
}

/// The commands turning ruleset `name` from `old` into `new` (both present in the kernel).
pub(super) fn change(name: &str, old: &Ruleset, new: &Ruleset, epoch: u32) -> Vec<Value> {
    let mut c = Vec::new();
    if old == new {
        return c;
    }
    let name = &in_epoch(name, epoch);
    if old.ordered() != new.ordered() {
        // The chain's shape changes: rebuild it around fresh deny sets (or without them).
        c.push(cmd("flush", "chain", json!({"name": name})));
        if old.ordered() {
            for (set, ty, _) in deny_sets(name) {
                c.push(cmd("delete", "set", json!({"name": set, "type": ty})));
            }
        } else {
            for (set, ty, interval) in deny_sets(name) {
                c.push(set_decl(&set, ty, interval));
            }
        }
        c.extend(chain_rules(name, new, epoch));
        if new.ordered() {
            c.extend(sets_elements("add", name, "d", new.denies()));
        }
        c.extend(sets_diff(name, "", old.allows(), new.allows()));
        return c;
    }
    if old.any != new.any {
        c.push(cmd("flush", "chain", json!({"name": name})));
        c.extend(chain_rules(name, new, epoch));
    }
    if new.ordered() {
        c.extend(sets_diff(name, "d", old.denies(), new.denies()));
    }
    c.extend(sets_diff(name, "", old.allows(), new.allows()));
    c
}

fn both<'a, T: Ord + 'a, I>(
    (r, a): (Vec<&'a T>, Vec<&'a T>),
    enc: impl Fn(std::vec::IntoIter<&'a T>) -> I,
) -> (I, I) {
    (enc(r.into_iter()), enc(a.into_iter()))
}

fn set_diff<'a, T: Ord>(old: &'a BTreeSet<T>, new: &'a BTreeSet<T>) -> (Vec<&'a T>, Vec<&'a T>) {
    (old.difference(new).collect(), new.difference(old).collect())
}
