//! Who may hold a connection: process-wide counts of connections and TLS handshakes, overall
//! and per source, and which handshake gives way when the table is full.
//!
//! Policy: a source over its share is refused at once (its own flood never costs another
//! source anything). When the whole table is full, the newcomer is admitted and the weakest
//! handshake in progress is evicted instead — one that has sent no byte yet, the oldest
//! first — so idle connections can never lock out an enforcer that is actually talking.
//! Authenticated connections are never evicted for newcomers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use super::Limits;

/// Where a connection comes from, for per-source limits: the IPv4 address, or the IPv6 /64
/// (one host gets a whole /64, so a per-address limit would mean nothing there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceKey(u128);

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey(u128::from(u32::from(v4))),
                None => SourceKey((u128::from(v6) >> 64 << 64) | (1 << 32)),
            },
        }
    }
}

/// Why a connection was not admitted (the `refused` metric's reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The source holds its share of connections.
    SourceConnections,
    /// The source has its share of handshakes in progress.
    SourceHandshakes,
    /// Every connection slot is authenticated: nothing to evict.
    Connections,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::SourceConnections => "source-connections",
            Refusal::SourceHandshakes => "source-handshakes",
            Refusal::Connections => "connections",
        }
    }
}

#[derive(Default)]
struct PerSource {
    connections: usize,
    handshakes: usize,
}

struct Handshake {
    source: SourceKey,
    started: Instant,
    progressed: Arc<AtomicBool>,
    evict: oneshot::Sender<()>,
}

#[derive(Default)]
struct State {
    connections: usize,
    /// Connections evicted but not yet closed by their task: no longer counted as held.
    evicting: usize,
    next_id: u64,
    handshakes: HashMap<u64, Handshake>,
    sources: HashMap<SourceKey, PerSource>,
}

pub struct Admission {
    limits: Limits,
    state: Mutex<State>,
}

/// A connection's place in the table; released on drop.
pub struct Ticket {
    admission: Arc<Admission>,
    source: SourceKey,
    id: u64,
    established: bool,
    /// Set by the connection on its first byte received.
    pub progressed: Arc<AtomicBool>,
    /// Fires if the handshake is evicted.
    pub evicted: oneshot::Receiver<()>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Admits a new connection from `peer` as a handshake in progress, evicting the weakest
    /// handshake if the table is full. Returns how many it evicted, for the caller to count.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<(Ticket, usize), Refusal> {
        let source = SourceKey::of(peer.ip());
        let l = &self.limits;
        let mut st = self.state.lock().expect("admission lock");
        let mine = st.sources.get(&source);
        if mine.is_some_and(|s| s.connections >= l.max_connections_per_source) {
            return Err(Refusal::SourceConnections);
        }
        if mine.is_some_and(|s| s.handshakes >= l.max_handshakes_per_source) {
            return Err(Refusal::SourceHandshakes);
        }
        let mut evicted = 0;
        while st.handshakes.len() >= l.max_handshakes
            || st.connections - st.evicting >= l.max_connections
        {
            if !evict_weakest(&mut st) {
                return Err(Refusal::Connections);
            }
            evicted += 1;
        }
        st.connections += 1;
        let s = st.sources.entry(source).or_default();
        s.connections += 1;
        s.handshakes += 1;
        let id = st.next_id;
        st.next_id += 1;
        let (tx, rx) = oneshot::channel();
        let progressed = Arc::new(AtomicBool::new(false));
        st.handshakes.insert(
            id,
            Handshake {
                source,
                started: Instant::now(),
                progressed: progressed.clone(),
                evict: tx,
            },
        );
        Ok((
            Ticket {
                admission: self.clone(),
                source,
                id,
                established: false,
                progressed,
                evicted: rx,
            },
            evicted,
        ))
    }

    /// Out of file descriptors: evicts the weakest handshake, if there is one, so the
    /// listener can accept again.
    pub fn evict_for_fd(&self) -> bool {
        evict_weakest(&mut self.state.lock().expect("admission lock"))
    }

    /// (connections, handshakes in progress) now.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.state.lock().expect("admission lock");
        (st.connections, st.handshakes.len())
    }
}

/// Removes the handshake that has made the least progress (no byte yet before some, then the
/// oldest) and tells its connection to go. Its connection slot is released when that
/// connection's task drops its ticket.
fn evict_weakest(st: &mut State) -> bool {
    let Some(id) = st
        .handshakes
        .iter()
        .min_by_key(|(_, h)| (h.progressed.load(Ordering::Relaxed), h.started))
        .map(|(id, _)| *id)
    else {
        return false;
    };
    let h = st.handshakes.remove(&id).expect("present");
    st.evicting += 1;
    if let Some(s) = st.sources.get_mut(&h.source) {
        s.handshakes -= 1;
    }
    let _ = h.evict.send(());
    true
}

impl Ticket {
    /// The handshake completed: the connection stays, and stops counting as a handshake.
    /// Returns false if it was evicted meanwhile (the connection must go).
    pub fn established(&mut self) -> bool {
        let mut st = self.admission.state.lock().expect("admission lock");
        if st.handshakes.remove(&self.id).is_none() {
            return false;
        }
        if let Some(s) = st.sources.get_mut(&self.source) {
            s.handshakes -= 1;
        }
        self.established = true;
        true
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.admission.state.lock().expect("admission lock");
        let handshaking = st.handshakes.remove(&self.id).is_some();
        if !handshaking && !self.established {
            st.evicting -= 1;
        }
        st.connections -= 1;
        if let Some(s) = st.sources.get_mut(&self.source) {
            s.connections -= 1;
            if handshaking {
                s.handshakes -= 1;
            }
            if s.connections == 0 {
                st.sources.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> Limits {
        Limits {
            max_connections: 4,
            max_connections_per_source: 3,
            max_handshakes: 3,
            max_handshakes_per_source: 2,
            ..Limits::default()
        }
    }

    fn peer(last: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], 5000))
    }

    #[test]
    fn a_source_over_its_share_is_refused_others_are_not() {
        let a = Admission::new(limits());
        let (mut t1, _) = a.admit(peer(2)).unwrap();
        let (_t2, _) = a.admit(peer(2)).unwrap();
        assert_eq!(a.admit(peer(2)).err(), Some(Refusal::SourceHandshakes));
        assert!(t1.established());
        let (_t3, _) = a.admit(peer(2)).unwrap();
        assert_eq!(a.admit(peer(2)).err(), Some(Refusal::SourceConnections));
        // Another source is unaffected.
        assert!(a.admit(peer(3)).is_ok());
    }

    #[test]
    fn a_full_table_evicts_the_idle_handshake_first_then_the_oldest() {
        let a = Admission::new(Limits {
            max_connections_per_source: 10,
            max_handshakes_per_source: 10,
            ..limits()
        });
        let (mut old_idle, _) = a.admit(peer(2)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let (mut talking, _) = a.admit(peer(3)).unwrap();
        talking.progressed.store(true, Ordering::Relaxed);
        let (mut young_idle, _) = a.admit(peer(4)).unwrap();
        // Full (3 handshakes): the newcomer evicts the oldest handshake with no byte yet.
        let (_new, evicted) = a.admit(peer(5)).unwrap();
        assert_eq!(evicted, 1);
        assert!(old_idle.evicted.try_recv().is_ok());
        assert!(talking.evicted.try_recv().is_err());
        assert!(young_idle.evicted.try_recv().is_err());
        drop(old_idle);
        let (_n2, _) = a.admit(peer(6)).unwrap();
        assert!(young_idle.evicted.try_recv().is_ok());
        assert!(talking.evicted.try_recv().is_err());
        assert!(!young_idle.established());
        drop((young_idle, talking));
        assert_eq!(a.counts(), (2, 2));
    }

    #[test]
    fn established_connections_are_never_evicted() {
        let a = Admission::new(Limits {
            max_connections_per_source: 10,
            max_handshakes_per_source: 10,
            ..limits()
        });
        let held: Vec<Ticket> = (0..4)
            .map(|i| {
                let (mut t, _) = a.admit(peer(10 + i)).unwrap();
                assert!(t.established());
                t
            })
            .collect();
        assert_eq!(a.admit(peer(20)).err(), Some(Refusal::Connections));
        drop(held);
        assert_eq!(a.counts(), (0, 0));
    }

    #[test]
    fn ipv6_sources_are_their_slash_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            SourceKey::of(ip("2001:db8::1")),
            SourceKey::of(ip("2001:db8::ffff:1"))
        );
        assert_ne!(
            SourceKey::of(ip("2001:db8::1")),
            SourceKey::of(ip("2001:db8:0:1::1"))
        );
        assert_eq!(
            SourceKey::of(ip("::ffff:10.0.0.1")),
            SourceKey::of(ip("10.0.0.1"))
        );
        assert_ne!(SourceKey::of(ip("0.0.0.1")), SourceKey::of(ip("::1")));
    }
}
