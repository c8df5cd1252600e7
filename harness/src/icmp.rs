//! ICMP and ICMPv6 echo, for probing protocols without ports (a port-less rule allows them).

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

/// The internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request. For IPv6 the checksum is left to the kernel (a raw ICMPv6 socket must
/// fill it in, as it covers the pseudo-header).
pub fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let kind = if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 };
    let mut p = vec![kind, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"moat-probe");
    if !v6 {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// `(id, seq)` of an echo reply (ICMP message without IP header).
pub fn parse_reply(v6: bool, p: &[u8]) -> Option<(u16, u16)> {
    let want = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
    if p.len() < 8 || p[0] != want || p[1] != 0 {
        return None;
    }
    Some((
        u16::from_be_bytes([p[4], p[5]]),
        u16::from_be_bytes([p[6], p[7]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v4_request_checksums_to_zero() {
        let p = echo_request(false, 0x1234, 7);
        assert_eq!(checksum(&p), 0, "a valid packet sums to all ones");
        assert_eq!(parse_reply(false, &p), None, "a request is not a reply");
        let mut reply = p.clone();
        reply[0] = ECHO_REPLY_V4;
        assert_eq!(parse_reply(false, &reply), Some((0x1234, 7)));
    }

    #[test]
    fn odd_lengths_are_padded() {
        assert_eq!(checksum(&[0xff]), !0xff00);
    }
}
