//! Who is on the other end of a stream: carried as a URI SAN in the client certificate.
//!
//! * node: `spiffe://moat/cluster/<cluster>/node/<node>`
//! * admin: `spiffe://moat/admin/<name>`

use std::fmt;

const PREFIX: &str = "spiffe://moat/";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    Node { cluster: String, node: String },
    Admin { name: String },
}

impl Identity {
    pub fn node(cluster: &str, node: &str) -> Self {
        Identity::Node {
            cluster: cluster.into(),
            node: node.into(),
        }
    }

    pub fn uri(&self) -> String {
        match self {
            Identity::Node { cluster, node } => format!("{PREFIX}cluster/{cluster}/node/{node}"),
            Identity::Admin { name } => format!("{PREFIX}admin/{name}"),
        }
    }

    /// Whether every name in it is one a certificate can carry (`from_uri` accepts it back).
    pub fn is_valid(&self) -> bool {
        match self {
            Identity::Node { cluster, node } => valid_name(cluster) && valid_name(node),
            Identity::Admin { name } => valid_name(name),
        }
    }

    /// Parses a URI SAN; `None` for anything that isn't exactly a Moat identity.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(PREFIX)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let ok = valid_name;
        match parts.as_slice() {
            ["cluster", c, "node", n] if ok(c) && ok(n) => Some(Identity::node(c, n)),
            ["admin", name] if ok(name) => Some(Identity::Admin {
                name: name.to_string(),
            }),
            _ => None,
        }
    }
}

/// A cluster, node or admin name: a DNS-1123 subdomain, as Kubernetes requires of node
/// names — lowercase letters, digits, '-' and '.', at most 253 bytes, every dot-separated
/// label non-empty and starting and ending with a letter or digit. Names become URI path
/// segments, file names and bpffs directories, so `.`, `..`, `/` and empty never pass.
pub fn valid_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(valid_label)
}

fn valid_label(l: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = l.as_bytes();
    match (b.first(), b.last()) {
        (Some(&f), Some(&e)) => alnum(f) && alnum(e) && b.iter().all(|&c| alnum(c) || c == b'-'),
        _ => false,
    }
}

/// Why [`valid_name`] refuses `s`, for error messages.
pub fn name_error(what: &str, s: &str) -> String {
    format!(
        "{what} {s:?} is not a valid name: lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit, at most 253 characters (a Kubernetes node name)"
    )
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node { cluster, node } => write!(f, "node {cluster}/{node}"),
            Identity::Admin { name } => write!(f, "admin {name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_lookalikes() {
        for id in [
            Identity::node("prod", "node-1.example"),
            Identity::Admin { name: "ops".into() },
        ] {
            assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        }
        for bad in [
            "spiffe://moat/cluster/prod/node/",
            "spiffe://moat/cluster/prod/node/a/b",
            "spiffe://other/cluster/prod/node/a",
            "spiffe://moat/admin/",
            "spiffe://moat/cluster/pr od/node/a",
            "https://moat/cluster/prod/node/a",
            "spiffe://moat/cluster/prod/node/..",
            "spiffe://moat/cluster/prod/node/.",
            "spiffe://moat/cluster/../node/a",
            "spiffe://moat/cluster/prod/node/Node-1",
            "spiffe://moat/admin/..",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_are_dns_subdomains() {
        for ok in ["n1", "node-1.example", "a", "0", "ip-10-0-0-1.ec2.internal"] {
            assert!(valid_name(ok), "{ok}");
        }
        let long = "a".repeat(254);
        for bad in [
            "", ".", "..", "a..b", ".a", "a.", "-a", "a-", "a/b", "../x", "A", "a_b", "a b", "a\0",
            &long,
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name(&"a".repeat(63)));
    }
}
