//! rtnetlink datagrams → the few facts the topology needs.
//!
//! Only the attributes used here are read, each on its own: an attribute this code does not
//! know (a newer kernel's) can't make a link, an address or a route disappear from view.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    NLM_F_DUMP_INTR, NLM_F_REPLACE, NLMSG_DONE, NLMSG_ERROR, NLMSG_OVERRUN, NetlinkBuffer,
    NlaBuffer, NlasIterator,
};
use netlink_packet_route::address::AddressMessageBuffer;
use netlink_packet_route::link::LinkMessageBuffer;
use netlink_packet_route::route::RouteMessageBuffer;

#[derive(Debug, thiserror::Error)]
#[error("malformed netlink message: {0}")]
pub struct Malformed(pub String);

/// What one route occupies: the kernel tells routes of one destination apart by these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub dst: IpAddr,
    pub tos: u8,
    pub priority: u32,
}

/// Where a host route sends its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// Unicast, straight out of this interface (no gateway): how a CNI routes a pod.
    Direct(u32),
    /// Anything else (a gateway, several next hops, blackhole, …), through this interface if
    /// it names one. Kept because it can win over a direct route of the same destination.
    Other(Option<u32>),
}

impl Target {
    pub fn oif(&self) -> Option<u32> {
        match self {
            Target::Direct(i) => Some(*i),
            Target::Other(i) => *i,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Link {
        index: u32,
        name: String,
        kind: String,
        master: Option<u32>,
        up: bool,
    },
    LinkGone(u32),
    Addr {
        index: u32,
        addr: IpAddr,
        /// Scope universe and not link-local.
        global: bool,
        gone: bool,
    },
    /// A main-table IPv4 /32 or IPv6 /128 route.
    Route {
        key: RouteKey,
        target: Target,
        gone: bool,
        /// `NLM_F_REPLACE`: it replaced whatever held its key.
        replace: bool,
    },
    /// The end of a dump.
    Done,
    /// `NLMSG_ERROR` (0 is an acknowledgement).
    Error(i32),
    /// The kernel dropped messages.
    Overrun,
}

/// One decoded message: its event (`None`: nothing the topology follows) and whether the dump
/// it belongs to was interrupted by a change (`NLM_F_DUMP_INTR`: start the dump again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub seq: u32,
    pub interrupted: bool,
    pub event: Option<Event>,
}

const AF_UNSPEC: u8 = libc::AF_UNSPEC as u8;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const IFLA_INFO_KIND: u16 = 1;
const RTA_VIA: u16 = 18;
const RTA_ENCAP: u16 = 22;
const RTA_NH_ID: u16 = 30;

/// Every message of one datagram.
pub fn datagram(mut bytes: &[u8]) -> Result<Vec<Decoded>, Malformed> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let buf = NetlinkBuffer::new_checked(bytes).map_err(|e| Malformed(e.to_string()))?;
        let len = buf.length() as usize;
        let flags = buf.flags();
        let payload = buf.payload();
        let event = message(buf.message_type(), flags, payload)?;
        out.push(Decoded {
            seq: buf.sequence_number(),
            interrupted: flags & NLM_F_DUMP_INTR != 0,
            event,
        });
        // Messages are 4-byte aligned; the last one may end without padding.
        let next = len.next_multiple_of(4).min(bytes.len());
        if next == 0 {
            return Err(Malformed("zero-length message".into()));
        }
        bytes = &bytes[next..];
    }
    Ok(out)
}

fn message(kind: u16, flags: u16, p: &[u8]) -> Result<Option<Event>, Malformed> {
    Ok(match kind {
        NLMSG_DONE => Some(Event::Done),
        NLMSG_OVERRUN => Some(Event::Overrun),
        NLMSG_ERROR => {
            let code = p
                .get(..4)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| Malformed("short error message".into()))?;
            Some(Event::Error(code))
        }
        libc::RTM_NEWLINK | libc::RTM_DELLINK => link(kind == libc::RTM_DELLINK, p)?,
        libc::RTM_NEWADDR | libc::RTM_DELADDR => addr(kind == libc::RTM_DELADDR, p)?,
        libc::RTM_NEWROUTE | libc::RTM_DELROUTE => {
            route(kind == libc::RTM_DELROUTE, flags & NLM_F_REPLACE != 0, p)?
        }
        _ => None,
    })
}

fn attrs(p: &[u8]) -> impl Iterator<Item = Result<NlaBuffer<&[u8]>, Malformed>> {
    NlasIterator::new(p).map(|r| r.map_err(|e| Malformed(e.to_string())))
}

fn u32_of(v: &[u8]) -> Result<u32, Malformed> {
    v.get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| Malformed("short u32 attribute".into()))
}

fn string_of(v: &[u8]) -> String {
    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

fn ip_of(family: u8, v: &[u8]) -> Result<IpAddr, Malformed> {
    match (family, v.len()) {
        (AF_INET, 4) => Ok(IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))),
        (AF_INET6, 16) => {
            let mut b = [0u8; 16];
            b.copy_from_slice(v);
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => Err(Malformed(format!(
            "address of {} bytes in family {family}",
            v.len()
        ))),
    }
}

fn link(gone: bool, p: &[u8]) -> Result<Option<Event>, Malformed> {
    let buf = LinkMessageBuffer::new_checked(p).map_err(|e| Malformed(e.to_string()))?;
    // The bridge sends its ports' state as AF_BRIDGE link messages, a port leaving the bridge
    // as an AF_BRIDGE RTM_DELLINK: the interface itself is still there.
    if buf.interface_family() != AF_UNSPEC {
        return Ok(None);
    }
    let index = buf.link_index();
    if gone {
        return Ok(Some(Event::LinkGone(index)));
    }
    let (mut name, mut kind, mut master) = (String::new(), String::new(), None);
    for a in attrs(buf.payload()) {
        let a = a?;
        match a.kind() {
            libc::IFLA_IFNAME => name = string_of(a.value()),
            libc::IFLA_MASTER => master = Some(u32_of(a.value())?).filter(|m| *m != 0),
            libc::IFLA_LINKINFO => {
                for i in attrs(a.value()) {
                    let i = i?;
                    if i.kind() == IFLA_INFO_KIND {
                        kind = string_of(i.value());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Some(Event::Link {
        index,
        name,
        kind,
        master,
        up: buf.flags() & libc::IFF_UP as u32 != 0,
    }))
}

/// Link-local addresses are not how a node is reached: a pod's host-side veth may hold one
/// (169.254.1.1 as the pods' gateway, fe80::/64 always) and still be a pod's.
fn link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

fn addr(gone: bool, p: &[u8]) -> Result<Option<Event>, Malformed> {
    let buf = AddressMessageBuffer::new_checked(p).map_err(|e| Malformed(e.to_string()))?;
    let family = buf.family();
    if family != AF_INET && family != AF_INET6 {
        return Ok(None);
    }
    let (mut local, mut address) = (None, None);
    for a in attrs(buf.payload()) {
        let a = a?;
        match a.kind() {
            libc::IFA_LOCAL => local = Some(ip_of(family, a.value())?),
            libc::IFA_ADDRESS => address = Some(ip_of(family, a.value())?),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
    // point-to-point IPv4 link (and the address itself otherwise).
    let Some(addr) = local.or(address) else {
        return Ok(None);
    };
    Ok(Some(Event::Addr {
        index: buf.index(),
        addr,
        global: buf.scope() == libc::RT_SCOPE_UNIVERSE && !link_local(&addr),
        gone,
    }))
}

fn route(gone: bool, replace: bool, p: &[u8]) -> Result<Option<Event>, Malformed> {
    let buf = RouteMessageBuffer::new_checked(p).map_err(|e| Malformed(e.to_string()))?;
    let family = buf.address_family();
    let host_len = match family {
        AF_INET => 32,
        AF_INET6 => 128,
        _ => return Ok(None),
    };
    // IPv6 route cache entries are not routes anyone installed.
    if buf.destination_prefix_length() != host_len || buf.flags() & libc::RTM_F_CLONED != 0 {
        return Ok(None);
    }
    let mut table = u32::from(buf.table());
    let (mut dst, mut oif, mut priority, mut hops) = (None, None, 0, false);
    for a in attrs(buf.payload()) {
        let a = a?;
        match a.kind() {
            libc::RTA_TABLE => table = u32_of(a.value())?,
            libc::RTA_DST => dst = Some(ip_of(family, a.value())?),
            libc::RTA_OIF => oif = Some(u32_of(a.value())?),
            libc::RTA_PRIORITY => priority = u32_of(a.value())?,
            // Gateways, next-hop objects, several next hops, tunnel encapsulation: not
            // a pod's plain route.
            libc::RTA_GATEWAY | libc::RTA_MULTIPATH | RTA_VIA | RTA_ENCAP | RTA_NH_ID => {
                hops = true
            }
            _ => {}
        }
    }
    if table != u32::from(libc::RT_TABLE_MAIN) {
        return Ok(None);
    }
    let Some(dst) = dst else {
        return Err(Malformed(format!(
            "/{host_len} route without a destination"
        )));
    };
    let target = match oif {
        Some(i) if buf.kind() == libc::RTN_UNICAST && !hops => Target::Direct(i),
        _ => Target::Other(oif),
    };
    Ok(Some(Event::Route {
        key: RouteKey {
            dst,
            tos: buf.tos(),
            priority,
        },
        target,
        gone,
        replace,
    }))
}
