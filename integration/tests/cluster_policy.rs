//! ClusterNetworkPolicy on real packets: on nftables, on eBPF (map layout 6) and on a
//! cluster mixing both, the tiers are enforced exactly: every cell of the pod matrix gets the
//! reference evaluator's verdict, and nothing is cut. Before this test an Admin `Deny`
//! reached the dataplanes as an allow; with layout 5, eBPF nodes denied such rule lists
//! whole.

use moat_harness::agent::Proto;
use moat_integration::world::World;
use moat_policy::eval::{self, Flow};

/// Tenants in y admit everyone; the platform keeps x out of y (Admin Deny), hands z's web
/// traffic to the tenants' policy (Pass), and closes z, where no tenant wrote a policy
/// (Baseline Deny).
const POLICIES: [&str; 3] = [
    "
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: guard-y}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {ns: \"y\"}}}
  ingress:
  - name: pass-z-web
    action: Pass
    from: [{namespaces: {matchLabels: {ns: z}}}]
    protocols: [{tcp: {destinationPort: {number: 80}}}]
  - name: deny-x
    action: Deny
    from: [{namespaces: {matchLabels: {ns: x}}}]
",
    "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all, namespace: \"y\"}
spec:
  podSelector: {}
  ingress: [{}]
",
    "
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: default-deny-z}
spec:
  tier: Baseline
  priority: 1
  subject: {namespaces: {matchLabels: {ns: z}}}
  ingress:
  - action: Deny
    from: [{namespaces: {}}]
",
];

/// Probes every ordered pod pair on TCP 80 (both families) and compares with the evaluator:
/// (cells the policy denies, cells it allows that were denied).
fn matrix(w: &mut World) -> (usize, Vec<String>, Vec<String>) {
    let policies: Vec<String> = POLICIES.iter().map(ToString::to_string).collect();
    let cluster = eval::Cluster::from_objects(w.objects(&policies));
    let pods: Vec<String> = w
        .moat
        .cluster
        .spec
        .pods
        .iter()
        .map(|p| p.key.clone())
        .collect();
    let (mut denied, mut leaked, mut closed) = (0, Vec::new(), Vec::new());
    for from in &pods {
        for to in pods.iter().filter(|t| *t != from) {
            let reached = w.reach(from, to, Proto::Tcp, 80);
            let [src, _] = w.ips(from);
            let [dst, _] = w.ips(to);
            let v = eval::verdict(
                &cluster,
                &Flow {
                    src,
                    dst,
                    proto: 6,
                    port: 80,
                },
            );
            match (v.allowed, reached) {
                (false, true) => leaked.push(format!("{from} -> {to}")),
                (true, false) => closed.push(format!("{from} -> {to}")),
                _ => {}
            }
            denied += usize::from(!v.allowed);
        }
    }
    (denied, leaked, closed)
}

fn apply(w: &World) {
    let policies: Vec<String> = POLICIES.iter().map(ToString::to_string).collect();
    w.apply(&policies);
}

fn enforces_the_tiers_exactly(backend: &str) {
    let mut w = World::start(backend);
    assert!(
        w.reach("x/a", "y/b", Proto::Tcp, 80),
        "open before any policy"
    );
    apply(&w);
    let (denied, leaked, closed) = matrix(&mut w);
    // x into y (3 × 3), everyone into z (x and y: 6 × 3, within z: 3 × 2).
    assert_eq!(denied, 9 + 18 + 6, "cells the policies deny");
    assert!(leaked.is_empty(), "denied by policy, passed: {leaked:?}");
    assert!(closed.is_empty(), "allowed by policy, dropped: {closed:?}");
    let status = w.moat.status_table(&[]).unwrap();
    assert!(!status.contains("degraded"), "nothing cut:\n{status}");
}

#[test]
fn nft_enforces_the_tiers_exactly() {
    enforces_the_tiers_exactly("nft");
}

#[test]
fn ebpf_enforces_the_tiers_exactly() {
    enforces_the_tiers_exactly("ebpf");
}

/// A fleet with both dataplanes: each node judges its side of a flow alike.
#[test]
fn a_cluster_mixing_ebpf_and_nft_enforces_the_tiers_exactly() {
    enforces_the_tiers_exactly("mixed");
}
