//! Content hashing for IDs and snapshot digests.
//!
//! A snapshot digest is a *multiset hash*: the sum (four wrapping 64-bit lanes) of one blake3
//! hash per item (node addresses, endpoint, rule, group). A sum does
//! not depend on order, so any server that sees the same cluster computes the same digest
//! whatever order events arrived in; and it is updatable in O(1) when one item changes, which
//! is what lets one pod event touch every node's digest in microseconds. Group contents are
//! themselves a sum over members, so a pod joining a group changes one term.
//!
//! The digest detects divergence between server and node; it is not a signature (a summed
//! hash is malleable by someone choosing items), and nothing relies on it for authenticity.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A structured encoder feeding blake3; every variable-length field is length-prefixed so
/// distinct values can't encode to the same bytes.
pub struct Enc(blake3::Hasher);

impl Enc {
    pub fn new(domain: &str) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(&(domain.len() as u32).to_le_bytes());
        h.update(domain.as_bytes());
        Enc(h)
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.update(&[v]);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.update(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.update(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.update(&v.to_le_bytes());
        self
    }

    /// The same bytes as `u64` for each of `vs`, handed to the hasher in blocks: one update
    /// per value cost a tenth of a full compile (an endpoint carries hundreds of rule IDs).
    pub fn u64s(&mut self, vs: impl IntoIterator<Item = u64>) -> &mut Self {
        let mut buf = [0u8; 512];
        let mut n = 0;
        for v in vs {
            buf[n..n + 8].copy_from_slice(&v.to_le_bytes());
            n += 8;
            if n == buf.len() {
                self.0.update(&buf);
                n = 0;
            }
        }
        self.0.update(&buf[..n]);
        self
    }

    pub fn bytes32(&mut self, v: &[u8; 32]) -> &mut Self {
        self.0.update(v);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.0.update(&(s.len() as u32).to_le_bytes());
        self.0.update(s.as_bytes());
        self
    }

    pub fn ip(&mut self, ip: IpAddr) -> &mut Self {
        match ip {
            IpAddr::V4(a) => {
                self.0.update(&[4]);
                self.0.update(&a.octets());
            }
            IpAddr::V6(a) => {
                self.0.update(&[6]);
                self.0.update(&a.octets());
            }
        }
        self
    }

    pub fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }

    /// A 64-bit ID from the same content.
    pub fn finish_id(&self) -> u64 {
        let h = self.finish();
        u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
    }
}

/// Order-independent accumulator of item hashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Acc([u64; 4]);

impl Acc {
    pub fn add(&mut self, h: &[u8; 32]) {
        for (i, lane) in self.0.iter_mut().enumerate() {
            *lane = lane.wrapping_add(lane_of(h, i));
        }
    }

    pub fn sub(&mut self, h: &[u8; 32]) {
        for (i, lane) in self.0.iter_mut().enumerate() {
            *lane = lane.wrapping_sub(lane_of(h, i));
        }
    }

    pub fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, lane) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&lane.to_le_bytes());
        }
        out
    }

    /// The digest of a snapshot whose items sum to `self`: the sum itself. Hashing it once
    /// more would add nothing a summed hash lacks, and would cost a blake3 per node on every
    /// event that touches every node.
    pub fn digest(self) -> Digest {
        Digest(self.to_bytes())
    }
}

fn lane_of(h: &[u8; 32], i: usize) -> u64 {
    u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Digest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 || !s.is_ascii() {
            return Err(format!("digest {s:?} is not 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16)
                .map_err(|_| format!("digest {s:?} is not hex"))?;
        }
        Ok(Digest(out))
    }
}

impl Digest {
    pub fn short(&self) -> String {
        self.to_string()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_block_of_u64s_hashes_as_the_values_one_by_one() {
        for len in [0u64, 1, 63, 64, 65, 200] {
            let (mut a, mut b) = (Enc::new("t"), Enc::new("t"));
            for v in 0..len {
                a.u64(v * 0x9e37_79b9);
            }
            b.u64s((0..len).map(|v| v * 0x9e37_79b9));
            assert_eq!(a.finish(), b.finish(), "{len} values");
        }
    }

    use super::*;

    #[test]
    fn accumulator_is_order_independent_and_invertible() {
        let a = Enc::new("x").u32(1).finish();
        let b = Enc::new("x").u32(2).finish();
        let mut s1 = Acc::default();
        s1.add(&a);
        s1.add(&b);
        let mut s2 = Acc::default();
        s2.add(&b);
        s2.add(&a);
        assert_eq!(s1, s2);
        s1.sub(&a);
        let mut s3 = Acc::default();
        s3.add(&b);
        assert_eq!(s1, s3);
        assert_ne!(s1.digest(), s2.digest());
    }

    #[test]
    fn digest_round_trips_as_hex() {
        let d = Acc::default().digest();
        let mut a = Acc::default();
        a.add(&Enc::new("x").finish());
        let e = a.digest();
        for x in [d, e] {
            assert_eq!(x.to_string().parse::<Digest>().unwrap(), x);
        }
        assert!("zz".parse::<Digest>().is_err());
    }

    #[test]
    fn encoding_is_unambiguous() {
        let ab = Enc::new("t").str("a").str("bc").finish();
        let abc = Enc::new("t").str("ab").str("c").finish();
        assert_ne!(ab, abc);
    }
}
