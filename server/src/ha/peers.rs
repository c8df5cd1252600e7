//! One fleet view from any replica. Each replica publishes the statuses of the nodes whose
//! streams it holds as one ConfigMap (`moat-status-<replica>`, written only when it changed,
//! at most every [`HEARTBEAT`]), and follows its peers' heartbeats and status objects with a
//! watch. A peer's word counts while its heartbeat is fresh here (this replica's clock), so
//! a killed replica's nodes stop showing as connected there within `--ha-stale-after`.
//!
//! Size: about 150 bytes per node in protobuf; a ConfigMap holds 1 MiB, so one replica can
//! publish some 6,000 streams.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use moat_proto::v1;
use prost::Message;
use tracing::{debug, info, warn};

/// How far apart two replicas' clocks may be for a heartbeat's own time to count.
const CLOCK_SKEW: Duration = Duration::from_secs(10);

use super::{HEARTBEAT, labels};
use crate::status::Fleet;

/// Publishes the nodes this replica holds streams of.
pub async fn publish(api: Api<ConfigMap>, replica: String, fleet: Arc<Fleet>) {
    let name = format!("moat-status-{replica}");
    let mut written: Option<Vec<u8>> = None;
    let mut failing = false;
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut nodes = fleet.held();
        nodes.sort_by(|a, b| (&a.cluster, &a.node).cmp(&(&b.cluster, &b.node)));
        let bytes = v1::StatusResponse {
            nodes,
            ..Default::default()
        }
        .encode_to_vec();
        if written.as_ref() == Some(&bytes) {
            continue;
        }
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                labels: Some(labels("status")),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("replica".into(), replica.clone())])),
            binary_data: Some(BTreeMap::from([(
                "nodes".into(),
                ByteString(bytes.clone()),
            )])),
            ..Default::default()
        };
        let r = match api.replace(&name, &PostParams::default(), &cm).await {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                api.create(&PostParams::default(), &cm).await.map(|_| ())
            }
            r => r.map(|_| ()),
        };
        match r {
            Ok(()) => {
                if failing {
                    info!("this replica's streams are published again");
                }
                failing = false;
                written = Some(bytes);
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, bytes = bytes.len(), "cannot publish this replica's streams: the other replicas show them as they last were (until this replica's heartbeat stops); retrying every beat");
                }
                failing = true;
            }
        }
    }
}

/// Follows the peers' heartbeats and status objects into `fleet`.
pub async fn follow(api: Api<ConfigMap>, fleet: Arc<Fleet>, stale_after: Duration) {
    let cfg = watcher::Config::default().labels("app.kubernetes.io/component=server");
    let mut events = std::pin::pin!(watcher::watcher(api, cfg).default_backoff());
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                take(&fleet, &cm, stale_after)
            }
            Ok(watcher::Event::Delete(cm)) => {
                if role(&cm) == Some("status")
                    && let Some(r) = replica_of(&cm)
                    && cm.metadata.name.as_deref() == Some(&format!("moat-status-{r}"))
                {
                    fleet.peer_gone(r);
                }
            }
            Ok(_) => {}
            Err(e) => debug!(error = %e, "watching the peers failed; retrying"),
        }
    }
}

fn role(cm: &ConfigMap) -> Option<&str> {
    cm.metadata
        .labels
        .as_ref()?
        .get("moat.io/role")
        .map(String::as_str)
}

fn replica_of(cm: &ConfigMap) -> Option<&str> {
    cm.data.as_ref()?.get("replica").map(String::as_str)
}

/// Larger status objects are not decoded (a ConfigMap holds 1 MiB).
const MAX_STATUS_BYTES: usize = 1 << 20;

fn take(fleet: &Fleet, cm: &ConfigMap, stale_after: Duration) {
    let Some(replica) = replica_of(cm) else {
        return;
    };
    // An object speaks only for the replica its name says.
    let named = |prefix: &str| cm.metadata.name.as_deref() == Some(&format!("{prefix}{replica}"));
    match role(cm) {
        Some("replica") if named("moat-replica-") => {
            // A beat counts only if it is recent by its own clock (within a skew bound):
            // a dead replica's last object, listed again after a restart, is no beat.
            let at = cm
                .data
                .as_ref()
                .and_then(|d| d.get("heartbeat"))
                .and_then(|h| h.parse::<u64>().ok())
                .map(moat_proto::from_unix_micros);
            let age = at.map(|at| {
                SystemTime::now()
                    .duration_since(at)
                    .unwrap_or_else(|e| e.duration())
            });
            if age.is_some_and(|a| a < stale_after + CLOCK_SKEW) {
                fleet.peer_beat(replica);
            }
        }
        Some("status") if named("moat-status-") => {
            let raw = cm
                .binary_data
                .as_ref()
                .and_then(|b| b.get("nodes"))
                .map(|b| b.0.as_slice())
                .unwrap_or_default();
            if raw.len() > MAX_STATUS_BYTES {
                warn!(%replica, bytes = raw.len(), "a peer's status object is too large; ignored");
                return;
            }
            match v1::StatusResponse::decode(raw) {
                Ok(s) => fleet.peer_nodes(replica, s.nodes),
                Err(e) => {
                    warn!(%replica, error = %e, "a peer's status object does not decode; ignored")
                }
            }
        }
        _ => {}
    }
}
