//! Read-only questions about the compiled state, for the sync plane's status view and for
//! live explain.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::Index;
use crate::ir::digest::Digest;
use crate::model::{ContainerPort, Namespace, Node, Object, Pod};

/// Where one policy's current content must be enforced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySpan {
    /// The generation that first compiled this content: a node enforces it once it has
    /// applied its first version at or after this generation (or, if the policy changed
    /// nothing on that node, the version it already had then).
    pub generation: u64,
    /// Nodes holding a pod the policy selects.
    pub nodes: Vec<Arc<str>>,
}

impl Index {
    /// Gives nodes whose content is unchanged the versions they had before a restart, so a
    /// reconnecting enforcer is not told old content is new. `previous` returns what the node
    /// was last published as; it must lie below this index's generation.
    pub fn adopt_versions(&mut self, previous: impl Fn(&str) -> Option<(u64, Digest)>) -> usize {
        let mut adopted = 0;
        for (_, node) in self.nodes.iter_mut() {
            let Some((_, digest)) = node.published else {
                continue;
            };
            if let Some((v, d)) = previous(&node.name)
                && d == digest
                && v <= self.generation
            {
                node.published = Some((v, d));
                adopted += 1;
            }
        }
        adopted
    }

    /// `namespace` empty: the ClusterNetworkPolicy `name`, whose rules are enforced where
    /// the pods its subject selects run.
    pub fn policy_span(&self, namespace: &str, name: &str) -> Option<PolicySpan> {
        if namespace.is_empty() {
            let p = *self.cluster_policy_by_name.get(name)?;
            let mut nodes = BTreeSet::new();
            for (_, ns) in &self.namespaces {
                for (ls, pods) in &ns.classes {
                    if !self.subject_selects(p, ns.labels, *ls) {
                        continue;
                    }
                    for pod in pods {
                        if let Some(ep) = &self.pods[pod.get()].endpoint {
                            nodes.insert(self.nodes[ep.node.get()].name.clone());
                        }
                    }
                }
            }
            return Some(PolicySpan {
                generation: self.cluster_policies[p.get()].generation,
                nodes: nodes.into_iter().collect(),
            });
        }
        let ns = *self.ns_by_name.get(namespace)?;
        let p = *self.policy_by_key.get(&(ns, Arc::from(name)))?;
        let ps = &self.policies[p.get()];
        let mut nodes = BTreeSet::new();
        for (ls, pods) in &self.namespaces[ns.get()].classes {
            if !self.selectors.matches(ps.selector, self.labels.get(*ls)) {
                continue;
            }
            for pod in pods {
                if let Some(ep) = &self.pods[pod.get()].endpoint {
                    nodes.insert(self.nodes[ep.node.get()].name.clone());
                }
            }
        }
        Some(PolicySpan {
            generation: ps.generation,
            nodes: nodes.into_iter().collect(),
        })
    }

    /// The current cluster state as model objects (what the index was given, minus fields
    /// policy never reads).
    pub fn objects(&self) -> Vec<Object> {
        let mut out = Vec::new();
        let labels = |ls| {
            self.labels
                .get(ls)
                .iter()
                .map(|(k, v)| {
                    (
                        self.strings.resolve(*k).to_string(),
                        self.strings.resolve(*v).to_string(),
                    )
                })
                .collect()
        };
        for (_, n) in self.nodes.iter().filter(|(_, n)| n.known) {
            out.push(Object::Node(Node {
                name: n.name.to_string(),
                addrs: n.addrs.clone(),
                labels: n.labels.map(labels).unwrap_or_default(),
            }));
        }
        for (_, ns) in self.namespaces.iter().filter(|(_, ns)| ns.known) {
            out.push(Object::Namespace(Namespace {
                name: ns.name.to_string(),
                labels: labels(ns.labels),
            }));
        }
        for (_, p) in self.pods.iter() {
            out.push(Object::Pod(Pod {
                namespace: self.namespaces[p.ns.get()].name.to_string(),
                name: p.name.to_string(),
                labels: labels(p.labels),
                node: p.node.map(|n| self.nodes[n.get()].name.to_string()),
                ips: p.ips.to_vec(),
                ports: p
                    .ports
                    .iter()
                    .map(|c| ContainerPort {
                        name: self.strings.resolve(c.name).to_string(),
                        proto: c.proto,
                        port: c.port,
                    })
                    .collect(),
                host_network: p.host_network,
                terminal: p.terminal,
                uid: p.uid.as_deref().map(String::from),
                sandbox: p.sandbox_raw.as_deref().map(String::from),
            }));
        }
        for (_, p) in self.policies.iter() {
            out.push(Object::Policy(p.model.clone()));
        }
        for (_, p) in self.cluster_policies.iter() {
            out.push(Object::ClusterPolicy(p.model.clone()));
        }
        out
    }
}

/// Cluster policies of one tier sharing one priority: upstream leaves their order undefined,
/// Moat takes them by [`ir::tie_key`](crate::ir::tie_key) of their names (the order here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityTie {
    pub tier: crate::model::CnpTier,
    pub priority: u32,
    /// In the order Moat evaluates them.
    pub policies: Vec<String>,
}

impl std::fmt::Display for PriorityTie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClusterNetworkPolicies {} share {} priority {}: upstream leaves their order undefined; Moat evaluates them in this order (a hash of the names); give them distinct priorities if the order matters",
            self.policies.join(", "),
            self.tier.as_str(),
            self.priority
        )
    }
}

impl Index {
    /// Every set of two or more cluster policies with the same tier and priority.
    pub fn priority_ties(&self) -> Vec<PriorityTie> {
        let mut by: std::collections::BTreeMap<(crate::model::CnpTier, u32), Vec<(u64, String)>> =
            Default::default();
        for (_, p) in self.cluster_policies.iter() {
            by.entry((p.model.tier, p.model.priority))
                .or_default()
                .push((crate::ir::tie_key(&p.name), p.name.to_string()));
        }
        by.into_iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|((tier, priority), mut v)| {
                v.sort();
                PriorityTie {
                    tier,
                    priority,
                    policies: v.into_iter().map(|(_, n)| n).collect(),
                }
            })
            .collect()
    }
}
