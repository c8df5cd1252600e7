//! The node's own record of what it enforces (sled), so a restarted enforcer — or one cut
//! off from the server — keeps enforcing the last known rules and resumes by delta.
//!
//! A record that cannot be read must never stop the node: [`LocalState::load`] discards it
//! and says so, and the agent then keeps whatever the kernel enforces until the server sends
//! a full snapshot (an enforcer that exited here would restart into the same record for
//! ever). A sled database that cannot even be opened is moved aside the same way.

use std::path::{Path, PathBuf};

use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::VersionRef;
use moat_proto::convert::{self, FromProto, ToProto};
use moat_proto::v1;
use prost::Message;
use tracing::warn;

const APPLIED: &str = "applied";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("local state: {0}")]
    Sled(#[from] sled::Error),
    #[error("local state is corrupt: {0}")]
    Corrupt(String),
    #[error("moving the unreadable local state in {dir} aside: {source}")]
    Discard {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// What the node's record held at start.
#[derive(Debug)]
pub enum Loaded {
    /// Nothing recorded (a first start).
    Nothing,
    /// The last applied snapshot, verified against its digest.
    Applied(NodeSnapshot),
    /// The record could not be read (why) and has been discarded: nothing may be adopted
    /// from it, and the server must be asked for a full snapshot.
    Discarded(Error),
}

pub struct LocalState {
    db: sled::Db,
}

/// What sled keeps in its directory (the enforcer's state directory also holds the node
/// certificate and the nft lock, which stay).
const SLED_FILES: [&str; 3] = ["conf", "db", "blobs"];

impl LocalState {
    /// Opens the record in `dir`. A database sled reports as corrupt is moved to
    /// `dir/discarded-<unix seconds>/` and a fresh one is opened.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        match Self::open_sled(dir) {
            // What sled cannot read, as opposed to what it cannot reach (I/O errors: a
            // permission, or the lock another enforcer holds — never discarded).
            Err(Error::Sled(
                e @ (sled::Error::Corruption { .. }
                | sled::Error::Unsupported(_)
                | sled::Error::ReportableBug(_)),
            )) => {
                let to = Self::move_aside(dir)?;
                warn!(error = %e, moved_to = %to.display(), "the local state database is corrupt; moved aside, starting without a record");
                Self::open_sled(dir)
            }
            r => r,
        }
    }

    fn open_sled(dir: &Path) -> Result<Self, Error> {
        Ok(Self {
            db: sled::Config::new().path(dir).open()?,
        })
    }

    fn move_aside(dir: &Path) -> Result<PathBuf, Error> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let to = dir.join(format!("discarded-{secs}"));
        let err = |source| Error::Discard {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(&to).map_err(err)?;
        let snaps = std::fs::read_dir(dir)
            .map_err(err)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("snap."));
        for name in SLED_FILES.map(String::from).into_iter().chain(snaps) {
            let from = dir.join(&name);
            if from.exists() {
                std::fs::rename(&from, to.join(&name)).map_err(err)?;
            }
        }
        Ok(to)
    }

    /// The last applied snapshot for `node`. Never fails: a record that cannot be read —
    /// undecodable, not matching its digest, another node's, or unreadable by sled — is
    /// removed and reported as [`Loaded::Discarded`].
    pub fn load(&self, node: &str) -> Loaded {
        match self.read(node) {
            Ok(Some(s)) => Loaded::Applied(s),
            Ok(None) => Loaded::Nothing,
            Err(e) => {
                if let Err(r) = self.db.remove(APPLIED).and_then(|_| self.db.flush()) {
                    warn!(error = %r, "cannot remove the unreadable record; it will be replaced by the next version applied");
                }
                Loaded::Discarded(e)
            }
        }
    }

    fn read(&self, node: &str) -> Result<Option<NodeSnapshot>, Error> {
        let Some(raw) = self.db.get(APPLIED)? else {
            return Ok(None);
        };
        let s = Stored::decode(raw.as_ref()).map_err(|e| Error::Corrupt(e.to_string()))?;
        if s.node != node {
            return Err(Error::Corrupt(format!(
                "the record is node {:?}'s, not {node:?}'s",
                s.node
            )));
        }
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
        self.db.insert(APPLIED, s.encode_to_vec())?;
        self.db.flush()?;
        Ok(())
    }

    /// Writes raw bytes as the record (tests that play a corrupted disk).
    #[doc(hidden)]
    pub fn write_raw(&self, bytes: &[u8]) -> Result<(), Error> {
        self.db.insert(APPLIED, bytes)?;
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

/// sled's writer threads can hold the directory's lock for a moment after the last handle
/// is dropped (a test reopening in the same process sees `WouldBlock`; a restarted
/// enforcer is a new process and never does), so tests wait for the lock before reopening.
#[cfg(test)]
pub(crate) fn released(dir: &Path) {
    use rustix::fs::{FlockOperation, flock};
    let file = std::fs::File::open(dir.join("db")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "sled still holds {}",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use moat_policy::Index;
    use moat_policy::testkit::parse_all;
    use moat_policy::testkit::random::{Features, World};
    use rand::SeedableRng;

    use super::*;

    fn a_snapshot() -> NodeSnapshot {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let world = World::generate(&mut rng, &mut Features::default());
        let index = Index::build(parse_all(&world.objects()));
        let node = index.nodes().into_iter().next().expect("a node").node;
        index.snapshot(&node).expect("its snapshot")
    }

    #[test]
    fn unreadable_records_are_discarded_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let snap = a_snapshot();
        let st = LocalState::open(dir.path()).unwrap();
        assert!(matches!(st.load(&snap.node), Loaded::Nothing));
        st.save(&snap).unwrap();
        assert!(matches!(st.load(&snap.node), Loaded::Applied(s) if s == snap));
        // Another node's record is not this node's rules.
        assert!(matches!(st.load("elsewhere"), Loaded::Discarded(_)));
        assert!(matches!(st.load(&snap.node), Loaded::Nothing));

        // Garbage, a truncated record, and a record whose content lies about its digest.
        let lying = Stored {
            node: snap.node.clone(),
            version: Some(
                VersionRef {
                    version: snap.version,
                    digest: moat_policy::ir::digest::Digest([9; 32]),
                }
                .to_proto(),
            ),
            content: Some(snap.to_proto()),
        }
        .encode_to_vec();
        st.save(&snap).unwrap();
        let whole = st.db.get(APPLIED).unwrap().unwrap().to_vec();
        for bad in [
            b"\xff\xfe garbage".to_vec(),
            whole[..whole.len() / 2].to_vec(),
            lying,
        ] {
            st.write_raw(&bad).unwrap();
            assert!(matches!(st.load(&snap.node), Loaded::Discarded(_)));
            assert!(
                matches!(st.load(&snap.node), Loaded::Nothing),
                "discarded once"
            );
        }
    }

    #[test]
    fn a_database_sled_cannot_open_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        {
            let st = LocalState::open(dir.path()).unwrap();
            st.save(&a_snapshot()).unwrap();
        }
        released(dir.path());
        std::fs::write(dir.path().join("node.pem"), "kept").unwrap();
        // Garbage over sled's files, as a damaged disk leaves them.
        for f in ["conf", "db"] {
            std::fs::write(dir.path().join(f), vec![0xa5; 4096]).unwrap();
        }
        let st = LocalState::open(dir.path()).unwrap();
        assert!(matches!(st.load(&a_snapshot().node), Loaded::Nothing));
        assert_eq!(std::fs::read(dir.path().join("node.pem")).unwrap(), b"kept");
        let moved: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("discarded-"))
            .collect();
        assert_eq!(moved.len(), 1, "the damaged files are kept aside");
        drop(st);
        released(dir.path());
        // A lock another enforcer holds is no damage: nothing is moved.
        let held = LocalState::open(dir.path()).unwrap();
        assert!(matches!(
            LocalState::open(dir.path()),
            Err(Error::Sled(sled::Error::Io(_)))
        ));
        drop(held);
    }
}
