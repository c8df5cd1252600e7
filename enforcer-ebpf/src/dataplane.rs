//! The program and its maps in the kernel: loading (adopting pinned maps), attaching to every
//! interface through pinned TCX links, and writing versions slot by slot.
//!
//! ```text
//!  <bpffs>/moat/<node>/
//!    v<LAYOUT_VERSION>/<MAP>     maps, pinned by name: a restart adopts them as they are
//!    links/<ifindex>-<ifname>-<ingress|egress>
//!                                TCX links: a new program replaces the old one in place
//! ```

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use aya::{Ebpf, EbpfLoader};
use moat_dataplane::local::PodInterfaces;
use moat_ebpf_common::*;
use tracing::info;

use crate::attach::Progs;
use crate::entries::{Diff, Entries};
use crate::pods::{PodTables, PodWrites};
use crate::sys::{self, Barrier, TestRun};

/// The datapath object, built by build.rs.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/moat-datapath"));

/// Loads the datapath from this file instead of the built-in object (to try a build).
pub const OBJECT_ENV: &str = "MOAT_EBPF_OBJECT";

/// For tests only: runs the datapath as an older map layout (with [`OBJECT_ENV`] naming an
/// object built with it), so a test can upgrade a node from it. Such a run never migrates.
pub const TEST_LAYOUT_ENV: &str = "MOAT_EBPF_LAYOUT_FOR_TESTS";

/// The datapath object built into this binary.
pub fn builtin_object() -> &'static [u8] {
    PROGRAM
}

/// The map layout a datapath object declares (its `MOAT_LAYOUT`), `None` for an object
/// built before objects declared it (layouts 1 to 6). `Err`: not an object.
pub fn declared_layout(object: &[u8]) -> std::result::Result<Option<u32>, String> {
    use object::{Object, ObjectSection, ObjectSymbol};
    let file = object::File::parse(object).map_err(|e| format!("not an ELF object: {e}"))?;
    let Some(sym) = file.symbols().find(|s| s.name() == Ok("MOAT_LAYOUT")) else {
        return Ok(None);
    };
    let bad = || "a MOAT_LAYOUT that cannot be read".to_string();
    let section = sym
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .ok_or_else(bad)?;
    let data = section.data().map_err(|_| bad())?;
    // In a relocatable object a symbol's value is its offset in its section.
    let at = usize::try_from(sym.address()).map_err(|_| bad())?;
    let bytes = data.get(at..at + 4).ok_or_else(bad)?;
    Ok(Some(u32::from_le_bytes(
        bytes.try_into().expect("four bytes"),
    )))
}

/// Whether an object given in [`OBJECT_ENV`] may run as map layout `layout`: it must declare
/// that layout. An object declaring none predates the declaration and is refused, but for a
/// test running an older layout's fixture ([`TEST_LAYOUT_ENV`]). `Err`: what it is.
fn check_object_layout(
    object: &[u8],
    layout: u32,
    testing: bool,
) -> std::result::Result<(), String> {
    match declared_layout(object)? {
        Some(n) if n == layout => Ok(()),
        Some(n) => Err(format!("layout {n}")),
        None if testing => Ok(()),
        None => Err("no declared layout (built before objects declared theirs)".to_string()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("bpffs at {0}: {1}")]
    Bpffs(PathBuf, std::io::Error),
    #[error("loading the datapath: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error("map {0}: {1}")]
    Map(&'static str, MapError),
    #[error("attaching to {0}: {1}")]
    Attach(String, String),
    #[error("{0}: {1}")]
    Sys(&'static str, std::io::Error),
    #[error(
        "{0} holds maps of layout {1}, newer than this binary's {2}: run a newer enforcer, or --uninstall first"
    )]
    NewerLayout(PathBuf, u32, u32),
    #[error("cannot migrate maps of layout {0} (this binary migrates from layouts 1 to 5)")]
    UnknownLayout(u32),
    #[error(
        "a program of layout {0} reads every policy map hit as an allow: it cannot hold a deny entry"
    )]
    OlderLayout(u32),
    #[error("{TEST_LAYOUT_ENV}: {0}")]
    TestLayout(String),
    #[error(
        "{OBJECT_ENV} names {0}, a datapath of {1}, but this run writes map layout {2}: a program of another layout would misread its entries (a deny as an allow); build it from this source, or use the built-in object"
    )]
    ObjectLayout(PathBuf, String, u32),
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// Handles on the policy maps. A second set (opened from the pins) lets a background
/// thread replay a version onto the unused slot.
pub struct Maps {
    selector: Array<MapData, u32>,
    endpoints: HashMap<MapData, EndpointKey, u32>,
    addrs: HashMap<MapData, AddrKey, u32>,
    ranges: LpmTrie<MapData, RangeKey, u32>,
    ports: LpmTrie<MapData, PortKey, u8>,
    /// Single ports (layout 3 on); `None` for an older layout's program (tests), whose
    /// `PORTS` holds them as full-length prefixes.
    port_exact: Option<HashMap<MapData, PortKey, u8>>,
    named: HashMap<MapData, NamedKey, u8>,
    /// Local pods (layout 5 on); `None` for an older layout's program (tests).
    pods: Option<PodMaps>,
    meta: Array<MapData, Meta>,
    counters: PerCpuArray<MapData, u64>,
    /// The program's layout: before 6 (tests), values are what it reads (see [`Maps::write`]).
    layout: u32,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T> {
    let map = ebpf.take_map(name).ok_or(DataplaneError::Map(
        name,
        MapError::InvalidName { name: name.into() },
    ))?;
    T::try_from(map).map_err(|e| DataplaneError::Map(name, e))
}

/// The local pod maps (see [`crate::pods`]).
pub struct PodMaps {
    pods: HashMap<MapData, PodKey, u8>,
    addrs: HashMap<MapData, LocalKey, u8>,
    ifaces: HashMap<MapData, u32, Iface>,
}

/// The directory of the newest layout pinned for `node`, if it holds the pin `name`: an
/// upgrade in progress still shows what is in force.
fn newest_pin_dir(bpffs: &Path, node: &str, name: &str) -> Result<Option<PathBuf>> {
    let root = crate::node_dir(bpffs, node).map_err(|e| DataplaneError::Bpffs(bpffs.into(), e))?;
    Ok(crate::migrate::layouts(&root)
        .pop()
        .map(|(_, dir)| dir)
        .filter(|dir| dir.join(name).exists()))
}

/// The drop and allow counters pinned for `node` (summed over CPUs), read without loading
/// anything: what a test shows when a verdict surprised it. Empty if nothing is pinned.
pub fn pinned_counters(bpffs: &Path, node: &str) -> Result<BTreeMap<String, u64>> {
    let Some(dir) = newest_pin_dir(bpffs, node, MapNames::COUNTERS)? else {
        return Ok(BTreeMap::new());
    };
    let counters: PerCpuArray<MapData, u64> = pinned(&dir, MapNames::COUNTERS)?;
    Ok(counters_of(&counters))
}

/// The version record pinned for `node`, read without loading anything: what an operator
/// (or a test) sees of a running dataplane. `None` if nothing is pinned.
pub fn pinned_meta(bpffs: &Path, node: &str) -> Result<Option<Meta>> {
    let Some(dir) = newest_pin_dir(bpffs, node, MapNames::META)? else {
        return Ok(None);
    };
    let map: Array<MapData, Meta> = pinned(&dir, MapNames::META)?;
    map.get(&0, 0)
        .map(Some)
        .map_err(|e| DataplaneError::Map(MapNames::META, e))
}

pub struct Dataplane {
    /// The programs and the links they are on, shared with the attacher thread.
    progs: std::sync::Arc<std::sync::Mutex<Progs>>,
    maps: Maps,
    barrier: std::sync::Arc<Barrier>,
    /// Where the maps are pinned: `<root>/v<layout>`.
    dir: PathBuf,
    pub(crate) root: PathBuf,
    /// The map layout this run uses (this binary's, unless a test asked for an older one).
    pub(crate) layout: u32,
}

pub use crate::attach::{EGRESS, EGRESS_POD, INGRESS, INGRESS_POD};

impl Dataplane {
    /// Loads the program with its maps pinned under `<bpffs>/moat/<node>/`, adopting maps a
    /// previous run left there. Attaches nothing yet.
    pub fn open(bpffs: &Path, node: &str) -> Result<Self> {
        let root =
            crate::node_dir(bpffs, node).map_err(|e| DataplaneError::Bpffs(bpffs.into(), e))?;
        sys::ensure_bpffs(bpffs).map_err(|e| DataplaneError::Bpffs(bpffs.into(), e))?;
        let layout = match std::env::var(TEST_LAYOUT_ENV) {
            Ok(v) => match v.parse::<u32>() {
                Ok(n) if (1..=LAYOUT_VERSION).contains(&n) => n,
                _ => {
                    return Err(DataplaneError::TestLayout(format!(
                        "{v:?} is no layout 1..={LAYOUT_VERSION}"
                    )));
                }
            },
            Err(_) => LAYOUT_VERSION,
        };
        // A newer binary ran here: its maps mean something this one can't read, and moving
        // its links to this program with fresh maps would open everything.
        if let Some((n, path)) = crate::migrate::layouts(&root)
            .into_iter()
            .find(|(n, _)| *n > layout)
        {
            return Err(DataplaneError::NewerLayout(path, n, layout));
        }
        // Checked before anything is pinned or moved.
        let object = match std::env::var_os(OBJECT_ENV) {
            Some(path) => {
                info!(path = %path.to_string_lossy(), "loading the datapath from {OBJECT_ENV}");
                let object = std::fs::read(&path)
                    .map_err(|e| DataplaneError::Sys("reading MOAT_EBPF_OBJECT", e))?;
                let testing = std::env::var_os(TEST_LAYOUT_ENV).is_some();
                check_object_layout(&object, layout, testing)
                    .map_err(|what| DataplaneError::ObjectLayout(path.into(), what, layout))?;
                object
            }
            None => PROGRAM.to_vec(),
        };
        let dir = root.join(format!("v{layout}"));
        let links = root.join("links");
        for d in [&dir, &links] {
            std::fs::create_dir_all(d).map_err(|e| DataplaneError::Bpffs(d.clone(), e))?;
        }
        let (legacy, legacy_marks) = if layout == LAYOUT_VERSION {
            crate::migrate::share_previous(&root, &dir)?;
            let marks = crate::migrate::share_legacy_marks(&root, &dir)?;
            (crate::migrate::share_legacy_flows(&root, &dir)?, marks)
        } else {
            (false, false)
        };
        let legacy = u32::from(legacy);
        let legacy_marks = u32::from(legacy_marks);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            // Absent from older layouts' objects (tests load those): not required.
            .override_global("LEGACY_FLOWS", &legacy, false)
            .override_global("LEGACY_MARKS", &legacy_marks, false)
            .load(&object)?;
        let maps = Maps {
            selector: take(&mut ebpf, MapNames::SELECTOR)?,
            endpoints: take(&mut ebpf, MapNames::ENDPOINTS)?,
            addrs: take(&mut ebpf, MapNames::ADDRS)?,
            ranges: take(&mut ebpf, MapNames::RANGES)?,
            ports: take(&mut ebpf, MapNames::PORTS)?,
            port_exact: if layout >= 3 {
                Some(take(&mut ebpf, MapNames::PORT_EXACT)?)
            } else {
                None
            },
            named: take(&mut ebpf, MapNames::NAMED)?,
            pods: if layout >= 5 {
                Some(PodMaps {
                    pods: take(&mut ebpf, MapNames::PODS)?,
                    addrs: take(&mut ebpf, MapNames::LOCAL_ADDRS)?,
                    ifaces: take(&mut ebpf, MapNames::IFACES)?,
                })
            } else {
                None
            },
            meta: take(&mut ebpf, MapNames::META)?,
            counters: take(&mut ebpf, MapNames::COUNTERS)?,
            layout,
        };
        let barrier = Barrier::new().map_err(|e| DataplaneError::Sys("map-of-maps barrier", e))?;
        // The verifier runs here: a program it refuses fails the open.
        let progs = Progs::load(ebpf, links, layout)?;
        let dp = Dataplane {
            progs: std::sync::Arc::new(std::sync::Mutex::new(progs)),
            maps,
            barrier: std::sync::Arc::new(barrier),
            dir: dir.clone(),
            root,
            layout,
        };
        // Before anything attaches this program: it stamps flows with this clock.
        crate::flows::resume_clock(&dir)?;
        Ok(dp)
    }

    pub(crate) fn progs(&self) -> std::sync::MutexGuard<'_, Progs> {
        // A panic while attaching leaves the links as they were: still usable.
        self.progs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn shared_progs(&self) -> std::sync::Arc<std::sync::Mutex<Progs>> {
        std::sync::Arc::clone(&self.progs)
    }

    /// Runs one program once on a crafted frame (`BPF_PROG_TEST_RUN`).
    pub fn test_run(
        &mut self,
        name: &'static str,
        frame: &[u8],
        mark: u32,
        ingress_ifindex: u32,
    ) -> Result<TestRun> {
        self.test_run_repeat(name, frame, mark, ingress_ifindex, 1)
    }

    /// [`test_run`](Self::test_run) `repeat` times on the same packet; the result carries
    /// the kernel's mean time per run.
    pub fn test_run_repeat(
        &mut self,
        name: &'static str,
        frame: &[u8],
        mark: u32,
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRun> {
        let mut progs = self.progs();
        let prog = progs.program(name)?;
        let fd = prog.fd().map_err(|e| DataplaneError::Program(name, e))?;
        sys::test_run_repeat(fd.as_fd(), frame, mark, ingress_ifindex, repeat)
            .map_err(|e| DataplaneError::Sys("BPF_PROG_TEST_RUN", e))
    }

    /// Attaches the programs of each interface's kind to every interface but loopback that
    /// has none from this run (see [`Progs::attach_all`]).
    pub fn attach_all(&mut self, mode: &PodInterfaces) -> Result<usize> {
        self.progs().attach_all(mode)
    }

    /// Attaches both programs to `iface` and detaches them again (the capability probe).
    pub fn probe_attach(&mut self, iface: &str) -> Result<()> {
        self.progs().probe_attach(iface)
    }

    pub fn meta(&self) -> Result<Meta> {
        self.maps
            .meta
            .get(&0, 0)
            .map_err(|e| DataplaneError::Map(MapNames::META, e))
    }

    pub fn set_meta(&mut self, m: Meta) -> Result<()> {
        self.maps
            .meta
            .set(0, m, 0)
            .map_err(|e| DataplaneError::Map(MapNames::META, e))
    }

    pub fn active_slot(&self) -> Result<u8> {
        let s = self
            .maps
            .selector
            .get(&0, 0)
            .map_err(|e| DataplaneError::Map(MapNames::SELECTOR, e))?;
        Ok((s & 1) as u8)
    }

    /// Points every packet from now on at `slot`. Packets already running may still read
    /// the other slot until [`Barrier::wait`] on [`barrier`](Self::barrier) returns.
    pub fn flip(&mut self, slot: u8) -> Result<()> {
        self.maps
            .selector
            .set(0, u32::from(slot), 0)
            .map_err(|e| DataplaneError::Map(MapNames::SELECTOR, e))
    }

    /// Where this run's maps are pinned.
    pub fn map_dir(&self) -> &Path {
        &self.dir
    }

    /// Waits out every program run that started before this call.
    pub fn barrier(&self) -> std::sync::Arc<Barrier> {
        std::sync::Arc::clone(&self.barrier)
    }

    /// A second set of handles on the policy maps, opened from their pins.
    pub fn open_maps(&self) -> Result<Maps> {
        Maps::pinned_in(&self.dir, self.layout)
    }
}

/// Opens the map pinned as `dir/name`.
pub(crate) fn pinned<T: TryFrom<aya::maps::Map, Error = MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<T> {
    let data = MapData::from_pin(dir.join(name)).map_err(|e| DataplaneError::Map(name, e))?;
    aya::maps::Map::from_map_data(data)
        .and_then(T::try_from)
        .map_err(|e| DataplaneError::Map(name, e))
}

impl Maps {
    /// Handles on the policy maps pinned in `dir`, for a program of `layout`.
    pub fn pinned_in(d: &Path, layout: u32) -> Result<Maps> {
        Ok(Maps {
            selector: pinned(d, MapNames::SELECTOR)?,
            endpoints: pinned(d, MapNames::ENDPOINTS)?,
            addrs: pinned(d, MapNames::ADDRS)?,
            ranges: pinned(d, MapNames::RANGES)?,
            ports: pinned(d, MapNames::PORTS)?,
            port_exact: if d.join(MapNames::PORT_EXACT).exists() {
                Some(pinned(d, MapNames::PORT_EXACT)?)
            } else {
                None
            },
            named: pinned(d, MapNames::NAMED)?,
            pods: if d.join(MapNames::PODS).exists() {
                Some(PodMaps {
                    pods: pinned(d, MapNames::PODS)?,
                    addrs: pinned(d, MapNames::LOCAL_ADDRS)?,
                    ifaces: pinned(d, MapNames::IFACES)?,
                })
            } else {
                None
            },
            meta: pinned(d, MapNames::META)?,
            counters: pinned(d, MapNames::COUNTERS)?,
            layout,
        })
    }
}

impl Dataplane {
    pub fn write(&mut self, slot: u8, diff: &Diff) -> Result<()> {
        self.maps.write(slot, diff)
    }

    pub fn clear(&mut self, slot: u8) -> Result<()> {
        self.maps.clear(slot)
    }

    pub fn read_slot(&self, slot: u8) -> Entries {
        self.maps.read_slot(slot)
    }

    /// Writes local pod entries (see [`crate::pods`]); nothing for an older layout.
    pub fn write_pods(&mut self, w: &PodWrites) -> Result<()> {
        self.maps.write_pods(w)
    }

    /// The local pod maps' content, read back.
    pub fn read_pods(&self) -> PodTables {
        self.maps.read_pods()
    }

    /// Per-CPU counters summed.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        counters_of(&self.maps.counters)
    }
}

fn counters_of(counters: &PerCpuArray<MapData, u64>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (i, name) in [
        (CNT_ALLOWED, "allowed"),
        (CNT_DENIED, "denied"),
        (CNT_MALFORMED, "malformed"),
        (CNT_CT_FULL, "flow_table_full"),
        (CNT_SPOOFED, moat_dataplane::counters::SPOOFED),
        (CNT_UNKNOWN_POD, moat_dataplane::counters::UNKNOWN_POD),
        (CNT_UNCLASSIFIED, moat_dataplane::counters::UNCLASSIFIED),
    ] {
        if let Ok(v) = counters.get(&i, 0) {
            out.insert(name.to_string(), v.iter().sum());
        }
    }
    out
}

impl Maps {
    /// Writes `diff` into `slot`: additions and changes first, removals last. For a program
    /// of a layout before 6 (tests), endpoints lose [`RULESET_NAMED`] (such a program reads
    /// the value as the ruleset) and a deny entry is refused before anything is written
    /// (such a program reads any hit as an allow; its budget never asks for one).
    pub fn write(&mut self, slot: u8, diff: &Diff) -> Result<()> {
        let m = self;
        let e = |name: &'static str| move |err| DataplaneError::Map(name, err);
        let old = m.layout < 6;
        if old
            && (diff.ports.0.iter().any(|(_, v)| *v != VERDICT_ALLOW)
                || diff.named.0.iter().any(|(_, v)| *v != VERDICT_ALLOW))
        {
            return Err(DataplaneError::OlderLayout(m.layout));
        }
        for (k, v) in &diff.endpoints.0 {
            let v = if old { v & !RULESET_NAMED } else { *v };
            m.endpoints
                .insert(EndpointKey { slot, ..*k }, v, 0)
                .map_err(e(MapNames::ENDPOINTS))?;
        }
        for (k, v) in &diff.addrs.0 {
            m.addrs
                .insert(AddrKey { slot, ..*k }, v, 0)
                .map_err(e(MapNames::ADDRS))?;
        }
        for ((len, k), v) in &diff.ranges.0 {
            m.ranges
                .insert(&Key::new(*len, RangeKey { slot, ..*k }), v, 0)
                .map_err(e(MapNames::RANGES))?;
        }
        for ((len, k), v) in &diff.ports.0 {
            let k = with_slot(k, slot);
            match m.port_exact.as_mut() {
                Some(exact) if *len == PORT_FULL_BITS => {
                    exact.insert(k, v, 0).map_err(e(MapNames::PORT_EXACT))?
                }
                _ => m
                    .ports
                    .insert(&Key::new(*len, k), v, 0)
                    .map_err(e(MapNames::PORTS))?,
            }
        }
        for (k, v) in &diff.named.0 {
            m.named
                .insert(NamedKey { slot, ..*k }, v, 0)
                .map_err(e(MapNames::NAMED))?;
        }
        for k in &diff.endpoints.1 {
            gone(m.endpoints.remove(&EndpointKey { slot, ..*k }))
                .map_err(e(MapNames::ENDPOINTS))?;
        }
        for k in &diff.addrs.1 {
            gone(m.addrs.remove(&AddrKey { slot, ..*k })).map_err(e(MapNames::ADDRS))?;
        }
        for (len, k) in &diff.ranges.1 {
            gone(m.ranges.remove(&Key::new(*len, RangeKey { slot, ..*k })))
                .map_err(e(MapNames::RANGES))?;
        }
        for (len, k) in &diff.ports.1 {
            let k = with_slot(k, slot);
            match m.port_exact.as_mut() {
                Some(exact) if *len == PORT_FULL_BITS => {
                    gone(exact.remove(&k)).map_err(e(MapNames::PORT_EXACT))?
                }
                _ => gone(m.ports.remove(&Key::new(*len, k))).map_err(e(MapNames::PORTS))?,
            }
        }
        for k in &diff.named.1 {
            gone(m.named.remove(&NamedKey { slot, ..*k })).map_err(e(MapNames::NAMED))?;
        }
        Ok(())
    }

    /// Removes every entry of `slot` (after a crash left it unknown): what is there, read
    /// back, written as removals.
    pub fn clear(&mut self, slot: u8) -> Result<()> {
        let there = self.read_slot(slot);
        self.write(slot, &Diff::between(&there, &Entries::default()))
    }

    pub fn write_pods(&mut self, w: &PodWrites) -> Result<()> {
        let Some(m) = self.pods.as_mut() else {
            return Ok(());
        };
        let e = |name: &'static str| move |err| DataplaneError::Map(name, err);
        // Removals first: within one phase every write goes the same way (more or less
        // trust); removals free room for puts. One order still matters: a `PODS` entry only
        // ever exists for an interface `IFACES` calls a pod's (the pod egress program judges
        // a receiver by `PODS` alone), so `PODS` goes first on the way out and last on the
        // way in.
        for k in &w.pods.1 {
            gone(m.pods.remove(k)).map_err(e(MapNames::PODS))?;
        }
        for k in &w.addrs.1 {
            gone(m.addrs.remove(k)).map_err(e(MapNames::LOCAL_ADDRS))?;
        }
        for k in &w.ifaces.1 {
            gone(m.ifaces.remove(k)).map_err(e(MapNames::IFACES))?;
        }
        for (k, v) in &w.ifaces.0 {
            m.ifaces.insert(k, v, 0).map_err(e(MapNames::IFACES))?;
        }
        for k in &w.addrs.0 {
            m.addrs.insert(k, 1, 0).map_err(e(MapNames::LOCAL_ADDRS))?;
        }
        for (k, v) in &w.pods.0 {
            m.pods.insert(k, v, 0).map_err(e(MapNames::PODS))?;
        }
        Ok(())
    }

    pub fn read_pods(&self) -> PodTables {
        let mut t = PodTables::default();
        if let Some(m) = &self.pods {
            t.pods = m.pods.iter().filter_map(|r| r.ok()).collect();
            t.addrs = m.addrs.keys().filter_map(|r| r.ok()).collect();
            t.ifaces = m.ifaces.iter().filter_map(|r| r.ok()).collect();
        }
        t
    }

    /// Entries currently written for `slot`, read back from the kernel (tests, adoption
    /// checks).
    pub fn read_slot(&self, slot: u8) -> Entries {
        let m = self;
        let mut e = Entries::default();
        for (k, v) in m.endpoints.iter().filter_map(|r| r.ok()) {
            if k.slot == slot {
                e.endpoints.insert(EndpointKey { slot: 0, ..k }, v);
            }
        }
        for (k, v) in m.addrs.iter().filter_map(|r| r.ok()) {
            if k.slot == slot {
                e.addrs.insert(AddrKey { slot: 0, ..k }, v);
            }
        }
        for (k, v) in m.ranges.iter().filter_map(|r| r.ok()) {
            if k.data().slot == slot {
                e.ranges.insert(
                    (
                        k.prefix_len(),
                        RangeKey {
                            slot: 0,
                            ..k.data()
                        },
                    ),
                    v,
                );
            }
        }
        for (k, v) in m.ports.iter().filter_map(|r| r.ok()) {
            if k.data().data[0] == slot {
                e.ports.insert((k.prefix_len(), with_slot(&k.data(), 0)), v);
            }
        }
        for (k, v) in m
            .port_exact
            .iter()
            .flat_map(|x| x.iter().filter_map(|r| r.ok()))
        {
            if k.data[0] == slot {
                e.ports.insert((PORT_FULL_BITS, with_slot(&k, 0)), v);
            }
        }
        for (k, v) in m.named.iter().filter_map(|r| r.ok()) {
            if k.slot == slot {
                e.named.insert(NamedKey { slot: 0, ..k }, v);
            }
        }
        e
    }
}

fn with_slot(k: &PortKey, slot: u8) -> PortKey {
    let mut k = *k;
    k.data[0] = slot;
    k
}

/// Removing what is already gone is success (a replay after a crash may repeat removals).
fn gone(r: std::result::Result<(), MapError>) -> std::result::Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
