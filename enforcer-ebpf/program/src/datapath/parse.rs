//! Packet headers into a [`Pkt`]. Every read goes through `bpf_skb_load_bytes` at a bounded
//! offset, so non-linear packets parse like linear ones and a truncated header is an error,
//! never a guess.

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

/// Laid out without implicit padding, and filled in place: LLVM copies padding bytes of a
/// moved struct as undefined values, which the verifier refuses to store. 8-byte aligned so
/// clearing it is eleven stores, not a call to a byte-wise `memset`.
#[repr(C, align(8))]
pub struct Pkt {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
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
            saddr: self.saddr,
            daddr: self.daddr,
        }
    }

    pub fn link_local_source(&self) -> bool {
        match self.family {
            FAMILY_V4 => self.saddr[0] == 169 && self.saddr[1] == 254,
            _ => self.saddr[0] == 0xfe && self.saddr[1] & 0xc0 == 0x80,
        }
    }
}

/// `N` bytes at `off`: straight from the packet when they are in its linear part (no helper
/// call), else through `bpf_skb_load_bytes`.
#[inline(always)]
fn read<const N: usize>(ctx: &TcContext, off: usize) -> Result<[u8; N], ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    let p = start + off;
    if off < 0x4000 && p + N <= end {
        // SAFETY: the verifier-checked bounds test above keeps the read inside the packet.
        Ok(unsafe { core::ptr::read_unaligned(p as *const [u8; N]) })
    } else {
        ctx.load(off).map_err(|_| ())
    }
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
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
    let h: [u8; 20] = read(ctx, ETH_HLEN)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Err(());
    }
    p.family = FAMILY_V4;
    p.proto = h[9];
    p.saddr[..4].copy_from_slice(&h[12..16]);
    p.daddr[..4].copy_from_slice(&h[16..20]);
    let frag = be16(&h, 6);
    let id = u32::from(be16(&h, 4));
    p.frag_id = id;
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
    let h: [u8; 40] = read(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 6 {
        return Err(());
    }
    p.family = FAMILY_V6;
    p.proto = h[6];
    p.saddr.copy_from_slice(&h[8..24]);
    p.daddr.copy_from_slice(&h[24..40]);
    let mut off = ETH_HLEN + 40;
    let mut done = false;
    for _ in 0..MAX_EXT {
        match p.proto {
            // Hop-by-hop, routing, destination options: length in 8-octet units.
            0 | 43 | 60 => {
                let e: [u8; 2] = read(ctx, off)?;
                p.proto = e[0];
                off += (usize::from(e[1]) + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let e: [u8; 2] = read(ctx, off)?;
                p.proto = e[0];
                off += (usize::from(e[1]) + 2) * 4;
            }
            44 => {
                let e: [u8; 8] = read(ctx, off)?;
                p.proto = e[0];
                off += 8;
                let fo = be16(&e, 2);
                p.frag_id = be32(&e, 4);
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
            let b: [u8; 14] = read(ctx, off)?;
            p.sport = be16(&b, 0);
            p.dport = be16(&b, 2);
            p.port = p.dport;
            // Flags: SYN 0x02, ACK 0x10.
            p.syn = u8::from(b[13] & 0x12 == 0x02);
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            let b: [u8; 4] = read(ctx, off)?;
            p.sport = be16(&b, 0);
            p.dport = be16(&b, 2);
            p.port = p.dport;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let b: [u8; 8] = read(ctx, off)?;
            let (ty, id) = (b[0], be16(&b, 4));
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
        let h: [u8; 20] = read(ctx, off)?;
        k.proto = h[9];
        k.saddr[..4].copy_from_slice(&h[12..16]);
        k.daddr[..4].copy_from_slice(&h[16..20]);
        l4 = off + usize::from(h[0] & 0x0f) * 4;
    } else {
        let h: [u8; 40] = read(ctx, off)?;
        k.proto = h[6];
        k.saddr.copy_from_slice(&h[8..24]);
        k.daddr.copy_from_slice(&h[24..40]);
        l4 = off + 40;
    }
    let b: [u8; 8] = read(ctx, l4)?;
    match k.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            k.sport = be16(&b, 0);
            k.dport = be16(&b, 2);
        }
        // A quoted echo request: its identifier is the requester's "port".
        IPPROTO_ICMP | IPPROTO_ICMPV6 => k.sport = be16(&b, 4),
        _ => {}
    }
    Ok(())
}
