//! The fleet view: per node, what the server published and what the enforcer says it applied.
//!
//! Everything here comes from the enforcers' own word on their streams — their
//! acknowledgements, and the version a reconnecting enforcer says it still enforces: the
//! proof that node N enforces version V — and is persisted, so a restarted server still knows.
//!
//! A node deleted from its source stays in the view, marked deleted, for a grace period,
//! then leaves it (and the store): only [`Fleet::published`] — the source naming the node —
//! ever adds a node, so a late stream event cannot bring a deleted node back.

use moat_proto::unix_micros as micros;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use moat_policy::index::PolicySpan;
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::VersionRef;
use moat_proto::v1;

use crate::degraded::NodeDegradations;
use crate::hub::NodeKey;
use crate::store::{self, StoredStatus};

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// How many published versions per node are remembered for lag and policy accounting.
const PUBLISHED_LOG: usize = 64;

/// Something a sync stream observed.
#[derive(Debug)]
pub enum StreamEvent {
    Connected {
        backend: String,
        kernel: String,
        /// The enforcer's "selected" probe: why it runs this backend.
        selection: String,
        /// The version the enforcer says it enforces (adopted from its previous run). As
        /// good as an ACK of it, and the only word there is when an enforcer applied the
        /// newest version but stopped before its ACK went out: nothing is sent to it again,
        /// so nothing else would ever say it is in sync.
        enforcing: Option<VersionRef>,
    },
    Acked {
        version: VersionRef,
        apply_micros: u64,
        /// The content, when the server still has it (persisted as a future delta base).
        snapshot: Option<Arc<NodeSnapshot>>,
        /// Rule lists the node's dataplane denies instead (its Ack).
        degraded: Vec<v1::Degradation>,
        /// Rule lists the server cut from this version before sending it.
        cut: Vec<v1::Degradation>,
    },
    /// The server serves the published version `published` as `served`, cut to fit one
    /// message (a stream computes it before sending, or to find the enforcer holds it).
    Served {
        published: VersionRef,
        served: VersionRef,
        cut: Vec<v1::Degradation>,
    },
    Nacked {
        rejected: VersionRef,
        error: String,
    },
    Report {
        counters: HashMap<String, u64>,
        enforcing: Option<VersionRef>,
        degraded: Vec<v1::Degradation>,
        local: Option<v1::LocalPods>,
    },
    Disconnected,
}

#[derive(Clone, Debug, Default)]
struct NodeState {
    backend: String,
    kernel: String,
    selection: String,
    streams: u32,
    applied: Option<VersionRef>,
    last_error: String,
    last_ack: Option<SystemTime>,
    published: VecDeque<(VersionRef, SystemTime)>,
    counters: HashMap<String, u64>,
    deg: NodeDegradations,
    /// When the source stopped naming this node.
    deleted: Option<SystemTime>,
    /// Whether the store has `deleted` (so a restart keeps the grace period's clock).
    deleted_saved: bool,
}

impl NodeState {
    fn stored(&self) -> StoredStatus {
        let latest = self.published.back().map(|(v, _)| *v);
        StoredStatus {
            backend: self.backend.clone(),
            kernel: self.kernel.clone(),
            applied_version: self.applied.map_or(0, |a| a.version),
            applied_digest: self
                .applied
                .map(|a| a.digest.0.to_vec())
                .unwrap_or_default(),
            last_error: self.last_error.clone(),
            last_ack_unix_micros: self.last_ack.map_or(0, micros),
            published_version: latest.map_or(0, |v| v.version),
            published_digest: latest.map(|v| v.digest.0.to_vec()).unwrap_or_default(),
            selection: self.selection.clone(),
            deleted_unix_micros: self.deleted.map_or(0, micros),
            node_degraded: self.deg.node.clone(),
            server_degraded: self.deg.server.clone(),
        }
    }
}

/// What a sweep of deleted nodes found to do.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Newly deleted nodes whose deletion time must be persisted.
    pub save: Vec<(NodeKey, StoredStatus)>,
    /// Nodes whose grace period is over: to be dropped from the store, then
    /// [`Fleet::forget`]ten.
    pub expired: Vec<NodeKey>,
}

#[derive(Default)]
pub struct Fleet {
    nodes: Mutex<BTreeMap<NodeKey, NodeState>>,
    /// Nodes with a degradation in force, kept in step with `nodes`.
    degraded: Mutex<(usize, Option<prometheus_client::metrics::gauge::Gauge>)>,
    /// Several replicas: this one's name, and what the others say of their streams.
    peers: Mutex<Peers>,
}

#[derive(Default)]
struct Peers {
    me: String,
    /// A peer's word counts while its last heartbeat is younger than this.
    fresh_for: std::time::Duration,
    by_replica: BTreeMap<String, Peer>,
}

#[derive(Default)]
struct Peer {
    /// When its last heartbeat arrived here (this clock, not the peer's).
    beat: Option<std::time::Instant>,
    nodes: HashMap<NodeKey, v1::NodeStatus>,
}

impl Fleet {
    /// Seeds the view from the store after a restart.
    pub fn restore(&self, saved: Vec<(String, String, StoredStatus)>) {
        let mut nodes = self.nodes.lock().expect("fleet lock");
        for (cluster, node, s) in saved {
            let applied = store::digest_of(&s.applied_digest).map(|digest| VersionRef {
                version: s.applied_version,
                digest,
            });
            nodes.insert(
                (Arc::from(cluster.as_str()), Arc::from(node.as_str())),
                NodeState {
                    backend: s.backend,
                    kernel: s.kernel,
                    selection: s.selection,
                    applied: applied.filter(|a| a.version > 0),
                    last_error: s.last_error,
                    last_ack: (s.last_ack_unix_micros > 0)
                        .then(|| moat_proto::from_unix_micros(s.last_ack_unix_micros)),
                    deg: NodeDegradations {
                        node: s.node_degraded,
                        server: s.server_degraded,
                        ..Default::default()
                    },
                    deleted: (s.deleted_unix_micros > 0)
                        .then(|| moat_proto::from_unix_micros(s.deleted_unix_micros)),
                    deleted_saved: true,
                    ..Default::default()
                },
            );
        }
        let n = nodes.values().filter(|n| n.deg.is_degraded()).count();
        drop(nodes);
        self.count_degraded(|c| *c = n);
    }

    /// Keeps `gauge` equal to the number of degraded nodes.
    pub fn watch_degraded(&self, gauge: prometheus_client::metrics::gauge::Gauge) {
        let mut d = self.degraded.lock().expect("degraded lock");
        gauge.set(d.0 as i64);
        d.1 = Some(gauge);
    }

    fn count_degraded(&self, f: impl FnOnce(&mut usize)) {
        let mut d = self.degraded.lock().expect("degraded lock");
        f(&mut d.0);
        if let Some(g) = &d.1 {
            g.set(d.0 as i64);
        }
    }

    /// A node's degradations and local pod table, if the node is known.
    pub fn degradations(&self, cluster: &str, node: &str) -> Option<NodeDegradations> {
        let nodes = self.nodes.lock().expect("fleet lock");
        nodes
            .get(&(Arc::from(cluster), Arc::from(node)))
            .map(|n| n.deg.clone())
    }

    /// What a node was last published as before a restart (for version continuity).
    pub fn saved_published(
        saved: &[(String, String, StoredStatus)],
        cluster: &str,
    ) -> HashMap<String, (u64, moat_policy::ir::digest::Digest)> {
        saved
            .iter()
            .filter(|(c, _, _)| c == cluster)
            .filter_map(|(_, n, s)| {
                Some((
                    n.clone(),
                    (s.published_version, store::digest_of(&s.published_digest)?),
                ))
            })
            .filter(|(_, (v, _))| *v > 0)
            .collect()
    }

    pub fn published(&self, cluster: &Arc<str>, node: &Arc<str>, v: VersionRef, at: SystemTime) {
        let mut nodes = self.nodes.lock().expect("fleet lock");
        let n = nodes.entry((cluster.clone(), node.clone())).or_default();
        // Named by the source again: not deleted (any more).
        n.deleted = None;
        n.deleted_saved = false;
        if n.published.back().is_some_and(|(p, _)| *p == v) {
            return;
        }
        n.published.push_back((v, at));
        while n.published.len() > PUBLISHED_LOG {
            n.published.pop_front();
        }
    }

    /// The source deleted the node: it stays in the view, marked, until [`Fleet::sweep`]
    /// finds its grace period over.
    pub fn removed(&self, cluster: &Arc<str>, node: &Arc<str>) {
        let mut nodes = self.nodes.lock().expect("fleet lock");
        if let Some(n) = nodes.get_mut(&(cluster.clone(), node.clone())) {
            n.deleted.get_or_insert_with(SystemTime::now);
        }
    }

    /// A cluster's first full sync after a start: `present` are all its nodes. Nodes the
    /// store remembered that the source no longer has are deleted from now on (or since
    /// their recorded deletion).
    pub fn first_sync(&self, cluster: &str, present: &std::collections::HashSet<Arc<str>>) {
        let now = SystemTime::now();
        let mut nodes = self.nodes.lock().expect("fleet lock");
        for ((c, node), n) in nodes.iter_mut() {
            if **c == *cluster && !present.contains(node) {
                n.deleted.get_or_insert(now);
            }
        }
    }

    /// Finds deleted nodes to persist as such and those whose `grace` is over. Nodes of
    /// clusters no longer served (`served` says false) count as deleted from now.
    pub fn sweep(&self, grace: std::time::Duration, served: impl Fn(&str) -> bool) -> Sweep {
        let now = SystemTime::now();
        let mut out = Sweep::default();
        let mut nodes = self.nodes.lock().expect("fleet lock");
        for (key, n) in nodes.iter_mut() {
            if n.deleted.is_none() && !served(&key.0) {
                n.deleted = Some(now);
            }
            let Some(at) = n.deleted else {
                continue;
            };
            if now.duration_since(at).unwrap_or_default() >= grace {
                out.expired.push(key.clone());
            } else if !n.deleted_saved {
                n.deleted_saved = true;
                out.save.push((key.clone(), n.stored()));
            }
        }
        out
    }

    /// Removes expired nodes from the view — after the store forgot them, so a node that is
    /// gone from the status is gone for good — unless the source named them again meanwhile.
    /// Returns those removed.
    pub fn forget(&self, expired: &[NodeKey]) -> Vec<NodeKey> {
        let mut nodes = self.nodes.lock().expect("fleet lock");
        let mut out = Vec::new();
        let mut forgot_degraded = 0;
        for k in expired {
            if nodes.get(k).is_some_and(|n| n.deleted.is_some()) {
                let gone = nodes.remove(k);
                if gone.is_some_and(|n| n.deg.is_degraded()) {
                    forgot_degraded += 1;
                }
                out.push(k.clone());
            }
        }
        drop(nodes);
        if forgot_degraded > 0 {
            self.count_degraded(|c| *c = c.saturating_sub(forgot_degraded));
        }
        out
    }

    /// Whether the view holds the node (deleted or not).
    pub fn contains(&self, key: &NodeKey) -> bool {
        self.nodes.lock().expect("fleet lock").contains_key(key)
    }

    /// Nodes in the view per cluster: (existing, deleted and waiting out their grace).
    pub fn counts(&self) -> BTreeMap<Arc<str>, (usize, usize)> {
        let mut out: BTreeMap<Arc<str>, (usize, usize)> = BTreeMap::new();
        for ((c, _), n) in self.nodes.lock().expect("fleet lock").iter() {
            let e = out.entry(c.clone()).or_default();
            if n.deleted.is_some() {
                e.1 += 1;
            } else {
                e.0 += 1;
            }
        }
        out
    }

    /// Applies a stream event; returns the record to persist, if it changed durably. Events
    /// for a node the view does not hold (forgotten after its deletion) are dropped.
    pub fn event(&self, cluster: &str, node: &str, ev: StreamEvent) -> Option<StoredStatus> {
        let mut nodes = self.nodes.lock().expect("fleet lock");
        let n = nodes.get_mut(&(Arc::from(cluster), Arc::from(node)))?;
        let was = n.deg.is_degraded();
        let stored = Self::apply(n, ev);
        let now = n.deg.is_degraded();
        drop(nodes);
        if was != now {
            self.count_degraded(|c| {
                if now {
                    *c += 1
                } else {
                    *c = c.saturating_sub(1)
                }
            });
        }
        stored
    }

    fn apply(n: &mut NodeState, ev: StreamEvent) -> Option<StoredStatus> {
        match ev {
            StreamEvent::Connected {
                backend,
                kernel,
                selection,
                enforcing,
            } => {
                n.streams += 1;
                n.backend = backend;
                n.kernel = kernel;
                n.selection = selection;
                if enforcing.is_some() {
                    n.applied = enforcing;
                }
            }
            StreamEvent::Acked {
                version,
                degraded,
                cut,
                ..
            } => {
                n.applied = Some(version);
                n.last_ack = Some(SystemTime::now());
                n.last_error.clear();
                n.deg.acked(degraded, cut);
            }
            StreamEvent::Served {
                published,
                served,
                cut,
            } => {
                if !n.deg.served(published, served, cut, n.applied) {
                    return None;
                }
            }
            StreamEvent::Nacked { rejected, error } => {
                n.last_error = format!("version {}: {error}", rejected.version);
            }
            StreamEvent::Report {
                counters,
                enforcing,
                degraded,
                local,
            } => {
                n.counters = counters;
                if !n.deg.reported(enforcing, n.applied, degraded, local) {
                    return None;
                }
            }
            StreamEvent::Disconnected => {
                n.streams = n.streams.saturating_sub(1);
                return None;
            }
        }
        Some(n.stored())
    }

    pub fn connected(&self) -> usize {
        self.nodes
            .lock()
            .expect("fleet lock")
            .values()
            .filter(|n| n.streams > 0)
            .count()
    }

    /// This server is replica `me`; a peer's word counts for `fresh_for` after its heartbeat.
    pub fn set_replica(&self, me: &str, fresh_for: std::time::Duration) {
        let mut p = self.peers.lock().expect("peers lock");
        p.me = me.to_string();
        p.fresh_for = fresh_for;
    }

    /// A peer's heartbeat arrived.
    pub fn peer_beat(&self, replica: &str) {
        let mut p = self.peers.lock().expect("peers lock");
        if replica != p.me {
            p.by_replica.entry(replica.to_string()).or_default().beat =
                Some(std::time::Instant::now());
        }
    }

    /// A peer's streams, as it published them (replacing what it said before).
    pub fn peer_nodes(&self, replica: &str, nodes: Vec<v1::NodeStatus>) {
        // Only nodes this replica's sources know: what a peer says of others is never shown,
        // and a peer's object cannot make this replica hold more than its own fleet.
        let nodes: HashMap<NodeKey, v1::NodeStatus> = {
            let known = self.nodes.lock().expect("fleet lock");
            nodes
                .into_iter()
                .map(|n| {
                    (
                        (Arc::from(n.cluster.as_str()), Arc::from(n.node.as_str())),
                        n,
                    )
                })
                .filter(|(k, _)| known.contains_key(k))
                .collect()
        };
        let mut p = self.peers.lock().expect("peers lock");
        if replica == p.me {
            return;
        }
        p.by_replica.entry(replica.to_string()).or_default().nodes = nodes;
    }

    pub fn peer_gone(&self, replica: &str) {
        self.peers
            .lock()
            .expect("peers lock")
            .by_replica
            .remove(replica);
    }

    /// The nodes this replica holds streams of, for its peers.
    pub fn held(&self) -> Vec<v1::NodeStatus> {
        let mut v = self.view_local(None);
        v.retain(|n| n.connected);
        for n in &mut v {
            // What peers need to show it; the rest they know themselves (and what changes
            // with the clock alone would rewrite the object at every beat).
            n.degraded.clear();
            n.local = None;
            n.lag_versions = 0;
            n.lag_seconds = 0.0;
            n.latest_version = 0;
            n.latest_digest.clear();
            n.in_sync = false;
            for s in [
                &mut n.backend,
                &mut n.kernel,
                &mut n.selection,
                &mut n.last_error,
            ] {
                truncate(s, 256);
            }
        }
        v
    }

    /// What fresh peers say of nodes with a stream there: per node, the word of the peer
    /// that heard from it last (two claim it for a moment while it moves).
    fn peers_word(&self) -> HashMap<NodeKey, (String, v1::NodeStatus)> {
        let p = self.peers.lock().expect("peers lock");
        let mut out: HashMap<NodeKey, (String, v1::NodeStatus)> = HashMap::new();
        for (name, peer) in &p.by_replica {
            if peer.beat.is_none_or(|b| b.elapsed() >= p.fresh_for) {
                continue;
            }
            for (k, n) in &peer.nodes {
                let newer = out
                    .get(k)
                    .is_none_or(|(_, o)| n.last_ack_unix_micros > o.last_ack_unix_micros);
                if newer {
                    out.insert(k.clone(), (name.clone(), n.clone()));
                }
            }
        }
        out
    }

    /// Every node of `cluster` (or of every cluster), as the admin API reports it: with
    /// several replicas, a node whose stream another replica holds shows as that replica
    /// says (connected there, applied what it acknowledged there), in sync by digest.
    pub fn view(&self, cluster: Option<&str>) -> Vec<v1::NodeStatus> {
        let mut nodes = self.view_local(cluster);
        let me = self.peers.lock().expect("peers lock").me.clone();
        let peers = self.peers_word();
        for n in &mut nodes {
            if n.connected {
                n.replica = me.clone();
                continue;
            }
            let key = (Arc::from(n.cluster.as_str()), Arc::from(n.node.as_str()));
            let Some((replica, theirs)) = peers.get(&key) else {
                continue;
            };
            n.connected = true;
            n.replica = replica.clone();
            n.backend = theirs.backend.clone();
            n.kernel = theirs.kernel.clone();
            n.selection = theirs.selection.clone();
            n.applied_version = theirs.applied_version;
            n.applied_digest = theirs.applied_digest.clone();
            n.last_error = theirs.last_error.clone();
            n.last_ack_unix_micros = theirs.last_ack_unix_micros;
            n.in_sync = !n.latest_digest.is_empty() && theirs.applied_digest == n.latest_digest;
            if n.in_sync {
                (n.lag_versions, n.lag_seconds) = (0, 0.0);
            } else {
                (n.lag_versions, n.lag_seconds) = (theirs.lag_versions.max(1), theirs.lag_seconds);
            }
        }
        nodes
    }

    fn view_local(&self, cluster: Option<&str>) -> Vec<v1::NodeStatus> {
        let now = SystemTime::now();
        let nodes = self.nodes.lock().expect("fleet lock");
        nodes
            .iter()
            .filter(|((c, _), _)| cluster.is_none_or(|x| **c == *x))
            .map(|((c, node), n)| {
                let latest = n.published.back().map(|(v, _)| *v);
                let in_sync =
                    matches!((n.applied, latest), (Some(a), Some(l)) if a.digest == l.digest)
                        || n.deg.serves(n.applied, latest);
                let unapplied: Vec<&(VersionRef, SystemTime)> = if in_sync {
                    Vec::new()
                } else {
                    let applied = n.applied.map_or(0, |a| a.version);
                    n.published
                        .iter()
                        .filter(|(v, _)| v.version > applied)
                        .collect()
                };
                v1::NodeStatus {
                    cluster: c.to_string(),
                    node: node.to_string(),
                    backend: n.backend.clone(),
                    kernel: n.kernel.clone(),
                    connected: n.streams > 0,
                    applied_version: n.applied.map_or(0, |a| a.version),
                    latest_version: latest.map_or(0, |v| v.version),
                    in_sync,
                    lag_versions: unapplied.len() as u64,
                    lag_seconds: unapplied.first().map_or(0.0, |(_, at)| {
                        now.duration_since(*at).unwrap_or_default().as_secs_f64()
                    }),
                    last_error: n.last_error.clone(),
                    last_ack_unix_micros: n.last_ack.map_or(0, micros),
                    applied_digest: n.applied.map(|a| a.digest.to_string()).unwrap_or_default(),
                    latest_digest: latest.map(|v| v.digest.to_string()).unwrap_or_default(),
                    selection: n.selection.clone(),
                    deleted_unix_micros: n.deleted.map_or(0, micros),
                    ..Default::default()
                }
            })
            .collect()
    }

    /// Whether each node that needs a policy enforces its current content: the node has
    /// applied the version it was given when that content was compiled, or a later one.
    pub fn policy(&self, cluster: &str, span: &PolicySpan) -> Vec<v1::PolicyNode> {
        let peers = self.peers_word();
        let nodes = self.nodes.lock().expect("fleet lock");
        span.nodes
            .iter()
            .map(|node| {
                let n = nodes.get(&(Arc::from(cluster), node.clone()));
                let published = n.map(|n| &n.published);
                // The node's version once this content was compiled: the newest published at or
                // before the policy's generation, else (history truncated) the oldest known.
                let needed = published.and_then(|p| {
                    p.iter()
                        .rev()
                        .find(|(v, _)| v.version <= span.generation)
                        .or_else(|| p.front())
                        .map(|(v, _)| v.version)
                });
                let applied_ref = n.and_then(|n| n.applied);
                let applied = applied_ref.map_or(0, |a| a.version);
                let key = (Arc::from(cluster), node.clone());
                // Content at least as new as `needed`: a digest published since (numbers of
                // another replica's epoch say nothing about this replica's order), or, in
                // this replica's own numbering, a version at or above it (a version the
                // server cut to fit carries another digest).
                let newer_digest = |d: &str| {
                    published.is_some_and(|p| {
                        p.iter()
                            .filter(|(v, _)| needed.is_some_and(|needed| v.version >= needed))
                            .any(|(v, _)| v.digest.to_string() == d)
                    })
                };
                let own_epoch = |v: u64| {
                    needed.is_some_and(|needed| {
                        crate::ha::epoch::epoch_of(v) == crate::ha::epoch::epoch_of(needed)
                            && v >= needed
                    })
                };
                // A node whose stream another replica holds: by what it acknowledged there.
                let elsewhere = (n.is_none_or(|n| n.streams == 0))
                    .then(|| peers.get(&key))
                    .flatten()
                    .map(|(_, theirs)| newer_digest(&theirs.applied_digest));
                let here = applied_ref
                    .is_some_and(|a| own_epoch(a.version) || newer_digest(&a.digest.to_string()));
                v1::PolicyNode {
                    node: node.to_string(),
                    enforced: elsewhere.unwrap_or(here),
                    applied_version: applied,
                    needed_version: needed.unwrap_or(0),
                    last_error: n.map(|n| n.last_error.clone()).unwrap_or_default(),
                    ..Default::default()
                }
            })
            .collect()
    }
}
