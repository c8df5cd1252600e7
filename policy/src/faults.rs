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
    /// A ClusterNetworkPolicy `Pass` rule is compiled as `Accept`.
    CnpPassAsAccept,
    /// Baseline-tier rules are compiled into the Admin tier.
    CnpBaselineAsAdmin,
    /// Rules of one ClusterNetworkPolicy are ranked in reverse written order.
    CnpRuleOrderReversed,
    /// A `pods` subject ignores its `podSelector` (every pod of the selected namespaces).
    CnpPodsSubjectIgnoresPodSelector,
    /// An Accept rule with a peer of an unknown kind matches everything (it must match
    /// nothing: fail closed).
    CnpUnknownPeerAcceptsAll,
    /// A `destinationNamedPort` matches a container port by name whatever its protocol.
    CnpNamedPortIgnoresProtocol,
    /// Same-priority policies of one tier are ordered inversely to `ir::tie_key`.
    CnpTieKeyInverted,
    /// A rule without `protocols` matches TCP, UDP and SCTP only (it must match ICMP too).
    CnpNoProtocolsExcludesIcmp,
    /// A `nodes` peer also matches the pods running on the Nodes it selects (it must match
    /// the Nodes' own addresses only).
    CnpNodesPeerMatchesTheirPods,
}

impl Fault {
    pub const ALL: [Fault; 15] = [
        Fault::NotInAbsentKey,
        Fault::IgnoreExcept,
        Fault::NamedPortIgnoresProtocol,
        Fault::EndPortExclusive,
        Fault::PodPeerAnyNamespace,
        Fault::EgressTypeWhenEmpty,
        Fault::CnpPassAsAccept,
        Fault::CnpBaselineAsAdmin,
        Fault::CnpRuleOrderReversed,
        Fault::CnpPodsSubjectIgnoresPodSelector,
        Fault::CnpUnknownPeerAcceptsAll,
        Fault::CnpNamedPortIgnoresProtocol,
        Fault::CnpTieKeyInverted,
        Fault::CnpNoProtocolsExcludesIcmp,
        Fault::CnpNodesPeerMatchesTheirPods,
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
