//! Persistent server state in sled: the version reservation, every node's status, and the
//! last snapshots each node acknowledged (so a restarted server can still send deltas).
//!
//! Snapshots are stored content-addressed: a node's entry is a skeleton (endpoints, rule IDs,
//! group IDs with their member hashes); rules and groups are stored once under their content
//! keys and shared by every node and version that uses them. Unreferenced blobs are swept
//! after retention pruning.
//!
//! Damage is contained where it can be: an unreadable node status or snapshot is skipped
//! (and dropped) with a warning — it only costs that node a full snapshot. The version
//! reservation is the exception: without it the server cannot know which versions it handed
//! out, so an unreadable one stops the server instead of ever reusing a version.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use moat_policy::ir::delta::VersionRef;
use moat_policy::ir::digest::Digest;
use moat_policy::ir::{Group, NodeSnapshot, Rule};
use moat_proto::convert::{self, FromProto, ToProto};
use moat_proto::v1;
use prost::Message;
use tracing::warn;

/// Versions are reserved in blocks, so the durable write before sending happens once per
/// block, not once per version.
const RESERVE_BLOCK: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    #[error("state store holds an undecodable {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("state store holds an invalid {what}: {source}")]
    Convert {
        what: &'static str,
        #[source]
        source: convert::ConvertError,
    },
    #[error(
        "the version reservation in {dir} cannot be read ({why}), so the versions already handed out are unknown; refusing to start rather than reuse one. Restore the directory from a backup, or move it aside and start with --first-version above every version an enforcer may hold (their moat_enforcer_applied_version metric)"
    )]
    Reservation { dir: String, why: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, PartialEq, Message)]
struct StoredSnapshot {
    #[prost(uint64, tag = "1")]
    version: u64,
    #[prost(bytes = "vec", tag = "2")]
    digest: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "3")]
    node_addrs: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "4")]
    endpoints: Vec<v1::Endpoint>,
    #[prost(fixed64, repeated, tag = "5")]
    rules: Vec<u64>,
    #[prost(message, repeated, tag = "6")]
    groups: Vec<GroupRef>,
}

#[derive(Clone, PartialEq, Message)]
struct GroupRef {
    #[prost(fixed64, tag = "1")]
    id: u64,
    #[prost(bytes = "vec", tag = "2")]
    members: Vec<u8>,
}

/// What the server remembers about a node across restarts.
#[derive(Clone, PartialEq, Message)]
pub struct StoredStatus {
    #[prost(string, tag = "1")]
    pub backend: String,
    #[prost(string, tag = "2")]
    pub kernel: String,
    #[prost(uint64, tag = "3")]
    pub applied_version: u64,
    #[prost(bytes = "vec", tag = "4")]
    pub applied_digest: Vec<u8>,
    #[prost(string, tag = "5")]
    pub last_error: String,
    #[prost(uint64, tag = "6")]
    pub last_ack_unix_micros: u64,
    /// The last version published for the node and its digest (for version continuity).
    #[prost(uint64, tag = "7")]
    pub published_version: u64,
    #[prost(bytes = "vec", tag = "8")]
    pub published_digest: Vec<u8>,
    #[prost(string, tag = "9")]
    pub selection: String,
    /// What the node's dataplane and the server cut from the applied version.
    #[prost(message, repeated, tag = "20")]
    pub node_degraded: Vec<v1::Degradation>,
    #[prost(message, repeated, tag = "21")]
    pub server_degraded: Vec<v1::Degradation>,
    /// When the node was seen deleted from its source (0: it exists); it is forgotten a
    /// grace period later, also across restarts.
    #[prost(uint64, tag = "10")]
    pub deleted_unix_micros: u64,
}

/// What one garbage collection did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Rule and group blobs no snapshot references any more.
    pub blobs: usize,
    /// Snapshots that could not be read (dropped: no delta can be based on them).
    pub unreadable: usize,
}

/// Above this a reservation is damage, not history: versions count changes, one at a time.
const PLAUSIBLE_RESERVATION: u64 = 1 << 62;

pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    status: sled::Tree,
    snapshots: sled::Tree,
    rules: sled::Tree,
    groups: sled::Tree,
    retention: usize,
    reserved: Mutex<u64>,
    /// Blob keys known to be stored (saves a lookup per group per acknowledgement).
    known_blobs: Mutex<HashSet<Vec<u8>>>,
    /// Serialises saving snapshots with garbage collection, so a collection never removes
    /// the blobs of a snapshot being saved.
    writing: Mutex<()>,
}

fn key(cluster: &str, node: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(cluster.len() + node.len() + 1);
    k.extend_from_slice(cluster.as_bytes());
    k.push(0);
    k.extend_from_slice(node.as_bytes());
    k
}

fn snap_key(cluster: &str, node: &str, version: u64) -> Vec<u8> {
    let mut k = key(cluster, node);
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn group_key(id: u64, members: &[u8; 32]) -> Vec<u8> {
    let mut k = id.to_be_bytes().to_vec();
    k.extend_from_slice(members);
    k
}

impl Store {
    pub fn open(path: &Path, retention: usize) -> Result<Arc<Store>> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let meta = db.open_tree("meta")?;
        let reserved = match meta.get("reserved")? {
            None => 0,
            Some(v) => {
                let bad = |why: String| Error::Reservation {
                    dir: path.display().to_string(),
                    why,
                };
                let bytes: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| bad(format!("{} bytes where 8 belong", v.len())))?;
                let r = u64::from_be_bytes(bytes);
                if r > PLAUSIBLE_RESERVATION {
                    return Err(bad(format!("{r} is no version this server handed out")));
                }
                r
            }
        };
        Ok(Arc::new(Store {
            status: db.open_tree("status")?,
            snapshots: db.open_tree("snapshots")?,
            rules: db.open_tree("rules")?,
            groups: db.open_tree("groups")?,
            meta,
            db,
            retention: retention.max(1),
            reserved: Mutex::new(reserved),
            known_blobs: Mutex::new(HashSet::new()),
            writing: Mutex::new(()),
        }))
    }

    /// Every version at or below this may have been handed out before: a new index starts
    /// above it, so no version number is ever reused.
    pub fn reserved(&self) -> u64 {
        *self.reserved.lock().expect("reserve lock")
    }

    /// The newest version epoch this server held (HA replicas; 0: none yet).
    pub fn last_epoch(&self) -> Result<u64> {
        Ok(self
            .meta
            .get("epoch")?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Makes the epoch this replica took durable before any version of it is handed out.
    pub async fn record_epoch(&self, epoch: u64) -> Result<()> {
        self.meta.insert("epoch", &epoch.to_be_bytes())?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Makes `version` durable as handed out before it is sent anywhere.
    pub async fn reserve(&self, version: u64) -> Result<()> {
        let upto = {
            let mut r = self.reserved.lock().expect("reserve lock");
            if version <= *r {
                return Ok(());
            }
            *r = version.saturating_add(RESERVE_BLOCK);
            *r
        };
        self.meta.insert("reserved", &upto.to_be_bytes())?;
        self.db.flush_async().await?;
        Ok(())
    }

    pub fn save_status(&self, cluster: &str, node: &str, s: &StoredStatus) -> Result<()> {
        self.status.insert(key(cluster, node), s.encode_to_vec())?;
        Ok(())
    }

    /// Every node status saved. One that cannot be read is skipped with a warning and
    /// dropped (the node's next event writes it again): a damaged record must not keep the
    /// server from starting.
    pub fn statuses(&self) -> Result<Vec<(String, String, StoredStatus)>> {
        let mut out = Vec::new();
        for item in self.status.iter() {
            let (k, v) = item?;
            match parse_status(&k, &v) {
                Ok(s) => out.push(s),
                Err(why) => {
                    warn!(key = %String::from_utf8_lossy(&k).escape_debug(), why, "skipping an unreadable node status (dropped; the node's next event writes it again)");
                    self.status.remove(&k)?;
                }
            }
        }
        Ok(out)
    }

    pub fn remove_node(&self, cluster: &str, node: &str) -> Result<()> {
        self.status.remove(key(cluster, node))?;
        let mut prefix = key(cluster, node);
        prefix.push(0);
        for k in self.snapshots.scan_prefix(&prefix).keys() {
            self.snapshots.remove(k?)?;
        }
        Ok(())
    }

    /// Remembers a snapshot a node acknowledged, keeping the newest `retention` per node.
    pub fn save_acked(&self, cluster: &str, snap: &NodeSnapshot) -> Result<()> {
        let _writing = self.writing.lock().expect("write lock");
        let mut stored = StoredSnapshot {
            version: snap.version,
            digest: snap.digest.0.to_vec(),
            node_addrs: snap.node_addrs.iter().map(convert::addr_bytes).collect(),
            endpoints: snap.endpoints.iter().map(ToProto::to_proto).collect(),
            rules: Vec::with_capacity(snap.rules.len()),
            groups: Vec::with_capacity(snap.groups.len()),
        };
        let mut known = self.known_blobs.lock().expect("blob lock");
        for r in &snap.rules {
            stored.rules.push(r.id.0);
            let k = r.id.0.to_be_bytes().to_vec();
            if known.insert(k.clone()) && !self.rules.contains_key(&k)? {
                self.rules.insert(k, r.to_proto().encode_to_vec())?;
            }
        }
        for g in &snap.groups {
            let h = g.members_hash();
            stored.groups.push(GroupRef {
                id: g.id.0,
                members: h.to_vec(),
            });
            let k = group_key(g.id.0, &h);
            if known.insert(k.clone()) && !self.groups.contains_key(&k)? {
                self.groups.insert(k, g.to_proto().encode_to_vec())?;
            }
        }
        drop(known);
        self.snapshots.insert(
            snap_key(cluster, &snap.node, snap.version),
            stored.encode_to_vec(),
        )?;
        // Retention: keep the newest versions of this node.
        let mut prefix = key(cluster, &snap.node);
        prefix.push(0);
        let keys: Vec<_> = self
            .snapshots
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<_, _>>()?;
        if keys.len() > self.retention {
            for k in &keys[..keys.len() - self.retention] {
                self.snapshots.remove(k)?;
            }
        }
        Ok(())
    }

    /// A node's stored snapshot with exactly this version and digest.
    pub fn load(&self, cluster: &str, node: &str, v: &VersionRef) -> Result<Option<NodeSnapshot>> {
        let Some(raw) = self.snapshots.get(snap_key(cluster, node, v.version))? else {
            return Ok(None);
        };
        let s = StoredSnapshot::decode(raw.as_ref()).map_err(|source| Error::Decode {
            what: "snapshot",
            source,
        })?;
        if s.digest != v.digest.0 {
            return Ok(None);
        }
        let conv = |what| move |source| Error::Convert { what, source };
        let mut rules = Vec::with_capacity(s.rules.len());
        for id in &s.rules {
            let Some(b) = self.rules.get(id.to_be_bytes())? else {
                return Ok(None);
            };
            let p = v1::Rule::decode(b.as_ref()).map_err(|source| Error::Decode {
                what: "rule",
                source,
            })?;
            rules.push(Arc::new(Rule::from_proto(&p).map_err(conv("rule"))?));
        }
        let mut groups = Vec::with_capacity(s.groups.len());
        for g in &s.groups {
            let h: [u8; 32] = g.members.as_slice().try_into().unwrap_or([0; 32]);
            let Some(b) = self.groups.get(group_key(g.id, &h))? else {
                return Ok(None);
            };
            let p = v1::Group::decode(b.as_ref()).map_err(|source| Error::Decode {
                what: "group",
                source,
            })?;
            groups.push(Arc::new(Group::from_proto(&p).map_err(conv("group"))?));
        }
        let content = v1::NodeContent {
            node_addrs: s.node_addrs,
            endpoints: s.endpoints,
            rules: Vec::new(),
            groups: Vec::new(),
        };
        let mut snap = convert::snapshot_from_proto(node, v, &content).map_err(conv("snapshot"))?;
        snap.rules = rules;
        snap.groups = groups;
        snap.rules.sort_by_key(|r| r.id);
        snap.groups.sort_by_key(|g| g.id);
        if snap.content_digest() != v.digest {
            return Ok(None);
        }
        Ok(Some(snap))
    }

    /// Deletes rule and group blobs no retained snapshot references. A snapshot that cannot
    /// be read references nothing anyone can use: it is dropped with a warning, and the
    /// collection goes on.
    pub fn collect_garbage(&self) -> Result<Collected> {
        let _writing = self.writing.lock().expect("write lock");
        let mut rules = HashSet::new();
        let mut groups = HashSet::new();
        let mut unreadable = 0;
        for item in self.snapshots.iter() {
            let (k, v) = item?;
            let s = match StoredSnapshot::decode(v.as_ref()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(key = %String::from_utf8_lossy(&k).escape_debug(), error = %e, "dropping an unreadable stored snapshot (that node gets a full snapshot instead of a delta)");
                    self.snapshots.remove(&k)?;
                    unreadable += 1;
                    continue;
                }
            };
            rules.extend(s.rules.iter().map(|r| r.to_be_bytes().to_vec()));
            for g in s.groups {
                let h: [u8; 32] = g.members.as_slice().try_into().unwrap_or([0; 32]);
                groups.insert(group_key(g.id, &h));
            }
        }
        let mut removed = 0;
        let mut known = self.known_blobs.lock().expect("blob lock");
        for (tree, live) in [(&self.rules, &rules), (&self.groups, &groups)] {
            for k in tree.iter().keys() {
                let k = k?;
                if !live.contains(k.as_ref()) {
                    tree.remove(&k)?;
                    known.remove(k.as_ref());
                    removed += 1;
                }
            }
        }
        Ok(Collected {
            blobs: removed,
            unreadable,
        })
    }

    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }
}

/// A status record: its key `cluster \0 node`, both valid names, and its value.
fn parse_status(k: &[u8], v: &[u8]) -> Result<(String, String, StoredStatus), String> {
    let i = k
        .iter()
        .position(|b| *b == 0)
        .ok_or("no cluster/node separator in the key")?;
    let name = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .filter(|s| moat_proto::identity::valid_name(s))
            .map(str::to_string)
            .ok_or("the key names no valid cluster and node")
    };
    let (cluster, node) = (name(&k[..i])?, name(&k[i + 1..])?);
    let s = StoredStatus::decode(v).map_err(|e| format!("undecodable: {e}"))?;
    Ok((cluster, node, s))
}

/// The digest bytes of a stored status, if well-formed.
pub fn digest_of(b: &[u8]) -> Option<Digest> {
    convert::digest(b).ok()
}

#[cfg(test)]
mod tests {
    use moat_policy::Index;
    use moat_policy::testkit::parse_all;
    use moat_policy::testkit::random::{Features, World};
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn stores_snapshots_content_addressed_with_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 2).unwrap();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let mut f = Features::default();
        let mut world = World::generate(&mut rng, &mut f);
        let mut index = Index::build(parse_all(&world.objects()));
        let mut saved = Vec::new();
        for _ in 0..4 {
            for n in index.nodes() {
                let s = index.snapshot(&n.node).unwrap();
                store.save_acked("c", &s).unwrap();
                saved.push(s);
            }
            world.mutate(&mut rng, &mut f, false);
            index.reset(parse_all(&world.objects()));
        }
        // The newest two versions of each node load back exactly; older ones are gone.
        let mut by_node: std::collections::BTreeMap<String, Vec<NodeSnapshot>> = Default::default();
        for s in saved {
            by_node.entry(s.node.clone()).or_default().push(s);
        }
        for (node, snaps) in by_node {
            let mut versions: Vec<_> = snaps.iter().map(|s| s.version).collect();
            versions.dedup();
            for s in &snaps {
                let v = VersionRef {
                    version: s.version,
                    digest: s.digest,
                };
                let got = store.load("c", &node, &v).unwrap();
                let recent = versions.iter().rev().take(2).any(|x| *x == s.version);
                assert_eq!(got.is_some(), recent, "{node} v{}", s.version);
                if let Some(g) = got {
                    assert_eq!(&g, s);
                }
                let wrong = VersionRef {
                    version: s.version,
                    digest: Digest([1; 32]),
                };
                assert!(store.load("c", &node, &wrong).unwrap().is_none());
            }
        }
        store.collect_garbage().unwrap();
    }

    #[test]
    fn unreadable_statuses_are_skipped_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 2).unwrap();
        let good = StoredStatus {
            backend: "nft".into(),
            applied_version: 3,
            ..Default::default()
        };
        store.save_status("c", "n1", &good).unwrap();
        store
            .status
            .insert(key("c", "n2"), &b"\xff\xff\xff"[..])
            .unwrap();
        store.status.insert(&b"no-separator"[..], &b""[..]).unwrap();
        store
            .status
            .insert(key("c", ".."), good.encode_to_vec())
            .unwrap();
        let got = store.statuses().unwrap();
        assert_eq!(got, vec![("c".to_string(), "n1".to_string(), good)]);
        assert_eq!(store.status.len(), 1, "the bad records are gone");
    }

    /// sled's writer threads can hold the directory's lock for a moment after the last
    /// handle is dropped (seen in CI under load), so a fixture written through its own
    /// handle waits for the lock before the code under test opens the directory.
    fn released(dir: &Path) {
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

    #[test]
    fn an_unreadable_reservation_refuses_to_open() {
        for bad in [&[1u8, 2, 3][..], &[0; 9][..], &[0xff; 8][..]] {
            let dir = tempfile::tempdir().unwrap();
            {
                let db = sled::open(dir.path()).unwrap();
                db.open_tree("meta")
                    .unwrap()
                    .insert("reserved", bad)
                    .unwrap();
                db.flush().unwrap();
            }
            released(dir.path());
            let err = Store::open(dir.path(), 2).err().expect("refused");
            assert!(matches!(err, Error::Reservation { .. }), "{err}");
            assert!(err.to_string().contains("--first-version"), "{err}");
        }
    }

    #[test]
    fn garbage_collection_survives_an_unreadable_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 2).unwrap();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
        let world = World::generate(&mut rng, &mut Features::default());
        let index = Index::build(parse_all(&world.objects()));
        let mut kept = Vec::new();
        for n in index.nodes() {
            let s = index.snapshot(&n.node).unwrap();
            store.save_acked("c", &s).unwrap();
            kept.push(s);
        }
        store
            .snapshots
            .insert(snap_key("c", "broken", 7), &b"\x0a\xff"[..])
            .unwrap();
        store
            .rules
            .insert(u64::MAX.to_be_bytes(), &b"orphan"[..])
            .unwrap();
        let c = store.collect_garbage().unwrap();
        assert_eq!(
            c,
            Collected {
                blobs: 1,
                unreadable: 1
            }
        );
        assert!(store.rules.get(u64::MAX.to_be_bytes()).unwrap().is_none());
        for s in &kept {
            let v = VersionRef {
                version: s.version,
                digest: s.digest,
            };
            assert_eq!(store.load("c", &s.node, &v).unwrap().as_ref(), Some(s));
        }
    }

    #[tokio::test]
    async fn reservations_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 2).unwrap();
            assert_eq!(store.reserved(), 0);
            store.reserve(5).await.unwrap();
            assert!(store.reserved() >= 5);
        }
        released(dir.path());
        let store = Store::open(dir.path(), 2).unwrap();
        assert!(
            store.reserved() >= 5,
            "a reopened store never hands out version 5 again"
        );
    }
}
