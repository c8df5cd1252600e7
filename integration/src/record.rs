//! A backend that records what it was given (for tests only): every operation is appended to
//! `events.jsonl` (with its time, `ts`, in Unix microseconds, and the local pod table it was
//! given, `local`), and the enforced snapshot is written to `applied.json`. If a file named
//! `fail` exists in its directory, every apply is rejected with the file's text. A file named
//! `degrade` simulates a dataplane that can't hold some rules: each line `RULE_ID REASON`
//! (the ID as `applied.json` writes it) makes every rule list holding that rule come back
//! degraded, with its endpoints and the reason.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use moat_dataplane::local::PodAddr;
use moat_dataplane::plan::Degraded;
use moat_dataplane::{Adopted, Applied, Backend, BackendError, Capabilities, LocalPods};
use moat_policy::ir::delta::Delta;
use moat_policy::ir::{NodeSnapshot, RuleId};
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

    fn event(&self, mut v: serde_json::Value) -> Result<(), BackendError> {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or_default();
        v["ts"] = json!(ts);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("events.jsonl"))
            .map_err(|e| BackendError::failed("opening the event log", e))?;
        // One write per line: tests read the log while it grows.
        f.write_all(format!("{v}\n").as_bytes())
            .map_err(|e| BackendError::failed("writing the event log", e))
    }

    fn check_fail(&self, version: u64) -> Result<(), BackendError> {
        match std::fs::read_to_string(self.dir.join("fail")) {
            Ok(why) => Err(BackendError::refused(version, why.trim().to_string())),
            Err(_) => Ok(()),
        }
    }

    /// The rule lists `degrade` names, as a dataplane that could not hold them reports them.
    fn degraded(&self, snap: &NodeSnapshot) -> Result<Vec<Degraded>, BackendError> {
        let Ok(text) = std::fs::read_to_string(self.dir.join("degrade")) else {
            return Ok(Vec::new());
        };
        let mut why: BTreeMap<RuleId, String> = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (id, reason) = line.split_once(' ').unwrap_or((line, "simulated"));
            let id = u64::from_str_radix(id, 16)
                .map_err(|e| BackendError::failed(format!("degrade: rule ID `{id}`"), e))?;
            why.insert(RuleId(id), reason.trim().to_string());
        }
        let mut lists: BTreeMap<(bool, Vec<RuleId>), (Vec<_>, String)> = BTreeMap::new();
        for e in &snap.endpoints {
            for (egress, d) in [(false, &e.ingress), (true, &e.egress)] {
                if let Some(r) = d.rules.iter().find_map(|r| why.get(r)) {
                    let l = lists
                        .entry((egress, d.rules.clone()))
                        .or_insert_with(|| (Vec::new(), r.clone()));
                    l.0.push(e.id);
                }
            }
        }
        Ok(lists
            .into_iter()
            .map(|((egress, rules), (endpoints, reason))| Degraded {
                egress,
                rules,
                endpoints,
                reason,
            })
            .collect())
    }

    fn enforce(
        &mut self,
        op: &str,
        snap: &NodeSnapshot,
        entries: Option<usize>,
        local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        let degraded = self.degraded(snap)?;
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
        let d: Vec<_> = degraded
            .iter()
            .map(|d| json!({"egress": d.egress, "rules": d.rules, "endpoints": d.endpoints, "reason": d.reason}))
            .collect();
        self.event(json!({"op": op, "version": snap.version, "digest": snap.digest, "delta_entries": entries, "size": snap.size().total(), "local": local_json(local), "degraded": d}))?;
        Ok(Applied { degraded })
    }
}

/// `{"addrs": [{"iface", "addr", "state": "known"|"unknown", "endpoint"}], "pod_ifaces",
/// "other_ifaces", "unknown_pods", "unsupported"}`.
pub fn local_json(l: &LocalPods) -> serde_json::Value {
    let addrs: Vec<_> = l
        .addrs
        .iter()
        .map(|((i, a), s)| match s {
            PodAddr::Known(e) => json!({"iface": i, "addr": a, "state": "known", "endpoint": e}),
            PodAddr::Unknown => json!({"iface": i, "addr": a, "state": "unknown"}),
        })
        .collect();
    json!({
        "addrs": addrs,
        "pod_ifaces": l.pod_ifaces,
        "other_ifaces": l.other_ifaces,
        "unknown_pods": format!("{:?}", l.unknown).to_lowercase(),
        "unsupported": l.unsupported,
    })
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
        local: &LocalPods,
    ) -> Result<Adopted, BackendError> {
        self.event(
            json!({"op": "adopt", "version": last.map(|s| s.version), "local": local_json(local)}),
        )?;
        Ok(if last.is_some() {
            Adopted::Enforcing
        } else {
            Adopted::Nothing
        })
    }

    fn apply_full(
        &mut self,
        snap: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        self.enforce("full", snap, None, local)
    }

    fn apply_delta(
        &mut self,
        _old: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        self.enforce("delta", new, Some(delta.entries()), local)
    }

    fn set_local(&mut self, local: &LocalPods) -> Result<(), BackendError> {
        self.event(json!({"op": "set_local", "local": local_json(local)}))
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        BTreeMap::from([("applies".to_string(), self.applies)])
    }

    fn remove_all(&mut self) -> Result<(), BackendError> {
        let _ = std::fs::remove_file(self.dir.join("applied.json"));
        self.event(json!({"op": "remove_all"}))
    }
}
