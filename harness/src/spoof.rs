//! Packets with a forged source address, sent through raw sockets that carry their own IP
//! header (IPv4 `IPPROTO_RAW`, IPv6 `IPPROTO_RAW` with the header included), as an attacker
//! in a pod would: the kernel routes them by destination and never checks the source.
//!
//! Each carries a token where the receiving agent can find it — a UDP payload, or a TCP
//! SYN's sequence number — so a test can ask the receiver whether it arrived.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

/// Marks a spoofed UDP datagram's payload: `MAGIC` then the 8-byte token.
pub const MAGIC: &[u8; 8] = b"moatspf!";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Udp,
    /// A SYN whose sequence number is the token's low 32 bits.
    Syn,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoofReq {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub kind: Kind,
    pub port: u16,
    pub token: u64,
}

fn sum(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The L4 segment (UDP datagram or TCP SYN) with its checksum over the pseudo-header.
fn l4(r: &SpoofReq, sport: u16) -> (u8, Vec<u8>) {
    let (proto, mut seg) = match r.kind {
        Kind::Udp => {
            let mut payload = MAGIC.to_vec();
            payload.extend_from_slice(&r.token.to_be_bytes());
            let len = (8 + payload.len()) as u16;
            let mut s = Vec::with_capacity(usize::from(len));
            s.extend_from_slice(&sport.to_be_bytes());
            s.extend_from_slice(&r.port.to_be_bytes());
            s.extend_from_slice(&len.to_be_bytes());
            s.extend_from_slice(&[0, 0]);
            s.extend_from_slice(&payload);
            (17u8, s)
        }
        Kind::Syn => {
            let mut s = Vec::with_capacity(20);
            s.extend_from_slice(&sport.to_be_bytes());
            s.extend_from_slice(&r.port.to_be_bytes());
            s.extend_from_slice(&(r.token as u32).to_be_bytes());
            s.extend_from_slice(&0u32.to_be_bytes());
            s.extend_from_slice(&[0x50, 0x02]); // 20-byte header, SYN
            s.extend_from_slice(&64240u16.to_be_bytes());
            s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            (6u8, s)
        }
    };
    let mut acc = match (r.src, r.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum(sum(0, &s.octets()), &d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum(sum(0, &s.octets()), &d.octets()),
        _ => 0,
    };
    acc += u32::from(proto) + seg.len() as u32;
    let c = fold(sum(acc, &seg));
    // UDP: a computed 0 is sent as all ones.
    let c = if proto == 17 && c == 0 { 0xffff } else { c };
    let at = if proto == 17 { 6 } else { 16 };
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    (proto, seg)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, seg: &[u8]) -> Vec<u8> {
    let total = (20 + seg.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&rand::random::<u16>().to_be_bytes());
    h.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]); // DF, TTL 64
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = fold(sum(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(seg);
    h
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, seg: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    h.extend_from_slice(&[proto, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(seg);
    h
}

/// The whole packet, IP header included.
pub fn packet(r: &SpoofReq) -> std::io::Result<Vec<u8>> {
    let sport = 40000 + (r.token % 20000) as u16;
    let (proto, seg) = l4(r, sport);
    match (r.src, r.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ok(ipv4(s, d, proto, &seg)),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ok(ipv6(s, d, proto, &seg)),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "source and destination families differ",
        )),
    }
}

/// Sends one forged packet.
pub fn send(r: &SpoofReq) -> std::io::Result<()> {
    let p = packet(r)?;
    let domain = if r.dst.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    // IPPROTO_RAW: the caller writes the IP header (IPv4 implies IP_HDRINCL; for IPv6 the
    // kernel takes the header as given too).
    let s = Socket::new(domain, Type::RAW, Some(Protocol::from(libc_ipproto_raw())))?;
    s.send_to(&p, &SocketAddr::new(r.dst, 0).into())?;
    Ok(())
}

const fn libc_ipproto_raw() -> i32 {
    255
}

/// The token a received UDP payload carries, if it is a spoofed probe's.
pub fn udp_token(payload: &[u8]) -> Option<u64> {
    let rest = payload.strip_prefix(MAGIC.as_slice())?;
    Some(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?))
}

/// The token of a received TCP segment (IP header stripped), if it is a bare SYN to `ports`.
pub fn syn_token(segment: &[u8], ports: &[u16]) -> Option<u32> {
    if segment.len() < 20 {
        return None;
    }
    let dport = u16::from_be_bytes([segment[2], segment[3]]);
    let flags = segment[13];
    (flags & 0x12 == 0x02 && ports.contains(&dport))
        .then(|| u32::from_be_bytes([segment[4], segment[5], segment[6], segment[7]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checksum over data that includes a correct checksum folds to zero.
    fn verify(pseudo: u32, seg: &[u8]) -> bool {
        fold(sum(pseudo, seg)) == 0
    }

    #[test]
    fn checksums_verify_in_both_families() {
        for (src, dst) in [
            ("10.1.0.10", "10.1.0.20"),
            ("fd00::10", "fd00::20"),
            ("169.254.9.9", "10.1.0.20"),
        ] {
            for kind in [Kind::Udp, Kind::Syn] {
                let r = SpoofReq {
                    src: src.parse().unwrap(),
                    dst: dst.parse().unwrap(),
                    kind,
                    port: 80,
                    token: 0x1234_5678_9abc_def0,
                };
                let (proto, seg) = l4(&r, 40001);
                let pseudo = match (r.src, r.dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => sum(sum(0, &s.octets()), &d.octets()),
                    (IpAddr::V6(s), IpAddr::V6(d)) => sum(sum(0, &s.octets()), &d.octets()),
                    _ => unreachable!(),
                } + u32::from(proto)
                    + seg.len() as u32;
                assert!(verify(pseudo, &seg), "{src} {kind:?}");
                let p = packet(&r).unwrap();
                if r.src.is_ipv4() {
                    assert_eq!(fold(sum(0, &p[..20])), 0, "IPv4 header checksum");
                    match kind {
                        Kind::Udp => assert_eq!(udp_token(&p[28..]), Some(r.token)),
                        Kind::Syn => assert_eq!(syn_token(&p[20..], &[80]), Some(0x9abc_def0)),
                    }
                }
            }
        }
    }
}
