//! Watcher events of every kind → index events: the first full sync as one reset, relists
//! as diffs, nothing for objects whose model content did not change, and a verdict for
//! every policy (see [`super::acceptance`]).

use std::collections::HashMap;
use std::sync::Arc;

use moat_policy::Event;
use moat_policy::model::parse::ValidationError;
use moat_policy::model::{Object, ObjectKey};
use tracing::warn;

use super::SourceEvent;
use super::acceptance::{Acceptance, Refusal, Verdict};
use super::cnp_status::{Observed, Work};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Namespace = 0,
    Node = 1,
    Pod = 2,
    Policy = 3,
    /// Optional: a cluster without the CRD counts as listed with none.
    ClusterPolicy = 4,
}

pub const N: usize = 5;
pub const KINDS: [Kind; N] = [
    Kind::Namespace,
    Kind::Node,
    Kind::Pod,
    Kind::Policy,
    Kind::ClusterPolicy,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Policy => "networkpolicies",
            Kind::ClusterPolicy => "clusternetworkpolicies",
        }
    }

    fn of(key: &ObjectKey) -> Kind {
        match key {
            ObjectKey::Namespace(_) => Kind::Namespace,
            ObjectKey::Node(_) => Kind::Node,
            ObjectKey::Pod { .. } => Kind::Pod,
            ObjectKey::Policy { .. } => Kind::Policy,
            ObjectKey::ClusterPolicy(_) => Kind::ClusterPolicy,
        }
    }

    /// Kinds whose every object gets a verdict (pods and namespaces are too many to keep
    /// one each, and nobody asks).
    fn judged(self) -> bool {
        matches!(self, Kind::Policy | Kind::ClusterPolicy)
    }
}

/// One object off a watch: the model's version of it (with its warnings) or why the model
/// refuses it, and, for objects whose status Moat may write, what that status says now.
#[derive(Debug)]
pub struct Converted {
    pub key: ObjectKey,
    pub result: Result<(Object, Vec<String>), ValidationError>,
    pub observed: Option<Observed>,
}

#[derive(Debug)]
pub enum Item {
    Init,
    InitApply(Converted),
    InitDone,
    Apply(Converted),
    Delete(ObjectKey),
}

#[derive(Default)]
pub struct Merger {
    /// Per kind: what the index has (model fingerprint per object).
    known: [HashMap<ObjectKey, u128>; N],
    /// Per kind, during a (re)list: what it has delivered so far.
    listing: [Option<HashMap<ObjectKey, Converted>>; N],
    listed: [bool; N],
    /// Until the first full sync: the objects themselves.
    staging: Option<HashMap<ObjectKey, Object>>,
    out: Vec<Event>,
    synced: bool,
    buf: Vec<u8>,
    pub acceptance: Arc<Acceptance>,
    /// Status judgements for the writer (drained by the source).
    pub status: Vec<Work>,
}

impl Merger {
    pub fn new(acceptance: Arc<Acceptance>) -> Merger {
        Merger {
            acceptance,
            ..Merger::default()
        }
    }

    /// `kind` has no objects because the API does not serve it: an empty, complete list.
    pub fn absent(&mut self, kind: Kind) {
        self.take(kind, Item::Init);
        self.take(kind, Item::InitDone);
    }

    pub fn take(&mut self, kind: Kind, item: Item) {
        let k = kind as usize;
        if self.staging.is_none() && !self.synced {
            self.staging = Some(HashMap::new());
        }
        match item {
            Item::Init => self.listing[k] = Some(HashMap::new()),
            Item::InitApply(c) => {
                if let Some(l) = self.listing[k].as_mut() {
                    l.insert(c.key.clone(), c);
                }
            }
            Item::InitDone => {
                let Some(l) = self.listing[k].take() else {
                    return;
                };
                self.listed[k] = true;
                let gone: Vec<ObjectKey> = self.known[k]
                    .keys()
                    .filter(|key| !l.contains_key(*key))
                    .cloned()
                    .collect();
                for key in gone {
                    self.delete(k, key);
                }
                if kind.judged() {
                    // Refused objects that never had a valid version are in no `known`.
                    for key in self
                        .acceptance
                        .remove_unless(|key| Kind::of(key) != kind || l.contains_key(key))
                    {
                        self.forget(&key);
                    }
                }
                // An object listed but refused by the model keeps its last valid version
                // (or stays absent): only valid ones are applied.
                for c in l.into_values() {
                    self.judge(kind, c);
                }
            }
            Item::Apply(c) => self.judge(kind, c),
            Item::Delete(key) => {
                if self.known[k].contains_key(&key) {
                    self.delete(k, key.clone());
                }
                if kind.judged() {
                    self.acceptance.remove(&key);
                    self.forget(&key);
                }
            }
        }
    }

    fn judge(&mut self, kind: Kind, c: Converted) {
        let k = kind as usize;
        let verdict = match c.result {
            Ok((o, warnings)) => {
                self.apply(k, o);
                Verdict::Accepted { warnings }
            }
            Err(e) => {
                warn!(object = %c.key, error = %e, "invalid object; its last valid version stays");
                Verdict::Refused {
                    why: Refusal::of(&e),
                    message: e.to_string(),
                    last_valid_in_force: self.known[k].contains_key(&c.key),
                }
            }
        };
        if !kind.judged() {
            return;
        }
        if let Some(observed) = c.observed {
            self.status.push(Work::Judge {
                observed,
                verdict: verdict.clone(),
            });
        }
        self.acceptance.set(c.key, verdict);
    }

    fn forget(&mut self, key: &ObjectKey) {
        if let ObjectKey::ClusterPolicy(name) = key {
            self.status.push(Work::Forget(name.clone()));
        }
    }

    fn apply(&mut self, k: usize, o: Object) {
        let f = fingerprint(&o, &mut self.buf);
        let key = o.key();
        if self.known[k].insert(key.clone(), f) == Some(f) {
            return;
        }
        match self.staging.as_mut() {
            Some(s) => {
                s.insert(key, o);
            }
            None => self.out.push(Event::Apply(o)),
        }
    }

    fn delete(&mut self, k: usize, key: ObjectKey) {
        self.known[k].remove(&key);
        match self.staging.as_mut() {
            Some(s) => {
                s.remove(&key);
            }
            None => self.out.push(Event::Delete(key)),
        }
    }

    /// What to send now, if anything.
    pub fn flush(&mut self) -> Option<SourceEvent> {
        if !self.synced {
            if !self.listed.iter().all(|l| *l) {
                return None;
            }
            self.synced = true;
            let objects = self.staging.take().unwrap_or_default();
            return Some(SourceEvent::Reset(objects.into_values().collect()));
        }
        if self.out.is_empty() {
            return None;
        }
        Some(SourceEvent::Batch(std::mem::take(&mut self.out)))
    }
}

/// The model content of an object, as a collision-resistant 128-bit hash: a change a tenant
/// makes to its own pod must never look like no change (a fast, keyless 64-bit hash could be
/// steered into a collision).
/// `buf` is reused: serialising straight into the hasher costs one `update` per JSON token.
fn fingerprint(o: &Object, buf: &mut Vec<u8>) -> u128 {
    buf.clear();
    // The model serialises infallibly into memory.
    let _ = serde_json::to_writer(&mut *buf, o);
    let b = blake3::hash(buf);
    u128::from_le_bytes(b.as_bytes()[..16].try_into().expect("16 bytes"))
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
