//! Server replicas under failover: three real release `moat-server` replicas watching the
//! test API server, and simulated enforcers (verifying every snapshot and delta, as in
//! `sync`) that know all three, spread at random, and move to another replica when their
//! stream ends, resuming by digest — what `moat-enforcer` does, minus the dataplane.
//!
//! - kill -9 of the replica holding the most streams: per moved node, the time from the
//!   kill until it holds the current digest again from another replica, and the bytes it
//!   received for that (content unchanged); the baseline, in the same run, is those nodes'
//!   first connection (a full snapshot each);
//! - a rolling restart of all replicas (SIGTERM: each drains over 5 s): per node, the
//!   longest time between losing its stream and holding the current digest again;
//! - each replica's resident memory and CPU with `idle` more nodes connected.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use moat_integration::kubeapi::{ApiServer, Options};
use moat_policy::ir::NodeSnapshot;
use moat_policy::ir::delta::VersionRef;
use moat_policy::ir::digest::Digest;
use moat_proto::convert::ToProto;
use moat_proto::v1;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::transport::{Certificate, Identity};

use crate::sync::{
    Pki, Server, ack, free_port, ms, node_name, open_stream, percentile, proc_usage, verify,
};

/// What a simulated node saw.
#[derive(Clone, Debug)]
enum Ev {
    /// It holds `digest`, having received `bytes` in that message, from replica `on`.
    Held {
        node: usize,
        on: usize,
        digest: Digest,
        bytes: usize,
        at: Instant,
    },
    /// Its stream ended (or never opened).
    Lost { node: usize, at: Instant },
}

/// One node: connects to a random replica (never the one that just failed it), resumes by
/// digest, verifies and acknowledges; moves on when its stream ends.
async fn node(
    index: usize,
    identity: Identity,
    ca: Certificate,
    addrs: Arc<Vec<SocketAddr>>,
    events: mpsc::UnboundedSender<Ev>,
    gate: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let name = node_name(index);
    let mut held: Option<NodeSnapshot> = None;
    let mut avoid: Option<usize> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let choices: Vec<usize> = (0..addrs.len()).filter(|i| Some(*i) != avoid).collect();
        let on = choices[rand::random_range(0..choices.len())];
        // However the session ends, the node lost (or never got) its stream.
        let _ = session(
            &name, on, &identity, &ca, &addrs, &mut held, &events, &gate, &mut stop,
        )
        .await;
        if *stop.borrow() {
            return;
        }
        let _ = events.send(Ev::Lost {
            node: index,
            at: Instant::now(),
        });
        avoid = Some(on);
        // As the enforcer: a short full jitter before moving.
        tokio::time::sleep(Duration::from_millis(rand::random_range(50..200))).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    name: &str,
    on: usize,
    identity: &Identity,
    ca: &Certificate,
    addrs: &[SocketAddr],
    held: &mut Option<NodeSnapshot>,
    events: &mpsc::UnboundedSender<Ev>,
    gate: &Semaphore,
    stop: &mut watch::Receiver<bool>,
) -> Result<()> {
    let index: usize = name
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()?;
    let hello = v1::Hello {
        backend: "sim".into(),
        node: name.to_string(),
        enforcing: held.as_ref().map(|h| {
            VersionRef {
                version: h.version,
                digest: h.digest,
            }
            .to_proto()
        }),
        ..Default::default()
    };
    let (tx, mut inbound) = open_stream(
        addrs[on],
        ca,
        identity.clone(),
        Duration::from_secs(2),
        gate,
        hello,
    )
    .await?;
    loop {
        let m = tokio::select! {
            m = inbound.message() => m?,
            _ = stop.changed() => return Ok(()),
        };
        let Some(m) = m else { return Ok(()) };
        let bytes = m.encoded_len();
        let v = verify(name, m.kind, held)?;
        tx.send(ack(v.nonce, v.version)).await?;
        let version = v.version;
        let _ = events.send(Ev::Held {
            node: index,
            on,
            digest: version.digest,
            bytes,
            at: Instant::now(),
        });
    }
}

/// What every node holds now and where, from the events so far.
#[derive(Default)]
struct Fleet {
    holds: HashMap<usize, (usize, Digest)>,
    log: Vec<Ev>,
}

impl Fleet {
    fn take(&mut self, ev: Ev) {
        if let Ev::Held {
            node, on, digest, ..
        } = &ev
        {
            self.holds.insert(*node, (*on, *digest));
        }
        self.log.push(ev);
    }

    async fn drain(&mut self, rx: &mut mpsc::UnboundedReceiver<Ev>, quiet: Duration) {
        while let Ok(Some(e)) = tokio::time::timeout(quiet, rx.recv()).await {
            self.take(e);
        }
    }

    /// Waits until `pred` holds of the fleet (events applied as they come).
    async fn until(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Ev>,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&Fleet) -> bool,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !pred(self) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => self.take(e),
                _ => bail!("timed out waiting for {what}"),
            }
        }
        Ok(())
    }

    fn per_replica(&self, replicas: usize) -> Vec<usize> {
        let mut n = vec![0; replicas];
        for (on, _) in self.holds.values() {
            n[*on] += 1;
        }
        n
    }
}

struct Replicas {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    pki: Arc<Pki>,
    addrs: Vec<SocketAddr>,
    running: Vec<Option<Server>>,
}

impl Replicas {
    fn start(&mut self, i: usize) -> Result<Duration> {
        let dir = self.dir.path().join(format!("r{i}"));
        std::fs::create_dir_all(&dir)?;
        let source = [
            "--source".to_string(),
            format!("kube:{}", self.kubeconfig.display()),
        ];
        let extra: Vec<String> = [
            "--ha-cluster",
            "default",
            "--ha-namespace",
            "moat-system",
            "--replica",
            &format!("r{i}"),
            "--ha-drain",
            "5s",
        ]
        .map(String::from)
        .into();
        let (s, took) =
            Server::start_args(&self.bin, &dir, &self.pki, &source, &extra, self.addrs[i])?;
        self.running[i] = Some(s);
        Ok(took)
    }
}

pub fn run(server_bin: &Path, nodes: usize, idle: usize) -> Result<String> {
    if !server_bin.exists() {
        bail!(
            "{} not found: cargo build --release -p moat-server",
            server_bin.display()
        );
    }
    // The test API server runs on a runtime of its own, started outside this one.
    let total = nodes + idle;
    let api = ApiServer::start(Options {
        page_size: 500,
        ..Options::default()
    });
    for o in crate::kube::cluster(total, total * 10, total) {
        api.apply(o);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(&api, server_bin, nodes, idle))
}

async fn run_async(
    api: &ApiServer,
    server_bin: &Path,
    nodes: usize,
    idle: usize,
) -> Result<String> {
    const R: usize = 3;
    let total = nodes + idle;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig, "default");
    let mut reps = Replicas {
        bin: server_bin.to_path_buf(),
        kubeconfig,
        pki: Arc::new(Pki::new()?),
        addrs: (0..R).map(|_| free_port()).collect(),
        running: (0..R).map(|_| None).collect(),
        dir,
    };
    for i in 0..R {
        reps.start(i)?;
    }
    let mut md = String::new();
    writeln!(
        md,
        "{R} release replicas watching the test API server ({total} nodes, {} pods, {total} policies); {nodes} simulated enforcers that know all three, verifying every message.\n",
        total * 10
    )?;

    let ca = Certificate::from_pem(&reps.pki.ca_pem);
    let addrs = Arc::new(reps.addrs.clone());
    let (etx, mut erx) = mpsc::unbounded_channel();
    let (stop, srx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(64));
    let pki = reps.pki.clone();
    let spawn = |range: std::ops::Range<usize>| -> Result<()> {
        for i in range {
            let (cert, key) = pki.node(&node_name(i))?;
            tokio::spawn(node(
                i,
                Identity::from_pem(cert, key),
                ca.clone(),
                addrs.clone(),
                etx.clone(),
                gate.clone(),
                srx.clone(),
            ));
        }
        Ok(())
    };
    let mut fleet = Fleet::default();
    spawn(0..nodes)?;
    fleet
        .until(
            &mut erx,
            Duration::from_secs(300),
            "every node holding content",
            |f| f.holds.len() == nodes,
        )
        .await?;
    fleet.drain(&mut erx, Duration::from_secs(2)).await;
    let before: HashMap<usize, (usize, Digest)> = fleet.holds.clone();
    let first_bytes: HashMap<usize, usize> = fleet
        .log
        .iter()
        .filter_map(|e| match e {
            Ev::Held { node, bytes, .. } => Some((*node, *bytes)),
            _ => None,
        })
        .collect();
    let spread = fleet.per_replica(R);
    writeln!(md, "Streams per replica after connecting: {spread:?}.\n")?;

    // 1. kill -9 the busiest replica.
    let victim = (0..R).max_by_key(|i| spread[*i]).expect("replicas");
    let moved: Vec<usize> = before
        .iter()
        .filter(|(_, (on, _))| *on == victim)
        .map(|(n, _)| *n)
        .collect();
    let mark = fleet.log.len();
    let killed = Instant::now();
    reps.running[victim] = None;
    fleet
        .until(
            &mut erx,
            Duration::from_secs(120),
            "every moved node re-homed",
            |f| {
                moved.iter().all(|n| {
                    f.holds
                        .get(n)
                        .is_some_and(|(on, d)| *on != victim && *d == before[n].1)
                })
            },
        )
        .await?;
    fleet.drain(&mut erx, Duration::from_millis(500)).await;
    let mut rehome = Vec::new();
    let mut bytes = Vec::new();
    for n in &moved {
        let mut sum = 0;
        let mut back = None;
        for e in &fleet.log[mark..] {
            if let Ev::Held {
                node,
                on,
                digest,
                bytes: b,
                at,
            } = e
                && node == n
                && *on != victim
            {
                sum += b;
                if *digest == before[n].1 && back.is_none() {
                    back = Some(at.duration_since(killed));
                }
            }
        }
        rehome.push(back.map_or(u64::MAX, |d| d.as_micros() as u64));
        bytes.push(sum as u64);
    }
    let mut full: Vec<u64> = moved.iter().map(|n| first_bytes[n] as u64).collect();
    let (p50, p99, max) = (
        percentile(&mut rehome, 0.5),
        percentile(&mut rehome, 0.99),
        percentile(&mut rehome, 1.0),
    );
    let (b_mean, b_max) = (
        bytes.iter().sum::<u64>() / bytes.len().max(1) as u64,
        percentile(&mut bytes, 1.0),
    );
    let full_mean = full.iter().sum::<u64>() / full.len().max(1) as u64;
    let _ = percentile(&mut full, 1.0);
    writeln!(
        md,
        "| kill -9 of r{victim} ({} streams) | value | target |",
        moved.len()
    )?;
    writeln!(md, "|---|---|---|")?;
    writeln!(
        md,
        "| re-home and hold the current digest, p50 / p99 / max | {} / {} / {} | p99 ≤ 5 s |",
        ms(p50),
        ms(p99),
        ms(max)
    )?;
    writeln!(
        md,
        "| bytes received per moved node, mean / max (content unchanged) | {b_mean} / {b_max} B | ≤ 1 KB |"
    )?;
    writeln!(
        md,
        "| baseline: the same nodes' first connection (full snapshot), mean | {full_mean} B | |"
    )?;
    writeln!(
        md,
        "| ratio, re-home bytes / full snapshot | {:.3} | |\n",
        b_mean as f64 / full_mean.max(1) as f64
    )?;
    reps.start(victim)?;

    // 2. A rolling restart: each replica drains (5 s) and comes back.
    let mark = fleet.log.len();
    let rolled = Instant::now();
    for i in 0..R {
        let s = reps.running[i].take().context("running")?;
        tokio::task::spawn_blocking(move || s.terminate()).await??;
        fleet.drain(&mut erx, Duration::from_millis(10)).await;
        reps.start(i)?;
    }
    fleet
        .until(
            &mut erx,
            Duration::from_secs(120),
            "every node holding content",
            |f| (0..nodes).all(|n| f.holds.get(&n).is_some_and(|(_, d)| *d == before[&n].1)),
        )
        .await?;
    fleet.drain(&mut erx, Duration::from_secs(1)).await;
    let roll = rolled.elapsed();
    // Per node: the longest stretch from losing a stream to holding the content again.
    let mut out_of_sync = vec![0u64; nodes];
    let mut lost_at: HashMap<usize, Instant> = HashMap::new();
    let mut moves = 0;
    for e in &fleet.log[mark..] {
        match e {
            Ev::Lost { node, at, .. } if *node < nodes => {
                lost_at.entry(*node).or_insert(*at);
                moves += 1;
            }
            Ev::Held {
                node, digest, at, ..
            } if *node < nodes && *digest == before[node].1 => {
                if let Some(l) = lost_at.remove(node) {
                    let d = at.duration_since(l).as_micros() as u64;
                    out_of_sync[*node] = out_of_sync[*node].max(d);
                }
            }
            _ => {}
        }
    }
    let (o99, omax) = (
        percentile(&mut out_of_sync.clone(), 0.99),
        percentile(&mut out_of_sync, 1.0),
    );
    writeln!(
        md,
        "| rolling restart of all {R} replicas (SIGTERM, 5 s drain each) | value | target |"
    )?;
    writeln!(md, "|---|---|---|")?;
    writeln!(
        md,
        "| whole roll (three drains and restarts) | {:.1} s | |",
        roll.as_secs_f64()
    )?;
    writeln!(md, "| stream moves | {moves} | |")?;
    writeln!(
        md,
        "| longest time a node was out of sync, p99 / max | {} / {} | ≤ 10 s |\n",
        ms(o99),
        ms(omax)
    )?;

    // 3. Memory and CPU at `total` nodes.
    if idle > 0 {
        let usage0: Vec<(f64, f64)> = reps
            .running
            .iter()
            .map(|s| s.as_ref().map_or((0.0, 0.0), |s| proc_usage(s.pid())))
            .collect();
        let t = Instant::now();
        spawn(nodes..total)?;
        fleet
            .until(
                &mut erx,
                Duration::from_secs(600),
                "every node holding content",
                |f| f.holds.len() == total,
            )
            .await?;
        fleet.drain(&mut erx, Duration::from_secs(3)).await;
        let took = t.elapsed();
        let spread = fleet.per_replica(R);
        writeln!(
            md,
            "| at {total} nodes (connected in {:.1} s) | streams | resident memory | CPU while {idle} connected |",
            took.as_secs_f64()
        )?;
        writeln!(md, "|---|---|---|---|")?;
        for i in 0..R {
            let (cpu, rss) = reps.running[i]
                .as_ref()
                .map_or((0.0, 0.0), |s| proc_usage(s.pid()));
            writeln!(
                md,
                "| r{i} | {} | {rss:.0} MiB | {:.1} s |",
                spread[i],
                cpu - usage0[i].0
            )?;
        }
        writeln!(md)?;
    }
    let _ = stop.send(true);
    Ok(md)
}
