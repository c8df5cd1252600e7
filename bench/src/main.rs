//! `moat-bench`: the policy compiler's benchmarks. Never run in CI; results go to
//! `docs/benchmarks.md`. Single-threaded, like the targets.
//!
//! Every figure is reported with a baseline measured in the same run: full compiles against
//! the time it takes just to validate and convert the same input objects (which any
//! implementation has to do), event latencies against a full compile.

mod alloc;
mod datapath;
mod ebpfbench;
mod ha;
mod kube;
mod netns;
mod nftapply;
mod nftlocal;
mod plot;
mod policies;
mod sync;
mod syncmem;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use moat_policy::model::{self, Object};
use moat_policy::testkit::synthetic::{self, Scale};
use moat_policy::{Index, model::K8sObject};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

#[derive(Parser)]
#[command(about = "Moat policy compiler benchmarks")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

/// Size and repetitions of a dataplane apply benchmark (nft and eBPF alike).
#[derive(clap::Args, Debug)]
struct ApplyArgs {
    /// Rules in the big snapshot.
    #[arg(long, default_value_t = 10_000)]
    rules: usize,
    /// Full applies timed.
    #[arg(long, default_value_t = 15)]
    full_runs: usize,
    /// One-pod deltas timed.
    #[arg(long, default_value_t = 101)]
    delta_runs: usize,
}

#[derive(Subcommand)]
enum Command {
    /// One full compile, for profiling.
    Compile {
        #[arg(long, value_enum, default_value = "antrea")]
        scale: ScaleArg,
        #[arg(long, default_value_t = 100)]
        percent: usize,
    },
    /// The sync plane: simulated enforcers against a real server process.
    Sync {
        /// Streams for the latency and bytes scenarios.
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// Streams held for the idle-memory measurement (0 to skip).
        #[arg(long, default_value_t = 5000)]
        idle: usize,
        /// The server binary (a release build).
        #[arg(long, default_value = "target/release/moat-server")]
        server_bin: std::path::PathBuf,
    },
    /// Server replicas: kill -9 and rolling restarts under simulated enforcers that fail
    /// over (test API server; release server).
    Ha {
        /// Simulated enforcers during the failovers.
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// More nodes connected afterwards for the replicas' memory and CPU (0 to skip).
        #[arg(long, default_value_t = 4000)]
        idle: usize,
        #[arg(long, default_value = "target/release/moat-server")]
        server_bin: std::path::PathBuf,
    },
    /// Heap and RSS per idle stream by layer, and the 1,000-node fan-out, with hyper's HTTP/2
    /// defaults and Moat's in the same run (the server stack in a child of this binary).
    SyncMemory {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 5000)]
        idle: usize,
        /// Fan-out rounds per profile (three changes each).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Internal: the sync stack for `sync-memory`, reporting its heap on stdin's `heap`.
    #[command(hide = true)]
    SyncServe {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long, value_enum)]
        profile: syncmem::Profile,
    },
    /// The Kubernetes source: first full sync and memory at the scalability envelope, and
    /// event-to-enforcer latency under pod churn (test API server; release server).
    Kube {
        #[command(flatten)]
        cluster: KubeCluster,
        /// Nodes with a (simulated, verifying) enforcer for the latency runs.
        #[arg(long, default_value_t = 1000)]
        enforcers: usize,
        /// Pod changes per second.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        #[arg(long, default_value_t = 30)]
        secs: u64,
        #[arg(long, default_value = "target/release/moat-server")]
        server_bin: std::path::PathBuf,
    },
    /// Internal: the benchmark's test API server alone, until killed (for profiling a
    /// server against it).
    #[command(hide = true)]
    ServeApi {
        #[command(flatten)]
        cluster: KubeCluster,
        #[arg(long)]
        kubeconfig: std::path::PathBuf,
    },
    /// The nft backend applying a big snapshot and one-pod deltas (root; private netns).
    NftApply(ApplyArgs),
    /// The eBPF dataplane: per-packet cost (kernel-timed test runs) and apply times (root;
    /// private netns).
    EbpfApply {
        #[command(flatten)]
        apply: ApplyArgs,
        /// Rounds of per-packet timing (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// The nft dataplane on packets in the netns harness (root; release binaries built).
    Datapath {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 3)]
        secs: u64,
        /// Only the configurations whose name contains this (or one of several, `|`
        /// between them: `--only 'no policy|ebpf, 10000'`).
        #[arg(long)]
        only: Option<String>,
    },
    /// Internal: applies a snapshot (JSON) with the nft backend and this namespace's local
    /// pods, then exits (the table stays); run by `datapath` in a harness node.
    #[command(hide = true)]
    NftLocal {
        #[arg(long)]
        snapshot: std::path::PathBuf,
    },
    /// The nft backend's user-space work for one-pod deltas, in a loop (for profiling).
    NftCompute {
        #[arg(long, default_value_t = 10_000)]
        rules: usize,
        #[arg(long, default_value_t = 200)]
        runs: usize,
    },
    /// Internal: new-connection loop run inside a pod namespace by `datapath`.
    #[command(hide = true)]
    ConnectLoop {
        #[arg(long)]
        dst: std::net::SocketAddr,
        #[arg(long)]
        secs: u64,
    },
    /// Everything, as the Markdown of docs/benchmarks.md.
    Report {
        /// Fewer iterations and no 5,000-node growth table (a quick look, not for the docs).
        #[arg(long)]
        quick: bool,
        /// Also write the growth chart here (SVG).
        #[arg(long)]
        svg: Option<std::path::PathBuf>,
    },
}

/// The Kubernetes benchmark's cluster (the scalability envelope by default).
#[derive(clap::Args, Clone, Copy)]
struct KubeCluster {
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    #[arg(long, default_value_t = 150_000)]
    pods: usize,
    #[arg(long, default_value_t = 10_000)]
    policies: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScaleArg {
    Medium,
    Antrea,
}

impl ScaleArg {
    fn scale(self) -> Scale {
        match self {
            ScaleArg::Medium => Scale::MEDIUM,
            ScaleArg::Antrea => Scale::ANTREA,
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Compile { scale, percent } => {
            let r = compile(scale.scale().percent(percent));
            println!("{}", r.row());
        }
        Command::Sync {
            nodes,
            idle,
            server_bin,
        } => print!("{}", sync::run(server_bin, nodes, idle)?),
        Command::Ha {
            nodes,
            idle,
            server_bin,
        } => print!("{}", ha::run(&server_bin, nodes, idle)?),
        Command::SyncMemory {
            nodes,
            idle,
            rounds,
        } => print!("{}", syncmem::run(nodes, idle, rounds)?),
        Command::SyncServe {
            dir,
            listen,
            profile,
        } => syncmem::serve(&dir, listen, profile)?,
        Command::Kube {
            cluster,
            enforcers,
            rate,
            secs,
            server_bin,
        } => print!(
            "{}",
            kube::run(&server_bin, &cluster, enforcers, rate, secs)?
        ),
        Command::ServeApi {
            cluster,
            kubeconfig,
        } => kube::serve(&cluster, &kubeconfig),
        Command::NftApply(a) => {
            if netns::inside()? {
                print!("{}", nftapply::run(a.rules, a.full_runs, a.delta_runs)?);
            }
        }
        Command::NftCompute { rules, runs } => nftapply::compute_loop(rules, runs),
        Command::NftLocal { snapshot } => nftlocal::run(&snapshot)?,
        Command::EbpfApply { apply: a, rounds } => {
            if netns::inside()? {
                print!(
                    "{}",
                    ebpfbench::run(a.rules, a.full_runs, a.delta_runs, rounds)?
                );
            }
        }
        Command::Datapath { rounds, secs, only } => {
            print!("{}", datapath::run(rounds, secs, only.as_deref())?)
        }
        Command::ConnectLoop { dst, secs } => datapath::connect_loop(dst, secs)?,
        Command::Report { quick, svg } => {
            let (md, chart) = report(quick);
            print!("{md}");
            if let Some(path) = svg {
                std::fs::write(&path, chart)?;
            }
        }
    }
    Ok(())
}

struct Input {
    objects: Vec<Object>,
    parse: Duration,
    bytes: usize,
}

/// Generates the cluster and converts it as a source would; the conversion is the baseline.
fn input(scale: Scale) -> Input {
    let mut k8s: Vec<K8sObject> = Vec::new();
    synthetic::generate(scale, 7, |o| k8s.push(o));
    let live = alloc::live();
    let t = Instant::now();
    let objects: Vec<Object> = k8s
        .iter()
        .map(|o| {
            model::parse::object(o)
                .expect("synthetic objects are valid")
                .value
        })
        .collect();
    let parse = t.elapsed();
    let bytes = alloc::live() - live;
    drop(k8s);
    Input {
        objects,
        parse,
        bytes,
    }
}

struct CompileResult {
    scale: Scale,
    parse: Duration,
    build: Duration,
    materialize: Duration,
    input_bytes: usize,
    peak_bytes: usize,
    retained_bytes: usize,
    stats: moat_policy::Stats,
    snapshot_entries: usize,
    largest_snapshot: usize,
}

fn compile(scale: Scale) -> CompileResult {
    let input = input(scale);
    let before = alloc::live();
    alloc::reset_peak();
    let t = Instant::now();
    let index = Index::build(input.objects);
    let build = t.elapsed();
    let peak = alloc::peak() - (before - input.bytes);
    let retained = alloc::live() - (before - input.bytes);
    let t = Instant::now();
    let mut entries = 0;
    let mut largest = 0;
    for n in index.nodes() {
        let s = index.snapshot(&n.node).expect("listed");
        let size = s.size().total();
        entries += size;
        largest = largest.max(size);
    }
    let materialize = t.elapsed();
    CompileResult {
        scale,
        parse: input.parse,
        build,
        materialize,
        input_bytes: input.bytes,
        peak_bytes: peak,
        retained_bytes: retained,
        stats: index.stats(),
        snapshot_entries: entries,
        largest_snapshot: largest,
    }
}

fn mib(b: usize) -> String {
    format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
}

fn secs(d: Duration) -> String {
    if d.as_secs_f64() >= 1.0 {
        format!("{:.2} s", d.as_secs_f64())
    } else if d.as_secs_f64() >= 1e-3 {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    }
}

impl CompileResult {
    fn row(&self) -> String {
        let s = self.scale;
        format!(
            "| {} / {} / {} / {} | {} | {} | **{}** | {:.2}× | {} | {} | {} | {} | {} | {} / {} |",
            s.nodes,
            s.namespaces,
            s.pods,
            s.policies,
            secs(self.parse),
            mib(self.input_bytes),
            secs(self.build),
            self.build.as_secs_f64() / self.parse.as_secs_f64(),
            mib(self.peak_bytes),
            mib(self.retained_bytes),
            secs(self.materialize),
            self.stats.groups,
            self.stats.rules,
            self.snapshot_entries,
            self.largest_snapshot,
        )
    }
}

const COMPILE_HEADER: &str = "| nodes / namespaces / pods / policies | baseline: validate + convert input | input size | full compile | compile ÷ baseline | peak heap (input + index) | index after compile | materialise all snapshots | groups | rules | snapshot entries: all nodes / largest node |\n|---|---|---|---|---|---|---|---|---|---|---|\n";

struct EventResult {
    what: &'static str,
    nodes: usize,
    median: Duration,
    p90: Duration,
}

/// Times single-pod events on a compiled cluster. Each kind is applied and undone many times;
/// the node count is how many snapshots the event changed.
fn events(scale: Scale, iterations: usize) -> (Duration, Vec<EventResult>) {
    let input = input(scale);
    let t = Instant::now();
    let mut index = Index::build(input.objects);
    let full = t.elapsed();
    // A quiet namespace (no policies) and a ten-node one whose pods all allow each other.
    let mut setup = vec![Object::Namespace(model::Namespace {
        name: "bench-ten".into(),
        labels: model::Namespace::implicit_labels("bench-ten"),
    })];
    for i in 0..10 {
        setup.push(pod(
            "bench-ten",
            &format!("p{i}"),
            "peer",
            i * (scale.nodes / 10),
            1_000_000 + i,
        ));
    }
    setup.push(Object::Policy(model::Policy {
        namespace: "bench-ten".into(),
        name: "mesh".into(),
        pod_selector: model::Selector::everything(),
        ingress: Some(vec![model::Rule {
            peers: vec![model::Peer::Pods {
                namespaces: None,
                pods: model::Selector::everything(),
            }],
            ports: vec![],
        }]),
        egress: None,
    }));
    index.batch(setup.into_iter().map(moat_policy::Event::Apply));

    let node = scale.nodes / 2 + 1;
    let kinds: [(&'static str, Object); 4] = [
        (
            "pod added in a namespace without policies",
            pod("bench-solo", "new", "solo", node, 2_000_000),
        ),
        (
            "pod added to a 10-node mesh",
            pod("bench-ten", "new", "peer", node, 2_000_001),
        ),
        (
            "pod added in an app namespace (100 pods)",
            pod("ns-00000", "new", "app-1", node, 2_000_002),
        ),
        (
            "DNS replica added (every node's DNS egress rule)",
            pod("kube-system", "coredns-new", "dns", node, 2_000_003),
        ),
    ];
    let mut out = Vec::new();
    for (what, obj) in kinds {
        let key = obj.key();
        let mut add = Vec::new();
        let mut del = Vec::new();
        let mut nodes = 0;
        for _ in 0..iterations {
            let t = Instant::now();
            let c = index.apply(obj.clone());
            add.push(t.elapsed());
            nodes = c.updated.len();
            let t = Instant::now();
            index.delete(&key);
            del.push(t.elapsed());
        }
        out.push(EventResult {
            what,
            nodes,
            median: median(&mut add),
            p90: p90(&mut add),
        });
        let what_del: &'static str = match what {
            w if w.starts_with("DNS") => "DNS replica deleted",
            _ => "… and deleted again",
        };
        out.push(EventResult {
            what: what_del,
            nodes,
            median: median(&mut del),
            p90: p90(&mut del),
        });
    }
    // A relabel moves one pod between app groups.
    let mut relabel = Vec::new();
    let mut nodes = 0;
    let a = pod("ns-00001", "relabelled", "app-1", node, 2_000_010);
    let mut b = a.clone();
    if let Object::Pod(p) = &mut b {
        p.labels.insert("app".into(), "app-2".into());
    }
    index.apply(a.clone());
    for i in 0..iterations {
        let t = Instant::now();
        let c = index.apply(if i % 2 == 0 { b.clone() } else { a.clone() });
        relabel.push(t.elapsed());
        nodes = nodes.max(c.updated.len());
    }
    out.push(EventResult {
        what: "pod relabelled app-1 ↔ app-2 (app namespace)",
        nodes,
        median: median(&mut relabel),
        p90: p90(&mut relabel),
    });
    (full, out)
}

fn pod(ns: &str, name: &str, app: &str, node: usize, n: usize) -> Object {
    let labels = if app == "dns" {
        [("k8s-app".to_string(), "kube-dns".to_string())].into()
    } else {
        [
            ("app".to_string(), app.to_string()),
            ("tier".to_string(), "frontend".to_string()),
        ]
        .into()
    };
    Object::Pod(model::Pod {
        namespace: ns.into(),
        name: name.into(),
        labels,
        node: Some(synthetic::node_name(node)),
        ips: vec![synthetic::pod_ip_v4(n)],
        ports: vec![model::ContainerPort {
            name: "http".into(),
            proto: model::Protocol::Tcp,
            port: 8080,
        }],
        host_network: false,
        terminal: false,
        uid: None,
        sandbox: None,
    })
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() * 9 / 10]
}

fn report(quick: bool) -> (String, String) {
    let mut md = String::new();
    let mut time = Vec::new();
    let mut memory = Vec::new();
    let iterations = if quick { 50 } else { 500 };
    writeln!(md, "## Full compile\n").unwrap();
    md.push_str(COMPILE_HEADER);
    for scale in [Scale::MEDIUM, Scale::ANTREA] {
        md.push_str(&compile(scale).row());
        md.push('\n');
    }
    for (name, scale) in [
        ("1,000 nodes / 30,000 pods", Scale::MEDIUM),
        ("5,000 nodes / 100,000 pods", Scale::ANTREA),
    ] {
        let (full, rows) = events(scale, iterations);
        writeln!(
            md,
            "\n## One pod event, {name} (baseline: full compile {})\n",
            secs(full)
        )
        .unwrap();
        md.push_str("| event | nodes whose snapshot changed | median | p90 | median ÷ full compile |\n|---|---|---|---|---|\n");
        for r in rows {
            writeln!(
                md,
                "| {} | {} | **{}** | {} | {:.1e} |",
                r.what,
                r.nodes,
                secs(r.median),
                secs(r.p90),
                r.median.as_secs_f64() / full.as_secs_f64()
            )
            .unwrap();
        }
    }
    for (name, scale) in [
        ("1,000 nodes / 30,000 pods / 3,000 policies", Scale::MEDIUM),
        (
            "5,000 nodes / 100,000 pods / 75,000 policies",
            Scale::ANTREA,
        ),
    ] {
        if quick && scale == Scale::ANTREA {
            continue;
        }
        writeln!(md, "\n## Growth: 10% to 100% of {name}\n").unwrap();
        md.push_str(COMPILE_HEADER);
        let mut t = plot::Series {
            name: name.to_string(),
            points: Vec::new(),
        };
        let mut m = plot::Series {
            name: name.to_string(),
            points: Vec::new(),
        };
        for pct in [10, 25, 50, 75, 100] {
            let r = compile(scale.percent(pct));
            md.push_str(&r.row());
            md.push('\n');
            t.points.push((pct as f64, r.build.as_secs_f64()));
            m.points
                .push((pct as f64, r.peak_bytes as f64 / (1024.0 * 1024.0)));
        }
        time.push(t);
        memory.push(m);
    }
    let chart = plot::growth(
        ("full compile (seconds)", &time),
        ("peak heap (MiB)", &memory),
    );
    (md, chart)
}
