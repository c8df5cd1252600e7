//! The pod agent: runs inside a pod's network namespace, serves TCP and UDP (echo) and
//! answers SCTP INITs on its ports, and probes other addresses on command.
//!
//! Protocol on stdin/stdout, one JSON object per line: the agent prints `{"ready":true}` once
//! its servers are up; each [`Request`] gets one [`Response`] with a result per probe, in order.
//! A denied TCP probe is a SYN that is never answered; every probe runs in parallel; a failed
//! probe is retried once before it counts as denied; every UDP and SCTP probe uses a fresh
//! source port.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;

use crate::sctp;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReq {
    pub dst: IpAddr,
    pub proto: Proto,
    pub port: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub probes: Vec<ProbeReq>,
    pub timeout_ms: u64,
    pub retries: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub results: Vec<bool>,
}

type Waiters = Arc<Mutex<HashMap<(IpAddr, u16, u16, u32), oneshot::Sender<()>>>>;

struct Sctp {
    v4: std::net::UdpSocket,
    v6: std::net::UdpSocket,
    waiters: Waiters,
}

/// A raw SCTP socket. std's datagram socket API works on any datagram-like fd, so raw
/// sockets are driven through it (the port of a raw socket address is ignored or must be 0).
fn raw(domain: Domain) -> std::io::Result<std::net::UdpSocket> {
    Ok(Socket::new(domain, Type::RAW, Some(Protocol::from(132)))?.into())
}

impl Sctp {
    fn start(serve: Vec<u16>) -> std::io::Result<Arc<Sctp>> {
        let s = Arc::new(Sctp {
            v4: raw(Domain::IPV4)?,
            v6: raw(Domain::IPV6)?,
            waiters: Arc::default(),
        });
        for v6 in [false, true] {
            let me = s.clone();
            let serve = serve.clone();
            std::thread::spawn(move || me.receive(v6, &serve));
        }
        Ok(s)
    }

    /// Answers INITs to served ports; hands INIT-ACKs to the probe waiting for them.
    fn receive(&self, v6: bool, serve: &[u16]) {
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
            let peer = from.ip();
            match sctp::parse(payload) {
                Some(sctp::Packet::Init { src, dst, tag }) if serve.contains(&dst) => {
                    let own = rand::random::<u32>() | 1;
                    let reply = sctp::init_ack(dst, src, tag, own);
                    let _ = sock.send_to(&reply, SocketAddr::new(peer, 0));
                }
                Some(sctp::Packet::InitAck { src, dst, vtag }) => {
                    if let Some(tx) = self
                        .waiters
                        .lock()
                        .expect("waiters")
                        .remove(&(peer, src, dst, vtag))
                    {
                        let _ = tx.send(());
                    }
                }
                _ => {}
            }
        }
    }

    async fn probe(&self, dst: IpAddr, port: u16, timeout: Duration) -> bool {
        let src: u16 = rand::random::<u16>() % 28000 + 32768;
        let tag = rand::random::<u32>() | 1;
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters")
            .insert((dst, port, src, tag), tx);
        let sock = if dst.is_ipv6() { &self.v6 } else { &self.v4 };
        let sent = sock
            .send_to(&sctp::init(src, port, tag), SocketAddr::new(dst, 0))
            .is_ok();
        let ok = sent
            && tokio::time::timeout(timeout, rx)
                .await
                .is_ok_and(|r| r.is_ok());
        self.waiters
            .lock()
            .expect("waiters")
            .remove(&(dst, port, src, tag));
        ok
    }
}

async fn tcp(dst: IpAddr, port: u16, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, TcpStream::connect((dst, port))).await,
        Ok(Ok(_))
    )
}

async fn udp(dst: IpAddr, port: u16, timeout: Duration) -> bool {
    let bind: SocketAddr = if dst.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        ([0, 0, 0, 0], 0).into()
    };
    let Ok(s) = UdpSocket::bind(bind).await else {
        return false;
    };
    let token: [u8; 8] = rand::random();
    if s.send_to(&token, (dst, port)).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(timeout, s.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) if from.ip() == dst && buf[..n] == token => return true,
            Ok(Ok(_)) => continue,
            _ => return false,
        }
    }
}

/// Runs the agent: serves `tcp`/`udp`/`sctp` ports, then answers probe requests on stdin.
pub async fn serve(
    tcp_ports: Vec<u16>,
    udp_ports: Vec<u16>,
    sctp_ports: Vec<u16>,
) -> anyhow::Result<()> {
    for port in tcp_ports {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(SocketAddr::from((
            Ipv6Addr::UNSPECIFIED,
            port,
        ))))?;
        s.listen(1024)?;
        s.set_nonblocking(true)?;
        let l = TcpListener::from_std(s.into())?;
        tokio::spawn(async move {
            loop {
                if let Ok((mut c, _)) = l.accept().await {
                    tokio::spawn(async move {
                        let _ = c.write_all(b"ok\n").await;
                    });
                }
            }
        });
    }
    for port in udp_ports {
        let s = Socket::new(Domain::IPV6, Type::DGRAM, None)?;
        s.set_only_v6(false)?;
        s.bind(&SockAddr::from(SocketAddr::from((
            Ipv6Addr::UNSPECIFIED,
            port,
        ))))?;
        s.set_nonblocking(true)?;
        let u = UdpSocket::from_std(s.into())?;
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((n, from)) = u.recv_from(&mut buf).await {
                    let _ = u.send_to(&buf[..n], from).await;
                }
            }
        });
    }
    let sctp = Sctp::start(sctp_ports)?;
    let mut out = tokio::io::stdout();
    out.write_all(b"{\"ready\":true}\n").await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let req: Request = serde_json::from_str(&line)?;
        let timeout = Duration::from_millis(req.timeout_ms);
        let tasks: Vec<_> = req
            .probes
            .into_iter()
            .map(|p| {
                let sctp = sctp.clone();
                tokio::spawn(async move {
                    for _ in 0..=req.retries {
                        let ok = match p.proto {
                            Proto::Tcp => tcp(p.dst, p.port, timeout).await,
                            Proto::Udp => udp(p.dst, p.port, timeout).await,
                            Proto::Sctp => sctp.probe(p.dst, p.port, timeout).await,
                        };
                        if ok {
                            return true;
                        }
                    }
                    false
                })
            })
            .collect();
        let mut results = Vec::with_capacity(tasks.len());
        for t in tasks {
            results.push(t.await.unwrap_or(false));
        }
        out.write_all(serde_json::to_string(&Response { results })?.as_bytes())
            .await?;
        out.write_all(b"\n").await?;
        out.flush().await?;
    }
    Ok(())
}
