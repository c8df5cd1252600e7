//! The eBPF dataplane: tc programs on every interface of the node's namespace, judging new
//! flows after DNAT with a fixed number of map lookups, remembering allowed flows, and
//! switching versions atomically between two map slots. See docs/design/ebpf.md.
//!
//! A version is installed as: write the difference into the slot no packet reads → record
//! the version as pending → flip the selector and wait out every program still reading the
//! old slot → replay the same difference onto the old slot. Both slots then hold the new
//! version, so the next change is again a difference.

#![deny(rust_2018_idioms)]

pub mod dataplane;
pub mod entries;
pub mod probe;
pub mod sys;

use std::collections::BTreeMap;
use std::path::PathBuf;

use moat_enforcer::plan::{Classes, desired};
use moat_enforcer::{Adopted, Backend, BackendError, Capabilities};
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::Delta;
use tracing::{debug, info, warn};

pub use dataplane::{Dataplane, DataplaneError};
use entries::{Diff, Entries, RulesetIds};
pub use moat_ebpf_common::{META_PENDING, META_VALID, Meta};

pub struct EbpfBackend {
    dp: Dataplane,
    classes: Classes,
    ids: RulesetIds,
    /// What both slots hold, unless `standby_unknown`.
    current: Entries,
    /// The standby slot's content is not known (first change after a start, or a failed
    /// write): the next change rewrites slots whole instead of patching them.
    standby_unknown: bool,
    probes: BTreeMap<String, String>,
    bpffs: PathBuf,
    node: String,
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(e.to_string())
}

impl EbpfBackend {
    /// Loads the datapath for `node`, adopting maps pinned under `<bpffs>/moat/<node>/`.
    /// `probes` are the capability probe's findings, reported with the backend.
    pub fn open(
        bpffs: PathBuf,
        node: &str,
        probes: BTreeMap<String, String>,
    ) -> Result<Self, DataplaneError> {
        let dp = Dataplane::open(&bpffs, node)?;
        Ok(EbpfBackend {
            dp,
            classes: Classes::default(),
            ids: RulesetIds::default(),
            current: Entries::default(),
            standby_unknown: true,
            probes,
            bpffs,
            node: node.to_string(),
        })
    }

    pub fn set_probes(&mut self, probes: BTreeMap<String, String>) {
        self.probes = probes;
    }

    /// Adds one finding to the reported probes.
    pub fn note_probe(&mut self, name: &str, value: String) {
        self.probes.insert(name.to_string(), value);
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    fn meta_for(snap: &NodeSnapshot, flags: u32) -> Meta {
        Meta {
            version: snap.version,
            digest: snap.digest.0,
            flags,
            _pad: 0,
        }
    }

    /// Installs `snap` as described in the crate docs.
    fn install(&mut self, snap: &NodeSnapshot) -> Result<(), BackendError> {
        let plan = desired(snap, &mut self.classes);
        let new = entries::entries(&plan, &mut self.ids);
        new.check_capacity()
            .map_err(|e| BackendError::Rejected(format!("version {}: {e}", snap.version)))?;
        self.dp.attach_all().map_err(failed)?;
        let active = self.dp.active_slot().map_err(failed)?;
        let standby = 1 - active;
        let whole = self.standby_unknown;
        let diff = if whole {
            Diff::between(&Entries::default(), &new)
        } else {
            Diff::between(&self.current, &new)
        };
        let stale_local = self.dp.assign_local(&new.local).map_err(failed)?;
        self.standby_unknown = true;
        if whole {
            self.dp.clear(standby).map_err(failed)?;
        }
        self.dp.write(standby, &diff).map_err(failed)?;
        self.dp
            .set_meta(Self::meta_for(snap, META_VALID | META_PENDING))
            .map_err(failed)?;
        self.dp.flip(standby).map_err(failed)?;
        // In force from here on: a failure below only leaves the unused slot to rewrite.
        self.current = new;
        let replay = (|| {
            if whole {
                self.dp.clear(active)?;
            }
            self.dp.write(active, &diff)?;
            self.dp.set_meta(Self::meta_for(snap, META_VALID))?;
            self.dp.release_local(&stale_local)
        })();
        match replay {
            Ok(()) => self.standby_unknown = false,
            Err(e) => warn!(error = %e, "the unused slot will be rewritten by the next change"),
        }
        debug!(
            version = snap.version,
            entries = self.current.len(),
            changed = diff.len(),
            slot = standby,
            "version installed"
        );
        Ok(())
    }
}

impl Backend for EbpfBackend {
    fn name(&self) -> &str {
        "ebpf"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::of_this_kernel(self.probes.clone())
    }

    fn adopt(&mut self, last: Option<&NodeSnapshot>) -> Result<Adopted, BackendError> {
        let meta = self.dp.meta().map_err(failed)?;
        // Programs first: whatever the maps hold is enforced on every interface, and links
        // a previous run pinned now run this binary's program.
        self.dp.attach_all().map_err(failed)?;
        self.standby_unknown = true;
        if meta.flags & META_VALID == 0 {
            return Ok(Adopted::Nothing);
        }
        if meta.flags & META_PENDING != 0 {
            warn!(
                version = meta.version,
                "the previous run stopped while switching versions; keeping what is in force until a full snapshot"
            );
            return Ok(Adopted::Unknown);
        }
        match last {
            Some(s) if s.version == meta.version && s.digest.0 == meta.digest => {
                info!(
                    version = s.version,
                    "adopting the maps left by the previous run"
                );
                let plan = desired(s, &mut self.classes);
                self.current = entries::entries(&plan, &mut self.ids);
                Ok(Adopted::Enforcing)
            }
            _ => {
                warn!(
                    version = meta.version,
                    "the maps hold a version without a matching local record; keeping it until a full snapshot"
                );
                Ok(Adopted::Unknown)
            }
        }
    }

    fn apply_full(&mut self, snap: &NodeSnapshot) -> Result<(), BackendError> {
        self.install(snap)
    }

    fn apply_delta(
        &mut self,
        _old: &NodeSnapshot,
        _delta: &Delta,
        new: &NodeSnapshot,
    ) -> Result<(), BackendError> {
        // The map difference is computed from the plans, so it is as small as the change.
        self.install(new)
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let mut c = self.dp.counters();
        c.insert("entries".into(), self.current.len() as u64);
        c
    }

    fn remove_all(&mut self) -> Result<(), BackendError> {
        let root = self.bpffs.join("moat").join(&self.node);
        // Unpinning the links detaches the programs once this process lets go of them.
        std::fs::remove_dir_all(&root).map_err(failed)?;
        self.current = Entries::default();
        Ok(())
    }
}
