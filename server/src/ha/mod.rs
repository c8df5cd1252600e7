//! Active-active replicas. Every replica runs its own sources, index and streams and serves
//! any enforcer; what they must agree on goes through the Kubernetes API of one cluster
//! (`--ha-cluster`), never through a consensus of their own:
//!
//! - [`epoch`]: each replica start takes a fleet-unique epoch, so no version number ever
//!   names two contents anywhere in the fleet (digests, being content hashes, already agree);
//! - the heartbeat (here): the replica renews its own ConfigMap every [`HEARTBEAT`]; one
//!   that cannot for `--ha-stale-after` (partitioned from the API server) is stale: it ends
//!   its streams and refuses new ones, so enforcers move to a replica that sees the cluster;
//! - [`peers`]: each replica publishes the statuses of the streams it holds and follows
//!   the others', so `moatctl status` on any replica shows the whole fleet;
//! - draining: on SIGTERM a replica tells its enforcers to move a share at a time over
//!   `--ha-drain`, so a rolling upgrade is not a reconnect storm.

pub mod epoch;
pub mod peers;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Kubernetes API: {0}")]
    Api(#[source] kube::Error),
    #[error(
        "ConfigMap {what} is damaged ({why}); fix or delete it (a new one starts above every epoch handed out, see proto/README.md)"
    )]
    Damaged { what: String, why: String },
    #[error("ConfigMap {EPOCHS} stayed contended for 100 attempts", EPOCHS = epoch::EPOCHS)]
    Contended,
    #[error("--replica {0:?} is not a DNS label (it names the replica's ConfigMap)")]
    BadName(String),
}

#[derive(clap::Args, Debug, Clone)]
pub struct HaArgs {
    /// Run as one of several active replicas, coordinating through this cluster's API
    /// server (one of the `--cluster`s; with `--source kube…`, its name). Versions then come
    /// from an epoch only this replica holds, and a replica that loses the API server stops
    /// serving so its enforcers move.
    #[arg(long, env = "MOAT_HA_CLUSTER")]
    pub ha_cluster: Option<String>,
    /// The namespace of the replicas' ConfigMaps (the server's own).
    #[arg(long, env = "MOAT_HA_NAMESPACE", default_value = "moat-system")]
    pub ha_namespace: String,
    /// This replica's name (in Kubernetes: the pod name). Default: the host name.
    #[arg(long, env = "MOAT_REPLICA")]
    pub replica: Option<String>,
    /// A replica whose heartbeat has not reached the API server for this long is stale.
    #[arg(long, env = "MOAT_HA_STALE_AFTER", default_value = "6s", value_parser = parse_secs)]
    pub ha_stale_after: Duration,
    /// On SIGTERM, the time over which the replica's streams are ended, a share at a time.
    #[arg(long, env = "MOAT_HA_DRAIN", default_value = "5s", value_parser = parse_secs)]
    pub ha_drain: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    moat_proto::pki::parse_lifetime(s).map_err(|e| e.to_string())
}

/// How often a replica renews its ConfigMap.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// Labels of every object the replicas write.
pub fn labels(role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "moat".into()),
        ("app.kubernetes.io/component".into(), "server".into()),
        ("moat.io/role".into(), role.into()),
    ])
}

/// Whether this replica may serve a cluster's nodes as current.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    Current,
    /// Its view may be old: streams end and new ones are refused.
    Stale(String),
    /// Shutting down: each stream ends at its own point of `[started, started + over)`.
    Draining {
        started: Instant,
        over: Duration,
    },
}

impl Standing {
    /// The status a stream ends with, or is refused with, in this standing.
    pub fn refusal(&self, replica: &str) -> Option<tonic::Status> {
        match self {
            Standing::Current => None,
            Standing::Stale(why) => Some(tonic::Status::unavailable(format!(
                "replica {replica} is stale ({why}): reconnect to another replica"
            ))),
            Standing::Draining { .. } => Some(tonic::Status::unavailable(format!(
                "replica {replica} is draining: reconnect to another replica"
            ))),
        }
    }
}

/// This replica: its name, its epoch, and its standing per cluster.
pub struct Replica {
    pub name: String,
    pub epoch: u64,
    stale_after: Duration,
    heartbeat_ok: watch::Sender<bool>,
    draining: watch::Sender<Option<(Instant, Duration)>>,
}

/// The replica's name: `--replica`, else the host name; a DNS label either way.
pub fn replica_name(args: &HaArgs) -> Result<String, Error> {
    let name = args.replica.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    });
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(name)
    } else {
        Err(Error::BadName(name))
    }
}

impl Replica {
    /// Takes an epoch (see [`epoch`]) and starts the heartbeat.
    pub async fn start(
        api: Api<ConfigMap>,
        name: String,
        own_last_epoch: u64,
        stale_after: Duration,
    ) -> Result<Arc<Replica>, Error> {
        let epoch = epoch::acquire(&api, &name, own_last_epoch).await?;
        let r = Arc::new(Replica {
            name,
            epoch,
            stale_after,
            heartbeat_ok: watch::channel(false).0,
            draining: watch::channel(None).0,
        });
        // The first beat before anything is served: a replica that cannot write now is
        // stale from the start, until a beat lands.
        match r.beat(&api).await {
            Ok(()) => {
                r.heartbeat_ok.send_replace(true);
            }
            Err(e) => warn!(error = %e, "first heartbeat failed: stale until one lands"),
        }
        tokio::spawn(r.clone().heartbeat(api, stale_after));
        Ok(r)
    }

    fn object_name(&self) -> String {
        format!("moat-replica-{}", self.name)
    }

    async fn beat(&self, api: &Api<ConfigMap>) -> Result<(), kube::Error> {
        let name = self.object_name();
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                labels: Some(labels("replica")),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                ("replica".into(), self.name.clone()),
                ("epoch".into(), self.epoch.to_string()),
                (
                    "heartbeat".into(),
                    moat_proto::unix_micros(SystemTime::now()).to_string(),
                ),
            ])),
            ..Default::default()
        };
        let call = async {
            // The replica is its ConfigMap's one writer: an unconditional replace.
            match api.replace(&name, &PostParams::default(), &cm).await {
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    api.create(&PostParams::default(), &cm).await.map(|_| ())
                }
                r => r.map(|_| ()),
            }
        };
        match tokio::time::timeout(HEARTBEAT, call).await {
            Ok(r) => r,
            Err(_) => Err(kube::Error::Service("heartbeat timed out".into())),
        }
    }

    async fn heartbeat(self: Arc<Self>, api: Api<ConfigMap>, stale_after: Duration) {
        let mut last_ok = Instant::now();
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.beat(&api).await {
                Ok(()) => {
                    last_ok = Instant::now();
                    if self
                        .heartbeat_ok
                        .send_if_modified(|ok| !std::mem::replace(ok, true))
                    {
                        info!("the API server takes this replica's heartbeat again: serving");
                    }
                }
                Err(e) => {
                    if last_ok.elapsed() >= stale_after
                        && self
                            .heartbeat_ok
                            .send_if_modified(|ok| std::mem::replace(ok, false))
                    {
                        warn!(error = %e, since = ?last_ok.elapsed(), "no heartbeat reached the API server: this replica is stale and moves its enforcers away");
                    }
                }
            }
        }
    }

    /// Starts draining (SIGTERM).
    pub fn drain(&self, over: Duration) {
        self.draining.send_replace(Some((Instant::now(), over)));
    }

    /// Whether the replica may be ready at all: its heartbeat lands and it is not draining.
    /// (A cluster whose source is stale is refused per stream, not by readiness: one
    /// unreachable remote cluster must not take every replica out of its Service.)
    pub fn serving(&self) -> bool {
        *self.heartbeat_ok.borrow() && self.draining.borrow().is_none()
    }

    /// The standing of a cluster whose source reports staleness on `source_stale`. A source
    /// counts as stale once it has been for `--ha-stale-after`: one failed watch (an API
    /// server restarting) moves nobody.
    pub fn standing(&self, mut source_stale: watch::Receiver<bool>) -> watch::Receiver<Standing> {
        let mut beat = self.heartbeat_ok.subscribe();
        let mut draining = self.draining.subscribe();
        let grace = self.stale_after;
        let compute = move |beat: bool,
                            stale_since: Option<Instant>,
                            draining: Option<(Instant, Duration)>| {
            if let Some((started, over)) = draining {
                Standing::Draining { started, over }
            } else if !beat {
                Standing::Stale("its heartbeat does not reach the API server".into())
            } else if stale_since.is_some_and(|s| s.elapsed() >= grace) {
                Standing::Stale("its source cannot reach the cluster".into())
            } else {
                Standing::Current
            }
        };
        let mut stale_since = source_stale.borrow_and_update().then(Instant::now);
        let (tx, rx) = watch::channel(compute(
            *beat.borrow_and_update(),
            stale_since,
            *draining.borrow_and_update(),
        ));
        tokio::spawn(async move {
            loop {
                let grace_over = async {
                    match stale_since {
                        Some(s) => tokio::time::sleep_until(s + grace).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = beat.changed() => if r.is_err() { return },
                    r = source_stale.changed() => {
                        if r.is_err() { return }
                        let stale = *source_stale.borrow_and_update();
                        stale_since = match (stale, stale_since) {
                            (true, Some(s)) => Some(s),
                            (true, None) => Some(Instant::now()),
                            (false, _) => None,
                        };
                    }
                    r = draining.changed() => if r.is_err() { return },
                    _ = grace_over => {}
                    _ = tx.closed() => return,
                }
                let s = compute(
                    *beat.borrow_and_update(),
                    stale_since,
                    *draining.borrow_and_update(),
                );
                tx.send_if_modified(|cur| {
                    let changed = *cur != s;
                    *cur = s;
                    changed
                });
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_names_are_dns_labels() {
        let args = |r: &str| HaArgs {
            ha_cluster: None,
            ha_namespace: "m".into(),
            replica: Some(r.into()),
            ha_stale_after: HEARTBEAT,
            ha_drain: HEARTBEAT,
        };
        assert_eq!(
            replica_name(&args("moat-server-0")).unwrap(),
            "moat-server-0"
        );
        for bad in ["", "Moat", "a.b", "-a", "a_b", &"a".repeat(64)] {
            assert!(replica_name(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
