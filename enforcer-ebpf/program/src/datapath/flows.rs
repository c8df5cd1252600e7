//! The flow table: an array of [`FlowSet`]s of [`FLOW_WAYS`] slots; a flow may take any slot
//! of either of its two sets (by a keyed hash), and a new one goes to the emptier. Looking
//! up is that hash computed here, at most two map lookups (the verifier inlines them for
//! arrays) and sixteen check-word compares — a key is compared only where its check word
//! matches; remembering writes a slot in place. The kernel's hash map did the same with a
//! 40-byte jhash, a bucket lock taken with interrupts off and a free-list pop: a quarter of a
//! new flow's cost.
//!
//! Nothing deletes: a slot whose flow is idle (by its protocol's timeout) is free.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use moat_ebpf_common::{FLOW_WAYS, FlowKey, FlowSet, flow_hash, flow_sets, slot_free};

use super::{FLOW_SEED, FLOWS};

const WAYS: usize = FLOW_WAYS as usize;

#[inline(always)]
pub fn hash(k: &FlowKey) -> u64 {
    flow_hash(FLOW_SEED.get(0).copied().unwrap_or(0), k)
}

#[inline(always)]
fn words(k: &FlowKey) -> &[u64; 5] {
    // SAFETY: FlowKey is 40 bytes, 8-byte aligned, without padding.
    unsafe { &*(k as *const FlowKey as *const [u64; 5]) }
}

/// Word by word, without branches: a plain `==` (or a chain of `&&`) becomes a call to a
/// byte-wise `bcmp` on this target.
#[inline(always)]
fn same(a: &[u64; 5], b: &[u64; 5]) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4])) == 0
}

/// The time word of the slot holding `k` (whose hash is `h`), if any.
#[inline(always)]
pub fn find(k: &FlowKey, h: u64) -> Option<*mut u64> {
    let want = words(k);
    for set in flow_sets(h) {
        let Some(set) = FLOWS.get_ptr_mut(set) else {
            continue;
        };
        for way in 0..WAYS {
            // SAFETY: fields of a map value; other CPUs may write them meanwhile (see
            // FlowSet).
            unsafe {
                if read_volatile(addr_of!((*set).check[way])) == h
                    && same(words(&(*set).key[way]), want)
                {
                    return Some(addr_of_mut!((*set).seen_ns[way]));
                }
            }
        }
    }
    None
}

/// The first free way of `set` at `now`, or `WAYS`.
#[inline(always)]
fn first_free(set: *const FlowSet, now: u64) -> usize {
    for way in 0..WAYS {
        // SAFETY: fields of a map value, read as in `find`.
        let free = unsafe {
            slot_free(
                read_volatile(addr_of!((*set).check[way])),
                (*set).seen_ns[way],
                now,
            )
        };
        if free {
            return way;
        }
    }
    WAYS
}

/// Remembers `k` as seen at `now`: refreshes its slot, or takes a free one in the emptier of
/// its sets. `false` if both are full of flows in use. A call of its own: inlined, its stack
/// would add to the egress program's deepest chain, over the verifier's 512 bytes.
///
/// "Emptier" is the set whose first free way comes first: flows fill a set from its first
/// way, so that is its fill level, give or take the flows that idled out. Counting the
/// free ways instead made the verifier walk every combination of sixteen branches (3.5 s
/// per load).
#[inline(never)]
pub fn remember(k: &FlowKey, now: u64) -> bool {
    let h = hash(k);
    if let Some(seen) = find(k, h) {
        unsafe { *seen = now };
        return true;
    }
    let [a, b] = flow_sets(h);
    let (Some(a), Some(b)) = (FLOWS.get_ptr_mut(a), FLOWS.get_ptr_mut(b)) else {
        return false;
    };
    let (way_a, way_b) = (first_free(a, now), first_free(b, now));
    let (set, way) = if way_b < way_a {
        (b, way_b)
    } else {
        (a, way_a)
    };
    if way >= WAYS {
        return false;
    }
    // SAFETY: fields of a map value (`way` checked above), written in FlowSet's order.
    unsafe {
        write_volatile(addr_of_mut!((*set).check[way]), 0);
        write_volatile(addr_of_mut!((*set).key[way]), *k);
        write_volatile(addr_of_mut!((*set).seen_ns[way]), now);
        write_volatile(addr_of_mut!((*set).check[way]), h);
    }
    true
}
