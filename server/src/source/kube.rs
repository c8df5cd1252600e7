//! The Kubernetes source: list/watch of Namespaces, Nodes, Pods, NetworkPolicies and, where
//! the CRD is installed, ClusterNetworkPolicies through `kube::runtime::watcher`, converted
//! on arrival into the compact policy model (nothing else of an object is kept; the source
//! itself keeps a 128-bit fingerprint per object).
//!
//! - The first full sync is one `Reset`, sent only when every kind has listed
//!   (`Init … InitDone`) — ClusterNetworkPolicies too, unless discovery says the API does
//!   not serve them; nothing is served before it, so never a cluster without its admin tier.
//! - A CRD installed later is found by re-asking discovery every `--kube-crd-recheck`; its
//!   policies then arrive as one batch once their list is complete. A CRD removed takes its
//!   policies with it (as deletes).
//! - A relist (after `410 Gone`, or any restart of a watcher) is diffed against what the
//!   source last sent: one `Batch` with exactly the objects that changed, so objects that
//!   merely survived the relist are never deleted and re-added.
//! - A watch that breaks resumes from its resource version (kube's watcher does that).
//! - Errors never touch the served state: the source marks itself stale (shown in
//!   `moatctl status` and metrics) and probes each failing kind until it lists again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{AbortHandle, BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event as W};
use kube::{Client, Resource, ResourceExt};
use moat_policy::model::parse::ValidationError;
use moat_policy::model::{Object, ObjectKey, parse};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use super::cnp::{self, Cnp};
use super::cnp_status::{self, Observed};
use super::merge::{Converted, Item, KINDS, Kind, Merger, N};
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

/// How lists are done, and what the source may do besides reading.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Streaming lists (`sendInitialEvents`, Kubernetes ≥ 1.32) instead of paginated
    /// list-then-watch.
    pub streaming_list: bool,
    pub page_size: u32,
    /// While the ClusterNetworkPolicy CRD is not installed, how often discovery is asked
    /// again.
    pub crd_recheck: Duration,
    /// Write each ClusterNetworkPolicy's acceptance to its `status.conditions`.
    pub write_cnp_status: bool,
    /// What objects are validated with (experimental ClusterNetworkPolicy peers).
    pub parse: parse::Options,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            streaming_list: false,
            page_size: 500,
            crd_recheck: Duration::from_secs(30),
            write_cnp_status: false,
            parse: parse::Options::default(),
        }
    }
}

trait Convert:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
    const KIND: Kind;
    fn key(&self) -> ObjectKey;
    fn convert(&self, opts: &parse::Options) -> Converted;
}

macro_rules! convert {
    ($t:ty, $kind:expr, $parse:path, $variant:path, |$o:ident| $key:expr) => {
        impl Convert for $t {
            const KIND: Kind = $kind;
            fn key(&self) -> ObjectKey {
                let $o = self;
                $key
            }
            fn convert(&self, _: &parse::Options) -> Converted {
                Converted {
                    key: self.key(),
                    result: $parse(self).map(|p| {
                        let w = p.warnings.iter().map(ToString::to_string).collect();
                        ($variant(p.value), w)
                    }),
                    observed: None,
                }
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

impl Convert for Cnp {
    const KIND: Kind = Kind::ClusterPolicy;
    fn key(&self) -> ObjectKey {
        ObjectKey::ClusterPolicy(self.name_any())
    }
    fn convert(&self, opts: &parse::Options) -> Converted {
        let result = match &self.object {
            Ok(o) => parse::cluster_network_policy_with(o, opts).map(|p| {
                let w = p.warnings.iter().map(ToString::to_string).collect();
                (Object::ClusterPolicy(p.value), w)
            }),
            Err(e) => Err(ValidationError {
                object: format!("ClusterNetworkPolicy {}", self.name_any()),
                field: "(schema)".into(),
                message: e.clone(),
            }),
        };
        Converted {
            key: self.key(),
            result,
            observed: Some(Observed::of(self)),
        }
    }
}

type Stream = BoxStream<'static, (Kind, Result<Item, watcher::Error>)>;

fn watch<K: Convert>(client: &Client, opts: Options) -> Stream {
    let api: Api<K> = Api::all(client.clone());
    let mut cfg = watcher::Config::default().page_size(opts.page_size);
    if opts.streaming_list {
        cfg = cfg.streaming_lists();
    }
    let parse = opts.parse;
    watcher::watcher(api, cfg)
        .default_backoff()
        .map(move |r| {
            let item = r.map(|e| match e {
                W::Init => Item::Init,
                W::InitApply(o) => Item::InitApply(o.convert(&parse)),
                W::InitDone => Item::InitDone,
                W::Apply(o) => Item::Apply(o.convert(&parse)),
                W::Delete(o) => Item::Delete(o.key()),
            });
            (K::KIND, item)
        })
        .boxed()
}

/// What the source knows of the ClusterNetworkPolicy CRD.
enum Crd {
    /// Discovery has not answered yet (the first full sync waits for it).
    Unknown,
    Absent,
    /// Watched; the handle ends the watch when the CRD goes.
    Watching(AbortHandle),
}

type Discovery = BoxFuture<'static, Result<bool, kube::Error>>;

fn discover(client: &Client) -> Discovery {
    let client = client.clone();
    async move { cnp::served(&client).await }.boxed()
}

/// The output of `f`, or never when there is none.
async fn output<F: std::future::Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Starts the source: watchers for every kind, merged into one ordered event stream.
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
    let writer = opts
        .write_cnp_status
        .then(|| cnp_status::spawn(cluster, client.clone()));
    let span = info_span!("source", %cluster);
    tokio::spawn(
        async move {
            let mut merger = Merger::new(health.acceptance());
            let mut failing = [false; N];
            let mut probe = tokio::time::interval(Duration::from_secs(2));
            let mut crd = Crd::Unknown;
            // Asked at once, beside the other kinds' lists: it delays nothing they don't.
            let mut discovery = Some(discover(&client));
            let never = Duration::from_secs(365 * 24 * 3600);
            let recheck = tokio::time::sleep(never);
            tokio::pin!(recheck);
            let cp = Kind::ClusterPolicy as usize;
            loop {
                let first = tokio::select! {
                    n = streams.next() => match n {
                        Some(n) => Some(n),
                        None => return,
                    },
                    r = output(&mut discovery) => {
                        discovery = None;
                        if r.is_ok() {
                            failing[cp] = false;
                        }
                        let next = match r {
                            Ok(true) => {
                                if !matches!(crd, Crd::Watching(_)) {
                                    info!("the ClusterNetworkPolicy CRD is installed: watching it");
                                    let (s, h) = futures::stream::abortable(watch::<Cnp>(&client, opts));
                                    streams.push(s.boxed());
                                    crd = Crd::Watching(h);
                                }
                                never
                            }
                            Ok(false) => {
                                match &crd {
                                    Crd::Watching(h) => {
                                        h.abort();
                                        info!("the ClusterNetworkPolicy CRD was removed, and its policies with it");
                                    }
                                    Crd::Unknown => info!(recheck = ?opts.crd_recheck, "no ClusterNetworkPolicy CRD installed: syncing without, asking again periodically"),
                                    Crd::Absent => {}
                                }
                                crd = Crd::Absent;
                                merger.absent(Kind::ClusterPolicy);
                                opts.crd_recheck
                            }
                            Err(e) => {
                                warn!(error = %e, "API discovery failed; asking again");
                                failing[cp] = true;
                                health.set_failing(true, Some(format!("discovery of clusternetworkpolicies: {e}")));
                                Duration::from_secs(2)
                            }
                        };
                        recheck.as_mut().reset(tokio::time::Instant::now() + next);
                        None
                    },
                    _ = &mut recheck, if discovery.is_none() => {
                        discovery = Some(discover(&client));
                        recheck.as_mut().reset(tokio::time::Instant::now() + never);
                        continue;
                    }
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
                let mut next = first;
                let mut taken = 0;
                while let Some((kind, r)) = next.take() {
                    match r {
                        Ok(item) => {
                            failing[kind as usize] = false;
                            merger.take(kind, item);
                        }
                        Err(e) if kind == Kind::ClusterPolicy && cnp::not_served(&e) => {
                            // The CRD may be gone: discovery tells, and takes its policies.
                            debug!(error = %e, "clusternetworkpolicies not served; asking discovery");
                            if discovery.is_none() {
                                discovery = Some(discover(&client));
                            }
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
                for w in merger.status.drain(..) {
                    if let Some(writer) = &writer {
                        let _ = writer.send(w);
                    }
                }
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
        // Whether or not the CRD is there, an answer is an answer.
        Kind::ClusterPolicy => cnp::served(client).await.is_ok(),
    }
}

async fn lists<K: Convert>(client: &Client) -> bool {
    Api::<K>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// What the watchers convert: Nodes with their labels, and a `nodes` peer only with the
    /// experimental option.
    #[test]
    fn conversion_follows_the_parse_options() {
        let off = parse::Options::default();
        let on = parse::Options {
            experimental_cnp_node_peers: true,
        };
        let node: core::Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": {"pool": "infra"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]},
        }))
        .unwrap();
        match node.convert(&off).result.unwrap().0 {
            Object::Node(n) => assert_eq!(n.labels.get("pool").map(String::as_str), Some("infra")),
            o => panic!("{o:?}"),
        }
        let cnp: Cnp = serde_json::from_value(json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "guard"},
            "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
                     "egress": [{"action": "Deny", "to": [{"nodes": {"matchLabels": {"pool": "infra"}}}]}]},
        }))
        .unwrap();
        let e = cnp
            .convert(&off)
            .result
            .expect_err("refused without the flag");
        assert_eq!(e.field, "spec.egress[0].to[0].nodes");
        assert!(matches!(
            cnp.convert(&on).result.unwrap().0,
            Object::ClusterPolicy(_)
        ));
    }
}
