//! The cluster index and its incrementally compiled per-node snapshots.
//!
//! ```text
//!   Event (apply/delete object)            reset(all objects)
//!          │                                       │ built fresh, swapped in whole
//!          ▼                                       ▼
//!   index::objects ── raw state: namespaces ─ pods (grouped by label set) ─ nodes ─ policies
//!          │  eager: group membership (a pod joins/leaves the groups whose selectors match;
//!          │         a Node's addresses join/leave the groups of `nodes` peers)
//!          │  lazy:  mark endpoints dirty (pods whose applicable policies may have changed)
//!          ▼
//!   compile::flush ── recompute dirty endpoints ─► rules (interned by content, refcounted)
//!          │                                      ─► groups (shared, refcounted per node)
//!          ▼
//!   per-node digest (multiset hash, updated in O(1) per item) ─► Changes { node → version }
//! ```
//!
//! Everything is synchronous and owned by one `Index`; callers wrap it in a lock and never
//! hold that lock across an `.await`. Object order never matters: IDs and digests are content
//! hashes, and a full [`Index::reset`] builds a fresh index and swaps it in whole, so a relist
//! never looks like deletes followed by adds.

mod cost;
mod objects;
mod origin;
mod query;
mod state;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use slab::Slab;

use crate::intern::Interner;
use crate::ir::digest::Digest;
use crate::labels::LabelSets;
use crate::model::{Object, ObjectKey};
use crate::selector::Selectors;

pub use cost::{CostWarning, PolicyCost};
pub use origin::{ListOrigin, PolicyRule};
pub use query::{PolicySpan, PriorityTie};
pub(crate) use state::*;

/// One change from a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Apply(Object),
    Delete(ObjectKey),
}

/// A node whose snapshot changed, with its new version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeVersion {
    pub node: Arc<str>,
    pub version: u64,
    pub digest: Digest,
}

/// What one batch of events did: exactly the nodes whose snapshot content changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// The index generation after the batch (the version given to every updated node).
    pub generation: u64,
    /// In no particular order.
    pub updated: Vec<NodeVersion>,
    /// Nodes that no longer exist.
    pub removed: Vec<Arc<str>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.updated.is_empty() && self.removed.is_empty()
    }
}

/// Counts of live index entries (for memory reports and leak tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub namespaces: usize,
    pub pods: usize,
    pub nodes: usize,
    pub policies: usize,
    pub groups: usize,
    pub rules: usize,
    pub strings: usize,
    pub label_sets: usize,
    pub selectors: usize,
}

pub struct Index {
    pub(crate) strings: Interner,
    pub(crate) labels: LabelSets,
    pub(crate) selectors: Selectors,

    pub(crate) namespaces: Slab<NsState>,
    pub(crate) ns_by_name: rustc_hash::FxHashMap<Arc<str>, NsIdx>,
    pub(crate) pods: Slab<PodState>,
    pub(crate) pod_by_key: rustc_hash::FxHashMap<(NsIdx, Arc<str>), PodIdx>,
    pub(crate) nodes: Slab<NodeState>,
    pub(crate) node_by_name: rustc_hash::FxHashMap<Arc<str>, NodeIdx>,
    pub(crate) policies: Slab<PolicyState>,
    pub(crate) policy_by_key: rustc_hash::FxHashMap<(NsIdx, Arc<str>), PolicyIdx>,
    pub(crate) cluster_policies: Slab<ClusterPolicyState>,
    pub(crate) cluster_policy_by_name: rustc_hash::FxHashMap<Arc<str>, CpIdx>,
    /// Selectable pods by address, for named ports behind an ipBlock.
    pub(crate) pods_by_ip:
        std::collections::BTreeMap<std::net::IpAddr, smallvec::SmallVec<[PodIdx; 1]>>,

    pub(crate) groups: Slab<GroupState>,
    pub(crate) group_by_def: rustc_hash::FxHashMap<GroupDef, GroupIdx>,
    /// Groups scoped by a namespace selector, and the namespaces that selector matches.
    pub(crate) nssel: rustc_hash::FxHashMap<crate::selector::SelId, NsSelEntry>,
    /// Named-port groups behind an ipBlock (rare; checked for every pod).
    pub(crate) block_named_groups: Vec<GroupIdx>,
    /// Groups of `nodes` peers (few; checked on every Node event).
    pub(crate) node_groups: Vec<GroupIdx>,
    pub(crate) rules: Slab<RuleState>,
    pub(crate) rule_by_key: rustc_hash::FxHashMap<RuleKey, RuleIdx>,
    /// Cluster rule lists in use, shared by every endpoint with the same key.
    pub(crate) cluster_rules: rustc_hash::FxHashMap<ClusterKey, Arc<ClusterRules>>,
    pub(crate) cluster_rules_next: u64,

    pub(crate) work: Work,
    pub(crate) generation: u64,
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

impl Index {
    pub fn new() -> Self {
        Self::starting_at(0)
    }

    /// An empty index whose first change gets version `generation + 1`. A server that
    /// persists its last generation restarts here so versions are never reused.
    pub fn starting_at(generation: u64) -> Self {
        Self {
            strings: Interner::default(),
            labels: LabelSets::default(),
            selectors: Selectors::default(),
            namespaces: Slab::new(),
            ns_by_name: Default::default(),
            pods: Slab::new(),
            pod_by_key: Default::default(),
            nodes: Slab::new(),
            node_by_name: Default::default(),
            policies: Slab::new(),
            policy_by_key: Default::default(),
            cluster_policies: Slab::new(),
            cluster_policy_by_name: Default::default(),
            pods_by_ip: Default::default(),
            groups: Slab::new(),
            group_by_def: Default::default(),
            nssel: Default::default(),
            block_named_groups: Vec::new(),
            node_groups: Vec::new(),
            rules: Slab::new(),
            rule_by_key: Default::default(),
            cluster_rules: Default::default(),
            cluster_rules_next: 0,
            work: Work::default(),
            generation,
        }
    }

    /// Builds an index from a complete object set in one pass (the full compile).
    pub fn build(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut index = Self::new();
        index.load(objects);
        index.flush();
        index
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Applies one object (add or update).
    pub fn apply(&mut self, object: Object) -> Changes {
        self.batch([Event::Apply(object)])
    }

    pub fn delete(&mut self, key: &ObjectKey) -> Changes {
        self.batch([Event::Delete(key.clone())])
    }

    /// Applies several events as one step: nodes get at most one new version.
    pub fn batch(&mut self, events: impl IntoIterator<Item = Event>) -> Changes {
        for e in events {
            match e {
                Event::Apply(o) => self.upsert(o),
                Event::Delete(k) => self.remove(&k),
            }
        }
        self.flush()
    }

    /// Replaces the whole state with `objects` (a relist) atomically. Nodes whose content is
    /// unchanged keep their version; nothing is ever transiently deleted.
    pub fn reset(&mut self, objects: impl IntoIterator<Item = Object>) -> Changes {
        let mut fresh = Self::starting_at(self.generation);
        fresh.load(objects);
        fresh.compile_dirty();
        let changes = fresh.publish_against(self);
        *self = fresh;
        changes
    }

    /// Inserts objects in dependency order without compiling: pods before policies means
    /// groups are filled by one scan each instead of one update per pod.
    fn load(&mut self, objects: impl IntoIterator<Item = Object>) {
        let mut nodes = Vec::new();
        let mut namespaces = Vec::new();
        let mut pods = Vec::new();
        let mut policies = Vec::new();
        for o in objects {
            match o {
                Object::Node(_) => nodes.push(o),
                Object::Namespace(_) => namespaces.push(o),
                Object::Pod(_) => pods.push(o),
                Object::Policy(_) | Object::ClusterPolicy(_) => policies.push(o),
            }
        }
        for o in nodes.into_iter().chain(namespaces).chain(pods) {
            self.upsert(o);
        }
        // Every pod with a node is dirty by now: policies need not find the ones they select.
        self.work.loading = true;
        for o in policies {
            self.upsert(o);
        }
        self.work.loading = false;
    }

    pub fn stats(&self) -> Stats {
        Stats {
            namespaces: self.namespaces.len(),
            pods: self.pods.len(),
            nodes: self.nodes.len(),
            policies: self.policies.len() + self.cluster_policies.len(),
            groups: self.groups.len(),
            rules: self.rules.len(),
            strings: self.strings.len(),
            label_sets: self.labels.len(),
            selectors: self.selectors.len(),
        }
    }
}
