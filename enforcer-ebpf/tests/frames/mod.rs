//! Ethernet frames for `BPF_PROG_TEST_RUN`, built byte by byte.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// IPv4 header fields a test may vary.
#[derive(Clone, Copy)]
pub struct V4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub id: u16,
    pub more_fragments: bool,
    /// In 8-octet units.
    pub frag_offset: u16,
}

impl V4 {
    pub fn new(src: &str, dst: &str, proto: u8) -> Self {
        V4 {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            id: 1,
            more_fragments: false,
            frag_offset: 0,
        }
    }

    pub fn header(&self, payload_len: usize) -> Vec<u8> {
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&((20 + payload_len) as u16).to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        let frag = (u16::from(self.more_fragments) << 13) | self.frag_offset;
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, self.proto, 0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h
    }

    pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
        let mut f = eth(0x0800);
        f.extend(self.header(payload.len()));
        f.extend_from_slice(payload);
        f
    }
}

/// An IPv6 packet; `ext` are (next header, bytes) extension headers in order.
pub fn v6(src: &str, dst: &str, ext: &[(u8, Vec<u8>)], proto: u8, payload: &[u8]) -> Vec<u8> {
    let src: Ipv6Addr = src.parse().unwrap();
    let dst: Ipv6Addr = dst.parse().unwrap();
    let ext_len: usize = ext.iter().map(|(_, b)| b.len()).sum();
    let mut f = eth(0x86dd);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((ext_len + payload.len()) as u16).to_be_bytes());
    f.push(ext.first().map_or(proto, |e| e.0));
    f.push(64);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let mut b = bytes.clone();
        b[0] = ext.get(i + 1).map_or(proto, |e| e.0);
        f.extend(b);
    }
    f.extend_from_slice(payload);
    f
}

/// An 8-byte hop-by-hop or destination options header (next header patched by `v6`).
pub fn opts() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// An IPv6 fragment header.
pub fn frag6(id: u32, offset: u16, more: bool) -> Vec<u8> {
    let mut b = vec![0, 0];
    b.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    b.extend_from_slice(&id.to_be_bytes());
    b
}

/// The first 8 bytes of a TCP/UDP/SCTP header: ports, then zeros.
pub fn ports(sport: u16, dport: u16) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&dport.to_be_bytes());
    b.extend_from_slice(&[0; 16]);
    b
}

/// A TCP header with only SYN set.
pub fn syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut b = ports(sport, dport);
    b[12] = 0x50;
    b[13] = 0x02;
    b
}

pub fn icmp(ty: u8, code: u8, id: u16) -> Vec<u8> {
    let mut b = vec![ty, code, 0, 0];
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&[0, 1]);
    b
}

/// An ICMP error quoting `quoted` (an IP header plus at least 8 bytes of it).
pub fn icmp_error(ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut b = vec![ty, code, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(quoted);
    b
}

pub fn arp() -> Vec<u8> {
    let mut f = eth(0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0; 20]);
    f
}

pub fn addr16(a: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out = a.octets(),
    }
    out
}
