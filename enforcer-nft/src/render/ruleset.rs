//! A ruleset chain (one per distinct rule list and direction) and its sets: a fixed number
//! of lookups whatever the list's size (see `desired`).

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::{cmd, concat, ct, elements, in_epoch, l4proto, lookup, payload, port, rule, set_decl};
use crate::desired::Ruleset;

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

/// The fixed rules of ruleset chain `name` (already in `epoch`, see [`in_epoch`]): a constant
/// number of lookups whatever its size, in the class maps of the same epoch.
fn chain_rules(name: &str, rs: &Ruleset, epoch: u32) -> Vec<Value> {
    // Ingress: allowed means accepted. Egress: allowed means "go on to the ingress check".
    let ok = if rs.egress { "return" } else { "accept" };
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
    let clear = json!({"mangle": {"key": ct("mark"), "value": 0}});
    r.push(rule(name, vec![clear.clone()]));
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
    r.push(rule(
        name,
        vec![
            lookup(ct("mark"), &format!("{name}_aa")),
            clear.clone(),
            verdict.clone(),
        ],
    ));
    // Peer groups by exact port, then by port range.
    for set in ["gp", "gx"] {
        r.push(rule(
            name,
            vec![
                lookup(
                    concat(vec![ct("mark"), l4proto(), payload("th", "dport")]),
                    &format!("{name}_{set}"),
                ),
                clear.clone(),
                verdict.clone(),
            ],
        ));
    }
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

pub(super) fn add_ruleset(name: &str, rs: &Ruleset, epoch: u32) -> Vec<Value> {
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

pub(super) fn delete_ruleset(name: &str, epoch: u32) -> Vec<Value> {
    let name = &in_epoch(name, epoch);
    let mut c = vec![cmd("delete", "chain", json!({"name": name}))];
    for (set, ty, _) in sets(name) {
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
    if old.any != new.any {
        c.push(cmd("flush", "chain", json!({"name": name})));
        c.extend(chain_rules(name, new, epoch));
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
    sync("ap", both(set_diff(&old.ap, &new.ap), ap_elems));
    sync(
        "aa",
        both(set_diff(&old.aa, &new.aa), |it| {
            it.map(|x| json!(x)).collect()
        }),
    );
    sync("gp", both(set_diff(&old.gp, &new.gp), gp_elems));
    sync("gx", both(set_diff(&old.gx, &new.gx), gx_elems));
    sync("n4", both(set_diff(&old.n4, &new.n4), n_elems));
    sync("n6", both(set_diff(&old.n6, &new.n6), n_elems));
    c
}

fn set_diff<'a, T: Ord>(old: &'a BTreeSet<T>, new: &'a BTreeSet<T>) -> (Vec<&'a T>, Vec<&'a T>) {
    (old.difference(new).collect(), new.difference(old).collect())
}
