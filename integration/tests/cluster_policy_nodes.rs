//! ClusterNetworkPolicy `nodes` egress peers on real packets (`moat-server
//! --experimental-cnp-node-peers`): an Admin `Deny` to the Nodes labelled `role: restricted`
//! keeps every pod's TCP and UDP off those Nodes' own addresses (IPv4 and IPv6), except the
//! pods running on such a Node (a pod's traffic to its own Node is always allowed), and
//! leaves the other Nodes reachable. Relabelling moves the denial with the label. Every probe
//! also gets the reference evaluator's verdict, so the evaluator and the dataplanes agree.

use std::net::IpAddr;

use moat_harness::agent::{ProbeReq, Proto};
use moat_integration::world::{PROBE, World};
use moat_policy::eval::{self, Flow};
use moat_policy::model::parse::Options;
use serde_json::json;

const RESTRICT: &str = "
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: keep-off-restricted-nodes}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
  - name: deny-restricted-nodes
    action: Deny
    to: [{nodes: {matchLabels: {role: restricted}}}]
";

/// Every pod probes every Node's addresses on TCP and UDP 80 (both families): the probes
/// whose result differs from the evaluator's verdict, those whose result differs from
/// "denied exactly when the Node is `restricted` and not the pod's own", and how many the
/// evaluator denies.
fn node_matrix(
    w: &mut World,
    restricted: Option<usize>,
    policies: &[String],
) -> (Vec<String>, Vec<String>, usize) {
    let cluster = eval::Cluster::from_objects(w.objects(policies));
    let pods: Vec<(String, usize)> = w
        .moat
        .cluster
        .spec
        .pods
        .iter()
        .map(|p| (p.key.clone(), p.node))
        .collect();
    let mut targets = Vec::new();
    for n in 0..w.spec.nodes {
        for dst in [IpAddr::V4(w.spec.node_v4(n)), IpAddr::V6(w.spec.node_v6(n))] {
            for proto in [Proto::Tcp, Proto::Udp] {
                targets.push((
                    n,
                    ProbeReq {
                        dst,
                        proto,
                        port: 80,
                    },
                ));
            }
        }
    }
    let reqs: Vec<(String, Vec<ProbeReq>)> = pods
        .iter()
        .map(|(k, _)| (k.clone(), targets.iter().map(|(_, p)| p.clone()).collect()))
        .collect();
    let results = w.moat.cluster.probe(&reqs, PROBE, 1).expect("probing");
    let (mut vs_eval, mut vs_expected, mut denied) = (Vec::new(), Vec::new(), 0);
    for ((from, home), got) in pods.iter().zip(results) {
        let [v4, v6] = w.ips(from);
        for ((node, p), reached) in targets.iter().zip(got) {
            let flow = Flow {
                src: if p.dst.is_ipv4() { v4 } else { v6 },
                dst: p.dst,
                proto: if p.proto == Proto::Tcp { 6 } else { 17 },
                port: 80,
            };
            let v = eval::verdict(&cluster, &flow);
            let cell = format!(
                "{from} (node-{home}) -> node-{node} {} {:?}",
                p.dst, p.proto
            );
            if v.allowed != reached {
                vs_eval.push(format!(
                    "{cell}: evaluator {}, packets {reached}",
                    v.allowed
                ));
            }
            let expected = !(restricted == Some(*node) && node != home);
            if expected != reached {
                vs_expected.push(format!("{cell}: expected {expected}, packets {reached}"));
            }
            denied += usize::from(!v.allowed);
        }
    }
    (vs_eval, vs_expected, denied)
}

fn denies_the_restricted_nodes_only(backend: &str) {
    let mut w = World::start(backend);
    w.moat.parse_options = Options {
        experimental_cnp_node_peers: true,
    };
    w.moat.restart_server().expect("restarting the server");
    // Something on every Node's own addresses to connect to.
    let _servers: Vec<_> = (0..w.spec.nodes)
        .map(|i| {
            w.moat
                .cluster
                .node_server(i, &[80], &[80])
                .expect("node agent")
        })
        .collect();
    let policies = vec![RESTRICT.to_string()];
    let pods = w.moat.cluster.spec.pods.len();
    let on = |w: &World, n: usize| {
        w.moat
            .cluster
            .spec
            .pods
            .iter()
            .filter(|p| p.node == n)
            .count()
    };

    // No Node carries the label yet: the policy selects none, every Node is reachable.
    w.apply(&policies);
    let (vs_eval, vs_expected, denied) = node_matrix(&mut w, None, &policies);
    assert!(
        vs_eval.is_empty(),
        "packets against the evaluator: {vs_eval:#?}"
    );
    assert!(
        vs_expected.is_empty(),
        "no Node restricted: {vs_expected:#?}"
    );
    assert_eq!(denied, 0);

    for restricted in [0, 2] {
        w.node_labels = [(restricted, json!({"role": "restricted"}))].into();
        w.apply(&policies);
        let (vs_eval, vs_expected, denied) = node_matrix(&mut w, Some(restricted), &policies);
        assert!(
            vs_eval.is_empty(),
            "node-{restricted} restricted, packets against the evaluator: {vs_eval:#?}"
        );
        assert!(
            vs_expected.is_empty(),
            "node-{restricted} restricted: {vs_expected:#?}"
        );
        // The pods elsewhere, on both families and protocols.
        let others = pods - on(&w, restricted);
        assert!(others > 0 && on(&w, restricted) > 0, "pods on both sides");
        assert_eq!(
            denied,
            others * 4,
            "node-{restricted} restricted: cells denied"
        );
    }
    let status = w.moat.status_table(&[]).unwrap();
    assert!(!status.contains("degraded"), "nothing cut:\n{status}");
}

#[test]
fn nft_denies_egress_to_the_selected_nodes_only() {
    denies_the_restricted_nodes_only("nft");
}

#[test]
fn ebpf_denies_egress_to_the_selected_nodes_only() {
    denies_the_restricted_nodes_only("ebpf");
}

/// node-0 and node-2 run eBPF, node-1 nft: each restricted Node is judged by pods on both.
#[test]
fn a_cluster_mixing_ebpf_and_nft_denies_egress_to_the_selected_nodes_only() {
    denies_the_restricted_nodes_only("mixed");
}
