//! Two tc programs on every interface of the node's network namespace, each in a variant
//! for pod interfaces and one for the others (docs/design/fail-closed.md):
//!
//! * `moat_ingress_pod`/`moat_ingress` (packets entering the namespace, before routing and
//!   DNAT) recognise replies and ICMP errors of connections this node allowed, and check the
//!   source: on a pod interface it must be one that interface holds (one hash lookup of
//!   (interface, source)), elsewhere it must be no local pod's. The findings go into
//!   `skb->mark` bits the program owns;
//! * `moat_egress_pod`/`moat_egress` (packets leaving, after DNAT and SNAT) drop forwarded
//!   packets marked spoofed or unknown, and judge new flows on the translated destination
//!   and the sender named by the packet's ingress interface: the sender's egress rules and
//!   the receiver's ingress rules, each a fixed number of map lookups, and remember allowed
//!   flows.
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
/// common rule, and a hash hit costs a third of a hit deep in a 10,000-rule trie. The
/// values of the three port maps are verdicts (`VERDICT_*`, see [`allows`]).
#[map]
static PORT_EXACT: HashMap<PortKey, u8> = HashMap::pinned(1 << 20, BPF_F_NO_PREALLOC);
/// Port ranges (as prefixes), whole protocols and whole classes.
#[map]
static PORTS: LpmTrie<PortKey, u8> = LpmTrie::pinned(1 << 20, 0);
#[map]
static NAMED: HashMap<NamedKey, u8> = HashMap::pinned(1 << 20, BPF_F_NO_PREALLOC);
/// (pod interface, address) → `POD_*`: what the pod-interface programs check sources and
/// receivers against.
/// While migrating from layouts 1 to 3: their flow table (`CT`, a kernel hash), pinned again
/// here before this program loads, so a flow their program admits until its links move is
/// one this program knows at once (looked up only on a miss, and only when `LEGACY_FLOWS`).
#[map]
static LEGACY_CT: HashMap<FlowKey, FlowVal> = HashMap::pinned(1, 0);
/// The map layout this program reads, for the loader to check an object it is given
/// (`MOAT_EBPF_OBJECT`) before writing entries a program of another layout would misread.
#[unsafe(no_mangle)]
#[used]
static MOAT_LAYOUT: u32 = moat_ebpf_common::LAYOUT_VERSION;
/// Set at load (read-only to the program: the verifier prunes the lookup when it is 0).
#[unsafe(no_mangle)]
static LEGACY_FLOWS: u32 = 0;
/// Set at load while an older layout (1 to 4) is pinned beside this one, until the next
/// restart: a finding that is also a possible old sender index (a packet the old ingress
/// program marked may be queued in the kernel for a while, a fragment awaiting its
/// datagram say) is checked on what the egress program sees before it is believed (see
/// [`ambiguous_finding`]). Pruned by the verifier when 0.
#[unsafe(no_mangle)]
static LEGACY_MARKS: u32 = 0;
/// While migrating from layouts 1 to 4: their `LOCAL_ADDR`, pinned again here before this
/// program loads, by which a packet their ingress program marked names its sender (see
/// `MARK_CLASSIFIED`). Otherwise empty: such a mark names nobody.
#[map]
static LEGACY_LOCAL_ADDR: Array<LocalAddr> = Array::pinned(LEGACY_LOCAL_SLOTS, 0);
#[map]
static PODS: HashMap<PodKey, u8> = HashMap::pinned(MAX_POD_ADDRS, BPF_F_NO_PREALLOC);
/// Every local pod address: a source the other-interface ingress program refuses.
#[map]
static LOCAL_ADDRS: HashMap<LocalKey, u8> = HashMap::pinned(MAX_POD_ADDRS, BPF_F_NO_PREALLOC);
/// Classified interfaces (absent: unclassified) and a pod's addresses, by ifindex.
#[map]
static IFACES: HashMap<u32, Iface> = HashMap::pinned(MAX_IFACES, BPF_F_NO_PREALLOC);
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
pub fn moat_ingress_pod(ctx: TcContext) -> i32 {
    // Never drops: what it finds goes into the mark, and the egress program decides.
    let _ = try_ingress::<true>(&ctx);
    TC_ACT_OK
}

#[classifier]
pub fn moat_ingress(ctx: TcContext) -> i32 {
    let _ = try_ingress::<false>(&ctx);
    TC_ACT_OK
}

#[classifier]
pub fn moat_egress_pod(ctx: TcContext) -> i32 {
    verdict(try_egress::<true>(&ctx))
}

#[classifier]
pub fn moat_egress(ctx: TcContext) -> i32 {
    verdict(try_egress::<false>(&ctx))
}

/// Why a packet is dropped, each with its counter.
#[derive(Clone, Copy)]
enum Shot {
    Denied = CNT_DENIED as isize,
    Malformed = CNT_MALFORMED as isize,
    Spoofed = CNT_SPOOFED as isize,
    UnknownPod = CNT_UNKNOWN_POD as isize,
    Unclassified = CNT_UNCLASSIFIED as isize,
}

#[inline(always)]
fn verdict(r: Result<(), Shot>) -> i32 {
    match r {
        Ok(()) => TC_ACT_OK,
        Err(d) => {
            count(d as u32);
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

fn try_ingress<const POD: bool>(ctx: &TcContext) -> Result<(), ()> {
    let skb = ctx.skb.skb;
    let mut mark = unsafe { (*skb).mark } & !MARK_MASK;
    unsafe { (*skb).mark = mark };
    let mut slot = core::mem::MaybeUninit::uninit();
    let p = Pkt::zeroed_in(&mut slot);
    if !parse::parse(ctx, p)? {
        return Ok(());
    }
    // Neighbour discovery and IPv6 link-local sources are never forwarded (the node's own
    // business, left alone); IPv4 link-local sources are, and are checked like any other.
    if p.nd != 0 || (p.family == FAMILY_V6 && p.link_local_source()) {
        return Ok(());
    }
    if answers_allowed(p) {
        mark |= MARK_REPLY;
    }
    // One lookup either way: the one `LOCAL` cost before layout 5.
    if POD {
        // At tc ingress the ingress interface is the device itself (`skb_iif` is set before
        // the hook), read without following `skb->dev`.
        let k = pod_key(unsafe { (*skb).ingress_ifindex }, p.family, &p.saddr);
        mark |= MARK_CLASSIFIED
            | match unsafe { PODS.get(&k) }.copied() {
                Some(POD_KNOWN) => MARK_FROM_POD,
                Some(POD_UNKNOWN_ALLOW) => MARK_FROM_POD | MARK_OPEN,
                Some(_) => MARK_UNKNOWN,
                None => MARK_SPOOFED,
            };
    } else if is_local(p) {
        mark |= MARK_CLASSIFIED | MARK_SPOOFED;
    } else {
        mark |= MARK_CLASSIFIED | MARK_FROM_OTHER;
    }
    unsafe { (*skb).mark = mark };
    Ok(())
}

#[inline(always)]
fn pod_key(ifindex: u32, family: u8, a: &Addr) -> PodKey {
    let mut k = core::mem::MaybeUninit::<PodKey>::uninit();
    let at = k.as_mut_ptr();
    // SAFETY: the three writes stay inside `k` and together cover every byte (ifindex, then
    // family and padding as one word: little-endian, the family comes first, then the address).
    unsafe {
        (at as *mut u32).write(ifindex);
        (at as *mut u32).add(1).write(u32::from(family));
        core::ptr::addr_of_mut!((*at).addr).write(a.0);
        k.assume_init()
    }
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
        FRAG_LATER => frag_allowed(&p.frag_key()),
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
        return seen_legacy(k);
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

/// [`seen`] in the older layout's table while migrating from it.
#[inline(always)]
fn seen_legacy(k: &FlowKey) -> bool {
    // Volatile: a constant to the verifier, never to LLVM.
    if unsafe { core::ptr::read_volatile(&LEGACY_FLOWS) } == 0 {
        return false;
    }
    let Some(v) = LEGACY_CT.get_ptr_mut(k) else {
        return false;
    };
    let now = now();
    unsafe {
        if flow_idle(k.proto, (*v).seen_ns, now) {
            return false;
        }
        (*v).seen_ns = now;
    }
    true
}

/// While the links move from layouts 1 to 3 (egress first): a flow this egress program
/// admits goes into their table too, where their ingress program, still on its links,
/// looks the reply up. Called only with `LEGACY_FLOWS`; a call of its own to keep the
/// egress program's stack as it was.
#[inline(never)]
fn remember_legacy(k: &FlowKey) {
    let migrating = LEGACY_LOCAL_ADDR
        .get(0)
        .is_some_and(|a| a.family == LEGACY_MIGRATING);
    if migrating {
        let _ = LEGACY_CT.insert(k, &FlowVal { seen_ns: now() }, 0);
    }
}

#[inline(always)]
fn now() -> u64 {
    CLOCK.get(0).copied().unwrap_or(0)
}

/// Whether the first fragment of `k`'s packet was allowed. A plain bool: comparing the
/// `Option<u8>` with `Some(1)` let LLVM read the value on the `None` path too, which the
/// verifier refuses (an uninitialised register).
fn frag_allowed(k: &FragKey) -> bool {
    match unsafe { FRAGS.get(k) } {
        Some(v) => *v == 1,
        None => false,
    }
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

fn try_egress<const POD: bool>(ctx: &TcContext) -> Result<(), Shot> {
    let skb = ctx.skb.skb;
    let mark = unsafe { (*skb).mark };
    // Generated on this node: the node's own traffic is never judged.
    let from = unsafe { (*skb).ingress_ifindex };
    if from == 0 {
        return Ok(());
    }
    // Bit tests, before the flow table: a spoofed or unknown sender's packets never pass,
    // not even on a flow it shares a tuple with. (No older layout sets the spoofed bit.)
    if mark & MARK_SPOOFED != 0 {
        return Err(Shot::Spoofed);
    }
    // Also without `MARK_CLASSIFIED`: a packet an earlier build of this layout marked
    // (the migration renumbers an older layout's sender index 128, which reads the same).
    if mark & MARK_FINDINGS & !MARK_CLASSIFIED == MARK_UNKNOWN {
        return Err(Shot::UnknownPod);
    }
    if mark & MARK_REPLY != 0 {
        return Ok(());
    }
    let mut slot = core::mem::MaybeUninit::uninit();
    let p = Pkt::zeroed_in(&mut slot);
    if !parse::parse(ctx, p).map_err(|()| Shot::Malformed)? {
        return Ok(());
    }
    if p.nd != 0 || (p.family == FAMILY_V6 && p.link_local_source()) {
        return Ok(());
    }
    if p.frag == FRAG_LATER {
        return allowed_if(frag_allowed(&p.frag_key()));
    }
    let flow = p.flow();
    if p.has_inner == 0 && p.syn == 0 && seen(&flow) {
        return Ok(());
    }
    // The receiver judges the sender as the sender's pod, whatever SNAT made of the source.
    let mut peer = p.saddr;
    // The mark read again, not kept across the calls above: one register fewer keeps the
    // stack (with the parser's calls) within the verifier's 512 bytes.
    let isolated_sender = sender(from, unsafe { (*skb).mark }, p, &mut peer)?;
    let receiver = receiver::<POD>(unsafe { (*skb).ifindex }, p)?;
    let sel = SELECTOR.get(0).copied().unwrap_or(0) as u8;
    let allowed = (!isolated_sender || allows(sel, DIR_EGRESS, &peer, &p.daddr, p))
        && (!receiver || allows(sel, DIR_INGRESS, &p.daddr, &peer, p));
    if p.frag == FRAG_FIRST {
        let _ = FRAGS.insert(&p.frag_key(), &u8::from(allowed), 0);
    }
    if allowed {
        // ICMP errors are judged one by one, never remembered as flows.
        if p.has_inner == 0 {
            if !flows::remember(&flow, now()) {
                count(CNT_CT_FULL);
            }
            // Volatile: a constant to the verifier (which prunes the call), never to LLVM.
            if unsafe { core::ptr::read_volatile(&LEGACY_FLOWS) } != 0 {
                remember_legacy(&flow);
            }
        }
        count(CNT_ALLOWED);
    }
    allowed_if(allowed)
}

#[inline(always)]
fn allowed_if(ok: bool) -> Result<(), Shot> {
    if ok { Ok(()) } else { Err(Shot::Denied) }
}

/// Whether a new flow from interface `from` is judged by a local pod's egress rules, and
/// then whose: the pod's address, named by its interface (SNAT may have rewritten the source
/// since), goes into `who`. Not for a remote sender (its own node judged its egress) nor an
/// unknown pod left open. (An out-parameter, not an `Option<Addr>`: LLVM may read an
/// `Option`'s payload on its `None` path, which the verifier refuses.)
#[inline(always)]
fn sender(from: u32, mark: u32, p: &Pkt, who: &mut Addr) -> Result<bool, Shot> {
    let Some(i) = (unsafe { IFACES.get(&from) }) else {
        return Err(Shot::Unclassified);
    };
    // The pod ingress program must have vouched for the source: without its finding the
    // program was not on the interface yet.
    let f = mark & MARK_FINDINGS;
    // Volatile: a constant to the verifier (which prunes the call), never to LLVM.
    if unsafe { core::ptr::read_volatile(&LEGACY_MARKS) } != 0
        && (f == FINDING_POD || f == FINDING_POD_OPEN || f == FINDING_OTHER)
    {
        let has = if p.family == FAMILY_V4 {
            i.has4
        } else {
            i.has6
        };
        return match ambiguous_finding(from, f, p, i.kind, u32::from(has)) {
            SENDER_POD => Ok(pod_sender(i, p, who)),
            code => sender_result(code),
        };
    }
    let code = match f {
        FINDING_POD if i.kind == IFACE_POD => SENDER_POD,
        FINDING_POD_OPEN if i.kind == IFACE_POD => SENDER_OPEN,
        FINDING_OTHER if i.kind == IFACE_OTHER => SENDER_OPEN,
        f if is_finding(f) => SENDER_UNCLASSIFIED,
        _ => legacy_sender(from, mark, p, i.kind),
    };
    match code {
        SENDER_POD => Ok(pod_sender(i, p, who)),
        code => sender_result(code),
    }
}

#[inline(always)]
fn sender_result(code: u32) -> Result<bool, Shot> {
    match code {
        SENDER_OPEN => Ok(false),
        SENDER_SPOOFED => Err(Shot::Spoofed),
        SENDER_UNKNOWN => Err(Shot::UnknownPod),
        _ => Err(Shot::Unclassified),
    }
}

/// [`sender`] for a finding an older layout's sender index can also spell (33, 65 and 81:
/// "from elsewhere", "from a pod", "from an unknown pod, left open"), under `LEGACY_MARKS`.
/// What the ingress program checked before SNAT is checked again on the source as the
/// egress program sees it, wherever that decides anything: a local pod's address must be
/// one `PODS` holds on the interface the packet came from (else spoofed); "left open" needs
/// `PODS` to say so; without an entry (SNAT) the interface's own pod is the sender, or
/// nobody if it has none of the packet's family (unclassified: an unknown pod left open
/// loses its SNATed new flows on a migrated node until the enforcer restarts). A mark the old program wrote
/// then judges its sender as this layout would, never as open. A call of its own, like
/// [`legacy_sender`].
#[inline(never)]
fn ambiguous_finding(from: u32, f: u32, p: &Pkt, kind: u8, has: u32) -> u32 {
    // One lookup on the common path: a pod's own source (no SNAT) is in `PODS`.
    if f == FINDING_OTHER {
        return match kind {
            IFACE_OTHER if is_local(p) => SENDER_SPOOFED,
            IFACE_OTHER => SENDER_OPEN,
            _ => SENDER_UNCLASSIFIED,
        };
    }
    if kind != IFACE_POD {
        return SENDER_UNCLASSIFIED;
    }
    match unsafe { PODS.get(&pod_key(from, p.family, &p.saddr)) }.copied() {
        Some(POD_KNOWN) => SENDER_POD,
        Some(POD_UNKNOWN_ALLOW) => SENDER_OPEN,
        Some(_) => SENDER_UNKNOWN,
        None if is_local(p) => SENDER_SPOOFED,
        // Not an address of this node's pods: SNAT, or a spoofed foreign one.
        None if has == 0 => SENDER_UNCLASSIFIED,
        None => SENDER_POD,
    }
}

/// Whether the packet's source is a local pod's address.
#[inline(always)]
fn is_local(p: &Pkt) -> bool {
    unsafe { LOCAL_ADDRS.get(&local_key(p)) }.is_some()
}

/// The findings [`sender`] reads a sender from (the others drop the packet earlier).
const FINDING_POD: u32 = MARK_CLASSIFIED | MARK_FROM_POD;
const FINDING_POD_OPEN: u32 = MARK_CLASSIFIED | MARK_FROM_POD | MARK_OPEN;
const FINDING_OTHER: u32 = MARK_CLASSIFIED | MARK_FROM_OTHER;

/// What [`sender`] found, as one register ([`legacy_sender`] returns it).
const SENDER_OPEN: u32 = 0;
/// The interface's pod.
const SENDER_POD: u32 = 1;
const SENDER_SPOOFED: u32 = 2;
const SENDER_UNKNOWN: u32 = 3;
const SENDER_UNCLASSIFIED: u32 = 4;

/// The pod of interface `i` as the sender: whether it has an address of the packet's family
/// (then written to `who`).
#[inline(always)]
fn pod_sender(i: &Iface, p: &Pkt, who: &mut Addr) -> bool {
    let has = if p.family == FAMILY_V4 {
        if i.has4 != 0 {
            who.0 = i.addr4;
        }
        i.has4
    } else {
        if i.has6 != 0 {
            who.0 = i.addr6;
        }
        i.has6
    };
    has != 0
}

/// [`sender`] for a packet no ingress program of this layout marked: one an older layout's
/// marked (a live upgrade; the links move egress first, so this is every forwarded new flow
/// until the ingress links follow). A sender index names the source the old program saw
/// before SNAT; it must be one the enforced version holds on the pod interface the packet
/// came from, exactly as this layout's ingress program checks. No index (the old program
/// indexed only senders with isolated egress) is checked on the source as it is here, while
/// the links move (`LEGACY_MIGRATING`). Anything else is unclassified.
///
/// A call of its own, returning a `SENDER_*` code in one register: inlined, the egress
/// program's frame grew past the verifier's 512 bytes for the deepest chain of calls (the
/// program, the parser, its layer-4 step: 208 + 144 + 160 now).
#[inline(never)]
fn legacy_sender(from: u32, mark: u32, p: &Pkt, kind: u8) -> u32 {
    let index = (mark & MARK_LEGACY_INDEX) >> MARK_LEGACY_SHIFT;
    let Some(a) = LEGACY_LOCAL_ADDR.get(index) else {
        return SENDER_UNCLASSIFIED;
    };
    let source = if index != 0 && a.family == p.family {
        Addr(a.addr)
    } else if index == 0 && a.family == LEGACY_MIGRATING {
        p.saddr
    } else {
        return SENDER_UNCLASSIFIED;
    };
    match kind {
        IFACE_POD => match unsafe { PODS.get(&pod_key(from, p.family, &source)) }.copied() {
            Some(POD_KNOWN) => SENDER_POD,
            Some(POD_UNKNOWN_ALLOW) => SENDER_OPEN,
            Some(_) => SENDER_UNKNOWN,
            None => SENDER_SPOOFED,
        },
        // No index: the source as it is here (`source` is `p.saddr`). An index on another
        // interface is a local sender's address from elsewhere.
        IFACE_OTHER if index == 0 && is_local(p) => SENDER_SPOOFED,
        IFACE_OTHER if index == 0 => SENDER_OPEN,
        IFACE_OTHER => SENDER_SPOOFED,
        _ => SENDER_UNCLASSIFIED,
    }
}

/// Whether the receiver's ingress rules apply: for a known local pod, not for a remote
/// receiver or an unknown pod left open.
///
/// On a pod interface one lookup answers both questions: a `PODS` entry exists only for an
/// interface the enforced version classifies as a pod's (user space deletes an interface's
/// entries before the flip that takes its classification away, and writes them after the
/// flip that gives it), so a hit also says the pod variant belongs here; a miss, for an
/// unclassified interface too, is an unknown pod. Elsewhere `IFACES` must say "other".
#[inline(always)]
fn receiver<const POD: bool>(to: u32, p: &Pkt) -> Result<bool, Shot> {
    if !POD {
        return match unsafe { IFACES.get(&to) }.map(|i| i.kind) {
            Some(IFACE_OTHER) => Ok(false),
            _ => Err(Shot::Unclassified),
        };
    }
    match unsafe { PODS.get(&pod_key(to, p.family, &p.daddr)) }.copied() {
        Some(POD_KNOWN) => Ok(true),
        Some(POD_UNKNOWN_ALLOW) => Ok(false),
        _ => Err(Shot::UnknownPod),
    }
}

/// Whether the rules of `local` (if any apply to it in `dir`) allow `peer`: the first hit,
/// most specific first (named address·port, then the peer's class, then any peer), decides,
/// and no hit denies. Each entry holds the verdict of every tier at its key (the plan folds
/// less specific rules into more specific entries), so no lookup is ever ORed with another;
/// a ruleset of NetworkPolicy only holds allows, where the order changes nothing.
fn allows(slot: u8, dir: u8, local: &Addr, peer: &Addr, p: &Pkt) -> bool {
    let ek = EndpointKey {
        slot,
        family: p.family,
        dir,
        _pad: 0,
        addr: local.0,
    };
    let Some(v) = (unsafe { ENDPOINTS.get(&ek) }).copied() else {
        return true;
    };
    let rs = v & !RULESET_NAMED;
    if dir == DIR_EGRESS && v & RULESET_NAMED != 0 {
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
        if let Some(v) = unsafe { NAMED.get(&nk) } {
            return *v == VERDICT_ALLOW;
        }
    }
    let class = class_of(slot, p.family, peer);
    if class != 0 {
        let v = port_verdict(slot, rs, class, p);
        if v != 0 {
            return v == u32::from(VERDICT_ALLOW);
        }
    }
    port_verdict(slot, rs, CLASS_ANY, p) == u32::from(VERDICT_ALLOW)
}

/// The verdict of `class`'s entry for the packet's protocol and port in ruleset `rs` (a
/// single port first, then the longest port prefix: a range, the protocol, the whole
/// class), or 0 for none. A `u32`, not an `Option<u8>`: LLVM may read an `Option`'s payload
/// on its `None` path, which the verifier refuses.
#[inline(always)]
fn port_verdict(slot: u8, rs: u32, class: u32, p: &Pkt) -> u32 {
    let k = LpmKey {
        prefix_len: PORT_FULL_BITS,
        data: PortKey::new(slot, rs, class, p.proto, p.port),
    };
    if let Some(v) = unsafe { PORT_EXACT.get(&k.data) } {
        return u32::from(*v);
    }
    match PORTS.get(k.as_key()) {
        Some(v) => u32::from(*v),
        None => 0,
    }
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
