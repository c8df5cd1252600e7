//! What a node enforces as "deny" instead of exactly (fail closed): the rule lists its
//! dataplane could not hold (its Ack and Reports) and those the server cut before sending
//! (message limit), its local pod table, and how the admin API explains them with policy
//! and pod names mapped back through the index.

use moat_policy::Index;
use moat_policy::ir::delta::VersionRef;
use moat_policy::ir::{EndpointId, RuleId};
use moat_proto::v1;

use crate::hub::Hub;

/// One node's degradations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeDegradations {
    /// From the node's dataplane, for the version it applied.
    pub node: Vec<v1::Degradation>,
    /// Cut by the server from the version the node applied.
    pub server: Vec<v1::Degradation>,
    /// The last version served cut: (as published, as served). The node applying the
    /// served content is in sync with the published version.
    pub served: Option<(VersionRef, VersionRef)>,
    pub local: Option<v1::LocalPods>,
}

impl NodeDegradations {
    pub fn is_degraded(&self) -> bool {
        !self.node.is_empty() || !self.server.is_empty()
    }

    /// Whether `applied` is what the server serves for `latest`.
    pub fn serves(&self, applied: Option<VersionRef>, latest: Option<VersionRef>) -> bool {
        matches!(
            (self.served, applied, latest),
            (Some((p, s)), Some(a), Some(l)) if p == l && s == a
        )
    }

    /// The node applied `version`, with what its dataplane and the server cut from it.
    pub fn acked(&mut self, node: Vec<v1::Degradation>, server: Vec<v1::Degradation>) {
        self.node = node;
        self.server = server;
    }

    /// A periodic report. Its degradations count only for the version the server believes
    /// applied (a report racing an acknowledgement describes the version before). Returns
    /// whether anything durable changed.
    pub fn reported(
        &mut self,
        enforcing: Option<VersionRef>,
        applied: Option<VersionRef>,
        node: Vec<v1::Degradation>,
        local: Option<v1::LocalPods>,
    ) -> bool {
        if local.is_some() {
            self.local = local;
        }
        if enforcing.is_none() || enforcing != applied || self.node == node {
            return false;
        }
        self.node = node;
        true
    }

    /// The server serves `published` as `served`, cutting `cut`. If that is what the node
    /// enforces, the cut is in force there. Returns whether anything durable changed.
    pub fn served(
        &mut self,
        published: VersionRef,
        served: VersionRef,
        cut: Vec<v1::Degradation>,
        applied: Option<VersionRef>,
    ) -> bool {
        self.served = Some((published, served));
        if applied == Some(served) && self.server != cut {
            self.server = cut;
            return true;
        }
        false
    }
}

/// The degradations in `list` as the admin API explains them.
pub fn explain(
    index: &Index,
    node: &str,
    by: &str,
    list: &[v1::Degradation],
) -> Vec<v1::NodeDegradation> {
    list.iter()
        .map(|d| {
            let rules: Vec<RuleId> = d.rules.iter().map(|r| RuleId(*r)).collect();
            let endpoints: Vec<EndpointId> = d.endpoints.iter().map(|e| EndpointId(*e)).collect();
            let o = index.list_origin(node, d.egress, &rules, &endpoints);
            v1::NodeDegradation {
                egress: d.egress,
                reason: d.reason.clone(),
                by: by.to_string(),
                policies: o
                    .policies
                    .into_iter()
                    .map(|p| v1::PolicyRule {
                        namespace: p.namespace,
                        name: p.name,
                        egress: p.egress,
                        rule: p.rule as u32,
                    })
                    .collect(),
                pods: o
                    .pods
                    .into_iter()
                    .map(|(ns, n)| format!("{ns}/{n}"))
                    .collect(),
                rules: d.rules.len() as u32,
                unmapped_rules: o.unmapped_rules as u32,
                endpoints: d.endpoints.len() as u32,
                unmapped_endpoints: o.unmapped_endpoints as u32,
            }
        })
        .collect()
}

fn explain_node(index: &Index, node: &str, d: &NodeDegradations) -> Vec<v1::NodeDegradation> {
    let mut out = explain(index, node, "server", &d.server);
    out.extend(explain(index, node, "node", &d.node));
    out
}

/// Fills every node's `degraded` and `local` in a status answer.
pub fn annotate(hub: &Hub, nodes: &mut [v1::NodeStatus]) {
    for n in nodes {
        let Some(d) = hub.fleet.degradations(&n.cluster, &n.node) else {
            continue;
        };
        n.local = d.local.clone();
        if !d.is_degraded() {
            continue;
        }
        n.degraded = match hub.cluster(&n.cluster) {
            Some(c) => c.read(|i| explain_node(i, &n.node, &d)),
            None => Vec::new(),
        };
    }
}

/// Fills a policy status answer: each node's degradations that involve this policy, and
/// the estimated cost per node.
pub fn annotate_policy(
    hub: &Hub,
    cluster: &crate::hub::ClusterState,
    r: &mut v1::PolicyStatusResponse,
) {
    r.cost_warn = hub.limits.cost_warn;
    let degradations: Vec<Option<NodeDegradations>> = r
        .nodes
        .iter()
        .map(|n| hub.fleet.degradations(&cluster.name, &n.node))
        .collect();
    cluster.read(|i| {
        let cost = i.policy_cost(&r.namespace, &r.name).unwrap_or_default();
        for (n, d) in r.nodes.iter_mut().zip(degradations) {
            n.estimated_elements = cost
                .nodes
                .iter()
                .find(|(name, _)| **name == *n.node)
                .map_or(0, |(_, c)| *c);
            let Some(d) = d.filter(NodeDegradations::is_degraded) else {
                continue;
            };
            n.degraded = explain_node(i, &n.node, &d)
                .into_iter()
                .filter(|x| {
                    x.policies
                        .iter()
                        .any(|p| p.namespace == r.namespace && p.name == r.name)
                })
                .collect();
        }
    });
}

#[cfg(test)]
mod tests {
    use moat_policy::ir::digest::Digest;

    use super::*;

    fn v(version: u64, d: u8) -> VersionRef {
        VersionRef {
            version,
            digest: Digest([d; 32]),
        }
    }

    fn deg(reason: &str) -> v1::Degradation {
        v1::Degradation {
            egress: false,
            rules: vec![1],
            endpoints: vec![2],
            reason: reason.into(),
        }
    }

    #[test]
    fn reports_count_only_for_the_applied_version() {
        let mut d = NodeDegradations::default();
        assert!(!d.reported(Some(v(1, 1)), Some(v(2, 2)), vec![deg("x")], None));
        assert!(
            !d.is_degraded(),
            "a report about the version before is stale"
        );
        assert!(d.reported(Some(v(2, 2)), Some(v(2, 2)), vec![deg("x")], None));
        assert!(d.is_degraded());
        assert!(
            !d.reported(Some(v(2, 2)), Some(v(2, 2)), vec![deg("x")], None),
            "unchanged"
        );
        d.acked(Vec::new(), Vec::new());
        assert!(!d.is_degraded());
    }

    #[test]
    fn a_served_cut_is_in_force_only_where_applied() {
        let mut d = NodeDegradations::default();
        assert!(!d.served(v(3, 3), v(3, 4), vec![deg("big")], Some(v(2, 2))));
        assert!(!d.is_degraded());
        assert!(d.serves(Some(v(3, 4)), Some(v(3, 3))));
        assert!(!d.serves(Some(v(3, 3)), Some(v(3, 3))));
        assert!(d.served(v(3, 3), v(3, 4), vec![deg("big")], Some(v(3, 4))));
        assert_eq!(d.server, [deg("big")]);
    }
}
