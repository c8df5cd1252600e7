//! Just enough SCTP to probe reachability without an SCTP stack (this kernel has none): an
//! INIT and the INIT-ACK answering it, as raw IP payloads with valid CRC32c checksums and
//! verification tags — valid enough for conntrack's SCTP tracker to follow the association.

const INIT: u8 = 1;
const INIT_ACK: u8 = 2;

/// CRC-32C (Castagnoli), as SCTP uses it (RFC 9260 appendix A).
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for b in data {
        crc = table[((crc ^ u32::from(*b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn finish(mut p: Vec<u8>) -> Vec<u8> {
    p[8..12].copy_from_slice(&[0; 4]);
    let c = crc32c(&p);
    // The checksum travels little-endian (what Linux and every SCTP stack put on the wire).
    p[8..12].copy_from_slice(&c.to_le_bytes());
    p
}

fn header(src: u16, dst: u16, vtag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&src.to_be_bytes());
    p.extend_from_slice(&dst.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

fn init_body(p: &mut Vec<u8>, kind: u8, tag: u32, extra: &[u8]) {
    let len = 20 + extra.len();
    p.push(kind);
    p.push(0);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(&tag.to_be_bytes());
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&tag.wrapping_add(1).to_be_bytes()); // initial TSN
    p.extend_from_slice(extra);
    while !p.len().is_multiple_of(4) {
        p.push(0);
    }
}

/// An INIT from `src` to `dst` port offering initiate tag `tag`.
pub fn init(src: u16, dst: u16, tag: u32) -> Vec<u8> {
    let mut p = header(src, dst, 0);
    init_body(&mut p, INIT, tag, &[]);
    finish(p)
}

/// The INIT-ACK answering an INIT whose initiate tag was `peer_tag`.
pub fn init_ack(src: u16, dst: u16, peer_tag: u32, own_tag: u32) -> Vec<u8> {
    let mut p = header(src, dst, peer_tag);
    // A State Cookie parameter (mandatory in INIT-ACK); its content is ours to choose.
    let mut cookie = vec![0, 7, 0, 12];
    cookie.extend_from_slice(&own_tag.to_be_bytes());
    cookie.extend_from_slice(&peer_tag.to_be_bytes());
    init_body(&mut p, INIT_ACK, own_tag, &cookie);
    finish(p)
}

/// What a received SCTP packet is, if it is one of ours.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet {
    Init { src: u16, dst: u16, tag: u32 },
    InitAck { src: u16, dst: u16, vtag: u32 },
}

/// Parses an SCTP packet (without IP header); `None` for anything else or a bad checksum.
pub fn parse(p: &[u8]) -> Option<Packet> {
    if p.len() < 12 + 20 {
        return None;
    }
    let mut copy = p.to_vec();
    copy[8..12].copy_from_slice(&[0; 4]);
    if crc32c(&copy).to_le_bytes() != p[8..12] {
        return None;
    }
    let src = u16::from_be_bytes([p[0], p[1]]);
    let dst = u16::from_be_bytes([p[2], p[3]]);
    let vtag = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
    match p[12] {
        INIT => Some(Packet::Init {
            src,
            dst,
            tag: u32::from_be_bytes([p[16], p[17], p[18], p[19]]),
        }),
        INIT_ACK => Some(Packet::InitAck { src, dst, vtag }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn init_and_ack_round_trip() {
        let i = init(40000, 80, 0xdead_beef);
        assert_eq!(i.len(), 32);
        assert_eq!(
            parse(&i),
            Some(Packet::Init {
                src: 40000,
                dst: 80,
                tag: 0xdead_beef
            })
        );
        let a = init_ack(80, 40000, 0xdead_beef, 7);
        assert_eq!(a.len() % 4, 0);
        assert_eq!(
            parse(&a),
            Some(Packet::InitAck {
                src: 80,
                dst: 40000,
                vtag: 0xdead_beef
            })
        );
        let mut bad = a.clone();
        bad[20] ^= 1;
        assert_eq!(parse(&bad), None, "a corrupted packet fails its checksum");
    }
}
