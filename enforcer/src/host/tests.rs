//! Netlink messages, encoded by `netlink-packet-route` as the kernel sends them, become the
//! right topology.

use std::net::IpAddr;

use moat_dataplane::local::{Interfaces, PodInterfaces, Topology};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_MULTIPART, NLM_F_REPLACE, NetlinkMessage};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage as M};

use super::decode::{self, Event};
use super::facts::Facts;

fn wire(msgs: Vec<(M, u16)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (m, flags) in msgs {
        let mut msg = NetlinkMessage::from(m);
        msg.header.flags = flags;
        msg.header.sequence_number = 7;
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        out.extend(buf);
    }
    out
}

fn link(
    index: u32,
    name: &str,
    kind: Option<InfoKind>,
    master: Option<u32>,
    up: bool,
) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if up {
        m.header.flags = LinkFlags::Up;
    }
    m.attributes.push(LinkAttribute::IfName(name.into()));
    m.attributes.push(LinkAttribute::Mtu(1500));
    if let Some(k) = kind {
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(k)]));
    }
    if let Some(c) = master {
        m.attributes.push(LinkAttribute::Controller(c));
    }
    m
}

fn veth(index: u32, name: &str) -> M {
    M::NewLink(link(index, name, Some(InfoKind::Veth), None, true))
}

fn address(index: u32, a: &str, scope: AddressScope) -> AddressMessage {
    let a: IpAddr = a.parse().unwrap();
    let mut m = AddressMessage::default();
    m.header.family = if a.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.header.prefix_len = if a.is_ipv4() { 24 } else { 64 };
    m.header.scope = scope;
    m.header.index = index;
    m.attributes.push(AddressAttribute::Address(a));
    if a.is_ipv4() {
        m.attributes.push(AddressAttribute::Local(a));
    }
    m
}

struct R {
    dst: &'static str,
    oif: u32,
    metric: u32,
    via: Option<&'static str>,
    table: u32,
    len: Option<u8>,
}

fn r(dst: &'static str, oif: u32) -> R {
    R {
        dst,
        oif,
        metric: 0,
        via: None,
        table: 254,
        len: None,
    }
}

fn route(spec: R) -> RouteMessage {
    let dst: IpAddr = spec.dst.parse().unwrap();
    let mut m = RouteMessage::default();
    m.header.address_family = if dst.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.header.destination_prefix_length = spec.len.unwrap_or(if dst.is_ipv4() { 32 } else { 128 });
    m.header.table = if spec.table < 256 {
        spec.table as u8
    } else {
        252
    };
    m.header.kind = RouteType::Unicast;
    m.attributes.push(RouteAttribute::Table(spec.table));
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    m.attributes.push(RouteAttribute::Oif(spec.oif));
    if spec.metric != 0 || dst.is_ipv6() {
        m.attributes.push(RouteAttribute::Priority(spec.metric));
    }
    if let Some(g) = spec.via {
        let g: IpAddr = g.parse().unwrap();
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(g)));
    }
    m
}

fn feed(f: &mut Facts, msgs: Vec<(M, u16)>) -> bool {
    let mut resync = false;
    for d in decode::datagram(&wire(msgs)).expect("decodes") {
        if let Some(ev) = d.event {
            resync |= f.apply(&ev).resync;
        }
    }
    resync
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pods(t: &Topology) -> Interfaces {
    Interfaces::classify(t, &PodInterfaces::Auto)
}

/// A node like the harness's: an uplink veth with a global address, a pod veth holding only
/// the pods' link-local gateway addresses, host routes to the pod, a route via a gateway.
fn node() -> Facts {
    let mut f = Facts::default();
    feed(
        &mut f,
        vec![
            (M::NewLink(link(1, "lo", None, None, true)), 0),
            (veth(2, "eth0"), NLM_F_MULTIPART),
            (veth(5, "vp0"), NLM_F_MULTIPART),
            (
                M::NewAddress(address(1, "127.0.0.1", AddressScope::Host)),
                0,
            ),
            (
                M::NewAddress(address(2, "192.168.7.1", AddressScope::Universe)),
                0,
            ),
            (
                M::NewAddress(address(2, "2001:db8:7::1", AddressScope::Universe)),
                0,
            ),
            (
                M::NewAddress(address(5, "169.254.1.1", AddressScope::Universe)),
                0,
            ),
            (M::NewAddress(address(5, "fe80::1", AddressScope::Link)), 0),
            (M::NewRoute(route(r("10.244.1.5", 5))), 0),
            (M::NewRoute(route(r("fd00::1:5", 5))), 0),
            (
                M::NewRoute(route(R {
                    via: Some("192.168.7.2"),
                    ..r("10.244.2.5", 2)
                })),
                0,
            ),
            (
                M::NewRoute(route(R {
                    len: Some(24),
                    ..r("10.244.3.0", 2)
                })),
                0,
            ),
        ],
    );
    f
}

#[test]
fn a_pod_veth_and_its_host_routes() {
    let t = node().topology();
    assert_eq!(t.links[&5].kind, "veth");
    assert_eq!(t.links[&5].name, "vp0");
    assert!(
        !t.links[&5].global_addr,
        "link-local addresses don't make an uplink"
    );
    assert!(t.links[&2].global_addr);
    assert_eq!(
        t.routes,
        [(ip("10.244.1.5"), 5), (ip("fd00::1:5"), 5)].into(),
        "only direct /32 and /128 routes; not via a gateway, not a /24"
    );
    let i = pods(&t);
    assert_eq!(i.pods.keys().copied().collect::<Vec<_>>(), vec![5]);
    assert_eq!(i.pods[&5], [ip("10.244.1.5"), ip("fd00::1:5")].into());
    assert!(i.other.contains(&2) && i.other.contains(&1));
}

#[test]
fn a_route_moving_to_a_new_interface() {
    let mut f = node();
    // The CNI deletes the old pod's route and adds the new pod's.
    let resync = feed(
        &mut f,
        vec![
            (veth(6, "vp1"), 0),
            (M::DelRoute(route(r("10.244.1.5", 5))), 0),
            (M::NewRoute(route(r("10.244.1.5", 6))), NLM_F_CREATE),
        ],
    );
    assert!(!resync);
    assert_eq!(f.topology().routes[&ip("10.244.1.5")], 6);
    // Or replaces it in place.
    feed(
        &mut f,
        vec![(
            M::NewRoute(route(r("fd00::1:5", 6))),
            NLM_F_CREATE | NLM_F_REPLACE,
        )],
    );
    assert_eq!(f.topology().routes[&ip("fd00::1:5")], 6);
    // Without REPLACE, two routes of one metric to two interfaces: nobody's.
    feed(
        &mut f,
        vec![(M::NewRoute(route(r("fd00::1:5", 5))), NLM_F_CREATE)],
    );
    assert!(!f.topology().routes.contains_key(&ip("fd00::1:5")));
}

#[test]
fn the_winning_route_decides() {
    let mut f = node();
    // A lower metric via a gateway wins over the direct route: not the pod's address.
    feed(
        &mut f,
        vec![
            (
                M::NewRoute(route(R {
                    metric: 100,
                    ..r("10.244.1.7", 5)
                })),
                0,
            ),
            (
                M::NewRoute(route(R {
                    metric: 10,
                    via: Some("192.168.7.2"),
                    ..r("10.244.1.7", 2)
                })),
                0,
            ),
            // Other tables don't route the node's traffic.
            (
                M::NewRoute(route(R {
                    table: 1000,
                    ..r("10.244.1.8", 5)
                })),
                0,
            ),
        ],
    );
    let t = f.topology();
    assert!(!t.routes.contains_key(&ip("10.244.1.7")));
    assert!(!t.routes.contains_key(&ip("10.244.1.8")));
    // The gateway route goes: the direct one decides.
    feed(
        &mut f,
        vec![(
            M::DelRoute(route(R {
                metric: 10,
                via: Some("192.168.7.2"),
                ..r("10.244.1.7", 2)
            })),
            0,
        )],
    );
    assert_eq!(f.topology().routes[&ip("10.244.1.7")], 5);
}

#[test]
fn a_vanished_interface_takes_its_routes_and_bridge_messages_are_not_links() {
    let mut f = node();
    // A port leaving a bridge is an AF_BRIDGE RTM_DELLINK: the interface stays.
    let mut port = link(5, "vp0", Some(InfoKind::Veth), None, true);
    port.header.interface_family = AddressFamily::Bridge;
    feed(&mut f, vec![(M::DelLink(port), 0)]);
    assert!(f.topology().links.contains_key(&5));
    // IPv4 deletes the routes of a deleted interface silently.
    feed(
        &mut f,
        vec![(M::DelLink(link(5, "vp0", None, None, false)), 0)],
    );
    let t = f.topology();
    assert!(!t.links.contains_key(&5));
    assert!(t.routes.is_empty(), "{:?}", t.routes);
}

#[test]
fn silent_kernel_changes_ask_for_a_dump() {
    let mut f = node();
    assert!(
        feed(
            &mut f,
            vec![(
                M::NewLink(link(5, "vp0", Some(InfoKind::Veth), None, false)),
                0
            )]
        ),
        "an interface going down loses its IPv4 routes without notice"
    );
    assert!(!feed(
        &mut f,
        vec![(
            M::NewLink(link(5, "vp0", Some(InfoKind::Veth), None, false)),
            0
        )]
    ));
    assert!(
        feed(&mut f, vec![(M::DelRoute(route(r("10.244.9.9", 5))), 0)]),
        "a removal of something never seen"
    );
    assert!(
        feed(
            &mut f,
            vec![(
                M::DelAddress(address(2, "192.168.7.1", AddressScope::Universe)),
                0
            )]
        ),
        "routes through a removed IPv4 address go silently"
    );
    assert!(!feed(
        &mut f,
        vec![(
            M::DelAddress(address(2, "2001:db8:7::1", AddressScope::Universe)),
            0
        )]
    ));
    assert!(
        !f.topology().links[&2].global_addr,
        "no global address left"
    );
}

#[test]
fn bridged_and_named_interfaces() {
    let mut f = node();
    feed(
        &mut f,
        vec![
            (
                M::NewLink(link(9, "cni0", Some(InfoKind::Bridge), None, true)),
                0,
            ),
            (
                M::NewLink(link(10, "vethab", Some(InfoKind::Veth), Some(9), true)),
                0,
            ),
            (
                M::NewLink(link(11, "cali12", Some(InfoKind::Dummy), None, true)),
                0,
            ),
        ],
    );
    let t = f.topology();
    assert_eq!(t.links[&10].master, Some(9));
    let i = pods(&t);
    assert_eq!(i.bridged, vec!["vethab".to_string()]);
    assert!(!i.pods.contains_key(&10) && !i.pods.contains_key(&11));
    let named = Interfaces::classify(&t, &"cali*".parse().unwrap());
    assert_eq!(named.pods.keys().copied().collect::<Vec<_>>(), vec![11]);
}

#[test]
fn dump_framing_and_garbage() {
    let mut done = NetlinkMessage::<M>::new(
        Default::default(),
        netlink_packet_core::NetlinkPayload::Done(Default::default()),
    );
    done.finalize();
    let mut buf = vec![0; done.buffer_len()];
    done.serialize(&mut buf);
    let mut bytes = wire(vec![(
        veth(3, "x"),
        NLM_F_MULTIPART | netlink_packet_core::NLM_F_DUMP_INTR,
    )]);
    bytes.extend(&buf);
    let d = decode::datagram(&bytes).unwrap();
    assert_eq!(d.len(), 2);
    assert!(d[0].interrupted);
    assert_eq!(d[1].event, Some(Event::Done));
    // A message whose length runs past the datagram.
    let mut bad = wire(vec![(veth(3, "x"), 0)]);
    bad[0] = bad[0].wrapping_add(64);
    assert!(decode::datagram(&bad).is_err());
}
