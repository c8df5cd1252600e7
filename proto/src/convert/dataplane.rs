//! What a node reports about its dataplane: degradations and the local pod table's summary.

use moat_dataplane::local::{LocalPods, UnknownPods};
use moat_dataplane::plan::Degraded;
use moat_policy::ir::{EndpointId, RuleId};

use super::{FromProto, Result, ToProto};
use crate::v1;

impl ToProto for Degraded {
    type Proto = v1::Degradation;
    fn to_proto(&self) -> v1::Degradation {
        v1::Degradation {
            egress: self.egress,
            rules: self.rules.iter().map(|r| r.0).collect(),
            endpoints: self.endpoints.iter().map(|e| e.0).collect(),
            reason: self.reason.clone(),
        }
    }
}

impl FromProto for Degraded {
    type Proto = v1::Degradation;
    fn from_proto(p: &v1::Degradation) -> Result<Self> {
        Ok(Degraded {
            egress: p.egress,
            rules: p.rules.iter().copied().map(RuleId).collect(),
            endpoints: p.endpoints.iter().copied().map(EndpointId).collect(),
            reason: p.reason.clone(),
        })
    }
}

/// The counts and flags a node reports; the table itself stays on the node.
pub fn local_pods_summary(l: &LocalPods) -> v1::LocalPods {
    let (known, unknown) = l.counts();
    v1::LocalPods {
        known: known.try_into().unwrap_or(u32::MAX),
        unknown: unknown.try_into().unwrap_or(u32::MAX),
        unsupported: l.unsupported.clone().unwrap_or_default(),
        unknown_pods: match l.unknown {
            UnknownPods::Deny => "deny",
            UnknownPods::Allow => "allow",
        }
        .into(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use moat_dataplane::local::PodAddr;

    use super::*;

    #[test]
    fn degradations_round_trip() {
        let d = Degraded {
            egress: true,
            rules: vec![RuleId(u64::MAX), RuleId(3)],
            endpoints: vec![EndpointId(1 << 63)],
            reason: "needs more than the 10 table elements the dataplane can hold".into(),
        };
        let p = d.to_proto();
        assert_eq!(p.rules, vec![u64::MAX, 3]);
        assert_eq!(Degraded::from_proto(&p).unwrap(), d);
    }

    #[test]
    fn a_local_summary_counts_states() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut l = LocalPods {
            unknown: UnknownPods::Allow,
            unsupported: Some("bridge".into()),
            ..Default::default()
        };
        l.addrs
            .insert((3, a("10.0.0.1")), PodAddr::Known(EndpointId(9)));
        l.addrs
            .insert((3, a("fd00::1")), PodAddr::Known(EndpointId(9)));
        l.addrs.insert((4, a("10.0.0.2")), PodAddr::Unknown);
        let p = local_pods_summary(&l);
        assert_eq!((p.known, p.unknown), (2, 1));
        assert_eq!(
            (p.unsupported.as_str(), p.unknown_pods.as_str()),
            ("bridge", "allow")
        );
    }
}
