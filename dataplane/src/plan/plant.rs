//! Layout mistakes the tests plant to show that they catch them; never on outside tests.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plant {
    /// Resolved rulesets ([`super::tiers`]): an any-peer rule ranked before a class's rules
    /// is not folded into the class's entries, so the class entry shadows it.
    AnyPeerNotFolded,
    /// Resolved rulesets: a class is judged by one of its groups only (as if a
    /// longest-prefix match were the whole answer), so a shorter prefix's rule is lost under
    /// a longer one's.
    OneGroupPerClass,
    /// Tier tables ([`super::tier_tables`]): a class's rows ignore the any-peer rules.
    TierAnyPeerNotFolded,
    /// Tier tables: a cluster class ignores the address's named ports.
    NamedPortsNotInClusterClass,
    /// Tier tables: a class's rows are left out when its whole action equals class 0's,
    /// whatever its ports say.
    RowsComparedByWholeOnly,
}

#[cfg(test)]
thread_local! {
    static ON: std::cell::Cell<Option<Plant>> = const { std::cell::Cell::new(None) };
}

#[inline(always)]
pub fn on(p: Plant) -> bool {
    #[cfg(test)]
    {
        ON.with(|c| c.get() == Some(p))
    }
    #[cfg(not(test))]
    {
        let _ = p;
        false
    }
}

/// Runs `body` with `p` planted on this thread.
#[cfg(test)]
pub fn with<T>(p: Plant, body: impl FnOnce() -> T) -> T {
    ON.with(|c| c.set(Some(p)));
    let out = body();
    ON.with(|c| c.set(None));
    out
}
