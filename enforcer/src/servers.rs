//! Where the policy servers are. Every `--server` URL's host is resolved afresh on each
//! connection attempt (a headless Service's name gives every ready replica), the addresses
//! are shuffled so a fleet spreads over the replicas, and an address whose stream just ended
//! goes last for a while, so the enforcer moves to another replica instead of back to the
//! one that failed or drained it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;

/// One `--server` URL.
#[derive(Clone, Debug)]
struct Target {
    scheme: String,
    host: String,
    port: u16,
}

/// One address to try, and the name its certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub addr: SocketAddr,
    /// The URL's host (a DNS name or an IP literal).
    pub host: String,
    /// The URL to connect to: the address itself, so the attempt goes exactly there.
    pub url: String,
}

impl Candidate {
    /// Whether the URL's host was a name (the TLS server name then is that name).
    pub fn named(&self) -> bool {
        self.host.parse::<IpAddr>().is_err()
    }
}

/// The longest wait for a server name to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Servers {
    targets: Vec<Target>,
    avoid: HashMap<SocketAddr, Instant>,
}

impl Servers {
    pub fn parse(urls: &[String]) -> Result<Servers, String> {
        let mut targets = Vec::new();
        for u in urls {
            let uri: http::Uri = u.parse().map_err(|e| format!("--server {u:?}: {e}"))?;
            let scheme = uri.scheme_str().unwrap_or("https").to_string();
            let host = uri
                .host()
                .ok_or_else(|| format!("--server {u:?}: no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri
                .port_u16()
                .unwrap_or(if scheme == "http" { 80 } else { 443 });
            targets.push(Target { scheme, host, port });
        }
        if targets.is_empty() {
            return Err("no --server given".into());
        }
        Ok(Servers {
            targets,
            avoid: HashMap::new(),
        })
    }

    /// The URLs as given, for messages.
    pub fn describe(&self) -> String {
        self.targets
            .iter()
            .map(|t| format!("{}://{}:{}", t.scheme, t.host, t.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every address of every URL, shuffled, the ones to avoid last (soonest free first).
    pub async fn candidates(&mut self) -> Vec<Candidate> {
        let mut out = Vec::new();
        for t in &self.targets {
            let addrs: Vec<SocketAddr> = match t.host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, t.port)],
                // Bounded: DNS may not answer a node that is not enforcing its snapshot yet,
                // and the other URLs must not wait for it.
                Err(_) => match tokio::time::timeout(
                    RESOLVE_TIMEOUT,
                    tokio::net::lookup_host((t.host.as_str(), t.port)),
                )
                .await
                {
                    Ok(Ok(a)) => a.collect(),
                    Ok(Err(e)) => {
                        tracing::debug!(host = %t.host, error = %e, "server name does not resolve");
                        Vec::new()
                    }
                    Err(_) => {
                        tracing::debug!(host = %t.host, "server name did not resolve in time");
                        Vec::new()
                    }
                },
            };
            for addr in addrs {
                let url = format!("{}://{addr}", t.scheme);
                let c = Candidate {
                    addr,
                    host: t.host.clone(),
                    url,
                };
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        out.shuffle(&mut rand::rng());
        let now = Instant::now();
        self.avoid.retain(|_, until| *until > now);
        // Stable: the shuffle stays among the addresses not avoided.
        out.sort_by_key(|c| self.avoid.get(&c.addr).copied());
        out
    }

    /// Puts `addr` last for `d`.
    pub fn avoid(&mut self, addr: SocketAddr, d: Duration) {
        self.avoid.insert(addr, Instant::now() + d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_url_and_address_is_a_candidate_and_avoided_ones_come_last() {
        let mut s = Servers::parse(&[
            "https://127.0.0.1:7443".into(),
            "https://[::1]:7453".into(),
            "https://127.0.0.2:7463".into(),
        ])
        .unwrap();
        let all = s.candidates().await;
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|c| !c.named()));
        assert!(all.iter().any(|c| c.url == "https://[::1]:7453"));
        let first = all[0].addr;
        s.avoid(first, Duration::from_secs(60));
        for _ in 0..20 {
            assert_eq!(s.candidates().await.last().unwrap().addr, first);
        }
        // The other two come first in both orders over enough draws: a fleet spreads.
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            firsts.insert(s.candidates().await[0].addr);
        }
        assert_eq!(firsts.len(), 2);
    }

    #[tokio::test]
    async fn names_resolve_on_every_attempt() {
        let mut s = Servers::parse(&["https://localhost:7443".into()]).unwrap();
        let c = s.candidates().await;
        assert!(!c.is_empty() && c.iter().all(|c| c.named() && c.addr.port() == 7443));
        assert!(Servers::parse(&[]).is_err());
        assert!(Servers::parse(&["https://".into()]).is_err());
    }
}
