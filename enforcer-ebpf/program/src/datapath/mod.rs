//! Two tc programs on every interface of the node's network namespace:
//!
//! * `moat_ingress` (packets entering the namespace, before routing and DNAT) recognises
//!   replies and ICMP errors of connections this node allowed, and names the local endpoint
//!   that sent the packet; both go into `skb->mark` bits the program owns;
//! * `moat_egress` (packets leaving, after DNAT and SNAT) judges new flows on the translated
//!   destination and the original source: the source's egress rules and the destination's
//!   ingress rules, each a fixed number of map lookups, and remembers allowed flows.
//!
//! The node's own traffic (generated on the node: `ingress_ifindex == 0`) is never judged,
//! like the nft backend's forward hook never sees it. See docs/design/ebpf.md.

mod flows;
mod parse;

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray};
use aya_ebpf::programs::TcContext;
use moat_ebpf_common::*;

use parse::{Addr, FRAG_FIRST, FRAG_LATER, Pkt};

#[map]
static SELECTOR: Array<u32> = Array::pinned(1, 0);
#[map]
static ENDPOINTS: HashMap<EndpointKey, u32> = HashMap::pinned(1 << 16, BPF_F_NO_PREALLOC);
#[map]
static ADDRS: HashMap<AddrKey, u32> = HashMap::pinned(1 << 20, BPF_F_NO_PREALLOC);
#[map]
static RANGES: LpmTrie<RangeKey, u32> = LpmTrie::pinned(1 << 20, 0);
/// Single ports (a [`PortKey`] with every bit significant), looked up before `PORTS`: the
/// common rule, and a hash hit costs a third of a hit deep in a 10,000-rule trie.
#[map]
static PORT_EXACT: HashMap<PortKey, u8> = HashMap::pinned(1 << 20, BPF_F_NO_PREALLOC);
/// Port ranges (as prefixes), whole protocols and whole classes.
#[map]
static PORTS: LpmTrie<PortKey, u8> = LpmTrie::pinned(1 << 20, 0);
#[map]
static NAMED: HashMap<NamedKey, u8> = HashMap::pinned(1 << 20, BPF_F_NO_PREALLOC);
#[map]
static LOCAL: HashMap<LocalKey, u32> = HashMap::pinned(2 * MAX_LOCAL, 0);
#[map]
static LOCAL_ADDR: Array<LocalAddr> = Array::pinned(MAX_LOCAL + 1, 0);
/// The flow table, placed by this program (see [`flows`]); memory-mapped by user space.
#[map]
static FLOWS: Array<FlowSet> = Array::pinned(FLOW_SETS, BPF_F_MMAPABLE);
/// The flow table's hash key, random per node, set before the programs first run.
#[map]
static FLOW_SEED: Array<u64> = Array::pinned(1, 0);
#[map]
static FRAGS: LruHashMap<FragKey, u8> = LruHashMap::pinned(1 << 13, 0);
/// Coarse monotonic time in ns (`CLOCK_MONOTONIC_COARSE`, the flow table's clock), written by
/// user space every 250 ms (`flows::TICK`): reading it is one load, where
/// `bpf_ktime_get_coarse_ns` was a helper call costing 9 ns, 13 % of the established path.
#[map]
static CLOCK: Array<u64> = Array::pinned(1, 0);
/// Read by user space only: the version the maps hold.
#[map]
static META: Array<Meta> = Array::pinned(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(moat_ebpf_common::COUNTERS, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_F_MMAPABLE: u32 = 1 << 10;

#[classifier]
pub fn moat_ingress(ctx: TcContext) -> i32 {
    // Never drops: a packet this program can't read is judged (and refused) at egress.
    let _ = try_ingress(&ctx);
    TC_ACT_OK
}

#[classifier]
pub fn moat_egress(ctx: TcContext) -> i32 {
    match try_egress(&ctx) {
        Ok(true) => TC_ACT_OK,
        Ok(false) => {
            count(CNT_DENIED);
            TC_ACT_SHOT
        }
        Err(()) => {
            count(CNT_MALFORMED);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn count(i: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(i) {
        unsafe { *c += 1 };
    }
}

fn try_ingress(ctx: &TcContext) -> Result<(), ()> {
    let skb = ctx.skb.skb;
    let mut mark = unsafe { (*skb).mark } & !MARK_MASK;
    unsafe { (*skb).mark = mark };
    let mut slot = core::mem::MaybeUninit::uninit();
    let p = Pkt::zeroed_in(&mut slot);
    if !parse::parse(ctx, p)? {
        return Ok(());
    }
    if answers_allowed(p) {
        mark |= MARK_REPLY;
    }
    if let Some(i) = unsafe { LOCAL.get(&local_key(p)) } {
        mark |= (*i << MARK_SRC_SHIFT) & MARK_SRC_MASK;
    }
    unsafe { (*skb).mark = mark };
    Ok(())
}

/// The sender's [`LocalKey`], its family and padding written as one word: built field by
/// field, the three pad bytes were a call to a byte-wise `memset` on every packet.
#[inline(always)]
fn local_key(p: &Pkt) -> LocalKey {
    let mut k = core::mem::MaybeUninit::<LocalKey>::uninit();
    let at = k.as_mut_ptr();
    // SAFETY: both writes stay inside `k` and together cover every byte (family and padding
    // are its first 4-byte word; this target is little-endian, so the family comes first).
    unsafe {
        (at as *mut u32).write(u32::from(p.family));
        core::ptr::addr_of_mut!((*at).addr).write(p.saddr.0);
        k.assume_init()
    }
}

/// Whether `p` is the reply side of a flow this node allowed, or an ICMP error about one.
fn answers_allowed(p: &Pkt) -> bool {
    if p.has_inner != 0 {
        return seen(&p.inner) || seen(&p.inner.reversed());
    }
    match p.frag {
        FRAG_LATER => frag_verdict(&p.frag_key()) == Some(1),
        FRAG_FIRST => {
            let hit = seen(&p.flow().reversed());
            if hit {
                let _ = FRAGS.insert(&p.frag_key(), &1, 0);
            }
            hit
        }
        // A SYN opens a connection; it never answers one.
        _ => p.syn == 0 && seen(&p.flow().reversed()),
    }
}

/// Looks up a remembered flow, refreshing it; expired entries count as absent.
fn seen(k: &FlowKey) -> bool {
    let h = flows::hash(k);
    let Some(seen) = flows::find(k, h) else {
        return false;
    };
    let now = now();
    unsafe {
        if flow_idle(k.proto, *seen, now) {
            return false;
        }
        // Coarse time (no clock read) and one store: this is the established path's cost.
        *seen = now;
    }
    true
}

#[inline(always)]
fn now() -> u64 {
    CLOCK.get(0).copied().unwrap_or(0)
}

fn frag_verdict(k: &FragKey) -> Option<u8> {
    unsafe { FRAGS.get(k) }.copied()
}

impl Pkt {
    /// The key all fragments of this packet share.
    fn frag_key(&self) -> FragKey {
        FragKey {
            family: self.family,
            proto: self.proto,
            _pad: [0; 2],
            id: self.frag_id,
            saddr: self.saddr.0,
            daddr: self.daddr.0,
        }
    }
}

fn try_egress(ctx: &TcContext) -> Result<bool, ()> {
    let skb = ctx.skb.skb;
    let mark = unsafe { (*skb).mark };
    if mark & MARK_REPLY != 0 {
        return Ok(true);
    }
    // Generated on this node: the node's own traffic is never judged.
    if unsafe { (*skb).ingress_ifindex } == 0 {
        return Ok(true);
    }
    let mut slot = core::mem::MaybeUninit::uninit();
    let p = Pkt::zeroed_in(&mut slot);
    if !parse::parse(ctx, p)? {
        return Ok(true);
    }
    if p.nd != 0 || p.link_local_source() {
        return Ok(true);
    }
    if p.frag == FRAG_LATER {
        return Ok(frag_verdict(&p.frag_key()) == Some(1));
    }
    let flow = p.flow();
    if p.has_inner == 0 && p.syn == 0 && seen(&flow) {
        return Ok(true);
    }
    let sel = SELECTOR.get(0).copied().unwrap_or(0) as u8;
    let src = original_source(p, mark);
    let allowed =
        allows(sel, DIR_EGRESS, &src, &p.daddr, p) && allows(sel, DIR_INGRESS, &p.daddr, &src, p);
    if p.frag == FRAG_FIRST {
        let _ = FRAGS.insert(&p.frag_key(), &u8::from(allowed), 0);
    }
    if allowed {
        // ICMP errors are judged one by one, never remembered as flows.
        if p.has_inner == 0 {
            if !flows::remember(&flow, now()) {
                count(CNT_CT_FULL);
            }
        }
        count(CNT_ALLOWED);
    }
    Ok(allowed)
}

/// The sender as the ingress program saw it: SNAT may have rewritten the source since.
fn original_source(p: &Pkt, mark: u32) -> Addr {
    let i = (mark & MARK_SRC_MASK) >> MARK_SRC_SHIFT;
    if i != 0
        && let Some(a) = LOCAL_ADDR.get(i)
        && a.family == p.family
    {
        return Addr(a.addr);
    }
    p.saddr
}

/// Whether the rules of `local` (if any isolate it in `dir`) allow `peer`.
fn allows(slot: u8, dir: u8, local: &Addr, peer: &Addr, p: &Pkt) -> bool {
    let ek = EndpointKey {
        slot,
        family: p.family,
        dir,
        _pad: 0,
        addr: local.0,
    };
    let Some(rs) = (unsafe { ENDPOINTS.get(&ek) }).copied() else {
        return true;
    };
    let class = class_of(slot, p.family, peer);
    let hit = |class: u32| {
        let k = LpmKey {
            prefix_len: PORT_FULL_BITS,
            data: PortKey::new(slot, rs, class, p.proto, p.port),
        };
        unsafe { PORT_EXACT.get(&k.data) }.is_some() || PORTS.get(k.as_key()).is_some()
    };
    if (class != 0 && hit(class)) || hit(CLASS_ANY) {
        return true;
    }
    if dir == DIR_EGRESS {
        let nk = NamedKey {
            slot,
            family: p.family,
            proto: p.proto,
            _pad: 0,
            ruleset: rs,
            port: p.port,
            _pad2: [0; 2],
            addr: peer.0,
        };
        return unsafe { NAMED.get(&nk) }.is_some();
    }
    false
}

/// The class of an address: single addresses first, then CIDR ranges; 0 for none.
fn class_of(slot: u8, family: u8, addr: &Addr) -> u32 {
    let ak = AddrKey {
        slot,
        family,
        _pad: [0; 2],
        addr: addr.0,
    };
    if let Some(c) = unsafe { ADDRS.get(&ak) } {
        return *c;
    }
    let rk = LpmKey {
        prefix_len: RANGE_FIXED_BITS + 128,
        data: RangeKey {
            slot,
            family,
            addr: addr.0,
            _pad: [0; 2],
        },
    };
    RANGES.get(rk.as_key()).copied().unwrap_or(0)
}

/// An LPM lookup key with aya's [`Key`] layout, but 4-byte aligned: `Key` is `packed`, so
/// LLVM builds it (and the key inside) one byte at a time.
#[repr(C, align(4))]
struct LpmKey<K> {
    prefix_len: u32,
    data: K,
}

impl<K> LpmKey<K> {
    const SAME_LAYOUT: () = assert!(size_of::<Self>() == size_of::<Key<K>>());

    #[inline(always)]
    fn as_key(&self) -> &Key<K> {
        let () = Self::SAME_LAYOUT;
        // SAFETY: same fields in the same order with no padding (sizes equal), and `Key`
        // (packed) asks for less alignment than this type has.
        unsafe { &*(self as *const Self as *const Key<K>) }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier proves no path reaches here.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
