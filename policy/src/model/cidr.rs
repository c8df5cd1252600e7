//! CIDR blocks as NetworkPolicy uses them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A canonical CIDR: the address has no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not a CIDR (want ADDRESS/PREFIX, e.g. 10.0.0.0/8)")]
    Syntax(String),
    #[error("prefix length {len} is too long for {addr} (max {max})")]
    PrefixTooLong { addr: IpAddr, len: u32, max: u8 },
}

/// A parsed CIDR and whether host bits had to be cleared to make it canonical.
pub struct ParsedCidr {
    pub cidr: Cidr,
    pub had_host_bits: bool,
}

impl Cidr {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, CidrError> {
        let max = max_len(addr);
        if len > max {
            return Err(CidrError::PrefixTooLong {
                addr,
                len: len.into(),
                max,
            });
        }
        Ok(Self {
            addr: mask(addr, len),
            len,
        })
    }

    pub fn host(addr: IpAddr) -> Self {
        Self {
            addr,
            len: max_len(addr),
        }
    }

    pub fn parse(s: &str) -> Result<ParsedCidr, CidrError> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.to_string()))?;
        let addr = IpAddr::from_str(a).map_err(|_| CidrError::Syntax(s.to_string()))?;
        if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) || l.len() > 3 {
            return Err(CidrError::Syntax(s.to_string()));
        }
        let len: u32 = l.parse().map_err(|_| CidrError::Syntax(s.to_string()))?;
        let max = max_len(addr);
        if len > u32::from(max) {
            return Err(CidrError::PrefixTooLong { addr, len, max });
        }
        let len = len as u8;
        let canonical = mask(addr, len);
        Ok(ParsedCidr {
            cidr: Self {
                addr: canonical,
                len,
            },
            had_host_bits: canonical != addr,
        })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.len) == self.addr
            }
            _ => false,
        }
    }

    /// True if every address of `other` lies in `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    /// First and last address of the block, for range scans over sorted addresses.
    pub fn range(&self) -> (IpAddr, IpAddr) {
        match self.addr {
            IpAddr::V4(a) => {
                let host = u32::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                (self.addr, IpAddr::V4(Ipv4Addr::from(u32::from(a) | host)))
            }
            IpAddr::V6(a) => {
                let host = u128::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                (self.addr, IpAddr::V6(Ipv6Addr::from(u128::from(a) | host)))
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let p = Cidr::parse("10.1.2.3/8").unwrap();
        assert!(p.had_host_bits);
        assert_eq!(p.cidr.to_string(), "10.0.0.0/8");
        let p = Cidr::parse("fd00::1/128").unwrap();
        assert!(!p.had_host_bits);
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .cidr
                .contains("1.2.3.4".parse().unwrap())
        );
        assert!(
            !Cidr::parse("0.0.0.0/0")
                .unwrap()
                .cidr
                .contains("::1".parse().unwrap())
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/8",
            "::/129",
            "x/1",
            "10.0.0.0/-1",
            "10.0.0.0/ 8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn covers_and_ranges() {
        let big = Cidr::parse("10.0.0.0/8").unwrap().cidr;
        let small = Cidr::parse("10.2.0.0/16").unwrap().cidr;
        assert!(big.covers(&small));
        assert!(!small.covers(&big));
        assert_eq!(small.range().1, "10.2.255.255".parse::<IpAddr>().unwrap());
        let all6 = Cidr::parse("::/0").unwrap().cidr;
        assert_eq!(all6.range().1, IpAddr::V6(Ipv6Addr::from(u128::MAX)));
        let host = Cidr::parse("10.0.0.7/32").unwrap().cidr;
        assert_eq!(host.range(), (host.addr(), host.addr()));
        let host6 = Cidr::parse("fd00::7/128").unwrap().cidr;
        assert_eq!(host6.range(), (host6.addr(), host6.addr()));
    }
}
