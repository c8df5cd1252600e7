//! Planted semantic bugs for proving that the property test catches real mistakes.
//!
//! With the `fault-injection` feature off (every shipped build), [`active`] is a constant
//! `false` and the checks compile away.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `NotIn` is false when the key is absent (it must be true).
    NotInAbsentKey,
    /// `ipBlock.except` is ignored.
    IgnoreExcept,
    /// Named ports match on name only, not protocol.
    NamedPortIgnoresProtocol,
    /// `endPort` is treated as exclusive.
    EndPortExclusive,
    /// A peer with only `podSelector` matches pods in every namespace.
    PodPeerAnyNamespace,
    /// Omitted `policyTypes` isolate egress when `egress: []` is present.
    EgressTypeWhenEmpty,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::NotInAbsentKey,
        Fault::IgnoreExcept,
        Fault::NamedPortIgnoresProtocol,
        Fault::EndPortExclusive,
        Fault::PodPeerAnyNamespace,
        Fault::EgressTypeWhenEmpty,
    ];

    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

#[cfg(feature = "fault-injection")]
thread_local! {
    static ACTIVE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

#[inline(always)]
pub fn active(f: Fault) -> bool {
    #[cfg(feature = "fault-injection")]
    {
        ACTIVE.with(|a| a.get() & f.bit() != 0)
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = f;
        false
    }
}

/// Runs `body` with `f` planted on this thread.
#[cfg(feature = "fault-injection")]
pub fn with<T>(f: Fault, body: impl FnOnce() -> T) -> T {
    struct Reset(u32);
    impl Drop for Reset {
        fn drop(&mut self) {
            ACTIVE.with(|a| a.set(self.0));
        }
    }
    let before = ACTIVE.with(|a| a.replace(a.get() | f.bit()));
    let _reset = Reset(before);
    body()
}
