//! Deltas between two snapshots of one node: what the sync plane sends instead of a full
//! snapshot when the enforcer provably holds the base.
//!
//! Rules are content-addressed (same ID, same content), so they are only ever added or
//! removed. Endpoints are replaced whole (they are small). Groups whose members changed are
//! patched member by member when that is smaller than resending them, so one pod joining a
//! group of 100,000 costs one address on the wire, not 100,000.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::digest::{Acc, Digest};
use super::{
    AddrPort, Endpoint, EndpointId, Group, GroupId, Members, NodeSnapshot, Rule, RuleId,
    addr_member, addr_port_member, rule_hash,
};

/// A version as the sync plane names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionRef {
    pub version: u64,
    pub digest: Digest,
}

/// Members added to and removed from one group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupPatch {
    Addrs {
        id: GroupId,
        add: Vec<IpAddr>,
        remove: Vec<IpAddr>,
    },
    AddrPorts {
        id: GroupId,
        add: Vec<AddrPort>,
        remove: Vec<AddrPort>,
    },
}

impl GroupPatch {
    pub fn id(&self) -> GroupId {
        match self {
            GroupPatch::Addrs { id, .. } | GroupPatch::AddrPorts { id, .. } => *id,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            GroupPatch::Addrs { add, remove, .. } => add.len() + remove.len(),
            GroupPatch::AddrPorts { add, remove, .. } => add.len() + remove.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub base: VersionRef,
    pub version: VersionRef,
    /// The node's addresses, if they changed.
    pub node_addrs: Option<Vec<IpAddr>>,
    pub upsert_endpoints: Vec<Endpoint>,
    pub remove_endpoints: Vec<EndpointId>,
    pub add_rules: Vec<Arc<Rule>>,
    pub remove_rules: Vec<RuleId>,
    /// New groups, and changed groups sent whole (when that is smaller than a patch).
    pub upsert_groups: Vec<Arc<Group>>,
    pub remove_groups: Vec<GroupId>,
    pub patch_groups: Vec<GroupPatch>,
}

impl Delta {
    /// Entries it carries (endpoints, rules, groups, members): its cost on the wire.
    pub fn entries(&self) -> usize {
        self.node_addrs.as_ref().map_or(0, Vec::len)
            + self.upsert_endpoints.len()
            + self.remove_endpoints.len()
            + self.add_rules.len()
            + self.remove_rules.len()
            + self
                .upsert_groups
                .iter()
                .map(|g| 1 + g.len())
                .sum::<usize>()
            + self.remove_groups.len()
            + self.patch_groups.iter().map(|p| 1 + p.len()).sum::<usize>()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("delta is based on version {want} ({}), but this node holds version {have} ({})", .want_digest.short(), .have_digest.short())]
    WrongBase {
        want: u64,
        want_digest: Digest,
        have: u64,
        have_digest: Digest,
    },
    #[error("delta {what} {id:016x}, which the base does not hold")]
    Missing { what: &'static str, id: u64 },
    #[error("delta adds {what} {id:016x}, which the base already holds")]
    Duplicate { what: &'static str, id: u64 },
    #[error("patch for group {0:016x} does not match its kind")]
    PatchKind(u64),
    #[error("patch for group {id:016x} {what} a member it {}", if *.what == "removes" { "lacks" } else { "already has" })]
    PatchMember { id: u64, what: &'static str },
    #[error("rule {0:016x} does not hash to its ID")]
    RuleId(u64),
    #[error("result digest {got} does not match the announced {want}")]
    Digest { got: Digest, want: Digest },
    #[error("snapshot references {what} {id:016x}, which it does not hold")]
    Dangling { what: &'static str, id: u64 },
}

/// The delta that turns `old` into `new`.
pub fn diff(old: &NodeSnapshot, new: &NodeSnapshot) -> Delta {
    let mut d = Delta {
        base: VersionRef {
            version: old.version,
            digest: old.digest,
        },
        version: VersionRef {
            version: new.version,
            digest: new.digest,
        },
        node_addrs: (old.node_addrs != new.node_addrs).then(|| new.node_addrs.clone()),
        upsert_endpoints: Vec::new(),
        remove_endpoints: Vec::new(),
        add_rules: Vec::new(),
        remove_rules: Vec::new(),
        upsert_groups: Vec::new(),
        remove_groups: Vec::new(),
        patch_groups: Vec::new(),
    };
    merge(
        &old.endpoints,
        &new.endpoints,
        |e| e.id,
        |step| match step {
            Step::Old(e) => d.remove_endpoints.push(e.id),
            Step::New(e) => d.upsert_endpoints.push(e.clone()),
            Step::Both(a, b) if a != b => d.upsert_endpoints.push(b.clone()),
            Step::Both(..) => {}
        },
    );
    merge(
        &old.rules,
        &new.rules,
        |r| r.id,
        |step| match step {
            Step::Old(r) => d.remove_rules.push(r.id),
            Step::New(r) => d.add_rules.push(r.clone()),
            Step::Both(..) => {}
        },
    );
    merge(
        &old.groups,
        &new.groups,
        |g| g.id,
        |step| match step {
            Step::Old(g) => d.remove_groups.push(g.id),
            Step::New(g) => d.upsert_groups.push(g.clone()),
            Step::Both(a, b) => {
                if Arc::ptr_eq(a, b) || a.members == b.members {
                    return;
                }
                match patch(a, b) {
                    Some(p) if p.len() < b.len() => d.patch_groups.push(p),
                    _ => d.upsert_groups.push(b.clone()),
                }
            }
        },
    );
    d
}

/// Applies `d` to `base`, checking that the base is the one the delta was made for and that
/// the result has exactly the announced digest. Nothing is half-applied: on error `base` is
/// untouched and no result exists.
pub fn apply(base: &NodeSnapshot, d: &Delta) -> Result<NodeSnapshot, DeltaError> {
    if base.version != d.base.version || base.digest != d.base.digest {
        return Err(DeltaError::WrongBase {
            want: d.base.version,
            want_digest: d.base.digest,
            have: base.version,
            have_digest: base.digest,
        });
    }
    let mut endpoints: HashMap<EndpointId, Endpoint> =
        base.endpoints.iter().map(|e| (e.id, e.clone())).collect();
    for id in &d.remove_endpoints {
        endpoints.remove(id).ok_or(DeltaError::Missing {
            what: "removes endpoint",
            id: id.0,
        })?;
    }
    for e in &d.upsert_endpoints {
        endpoints.insert(e.id, e.clone());
    }
    let mut rules: HashMap<RuleId, Arc<Rule>> =
        base.rules.iter().map(|r| (r.id, r.clone())).collect();
    for id in &d.remove_rules {
        rules.remove(id).ok_or(DeltaError::Missing {
            what: "removes rule",
            id: id.0,
        })?;
    }
    for r in &d.add_rules {
        if rule_hash(r)[..8] != r.id.0.to_le_bytes() {
            return Err(DeltaError::RuleId(r.id.0));
        }
        if rules.insert(r.id, r.clone()).is_some() {
            return Err(DeltaError::Duplicate {
                what: "rule",
                id: r.id.0,
            });
        }
    }
    let mut groups: HashMap<GroupId, Arc<Group>> =
        base.groups.iter().map(|g| (g.id, g.clone())).collect();
    for id in &d.remove_groups {
        groups.remove(id).ok_or(DeltaError::Missing {
            what: "removes group",
            id: id.0,
        })?;
    }
    for g in &d.upsert_groups {
        groups.insert(g.id, g.clone());
    }
    for p in &d.patch_groups {
        let old = groups.get(&p.id()).ok_or(DeltaError::Missing {
            what: "patches group",
            id: p.id().0,
        })?;
        let new = apply_patch(old, p)?;
        groups.insert(p.id(), Arc::new(new));
    }
    let mut snap = NodeSnapshot {
        node: base.node.clone(),
        version: d.version.version,
        digest: d.version.digest,
        node_addrs: d
            .node_addrs
            .clone()
            .unwrap_or_else(|| base.node_addrs.clone()),
        endpoints: endpoints.into_values().collect(),
        rules: rules.into_values().collect(),
        groups: groups.into_values().collect(),
    };
    snap.endpoints.sort_by_key(|e| e.id);
    snap.rules.sort_by_key(|r| r.id);
    snap.groups.sort_by_key(|g| g.id);
    check_references(&snap)?;
    let got = snap.content_digest();
    if got != d.version.digest {
        return Err(DeltaError::Digest {
            got,
            want: d.version.digest,
        });
    }
    Ok(snap)
}

/// Every rule an endpoint names and every group a rule names is in the snapshot.
pub fn check_references(s: &NodeSnapshot) -> Result<(), DeltaError> {
    let rules: HashMap<RuleId, &Rule> = s.rules.iter().map(|r| (r.id, &**r)).collect();
    let groups: std::collections::HashSet<GroupId> = s.groups.iter().map(|g| g.id).collect();
    for e in &s.endpoints {
        for id in e.ingress.rules.iter().chain(&e.egress.rules) {
            if !rules.contains_key(id) {
                return Err(DeltaError::Dangling {
                    what: "rule",
                    id: id.0,
                });
            }
        }
    }
    for r in &s.rules {
        if let super::Peers::Groups(ids) = &r.peers {
            for id in ids {
                if !groups.contains(id) {
                    return Err(DeltaError::Dangling {
                        what: "group",
                        id: id.0,
                    });
                }
            }
        }
    }
    Ok(())
}

fn patch(a: &Group, b: &Group) -> Option<GroupPatch> {
    match (&a.members, &b.members) {
        (Members::Addrs(x), Members::Addrs(y)) => {
            let (add, remove) = sorted_diff(x, y);
            Some(GroupPatch::Addrs {
                id: b.id,
                add,
                remove,
            })
        }
        (Members::AddrPorts(x), Members::AddrPorts(y)) => {
            let (add, remove) = sorted_diff(x, y);
            Some(GroupPatch::AddrPorts {
                id: b.id,
                add,
                remove,
            })
        }
        _ => None,
    }
}

fn apply_patch(old: &Group, p: &GroupPatch) -> Result<Group, DeltaError> {
    let id = old.id.0;
    let mut acc = Acc::default();
    acc.add(&old.members_hash());
    let members = match (&old.members, p) {
        (Members::Addrs(m), GroupPatch::Addrs { add, remove, .. }) => {
            let v = patched(m, add, remove, id)?;
            add.iter().for_each(|a| acc.add(&addr_member(*a)));
            remove.iter().for_each(|a| acc.sub(&addr_member(*a)));
            Members::Addrs(v)
        }
        (Members::AddrPorts(m), GroupPatch::AddrPorts { add, remove, .. }) => {
            let v = patched(m, add, remove, id)?;
            add.iter().for_each(|a| acc.add(&addr_port_member(a)));
            remove.iter().for_each(|a| acc.sub(&addr_port_member(a)));
            Members::AddrPorts(v)
        }
        _ => return Err(DeltaError::PatchKind(id)),
    };
    Ok(Group::with_hash(old.id, members, acc.to_bytes()))
}

/// `m` minus `remove` plus `add`, sorted; every removed member must exist and every added one
/// must be new (otherwise the patched hash would be wrong).
fn patched<T: Ord + Copy>(m: &[T], add: &[T], remove: &[T], id: u64) -> Result<Vec<T>, DeltaError> {
    let mut v: Vec<T> = m.to_vec();
    for r in remove {
        match v.binary_search(r) {
            Ok(i) => {
                v.remove(i);
            }
            Err(_) => {
                return Err(DeltaError::PatchMember {
                    id,
                    what: "removes",
                });
            }
        }
    }
    for a in add {
        match v.binary_search(a) {
            Ok(_) => return Err(DeltaError::PatchMember { id, what: "adds" }),
            Err(i) => v.insert(i, *a),
        }
    }
    Ok(v)
}

/// (in `y` not `x`, in `x` not `y`) for sorted slices.
fn sorted_diff<T: Ord + Copy>(x: &[T], y: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < x.len() || j < y.len() {
        match (x.get(i), y.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                remove.push(*a);
                i += 1;
            }
            (Some(_), Some(b)) => {
                add.push(*b);
                j += 1;
            }
            (Some(a), None) => {
                remove.push(*a);
                i += 1;
            }
            (None, Some(b)) => {
                add.push(*b);
                j += 1;
            }
            (None, None) => unreachable!(),
        }
    }
    (add, remove)
}

enum Step<'a, T> {
    Old(&'a T),
    New(&'a T),
    Both(&'a T, &'a T),
}

/// Merge-joins two slices sorted by `key`.
fn merge<'a, T, K: Ord>(
    old: &'a [T],
    new: &'a [T],
    key: impl Fn(&T) -> K,
    mut f: impl FnMut(Step<'a, T>),
) {
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) => match key(a).cmp(&key(b)) {
                std::cmp::Ordering::Equal => {
                    f(Step::Both(a, b));
                    i += 1;
                    j += 1;
                }
                std::cmp::Ordering::Less => {
                    f(Step::Old(a));
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    f(Step::New(b));
                    j += 1;
                }
            },
            (Some(a), None) => {
                f(Step::Old(a));
                i += 1;
            }
            (None, Some(b)) => {
                f(Step::New(b));
                j += 1;
            }
            (None, None) => unreachable!(),
        }
    }
}
