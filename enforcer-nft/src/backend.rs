//! `NftBackend`: plans each version within `--nft-max-elements`, renders it with the node's
//! local pod table, and commits it as one transaction.

use std::collections::BTreeMap;
use std::path::Path;

use moat_dataplane::{Adopted, Applied, Backend, BackendError, Capabilities, LocalPods, counters};
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::Delta;
use tracing::{debug, info, warn};

use crate::desired::{self, Budget, Classes, Desired};
use crate::local::{self, vouched};
use crate::{commit_delta, incremental, netlink, nft, render, table_elements};

pub struct NftBackend {
    classes: Classes,
    current: Option<Desired>,
    /// The snapshot `current` was planned from: a change of the local pod table alone may
    /// need it planned again (its budget moves with the table).
    snap: Option<NodeSnapshot>,
    /// For in-place updates of `current`; built on the first delta that can use it, dropped
    /// whenever `current` is recomputed.
    cache: Option<incremental::Cache>,
    /// `classes` numbers exactly `current`'s classes (false after a failure midway, until
    /// the next version is planned whole): only then may `current` be patched in place.
    patchable: bool,
    /// Kept open across deltas (see `netlink::Conn`).
    conn: Option<netlink::Conn>,
    max_elements: usize,
    version: String,
    lock: nft::TxLock,
    /// Other probes' findings (why not eBPF), reported with this backend's own.
    probes: BTreeMap<String, String>,
}

impl NftBackend {
    /// Takes the table's transaction lock at `lock` (see [`nft::TxLock`]) first: after a
    /// crash this waits for the dead enforcer's last `nft` to finish, so adoption reads a
    /// table nothing else is about to change.
    pub fn open(max_elements: usize, lock: &Path) -> Result<Self, nft::Error> {
        let lock = nft::TxLock::acquire(lock, nft::LOCK_WAIT_DEFAULT)?;
        let version = std::process::Command::new("nft")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Ok(Self {
            classes: Classes::default(),
            current: None,
            snap: None,
            cache: None,
            patchable: false,
            conn: None,
            max_elements,
            version,
            lock,
            probes: BTreeMap::new(),
        })
    }

    /// Reports `probes` (e.g. the eBPF probe that failed) alongside nft's own.
    pub fn with_probes(mut self, probes: BTreeMap<String, String>) -> Self {
        self.probes = probes;
        self
    }

    /// Deletes the Moat table a previous run left, if there is one (this node now runs
    /// another dataplane). Waits for the table's transaction lock at `lock` first. `Ok(false)`:
    /// nothing to remove, including where `nft` does not run at all.
    pub fn remove_leftover(lock: &Path) -> Result<bool, nft::Error> {
        if Self::probe().is_err() || !nft::table_exists()? {
            return Ok(false);
        }
        let lock = nft::TxLock::acquire(lock, nft::LOCK_WAIT_DEFAULT)?;
        nft::delete_table(&lock)?;
        Ok(true)
    }

    /// Checks that `nft` works here (the capability probe for this backend).
    pub fn probe() -> Result<String, String> {
        let out = std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
            .map_err(|e| format!("cannot run nft: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "nft list tables: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok("ok".into())
    }

    /// The plan's budget for `snap` with `local`, such that the table it renders holds at
    /// most `--nft-max-elements` (see [`table_elements`]: the plan's fixed entries per
    /// endpoint and local address give way to the local pod table).
    fn budget(&self, snap: &NodeSnapshot, local: &LocalPods) -> Budget {
        // The plan's own count (NetworkPolicy isolation and cluster rules alike).
        let isolated = crate::desired::endpoint_entries(snap);
        Budget::total(
            self.max_elements
                .saturating_add(isolated)
                .saturating_add(local.addrs.len())
                .saturating_sub(local::elements(local)),
        )
    }

    /// Plans `snap` within the budget; refuses it only when even what no budget can cut
    /// (the local pod table, an entry per isolated endpoint) does not fit.
    fn plan(&mut self, snap: &NodeSnapshot, local: &LocalPods) -> Result<Desired, BackendError> {
        let budget = self.budget(snap, local);
        let d = desired::desired_within(snap, &mut self.classes, local, &budget);
        let n = table_elements(&d);
        if n > self.max_elements {
            return Err(BackendError::refused(
                d.version,
                format!(
                    "{n} table elements needed even with every rule list denied, more than the limit of {}",
                    self.max_elements
                ),
            ));
        }
        Ok(d)
    }

    fn delta(
        &mut self,
        old_snap: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        let Some(old) = self.current.take() else {
            return self.replace(new, local);
        };
        let local = vouched(local, new);
        let holds_base = old.version == old_snap.version && old.digest == Some(old_snap.digest);
        let mut patched = None;
        // A degraded plan is never patched: the patch could not tell when what was cut fits
        // again.
        if self.patchable
            && holds_base
            && old.degraded.is_empty()
            && incremental::applies(old_snap, delta)
        {
            // Pod churn elsewhere: patch the table in place, no full recomputation.
            let cache = self
                .cache
                .get_or_insert_with(|| incremental::cache(old_snap, &old));
            let mut d = incremental::patch(&old, cache, &mut self.classes, old_snap, new, delta);
            d.local = local.clone();
            match d.check(&self.budget(new, &local)) {
                Ok(()) => patched = Some(d),
                Err(over) => {
                    debug!(%over, "the patched version is over the budget; planning it whole")
                }
            }
        }
        let next = match patched {
            Some(d) => d,
            None => {
                self.cache = None;
                match self.plan(new, &local) {
                    Ok(d) => d,
                    Err(e) => {
                        // The numbering moved on with the plan: the next version is planned
                        // whole (the kernel keeps `old` meanwhile).
                        self.patchable = false;
                        self.current = Some(old);
                        return Err(e);
                    }
                }
            }
        };
        let next = Desired {
            epoch: old.epoch,
            ..next
        };
        self.commit(old, next, new, &local)
    }

    /// Moves the kernel from `old` to `next` (planned from `snap` with `local`) in one
    /// transaction, or replaces the table if the kernel refuses the difference.
    fn commit(
        &mut self,
        old: Desired,
        next: Desired,
        snap: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        match commit_delta(&self.lock, &mut self.conn, render::delta(&old, &next)) {
            Ok(_) => {
                self.patchable = true;
                let applied = self.in_force(next, snap);
                Ok(applied)
            }
            Err(e) => {
                // The kernel refused the incremental batch (and so applied none of it): fall
                // back to one full replacement, still a single transaction.
                warn!(error = %e, "incremental update refused; replacing the table");
                self.current = Some(old);
                self.replace(snap, local)
            }
        }
    }

    fn replace(&mut self, snap: &NodeSnapshot, local: &LocalPods) -> Result<Applied, BackendError> {
        // A fresh numbering for a full replacement: nothing in the kernel to stay close to.
        self.classes = Classes::default();
        self.cache = None;
        self.patchable = false;
        let local = vouched(local, snap);
        let mut d = self.plan(snap, &local)?;
        match nft::objects().map_err(failed)? {
            None => {
                d.epoch = rand::random();
                nft::apply(&self.lock, render::full(&d)).map_err(failed)?;
            }
            Some(held) => self.swap(&mut d, held)?,
        }
        self.patchable = true;
        debug!(
            version = snap.version,
            elements = table_elements(&d),
            rulesets = d.rulesets.len(),
            "table replaced"
        );
        Ok(self.in_force(d, snap))
    }

    /// Replaces the table in force, `held`, with `d` without deleting anything its rules use
    /// in the same commit: a packet those rules are judging as it commits looks its sets up
    /// in the new generation, where a deleted map is empty, and would be dropped however
    /// both versions judge it. So `d`'s objects are added under a new epoch, the local pod
    /// table (the base chains' verdict maps) switched to them, and the old objects deleted
    /// only after that, and after every packet the old rules were judging has left them
    /// ([`nft::grace_period`]).
    fn swap(&mut self, d: &mut Desired, held: nft::Objects) -> Result<(), BackendError> {
        let names: Vec<&str> = held
            .chains
            .iter()
            .map(String::as_str)
            .chain(held.sets.iter().filter_map(|s| s["name"].as_str()))
            .collect();
        // An epoch nothing in the table is named after, so staging never adds to old objects.
        d.epoch = loop {
            let e = rand::random();
            let suffix = render::in_epoch("", e);
            if !names.iter().any(|n| n.contains(&suffix)) {
                break e;
            }
        };
        let switched = nft::apply(&self.lock, render::stage(d))
            .and_then(|()| commit_delta(&self.lock, &mut self.conn, render::switch(d)));
        if let Err(e) = switched {
            // E.g. a table of an earlier layout, without the local pod table to switch.
            warn!(error = %e, "could not replace the table beside its rules; replacing it in one transaction");
            return nft::apply(&self.lock, render::full(d)).map_err(failed);
        }
        // A packet the old local pod table sent into the old rulesets before the switch
        // committed may still be in them, about to look up their maps.
        nft::grace_period();
        let chains: Vec<String> = held
            .chains
            .into_iter()
            .filter(|c| !render::SHARED_CHAINS.contains(&c.as_str()))
            .collect();
        let sets: Vec<serde_json::Value> = held
            .sets
            .into_iter()
            .filter(|s| !render::SHARED_SETS.iter().any(|n| s["name"] == *n))
            .collect();
        if !(chains.is_empty() && sets.is_empty())
            && let Err(e) = commit_delta(&self.lock, &mut self.conn, render::sweep(&chains, &sets))
        {
            // Unreachable leftovers cost memory, not correctness; the next replacement retries.
            warn!(error = %e, "could not delete the replaced table's objects");
        }
        Ok(())
    }

    /// Records `d` (planned from `snap`) as what the kernel holds now.
    fn in_force(&mut self, d: Desired, snap: &NodeSnapshot) -> Applied {
        for g in &d.degraded {
            warn!(
                version = d.version,
                egress = g.egress,
                endpoints = g.endpoints.len(),
                rules = g.rules.len(),
                reason = %g.reason,
                "a rule list does not fit: its endpoints deny everything in its direction"
            );
        }
        let applied = Applied {
            degraded: d.degraded.clone(),
        };
        self.current = Some(d);
        self.snap = Some(snap.clone());
        applied
    }
}

fn failed(e: nft::Error) -> BackendError {
    BackendError::failed("replacing the table", e)
}

impl Backend for NftBackend {
    fn name(&self) -> &str {
        "nft"
    }

    fn capabilities(&self) -> Capabilities {
        let mut probes = self.probes.clone();
        probes.insert(
            "nft".to_string(),
            NftBackend::probe().map_or_else(|e| e, |_| self.version.clone()),
        );
        Capabilities::of_this_kernel(probes)
    }

    fn adopt(
        &mut self,
        last: Option<&NodeSnapshot>,
        local: &LocalPods,
    ) -> Result<Adopted, BackendError> {
        let recorded =
            nft::recorded().map_err(|e| BackendError::failed("reading the table's record", e))?;
        match (recorded, last) {
            (Some((v, d)), Some(s)) if v == s.version && d == s.digest.to_string() => {
                // The kernel holds exactly what we persisted: replace it in one transaction
                // (the same rules, and the local pod table as the node is now).
                info!(version = v, "adopting the table left by the previous run");
                self.replace(s, local)?;
                Ok(Adopted::Enforcing)
            }
            (Some((v, _)), None) => {
                // Kept as it is, local pod table included: an interface or address that came
                // since is unclassified or unknown there, so it is denied until the full
                // snapshot the agent asks for replaces the table.
                warn!(
                    version = v,
                    "a Moat table exists but there is no local record; keeping it until the server sends a full snapshot"
                );
                Ok(Adopted::Unknown)
            }
            (Some((v, _)), Some(s)) if v > s.version => {
                // Newer than our record (applied just before a crash) or unnamed: keep it
                // (as above).
                warn!(
                    version = v,
                    "the table holds rules newer than the local record; keeping them"
                );
                Ok(Adopted::Unknown)
            }
            (_, Some(s)) => {
                info!(version = s.version, "restoring the last applied rules");
                self.replace(s, local)?;
                Ok(Adopted::Enforcing)
            }
            (None, None) => Ok(Adopted::Nothing),
        }
    }

    fn apply_full(
        &mut self,
        snap: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        self.replace(snap, local)
    }

    fn apply_delta(
        &mut self,
        old_snap: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        self.delta(old_snap, delta, new, local)
    }

    fn set_local(&mut self, local: &LocalPods) -> Result<(), BackendError> {
        let (Some(mut d), Some(snap)) = (self.current.take(), self.snap.clone()) else {
            // Nothing applied yet: the first version brings its local pod table along.
            return Ok(());
        };
        let local = vouched(local, &snap);
        let prev = std::mem::replace(&mut d.local, local.clone());
        // The table's budget moves with the local pod table: plan again when it no longer
        // fits, or when what an earlier budget cut might fit now.
        if d.degraded.is_empty() && table_elements(&d) <= self.max_elements {
            match commit_delta(&self.lock, &mut self.conn, render::relocal(&d, &prev)) {
                Ok(_) => {
                    self.current = Some(d);
                    return Ok(());
                }
                Err(e) => {
                    warn!(error = %e, "local pod table update refused; replacing the table");
                    d.local = prev;
                    self.current = Some(d);
                    return self.replace(&snap, &local).map(|_| ());
                }
            }
        }
        d.local = prev;
        self.cache = None;
        let next = match self.plan(&snap, &local) {
            Ok(next) => Desired {
                epoch: d.epoch,
                ..next
            },
            Err(e) => {
                self.patchable = false;
                self.current = Some(d);
                return Err(e);
            }
        };
        self.commit(d, next, &snap, &local).map(|_| ())
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let mut c = BTreeMap::new();
        if let Some(d) = &self.current {
            c.insert("elements".into(), table_elements(d) as u64);
            c.insert("rulesets".into(), d.rulesets.len() as u64);
        }
        for (name, n) in nft::counters() {
            let report = match name.as_str() {
                render::DENIED => "denied_packets",
                local::SPOOFED => counters::SPOOFED,
                local::UNKNOWN_POD => counters::UNKNOWN_POD,
                local::UNCLASSIFIED => counters::UNCLASSIFIED,
                _ => continue,
            };
            c.insert(report.into(), n);
        }
        c
    }

    fn remove_all(&mut self) -> Result<(), BackendError> {
        self.current = None;
        self.snap = None;
        nft::delete_table(&self.lock).map_err(|e| BackendError::failed("deleting the table", e))
    }
}
