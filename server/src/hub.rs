//! The hub between the compiler and the streams: per-cluster index, per-node publication
//! channels (`tokio::sync::watch`, so a slow enforcer only ever sees the newest version),
//! delta bases, and where acknowledgements go (fleet status, store).
//!
//! Locking: the index is behind a std `RwLock` taken only for synchronous steps; the
//! publication map behind a `Mutex` taken after the index lock is released, never inside it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::VersionRef;
use moat_policy::ir::digest::Digest;
use moat_policy::{Changes, Index};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::source::SourceEvent;
use crate::status::{Fleet, StreamEvent};
use crate::store::Store;
use crate::streams::Streams;

/// A node's newest version as published by the compiler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub version: u64,
    pub digest: Digest,
    pub at: SystemTime,
    /// False once the node is gone from the source: its stream must end.
    pub exists: bool,
}

/// How many sent snapshots per node stay in memory as delta bases.
const HISTORY: usize = 4;

pub struct ClusterState {
    pub name: Arc<str>,
    /// Where its state comes from (`dir:…`, `kube:…`), and whether that is reachable.
    pub source: String,
    pub health: Arc<crate::source::Health>,
    index: RwLock<Index>,
    nodes: Mutex<HashMap<Arc<str>, watch::Sender<Published>>>,
    synced: watch::Sender<bool>,
    sent: Mutex<HashMap<Arc<str>, VecDeque<Arc<NodeSnapshot>>>>,
}

impl ClusterState {
    pub fn new(name: &str, first_generation: u64) -> Arc<Self> {
        Self::with_source(
            name,
            first_generation,
            String::new(),
            Arc::new(crate::source::Health::new(Default::default())),
        )
    }

    pub fn with_source(
        name: &str,
        first_generation: u64,
        source: String,
        health: Arc<crate::source::Health>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: Arc::from(name),
            source,
            health,
            index: RwLock::new(Index::starting_at(first_generation)),
            nodes: Mutex::new(HashMap::new()),
            synced: watch::channel(false).0,
            sent: Mutex::new(HashMap::new()),
        })
    }

    /// Applies one source event (a synchronous step under the write lock). On the first
    /// `Reset`, versions of unchanged nodes are carried over from `previous` (the store).
    pub fn apply(
        &self,
        ev: SourceEvent,
        previous: impl Fn(&str) -> Option<(u64, Digest)>,
    ) -> Changes {
        let mut idx = self.index.write().expect("index lock");
        match ev {
            SourceEvent::Reset(objects) => {
                let first = !*self.synced.borrow();
                let mut changes = idx.reset(objects);
                if first {
                    let adopted = idx.adopt_versions(previous);
                    debug!(adopted, "versions carried over from before the restart");
                    changes.updated = idx.nodes();
                }
                changes
            }
            SourceEvent::Batch(events) => idx.batch(events),
        }
    }

    /// Publishes changed nodes to their streams. Call after `apply`, outside the index lock.
    pub fn publish(&self, changes: &Changes, fleet: &Fleet) {
        let now = SystemTime::now();
        let first = !*self.synced.borrow();
        let mut nodes = self.nodes.lock().expect("publish lock");
        for u in &changes.updated {
            let p = Published {
                version: u.version,
                digest: u.digest,
                at: now,
                exists: true,
            };
            fleet.published(
                &self.name,
                &u.node,
                VersionRef {
                    version: u.version,
                    digest: u.digest,
                },
                now,
            );
            match nodes.get(&u.node) {
                Some(tx) => {
                    tx.send_if_modified(|cur| {
                        let changed =
                            (cur.version, cur.digest) != (p.version, p.digest) || !cur.exists;
                        if changed {
                            *cur = p.clone();
                        }
                        changed
                    });
                }
                None => {
                    nodes.insert(u.node.clone(), watch::channel(p).0);
                }
            }
        }
        for r in &changes.removed {
            if let Some(tx) = nodes.remove(r) {
                tx.send_modify(|cur| cur.exists = false);
            }
            self.sent.lock().expect("history lock").remove(r);
            fleet.removed(&self.name, r);
        }
        drop(nodes);
        if first {
            // Every node the source has now was just published: whatever else the store
            // remembered is deleted.
            let present = changes.updated.iter().map(|u| u.node.clone()).collect();
            fleet.first_sync(&self.name, &present);
        }
        self.synced
            .send_if_modified(|s| !std::mem::replace(s, true));
    }

    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    pub fn subscribe(&self, node: &str) -> Option<watch::Receiver<Published>> {
        self.nodes
            .lock()
            .expect("publish lock")
            .get(node)
            .map(|tx| tx.subscribe())
    }

    /// The node's current snapshot; its version may be newer than what a receiver last saw.
    pub fn snapshot(&self, node: &str) -> Option<Arc<NodeSnapshot>> {
        self.index
            .read()
            .expect("index lock")
            .snapshot(node)
            .map(Arc::new)
    }

    pub fn remember_sent(&self, snap: &Arc<NodeSnapshot>) {
        let mut sent = self.sent.lock().expect("history lock");
        let h = sent.entry(Arc::from(snap.node.as_str())).or_default();
        if h.back().is_some_and(|s| s.version == snap.version) {
            return;
        }
        h.push_back(snap.clone());
        while h.len() > HISTORY {
            h.pop_front();
        }
    }

    /// The newest snapshot sent to `node` that `pred` accepts.
    fn recent(
        &self,
        node: &str,
        pred: impl Fn(&NodeSnapshot) -> bool,
    ) -> Option<Arc<NodeSnapshot>> {
        let sent = self.sent.lock().expect("history lock");
        sent.get(node)?.iter().rev().find(|s| pred(s)).cloned()
    }

    /// Runs `f` on the index under the read lock (admin queries).
    pub fn read<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        f(&self.index.read().expect("index lock"))
    }
}

/// Sizes the server holds versions and policies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded message sent to an enforcer: a snapshot that would be larger is
    /// degraded (see `sync::fit`), a delta that would be larger goes as a snapshot.
    pub message: usize,
    /// Policies estimated above this many dataplane elements on some node are logged.
    pub cost_warn: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            message: moat_proto::MAX_SERVER_MESSAGE,
            cost_warn: 500_000,
        }
    }
}

/// Everything the sync and admin services need, in one place.
pub struct Hub {
    clusters: HashMap<Arc<str>, Arc<ClusterState>>,
    pub fleet: Arc<Fleet>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    writer: Arc<Writer>,
    /// Each node's one live stream, and the newest certificate bootstrap issued it.
    pub streams: Arc<Streams>,
    /// One of several replicas (`--ha-cluster`): its standing per cluster.
    ha: std::sync::OnceLock<Ha>,
}

struct Ha {
    replica: Arc<crate::ha::Replica>,
    standings: HashMap<Arc<str>, watch::Receiver<crate::ha::Standing>>,
}

impl Hub {
    pub fn new(
        clusters: Vec<Arc<ClusterState>>,
        fleet: Arc<Fleet>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::with_limits(clusters, fleet, store, metrics, Limits::default())
    }

    pub fn with_limits(
        clusters: Vec<Arc<ClusterState>>,
        fleet: Arc<Fleet>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Arc<Self> {
        let writer = Writer::spawn(store.clone());
        fleet.watch_degraded(metrics.nodes_degraded.clone());
        Arc::new(Self {
            clusters: clusters.into_iter().map(|c| (c.name.clone(), c)).collect(),
            fleet,
            store,
            metrics,
            limits,
            writer,
            streams: Arc::new(Streams::default()),
            ha: std::sync::OnceLock::new(),
        })
    }

    /// Makes this server a replica: each cluster's streams follow its standing. Call
    /// before serving.
    pub fn set_replica(&self, replica: Arc<crate::ha::Replica>) {
        let standings = self
            .clusters
            .iter()
            .map(|(name, c)| (name.clone(), replica.standing(c.health.stale_watch())))
            .collect();
        let _ = self.ha.set(Ha { replica, standings });
    }

    pub fn replica(&self) -> Option<&Arc<crate::ha::Replica>> {
        self.ha.get().map(|h| &h.replica)
    }

    /// The replica's standing for `cluster` (`None`: a single server, which serves its last
    /// state whatever happens).
    pub fn standing(
        &self,
        cluster: &str,
    ) -> Option<(String, watch::Receiver<crate::ha::Standing>)> {
        let ha = self.ha.get()?;
        Some((ha.replica.name.clone(), ha.standings.get(cluster)?.clone()))
    }

    pub fn cluster(&self, name: &str) -> Option<&Arc<ClusterState>> {
        self.clusters.get(name)
    }

    pub fn clusters(&self) -> impl Iterator<Item = &Arc<ClusterState>> {
        self.clusters.values()
    }

    /// A delta base: the node's snapshot with exactly this version and digest, from memory
    /// or from the store (after a restart).
    pub fn base(
        &self,
        cluster: &ClusterState,
        node: &str,
        v: &VersionRef,
    ) -> Option<Arc<NodeSnapshot>> {
        if v.version == 0 {
            return None;
        }
        if let Some(s) = cluster.recent(node, |s| s.version == v.version && s.digest == v.digest) {
            return Some(s);
        }
        match self.store.load(&cluster.name, node, v) {
            Ok(Some(s)) => return Some(Arc::new(s)),
            Ok(None) => {}
            Err(e) => warn!(error = %e, node, "cannot load a delta base from the store"),
        }
        // Content another replica (or an earlier epoch) numbered: a digest names content,
        // so the same content held here serves as the base under the enforcer's number.
        let same = cluster
            .recent(node, |s| s.digest == v.digest)
            .or_else(|| cluster.snapshot(node).filter(|s| s.digest == v.digest))?;
        let mut s = (*same).clone();
        s.version = v.version;
        Some(Arc::new(s))
    }

    /// Records what a stream saw, and persists what must survive a restart.
    pub fn stream_event(&self, cluster: &str, node: &str, ev: StreamEvent) {
        if let StreamEvent::Acked {
            snapshot: Some(s), ..
        } = &ev
        {
            self.writer.acked(cluster, s.clone());
        }
        if let Some(status) = self.fleet.event(cluster, node, ev)
            && let Err(e) = self.store.save_status(cluster, node, &status)
        {
            warn!(error = %e, node, "cannot persist node status");
        }
    }
}

/// (cluster, node).
pub type NodeKey = (Arc<str>, Arc<str>);

/// Sweeps blobs no stored snapshot references (off the async threads), and says what it did.
pub async fn collect_garbage(store: Arc<Store>) {
    match tokio::task::spawn_blocking(move || store.collect_garbage()).await {
        Ok(Ok(c)) if c.blobs > 0 || c.unreadable > 0 => {
            info!(
                blobs = c.blobs,
                unreadable = c.unreadable,
                "state store garbage collected"
            )
        }
        Ok(Ok(_)) => debug!("state store garbage collected: nothing to remove"),
        Ok(Err(e)) => warn!(error = %e, "state store garbage collection failed"),
        Err(e) => warn!(error = %e, "state store garbage collection panicked"),
    }
}

/// Persists acknowledged snapshots in the background, newest per node only, so a burst of
/// acknowledgements never waits on the disk.
struct Writer {
    pending: Mutex<HashMap<NodeKey, Arc<NodeSnapshot>>>,
    wake: Notify,
}

impl Writer {
    fn spawn(store: Arc<Store>) -> Arc<Writer> {
        let w = Arc::new(Writer {
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        });
        let me = w.clone();
        tokio::spawn(async move {
            let mut since_gc = 0usize;
            loop {
                me.wake.notified().await;
                let batch: Vec<_> = me.pending.lock().expect("writer lock").drain().collect();
                let store2 = store.clone();
                let n = batch.len();
                let saved: Vec<_> = batch
                    .iter()
                    .map(|((c, node), s)| (c.clone(), node.clone(), s.version))
                    .collect();
                let res = tokio::task::spawn_blocking(move || {
                    for ((cluster, _), snap) in batch {
                        store2.save_acked(&cluster, &snap)?;
                    }
                    Ok::<_, crate::store::Error>(())
                })
                .await;
                // Durable before the next batch: a crash loses at most what is in flight, and
                // then the node gets a full snapshot instead of a delta, nothing worse.
                if let Err(e) = store.flush().await {
                    warn!(error = %e, "cannot flush the state store");
                }
                match res {
                    Ok(Ok(())) => {
                        for (cluster, node, version) in saved {
                            debug!(%cluster, %node, version, "acknowledged snapshot persisted");
                        }
                    }
                    Ok(Err(e)) => warn!(error = %e, "cannot persist acknowledged snapshots"),
                    Err(e) => warn!(error = %e, "snapshot writer panicked"),
                }
                since_gc += n;
                if since_gc > 10_000 {
                    since_gc = 0;
                    collect_garbage(store.clone()).await;
                }
            }
        });
        w
    }

    fn acked(&self, cluster: &str, snap: Arc<NodeSnapshot>) {
        self.pending
            .lock()
            .expect("writer lock")
            .insert((Arc::from(cluster), Arc::from(snap.node.as_str())), snap);
        self.wake.notify_one();
    }
}
