//! Node identity bootstrap: an enforcer presents its projected ServiceAccount token and gets
//! a short-lived node certificate from the server's CA.
//!
//! The token is checked against the cluster it claims to come from (TokenReview on that
//! cluster's API server), then:
//! - the review must be for our audience (a token minted for anything else is refused);
//! - the account must be Moat's enforcer ServiceAccount (namespace and name): any pod can
//!   mint a token for its own account, so anything else would let tenants get node
//!   certificates;
//! - the token must be pod-bound (legacy secret-based tokens carry no pod and are refused);
//! - the pod must exist now with the token's UID and run on the node asked for (and the
//!   token's own node claim, when present, must agree).
//!
//! Only then is a certificate issued, for the identity (cluster, node), with the enforcer's
//! public key from its CSR (everything else in the CSR is ignored).
//!
//! The listener takes requests from anyone, so before a request may cost the API server
//! anything it must pass, in order: its source's token bucket, a read of the token's own
//! claims ([`precheck`]), and a free slot among the few reviews in flight — waited for at
//! most `queue_timeout`, so a flood makes callers retry rather than pile up.

mod precheck;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use moat_proto::{Identity, v1};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::hub::Hub;
use crate::listen::{ConnInfo, LOG_EVERY, LOG_LINES, SourceKey};
use crate::streams::CertKey;
use crate::throttle::{LogEvery, PerSource};

pub use precheck::precheck;

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CA: {0}")]
    Ca(#[from] rcgen::Error),
}

/// Who may bootstrap, and for how long certificates live.
#[derive(Clone, Debug)]
pub struct Policy {
    pub audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the enforcer DaemonSet.
    pub namespace: String,
    pub service_account: String,
    pub cert_ttl: Duration,
}

/// Why a token was refused (the `refused` metric's reason and the log line).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("token rejected: {0}")]
    Malformed(String),
    #[error("token rejected: it has expired")]
    Expired,
    #[error("token rejected by the cluster: {0}")]
    Rejected(String),
    #[error("token is not for audience {0:?}")]
    Audience(String),
    #[error("{0} is not Moat's enforcer ServiceAccount")]
    Account(String),
    #[error("not a pod-bound projected token (legacy secret-based tokens are refused)")]
    Unbound,
    #[error("the token's pod {0} no longer exists")]
    PodGone(String),
    #[error("the token's pod {0} has another UID (deleted and recreated)")]
    PodUid(String),
    #[error("pod {pod} runs on node {actual:?}, not {asked:?}")]
    WrongNode {
        pod: String,
        actual: String,
        asked: String,
    },
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "bootstrap-malformed-token",
            Refusal::Expired => "bootstrap-expired-token",
            Refusal::Rejected(_) => "bootstrap-token",
            Refusal::Audience(_) => "bootstrap-audience",
            Refusal::Account(_) => "bootstrap-account",
            Refusal::Unbound => "bootstrap-unbound-token",
            Refusal::PodGone(_) | Refusal::PodUid(_) => "bootstrap-pod",
            Refusal::WrongNode { .. } => "bootstrap-node",
        }
    }
}

/// What a TokenReview said, reduced to what the checks need.
pub struct Reviewed {
    pub username: String,
    pub audiences: Vec<String>,
    pub extra: HashMap<String, Vec<String>>,
}

/// The checks on a reviewed token and the pod it names (`pod`: namespace, name → (uid,
/// node), `None` if it does not exist). Pure, so every refusal is unit-tested.
pub fn check(
    p: &Policy,
    r: &Reviewed,
    node: &str,
    pod: impl FnOnce(&str, &str) -> Option<(String, String)>,
) -> Result<(), Refusal> {
    let (name, uid) = check_token(p, r, node)?;
    check_pod(p, &name, &uid, node, pod(&p.namespace, &name))
}

/// The token's own claims; returns the pod it is bound to (name, UID).
pub fn check_token(p: &Policy, r: &Reviewed, node: &str) -> Result<(String, String), Refusal> {
    if !r.audiences.contains(&p.audience) {
        return Err(Refusal::Audience(p.audience.clone()));
    }
    let want = format!(
        "system:serviceaccount:{}:{}",
        p.namespace, p.service_account
    );
    if r.username != want {
        return Err(Refusal::Account(r.username.clone()));
    }
    let one = |k: &str| r.extra.get(k).and_then(|v| v.first()).cloned();
    let (Some(pod_name), Some(pod_uid)) = (one(POD_NAME), one(POD_UID)) else {
        return Err(Refusal::Unbound);
    };
    if let Some(n) = one(NODE_NAME)
        && n != node
    {
        return Err(Refusal::WrongNode {
            pod: format!("{}/{pod_name}", p.namespace),
            actual: n,
            asked: node.into(),
        });
    }
    Ok((pod_name, pod_uid))
}

/// The pod as the API server has it now: (UID, node), `None` if it does not exist.
pub fn check_pod(
    p: &Policy,
    name: &str,
    uid: &str,
    node: &str,
    live: Option<(String, String)>,
) -> Result<(), Refusal> {
    let full = format!("{}/{name}", p.namespace);
    let Some((live_uid, on)) = live else {
        return Err(Refusal::PodGone(full));
    };
    if live_uid != uid {
        return Err(Refusal::PodUid(full));
    }
    if on != node {
        return Err(Refusal::WrongNode {
            pod: full,
            actual: on,
            asked: node.into(),
        });
    }
    Ok(())
}

/// Signs node certificates with the server's CA.
pub struct Ca {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn load(cert: &Path, key: &Path) -> Result<Ca, Error> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| Error::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let ca_pem = read(cert)?;
        let key = KeyPair::from_pem(&read(key)?)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)?;
        Ok(Ca { ca_pem, issuer })
    }

    /// A client certificate for `id`, for the CSR's public key only.
    pub fn issue(
        &self,
        id: &Identity,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<(String, SystemTime), rcgen::Error> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Moat");
        dn.push(DnType::CommonName, id.to_string());
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(id.uri().try_into()?)];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        let not_after = now + time::Duration::try_from(ttl).unwrap_or(time::Duration::hours(1));
        // Whole seconds: what the certificate can express, and what the stream deadline uses.
        let not_after = not_after.replace_nanosecond(0).unwrap_or(not_after);
        p.not_after = not_after;
        let cert = CertificateSigningRequestParams {
            params: p,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok((cert.pem(), SystemTime::from(not_after)))
    }
}

/// How much of the API server's time bootstrap callers may take (`--bootstrap-*` flags).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests per second per source address (IPv6: per /64), after a burst of `burst`.
    pub per_source_rate: f64,
    pub per_source_burst: u32,
    /// TokenReviews in flight at once: a fleet restarting together queues behind these.
    pub max_in_flight: usize,
    /// Longest wait for one of those slots before the caller is told to retry.
    pub queue_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_source_rate: 1.0,
            per_source_burst: 10,
            max_in_flight: 16,
            queue_timeout: Duration::from_secs(5),
        }
    }
}

/// Sources tracked by the rate limiter at most (quiet ones are forgotten first).
const MAX_SOURCES: usize = 100_000;

pub struct BootstrapService {
    hub: Arc<Hub>,
    clients: HashMap<String, kube::Client>,
    policy: Policy,
    ca: Ca,
    limits: Limits,
    /// Each request costs the cluster's API server a TokenReview and a pod read: at most
    /// `max_in_flight` at once, so a flood of bootstrap calls cannot become a flood there.
    in_flight: tokio::sync::Semaphore,
    per_source: PerSource,
    log: LogEvery,
}

impl BootstrapService {
    pub fn new(
        hub: Arc<Hub>,
        clients: HashMap<String, kube::Client>,
        policy: Policy,
        ca: Ca,
        limits: Limits,
    ) -> Self {
        Self {
            hub,
            clients,
            policy,
            ca,
            in_flight: tokio::sync::Semaphore::new(limits.max_in_flight.max(1)),
            per_source: PerSource::new(
                limits.per_source_rate,
                limits.per_source_burst,
                MAX_SOURCES,
            ),
            limits,
            log: LogEvery::new(LOG_EVERY, LOG_LINES),
        }
    }

    /// Counts and logs (throttled) a refusal that never reached the token checks.
    fn turn_away(&self, reason: &'static str, why: &str) {
        self.hub.metrics.refused(reason);
        if let Some(n) = self.log.tick(reason) {
            warn!(reason = why, refused = n, "refused bootstrap requests");
        }
    }

    pub fn svc(self) -> v1::bootstrap_server::BootstrapServer<Self> {
        v1::bootstrap_server::BootstrapServer::new(self).max_decoding_message_size(64 * 1024)
    }

    async fn review(&self, client: &kube::Client, token: &str) -> Result<Reviewed, Status> {
        let tr = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.policy.audience.clone()]),
            },
            ..Default::default()
        };
        let r = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &tr)
            .await
            .map_err(|e| Status::unavailable(format!("TokenReview failed: {e}")))?;
        let st: TokenReviewStatus = r.status.unwrap_or_default();
        if st.authenticated != Some(true) {
            return Err(self.refuse(Refusal::Rejected(
                st.error.unwrap_or_else(|| "not authenticated".into()),
            )));
        }
        let user = st.user.unwrap_or_default();
        Ok(Reviewed {
            username: user.username.unwrap_or_default(),
            audiences: st.audiences.unwrap_or_default(),
            extra: user.extra.unwrap_or_default().into_iter().collect(),
        })
    }

    fn refuse(&self, r: Refusal) -> Status {
        self.hub.metrics.refused(r.reason());
        if let Some(n) = self.log.tick(r.reason()) {
            warn!(reason = %r, refused = n, "refused a bootstrap request");
        }
        match r {
            Refusal::Rejected(_) | Refusal::Malformed(_) | Refusal::Expired => {
                Status::unauthenticated(r.to_string())
            }
            _ => Status::permission_denied(r.to_string()),
        }
    }
}

#[tonic::async_trait]
impl v1::bootstrap_server::Bootstrap for BootstrapService {
    async fn issue(
        &self,
        req: Request<v1::IssueRequest>,
    ) -> Result<Response<v1::IssueResponse>, Status> {
        // Requests always arrive through the TLS listener, which says where from; without
        // that, every request shares one bucket (failing closed, not open).
        let source = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| SourceKey::of(c.remote.ip()))
            .unwrap_or(SourceKey::of(std::net::Ipv4Addr::UNSPECIFIED.into()));
        if !self.per_source.allow(source) {
            self.turn_away("bootstrap-rate", "too many requests from one source");
            return Err(Status::resource_exhausted(
                "too many bootstrap requests from this address; retry later",
            ));
        }
        let r = req.into_inner();
        let Some(client) = self.clients.get(&r.cluster) else {
            self.turn_away("bootstrap-cluster", "unknown cluster");
            return Err(Status::not_found(format!(
                "cluster {:?} is not a Kubernetes cluster served here",
                r.cluster
            )));
        };
        let id = Identity::node(&r.cluster, &r.node);
        if !id.is_valid() {
            self.turn_away("bootstrap-node-name", "invalid node name");
            return Err(Status::invalid_argument(format!(
                "{:?} is not a valid node name",
                r.node
            )));
        }
        precheck(&self.policy, &r.token, SystemTime::now()).map_err(|e| self.refuse(e))?;
        let _permit =
            match tokio::time::timeout(self.limits.queue_timeout, self.in_flight.acquire()).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return Err(Status::unavailable("shutting down")),
                Err(_) => {
                    self.turn_away("bootstrap-busy", "no review slot in time");
                    return Err(Status::unavailable("bootstrap is busy; retry with backoff"));
                }
            };
        let reviewed = self.review(client, &r.token).await?;
        let (pod, uid) =
            check_token(&self.policy, &reviewed, &r.node).map_err(|e| self.refuse(e))?;
        // The pod lookup goes to the API server, not the index: the UID and the binding to
        // the node must be current, not as of the last watch event.
        let live = Api::<Pod>::namespaced(client.clone(), &self.policy.namespace)
            .get_opt(&pod)
            .await
            .map_err(|e| Status::unavailable(format!("reading pod {pod}: {e}")))?
            .map(|p| {
                (
                    p.metadata.uid.unwrap_or_default(),
                    p.spec.and_then(|s| s.node_name).unwrap_or_default(),
                )
            });
        check_pod(&self.policy, &pod, &uid, &r.node, live).map_err(|e| self.refuse(e))?;
        let (cert_pem, not_after) = self
            .ca
            .issue(&id, &r.csr_pem, self.policy.cert_ttl)
            .map_err(|e| Status::invalid_argument(format!("certificate request: {e}")))?;
        self.hub.metrics.certificates_issued.inc();
        match CertKey::of_pem(&cert_pem) {
            Some(k) => self.hub.streams.issued(&r.cluster, &r.node, k),
            None => {
                return Err(Status::internal("the issued certificate does not parse"));
            }
        }
        info!(cluster = %r.cluster, node = %r.node, ttl = ?self.policy.cert_ttl, "issued a node certificate");
        Ok(Response::new(v1::IssueResponse {
            cert_pem,
            ca_pem: self.ca.ca_pem.clone(),
            not_after_unix_micros: moat_proto::unix_micros(not_after),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            audience: "moat".into(),
            namespace: "moat-system".into(),
            service_account: "moat-enforcer".into(),
            cert_ttl: Duration::from_secs(3600),
        }
    }

    fn reviewed(user: &str, aud: &str, pod: Option<(&str, &str)>, node: Option<&str>) -> Reviewed {
        let mut extra = HashMap::new();
        if let Some((n, u)) = pod {
            extra.insert(POD_NAME.to_string(), vec![n.to_string()]);
            extra.insert(POD_UID.to_string(), vec![u.to_string()]);
        }
        if let Some(n) = node {
            extra.insert(NODE_NAME.to_string(), vec![n.to_string()]);
        }
        Reviewed {
            username: user.into(),
            audiences: vec![aud.into()],
            extra,
        }
    }

    const SA: &str = "system:serviceaccount:moat-system:moat-enforcer";

    #[test]
    fn every_refusal() {
        let p = policy();
        let live = |_: &str, _: &str| Some(("u1".to_string(), "n1".to_string()));
        let ok = reviewed(SA, "moat", Some(("e-1", "u1")), Some("n1"));
        assert_eq!(check(&p, &ok, "n1", live), Ok(()));
        // Without the node claim (clusters before 1.30) the pod lookup decides.
        let no_node = reviewed(SA, "moat", Some(("e-1", "u1")), None);
        assert_eq!(check(&p, &no_node, "n1", live), Ok(()));
        assert!(matches!(
            check(&p, &no_node, "n2", live),
            Err(Refusal::WrongNode { .. })
        ));
        assert!(matches!(
            check(&p, &ok, "n2", live),
            Err(Refusal::WrongNode { .. })
        ));
        let aud = reviewed(SA, "api", Some(("e-1", "u1")), Some("n1"));
        assert_eq!(
            check(&p, &aud, "n1", live),
            Err(Refusal::Audience("moat".into()))
        );
        let tenant = reviewed(
            "system:serviceaccount:shop:default",
            "moat",
            Some(("e-1", "u1")),
            Some("n1"),
        );
        assert!(matches!(
            check(&p, &tenant, "n1", live),
            Err(Refusal::Account(_))
        ));
        let same_name_other_ns = reviewed(
            "system:serviceaccount:default:moat-enforcer",
            "moat",
            Some(("e-1", "u1")),
            Some("n1"),
        );
        assert!(matches!(
            check(&p, &same_name_other_ns, "n1", live),
            Err(Refusal::Account(_))
        ));
        let legacy = reviewed(SA, "moat", None, None);
        assert_eq!(check(&p, &legacy, "n1", live), Err(Refusal::Unbound));
        assert!(matches!(
            check(&p, &ok, "n1", |_, _| None),
            Err(Refusal::PodGone(_))
        ));
        assert!(matches!(
            check(&p, &ok, "n1", |_, _| Some(("u2".into(), "n1".into()))),
            Err(Refusal::PodUid(_))
        ));
    }

    #[test]
    fn issues_for_the_identity_only_whatever_the_csr_asks() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut cp = CertificateParams::default();
        cp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = cp.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("ca-key.pem"), ca_key.serialize_pem()).unwrap();
        let ca = Ca::load(&dir.path().join("ca.pem"), &dir.path().join("ca-key.pem")).unwrap();
        // A CSR asking for an admin identity and CA powers.
        let key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::default();
        req.subject_alt_names = vec![SanType::URI(
            Identity::Admin {
                name: "root".into(),
            }
            .uri()
            .try_into()
            .unwrap(),
        )];
        let csr = req.serialize_request(&key).unwrap().pem().unwrap();
        let id = Identity::node("prod", "n1");
        let (pem, not_after) = ca.issue(&id, &csr, Duration::from_secs(600)).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (got, expires) = crate::tls::identity_of(&der).unwrap();
        assert_eq!(got, id);
        assert_eq!(expires, not_after);
        let left = not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left <= Duration::from_secs(600) && left > Duration::from_secs(590));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
    }
}
