//! The dataplanes' cost on real packets, in the netns harness: pod x/a (client) sends to
//! pod y/b (server) on another node, so every packet is forwarded and judged by the server
//! node's dataplane. Configurations, side by side in one run and repeated in rounds:
//! no policy and no Moat dataplane on the server node (the baseline: its enforcer stopped,
//! its table and pins removed); Moat nft and Moat eBPF, each with 10, 1,000, 10,000 and
//! 100,000 rules plus a 10,000-member address group on the server pod (the server node's
//! enforcer restarted with that backend); and the same filler rules as a linear nft rule list
//! in a table of its own (the legacy way), without Moat.
//!
//! With `MOAT_BENCH_NFT_BEFORE=<a moat-enforcer binary>` every node's enforcer is that
//! binary (an earlier build, for a before/after comparison in one run). `Moat nft, local
//! pods` configurations apply the same snapshot with this build's `NftBackend` and the
//! server node's local pod table bound from its interfaces (`moat-bench nft-local`, its
//! enforcer stopped), so the new per-packet checks are measured.
//!
//! Metrics: 64-byte UDP packets received per second (GSO/GRO/TSO off on every interface:
//! per-packet cost is invisible in bulk TCP), new TCP connections per second (every SYN is a
//! new flow the dataplane judges), and iperf3 TCP throughput.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use moat_integration::world::World;
use serde_json::{Value, json};

use crate::policies;

#[derive(Clone, Copy, PartialEq)]
enum Config {
    None,
    Moat(&'static str, usize),
    Linear(usize),
    /// This build's nft dataplane with the server node's local pod table.
    Local(usize),
    /// `Moat` under 100 Admin ClusterNetworkPolicies over every namespace, whose Deny and
    /// Pass rules name other pods on other ports (issue #16): the server's ruleset tiered.
    Tiers(&'static str, usize),
}

impl Config {
    fn name(self) -> String {
        match self {
            Config::None => "no policy, no Moat dataplane".into(),
            Config::Moat(b, n) => format!("Moat {b}, {n} rules + 10k-member group"),
            Config::Linear(n) => format!("linear list, {n} rules"),
            Config::Local(n) => format!("Moat nft, local pods, {n} rules + 10k-member group"),
            Config::Tiers(b, n) => {
                format!("Moat {b}, {n} rules + 10k-member group + 100 admin policies")
            }
        }
    }
}

const CONFIGS: [Config; 19] = [
    Config::None,
    Config::Moat("nft", 10),
    Config::Moat("nft", 1_000),
    Config::Moat("nft", 10_000),
    Config::Moat("nft", 100_000),
    Config::Moat("ebpf", 10),
    Config::Moat("ebpf", 1_000),
    Config::Moat("ebpf", 10_000),
    Config::Moat("ebpf", 100_000),
    Config::Linear(10),
    Config::Linear(1_000),
    Config::Linear(10_000),
    Config::Linear(100_000),
    Config::Local(10),
    Config::Local(1_000),
    Config::Local(10_000),
    Config::Local(100_000),
    Config::Tiers("nft", 10_000),
    Config::Tiers("ebpf", 10_000),
];

const SETTLE: Duration = Duration::from_secs(5);

#[derive(Default, Clone)]
struct Sample {
    udp_pps: f64,
    conn_rate: f64,
    tcp_gbps: f64,
}

pub fn run(rounds: usize, secs: u64, only: Option<&str>) -> Result<String> {
    let before = std::env::var("MOAT_BENCH_NFT_BEFORE").ok();
    let wrappers = before
        .iter()
        .flat_map(|bin| {
            // `sh -c SCRIPT sh <this build's enforcer> ARGS…`: run `bin` with the ARGS.
            (0..16).map(move |i| {
                let script = format!("shift; exec '{bin}' \"$@\"");
                (i, vec!["sh".into(), "-c".into(), script, "sh".into()])
            })
        })
        .collect();
    if let Some(b) = &before {
        eprintln!("every enforcer runs {b}");
    }
    let mut w = World::start_wrapped("nft", wrappers);
    let server = w.pod("y/b").clone();
    let client = w.pod("x/a").clone();
    if server.node == client.node {
        bail!("client and server must be on different nodes");
    }
    let cpod = w.moat.cluster.pod("x/a");
    let spod = w.moat.cluster.pod("y/b");
    offload_off(&w)?;
    let log = w.moat.log("iperf3");
    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-p", "5201"]);
    w.moat.cluster.spawn_in(&spod, &mut cmd, &log)?;
    std::thread::sleep(Duration::from_millis(300));
    let dst = IpAddr::V4(server.v4);

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); CONFIGS.len()];
    for round in 0..rounds {
        // Rotate the order each round so drift (thermal, caches) spreads over all configs.
        for k in 0..CONFIGS.len() {
            let ci = (k + round) % CONFIGS.len();
            let c = CONFIGS[ci];
            if only.is_some_and(|o| !o.split('|').any(|part| c.name().contains(part))) {
                continue;
            }
            configure(&mut w, server.node, c, client.v4.into(), server.v4.into())?;
            // Let the server and enforcers finish persisting the new version before measuring.
            std::thread::sleep(SETTLE);
            let s = Sample {
                udp_pps: udp(&cpod, dst, secs)?,
                conn_rate: conns(&cpod, SocketAddr::new(dst, 80), secs)?,
                tcp_gbps: tcp(&cpod, dst, secs)?,
            };
            eprintln!(
                "round {round} {:<40} udp {:>9.0} pps  conn {:>7.0}/s  tcp {:>6.2} Gbit/s",
                c.name(),
                s.udp_pps,
                s.conn_rate,
                s.tcp_gbps
            );
            samples[ci].push(s);
        }
    }
    configure(
        &mut w,
        server.node,
        Config::None,
        client.v4.into(),
        server.v4.into(),
    )?;
    Ok(table(&samples, rounds, secs))
}

/// Turns segmentation and receive offloads off on every interface of the path.
fn offload_off(w: &World) -> Result<()> {
    let c = &w.moat.cluster;
    let mut namespaces = vec![c.fabric()];
    namespaces.extend((0..w.spec.nodes).map(|i| c.node(i)));
    namespaces.extend(w.spec.pods.iter().map(|p| c.pod(&p.key)));
    for ns in namespaces {
        let out = Command::new("ip")
            .args(["-n", &ns, "-o", "link"])
            .output()?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if name == "lo" {
                continue;
            }
            let ok = Command::new("ip")
                .args(["netns", "exec", &ns, "ethtool", "-K", name])
                .args(["gso", "off", "gro", "off", "tso", "off"])
                .stderr(Stdio::null())
                .status()
                .context("ethtool (installed by scripts/setup.sh)")?;
            if !ok.success() {
                bail!("ethtool -K {name} in {ns} failed");
            }
        }
    }
    Ok(())
}

fn configure(w: &mut World, node: usize, c: Config, client: IpAddr, server: IpAddr) -> Result<()> {
    let snode = w.moat.cluster.node(node);
    let _ = nft_in(&snode, "delete table inet linear\n");
    let mut objects = w.base();
    match c {
        Config::None | Config::Linear(_) => stop_moat(w, node)?,
        Config::Local(n) => {
            stop_moat(w, node)?;
            objects.push(policies::big(
                "bench",
                "y",
                json!({"matchLabels": {"pod": "b"}}),
                n,
                10_000,
                Some(json!({"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}]})),
            ));
        }
        Config::Moat(backend, n) | Config::Tiers(backend, n) => {
            if let Config::Tiers(..) = c {
                // Peers: pods of z, never the client (x/a).
                objects.extend(policies::admin_tiers(100, |i| {
                    let pod = ["a", "b", "c"][i % 3];
                    json!([{"pods": {"namespaceSelector": {"matchLabels": {"ns": "z"}},
                                      "podSelector": {"matchLabels": {"pod": pod}}}}])
                }));
            }
            if w.moat.enforcer_pid(node)?.is_none() || w.moat.backend_of(node) != backend {
                w.moat.kill_enforcer(node)?;
                w.moat.node_backends.insert(node, backend.to_string());
                w.moat.start_enforcer(node)?;
            }
            objects.push(policies::big(
                "bench",
                "y",
                json!({"matchLabels": {"pod": "b"}}),
                n,
                10_000,
                Some(json!({"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}]})),
            ));
        }
    }
    if let Config::Linear(n) = c {
        let mut s = format!(
            "table inet linear {{\n chain forward {{ type filter hook forward priority 0; policy accept;\n  ct state established,related accept\n  ip daddr {server} jump guard\n }}\n chain guard {{\n"
        );
        for i in 0..n {
            let (peer, proto, port) = policies::filler_rule(i);
            let _ = writeln!(
                s,
                "  ip saddr {peer} {} dport {port} accept",
                proto.to_lowercase()
            );
        }
        let _ = write!(s, "  ip saddr {client} accept\n  drop\n }}\n}}\n");
        nft_in(&snode, &s)?;
    }
    // Every running enforcer applies the objects (a stopped one is not waited for).
    let mut expected = moat_harness::moat::Moat::expected(&objects)?;
    if w.moat.enforcer_pid(node)?.is_none() {
        expected.remove(&w.moat.node_names[node]);
    }
    w.moat.write_manifests(&objects)?;
    w.moat.wait_applied(&expected, Duration::from_secs(60))?;
    if let Config::Local(_) = c {
        // The server node's snapshot as the server would send it, applied by this build's
        // backend with the node's pods.
        let name = &w.moat.node_names[node];
        let snap = moat_policy::Index::build(moat_policy::testkit::parse_all(&objects))
            .snapshot(name)
            .context("the server node's snapshot")?;
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), serde_json::to_vec(&snap)?)?;
        let ok = Command::new("ip")
            .args(["netns", "exec", &snode])
            .arg(std::env::current_exe()?)
            .arg("nft-local")
            .arg("--snapshot")
            .arg(file.path())
            .status()?;
        if !ok.success() {
            bail!("nft-local in {snode} failed");
        }
    }
    Ok(())
}

/// Stops node `node`'s enforcer and removes both dataplanes' state from it.
fn stop_moat(w: &mut World, node: usize) -> Result<()> {
    w.moat.kill_enforcer(node)?;
    let snode = w.moat.cluster.node(node);
    let _ = nft_in(&snode, "delete table inet moat\n");
    let pins = std::path::Path::new(moat_harness::cluster::BPFFS).join(&snode);
    if pins.exists() {
        std::fs::remove_dir_all(&pins)?;
    }
    Ok(())
}

fn nft_in(ns: &str, script: &str) -> Result<()> {
    crate::netns::nft(Some(ns), script)
}

/// An iperf3 client run of `secs` from `ns` to the server on `dst`, with `extra` options.
fn iperf3(ns: &str, dst: IpAddr, secs: u64, extra: &[&str]) -> Result<Value> {
    let (dst, secs) = (dst.to_string(), secs.to_string());
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "iperf3", "-J", "-c", &dst, "-p", "5201", "-t", &secs,
        ])
        .args(extra)
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 -c {dst} {}: {e}", extra.join(" "));
    }
    Ok(v)
}

/// 64-byte UDP payloads as fast as the sender can; packets the server received per second.
fn udp(ns: &str, dst: IpAddr, secs: u64) -> Result<f64> {
    let v = iperf3(ns, dst, secs, &["-u", "-l", "64", "-b", "0"])?;
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().context("packets")?;
    let lost = sum["lost_packets"].as_f64().context("lost")?;
    let seconds = sum["seconds"].as_f64().context("seconds")?;
    Ok((packets - lost) / seconds)
}

fn tcp(ns: &str, dst: IpAddr, secs: u64) -> Result<f64> {
    let v = iperf3(ns, dst, secs, &[])?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("bps")?;
    Ok(bps / 1e9)
}

/// New TCP connections per second from inside `ns` (this binary's `connect-loop`).
fn conns(ns: &str, dst: SocketAddr, secs: u64) -> Result<f64> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(std::env::current_exe()?)
        .args([
            "connect-loop",
            "--dst",
            &dst.to_string(),
            "--secs",
            &secs.to_string(),
        ])
        .output()?;
    if !out.status.success() {
        bail!("connect-loop: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Connects and resets (SO_LINGER 0: no TIME_WAIT to run out of ports) for `secs`; prints
/// completed connections per second.
pub fn connect_loop(dst: SocketAddr, secs: u64) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut n = 0u64;
    while Instant::now() < end {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(dst),
            socket2::Type::STREAM,
            None,
        )?;
        s.set_linger(Some(Duration::ZERO))?;
        if s.connect_timeout(&dst.into(), Duration::from_secs(1))
            .is_ok()
        {
            n += 1;
        }
    }
    println!("{}", n as f64 / start.elapsed().as_secs_f64());
    Ok(())
}

fn stats(v: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn table(samples: &[Vec<Sample>], rounds: usize, secs: u64) -> String {
    let base = if samples[0].is_empty() {
        samples.iter().find(|s| !s.is_empty()).expect("a sample")
    } else {
        &samples[0]
    };
    let (bu, _, _) = stats(base.iter().map(|s| s.udp_pps));
    let (bc, _, _) = stats(base.iter().map(|s| s.conn_rate));
    let (bt, _, _) = stats(base.iter().map(|s| s.tcp_gbps));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{rounds} rounds of {secs} s per metric and configuration (order rotated each round, {} s of settling after each change); median (min–max), ratio of medians to no policy.\n",
        SETTLE.as_secs()
    );
    let _ = writeln!(
        md,
        "| configuration | 64-byte UDP, packets/s | ratio | new TCP conns/s | ratio | iperf3 TCP, Gbit/s | ratio |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for (c, s) in CONFIGS.iter().zip(samples) {
        if s.is_empty() {
            continue;
        }
        let (u, ul, uh) = stats(s.iter().map(|s| s.udp_pps));
        let (n, nl, nh) = stats(s.iter().map(|s| s.conn_rate));
        let (t, tl, th) = stats(s.iter().map(|s| s.tcp_gbps));
        let _ = writeln!(
            md,
            "| {} | {:.0} ({:.0}–{:.0}) | {:.2} | {:.0} ({:.0}–{:.0}) | {:.2} | {:.2} ({:.2}–{:.2}) | {:.2} |",
            c.name(),
            u,
            ul,
            uh,
            u / bu,
            n,
            nl,
            nh,
            n / bc,
            t,
            tl,
            th,
            t / bt
        );
    }
    md
}
