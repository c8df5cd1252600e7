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
