//! The flow table from user space, and the datapath's clock.
//!
//! Layout 4's table is an array the program places flows in itself (see
//! [`FlowSet`]); a slot whose flow idled past its protocol's timeout is free again, so
//! nothing needs deleting. This side maps the array into memory: to move flows to the present
//! after the clock stood still, and to copy an older layout's flows in. Older layouts' kernel
//! hash (`CT`, layouts 2 and 3) still needs [`sweep`]ing while a test runs one.
//!
//! The programs stamp flows with the time in the one-entry `CLOCK` map, which this side
//! advances every [`TICK`]: a load there, where the kernel's clock helper cost 9 ns of the
//! established path's 68. While no enforcer runs the clock stands still; so that the flows
//! stamped meanwhile don't look idle for as long as it stood, a start moves them to the
//! present before the clock (see [`resume_clock`]).

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::ptr::{addr_of, addr_of_mut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData};
use moat_ebpf_common::{
    FLOW_SETS, FLOW_WAYS, FlowKey, FlowSet, FlowVal, MAX_FLOWS, MapNames, flow_hash, flow_idle,
    flow_sets, slot_free,
};
use tracing::{debug, info};

use crate::dataplane::{DataplaneError, pinned};

/// How often an older layout's kernel hash is swept: a flow outlives its idle time by at
/// most this.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// How often the clock advances: a flow's idle time is measured to this.
pub const TICK: Duration = Duration::from_millis(250);

/// The clock the flow table keeps (`bpf_ktime_get_coarse_ns` reads it too).
pub fn coarse_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn expired(k: &FlowKey, v: &FlowVal, now: u64) -> bool {
    flow_idle(k.proto, v.seen_ns, now)
}

/// The flow table (`FLOWS`) mapped into this process, its sets' slots numbered through:
/// the programs write it concurrently, so every access is a volatile read or write of one
/// field.
pub struct FlowTable {
    base: *mut FlowSet,
    seed: u64,
}

/// Bytes of the mapping: the whole array.
const MAPPED: usize = FLOW_SETS as usize * size_of::<FlowSet>();
const SLOTS: usize = MAX_FLOWS as usize;

// SAFETY: the mapping is shared memory owned by the kernel map; every access is volatile.
unsafe impl Send for FlowTable {}

impl FlowTable {
    /// The table pinned in `dir`; `None` for an older layout (no `FLOWS` map).
    pub fn open(dir: &Path) -> Result<Option<FlowTable>, DataplaneError> {
        if !dir.join(MapNames::FLOWS).exists() {
            return Ok(None);
        }
        let seed = seed(dir)?;
        let e = |err| DataplaneError::Map(MapNames::FLOWS, err);
        let map = MapData::from_pin(dir.join(MapNames::FLOWS)).map_err(e)?;
        // SAFETY: a shared mapping of the array's values (BPF_F_MMAPABLE), as long as the
        // map; the kernel keeps the map alive while it is mapped.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAPPED,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(DataplaneError::Sys(
                "mapping the flow table",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Some(FlowTable {
            base: base.cast(),
            seed,
        }))
    }

    /// Slot `i`'s set (slots are numbered through the table, `FLOW_WAYS` per set) and way.
    fn at(&self, i: usize) -> (*mut FlowSet, usize) {
        assert!(i < SLOTS);
        let w = FLOW_WAYS as usize;
        // SAFETY: in bounds of the mapping.
        (unsafe { self.base.add(i / w) }, i % w)
    }

    fn check(&self, i: usize) -> u64 {
        let (set, way) = self.at(i);
        // SAFETY: a field of a set in the mapping.
        unsafe { addr_of!((*set).check[way]).read_volatile() }
    }

    fn seen(&self, i: usize) -> u64 {
        let (set, way) = self.at(i);
        // SAFETY: as in `check`.
        unsafe { addr_of!((*set).seen_ns[way]).read_volatile() }
    }

    fn key(&self, i: usize) -> FlowKey {
        let (set, way) = self.at(i);
        // SAFETY: as in `check`.
        unsafe { addr_of!((*set).key[way]).read_volatile() }
    }

    fn set_seen(&self, i: usize, now: u64) {
        let (set, way) = self.at(i);
        // SAFETY: as in `check`; one aligned 8-byte store, atomic on the CPUs BPF JITs for.
        unsafe { addr_of_mut!((*set).seen_ns[way]).write_volatile(now) }
    }

    /// The flows in the table and when each was last seen.
    pub fn flows(&self) -> Vec<(FlowKey, u64)> {
        (0..SLOTS)
            .filter(|&i| self.check(i) != 0)
            .filter_map(|i| {
                let (k, seen) = (self.key(i), self.seen(i));
                (flow_hash(self.seed, &k) == self.check(i)).then_some((k, seen))
            })
            .collect()
    }

    /// Where `k` is, if remembered.
    fn find(&self, k: &FlowKey, h: u64) -> Option<usize> {
        flow_sets(h)
            .into_iter()
            .flat_map(slots)
            .find(|&i| self.check(i) == h && self.key(i) == *k)
    }

    /// When `k` was last seen, if it is in the table.
    pub fn get(&self, k: &FlowKey) -> Option<u64> {
        self.find(k, flow_hash(self.seed, k)).map(|i| self.seen(i))
    }

    /// Remembers `k` as seen at `seen` the way the program does (keeping a later time the
    /// program wrote); `false` if both its sets are full of flows in use at `now`.
    pub fn remember(&self, k: &FlowKey, seen: u64, now: u64) -> bool {
        let h = flow_hash(self.seed, k);
        if let Some(i) = self.find(k, h) {
            if self.seen(i) < seen {
                self.set_seen(i, seen);
            }
            return true;
        }
        let free = |i| slot_free(self.check(i), self.seen(i), now);
        let Some(i) = place(h, free) else {
            return false;
        };
        let (set, way) = self.at(i);
        // SAFETY: fields of a set in the mapping, in FlowSet's write order.
        unsafe {
            addr_of_mut!((*set).check[way]).write_volatile(0);
            addr_of_mut!((*set).key[way]).write_volatile(*k);
            addr_of_mut!((*set).seen_ns[way]).write_volatile(seen);
            addr_of_mut!((*set).check[way]).write_volatile(h);
        }
        true
    }

    /// Moves the flows stamped at or after `since` (and before `now`) to `now`; returns how
    /// many.
    fn restamp(&self, since: u64, now: u64) -> usize {
        let mut n = 0;
        for i in 0..SLOTS {
            // The program may stamp the slot again meanwhile, with `since` or `now`, and
            // `now` is right either way: one aligned store, no slot rewritten.
            if self.check(i) != 0 && (since..now).contains(&self.seen(i)) {
                self.set_seen(i, now);
                n += 1;
            }
        }
        n
    }
}

impl Drop for FlowTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, of this length.
        unsafe { libc::munmap(self.base.cast(), MAPPED) };
    }
}

/// Where a new flow with hash `h` goes, given which slots are `free`: the first free slot of
/// whichever of its two sets has one first (flows fill a set from its first slot, so that
/// is the emptier), as the program places flows. Choosing the emptier of two keeps the sets
/// even: the table is mostly full before any flow finds no slot (see the tests).
pub fn place(h: u64, free: impl Fn(usize) -> bool) -> Option<usize> {
    let [a, b] = flow_sets(h).map(slots);
    let (fa, fb) = (a.clone().find(|&i| free(i)), b.clone().find(|&i| free(i)));
    match (fa, fb) {
        (Some(i), Some(j)) if j - b.start < i - a.start => Some(j),
        (Some(i), _) => Some(i),
        (None, j) => j,
    }
}

/// The slots of set `set`, numbered through the table.
fn slots(set: u32) -> std::ops::Range<usize> {
    let first = (set * FLOW_WAYS) as usize;
    first..first + FLOW_WAYS as usize
}

/// The table's hash key pinned in `dir`, chosen (at random, never again) if not yet set.
/// It must be set before the programs first run: a key changed under remembered flows
/// would lose them all.
fn seed(dir: &Path) -> Result<u64, DataplaneError> {
    let e = |err| DataplaneError::Map(MapNames::FLOW_SEED, err);
    let mut m: Array<MapData, u64> = pinned(dir, MapNames::FLOW_SEED)?;
    let have = m.get(&0, 0).map_err(e)?;
    if have != 0 {
        return Ok(have);
    }
    let mut buf = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `buf`.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), 8, 0) };
    if got != 8 {
        return Err(DataplaneError::Sys(
            "choosing the flow table's hash key",
            std::io::Error::last_os_error(),
        ));
    }
    let seed = u64::from_ne_bytes(buf) | 1;
    m.set(0, seed, 0).map_err(e)?;
    Ok(seed)
}

/// Deletes the flows of an older layout's kernel hash idle for longer than their protocol's
/// timeout at `now`; returns how many. A flow refreshed between the scan and its deletion
/// is kept.
pub fn sweep(ct: &mut HashMap<MapData, FlowKey, FlowVal>, now: u64) -> usize {
    let stale: Vec<FlowKey> = ct
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(k, v)| expired(k, v, now))
        .map(|(k, _)| k)
        .collect();
    let mut n = 0;
    for k in stale {
        if ct.get(&k, 0).is_ok_and(|v| expired(&k, &v, now)) && ct.remove(&k).is_ok() {
            n += 1;
        }
    }
    n
}

/// The datapath's clock map in `dir`; `None` for a program without one (layout 1's).
fn clock(dir: &Path) -> Result<Option<Array<MapData, u64>>, DataplaneError> {
    if !dir.join(MapNames::CLOCK).exists() {
        return Ok(None);
    }
    pinned(dir, MapNames::CLOCK).map(Some)
}

fn set(clock: &mut Array<MapData, u64>, now: u64) -> Result<(), DataplaneError> {
    clock
        .set(0, now, 0)
        .map_err(|e| DataplaneError::Map(MapNames::CLOCK, e))
}

/// Prepares the flow table pinned in `dir` (before the programs are attached): sets its
/// hash key if new, and starts the clock. If an earlier run left the clock standing at `t`,
/// every flow the programs touched since was stamped `t`: those flows are moved to the
/// present first, then the clock, then once more the flows stamped `t` in between — so no
/// flow in use ever looks idle for the time no enforcer ran, not even for a packet in
/// between. A clock never set (a new node, or maps of a program that read the kernel's
/// clock, which is the same one) needs no catching up.
pub fn resume_clock(dir: &Path) -> Result<(), DataplaneError> {
    let table = FlowTable::open(dir)?;
    let Some(mut clock) = clock(dir)? else {
        return Ok(());
    };
    let stood = clock
        .get(&0, 0)
        .map_err(|e| DataplaneError::Map(MapNames::CLOCK, e))?;
    let now = coarse_now();
    if stood == 0 || stood >= now {
        return set(&mut clock, now);
    }
    let Some(table) = table else {
        // Layout 2 or 3 (tests): their flows were swept, not restamped, before layout 4.
        return set(&mut clock, now);
    };
    let before = table.restamp(stood, now);
    set(&mut clock, now)?;
    let between = table.restamp(stood, now);
    if before + between > 0 {
        info!(
            flows = before + between,
            stood_ms = now.saturating_sub(stood) / 1_000_000,
            "flows used while no enforcer ran keep their connections"
        );
    }
    Ok(())
}

/// Advances the clock every [`TICK`] (and sweeps an older layout's kernel hash every
/// [`SWEEP_EVERY`]) until `stop` is set.
pub fn start_sweeper(dir: &Path, stop: Arc<AtomicBool>) -> Result<(), DataplaneError> {
    let mut ct: Option<HashMap<MapData, FlowKey, FlowVal>> = if dir.join(MapNames::CT).exists() {
        Some(pinned(dir, MapNames::CT)?)
    } else {
        None
    };
    let mut clock = clock(dir)?;
    std::thread::Builder::new()
        .name("moat-flow-clock".into())
        .spawn(move || {
            let ticks = (SWEEP_EVERY.as_millis() / TICK.as_millis()) as u64;
            let mut tick = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(c) = clock.as_mut()
                    && let Err(e) = set(c, coarse_now())
                {
                    // Only idle timeouts lengthen while it fails; nothing opens.
                    debug!(error = %e, "advancing the datapath clock");
                }
                if let Some(ct) = ct.as_mut()
                    && tick.is_multiple_of(ticks)
                {
                    let n = sweep(ct, coarse_now());
                    if n > 0 {
                        debug!(expired = n, "idle flows removed");
                    }
                }
                tick += 1;
                std::thread::sleep(TICK);
            }
        })
        .map_err(|e| DataplaneError::Sys("starting the flow clock", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_ebpf_common::{FLOW_SETS, OTHER_IDLE_NS, TCP_IDLE_NS};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// How full the table gets before a new flow first finds both its sets in use, with
    /// the program's placement ([`place`]) and nothing idle: the load this layout's table
    /// serves without losing a flow.
    #[test]
    fn the_table_fills_far_before_a_flow_finds_no_slot() {
        let mut rng = SmallRng::seed_from_u64(7);
        let seed = rng.random::<u64>() | 1;
        let mut first_miss = Vec::new();
        for _ in 0..3 {
            let mut checks = vec![0u64; MAX_FLOWS as usize];
            let mut n = 0usize;
            loop {
                let mut k = FlowKey {
                    family: 4,
                    proto: 6,
                    _pad: [0; 2],
                    sport: rng.random(),
                    dport: 443,
                    saddr: [0; 16],
                    daddr: [0; 16],
                };
                rng.fill(&mut k.saddr[..4]);
                rng.fill(&mut k.daddr[..4]);
                let h = flow_hash(seed, &k);
                let Some(i) = place(h, |i| checks[i] == 0) else {
                    break;
                };
                checks[i] = h;
                n += 1;
            }
            first_miss.push(n as f64 / MAX_FLOWS as f64);
        }
        eprintln!("first flow without a slot at {first_miss:?} of {MAX_FLOWS} ({FLOW_SETS} sets)");
        assert!(first_miss.iter().all(|&f| f > 0.5), "{first_miss:?}");
    }

    #[test]
    fn idle_times_follow_the_protocol() {
        let k = |proto| FlowKey {
            family: 4,
            proto,
            _pad: [0; 2],
            sport: 1,
            dport: 2,
            saddr: [0; 16],
            daddr: [0; 16],
        };
        let now = 10 * TCP_IDLE_NS;
        let v = |ago: u64| FlowVal { seen_ns: now - ago };
        assert!(
            !expired(&k(6), &v(OTHER_IDLE_NS * 2), now),
            "TCP idles for a day"
        );
        assert!(expired(&k(6), &v(TCP_IDLE_NS + 1), now));
        assert!(expired(&k(17), &v(OTHER_IDLE_NS + 1), now));
        assert!(!expired(&k(17), &v(OTHER_IDLE_NS - 1), now));
        assert!(
            !expired(&k(17), &FlowVal { seen_ns: now + 5 }, now),
            "seen after the scan began"
        );
    }
}
