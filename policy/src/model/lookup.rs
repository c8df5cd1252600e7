//! Naming flow endpoints the way people do: `namespace/pod`, `node:NAME`, or an address.

use std::net::IpAddr;

use super::Object;

/// Addresses of `ns/pod`, `node:NAME` or a literal address, looked up in `objects`.
pub fn addresses(objects: &[Object], who: &str) -> Result<Vec<IpAddr>, String> {
    if let Ok(ip) = who.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    if let Some(node) = who.strip_prefix("node:") {
        for o in objects {
            if let Object::Node(n) = o
                && n.name == node
            {
                if n.addrs.is_empty() {
                    return Err(format!(
                        "node {node} has no InternalIP or ExternalIP address"
                    ));
                }
                return Ok(n.addrs.clone());
            }
        }
        return Err(format!("no node {node:?}"));
    }
    let (ns, name) = who
        .split_once('/')
        .ok_or_else(|| format!("{who:?}: expected namespace/pod, node:NAME or an IP address"))?;
    for o in objects {
        if let Object::Pod(p) = o
            && p.namespace == ns
            && p.name == name
        {
            if p.ips.is_empty() {
                return Err(format!("pod {who} has no IP address (status.podIPs)"));
            }
            return Ok(p.ips.clone());
        }
    }
    Err(format!("no pod {who:?}"))
}

/// One address of each end in a common family: `v6` picks the family, else IPv4 first.
pub fn pick(src: &[IpAddr], dst: &[IpAddr], v6: Option<bool>) -> Option<(IpAddr, IpAddr)> {
    let families = match v6 {
        Some(f) => vec![f],
        None => vec![false, true],
    };
    families.into_iter().find_map(|f| {
        let s = src.iter().find(|a| a.is_ipv6() == f)?;
        let d = dst.iter().find(|a| a.is_ipv6() == f)?;
        Some((*s, *d))
    })
}
