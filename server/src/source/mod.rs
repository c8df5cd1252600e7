//! Where cluster state comes from: a directory of manifests, or a Kubernetes API server.

pub mod acceptance;
pub mod cnp;
pub mod cnp_status;
pub mod file;
pub mod kube;
mod merge;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use moat_proto::identity::valid_name as valid_cluster_name;
use prometheus_client::metrics::gauge::Gauge;

use moat_policy::Event;
use moat_policy::model::Object;

/// What a source tells the index.
#[derive(Debug)]
pub enum SourceEvent {
    /// The complete state (the first full sync, or a relist): applied as one atomic reset.
    Reset(Vec<Object>),
    /// Changes since the last event.
    Batch(Vec<Event>),
}

/// `--source` values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// A directory of Kubernetes manifests, watched for changes.
    Dir(PathBuf),
    /// A Kubernetes API server.
    Kube(kube::Target),
}

impl std::fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceSpec::Dir(p) => write!(f, "dir:{}", p.display()),
            SourceSpec::Kube(t) => t.fmt(f),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(
        "unknown source {0:?}: expected dir:PATH, kube (in-cluster) or kube:KUBECONFIG[:CONTEXT]"
    )]
    Unknown(String),
    #[error("empty path in source {0:?}")]
    EmptyPath(String),
    #[error("bad cluster {0:?}: expected NAME or NAME=KUBECONFIG[:CONTEXT] or NAME=in-cluster")]
    Cluster(String),
    #[error("bad cluster name {0:?}: use lowercase letters, digits, '-' and '.'")]
    ClusterName(String),
}

/// `KUBECONFIG[:CONTEXT]`: the path ends at the first ':'; a context may contain more
/// (EKS context names do).
fn kube_target(s: &str) -> Option<kube::Target> {
    let (path, context) = match s.split_once(':') {
        Some((p, c)) => (p, Some(c.to_string()).filter(|c| !c.is_empty())),
        None => (s, None),
    };
    (!path.is_empty()).then(|| kube::Target {
        kubeconfig: Some(PathBuf::from(path)),
        context,
    })
}

impl FromStr for SourceSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "kube" {
            return Ok(SourceSpec::Kube(kube::Target {
                kubeconfig: None,
                context: None,
            }));
        }
        match s.split_once(':') {
            Some(("dir", "")) | Some(("kube", "")) => Err(SpecError::EmptyPath(s.to_string())),
            Some(("dir", path)) => Ok(SourceSpec::Dir(PathBuf::from(path))),
            Some(("kube", rest)) => kube_target(rest)
                .map(SourceSpec::Kube)
                .ok_or_else(|| SpecError::EmptyPath(s.to_string())),
            _ => Err(SpecError::Unknown(s.to_string())),
        }
    }
}

/// `--cluster` values: `NAME` (the name of the one `--source`), or
/// `NAME=KUBECONFIG[:CONTEXT]` / `NAME=in-cluster` (one of several clusters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    pub name: String,
    pub source: Option<SourceSpec>,
}

impl FromStr for ClusterSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, source) = match s.split_once('=') {
            None => (s, None),
            Some((n, "in-cluster")) => (
                n,
                Some(SourceSpec::Kube(kube::Target {
                    kubeconfig: None,
                    context: None,
                })),
            ),
            Some((n, rest)) => (
                n,
                Some(SourceSpec::Kube(
                    kube_target(rest).ok_or_else(|| SpecError::Cluster(s.to_string()))?,
                )),
            ),
        };
        if !valid_cluster_name(name) {
            return Err(SpecError::ClusterName(name.to_string()));
        }
        Ok(ClusterSpec {
            name: name.to_string(),
            source,
        })
    }
}

/// A `--clusters-file`: the same as repeated `--cluster NAME=...` flags.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClustersFile {
    pub clusters: Vec<ClusterEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterEntry {
    pub name: String,
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub context: Option<String>,
    /// Use the server's own ServiceAccount (the cluster it runs in).
    #[serde(default)]
    pub in_cluster: bool,
}

impl ClustersFile {
    pub fn specs(self) -> Result<Vec<ClusterSpec>, String> {
        self.clusters
            .into_iter()
            .map(|c| {
                if !valid_cluster_name(&c.name) {
                    return Err(format!("bad cluster name {:?}", c.name));
                }
                if c.in_cluster == c.kubeconfig.is_some() {
                    return Err(format!(
                        "cluster {:?}: set exactly one of kubeconfig and inCluster",
                        c.name
                    ));
                }
                Ok(ClusterSpec {
                    name: c.name,
                    source: Some(SourceSpec::Kube(kube::Target {
                        kubeconfig: c.kubeconfig,
                        context: c.context,
                    })),
                })
            })
            .collect()
    }
}

/// Whether a source currently reaches its input. A stale source keeps serving its last
/// state; operators see it in `moatctl status` and in `moat_server_source_up`.
pub struct Health {
    state: Mutex<HealthState>,
    up: Gauge,
    /// Whether the source is stale, for whoever must act on it at once (HA replicas).
    stale: tokio::sync::watch::Sender<bool>,
    /// The verdict on each policy the source delivered (`moatctl status --policy`).
    acceptance: Arc<acceptance::Acceptance>,
}

#[derive(Clone, Debug, Default)]
pub struct HealthState {
    pub stale: bool,
    /// When the source went stale (or came back).
    pub since: Option<SystemTime>,
    pub last_error: String,
    /// The last change the source delivered.
    pub last_event: Option<SystemTime>,
}

impl Health {
    pub fn new(up: Gauge) -> Health {
        up.set(1);
        Health {
            state: Mutex::new(HealthState::default()),
            up,
            stale: tokio::sync::watch::channel(false).0,
            acceptance: Arc::default(),
        }
    }

    pub fn acceptance(&self) -> Arc<acceptance::Acceptance> {
        self.acceptance.clone()
    }

    pub fn stale_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stale.subscribe()
    }

    pub fn set_failing(&self, failing: bool, error: Option<String>) {
        let mut s = self.state.lock().expect("health lock");
        if s.stale != failing {
            s.stale = failing;
            s.since = Some(SystemTime::now());
            self.up.set(i64::from(!failing));
            self.stale.send_replace(failing);
            if failing {
                tracing::warn!("source is stale: serving its last state");
            } else {
                tracing::info!("source reaches its input again");
            }
        }
        if let Some(e) = error {
            s.last_error = e;
        }
    }

    pub fn event(&self) {
        self.state.lock().expect("health lock").last_event = Some(SystemTime::now());
    }

    pub fn get(&self) -> HealthState {
        self.state.lock().expect("health lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            "dir:examples".parse::<SourceSpec>().unwrap(),
            SourceSpec::Dir("examples".into())
        );
        assert!("dir:".parse::<SourceSpec>().is_err());
        assert_eq!(
            "kube:/k/prod.yaml:arn:aws:eks:x"
                .parse::<SourceSpec>()
                .unwrap(),
            SourceSpec::Kube(kube::Target {
                kubeconfig: Some("/k/prod.yaml".into()),
                context: Some("arn:aws:eks:x".into())
            })
        );
        assert_eq!(
            "prod=/k/p.yaml".parse::<ClusterSpec>().unwrap().source,
            Some(SourceSpec::Kube(kube::Target {
                kubeconfig: Some("/k/p.yaml".into()),
                context: None
            }))
        );
        assert_eq!("prod".parse::<ClusterSpec>().unwrap().source, None);
        assert!("bad_name=/x".parse::<ClusterSpec>().is_err());
        assert!("a/b=/x".parse::<ClusterSpec>().is_err());
        assert!("prod=".parse::<ClusterSpec>().is_err());
        assert!("kube:".parse::<SourceSpec>().is_err());
        assert!("examples".parse::<SourceSpec>().is_err());
    }
}
