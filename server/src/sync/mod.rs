//! The `moat.sync.v1.PolicySync` service: one stream per enforcer, node-bound by certificate.
//!
//! The service is generic over [`Source`], the small seam between the gRPC edge and the rest
//! of the server (compiler, store, fleet status), so its state machine can be exercised
//! without either.

mod stream;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use futures::Stream;
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::VersionRef;
use moat_proto::{Identity, v1};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info_span, warn};

use crate::hub::{Hub, Published};
use crate::metrics::Metrics;
use crate::status::StreamEvent;
use crate::tls::Anchor;

/// What a sync stream needs from the rest of the server.
pub trait Source: Send + Sync + 'static {
    /// `None` if the cluster is unknown.
    fn synced(&self, cluster: &str) -> Option<watch::Receiver<bool>>;
    /// `None` if the node is unknown (never existed, or deleted).
    fn subscribe(&self, cluster: &str, node: &str) -> Option<watch::Receiver<Published>>;
    fn snapshot(&self, cluster: &str, node: &str) -> Option<Arc<NodeSnapshot>>;
    fn base(&self, cluster: &str, node: &str, v: &VersionRef) -> Option<Arc<NodeSnapshot>>;
    /// Called before a version is sent: makes it durable as handed out, remembers it as a
    /// delta base.
    fn sending(
        &self,
        cluster: &str,
        snap: &Arc<NodeSnapshot>,
    ) -> impl Future<Output = Result<(), String>> + Send;
    fn observe(&self, cluster: &str, node: &str, ev: StreamEvent);
    fn metrics(&self) -> &Metrics;
    /// Certificate expiries newly issued to this node (bootstrap renewals): a stream lives
    /// until the newest one.
    fn renewals(&self, _cluster: &str, _node: &str) -> watch::Receiver<Option<SystemTime>> {
        watch::channel(None).1
    }
}

impl Source for Hub {
    fn synced(&self, cluster: &str) -> Option<watch::Receiver<bool>> {
        self.cluster(cluster).map(|c| c.synced())
    }

    fn subscribe(&self, cluster: &str, node: &str) -> Option<watch::Receiver<Published>> {
        self.cluster(cluster)?.subscribe(node)
    }

    fn snapshot(&self, cluster: &str, node: &str) -> Option<Arc<NodeSnapshot>> {
        self.cluster(cluster)?.snapshot(node)
    }

    fn base(&self, cluster: &str, node: &str, v: &VersionRef) -> Option<Arc<NodeSnapshot>> {
        Hub::base(self, self.cluster(cluster)?, node, v)
    }

    async fn sending(&self, cluster: &str, snap: &Arc<NodeSnapshot>) -> Result<(), String> {
        self.store
            .reserve(snap.version)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(c) = self.cluster(cluster) {
            c.remember_sent(snap);
        }
        Ok(())
    }

    fn observe(&self, cluster: &str, node: &str, ev: StreamEvent) {
        self.stream_event(cluster, node, ev);
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn renewals(&self, cluster: &str, node: &str) -> watch::Receiver<Option<SystemTime>> {
        Hub::renewals(self, cluster, node)
    }
}

/// How peers prove who they are.
#[derive(Clone)]
pub enum PeerAuth {
    /// `--insecure-dev-plaintext`: the `x-moat-identity` header, unauthenticated.
    Plaintext,
    /// Mutual TLS; the config says which CA a verified chain ends at.
    Tls(Arc<crate::tls::Reloading>),
}

/// A peer as its certificate (or, in plaintext mode, its header) names it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub id: Identity,
    /// When its certificate expires (`None` in plaintext mode).
    pub expires: Option<SystemTime>,
    pub anchor: Anchor,
}

/// The peer's identity: from its verified client certificate, or — only with
/// `--insecure-dev-plaintext` — from the `x-moat-identity` header.
pub fn peer_identity<T>(req: &Request<T>, auth: &PeerAuth) -> Result<Peer, Status> {
    let tls = match auth {
        PeerAuth::Plaintext => {
            let uri = req
                .metadata()
                .get("x-moat-identity")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| Status::unauthenticated("plaintext mode: set x-moat-identity"))?;
            let id = Identity::from_uri(uri)
                .ok_or_else(|| Status::unauthenticated("x-moat-identity is not a Moat identity"))?;
            return Ok(Peer {
                id,
                expires: None,
                anchor: Anchor::Main,
            });
        }
        PeerAuth::Tls(tls) => tls,
    };
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let der = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let (id, expires) = crate::tls::identity_of(der).ok_or_else(|| {
        Status::permission_denied("client certificate carries no (or more than one) Moat identity")
    })?;
    // Said first, so that an expired certificate is reported as such, not as a node CA's.
    if expires <= SystemTime::now() {
        return Err(Status::unauthenticated("client certificate expired"));
    }
    Ok(Peer {
        id,
        expires: Some(expires),
        anchor: tls.anchor(&certs),
    })
}

pub struct SyncService<S> {
    source: Arc<S>,
    shutdown: watch::Receiver<bool>,
    auth: PeerAuth,
}

impl<S: Source> SyncService<S> {
    pub fn new(source: Arc<S>, shutdown: watch::Receiver<bool>, auth: PeerAuth) -> Self {
        Self {
            source,
            shutdown,
            auth,
        }
    }

    pub fn svc(self) -> v1::policy_sync_server::PolicySyncServer<Self> {
        v1::policy_sync_server::PolicySyncServer::new(self)
            .max_decoding_message_size(moat_proto::MAX_ENFORCER_MESSAGE)
            .max_encoding_message_size(moat_proto::MAX_SERVER_MESSAGE)
    }
}

type ServerStream = Pin<Box<dyn Stream<Item = Result<v1::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Source> v1::policy_sync_server::PolicySync for SyncService<S> {
    type SyncStream = ServerStream;

    async fn sync(
        &self,
        req: Request<Streaming<v1::EnforcerMessage>>,
    ) -> Result<Response<ServerStream>, Status> {
        let remote = req.remote_addr();
        let Peer { id, expires, .. } = peer_identity(&req, &self.auth).inspect_err(|e| {
            self.source.metrics().refused("identity");
            warn!(peer = ?remote, error = %e.message(), "refused a sync stream");
        })?;
        // Node identities only, whichever CA vouches for them: the node CA's certificates
        // can name nothing else that this service accepts.
        let Identity::Node { cluster, node } = id else {
            self.source.metrics().refused("not-a-node");
            warn!(peer = ?remote, identity = %id, "refused a sync stream: not a node certificate");
            return Err(Status::permission_denied("only node certificates may sync"));
        };
        if self.source.synced(&cluster).is_none() {
            self.source.metrics().refused("unknown-cluster");
            warn!(peer = ?remote, %cluster, %node, "refused a sync stream: unknown cluster");
            return Err(Status::not_found(format!(
                "cluster {cluster:?} is not served here"
            )));
        }
        let (tx, rx) = mpsc::channel(2);
        let span = info_span!("stream", %cluster, %node);
        tokio::spawn(
            stream::run(
                self.source.clone(),
                cluster,
                node,
                expires,
                req.into_inner(),
                tx,
                self.shutdown.clone(),
            )
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
