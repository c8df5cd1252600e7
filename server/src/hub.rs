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
use tracing::{debug, warn};

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

    fn recent(&self, node: &str, v: &VersionRef) -> Option<Arc<NodeSnapshot>> {
        let sent = self.sent.lock().expect("history lock");
        sent.get(node)?
            .iter()
            .rev()
            .find(|s| s.version == v.version && s.digest == v.digest)
            .cloned()
    }

    /// Runs `f` on the index under the read lock (admin queries).
    pub fn read<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        f(&self.index.read().expect("index lock"))
    }
}

/// Everything the sync and admin services need, in one place.
pub struct Hub {
    clusters: HashMap<Arc<str>, Arc<ClusterState>>,
    pub fleet: Arc<Fleet>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    writer: Arc<Writer>,
    /// Each node's one live stream, and the newest certificate bootstrap issued it.
    pub streams: Arc<Streams>,
}

impl Hub {
    pub fn new(
        clusters: Vec<Arc<ClusterState>>,
        fleet: Arc<Fleet>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let writer = Writer::spawn(store.clone());
        Arc::new(Self {
            clusters: clusters.into_iter().map(|c| (c.name.clone(), c)).collect(),
            fleet,
            store,
            metrics,
            writer,
            streams: Arc::new(Streams::default()),
        })
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
        if let Some(s) = cluster.recent(node, v) {
            return Some(s);
        }
        match self.store.load(&cluster.name, node, v) {
            Ok(s) => s.map(Arc::new),
            Err(e) => {
                warn!(error = %e, node, "cannot load a delta base from the store");
                None
            }
        }
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
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "cannot persist acknowledged snapshots"),
                    Err(e) => warn!(error = %e, "snapshot writer panicked"),
                }
                since_gc += n;
                if since_gc > 10_000 {
                    since_gc = 0;
                    let s = store.clone();
                    let _ = tokio::task::spawn_blocking(move || s.collect_garbage()).await;
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
