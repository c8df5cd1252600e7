//! Expiry of the flow table. The table is a plain preallocated hash (an insert is cheaper
//! than an LRU map's), so nothing evicts idle flows but this sweep: without it the table
//! would fill up, and new flows would no longer be remembered.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aya::maps::{HashMap, MapData};
use moat_ebpf_common::{FlowKey, FlowVal, MapNames, OTHER_IDLE_NS, TCP_IDLE_NS};
use tracing::debug;

use crate::dataplane::{DataplaneError, pinned};

/// How often idle flows are looked for: a flow outlives its idle time by at most this.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);

const IPPROTO_TCP: u8 = 6;

/// The clock `bpf_ktime_get_coarse_ns` reads.
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

/// Sweeps the flow table pinned in `dir` every [`SWEEP_EVERY`] until `stop` is set.
pub fn start_sweeper(dir: &Path, stop: Arc<AtomicBool>) -> Result<(), DataplaneError> {
    let mut ct: HashMap<MapData, FlowKey, FlowVal> = pinned(dir, MapNames::CT)?;
    std::thread::Builder::new()
        .name("moat-flow-sweep".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = sweep(&mut ct, coarse_now());
                if n > 0 {
                    debug!(expired = n, "idle flows removed");
                }
                // Sleep in short steps so a stop is noticed soon.
                for _ in 0..SWEEP_EVERY.as_secs() * 4 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
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
