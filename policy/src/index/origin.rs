//! Where a node's rule list comes from: its opaque rule and endpoint IDs mapped back to the
//! policy rules and pods that produced them, for humans (`moatctl status`). Snapshots carry
//! no names, so only the index can answer, and only about its current state.

use std::collections::{BTreeSet, HashSet};

use rustc_hash::FxHashMap;

use super::{Index, PodIdx, PolicyIdx, RuleIdx, Template};
use crate::ir::{EndpointId, RuleId};

/// One rule of a NetworkPolicy: `spec.ingress[rule]` or `spec.egress[rule]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRule {
    pub namespace: String,
    pub name: String,
    pub egress: bool,
    pub rule: usize,
}

/// What a rule list of one node was made of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListOrigin {
    /// Sorted.
    pub policies: Vec<PolicyRule>,
    /// `(namespace, name)` of the pods holding the list, sorted.
    pub pods: Vec<(String, String)>,
    /// Rule IDs and endpoint IDs the index no longer knows (it moved on since that version).
    pub unmapped_rules: usize,
    pub unmapped_endpoints: usize,
}

impl Index {
    /// Maps one direction's rule list on `node` (rule IDs, and the endpoints holding it) back
    /// to policy rules and pods.
    pub fn list_origin(
        &self,
        node: &str,
        egress: bool,
        rules: &[RuleId],
        endpoints: &[EndpointId],
    ) -> ListOrigin {
        let wanted: HashSet<RuleId> = rules.iter().copied().collect();
        let mut found: HashSet<RuleId> = HashSet::new();
        let mut policies: BTreeSet<PolicyRule> = BTreeSet::new();
        let mut out = ListOrigin::default();

        let by_id: FxHashMap<EndpointId, PodIdx> = self
            .node_by_name
            .get(node)
            .map(|n| {
                self.nodes[n.get()]
                    .pods
                    .iter()
                    .map(|p| (self.pods[p.get()].endpoint_id, *p))
                    .collect()
            })
            .unwrap_or_default();
        let mut pods = BTreeSet::new();
        for e in endpoints {
            let Some(p) = by_id.get(e) else {
                out.unmapped_endpoints += 1;
                continue;
            };
            let pod = &self.pods[p.get()];
            pods.insert((
                self.namespaces[pod.ns.get()].name.to_string(),
                pod.name.to_string(),
            ));
            // The rules each policy selecting this pod gives it, per template: exact, also
            // for ingress named ports resolved against this pod.
            let labels = self.labels.get(pod.labels);
            for &pol in &self.namespaces[pod.ns.get()].policies {
                let ps = &self.policies[pol.get()];
                if !self.selectors.matches(ps.selector, labels) {
                    continue;
                }
                let templates = if egress { &ps.egress } else { &ps.ingress };
                for (i, t) in templates.iter().flatten().enumerate() {
                    for r in self.template_rules(t, egress, *p) {
                        let id = self.rules[r.get()].rule.id;
                        if wanted.contains(&id) {
                            found.insert(id);
                            policies.insert(self.policy_rule(pol, egress, i));
                        }
                    }
                }
            }
        }
        // Rules no known endpoint explained (its pods are gone): any policy whose template
        // yields them regardless of the pod.
        if found.len() < wanted.len() {
            for (pi, ps) in self.policies.iter() {
                let templates = if egress { &ps.egress } else { &ps.ingress };
                for (i, t) in templates.iter().flatten().enumerate() {
                    for r in t.static_rule.iter().chain(&t.named_rule) {
                        let id = self.rules[r.get()].rule.id;
                        if wanted.contains(&id) {
                            found.insert(id);
                            policies.insert(self.policy_rule(PolicyIdx::new(pi), egress, i));
                        }
                    }
                }
            }
        }
        out.unmapped_rules = wanted.len() - found.len();
        out.policies = policies.into_iter().collect();
        out.pods = pods.into_iter().collect();
        out
    }

    /// The rules one template gives one pod (without creating any).
    fn template_rules(&self, t: &Template, egress: bool, pod: PodIdx) -> Vec<RuleIdx> {
        let mut v: Vec<RuleIdx> = t.static_rule.iter().chain(&t.named_rule).copied().collect();
        if !egress && t.static_rule.is_none() && !t.named.is_empty() {
            let ports = &self.pods[pod.get()].ports;
            v.extend(self.find_ingress_rule_for(
                t.order,
                t.peers.as_deref(),
                &t.ranges,
                &t.named,
                ports,
            ));
        }
        v
    }

    fn policy_rule(&self, p: PolicyIdx, egress: bool, rule: usize) -> PolicyRule {
        let ps = &self.policies[p.get()];
        PolicyRule {
            namespace: self.namespaces[ps.ns.get()].name.to_string(),
            name: ps.name.to_string(),
            egress,
            rule,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::model::K8sObject;
    use crate::testkit::parse_all;

    /// db (named port `pg`) and web on n1; policy `db` admits web on 80 and a block on
    /// `pg`; policy `all` isolates every pod both ways with one egress rule.
    fn cluster() -> Vec<K8sObject> {
        let pod = |name: &str, ip: &str, ports: Value| {
            K8sObject::Pod(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": "app", "labels": {"app": name}, "uid": format!("u-{name}")},
                    "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": ports}]},
                    "status": {"podIPs": [{"ip": ip}]}
                }))
                .unwrap(),
            )
        };
        let policy = |v: Value| K8sObject::NetworkPolicy(serde_json::from_value(v).unwrap());
        vec![
            K8sObject::Node(serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap()),
            pod(
                "db",
                "10.0.0.1",
                json!([{"name": "pg", "containerPort": 5432}]),
            ),
            pod("web", "10.0.0.2", json!([])),
            policy(json!({
                "metadata": {"name": "db", "namespace": "app"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "db"}},
                    "ingress": [
                        {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 80}]},
                        {"from": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [{"port": "pg"}]}
                    ]
                }
            })),
            policy(json!({
                "metadata": {"name": "all", "namespace": "app"},
                "spec": {
                    "podSelector": {},
                    "policyTypes": ["Ingress", "Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}]}]
                }
            })),
        ]
    }

    fn pr(name: &str, egress: bool, rule: usize) -> PolicyRule {
        PolicyRule {
            namespace: "app".into(),
            name: name.into(),
            egress,
            rule,
        }
    }

    #[test]
    fn rule_lists_map_back_to_policy_rules_and_pods() {
        let idx = Index::build(parse_all(&cluster()));
        let snap = idx.snapshot("n1").unwrap();
        let db = snap
            .endpoints
            .iter()
            .find(|e| e.addrs == ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()])
            .unwrap();
        // The db pod's ingress list: both rules of `db` (the second one a named port
        // resolved against this pod); `all` isolates it for ingress with no rules.
        assert_eq!(db.ingress.rules.len(), 2);
        let o = idx.list_origin("n1", false, &db.ingress.rules, &[db.id]);
        assert_eq!(o.policies, [pr("db", false, 0), pr("db", false, 1)]);
        assert_eq!(o.pods, [("app".to_string(), "db".to_string())]);
        assert_eq!((o.unmapped_rules, o.unmapped_endpoints), (0, 0));

        let o = idx.list_origin("n1", true, &db.egress.rules, &[db.id]);
        assert_eq!(o.policies, [pr("all", true, 0)]);

        // Endpoints gone: static rules still map, the per-pod named port cannot.
        let o = idx.list_origin("n1", false, &db.ingress.rules, &[EndpointId(7)]);
        assert_eq!(o.policies, [pr("db", false, 0)]);
        assert_eq!((o.unmapped_rules, o.unmapped_endpoints), (1, 1));
        assert!(o.pods.is_empty());
    }
}
