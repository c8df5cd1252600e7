//! `moat-server`: watches a source and compiles per-node snapshots.

use std::io::Write;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use moat_policy::{Changes, Index};
use moat_server::source::{self, SourceSpec};
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(name = "moat-server", version, about = "Moat policy server")]
struct Args {
    /// Where cluster state comes from: `dir:PATH` (a directory of Kubernetes manifests).
    #[arg(long, env = "MOAT_SOURCE", default_value = "dir:examples")]
    source: SourceSpec,
    /// Seconds between full rescans of a directory source (changes are also watched).
    #[arg(long, env = "MOAT_POLL_SECONDS", default_value_t = 5)]
    poll_seconds: u64,
    /// Print every node's snapshot once and exit.
    #[arg(long)]
    once: bool,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "MOAT_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let Args {
        source,
        poll_seconds,
        once,
        log,
    } = args;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();

    let (tx, rx) = mpsc::channel(64);
    let SourceSpec::Dir(dir) = source;
    let _source = source::file::spawn(dir.clone(), tx, Duration::from_secs(poll_seconds.max(1)))
        .await
        .with_context(|| format!("starting the file source on {}", dir.display()))?;

    let index = Arc::new(RwLock::new(Index::new()));
    let task = moat_server::index::run(rx, index, move |changes, idx, first| {
        print_changes(changes, idx, first);
        if once {
            std::process::exit(0);
        }
    })
    .instrument(tracing::info_span!("index"));
    tokio::select! {
        _ = task => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
    }
    Ok(())
}

/// One line per changed node: what the node would receive now.
fn print_changes(changes: &Changes, idx: &Index, first: bool) {
    let mut out = std::io::stdout().lock();
    let mut nodes: Vec<_> = if first {
        idx.nodes().into_iter().map(|n| n.node).collect()
    } else {
        changes.updated.iter().map(|u| u.node.clone()).collect()
    };
    nodes.sort();
    if first {
        let _ = writeln!(
            out,
            "synced generation={} nodes={}",
            changes.generation,
            nodes.len()
        );
    }
    for name in nodes {
        if let Some(s) = idx.snapshot(&name) {
            let size = s.size();
            let _ = writeln!(
                out,
                "snapshot node={} version={} digest={} endpoints={} rules={} groups={} members={}",
                s.node,
                s.version,
                s.digest.short(),
                size.endpoints,
                size.rules,
                size.groups,
                size.members
            );
        }
    }
    let mut removed = changes.removed.clone();
    removed.sort();
    for n in removed {
        let _ = writeln!(out, "removed node={n}");
    }
    let _ = out.flush();
}
