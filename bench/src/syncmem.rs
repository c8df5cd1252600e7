//! Heap per idle stream, by layer: the server's sync stack (the same library code
//! `moat-server` runs: file source, index, store, hub, sync service, `listen`) in a child
//! process of this binary, whose counting allocator reports its exact live heap, against
//! simulated enforcers here. Each HTTP/2 profile (hyper's defaults as tonic's server had them,
//! and Moat's) is measured in the same run: TLS connections alone, then HTTP/2 connections
//! without a stream, then streams that received and acknowledged their snapshot.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use moat_server::listen::{self, Admission, Http2, Limits};
use tokio::sync::{mpsc, watch};
use tonic::service::Routes;
use tonic::transport::{Certificate, Endpoint};

use crate::sync::{Pki, SimConfig, connect_fleet, node_name, proc_usage};

/// The HTTP/2 settings measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// hyper's server defaults (what tonic's server ran with before `listen`).
    Hyper,
    /// Moat's (`listen::Http2::default()`).
    Moat,
}

impl Profile {
    fn http2(self) -> Http2 {
        match self {
            Profile::Hyper => Http2::hyper_defaults(),
            Profile::Moat => Http2::default(),
        }
    }
}

/// The child: serves `manifests` on `listen` with `profile` and answers `heap` on stdin with
/// `heap <live bytes>`.
pub fn serve(dir: &Path, listen: SocketAddr, profile: Profile) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use moat_server::{hub, index, metrics, source, status, store, sync, tls};
        let metrics = Arc::new(metrics::Metrics::default());
        let (tx, rx) = mpsc::channel(64);
        source::file::spawn(
            dir.join("manifests"),
            tx,
            Duration::from_secs(3600),
            metrics.source_reloads.clone(),
        )
        .await?;
        let store = store::Store::open(&dir.join("state"), 4)?;
        let fleet = Arc::new(status::Fleet::default());
        let health = Arc::new(source::Health::new(metrics.source_up("default")));
        let state =
            hub::ClusterState::with_source("default", store.reserved(), "dir".into(), health);
        let hub = hub::Hub::new(vec![state.clone()], fleet.clone(), store, metrics.clone());
        tokio::spawn(index::run(
            rx,
            state,
            fleet,
            metrics.clone(),
            HashMap::new(),
            |_, _, first| {
                if first {
                    println!("synced");
                }
            },
        ));
        let (_stop, shutdown) = watch::channel(false);
        let routes = Routes::new(sync::SyncService::new(hub, shutdown.clone(), false).svc());
        let tls = tls::Reloading::new(tls::TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        })?;
        // Every simulated enforcer comes from 127.0.0.1.
        let limits = Limits {
            max_connections: 100_000,
            max_connections_per_source: 100_000,
            max_handshakes: 1024,
            max_handshakes_per_source: 1024,
            idle_timeout: Duration::from_secs(3600),
            ..Limits::default()
        };
        let l = tokio::net::TcpListener::bind(listen).await?;
        tokio::spawn(listen::serve(
            l,
            listen::Listener {
                tls,
                routes,
                admission: Admission::new(limits),
                http2: profile.http2(),
                metrics,
                name: "sync",
            },
            shutdown,
        ));
        tokio::task::spawn_blocking(|| {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if line == "heap" {
                    println!("heap {}", crate::alloc::live());
                }
            }
        })
        .await?;
        Ok(())
    })
}

struct Child2 {
    child: Child,
    stdin: ChildStdin,
    out: std::io::Lines<std::io::BufReader<ChildStdout>>,
}

impl Drop for Child2 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Child2 {
    fn start(dir: &Path, listen: SocketAddr, profile: Profile) -> Result<Child2> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("sync-serve")
            .arg("--dir")
            .arg(dir)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--profile")
            .arg(format!("{profile:?}").to_lowercase())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let out = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut c = Child2 { child, stdin, out };
        loop {
            match c.out.next() {
                Some(Ok(l)) if l == "synced" => return Ok(c),
                Some(Ok(_)) => {}
                _ => bail!("the sync-serve child ended before its first sync"),
            }
        }
    }

    /// (live heap bytes, RSS MiB), after the server settled.
    fn heap(&mut self) -> Result<(f64, f64)> {
        std::thread::sleep(Duration::from_secs(2));
        writeln!(self.stdin, "heap")?;
        self.stdin.flush()?;
        for l in self.out.by_ref() {
            if let Some(v) = l?.strip_prefix("heap ") {
                return Ok((v.parse()?, proc_usage(self.child.id()).1));
            }
        }
        bail!("the child ended")
    }
}

/// TLS connections with a node certificate, handshaken and held, no HTTP/2.
async fn tls_only(
    cfg: &SimConfig,
    pki: &Pki,
    n: usize,
) -> Result<Vec<Box<dyn std::any::Any + Send>>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pki.ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let (cert, key) = pki.node(&node_name(0))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<_, _>>()?;
    let key = rustls_pemfile::private_key(&mut key.as_bytes())?.context("key")?;
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    c.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(c));
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    for _ in 0..n {
        let tcp = tokio::net::TcpStream::connect(cfg.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        held.push(Box::new(connector.connect(name, tcp).await?));
    }
    Ok(held)
}

/// HTTP/2 connections (tonic channels, connected) without a stream.
async fn h2_only(cfg: &SimConfig, pki: &Pki, n: usize) -> Result<Vec<tonic::transport::Channel>> {
    let (cert, key) = pki.node(&node_name(0))?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(cfg.ca.clone())
        .identity(tonic::transport::Identity::from_pem(cert, key))
        .domain_name("localhost");
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(
            Endpoint::from_shared(format!("https://{}", cfg.addr))?
                .tls_config(tls.clone())?
                .connect()
                .await?,
        );
    }
    Ok(held)
}

/// One profile's figures (bytes per connection or stream, by layer).
pub struct Layers {
    pub profile: Profile,
    pub base_heap: f64,
    pub base_rss: f64,
    pub tls: f64,
    pub h2: f64,
    pub stream: f64,
    pub stream_rss: f64,
}

pub async fn measure(dir: &Path, pki: &Pki, profile: Profile, n: usize) -> Result<Layers> {
    let listen = crate::sync::free_port();
    let dir2 = dir.to_path_buf();
    let mut child =
        tokio::task::spawn_blocking(move || Child2::start(&dir2, listen, profile)).await??;
    let cfg = SimConfig {
        addr: listen,
        ca: Certificate::from_pem(&pki.ca_pem),
    };
    let (h0, r0) = child.heap()?;
    let held = tls_only(&cfg, pki, n).await?;
    let (h1, _) = child.heap()?;
    drop(held);
    let (h1b, _) = child.heap()?;
    let chans = h2_only(&cfg, pki, n).await?;
    let (h2, _) = child.heap()?;
    drop(chans);
    let (h2b, _) = child.heap()?;
    let mut fleet = connect_fleet(&cfg, pki, 0..n).await?;
    fleet.collect(n, Duration::from_secs(300)).await;
    let (h3, r3) = child.heap()?;
    fleet.close().await;
    let per = |a: f64, b: f64| (a - b) / n as f64;
    Ok(Layers {
        profile,
        base_heap: h0,
        base_rss: r0,
        tls: per(h1, h0),
        h2: per(h2, h1b),
        stream: per(h3, h2b),
        stream_rss: (r3 - r0) * 1024.0 * 1024.0 / n as f64,
    })
}

/// The markdown section: both profiles side by side.
pub fn report(n: usize, nodes: usize, rows: &[Layers]) -> String {
    let mut md = String::new();
    let kib = |b: f64| format!("{:.1} KiB", b / 1024.0);
    let _ = writeln!(
        md,
        "Heap per idle connection and stream, {n} of each, {nodes}-node cluster (counting allocator in the server's process; RSS beside it):\n"
    );
    let _ = writeln!(
        md,
        "| HTTP/2 profile | heap (RSS) with no connection | TLS connection | + HTTP/2 connection | idle stream (connection, stream, acknowledged snapshot) | RSS per idle stream |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            md,
            "| {:?} | {:.0} MiB ({:.0} MiB) | {} | {} | **{}** | {} |",
            r.profile,
            r.base_heap / 1048576.0,
            r.base_rss,
            kib(r.tls),
            kib(r.h2),
            kib(r.stream),
            kib(r.stream_rss),
        );
    }
    md
}

/// publish → ACK p99 of three policy changes on every one of `nodes` streams.
pub async fn fanout(dir: &Path, pki: &Pki, profile: Profile, nodes: usize) -> Result<Vec<u64>> {
    let listen = crate::sync::free_port();
    let dir2 = dir.to_path_buf();
    let _child =
        tokio::task::spawn_blocking(move || Child2::start(&dir2, listen, profile)).await??;
    let cfg = SimConfig {
        addr: listen,
        ca: Certificate::from_pem(&pki.ca_pem),
    };
    let mut fleet = connect_fleet(&cfg, pki, 0..nodes).await?;
    fleet.collect(nodes, Duration::from_secs(120)).await;
    let mut p99s = Vec::new();
    for port in [9100u16, 9101, 9102] {
        crate::sync::write_policy(&dir.join("manifests"), port)?;
        let got = fleet.collect(nodes, Duration::from_secs(60)).await;
        if got.len() < nodes {
            bail!("{} of {nodes} nodes acknowledged", got.len());
        }
        let mut lat: Vec<u64> = got.iter().map(|e| e.publish_to_ack()).collect();
        p99s.push(crate::sync::percentile(&mut lat, 0.99));
    }
    fleet.close().await;
    Ok(p99s)
}

/// `moat-bench sync-memory`: both profiles, fan-out and idle memory, in one run.
pub fn run(nodes: usize, idle: usize, rounds: usize) -> Result<String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let pki = Pki::new()?;
        let mut md = String::new();
        let profiles = [Profile::Hyper, Profile::Moat];
        let fan = tempfile::tempdir()?;
        crate::sync::write_server_files(fan.path(), &pki, nodes)?;
        let mut p99: HashMap<&str, Vec<u64>> = HashMap::new();
        for _ in 0..rounds {
            for p in profiles {
                let v = fanout(fan.path(), &pki, p, nodes).await?;
                p99.entry(if p == Profile::Hyper { "hyper" } else { "moat" })
                    .or_default()
                    .extend(v);
            }
        }
        let med = |v: &mut Vec<u64>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let (mut h, mut m) = (p99["hyper"].clone(), p99["moat"].clone());
        let (hm, mm) = (med(&mut h), med(&mut m));
        writeln!(
            md,
            "Fan-out, {nodes} streams, a policy change on every node ({} changes per profile, alternating): publish → ACK p99 median {} with hyper's defaults, {} with Moat's ({:.2}×); all p99s: hyper {:?} ms, Moat {:?} ms.\n",
            h.len(),
            crate::sync::ms(hm),
            crate::sync::ms(mm),
            mm as f64 / hm.max(1) as f64,
            h.iter().map(|u| u / 1000).collect::<Vec<_>>(),
            m.iter().map(|u| u / 1000).collect::<Vec<_>>(),
        )?;
        let mem = tempfile::tempdir()?;
        crate::sync::write_server_files(mem.path(), &pki, idle)?;
        let mut rows = Vec::new();
        for p in profiles {
            rows.push(measure(mem.path(), &pki, p, idle).await?);
        }
        md += &report(idle, idle, &rows);
        Ok(md)
    })
}
