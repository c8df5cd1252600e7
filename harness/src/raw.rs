//! Probing over raw IP sockets, for protocols the pod has no socket API for (SCTP: no kernel
//! stack here) or that have no ports (ICMP). One receive thread per family hands each
//! answer to the probe waiting for it, and can answer requests itself (an SCTP "server").

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

/// What to do with a received packet (IP header already stripped).
pub enum Action {
    /// Send this payload back to the sender.
    Reply(Vec<u8>),
    /// It answers the probe with this key.
    Wake(u64),
    Ignore,
}

type Classify = dyn Fn(&[u8], bool) -> Action + Send + Sync;

pub struct Raw {
    v4: std::net::UdpSocket,
    v6: std::net::UdpSocket,
    waiters: Mutex<HashMap<(IpAddr, u64), oneshot::Sender<()>>>,
}

/// A raw socket. std's datagram socket API works on any datagram-like fd, so raw sockets
/// are driven through it (the port of a raw socket address is ignored or must be 0).
fn raw(domain: Domain, proto: i32) -> std::io::Result<std::net::UdpSocket> {
    Ok(Socket::new(domain, Type::RAW, Some(Protocol::from(proto)))?.into())
}

impl Raw {
    /// Opens raw sockets for `proto_v4`/`proto_v6` and starts receiving.
    pub fn start(
        proto_v4: i32,
        proto_v6: i32,
        classify: impl Fn(&[u8], bool) -> Action + Send + Sync + 'static,
    ) -> std::io::Result<Arc<Raw>> {
        let r = Arc::new(Raw {
            v4: raw(Domain::IPV4, proto_v4)?,
            v6: raw(Domain::IPV6, proto_v6)?,
            waiters: Mutex::default(),
        });
        let classify: Arc<Classify> = Arc::new(classify);
        for v6 in [false, true] {
            let (me, classify) = (r.clone(), classify.clone());
            std::thread::spawn(move || me.receive(v6, &*classify));
        }
        Ok(r)
    }

    fn receive(&self, v6: bool, classify: &Classify) {
        let sock = if v6 { &self.v6 } else { &self.v4 };
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let data = &buf[..n];
            // IPv4 raw sockets deliver the IP header too; IPv6 ones don't.
            let payload = if v6 {
                data
            } else {
                let ihl = usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4;
                if data.len() < ihl {
                    continue;
                }
                &data[ihl..]
            };
            match classify(payload, v6) {
                Action::Reply(p) => {
                    let _ = sock.send_to(&p, SocketAddr::new(from.ip(), 0));
                }
                Action::Wake(key) => {
                    let waiter = self
                        .waiters
                        .lock()
                        .expect("waiters")
                        .remove(&(from.ip(), key));
                    if let Some(tx) = waiter {
                        let _ = tx.send(());
                    }
                }
                Action::Ignore => {}
            }
        }
    }

    /// Sends `packet` to `dst` and waits for the answer classified as `key`.
    pub async fn probe(&self, dst: IpAddr, packet: &[u8], key: u64, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters").insert((dst, key), tx);
        let sock = if dst.is_ipv6() { &self.v6 } else { &self.v4 };
        let sent = sock.send_to(packet, SocketAddr::new(dst, 0)).is_ok();
        let ok = sent
            && tokio::time::timeout(timeout, rx)
                .await
                .is_ok_and(|r| r.is_ok());
        self.waiters.lock().expect("waiters").remove(&(dst, key));
        ok
    }
}
