//! A snapshot that would not fit one gRPC message is degraded by the server before sending,
//! the way a dataplane degrades a version it cannot hold (`moat_dataplane::plan::budget`):
//! the biggest rule lists are replaced by "deny" in their direction — their endpoints are
//! isolated with no rules — until it fits; every other endpoint keeps its exact rules. The
//! result is an ordinary snapshot with a content-derived digest, so deltas, acknowledgements
//! and the store treat it like any other; what was cut travels to the fleet status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use moat_policy::ir::{EndpointId, GroupId, NodeSnapshot, Peers, RuleId};
use moat_proto::ToProto;
use moat_proto::v1;
use prost::Message;

/// What a Snapshot message adds around its content (nonce, version, digest, timestamps,
/// framing), generously.
pub const ENVELOPE: usize = 256;

/// The snapshot to serve, and the rule lists cut from it.
pub struct Fitted {
    pub snap: Arc<NodeSnapshot>,
    /// Empty when `snap` is the snapshot as compiled.
    pub cut: Vec<v1::Degradation>,
    /// Encoded size of the served content (an upper bound when nothing was cut).
    pub bytes: usize,
}

/// The bytes a length-delimited field of `len` bytes takes in its parent (tags < 16).
fn field(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// An upper bound of the content's encoded size from counts alone, so snapshots far below
/// the limit (nearly all) cost no encoding.
fn bound(s: &NodeSnapshot) -> usize {
    let addrs = |n: usize| n * 19;
    let mut b = addrs(s.node_addrs.len());
    for e in &s.endpoints {
        b += 64 + addrs(e.addrs.len()) + 8 * (e.ingress.rules.len() + e.egress.rules.len());
    }
    for r in &s.rules {
        b +=
            64 + match &r.peers {
                Peers::Any => 0,
                Peers::Groups(g) => 8 * g.len(),
            } + match &r.ports {
                moat_policy::ir::Ports::Ranges(v) => 20 * v.len(),
                _ => 0,
            };
    }
    for g in &s.groups {
        b += 32 + 40 * g.len();
    }
    b
}

/// `snap` as it can be sent in at most `limit` bytes (content plus [`ENVELOPE`]).
pub fn fit(snap: Arc<NodeSnapshot>, limit: usize) -> Fitted {
    let room = limit.saturating_sub(ENVELOPE);
    let upper = bound(&snap);
    if upper <= room {
        return Fitted {
            snap,
            cut: Vec::new(),
            bytes: upper,
        };
    }
    let exact = snap.to_proto().encoded_len();
    if exact <= room {
        return Fitted {
            snap,
            cut: Vec::new(),
            bytes: exact,
        };
    }

    let rule_bytes: HashMap<RuleId, usize> = snap
        .rules
        .iter()
        .map(|r| (r.id, field(r.to_proto().encoded_len())))
        .collect();
    let group_bytes: HashMap<GroupId, usize> = snap
        .groups
        .iter()
        .map(|g| (g.id, field(g.to_proto().encoded_len())))
        .collect();
    let peers: HashMap<RuleId, &[GroupId]> = snap
        .rules
        .iter()
        .map(|r| match &r.peers {
            Peers::Groups(g) => (r.id, g.as_slice()),
            Peers::Any => (r.id, &[][..]),
        })
        .collect();
    let groups_of = |id: &RuleId| -> &[GroupId] { peers.get(id).copied().unwrap_or(&[]) };
    // Every distinct rule list with the endpoints holding it.
    let mut lists: BTreeMap<(bool, &[RuleId]), Vec<EndpointId>> = BTreeMap::new();
    for e in &snap.endpoints {
        for (egress, d) in [(false, &e.ingress), (true, &e.egress)] {
            // Also a list no NetworkPolicy isolates: its cluster rules cut, it denies too.
            if !d.rules.is_empty() {
                lists.entry((egress, &d.rules)).or_default().push(e.id);
            }
        }
    }
    let mut rule_refs: HashMap<RuleId, usize> = HashMap::new();
    for (_, rules) in lists.keys() {
        for r in *rules {
            *rule_refs.entry(*r).or_default() += 1;
        }
    }
    let mut group_refs: HashMap<GroupId, usize> = HashMap::new();
    for r in rule_refs.keys() {
        for g in groups_of(r) {
            *group_refs.entry(*g).or_default() += 1;
        }
    }
    // Heaviest first: what a list's rules and their groups weigh on their own.
    let mut order: Vec<(usize, (bool, &[RuleId]))> = lists
        .keys()
        .map(|k| {
            let w: usize =
                k.1.iter()
                    .map(|r| {
                        rule_bytes.get(r).copied().unwrap_or(0)
                            + groups_of(r)
                                .iter()
                                .map(|g| group_bytes.get(g).copied().unwrap_or(0))
                                .sum::<usize>()
                    })
                    .sum();
            (w, *k)
        })
        .collect();
    order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));

    let mut size = exact;
    let mut cut: Vec<(bool, &[RuleId])> = Vec::new();
    let mut served = None;
    for (_, key) in order {
        let eps = &lists[&key];
        for r in key.1 {
            let c = rule_refs.get_mut(r).expect("counted");
            *c -= 1;
            if *c == 0 {
                size = size.saturating_sub(rule_bytes.get(r).copied().unwrap_or(0));
                for g in groups_of(r) {
                    let c = group_refs.get_mut(g).expect("counted");
                    *c -= 1;
                    if *c == 0 {
                        size = size.saturating_sub(group_bytes.get(g).copied().unwrap_or(0));
                    }
                }
            }
        }
        // Each holder loses the list's IDs (packed fixed64).
        size = size.saturating_sub(eps.len() * 8 * key.1.len());
        cut.push(key);
        if size > room {
            continue;
        }
        // The running size is an estimate (length prefixes shrink too): check exactly.
        let s = without(&snap, &cut);
        size = s.to_proto().encoded_len();
        if size <= room {
            served = Some(s);
            break;
        }
    }
    // Every list cut and still too big: the endpoints alone exceed the limit, and this is
    // as small as the node's snapshot gets (sending it will fail, loudly).
    let served = served.unwrap_or_else(|| {
        let s = without(&snap, &cut);
        size = s.to_proto().encoded_len();
        s
    });
    let why = format!(
        "the snapshot needs {exact} bytes, more than the {limit}-byte message limit (the server denied its biggest rule lists)"
    );
    Fitted {
        snap: Arc::new(served),
        cut: cut
            .iter()
            .map(|k| v1::Degradation {
                egress: k.0,
                rules: k.1.iter().map(|r| r.0).collect(),
                endpoints: lists[k].iter().map(|e| e.0).collect(),
                reason: why.clone(),
            })
            .collect(),
        bytes: size,
    }
}

/// `snap` with the `cut` lists denied: their holders are isolated (a list of cluster rules
/// may not have been) and lose every rule of that direction; rules and groups nothing
/// references any more are dropped.
fn without(snap: &NodeSnapshot, cut: &[(bool, &[RuleId])]) -> NodeSnapshot {
    let mut s = snap.clone();
    for e in &mut s.endpoints {
        for (egress, d) in [(false, &mut e.ingress), (true, &mut e.egress)] {
            if cut.iter().any(|(eg, r)| *eg == egress && **r == *d.rules) {
                d.rules.clear();
                d.isolated = true;
            }
        }
    }
    let used: std::collections::HashSet<RuleId> = s
        .endpoints
        .iter()
        .flat_map(|e| e.ingress.rules.iter().chain(&e.egress.rules))
        .copied()
        .collect();
    s.rules.retain(|r| used.contains(&r.id));
    let groups: std::collections::HashSet<GroupId> = s
        .rules
        .iter()
        .flat_map(|r| match &r.peers {
            Peers::Groups(g) => g.as_slice(),
            Peers::Any => &[],
        })
        .copied()
        .collect();
    s.groups.retain(|g| groups.contains(&g.id));
    s.digest = s.content_digest();
    s
}

#[cfg(test)]
mod tests;
