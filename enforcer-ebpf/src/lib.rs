//! The eBPF dataplane: tc programs on every interface of the node's namespace, judging new
//! flows after DNAT with a fixed number of map lookups, remembering allowed flows, and
//! switching versions atomically between two map slots. See docs/design/ebpf.md.
//!
//! A version is installed as: record the version as pending → write the difference into the
//! slot no packet reads → flip the selector → record it as in force (the ACK can go now).
//! Then, in the background: wait out every program still reading the old slot (an RCU grace
//! period, milliseconds) → replay the same difference onto the old slot. Both slots then
//! hold the new version, so the next change, which first waits for that replay, is again a
//! difference.
//!
//! Deltas that only move addresses between groups patch the plan in place
//! ([`moat_dataplane::plan::incremental`]) and turn the patch into map changes directly, so
//! their cost is that of the change, not of the node's rules.

#![deny(rust_2018_idioms)]

pub mod dataplane;
pub mod entries;
pub mod flows;
pub mod migrate;
pub mod probe;
pub mod sys;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use moat_dataplane::plan::{Classes, Desired, desired, incremental};
use moat_dataplane::{Adopted, Applied, Backend, BackendError, Capabilities, Cause, LocalPods};
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::Delta;
use tracing::{debug, info, warn};

pub use dataplane::{Dataplane, DataplaneError, Maps};
use entries::{Diff, Entries, RulesetIds};
pub use moat_ebpf_common::{LAYOUT_VERSION, LocalAddr, META_PENDING, META_VALID, Meta};

pub struct EbpfBackend {
    dp: Dataplane,
    classes: Classes,
    ids: RulesetIds,
    /// What both slots hold, unless `standby_unknown`.
    current: Entries,
    /// The plan `current` was made from, kept for in-place patches.
    plan: Option<Desired>,
    cache: Option<incremental::Cache>,
    /// The replay of the version in force onto the unused slot, running in the background.
    replay: Option<std::thread::JoinHandle<(Maps, Result<(), DataplaneError>)>>,
    /// Map handles for the next replay.
    spare: Option<Maps>,
    /// Stops the flow-table sweeper.
    sweeper: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Link events: a new interface gets the programs without waiting for a version.
    links: Option<sys::LinkWatch>,
    /// Whether `adopt` ran (the programs are attached from then on).
    adopted: bool,
    /// The standby slot's content is not known (first change after a start, or a failed
    /// write): the next change rewrites slots whole instead of patching them.
    standby_unknown: bool,
    probes: BTreeMap<String, String>,
    bpffs: PathBuf,
    node: String,
}

/// `map_err` for a failed step named `op`.
fn failed<E: Into<Cause>>(op: &'static str) -> impl FnOnce(E) -> BackendError {
    move |e| BackendError::failed(op, e)
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
        let sweeper = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        flows::start_sweeper(dp.map_dir(), sweeper.clone())?;
        let links = sys::LinkWatch::new()
            .map_err(|e| warn!(error = %e, "no link events; new interfaces are attached with the next version"))
            .ok();
        Ok(EbpfBackend {
            sweeper,
            links,
            adopted: false,
            dp,
            classes: Classes::default(),
            ids: RulesetIds::default(),
            current: Entries::default(),
            plan: None,
            cache: None,
            replay: None,
            spare: None,
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

    /// The map entries of the version in force.
    pub fn installed(&self) -> &Entries {
        &self.current
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

    /// Installs `snap` from its whole plan.
    fn install(&mut self, snap: &NodeSnapshot) -> Result<(), BackendError> {
        self.settle();
        self.plan = None;
        let plan = desired(snap, &mut self.classes);
        let new = entries::entries(&plan, &mut self.ids);
        new.check_capacity()
            .map_err(|e| BackendError::refused(snap.version, e))?;
        let whole = self.standby_unknown;
        let diff = if whole {
            Diff::between(&Entries::default(), &new)
        } else {
            Diff::between(&self.current, &new)
        };
        self.switch(snap, diff, whole, &new.local)?;
        self.current = new;
        self.plan = Some(plan);
        self.cache = None;
        Ok(())
    }

    /// Installs `new` by patching the plan of `old` in place, if `delta` only moves
    /// addresses between groups and both slots hold `old`: the work is that of the change.
    /// `Ok(false)`: not such a delta; nothing was touched.
    fn install_patch(
        &mut self,
        old: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
    ) -> Result<bool, BackendError> {
        self.settle();
        let holds_old = self
            .plan
            .as_ref()
            .is_some_and(|p| p.version == old.version && p.digest == Some(old.digest));
        if self.standby_unknown || !holds_old || !incremental::applies(old, delta) {
            return Ok(false);
        }
        let plan = self.plan.as_mut().expect("checked above");
        let cache = self
            .cache
            .get_or_insert_with(|| incremental::cache(old, plan));
        let log = incremental::patch_in_place(plan, cache, &mut self.classes, old, new, delta);
        let diff = entries::patched(&log, &mut self.ids);
        // From here on plan and entries describe `new`; if it is not installed, the next
        // version is installed whole.
        self.current.apply(&diff);
        let local = self.current.local.clone();
        let done = self
            .current
            .check_capacity()
            .map_err(|e| BackendError::refused(new.version, e))
            .and_then(|()| self.switch(new, diff, false, &local));
        if done.is_err() {
            self.plan = None;
            self.cache = None;
            self.standby_unknown = true;
        }
        done.map(|()| true)
    }

    /// Writes `diff` into the unused slot (emptied first if `whole`) and makes it the one in
    /// force. Then, in the background, waits out every packet still reading the old slot
    /// and replays `diff` onto it (see [`settle`](Self::settle)). An error means the slot
    /// in force did not change.
    fn switch(
        &mut self,
        snap: &NodeSnapshot,
        diff: Diff,
        whole: bool,
        local: &BTreeSet<LocalAddr>,
    ) -> Result<(), BackendError> {
        self.settle();
        self.dp
            .attach_all()
            .map_err(failed("attaching the programs"))?;
        let active = self
            .dp
            .active_slot()
            .map_err(failed("reading the active slot"))?;
        let standby = 1 - active;
        let stale_local = self
            .dp
            .assign_local(local)
            .map_err(failed("assigning local addresses"))?;
        self.standby_unknown = true;
        // Pending from the first write into the unused slot until the selector has flipped:
        // a crash in between leaves a record that says "unknown", never a wrong version.
        self.dp
            .set_meta(Self::meta_for(snap, META_VALID | META_PENDING))
            .map_err(failed("marking the switch pending"))?;
        if whole {
            self.dp
                .clear(standby)
                .map_err(failed("clearing the standby slot"))?;
        }
        self.dp
            .write(standby, &diff)
            .map_err(failed("writing the standby slot"))?;
        self.dp.flip(standby).map_err(failed("switching slots"))?;
        // In force from here on: a failure below only leaves the unused slot to rewrite.
        if let Err(e) = self.dp.set_meta(Self::meta_for(snap, META_VALID)) {
            warn!(error = %e, "version record not updated; a restart will ask for a full snapshot");
        }
        let maps = match self.spare.take().map_or_else(|| self.dp.open_maps(), Ok) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "the unused slot will be rewritten by the next change");
                return Ok(());
            }
        };
        let barrier = self.dp.barrier();
        let changed = diff.len();
        self.replay = Some(std::thread::spawn(move || {
            let mut maps = maps;
            let done = (|| {
                barrier
                    .wait()
                    .map_err(|e| DataplaneError::Sys("map-of-maps barrier", e))?;
                if whole {
                    maps.clear(active)?;
                }
                maps.write(active, &diff)?;
                maps.release_local(&stale_local)
            })();
            (maps, done)
        }));
        debug!(
            version = snap.version,
            changed,
            whole,
            slot = standby,
            "version in force"
        );
        Ok(())
    }

    /// Waits for the replay of the last version onto the unused slot, which runs in the
    /// background once no packet reads that slot any more. Every change does this first;
    /// afterwards both slots hold the version in force (unless the replay failed, which
    /// makes the next change rewrite the slot whole).
    pub fn settle(&mut self) {
        let Some(replay) = self.replay.take() else {
            return;
        };
        match replay.join() {
            Ok((maps, Ok(()))) => {
                self.spare = Some(maps);
                self.standby_unknown = false;
            }
            Ok((maps, Err(e))) => {
                self.spare = Some(maps);
                warn!(error = %e, "the unused slot will be rewritten by the next change");
            }
            Err(_) => warn!("the replay onto the unused slot panicked; it will be rewritten"),
        }
    }
}

/// `<bpffs>/moat/<node>`: the one directory this node's pins live in (and that uninstall and
/// a backend switch delete recursively). A name that is not one plain path component (`..`,
/// `.`, empty, or containing `/`) would point elsewhere in the bpffs, so it is refused here
/// whatever the caller checked.
pub fn node_dir(bpffs: &std::path::Path, node: &str) -> std::io::Result<PathBuf> {
    let plain = !matches!(node, "" | "." | "..") && !node.contains(['/', '\0']);
    if !plain {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("node name {node:?} cannot name a directory"),
        ));
    }
    Ok(bpffs.join("moat").join(node))
}

/// Removes the pins a previous eBPF run left for `node` under `bpffs` (this node now runs
/// another dataplane): unpinned, its links let go of the programs, which leave every
/// interface. `Ok(false)`: nothing was pinned.
pub fn remove_leftover(bpffs: &std::path::Path, node: &str) -> std::io::Result<bool> {
    let root = node_dir(bpffs, node)?;
    if !sys::is_bpffs(bpffs).unwrap_or(false) || !root.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&root)?;
    Ok(true)
}

impl Drop for EbpfBackend {
    fn drop(&mut self) {
        self.sweeper
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Backend for EbpfBackend {
    fn name(&self) -> &str {
        "ebpf"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::of_this_kernel(self.probes.clone())
    }

    fn adopt(
        &mut self,
        last: Option<&NodeSnapshot>,
        _local: &LocalPods,
    ) -> Result<Adopted, BackendError> {
        // Maps of an older binary's layout become this one's first (their rules stay in
        // force throughout), so what follows reads them as if this binary had written them.
        self.dp
            .migrate()
            .map_err(failed("migrating an older map layout"))?;
        self.adopted = true;
        let meta = self
            .dp
            .meta()
            .map_err(failed("reading the version record"))?;
        // Programs first: whatever the maps hold is enforced on every interface, and links
        // a previous run pinned now run this binary's program.
        self.dp
            .attach_all()
            .map_err(failed("attaching the programs"))?;
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
                self.plan = Some(plan);
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

    fn apply_full(
        &mut self,
        snap: &NodeSnapshot,
        _local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        self.install(snap)?;
        Ok(Applied::default())
    }

    fn apply_delta(
        &mut self,
        old: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
        _local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        if self.install_patch(old, delta, new)? {
            return Ok(Applied::default());
        }
        // Anything else: the difference of the whole plans, still written as a difference.
        self.install(new)?;
        Ok(Applied::default())
    }

    fn set_local(&mut self, _local: &LocalPods) -> Result<(), BackendError> {
        Ok(())
    }

    fn maintain(&mut self) -> Result<(), BackendError> {
        if self.adopted && self.links.as_ref().is_some_and(|l| l.changed()) {
            let added = self
                .dp
                .attach_all()
                .map_err(failed("attaching the programs"))?;
            if added > 0 {
                debug!(added, "attached to new interfaces");
            }
        }
        Ok(())
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let mut c = self.dp.counters();
        c.insert("entries".into(), self.current.len() as u64);
        c
    }

    fn remove_all(&mut self) -> Result<(), BackendError> {
        self.settle();
        self.sweeper
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let root = node_dir(&self.bpffs, &self.node).map_err(failed("removing the pins"))?;
        // Unpinning the links detaches the programs once this process lets go of them.
        std::fs::remove_dir_all(&root).map_err(failed("removing the pins"))?;
        self.current = Entries::default();
        self.plan = None;
        self.cache = None;
        Ok(())
    }
}

#[cfg(test)]
mod node_dir_tests {
    #[test]
    fn only_plain_names_name_a_node_directory() {
        let bpffs = std::path::Path::new("/sys/fs/bpf");
        assert_eq!(super::node_dir(bpffs, "n1").unwrap(), bpffs.join("moat/n1"));
        for bad in ["", ".", "..", "../x", "a/b", "/", "a\0b"] {
            assert!(super::node_dir(bpffs, bad).is_err(), "{bad:?}");
            assert!(super::remove_leftover(bpffs, bad).is_err(), "{bad:?}");
        }
    }
}
