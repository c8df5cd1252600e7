//! Types shared by the datapath program (kernel) and its loader (user space).
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so both sides agree on the byte
//! layout and map keys never hash uninitialised padding. Addresses are stored in network
//! byte order in 16 bytes; IPv4 uses the first 4 and zeroes the rest. Keys whose address
//! sits at a multiple of 4 are 4-byte aligned (no byte moves: the sizes are multiples of 4),
//! because LLVM's BPF backend copies a field it can't prove aligned one byte at a time.
//!
//! Policy maps carry a **slot** (0 or 1) as the first key byte: the loader edits the slot no
//! packet reads, flips [`SELECTOR`](MapNames::SELECTOR) and then replays the same edit onto
//! the other slot, so a packet sees one version or the other, never a mix.

#![no_std]

/// Bump when any map's type, key or value layout changes: pin paths carry it, so a binary
/// with a new layout never reads maps written in the old one. Instead it migrates them
/// (see the loader's `migrate`), connection state included.
///
/// * 1: flow table `CT` an LRU hash of 65,536 flows.
/// * 2: `CT` a preallocated hash of 262,144 flows, expired by user space (an LRU insert
///   cost more than the rest of a new flow's judgement); counter `CNT_CT_FULL`.
/// * 3: single ports (`PORTS` prefixes of [`PORT_FULL_BITS`]) in the exact-match hash
///   `PORT_EXACT`, looked up first; `PORTS` keeps ranges, whole protocols and whole classes.
/// * 4: the flow table `FLOWS` an array of [`FlowSet`]s the program places flows in itself
///   (two sets of [`FLOW_WAYS`] slots per flow, by a keyed hash), instead of the kernel hash
///   `CT`, whose insert (bucket lock with interrupts off, free list) was a quarter of a new
///   flow's cost; `FLOW_SEED` holds the key.
/// * 5: local pods (docs/design/fail-closed.md): `PODS` ((interface, address) → Known or
///   Unknown), `IFACES` (interface → kind and the pod's addresses) and `LOCAL_ADDRS` (every
///   local pod address) replace `LOCAL`/`LOCAL_ADDR` and the mark's 8-bit sender index:
///   the egress program names a forwarded packet's sender by its ingress interface.
/// * 6: ClusterNetworkPolicy tiers (docs/design/cluster-tiers.md): `PORT_EXACT`, `PORTS`
///   and `NAMED` values are verdicts ([`VERDICT_ALLOW`], [`VERDICT_DENY`]), looked up most
///   specific first, the first hit deciding; an `ENDPOINTS` value carries
///   [`RULESET_NAMED`]. Same types as 5: only what the values mean changed, which is why a
///   layout-5 program must never read these maps (it reads any hit as an allow).
pub const LAYOUT_VERSION: u32 = 6;

/// Idle time after which a remembered flow is new again (the program ignores it, and its
/// slot is free; layouts before 4 had user space delete it): TCP as long as real idle connections live (conntrack's established
/// timeout is days); other protocols as conntrack's UDP stream timeout.
pub const TCP_IDLE_NS: u64 = 24 * 3600 * 1_000_000_000;
pub const OTHER_IDLE_NS: u64 = 120 * 1_000_000_000;
/// Flows the flow table holds.
pub const MAX_FLOWS: u32 = FLOW_SETS * FLOW_WAYS;
/// Slots per set of the flow table. A new flow takes a slot in the emptier of its two sets,
/// which keeps the sets even: the first flow that finds no slot comes at about 70 % of the
/// table, some 370,000 flows (the loader's `flows` tests measure it).
pub const FLOW_WAYS: u32 = 8;
pub const FLOW_SETS: u32 = 1 << 16;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Class number meaning "any peer" in [`PortKey`]; real classes start at 1, and 0 means an
/// address in no group.
pub const CLASS_ANY: u32 = u32::MAX;

/// Policy map values (layout 6 on): what a hit decides. Layouts before 6 wrote 1 for every
/// entry, which reads as an allow here: their maps migrate as they are.
pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

/// Set in an `ENDPOINTS` value (layout 6 on) when the ruleset's rules take ports from their
/// peers' named ports: only then is `NAMED` looked up (first, as the most specific key), so
/// a ruleset without such rules pays no lookup for it. The rest of the value is the ruleset.
pub const RULESET_NAMED: u32 = 1 << 31;

/// `skb->mark` bits the datapath owns, clear of kube-proxy's 0x4000/0x8000 and Cilium's
/// 0x0f00/0xf000: set by the ingress program, read by the egress program in the same netns
/// (a veth crossing clears the mark, so a pod cannot forge them).
pub const MARK_MASK: u32 = 0x3ff0_0000;
/// The packet answers a connection this node allowed (or is an ICMP error about one).
pub const MARK_REPLY: u32 = 0x2000_0000;
/// From a pod interface with a source that interface does not hold, or from another
/// interface with a local pod's source: dropped if forwarded, replies included.
pub const MARK_SPOOFED: u32 = 0x1000_0000;
/// From a pod interface, its source an address the enforced snapshot does not name for
/// that pod, under `--unknown-pods deny`: dropped if forwarded.
pub const MARK_UNKNOWN: u32 = 0x0800_0000;
/// The pod-interface ingress program judged the packet and found its source held there:
/// without it, a forwarded new flow from a pod interface is unclassified (the program was
/// not there yet).
pub const MARK_FROM_POD: u32 = 0x0400_0000;
/// The other-interface ingress program judged the packet (its source is no local pod's).
pub const MARK_FROM_OTHER: u32 = 0x0200_0000;
/// With [`MARK_FROM_POD`]: the source is unknown, and `--unknown-pods allow` leaves it open
/// (no egress rules).
pub const MARK_OPEN: u32 = 0x0100_0000;
/// Set by this layout's ingress programs with every finding above, which is then one of
/// [`is_finding`]'s few patterns. Any other pattern of the bits below [`MARK_REPLY`] is no
/// finding of this layout's: either no program ran, or an older layout's ingress program (1
/// to 4) wrote its 8-bit sender index there ([`MARK_LEGACY_INDEX`]) — during a live upgrade,
/// and for a packet it marked that is still queued (waiting for a neighbour, say) when the
/// links have moved. Read as findings, such an index could say "from a pod, left open"; the
/// egress program decodes it instead (see [`MapNames::LEGACY_LOCAL_ADDR`]), and the
/// migration renumbers the old senders whose index reads as a finding.
pub const MARK_CLASSIFIED: u32 = 0x0010_0000;
/// The mark bits an ingress program's finding occupies.
pub const MARK_FINDINGS: u32 = 0x1ff0_0000;

/// Whether `mark`'s [`MARK_FINDINGS`] bits are exactly one finding of this layout's ingress
/// programs.
#[inline(always)]
pub const fn is_finding(mark: u32) -> bool {
    let f = mark & MARK_FINDINGS;
    f == MARK_CLASSIFIED | MARK_FROM_POD
        || f == MARK_CLASSIFIED | MARK_FROM_POD | MARK_OPEN
        || f == MARK_CLASSIFIED | MARK_FROM_OTHER
        || f == MARK_CLASSIFIED | MARK_UNKNOWN
        || f == MARK_CLASSIFIED | MARK_SPOOFED
}
/// Layouts 1 to 4: the mark bits holding the index of the local sender (in `LOCAL_ADDR`).
pub const MARK_LEGACY_INDEX: u32 = 0x0ff0_0000;
pub const MARK_LEGACY_SHIFT: u32 = 20;
/// Layouts 1 to 4: `LOCAL_ADDR`'s entries (index 0 meaning "no local sender").
pub const LEGACY_LOCAL_SLOTS: u32 = 256;
/// `LEGACY_LOCAL_ADDR[0]`'s family while the links move from an older layout (no older
/// program reads entry 0). Meanwhile a packet whose old mark names no sender is classified
/// by its source where the egress program sees it, as this layout's ingress program would
/// have: an older layout indexed only senders with isolated egress, and its ingress program
/// runs until its link moves. Otherwise such a mark is unclassified.
pub const LEGACY_MIGRATING: u8 = 0xff;

/// [`PODS`](MapNames::PODS) values, in order of trust (the loader writes a less trusted
/// value before a version's flip, a more trusted one after it).
pub const POD_UNKNOWN_DENY: u8 = 1;
pub const POD_UNKNOWN_ALLOW: u8 = 2;
pub const POD_KNOWN: u8 = 3;

/// [`Iface::kind`]. An interface without an `IFACES` entry is unclassified.
pub const IFACE_POD: u8 = 1;
pub const IFACE_OTHER: u8 = 2;

/// Most interfaces and pod addresses the local pod maps hold.
pub const MAX_IFACES: u32 = 1 << 14;
pub const MAX_POD_ADDRS: u32 = 1 << 16;

/// Counter indices in the per-CPU `COUNTERS` array.
pub const CNT_ALLOWED: u32 = 0;
pub const CNT_DENIED: u32 = 1;
pub const CNT_MALFORMED: u32 = 5;
/// Allowed new flows the full flow table could not remember (their replies are judged as
/// new flows).
pub const CNT_CT_FULL: u32 = 6;
/// `moat_dataplane::counters::{SPOOFED, UNKNOWN_POD, UNCLASSIFIED}` (layout 5 on).
pub const CNT_SPOOFED: u32 = 2;
pub const CNT_UNKNOWN_POD: u32 = 3;
pub const CNT_UNCLASSIFIED: u32 = 4;
pub const COUNTERS: u32 = 8;

/// Map names, shared so the loader finds exactly what the program declares.
pub struct MapNames;

impl MapNames {
    pub const SELECTOR: &'static str = "SELECTOR";
    pub const ENDPOINTS: &'static str = "ENDPOINTS";
    pub const ADDRS: &'static str = "ADDRS";
    pub const RANGES: &'static str = "RANGES";
    pub const PORTS: &'static str = "PORTS";
    /// Since layout 3; before it, single ports were `PORTS` prefixes of full length.
    pub const PORT_EXACT: &'static str = "PORT_EXACT";
    pub const NAMED: &'static str = "NAMED";
    /// Layouts 1 to 4: the mark index of a local endpoint with isolated egress.
    pub const LOCAL: &'static str = "LOCAL";
    pub const LOCAL_ADDR: &'static str = "LOCAL_ADDR";
    /// Layout 5 on: local pods.
    pub const PODS: &'static str = "PODS";
    pub const IFACES: &'static str = "IFACES";
    pub const LOCAL_ADDRS: &'static str = "LOCAL_ADDRS";
    /// Layouts 1 to 3: the kernel hash; since 4, [`FLOWS`](Self::FLOWS).
    pub const CT: &'static str = "CT";
    /// Layouts 1 to 3's `CT`, pinned again under this layout while it migrates from them.
    pub const LEGACY_CT: &'static str = "LEGACY_CT";
    /// Layouts 1 to 4's `LOCAL_ADDR`, pinned again under this layout while it migrates from
    /// them: the egress program names the sender of a packet their ingress program marked by
    /// it (see [`MARK_CLASSIFIED`]).
    pub const LEGACY_LOCAL_ADDR: &'static str = "LEGACY_LOCAL_ADDR";
    pub const FLOWS: &'static str = "FLOWS";
    pub const FLOW_SEED: &'static str = "FLOW_SEED";
    /// Since layout 2's second release; layout 1's program read the kernel's clock.
    pub const CLOCK: &'static str = "CLOCK";
    pub const FRAGS: &'static str = "FRAGS";
    pub const COUNTERS: &'static str = "COUNTERS";
    pub const META: &'static str = "META";
}

/// What the maps enforce, for a restarted enforcer to adopt. Only user space reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    pub version: u64,
    pub digest: [u8; 32],
    /// [`META_VALID`], [`META_PENDING`].
    pub flags: u32,
    pub _pad: u32,
}

/// Set before a flip, cleared after it: a run that stopped in between leaves it set, and
/// then which version is in force is not known (the next full snapshot settles it).
pub const META_PENDING: u32 = 1;
/// `version`/`digest` are set.
pub const META_VALID: u32 = 2;

/// A local endpoint address, per slot and direction → its ruleset.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub slot: u8,
    pub family: u8,
    pub dir: u8,
    pub _pad: u8,
    pub addr: [u8; 16],
}

/// A single address (pod, /32, /128) per slot → its class.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub slot: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}

/// LPM data for CIDR ranges: slot, family, address. The prefix length counts the 16 bits of
/// slot and family plus the address prefix; the two pad bytes are never covered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeKey {
    pub slot: u8,
    pub family: u8,
    pub addr: [u8; 16],
    pub _pad: [u8; 2],
}

pub const RANGE_FIXED_BITS: u32 = 16;

/// LPM data for allowed ports: slot, ruleset, class (or [`CLASS_ANY`]), protocol, port, all
/// big-endian. A range of ports is a handful of prefixes; "every port of every protocol" for
/// a class is the prefix that stops after the class.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// slot (1) · ruleset (4) · class (4) · protocol (1) · port (2).
    pub data: [u8; 12],
}

/// Bits of [`PortKey::data`] before the protocol: slot, ruleset, class.
pub const PORT_CLASS_BITS: u32 = 72;
pub const PORT_FULL_BITS: u32 = 96;

impl PortKey {
    /// Built as three big-endian words, so the program stores three words where a
    /// byte-by-byte build cost 12 stores and twice as many shifts.
    pub const fn new(slot: u8, ruleset: u32, class: u32, proto: u8, port: u16) -> Self {
        let words = [
            ((slot as u32) << 24 | ruleset >> 8).to_be(),
            (ruleset << 24 | class >> 8).to_be(),
            (class << 24 | (proto as u32) << 16 | port as u32).to_be(),
        ];
        // SAFETY: twelve bytes either way, every bit pattern valid for both.
        PortKey {
            data: unsafe { core::mem::transmute::<[u32; 3], [u8; 12]>(words) },
        }
    }
}

/// An egress named port resolved per destination: slot, ruleset, destination, protocol, port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedKey {
    pub slot: u8,
    pub family: u8,
    pub proto: u8,
    pub _pad: u8,
    pub ruleset: u32,
    pub port: u16,
    pub _pad2: [u8; 2],
    pub addr: [u8; 16],
}

/// A local endpoint's address (no slot: indices outlive versions) → its mark index (layouts
/// 1 to 4); since layout 5, every local pod address (`LOCAL_ADDRS`, value unused).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalKey {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// A local pod address on its interface (`PODS`; no slot: local pods switch with a version
/// by the order of writes, see the loader) → `POD_*`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub ifindex: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// An interface as classified (`IFACES`, by ifindex): its kind and, for a pod, the address
/// per family its egress rules are found under (a known one), so the egress program names a
/// forwarded packet's sender by its ingress interface whatever SNAT did to the source.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Iface {
    pub kind: u8,
    pub has4: u8,
    pub has6: u8,
    pub _pad: u8,
    pub addr4: [u8; 16],
    pub addr6: [u8; 16],
}

/// A connection as first judged (after DNAT): the reply is looked up reversed. 8-byte
/// aligned (40 bytes: no padding) so the program copies it in words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
    /// Host byte order. ICMP echo: the identifier as the requester's "port".
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl FlowKey {
    pub const fn reversed(&self) -> Self {
        FlowKey {
            family: self.family,
            proto: self.proto,
            _pad: [0; 2],
            sport: self.dport,
            dport: self.sport,
            saddr: self.daddr,
            daddr: self.saddr,
        }
    }
}

/// One value of the flow table's array (layout 4 on): a set of [`FLOW_WAYS`] slots, so that
/// one map lookup reaches a whole set (the verifier allows no step from one array value
/// into the next). Laid out by field, not by slot: a lookup reads the check words (one
/// cache line) and touches a key only where its check word matches; deciding whether a slot
/// is free reads the check and time lines only (the check word carries the TCP bit that
/// picks the idle timeout). 448 bytes, 7 cache lines, so sets start on line boundaries in
/// the page-aligned array.
///
/// A slot is empty while its `check` is 0; else `check` is [`flow_hash`] of its key (never
/// 0). Writers (the program, and user space through the memory-mapped array) clear `check`,
/// write the key and time, then set `check`. A reader matches a slot only if `check` equals
/// the hash of the key it looks for *and* the key is equal. Two writers racing on one slot
/// can leave a key mixed from two flows; the check word is still one a writer of an allowed
/// flow wrote, so the slot matches that flow or none (short of a collision of a keyed
/// 64-bit hash): a race loses a flow, which is then judged anew, and never admits one,
/// whatever order other CPUs see the stores in.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSet {
    pub check: [u64; FLOW_WAYS as usize],
    pub seen_ns: [u64; FLOW_WAYS as usize],
    pub key: [FlowKey; FLOW_WAYS as usize],
}

/// Bit of a check word set for TCP flows (which idle for a day, others for 120 s).
pub const CHECK_TCP: u64 = 2;

/// The flow table's hash: keyed by the node's random `FLOW_SEED`, so nobody can aim many
/// flows at one set to keep another flow out. Never 0 (an empty slot's `check`); bit 1 is
/// [`CHECK_TCP`].
#[inline(always)]
pub const fn flow_hash(seed: u64, k: &FlowKey) -> u64 {
    // SAFETY: FlowKey is 40 bytes, 8-byte aligned, without padding.
    let w: [u64; 5] = unsafe { core::mem::transmute::<FlowKey, [u64; 5]>(*k) };
    let mut h = seed ^ 0x243f_6a88_85a3_08d3;
    let mut i = 0;
    while i < 5 {
        h = (h ^ w[i])
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
        i += 1;
    }
    h ^= h >> 32;
    h = h.wrapping_mul(0xd6e8_feb8_6659_fd93);
    h ^= h >> 29;
    let tcp = if k.proto == IPPROTO_TCP { CHECK_TCP } else { 0 };
    (h & !3) | tcp | 1
}

/// The two sets a flow with hash `h` may live in.
#[inline(always)]
pub const fn flow_sets(h: u64) -> [u32; 2] {
    let a = (h >> 2) as u32 & (FLOW_SETS - 1);
    let b = (h >> 34) as u32 & (FLOW_SETS - 1);
    [a, b]
}

/// Whether the slot with check word `check`, last seen at `seen_ns`, holds no flow in use
/// at `now`.
#[inline(always)]
pub const fn slot_free(check: u64, seen_ns: u64, now: u64) -> bool {
    check == 0 || idle(check & CHECK_TCP != 0, seen_ns, now)
}

/// Whether a flow last seen at `seen_ns` is idle at `now` (its protocol's timeout passed).
#[inline(always)]
pub const fn flow_idle(proto: u8, seen_ns: u64, now: u64) -> bool {
    idle(proto == IPPROTO_TCP, seen_ns, now)
}

const IPPROTO_TCP: u8 = 6;

#[inline(always)]
const fn idle(tcp: bool, seen_ns: u64, now: u64) -> bool {
    let timeout = if tcp { TCP_IDLE_NS } else { OTHER_IDLE_NS };
    now.saturating_sub(seen_ns) > timeout
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowVal {
    /// `CLOCK_MONOTONIC_COARSE` in ns at the last packet either way (for the idle timeout):
    /// the `CLOCK` map's value (layout 1's program read `bpf_ktime_get_coarse_ns`, the same
    /// clock).
    pub seen_ns: u64,
}

/// The first fragment's identity: later fragments carry no ports and follow its verdict.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
    pub id: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// A local endpoint index's address (array value), for the egress program to judge the
/// original source.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LocalAddr {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is repr(C), Copy, with explicit padding and no pointers: any bit
    // pattern the kernel hands back is a valid value.
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for RangeKey {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for NamedKey {}
    unsafe impl aya::Pod for LocalKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowVal {}
    unsafe impl aya::Pod for FlowSet {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for LocalAddr {}
    unsafe impl aya::Pod for PodKey {}
    unsafe impl aya::Pod for Iface {}
    unsafe impl aya::Pod for Meta {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn no_implicit_padding() {
        assert_eq!(size_of::<EndpointKey>(), 20);
        assert_eq!(size_of::<AddrKey>(), 20);
        assert_eq!(size_of::<RangeKey>(), 20);
        assert_eq!(size_of::<PortKey>(), 12);
        assert_eq!(size_of::<NamedKey>(), 28);
        assert_eq!(size_of::<LocalKey>(), 20);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowVal>(), 8);
        assert_eq!(size_of::<FlowSet>(), 448);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<LocalAddr>(), 20);
        assert_eq!(size_of::<PodKey>(), 24);
        assert_eq!(size_of::<Iface>(), 36);
        assert_eq!(size_of::<Meta>(), 48);
    }

    #[test]
    fn port_key_is_big_endian_in_prefix_order() {
        let k = PortKey::new(1, 0x0102_0304, 0x0506_0708, 6, 0x090a);
        assert_eq!(k.data, [1, 1, 2, 3, 4, 5, 6, 7, 8, 6, 9, 10]);
    }
}
