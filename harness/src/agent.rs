//! The pod agent: runs inside a pod's network namespace, serves TCP and UDP (echo) and
//! answers SCTP INITs on its ports, and probes other addresses on command.
//!
//! Protocol on stdin/stdout, one JSON object per line: the agent prints `{"ready":true}` once
//! its servers are up; each [`Request`] gets one [`Response`] with a result per probe and per
//! stream operation, in order. A denied TCP probe is a SYN that is never answered; every
//! probe runs in parallel; a failed probe is retried before it counts as denied; every UDP
//! and SCTP probe uses a fresh source port, every ICMP echo a fresh identifier.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::raw::{Action, Raw};
use crate::spoof::{self, SpoofReq};
use crate::{icmp, sctp};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    /// Echo request/reply; the port is ignored.
    Icmp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReq {
    pub dst: IpAddr,
    pub proto: Proto,
    pub port: u16,
}

/// Operations on long-lived TCP connections, run in order after the probes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamOp {
    /// Connect and keep the connection as `id`.
    Open {
        id: u32,
        dst: IpAddr,
        port: u16,
    },
    /// Send a token over `id` and expect it echoed back.
    Echo {
        id: u32,
    },
    Close {
        id: u32,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Request {
    #[serde(default)]
    pub probes: Vec<ProbeReq>,
    #[serde(default)]
    pub streams: Vec<StreamOp>,
    pub timeout_ms: u64,
    pub retries: u32,
    /// Packets with forged sources to send first (see [`spoof`](crate::spoof)).
    #[serde(default)]
    pub spoof: Vec<SpoofReq>,
    /// Forged packets to ask about: did this agent receive them?
    #[serde(default)]
    pub heard: Vec<SpoofReq>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub results: Vec<bool>,
    #[serde(default)]
    pub streams: Vec<bool>,
    /// Whether each spoofed packet could be sent.
    #[serde(default)]
    pub spoofed: Vec<bool>,
    #[serde(default)]
    pub heard: Vec<bool>,
}

/// Tokens of forged packets this agent received: UDP payload tokens, and SYN sequence
/// numbers (tagged with the top bit).
type Heard = Arc<std::sync::Mutex<std::collections::HashSet<u64>>>;

const SYN_TAG: u64 = 1 << 63;

fn heard_key(r: &SpoofReq) -> u64 {
    match r.kind {
        spoof::Kind::Udp => r.token,
        spoof::Kind::Syn => SYN_TAG | (r.token & 0xffff_ffff),
    }
}

/// Watches incoming TCP segments for forged SYNs to served ports.
fn start_syn_watch(ports: Vec<u16>, heard: Heard) -> std::io::Result<Arc<Raw>> {
    Raw::start(6, 6, move |segment, _| {
        if let Some(seq) = spoof::syn_token(segment, &ports) {
            heard
                .lock()
                .expect("heard")
                .insert(SYN_TAG | u64::from(seq));
        }
        Action::Ignore
    })
}

fn sctp_key(port: u16, src: u16, tag: u32) -> u64 {
    (u64::from(port) << 48) | (u64::from(src) << 32) | u64::from(tag)
}

/// SCTP over raw sockets: answers INITs to served ports, wakes probes on INIT-ACKs.
fn start_sctp(serve: Vec<u16>) -> std::io::Result<Arc<Raw>> {
    Raw::start(132, 132, move |payload, _| match sctp::parse(payload) {
        Some(sctp::Packet::Init { src, dst, tag }) if serve.contains(&dst) => {
            Action::Reply(sctp::init_ack(dst, src, tag, rand::random::<u32>() | 1))
        }
        Some(sctp::Packet::InitAck { src, dst, vtag }) => Action::Wake(sctp_key(src, dst, vtag)),
        _ => Action::Ignore,
    })
}

/// Source ports for UDP and SCTP probes, handed out in turn from a random start. A probe
/// that reused a recent tuple would be the same flow to conntrack (and to the eBPF flow
/// table): it would pass as established where policy now denies new flows. In turn, a
/// tuple comes back only after 28,000 probes.
fn source_port() -> u16 {
    const FIRST: u32 = 32768;
    const COUNT: u32 = 28000;
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| rand::random_range(0..COUNT).into());
    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (FIRST + n % COUNT) as u16
}

async fn sctp_probe(raw: &Raw, dst: IpAddr, port: u16, timeout: Duration) -> bool {
    let src = source_port();
    let tag = rand::random::<u32>() | 1;
    raw.probe(
        dst,
        &sctp::init(src, port, tag),
        sctp_key(port, src, tag),
        timeout,
    )
    .await
}

/// ICMP echo over raw sockets (the kernel itself answers echo requests).
fn start_icmp() -> std::io::Result<Arc<Raw>> {
    Raw::start(1, 58, |payload, v6| match icmp::parse_reply(v6, payload) {
        Some((id, seq)) => Action::Wake((u64::from(id) << 16) | u64::from(seq)),
        None => Action::Ignore,
    })
}

async fn icmp_probe(raw: &Raw, dst: IpAddr, timeout: Duration) -> bool {
    let (id, seq): (u16, u16) = (rand::random(), rand::random());
    let packet = icmp::echo_request(dst.is_ipv6(), id, seq);
    raw.probe(
        dst,
        &packet,
        (u64::from(id) << 16) | u64::from(seq),
        timeout,
    )
    .await
}

async fn tcp(dst: IpAddr, port: u16, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, TcpStream::connect((dst, port))).await,
        Ok(Ok(_))
    )
}

async fn udp(dst: IpAddr, port: u16, timeout: Duration) -> bool {
    let any: IpAddr = if dst.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        [0, 0, 0, 0].into()
    };
    // A port another socket holds is skipped; after a few, the kernel picks.
    let mut socket = None;
    for _ in 0..8 {
        if let Ok(s) = UdpSocket::bind(SocketAddr::new(any, source_port())).await {
            socket = Some(s);
            break;
        }
    }
    let s = match socket {
        Some(s) => s,
        None => match UdpSocket::bind(SocketAddr::new(any, 0)).await {
            Ok(s) => s,
            Err(_) => return false,
        },
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

/// Connects and reads the server's greeting.
async fn open(dst: IpAddr, port: u16, timeout: Duration) -> Option<TcpStream> {
    let mut s = tokio::time::timeout(timeout, TcpStream::connect((dst, port)))
        .await
        .ok()?
        .ok()?;
    let mut hello = [0u8; 3];
    tokio::time::timeout(timeout, s.read_exact(&mut hello))
        .await
        .ok()?
        .ok()?;
    (&hello == b"ok\n").then_some(s)
}

async fn echo(s: &mut TcpStream, timeout: Duration) -> bool {
    let token: [u8; 8] = rand::random();
    let mut back = [0u8; 8];
    let round = async {
        s.write_all(&token).await?;
        s.read_exact(&mut back).await?;
        std::io::Result::Ok(())
    };
    matches!(tokio::time::timeout(timeout, round).await, Ok(Ok(()))) && back == token
}

fn listen(ty: Type, port: u16) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, ty, None)?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(SocketAddr::from((
        Ipv6Addr::UNSPECIFIED,
        port,
    ))))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Runs the agent: serves `tcp`/`udp`/`sctp` ports, then answers requests on stdin.
pub async fn serve(
    tcp_ports: Vec<u16>,
    udp_ports: Vec<u16>,
    sctp_ports: Vec<u16>,
) -> anyhow::Result<()> {
    let heard: Heard = Arc::default();
    let _syn_watch = start_syn_watch(tcp_ports.clone(), heard.clone())?;
    for port in tcp_ports {
        let s = listen(Type::STREAM, port)?;
        s.listen(1024)?;
        let l = TcpListener::from_std(s.into())?;
        tokio::spawn(async move {
            loop {
                if let Ok((mut c, _)) = l.accept().await {
                    // Greet, then echo: a probe only connects, a stream keeps talking.
                    tokio::spawn(async move {
                        if c.write_all(b"ok\n").await.is_ok() {
                            let (mut r, mut w) = c.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        }
                    });
                }
            }
        });
    }
    for port in udp_ports {
        let u = UdpSocket::from_std(listen(Type::DGRAM, port)?.into())?;
        let heard = heard.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((n, from)) = u.recv_from(&mut buf).await {
                    if let Some(t) = spoof::udp_token(&buf[..n]) {
                        heard.lock().expect("heard").insert(t);
                        continue;
                    }
                    let _ = u.send_to(&buf[..n], from).await;
                }
            }
        });
    }
    let sctp = start_sctp(sctp_ports)?;
    let icmp = start_icmp()?;
    let mut streams: HashMap<u32, TcpStream> = HashMap::new();
    let mut out = tokio::io::stdout();
    out.write_all(b"{\"ready\":true}\n").await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let req: Request = serde_json::from_str(&line)?;
        let timeout = Duration::from_millis(req.timeout_ms);
        let spoofed: Vec<bool> = req.spoof.iter().map(|r| spoof::send(r).is_ok()).collect();
        let answers: Vec<bool> = {
            let h = heard.lock().expect("heard");
            req.heard
                .iter()
                .map(|r| h.contains(&heard_key(r)))
                .collect()
        };
        let tasks: Vec<_> = req
            .probes
            .into_iter()
            .map(|p| {
                let (sctp, icmp) = (sctp.clone(), icmp.clone());
                tokio::spawn(async move {
                    for _ in 0..=req.retries {
                        let ok = match p.proto {
                            Proto::Tcp => tcp(p.dst, p.port, timeout).await,
                            Proto::Udp => udp(p.dst, p.port, timeout).await,
                            Proto::Sctp => sctp_probe(&sctp, p.dst, p.port, timeout).await,
                            Proto::Icmp => icmp_probe(&icmp, p.dst, timeout).await,
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
        let mut done = Vec::with_capacity(req.streams.len());
        for op in req.streams {
            done.push(match op {
                StreamOp::Open { id, dst, port } => match open(dst, port, timeout).await {
                    Some(s) => streams.insert(id, s).is_none(),
                    None => false,
                },
                StreamOp::Echo { id } => match streams.get_mut(&id) {
                    Some(s) => echo(s, timeout).await,
                    None => false,
                },
                StreamOp::Close { id } => streams.remove(&id).is_some(),
            });
        }
        let resp = Response {
            results,
            streams: done,
            spoofed,
            heard: answers,
        };
        out.write_all(serde_json::to_string(&resp)?.as_bytes())
            .await?;
        out.write_all(b"\n").await?;
        out.flush().await?;
    }
    Ok(())
}
