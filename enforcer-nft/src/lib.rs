//! The nftables dataplane.
//!
//! ```text
//!  table inet moat
//!    chain forward (filter, hook forward, priority 0: after kube-proxy's DNAT in prerouting,
//!                   before SNAT in postrouting; a node's own traffic to its pods takes the
//!                   output hook and is never judged)
//!      ct state established,related accept        ← replies and related ICMP errors
//!      ct state invalid drop
//!      ip saddr vmap @eg4 / ip6 saddr vmap @eg6   ← isolated local sources: egress ruleset
//!      ip daddr vmap @ing4 / ip6 daddr vmap @ing6 ← isolated local destinations: ingress ruleset
//!    chain i_…/e_… per distinct rule list: a fixed number of set lookups (see `desired`)
//!    maps class4/class6 (CIDR ranges → class, intervals), addr4/addr6 (single addresses →
//!    class, hash: pod churn never touches an interval set), sets per ruleset,
//!    set record (one element: version, digest and epoch in its comment)
//! ```
//!
//! The ruleset chains, their sets and the class maps are named after the class numbering
//! (`…_<epoch>`). A delta is one transaction that adds and removes only the elements and
//! chains that changed. A full snapshot builds the table in one transaction when there is
//! none; one in force is replaced beside itself (`render::stage`, `switch`, `sweep`), since a
//! packet caught in the old rules by a commit that deletes their maps would be dropped. The
//! table records the version and digest it holds, so a restarted enforcer trusts what the
//! kernel says.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

/// The dataplane plan both backends share (classes, rulesets, endpoint maps).
pub use moat_dataplane::plan as desired;
pub use moat_dataplane::plan::incremental;

pub mod netlink;
pub mod nft;
pub mod render;

use std::collections::BTreeMap;
use std::path::Path;

use moat_dataplane::{Adopted, Applied, Backend, BackendError, Capabilities, LocalPods};
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::Delta;
use tracing::{debug, info, warn};

use desired::{Classes, Desired};

/// Refuse (NACK) a version whose table would exceed this many elements.
pub const DEFAULT_MAX_ELEMENTS: usize = 2_000_000;

pub struct NftBackend {
    classes: Classes,
    current: Option<Desired>,
    /// For in-place updates of `current`; built on the first delta that can use it, dropped
    /// whenever `current` is recomputed.
    cache: Option<incremental::Cache>,
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
            cache: None,
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

    fn desired(&mut self, snap: &NodeSnapshot) -> Result<Desired, BackendError> {
        let d = desired::desired(snap, &mut self.classes);
        self.fits(&d)?;
        Ok(d)
    }

    /// Refuses a table larger than the limit, before anything reaches the kernel.
    fn fits(&self, d: &Desired) -> Result<(), BackendError> {
        if d.elements() > self.max_elements {
            return Err(BackendError::refused(
                d.version,
                format!(
                    "{} table elements needed, more than the limit of {}",
                    d.elements(),
                    self.max_elements
                ),
            ));
        }
        Ok(())
    }

    fn delta(
        &mut self,
        old_snap: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
    ) -> Result<(), BackendError> {
        let Some(old) = self.current.take() else {
            return self.replace(new);
        };
        let holds_base = old.version == old_snap.version && old.digest == Some(old_snap.digest);
        let d = if holds_base && incremental::applies(old_snap, delta) {
            // Pod churn elsewhere: patch the table in place, no full recomputation.
            let cache = self
                .cache
                .get_or_insert_with(|| incremental::cache(old_snap, &old));
            let d = incremental::patch(&old, cache, &mut self.classes, old_snap, new, delta);
            if let Err(e) = self.fits(&d) {
                // The class numbering moved on with the patch: the next version is applied
                // as a full replacement (the kernel keeps `old` meanwhile).
                self.cache = None;
                return Err(e);
            }
            Desired {
                epoch: old.epoch,
                ..d
            }
        } else {
            self.cache = None;
            match self.desired(new) {
                Ok(d) => Desired {
                    epoch: old.epoch,
                    ..d
                },
                Err(e) => {
                    self.current = Some(old);
                    return Err(e);
                }
            }
        };
        match commit_delta(&self.lock, &mut self.conn, render::delta(&old, &d)) {
            Ok(_) => {
                self.current = Some(d);
                Ok(())
            }
            Err(e) => {
                // The kernel refused the incremental batch (and so applied none of it): fall
                // back to one full replacement, still a single transaction.
                warn!(error = %e, "incremental update refused; replacing the table");
                self.current = Some(old);
                self.replace(new)
            }
        }
    }

    fn replace(&mut self, snap: &NodeSnapshot) -> Result<(), BackendError> {
        // A fresh numbering for a full replacement: nothing in the kernel to stay close to.
        self.classes = Classes::default();
        self.cache = None;
        let mut d = self.desired(snap)?;
        match nft::objects().map_err(failed)? {
            None => {
                d.epoch = rand::random();
                nft::apply(&self.lock, render::full(&d)).map_err(failed)?;
            }
            Some(held) => self.swap(&mut d, held)?,
        }
        debug!(
            version = snap.version,
            elements = d.elements(),
            rulesets = d.rulesets.len(),
            "table replaced"
        );
        self.current = Some(d);
        Ok(())
    }

    /// Replaces the table in force, `held`, with `d` without deleting anything its rules use
    /// in the same commit: a packet those rules are judging as it commits looks its sets up
    /// in the new generation, where a deleted map is empty, and would be dropped however
    /// both versions judge it. So `d`'s objects are added under a new epoch, the verdict maps
    /// switched to them, and the old objects deleted only after that.
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
            warn!(error = %e, "could not replace the table beside its rules; replacing it in one transaction");
            return nft::apply(&self.lock, render::full(d)).map_err(failed);
        }
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
}

fn failed(e: nft::Error) -> BackendError {
    BackendError::failed("replacing the table", e)
}

/// Which way a delta reached the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Netlink,
    Nft,
}

/// Commits a delta batch (from [`render::delta`]) as one transaction: element-only batches
/// (pod churn) straight over netlink, everything else through `nft`. Same commands, same
/// all-or-nothing guarantee either way.
pub fn commit_delta(
    lock: &nft::TxLock,
    conn: &mut Option<netlink::Conn>,
    commands: Vec<serde_json::Value>,
) -> Result<Via, nft::Error> {
    if conn.is_none() {
        // Without a netlink socket every batch goes through nft.
        *conn = netlink::Conn::open().ok();
    }
    let Some(c) = conn else {
        return nft::apply(lock, commands).map(|()| Via::Nft);
    };
    // Encodes once: `Ok(false)` (nothing sent) when the batch needs nft.
    match c.apply(&commands) {
        Ok(true) => Ok(Via::Netlink),
        Ok(false) => nft::apply(lock, commands).map(|()| Via::Nft),
        Err(e) => {
            // A fresh socket next time: this one may hold answers we never read.
            *conn = None;
            Err(nft::Error::Refused(e.to_string()))
        }
    }
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
        _local: &LocalPods,
    ) -> Result<Adopted, BackendError> {
        let recorded =
            nft::recorded().map_err(|e| BackendError::failed("reading the table's record", e))?;
        match (recorded, last) {
            (Some((v, d)), Some(s)) if v == s.version && d == s.digest.to_string() => {
                // The kernel holds exactly what we persisted: replace it with the same content
                // (so no packet sees a difference) to know its layout.
                info!(version = v, "adopting the table left by the previous run");
                self.replace(s)?;
                Ok(Adopted::Enforcing)
            }
            (Some((v, _)), None) => {
                warn!(
                    version = v,
                    "a Moat table exists but there is no local record; keeping it until the server sends a full snapshot"
                );
                Ok(Adopted::Unknown)
            }
            (Some((v, _)), Some(s)) if v > s.version => {
                // Newer than our record (applied just before a crash) or unnamed: keep it.
                warn!(
                    version = v,
                    "the table holds rules newer than the local record; keeping them"
                );
                Ok(Adopted::Unknown)
            }
            (_, Some(s)) => {
                info!(version = s.version, "restoring the last applied rules");
                self.replace(s)?;
                Ok(Adopted::Enforcing)
            }
            (None, None) => Ok(Adopted::Nothing),
        }
    }

    fn apply_full(
        &mut self,
        snap: &NodeSnapshot,
        _local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        self.replace(snap)?;
        Ok(Applied::default())
    }

    fn set_local(&mut self, _local: &LocalPods) -> Result<(), BackendError> {
        Ok(())
    }

    fn apply_delta(
        &mut self,
        old_snap: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
        _local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        self.delta(old_snap, delta, new)?;
        Ok(Applied::default())
    }
    fn counters(&self) -> BTreeMap<String, u64> {
        let mut c = BTreeMap::new();
        if let Some(d) = &self.current {
            c.insert("elements".into(), d.elements() as u64);
            c.insert("rulesets".into(), d.rulesets.len() as u64);
        }
        if let Some(n) = nft::denied() {
            c.insert("denied_packets".into(), n);
        }
        c
    }

    fn remove_all(&mut self) -> Result<(), BackendError> {
        self.current = None;
        nft::delete_table(&self.lock).map_err(|e| BackendError::failed("deleting the table", e))
    }
}
