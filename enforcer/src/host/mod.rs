//! The node's interfaces and host routes, followed over rtnetlink in the node's network
//! namespace and published as a [`Topology`].
//!
//! ```text
//!  subscribe (links, IPv4/IPv6 addresses and routes) ─► dump all ─► publish
//!    loop: events ─► Facts ─► (burst drained) ─► publish if changed
//!          overrun (ENOBUFS), a silent kernel flush, a removal never seen ─► dump all again
//! ```
//!
//! Events are read on their own socket, subscribed before the dump starts, so nothing that
//! happens during a dump is missed: replayed on top of it they converge on the same state
//! (each event carries its object's whole state). The thread publishes once per burst of
//! events, so a pod created with its routes is usually one change.

mod decode;
mod facts;
mod socket;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moat_dataplane::local::Topology;
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use decode::Malformed;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink: {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("netlink: {0}")]
    Kernel(String),
}

/// Follows the node's topology on a thread of its own until dropped.
pub struct Watcher {
    rx: watch::Receiver<Topology>,
    stop: Arc<AtomicBool>,
}

impl Watcher {
    /// Subscribes, dumps the node's links, addresses and routes (so the first value is
    /// complete), and starts following changes. Blocks for the dump.
    pub fn start() -> Result<Watcher, Error> {
        let mut w = socket::Follower::open()?;
        let t = Instant::now();
        w.resync()?;
        let first = w.facts.topology();
        info!(
            links = first.links.len(),
            host_routes = first.routes.len(),
            micros = t.elapsed().as_micros() as u64,
            "node topology dumped"
        );
        let (tx, rx) = watch::channel(first);
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let span = tracing::info_span!("topology");
        std::thread::Builder::new()
            .name("moat-topology".into())
            .spawn(move || span.in_scope(|| follow(w, tx, s2)))
            .map_err(|source| Error::Io {
                what: "starting the topology thread",
                source,
            })?;
        Ok(Watcher { rx, stop })
    }

    pub fn subscribe(&self) -> watch::Receiver<Topology> {
        self.rx.clone()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn follow(mut w: socket::Follower, tx: watch::Sender<Topology>, stop: Arc<AtomicBool>) {
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        match w.next_burst() {
            Ok(n) if n > 0 => debug!(messages = n, "topology events"),
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "reading topology events failed; dumping everything again");
                w.need_resync = true;
            }
        }
        if w.need_resync {
            let t = Instant::now();
            match w.resync() {
                Ok(()) => {
                    if failing {
                        info!("topology dump works again");
                    }
                    failing = false;
                    debug!(
                        micros = t.elapsed().as_micros() as u64,
                        "topology re-dumped"
                    );
                }
                Err(e) => {
                    // The last topology stays published: new interfaces it doesn't know are
                    // unclassified for the dataplane, which drops their traffic.
                    if !failing {
                        warn!(error = %e, "dumping the node's topology failed; retrying");
                    }
                    failing = true;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        let new = w.facts.topology();
        tx.send_if_modified(|t| {
            if *t == new {
                return false;
            }
            *t = new;
            true
        });
    }
}
