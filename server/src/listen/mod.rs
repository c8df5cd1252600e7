//! The TLS listeners' connection layer: accept, admit, handshake, serve HTTP/2, close.
//!
//! Everything a client can hold without credentials is bounded here: connections and TLS
//! handshakes (overall and per source, see [`admit`]), how long a handshake may take, how
//! long a connection may sit without a stream, and how many streams one connection may open.
//! Refusals are counted by reason and logged a few times per [`LOG_EVERY`] per reason; accept
//! errors back off instead of spinning, and out of descriptors an idle handshake is evicted. Connections are served by hyper directly (not
//! through tonic's server), so each one carries [`ConnInfo`] and can be closed when idle.

mod admit;
mod args;
mod conn;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::Routes;
use tracing::{info, warn};

pub use admit::{Admission, Refusal, SourceKey};
pub use args::{LimitArgs, descriptor_limit, parse_timeout};

use crate::metrics::Metrics;
use crate::throttle::LogEvery;
use crate::tls::Reloading;

/// Refusals and accept errors of one kind are logged at most [`LOG_LINES`] times per
/// `LOG_EVERY`; each line counts the ones it stands for.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
pub const LOG_LINES: u32 = 5;

/// Caps on what clients may hold (the server's `--max-*`, `--*-timeout` flags).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections at once, handshakes included (lowered to fit the descriptor limit).
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    /// TLS handshakes in progress at once.
    pub max_handshakes: usize,
    pub max_handshakes_per_source: usize,
    pub handshake_timeout: Duration,
    /// A connection with no open stream for this long is closed.
    pub idle_timeout: Duration,
    pub max_streams_per_connection: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_connections_per_source: 64,
            max_handshakes: 256,
            max_handshakes_per_source: 8,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_streams_per_connection: 16,
        }
    }
}

/// File descriptors kept out of the connection budget, for everything else the server opens
/// (its store, the Kubernetes clients, the health and metrics listeners and their probes).
pub const FD_RESERVE: usize = 128;

impl Limits {
    /// The connection cap that fits a descriptor limit of `nofile`: the flag, or what the
    /// limit leaves after [`FD_RESERVE`] (at least half the limit). Reaching the descriptor
    /// limit would also stop the health listener accepting kubelet's probes.
    pub fn fit_descriptors(mut self, nofile: u64) -> (Limits, Option<usize>) {
        let n = usize::try_from(nofile).unwrap_or(usize::MAX);
        let budget = n.saturating_sub(FD_RESERVE).max(n / 2).max(1);
        if self.max_connections > budget {
            let asked = self.max_connections;
            self.max_connections = budget;
            return (self, Some(asked));
        }
        (self, None)
    }
}

/// HTTP/2 settings of a connection. The defaults keep an idle stream's buffers small: an
/// enforcer only ever sends a Hello and small acknowledgements, and the server's own sends
/// are paced by the enforcer's window, not this one.
#[derive(Clone, Debug)]
pub struct Http2 {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_send_buf_size: usize,
    pub header_table_size: u32,
    pub max_header_list_size: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for Http2 {
    fn default() -> Self {
        Http2 {
            stream_window: 64 * 1024,
            connection_window: 256 * 1024,
            max_frame_size: 16 * 1024,
            max_send_buf_size: 64 * 1024,
            header_table_size: 4096,
            max_header_list_size: 16 * 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

impl Http2 {
    /// What tonic's server used before this layer (hyper's defaults: 1 MiB windows, a
    /// 400 KiB send buffer): the baseline of the memory benchmark.
    pub fn hyper_defaults() -> Http2 {
        Http2 {
            stream_window: 1024 * 1024,
            connection_window: 1024 * 1024,
            max_send_buf_size: 400 * 1024,
            ..Http2::default()
        }
    }
}

/// What a service learns about the connection a request came on (a request extension).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The verified client certificate chain, leaf first (none on server-only TLS).
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// One TLS listener's configuration.
pub struct Listener {
    pub tls: Arc<Reloading>,
    pub routes: Routes,
    pub admission: Arc<Admission>,
    pub http2: Http2,
    pub metrics: Arc<Metrics>,
    /// What to call it in logs (`sync`, `bootstrap`).
    pub name: &'static str,
}

/// Accepts and serves connections until `shutdown` turns true, then asks every connection
/// to finish (streams see the same signal) and returns.
pub async fn serve(l: TcpListener, cfg: Listener, mut shutdown: watch::Receiver<bool>) {
    let cfg = Arc::new(cfg);
    let refusals = Arc::new(LogEvery::new(LOG_EVERY, LOG_LINES));
    let accept_errors = LogEvery::new(LOG_EVERY, LOG_LINES);
    let mut backoff = Duration::ZERO;
    info!(listener = cfg.name, limits = ?cfg.admission.limits(), "accepting TLS connections");
    loop {
        let accepted = tokio::select! {
            a = l.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => {
                backoff = Duration::ZERO;
                c
            }
            Err(e) => {
                cfg.metrics.accept_errors.inc();
                if transient(&e) {
                    continue;
                }
                // Out of descriptors: an idle handshake gives its descriptor to the queue.
                let freed = out_of_descriptors(&e) && cfg.admission.evict_for_fd();
                if freed {
                    cfg.metrics.refused("handshake-evicted");
                }
                if let Some(n) = accept_errors.tick("accept") {
                    warn!(listener = cfg.name, error = %e, errors = n, freed, "accept failing; backing off");
                }
                backoff = if freed {
                    Duration::from_millis(1)
                } else {
                    (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1))
                };
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => break,
                }
                continue;
            }
        };
        match cfg.admission.admit(peer) {
            Ok((ticket, evicted)) => {
                for _ in 0..evicted {
                    cfg.metrics.refused("handshake-evicted");
                }
                if evicted > 0
                    && let Some(n) = refusals.tick("handshake-evicted")
                {
                    warn!(
                        listener = cfg.name,
                        evicted = n,
                        "handshake table full: evicted the idlest handshakes for new connections"
                    );
                }
                let _ = tcp.set_nodelay(true);
                tokio::spawn(conn::serve(
                    tcp,
                    peer,
                    ticket,
                    cfg.clone(),
                    refusals.clone(),
                    shutdown.clone(),
                ));
            }
            Err(r) => {
                cfg.metrics.refused(r.reason());
                if let Some(n) = refusals.tick(r.reason()) {
                    let (conns, handshakes) = cfg.admission.counts();
                    warn!(listener = cfg.name, %peer, reason = r.reason(), refused = n, conns, handshakes, "refused connections");
                }
                drop(tcp);
            }
        }
    }
    // Streams end on the same signal; give their last messages a moment to leave.
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while cfg.admission.counts().0 > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Errors about one connection that died in the queue: accept the next at once.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

fn out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE (24), ENFILE (23): Linux numbers, as std reports them in raw_os_error.
    matches!(e.raw_os_error(), Some(23 | 24))
}
