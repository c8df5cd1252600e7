//! ClusterNetworkPolicy validation: what the CRD refuses is refused with the field named, and
//! what Moat cannot enforce is refused rather than silently narrowed.

use moat_policy::model::cnp_api::ClusterNetworkPolicy;
use moat_policy::model::parse::cluster_network_policy;
use moat_policy::model::{CnpAction, CnpTier, Peer, PortSpec, Protocol, Subject};
use serde_json::{Value, json};

fn cnp(spec: Value) -> ClusterNetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "p"},
        "spec": spec,
    }))
    .expect("test policy deserialises")
}

fn base(extra: Value) -> Value {
    let mut s = json!({"tier": "Admin", "priority": 10, "subject": {"namespaces": {}}});
    for (k, v) in extra.as_object().expect("object") {
        s[k] = v.clone();
    }
    s
}

/// The field the rejection names.
fn rejected(spec: Value) -> String {
    let e = cluster_network_policy(&cnp(spec)).expect_err("must be rejected");
    assert_eq!(e.object, "ClusterNetworkPolicy p");
    e.field
}

#[test]
fn a_full_policy_parses_in_order_with_its_ports() {
    let p = cluster_network_policy(&cnp(json!({
        "tier": "Baseline", "priority": 1000,
        "subject": {"pods": {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {}}},
        "ingress": [
            {"name": "first", "action": "Pass", "from": [{"namespaces": {}}],
             "protocols": [{"tcp": {"destinationPort": {"number": 80}}},
                           {"udp": {"destinationPort": {"range": {"start": 1000, "end": 2000}}}}]},
            {"action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {}}}],
             "protocols": [{"destinationNamedPort": "web"}]},
        ],
        "egress": [{"action": "Accept", "to": [{"networks": ["10.0.0.0/8", "fd00::/8"]}]}],
    })))
    .unwrap()
    .value;
    assert_eq!((p.tier, p.priority), (CnpTier::Baseline, 1000));
    assert!(matches!(p.subject, Subject::Pods { .. }));
    assert_eq!(p.ingress[0].action, CnpAction::Pass);
    assert_eq!(p.ingress[0].name, "first");
    let r = p.ingress[0].rule.as_ref().unwrap();
    assert_eq!(
        r.ports,
        vec![
            PortSpec::Range {
                proto: Protocol::Tcp,
                first: 80,
                last: 80
            },
            PortSpec::Range {
                proto: Protocol::Udp,
                first: 1000,
                last: 2000
            },
        ]
    );
    // A named port resolves to the container port of that name, whatever its protocol.
    let named = &p.ingress[1].rule.as_ref().unwrap().ports;
    assert_eq!(named.len(), 3);
    let e = p.egress[0].rule.as_ref().unwrap();
    assert_eq!(e.peers.len(), 2);
    assert!(e.peers.iter().all(|p| matches!(p, Peer::Block(_))));
}

#[test]
fn schema_violations_name_their_field() {
    assert_eq!(
        rejected(json!({"priority": 1, "subject": {"namespaces": {}}})),
        "spec.tier"
    );
    assert_eq!(rejected(base(json!({"tier": "Developer"}))), "spec.tier");
    assert_eq!(rejected(base(json!({"priority": 1001}))), "spec.priority");
    assert_eq!(rejected(base(json!({"priority": -1}))), "spec.priority");
    assert_eq!(
        rejected(json!({"tier": "Admin", "subject": {"namespaces": {}}})),
        "spec.priority"
    );
    assert_eq!(
        rejected(base(
            json!({"subject": {"namespaces": {}, "pods": {"podSelector": {}}}})
        )),
        "spec.subject"
    );
    assert_eq!(rejected(base(json!({"subject": {}}))), "spec.subject");
    let deny = |extra: Value| {
        let mut r = json!({"action": "Deny", "from": [{"namespaces": {}}]});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        base(json!({"ingress": [r]}))
    };
    assert_eq!(
        rejected(deny(json!({"action": "Allow"}))),
        "spec.ingress[0].action"
    );
    assert_eq!(rejected(deny(json!({"from": []}))), "spec.ingress[0].from");
    assert_eq!(
        rejected(deny(json!({"name": "x".repeat(101)}))),
        "spec.ingress[0].name"
    );
    assert_eq!(
        rejected(deny(
            json!({"from": [{"namespaces": {}, "pods": {"podSelector": {}}}]})
        )),
        "spec.ingress[0].from[0]"
    );
    assert_eq!(
        rejected(deny(json!({"protocols": []}))),
        "spec.ingress[0].protocols"
    );
    assert_eq!(
        rejected(deny(json!({"protocols": [{"tcp": {}}]}))),
        "spec.ingress[0].protocols[0].tcp.destinationPort"
    );
    assert_eq!(
        rejected(deny(
            json!({"protocols": [{"tcp": {"destinationPort": {"number": 0}}}]})
        )),
        "spec.ingress[0].protocols[0].tcp.destinationPort.number"
    );
    assert_eq!(
        rejected(deny(
            json!({"protocols": [{"sctp": {"destinationPort": {"range": {"start": 9, "end": 9}}}}]})
        )),
        "spec.ingress[0].protocols[0].sctp.destinationPort.range"
    );
    assert_eq!(
        rejected(deny(
            json!({"protocols": [{"tcp": {"destinationPort": {"number": 1}}, "udp": {"destinationPort": {"number": 1}}}]})
        )),
        "spec.ingress[0].protocols[0]"
    );
    let many: Vec<Value> = (0..26)
        .map(|_| json!({"action": "Deny", "from": [{"namespaces": {}}]}))
        .collect();
    assert_eq!(rejected(base(json!({"ingress": many}))), "spec.ingress");
    let nets: Vec<String> = (0..26).map(|i| format!("10.{i}.0.0/16")).collect();
    assert_eq!(
        rejected(base(
            json!({"egress": [{"action": "Deny", "to": [{"networks": nets}]}]})
        )),
        "spec.egress[0].to[0].networks"
    );
    assert_eq!(
        rejected(base(
            json!({"egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/33"]}]}]})
        )),
        "spec.egress[0].to[0].networks[0]"
    );
    // Named ports need pods to resolve against (the CRD's CEL rule).
    assert_eq!(
        rejected(base(
            json!({"egress": [{"action": "Accept", "to": [{"networks": ["10.0.0.0/8"]}],
                                          "protocols": [{"destinationNamedPort": "web"}]}]})
        )),
        "spec.egress[0].protocols[0].destinationNamedPort"
    );
}

#[test]
fn peers_moat_cannot_enforce_are_refused_not_ignored() {
    assert_eq!(
        rejected(base(
            json!({"egress": [{"action": "Accept", "to": [{"domainNames": ["example.com"]}]}]})
        )),
        "spec.egress[0].to[0].domainNames"
    );
    assert_eq!(
        rejected(base(
            json!({"egress": [{"action": "Deny", "to": [{"nodes": {}}]}]})
        )),
        "spec.egress[0].to[0].nodes"
    );
}

#[test]
fn an_unknown_peer_fails_closed_by_action_with_a_warning() {
    let rule = |action: &str| {
        base(
            json!({"ingress": [{"action": action, "from": [{"namespaces": {}}, {"futurePeer": {"x": 1}}]}]}),
        )
    };
    let accept = cluster_network_policy(&cnp(rule("Accept"))).unwrap();
    assert_eq!(
        accept.value.ingress[0].rule, None,
        "an Accept rule matches nothing"
    );
    assert_eq!(accept.warnings.len(), 1);
    for action in ["Deny", "Pass"] {
        let p = cluster_network_policy(&cnp(rule(action))).unwrap();
        let r = p.value.ingress[0]
            .rule
            .as_ref()
            .expect("matches everything");
        assert!(r.peers.is_empty() && r.ports.is_empty(), "{action}");
        // "A 'Deny all' rule", for a Pass too: a Pass matching everything would skip every
        // later Admin Deny.
        assert_eq!(p.value.ingress[0].action, CnpAction::Deny, "{action}");
        assert_eq!(p.warnings.len(), 1);
    }
    // The same for a protocol entry of a kind this version does not know.
    let p = cluster_network_policy(&cnp(base(json!({"ingress": [
        {"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"icmp": {}}]}
    ]}))))
    .unwrap();
    assert!(p.value.ingress[0].rule.as_ref().unwrap().peers.is_empty());
}

#[test]
fn equal_priorities_of_one_tier_are_reported_in_evaluation_order() {
    use moat_policy::Index;
    use moat_policy::model::Object;
    let obj = |name: &str, tier: &str, priority: i64| {
        let mut v = cnp(json!({"tier": tier, "priority": priority, "subject": {"namespaces": {}}}));
        v.metadata.name = Some(name.into());
        Object::ClusterPolicy(cluster_network_policy(&v).unwrap().value)
    };
    let index = Index::build([
        obj("alpha", "Admin", 5),
        obj("bravo", "Admin", 5),
        obj("charlie", "Baseline", 5),
        obj("delta", "Admin", 6),
    ]);
    let ties = index.priority_ties();
    assert_eq!(ties.len(), 1, "{ties:?}");
    let t = &ties[0];
    assert_eq!((t.tier, t.priority), (CnpTier::Admin, 5));
    let mut want = vec!["alpha", "bravo"];
    want.sort_by_key(|n| moat_policy::ir::tie_key(n));
    assert_eq!(t.policies, want);
    assert!(t.to_string().contains("share Admin priority 5"), "{t}");
}
