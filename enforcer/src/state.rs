//! The node's own record of what it enforces (sled), so a restarted enforcer — or one cut
//! off from the server — keeps enforcing the last known rules and resumes by delta.

use std::path::Path;

use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::VersionRef;
use moat_proto::convert::{self, FromProto, ToProto};
use moat_proto::v1;
use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("local state: {0}")]
    Sled(#[from] sled::Error),
    #[error("local state is corrupt: {0}")]
    Corrupt(String),
}

#[derive(Clone, PartialEq, Message)]
struct Stored {
    #[prost(string, tag = "1")]
    node: String,
    #[prost(message, optional, tag = "2")]
    version: Option<v1::Version>,
    #[prost(message, optional, tag = "3")]
    content: Option<v1::NodeContent>,
}

pub struct LocalState {
    db: sled::Db,
}

impl LocalState {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        Ok(Self {
            db: sled::Config::new().path(dir).open()?,
        })
    }

    /// The last applied snapshot, verified against its digest.
    pub fn load(&self) -> Result<Option<NodeSnapshot>, Error> {
        let Some(raw) = self.db.get("applied")? else {
            return Ok(None);
        };
        let s = Stored::decode(raw.as_ref()).map_err(|e| Error::Corrupt(e.to_string()))?;
        let v = VersionRef::from_proto(
            s.version
                .as_ref()
                .ok_or_else(|| Error::Corrupt("no version".into()))?,
        )
        .map_err(|e| Error::Corrupt(e.to_string()))?;
        let content = s
            .content
            .ok_or_else(|| Error::Corrupt("no content".into()))?;
        let snap = convert::snapshot_from_proto(&s.node, &v, &content)
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        if snap.content_digest() != v.digest {
            return Err(Error::Corrupt(
                "stored snapshot does not match its digest".into(),
            ));
        }
        Ok(Some(snap))
    }

    /// Records `snap` as applied, durably (before it is acknowledged).
    pub fn save(&self, snap: &NodeSnapshot) -> Result<(), Error> {
        let s = Stored {
            node: snap.node.clone(),
            version: Some(
                VersionRef {
                    version: snap.version,
                    digest: snap.digest,
                }
                .to_proto(),
            ),
            content: Some(snap.to_proto()),
        };
        self.db.insert("applied", s.encode_to_vec())?;
        self.db.flush()?;
        Ok(())
    }
}

// ---- Pod bindings (the agent's: see `crate::pods`) ----

/// Bindings as stored: with the boot they were observed in, because interface indices
/// restart with the kernel.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredBindings {
    boot: String,
    bindings: moat_dataplane::local::Bindings,
}

/// This kernel's boot ID (empty if unreadable, which never matches a stored one).
fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

impl LocalState {
    /// The pod bindings last saved. Bound in an earlier boot, an address's interface is one
    /// that no longer exists (index 0): the pod is the same only if its sandbox generation
    /// says it was recreated, so nothing that reuses an address after a reboot inherits.
    pub fn load_bindings(&self) -> Result<moat_dataplane::local::Bindings, Error> {
        let Some(raw) = self.db.get("bindings")? else {
            return Ok(Default::default());
        };
        let s: StoredBindings = serde_json::from_slice(&raw)
            .map_err(|e| Error::Corrupt(format!("pod bindings: {e}")))?;
        let mut b = s.bindings;
        if s.boot.is_empty() || s.boot != boot_id() {
            for x in b.by_addr.values_mut() {
                x.iface = 0;
            }
        }
        Ok(b)
    }

    /// Writes the pod bindings without flushing: the next [`LocalState::save`] makes them
    /// durable together with its snapshot.
    pub fn stage_bindings(&self, b: &moat_dataplane::local::Bindings) -> Result<(), Error> {
        let s = StoredBindings {
            boot: boot_id().to_string(),
            bindings: b.clone(),
        };
        let raw = serde_json::to_vec(&s).map_err(|e| Error::Corrupt(e.to_string()))?;
        self.db.insert("bindings", raw)?;
        Ok(())
    }

    /// Writes the pod bindings durably.
    pub fn save_bindings(&self, b: &moat_dataplane::local::Bindings) -> Result<(), Error> {
        self.stage_bindings(b)?;
        self.db.flush()?;
        Ok(())
    }
}

// ---- Degradations of the enforced version (reported until a version fits) ----

#[derive(Clone, PartialEq, Message)]
struct StoredDegraded {
    #[prost(message, repeated, tag = "1")]
    degraded: Vec<v1::Degradation>,
}

impl LocalState {
    /// What the last applied version could not hold, so a restarted enforcer still reports
    /// it.
    pub fn load_degraded(&self) -> Result<Vec<moat_dataplane::plan::Degraded>, Error> {
        let Some(raw) = self.db.get("degraded")? else {
            return Ok(Vec::new());
        };
        let s = StoredDegraded::decode(raw.as_ref())
            .map_err(|e| Error::Corrupt(format!("degradations: {e}")))?;
        s.degraded
            .iter()
            .map(FromProto::from_proto)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::Corrupt(format!("degradations: {e}")))
    }

    /// Writes the degradations without flushing: the next [`LocalState::save`] makes them
    /// durable together with their version.
    pub fn stage_degraded(&self, d: &[moat_dataplane::plan::Degraded]) -> Result<(), Error> {
        let s = StoredDegraded {
            degraded: d.iter().map(ToProto::to_proto).collect(),
        };
        self.db.insert("degraded", s.encode_to_vec())?;
        Ok(())
    }
}
