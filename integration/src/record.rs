//! A backend that records what it was given (for tests only): every operation is appended to
//! `events.jsonl`, and the enforced snapshot is written to `applied.json`. If a file named
//! `fail` exists in its directory, every apply is rejected with the file's text.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use moat_dataplane::{Adopted, Applied, Backend, BackendError, Capabilities, LocalPods};
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::Delta;
use serde_json::json;

pub struct Recording {
    dir: PathBuf,
    applies: u64,
}

impl Recording {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, applies: 0 })
    }

    fn event(&self, v: serde_json::Value) -> Result<(), BackendError> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("events.jsonl"))
            .map_err(|e| BackendError::failed("opening the event log", e))?;
        writeln!(f, "{v}").map_err(|e| BackendError::failed("writing the event log", e))
    }

    fn check_fail(&self, version: u64) -> Result<(), BackendError> {
        match std::fs::read_to_string(self.dir.join("fail")) {
            Ok(why) => Err(BackendError::refused(version, why.trim().to_string())),
            Err(_) => Ok(()),
        }
    }

    fn enforce(
        &mut self,
        op: &str,
        snap: &NodeSnapshot,
        entries: Option<usize>,
    ) -> Result<(), BackendError> {
        self.check_fail(snap.version)?;
        let tmp = self.dir.join("applied.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(snap)
                .map_err(|e| BackendError::failed("encoding the snapshot", e))?,
        )
        .map_err(|e| BackendError::failed("writing the snapshot", e))?;
        std::fs::rename(&tmp, self.dir.join("applied.json"))
            .map_err(|e| BackendError::failed("renaming the snapshot", e))?;
        self.applies += 1;
        self.event(json!({"op": op, "version": snap.version, "digest": snap.digest, "delta_entries": entries, "size": snap.size().total()}))
    }
}

impl Backend for Recording {
    fn name(&self) -> &str {
        "record"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::of_this_kernel(BTreeMap::from([("record".to_string(), "ok".to_string())]))
    }

    fn adopt(
        &mut self,
        last: Option<&NodeSnapshot>,
        _local: &LocalPods,
    ) -> Result<Adopted, BackendError> {
        self.event(json!({"op": "adopt", "version": last.map(|s| s.version)}))?;
        Ok(if last.is_some() {
            Adopted::Enforcing
        } else {
            Adopted::Nothing
        })
    }

    fn apply_full(
        &mut self,
        snap: &NodeSnapshot,
        _local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        self.enforce("full", snap, None)?;
        Ok(Applied::default())
    }

    fn apply_delta(
        &mut self,
        _old: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
        _local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        self.enforce("delta", new, Some(delta.entries()))?;
        Ok(Applied::default())
    }

    fn set_local(&mut self, _local: &LocalPods) -> Result<(), BackendError> {
        Ok(())
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        BTreeMap::from([("applies".to_string(), self.applies)])
    }

    fn remove_all(&mut self) -> Result<(), BackendError> {
        let _ = std::fs::remove_file(self.dir.join("applied.json"));
        self.event(json!({"op": "remove_all"}))
    }
}
