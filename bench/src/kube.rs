//! The Kubernetes source at the scalability envelope: 5,000 nodes, 150,000 pods and 10,000
//! policies served by the test API server to a real release `moat-server`.
//!
//! - Time to first full sync and server memory, with paginated lists and with streaming
//!   lists; the baseline, in the same run, is the same objects loaded by the file source.
//! - Event-to-enforcer latency: pod changes applied in the API server at a fixed rate, each
//!   affecting exactly its own node's snapshot, timed until that node's (simulated,
//!   verifying) enforcer acknowledges a version; the baseline is the same change alone.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use moat_integration::kubeapi::{ApiServer, Options};
use serde_json::{Value, json};
use tonic::transport::Certificate;

use crate::KubeCluster;
use crate::sync::{
    Pki, Server, SimConfig, connect_fleet, ms, node_name, now_micros, percentile, proc_usage,
};

const PODS_PER_NS: usize = 150;
const POLICIES_PER_NS: usize = 10;

fn pod_name(i: usize) -> String {
    format!("p-{i:06}")
}

fn ns_of(pod: usize) -> String {
    format!("ns-{:04}", pod / PODS_PER_NS)
}

/// Pod `i` on node `i % nodes`, app label one of ten per namespace; `probe` toggles whether
/// the namespace's `probe` policy (one extra ingress rule) selects it: the churn's change,
/// which changes that pod's own node only (no peer group selects on `probe`).
fn pod(i: usize, nodes: usize, probe: bool) -> Value {
    let ip = 1 + i;
    let mut labels = json!({"app": format!("a{}", i % 10)});
    if probe {
        labels["probe"] = json!("true");
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name(i), "namespace": ns_of(i), "labels": labels},
        "spec": {"nodeName": node_name(i % nodes), "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": format!("10.{}.{}.{}", ip >> 16, (ip >> 8) & 255, ip & 255)}]},
    })
}

pub(crate) fn cluster(nodes: usize, pods: usize, policies: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for n in 0..nodes {
        out.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name(n)},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("172.20.{}.{}", n / 250, n % 250 + 1)}]}}));
    }
    let namespaces = pods.div_ceil(PODS_PER_NS);
    for ns in 0..namespaces {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{ns:04}")}}));
    }
    for i in 0..pods {
        out.push(pod(i, nodes, false));
    }
    // Per namespace: app aK may be reached from app a(K+1) on http; one policy adds a rule
    // to pods labelled probe=true (the churn toggles that label).
    let mut made = 0;
    'outer: for ns in 0..namespaces {
        for k in 0..POLICIES_PER_NS {
            if made == policies {
                break 'outer;
            }
            made += 1;
            let name = format!("ns-{ns:04}");
            let p = if k == 0 {
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "probe", "namespace": name},
                    "spec": {"podSelector": {"matchLabels": {"probe": "true"}},
                        "ingress": [{"from": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [{"port": 9999}]}]}})
            } else {
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": format!("allow-{k}"), "namespace": name},
                    "spec": {"podSelector": {"matchLabels": {"app": format!("a{k}")}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("a{}", (k + 1) % 10)}}}],
                            "ports": [{"port": "http"}]}]}})
            };
            out.push(p);
        }
    }
    out
}

fn write_manifests(dir: &Path, objects: &[Value]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut y = String::new();
    for o in objects {
        y.push_str("---\n");
        y.push_str(&serde_yaml::to_string(o)?);
    }
    std::fs::write(dir.join("cluster.yaml"), y)?;
    Ok(())
}

/// Peak and current resident memory (MiB) of a process.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (kb("VmHWM:"), kb("VmRSS:"))
}

struct SyncRun {
    name: &'static str,
    took: Duration,
    /// CPU seconds the server spent up to its first full sync.
    cpu: f64,
    peak: f64,
    settled: f64,
}

impl SyncRun {
    /// Starts a server on `source`, times its first full sync and reads its CPU, then its
    /// memory once it has settled; the server stops when this returns.
    fn measure(
        name: &'static str,
        bin: &Path,
        dir: &Path,
        pki: &Pki,
        source: &[String],
    ) -> Result<SyncRun> {
        let (server, took) = Server::start_with(bin, dir, pki, source)?;
        let cpu = proc_usage(server.pid()).0;
        std::thread::sleep(Duration::from_secs(3));
        let (peak, settled) = memory(server.pid());
        Ok(SyncRun {
            name,
            took,
            cpu,
            peak,
            settled,
        })
    }
}

pub fn run(
    server_bin: &Path,
    size: &KubeCluster,
    enforcers: usize,
    rate: u32,
    secs: u64,
) -> Result<String> {
    let KubeCluster {
        nodes,
        pods,
        policies,
    } = *size;
    if !server_bin.exists() {
        bail!(
            "{} not found: cargo build --release -p moat-server",
            server_bin.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let pki = Pki::new()?;
    let objects = cluster(nodes, pods, policies);
    let mut md = String::new();
    writeln!(
        md,
        "Cluster: {nodes} nodes, {pods} pods in {} namespaces, {policies} policies; test API server pages of 500.\n",
        pods.div_ceil(PODS_PER_NS)
    )?;

    let mut runs = Vec::new();
    // Baseline: the same objects from a directory.
    {
        let work = tempfile::tempdir()?;
        write_manifests(&work.path().join("manifests"), &objects)?;
        let src = [
            "--source".to_string(),
            format!("dir:{}", work.path().join("manifests").display()),
        ];
        runs.push(SyncRun::measure(
            "file source (baseline)",
            server_bin,
            work.path(),
            &pki,
            &src,
        )?);
    }
    let t = Instant::now();
    let api = serving(objects);
    eprintln!("loaded the test API server in {:?}", t.elapsed());
    let work = tempfile::tempdir()?;
    let kc = work.path().join("kubeconfig");
    api.kubeconfig(&kc, "bench");
    let src = ["--source".to_string(), format!("kube:{}", kc.display())];
    for (name, extra) in [
        ("kube source, streaming list", true),
        ("kube source, paginated list", false),
    ] {
        let w = tempfile::tempdir()?;
        let mut s = src.to_vec();
        if extra {
            s.push("--kube-streaming-list".into());
        }
        runs.push(SyncRun::measure(name, server_bin, w.path(), &pki, &s)?);
    }
    let base = &runs[0];
    writeln!(
        md,
        "| source | time to first full sync | vs baseline | server CPU to sync | peak RSS | RSS after sync | vs baseline |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for r in &runs {
        writeln!(
            md,
            "| {} | {:.2} s | {:.2}× | {:.2} s | {:.0} MiB | {:.0} MiB | {:.2}× |",
            r.name,
            r.took.as_secs_f64(),
            r.took.as_secs_f64() / base.took.as_secs_f64(),
            r.cpu,
            r.peak,
            r.settled,
            r.settled / base.settled
        )?;
    }

    // Churn: a server on the kube source, verifying enforcers on `enforcers` nodes.
    let w = tempfile::tempdir()?;
    let (server, _) = Server::start_with(server_bin, w.path(), &pki, &src)?;
    let cfg = SimConfig {
        addr: server.listen,
        ca: Certificate::from_pem(&pki.ca_pem),
    };
    // Pods on enforcer nodes, round-robin, so no node sees two changes close together.
    let targets: Vec<usize> = (0..pods).filter(|i| i % nodes < enforcers).collect();
    let mut next = 0usize;
    let (lone, churn, cpu) = rt.block_on(async {
        let mut fleet = connect_fleet(&cfg, &pki, 0..enforcers).await?;
        fleet.collect(enforcers, Duration::from_secs(300)).await;
        let applied = apply_changes(
            &api,
            &targets,
            &mut next,
            nodes,
            20,
            Duration::from_millis(500),
        );
        let lone = latencies(&mut fleet, applied).await;
        let (cpu0, _) = proc_usage(server.pid());
        let applied = apply_changes(
            &api,
            &targets,
            &mut next,
            nodes,
            rate as usize * secs as usize,
            Duration::from_secs(1) / rate,
        );
        let (cpu1, _) = proc_usage(server.pid());
        let churn = latencies(&mut fleet, applied).await;
        fleet.close().await;
        anyhow::Ok((lone, churn, (cpu1 - cpu0) / secs as f64))
    })?;
    let (mut lone, lone_missing) = lone;
    let (mut churn, churn_missing) = churn;
    if lone_missing + churn_missing > 0 {
        bail!(
            "{} changes never reached their node",
            lone_missing + churn_missing
        );
    }
    let lp50 = percentile(&mut lone, 0.5);
    writeln!(
        md,
        "\nEvent → enforcer ACK ({enforcers} verifying simulated enforcers connected; each change flips one pod's label, changing exactly its own node):\n"
    )?;
    writeln!(
        md,
        "| load | changes | p50 | p99 | max | p50 vs lone change |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    writeln!(
        md,
        "| lone changes (baseline), 2/s | {} | {} | {} | {} | 1.00× |",
        lone.len(),
        ms(lp50),
        ms(percentile(&mut lone, 0.99)),
        ms(percentile(&mut lone, 1.0))
    )?;
    let cp50 = percentile(&mut churn, 0.5);
    writeln!(
        md,
        "| churn {rate}/s for {secs} s | {} | {} | {} | {} | {:.2}× |",
        churn.len(),
        ms(cp50),
        ms(percentile(&mut churn, 0.99)),
        ms(percentile(&mut churn, 1.0)),
        cp50 as f64 / lp50.max(1) as f64
    )?;
    writeln!(
        md,
        "\nServer CPU during the churn: {:.0} % of one core.",
        cpu * 100.0
    )?;
    Ok(md)
}

/// Applies `n` pod changes, one every `every` (blocking: the fleet runs on the runtime's
/// workers); returns (node, applied at µs).
fn apply_changes(
    api: &ApiServer,
    targets: &[usize],
    next: &mut usize,
    nodes: usize,
    n: usize,
    every: Duration,
) -> Vec<(usize, u64)> {
    let mut applied = Vec::new();
    let start = Instant::now();
    for k in 0..n {
        let i = targets[*next % targets.len()];
        *next += 1;
        // Every visit flips the label, so each change really changes the node.
        let probe = (*next / targets.len()).is_multiple_of(2);
        let at = now_micros();
        api.apply(pod(i, nodes, probe));
        applied.push((i % nodes, at));
        let due = start + every * (k as u32 + 1);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    applied
}

/// For each change, the time until its node's first acknowledgement after it; and how many
/// changes no acknowledgement followed.
async fn latencies(
    fleet: &mut crate::sync::Fleet,
    applied: Vec<(usize, u64)>,
) -> (Vec<u64>, usize) {
    let got = fleet.collect(usize::MAX, Duration::from_secs(10)).await;
    let mut acks: HashMap<usize, Vec<u64>> = HashMap::new();
    for e in got {
        acks.entry(e.node).or_default().push(e.ack_unix_micros);
    }
    let mut out = Vec::new();
    let mut missing = 0;
    for (node, at) in applied {
        match acks
            .get(&node)
            .and_then(|a| a.iter().filter(|t| **t >= at).min())
        {
            Some(t) => out.push(t - at),
            None => missing += 1,
        }
    }
    (out, missing)
}

/// A test API server holding `objects`, paging lists by 500 as the real one defaults to.
fn serving(objects: Vec<Value>) -> ApiServer {
    let api = ApiServer::start(Options {
        page_size: 500,
        bookmark_every: Duration::from_secs(5),
        ..Options::default()
    });
    for o in objects {
        api.apply(o);
    }
    api
}

/// The benchmark's cluster in a test API server, until the process is killed.
pub fn serve(size: &KubeCluster, kubeconfig: &Path) -> ! {
    let api = serving(cluster(size.nodes, size.pods, size.policies));
    api.kubeconfig(kubeconfig, "bench");
    eprintln!("serving; kubeconfig {}", kubeconfig.display());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
