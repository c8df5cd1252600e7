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

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use moat_dataplane::plan::tier_tables::{TierPlan, TierTable, Tiers};
use moat_dataplane::plan::{DENY_EGRESS, DENY_INGRESS, Desired, Ruleset};
use moat_policy::ir::Action;

use super::{
    addr_class_elems, class_elems, concat, ct, elements, in_epoch, l4proto, lookup, map_decl,
    payload, port, range, rule, set_decl,
};

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
                // Always a range, one port too: nft 1.0.6 cannot delete a single value from
                // a concatenated interval set (ENOENT), but deletes `[p, p]`.
                let key = |with_class: bool| {
                    let mut k = vec![json!(p), range(lo, hi)];
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
                (Action::Allow, 0) => accp0.push(port(lo, hi)),
                (Action::Deny, 0) => denyp0.push(port(lo, hi)),
                (Action::Allow, _) => accp.push(json!({"concat": [c, port(lo, hi)]})),
                (Action::Deny, _) => denyp.push(json!({"concat": [c, port(lo, hi)]})),
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

/// Where the tiers find a peer's cluster class: as the class maps, intervals first, then
/// single addresses overriding them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterClassMaps {
    /// The class maps' intervals whose class has a cluster class (a miss is class 0).
    pub cc4: BTreeMap<(Ipv4Addr, Ipv4Addr), u32>,
    pub cc6: BTreeMap<(Ipv6Addr, Ipv6Addr), u32>,
    /// Every single address (of the class maps, or with named ports of its own) whose
    /// cluster class is not its interval's, whatever it is (a single's groups include its
    /// range's, so today a 0 never lies over another class; the map would carry it).
    pub ccaddr4: BTreeMap<Ipv4Addr, u32>,
    pub ccaddr6: BTreeMap<Ipv6Addr, u32>,
}

impl ClusterClassMaps {
    /// `tp`'s cluster classes laid over `d`'s address maps.
    pub fn of(d: &Desired, tp: &TierPlan) -> Self {
        let of = |c: &u32| tp.of_class.get(c).copied().unwrap_or(0);
        let mut m = ClusterClassMaps {
            cc4: d
                .class4
                .iter()
                .map(|(k, c)| (*k, of(c)))
                .filter(|e| e.1 != 0)
                .collect(),
            cc6: d
                .class6
                .iter()
                .map(|(k, c)| (*k, of(c)))
                .filter(|e| e.1 != 0)
                .collect(),
            ..Default::default()
        };
        let singles = d
            .addr4
            .keys()
            .map(|a| IpAddr::V4(*a))
            .chain(d.addr6.keys().map(|a| IpAddr::V6(*a)))
            .chain(tp.of_addr.keys().copied());
        for a in singles {
            let cc = tp.cclass_at(d, a);
            if cc == d.range_class_at(a).map_or(0, |c| of(&c)) {
                continue;
            }
            match a {
                IpAddr::V4(x) => m.ccaddr4.insert(x, cc),
                IpAddr::V6(x) => m.ccaddr6.insert(x, cc),
            };
        }
        m
    }

    /// Declares the maps (in `epoch`) and fills them.
    pub fn add(&self, epoch: u32) -> Vec<Value> {
        let name = |n: &str| in_epoch(n, epoch);
        let mut c = vec![
            map_decl(&name("cc4"), json!("ipv4_addr"), "mark", true),
            map_decl(&name("cc6"), json!("ipv6_addr"), "mark", true),
            map_decl(&name("ccaddr4"), json!("ipv4_addr"), "mark", false),
            map_decl(&name("ccaddr6"), json!("ipv6_addr"), "mark", false),
        ];
        c.extend(elements("add", &name("cc4"), class_elems(self.cc4.iter())));
        c.extend(elements("add", &name("cc6"), class_elems(self.cc6.iter())));
        c.extend(elements(
            "add",
            &name("ccaddr4"),
            addr_class_elems(self.ccaddr4.iter()),
        ));
        c.extend(elements(
            "add",
            &name("ccaddr6"),
            addr_class_elems(self.ccaddr6.iter()),
        ));
        c
    }
}

/// The rules, in `chain`, that put the cluster class of the peer (`saddr` for ingress,
/// `daddr` for egress) into the conntrack mark: cleared, then the intervals, then the
/// single addresses (a failed lookup ends its rule and leaves the mark as it was).
pub fn classify(chain: &str, peer: &str, epoch: u32) -> Vec<Value> {
    let mut r = vec![rule(
        chain,
        vec![json!({"mangle": {"key": ct("mark"), "value": 0}})],
    )];
    for (fam, map) in [
        ("ip", "cc4"),
        ("ip6", "cc6"),
        ("ip", "ccaddr4"),
        ("ip6", "ccaddr6"),
    ] {
        let data = format!("@{}", in_epoch(map, epoch));
        r.push(rule(
            chain,
            vec![json!({"mangle": {"key": ct("mark"), "value": {"map": {"key": payload(fam, peer), "data": data}}}})],
        ));
    }
    r
}

/// The chain of an endpoint direction with an Admin or a Baseline table: content-named, as
/// rulesets are (`T` keeps it apart from them and from the tables).
fn tiers_name(egress: bool, t: &Tiers) -> String {
    let mut h = blake3::Hasher::new();
    for part in [&t.admin, &t.np, &t.baseline] {
        h.update(part.as_deref().unwrap_or("-").as_bytes());
        h.update(&[0]);
    }
    let hex: String = h.finalize().as_bytes()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("T{}{hex}", if egress { "e_" } else { "i_" })
}

/// Tier chain name → (egress, its tiers).
pub type TierChains = BTreeMap<String, (bool, Tiers)>;

/// `d` (address maps alone) pointed at `tp`: its rulesets are the NetworkPolicy rulesets
/// (and a direction's deny where it is denied), and each enforced endpoint address leads to
/// its tier chain, or straight to its NetworkPolicy ruleset when it has no table. A
/// direction whose table or ruleset the plan does not hold is denied (fail closed).
pub fn with_tiers(d: &Desired, tp: &TierPlan) -> (Desired, TierChains) {
    let mut out = Desired {
        rulesets: tp.np.clone(),
        ing4: BTreeMap::new(),
        ing6: BTreeMap::new(),
        eg4: BTreeMap::new(),
        eg6: BTreeMap::new(),
        ..d.clone()
    };
    let mut chains = TierChains::new();
    for (&(a, egress), t) in &tp.endpoints {
        let held = t.np.iter().all(|n| tp.np.contains_key(n))
            && [&t.admin, &t.baseline]
                .into_iter()
                .flatten()
                .all(|n| tp.tables.contains_key(n));
        let name = if t.denied || !held {
            let deny = if egress { DENY_EGRESS } else { DENY_INGRESS };
            out.rulesets.entry(deny.into()).or_insert(Ruleset {
                egress,
                ..Default::default()
            });
            deny.to_string()
        } else if t.admin.is_none() && t.baseline.is_none() {
            match &t.np {
                Some(np) => np.clone(),
                None => continue,
            }
        } else {
            let n = tiers_name(egress, t);
            chains.entry(n.clone()).or_insert((egress, t.clone()));
            n
        };
        match (a, egress) {
            (IpAddr::V4(x), false) => out.ing4.insert(x, name),
            (IpAddr::V6(x), false) => out.ing6.insert(x, name),
            (IpAddr::V4(x), true) => out.eg4.insert(x, name),
            (IpAddr::V6(x), true) => out.eg6.insert(x, name),
        };
    }
    (out, chains)
}

/// The tier objects in `d`'s epoch: the cluster class maps, the tables the chains use,
/// then the chains (after the NetworkPolicy rulesets they go to, staged before them).
pub fn stage(d: &Desired, tp: &TierPlan, chains: &TierChains) -> Vec<Value> {
    let e = d.epoch;
    let mut c = ClusterClassMaps::of(d, tp).add(e);
    for name in used_tables(chains) {
        c.extend(add_table(&in_epoch(name, e), &tp.tables[name]));
    }
    for (name, (egress, t)) in chains {
        let chain = in_epoch(name, e);
        c.push(super::cmd("add", "chain", json!({"name": chain})));
        c.extend(chain_rules(&chain, *egress, t, e));
    }
    c
}

/// A tier chain: the Admin table; then the NetworkPolicy ruleset when one isolates the
/// endpoint, else the Baseline table; then allow. A flow whose first packet a tier chain
/// allowed inherits the verdict, as in a ruleset (the mark is shared once it is confirmed).
fn chain_rules(chain: &str, egress: bool, t: &Tiers, epoch: u32) -> Vec<Value> {
    use super::ruleset::{inherited, ok, stamp, untracked};
    let clear = json!({"mangle": {"key": ct("mark"), "value": 0}});
    let ends = Ends {
        allow: vec![clear.clone(), stamp(egress), ok(egress)],
        deny: vec![
            clear,
            json!({"counter": super::DENIED}),
            json!({"drop": null}),
        ],
    };
    let mut r = vec![inherited(chain, egress), untracked(chain)];
    r.extend(classify(
        chain,
        if egress { "daddr" } else { "saddr" },
        epoch,
    ));
    if let Some(a) = &t.admin {
        r.extend(block(chain, &in_epoch(a, epoch), &ends, false));
    }
    if let Some(np) = &t.np {
        r.push(rule(
            chain,
            vec![json!({"goto": {"target": in_epoch(np, epoch)}})],
        ));
        return r;
    }
    if let Some(b) = &t.baseline {
        r.extend(block(chain, &in_epoch(b, epoch), &ends, true));
    }
    r.push(rule(chain, ends.allow));
    r
}

/// The tier objects' changes from `old` to `new` (one epoch): (what goes before the local
/// pod table changes — cluster class map elements, tables added or refilled, tier chains
/// added — and what goes after it — tier chains, then tables, no longer named).
pub fn change(
    (old, old_tp, old_chains): (&Desired, &TierPlan, &TierChains),
    (new, new_tp, new_chains): (&Desired, &TierPlan, &TierChains),
) -> (Vec<Value>, Vec<Value>) {
    let e = new.epoch;
    let name = |n: &str| in_epoch(n, e);
    let (om, nm) = (
        ClusterClassMaps::of(old, old_tp),
        ClusterClassMaps::of(new, new_tp),
    );
    // Deletions before additions, so intervals never overlap.
    let mut added = super::address_maps_change(
        ["cc4", "cc6", "ccaddr4", "ccaddr6"],
        e,
        (&om.cc4, &om.cc6, &om.ccaddr4, &om.ccaddr6),
        (&nm.cc4, &nm.cc6, &nm.ccaddr4, &nm.ccaddr6),
    );
    let (old_tables, new_tables) = (used_tables(old_chains), used_tables(new_chains));
    for t in &new_tables {
        let table = &name(t);
        match old_tables.contains(t) {
            false => added.extend(add_table(table, &new_tp.tables[*t])),
            true => {
                let (was, now) = (
                    table_elements(&old_tp.tables[*t]),
                    table_elements(&new_tp.tables[*t]),
                );
                let mut adds = Vec::new();
                for ((suffix, o), (_, n)) in was.into_iter().zip(now) {
                    let set = format!("{table}_{suffix}");
                    let gone: Vec<Value> = o.iter().filter(|x| !n.contains(x)).cloned().collect();
                    let new: Vec<Value> = n.into_iter().filter(|x| !o.contains(x)).collect();
                    added.extend(elements("delete", &set, gone));
                    adds.extend(elements("add", &set, new));
                }
                added.extend(adds);
            }
        }
    }
    for (n, (egress, t)) in new_chains {
        if !old_chains.contains_key(n) {
            let chain = name(n);
            added.push(super::cmd("add", "chain", json!({"name": chain})));
            added.extend(chain_rules(&chain, *egress, t, e));
        }
    }
    let mut removed: Vec<Value> = old_chains
        .keys()
        .filter(|n| !new_chains.contains_key(*n))
        .map(|n| super::cmd("delete", "chain", json!({"name": name(n)})))
        .collect();
    for t in old_tables.difference(&new_tables) {
        for (set, ty, _) in sets(&name(t)) {
            removed.push(super::cmd(
                "delete",
                "set",
                json!({"name": set, "type": ty}),
            ));
        }
    }
    (added, removed)
}

/// The tables some tier chain uses.
fn used_tables(chains: &TierChains) -> std::collections::BTreeSet<&String> {
    chains
        .values()
        .flat_map(|(_, t)| [&t.admin, &t.baseline])
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests;
