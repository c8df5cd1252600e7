use std::net::IpAddr;

use moat_policy::ir::digest::Digest;
use moat_policy::ir::{DirectionRules, Endpoint, EndpointId, NodeSnapshot};

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn link(index: u32, name: &str, kind: &str, global: bool) -> Link {
    Link {
        index,
        name: name.into(),
        kind: kind.into(),
        master: None,
        global_addr: global,
    }
}

fn snap(eps: &[(u64, &str)]) -> NodeSnapshot {
    snap_sb(&eps.iter().map(|(id, a)| (*id, *a, 1)).collect::<Vec<_>>())
}

fn snap_sb(eps: &[(u64, &str, u64)]) -> NodeSnapshot {
    NodeSnapshot {
        node: "n".into(),
        version: 1,
        digest: Digest([0; 32]),
        node_addrs: vec![],
        endpoints: eps
            .iter()
            .map(|(id, a, sandbox)| Endpoint {
                id: EndpointId(*id),
                sandbox: *sandbox,
                addrs: vec![ip(a)],
                ingress: DirectionRules::default(),
                egress: DirectionRules::default(),
            })
            .collect(),
        rules: vec![],
        groups: vec![],
    }
}

fn topo(routes: &[(&str, u32)]) -> Interfaces {
    let mut t = Topology::default();
    t.links.insert(1, link(1, "eth0", "veth", true));
    for (_, i) in routes {
        t.links
            .insert(*i, link(*i, &format!("vp{i}"), "veth", false));
    }
    for (a, i) in routes {
        t.routes.insert(ip(a), *i);
    }
    Interfaces::classify(&t, &PodInterfaces::Auto)
}

#[test]
fn auto_takes_addressless_veths_and_names_take_patterns() {
    let uplink = link(1, "eth0", "veth", true);
    let pod = link(2, "cali1234", "veth", false);
    let tunnel = link(3, "vxlan0", "vxlan", false);
    let a = PodInterfaces::Auto;
    assert_eq!(a.kind(&uplink), Kind::Other);
    assert_eq!(a.kind(&pod), Kind::Pod);
    assert_eq!(a.kind(&tunnel), Kind::Other);
    let n: PodInterfaces = "cali*, lxc*".parse().unwrap();
    assert_eq!(n.kind(&pod), Kind::Pod);
    assert_eq!(n.kind(&link(4, "lxc_health", "veth", true)), Kind::Pod);
    assert_eq!(n.kind(&link(5, "xcali1", "veth", false)), Kind::Other);
    assert!("".parse::<PodInterfaces>().is_err());
    assert!(glob("a*b*c", "aXbYc") && !glob("a*b*c", "aXbY") && glob("*", ""));
}

#[test]
fn a_bridged_pod_veth_is_reported_not_trusted() {
    let mut t = Topology::default();
    t.links.insert(1, link(1, "cni0", "bridge", true));
    let mut slave = link(2, "veth1", "veth", false);
    slave.master = Some(1);
    t.links.insert(2, slave);
    let i = Interfaces::classify(&t, &PodInterfaces::Auto);
    assert!(i.pods.is_empty());
    assert_eq!(i.bridged, vec!["veth1".to_string()]);
    let local = Bindings::default().reconcile(&i, None, UnknownPods::Deny);
    assert!(local.unsupported.unwrap().contains("veth1"));
}

#[test]
fn routed_addresses_are_unknown_until_named_then_known() {
    let mut b = Bindings::default();
    let i = topo(&[("10.0.0.2", 2)]);
    let l = b.reconcile(&i, None, UnknownPods::Deny);
    assert_eq!(l.get(2, ip("10.0.0.2")), Some(PodAddr::Unknown));
    let l = b.reconcile(&i, Some(&snap(&[(7, "10.0.0.2")])), UnknownPods::Deny);
    assert_eq!(
        l.get(2, ip("10.0.0.2")),
        Some(PodAddr::Known(EndpointId(7)))
    );
    assert_eq!(l.pod_ifaces, [2].into());
    assert_eq!(l.other_ifaces, [1].into());
    // A named address with no route yet is nowhere (nothing to enforce it on).
    let l = b.reconcile(
        &topo(&[]),
        Some(&snap(&[(7, "10.0.0.2")])),
        UnknownPods::Deny,
    );
    assert!(l.addrs.is_empty());
}

#[test]
fn a_reused_address_is_unknown_until_a_snapshot_names_the_new_pod() {
    let mut b = Bindings::default();
    let old = snap(&[(7, "10.0.0.2")]);
    b.reconcile(&topo(&[("10.0.0.2", 2)]), Some(&old), UnknownPods::Deny);
    // The old pod goes (its interface too); a new pod gets the address on interface 3 while
    // the snapshot still names the old pod.
    let moved = topo(&[("10.0.0.2", 3)]);
    let l = b.reconcile(&moved, Some(&old), UnknownPods::Deny);
    assert_eq!(l.get(3, ip("10.0.0.2")), Some(PodAddr::Unknown));
    // Still unknown however often it is reconciled.
    let l = b.reconcile(&moved, Some(&old), UnknownPods::Deny);
    assert_eq!(l.get(3, ip("10.0.0.2")), Some(PodAddr::Unknown));
    // The snapshot names the new pod: bound to the new interface.
    let new = snap(&[(8, "10.0.0.2")]);
    let l = b.reconcile(&moved, Some(&new), UnknownPods::Deny);
    assert_eq!(
        l.get(3, ip("10.0.0.2")),
        Some(PodAddr::Known(EndpointId(8)))
    );
}

#[test]
fn a_new_pod_named_before_the_old_interface_goes_waits_for_its_own() {
    let mut b = Bindings::default();
    let i2 = topo(&[("10.0.0.2", 2)]);
    b.reconcile(&i2, Some(&snap(&[(7, "10.0.0.2")])), UnknownPods::Deny);
    // The server already names the new pod; the address still routes to the old interface.
    let new = snap(&[(8, "10.0.0.2")]);
    let l = b.reconcile(&i2, Some(&new), UnknownPods::Deny);
    assert_eq!(l.get(2, ip("10.0.0.2")), Some(PodAddr::Unknown));
    // The new pod's interface takes the route: the new pod's rules.
    let l = b.reconcile(&topo(&[("10.0.0.2", 3)]), Some(&new), UnknownPods::Deny);
    assert_eq!(
        l.get(3, ip("10.0.0.2")),
        Some(PodAddr::Known(EndpointId(8)))
    );
}

#[test]
fn an_address_two_endpoints_claim_is_trusted_to_neither() {
    let mut b = Bindings::default();
    let both = snap(&[(7, "10.0.0.2"), (8, "10.0.0.2")]);
    let l = b.reconcile(&topo(&[("10.0.0.2", 2)]), Some(&both), UnknownPods::Deny);
    assert_eq!(l.get(2, ip("10.0.0.2")), Some(PodAddr::Unknown));
    assert!(b.by_addr.is_empty());
}

#[test]
fn a_forgotten_address_binds_afresh() {
    let mut b = Bindings::default();
    let i = topo(&[("10.0.0.2", 2)]);
    b.reconcile(&i, Some(&snap(&[(7, "10.0.0.2")])), UnknownPods::Deny);
    b.reconcile(&i, Some(&snap(&[])), UnknownPods::Deny);
    assert!(b.by_addr.is_empty());
    let l = b.reconcile(
        &topo(&[("10.0.0.2", 3)]),
        Some(&snap(&[(9, "10.0.0.2")])),
        UnknownPods::Deny,
    );
    assert_eq!(
        l.get(3, ip("10.0.0.2")),
        Some(PodAddr::Known(EndpointId(9)))
    );
}

#[test]
fn the_same_pod_on_a_new_sandbox_moves_with_it() {
    let mut b = Bindings::default();
    b.reconcile(
        &topo(&[("10.0.0.2", 2)]),
        Some(&snap_sb(&[(7, "10.0.0.2", 100)])),
        UnknownPods::Deny,
    );
    // The kubelet recreated the pod's sandbox: new interface, same address, same pod. Until
    // the API says so (a new sandbox generation), it is not trusted.
    let moved = topo(&[("10.0.0.2", 3)]);
    let l = b.reconcile(
        &moved,
        Some(&snap_sb(&[(7, "10.0.0.2", 100)])),
        UnknownPods::Deny,
    );
    assert_eq!(l.get(3, ip("10.0.0.2")), Some(PodAddr::Unknown));
    let l = b.reconcile(
        &moved,
        Some(&snap_sb(&[(7, "10.0.0.2", 101)])),
        UnknownPods::Deny,
    );
    assert_eq!(
        l.get(3, ip("10.0.0.2")),
        Some(PodAddr::Known(EndpointId(7)))
    );
    // A generation that becomes known later, where the pod was bound, changes nothing.
    let mut b = Bindings::default();
    let i = topo(&[("10.0.0.2", 2)]);
    b.reconcile(&i, Some(&snap_sb(&[(7, "10.0.0.2", 0)])), UnknownPods::Deny);
    let l = b.reconcile(&i, Some(&snap_sb(&[(7, "10.0.0.2", 5)])), UnknownPods::Deny);
    assert_eq!(
        l.get(2, ip("10.0.0.2")),
        Some(PodAddr::Known(EndpointId(7)))
    );
}
