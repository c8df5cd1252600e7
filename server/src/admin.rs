//! The admin surface: fleet status, per-policy enforcement, live explain. Admin certificates
//! only; a node certificate is refused and the attempt logged.

use std::sync::Arc;

use moat_policy::eval::{self, Flow};
use moat_policy::model::{ObjectKey, lookup, render};
use moat_proto::{Identity, v1};
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::hub::{ClusterState, Hub};
use crate::source::acceptance::{Acceptance, Verdict};
use crate::sync::{PeerAuth, peer_addr, peer_identity};
use crate::tls::Anchor;

pub struct AdminService {
    hub: Arc<Hub>,
    auth: PeerAuth,
}

impl AdminService {
    pub fn new(hub: Arc<Hub>, auth: PeerAuth) -> Self {
        Self { hub, auth }
    }

    pub fn svc(self) -> v1::admin_server::AdminServer<Self> {
        v1::admin_server::AdminServer::new(self).max_decoding_message_size(64 * 1024)
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let peer = peer_identity(req, &self.auth)?;
        if peer.anchor != Anchor::Main {
            // Whatever it names: the node CA (whose key bootstrap holds) never vouches for
            // an operator.
            self.hub.metrics.refused("node-ca-on-admin");
            warn!(peer = ?peer_addr(req), identity = %peer.id, "refused an admin call from a certificate of the node CA");
            return Err(Status::permission_denied(
                "the admin API needs an admin certificate from the main CA; the node CA's are refused",
            ));
        }
        match peer.id {
            Identity::Admin { .. } => Ok(()),
            other => {
                self.hub.metrics.refused("not-an-admin");
                warn!(peer = ?peer_addr(req), identity = %other, "refused an admin call from a non-admin certificate");
                Err(Status::permission_denied(
                    "the admin API needs an admin certificate",
                ))
            }
        }
    }

    fn cluster(&self, name: &str) -> Result<&Arc<ClusterState>, Status> {
        if name.is_empty() {
            let mut all = self.hub.clusters();
            return match (all.next(), all.next()) {
                (Some(c), None) => Ok(c),
                _ => Err(Status::invalid_argument(
                    "several clusters are served: name one",
                )),
            };
        }
        self.hub
            .cluster(name)
            .ok_or_else(|| Status::not_found(format!("cluster {name:?} is not served here")))
    }
}

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminService {
    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.authorize(&req)?;
        // Every node the source published is in the view, connected or not.
        let mut nodes = self.hub.fleet.view(None);
        nodes.sort_by(|a, b| (&a.cluster, &a.node).cmp(&(&b.cluster, &b.node)));
        crate::degraded::annotate(&self.hub, &mut nodes);
        let clusters: Vec<v1::ClusterStatus> = self
            .hub
            .clusters()
            .map(|c| {
                let h = c.health.get();
                v1::ClusterStatus {
                    name: c.name.to_string(),
                    source: c.source.clone(),
                    synced: c.is_synced(),
                    stale: h.stale,
                    stale_since_unix_micros: if h.stale { micros(h.since) } else { 0 },
                    last_error: h.last_error,
                    generation: c.read(|i| i.generation()),
                    last_event_unix_micros: micros(h.last_event),
                    warnings: {
                        let mut w: Vec<String> =
                            c.read(|i| i.priority_ties().iter().map(ToString::to_string).collect());
                        w.extend(refused_warning(&c.health.acceptance()));
                        w
                    },
                }
            })
            .collect();
        // The fleet-wide figures from the same reading as the per-cluster ones.
        let generation = clusters.iter().map(|c| c.generation).max().unwrap_or(0);
        let synced = clusters.iter().all(|c| c.synced);
        Ok(Response::new(v1::StatusResponse {
            nodes,
            generation,
            synced,
            clusters,
        }))
    }

    async fn policy_status(
        &self,
        req: Request<v1::PolicyStatusRequest>,
    ) -> Result<Response<v1::PolicyStatusResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let cluster = self.cluster(&r.cluster)?;
        let key = if r.namespace.is_empty() {
            ObjectKey::ClusterPolicy(r.name.clone())
        } else {
            ObjectKey::Policy {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            }
        };
        let verdict = cluster.health.acceptance().get(&key);
        let span = cluster.read(|i| i.policy_span(&r.namespace, &r.name));
        // A policy refused since its first version is in the source, just not enforced:
        // NOT_FOUND would send the operator looking for a typo in its name.
        if span.is_none() && verdict.as_ref().is_none_or(Verdict::accepted) {
            return Err(Status::not_found(if r.namespace.is_empty() {
                format!("no ClusterNetworkPolicy {}", r.name)
            } else {
                format!("no NetworkPolicy {}/{}", r.namespace, r.name)
            }));
        }
        let mut resp = v1::PolicyStatusResponse {
            cluster: cluster.name.to_string(),
            namespace: r.namespace,
            name: r.name,
            generation: span.as_ref().map_or(0, |s| s.generation),
            nodes: span
                .map(|s| self.hub.fleet.policy(&cluster.name, &s))
                .unwrap_or_default(),
            acceptance: verdict.map(acceptance),
            ..Default::default()
        };
        crate::degraded::annotate_policy(&self.hub, cluster, &mut resp);
        Ok(Response::new(resp))
    }

    async fn explain(
        &self,
        req: Request<v1::ExplainRequest>,
    ) -> Result<Response<v1::ExplainResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let cluster = self.cluster(&r.cluster)?;
        let objects = cluster.read(|i| i.objects());
        let src = lookup::addresses(&objects, &r.from).map_err(Status::not_found)?;
        let dst = lookup::addresses(&objects, &r.to).map_err(Status::not_found)?;
        let v6 = match r.family.as_str() {
            "" => None,
            "ipv4" => Some(false),
            "ipv6" => Some(true),
            f => return Err(Status::invalid_argument(format!("family {f:?}"))),
        };
        let (src, dst) = lookup::pick(&src, &dst, v6).ok_or_else(|| {
            Status::invalid_argument("the two ends have no address of a common family")
        })?;
        let proto = u8::try_from(r.protocol).map_err(|_| Status::invalid_argument("protocol"))?;
        let port = u16::try_from(r.port).map_err(|_| Status::invalid_argument("port"))?;
        let c = eval::Cluster::from_objects(objects.iter().map(render::to_k8s));
        let verdict = eval::verdict(
            &c,
            &Flow {
                src,
                dst,
                proto,
                port,
            },
        );
        Ok(Response::new(v1::ExplainResponse {
            allowed: verdict.allowed,
            from_ip: src.to_string(),
            to_ip: dst.to_string(),
            verdict_json: serde_json::to_string(&verdict)
                .map_err(|e| Status::internal(e.to_string()))?,
        }))
    }
}

fn acceptance(v: Verdict) -> v1::PolicyAcceptance {
    match v {
        Verdict::Accepted { warnings } => v1::PolicyAcceptance {
            accepted: true,
            warnings,
            ..Default::default()
        },
        Verdict::Refused {
            why,
            message,
            last_valid_in_force,
        } => v1::PolicyAcceptance {
            accepted: false,
            reason: why.reason().into(),
            message,
            last_valid_in_force,
            warnings: Vec::new(),
        },
    }
}

/// Refused policies change nothing enforced, so the overview is the only place an operator
/// who did not ask about one by name learns of it.
fn refused_warning(a: &Acceptance) -> Option<String> {
    const SHOWN: usize = 5;
    let refused = a.refused();
    if refused.is_empty() {
        return None;
    }
    let mut names: Vec<String> = refused
        .iter()
        .take(SHOWN)
        .map(|(k, _)| k.to_string())
        .collect();
    if refused.len() > SHOWN {
        names.push(format!("and {} more", refused.len() - SHOWN));
    }
    Some(format!(
        "{} refused polic{} (`moatctl status --policy NAME` says why): {}",
        refused.len(),
        if refused.len() == 1 { "y" } else { "ies" },
        names.join(", ")
    ))
}

fn micros(t: Option<std::time::SystemTime>) -> u64 {
    t.map_or(0, moat_proto::unix_micros)
}
