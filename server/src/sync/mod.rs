//! The `moat.sync.v1.PolicySync` service: one stream per enforcer, node-bound by certificate.
//!
//! The service is generic over [`Source`], the small seam between the gRPC edge and the rest
//! of the server (compiler, store, fleet status), so its state machine can be exercised
//! without either.

mod fit;
mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::VersionRef;
use moat_proto::{Identity, v1};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use crate::hub::{Hub, Published};
use crate::listen::ConnInfo;
use crate::metrics::Metrics;
use crate::status::StreamEvent;
use crate::streams::{CertKey, Claim, Superseded};
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
    /// Largest message an enforcer is sent (see `fit`).
    fn message_limit(&self) -> usize {
        moat_proto::MAX_SERVER_MESSAGE
    }
    /// One of several replicas: its name, and its standing for `cluster`; a stream ends
    /// (and none is admitted) while that is not current, so the enforcer moves.
    fn standing(&self, _cluster: &str) -> Option<(String, watch::Receiver<crate::ha::Standing>)> {
        None
    }
    /// The right of a new stream of `node`, on a certificate with `cert`'s key, to become the
    /// node's one live stream (taken after its Hello); refused if a newer certificate for
    /// another key was issued to the node.
    fn claim(
        &self,
        _cluster: &str,
        _node: &str,
        _cert: Option<&CertKey>,
    ) -> Result<Claim, Superseded> {
        Ok(Claim::unmanaged())
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

    fn message_limit(&self) -> usize {
        self.limits.message
    }

    fn claim(
        &self,
        cluster: &str,
        node: &str,
        cert: Option<&CertKey>,
    ) -> Result<Claim, Superseded> {
        self.streams.claim(cluster, node, cert)
    }

    fn standing(&self, cluster: &str) -> Option<(String, watch::Receiver<crate::ha::Standing>)> {
        Hub::standing(self, cluster)
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
    /// Its certificate's key and lifetime (`None` in plaintext mode).
    pub cert: Option<CertKey>,
    pub anchor: Anchor,
}

/// The peer's address, from the TLS listener or tonic's own (plaintext mode).
pub fn peer_addr<T>(req: &Request<T>) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnInfo>()
        .map(|c| c.remote)
        .or_else(|| req.remote_addr())
}

/// The peer's identity, its certificate's key and lifetime, and which CA vouches for it:
/// from its verified client certificate, or — only with `--insecure-dev-plaintext` — from
/// the `x-moat-identity` header (no certificate).
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
                cert: None,
                anchor: Anchor::Main,
            });
        }
        PeerAuth::Tls(tls) => tls,
    };
    let certs = req
        .extensions()
        .get::<ConnInfo>()
        .and_then(|c| c.certs.clone())
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let der = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let (id, _) = crate::tls::identity_of(der).ok_or_else(|| {
        Status::permission_denied("client certificate carries no (or more than one) Moat identity")
    })?;
    let key = CertKey::of_der(der)
        .ok_or_else(|| Status::permission_denied("client certificate does not parse"))?;
    // Said first, so that an expired certificate is reported as such, not as a node CA's
    // (the anchor is verified again now).
    if key.not_after <= std::time::SystemTime::now() {
        return Err(Status::unauthenticated("client certificate expired"));
    }
    Ok(Peer {
        id,
        cert: Some(key),
        anchor: tls.anchor(&certs),
    })
}

pub struct SyncService<S> {
    source: Arc<S>,
    shutdown: watch::Receiver<bool>,
    auth: PeerAuth,
    ack_timeout: Duration,
}

/// How long a version may stay in flight unacknowledged before the stream is closed.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);

impl<S: Source> SyncService<S> {
    pub fn new(source: Arc<S>, shutdown: watch::Receiver<bool>, auth: PeerAuth) -> Self {
        Self {
            source,
            shutdown,
            auth,
            ack_timeout: ACK_TIMEOUT,
        }
    }

    /// An enforcer that neither acknowledges nor rejects a version within `t` is not reading
    /// its stream (or not applying): the stream is closed, freeing what it holds.
    pub fn ack_timeout(mut self, t: Duration) -> Self {
        self.ack_timeout = t;
        self
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
        let remote = peer_addr(&req);
        let Peer { id, cert, .. } = peer_identity(&req, &self.auth).inspect_err(|e| {
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
        if let Some((replica, standing)) = self.source.standing(&cluster) {
            let refused = standing.borrow().refusal(&replica);
            if let Some(status) = refused {
                self.source.metrics().refused("replica-not-current");
                info!(peer = ?remote, %cluster, %node, "refused a sync stream: {}", status.message());
                return Err(status);
            }
        }
        let claim = self
            .source
            .claim(&cluster, &node, cert.as_ref())
            .inspect_err(|e| {
                self.source.metrics().refused("superseded-certificate");
                warn!(peer = ?remote, %cluster, %node, "refused a sync stream: {e}");
            })
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let (tx, rx) = mpsc::channel::<stream::Outgoing>(2);
        let span = info_span!("stream", %cluster, %node);
        tokio::spawn(
            stream::run(
                stream::Opened {
                    source: self.source.clone(),
                    cluster,
                    node,
                    cert,
                    claim,
                    ack_timeout: self.ack_timeout,
                },
                req.into_inner(),
                tx,
                self.shutdown.clone(),
            )
            .instrument(span),
        );
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            ReceiverStream::new(rx),
            |m| *m,
        ))))
    }
}
