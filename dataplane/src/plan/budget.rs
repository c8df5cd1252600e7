//! What one version may hold in a dataplane, counted while the plan is built.
//!
//! A version that does not fit is never refused whole (the node would stay on its previous
//! version, and a policy too big for one node would freeze it) and never applied in part:
//! the rule lists that don't fit are replaced by "deny" in their direction, everything else
//! keeps its exact verdicts, and the plan says what was cut and why ([`Degraded`]). Sizes
//! are checked while a ruleset is built, so one huge policy costs at most the budget in
//! memory, never its full cross product.

use moat_policy::ir::{EndpointId, RuleId};

/// Chain names of the rule lists that deny everything (an isolated direction no rule of
/// which fits). Not hex, so no content-derived name can collide with them.
pub const DENY_INGRESS: &str = "i_deny";
pub const DENY_EGRESS: &str = "e_deny";

/// Per-kind limits of one version's elements (`usize::MAX`: no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Every element together (nft: `--nft-max-elements`).
    pub total: usize,
    /// Single addresses in groups (`addr4`, `addr6`).
    pub addrs: usize,
    /// Address intervals (`class4`, `class6`).
    pub ranges: usize,
    /// Single ports (`gx`).
    pub ports_exact: usize,
    /// Port ranges, whole protocols and whole classes (`ap`, `gp`, `aa`).
    pub ports_ranged: usize,
    /// Egress named ports (`n4`, `n6`).
    pub named: usize,
    /// Layout 7's tier table entries ([`super::tier_tables`]).
    pub tier_entries: usize,
    /// Count an interval or a port range as the LPM prefixes it becomes (eBPF), not as one
    /// element (nft intervals).
    pub prefixes: bool,
    /// The dataplane takes a ruleset's lookups most specific first with deny entries
    /// (`Ruleset::deny`), as ClusterNetworkPolicy tiers need. Without it, a rule list with
    /// cluster rules is denied whole.
    pub tiers: bool,
}

impl Budget {
    pub const UNLIMITED: Budget = Budget {
        total: usize::MAX,
        addrs: usize::MAX,
        ranges: usize::MAX,
        ports_exact: usize::MAX,
        ports_ranged: usize::MAX,
        named: usize::MAX,
        tier_entries: usize::MAX,
        prefixes: false,
        tiers: true,
    };

    /// Only a total (nft).
    pub fn total(total: usize) -> Budget {
        Budget {
            total,
            ..Budget::UNLIMITED
        }
    }

    /// What an address interval costs.
    pub fn interval(&self, lo: u128, hi: u128, bits: u32) -> usize {
        if self.prefixes {
            prefix_count(lo, hi, bits)
        } else {
            1
        }
    }

    /// What a port range costs.
    pub fn port_range(&self, first: u16, last: u16) -> usize {
        if self.prefixes {
            prefix_count(u128::from(first), u128::from(last), 16)
        } else {
            1
        }
    }
}

/// How many aligned prefixes cover `lo..=hi` in a `bits`-wide space (what an LPM trie
/// needs for the interval), without listing them.
pub fn prefix_count(lo: u128, hi: u128, bits: u32) -> usize {
    let span = |k: u32| {
        if k >= 128 {
            u128::MAX
        } else {
            (1u128 << k) - 1
        }
    };
    let mut n = 0;
    let mut cur = lo;
    loop {
        let mut k = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        while cur.checked_add(span(k)).is_none_or(|e| e > hi) {
            k -= 1;
        }
        n += 1;
        let end = cur + span(k);
        if end >= hi {
            return n;
        }
        cur = end + 1;
    }
}

/// Elements counted per kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: usize,
    pub addrs: usize,
    pub ranges: usize,
    pub ports_exact: usize,
    pub ports_ranged: usize,
    pub named: usize,
    pub tier_entries: usize,
}

/// Which limit a version ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Total,
    Addrs,
    Ranges,
    PortsExact,
    PortsRanged,
    Named,
    TierEntries,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Total => "table elements",
            Kind::Addrs => "group addresses",
            Kind::Ranges => "address ranges",
            Kind::PortsExact => "single-port entries",
            Kind::PortsRanged => "port-range entries",
            Kind::Named => "named-port entries",
            Kind::TierEntries => "tier table entries",
        })
    }
}

/// A limit reached: `kind` would need more than `limit` (at least `needed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("needs more than the {limit} {kind} the dataplane can hold (at least {needed})")]
pub struct Overflow {
    pub kind: Kind,
    pub needed: usize,
    pub limit: usize,
}

impl Counts {
    fn get(&self, k: Kind) -> usize {
        match k {
            Kind::Total => self.total,
            Kind::Addrs => self.addrs,
            Kind::Ranges => self.ranges,
            Kind::PortsExact => self.ports_exact,
            Kind::PortsRanged => self.ports_ranged,
            Kind::Named => self.named,
            Kind::TierEntries => self.tier_entries,
        }
    }

    fn slot(&mut self, k: Kind) -> &mut usize {
        match k {
            Kind::Total => &mut self.total,
            Kind::Addrs => &mut self.addrs,
            Kind::Ranges => &mut self.ranges,
            Kind::PortsExact => &mut self.ports_exact,
            Kind::PortsRanged => &mut self.ports_ranged,
            Kind::Named => &mut self.named,
            Kind::TierEntries => &mut self.tier_entries,
        }
    }
}

fn limit(b: &Budget, k: Kind) -> usize {
    match k {
        Kind::Total => b.total,
        Kind::Addrs => b.addrs,
        Kind::Ranges => b.ranges,
        Kind::PortsExact => b.ports_exact,
        Kind::PortsRanged => b.ports_ranged,
        Kind::Named => b.named,
        Kind::TierEntries => b.tier_entries,
    }
}

/// The running count of a plan against its budget.
#[derive(Clone, Copy, Debug)]
pub struct Meter {
    pub budget: Budget,
    pub used: Counts,
}

impl Meter {
    pub fn new(budget: Budget) -> Self {
        Meter {
            budget,
            used: Counts::default(),
        }
    }

    /// Counts `n` elements of `kind` (and of the total), or says which limit they break.
    pub fn take(&mut self, kind: Kind, n: usize) -> Result<(), Overflow> {
        for k in [kind, Kind::Total] {
            let l = limit(&self.budget, k);
            let needed = self.used.get(k).saturating_add(n);
            if needed > l {
                return Err(Overflow {
                    kind: k,
                    needed,
                    limit: l,
                });
            }
        }
        *self.used.slot(kind) += n;
        if kind != Kind::Total {
            self.used.total += n;
        }
        Ok(())
    }
}

/// A rule list the version could not hold: its endpoints deny everything in its direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Degraded {
    pub egress: bool,
    /// The rules that did not fit, together (every rule of the list).
    pub rules: Vec<RuleId>,
    /// The endpoints holding that list.
    pub endpoints: Vec<EndpointId>,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_counts_match_a_listing() {
        fn listed(lo: u128, hi: u128, bits: u32) -> usize {
            // Brute force over a small space.
            let mut n = 0;
            let mut cur = lo;
            while cur <= hi {
                let mut k = 0;
                while k < bits && cur.is_multiple_of(1 << (k + 1)) && cur + (1 << (k + 1)) - 1 <= hi
                {
                    k += 1;
                }
                n += 1;
                cur += 1 << k;
            }
            n
        }
        for lo in 0..64u128 {
            for hi in lo..64 {
                assert_eq!(prefix_count(lo, hi, 16), listed(lo, hi, 16), "{lo}..={hi}");
            }
        }
        assert_eq!(prefix_count(0, u128::from(u16::MAX), 16), 1);
        assert_eq!(prefix_count(1, u128::from(u16::MAX), 16), 16);
        assert_eq!(prefix_count(0, u128::MAX, 128), 1);
        assert_eq!(prefix_count(1, u128::MAX - 1, 128), 254);
    }

    #[test]
    fn the_meter_stops_at_the_first_limit_and_counts_nothing_then() {
        let mut m = Meter::new(Budget {
            ports_exact: 10,
            ..Budget::total(15)
        });
        m.take(Kind::PortsExact, 8).unwrap();
        let e = m.take(Kind::PortsExact, 3).unwrap_err();
        assert_eq!((e.kind, e.needed, e.limit), (Kind::PortsExact, 11, 10));
        m.take(Kind::Addrs, 7).unwrap();
        let e = m.take(Kind::Named, 1).unwrap_err();
        assert_eq!(e.kind, Kind::Total);
        assert_eq!(m.used.total, 15);
    }
}
