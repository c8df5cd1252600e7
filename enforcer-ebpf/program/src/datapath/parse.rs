//! Packet headers into a [`Pkt`]. Headers are read in place where they are in the packet's
//! linear part and through `bpf_skb_load_bytes` where not, always at bounded offsets, so
//! non-linear packets parse like linear ones and a truncated header is an error, never a
//! guess.

use core::mem::MaybeUninit;

use aya_ebpf::programs::TcContext;
use moat_ebpf_common::{FAMILY_V4, FAMILY_V6, FlowKey};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_ICMPV6: u8 = 58;

/// IPv6 extension headers walked before giving up (a longer chain is refused).
const MAX_EXT: usize = 8;

/// Fragment kinds. Plain integers, not an enum with a payload: LLVM may leave an unused
/// payload undefined (any register, even a pointer), and the verifier refuses such stores.
#[allow(
    dead_code,
    reason = "the value a zeroed packet starts with; named for the reader"
)]
pub const FRAG_NONE: u8 = 0;
/// Offset 0 with more fragments: carries the ports and decides for the rest.
pub const FRAG_FIRST: u8 = 1;
/// Offset > 0: no L4 header; follows the first fragment's verdict.
pub const FRAG_LATER: u8 = 2;

/// An address as the program passes it around: 4-byte aligned, so LLVM copies it into map
/// keys in words (a plain `[u8; 16]` has alignment 1, and the BPF backend copies what it
/// can't prove aligned one byte at a time: 32 instructions per address).
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct Addr(pub [u8; 16]);

/// Laid out without implicit padding, and filled in place: LLVM copies padding bytes of a
/// moved struct as undefined values, which the verifier refuses to store. 8-byte aligned so
/// clearing it is eleven stores, not a call to a byte-wise `memset`.
#[repr(C, align(8))]
pub struct Pkt {
    pub saddr: Addr,
    pub daddr: Addr,
    /// ICMP/ICMPv6 error: the flow of the packet it quotes, in that packet's direction
    /// (valid when `has_inner != 0`; not an `Option`, for the same reason as `frag`).
    pub inner: FlowKey,
    pub frag_id: u32,
    /// Host order. ICMP echo: the identifier as the requester's "port" (see `flow`).
    pub sport: u16,
    pub dport: u16,
    /// The port policy sees: the destination port for TCP/UDP/SCTP, 0 otherwise.
    pub port: u16,
    pub family: u8,
    pub proto: u8,
    pub frag: u8,
    pub has_inner: u8,
    /// Neighbour discovery and router messages: never policy's business.
    pub nd: u8,
    /// A TCP SYN without ACK: always a new connection, even on a remembered tuple (as
    /// conntrack reopens a tuple in TIME_WAIT), so a reused source port is judged again.
    pub syn: u8,
}

impl Pkt {
    /// Zeroes `slot` in place and hands it out. Eleven volatile word stores: LLVM turns any
    /// plainer form into a call to a byte-by-byte `memset` (88 iterations on every packet),
    /// and building a value and moving it would put a second copy on the 512-byte stack.
    #[inline(always)]
    pub fn zeroed_in(slot: &mut core::mem::MaybeUninit<Pkt>) -> &mut Pkt {
        let words = slot.as_mut_ptr() as *mut u64;
        for i in 0..core::mem::size_of::<Pkt>() / 8 {
            // SAFETY: in bounds (Pkt is 8-byte aligned, a multiple of 8 long).
            unsafe { words.add(i).write_volatile(0) };
        }
        // SAFETY: every byte is written, and all-zero is a valid Pkt.
        unsafe { slot.assume_init_mut() }
    }
}

impl Pkt {
    pub fn flow(&self) -> FlowKey {
        FlowKey {
            family: self.family,
            proto: self.proto,
            _pad: [0; 2],
            sport: self.sport,
            dport: self.dport,
            saddr: self.saddr.0,
            daddr: self.daddr.0,
        }
    }

    pub fn link_local_source(&self) -> bool {
        match self.family {
            FAMILY_V4 => self.saddr.0[0] == 169 && self.saddr.0[1] == 254,
            _ => self.saddr.0[0] == 0xfe && self.saddr.0[1] & 0xc0 == 0x80,
        }
    }
}

/// The `N` bytes at `off`, read in place: a pointer into the packet when they are in its
/// linear part (no helper call, no copy), else into `buf`, filled by `bpf_skb_load_bytes`.
/// Fields are then read byte by byte straight from there: copying the header into an array
/// first (and LLVM's BPF backend copies unaligned bytes one at a time) cost as much as the
/// rest of the parse.
/// `buf` stays uninitialised unless used: zeroing it would be a byte-wise `memset` call on
/// every packet.
#[inline(always)]
fn view<const N: usize>(
    ctx: &TcContext,
    off: usize,
    buf: &mut MaybeUninit<[u8; N]>,
) -> Result<Bytes, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    let p = start + off;
    if off < 0x4000 && p + N <= end {
        Ok(Bytes(p as *const u8))
    } else {
        let b = buf.write(ctx.load(off).map_err(|_| ())?);
        Ok(Bytes(b.as_ptr()))
    }
}

/// `N` readable bytes (see [`view`]); the accessors take offsets below that `N`.
#[derive(Clone, Copy)]
struct Bytes(*const u8);

impl Bytes {
    #[inline(always)]
    fn u8(self, at: usize) -> u8 {
        // SAFETY: `view` checked that the bytes up to its `N` are readable; callers stay
        // below it (constant offsets).
        unsafe { *self.0.add(at) }
    }

    #[inline(always)]
    fn be16(self, at: usize) -> u16 {
        u16::from_be_bytes([self.u8(at), self.u8(at + 1)])
    }

    #[inline(always)]
    fn be32(self, at: usize) -> u32 {
        u32::from_be_bytes([
            self.u8(at),
            self.u8(at + 1),
            self.u8(at + 2),
            self.u8(at + 3),
        ])
    }

    /// Copies `M` bytes from `at` into the start of `to`.
    #[inline(always)]
    fn copy<const M: usize>(self, at: usize, to: &mut [u8; 16]) {
        for i in 0..M {
            to[i] = self.u8(at + i);
        }
    }
}

/// Fills `p` (which must come from [`Pkt::zeroed_in`]); `Ok(false)` for ARP and everything else that is
/// not IP.
pub fn parse(ctx: &TcContext, p: &mut Pkt) -> Result<bool, ()> {
    let proto = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    match proto {
        ETH_P_IP => parse_v4(ctx, p).map(|()| true),
        ETH_P_IPV6 => parse_v6(ctx, p).map(|()| true),
        _ => Ok(false),
    }
}

fn parse_v4(ctx: &TcContext, p: &mut Pkt) -> Result<(), ()> {
    let mut buf = MaybeUninit::<[u8; 20]>::uninit();
    let h = view(ctx, ETH_HLEN, &mut buf)?;
    let vihl = h.u8(0);
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(());
    }
    p.family = FAMILY_V4;
    p.proto = h.u8(9);
    h.copy::<4>(12, &mut p.saddr.0);
    h.copy::<4>(16, &mut p.daddr.0);
    let frag = h.be16(6);
    p.frag_id = u32::from(h.be16(4));
    if frag & 0x1fff != 0 {
        p.frag = FRAG_LATER;
        return Ok(());
    }
    if frag & 0x2000 != 0 {
        p.frag = FRAG_FIRST;
    }
    l4(ctx, p, ETH_HLEN + ihl)
}

fn parse_v6(ctx: &TcContext, p: &mut Pkt) -> Result<(), ()> {
    let mut buf = MaybeUninit::<[u8; 40]>::uninit();
    let h = view(ctx, ETH_HLEN, &mut buf)?;
    if h.u8(0) >> 4 != 6 {
        return Err(());
    }
    p.family = FAMILY_V6;
    p.proto = h.u8(6);
    h.copy::<16>(8, &mut p.saddr.0);
    h.copy::<16>(24, &mut p.daddr.0);
    let mut off = ETH_HLEN + 40;
    let mut done = false;
    for _ in 0..MAX_EXT {
        match p.proto {
            // Hop-by-hop, routing, destination options: length in 8-octet units.
            0 | 43 | 60 => {
                let mut buf = MaybeUninit::<[u8; 2]>::uninit();
                let e = view(ctx, off, &mut buf)?;
                p.proto = e.u8(0);
                off += (usize::from(e.u8(1)) + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let mut buf = MaybeUninit::<[u8; 2]>::uninit();
                let e = view(ctx, off, &mut buf)?;
                p.proto = e.u8(0);
                off += (usize::from(e.u8(1)) + 2) * 4;
            }
            44 => {
                let mut buf = MaybeUninit::<[u8; 8]>::uninit();
                let e = view(ctx, off, &mut buf)?;
                p.proto = e.u8(0);
                off += 8;
                let fo = e.be16(2);
                p.frag_id = e.be32(4);
                if fo >> 3 != 0 {
                    p.frag = FRAG_LATER;
                    return Ok(());
                }
                if fo & 1 != 0 {
                    p.frag = FRAG_FIRST;
                }
            }
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        return Err(());
    }
    l4(ctx, p, off)
}

fn l4(ctx: &TcContext, p: &mut Pkt, off: usize) -> Result<(), ()> {
    match p.proto {
        IPPROTO_TCP => {
            let mut buf = MaybeUninit::<[u8; 14]>::uninit();
            let b = view(ctx, off, &mut buf)?;
            p.sport = b.be16(0);
            p.dport = b.be16(2);
            p.port = p.dport;
            // Flags: SYN 0x02, ACK 0x10.
            p.syn = u8::from(b.u8(13) & 0x12 == 0x02);
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            let mut buf = MaybeUninit::<[u8; 4]>::uninit();
            let b = view(ctx, off, &mut buf)?;
            p.sport = b.be16(0);
            p.dport = b.be16(2);
            p.port = p.dport;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let mut buf = MaybeUninit::<[u8; 8]>::uninit();
            let b = view(ctx, off, &mut buf)?;
            let (ty, id) = (b.u8(0), b.be16(4));
            let v6 = p.proto == IPPROTO_ICMPV6;
            let (request, reply) = if v6 { (128, 129) } else { (8, 0) };
            if ty == request {
                p.sport = id;
            } else if ty == reply {
                p.dport = id;
            } else if (!v6 && matches!(ty, 3 | 4 | 5 | 11 | 12)) || (v6 && ty <= 4 && ty >= 1) {
                p.has_inner = u8::from(quoted(ctx, p.family, off + 8, &mut p.inner).is_ok());
            } else if v6 && (133..=137).contains(&ty) {
                p.nd = 1;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The flow of the packet an ICMP error quotes, if its headers are all there.
fn quoted(ctx: &TcContext, family: u8, off: usize, k: &mut FlowKey) -> Result<(), ()> {
    k.family = family;
    let l4;
    if family == FAMILY_V4 {
        let mut buf = MaybeUninit::<[u8; 20]>::uninit();
        let h = view(ctx, off, &mut buf)?;
        k.proto = h.u8(9);
        h.copy::<4>(12, &mut k.saddr);
        h.copy::<4>(16, &mut k.daddr);
        l4 = off + usize::from(h.u8(0) & 0x0f) * 4;
    } else {
        let mut buf = MaybeUninit::<[u8; 40]>::uninit();
        let h = view(ctx, off, &mut buf)?;
        k.proto = h.u8(6);
        h.copy::<16>(8, &mut k.saddr);
        h.copy::<16>(24, &mut k.daddr);
        l4 = off + 40;
    }
    let mut buf = MaybeUninit::<[u8; 8]>::uninit();
    let b = view(ctx, l4, &mut buf)?;
    match k.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            k.sport = b.be16(0);
            k.dport = b.be16(2);
        }
        // A quoted echo request: its identifier is the requester's "port".
        IPPROTO_ICMP | IPPROTO_ICMPV6 => k.sport = b.be16(4),
        _ => {}
    }
    Ok(())
}
