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

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use moat_proto::v1;
use prost::Message;
use tracing::{debug, warn};

use super::{HEARTBEAT, labels};
use crate::status::Fleet;

/// Publishes the nodes this replica holds streams of.
pub async fn publish(api: Api<ConfigMap>, replica: String, fleet: Arc<Fleet>) {
    let name = format!("moat-status-{replica}");
    let mut written: Option<Vec<u8>> = None;
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
            Ok(()) => written = Some(bytes),
            Err(e) => debug!(error = %e, "cannot publish this replica's streams; next beat"),
        }
    }
}

/// Follows the peers' heartbeats and status objects into `fleet`.
pub async fn follow(api: Api<ConfigMap>, fleet: Arc<Fleet>) {
    let cfg = watcher::Config::default().labels("app.kubernetes.io/component=server");
    let mut events = std::pin::pin!(watcher::watcher(api, cfg).default_backoff());
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => take(&fleet, &cm),
            Ok(watcher::Event::Delete(cm)) => {
                if role(&cm) == Some("status")
                    && let Some(r) = replica_of(&cm)
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

fn take(fleet: &Fleet, cm: &ConfigMap) {
    let Some(replica) = replica_of(cm) else {
        return;
    };
    match role(cm) {
        Some("replica") => fleet.peer_beat(replica),
        Some("status") => {
            let raw = cm
                .binary_data
                .as_ref()
                .and_then(|b| b.get("nodes"))
                .map(|b| b.0.as_slice())
                .unwrap_or_default();
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
