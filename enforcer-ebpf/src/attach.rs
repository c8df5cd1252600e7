//! The programs and the interfaces they are on. Each interface gets the variant of its kind
//! (`PodInterfaces::kind`, the rule the agent's classification uses too): pod interfaces
//! `moat_ingress_pod`/`moat_egress_pod`, every other one (but loopback) `moat_ingress`/
//! `moat_egress`. A dedicated thread ([`Attacher`]) puts them on a new interface the moment
//! netlink announces it, so nothing passes a pod's interface before the programs judge it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use aya::Ebpf;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use moat_dataplane::local::{Kind, PodInterfaces};
use tracing::{debug, info, warn};

use crate::dataplane::DataplaneError;
use crate::sys;

type Result<T> = std::result::Result<T, DataplaneError>;

pub const INGRESS: &str = "moat_ingress";
pub const EGRESS: &str = "moat_egress";
/// Layout 5 on: the variants for pod interfaces.
pub const INGRESS_POD: &str = "moat_ingress_pod";
pub const EGRESS_POD: &str = "moat_egress_pod";

pub struct Progs {
    ebpf: Ebpf,
    links: PathBuf,
    layout: u32,
    /// Interfaces this process attached to (or took over): ifindex → name and kind.
    attached: BTreeMap<u32, (String, Kind)>,
    /// Attach calls so far (tests: the attacher's work is visible).
    pub attaches: u64,
}

/// Which programs a pass attaches first.
///
/// The first pass of a run covers a node whose traffic flows already, enforced by the
/// other dataplane or a previous run of this layout: every ingress program first, so no
/// egress program ever sees a packet its sender's ingress program did not mark (it would
/// drop it as unclassified). Replacing an older layout's programs, egress first: the old
/// egress program would read this layout's findings as its sender index and may judge the
/// packet as another pod's (see `MARK_CLASSIFIED`), while this one decodes the old index.
/// A later pass is a new interface: egress first on it, so no packet reaches it unjudged;
/// its own packets are unclassified for an instant.
pub fn attach_order(first_pass: bool, replacing_older: bool) -> [TcAttachType; 2] {
    if first_pass && !replacing_older {
        [TcAttachType::Ingress, TcAttachType::Egress]
    } else {
        [TcAttachType::Egress, TcAttachType::Ingress]
    }
}

impl Progs {
    /// Loads (verifies) the programs of `layout` from `ebpf`.
    pub fn load(ebpf: Ebpf, links: PathBuf, layout: u32) -> Result<Self> {
        let mut p = Progs {
            ebpf,
            links,
            layout,
            attached: BTreeMap::new(),
            attaches: 0,
        };
        for name in p.names() {
            p.program(name)?
                .load()
                .map_err(|e| DataplaneError::Program(name, e))?;
        }
        Ok(p)
    }

    fn names(&self) -> &'static [&'static str] {
        if self.layout >= 5 {
            &[INGRESS, EGRESS, INGRESS_POD, EGRESS_POD]
        } else {
            &[INGRESS, EGRESS]
        }
    }

    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Program(
                name,
                aya::programs::ProgramError::NotLoaded,
            ))?
            .try_into()
            .map_err(|e| DataplaneError::Program(name, e))
    }

    /// Attaches the programs of its kind to every interface but loopback that has none (or
    /// another kind's) from this run, replacing (atomically, through the pinned link) what a
    /// previous run attached. Returns how many interfaces it attached to.
    ///
    /// While an older layout is pinned beside this run's (a migration from it has not
    /// finished, or failed), its programs may still be on the links: the egress programs
    /// move first, and if one is refused no ingress program moves at all in this pass (an
    /// old egress program left on an interface would read this layout's findings as its
    /// sender index).
    pub fn attach_all(&mut self, mode: &PodInterfaces) -> Result<usize> {
        let replacing = self.replacing_older();
        let order = attach_order(self.attached.is_empty(), replacing);
        self.attach_pass(mode, order, replacing)
    }

    fn replacing_older(&self) -> bool {
        let Some(root) = self.links.parent() else {
            return false;
        };
        crate::migrate::layouts(root)
            .iter()
            .any(|(n, _)| *n < self.layout)
    }

    fn attach_pass(
        &mut self,
        mode: &PodInterfaces,
        order: [TcAttachType; 2],
        replacing: bool,
    ) -> Result<usize> {
        let links = sys::links().map_err(|e| DataplaneError::Sys("listing links", e))?;
        let todo: Vec<(&moat_dataplane::local::Link, Kind)> = links
            .iter()
            .filter(|l| l.name != "lo")
            .map(|l| (l, mode.kind(l)))
            .filter(|(l, kind)| {
                self.attached.get(&l.index) != Some(&(l.name.clone(), *kind)) || !self.still_on(l)
            })
            .collect();
        let mut vanished = BTreeSet::new();
        // One interface that refuses a program must not leave the others without theirs:
        // the pass goes on, the refused one stays out of `attached` (so the next pass
        // retries it), and the first error is returned at the end.
        let (mut refused, mut first_error) = (BTreeSet::new(), None);
        for ty in &order {
            if replacing && *ty == TcAttachType::Ingress && !refused.is_empty() {
                // Retried whole with the next pass; the egress programs that moved decode
                // the old ingress programs' marks meanwhile.
                return Err(first_error.expect("a refused interface has its error"));
            }
            for (l, kind) in &todo {
                if vanished.contains(&l.index) {
                    continue;
                }
                let (prog, dir) = match (*ty, kind, self.layout >= 5) {
                    (TcAttachType::Ingress, Kind::Pod, true) => (INGRESS_POD, "ingress"),
                    (TcAttachType::Ingress, _, _) => (INGRESS, "ingress"),
                    (_, Kind::Pod, true) => (EGRESS_POD, "egress"),
                    _ => (EGRESS, "egress"),
                };
                let pin = self.links.join(format!("{}-{}-{dir}", l.index, l.name));
                match self.attach_one(prog, *ty, &l.name, &pin) {
                    Ok(()) => {}
                    // Gone between the dump and the attach: nothing to protect.
                    Err(e) if !sys::link_exists(l.index) => {
                        debug!(iface = %l.name, error = %e, "interface vanished while attaching");
                        vanished.insert(l.index);
                    }
                    Err(e) => {
                        warn!(iface = %l.name, error = %e, "attaching; retried with the next pass");
                        refused.insert(l.index);
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        for (l, kind) in &todo {
            if !refused.contains(&l.index) {
                self.attached.insert(l.index, (l.name.clone(), *kind));
            }
        }
        let added = todo.len();
        // Pins of interfaces that are gone hold defunct links: drop them.
        let live: BTreeSet<String> = links
            .iter()
            .map(|l| format!("{}-{}-", l.index, l.name))
            .collect();
        if let Ok(dir) = std::fs::read_dir(&self.links) {
            for e in dir.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if !live.iter().any(|p| f.starts_with(p.as_str())) {
                    debug!(pin = %f, "removing the link pin of a vanished interface");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.attached
            .retain(|i, (n, _)| links.iter().any(|l| l.index == *i && l.name == *n));
        match first_error {
            Some(e) => Err(e),
            None => Ok(added),
        }
    }

    /// Whether the programs this run attached to `l` are still on that very device. An
    /// interface deleted and created again under the same index and name between two passes
    /// (a CNI may ask for the index, or a veth moved into this namespace keeps a free one)
    /// looks unchanged in a link dump, but its links went with the old device: without this
    /// check the new one would carry no program, and traffic to it would pass unjudged.
    fn still_on(&self, l: &moat_dataplane::local::Link) -> bool {
        let pin = self.links.join(format!("{}-{}-egress", l.index, l.name));
        matches!(sys::tcx_link_ifindex(&pin), Ok(Some(i)) if i == l.index)
    }

    fn attach_one(
        &mut self,
        prog_name: &'static str,
        ty: TcAttachType,
        iface: &str,
        pin: &Path,
    ) -> Result<()> {
        let err = |e: String| DataplaneError::Attach(format!("{iface} ({prog_name})"), e);
        self.attaches += 1;
        // A pinned link whose device is gone (or that is on another one) can't take the
        // program: drop it and attach anew. (Updating a defunct link fails, and that failure
        // stopped every later interface of the pass from getting its programs.)
        if pin.exists() {
            let idx: Option<u32> = pin
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.split('-').next())
                .and_then(|i| i.parse().ok());
            if let Ok(Some(on)) = sys::tcx_link_ifindex(pin)
                && Some(on) != idx
            {
                info!(iface, pin = %pin.display(), "dropping the pin of a link whose device is gone");
                let _ = std::fs::remove_file(pin);
            }
        }
        let prog = self.program(prog_name)?;
        let id = match PinnedLink::from_pin(pin) {
            Ok(old) => {
                let link = SchedClassifierLink::try_from(FdLink::from(old))
                    .map_err(|e| err(e.to_string()))?;
                let id = prog.attach_to_link(link).map_err(|e| err(e.to_string()))?;
                info!(
                    iface,
                    prog = prog_name,
                    "replaced the program on a pinned link"
                );
                // Already pinned: keep it, this process's handle just closes later.
                let _ = prog.take_link(id);
                return Ok(());
            }
            Err(_) => prog
                .attach_with_options(iface, ty, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|e| err(e.to_string()))?,
        };
        let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| err(e.to_string()))?;
        fd.pin(pin).map_err(|e| err(e.to_string()))?;
        info!(iface, prog = prog_name, "attached");
        Ok(())
    }

    /// Attaches every program to `iface` and detaches it again (the capability probe).
    pub fn probe_attach(&mut self, iface: &str) -> Result<()> {
        for name in self.names() {
            let ty = if name.contains("ingress") {
                TcAttachType::Ingress
            } else {
                TcAttachType::Egress
            };
            let prog = self.program(name)?;
            let id = prog
                .attach_with_options(iface, ty, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|e| DataplaneError::Attach(format!("{iface} ({name})"), e.to_string()))?;
            prog.detach(id)
                .map_err(|e| DataplaneError::Attach(format!("{iface} ({name})"), e.to_string()))?;
        }
        Ok(())
    }
}

/// The thread that attaches the programs to a new interface on its RTM_NEWLINK (and
/// re-attaches the right variant when a link or address event may change its kind). Stops
/// when dropped.
pub struct Attacher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Attacher {
    pub fn start(progs: Arc<Mutex<Progs>>, mode: PodInterfaces) -> std::io::Result<Attacher> {
        let watch = sys::LinkWatch::new()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("moat-attacher".into())
            .spawn(move || {
                // Links that appeared before the socket was bound.
                let (mut pending, mut failed) = (true, false);
                while !stopped.load(Ordering::Relaxed) {
                    if pending {
                        let mut p = progs.lock().unwrap_or_else(|e| e.into_inner());
                        failed = match p.attach_all(&mode) {
                            Ok(n) => {
                                if n > 0 {
                                    debug!(added = n, "attached to new interfaces");
                                }
                                false
                            }
                            Err(e) => {
                                warn!(error = %e, "attaching to new interfaces");
                                true
                            }
                        };
                    }
                    // A failed pass is retried at the latest after the wait, event or not.
                    pending = watch.wait(std::time::Duration::from_millis(200)) || failed;
                }
            })?;
        Ok(Attacher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Attacher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_layouts_links_move_egress_first() {
        use TcAttachType::{Egress, Ingress};
        assert_eq!(
            attach_order(true, false),
            [Ingress, Egress],
            "a node already enforced"
        );
        assert_eq!(
            attach_order(true, true),
            [Egress, Ingress],
            "the old egress program must never read this layout's findings"
        );
        assert_eq!(
            attach_order(false, false),
            [Egress, Ingress],
            "a new interface"
        );
    }
}
