//! Upgrades across map layouts. A binary whose maps differ from the pinned ones (another
//! `LAYOUT_VERSION`) must neither misread them nor start empty: empty policy maps would let
//! everything through, and an empty flow table would drop the replies of every connection
//! a policy isolates. So it copies the old maps' state into its own (converting what
//! changed), moves the links to its program, waits out the old program, copies the flows
//! created meanwhile, and only then removes the old pins.
//!
//! The flow table is the exception where the previous layout defines it exactly as this one
//! does: it is not copied but shared (see [`share_previous`]). A copy leaves a window: from
//! the moment the links run the new program until the flows the old one remembered
//! meanwhile are copied, a reply to a flow the old program had just admitted meets a table
//! without it, and an egress-isolated pod's reply judged as a new flow is denied. Upgrades
//! from layouts 1 to 3 (a kernel hash) copy, and the new program also looks flows up in the
//! old table until then (see [`share_legacy_flows`]).
//!
//! The mark: layouts 1 to 4 write an 8-bit sender index where this one writes its findings
//! (see `MARK_CLASSIFIED`). The egress links move first, so no old egress program reads a
//! new mark; the new egress program decodes an old index through the old `LOCAL_ADDR`
//! (see [`share_legacy_marks`]), and the indices that would read as a finding are renumbered
//! before the links move (see [`renumber_findings`]).
//!
//! Crash safety: until the old pins are removed, a restart repeats the migration, which
//! copies the same state again. Rules do not change during it (no version is installed
//! before the migration returns).

use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, MapData};
use moat_ebpf_common::*;
use tracing::{info, warn};

use moat_dataplane::local::PodInterfaces;

use crate::dataplane::{Dataplane, DataplaneError, pinned};
use crate::flows::{FlowTable, coarse_now};

type Result<T> = std::result::Result<T, DataplaneError>;

/// `BPF_MAP_TYPE_ARRAY`, as `sys::map_shape` reports it.
const ARRAY: u32 = 2;
/// The layouts whose flow table (with its hash key and clock) and fragment verdicts this
/// layout defines exactly as they did.
const SHARES_FROM: std::ops::RangeInclusive<u32> = 4..=5;
/// `FLOWS` last: once its pin is in this layout's directory, so are the others.
const SHARED: [&str; 4] = [
    MapNames::FLOW_SEED,
    MapNames::CLOCK,
    MapNames::FRAGS,
    MapNames::FLOWS,
];

/// Before this layout's program loads into `dir`: pins the flow maps of the previous layout,
/// if that is the one pinned beside, under `dir` too, so the loader takes them over as they
/// are. Old and new program then remember and look up flows in one table throughout the
/// switch. Does nothing once `dir` holds a flow table (shared or not).
pub fn share_previous(root: &Path, dir: &Path) -> Result<()> {
    let older = older_layouts(root);
    let [(n, from)] = older.as_slice() else {
        return Ok(());
    };
    if !SHARES_FROM.contains(n) {
        return Ok(());
    }
    if dir.join(MapNames::FLOWS).exists() || !from.join(MapNames::FLOWS).exists() {
        return Ok(());
    }
    // The loader takes over a pinned map without comparing it with the program's: a table
    // of another shape (a build that defined it differently) is copied, not shared.
    const MMAPABLE: u32 = 1 << 10;
    let flows = [
        ARRAY,
        4,
        std::mem::size_of::<FlowSet>() as u32,
        FLOW_SETS,
        MMAPABLE,
    ];
    match crate::sys::map_shape(&from.join(MapNames::FLOWS)) {
        Ok(shape) if shape == flows => {}
        other => {
            warn!(shape = ?other, "the previous layout's flow table differs from this one's; copying it");
            return Ok(());
        }
    }
    for name in SHARED {
        let (old, new) = (from.join(name), dir.join(name));
        if !old.exists() {
            continue;
        }
        // A run that stopped between its loader's pins (no link runs this layout's program
        // before `FLOWS` is pinned) may have left a map of its own here, such as another
        // hash key: the old one replaces it.
        pin_as(&old, &new)?;
    }
    info!(from = n, "sharing the previous layout's flow table");
    Ok(())
}

/// Before this layout's program loads into `dir`: while one of layouts 1 to 3 is pinned
/// beside, pins its flow table (`CT`, a kernel hash) under `dir` as `LEGACY_CT`, where the
/// program looks a flow up when its own table misses (with `LEGACY_FLOWS` set: the returned
/// flag). A copy alone leaves a window: a reply to a flow the old program admitted after the
/// copy, meeting this program's ingress, is not known as one. Otherwise removes a
/// `LEGACY_CT` pin a finished migration left, so the program gets an empty map.
pub fn share_legacy_flows(root: &Path, dir: &Path) -> Result<bool> {
    let pin = dir.join(MapNames::LEGACY_CT);
    if let [(1..=3, from)] = older_layouts(root).as_slice() {
        let ct = from.join(MapNames::CT);
        if ct.exists() {
            pin_as(&ct, &pin)?;
            return Ok(true);
        }
    }
    unpin(&pin)?;
    Ok(false)
}

/// Before this layout's program loads into `dir`: while one of layouts 1 to 4 is pinned
/// beside, pins its `LOCAL_ADDR` (sender index → address) under `dir` as
/// `LEGACY_LOCAL_ADDR`, by which the egress program names the sender of a packet the old
/// ingress program marked (see `MARK_CLASSIFIED`). Otherwise removes a pin a finished
/// migration left, so the program gets an empty map (an old mark then names nobody and is
/// unclassified). Returns whether an older layout is pinned (the program's `LEGACY_MARKS`).
pub fn share_legacy_marks(root: &Path, dir: &Path) -> Result<bool> {
    let pin = dir.join(MapNames::LEGACY_LOCAL_ADDR);
    let older = older_layouts(root);
    let any = older.iter().any(|(n, _)| (1..=4).contains(n));
    if let [(1..=4, from)] = older.as_slice() {
        let old = from.join(MapNames::LOCAL_ADDR);
        let shape = [
            ARRAY,
            4,
            std::mem::size_of::<LocalAddr>() as u32,
            LEGACY_LOCAL_SLOTS,
            0,
        ];
        match crate::sys::map_shape(&old) {
            Ok(s) if s == shape => {
                pin_as(&old, &pin)?;
                return Ok(true);
            }
            // Unread, its packets are unclassified until the ingress links move: dropped.
            other => {
                warn!(shape = ?other, "the previous layout's sender indices cannot be read; its marks are unclassified while the links move")
            }
        }
    }
    unpin(&pin)?;
    Ok(any)
}

/// Tells this layout's egress program whether the links are moving from an older layout
/// (see `LEGACY_MIGRATING`), through entry 0 of `LEGACY_LOCAL_ADDR` in `dir`: the older
/// layout's sender indices where they were shared (no older program reads entry 0),
/// otherwise the program's own empty map, where an old index then names nobody.
pub fn legacy_marks_migrating(dir: &Path, on: bool) -> Result<()> {
    if !dir.join(MapNames::LEGACY_LOCAL_ADDR).exists() {
        return Ok(());
    }
    let mut addrs: Array<MapData, LocalAddr> = pinned(dir, MapNames::LEGACY_LOCAL_ADDR)?;
    let entry = LocalAddr {
        family: if on { LEGACY_MIGRATING } else { 0 },
        ..Default::default()
    };
    addrs
        .set(0, entry, 0)
        .map_err(|e| DataplaneError::Map(MapNames::LEGACY_LOCAL_ADDR, e))
}

/// Whether an older layout's sender index `i` must not stay in use once this layout's
/// egress program reads marks: it reads as one of its findings (33, 65, 81 and 129: "from
/// another interface", "from a pod", "from an unknown pod, left open", "unknown"; see
/// `MARK_CLASSIFIED`), or as "unknown" in an earlier build of this layout (128).
fn ambiguous(i: u32) -> bool {
    let mark = i << MARK_LEGACY_SHIFT;
    is_finding(mark) || mark & MARK_FINDINGS & !MARK_CLASSIFIED == MARK_UNKNOWN
}

/// Before the links move from an older layout (1 to 4): gives every local sender whose index
/// is [`ambiguous`] a free one, which this layout's egress program decodes exactly (a mark
/// with an ambiguous index, such as one the kernel still holds from before, is only checked
/// on the source the egress program sees: `LEGACY_MARKS`). The address goes into
/// `LOCAL_ADDR` before `LOCAL` names the new index, so the old programs resolve a sender
/// throughout; the old entry stays for the packets already marked with it. A free index is
/// one `LOCAL` does not name, preferably one `LOCAL_ADDR` holds nothing at either. Returns
/// how many were renumbered.
fn renumber_findings(from: &Path) -> Result<usize> {
    if !from.join(MapNames::LOCAL).exists() || !from.join(MapNames::LOCAL_ADDR).exists() {
        return Ok(0);
    }
    let mut local: HashMap<MapData, LocalKey, u32> = pinned(from, MapNames::LOCAL)?;
    let mut addrs: Array<MapData, LocalAddr> = pinned(from, MapNames::LOCAL_ADDR)?;
    let entries: Vec<(LocalKey, u32)> = local.iter().filter_map(|e| e.ok()).collect();
    let slots = LEGACY_LOCAL_SLOTS.min(addrs.len());
    let mut named = vec![false; slots as usize];
    named[0] = true;
    for (_, i) in &entries {
        if let Some(u) = named.get_mut(*i as usize) {
            *u = true;
        }
    }
    let held: Vec<bool> = (0..slots)
        .map(|i| addrs.get(&i, 0).is_ok_and(|a| a.family != 0))
        .collect();
    let mut moved = 0;
    for (key, _) in entries.iter().filter(|(_, i)| ambiguous(*i)) {
        let free = |k: &u32| !named[*k as usize] && !ambiguous(*k);
        let Some(k) = (1..slots)
            .find(|k| free(k) && !held[*k as usize])
            .or_else(|| (1..slots).find(free))
        else {
            // Left as it is: the egress program checks such a finding anyway (`LEGACY_MARKS`).
            warn!(
                senders = entries.len(),
                "no free sender index to renumber to; the egress program checks this sender's marks on its source"
            );
            break;
        };
        named[k as usize] = true;
        let addr = LocalAddr {
            family: key.family,
            _pad: [0; 3],
            addr: key.addr,
        };
        addrs
            .set(k, addr, 0)
            .map_err(|e| DataplaneError::Map(MapNames::LOCAL_ADDR, e))?;
        local
            .insert(key, k, 0)
            .map_err(|e| DataplaneError::Map(MapNames::LOCAL, e))?;
        moved += 1;
    }
    Ok(moved)
}

/// Once the old program is drained and its flows copied: empties the older layout's table
/// this program still looks up (it holds the map until it is unloaded) and drops its pin.
fn forget_legacy_flows(dir: &Path) -> Result<()> {
    let pin = dir.join(MapNames::LEGACY_CT);
    if !pin.exists() {
        return Ok(());
    }
    let mut ct: HashMap<MapData, FlowKey, FlowVal> = pinned(dir, MapNames::LEGACY_CT)?;
    let keys: Vec<FlowKey> = ct.keys().filter_map(|k| k.ok()).collect();
    for k in keys {
        let _ = ct.remove(&k);
    }
    unpin(&pin)
}

/// The layouts older than this binary's pinned under `root`.
fn older_layouts(root: &Path) -> Vec<(u32, PathBuf)> {
    layouts(root)
        .into_iter()
        .filter(|(n, _)| *n < LAYOUT_VERSION)
        .collect()
}

/// Makes `pin` name the map pinned at `old`, replacing whatever other map it names.
fn pin_as(old: &Path, pin: &Path) -> Result<()> {
    if pin.exists() && !same_map(old, pin) {
        std::fs::remove_file(pin).map_err(|e| DataplaneError::Bpffs(pin.into(), e))?;
    }
    if !pin.exists() {
        crate::sys::pin_again(old, pin).map_err(|e| DataplaneError::Bpffs(pin.into(), e))?;
    }
    Ok(())
}

/// Removes `pin` if it is there (the map lives on while a program holds it).
fn unpin(pin: &Path) -> Result<()> {
    if pin.exists() {
        std::fs::remove_file(pin).map_err(|e| DataplaneError::Bpffs(pin.into(), e))?;
    }
    Ok(())
}

/// Removes the directory `dir` if it is there.
fn unpin_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(DataplaneError::Bpffs(dir.into(), e))
        }
        _ => Ok(()),
    }
}

/// Whether pins `a` and `b` name one map.
fn same_map(a: &Path, b: &Path) -> bool {
    matches!((crate::sys::map_id(a), crate::sys::map_id(b)), (Ok(x), Ok(y)) if x == y)
}

/// `v<n>-gone` beside `v<n>`: layout n is migrated and being deleted (see [`layouts`]; bpffs
/// refuses dots in names).
const GONE: &str = "-gone";

/// `v<n>-copied` beside `v<n>`: the older layout's policy maps were copied into layout n's,
/// which a retried migration must not repeat (see [`Dataplane::migrate`]).
const COPIED: &str = "-copied";

/// Deletes what a run stopped while deleting a migrated layout left.
fn sweep_gone(root: &Path) {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(layout) = name.strip_suffix(GONE) {
            let _ = std::fs::remove_dir_all(root.join(layout));
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// The layouts pinned under a node's root: `(n, <root>/v<n>)`.
pub fn layouts(root: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(dir) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, PathBuf)> = dir
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_prefix('v')?.parse().ok()?;
            // Migrated, its deletion interrupted: not a layout any more.
            if root.join(format!("v{n}{GONE}")).exists() {
                return None;
            }
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn copy_hash<K: aya::Pod, V: aya::Pod>(
    from: &Path,
    to: &Path,
    name: &'static str,
) -> Result<usize> {
    let old: HashMap<MapData, K, V> = pinned(from, name)?;
    let mut new: HashMap<MapData, K, V> = pinned(to, name)?;
    let mut n = 0;
    for (k, v) in old.iter().filter_map(|r| r.ok()) {
        new.insert(k, v, 0)
            .map_err(|e| DataplaneError::Map(name, e))?;
        n += 1;
    }
    Ok(n)
}

fn copy_lpm<K: aya::Pod, V: aya::Pod>(from: &Path, to: &Path, name: &'static str) -> Result<usize> {
    let old: LpmTrie<MapData, K, V> = pinned(from, name)?;
    let mut new: LpmTrie<MapData, K, V> = pinned(to, name)?;
    let mut n = 0;
    for (k, v) in old.iter().filter_map(|r| r.ok()) {
        new.insert(&k, v, 0)
            .map_err(|e| DataplaneError::Map(name, e))?;
        n += 1;
    }
    Ok(n)
}

/// Copies `PORTS`; layouts 1 and 2 held single ports there as full-length prefixes: those go
/// to `PORT_EXACT` now.
fn copy_ports(from: &Path, to: &Path) -> Result<usize> {
    let old: LpmTrie<MapData, PortKey, u8> = pinned(from, MapNames::PORTS)?;
    let mut ports: LpmTrie<MapData, PortKey, u8> = pinned(to, MapNames::PORTS)?;
    let mut exact: HashMap<MapData, PortKey, u8> = pinned(to, MapNames::PORT_EXACT)?;
    let mut n = 0;
    for (k, v) in old.iter().filter_map(|r| r.ok()) {
        if k.prefix_len() == PORT_FULL_BITS {
            exact
                .insert(k.data(), v, 0)
                .map_err(|e| DataplaneError::Map(MapNames::PORT_EXACT, e))?;
        } else {
            ports
                .insert(&k, v, 0)
                .map_err(|e| DataplaneError::Map(MapNames::PORTS, e))?;
        }
        n += 1;
    }
    Ok(n)
}

/// Flags (with [`RULESET_NAMED`]) every endpoint whose ruleset holds named-port entries in
/// its slot: before layout 6 the program looked `NAMED` up for every egress new flow, now only
/// for a flagged one. A ruleset with named-port rules but no entry yet is not flagged; the
/// next version is written whole (the adopted one is, see `adopt`), flags included.
fn flag_named(dir: &Path) -> Result<()> {
    let named: HashMap<MapData, NamedKey, u8> = pinned(dir, MapNames::NAMED)?;
    let with: std::collections::HashSet<(u8, u32)> = named
        .keys()
        .filter_map(|k| k.ok())
        .map(|k| (k.slot, k.ruleset))
        .collect();
    let mut eps: HashMap<MapData, EndpointKey, u32> = pinned(dir, MapNames::ENDPOINTS)?;
    let flag: Vec<(EndpointKey, u32)> = eps
        .iter()
        .filter_map(|e| e.ok())
        .filter(|(k, v)| k.dir == DIR_EGRESS && with.contains(&(k.slot, *v)))
        .collect();
    for (k, v) in flag {
        eps.insert(k, v | RULESET_NAMED, 0)
            .map_err(|e| DataplaneError::Map(MapNames::ENDPOINTS, e))?;
    }
    Ok(())
}

fn copy_array<V: aya::Pod>(from: &Path, to: &Path, name: &'static str) -> Result<()> {
    let old: Array<MapData, V> = pinned(from, name)?;
    let mut new: Array<MapData, V> = pinned(to, name)?;
    for i in 0..old.len().min(new.len()) {
        let v = old.get(&i, 0).map_err(|e| DataplaneError::Map(name, e))?;
        new.set(i, v, 0).map_err(|e| DataplaneError::Map(name, e))?;
    }
    Ok(())
}

/// Copies the flows of layouts 1 to 3's kernel hash (`CT`: layout 1's LRU table and the
/// later preallocated one share key and value) or layout 4's array (`FLOWS`, placed anew
/// under this layout's seed) into this layout's table, skipping those already idle; a flow
/// the new program saw meanwhile keeps its later time.
fn copy_flows(from: &Path, to: &Path) -> Result<usize> {
    let old: Vec<(FlowKey, u64)> = match FlowTable::open(from)? {
        Some(t) => t.flows(),
        None => {
            let ct: HashMap<MapData, FlowKey, FlowVal> = pinned(from, MapNames::CT)?;
            ct.iter()
                .filter_map(|r| r.ok())
                .map(|(k, v)| (k, v.seen_ns))
                .collect()
        }
    };
    let table = FlowTable::open(to)?.ok_or(DataplaneError::Map(
        MapNames::FLOWS,
        aya::maps::MapError::InvalidName {
            name: MapNames::FLOWS.into(),
        },
    ))?;
    let now = coarse_now();
    let (mut n, mut full) = (0, 0);
    for (k, seen) in old {
        if flow_idle(k.proto, seen, now) {
            continue;
        }
        if table.remember(&k, seen, now) {
            n += 1;
        } else {
            full += 1;
        }
    }
    if full > 0 {
        warn!(
            copied = n,
            left = full,
            "flows whose slots are all in use are judged anew"
        );
    }
    Ok(n)
}

impl Dataplane {
    /// Migrates older layouts' state into this run's maps and takes over their links (see
    /// the module docs). Returns the layout migrated from, if any. A run with an older
    /// layout (tests) never migrates.
    pub fn migrate(&mut self, mode: &PodInterfaces) -> Result<Option<u32>> {
        if self.layout != LAYOUT_VERSION {
            return Ok(None);
        }
        sweep_gone(&self.root);
        let older = older_layouts(&self.root);
        let copied = self.root.join(format!("v{LAYOUT_VERSION}{COPIED}"));
        let Some((n, from)) = older.last().cloned() else {
            unpin_dir(&copied)?;
            return Ok(None);
        };
        if !(1..=5).contains(&n) || older.len() > 1 {
            return Err(DataplaneError::UnknownLayout(older[0].0));
        }
        let to = self.map_dir().to_path_buf();
        // Layout 1 → 2 changed the flow table's type, 2 → 3 moved single ports out of
        // `PORTS`, 3 → 4 made the flow table an array, 4 → 5 replaced the mark index maps
        // (`LOCAL`, `LOCAL_ADDR`: not copied) by the local pod maps, which the caller writes
        // before this runs, 5 → 6 made the port maps' values verdicts (an older layout's 1 is
        // an allow) and flags endpoints whose ruleset has named ports: every other map copies
        // as it is.
        //
        // Once only: a migration that failed after its copy (an interface refusing the
        // program, say) is retried before every version, and versions of this layout, under
        // this binary's ruleset and class numbers, may have been written since. Old entries
        // copied over them again would be read as theirs, in the slot in force too: a stale
        // allow under another ruleset's number. The marker outlives a restart.
        let mut rules = 0;
        if !copied.exists() {
            rules += copy_hash::<EndpointKey, u32>(&from, &to, MapNames::ENDPOINTS)?;
            rules += copy_hash::<AddrKey, u32>(&from, &to, MapNames::ADDRS)?;
            rules += copy_lpm::<RangeKey, u32>(&from, &to, MapNames::RANGES)?;
            rules += copy_ports(&from, &to)?;
            if from.join(MapNames::PORT_EXACT).exists() {
                rules += copy_hash::<PortKey, u8>(&from, &to, MapNames::PORT_EXACT)?;
            }
            rules += copy_hash::<NamedKey, u8>(&from, &to, MapNames::NAMED)?;
            flag_named(&to)?;
            copy_array::<u32>(&from, &to, MapNames::SELECTOR)?;
            copy_array::<Meta>(&from, &to, MapNames::META)?;
            std::fs::create_dir_all(&copied)
                .map_err(|e| DataplaneError::Bpffs(copied.clone(), e))?;
        }
        let shared = same_map(&from.join(MapNames::FLOWS), &to.join(MapNames::FLOWS));
        let flows = if shared { 0 } else { copy_flows(&from, &to)? };
        // The links run this program from here on, egress links first: the old egress
        // program would read this layout's findings in the mark as a sender index (see
        // `MARK_CLASSIFIED`), while this one decodes the old index. Once no packet runs the
        // old program, the flows it remembered in between are copied too (again and again
        // while that is awaited: each pass shortens the time a reply may meet a table
        // without its flow).
        let renumbered = renumber_findings(&from)?;
        // Layout 5's ingress programs write this layout's findings: nothing to decode.
        legacy_marks_migrating(&to, n <= 4)?;
        self.attach_all(mode)?;
        let barrier = self.barrier();
        let waited = std::thread::spawn(move || barrier.wait());
        let mut passes = 0;
        while !shared && !waited.is_finished() {
            copy_flows(&from, &to)?;
            passes += 1;
        }
        waited
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the barrier thread panicked")))
            .map_err(|e| DataplaneError::Sys("map-of-maps barrier", e))?;
        // No old program runs any more: a mark naming no sender is unclassified again, and
        // this layout's egress program stops writing into an older layout's flow table.
        legacy_marks_migrating(&to, false)?;
        self.barrier()
            .wait()
            .map_err(|e| DataplaneError::Sys("map-of-maps barrier", e))?;
        let late = if shared { 0 } else { copy_flows(&from, &to)? };
        forget_legacy_flows(&to)?;
        // The map stays the program's, as it is: a packet the old ingress program marked
        // with an index may still be queued. Only the name goes with the old layout.
        unpin(&to.join(MapNames::LEGACY_LOCAL_ADDR))?;
        // Out of the layouts' sight in one step (bpffs renames no directory: a marker), then
        // deleted: a run stopped midway must not find half a layout to migrate from.
        let gone = self.root.join(format!("v{n}{GONE}"));
        std::fs::create_dir_all(&gone).map_err(|e| DataplaneError::Bpffs(gone.clone(), e))?;
        std::fs::remove_dir_all(&from).map_err(|e| DataplaneError::Bpffs(from.clone(), e))?;
        std::fs::remove_dir(&gone).map_err(|e| DataplaneError::Bpffs(gone.clone(), e))?;
        unpin_dir(&copied)?;
        info!(
            from = n,
            to = LAYOUT_VERSION,
            rules,
            flows,
            late,
            passes,
            shared,
            renumbered,
            "migrated the maps to this binary's layout"
        );
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ambiguous_sender_indices_are_the_findings_and_the_old_unknown() {
        let all: Vec<u32> = (0..LEGACY_LOCAL_SLOTS).filter(|i| ambiguous(*i)).collect();
        assert_eq!(all, [33, 65, 81, 128, 129]);
    }
}
