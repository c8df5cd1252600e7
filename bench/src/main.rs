//! `moat-bench`: the policy compiler's benchmarks. Never run in CI; results go to
//! `docs/benchmarks.md`. Single-threaded, like the targets.
//!
//! Every figure is reported with a baseline measured in the same run: full compiles against
//! the time it takes just to validate and convert the same input objects (which any
//! implementation has to do), event latencies against a full compile.

mod alloc;
mod cnp;
mod cnpnode;
mod compiler;
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

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use compiler::{COMPILE_HEADER, Cnps, compile, events, secs};
use moat_policy::testkit::synthetic::Scale;

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
        #[command(flatten)]
        cnps: Cnps,
        /// One line of `key=value` pairs instead of the table row (for `cnp`).
        #[arg(long)]
        machine: bool,
    },
    /// Internal: one pod-event run (compile, then time single-pod events), for `cnp`.
    #[command(hide = true)]
    Events {
        #[arg(long, value_enum, default_value = "antrea")]
        scale: ScaleArg,
        #[command(flatten)]
        cnps: Cnps,
        #[arg(long, default_value_t = 500)]
        iterations: usize,
    },
    /// ClusterNetworkPolicy at scale (issue #16): full compile and pod events with and
    /// without admin and baseline policies, each run in a fresh process, interleaved.
    Cnp {
        #[arg(long, value_enum, default_value = "antrea")]
        scale: ScaleArg,
        #[command(flatten)]
        cnps: Cnps,
        /// Compile runs per world (baseline and with CNPs alternate).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Event runs per world (each applies and undoes every event `iterations` times).
        #[arg(long, default_value_t = 3)]
        event_rounds: usize,
        #[arg(long, default_value_t = 500)]
        iterations: usize,
    },
    /// The Antrea scale's largest node under the admin and baseline policies: fit, full
    /// apply and one-pod deltas on both dataplanes (root; private netns).
    CnpNode {
        /// Full applies timed per backend and snapshot.
        #[arg(long, default_value_t = 5)]
        full_runs: usize,
        /// One-pod deltas timed per backend and event.
        #[arg(long, default_value_t = 21)]
        delta_runs: usize,
        /// Only the plan of the node (no backend), with its table's sizes.
        #[arg(long)]
        plan_only: bool,
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
        Command::Compile {
            scale,
            percent,
            cnps,
            machine,
        } => {
            let r = compile(scale.scale().percent(percent), cnps);
            if machine {
                println!("{}", r.machine());
            } else {
                println!("{}", r.row());
            }
        }
        Command::Events {
            scale,
            cnps,
            iterations,
        } => {
            let (full, rows) = events(scale.scale(), cnps, iterations);
            println!("full={}", full.as_nanos());
            for r in rows {
                println!(
                    "event={}\tnodes={}\tmedian={}\tp90={}",
                    r.what,
                    r.nodes,
                    r.median.as_nanos(),
                    r.p90.as_nanos()
                );
            }
        }
        Command::Cnp {
            scale,
            cnps,
            rounds,
            event_rounds,
            iterations,
        } => {
            let cnps = if cnps == Cnps::NONE {
                Cnps {
                    admin: 100,
                    baseline: 20,
                }
            } else {
                cnps
            };
            print!(
                "{}",
                cnp::run(scale.scale(), cnps, rounds, event_rounds, iterations)?
            )
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
        Command::CnpNode {
            full_runs,
            delta_runs,
            plan_only,
        } => {
            if netns::inside()? {
                print!("{}", cnpnode::run(full_runs, delta_runs, plan_only)?);
            }
        }
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

fn report(quick: bool) -> (String, String) {
    let mut md = String::new();
    let mut time = Vec::new();
    let mut memory = Vec::new();
    let iterations = if quick { 50 } else { 500 };
    writeln!(md, "## Full compile\n").unwrap();
    md.push_str(COMPILE_HEADER);
    for scale in [Scale::MEDIUM, Scale::ANTREA] {
        md.push_str(&compile(scale, Cnps::NONE).row());
        md.push('\n');
    }
    for (name, scale) in [
        ("1,000 nodes / 30,000 pods", Scale::MEDIUM),
        ("5,000 nodes / 100,000 pods", Scale::ANTREA),
    ] {
        let (full, rows) = events(scale, Cnps::NONE, iterations);
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
            let r = compile(scale.percent(pct), Cnps::NONE);
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
