//! The fixed part of the table: the forward hook, the sender and receiver checks, the
//! count-and-drop chains, and the local pod table (`crate::local`) they look up.
//!
//! ```text
//!  forward:   ct state established,related accept
//!             ct state invalid counter denied drop
//!             jump sender                          (returns only if the sender passed)
//!             oif vmap @out_if                     pod → goto pod_dst, other → accept
//!             goto unclassified
//!  sender:    iif vmap @in_if                      pod → goto pod_src, other → goto other_src
//!             goto unclassified
//!  pod_src:   iif . ip saddr vmap @src4            → goto e_… | return | goto unknown_pod
//!             iif . ip6 saddr vmap @src6
//!             goto spoofed
//!  other_src: ip saddr @local4 goto spoofed        a local pod's address from elsewhere
//!             ip6 saddr @local6 goto spoofed
//!             return
//!  pod_dst:   oif . ip daddr vmap @dst4            → goto i_… | accept
//!             oif . ip6 daddr vmap @dst6
//!             goto unknown_pod
//! ```
//!
//! `goto` everywhere below `sender` keeps the jump stack one deep: an egress ruleset's
//! allow (`return`) goes back to `forward`, after `jump sender`, and the receiver checks
//! follow. Established packets take the first rule only.

use serde_json::{Value, json};

use super::{cmd, ct, elements, map_decl, payload, rule, set_decl};
use crate::local::{
    LocalTable, OTHER_SRC, POD_DST, POD_SRC, SENDER, SPOOFED, UNCLASSIFIED, UNKNOWN_POD, Verdict,
};

/// Named counters: the table's own name for each (reported under `moat_dataplane::counters`).
pub const DENIED: &str = "denied";
pub const COUNTERS: [&str; 4] = [DENIED, SPOOFED, UNKNOWN_POD, UNCLASSIFIED];

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn goto(chain: &str) -> Value {
    json!({"goto": {"target": chain}})
}

fn verdict(v: &Verdict) -> Value {
    match v {
        Verdict::Accept => json!({"accept": null}),
        Verdict::Return => json!({"return": null}),
        Verdict::Goto(c) => goto(c),
    }
}

fn vmap(key: Value, map: &str) -> Value {
    json!({"vmap": {"key": key, "data": format!("@{map}")}})
}

fn iface_addr(dir: &str, fam: &str, field: &str) -> Value {
    json!({"concat": [meta(dir), payload(fam, field)]})
}

/// The local pod table's sets and maps: name, key type, and whether it maps to verdicts.
fn local_objects() -> [(&'static str, Value, bool); 8] {
    let pair = |ty: &str| json!(["iface_index", ty]);
    [
        ("in_if", json!("iface_index"), true),
        ("out_if", json!("iface_index"), true),
        ("src4", pair("ipv4_addr"), true),
        ("dst4", pair("ipv4_addr"), true),
        ("src6", pair("ipv6_addr"), true),
        ("dst6", pair("ipv6_addr"), true),
        ("local4", json!("ipv4_addr"), false),
        ("local6", json!("ipv6_addr"), false),
    ]
}

/// Empties the local pod table (for [`super::switch`], which refills it in the same batch).
pub(super) fn flush_local() -> Vec<Value> {
    local_objects()
        .into_iter()
        .map(|(name, ty, vmap)| {
            // `type` and `map` are redundant for nft but the nftables crate's schema wants them.
            if vmap {
                cmd(
                    "flush",
                    "map",
                    json!({"name": name, "type": ty, "map": "verdict"}),
                )
            } else {
                cmd("flush", "set", json!({"name": name, "type": ty}))
            }
        })
        .collect()
}

/// Counters, the local pod table's sets and maps, and the fixed chains (without their
/// rules, which may only come once every chain they name exists).
pub(super) fn declarations() -> Vec<Value> {
    let mut c: Vec<Value> = COUNTERS
        .iter()
        .map(|n| cmd("add", "counter", json!({"name": n})))
        .collect();
    for (name, ty, vmap) in local_objects() {
        c.push(if vmap {
            map_decl(name, ty, "verdict", false)
        } else {
            set_decl(name, ty, false)
        });
    }
    for name in [
        SENDER,
        POD_SRC,
        OTHER_SRC,
        POD_DST,
        SPOOFED,
        UNKNOWN_POD,
        UNCLASSIFIED,
    ] {
        c.push(cmd("add", "chain", json!({"name": name})));
    }
    c
}

/// Every fixed chain's rules, the forward hook last: it takes packets from the moment it
/// exists, so everything it reaches is in place before it (all in one transaction anyway).
pub(super) fn chains() -> Vec<Value> {
    let mut c = Vec::new();
    for (name, counter) in [
        (SPOOFED, SPOOFED),
        (UNKNOWN_POD, UNKNOWN_POD),
        (UNCLASSIFIED, UNCLASSIFIED),
    ] {
        c.push(rule(
            name,
            vec![json!({"counter": counter}), json!({"drop": null})],
        ));
    }
    c.push(rule(SENDER, vec![vmap(meta("iif"), "in_if")]));
    c.push(rule(SENDER, vec![goto(UNCLASSIFIED)]));
    c.push(rule(
        POD_SRC,
        vec![vmap(iface_addr("iif", "ip", "saddr"), "src4")],
    ));
    c.push(rule(
        POD_SRC,
        vec![vmap(iface_addr("iif", "ip6", "saddr"), "src6")],
    ));
    c.push(rule(POD_SRC, vec![goto(SPOOFED)]));
    for (fam, set) in [("ip", "local4"), ("ip6", "local6")] {
        c.push(rule(
            OTHER_SRC,
            vec![
                json!({"match": {"op": "==", "left": payload(fam, "saddr"), "right": format!("@{set}")}}),
                goto(SPOOFED),
            ],
        ));
    }
    c.push(rule(OTHER_SRC, vec![json!({"return": null})]));
    c.push(rule(
        POD_DST,
        vec![vmap(iface_addr("oif", "ip", "daddr"), "dst4")],
    ));
    c.push(rule(
        POD_DST,
        vec![vmap(iface_addr("oif", "ip6", "daddr"), "dst6")],
    ));
    c.push(rule(POD_DST, vec![goto(UNKNOWN_POD)]));

    c.push(cmd(
        "add",
        "chain",
        json!({"name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}),
    ));
    let fwd = |expr: Vec<Value>| rule("forward", expr);
    c.push(fwd(vec![
        json!({"match": {"op": "in", "left": ct("state"), "right": ["established", "related"]}}),
        json!({"accept": null}),
    ]));
    c.push(fwd(vec![
        json!({"match": {"op": "in", "left": ct("state"), "right": "invalid"}}),
        json!({"counter": DENIED}),
        json!({"drop": null}),
    ]));
    c.push(fwd(vec![json!({"jump": {"target": SENDER}})]));
    c.push(fwd(vec![vmap(meta("oif"), "out_if")]));
    c.push(fwd(vec![goto(UNCLASSIFIED)]));
    c
}

fn if_elems<'a>(it: impl Iterator<Item = (&'a u32, &'a Verdict)>) -> Vec<Value> {
    it.map(|(i, v)| json!([i, verdict(v)])).collect()
}

fn pair_elems<'a, A: ToString + 'a>(
    it: impl Iterator<Item = (&'a (u32, A), &'a Verdict)>,
) -> Vec<Value> {
    it.map(|((i, a), v)| json!([{"concat": [i, a.to_string()]}, verdict(v)]))
        .collect()
}

fn addr_elems<'a, A: ToString + 'a>(it: impl Iterator<Item = &'a A>) -> Vec<Value> {
    it.map(|a| json!(a.to_string())).collect()
}

/// Adds every element of `t`.
pub(super) fn add_local(t: &LocalTable) -> Vec<Value> {
    [
        elements("add", "in_if", if_elems(t.in_if.iter())),
        elements("add", "out_if", if_elems(t.out_if.iter())),
        elements("add", "src4", pair_elems(t.src4.iter())),
        elements("add", "src6", pair_elems(t.src6.iter())),
        elements("add", "dst4", pair_elems(t.dst4.iter())),
        elements("add", "dst6", pair_elems(t.dst6.iter())),
        elements("add", "local4", addr_elems(t.local4.iter())),
        elements("add", "local6", addr_elems(t.local6.iter())),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The element changes from `old` to `new`: deletions, then additions (a changed verdict is
/// both).
pub(super) fn change_local(old: &LocalTable, new: &LocalTable) -> Vec<Value> {
    use super::map_diff;
    let (mut del, mut add) = (Vec::new(), Vec::new());
    let mut maps = |name: &str, (r, a): (Vec<Value>, Vec<Value>)| {
        del.extend(elements("delete", name, r));
        add.extend(elements("add", name, a));
    };
    let ifs = |o, n| {
        let (r, a) = map_diff(o, n);
        (if_elems(r.into_iter()), if_elems(a.into_iter()))
    };
    maps("in_if", ifs(&old.in_if, &new.in_if));
    maps("out_if", ifs(&old.out_if, &new.out_if));
    macro_rules! pairs {
        ($f:ident) => {{
            let (r, a) = map_diff(&old.$f, &new.$f);
            maps(
                stringify!($f),
                (pair_elems(r.into_iter()), pair_elems(a.into_iter())),
            );
        }};
    }
    pairs!(src4);
    pairs!(src6);
    pairs!(dst4);
    pairs!(dst6);
    macro_rules! sets {
        ($f:ident) => {{
            let r = old.$f.difference(&new.$f);
            let a = new.$f.difference(&old.$f);
            maps(stringify!($f), (addr_elems(r), addr_elems(a)));
        }};
    }
    sets!(local4);
    sets!(local6);
    del.extend(add);
    del
}
