//! Rule IR ⇄ wire messages.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use moat_policy::ir::delta::{Delta, GroupPatch, VersionRef};
use moat_policy::ir::digest::Digest;
use moat_policy::ir::{
    self, Action, AddrPort, Direction, DirectionRules, Endpoint, EndpointId, Group, GroupId,
    Members, NodeSnapshot, Peers, PortRange, Ports, Rule, RuleId, Tier,
};
use moat_policy::model::{Cidr, Protocol};

use crate::v1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("{0}: address of {1} bytes (want 4 or 16)")]
    Addr(&'static str, usize),
    #[error("{0}: protocol {1} (want 6, 17 or 132)")]
    Protocol(&'static str, u32),
    #[error("{0}: port {1} out of range")]
    Port(&'static str, u32),
    #[error("{0}: range {1}-{2} is empty")]
    Range(&'static str, u32, u32),
    #[error("{0}: invalid prefix")]
    Prefix(&'static str),
    #[error("{0}: unknown enum value {1}")]
    Enum(&'static str, i32),
    #[error("{0}: missing")]
    Missing(&'static str),
    #[error("digest of {0} bytes (want 32)")]
    Digest(usize),
    #[error("rule {0:016x}: ID does not match its content")]
    RuleId(u64),
    #[error("{0} {1:016x} appears twice")]
    Duplicate(&'static str, u64),
    #[error("group {0:016x}: duplicate member")]
    DuplicateMember(u64),
    #[error("group patch {0:016x} mixes address and address-port members")]
    PatchKind(u64),
}

type Result<T, E = ConvertError> = std::result::Result<T, E>;

pub trait ToProto {
    type Proto;
    fn to_proto(&self) -> Self::Proto;
}

pub trait FromProto: Sized {
    type Proto;
    fn from_proto(p: &Self::Proto) -> Result<Self>;
}

// === scalars ===

pub fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

pub fn addr(what: &'static str, b: &[u8]) -> Result<IpAddr> {
    match b.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(b).expect("4 bytes"),
        ))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(b).expect("16 bytes"),
        ))),
        n => Err(ConvertError::Addr(what, n)),
    }
}

fn addrs(what: &'static str, v: &[Vec<u8>]) -> Result<Vec<IpAddr>> {
    v.iter().map(|b| addr(what, b)).collect()
}

fn protocol(what: &'static str, p: u32) -> Result<Protocol> {
    u8::try_from(p)
        .ok()
        .and_then(Protocol::from_number)
        .ok_or(ConvertError::Protocol(what, p))
}

fn port(what: &'static str, p: u32) -> Result<u16> {
    u16::try_from(p).map_err(|_| ConvertError::Port(what, p))
}

pub fn digest(b: &[u8]) -> Result<Digest> {
    <[u8; 32]>::try_from(b)
        .map(Digest)
        .map_err(|_| ConvertError::Digest(b.len()))
}

impl ToProto for VersionRef {
    type Proto = v1::Version;
    fn to_proto(&self) -> v1::Version {
        v1::Version {
            version: self.version,
            digest: self.digest.0.to_vec(),
        }
    }
}

impl FromProto for VersionRef {
    type Proto = v1::Version;
    fn from_proto(p: &v1::Version) -> Result<Self> {
        Ok(VersionRef {
            version: p.version,
            digest: digest(&p.digest)?,
        })
    }
}

// === IR items ===

impl ToProto for Endpoint {
    type Proto = v1::Endpoint;
    fn to_proto(&self) -> v1::Endpoint {
        let dir = |d: &DirectionRules| v1::DirectionRules {
            isolated: d.isolated,
            rules: d.rules.iter().map(|r| r.0).collect(),
        };
        v1::Endpoint {
            id: self.id.0,
            addrs: self.addrs.iter().map(addr_bytes).collect(),
            ingress: Some(dir(&self.ingress)),
            egress: Some(dir(&self.egress)),
            sandbox: self.sandbox,
        }
    }
}

impl FromProto for Endpoint {
    type Proto = v1::Endpoint;
    fn from_proto(p: &v1::Endpoint) -> Result<Self> {
        let dir = |d: &Option<v1::DirectionRules>| {
            let d = d.clone().unwrap_or_default();
            let mut rules: Vec<RuleId> = d.rules.into_iter().map(RuleId).collect();
            rules.sort_unstable();
            rules.dedup();
            DirectionRules {
                isolated: d.isolated,
                rules,
            }
        };
        let mut a = addrs("endpoint address", &p.addrs)?;
        a.sort_unstable();
        a.dedup();
        Ok(Endpoint {
            id: EndpointId(p.id),
            sandbox: p.sandbox,
            addrs: a,
            ingress: dir(&p.ingress),
            egress: dir(&p.egress),
        })
    }
}

impl ToProto for Rule {
    type Proto = v1::Rule;
    fn to_proto(&self) -> v1::Rule {
        let (any_peer, groups) = match &self.peers {
            Peers::Any => (true, Vec::new()),
            Peers::Groups(g) => (false, g.iter().map(|g| g.0).collect()),
        };
        let (ports, ranges) = match &self.ports {
            Ports::Any => (v1::PortsKind::AnyPort, Vec::new()),
            Ports::Ranges(r) => (
                v1::PortsKind::Ranges,
                r.iter()
                    .map(|r| v1::PortRange {
                        protocol: u32::from(r.proto.number()),
                        first: u32::from(r.first),
                        last: u32::from(r.last),
                    })
                    .collect(),
            ),
            Ports::FromGroups => (v1::PortsKind::FromGroups, Vec::new()),
        };
        v1::Rule {
            id: self.id.0,
            direction: match self.direction {
                Direction::Ingress => v1::Direction::Ingress,
                Direction::Egress => v1::Direction::Egress,
            } as i32,
            tier: match self.tier {
                Tier::Admin => v1::Tier::Admin,
                Tier::NetworkPolicy => v1::Tier::NetworkPolicy,
                Tier::Baseline => v1::Tier::Baseline,
            } as i32,
            priority: self.priority,
            action: match self.action {
                Action::Allow => v1::Action::Allow,
                Action::Deny => v1::Action::Deny,
                Action::Pass => v1::Action::Pass,
            } as i32,
            any_peer,
            groups,
            ports: ports as i32,
            ranges,
        }
    }
}

impl FromProto for Rule {
    type Proto = v1::Rule;
    fn from_proto(p: &v1::Rule) -> Result<Self> {
        let direction = match v1::Direction::try_from(p.direction)
            .map_err(|_| ConvertError::Enum("direction", p.direction))?
        {
            v1::Direction::Ingress => Direction::Ingress,
            v1::Direction::Egress => Direction::Egress,
        };
        let tier =
            match v1::Tier::try_from(p.tier).map_err(|_| ConvertError::Enum("tier", p.tier))? {
                v1::Tier::Admin => Tier::Admin,
                v1::Tier::NetworkPolicy => Tier::NetworkPolicy,
                v1::Tier::Baseline => Tier::Baseline,
            };
        let action = match v1::Action::try_from(p.action)
            .map_err(|_| ConvertError::Enum("action", p.action))?
        {
            v1::Action::Allow => Action::Allow,
            v1::Action::Deny => Action::Deny,
            v1::Action::Pass => Action::Pass,
        };
        let peers = if p.any_peer {
            Peers::Any
        } else {
            let mut g: Vec<GroupId> = p.groups.iter().copied().map(GroupId).collect();
            g.sort_unstable();
            g.dedup();
            Peers::Groups(g)
        };
        let ports = match v1::PortsKind::try_from(p.ports)
            .map_err(|_| ConvertError::Enum("ports", p.ports))?
        {
            v1::PortsKind::AnyPort => Ports::Any,
            v1::PortsKind::FromGroups => Ports::FromGroups,
            v1::PortsKind::Ranges => {
                let mut r = Vec::with_capacity(p.ranges.len());
                for x in &p.ranges {
                    let (first, last) = (port("range", x.first)?, port("range", x.last)?);
                    if first > last {
                        return Err(ConvertError::Range("rule port range", x.first, x.last));
                    }
                    r.push(PortRange {
                        proto: protocol("rule port range", x.protocol)?,
                        first,
                        last,
                    });
                }
                Ports::Ranges(r)
            }
        };
        let id = ir::rule_id(direction, tier, p.priority, action, &peers, &ports);
        if id.0 != p.id {
            return Err(ConvertError::RuleId(p.id));
        }
        Ok(Rule {
            id,
            direction,
            tier,
            priority: p.priority,
            action,
            peers,
            ports,
        })
    }
}

fn addr_port_to_proto(m: &AddrPort) -> v1::AddrPort {
    v1::AddrPort {
        addr: addr_bytes(&m.addr),
        protocol: u32::from(m.proto.number()),
        port: u32::from(m.port),
    }
}

fn addr_port(m: &v1::AddrPort) -> Result<AddrPort> {
    Ok(AddrPort {
        addr: addr("group member", &m.addr)?,
        proto: protocol("group member", m.protocol)?,
        port: port("group member", m.port)?,
    })
}

fn cidr_to_proto(c: &Cidr) -> v1::Cidr {
    v1::Cidr {
        addr: addr_bytes(&c.addr()),
        prefix_len: u32::from(c.prefix_len()),
    }
}

fn cidr(c: &Option<v1::Cidr>) -> Result<Cidr> {
    let c = c.as_ref().ok_or(ConvertError::Missing("cidr"))?;
    let a = addr("cidr", &c.addr)?;
    let len = u8::try_from(c.prefix_len).map_err(|_| ConvertError::Prefix("cidr"))?;
    Cidr::new(a, len).map_err(|_| ConvertError::Prefix("cidr"))
}

/// Sorts and checks that no member appears twice (a duplicate would corrupt the digest).
fn sorted_unique<T: Ord>(mut v: Vec<T>, id: u64) -> Result<Vec<T>> {
    v.sort_unstable();
    if v.windows(2).any(|w| w[0] == w[1]) {
        return Err(ConvertError::DuplicateMember(id));
    }
    Ok(v)
}

impl ToProto for Group {
    type Proto = v1::Group;
    fn to_proto(&self) -> v1::Group {
        use v1::group::Members as M;
        let members = match &self.members {
            Members::Addrs(a) => M::Addrs(v1::Addrs {
                addrs: a.iter().map(addr_bytes).collect(),
            }),
            Members::Block { cidr, except } => M::Block(v1::Block {
                cidr: Some(cidr_to_proto(cidr)),
                except: except.iter().map(cidr_to_proto).collect(),
            }),
            Members::AddrPorts(a) => M::AddrPorts(v1::AddrPorts {
                items: a.iter().map(addr_port_to_proto).collect(),
            }),
        };
        v1::Group {
            id: self.id.0,
            members: Some(members),
        }
    }
}

impl FromProto for Group {
    type Proto = v1::Group;
    fn from_proto(p: &v1::Group) -> Result<Self> {
        use v1::group::Members as M;
        let members = match p
            .members
            .as_ref()
            .ok_or(ConvertError::Missing("group members"))?
        {
            M::Addrs(a) => Members::Addrs(sorted_unique(addrs("group member", &a.addrs)?, p.id)?),
            M::Block(b) => {
                let mut except = b
                    .except
                    .iter()
                    .map(|c| cidr(&Some(c.clone())))
                    .collect::<Result<Vec<_>>>()?;
                except.sort_unstable();
                except.dedup();
                Members::Block {
                    cidr: cidr(&b.cidr)?,
                    except,
                }
            }
            M::AddrPorts(a) => Members::AddrPorts(sorted_unique(
                a.items.iter().map(addr_port).collect::<Result<Vec<_>>>()?,
                p.id,
            )?),
        };
        Ok(Group::new(GroupId(p.id), members))
    }
}

// === snapshots and deltas ===

impl ToProto for NodeSnapshot {
    type Proto = v1::NodeContent;
    fn to_proto(&self) -> v1::NodeContent {
        v1::NodeContent {
            node_addrs: self.node_addrs.iter().map(addr_bytes).collect(),
            endpoints: self.endpoints.iter().map(ToProto::to_proto).collect(),
            rules: self.rules.iter().map(|r| r.to_proto()).collect(),
            groups: self.groups.iter().map(|g| g.to_proto()).collect(),
        }
    }
}

/// A full snapshot from the wire. The caller checks the digest (`content_digest`) against
/// the announced one before enforcing anything.
pub fn snapshot_from_proto(
    node: &str,
    version: &VersionRef,
    c: &v1::NodeContent,
) -> Result<NodeSnapshot> {
    let mut endpoints = c
        .endpoints
        .iter()
        .map(Endpoint::from_proto)
        .collect::<Result<Vec<_>>>()?;
    endpoints.sort_by_key(|e| e.id);
    if let Some(w) = endpoints.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(ConvertError::Duplicate("endpoint", w[0].id.0));
    }
    let mut rules = c
        .rules
        .iter()
        .map(|r| Rule::from_proto(r).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    rules.sort_by_key(|r| r.id);
    if let Some(w) = rules.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(ConvertError::Duplicate("rule", w[0].id.0));
    }
    let mut groups = c
        .groups
        .iter()
        .map(|g| Group::from_proto(g).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    groups.sort_by_key(|g| g.id);
    if let Some(w) = groups.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(ConvertError::Duplicate("group", w[0].id.0));
    }
    let mut node_addrs = addrs("node address", &c.node_addrs)?;
    node_addrs.sort_unstable();
    node_addrs.dedup();
    Ok(NodeSnapshot {
        node: node.to_string(),
        version: version.version,
        digest: version.digest,
        node_addrs,
        endpoints,
        rules,
        groups,
    })
}

/// The delta's changes; the caller adds `nonce` and `published_unix_micros`.
pub fn delta_to_proto(d: &Delta) -> v1::Delta {
    v1::Delta {
        nonce: String::new(),
        base: Some(d.base.to_proto()),
        version: Some(d.version.to_proto()),
        published_unix_micros: 0,
        node_addrs_changed: d.node_addrs.is_some(),
        node_addrs: d.node_addrs.iter().flatten().map(addr_bytes).collect(),
        upsert_endpoints: d.upsert_endpoints.iter().map(ToProto::to_proto).collect(),
        remove_endpoints: d.remove_endpoints.iter().map(|e| e.0).collect(),
        add_rules: d.add_rules.iter().map(|r| r.to_proto()).collect(),
        remove_rules: d.remove_rules.iter().map(|r| r.0).collect(),
        upsert_groups: d.upsert_groups.iter().map(|g| g.to_proto()).collect(),
        remove_groups: d.remove_groups.iter().map(|g| g.0).collect(),
        patch_groups: d
            .patch_groups
            .iter()
            .map(|p| match p {
                GroupPatch::Addrs { id, add, remove } => v1::GroupPatch {
                    id: id.0,
                    add_addrs: Some(v1::Addrs {
                        addrs: add.iter().map(addr_bytes).collect(),
                    }),
                    remove_addrs: Some(v1::Addrs {
                        addrs: remove.iter().map(addr_bytes).collect(),
                    }),
                    ..Default::default()
                },
                GroupPatch::AddrPorts { id, add, remove } => v1::GroupPatch {
                    id: id.0,
                    add_addr_ports: Some(v1::AddrPorts {
                        items: add.iter().map(addr_port_to_proto).collect(),
                    }),
                    remove_addr_ports: Some(v1::AddrPorts {
                        items: remove.iter().map(addr_port_to_proto).collect(),
                    }),
                    ..Default::default()
                },
            })
            .collect(),
    }
}

pub fn delta_from_proto(p: &v1::Delta) -> Result<Delta> {
    let base = VersionRef::from_proto(p.base.as_ref().ok_or(ConvertError::Missing("delta base"))?)?;
    let version = VersionRef::from_proto(
        p.version
            .as_ref()
            .ok_or(ConvertError::Missing("delta version"))?,
    )?;
    let mut patch_groups = Vec::new();
    for g in &p.patch_groups {
        let has_addrs = g.add_addrs.is_some() || g.remove_addrs.is_some();
        let has_ports = g.add_addr_ports.is_some() || g.remove_addr_ports.is_some();
        patch_groups.push(match (has_addrs, has_ports) {
            (true, false) => GroupPatch::Addrs {
                id: GroupId(g.id),
                add: sorted_unique(
                    addrs("patch", &g.add_addrs.clone().unwrap_or_default().addrs)?,
                    g.id,
                )?,
                remove: sorted_unique(
                    addrs("patch", &g.remove_addrs.clone().unwrap_or_default().addrs)?,
                    g.id,
                )?,
            },
            (false, true) => {
                let items = |x: &Option<v1::AddrPorts>| -> Result<Vec<AddrPort>> {
                    x.iter()
                        .flat_map(|a| a.items.iter())
                        .map(addr_port)
                        .collect()
                };
                GroupPatch::AddrPorts {
                    id: GroupId(g.id),
                    add: sorted_unique(items(&g.add_addr_ports)?, g.id)?,
                    remove: sorted_unique(items(&g.remove_addr_ports)?, g.id)?,
                }
            }
            _ => return Err(ConvertError::PatchKind(g.id)),
        });
    }
    Ok(Delta {
        base,
        version,
        node_addrs: if p.node_addrs_changed {
            let mut a = addrs("node address", &p.node_addrs)?;
            a.sort_unstable();
            a.dedup();
            Some(a)
        } else {
            None
        },
        upsert_endpoints: p
            .upsert_endpoints
            .iter()
            .map(Endpoint::from_proto)
            .collect::<Result<_>>()?,
        remove_endpoints: p.remove_endpoints.iter().copied().map(EndpointId).collect(),
        add_rules: p
            .add_rules
            .iter()
            .map(|r| Rule::from_proto(r).map(Arc::new))
            .collect::<Result<_>>()?,
        remove_rules: p.remove_rules.iter().copied().map(RuleId).collect(),
        upsert_groups: p
            .upsert_groups
            .iter()
            .map(|g| Group::from_proto(g).map(Arc::new))
            .collect::<Result<_>>()?,
        remove_groups: p.remove_groups.iter().copied().map(GroupId).collect(),
        patch_groups,
    })
}

#[cfg(test)]
mod tests;
