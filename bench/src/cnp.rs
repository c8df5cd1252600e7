//! ClusterNetworkPolicy at scale (issue #16): the same synthetic cluster compiled with and
//! without admin and baseline policies, in one run.
//!
//! Every measurement is a fresh child process (`compile --machine`, `events`): a process
//! that has already built and dropped a large index compiles slower (see the notes on the
//! growth table), and fresh processes keep the two worlds from inheriting each other's heap.
//! The worlds alternate, and which goes first alternates by round, so drift in this shared
//! machine's load lands on both. Compile time is the compiling thread's CPU time (other
//! processes' load stretches wall time, not that), reported as the median of the rounds
//! with the minimum beside it; wall time is reported too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use moat_policy::testkit::synthetic::Scale;

use crate::compiler::{Cnps, secs};

#[derive(Default)]
struct World {
    compile: Vec<BTreeMap<String, u128>>,
    /// Event name → (nodes changed, per-run medians, per-run p90s).
    events: BTreeMap<String, (u128, Vec<u128>, Vec<u128>)>,
    event_order: Vec<String>,
    full: Vec<u128>,
}

fn scale_args(scale: Scale) -> Result<&'static str> {
    Ok(if scale == Scale::ANTREA {
        "antrea"
    } else if scale == Scale::MEDIUM {
        "medium"
    } else {
        bail!("cnp runs the named scales only")
    })
}

fn child(args: &[String]) -> Result<String> {
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .args(args)
        .output()
        .with_context(|| format!("running {} {}", exe.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn cnp_args(cnps: Cnps) -> Vec<String> {
    vec![
        "--admin".into(),
        cnps.admin.to_string(),
        "--baseline".into(),
        cnps.baseline.to_string(),
    ]
}

fn run_compile(scale: &str, cnps: Cnps, w: &mut World) -> Result<()> {
    let mut args: Vec<String> = vec!["compile".into(), "--scale".into(), scale.into()];
    args.extend(cnp_args(cnps));
    args.push("--machine".into());
    let out = child(&args)?;
    let mut m = BTreeMap::new();
    for kv in out.split_whitespace() {
        let (k, v) = kv.split_once('=').context("key=value")?;
        m.insert(k.to_string(), v.parse()?);
    }
    eprintln!(
        "compile admin={} baseline={}: cpu {} wall {} peak {} MiB",
        cnps.admin,
        cnps.baseline,
        secs(ns(m["build_cpu"])),
        secs(ns(m["build"])),
        m["peak"] >> 20
    );
    w.compile.push(m);
    Ok(())
}

fn run_events(scale: &str, cnps: Cnps, iterations: usize, w: &mut World) -> Result<()> {
    let mut args: Vec<String> = vec!["events".into(), "--scale".into(), scale.into()];
    args.extend(cnp_args(cnps));
    args.extend(["--iterations".into(), iterations.to_string()]);
    let out = child(&args)?;
    let mut added = String::new();
    for line in out.lines() {
        if let Some(full) = line.strip_prefix("full=") {
            w.full.push(full.parse()?);
            continue;
        }
        let f: BTreeMap<&str, &str> = line
            .split('\t')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        // "… and deleted again" follows each addition: named after it, or they'd merge.
        let what = match f["event"] {
            w if w.starts_with('…') => format!("{added} {w}"),
            w => {
                added = w.to_string();
                added.clone()
            }
        };
        if !w.events.contains_key(&what) {
            w.event_order.push(what.clone());
        }
        let e = w.events.entry(what).or_default();
        e.0 = e.0.max(f["nodes"].parse()?);
        e.1.push(f["median"].parse()?);
        e.2.push(f["p90"].parse()?);
    }
    eprintln!(
        "events admin={} baseline={}: done",
        cnps.admin, cnps.baseline
    );
    Ok(())
}

fn ns(n: u128) -> Duration {
    Duration::from_nanos(n as u64)
}

fn median(v: &[u128]) -> u128 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

fn min(v: &[u128]) -> u128 {
    v.iter().copied().min().unwrap_or(0)
}

fn mib(b: u128) -> String {
    format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
}

pub fn run(
    scale: Scale,
    cnps: Cnps,
    rounds: usize,
    event_rounds: usize,
    iterations: usize,
) -> Result<String> {
    let name = scale_args(scale)?;
    let (mut base, mut with) = (World::default(), World::default());
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            [(Cnps::NONE, &mut base), (cnps, &mut with)]
        } else {
            [(cnps, &mut with), (Cnps::NONE, &mut base)]
        };
        for (c, w) in order {
            run_compile(name, c, w)?;
        }
    }
    for r in 0..event_rounds {
        let order = if r % 2 == 0 {
            [(Cnps::NONE, &mut base), (cnps, &mut with)]
        } else {
            [(cnps, &mut with), (Cnps::NONE, &mut base)]
        };
        for (c, w) in order {
            run_events(name, c, iterations, w)?;
        }
    }

    let mut md = String::new();
    writeln!(
        md,
        "Cluster: {} nodes / {} namespaces / {} pods / {} NetworkPolicies; with CNPs: plus {} Admin and {} Baseline ClusterNetworkPolicies. {} compile runs and {} event runs per world, each in a fresh process, the worlds alternating.\n",
        scale.nodes,
        scale.namespaces,
        scale.pods,
        scale.policies,
        cnps.admin,
        cnps.baseline,
        rounds,
        event_rounds
    )?;
    md.push_str("| measure | NetworkPolicy only (baseline) | with CNPs | ratio | target | met? |\n|---|---|---|---|---|---|\n");
    let col = |w: &World, k: &str| -> Vec<u128> { w.compile.iter().map(|m| m[k]).collect() };
    let time_row = |md: &mut String, what: &str, k: &str, target: Option<f64>| {
        let (b, c) = (col(&base, k), col(&with, k));
        let (bm, cm) = (median(&b), median(&c));
        let (target, met) = match target {
            Some(t) => (
                format!("≤ {}", secs(Duration::from_secs_f64(t))),
                if (cm as f64) / 1e9 <= t {
                    "met"
                } else {
                    "**missed**"
                },
            ),
            None => ("—".to_string(), "—"),
        };
        writeln!(
            md,
            "| {what} (median; min) | {} ({}) | **{}** ({}) | {:.2}× | {target} | {met} |",
            secs(ns(bm)),
            secs(ns(min(&b))),
            secs(ns(cm)),
            secs(ns(min(&c))),
            cm as f64 / bm as f64,
        )
        .unwrap();
    };
    time_row(
        &mut md,
        "full compile, CPU of the compiling thread",
        "build_cpu",
        Some(2.0),
    );
    time_row(&mut md, "full compile, wall", "build", Some(2.0));
    time_row(
        &mut md,
        "materialise all snapshots, wall",
        "materialize",
        None,
    );
    let size_row = |md: &mut String, what: &str, k: &str, bytes: bool, target: Option<u128>| {
        // Deterministic: every run gives the same figure; the maximum is shown.
        let b = col(&base, k).into_iter().max().unwrap_or(0);
        let c = col(&with, k).into_iter().max().unwrap_or(0);
        let f = |x: u128| if bytes { mib(x) } else { x.to_string() };
        let (target, met) = match target {
            Some(t) => (
                format!("≤ {} MB", t / 1_000_000),
                if c <= t { "met" } else { "**missed**" },
            ),
            None => ("—".to_string(), "—"),
        };
        writeln!(
            md,
            "| {what} | {} | **{}** | {:.2}× | {target} | {met} |",
            f(b),
            f(c),
            c as f64 / b as f64
        )
        .unwrap();
    };
    size_row(
        &mut md,
        "peak heap (input + index)",
        "peak",
        true,
        Some(800_000_000),
    );
    size_row(&mut md, "index after compile", "retained", true, None);
    size_row(&mut md, "IR rules", "rules", false, None);
    size_row(&mut md, "groups", "groups", false, None);
    size_row(
        &mut md,
        "snapshot entries, all nodes",
        "entries",
        false,
        None,
    );
    size_row(
        &mut md,
        "snapshot entries, largest node",
        "largest",
        false,
        None,
    );
    writeln!(
        md,
        "| full compile inside the event runs, wall (median) | {} | {} | {:.2}× | — | — |",
        secs(ns(median(&base.full))),
        secs(ns(median(&with.full))),
        median(&with.full) as f64 / median(&base.full) as f64
    )?;
    writeln!(
        md,
        "\nOne pod event → affected nodes' snapshots (wall; each event applied and undone {iterations} times per run; median of the runs' medians, p90 likewise; target ≤ 1 ms median):\n"
    )?;
    md.push_str("| event | nodes changed: baseline / with CNPs | median: baseline | median: with CNPs | ratio | p90: baseline / with CNPs | met? |\n|---|---|---|---|---|---|---|\n");
    for what in &with.event_order {
        let (bn, bmed, bp90) = &base.events[what];
        let (cn, cmed, cp90) = &with.events[what];
        let (b, c) = (median(bmed), median(cmed));
        writeln!(
            md,
            "| {what} | {bn} / {cn} | {} | **{}** | {:.2}× | {} / {} | {} |",
            secs(ns(b)),
            secs(ns(c)),
            c as f64 / b as f64,
            secs(ns(median(bp90))),
            secs(ns(median(cp90))),
            if c <= 1_000_000 { "met" } else { "**missed**" },
        )?;
    }
    Ok(md)
}
