//! The agent loop: adopt what a previous run left, then connect, apply, acknowledge — and
//! keep enforcing the last good version whatever happens to the connection.
//!
//! ```text
//!  start ─► first topology dump ─► adopt(last persisted, pods bound against it) ─► "" SERVING (fail-static)
//!    loop: connect (backoff + jitter) ─► Hello{enforcing} ─► for each message:
//!            Snapshot | Delta | Current ─► verify digest ─► backend ─► persist ─► Ack{degraded}
//!                                                 └─ any error ─► Nack (old version stays)
//!    meanwhile, connected or not: topology change ─► rebind ─► backend.set_local
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::{self, VersionRef};
use moat_proto::convert::{self, FromProto, ToProto};
use moat_proto::v1;
use moat_proto::v1::enforcer_message::Kind as Out;
use moat_proto::v1::server_message::Kind as In;
use prost::Message;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{Instrument, debug, info, warn};

use crate::metrics::Metrics;
use crate::pods::{Dataplane, LocalConfig};
use crate::state::LocalState;
use moat_dataplane::local::Topology;
use moat_dataplane::plan::Degraded;
use moat_dataplane::{Adopted, Applied, Backend, BackendError, LocalPods};

/// The health service that is SERVING only while the newest offered version is applied.
pub const SYNC_SERVICE: &str = "moat.sync";

#[derive(Clone, Debug)]
pub enum Transport {
    Tls {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        /// The server's certificate name (a DNS SAN), if it differs from the URL's host.
        server_name: Option<String>,
    },
    /// `--insecure-dev-plaintext`: identity asserted in a header, for development only.
    Plaintext { cluster: String },
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Every policy server (`--server`, repeatable; a name may resolve to several).
    pub servers: crate::servers::Servers,
    /// HTTP/2 keepalive: a server that answers no ping within this (twice) is dead.
    pub keepalive: Duration,
    pub node: String,
    pub transport: Transport,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub report_every: Duration,
    pub local: LocalConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The cause (refused, unreachable, TLS) is in the source chain: tonic's own message
    /// is only "transport error".
    #[error("connect")]
    Connect(#[from] tonic::transport::Error),
    #[error("server: {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    State(#[from] crate::state::Error),
}

pub struct Agent<B: Backend> {
    cfg: Config,
    dp: Arc<Mutex<Dataplane<B>>>,
    topology: watch::Receiver<Topology>,
    state: Arc<LocalState>,
    health: HealthReporter,
    metrics: Arc<Metrics>,
    enforcing: Option<Arc<NodeSnapshot>>,
    sessions: u64,
    servers: crate::servers::Servers,
    /// The address of the current (or last) stream.
    current: Option<std::net::SocketAddr>,
}

/// How long an address whose stream ended goes last, so the enforcer moves elsewhere.
const AVOID: Duration = Duration::from_secs(10);

fn version_of(s: &NodeSnapshot) -> VersionRef {
    VersionRef {
        version: s.version,
        digest: s.digest,
    }
}

impl<B: Backend> Agent<B> {
    /// `topology` follows the node's interfaces and host routes; its current value must be
    /// a complete view (a full dump: [`crate::host::Watcher::start`] returns after one), as
    /// adopting binds the node's pods against it.
    pub fn new(
        cfg: Config,
        backend: B,
        state: LocalState,
        health: HealthReporter,
        metrics: Arc<Metrics>,
        topology: watch::Receiver<Topology>,
    ) -> Self {
        Self {
            servers: cfg.servers.clone(),
            current: None,
            dp: Arc::new(Mutex::new(Dataplane::new(backend, cfg.local.clone()))),
            cfg,
            topology,
            state: Arc::new(state),
            health,
            metrics,
            enforcing: None,
            sessions: 0,
        }
    }

    /// Runs until `shutdown` turns true. Enforcement stays in place on exit.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.health
            .set_service_status(SYNC_SERVICE, ServingStatus::NotServing)
            .await;
        let last = match self.state.load(&self.cfg.node) {
            crate::state::Loaded::Applied(s) => Some(Arc::new(s)),
            crate::state::Loaded::Nothing => None,
            crate::state::Loaded::Discarded(e) => {
                // Adopt as if nothing were recorded: the kernel keeps what it enforces, and a
                // hello naming no version makes the server send a full snapshot.
                warn!(error = %e, "the local record cannot be read and was discarded; the kernel keeps what it enforces until the server sends a full snapshot");
                None
            }
        };
        let bindings = self.state.load_bindings().unwrap_or_else(|e| {
            // Without them every address binds afresh to what the next snapshot names; the
            // server's full snapshot follows a discarded record anyway.
            warn!(error = %e, "the pod bindings cannot be read and were discarded");
            Default::default()
        });
        let adopted = {
            let (dp, state, metrics) = (self.dp.clone(), self.state.clone(), self.metrics.clone());
            let (topo, last2) = (self.topology.clone(), last.clone());
            tokio::task::spawn_blocking(move || {
                let t = topo.borrow().clone();
                dp.lock()
                    .expect("backend lock")
                    .adopt(bindings, &t, last2, &state, &metrics)
            })
            .await
            .map_err(|e| Error::Protocol(format!("adopt panicked: {e}")))?
        };
        match (adopted, last) {
            (Ok(Adopted::Enforcing), Some(s)) => {
                info!(version = s.version, digest = %s.digest.short(), "enforcing the last known rules");
                self.metrics.applied_version.set(s.version as i64);
                self.enforcing = Some(s);
                self.health
                    .set_service_status("", ServingStatus::Serving)
                    .await;
            }
            (Ok(Adopted::Unknown), _) => {
                // Rules are in force, just not ones this agent can name: keep them, and let the
                // server send a full snapshot to replace them atomically.
                info!(
                    "the kernel enforces rules the local record does not name; keeping them until the server sends a full snapshot"
                );
                self.health
                    .set_service_status("", ServingStatus::Serving)
                    .await;
            }
            (Ok(_), _) => info!("no previous rules; waiting for the server"),
            (Err(e), _) => {
                warn!(error = %moat_dataplane::chain(&e), "could not adopt the previous run's state; waiting for the server")
            }
        }
        // The node's pods change between versions too, connected or not.
        let _follow = AbortOnDrop(tokio::spawn(
            follow_local(
                self.dp.clone(),
                self.topology.clone(),
                self.state.clone(),
                self.metrics.clone(),
            )
            .instrument(tracing::info_span!("local")),
        ));
        // Upkeep between versions (e.g. programs onto new interfaces), on its own thread: it
        // takes the backend's lock briefly, never across an await.
        let upkeep_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (dp, stop) = (self.dp.clone(), upkeep_stop.clone());
            std::thread::Builder::new()
                .name("moat-upkeep".into())
                .spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(moat_dataplane::MAINTAIN_EVERY);
                        if let Err(e) = dp.lock().expect("backend lock").backend.maintain() {
                            warn!(error = %moat_dataplane::chain(&e), "dataplane upkeep failed; retrying");
                        }
                    }
                })
                .map_err(|e| Error::Protocol(format!("starting the upkeep thread: {e}")))?;
        }
        let _stop_upkeep = StopOnDrop(upkeep_stop);
        let mut backoff = self.cfg.backoff_min;
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                r = self.session() => r,
                _ = shutdown.changed() => return Ok(()),
            };
            self.metrics.connected.set(0);
            if let Some(a) = self.current.take() {
                self.servers.avoid(a, AVOID);
            }
            self.health
                .set_service_status(SYNC_SERVICE, ServingStatus::NotServing)
                .await;
            match result {
                Ok(()) => info!("server closed the stream"),
                Err(e) => {
                    warn!(error = %moat_dataplane::chain(&e), "sync stream ended; enforcing version {:?} meanwhile", self.enforcing.as_ref().map(|s| s.version))
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = self.cfg.backoff_min;
            }
            // Full jitter: a fleet that lost its server does not come back in lockstep.
            let wait = Duration::from_millis(
                rand::rng()
                    .random_range(0..=backoff.as_millis() as u64)
                    .max(50),
            );
            debug!(?wait, "reconnecting");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return Ok(()),
            }
            backoff = (backoff * 2).min(self.cfg.backoff_max);
        }
    }

    /// Connects to the first server address that answers (see [`crate::servers`]).
    async fn connect(&mut self) -> Result<(Channel, std::net::SocketAddr), Error> {
        let candidates = self.servers.candidates().await;
        let timeout = if candidates.len() > 1 {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(5)
        };
        let mut last = Error::Protocol(format!(
            "no address of --server {} resolves",
            self.servers.describe()
        ));
        for c in candidates {
            match self.connect_to(&c, timeout).await {
                Ok(ch) => return Ok((ch, c.addr)),
                Err(e) => {
                    debug!(server = %c.url, error = %moat_dataplane::chain(&e), "cannot connect; trying the next address");
                    self.servers.avoid(c.addr, AVOID);
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn connect_to(
        &self,
        c: &crate::servers::Candidate,
        timeout: Duration,
    ) -> Result<Channel, Error> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| Error::Read {
                path: p.clone(),
                source,
            })
        };
        let mut ep = Endpoint::from_shared(c.url.clone())?
            .connect_timeout(timeout)
            .http2_keep_alive_interval(self.cfg.keepalive)
            .keep_alive_timeout(self.cfg.keepalive)
            .keep_alive_while_idle(true);
        if let Transport::Tls {
            ca,
            cert,
            key,
            server_name,
        } = &self.cfg.transport
        {
            // Read afresh on every connection: rotated certificates take effect on the next one.
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(ca)?))
                .identity(Identity::from_pem(read(cert)?, read(key)?));
            // The certificate names the URL's host, not the address it resolved to.
            match (server_name, c.named()) {
                (Some(n), _) => tls = tls.domain_name(n.clone()),
                (None, true) => tls = tls.domain_name(c.host.clone()),
                (None, false) => {}
            }
            ep = ep.tls_config(tls)?;
        }
        Ok(ep.connect().await?)
    }

    async fn session(&mut self) -> Result<(), Error> {
        let (channel, addr) = self.connect().await?;
        self.current = Some(addr);
        let mut client = v1::policy_sync_client::PolicySyncClient::new(channel)
            .max_decoding_message_size(moat_proto::MAX_SERVER_MESSAGE)
            .max_encoding_message_size(moat_proto::MAX_ENFORCER_MESSAGE);
        let (tx, rx) = mpsc::channel::<v1::EnforcerMessage>(4);
        let caps = {
            let dp = self.dp.lock().expect("backend lock");
            (dp.backend.name().to_string(), dp.backend.capabilities())
        };
        let hello = v1::Hello {
            backend: caps.0,
            capabilities: Some(v1::Capabilities {
                kernel: caps.1.kernel,
                probes: caps.1.probes.into_iter().collect(),
            }),
            enforcing: self.enforcing.as_ref().map(|s| version_of(s).to_proto()),
            node: self.cfg.node.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        tx.send(v1::EnforcerMessage {
            kind: Some(Out::Hello(hello)),
        })
        .await
        .map_err(|_| Error::Protocol("stream closed".into()))?;
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Transport::Plaintext { cluster } = &self.cfg.transport {
            let id = moat_proto::Identity::node(cluster, &self.cfg.node).uri();
            req.metadata_mut().insert(
                "x-moat-identity",
                id.parse()
                    .map_err(|_| Error::Protocol("bad identity".into()))?,
            );
        }
        let mut inbound = client.sync(req).await?.into_inner();
        self.sessions += 1;
        if self.sessions > 1 {
            self.metrics.reconnects.inc();
        }
        self.metrics.connected.set(1);
        info!(server = %addr, "connected");
        let mut report = tokio::time::interval(self.cfg.report_every);
        report.tick().await;
        loop {
            tokio::select! {
                m = inbound.message() => {
                    let Some(m) = m? else { return Ok(()) };
                    self.metrics.received_bytes.inc_by(m.encoded_len() as u64);
                    let reply = self.handle(m).await?;
                    tx.send(reply).await.map_err(|_| Error::Protocol("stream closed".into()))?;
                }
                _ = report.tick() => {
                    let enforcing = self.enforcing.as_ref().map(|s| version_of(s).to_proto());
                    let dp = self.dp.clone();
                    // The backend's lock may be held by an apply: waited for off the runtime.
                    let r = tokio::task::spawn_blocking(move || {
                        let dp = dp.lock().expect("backend lock");
                        v1::Report {
                            enforcing,
                            counters: dp.backend.counters().into_iter().collect(),
                            degraded: dp.degraded().iter().map(ToProto::to_proto).collect(),
                            local: dp.local().map(convert::local_pods_summary),
                        }
                    })
                    .await
                    .map_err(|e| Error::Protocol(format!("report panicked: {e}")))?;
                    let _ = tx.try_send(v1::EnforcerMessage { kind: Some(Out::Report(r)) });
                }
            }
        }
    }

    /// Verifies and applies one server message; the reply is an Ack or a Nack.
    async fn handle(&mut self, m: v1::ServerMessage) -> Result<v1::EnforcerMessage, Error> {
        let t = Instant::now();
        let (nonce, offered, outcome) = match m.kind {
            Some(In::Snapshot(s)) => {
                let v = s
                    .version
                    .as_ref()
                    .map(VersionRef::from_proto)
                    .transpose()
                    .map_err(|e| Error::Protocol(e.to_string()))?
                    .ok_or_else(|| Error::Protocol("snapshot without version".into()))?;
                let r = self.apply_snapshot(&v, s.content.unwrap_or_default()).await;
                (s.nonce, v, r)
            }
            Some(In::Delta(d)) => {
                let parsed = convert::delta_from_proto(&d).map_err(|e| e.to_string());
                let v = match &parsed {
                    Ok(p) => p.version,
                    Err(_) => d
                        .version
                        .as_ref()
                        .and_then(|v| VersionRef::from_proto(v).ok())
                        .ok_or_else(|| Error::Protocol("delta without version".into()))?,
                };
                let r = match parsed {
                    Ok(p) => self.apply_delta(p).await,
                    Err(e) => Err(e),
                };
                (d.nonce, v, r)
            }
            Some(In::Current(c)) => {
                let v = c
                    .version
                    .as_ref()
                    .map(VersionRef::from_proto)
                    .transpose()
                    .map_err(|e| Error::Protocol(e.to_string()))?
                    .ok_or_else(|| Error::Protocol("current without version".into()))?;
                let r = self.rename(&v).await;
                (c.nonce, v, r)
            }
            None => return Err(Error::Protocol("empty message from the server".into())),
        };
        let enforcing = self.enforcing.as_ref().map(|s| version_of(s).to_proto());
        Ok(match outcome {
            Ok(degraded) => {
                let micros = t.elapsed().as_micros() as u64;
                self.metrics
                    .apply_seconds
                    .observe(t.elapsed().as_secs_f64());
                self.metrics.applied.inc();
                self.metrics.applied_version.set(offered.version as i64);
                self.health
                    .set_service_status("", ServingStatus::Serving)
                    .await;
                self.health
                    .set_service_status(SYNC_SERVICE, ServingStatus::Serving)
                    .await;
                info!(version = offered.version, digest = %offered.digest, micros, "applied");
                v1::EnforcerMessage {
                    kind: Some(Out::Ack(v1::Ack {
                        nonce,
                        applied: Some(offered.to_proto()),
                        apply_micros: micros,
                        degraded: degraded.iter().map(ToProto::to_proto).collect(),
                    })),
                }
            }
            Err(error) => {
                self.metrics.nacks.inc();
                self.health
                    .set_service_status(SYNC_SERVICE, ServingStatus::NotServing)
                    .await;
                warn!(version = offered.version, %error, "rejected a version; the previous one stays in force");
                v1::EnforcerMessage {
                    kind: Some(Out::Nack(v1::Nack {
                        nonce,
                        rejected: Some(offered.to_proto()),
                        error,
                        enforcing,
                    })),
                }
            }
        })
    }

    async fn apply_snapshot(
        &mut self,
        v: &VersionRef,
        content: v1::NodeContent,
    ) -> Result<Vec<Degraded>, String> {
        let snap =
            convert::snapshot_from_proto(&self.cfg.node, v, &content).map_err(|e| e.to_string())?;
        delta::check_references(&snap).map_err(|e| e.to_string())?;
        let got = snap.content_digest();
        if got != v.digest {
            return Err(format!(
                "content digest {} does not match the announced {}",
                got.short(),
                v.digest.short()
            ));
        }
        let snap = Arc::new(snap);
        let s2 = snap.clone();
        self.commit(snap, move |b, local| b.apply_full(&s2, local))
            .await
    }

    async fn apply_delta(&mut self, d: delta::Delta) -> Result<Vec<Degraded>, String> {
        let old = self
            .enforcing
            .clone()
            .ok_or_else(|| "a delta arrived but this node holds no version".to_string())?;
        let new = Arc::new(delta::apply(&old, &d).map_err(|e| e.to_string())?);
        let n2 = new.clone();
        self.commit(new, move |b, local| b.apply_delta(&old, &d, &n2, local))
            .await
    }

    /// The server renames the content this node holds (same digest, new version); what it
    /// could not hold stays as it was.
    async fn rename(&mut self, v: &VersionRef) -> Result<Vec<Degraded>, String> {
        let old = self
            .enforcing
            .clone()
            .ok_or_else(|| "a rename arrived but this node holds no version".to_string())?;
        if old.digest != v.digest {
            return Err(format!(
                "rename to {} names content {} this node does not hold",
                v.version,
                v.digest.short()
            ));
        }
        let mut s = (*old).clone();
        s.version = v.version;
        let s = Arc::new(s);
        let (state, dp) = (self.state.clone(), self.dp.clone());
        let s2 = s.clone();
        let degraded = tokio::task::spawn_blocking(move || {
            state.save(&s2)?;
            let mut dp = dp.lock().expect("backend lock");
            dp.renamed(s2);
            Ok::<_, crate::state::Error>(dp.degraded().to_vec())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        self.enforcing = Some(s);
        Ok(degraded)
    }

    /// Applies through the backend (with the node's pods bound against `snap` on the newest
    /// topology), then persists, then (by returning Ok) lets the caller acknowledge. A persist
    /// failure after a successful apply is reported, and the new version is what the node
    /// enforces.
    async fn commit(
        &mut self,
        snap: Arc<NodeSnapshot>,
        f: impl FnOnce(&mut B, &LocalPods) -> Result<Applied, BackendError> + Send + 'static,
    ) -> Result<Vec<Degraded>, String> {
        let (dp, state, metrics) = (self.dp.clone(), self.state.clone(), self.metrics.clone());
        let topo = self.topology.clone();
        let s2 = snap.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut dp = dp.lock().expect("backend lock");
            let t = topo.borrow().clone();
            dp.apply(&t, s2, &state, &metrics, f)
        })
        .await
        .map_err(|e| format!("apply panicked: {e}"))?;
        match r {
            Ok(applied) => {
                log_degraded(snap.version, &applied.degraded);
                self.enforcing = Some(snap);
                Ok(applied.degraded)
            }
            Err((applied, e)) => {
                if applied {
                    self.enforcing = Some(snap);
                    return Err(format!("applied but not persisted: {e}"));
                }
                Err(e)
            }
        }
    }
}

/// Once per version: what it could not hold, and why.
fn log_degraded(version: u64, degraded: &[Degraded]) {
    if degraded.is_empty() {
        return;
    }
    let mut reasons: Vec<&str> = degraded.iter().map(|d| d.reason.as_str()).collect();
    reasons.sort_unstable();
    reasons.dedup();
    warn!(
        version,
        rule_lists = degraded.len(),
        endpoints = degraded.iter().map(|d| d.endpoints.len()).sum::<usize>(),
        reasons = %reasons.join("; "),
        "degraded: rule lists the dataplane could not hold deny in their direction instead"
    );
}

/// Hands every change of the node's pods to the dataplane, whatever the connection does.
/// Bursts coalesce: while one update runs, newer topologies collapse into the next.
async fn follow_local<B: Backend>(
    dp: Arc<Mutex<Dataplane<B>>>,
    mut topo: watch::Receiver<Topology>,
    state: Arc<LocalState>,
    metrics: Arc<Metrics>,
) {
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let changed = match retry_at {
            Some(at) => tokio::select! {
                r = topo.changed() => r,
                _ = tokio::time::sleep_until(at) => Ok(()),
            },
            None => topo.changed().await,
        };
        if changed.is_err() {
            return;
        }
        topo.borrow_and_update();
        let t0 = Instant::now();
        let (dp2, state2, metrics2, latest) =
            (dp.clone(), state.clone(), metrics.clone(), topo.clone());
        let r = tokio::task::spawn_blocking(move || {
            let mut dp = dp2.lock().expect("backend lock");
            // The newest, read under the lock: an apply that ran meanwhile used what it saw.
            let t = latest.borrow().clone();
            dp.refresh(&t, &state2, &metrics2)
        })
        .await;
        match r {
            Ok(Ok(Some(local))) => {
                retry_at = None;
                metrics.local_updates.inc();
                let (known, unknown) = local.counts();
                info!(
                    known,
                    unknown,
                    pod_interfaces = local.pod_ifaces.len(),
                    micros = t0.elapsed().as_micros() as u64,
                    "local pods changed; the dataplane has them"
                );
            }
            Ok(Ok(None)) => retry_at = None,
            Ok(Err(e)) => {
                warn!(error = %e, "could not hand the node's pods to the dataplane; retrying");
                retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
            Err(e) => {
                warn!(error = %e, "local pod update panicked; retrying");
                retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stops a background thread's loop when the agent's run ends.
struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
