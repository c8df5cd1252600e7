use serde_json::json;

use super::*;

fn np(spec: serde_json::Value) -> net::NetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "x"},
        "spec": spec,
    }))
    .expect("test policy deserialises")
}

fn err(spec: serde_json::Value) -> ValidationError {
    network_policy(&np(spec)).expect_err("policy must be rejected")
}

#[test]
fn defaults_policy_types_and_protocol() {
    let p = network_policy(&np(json!({
        "podSelector": {},
        "egress": [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 80}]}],
    })))
    .unwrap()
    .value;
    assert_eq!(p.ingress, Some(vec![]), "Ingress is always implied");
    let egress = p.egress.expect("Egress implied by non-empty egress");
    assert_eq!(
        egress[0].ports,
        vec![
            PortSpec::Range {
                proto: Protocol::Tcp,
                first: 80,
                last: 80
            },
            PortSpec::Range {
                proto: Protocol::Udp,
                first: 53,
                last: 53
            },
        ]
    );
    let p = network_policy(&np(json!({"podSelector": {}, "egress": []})))
        .unwrap()
        .value;
    assert_eq!(p.egress, None, "empty egress does not imply Egress");
    let p = network_policy(&np(
        json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}),
    ))
    .unwrap()
    .value;
    assert_eq!(
        p.ingress, None,
        "ingress rules are ignored without the Ingress type"
    );
    assert_eq!(p.egress, Some(vec![]));
}

#[test]
fn rejects_bad_input_naming_the_field() {
    let cases = [
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "bogus"}}]}]}),
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}),
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}]}),
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["fd00::/64"]}}]}]}),
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            json!({"ingress": [{"ports": [{"port": 0}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"ingress": [{"ports": [{"port": 65536}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            json!({"ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            json!({"ingress": [{"ports": [{"endPort": 80}]}]}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            json!({"ingress": [{"ports": [{"port": "HTTP"}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"ingress": [{"ports": [{"port": "80"}]}]}),
            "spec.ingress[0].ports[0].port",
        ),
        (
            json!({"ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}),
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Like", "values": ["b"]}]}}),
            "spec.podSelector.matchExpressions[0].operator",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "spec.podSelector.matchExpressions[0].values",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}}),
            "spec.podSelector.matchExpressions[0].values",
        ),
        (
            json!({"podSelector": {"matchLabels": {"bad key!": "x"}}}),
            "spec.podSelector.matchLabels[bad key!]",
        ),
        (
            json!({"ingress": [{"from": [{}]}]}),
            "spec.ingress[0].from[0]",
        ),
        (
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
            "spec.ingress[0].from[0]",
        ),
        (
            json!({"policyTypes": ["Ingress", "Sideways"]}),
            "spec.policyTypes[1]",
        ),
    ];
    for (spec, field) in cases {
        let e = err(spec.clone());
        assert_eq!(e.field, field, "for {spec}: {e}");
        assert_eq!(e.object, "NetworkPolicy x/p");
        assert!(e.to_string().starts_with("NetworkPolicy x/p: "), "{e}");
    }
}

#[test]
fn normalises_cidr_host_bits_with_a_warning() {
    let p = network_policy(&np(json!({
        "egress": [{"to": [{"ipBlock": {"cidr": "10.1.2.3/8", "except": ["10.1.2.3/16"]}}]}],
    })))
    .unwrap();
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
    assert_eq!(p.warnings[0].field, "spec.egress[0].to[0].ipBlock.cidr");
    let Peer::Block(b) = &p.value.egress.unwrap()[0].peers[0] else {
        panic!()
    };
    assert_eq!(b.cidr.to_string(), "10.0.0.0/8");
    assert_eq!(b.except[0].to_string(), "10.1.0.0/16");
}

#[test]
fn selectors_are_canonical() {
    let a = network_policy(&np(json!({"podSelector": {
        "matchLabels": {"b": "2", "a": "1"},
        "matchExpressions": [{"key": "c", "operator": "In", "values": ["z", "y", "z"]}],
    }})))
    .unwrap()
    .value;
    let b = network_policy(&np(json!({"podSelector": {
        "matchExpressions": [{"key": "c", "operator": "In", "values": ["y", "z"]},
                             {"key": "a", "operator": "In", "values": ["1"]}],
        "matchLabels": {"b": "2"},
    }})))
    .unwrap()
    .value;
    assert_eq!(a.pod_selector, b.pod_selector);
}

#[test]
fn pods_keep_only_what_policy_needs() {
    let p: core::Pod = serde_json::from_value(json!({
        "metadata": {"name": "a", "namespace": "x", "labels": {"app": "web"}},
        "spec": {
            "nodeName": "n1",
            "containers": [{"name": "c", "ports": [
                {"containerPort": 8080, "name": "http"},
                {"containerPort": 53, "name": "dns", "protocol": "UDP"},
                {"containerPort": 9000}
            ]}],
            "initContainers": [
                {"name": "side", "restartPolicy": "Always", "ports": [{"containerPort": 9090, "name": "metrics"}]},
                {"name": "init", "ports": [{"containerPort": 1, "name": "ignored"}]}
            ]
        },
        "status": {"podIPs": [{"ip": "fd00::5"}, {"ip": "10.0.0.5"}], "phase": "Running"}
    }))
    .unwrap();
    let p = pod(&p).unwrap().value;
    assert_eq!(
        p.ips,
        vec![
            "10.0.0.5".parse::<IpAddr>().unwrap(),
            "fd00::5".parse().unwrap()
        ]
    );
    let names: Vec<_> = p
        .ports
        .iter()
        .map(|c| (c.name.as_str(), c.proto, c.port))
        .collect();
    assert_eq!(
        names,
        vec![
            ("dns", Protocol::Udp, 53),
            ("http", Protocol::Tcp, 8080),
            ("metrics", Protocol::Tcp, 9090)
        ]
    );
    assert_eq!(p.node.as_deref(), Some("n1"));
    assert!(p.is_policy_endpoint());

    let bad: core::Pod = serde_json::from_value(json!({
        "metadata": {"name": "a", "namespace": "x"},
        "status": {"podIP": "10.0.0.300"}
    }))
    .unwrap();
    assert_eq!(pod(&bad).unwrap_err().field, "status.podIP");
}

#[test]
fn namespace_name_label_is_authoritative() {
    let n: core::Namespace = serde_json::from_value(json!({
        "metadata": {"name": "prod", "labels": {"kubernetes.io/metadata.name": "dev", "env": "prod"}}
    }))
    .unwrap();
    let n = namespace(&n).unwrap();
    assert_eq!(n.warnings.len(), 1);
    assert_eq!(n.value.labels["kubernetes.io/metadata.name"], "prod");
    let unnamed: core::Namespace = serde_json::from_value(json!({"metadata": {}})).unwrap();
    assert_eq!(namespace(&unnamed).unwrap_err().field, "metadata.name");
}

fn node_peer_policy(rule: serde_json::Value) -> super::super::cnp_api::ClusterNetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": "guard"},
        "spec": {"tier": "Admin", "priority": 3, "subject": {"namespaces": {}},
                 "egress": [rule]},
    }))
    .expect("test policy deserialises")
}

#[test]
fn node_labels_are_parsed_and_validated() {
    let n: core::Node = serde_json::from_value(json!({
        "metadata": {"name": "n1", "labels": {"pool": "infra", "kubernetes.io/hostname": "n1"}},
        "status": {"addresses": [
            {"type": "Hostname", "address": "n1"},
            {"type": "InternalIP", "address": "10.0.0.9"},
        ]},
    }))
    .unwrap();
    let p = node(&n).unwrap().value;
    assert_eq!(
        p.labels,
        BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), "n1".to_string()),
            ("pool".to_string(), "infra".to_string()),
        ])
    );
    assert_eq!(p.addrs, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);

    let bad: core::Node = serde_json::from_value(json!({
        "metadata": {"name": "n1", "labels": {"pool": "not a value"}},
    }))
    .unwrap();
    let e = node(&bad).expect_err("an invalid label value is refused");
    assert_eq!(e.field, "metadata.labels[pool]");
}

#[test]
fn a_nodes_peer_needs_the_experimental_option() {
    let p = node_peer_policy(json!({"name": "no-infra", "action": "Deny",
        "to": [{"nodes": {"matchLabels": {"pool": "infra"}}}]}));
    // Off (the default): refused whole, naming policy, rule and the flag that enables it.
    for e in [
        cluster_network_policy(&p).expect_err("refused by default"),
        object(&K8sObject::ClusterNetworkPolicy(p.clone())).expect_err("refused by default"),
    ] {
        assert_eq!(e.object, "ClusterNetworkPolicy guard");
        assert_eq!(e.field, "spec.egress[0].to[0].nodes");
        assert!(e.message.contains("not supported"), "{e}");
        assert!(e.message.contains("--experimental-cnp-node-peers"), "{e}");
    }
    // On: a real peer over Node labels.
    let on = Options::experimental();
    let got = cluster_network_policy_with(&p, &on).unwrap().value;
    let rule = got.egress[0].rule.as_ref().expect("matches something");
    assert_eq!(
        rule.peers,
        vec![Peer::Nodes(Selector {
            reqs: vec![Requirement {
                key: "pool".into(),
                op: Op::In,
                values: vec!["infra".into()],
            }],
        })]
    );
    assert!(rule.ports.is_empty());
    let Object::ClusterPolicy(via_object) = object_with(&K8sObject::ClusterNetworkPolicy(p), &on)
        .unwrap()
        .value
    else {
        panic!("a ClusterNetworkPolicy parses to a cluster policy");
    };
    assert_eq!(via_object, got);
}

#[test]
fn a_nodes_peer_is_still_validated() {
    let on = Options::experimental();
    // An empty selector selects every Node.
    let p = node_peer_policy(json!({"action": "Accept", "to": [{"nodes": {}}],
        "protocols": [{"tcp": {"destinationPort": {"number": 10250}}}]}));
    let got = cluster_network_policy_with(&p, &on).unwrap().value;
    assert_eq!(
        got.egress[0].rule.as_ref().unwrap().peers,
        vec![Peer::Nodes(Selector::everything())]
    );
    // Nodes have no named ports, as the CRD says.
    let p = node_peer_policy(json!({"action": "Accept", "to": [{"nodes": {}}],
        "protocols": [{"destinationNamedPort": "http"}]}));
    let e = cluster_network_policy_with(&p, &on).expect_err("named port beside nodes");
    assert_eq!(e.field, "spec.egress[0].protocols[0].destinationNamedPort");
    // One field per peer.
    let p = node_peer_policy(json!({"action": "Deny",
        "to": [{"nodes": {}, "networks": ["10.0.0.0/8"]}]}));
    let e = cluster_network_policy_with(&p, &on).expect_err("two fields");
    assert_eq!(e.field, "spec.egress[0].to[0]");
    // Its selector is checked like any other.
    let p = node_peer_policy(json!({"action": "Deny",
        "to": [{"nodes": {"matchExpressions": [{"key": "pool", "operator": "In"}]}}]}));
    let e = cluster_network_policy_with(&p, &on).expect_err("In without values");
    assert_eq!(
        e.field,
        "spec.egress[0].to[0].nodes.matchExpressions[0].values"
    );
}
