//! Layout 7's tier tables as nftables objects and rules (docs/design/cluster-tiers.md,
//! "nftables, refined"). Not yet taken by the backend, which still enforces layout 6's
//! resolved rulesets: this is the renderer's half, checked against
//! [`TierTable::lookup`] through the table model.
//!
//! A verdict map cannot hold a tier's Pass (the tier after it depends on the endpoint, the
//! table is shared by every endpoint holding its list) and `continue` would fall into class
//! 0's rows. So a table is plain interval sets holding its Accept and Deny intervals, Pass
//! being their absence, and `_rows` names the cluster classes with rows of their own: class
//! 0's rows are looked up only for the others. Each class with rows covers every (protocol,
//! port): its whole action fills the gaps between its port runs.

use serde_json::{Value, json};

use moat_dataplane::plan::tier_tables::TierTable;
use moat_policy::ir::Action;

use super::{concat, ct, elements, l4proto, lookup, payload, range, rule, set_decl};

/// Protocols with ports (TCP, UDP, SCTP). Every other protocol is keyed by the protocol
/// alone: `th dport` on a packet too short to hold it ends the rule, which would read a
/// Deny as a Pass. (A TCP, UDP or SCTP packet that short is invalid to conntrack, and
/// `forward` drops invalid packets before any ruleset.)
pub const PORTED: [u8; 3] = [6, 17, 132];

/// The protocol ranges without ports.
const UNPORTED: [(u8, u8); 4] = [(0, 5), (7, 16), (18, 131), (133, 255)];

/// Table `name`'s sets: suffix, key type, interval.
fn sets(name: &str) -> Vec<(String, Value, bool)> {
    let ported = || json!(["mark", "inet_proto", "inet_service"]);
    let proto = || json!(["mark", "inet_proto"]);
    let ported0 = || json!(["inet_proto", "inet_service"]);
    [
        ("acc", ported(), true),
        ("deny", ported(), true),
        ("accp", proto(), true),
        ("denyp", proto(), true),
        ("rows", json!("mark"), false),
        ("acc0", ported0(), true),
        ("deny0", ported0(), true),
        ("accp0", json!("inet_proto"), true),
        ("denyp0", json!("inet_proto"), true),
    ]
    .into_iter()
    .map(|(s, ty, interval)| (format!("{name}_{s}"), ty, interval))
    .collect()
}

/// A class's intervals over one protocol's ports: its runs, the gaps filled with `whole`.
fn covered(runs: &[(u16, u16, Action)], whole: Action) -> Vec<(u16, u16, Action)> {
    let mut out = Vec::new();
    let mut next = 0u32;
    for &(lo, hi, a) in runs {
        if u32::from(lo) > next {
            out.push((next as u16, lo - 1, whole));
        }
        out.push((lo, hi, a));
        next = u32::from(hi) + 1;
    }
    if next <= u32::from(u16::MAX) {
        out.push((next as u16, u16::MAX, whole));
    }
    out
}

fn span<T: Into<Value> + PartialEq + Copy>(a: T, b: T) -> Value {
    if a == b { a.into() } else { range(a, b) }
}

/// The elements of table `t`'s sets, by set suffix.
fn table_elements(t: &TierTable) -> Vec<(&'static str, Vec<Value>)> {
    let (mut acc, mut deny, mut accp, mut denyp, mut rows) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut acc0, mut deny0, mut accp0, mut denyp0) = (vec![], vec![], vec![], vec![]);
    for (&c, &whole) in &t.whole {
        if c != 0 {
            rows.push(json!(c));
        }
        for p in PORTED {
            let runs: Vec<(u16, u16, Action)> = t
                .ports
                .range((c, p, 0, 0)..=(c, p, u16::MAX, u16::MAX))
                .map(|(k, a)| (k.2, k.3, *a))
                .collect();
            for (lo, hi, a) in covered(&runs, whole) {
                let key = |with_class: bool| {
                    let mut k = vec![json!(p), span(lo, hi)];
                    if with_class {
                        k.insert(0, json!(c));
                    }
                    json!({"concat": k})
                };
                match (a, c) {
                    (Action::Allow, 0) => acc0.push(key(false)),
                    (Action::Deny, 0) => deny0.push(key(false)),
                    (Action::Allow, _) => acc.push(key(true)),
                    (Action::Deny, _) => deny.push(key(true)),
                    (Action::Pass, _) => {}
                }
            }
        }
        for (lo, hi) in UNPORTED {
            match (whole, c) {
                (Action::Allow, 0) => accp0.push(span(lo, hi)),
                (Action::Deny, 0) => denyp0.push(span(lo, hi)),
                (Action::Allow, _) => accp.push(json!({"concat": [c, span(lo, hi)]})),
                (Action::Deny, _) => denyp.push(json!({"concat": [c, span(lo, hi)]})),
                (Action::Pass, _) => {}
            }
        }
    }
    vec![
        ("acc", acc),
        ("deny", deny),
        ("accp", accp),
        ("denyp", denyp),
        ("rows", rows),
        ("acc0", acc0),
        ("deny0", deny0),
        ("accp0", accp0),
        ("denyp0", denyp0),
    ]
}

/// Declares table `name` (already in its epoch) and fills it.
pub fn add_table(name: &str, t: &TierTable) -> Vec<Value> {
    let mut c: Vec<Value> = sets(name)
        .into_iter()
        .map(|(s, ty, interval)| set_decl(&s, ty, interval))
        .collect();
    for (suffix, elems) in table_elements(t) {
        c.extend(elements("add", &format!("{name}_{suffix}"), elems));
    }
    c
}

/// How a tier block's hits end: a tier's Accept (`allow`, the direction's own allow
/// statements) and its Deny.
pub struct Ends {
    pub allow: Vec<Value>,
    pub deny: Vec<Value>,
}

/// The rules, in `chain`, that decide table `table` for a packet whose cluster class is in
/// the conntrack mark: a hit in Accept (unless `deny_only`: a Baseline table, where Accept
/// and Pass alike go on to allow) or Deny ends the packet; everything else goes on to the
/// chain's next rule (a Pass).
pub fn block(chain: &str, table: &str, ends: &Ends, deny_only: bool) -> Vec<Value> {
    let set = |s: &str| format!("{table}_{s}");
    let ported = || concat(vec![ct("mark"), l4proto(), payload("th", "dport")]);
    let ported0 = || concat(vec![l4proto(), payload("th", "dport")]);
    let unported =
        || json!({"match": {"op": "!=", "left": l4proto(), "right": {"set": PORTED.to_vec()}}});
    let not_rows =
        || json!({"match": {"op": "!=", "left": ct("mark"), "right": format!("@{}", set("rows"))}});
    let mut r = Vec::new();
    // (the rule's matches, the set it looks up, whether its hits deny)
    let rows: [(Vec<Value>, Value, &str, bool); 8] = [
        (vec![], ported(), "acc", false),
        (vec![], ported(), "deny", true),
        (
            vec![unported()],
            concat(vec![ct("mark"), l4proto()]),
            "accp",
            false,
        ),
        (
            vec![unported()],
            concat(vec![ct("mark"), l4proto()]),
            "denyp",
            true,
        ),
        (vec![not_rows()], ported0(), "acc0", false),
        (vec![not_rows()], ported0(), "deny0", true),
        (vec![not_rows(), unported()], l4proto(), "accp0", false),
        (vec![not_rows(), unported()], l4proto(), "denyp0", true),
    ];
    for (mut head, key, s, deny) in rows {
        if deny_only && !deny {
            continue;
        }
        head.push(lookup(key, &set(s)));
        head.extend(if deny { &ends.deny } else { &ends.allow }.iter().cloned());
        r.push(rule(chain, head));
    }
    r
}

#[cfg(test)]
mod tests;
