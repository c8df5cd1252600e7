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

pub mod attach;
pub mod dataplane;
pub mod entries;
pub mod flows;
pub mod migrate;
pub mod pods;
pub mod probe;
pub mod sys;

use std::collections::BTreeMap;
use std::path::PathBuf;

use moat_dataplane::local::PodInterfaces;
use moat_dataplane::plan::{Budget, Classes, Degraded, Desired, desired_within, incremental};
use moat_dataplane::{Adopted, Applied, Backend, BackendError, Capabilities, Cause, LocalPods};
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::Delta;
use tracing::{debug, info, warn};

pub use dataplane::{Dataplane, DataplaneError, Maps};
use entries::{Diff, Entries, RulesetIds};
pub use moat_ebpf_common as common;
pub use moat_ebpf_common::{LAYOUT_VERSION, META_PENDING, META_VALID, Meta};
use pods::PodTables;

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
    /// Which interfaces are pods (the programs' variant per interface).
    mode: PodInterfaces,
    /// Puts the programs on a new interface the moment it appears (from `adopt` on).
    attacher: Option<attach::Attacher>,
    /// What the local pod maps hold.
    pods: PodTables,
    /// What one version may hold: half of each map (the other half is the other slot's).
    budget: Budget,
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
    /// `mode` says which interfaces are pods (`--pod-interfaces`); `probes` are the
    /// capability probe's findings, reported with the backend.
    pub fn open(
        bpffs: PathBuf,
        node: &str,
        mode: PodInterfaces,
        probes: BTreeMap<String, String>,
    ) -> Result<Self, DataplaneError> {
        let dp = Dataplane::open(&bpffs, node)?;
        let sweeper = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        flows::start_sweeper(dp.map_dir(), sweeper.clone())?;
        let pods = dp.read_pods();
        Ok(EbpfBackend {
            sweeper,
            mode,
            attacher: None,
            pods,
            budget: entries::budget(None, dp.layout),
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

    /// Caps a version's elements in all maps together (`--max-elements`), below what the
    /// maps hold; `None`: only the maps' capacities.
    pub fn set_max_elements(&mut self, total: Option<usize>) {
        self.budget = entries::budget(total, self.dp.layout);
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
    fn install(
        &mut self,
        snap: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Vec<Degraded>, BackendError> {
        self.settle();
        self.plan = None;
        // Counted while it is built: what does not fit is denied, never refused whole.
        let plan = desired_within(snap, &mut self.classes, local, &self.budget);
        for d in &plan.degraded {
            warn!(
                version = snap.version,
                egress = d.egress,
                endpoints = d.endpoints.len(),
                reason = %d.reason,
                "a rule list does not fit; its endpoints deny in its direction"
            );
        }
        let new = entries::entries(&plan, &mut self.ids);
        new.check_capacity()
            .map_err(|e| BackendError::refused(snap.version, e))?;
        let whole = self.standby_unknown;
        let diff = if whole {
            Diff::between(&Entries::default(), &new)
        } else {
            Diff::between(&self.current, &new)
        };
        self.switch(snap, diff, whole, local)?;
        self.current = new;
        let degraded = plan.degraded.clone();
        self.plan = Some(plan);
        self.cache = None;
        Ok(degraded)
    }

    /// Installs `new` by patching the plan of `old` in place, if `delta` only moves
    /// addresses between groups and both slots hold `old`: the work is that of the change.
    /// `Ok(false)`: not such a delta; nothing was touched.
    fn install_patch(
        &mut self,
        old: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<bool, BackendError> {
        self.settle();
        let holds_old = self
            .plan
            .as_ref()
            .is_some_and(|p| p.version == old.version && p.digest == Some(old.digest));
        // A degraded plan is recomputed whole: what fits may have changed.
        let degraded = self.plan.as_ref().is_some_and(|p| !p.degraded.is_empty());
        if self.standby_unknown || !holds_old || degraded || !incremental::applies(old, delta) {
            return Ok(false);
        }
        let plan = self.plan.as_mut().expect("checked above");
        let cache = self
            .cache
            .get_or_insert_with(|| incremental::cache(old, plan));
        let log = incremental::patch_in_place(plan, cache, &mut self.classes, old, new, delta);
        plan.local = local.clone();
        if let Err(e) = plan.check(&self.budget) {
            // Patched past the budget: the whole plan, counted, decides what is cut.
            debug!(error = %e, "the patched plan does not fit; recomputing it whole");
            self.plan = None;
            self.cache = None;
            return Ok(false);
        }
        let diff = entries::patched(&log, &mut self.ids);
        // From here on plan and entries describe `new`; if it is not installed, the next
        // version is installed whole.
        self.current.apply(&diff);
        let done = self
            .current
            .check_capacity()
            .map_err(|e| BackendError::refused(new.version, e))
            .and_then(|()| self.switch(new, diff, false, local));
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
        local: &LocalPods,
    ) -> Result<(), BackendError> {
        self.settle();
        // An older layout still pinned means its migration failed when this run adopted
        // the node: tried again (it renumbers the old sender indices and lets a mark
        // without one be checked on its source). If it fails again the links still move,
        // egress first, and the egress program checks the old marks it cannot decode.
        if let Err(e) = self.dp.migrate(&self.mode) {
            warn!(error = %e, "migrating an older map layout failed again; moving the links without it");
        }
        self.dp
            .attach_all(&self.mode)
            .map_err(failed("attaching the programs"))?;
        let active = self
            .dp
            .active_slot()
            .map_err(failed("reading the active slot"))?;
        let standby = 1 - active;
        let pods = PodTables::of(local);
        let (less, more) = self.pods.diff(&pods);
        // Less trust before the flip: no packet judged by the old rules sees an address
        // trusted that the new version distrusts.
        let written = self.dp.write_pods(&less);
        self.pods = self.dp.read_pods();
        written.map_err(failed("writing local pods"))?;
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
        // More trust only once the new rules are in force.
        let written = self.dp.write_pods(&more);
        self.pods = self.dp.read_pods();
        if let Err(e) = written {
            // The rules are in force; the addresses not yet trusted stay denied until the
            // next local pod update retries them.
            warn!(error = %e, "local pods not fully written; the missing ones stay denied");
        }
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
                maps.write(active, &diff)
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
        self.attacher = None;
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
        local: &LocalPods,
    ) -> Result<Adopted, BackendError> {
        // The local pods first: a migration moves the links to this layout's programs,
        // which drop every forwarded new flow until they know the node's pods.
        self.set_local(local)?;
        // Maps of an older binary's layout become this one's first (their rules stay in
        // force throughout), so what follows reads them as if this binary had written them.
        // A failed migration is reported once the programs are on every interface, new
        // ones included (the next version tries it again).
        let migrated = self.dp.migrate(&self.mode);
        let meta = self.dp.meta();
        // Programs first: whatever the maps hold is enforced on every interface, and links
        // a previous run pinned now run this binary's program. From here on new interfaces
        // get them the moment they appear.
        let attached = self.dp.attach_all(&self.mode);
        // Started whatever that pass met: it retries an interface that refused its program.
        if self.attacher.is_none() {
            match attach::Attacher::start(self.dp.shared_progs(), self.mode.clone()) {
                Ok(a) => self.attacher = Some(a),
                Err(e) => {
                    warn!(error = %e, "no link events; new interfaces are attached with the next version")
                }
            }
        }
        let migrated = migrated.map_err(failed("migrating an older map layout"))?;
        attached.map_err(failed("attaching the programs"))?;
        let meta = meta.map_err(failed("reading the version record"))?;
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
                if let Some(from) = migrated {
                    // The migrated maps hold what the older layout could enforce (before 6,
                    // cluster tiers denied whole): the same version, written again in this
                    // layout's terms, switches atomically like any other.
                    info!(
                        version = s.version,
                        from, "installing the version in force again in this binary's layout"
                    );
                    self.install(s, local)?;
                    return Ok(Adopted::Enforcing);
                }
                info!(
                    version = s.version,
                    "adopting the maps left by the previous run"
                );
                let plan = desired_within(s, &mut self.classes, local, &self.budget);
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
        local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        let degraded = self.install(snap, local)?;
        Ok(Applied { degraded })
    }

    fn apply_delta(
        &mut self,
        old: &NodeSnapshot,
        delta: &Delta,
        new: &NodeSnapshot,
        local: &LocalPods,
    ) -> Result<Applied, BackendError> {
        if self.install_patch(old, delta, new, local)? {
            return Ok(Applied::default());
        }
        // Anything else: the difference of the whole plans, still written as a difference.
        let degraded = self.install(new, local)?;
        Ok(Applied { degraded })
    }

    fn set_local(&mut self, local: &LocalPods) -> Result<(), BackendError> {
        let (less, more) = self.pods.diff(&PodTables::of(local));
        let written = self
            .dp
            .write_pods(&less)
            .and_then(|()| self.dp.write_pods(&more));
        self.pods = self.dp.read_pods();
        written.map_err(failed("writing local pods"))
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let mut c = self.dp.counters();
        c.insert("entries".into(), self.current.len() as u64);
        c
    }

    fn remove_all(&mut self) -> Result<(), BackendError> {
        self.settle();
        self.attacher = None;
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
