//! One enforcer's stream: hello, then stop-and-wait delivery of the newest version.
//!
//! ```text
//!  Hello{enforcing} ─► wait for first full sync ─► subscribe(node)
//!      loop: newest published ≠ enforcing ─► Current | Delta (base held) | Snapshot
//!            ◄─ Ack (enforcing := version) | Nack (keep enforcing, don't resend that content)
//! ```
//!
//! At most one version is in flight; updates published meanwhile coalesce in the node's watch
//! channel, so a slow enforcer gets the newest state, never a queue.

use moat_proto::unix_micros as micros;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::{self, VersionRef};
use moat_policy::ir::digest::Digest;
use moat_proto::convert::{self, FromProto, ToProto};
use moat_proto::v1;
use moat_proto::v1::enforcer_message::Kind as In;
use moat_proto::v1::server_message::Kind as Out;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

use super::{Source, fit};
use crate::ha::Standing;
use crate::hub::Published;
use crate::status::StreamEvent;
use crate::streams::{CertKey, Claim};

const HELLO_TIMEOUT: Duration = Duration::from_secs(15);

/// Over how long a replica that turned stale ends its streams.
const STALE_SPREAD: Duration = Duration::from_secs(2);

/// The next change of a replica's standing; never, for a single server.
async fn changed(
    standing: &mut Option<(String, watch::Receiver<Standing>)>,
) -> Result<(), watch::error::RecvError> {
    match standing {
        Some((_, rx)) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// What a stream hands the gRPC response, boxed: a tokio channel allocates its slots in
/// blocks of 32, and 32 unboxed messages and statuses were 9.5 KiB per idle stream.
pub(super) type Outgoing = Box<Result<v1::ServerMessage, Status>>;

/// A stream the service admitted: whose, on which certificate, holding the node's slot.
pub(super) struct Opened<S> {
    pub source: Arc<S>,
    pub cluster: String,
    pub node: String,
    /// The client certificate's key and lifetime (`None` in plaintext mode).
    pub cert: Option<CertKey>,
    pub claim: Claim,
    pub ack_timeout: Duration,
}

struct InFlight {
    nonce: String,
    version: VersionRef,
    snapshot: Option<Arc<NodeSnapshot>>,
    /// The digest the index published for this version (`version`'s differs when the
    /// server cut it to fit a message): a NACK refuses that content, whatever was sent.
    published: Digest,
    /// Rule lists the server cut from the published version.
    cut: Vec<v1::Degradation>,
}

pub(super) async fn run<S: Source>(
    opened: Opened<S>,
    inbound: Streaming<v1::EnforcerMessage>,
    tx: mpsc::Sender<Outgoing>,
    shutdown: watch::Receiver<bool>,
) {
    let Opened {
        source,
        cluster,
        node,
        cert,
        claim,
        ack_timeout,
    } = opened;
    let mut s = Stream {
        source,
        cluster,
        node,
        tx,
        nonce: 0,
        cert,
        ack_timeout,
    };
    if let Err(status) = s.serve(claim, inbound, shutdown).await {
        if status.code() != tonic::Code::Cancelled {
            warn!(code = ?status.code(), error = status.message(), "stream ended");
        }
        let _ = s.tx.send(Box::new(Err(status))).await;
    }
}

struct Stream<S> {
    source: Arc<S>,
    cluster: String,
    node: String,
    tx: mpsc::Sender<Outgoing>,
    nonce: u64,
    cert: Option<CertKey>,
    ack_timeout: Duration,
}

/// Counts the stream as connected until dropped.
struct Connected<S: Source> {
    source: Arc<S>,
    cluster: String,
    node: String,
}

impl<S: Source> Drop for Connected<S> {
    fn drop(&mut self) {
        self.source.metrics().connected.dec();
        self.source
            .observe(&self.cluster, &self.node, StreamEvent::Disconnected);
        info!("enforcer disconnected");
    }
}

impl<S: Source> Stream<S> {
    /// Ends the stream (counted by `why`) if a newer certificate for another key was issued
    /// to the node: from then on this stream never speaks for it.
    fn check_superseded(&self, claim: &Claim) -> Result<(), Status> {
        let newest = *claim.issued.borrow();
        if let (Some(mine), Some(newest)) = (&self.cert, newest)
            && mine.superseded_by(&newest)
        {
            self.source.metrics().disconnected("superseded");
            info!(
                "a newer certificate with another key was issued to this node; closing this stream"
            );
            return Err(Status::permission_denied(
                "a newer certificate with another key was issued to this node",
            ));
        }
        Ok(())
    }

    async fn serve(
        &mut self,
        mut claim: Claim,
        mut inbound: Streaming<v1::EnforcerMessage>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), Status> {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(v1::EnforcerMessage {
                kind: Some(In::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument("the first message must be Hello"));
            }
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello")),
        };
        if !hello.node.is_empty() && hello.node != self.node {
            self.source.metrics().refused("wrong-node");
            warn!(asked_as = %hello.node, "refused: enforcer asked for another node's rules");
            return Err(Status::permission_denied(format!(
                "this certificate is for node {:?}, not {:?}",
                self.node, hello.node
            )));
        }
        claim.take_over();
        let mut enforcing = match &hello.enforcing {
            Some(v) if v.version > 0 => Some(
                VersionRef::from_proto(v)
                    .map_err(|e| Status::invalid_argument(format!("hello: {e}")))?,
            ),
            _ => None,
        };
        let mut synced = self
            .source
            .synced(&self.cluster)
            .ok_or_else(|| Status::not_found("cluster not served"))?;
        // Nothing is served before the first full sync of the source.
        while !*synced.borrow_and_update() {
            tokio::select! {
                r = synced.changed() => r.map_err(|_| Status::unavailable("server shutting down"))?,
                _ = &mut claim.replaced => return Err(self.replaced()),
                _ = shutdown.changed() => return Err(Status::unavailable("server shutting down")),
            }
        }
        self.check_superseded(&claim)?;
        let Some(mut rx) = self.source.subscribe(&self.cluster, &self.node) else {
            self.source.metrics().refused("unknown-node");
            warn!("refused: the source does not know this node");
            return Err(Status::not_found(format!(
                "node {:?} does not exist in cluster {:?}",
                self.node, self.cluster
            )));
        };
        info!(backend = %hello.backend, enforcing = ?enforcing.map(|v| v.version), "enforcer connected");
        self.source.metrics().connected.inc();
        self.source.observe(
            &self.cluster,
            &self.node,
            StreamEvent::Connected {
                backend: hello.backend.clone(),
                kernel: hello
                    .capabilities
                    .as_ref()
                    .map(|c| c.kernel.clone())
                    .unwrap_or_default(),
                selection: hello
                    .capabilities
                    .as_ref()
                    .and_then(|c| c.probes.get("selected").cloned())
                    .unwrap_or_default(),
                enforcing,
            },
        );
        let _connected = Connected {
            source: self.source.clone(),
            cluster: self.cluster.clone(),
            node: self.node.clone(),
        };

        let far = || tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let until = |e: Option<SystemTime>| match e {
            Some(e) => {
                tokio::time::Instant::now()
                    + e.duration_since(SystemTime::now()).unwrap_or_default()
            }
            None => far(),
        };
        let mut expires = self.cert.map(|c| c.not_after);
        // A renewal of this key issued before the stream opened counts too.
        if let (Some(mine), Some(newest)) = (&self.cert, *claim.issued.borrow_and_update())
            && newest.key == mine.key
            && expires.is_some_and(|e| newest.not_after > e)
        {
            expires = Some(newest.not_after);
        }
        if expires.is_some_and(|e| e <= SystemTime::now()) {
            return Err(Status::unauthenticated("client certificate expired"));
        }
        let expiry = tokio::time::sleep_until(until(expires));
        tokio::pin!(expiry);
        let ack_deadline = tokio::time::sleep_until(far());
        tokio::pin!(ack_deadline);
        let mut in_flight: Option<InFlight> = None;
        let mut rejected: Option<Digest> = None;
        let mut check = true;
        // A replica that stops being current ends the stream (the enforcer moves); one that
        // drains ends it at this stream's own point of the drain, so they leave a share at
        // a time.
        let mut standing = self.source.standing(&self.cluster);
        if let Some((_, rx)) = standing.as_mut() {
            rx.mark_changed();
        }
        let drain_slot: f64 = rand::random();
        let drain_at = tokio::time::sleep_until(far());
        tokio::pin!(drain_at);
        loop {
            if in_flight.is_none() && check {
                check = false;
                let published = rx.borrow_and_update().clone();
                in_flight = self.offer(&published, enforcing, rejected).await?;
                if in_flight.is_some() {
                    ack_deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + self.ack_timeout);
                }
            }
            tokio::select! {
                r = rx.changed(), if in_flight.is_none() => {
                    if r.is_err() {
                        return Err(Status::not_found("node removed from the cluster"));
                    }
                    check = true;
                }
                m = inbound.message() => {
                    let m = match m {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok(()),
                        Err(e) => return Err(e),
                    };
                    // Checked before anything it says is recorded: a superseded stream never
                    // makes the node look in sync.
                    self.check_superseded(&claim)?;
                    match m.kind {
                        Some(In::Ack(a)) => {
                            let f = in_flight.take().ok_or_else(|| Status::invalid_argument("Ack with nothing in flight"))?;
                            let applied = a.applied.as_ref().map(VersionRef::from_proto).transpose()
                                .map_err(|e| Status::invalid_argument(format!("ack: {e}")))?;
                            if a.nonce != f.nonce || applied != Some(f.version) {
                                return Err(Status::invalid_argument("Ack does not match the version in flight"));
                            }
                            debug!(version = f.version.version, micros = a.apply_micros, "acknowledged");
                            self.source.metrics().acks.inc();
                            enforcing = Some(f.version);
                            rejected = None;
                            self.source.observe(&self.cluster, &self.node, StreamEvent::Acked {
                                version: f.version,
                                apply_micros: a.apply_micros,
                                snapshot: f.snapshot,
                                degraded: a.degraded,
                                cut: f.cut,
                            });
                            check = true;
                        }
                        Some(In::Nack(n)) => {
                            let f = in_flight.take().ok_or_else(|| Status::invalid_argument("Nack with nothing in flight"))?;
                            if n.nonce != f.nonce {
                                return Err(Status::invalid_argument("Nack does not match the version in flight"));
                            }
                            warn!(version = f.version.version, error = %n.error, "enforcer rejected a version; it keeps its last good one");
                            self.source.metrics().nacks.inc();
                            enforcing = match &n.enforcing {
                                Some(v) if v.version > 0 => VersionRef::from_proto(v).ok(),
                                _ => None,
                            };
                            rejected = Some(f.published);
                            self.source.observe(&self.cluster, &self.node, StreamEvent::Nacked {
                                rejected: f.version,
                                error: n.error,
                            });
                            check = true;
                        }
                        Some(In::Report(r)) => {
                            let enforcing = r.enforcing.as_ref().and_then(|v| VersionRef::from_proto(v).ok());
                            self.source.observe(&self.cluster, &self.node, StreamEvent::Report {
                                counters: r.counters.into_iter().collect(),
                                enforcing,
                                degraded: r.degraded,
                                local: r.local,
                            });
                        }
                        Some(In::Hello(_)) => return Err(Status::invalid_argument("Hello sent twice")),
                        None => return Err(Status::invalid_argument("empty message")),
                    }
                }
                Ok(()) = claim.issued.changed() => {
                    self.check_superseded(&claim)?;
                    // Bootstrap re-certified this stream's key: it lives on as if the enforcer
                    // had reconnected with the new certificate.
                    let newest = *claim.issued.borrow_and_update();
                    if let (Some(mine), Some(newest), Some(e)) = (&self.cert, newest, expires)
                        && newest.key == mine.key
                        && newest.not_after > e
                    {
                        debug!(until = ?newest.not_after, "certificate renewed; stream extended");
                        expires = Some(newest.not_after);
                        expiry.as_mut().reset(until(expires));
                    }
                }
                _ = &mut expiry => {
                    self.source.metrics().disconnected("cert-expired");
                    info!("client certificate expired; closing the stream");
                    return Err(Status::unauthenticated("client certificate expired"));
                }
                _ = &mut ack_deadline, if in_flight.is_some() => {
                    self.source.metrics().disconnected("ack-timeout");
                    warn!(timeout = ?self.ack_timeout, "the enforcer did not acknowledge in time (not reading or not applying); closing the stream");
                    return Err(Status::deadline_exceeded("no acknowledgement in time"));
                }
                r = changed(&mut standing) => {
                    let Some((_, rx)) = standing.as_ref() else { continue };
                    if r.is_err() {
                        standing = None;
                        continue;
                    }
                    let now = rx.borrow().clone();
                    let at = match &now {
                        Standing::Current => far(),
                        // Spread too: a whole replica's streams do not all move at once.
                        Standing::Stale(_) => tokio::time::Instant::now() + STALE_SPREAD.mul_f64(drain_slot),
                        Standing::Draining { started, over } => *started + over.mul_f64(drain_slot),
                    };
                    drain_at.as_mut().reset(at);
                }
                _ = &mut drain_at => {
                    let Some((replica, rx)) = standing.as_ref() else { continue };
                    let now = rx.borrow().clone();
                    let Some(status) = now.refusal(replica) else {
                        drain_at.as_mut().reset(far());
                        continue;
                    };
                    let why = if matches!(now, Standing::Stale(_)) { "replica-stale" } else { "replica-draining" };
                    self.source.metrics().disconnected(why);
                    info!(why = status.message(), "moving the enforcer to another replica");
                    return Err(status);
                }
                _ = &mut claim.replaced => return Err(self.replaced()),
                _ = shutdown.changed() => return Err(Status::unavailable("server shutting down")),
            }
        }
    }

    fn replaced(&self) -> Status {
        self.source.metrics().disconnected("replaced");
        info!("a newer stream of this node took over; closing this one");
        Status::aborted("replaced by a newer stream of this node")
    }

    /// Sends what brings the enforcer from `enforcing` to the newest version, if anything.
    async fn offer(
        &mut self,
        published: &Published,
        enforcing: Option<VersionRef>,
        rejected: Option<Digest>,
    ) -> Result<Option<InFlight>, Status> {
        if !published.exists {
            return Err(Status::not_found("node removed from the cluster"));
        }
        if enforcing.is_some_and(|e| e.digest == published.digest) {
            let current = VersionRef {
                version: published.version,
                digest: published.digest,
            };
            if enforcing.is_some_and(|e| e.version == published.version) {
                return Ok(None);
            }
            // Same content under a newer name (e.g. after a server restart): just rename it.
            let renamed = self.renamed(enforcing, current);
            return self
                .send_current(current, published.at, renamed, published.digest, Vec::new())
                .await
                .map(Some);
        }
        if rejected == Some(published.digest) {
            return Ok(None);
        }
        let compiled = self
            .source
            .snapshot(&self.cluster, &self.node)
            .ok_or_else(|| Status::not_found("node removed from the cluster"))?;
        let limit = self.source.message_limit();
        let fit::Fitted { snap, cut, bytes } = fit::fit(compiled.clone(), limit);
        let version = VersionRef {
            version: snap.version,
            digest: snap.digest,
        };
        if !cut.is_empty() {
            warn!(
                version = version.version,
                bytes,
                lists = cut.len(),
                "the snapshot exceeds the message limit: its biggest rule lists are denied instead"
            );
            self.source.observe(
                &self.cluster,
                &self.node,
                StreamEvent::Served {
                    published: VersionRef {
                        version: compiled.version,
                        digest: compiled.digest,
                    },
                    served: version,
                    cut: cut.clone(),
                },
            );
        }
        if enforcing == Some(version) {
            return Ok(None);
        }
        if enforcing.is_some_and(|e| e.digest == snap.digest) {
            return self
                .send_current(version, published.at, Some(snap), compiled.digest, cut)
                .await
                .map(Some);
        }
        self.source
            .sending(&self.cluster, &snap)
            .await
            .map_err(|e| Status::unavailable(format!("cannot record the version: {e}")))?;
        let base = enforcing.and_then(|e| self.source.base(&self.cluster, &self.node, &e));
        let nonce = self.next_nonce();
        let at = micros(published.at);
        let delta = base.as_ref().and_then(|base| {
            let mut p = convert::delta_to_proto(&delta::diff(base, &snap));
            p.nonce = nonce.clone();
            p.published_unix_micros = at;
            // A delta bigger than the message limit (a base far from the new content) goes
            // as the snapshot instead, which fits.
            (p.encoded_len() + fit::ENVELOPE <= limit).then_some((base.version, p))
        });
        let (kind, msg, base) = match delta {
            Some((base, p)) => ("delta", Out::Delta(p), Some(base)),
            None => (
                "snapshot",
                Out::Snapshot(v1::Snapshot {
                    nonce: nonce.clone(),
                    version: Some(version.to_proto()),
                    content: Some(snap.to_proto()),
                    published_unix_micros: at,
                }),
                None,
            ),
        };
        debug!(version = version.version, kind, ?base, "sending");
        self.send(kind, msg).await?;
        Ok(Some(InFlight {
            nonce,
            version,
            snapshot: Some(snap),
            published: compiled.digest,
            cut,
        }))
    }

    /// The content the enforcer holds under the new version number, to persist as its base.
    fn renamed(&self, enforcing: Option<VersionRef>, v: VersionRef) -> Option<Arc<NodeSnapshot>> {
        let base = self.source.base(&self.cluster, &self.node, &enforcing?)?;
        let mut s = (*base).clone();
        s.version = v.version;
        Some(Arc::new(s))
    }

    async fn send_current(
        &mut self,
        v: VersionRef,
        at: SystemTime,
        snapshot: Option<Arc<NodeSnapshot>>,
        published: Digest,
        cut: Vec<v1::Degradation>,
    ) -> Result<InFlight, Status> {
        let nonce = self.next_nonce();
        let msg = Out::Current(v1::Current {
            nonce: nonce.clone(),
            version: Some(v.to_proto()),
            published_unix_micros: micros(at),
        });
        if let Some(s) = &snapshot {
            self.source
                .sending(&self.cluster, s)
                .await
                .map_err(|e| Status::unavailable(format!("cannot record the version: {e}")))?;
        }
        self.send("current", msg).await?;
        Ok(InFlight {
            nonce,
            version: v,
            snapshot,
            published,
            cut,
        })
    }

    async fn send(&mut self, kind: &str, msg: Out) -> Result<(), Status> {
        let msg = v1::ServerMessage { kind: Some(msg) };
        self.source.metrics().sent(kind, msg.encoded_len());
        self.tx
            .send(Box::new(Ok(msg)))
            .await
            .map_err(|_| Status::cancelled("enforcer went away"))
    }

    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }
}
