//! A [`Desired`] plan as map entries, and the difference between two such sets.
//!
//! Entries are built with slot 0; the writer stamps the slot it edits, so one diff is
//! replayed onto both slots. Address intervals become CIDR prefixes and port ranges become
//! port prefixes, so every lookup in the kernel is one LPM or hash probe.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use moat_dataplane::plan::incremental::Patched;
use moat_dataplane::plan::{Desired, Ruleset, Sets};
use moat_ebpf_common::{
    AddrKey, CLASS_ANY, DIR_EGRESS, DIR_INGRESS, EndpointKey, FAMILY_V4, FAMILY_V6, NamedKey,
    PORT_CLASS_BITS, PORT_FULL_BITS, PortKey, RANGE_FIXED_BITS, RULESET_NAMED, RangeKey,
    VERDICT_ALLOW, VERDICT_DENY,
};

/// Capacity of each policy map, as the program declares it (per slot: half of it).
pub const MAX_ENDPOINTS: usize = 1 << 16;
pub const MAX_ADDRS: usize = 1 << 20;
pub const MAX_RANGES: usize = 1 << 20;
pub const MAX_PORTS: usize = 1 << 20;
pub const MAX_NAMED: usize = 1 << 20;

/// What one version may hold: half of each map (the other slot holds the version in force
/// while the next is written), intervals and port ranges counted as the prefixes they
/// become, and at most `total` elements in all (`--max-elements`). Endpoints are not cut by
/// a budget (a denied endpoint needs its entry as much as any); `check_capacity` refuses a
/// version with more of them than `ENDPOINTS` holds. A program of a `layout` before 6
/// (tests only) reads any hit as an allow: it is never given cluster tiers.
pub fn budget(total: Option<usize>, layout: u32) -> moat_dataplane::plan::Budget {
    moat_dataplane::plan::Budget {
        total: total.unwrap_or(usize::MAX),
        addrs: MAX_ADDRS / 2,
        ranges: MAX_RANGES / 2,
        ports_exact: MAX_PORTS / 2,
        ports_ranged: MAX_PORTS / 2,
        named: MAX_NAMED / 2,
        // No tier table map before layout 7: no layout-6 plan holds tier entries.
        tier_entries: 0,
        prefixes: true,
        tiers: layout >= 6,
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntriesError {
    #[error(
        "{map} would hold {need} entries per version, more than its {max} (two versions live at once)"
    )]
    Overflow {
        map: &'static str,
        need: usize,
        max: usize,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    /// → ruleset number, with [`RULESET_NAMED`] where the ruleset has named-port rules.
    pub endpoints: BTreeMap<EndpointKey, u32>,
    pub addrs: BTreeMap<AddrKey, u32>,
    /// (prefix length, data) → class.
    pub ranges: BTreeMap<(u32, RangeKey), u32>,
    /// (prefix length, data) → verdict.
    pub ports: BTreeMap<(u32, PortKey), u8>,
    /// → verdict.
    pub named: BTreeMap<NamedKey, u8>,
}

impl Entries {
    /// Refuses a plan that can't fit while the other slot still holds the previous version.
    pub fn check_capacity(&self) -> Result<(), EntriesError> {
        for (map, need, max) in [
            ("ENDPOINTS", self.endpoints.len(), MAX_ENDPOINTS),
            ("ADDRS", self.addrs.len(), MAX_ADDRS),
            ("RANGES", self.ranges.len(), MAX_RANGES),
            (
                "PORT_EXACT",
                self.ports
                    .keys()
                    .filter(|(l, _)| *l == PORT_FULL_BITS)
                    .count(),
                MAX_PORTS,
            ),
            (
                "PORTS",
                self.ports
                    .keys()
                    .filter(|(l, _)| *l != PORT_FULL_BITS)
                    .count(),
                MAX_PORTS,
            ),
            ("NAMED", self.named.len(), MAX_NAMED),
        ] {
            if need > max / 2 {
                return Err(EntriesError::Overflow {
                    map,
                    need,
                    max: max / 2,
                });
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
            + self.addrs.len()
            + self.ranges.len()
            + self.ports.len()
            + self.named.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes these entries what `diff` turns them into.
    pub fn apply(&mut self, diff: &Diff) {
        fn map<K: Ord + Copy, V: Copy>(m: &mut BTreeMap<K, V>, (put, del): &Changes<K, V>) {
            for k in del {
                m.remove(k);
            }
            m.extend(put.iter().copied());
        }
        map(&mut self.endpoints, &diff.endpoints);
        map(&mut self.addrs, &diff.addrs);
        map(&mut self.ranges, &diff.ranges);
        map(&mut self.ports, &diff.ports);
        map(&mut self.named, &diff.named);
    }
}

/// Stable numbers for rulesets (by chain name), so a small change stays a small diff.
#[derive(Default)]
pub struct RulesetIds {
    ids: HashMap<String, u32>,
    free: Vec<u32>,
    next: u32,
}

impl RulesetIds {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.ids.insert(name.to_string(), id);
        id
    }

    fn retain(&mut self, live: &BTreeMap<String, Ruleset>) {
        let free = &mut self.free;
        self.ids.retain(|name, id| {
            let keep = live.contains_key(name);
            if !keep {
                free.push(*id);
            }
            keep
        });
    }
}

fn addr16(a: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (FAMILY_V4, out)
        }
        IpAddr::V6(a) => (FAMILY_V6, a.octets()),
    }
}

/// The CIDR prefixes exactly covering `[lo, hi]` in a `bits`-wide space, as (value,
/// prefix length), in address order.
pub fn prefixes(lo: u128, hi: u128, bits: u32) -> Vec<(u128, u32)> {
    let span = |k: u32| {
        if k >= 128 {
            u128::MAX
        } else {
            (1u128 << k) - 1
        }
    };
    let mut out = Vec::new();
    let mut cur = lo;
    loop {
        // The largest aligned block starting at `cur` that ends within `hi`.
        let mut k = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        while cur + span(k) > hi {
            k -= 1;
        }
        out.push((cur, bits - k));
        let end = cur + span(k);
        if end >= hi {
            return out;
        }
        cur = end + 1;
    }
}

/// Map entries for `d`; ruleset numbers come from (and update) `ids`.
pub fn entries(d: &Desired, ids: &mut RulesetIds) -> Entries {
    ids.retain(&d.rulesets);
    let mut e = Entries::default();
    for (name, rs) in &d.rulesets {
        ruleset_entries(ids.id(name), rs, &mut e);
    }
    let eps = d
        .ing4
        .iter()
        .map(|(a, n)| (IpAddr::V4(*a), DIR_INGRESS, n))
        .chain(d.ing6.iter().map(|(a, n)| (IpAddr::V6(*a), DIR_INGRESS, n)))
        .chain(d.eg4.iter().map(|(a, n)| (IpAddr::V4(*a), DIR_EGRESS, n)))
        .chain(d.eg6.iter().map(|(a, n)| (IpAddr::V6(*a), DIR_EGRESS, n)));
    for (addr, dir, name) in eps {
        let (family, addr16) = addr16(addr);
        let named = d.rulesets.get(name).is_some_and(|rs| rs.named_ports);
        e.endpoints.insert(
            EndpointKey {
                slot: 0,
                family,
                dir,
                _pad: 0,
                addr: addr16,
            },
            ids.id(name) | if named { RULESET_NAMED } else { 0 },
        );
    }
    let singles = d
        .addr4
        .iter()
        .map(|(a, c)| (IpAddr::V4(*a), *c))
        .chain(d.addr6.iter().map(|(a, c)| (IpAddr::V6(*a), *c)));
    for (a, class) in singles {
        let (family, addr) = addr16(a);
        e.addrs.insert(
            AddrKey {
                slot: 0,
                family,
                _pad: [0; 2],
                addr,
            },
            class,
        );
    }
    for ((lo, hi), class) in &d.class4 {
        let (lo, hi) = (u32::from(*lo) as u128, u32::from(*hi) as u128);
        for (p, len) in prefixes(lo, hi, 32) {
            let (family, addr) = addr16(IpAddr::V4(Ipv4Addr::from(p as u32)));
            e.ranges.insert(range_key(family, addr, len), *class);
        }
    }
    for ((lo, hi), class) in &d.class6 {
        for (p, len) in prefixes(u128::from(*lo), u128::from(*hi), 128) {
            let (family, addr) = addr16(IpAddr::V6(Ipv6Addr::from(p)));
            e.ranges.insert(range_key(family, addr, len), *class);
        }
    }
    e
}

/// The map difference of an in-place patch of the plan (`log`: what it changed): what [`Diff::between`] would find between the entries of the plan before and
/// after, at the cost of the change, not of the plan. Ruleset numbers do not move: an
/// in-place patch never adds or removes a ruleset.
pub fn patched(log: &Patched, ids: &mut RulesetIds) -> Diff {
    let mut diff = Diff::default();
    for (a, (_, now)) in &log.addrs {
        let (family, addr) = addr16(*a);
        let key = AddrKey {
            slot: 0,
            family,
            _pad: [0; 2],
            addr,
        };
        match now {
            Some(class) => diff.addrs.0.push((key, *class)),
            None => diff.addrs.1.push(key),
        }
    }
    for (name, change) in &log.rulesets {
        let id = ids.id(name);
        let (mut gone, mut new) = (Entries::default(), Entries::default());
        ruleset_entries(id, &change.removed, &mut gone);
        ruleset_entries(id, &change.added, &mut new);
        // Elements differ, but their port prefixes may coincide: keep a key both sides name.
        let (put, del) = map_diff(&gone.ports, &new.ports);
        diff.ports.0.extend(put);
        diff.ports.1.extend(del);
        let (put, del) = map_diff(&gone.named, &new.named);
        diff.named.0.extend(put);
        diff.named.1.extend(del);
    }
    diff
}

fn range_key(family: u8, addr: [u8; 16], len: u32) -> (u32, RangeKey) {
    (
        RANGE_FIXED_BITS + len,
        RangeKey {
            slot: 0,
            family,
            addr,
            _pad: [0; 2],
        },
    )
}

/// The entries of one ruleset: its allows, and (cluster tiers) its denies, each key with its
/// verdict. A key both would name (the plan never makes one) denies.
fn ruleset_entries(rs_id: u32, rs: &Ruleset, e: &mut Entries) {
    if rs.any {
        let key = (PORT_CLASS_BITS, PortKey::new(0, rs_id, CLASS_ANY, 0, 0));
        e.ports.entry(key).or_insert(VERDICT_ALLOW);
    }
    verdict_entries(rs_id, VERDICT_ALLOW, rs.allows(), e);
    verdict_entries(rs_id, VERDICT_DENY, rs.denies(), e);
}

fn verdict_entries(rs_id: u32, verdict: u8, s: Sets<'_>, e: &mut Entries) {
    let port = |len: u32, key: PortKey, e: &mut Entries| {
        let v = e.ports.entry((len, key)).or_insert(verdict);
        *v = (*v).max(verdict);
    };
    let ports = |class: u32, proto: u8, first: u16, last: u16, e: &mut Entries| {
        for (p, len) in prefixes(u128::from(first), u128::from(last), 16) {
            let key = PortKey::new(0, rs_id, class, proto, p as u16);
            port(PORT_CLASS_BITS + 8 + len, key, e);
        }
    };
    for c in s.aa {
        port(PORT_CLASS_BITS, PortKey::new(0, rs_id, *c, 0, 0), e);
    }
    for (proto, a, b) in s.ap {
        ports(CLASS_ANY, *proto, *a, *b, e);
    }
    for (c, proto, a, b) in s.gp {
        ports(*c, *proto, *a, *b, e);
    }
    for (c, proto, p) in s.gx {
        ports(*c, *proto, *p, *p, e);
    }
    let named =
        s.n4.iter()
            .map(|(a, p, port)| (IpAddr::V4(*a), *p, *port))
            .chain(s.n6.iter().map(|(a, p, port)| (IpAddr::V6(*a), *p, *port)));
    for (a, proto, port) in named {
        let (family, addr) = addr16(a);
        let key = NamedKey {
            slot: 0,
            family,
            proto,
            _pad: 0,
            ruleset: rs_id,
            port,
            _pad2: [0; 2],
            addr,
        };
        let v = e.named.entry(key).or_insert(verdict);
        *v = (*v).max(verdict);
    }
}

/// Entries to write (key, value) and keys to remove.
pub type Changes<K, V> = (Vec<(K, V)>, Vec<K>);

/// What to write and remove to turn one entry set into another.
#[derive(Debug, Default)]
pub struct Diff {
    pub endpoints: Changes<EndpointKey, u32>,
    pub addrs: Changes<AddrKey, u32>,
    pub ranges: Changes<(u32, RangeKey), u32>,
    pub ports: Changes<(u32, PortKey), u8>,
    pub named: Changes<NamedKey, u8>,
}

impl Diff {
    pub fn between(old: &Entries, new: &Entries) -> Diff {
        Diff {
            endpoints: map_diff(&old.endpoints, &new.endpoints),
            addrs: map_diff(&old.addrs, &new.addrs),
            ranges: map_diff(&old.ranges, &new.ranges),
            ports: map_diff(&old.ports, &new.ports),
            named: map_diff(&old.named, &new.named),
        }
    }

    pub fn len(&self) -> usize {
        self.endpoints.0.len()
            + self.endpoints.1.len()
            + self.addrs.0.len()
            + self.addrs.1.len()
            + self.ranges.0.len()
            + self.ranges.1.len()
            + self.ports.0.len()
            + self.ports.1.len()
            + self.named.0.len()
            + self.named.1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn map_diff<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> Changes<K, V> {
    let put = new
        .iter()
        .filter(|(k, v)| old.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let del = old
        .keys()
        .filter(|k| !new.contains_key(k))
        .copied()
        .collect();
    (put, del)
}

#[cfg(test)]
mod tests;
