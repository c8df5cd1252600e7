//! The Kubernetes source: list/watch of Namespaces, Nodes, Pods and NetworkPolicies through
//! `kube::runtime::watcher`, converted on arrival into the compact policy model (nothing
//! else of an object is kept; the source itself keeps a 128-bit fingerprint per object).
//!
//! - The first full sync is one `Reset`, sent only when all four kinds have listed
//!   (`Init … InitDone`); nothing is served before it.
//! - A relist (after `410 Gone`, or any restart of a watcher) is diffed against what the
//!   source last sent: one `Batch` with exactly the objects that changed, so objects that
//!   merely survived the relist are never deleted and re-added.
//! - A watch that breaks resumes from its resource version (kube's watcher does that).
//! - Errors never touch the served state: the source marks itself stale (shown in
//!   `moatctl status` and metrics) and probes each failing kind until it lists again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event as W};
use kube::{Client, Resource, ResourceExt};
use moat_policy::Event;
use moat_policy::model::{Object, ObjectKey, parse};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Health, SourceEvent};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("kube client configuration: {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("kube client configuration: {0}")]
    KubeconfigConfig(#[from] kube::config::KubeconfigError),
    #[error("kube client: {0}")]
    Client(#[from] kube::Error),
}

/// Where a cluster's API server is and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `None`: in-cluster config (ServiceAccount), else `$KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.kubeconfig, &self.context) {
            (None, _) => write!(f, "kube:in-cluster"),
            (Some(p), None) => write!(f, "kube:{}", p.display()),
            (Some(p), Some(c)) => write!(f, "kube:{}:{c}", p.display()),
        }
    }
}

/// A client for `target`.
pub async fn client(target: &Target) -> Result<Client, Error> {
    let config = match &target.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            let opts = KubeConfigOptions {
                context: target.context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kc, &opts).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// How lists are done.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Streaming lists (`sendInitialEvents`, Kubernetes ≥ 1.32) instead of paginated
    /// list-then-watch.
    pub streaming_list: bool,
    pub page_size: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            streaming_list: false,
            page_size: 500,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Namespace = 0,
    Node = 1,
    Pod = 2,
    Policy = 3,
}

const KINDS: [Kind; 4] = [Kind::Namespace, Kind::Node, Kind::Pod, Kind::Policy];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Policy => "networkpolicies",
        }
    }
}

/// One watcher event, already converted: `Ok(object)`, or `Err(key, why)` for an object the
/// model refuses (its last valid version stays).
enum Item {
    Init,
    InitApply(Result<Object, (ObjectKey, String)>),
    InitDone,
    Apply(Result<Object, (ObjectKey, String)>),
    Delete(ObjectKey),
}

trait Convert:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
    const KIND: Kind;
    fn key(&self) -> ObjectKey;
    fn convert(&self) -> Result<Object, String>;
}

macro_rules! convert {
    ($t:ty, $kind:expr, $parse:path, $variant:path, |$o:ident| $key:expr) => {
        impl Convert for $t {
            const KIND: Kind = $kind;
            fn key(&self) -> ObjectKey {
                let $o = self;
                $key
            }
            fn convert(&self) -> Result<Object, String> {
                $parse(self)
                    .map(|p| $variant(p.value))
                    .map_err(|e| e.to_string())
            }
        }
    };
}

convert!(
    core::Namespace,
    Kind::Namespace,
    parse::namespace,
    Object::Namespace,
    |o| ObjectKey::Namespace(o.name_any())
);
convert!(core::Node, Kind::Node, parse::node, Object::Node, |o| {
    ObjectKey::Node(o.name_any())
});
convert!(core::Pod, Kind::Pod, parse::pod, Object::Pod, |o| {
    ObjectKey::Pod {
        namespace: o.namespace().unwrap_or_default(),
        name: o.name_any(),
    }
});
convert!(
    net::NetworkPolicy,
    Kind::Policy,
    parse::network_policy,
    Object::Policy,
    |o| ObjectKey::Policy {
        namespace: o.namespace().unwrap_or_default(),
        name: o.name_any(),
    }
);

type Stream = BoxStream<'static, (Kind, Result<Item, watcher::Error>)>;

fn watch<K: Convert>(client: &Client, opts: Options) -> Stream {
    let api: Api<K> = Api::all(client.clone());
    let mut cfg = watcher::Config::default().page_size(opts.page_size);
    if opts.streaming_list {
        cfg = cfg.streaming_lists();
    }
    let conv = |o: &K| o.convert().map_err(|e| (o.key(), e));
    watcher::watcher(api, cfg)
        .default_backoff()
        .map(move |r| {
            let item = r.map(|e| match e {
                W::Init => Item::Init,
                W::InitApply(o) => Item::InitApply(conv(&o)),
                W::InitDone => Item::InitDone,
                W::Apply(o) => Item::Apply(conv(&o)),
                W::Delete(o) => Item::Delete(o.key()),
            });
            (K::KIND, item)
        })
        .boxed()
}

/// Starts the source: watchers for the four kinds, merged into one ordered event stream.
pub fn spawn(
    cluster: &str,
    client: Client,
    tx: mpsc::Sender<SourceEvent>,
    health: Arc<Health>,
    opts: Options,
) -> tokio::task::JoinHandle<()> {
    let mut streams: SelectAll<Stream> = SelectAll::new();
    streams.push(watch::<core::Namespace>(&client, opts));
    streams.push(watch::<core::Node>(&client, opts));
    streams.push(watch::<core::Pod>(&client, opts));
    streams.push(watch::<net::NetworkPolicy>(&client, opts));
    let span = info_span!("source", %cluster);
    tokio::spawn(
        async move {
            let mut merger = Merger::default();
            let mut failing = [false; 4];
            let mut probe = tokio::time::interval(Duration::from_secs(2));
            loop {
                let first = tokio::select! {
                    n = streams.next() => match n {
                        Some(n) => n,
                        None => return,
                    },
                    _ = probe.tick(), if failing.iter().any(|f| *f) => {
                        for k in KINDS {
                            if failing[k as usize] && probe_kind(&client, k).await {
                                failing[k as usize] = false;
                                debug!(kind = k.name(), "the API server answers again");
                            }
                        }
                        health.set_failing(failing.iter().any(|f| *f), None);
                        continue;
                    }
                    _ = tx.closed() => return,
                };
                // Take everything already waiting, so a burst becomes one batch.
                let mut next = Some(first);
                let mut taken = 0;
                while let Some((kind, r)) = next.take() {
                    match r {
                        Ok(item) => {
                            failing[kind as usize] = false;
                            merger.take(kind, item);
                        }
                        Err(e) => {
                            failing[kind as usize] = true;
                            warn!(kind = kind.name(), error = %e, "watch failed; the last state stays served");
                            health.set_failing(true, Some(format!("{}: {e}", kind.name())));
                        }
                    }
                    taken += 1;
                    if taken < 4096 {
                        next = streams.next().now_or_never().flatten();
                    }
                }
                health.set_failing(failing.iter().any(|f| *f), None);
                if let Some(ev) = merger.flush() {
                    if let SourceEvent::Reset(o) = &ev {
                        info!(objects = o.len(), "first full sync");
                    }
                    health.event();
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
        }
        .instrument(span),
    )
}

/// Whether the API server lists `kind` again (a one-item list).
async fn probe_kind(client: &Client, kind: Kind) -> bool {
    match kind {
        Kind::Namespace => lists::<core::Namespace>(client).await,
        Kind::Node => lists::<core::Node>(client).await,
        Kind::Pod => lists::<core::Pod>(client).await,
        Kind::Policy => lists::<net::NetworkPolicy>(client).await,
    }
}

async fn lists<K: Convert>(client: &Client) -> bool {
    Api::<K>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
        .is_ok()
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

/// Turns watcher events of four kinds into index events: the first full sync as one reset,
/// relists as diffs, and nothing for objects whose model content did not change.
#[derive(Default)]
struct Merger {
    /// Per kind: what the index has (model fingerprint per object).
    known: [HashMap<ObjectKey, u128>; 4],
    /// Per kind, during a (re)list: what it has delivered so far (`None` = keep the old).
    listing: [Option<HashMap<ObjectKey, Option<Object>>>; 4],
    listed: [bool; 4],
    /// Until the first full sync: the objects themselves.
    staging: Option<HashMap<ObjectKey, Object>>,
    out: Vec<Event>,
    synced: bool,
    buf: Vec<u8>,
}

impl Merger {
    fn take(&mut self, kind: Kind, item: Item) {
        let k = kind as usize;
        if self.staging.is_none() && !self.synced {
            self.staging = Some(HashMap::new());
        }
        match item {
            Item::Init => self.listing[k] = Some(HashMap::new()),
            Item::InitApply(r) => {
                let Some(l) = self.listing[k].as_mut() else {
                    return;
                };
                match r {
                    Ok(o) => {
                        l.insert(o.key(), Some(o));
                    }
                    Err((key, why)) => {
                        warn!(object = %key, error = %why, "invalid object; its last valid version stays");
                        l.insert(key, None);
                    }
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
                // An object listed but refused by the model keeps its last valid version
                // (or stays absent): only valid ones are applied.
                for o in l.into_values().flatten() {
                    self.apply(k, o);
                }
            }
            Item::Apply(Ok(o)) => self.apply(k, o),
            Item::Apply(Err((key, why))) => {
                warn!(object = %key, error = %why, "invalid object; its last valid version stays");
            }
            Item::Delete(key) => {
                if self.known[k].contains_key(&key) {
                    self.delete(k, key);
                }
            }
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
    fn flush(&mut self) -> Option<SourceEvent> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use moat_policy::model::{Namespace, Node};

    fn node(n: &str, addr: &str) -> Object {
        Object::Node(Node {
            name: n.into(),
            addrs: vec![addr.parse().unwrap()],
        })
    }

    fn ns(n: &str) -> Object {
        Object::Namespace(Namespace {
            name: n.into(),
            labels: Namespace::implicit_labels(n),
        })
    }

    fn list(m: &mut Merger, kind: Kind, objects: Vec<Object>) {
        m.take(kind, Item::Init);
        for o in objects {
            m.take(kind, Item::InitApply(Ok(o)));
        }
        m.take(kind, Item::InitDone);
    }

    #[test]
    fn nothing_before_every_kind_listed_then_one_reset() {
        let mut m = Merger::default();
        list(&mut m, Kind::Node, vec![node("n1", "10.0.0.1")]);
        list(&mut m, Kind::Namespace, vec![ns("a")]);
        list(&mut m, Kind::Pod, vec![]);
        assert!(m.flush().is_none());
        // A change before the sync lands in the reset, not in a batch.
        m.take(Kind::Node, Item::Apply(Ok(node("n2", "10.0.0.2"))));
        assert!(m.flush().is_none());
        list(&mut m, Kind::Policy, vec![]);
        match m.flush() {
            Some(SourceEvent::Reset(o)) => assert_eq!(o.len(), 3),
            other => panic!("{other:?}"),
        }
        assert!(m.flush().is_none());
    }

    #[test]
    fn a_relist_is_a_diff_without_transient_deletes() {
        let mut m = Merger::default();
        for k in KINDS {
            list(&mut m, k, vec![]);
        }
        list(
            &mut m,
            Kind::Node,
            vec![node("n1", "10.0.0.1"), node("n2", "10.0.0.2")],
        );
        m.flush();
        // Relist: n1 unchanged, n2 changed, n3 new, and (say) n4 would have been deleted.
        list(
            &mut m,
            Kind::Node,
            vec![
                node("n1", "10.0.0.1"),
                node("n2", "10.0.0.9"),
                node("n3", "10.0.0.3"),
            ],
        );
        let Some(SourceEvent::Batch(ev)) = m.flush() else {
            panic!("no batch")
        };
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(ev.iter().all(|e| matches!(e, Event::Apply(_))));
        list(&mut m, Kind::Node, vec![node("n1", "10.0.0.1")]);
        let Some(SourceEvent::Batch(ev)) = m.flush() else {
            panic!("no batch")
        };
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| matches!(e, Event::Delete(_))));
    }

    #[test]
    fn an_invalid_update_keeps_the_last_valid_version() {
        let mut m = Merger::default();
        for k in KINDS {
            list(&mut m, k, vec![]);
        }
        m.flush();
        m.take(Kind::Node, Item::Apply(Ok(node("n1", "10.0.0.1"))));
        m.flush();
        let key = ObjectKey::Node("n1".into());
        m.take(Kind::Node, Item::Apply(Err((key.clone(), "bad".into()))));
        assert!(m.flush().is_none());
        // Also across a relist: invalid now, so it is neither deleted nor changed.
        m.take(Kind::Node, Item::Init);
        m.take(Kind::Node, Item::InitApply(Err((key, "bad".into()))));
        m.take(Kind::Node, Item::InitDone);
        assert!(m.flush().is_none());
        // An identical re-apply is no event either.
        m.take(Kind::Node, Item::Apply(Ok(node("n1", "10.0.0.1"))));
        assert!(m.flush().is_none());
    }
}
