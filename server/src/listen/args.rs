//! The server's flags for everything a client can hold: connections, handshakes, streams and
//! bootstrap requests. Flattened into `moat-server`'s arguments.

use std::time::Duration;

use super::Limits;

#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Connections held at once over the TLS listeners (sync and bootstrap), handshakes
    /// included. Lowered to what the file-descriptor limit leaves after 128 for the rest.
    #[arg(long, env = "MOAT_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Connections held at once from one source address (IPv6: one /64).
    #[arg(long, env = "MOAT_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 64)]
    pub max_connections_per_source: usize,
    /// TLS handshakes in progress at once; when full, a new connection evicts the idlest one.
    #[arg(long, env = "MOAT_MAX_HANDSHAKES", default_value_t = 256)]
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one source address.
    #[arg(long, env = "MOAT_MAX_HANDSHAKES_PER_SOURCE", default_value_t = 8)]
    pub max_handshakes_per_source: usize,
    /// Longest a TLS handshake may take (`500ms`, `10s`, `1m`).
    #[arg(long, env = "MOAT_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub handshake_timeout: Duration,
    /// A connection with no open stream for this long is closed.
    #[arg(long, env = "MOAT_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_timeout)]
    pub idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection (an enforcer needs one).
    #[arg(long, env = "MOAT_MAX_STREAMS_PER_CONNECTION", default_value_t = 16)]
    pub max_streams_per_connection: u32,
    /// A version in flight that the enforcer neither acknowledges nor rejects within this
    /// time closes its stream (it is not reading it, or not applying). Longer than the
    /// slowest apply.
    #[arg(long, env = "MOAT_ACK_TIMEOUT", default_value = "60s", value_parser = parse_timeout)]
    pub ack_timeout: Duration,
    /// Bootstrap requests per second from one source address, after a burst.
    #[arg(long, env = "MOAT_BOOTSTRAP_RATE_PER_SOURCE", default_value_t = 1.0)]
    pub bootstrap_rate_per_source: f64,
    /// Bootstrap requests one source address may make at once before its rate applies.
    #[arg(long, env = "MOAT_BOOTSTRAP_BURST_PER_SOURCE", default_value_t = 10)]
    pub bootstrap_burst_per_source: u32,
    /// TokenReviews in flight at once (all clusters).
    #[arg(long, env = "MOAT_BOOTSTRAP_MAX_IN_FLIGHT", default_value_t = 16)]
    pub bootstrap_max_in_flight: usize,
    /// Longest a bootstrap request waits for a review slot before being told to retry.
    #[arg(long, env = "MOAT_BOOTSTRAP_QUEUE_TIMEOUT", default_value = "5s", value_parser = parse_timeout)]
    pub bootstrap_queue_timeout: Duration,
}

impl LimitArgs {
    pub fn listen(&self) -> Limits {
        Limits {
            max_connections: self.max_connections.max(1),
            max_connections_per_source: self.max_connections_per_source.max(1),
            max_handshakes: self.max_handshakes.max(1),
            max_handshakes_per_source: self.max_handshakes_per_source.max(1),
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            max_streams_per_connection: self.max_streams_per_connection.max(1),
        }
    }

    pub fn bootstrap(&self) -> crate::bootstrap::Limits {
        crate::bootstrap::Limits {
            per_source_rate: self.bootstrap_rate_per_source.max(0.0),
            per_source_burst: self.bootstrap_burst_per_source.max(1),
            max_in_flight: self.bootstrap_max_in_flight.max(1),
            queue_timeout: self.bootstrap_queue_timeout,
        }
    }
}

/// `250ms`, `10s`, `2m`, `1h`; at least 1 ms.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a number and a unit (ms, s, m, h)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(d)
}

/// Raises this process's soft descriptor limit to its hard limit (as a server should: the
/// soft default of 1024 is for interactive programs) and returns the limit in force.
pub fn descriptor_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        // Refused where the hard limit is unlimited but the kernel's is not: keep the soft one.
        let _ = setrlimit(Resource::Nofile, l);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_with_units() {
        assert_eq!(parse_timeout("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_timeout("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_timeout("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_timeout("10").is_err());
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("s").is_err());
    }

    #[test]
    fn the_connection_cap_fits_the_descriptor_limit() {
        let l = Limits::default();
        let (fit, lowered) = l.clone().fit_descriptors(1_048_576);
        assert_eq!((fit.max_connections, lowered), (10_000, None));
        let (fit, lowered) = l.clone().fit_descriptors(1024);
        assert_eq!((fit.max_connections, lowered), (896, Some(10_000)));
        // A tiny limit still leaves half of it for connections.
        let (fit, _) = l.fit_descriptors(100);
        assert_eq!(fit.max_connections, 50);
    }
}
