//! Expiry of the flow table, and the datapath's clock.
//!
//! The table is a plain preallocated hash (an insert is cheaper than an LRU map's), so
//! nothing evicts idle flows but this sweep: without it the table would fill up, and new
//! flows would no longer be remembered.
//!
//! The programs stamp flows with the time in the one-entry `CLOCK` map, which this side
//! advances every [`TICK`]: a load there, where the kernel's clock helper cost 9 ns of the
//! established path's 68. While no enforcer runs the clock stands still; so that the flows
//! stamped meanwhile don't look idle for as long as it stood, a start moves them to the
//! present before the clock (see [`resume_clock`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData};
use moat_ebpf_common::{FlowKey, FlowVal, MapNames, OTHER_IDLE_NS, TCP_IDLE_NS};
use tracing::{debug, info};

use crate::dataplane::{DataplaneError, pinned};

/// How often idle flows are looked for: a flow outlives its idle time by at most this.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// How often the clock advances: a flow's idle time is measured to this.
pub const TICK: Duration = Duration::from_millis(250);

const IPPROTO_TCP: u8 = 6;

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
    let idle = if k.proto == IPPROTO_TCP {
        TCP_IDLE_NS
    } else {
        OTHER_IDLE_NS
    };
    now.saturating_sub(v.seen_ns) > idle
}

/// Deletes the flows idle for longer than their protocol's timeout at `now`; returns how
/// many. A flow refreshed between the scan and its deletion is kept.
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

/// Moves the flows stamped at or after `since` (and before `now`) to `now`; returns how
/// many.
fn restamp(ct: &mut HashMap<MapData, FlowKey, FlowVal>, since: u64, now: u64) -> usize {
    let stood: Vec<FlowKey> = ct
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, v)| (since..now).contains(&v.seen_ns))
        .map(|(k, _)| k)
        .collect();
    let mut n = 0;
    for k in stood {
        // Nothing deletes flows while no sweeper runs; the program may have stamped this
        // one again meanwhile, with `since` or `now`, and `now` is right either way.
        if ct.insert(k, FlowVal { seen_ns: now }, 0).is_ok() {
            n += 1;
        }
    }
    n
}

/// Starts the clock pinned in `dir` (before the programs are attached). If an earlier run
/// left it standing at `t`, every flow the programs touched since was stamped `t`: those
/// flows are moved to the present first, then the clock, then once more the flows stamped
/// `t` in between — so no flow in use ever looks idle for the time no enforcer ran, not
/// even for a packet in between. A clock never set (a new node, or maps of a program that
/// read the kernel's clock, which is the same one) needs no catching up.
pub fn resume_clock(dir: &Path) -> Result<(), DataplaneError> {
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
    let mut ct: HashMap<MapData, FlowKey, FlowVal> = pinned(dir, MapNames::CT)?;
    let before = restamp(&mut ct, stood, now);
    set(&mut clock, now)?;
    let between = restamp(&mut ct, stood, now);
    if before + between > 0 {
        info!(
            flows = before + between,
            stood_ms = now.saturating_sub(stood) / 1_000_000,
            "flows used while no enforcer ran keep their connections"
        );
    }
    Ok(())
}

/// Advances the clock every [`TICK`] and sweeps the flow table pinned in `dir` every
/// [`SWEEP_EVERY`], until `stop` is set.
pub fn start_sweeper(dir: &Path, stop: Arc<AtomicBool>) -> Result<(), DataplaneError> {
    let mut ct: HashMap<MapData, FlowKey, FlowVal> = pinned(dir, MapNames::CT)?;
    let mut clock = clock(dir)?;
    std::thread::Builder::new()
        .name("moat-flow-sweep".into())
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
                if tick.is_multiple_of(ticks) {
                    let n = sweep(&mut ct, coarse_now());
                    if n > 0 {
                        debug!(expired = n, "idle flows removed");
                    }
                }
                tick += 1;
                std::thread::sleep(TICK);
            }
        })
        .map_err(|e| DataplaneError::Sys("starting the flow sweeper", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
